//! The audit trail: what guarded processes did arrives in the file sink, nothing else does,
//! every record follows docs/events.md, and lost records are counted and reported.

use egress_guard_e2e::*;
use serde_json::Value;

use crate::setup;

fn of_type<'a>(records: &'a [Value], ty: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["type"] == ty).collect()
}

#[test]
fn decisions_of_guarded_processes_are_recorded_and_nothing_else() {
    setup();
    let cg = TestCgroup::new("audit-trail");
    let allowed = tcp_listener("127.0.0.2");
    let denied = tcp_listener("127.0.0.3");
    let udp = udp_receiver("127.0.0.2");
    let udp_addr = udp.local_addr().unwrap();
    let mut agent = Agent::start(&format!(
        "[[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\nallow = [\"127.0.0.2:{}\", \"udp/127.0.0.2:{}\"]\n",
        cg.rel(),
        allowed.port(),
        udp_addr.port()
    ));
    assert!(probe_in(&cg.path, &["tcp", &allowed.to_string()]).ok());
    assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());
    assert!(probe_in(&cg.path, &["udp", &udp_addr.to_string(), "3"]).ok());
    assert!(probe_in(&cg.path, &["raw"]).eperm());
    // Outside the guarded cgroup: not recorded.
    assert!(probe_outside(&["tcp", &denied.to_string()]).ok());
    agent.stop();

    let records = agent.records();
    let schema = Schema::load();
    for r in &records {
        schema.check(r);
    }
    let cgroup = format!("/{}", cg.rel());
    let net: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"].as_str().unwrap().starts_with("net."))
        .collect();
    for r in &net {
        assert_eq!(r["policy"], "sandbox", "{r}");
        assert_eq!(r["cgroup"], cgroup.as_str(), "{r}");
    }
    let connects = of_type(&records, "net.connect");
    assert_eq!(connects.len(), 2, "{connects:?}");
    let ok = connects
        .iter()
        .find(|r| r["verdict"] == "allow")
        .expect("the allowed connect");
    assert_eq!(
        (ok["dst"].as_str(), ok["port"].as_u64()),
        (Some("127.0.0.2"), Some(u64::from(allowed.port())))
    );
    assert_eq!(
        (ok["proto"].as_str(), ok["comm"].as_str()),
        (Some("tcp"), Some("probe"))
    );
    assert!(ok["pid"].as_u64().unwrap() > 0);
    let no = connects
        .iter()
        .find(|r| r["verdict"] == "deny")
        .expect("the denied connect");
    assert_eq!(
        (ok["reason"].as_str(), no["reason"].as_str()),
        (Some("rule"), Some("no_rule_for_address"))
    );
    assert_eq!(
        (no["dst"].as_str(), no["port"].as_u64()),
        (Some("127.0.0.3"), Some(u64::from(denied.port())))
    );
    let sends = of_type(&records, "net.send");
    assert_eq!(
        sends.len(),
        1,
        "three allowed sends are one record: {sends:?}"
    );
    assert_eq!(
        (sends[0]["count"].as_u64(), sends[0]["verdict"].as_str()),
        (Some(3), Some("allow"))
    );
    let sockets = of_type(&records, "net.socket");
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    assert_eq!(
        (
            sockets[0]["family"].as_str(),
            sockets[0]["sock_type"].as_u64()
        ),
        (Some("inet"), Some(3))
    );
    assert!(
        of_type(&records, "net.packet").is_empty(),
        "no packet needed the backstop"
    );
    assert_eq!(records.first().unwrap()["type"], "agent.start");
    assert_eq!(records.last().unwrap()["type"], "agent.stop");
    let policies = of_type(&records, "agent.policy");
    assert_eq!(
        (policies.len(), policies[0]["change"].as_str()),
        (1, Some("applied"))
    );
}

/// Allowed UDP sends are counted in pinned kernel tables, not in the agent: a `kill -9` in the
/// middle of an interval loses none of them, and sends while no agent runs are counted too.
#[test]
fn allowed_sends_are_counted_in_the_kernel_and_survive_a_kill9() {
    setup();
    let cg = TestCgroup::new("audit-sends");
    let udp = udp_receiver("127.0.0.2");
    let to = udp.local_addr().unwrap();
    // A long interval: nothing is written before the kill.
    let mut agent = Agent::start(&format!(
        "[[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\nallow = [\"udp/{to}\"]\n[audit]\nudp_aggregate_seconds = 3600\n",
        cg.rel()
    ));
    assert!(probe_in(&cg.path, &["udp", &to.to_string(), "5"]).ok());
    // Past the agent's ring drain (every 50 ms): an agent counting sends itself would hold
    // these five in memory now, and the kill would lose them.
    std::thread::sleep(std::time::Duration::from_millis(300));
    agent.kill9();
    assert!(probe_in(&cg.path, &["udp", &to.to_string(), "7"]).ok());
    agent.spawn();
    assert!(probe_in(&cg.path, &["udp", &to.to_string(), "11"]).ok());
    agent.stop();

    let records = agent.records();
    let schema = Schema::load();
    for r in &records {
        schema.check(r);
    }
    let sends = of_type(&records, "net.send");
    // One record per probe process (a flow is a process and a destination).
    let mut counts: Vec<u64> = sends
        .iter()
        .map(|r| {
            assert_eq!(
                (
                    r["verdict"].as_str(),
                    r["comm"].as_str(),
                    r["port"].as_u64()
                ),
                (Some("allow"), Some("probe"), Some(u64::from(to.port()))),
                "{r}"
            );
            assert!(r["pid"].as_u64().unwrap() > 0, "{r}");
            r["count"].as_u64().unwrap()
        })
        .collect();
    counts.sort();
    assert_eq!(counts, vec![5, 7, 11], "{sends:?}");
    let stop = records.iter().rposition(|r| r["type"] == "agent.stop");
    let last_send = records.iter().rposition(|r| r["type"] == "net.send");
    assert!(last_send < stop, "sends are written before agent.stop");
}

/// The kernel's counts of allowed sends are written every interval, not only at stop.
#[test]
fn allowed_sends_are_written_every_interval_while_the_agent_runs() {
    setup();
    let cg = TestCgroup::new("audit-interval");
    let udp = udp_receiver("127.0.0.2");
    let to = udp.local_addr().unwrap();
    let mut agent = Agent::start(&format!(
        "[[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\nallow = [\"udp/{to}\"]\n",
        cg.rel()
    ));
    assert!(probe_in(&cg.path, &["udp", &to.to_string(), "4"]).ok());
    // The harness's interval is 1 s; the record comes within two.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let counts = loop {
        let text = std::fs::read_to_string(agent.dir().join("audit.jsonl")).unwrap_or_default();
        let counts: Vec<u64> = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n') && l.contains("\"net.send\""))
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["count"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        if !counts.is_empty() || std::time::Instant::now() > end {
            break counts;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(counts, vec![4], "written while running");
    agent.stop();
    let sends = of_type(&agent.records(), "net.send").len();
    assert_eq!(sends, 1, "and not again at stop");
}

#[test]
fn records_lost_to_a_full_ring_are_counted_and_reported_once() {
    setup();
    let cg = TestCgroup::new("audit-lost");
    let denied = tcp_listener("127.0.0.3");
    let mut agent = Agent::start(&format!(
        "[[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\nallow = []\n[audit]\nring_buffer_bytes = 4096\n",
        cg.rel()
    ));
    // Nobody reads the ring while the agent is down: a denied-connect storm overflows it.
    agent.kill9();
    let out = probe_in(&cg.path, &["loop", "tcp", &denied.to_string(), "300"]).stdout;
    let attempts: u64 = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("eperm="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        attempts > 100,
        "the storm was too small to overflow a 4 KiB ring: {out}"
    );
    // And an exec storm: the shell, then 300 × (exec and exit of /bin/true), then its exit.
    let storm = "i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done";
    assert!(
        in_cgroup(&cg.path, std::path::Path::new("/bin/sh"))
            .args(["-c", storm])
            .status()
            .unwrap()
            .success()
    );
    agent.spawn();
    agent.stop();

    let records = agent.records();
    let schema = Schema::load();
    for r in &records {
        schema.check(r);
    }
    // The probe's exec and exit are kernel records too; the exec storm made 602.
    let kernel_records = attempts + 2 + 602;
    let kept = records
        .iter()
        .filter(|r| {
            r["type"].as_str().unwrap().starts_with("net.")
                || r["type"].as_str().unwrap().starts_with("proc.")
        })
        .count() as u64;
    let lost: u64 = of_type(&records, "agent.events_lost")
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert!(kept > 0 && lost > 0, "kept {kept}, lost {lost}");
    assert_eq!(
        kept + lost,
        kernel_records,
        "every record is either written or counted as lost"
    );
    // The kernel's own counter says the same, and nothing was written twice.
    let reports = of_type(&records, "agent.events_lost");
    assert_eq!(reports.last().unwrap()["total"].as_u64(), Some(lost));
    // Reported once: the next agent finds nothing new to report.
    agent.spawn();
    agent.stop();
    let reports_after = of_type(&agent.records(), "agent.events_lost").len();
    assert_eq!(
        reports_after,
        reports.len(),
        "losses were reported again by the next agent"
    );
    let mut seen = std::collections::HashSet::new();
    for r in of_type(&records, "net.connect") {
        assert!(
            seen.insert((r["ts"].to_string(), r["tid"].to_string())),
            "duplicate record {r}"
        );
    }
}

#[test]
fn a_script_in_a_container_leaves_exactly_its_exec_connect_and_exit_records() {
    setup();
    let cg = TestCgroup::new("audit-script");
    let id = "0123456789abcdef".repeat(4);
    let container = cg.child(&format!("docker-{id}.scope"));
    let allowed = tcp_listener("127.0.0.2");
    let denied = tcp_listener("127.0.0.3");
    let mut agent = Agent::start(&format!(
        "[[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\nallow = [\"127.0.0.2:{}\"]\n",
        cg.rel(),
        allowed.port()
    ));
    let probe = probe_bin().display().to_string();
    // sh and three commands: true, an allowed and a denied connection; then exit 3.
    let script = format!("/bin/true; {probe} tcp {allowed}; {probe} tcp {denied}; exit 3");
    let status = in_cgroup(&container, std::path::Path::new("/bin/sh"))
        .args(["-c", &script])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));
    // The same commands outside the guarded cgroup leave nothing.
    assert!(
        std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .status()
            .unwrap()
            .code()
            == Some(3)
    );
    agent.stop();

    let records = agent.records();
    let schema = Schema::load();
    for r in &records {
        schema.check(r);
    }
    let cgroup = format!(
        "/{}",
        container.strip_prefix(cgroup2_root()).unwrap().display()
    );
    let ours: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"].as_str().unwrap().contains('.') && r.get("cgroup").is_some())
        .collect();
    for r in &ours {
        assert_eq!(
            r["cgroup"],
            cgroup.as_str(),
            "a record from outside the container: {r}"
        );
        assert_eq!(r["container"], &id[..12], "{r}");
        assert_eq!(r["policy"], "sandbox", "{r}");
    }
    let execs = of_type(&records, "proc.exec");
    let argv: Vec<Vec<&str>> = execs
        .iter()
        .map(|r| {
            r["argv"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(
        argv,
        vec![
            vec!["/bin/sh", "-c", script.as_str()],
            vec!["/bin/true"],
            vec![probe.as_str(), "tcp", &allowed.to_string()],
            vec![probe.as_str(), "tcp", &denied.to_string()],
        ],
        "{execs:?}"
    );
    assert!(execs.iter().all(|r| r["argv_truncated"] == false));
    let sh_pid = &execs[0]["pid"];
    for r in &execs[1..] {
        assert_eq!(
            &r["ppid"], sh_pid,
            "the commands are the shell's children: {r}"
        );
    }
    let connects = of_type(&records, "net.connect");
    let verdicts: Vec<(&str, u64)> = connects
        .iter()
        .map(|r| (r["verdict"].as_str().unwrap(), r["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            ("allow", u64::from(allowed.port())),
            ("deny", u64::from(denied.port()))
        ]
    );
    let exits = of_type(&records, "proc.exit");
    let codes: Vec<(&Value, Option<u64>)> = exits
        .iter()
        .map(|r| (&r["pid"], r["exit_code"].as_u64()))
        .collect();
    let expected: Vec<(&Value, Option<u64>)> = vec![
        (&execs[1]["pid"], Some(0)),
        (&execs[2]["pid"], Some(0)),
        (&execs[3]["pid"], Some(1)),
        (sh_pid, Some(3)),
    ];
    assert_eq!(codes, expected, "{exits:?}");
    assert!(
        exits
            .iter()
            .all(|r| r["signal"].is_null() && r["lifetime_ms"].as_f64().is_some())
    );
    assert_eq!(execs[0]["filename"], "/bin/sh");
    assert_eq!(execs[2]["filename"], probe.as_str());
}

#[test]
fn a_process_killed_by_a_signal_is_recorded_with_the_signal() {
    setup();
    let cg = TestCgroup::new("audit-signal");
    let started = std::time::SystemTime::now();
    let mut agent = Agent::start(&format!(
        "[[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\nallow = []\n",
        cg.rel()
    ));
    let status = in_cgroup(&cg.path, std::path::Path::new("/bin/sh"))
        .args(["-c", "kill -9 $$"])
        .status()
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    agent.stop();
    let ended = std::time::SystemTime::now();
    let records = agent.records();
    let exits = of_type(&records, "proc.exit");
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert_eq!(
        (exits[0]["signal"].as_u64(), exits[0]["exit_code"].is_null()),
        (Some(9), true)
    );
    // Kernel timestamps are turned into wall-clock time correctly.
    for r in &records {
        let ts = humantime_ts(r["ts"].as_str().unwrap());
        assert!(
            ts >= started - std::time::Duration::from_secs(1) && ts <= ended,
            "{r}"
        );
    }
}

/// Parses the RFC 3339 `ts` of a record (UTC, `Z`, nanoseconds).
fn humantime_ts(s: &str) -> std::time::SystemTime {
    // 2026-11-22T03:25:17.300685601Z
    let (date, time) = s.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    let nanos: u32 = format!("{frac:0<9}")[..9].parse().unwrap();
    std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos)
}

#[test]
fn a_process_is_recorded_as_ended_when_its_last_thread_exits() {
    setup();
    let cg = TestCgroup::new("audit-threads");
    let mut agent = Agent::start(&format!(
        "[[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\nallow = []\n",
        cg.rel()
    ));
    // The main thread leaves first; another thread ends the process with status 7 later.
    let script = "import ctypes, os, threading, time\n\
                  threading.Thread(target=lambda: (time.sleep(0.3), os._exit(7))).start()\n\
                  ctypes.CDLL(None).pthread_exit(None)\n";
    let status = in_cgroup(&cg.path, std::path::Path::new("/usr/bin/python3"))
        .args(["-c", script])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7));
    agent.stop();
    let records = agent.records();
    let python = of_type(&records, "proc.exec")
        .into_iter()
        .find(|r| r["filename"] == "/usr/bin/python3")
        .expect("python's exec");
    let exits: Vec<_> = of_type(&records, "proc.exit")
        .into_iter()
        .filter(|r| r["pid"] == python["pid"])
        .collect();
    assert_eq!(
        exits.len(),
        1,
        "one record per process, not per thread: {exits:?}"
    );
    assert_eq!(exits[0]["exit_code"], 7, "{exits:?}");
    assert!(
        exits[0]["lifetime_ms"].as_f64().unwrap() >= 250.0,
        "lifetime of the process, not of a thread: {exits:?}"
    );
}
