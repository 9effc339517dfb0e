//! Abuse of the DNS proxy by a guarded process (issue 14, items 8 to 10): a flood of distinct
//! names under a wildcard (learned-pair exhaustion, exfiltration volume), and answers that
//! point at this host or at AWS's IPv6 metadata service. dnsmasq is the real upstream; the
//! host's own addresses appear only as answer values, never as traffic targets (`check`
//! asks the agent instead).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use egress_guard_e2e::*;

use crate::setup;

const SERVER: &str = "127.0.0.53:53"; // nothing listens there: the kernel redirects to the proxy

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out:?}"))
}

fn dns_json(agent: &Agent) -> serde_json::Value {
    let out = agent.ctl(&["dns", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `egress-guard check DEST`: whether the agent says the policy allows it (no traffic).
fn allowed(agent: &Agent, dest: &str) -> bool {
    let out = agent.ctl(&["check", dest]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("check {dest}: {out:?}"),
    }
}

fn policy(cg: &TestCgroup, dns: &Dnsmasq, port: u16, extra_dns: &str) -> String {
    format!(
        r#"[[policy]]
name = "sandbox"
cgroups = ["{}"]
allow = ["*.svc.test:{port}"]
dns = ["{}"]

[dns]
{extra_dns}
"#,
        cg.rel(),
        dns.addr
    )
}

#[test]
fn dns_abuse_a_wildcard_flood_from_one_container_does_not_take_the_policy_down() {
    setup();
    const FLOOD: usize = 150;
    let port = free_port_range(1);
    let l = std::net::TcpListener::bind(("127.0.0.61", port)).unwrap();
    std::thread::spawn(move || l.incoming().for_each(drop));
    let mut hosts = String::from("127.0.0.61 v1.svc.test v2.svc.test\n");
    for i in 1..=FLOOD {
        hosts.push_str(&format!("127.0.3.{} f{i}.svc.test\n", i % 200 + 1));
    }
    let dns = Dnsmasq::start(&hosts, 300);
    let cg = TestCgroup::new("dns-flood");
    let flooder = cg.child("flood");
    let victim = cg.child("victim");
    // A small policy-wide limit, so the flood would fill it at once; the name budget and the
    // per-container quota are left at their defaults (the quota follows max_learned: 16 / 8).
    let mut agent = Agent::start(&policy(&cg, &dns, port, "max_learned = 16"));

    let r = probe_in(&victim, &["dns", SERVER, "v1.svc.test", "A"]);
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.61", "{r:?}");

    // The flood, while the victim keeps resolving.
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let flood = {
        let (done, flooder) = (done.clone(), flooder.clone());
        std::thread::spawn(move || {
            let out: Vec<String> = (1..=FLOOD)
                .map(|i| {
                    probe_in(&flooder, &["dns", SERVER, &format!("f{i}.svc.test"), "A"]).stdout
                })
                .collect();
            done.store(true, Ordering::SeqCst);
            out
        })
    };
    let mut during = 0;
    while !done.load(Ordering::SeqCst) {
        let r = probe_in(&victim, &["dns", SERVER, "v1.svc.test", "A"]);
        assert_eq!(
            field(&r.stdout, "answers"),
            "127.0.0.61",
            "during the flood: {r:?}"
        );
        during += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let flood = flood.join().unwrap();
    // Within 10 s nothing of the flooder's is idle enough to be evicted (the grace period):
    // every name past its quota is refused. A slower machine sees some evicted instead.
    let quick = started.elapsed() < Duration::from_secs(9);
    assert!(during > 0);
    // A name the victim never asked before (a new pair) still resolves, and its address is
    // allowed at once.
    let r = probe_in(&victim, &["dns", SERVER, "v2.svc.test", "A"]);
    assert_eq!(
        field(&r.stdout, "answers"),
        "127.0.0.61",
        "after the flood: {r:?}"
    );
    let r = probe_in(&victim, &["tcp", &format!("127.0.0.61:{port}")]);
    assert!(r.ok(), "{r:?}");

    // The flooder: answered up to its quota of pairs; then refused (quota) although the
    // upstream was asked; past its name budget, refused without asking.
    let v = dns_json(&agent);
    let limits = &v["limits"];
    let budget = limits["wildcard_names_per_minute"].as_u64().unwrap() as usize;
    let quota = limits["max_learned_per_container"].as_u64().unwrap() as usize;
    assert_eq!(quota, 2, "{limits}");
    assert!(budget < FLOOD, "{limits}");
    let mut quota_refused = 0;
    for (i, out) in flood.iter().enumerate() {
        let ok = out.starts_with("rcode=No Error");
        let refused = out.starts_with("rcode=Query Refused");
        match i {
            i if i < quota => assert!(ok, "f{}: {out:?}", i + 1),
            i if i < budget => {
                assert!(refused || (ok && !quick), "f{}: {out:?}", i + 1);
                quota_refused += usize::from(refused);
            }
            i => assert!(refused, "f{}: {out:?}", i + 1),
        }
    }
    assert!(quota_refused > 0);
    let log = dns.log();
    for i in 1..=FLOOD {
        let sent = log.contains(&format!("] f{i}.svc.test from"));
        assert_eq!(sent, i <= budget, "f{i} reached the upstream: {sent}");
    }
    let counters = &limits["policies"][0];
    assert_eq!(counters["policy"], "sandbox");
    assert_eq!(
        counters["name_budget_refused"],
        (FLOOD - budget) as u64,
        "{counters}"
    );
    assert_eq!(
        counters["learned_quota_refused"], quota_refused as u64,
        "{counters}"
    );
    assert_eq!(
        counters["learned_evicted"],
        (budget - quota - quota_refused) as u64,
        "{counters}"
    );
    let flooded = v["learned"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with('f'))
        .count();
    assert_eq!(flooded, quota);

    // On record, with the flooder's cgroup.
    agent.stop();
    let schema = Schema::load();
    let records = agent.records();
    let of = |who: &str, reason: &str| {
        records
            .iter()
            .filter(|r| {
                r["type"] == "dns"
                    && r["reason"] == reason
                    && r["cgroup"]
                        .as_str()
                        .is_some_and(|c| c.ends_with(&format!("{}/{who}", cg.rel())))
            })
            .count()
    };
    assert_eq!(of("flood", "name_budget"), FLOOD - budget);
    assert_eq!(of("flood", "learned_quota"), quota_refused);
    for r in records.iter().filter(|r| r["reason"] == "name_budget") {
        assert_eq!(r["verdict"], "refuse", "{r}");
        assert_eq!(r["rcode"], "REFUSED", "{r}");
        assert!(r["upstream"].is_null(), "{r}");
    }
    let victim_records: Vec<_> = records
        .iter()
        .filter(|r| {
            r["type"] == "dns" && r["cgroup"].as_str().is_some_and(|c| c.ends_with("/victim"))
        })
        .collect();
    assert_eq!(victim_records.len(), during + 2);
    assert!(victim_records.iter().all(|r| r["verdict"] == "allow"));
    for r in &records {
        schema.check(r);
    }
    let text = agent.log_text();
    assert_eq!(
        text.matches("distinct names under a wildcard within a minute")
            .count(),
        1,
        "the budget is logged once per episode:\n{text}"
    );
}

/// This machine's own addresses on its non-loopback interfaces (global scope).
fn host_addresses() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().skip(1);
            let dev = w.next()?;
            let _family = w.next()?;
            let addr = w.next()?.split('/').next()?;
            (dev != "lo").then(|| addr.to_string())
        })
        .collect()
}

/// A network interface of the test's own (a veth pair), removed on drop.
struct Veth(&'static str);

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) {
    let ok = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip {args:?}");
}

fn bracket(a: &str) -> String {
    if a.contains(':') {
        format!("[{a}]:443")
    } else {
        format!("{a}:443")
    }
}

#[test]
fn dns_abuse_answers_with_this_hosts_or_the_ipv6_metadata_addresses_are_never_learned() {
    setup();
    let host = host_addresses();
    let host4 = host
        .iter()
        .find(|a| !a.contains(':'))
        .expect("this machine has an IPv4 address on a non-loopback interface")
        .clone();
    let host6 = host.iter().find(|a| a.contains(':')).cloned();
    // TEST-NET-3, on no interface until the test puts it on its own veth.
    const LATE: &str = "203.0.113.77";
    let mut hosts = format!(
        "{host4} hostaddr.svc.test\n198.51.100.7 hostaddr.svc.test\n\
         fd00:ec2::254 imds6.svc.test\nfd00:ec2::253 imds6.svc.test\n\
         {LATE} late.svc.test\n10.20.30.40 vpce.svc.test\n"
    );
    if let Some(h6) = &host6 {
        hosts.push_str(&format!("{h6} hostaddr.svc.test\n"));
    }
    let dns = Dnsmasq::start(&hosts, 300);
    let cg = TestCgroup::new("dns-hostaddr");
    drop(Veth("egtest-abuse0"));
    let mut agent = Agent::start(&policy(&cg, &dns, 443, ""));
    // The harness keeps only 169.254.0.0/16 in never_learn (its destinations are loopback):
    // drop that line and restart, so the agent runs with the default list.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("never_learn ="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&agent.config, text).unwrap();
    agent.stop();
    agent.spawn();

    let r = probe_in(&cg.path, &["dns", SERVER, "hostaddr.svc.test", "A"]);
    assert!(field(&r.stdout, "answers").contains(&host4), "{r:?}");
    assert!(
        allowed(&agent, "198.51.100.7:443"),
        "the other address is learned"
    );
    assert!(
        !allowed(&agent, &bracket(&host4)),
        "{host4}: this host's address was learned"
    );
    if let Some(h6) = &host6 {
        let r = probe_in(&cg.path, &["dns", SERVER, "hostaddr.svc.test", "AAAA"]);
        assert!(field(&r.stdout, "answers").contains(h6.as_str()), "{r:?}");
        assert!(
            !allowed(&agent, &bracket(h6)),
            "{h6}: this host's address was learned"
        );
    }
    let r = probe_in(&cg.path, &["dns", SERVER, "imds6.svc.test", "AAAA"]);
    assert!(
        field(&r.stdout, "answers").contains("fd00:ec2::254"),
        "{r:?}"
    );
    for imds in ["fd00:ec2::254", "fd00:ec2::253"] {
        assert!(!allowed(&agent, &bracket(imds)), "{imds} was learned");
    }
    // Private answers are learned by default (VPC endpoints answer with them).
    probe_in(&cg.path, &["dns", SERVER, "vpce.svc.test", "A"]);
    assert!(allowed(&agent, "10.20.30.40:443"));

    // Kept current: an address learned before it became this host's goes when it does.
    probe_in(&cg.path, &["dns", SERVER, "late.svc.test", "A"]);
    assert!(allowed(&agent, &bracket(LATE)));
    let _veth = Veth("egtest-abuse0");
    ip(&[
        "link",
        "add",
        "egtest-abuse0",
        "type",
        "veth",
        "peer",
        "name",
        "egtest-abuse1",
    ]);
    ip(&["addr", "add", &format!("{LATE}/32"), "dev", "egtest-abuse0"]);
    let start = Instant::now();
    while allowed(&agent, &bracket(LATE)) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{LATE} still allowed after it became this host's"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    probe_in(&cg.path, &["dns", SERVER, "late.svc.test", "A"]);
    assert!(!allowed(&agent, &bracket(LATE)), "learned again");
    let v = dns_json(&agent);
    assert!(
        v["limits"]["host_addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == LATE),
        "{}",
        v["limits"]
    );
    let not_learned = v["limits"]["policies"][0]["not_learned"].as_u64().unwrap();
    assert!(not_learned >= 4, "{}", v["limits"]);

    // On record: which answered addresses were not learned, and why.
    agent.stop();
    let schema = Schema::load();
    let records = agent.records();
    let withheld = |query: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["type"] == "dns" && r["query"] == query)
            .filter(|r| r["verdict"] == "allow" && r["reason"] == "never_learn")
            .flat_map(|r| r["not_learned"].as_array().unwrap().clone())
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    assert!(withheld("hostaddr.svc.test").contains(&host4));
    if let Some(h6) = &host6 {
        assert!(withheld("hostaddr.svc.test").contains(h6));
    }
    let imds = withheld("imds6.svc.test");
    assert!(imds.contains(&"fd00:ec2::254".to_string()), "{imds:?}");
    assert!(imds.contains(&"fd00:ec2::253".to_string()), "{imds:?}");
    assert_eq!(withheld("late.svc.test"), [LATE]);
    for r in &records {
        schema.check(r);
    }
}

#[test]
fn dns_abuse_private_answers_are_refused_when_switched_off() {
    setup();
    let dns = Dnsmasq::start(
        "10.20.30.40 vpce.svc.test\n198.51.100.7 vpce.svc.test\n198.51.100.8 public.svc.test\n",
        300,
    );
    let cg = TestCgroup::new("dns-private");
    let mut agent = Agent::start(&policy(&cg, &dns, 443, "private_answers = \"refuse\""));
    let r = probe_in(&cg.path, &["dns", SERVER, "vpce.svc.test", "A"]);
    assert!(
        r.stdout.starts_with("rcode=Query Refused answers= "),
        "{r:?}"
    );
    for a in ["10.20.30.40:443", "198.51.100.7:443"] {
        assert!(!allowed(&agent, a), "{a}");
    }
    let r = probe_in(&cg.path, &["dns", SERVER, "public.svc.test", "A"]);
    assert_eq!(field(&r.stdout, "answers"), "198.51.100.8", "{r:?}");
    assert!(allowed(&agent, "198.51.100.8:443"));
    agent.stop();
    let rec = agent
        .records()
        .into_iter()
        .find(|r| r["type"] == "dns" && r["query"] == "vpce.svc.test")
        .unwrap();
    assert_eq!(rec["verdict"], "refuse");
    assert_eq!(rec["reason"], "private_answer");
    assert_eq!(rec["rcode"], "REFUSED");
    Schema::load().check(&rec);
}
