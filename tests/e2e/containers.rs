//! Container discovery with a real Docker engine: containers under a guarded cgroup get the
//! policy their selectors pick (by their real names and labels), the guarded cgroup's own
//! policy holds them until then, and their records carry their id and name.
//!
//! Each test starts its own private dockerd (`egress_guard_e2e::docker`) whose containers land
//! in the test's cgroup. Containers on Docker's bridge reach this machine at the bridge
//! gateway (172.17.0.1), where the tests' listeners are; forwarding is off, nothing leaves.

use std::time::{Duration, Instant};

use egress_guard_e2e::{
    docker::{Dockerd, GATEWAY},
    *,
};
use serde_json::Value;

use crate::setup;

/// A listener on the bridge gateway: `172.17.0.1:PORT`.
fn listener() -> String {
    tcp_listener(GATEWAY).to_string()
}

/// One connect from inside the container.
fn tcp(d: &Dockerd, id: &str, to: &str) -> ProbeResult {
    d.exec(id, &["/probe", "tcp", to])
}

/// Polls until a connect from the container to `to` is allowed; panics after 5 s.
fn wait_allowed(d: &Dockerd, id: &str, to: &str, what: &str) {
    let start = Instant::now();
    loop {
        let r = tcp(d, id, to);
        if r.ok() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what}: never allowed to {to}: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (10 s at most) until the container's output holds `n` results of `probe loop`.
fn wait_logs(d: &Dockerd, id: &str, n: usize) -> String {
    let start = Instant::now();
    loop {
        let logs = d.ok(&["logs", id]);
        if logs.matches("ok=").count() >= n {
            return logs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{n} loop results expected: {logs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (5 s at most) until the audit file has a record `pred` accepts; returns it.
fn wait_record(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(r) = agent.records().into_iter().find(&pred) {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no record: {what}; records:\n{}",
            dump(&agent.records())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn dump(records: &[Value]) -> String {
    records
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `targets --json` entries of containers: short id → (policy, name).
fn targets(agent: &Agent) -> Vec<(String, String, Value)> {
    let out = agent.ctl(&["targets", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["containers"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["policy"].as_str().unwrap().to_string(),
                c["name"].clone(),
            )
        })
        .collect()
}

/// The policy `targets` gives the container, and the name it shows.
fn target_of(agent: &Agent, id: &str) -> (String, Value) {
    let all = targets(agent);
    all.iter()
        .find(|(short, _, _)| id.starts_with(short.as_str()))
        .map(|(_, p, n)| (p.clone(), n.clone()))
        .unwrap_or_else(|| panic!("{id} not in targets: {all:?}"))
}

/// The daemon's `[docker] root` and the guarded parent's policy (`sandbox`: allows nothing),
/// in front of `policies`.
fn config(d: &Dockerd, policies: &str) -> String {
    format!(
        "[docker]\nroot = \"{}\"\n\n[[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\n\n\
         {policies}",
        d.root().display(),
        d.cgroup.rel()
    )
}

#[test]
fn containers_real_docker_names_and_labels_pick_policies() {
    setup();
    let d = Dockerd::start("docker-discovery");
    let (app_dest, db_dest, web_dest, denied) = (listener(), listener(), listener(), listener());
    // Created and started before the agent: found by the start-up scan.
    let db = d.run_detached("eg-db", &["role=db"], None, &["sleep", "600"]);
    let body = config(
        &d,
        &format!(
            "[[policy]]\nname = \"app\"\ncontainers = [\"name:eg-app-*\"]\nallow = [\"{app_dest}\"]\n\n\
             [[policy]]\nname = \"db\"\ncontainers = [\"label:role=db\"]\nallow = [\"{db_dest}\"]\n\n\
             [[policy]]\nname = \"web\"\ncontainers = [\"label:tier\"]\nallow = [\"{web_dest}\"]\n"
        ),
    );
    let mut agent = Agent::start(&body);
    let r = tcp(&d, &db, &db_dest);
    assert!(r.ok(), "db container not matched at start: {r:?}");
    assert!(tcp(&d, &db, &app_dest).eperm());

    // Started while the agent runs. The app container's first process connects to a refused
    // address in a loop from its first moment: never once through, whatever the match timing.
    let loop_then_sleep = format!("/probe loop tcp {denied} 1500; exec sleep 600");
    let app = d.run_detached("eg-app-1", &[], None, &["sh", "-c", &loop_then_sleep]);
    let web = d.run_detached(
        "eg-web",
        &["tier=frontend", "role=web"],
        None,
        &["sleep", "600"],
    );
    let other = d.run_detached("eg-other", &["role=web"], None, &["sleep", "600"]);
    for id in [&db, &app, &web, &other] {
        assert!(d.cgroup_of(id).is_dir(), "{id}: no cgroup under the parent");
    }
    wait_allowed(&d, &app, &app_dest, "the app container (name:eg-app-*)");
    wait_allowed(&d, &web, &web_dest, "the web container (label:tier)");
    assert!(
        tcp(&d, &app, &db_dest).eperm(),
        "app reached db's destination"
    );
    assert!(
        tcp(&d, &web, &app_dest).eperm(),
        "web reached app's destination"
    );
    // No selector matches: the parent's policy.
    for dest in [&app_dest, &db_dest, &web_dest] {
        let r = tcp(&d, &other, dest);
        assert!(r.eperm(), "the unmatched container reached {dest}: {r:?}");
    }
    let out = wait_logs(&d, &app, 1);
    assert!(
        out.contains("ok=0 "),
        "the new container reached a refused address: {out}"
    );
    assert!(!out.contains("eperm=0 "), "the loop did not run: {out}");

    // The control socket names them by their real names.
    for (id, policy, name) in [
        (&db, "db", "eg-db"),
        (&app, "app", "eg-app-1"),
        (&web, "web", "eg-web"),
        (&other, "sandbox", "eg-other"),
    ] {
        assert_eq!(
            target_of(&agent, id),
            (policy.to_string(), Value::from(name)),
            "targets: {name}"
        );
    }
    // `check --container` asks the policy that decides for the container.
    let check = |id: &str, dest: &str| agent.ctl(&["check", dest, "--container", &id[..12]]);
    assert!(
        check(&app, &app_dest).status.success(),
        "check: app → app_dest"
    );
    assert_eq!(
        check(&app, &db_dest).status.code(),
        Some(1),
        "check: app → db_dest"
    );
    assert!(check(&db, &db_dest).status.success(), "check: db → db_dest");
    assert_eq!(
        check(&other, &app_dest).status.code(),
        Some(1),
        "check: other → app_dest"
    );

    // Records carry the real short id and name, with the deciding policy.
    for (id, name, policy, dest, verdict) in [
        (&app, "eg-app-1", "app", &app_dest, "allow"),
        (&db, "eg-db", "db", &db_dest, "allow"),
        (&web, "eg-web", "web", &web_dest, "allow"),
        (&other, "eg-other", "sandbox", &app_dest, "deny"),
    ] {
        let port: u16 = dest.rsplit(':').next().unwrap().parse().unwrap();
        wait_record(
            &agent,
            &format!("{verdict} net.connect of {name} under {policy}"),
            |r| {
                r["type"] == "net.connect"
                    && r["port"] == port
                    && r["verdict"] == verdict
                    && r["policy"] == policy
                    && r["container"] == id[..12]
                    && r["container_name"] == name
            },
        );
    }
    let schema = Schema::load();
    for r in agent.records() {
        schema.check(&r);
    }

    // kill -9 and a restart keep every match (the map is pinned; the scan finds them again).
    agent.kill9();
    assert!(tcp(&d, &app, &app_dest).ok(), "app while the agent is down");
    assert!(tcp(&d, &other, &app_dest).eperm());
    agent.spawn();
    assert!(tcp(&d, &app, &app_dest).ok(), "app after the restart");
    assert!(tcp(&d, &db, &db_dest).ok(), "db after the restart");
    assert!(tcp(&d, &web, &web_dest).ok(), "web after the restart");
    assert!(tcp(&d, &other, &app_dest).eperm());
    assert_eq!(target_of(&agent, &app).0, "app");

    // A reload that drops the name selector puts the app back under the parent's policy.
    agent.rewrite_config(&body.replace("name:eg-app-*", "name:nothing-matches"));
    let out = agent.ctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = tcp(&d, &app, &app_dest);
    assert!(r.eperm(), "app after the reload: {r:?}");
    assert_eq!(target_of(&agent, &app).0, "sandbox");
    assert!(tcp(&d, &db, &db_dest).ok(), "db after the reload");
}

#[test]
fn containers_real_docker_restart_gets_the_policy_again() {
    setup();
    let d = Dockerd::start("docker-restart");
    let (allowed, denied) = (listener(), listener());
    let body = config(
        &d,
        &format!(
            "[[policy]]\nname = \"app\"\ncontainers = [\"name:eg-restart-*\"]\nallow = [\"{allowed}\"]\n"
        ),
    );
    let agent = Agent::start(&body);
    // Each start of the container begins with a loop of refused connects.
    let cmd = format!("/probe loop tcp {denied} 500; exec sleep 600");
    let id = d.run_detached("eg-restart-1", &[], None, &["sh", "-c", &cmd]);
    wait_allowed(&d, &id, &allowed, "before the restart");
    assert!(tcp(&d, &id, &denied).eperm());
    let inode = |id: &str| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(d.cgroup_of(id)).map(|m| m.ino()).ok()
    };
    let before = inode(&id).expect("the container's cgroup");
    wait_logs(&d, &id, 1);

    d.ok(&["restart", "-t", "0", &id]);
    let after = inode(&id).expect("the container's cgroup after the restart");
    assert_ne!(before, after, "docker restart kept the old cgroup");
    wait_allowed(&d, &id, &allowed, "after the restart");
    let r = tcp(&d, &id, &denied);
    assert!(r.eperm(), "refused destination after the restart: {r:?}");
    assert_eq!(
        target_of(&agent, &id),
        ("app".to_string(), Value::from("eg-restart-1"))
    );
    // Both starts' loops: never through.
    let logs = wait_logs(&d, &id, 2);
    assert_eq!(
        logs.matches("ok=0 ").count(),
        2,
        "a refused connect got through: {logs}"
    );
    wait_record(&agent, "allowed connect after the restart", |r| {
        r["type"] == "net.connect"
            && r["verdict"] == "allow"
            && r["policy"] == "app"
            && r["container"] == id[..12]
            && r["container_name"] == "eg-restart-1"
    });
}

#[test]
fn containers_real_docker_short_lived_are_decided_and_attributed() {
    setup();
    let d = Dockerd::start("docker-short");
    let (allowed, refused) = (listener(), listener());
    let port = |a: &str| a.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let body = config(
        &d,
        &format!(
            "[[policy]]\nname = \"short\"\ncontainers = [\"name:eg-short-*\"]\nallow = [\"{allowed}\"]\n"
        ),
    );
    let agent = Agent::start(&body);
    let mut problems = Vec::new();
    let mut names = std::collections::HashMap::new();
    for i in 0..4 {
        for (kind, dest) in [("ok", &allowed), ("no", &refused)] {
            let name = format!("eg-short-{i}-{kind}");
            let (r, id) = d.run_rm(&name, &["/probe", "tcp", dest]);
            let good = if kind == "ok" { r.ok() } else { r.eperm() };
            if !good {
                problems.push(format!("{name} to {dest}: {r:?}"));
            }
            assert_eq!(id.len(), 64, "{name}: no container id");
            names.insert(id[..12].to_string(), name);
        }
    }
    // Every container's exec of the probe, its exit, and its connect are in the file.
    let start = Instant::now();
    let records = loop {
        let records = agent.records();
        let count = |pred: &dyn Fn(&Value) -> bool| records.iter().filter(|r| pred(r)).count();
        let execs = count(&|r| r["type"] == "proc.exec" && r["filename"] == "/probe");
        let exits = count(&|r| r["type"] == "proc.exit" && r["comm"] == "probe");
        let connects = count(&|r| {
            r["type"] == "net.connect"
                && (r["port"] == port(&allowed) || r["port"] == port(&refused))
        });
        if execs >= 8 && exits >= 8 && connects >= 8 {
            break records;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "records missing (exec {execs}, exit {exits}, connect {connects} of 8):\n{}",
            dump(&records)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &records {
        *seen
            .entry(r["type"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    eprintln!("records by type: {seen:?}");
    // Only containers run under the guarded cgroup: every kernel record is one of them.
    let mut unattributed: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &records {
        let ty = r["type"].as_str().unwrap_or("");
        if !(ty.starts_with("net.") || ty.starts_with("proc.")) {
            continue;
        }
        let name = r["container"].as_str().and_then(|c| names.get(c));
        if name.is_none() || r["container_name"].as_str() != name.map(String::as_str) {
            *unattributed.entry(ty.to_string()).or_default() += 1;
            problems.push(format!("not attributed: {r}"));
        }
    }
    for (kind, dest, verdict) in [("ok", &allowed, "allow"), ("no", &refused, "deny")] {
        let n = records
            .iter()
            .filter(|r| {
                r["type"] == "net.connect"
                    && r["port"] == port(dest)
                    && r["verdict"] == verdict
                    && r["container_name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with(&format!("-{kind}")))
            })
            .count();
        if n != 4 {
            problems.push(format!(
                "{n} attributed {verdict} connects to {dest}, not 4"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems (unattributed records by type: {unattributed:?}):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn containers_real_docker_embedded_dns_goes_to_the_proxy() {
    setup();
    let d = Dockerd::start("docker-dns");
    let (_net, gw) = d.network_create("eg-net");
    // The allowed name's address: the user network's gateway, a local address of this host.
    let api = tcp_listener(&gw).to_string();
    let api_port = api.rsplit(':').next().unwrap();
    let unlearned = listener();
    let dns = Dnsmasq::start(
        &format!("{gw} api.allowed.test\n{gw} other.refused.test\n"),
        60,
    );
    let body = config(
        &d,
        &format!(
            "[[policy]]\nname = \"web\"\ncontainers = [\"name:eg-dns-*\"]\n\
             allow = [\"*.allowed.test:{api_port}\"]\ndns = [\"{}\"]\n\n\
             [dns]\nlisten = \"{GATEWAY}\"\n",
            dns.addr
        ),
    );
    let agent = Agent::start(&body);
    let id = d.run_detached("eg-dns-1", &[], Some("eg-net"), &["sleep", "600"]);
    let start = Instant::now();
    while target_of(&agent, &id).0 != "web" {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "eg-dns-1 not matched"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let resolv = d.exec(&id, &["cat", "/etc/resolv.conf"]).stdout;
    assert!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");

    // Not looked up yet (the agent resolves exact names ahead, never wildcards): refused.
    let r = tcp(&d, &id, &api);
    assert!(r.eperm(), "before the lookup: {r:?}");
    let r = d.exec(
        &id,
        &["/probe", "dns", "127.0.0.11:53", "api.allowed.test", "A"],
    );
    assert!(
        r.stdout.contains(&format!("answers={gw} ")) && r.stdout.contains("from=127.0.0.11:53 "),
        "lookup through Docker's embedded DNS address: {r:?}"
    );
    // busybox's resolver, through resolv.conf.
    let r = d.exec(&id, &["nslookup", "api.allowed.test"]);
    assert!(r.stdout.contains(&gw), "nslookup: {r:?}");
    let r = tcp(&d, &id, &api);
    assert!(r.ok(), "connect to the answered address: {r:?}");

    let r = d.exec(
        &id,
        &["/probe", "dns", "127.0.0.11:53", "other.refused.test", "A"],
    );
    assert!(
        r.stdout.contains("rcode=Query Refused"),
        "refused name: {r:?}"
    );
    assert!(
        !dns.log().contains("other.refused.test"),
        "a refused name reached the upstream:\n{}",
        dns.log()
    );
    let r = tcp(&d, &id, &unlearned);
    assert!(r.eperm(), "connect to an unlearned address: {r:?}");

    for (query, verdict) in [
        ("api.allowed.test", "allow"),
        ("other.refused.test", "refuse"),
    ] {
        wait_record(&agent, &format!("dns {query} {verdict}"), |r| {
            r["type"] == "dns"
                && r["query"] == query
                && r["verdict"] == verdict
                && r["policy"] == "web"
                && r["container"] == id[..12]
                && r["container_name"] == "eg-dns-1"
        });
    }
    wait_record(&agent, "the allowed connect, with its hostname", |r| {
        r["type"] == "net.connect"
            && r["verdict"] == "allow"
            && r["dst"] == gw.as_str()
            && r["container_name"] == "eg-dns-1"
            && r["hostnames"]
                .as_array()
                .is_some_and(|h| h.iter().any(|n| *n == "api.allowed.test"))
    });
}
