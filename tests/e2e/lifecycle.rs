//! Fail-closed lifecycle: crash, restart with adoption, reload, uninstall.

use std::time::Duration;

use egress_guard_e2e::*;

use crate::setup;

fn policy(cgroup: &TestCgroup, allow: &[String]) -> String {
    let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[policy]]\nname = \"app\"\ncgroups = [\"{}\"]\nallow = [{}]\n",
        cgroup.rel(),
        allow.join(", ")
    )
}

fn loop_counts(out: &str) -> (u64, u64, u64) {
    let get = |k: &str| -> u64 {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {out:?}"))
    };
    (get("ok"), get("eperm"), get("err"))
}

/// Connects to both destinations in loops from `cg` while `during` runs: no denied connect
/// may get through, no allowed one may fail.
fn through(
    cg: &TestCgroup,
    allowed: std::net::SocketAddr,
    denied: std::net::SocketAddr,
    what: &str,
    during: impl FnOnce(),
) {
    let looping = |to: std::net::SocketAddr| {
        let p = cg.path.clone();
        std::thread::spawn(move || probe_in(&p, &["loop", "tcp", &to.to_string(), "3000"]).stdout)
    };
    let (denied_loop, allowed_loop) = (looping(denied), looping(allowed));
    std::thread::sleep(Duration::from_millis(300));
    during();
    let (ok, eperm, err) = loop_counts(&denied_loop.join().unwrap());
    assert_eq!(ok, 0, "a denied connection got through during {what}");
    assert!(eperm > 10, "the denied loop barely ran: eperm={eperm}");
    assert_eq!(err, 0);
    let (ok, eperm, err) = loop_counts(&allowed_loop.join().unwrap());
    assert!(ok > 10, "the allowed loop barely ran: ok={ok}");
    assert_eq!(
        (eperm, err),
        (0, 0),
        "an allowed connection failed during {what}"
    );
}

#[test]
fn enforcement_survives_kill9_and_a_restart_adopts_the_pins_without_a_gap() {
    setup();
    let cg = TestCgroup::new("lifecycle");
    let allowed = tcp_listener("127.0.0.2");
    let denied = tcp_listener("127.0.0.3");
    let mut agent = Agent::start(&policy(&cg, &[allowed.to_string()]));
    assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).eperm());

    // A crash leaves the pinned programs enforcing.
    agent.kill9();
    let r = probe_in(&cg.path, &["tcp", &denied.to_string()]);
    assert!(r.eperm(), "after kill -9: {r:?}");
    assert!(probe_in(&cg.path, &["tcp", &allowed.to_string()]).ok());

    // Probe both destinations in loops while the agent restarts.
    through(&cg, allowed, denied, "the restart", || {
        agent.spawn();
        // While an agent runs, nobody else may take its pins: not a second agent, not uninstall.
        let out = agent.cli(&["uninstall"]);
        assert!(!out.status.success(), "uninstall ran beside a live agent");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("another egress-guard agent is using")
        );
    });

    // The restart adopted every attachment instead of attaching new ones.
    let log = agent.log_text();
    let first = log.lines().find(|l| l.contains("enforcing;")).unwrap();
    let last = log.lines().rfind(|l| l.contains("enforcing;")).unwrap();
    let attached_first = first
        .split_whitespace()
        .find(|w| w.starts_with("attached="))
        .unwrap();
    let adopted_last = attached_first.replace("attached=", "adopted=");
    assert!(
        last.contains("attached=0") && last.contains("detached=0") && last.contains(&adopted_last),
        "the restart should adopt all of {first}\nbut: {last}"
    );

    // Uninstall removes every pin and attachment: the cgroup is unguarded again.
    agent.kill9();
    let out = agent.cli(&["uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(probe_in(&cg.path, &["tcp", &denied.to_string()]).ok());
    assert!(!agent.pin_dir.exists(), "pins left behind");
}

#[test]
fn sighup_applies_a_new_config_and_a_bad_one_keeps_the_old_policy() {
    setup();
    let cg = TestCgroup::new("reload");
    let a = tcp_listener("127.0.0.2");
    let b = tcp_listener("127.0.0.3");
    let mut agent = Agent::start(&policy(&cg, &[a.to_string()]));
    assert!(probe_in(&cg.path, &["tcp", &b.to_string()]).eperm());

    // A valid change: now b is allowed and a is not.
    agent.rewrite_config(&policy(&cg, &[b.to_string()]));
    let before = agent.log_text().matches("enforcing;").count();
    agent.signal(libc::SIGHUP);
    agent.wait_for_log(
        |l| l.matches("enforcing;").count() > before,
        "the reload to apply",
    );
    assert!(probe_in(&cg.path, &["tcp", &b.to_string()]).ok());
    assert!(probe_in(&cg.path, &["tcp", &a.to_string()]).eperm());

    // Bad configs are refused with the reason, and b stays allowed, a refused: one that does
    // not parse, one whose cgroup does not exist.
    let bad = [
        (
            format!("{}bogus_key = 1\n", policy(&cg, &[a.to_string()])),
            "unknown field `bogus_key`",
        ),
        (
            policy(&cg, &[a.to_string()]).replace(&cg.rel(), "egress-guard-test-no-such-cgroup"),
            "does not exist",
        ),
    ];
    for (n, (text, reason)) in bad.iter().enumerate() {
        agent.rewrite_config(text);
        agent.signal(libc::SIGHUP);
        agent.wait_for_log(
            |l| {
                l.matches("reload refused, the previous policy stays in force")
                    .count()
                    > n
            },
            "the reload to be refused",
        );
        assert!(agent.log_text().contains(reason), "{}", agent.log_text());
        assert!(probe_in(&cg.path, &["tcp", &b.to_string()]).ok());
        assert!(probe_in(&cg.path, &["tcp", &a.to_string()]).eperm());
    }
    // The audit trail has each reload, applied or refused with its reason.
    agent.stop();
    let records = agent.records();
    let schema = Schema::load();
    for r in &records {
        schema.check(r);
    }
    let reloads: Vec<_> = records
        .iter()
        .filter(|r| r["type"] == "agent.reload")
        .collect();
    assert_eq!(reloads.len(), 3, "{reloads:?}");
    assert_eq!(reloads[0]["result"], "applied");
    assert!(
        reloads[1]["reason"].as_str().unwrap().contains("bogus_key"),
        "{reloads:?}"
    );
    assert!(
        reloads[2]["reason"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{reloads:?}"
    );
}

#[test]
fn a_policy_removed_on_reload_stops_guarding_its_cgroup() {
    setup();
    let (one, two) = (TestCgroup::new("keep"), TestCgroup::new("drop"));
    let denied = tcp_listener("127.0.0.3");
    let body = |cgs: &[&TestCgroup]| -> String {
        cgs.iter()
            .enumerate()
            .map(|(i, cg)| {
                format!(
                    "[[policy]]\nname = \"p{i}\"\ncgroups = [\"{}\"]\nallow = [\"127.0.0.2:1\"]\n",
                    cg.rel()
                )
            })
            .collect()
    };
    let mut agent = Agent::start(&body(&[&one, &two]));
    assert!(probe_in(&two.path, &["tcp", &denied.to_string()]).eperm());
    agent.rewrite_config(&body(&[&one]));
    let before = agent.log_text().matches("enforcing;").count();
    agent.signal(libc::SIGHUP);
    agent.wait_for_log(
        |l| l.matches("enforcing;").count() > before,
        "the reload to apply",
    );
    assert!(
        agent.log_text().contains("policy removed policy=p1"),
        "{}",
        agent.log_text()
    );
    assert!(
        probe_in(&two.path, &["tcp", &denied.to_string()]).ok(),
        "the removed policy still guards"
    );
    assert!(
        probe_in(&one.path, &["tcp", &denied.to_string()]).eperm(),
        "the kept policy stopped guarding"
    );
    let stats = String::from_utf8_lossy(&agent.cli(&["stats"]).stdout).into_owned();
    assert!(stats.contains("p0") && !stats.contains("p1"), "{stats}");
    agent.stop();
    let removed: Vec<_> = agent
        .records()
        .into_iter()
        .filter(|r| r["type"] == "agent.policy" && r["change"] == "removed")
        .collect();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0]["policy"], "p1");
}

#[test]
fn an_upgrade_replaces_the_programs_without_a_gap() {
    setup();
    let cg = TestCgroup::new("upgrade");
    let allowed = tcp_listener("127.0.0.2");
    let denied = tcp_listener("127.0.0.3");
    let mut agent = Agent::start(&policy(&cg, &[allowed.to_string()]));
    let first = agent.log_text();
    let attached = first
        .lines()
        .find(|l| l.contains("enforcing;"))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("attached=")))
        .unwrap()
        .trim_start_matches("attached=")
        .to_string();
    agent.stop();

    // Make the pins another build's: each link pin ends in the id of the object it came from.
    let layout = std::fs::read_dir(&agent.pin_dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with('v'))
        .expect("a layout directory")
        .path();
    let links = layout.join("links");
    let mut renamed = 0;
    for e in std::fs::read_dir(&links).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let (head, _object) = name.rsplit_once('-').unwrap();
        std::fs::rename(e.path(), links.join(format!("{head}-0123456789abcdef"))).unwrap();
        renamed += 1;
    }
    assert_eq!(renamed.to_string(), attached);

    through(&cg, allowed, denied, "the upgrade", || agent.spawn());
    // Every program was replaced: the new ones attached, then the old ones detached.
    let log = agent.log_text();
    let last = log.lines().rfind(|l| l.contains("enforcing;")).unwrap();
    assert!(
        last.contains(&format!(
            "adopted=0 attached={attached} detached={attached}"
        )),
        "the upgrade should replace all {attached} attachments: {last}"
    );
    let left: Vec<String> = std::fs::read_dir(&links)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-0123456789abcdef"))
        .collect();
    assert!(left.is_empty(), "old pins left: {left:?}");
}
