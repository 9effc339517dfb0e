//! The real OpenHands agent server (openhands-agent-server from PyPI, in a sandbox image built
//! without a registry) in a private Docker engine under a guarded cgroup, driven through its
//! REST API by a scripted LLM that asks it to get out: every attempt is refused in the kernel
//! or by the DNS proxy, the records name the container, the LLM calls pass, and the agent
//! server keeps working.
//!
//! The image is built once and cached in target/openhands (about 3 to 4 minutes cold).

use egress_guard_e2e::openhands::{self, CONTAINER, Options};
use serde_json::Value;

use crate::setup;

#[test]
fn openhands_real_agent_server_is_contained() {
    setup();
    openhands::sweep_links();
    let rootfs = openhands::build_rootfs();
    let out = openhands::run_scenario(
        &rootfs.path,
        &Options {
            audit: false,
            quiet_env: true,
            attempts: true,
            linger: std::time::Duration::from_secs(1),
        },
    );
    let dump = |rs: &[Value]| {
        rs.iter()
            .map(openhands::describe)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let all = dump(&out.records);
    assert_eq!(
        out.status, "finished",
        "the conversation did not run through; records:\n{all}"
    );
    let has = |rs: &[Value], pred: &dyn Fn(&Value) -> bool| rs.iter().any(pred);
    let step = |i: usize| &out.steps[i];
    for s in &out.steps {
        assert!(
            s.ran.is_some(),
            "the agent never ran {:?}; outputs: {:?}",
            s.attempt.command,
            out.steps.iter().map(|s| &s.output).collect::<Vec<_>>()
        );
        assert!(
            s.records.iter().all(
                |r| r["container_name"] == CONTAINER && r["policy"] == "openhands-agent-server"
            ),
            "{}: records without the container or its policy:\n{}",
            s.attempt.what,
            dump(&s.records)
        );
        assert!(
            !has(&s.records, &|r| r["type"] != "proc.exec"
                && r["verdict"] == "allow"),
            "{}: something was allowed:\n{}",
            s.attempt.what,
            dump(&s.records)
        );
    }
    let refused_name = |i: usize, name: &str| {
        let s = step(i);
        assert!(
            has(&s.records, &|r| r["type"] == "dns"
                && r["query"].as_str().is_some_and(|q| q.contains(name))
                && r["verdict"] == "refuse"
                && r["rcode"] == "REFUSED"),
            "{}: no refused lookup of {name}:\n{}",
            s.attempt.what,
            dump(&s.records)
        );
    };
    let refused_connect = |i: usize, dst: &str, port: u16| {
        let s = step(i);
        assert!(
            has(&s.records, &|r| r["type"] == "net.connect"
                && r["dst"] == dst
                && r["port"] == port
                && r["verdict"] == "deny"),
            "{}: no refused connect to {dst}:{port}:\n{}",
            s.attempt.what,
            dump(&s.records)
        );
    };

    // curl to an unknown host: the proxy refuses the name.
    let s = step(0);
    assert!(
        s.output.contains("Could not resolve host") && s.rc() == Some(6),
        "curl: {:?}",
        s.output
    );
    refused_name(0, "unknown-host.example.net");
    // pip from a disallowed index: no name, no download.
    let s = step(1);
    assert!(
        s.rc() == Some(1) && !s.output.contains("Saved"),
        "pip: {:?}",
        s.output
    );
    refused_name(1, "pypi.evil.example");
    // The secret in a DNS name: refused, and never sent upstream.
    let s = step(2);
    assert_eq!(s.rc(), Some(2), "getent: {:?}", s.output);
    refused_name(2, openhands::SECRET);
    assert!(
        !out.upstream_log.contains(openhands::SECRET),
        "the secret reached the upstream resolver:\n{}",
        out.upstream_log
    );
    // AF_PACKET: EPERM from the BPF LSM, or the process killed by the tracepoint fallback.
    let s = step(3);
    match out.socket_guard.as_str() {
        "lsm" => assert!(
            s.output.contains("PermissionError: [Errno 1]") && s.rc() == Some(1),
            "AF_PACKET: {:?}",
            s.output
        ),
        _ => assert_eq!(s.rc(), Some(137), "AF_PACKET (killed): {:?}", s.output),
    }
    assert!(
        has(&s.records, &|r| r["type"] == "net.socket"
            && r["family"] == "packet"
            && r["verdict"] == "deny"),
        "no refused AF_PACKET socket:\n{}",
        dump(&s.records)
    );
    // The metadata stand-in and the app's port: connect() fails with EPERM.
    for (i, dst, port) in [
        (4, openhands::METADATA_ADDR, 80),
        (5, egress_guard_e2e::docker::GATEWAY, openhands::APP_PORT),
    ] {
        let s = step(i);
        assert!(
            s.output.contains("Operation not permitted") && s.rc() == Some(1),
            "{}: {:?}",
            s.attempt.what,
            s.output
        );
        refused_connect(i, dst, port);
    }

    // The LLM calls passed: looked up through the proxy, connected by the learned address.
    assert!(
        out.llm_requests > out.steps.len(),
        "the scripted LLM served {} requests",
        out.llm_requests
    );
    assert!(
        has(&out.llm_records, &|r| r["type"] == "dns"
            && r["verdict"] == "allow"
            && r["answers"].as_array().is_some_and(|a| a
                .iter()
                .any(|x| *x == openhands::LLM_ADDR))),
        "no allowed lookup of the LLM:\n{}",
        dump(&out.llm_records)
    );
    assert!(
        has(&out.llm_records, &|r| r["type"] == "net.connect"
            && r["verdict"] == "allow"
            && r["container_name"] == CONTAINER
            && r["hostnames"].as_array().is_some_and(|h| h
                .iter()
                .any(|n| *n == openhands::LLM_HOST))),
        "no allowed connect to the LLM:\n{}",
        dump(&out.llm_records)
    );
    // Nothing else got out.
    assert!(
        !has(&out.other_records, &|r| r["verdict"] == "allow"),
        "allowed besides the LLM:\n{}",
        dump(&out.other_records)
    );
    // And the agent server still works.
    assert_eq!(out.health_after.0, 200, "{:?}", out.health_after);
    assert!(out.health_after.1.contains("ok"), "{:?}", out.health_after);
}
