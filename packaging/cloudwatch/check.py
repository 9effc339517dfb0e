"""Checks the CloudWatch packaging (run by `cargo xtask test`, after cfn-lint):

- the template's dashboard body uses only known substitutions, parses as JSON once rendered,
  and is exactly packaging/cloudwatch/dashboard.json (so the two cannot drift);
- its Logs Insights widgets read the configured log group;
- the IAM policy grants the agent exactly the calls it makes, and the template's managed
  policy the same.
"""
import json
import re
import sys
from pathlib import Path

from cfnlint.decode import cfn_yaml

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "egress-guard.yaml"
DASHBOARD = HERE / "dashboard.json"
IAM = HERE.parent / "iam" / "egress-guard-policy.json"
# What agent/src/cloudwatch/sink.rs calls.
CALLS = {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"}


def actions(statements):
    out = set()
    for s in statements:
        a = s["Action"]
        out |= {a} if isinstance(a, str) else set(a)
    return out


tpl = cfn_yaml.load(str(TEMPLATE))
body = tpl["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
subs = set(re.findall(r"\$\{([^}!][^}]*)\}", body))
assert subs <= {"LogGroupName", "AWS::Region"}, f"unknown substitutions: {subs}"
rendered = (
    body.replace("${LogGroupName}", "/openhands/egress-guard")
    .replace("${AWS::Region}", "us-east-1")
    .replace("${!", "${")
)
dash = json.loads(rendered)
for w in dash["widgets"]:
    if w["type"] == "log":
        q = w["properties"]["query"]
        assert q.startswith("SOURCE '/openhands/egress-guard' | "), q
assert json.loads(DASHBOARD.read_text()) == dash, "dashboard.json differs from the template body"

iam = json.loads(IAM.read_text())
assert actions(iam["Statement"]) == CALLS, actions(iam["Statement"])
policies = [
    r for r in tpl["Resources"].values() if r["Type"] == "AWS::IAM::ManagedPolicy"
]
assert len(policies) == 1
assert actions(policies[0]["Properties"]["PolicyDocument"]["Statement"]) == CALLS
print("packaging/cloudwatch: OK")
sys.exit(0)
