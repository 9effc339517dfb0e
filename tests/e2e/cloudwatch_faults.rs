//! The CloudWatch Logs sink against a PutLogEvents that is never answered (moto_server behind
//! the fault proxy): the request is abandoned after the attempt timeout and retried, nothing is
//! lost, and status tells the truth about the backlog all along.

use std::{
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use egress_guard_e2e::*;

use crate::setup;

const GROUP: &str = "/egress-guard/test-faults";
const STREAM: &str = "host-1";
/// The sink's attempt timeout (agent/src/cloudwatch/sink.rs `ATTEMPT_TIMEOUT`).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

fn body(cg: &TestCgroup, endpoint: &str, spool: &Path) -> String {
    // EMF metrics once an hour: nothing but the probes' records enters the spool during the
    // test, so the backlog on disk can be compared with status byte for byte.
    format!(
        r#"[[policy]]
name = "sandbox"
cgroups = ["{}"]
allow = ["127.0.0.2:9"]

[cloudwatch]
log_group = "{GROUP}"
log_stream = "{STREAM}"
region = "us-east-1"
endpoint = "{endpoint}"
flush_interval = "200ms"
metrics_interval = "1h"
spool_dir = "{}"
"#,
        cg.rel(),
        spool.display()
    )
}

/// The audit file's whole records (a line being written is left out).
fn file_records(agent: &Agent) -> Vec<String> {
    std::fs::read_to_string(agent.dir().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .map(str::to_string)
        .collect()
}

/// Records in the audit file of connects to `to`.
fn connects_to(agent: &Agent, to: &str) -> usize {
    let needle = format!("\"dst\":\"{to}\"");
    file_records(agent)
        .iter()
        .filter(|l| l.contains("\"net.connect\"") && l.contains(&needle))
        .count()
}

/// Bytes in the spool's segment files past its cursor file: the backlog as the disk has it.
fn backlog_on_disk(spool: &Path) -> u64 {
    let cursor = std::fs::read_to_string(spool.join("cursor")).unwrap_or_default();
    let (seg, off) = cursor
        .trim()
        .split_once(' ')
        .map(|(s, o)| (s.parse::<u64>().unwrap(), o.parse::<u64>().unwrap()))
        .unwrap_or((0, 0));
    std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let seq: u64 = name
                .strip_prefix("seg-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()?;
            let len = e.metadata().ok()?.len();
            match seq.cmp(&seg) {
                std::cmp::Ordering::Less => Some(0),
                std::cmp::Ordering::Equal => Some(len.saturating_sub(off)),
                std::cmp::Ordering::Greater => Some(len),
            }
        })
        .sum()
}

/// `egress-guard status --json`'s cloudwatch object.
fn cw_status(agent: &Agent) -> serde_json::Value {
    let out = agent.ctl(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json ({e}): {out:?}"));
    v["cloudwatch"].clone()
}

fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "waited {within:?} in vain for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An agent shipping through a fault proxy, once its first batch went through (the group and
/// stream exist) and nothing waits in its spool.
fn started(what: &str) -> (Moto, FaultProxy, TestCgroup, std::path::PathBuf, Agent) {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port);
    let cg = TestCgroup::new(what);
    let spool = std::env::temp_dir().join(unique("spool"));
    let agent = Agent::start(&body(&cg, &proxy.endpoint(), &spool));
    wait_until(Duration::from_secs(30), "a first delivery", || {
        !moto.messages(GROUP, STREAM).is_empty() && cw_status(&agent)["spool_pending_bytes"] == 0
    });
    (moto, proxy, cg, spool, agent)
}

fn storm(cg: &TestCgroup, to: &str, n: usize) {
    let r = probe_in(&cg.path, &["storm", "tcp", to, &n.to_string()]);
    assert_eq!(r.stdout.trim(), format!("ok=0 eperm={n} err=0"), "{r:?}");
}

#[test]
fn cloudwatch_a_hung_request_times_out_and_is_retried_until_every_record_arrives() {
    setup();
    let (moto, proxy, cg, spool, mut agent) = started("cloudwatch-hang");
    let denied = tcp_listener("127.0.0.3");
    let to = denied.to_string();
    // The next two PutLogEvents are read and never answered.
    proxy.inject(&[Fault::Hang, Fault::Hang]);
    storm(&cg, &to, 300);
    wait_until(Duration::from_secs(20), "a PutLogEvents held", || {
        proxy.hung.load(Ordering::SeqCst) >= 1
    });
    let held = Instant::now();
    // Records keep coming while it hangs.
    storm(&cg, &to, 200);
    // The sink gives up on it after the attempt timeout, and tries again (held too).
    wait_until(
        ATTEMPT_TIMEOUT * 4,
        "a second attempt after the attempt timeout",
        || proxy.hung.load(Ordering::SeqCst) >= 2,
    );
    let waited = held.elapsed();
    assert!(
        waited >= ATTEMPT_TIMEOUT - Duration::from_millis(500) && waited < ATTEMPT_TIMEOUT * 2,
        "the second attempt came {waited:?} after the first"
    );
    let cw = cw_status(&agent);
    assert_eq!(cw["timeouts"], 1, "{cw}");
    assert!(
        cw["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no answer within")),
        "{cw}"
    );
    assert!(cw["spool_pending_bytes"].as_u64().unwrap() > 0, "{cw}");
    let text = String::from_utf8_lossy(&agent.ctl(&["status"]).stdout).into_owned();
    assert!(
        text.contains("timed-out requests 1") && text.contains("LAST ERROR: no answer within"),
        "{text}"
    );
    // The third attempt goes through: every record reaches CloudWatch.
    wait_until(Duration::from_secs(10), "500 connects in the file", || {
        connects_to(&agent, "127.0.0.3") == 500
    });
    let want = file_records(&agent);
    wait_until(ATTEMPT_TIMEOUT * 4, "every record in CloudWatch", || {
        let got: std::collections::HashSet<String> =
            moto.messages(GROUP, STREAM).into_iter().collect();
        want.iter().all(|w| got.contains(w))
    });
    wait_until(Duration::from_secs(10), "an empty backlog", || {
        let cw = cw_status(&agent);
        cw["spool_pending_bytes"] == 0 && cw["oldest_undelivered_age_ms"].is_null()
    });
    let cw = cw_status(&agent);
    assert_eq!(cw["timeouts"], 2, "{cw}");
    assert!(cw["last_error"].is_null(), "{cw}");
    assert_eq!(proxy.hung.load(Ordering::SeqCst), 2);
    // Logged once for the streak of two, and once when it ended.
    let log = agent.log_text();
    for l in log.lines().filter(|l| l.contains("CloudWatch: ")) {
        eprintln!("agent log: {l}");
    }
    assert_eq!(log.matches("no answer within").count(), 1, "{log}");
    assert_eq!(log.matches("answered again").count(), 1, "{log}");
    agent.stop();
    let _ = std::fs::remove_dir_all(&spool);
}

#[test]
fn cloudwatch_status_shows_the_real_backlog_and_its_age_while_a_request_hangs() {
    setup();
    let (moto, proxy, cg, spool, mut agent) = started("cloudwatch-stall");
    let denied = tcp_listener("127.0.0.3");
    let to = denied.to_string();
    proxy.inject(&[Fault::Hang]);
    storm(&cg, &to, 300);
    wait_until(Duration::from_secs(20), "a PutLogEvents held", || {
        proxy.hung.load(Ordering::SeqCst) >= 1
    });
    let held = Instant::now();
    // Status against the disk: everything spooled and not acknowledged, the held batch and
    // what came after it (read before and after status; the agent writes nothing else now).
    let check = |what: &str| -> (u64, Option<u64>) {
        // The file first, then the spool (synced every 50 ms).
        std::thread::sleep(Duration::from_millis(300));
        let before = backlog_on_disk(&spool);
        let cw = cw_status(&agent);
        let after = backlog_on_disk(&spool);
        let shown = cw["spool_pending_bytes"].as_u64().unwrap_or(u64::MAX);
        assert!(
            (before..=after).contains(&shown),
            "{what}: status shows a backlog of {shown} bytes, the spool holds {before}–{after} past its cursor: {cw}"
        );
        (shown, cw["oldest_undelivered_age_ms"].as_u64())
    };
    wait_until(Duration::from_secs(5), "300 connects in the file", || {
        connects_to(&agent, "127.0.0.3") == 300
    });
    let (first, age1) = check("first");
    let t1 = Instant::now();
    // 300 connect records, of 100 bytes at the very least.
    assert!(first > 300 * 100, "{first} bytes");
    // Records keep coming during the hang: the backlog grows with them, the age with time.
    storm(&cg, &to, 200);
    wait_until(Duration::from_secs(5), "500 connects in the file", || {
        connects_to(&agent, "127.0.0.3") == 500
    });
    let (second, age2) = check("second");
    let dt = t1.elapsed().as_millis() as u64;
    assert!(second > first + 200 * 100, "{first} then {second} bytes");
    let (age1, age2) = (
        age1.expect("an oldest_undelivered_age_ms"),
        age2.expect("an oldest_undelivered_age_ms"),
    );
    assert!(
        age2 + 100 >= age1 + dt && age2 <= age1 + dt + 1000,
        "oldest age {age1} ms, then {age2} ms, {dt} ms later"
    );
    assert!(held.elapsed() < ATTEMPT_TIMEOUT, "still within the hang");
    let text = String::from_utf8_lossy(&agent.ctl(&["status"]).stdout).into_owned();
    assert!(text.contains("oldest waiting"), "{text}");
    eprintln!(
        "during the hang: spool {first} then {second} bytes past the cursor, oldest {age1} then {age2} ms; status says:\n{}",
        text.lines()
            .filter(|l| l.contains("cloudwatch:"))
            .collect::<String>()
    );
    // After the attempt timeout, the retry delivers it all: no backlog, no age.
    wait_until(ATTEMPT_TIMEOUT * 4, "an empty backlog", || {
        let cw = cw_status(&agent);
        cw["spool_pending_bytes"] == 0 && cw["oldest_undelivered_age_ms"].is_null()
    });
    assert_eq!(backlog_on_disk(&spool), 0);
    let got = moto.messages(GROUP, STREAM);
    let connects = got
        .iter()
        .filter(|m| m.contains("\"net.connect\"") && m.contains("\"dst\":\"127.0.0.3\""))
        .count();
    assert_eq!(connects, 500);
    agent.stop();
    let _ = std::fs::remove_dir_all(&spool);
}
