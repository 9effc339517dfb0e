#!/usr/bin/env python3
"""A scripted OpenAI-compatible chat-completions server (stdlib only), the demo's "LLM".

    fake_llm.py ADDRESS:PORT STEPS_FILE LOG_DIR

STEPS_FILE is a JSON list of shell commands. Each request with tools gets the next step as a
`terminal` tool call, and after the last one a `finish` call. It is stateless: the step is the
number of assistant messages already in the request, so a retry by the SDK replays the same
step. Requests without `tools` (title generation, condensation) get a plain text answer. Every
request is written to LOG_DIR/NNN.json (path, headers, body).
"""
import itertools
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADDR, STEPS_FILE, LOG_DIR = sys.argv[1], sys.argv[2], sys.argv[3]
with open(STEPS_FILE) as f:
    STEPS = json.load(f)
os.makedirs(LOG_DIR, exist_ok=True)
counter = itertools.count()


def tool_call(name, args, step):
    return {"id": f"call_{step}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *a):
        sys.stderr.write("fake-llm: " + (fmt % a) + "\n")

    def do_GET(self):  # /v1/models and the like
        self._send({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        n = next(counter)
        with open(os.path.join(LOG_DIR, f"{n:03d}.json"), "w") as f:
            json.dump({"path": self.path, "headers": dict(self.headers), "body": body}, f)
        if not body.get("tools"):
            msg = {"role": "assistant", "content": "Scripted demo"}
            finish = "stop"
        else:
            step = sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")
            if step < len(STEPS):
                args = {"command": STEPS[step]}
                props = next((t["function"]["parameters"].get("properties", {})
                              for t in body["tools"] if t["function"]["name"] == "terminal"), {})
                if "security_risk" in props:
                    args["security_risk"] = "LOW"
                if "summary" in props:
                    args["summary"] = f"step {step}"
                msg = {"role": "assistant", "content": f"Step {step}.",
                       "tool_calls": [tool_call("terminal", args, step)]}
            else:
                msg = {"role": "assistant", "content": None,
                       "tool_calls": [tool_call("finish", {"message": "done"}, step)]}
            finish = "tool_calls"
        self._send({"id": f"chatcmpl-{n}", "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model", "scripted"),
                    "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    host, port = ADDR.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print("listening", flush=True)
    server.serve_forever()
