//! The control socket and the CLI on top of it: every subcommand, access by peer
//! credentials, and robustness against bad or abusive clients.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    process::{Command, Output},
    time::Duration,
};

use egress_guard_e2e::*;
use serde_json::Value;

use crate::setup;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

fn policy(cg: &TestCgroup, allowed: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "[[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\nallow = [\"{allowed}\", \"10.0.0.0/8:443\", \"api.example.com:443\"]\ndns = [\"127.0.0.1:9\"]\n{extra}",
        cg.rel()
    )
}

#[test]
fn every_subcommand_answers_in_table_and_json_form() {
    setup();
    let cg = TestCgroup::new("control");
    let allowed = tcp_listener("127.0.0.2");
    let denied = tcp_listener("127.0.0.3");
    let agent = Agent::start(&policy(&cg, allowed, ""));
    assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());

    let out = agent.ctl(&["status"]);
    assert!(
        out.status.success()
            && text(&out).contains("policy sandbox")
            && text(&out).contains("socket guard"),
        "{}",
        text(&out)
    );
    let v = json(&agent.ctl(&["status", "--json"]));
    assert_eq!(v["policies"][0]["name"], "sandbox");
    assert_eq!(v["process_events"], true);
    assert!(
        v["uptime_seconds"].is_u64() && v["pins"]["attached"].as_u64().unwrap() > 0,
        "{v}"
    );

    let out = agent.ctl(&["targets"]);
    assert!(
        text(&out).contains(&format!("/{}", cg.rel())),
        "{}",
        text(&out)
    );
    let v = json(&agent.ctl(&["targets", "--json"]));
    assert_eq!(v["targets"][0]["policy"], "sandbox");

    let out = agent.ctl(&["policy", "sandbox"]);
    assert!(
        text(&out).contains("10.0.0.0/8") && text(&out).contains("api.example.com"),
        "{}",
        text(&out)
    );
    let v = json(&agent.ctl(&["policy", "--json"]));
    assert_eq!(v["policies"][0]["kernel_entries"], 2);
    let out = agent.ctl(&["policy", "nope"]);
    assert!(
        !out.status.success() && text(&out).contains("no policy named"),
        "{}",
        text(&out)
    );

    let out = agent.ctl(&["check", "10.9.8.7:443"]);
    assert!(
        out.status.success()
            && text(&out).contains("ALLOW")
            && text(&out).contains("10.0.0.0/8:443"),
        "{}",
        text(&out)
    );
    let out = agent.ctl(&["check", &denied.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("DENY") && text(&out).contains("no entry"),
        "{}",
        text(&out)
    );
    let v: Value = serde_json::from_slice(
        &agent
            .ctl(&["check", "[::ffff:10.1.1.1]:443", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(
        (v["verdict"].as_str(), v["dest"].as_str()),
        (Some("allow"), Some("10.1.1.1"))
    );

    let out = agent.ctl(&["events", "--type", "net.connect", "--verdict", "deny"]);
    assert!(text(&out).contains(&denied.to_string()), "{}", text(&out));
    let out = agent.ctl(&["events", "--json", "--type", "net", "--since", "1h"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|r| r["verdict"] == "deny" && r["port"] == u64::from(denied.port())),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|r| r["type"].as_str().unwrap().starts_with("net."))
    );

    let v = json(&agent.ctl(&["stats", "--json"]));
    assert!(
        v["policies"][0]["counters"]["connect_denied"]
            .as_u64()
            .unwrap()
            >= 1,
        "{v}"
    );
    assert_eq!(v["audit_records_lost"], 0, "{v}");
    assert!(v["audit_records"].as_u64().unwrap() >= 3, "{v}");
    assert!(text(&agent.ctl(&["stats"])).contains("CONN_DENY"));

    let out = agent.ctl(&["reload"]);
    assert!(
        out.status.success() && text(&out).contains("reload applied"),
        "{}",
        text(&out)
    );
}

/// A group of its own for the test, removed on drop.
struct TestGroup {
    name: String,
    gid: u32,
}

impl TestGroup {
    fn new() -> Self {
        let name = format!("egt{}", std::process::id());
        let out = Command::new("groupadd").arg(&name).output().unwrap();
        assert!(out.status.success(), "groupadd: {}", text(&out));
        let line = std::fs::read_to_string("/etc/group")
            .unwrap()
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap()
            .to_string();
        let gid = line.split(':').nth(2).unwrap().parse().unwrap();
        Self { name, gid }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// Runs the CLI as the unprivileged user 65534 with primary group `gid` and supplementary
/// groups `groups`.
fn as_user(agent: &Agent, gid: u32, groups: &[u32], args: &[&str]) -> Output {
    let groups_arg = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    Command::new("setpriv")
        .args(["--reuid=65534", &format!("--regid={gid}"), &groups_arg])
        .arg(agent_bin())
        .args(args)
        .arg("--socket")
        .arg(agent.socket())
        .output()
        .unwrap()
}

#[test]
fn members_of_the_group_may_read_only_root_may_reload_others_are_refused() {
    setup();
    let cg = TestCgroup::new("control-access");
    let group = TestGroup::new();
    let agent = Agent::start(&policy(
        &cg,
        tcp_listener("127.0.0.2"),
        &format!("[control]\ngroup = \"{}\"\n", group.name),
    ));
    // The socket's directory must be reachable for the unprivileged user.
    let dir = agent.socket().parent().unwrap().to_path_buf();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // A member by primary group, and one by a supplementary group the kernel knows of (not
    // in the user database): both may read, neither may reload.
    for (gid, groups) in [(group.gid, vec![]), (65534, vec![group.gid])] {
        let out = as_user(&agent, gid, &groups, &["status"]);
        assert!(
            out.status.success() && text(&out).contains("policy sandbox"),
            "a group member reads: {}",
            text(&out)
        );
        let out = as_user(&agent, gid, &groups, &["reload"]);
        assert!(
            !out.status.success() && text(&out).contains("only root may reload"),
            "{}",
            text(&out)
        );
    }
    // A stranger cannot open the socket (0660)...
    let out = as_user(&agent, 65534, &[], &["status"]);
    assert!(
        !out.status.success() && text(&out).contains("permission denied"),
        "a stranger is refused: {}",
        text(&out)
    );
    // ...and even on an open socket, the agent's own check refuses it.
    std::fs::set_permissions(
        agent.socket(),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let out = as_user(&agent, 65534, &[], &["status"]);
    assert!(
        !out.status.success() && text(&out).contains("uid 65534 is neither root nor a member"),
        "the peer-credential check: {}",
        text(&out)
    );
    let out = agent.ctl(&["reload"]);
    assert!(out.status.success(), "root reloads: {}", text(&out));
}

#[test]
fn garbage_half_requests_and_many_abrupt_followers_leave_the_agent_serving() {
    setup();
    let cg = TestCgroup::new("control-abuse");
    let allowed = tcp_listener("127.0.0.2");
    let denied = tcp_listener("127.0.0.3");
    let agent = Agent::start(&policy(&cg, allowed, ""));
    let socket = agent.socket();

    let mut garbage = UnixStream::connect(&socket).unwrap();
    let _ = garbage.write_all(&[0xff, 0x00, 0x13, 0x37, b'\n', b'\r', b'\n']);
    let mut half = UnixStream::connect(&socket).unwrap();
    let _ = half.write_all(b"GET /v1/sta");
    drop(half);
    let mut answer = Vec::new();
    garbage
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = garbage.read_to_end(&mut answer);
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400") || answer.is_empty(),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // 200 followers that go away without a word.
    let mut followers = Vec::new();
    for _ in 0..200 {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(b"GET /v1/events?follow=1 HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        followers.push(s);
    }
    // Records flow to them while they sit there; then they vanish.
    assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());
    // A follower sees the live record (the port appears after the response headers).
    followers[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut seen = Vec::new();
    let want = format!("\"port\":{}", denied.port());
    while !String::from_utf8_lossy(&seen).contains(&want) {
        let mut buf = [0u8; 4096];
        let n = followers[0]
            .read(&mut buf)
            .expect("the follower got no live record");
        assert!(n > 0, "the follow stream ended");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(followers);

    // Still enforcing, still recording, still answering.
    assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());
    assert!(probe_in(&cg.path, &["tcp", &allowed.to_string()]).ok());
    let v = json(&agent.ctl(&["status", "--json"]));
    assert_eq!(v["policies"][0]["name"], "sandbox");
    // Records reach the feed within the agent's drain interval: wait for the second one.
    let mut out = agent.ctl(&["status"]);
    for _ in 0..50 {
        out = agent.ctl(&[
            "events",
            "--json",
            "--type",
            "net.connect",
            "--verdict",
            "deny",
        ]);
        if String::from_utf8_lossy(&out.stdout).lines().count() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        2,
        "{}",
        text(&out)
    );
}
