//! The CloudWatch Logs sink against moto_server: what arrives, and what survives an outage
//! and a crash.

use std::time::{Duration, Instant};

use egress_guard_e2e::*;

use crate::setup;

const GROUP: &str = "/egress-guard/test";
const STREAM: &str = "host-1";

fn body(cg: &TestCgroup, endpoint: &str, spool: &std::path::Path) -> String {
    body_with(cg, endpoint, spool, "")
}

fn body_with(cg: &TestCgroup, endpoint: &str, spool: &std::path::Path, extra: &str) -> String {
    format!(
        r#"[[policy]]
name = "sandbox"
cgroups = ["{}"]
allow = ["127.0.0.2:9"]

[cloudwatch]
log_group = "{GROUP}"
log_stream = "{STREAM}"
region = "us-east-1"
endpoint = "{}"
flush_interval = "200ms"
spool_dir = "{}"
{extra}
"#,
        cg.rel(),
        endpoint,
        spool.display()
    )
}

fn file_lines(agent: &Agent) -> Vec<String> {
    std::fs::read_to_string(agent.dir().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The file sink's lines once one of them contains `what` (the file is written every 50 ms).
fn file_lines_with(agent: &Agent, what: &str) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = file_lines(agent);
        if lines.iter().any(|l| l.contains(what)) {
            return lines;
        }
        assert!(Instant::now() < end, "no {what} in the audit file");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until CloudWatch holds every line in `want` (30 s, and more for many lines).
fn wait_for_all(moto: &Moto, want: &[String]) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(30 + want.len() as u64 / 500);
    loop {
        let got = moto.messages(GROUP, STREAM);
        let have: std::collections::HashSet<&String> = got.iter().collect();
        let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
        if missing.is_empty() {
            return got;
        }
        assert!(
            Instant::now() < end,
            "{} lines missing in CloudWatch, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn cloudwatch_gets_every_record_of_the_file_sink_through_an_outage_and_a_crash() {
    setup();
    let mut moto = Moto::start();
    let cg = TestCgroup::new("cloudwatch");
    let spool = std::env::temp_dir().join(unique("spool"));
    let mut agent = Agent::start(&body(&cg, &moto.endpoint(), &spool));
    let denied = tcp_listener("127.0.0.3");
    for _ in 0..3 {
        assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());
    }
    // Exactly the file sink's JSON, every line of it.
    agent.stop();
    let file = file_lines(&agent);
    assert!(file.iter().any(|l| l.contains("\"net.connect\"")));
    let got = wait_for_all(&moto, &file);
    let records: Vec<&String> = got.iter().filter(|m| !m.contains("\"_aws\"")).collect();
    assert_eq!(records.len(), file.len(), "nothing twice, nothing else");

    // An outage: records made while CloudWatch is down, then a crash (kill -9) during it.
    agent.spawn();
    // A new moto starts empty: only records made from here on are checked after it returns.
    let mark = file_lines(&agent).len();
    moto.stop();
    for _ in 0..5 {
        assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());
    }
    std::thread::sleep(Duration::from_millis(500));
    agent.kill9();
    let during = file_lines(&agent);
    // Back: a new moto starts empty; the new agent sends what its spool holds.
    moto.restart();
    agent.spawn();
    let outage: Vec<String> = during[mark..].to_vec();
    assert!(
        outage
            .iter()
            .filter(|l| l.contains("\"net.connect\""))
            .count()
            >= 5
    );
    wait_for_all(&moto, &outage);
    let status: serde_json::Value =
        serde_json::from_slice(&agent.ctl(&["status", "--json"]).stdout).unwrap();
    let cw = &status["cloudwatch"];
    assert_eq!(cw["log_group"], GROUP, "{status}");
    assert!(
        cw["delivered_events"].as_u64().unwrap() >= outage.len() as u64,
        "{cw}"
    );
    assert!(cw["last_delivery"].is_string(), "{cw}");
    agent.stop();
    let _ = std::fs::remove_dir_all(&spool);
}

#[test]
fn cloudwatch_errors_are_retried_or_quarantined_as_they_should_be() {
    setup();
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port);
    let cg = TestCgroup::new("cloudwatch-faults");
    let spool = std::env::temp_dir().join(unique("spool"));
    let denied = tcp_listener("127.0.0.3");
    // Throttling, then two kinds of 5xx: retried until CloudWatch takes the batch.
    proxy.inject(&[
        (400, "ThrottlingException"),
        (500, "InternalFailure"),
        (503, "ServiceUnavailableException"),
    ]);
    let mut agent = Agent::start(&body_with(
        &cg,
        &proxy.endpoint(),
        &spool,
        "metrics_interval = \"1s\"",
    ));
    assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());
    let first = file_lines_with(&agent, "\"net.connect\"");
    wait_for_all(&moto, &first);
    assert_eq!(proxy.pending(), 0);
    assert!(proxy.puts.load(std::sync::atomic::Ordering::SeqCst) >= 4);

    // An invalid-parameter answer: that batch is quarantined, not retried; later ones flow.
    let before = moto.messages(GROUP, STREAM).len();
    proxy.inject(&[(400, "InvalidParameterException")]);
    assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());
    let end = Instant::now() + Duration::from_secs(20);
    let quarantined = loop {
        let q: Vec<_> = std::fs::read_dir(&spool)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("quarantine-"))
            .collect();
        if !q.is_empty() {
            break std::fs::read_to_string(q[0].path()).unwrap();
        }
        assert!(Instant::now() < end, "no quarantine file");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());
    agent.stop();
    let file = file_lines(&agent);
    // The quarantined batch is whichever came next (the probe's exec, its connect, its exit
    // or a metrics record, depending on the flush timing): records of this run, none delivered.
    let delivered = moto.messages(GROUP, STREAM);
    for line in quarantined.lines() {
        let emf = line.contains("\"_aws\"");
        assert!(
            emf || file.iter().any(|l| l == line),
            "not a record of ours: {line}"
        );
        assert!(
            !delivered.iter().any(|m| m == line),
            "delivered too: {line}"
        );
        assert!(!first.iter().any(|l| l == line), "an earlier batch: {line}");
    }
    let got = wait_for_all(
        &moto,
        &file
            .iter()
            .filter(|l| !quarantined.contains(l.as_str()))
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert!(got.len() > before);
    assert!(
        file.iter()
            .any(|l| l.contains("agent.cloudwatch_quarantined")),
        "the quarantine is on record"
    );
    // The metrics, in the Embedded Metric Format, in the same stream.
    let denials: u64 = got
        .iter()
        .filter_map(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .filter(|v| v["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "EgressGuard")
        .filter_map(|v| v["DeniedConnections"].as_u64())
        .sum();
    assert!(denials >= 2, "EMF DeniedConnections: {denials}");
    // The heartbeat the AgentSilent alarms watch: once per emission (every second here).
    let heartbeats = got
        .iter()
        .filter_map(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .filter(|v| v["Heartbeat"] == 1)
        .count();
    assert!(heartbeats >= 2, "EMF Heartbeat records: {heartbeats}");
    let _ = std::fs::remove_dir_all(&spool);
}

#[test]
fn cloudwatch_a_burst_of_30000_records_arrives_in_legal_batches() {
    setup();
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port);
    let cg = TestCgroup::new("cloudwatch-burst");
    let spool = std::env::temp_dir().join(unique("spool"));
    let denied = tcp_listener("127.0.0.3");
    // A big ring: this test is about batching, not about a full ring.
    let mut agent = Agent::start(&format!(
        "{}\n[audit]\nring_buffer_bytes = 16777216\n",
        body(&cg, &proxy.endpoint(), &spool)
    ));
    let r = probe_in(&cg.path, &["storm", "tcp", &denied.to_string(), "30000"]);
    assert_eq!(r.stdout.trim(), "ok=0 eperm=30000 err=0", "{r:?}");
    // Sent while the agent runs (moto takes a while per batch); then the stop's last records.
    let sent = || -> usize {
        proxy
            .batches
            .lock()
            .unwrap()
            .iter()
            .filter_map(|b| b.as_ref().ok().map(|b| b.0))
            .sum()
    };
    let end = Instant::now() + Duration::from_secs(120);
    while sent() < 30_000 {
        assert!(Instant::now() < end, "{} records sent", sent());
        std::thread::sleep(Duration::from_millis(300));
    }
    agent.stop();
    let file = file_lines(&agent);
    assert!(file.len() > 30_000, "{} records", file.len());
    let end = Instant::now() + Duration::from_secs(10);
    while sent() < file.len() {
        assert!(
            Instant::now() < end,
            "{} of {} records sent",
            sent(),
            file.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let batches = proxy.batches.lock().unwrap().clone();
    for b in &batches {
        assert!(b.is_ok(), "a batch broke a PutLogEvents rule: {b:?}");
    }
    assert!(
        batches.len() >= 4,
        "{} batches for {} records",
        batches.len(),
        file.len()
    );
    let got = moto.messages(GROUP, STREAM);
    let records = got.iter().filter(|m| !m.contains("\"_aws\"")).count();
    assert_eq!(records, file.len(), "every record once");
    let _ = std::fs::remove_dir_all(&spool);
}

#[test]
fn cloudwatch_access_denied_keeps_everything_spooled_and_says_so() {
    setup();
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port);
    let cg = TestCgroup::new("cloudwatch-denied");
    let spool = std::env::temp_dir().join(unique("spool"));
    proxy.inject(&[(400, "AccessDeniedException")]);
    let mut agent = Agent::start(&body(&cg, &proxy.endpoint(), &spool));
    agent.wait_for_log(
        |l| l.contains("access denied"),
        "the access-denied log line",
    );
    let v: serde_json::Value =
        serde_json::from_slice(&agent.ctl(&["status", "--json"]).stdout).unwrap();
    let cw = &v["cloudwatch"];
    assert!(
        cw["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("AccessDenied")),
        "{cw}"
    );
    assert!(cw["spool_pending_bytes"].as_u64().unwrap() > 0, "{cw}");
    assert_eq!(cw["delivered_events"], 0, "{cw}");
    // Nothing was dropped: the records wait in the spool for the next attempt (60 s later).
    assert!(moto.messages(GROUP, STREAM).is_empty());
    agent.kill9();
    let _ = std::fs::remove_dir_all(&spool);
}

#[test]
fn cloudwatch_kill_9_mid_stream_loses_nothing_and_ships_nothing_the_file_lacks() {
    setup();
    let moto = Moto::start();
    // CloudWatch behind a proxy that fails and hangs some of the calls made meanwhile.
    let proxy = FaultProxy::start(moto.port);
    proxy.inject(&[
        (503, "ServiceUnavailableException").into(),
        egress_guard_e2e::Fault::Hang,
        (500, "InternalFailure").into(),
    ]);
    let cg = TestCgroup::new("cloudwatch-kill");
    let spool = std::env::temp_dir().join(unique("spool"));
    let denied = tcp_listener("127.0.0.3");
    // A ring that holds the records of the seconds a restart takes (16 MiB: ~15 s of this
    // storm), so that nothing overflows while no agent reads.
    let mut agent = Agent::start(&body_with(
        &cg,
        &proxy.endpoint(),
        &spool,
        "[audit]\nring_buffer_bytes = 16777216\n",
    ));
    // 10,000 connects a second for 4 s, each refused and so one net.connect record, while the
    // agent is killed (-9) and started again at moments no one chose.
    let storm = std::thread::spawn({
        let (path, to) = (cg.path.clone(), denied.to_string());
        move || probe_in(&path, &["storm-paced", "tcp", &to, "10000", "4"]).stdout
    });
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut kills = 0;
    while !storm.is_finished() && kills < 5 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(150 + (seed >> 33) % 500));
        agent.kill9();
        agent.spawn();
        kills += 1;
    }
    let out = storm.join().unwrap();
    let made: usize = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("eperm="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("storm output: {out}"));
    assert!(out.starts_with("ok=0 "), "{out}");
    assert!(kills >= 3, "only {kills} kills during the storm");
    // CloudWatch gets every record of the storm, by identity (a record written to the file
    // just before a kill is read again, and its second line, with another ts, is shipped).
    let storm_ids = |lines: &[String]| -> std::collections::HashSet<(String, String)> {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "net.connect" && v["dst"] == "127.0.0.3")
            .map(|v| (v["kernel_ns"].to_string(), v["tid"].to_string()))
            .collect()
    };
    let end = Instant::now() + Duration::from_secs(30 + made as u64 / 500);
    let got = loop {
        let got = moto.messages(GROUP, STREAM);
        let shipped = storm_ids(&got).len();
        if shipped >= made {
            break got;
        }
        assert!(
            Instant::now() < end,
            "{shipped} of {made} records of the storm reached CloudWatch"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(proxy.pending(), 0, "calls met not all the injected faults");
    assert!(proxy.hung.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    agent.stop();

    // The file: every line one whole record, every connect of the storm at least once (a
    // batch read but not committed before a kill is read again), none lost.
    let lines = file_lines(&agent);
    let mut connects = std::collections::HashSet::new();
    let mut lost = 0;
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("not one whole record in the audit file ({e}): {l:?}"));
        if v["type"] == "net.connect" && v["dst"] == "127.0.0.3" {
            connects.insert((v["kernel_ns"].to_string(), v["tid"].to_string()));
        }
        if v["type"] == "agent.events_lost" {
            lost += v["count"].as_u64().unwrap_or(0) as usize;
        }
    }
    assert_eq!(
        (connects.len(), lost),
        (made, 0),
        "{made} connects made: (in the file, reported lost) after {kills} kills"
    );
    // And CloudWatch holds no line the file does not.
    let file: std::collections::HashSet<&String> = lines.iter().collect();
    let strangers: Vec<&String> = got
        .iter()
        .filter(|m| !m.contains("\"_aws\"") && !file.contains(m))
        .collect();
    assert!(
        strangers.is_empty(),
        "{} records shipped that the audit file does not hold: {:?}",
        strangers.len(),
        &strangers[..strangers.len().min(3)]
    );
    let _ = std::fs::remove_dir_all(&spool);
}
