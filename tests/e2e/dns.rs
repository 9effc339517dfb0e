//! Hostname allowlists through the agent's DNS proxy, with dnsmasq as the real upstream.

use std::{net::SocketAddr, time::Duration};

use egress_guard_e2e::*;

use crate::setup;

/// A policy allowing TCP `port` to `*.svc.test` and to `api.exact.test`, resolved by `dns`.
fn policy(cg: &TestCgroup, dns: &Dnsmasq, port: u16, extra_dns: &str) -> String {
    format!(
        r#"[[policy]]
name = "sandbox"
cgroups = ["{}"]
allow = ["*.svc.test:{port}", "api.exact.test:{port}"]
dns = ["{}"]

[dns]
min_ttl = "2s"
max_ttl = "2s"
{extra_dns}
"#,
        cg.rel(),
        dns.addr
    )
}

/// A TCP listener on `ip` and a fixed port (the same port on several addresses).
fn listen_on(ip: &str, port: u16) {
    let l = std::net::TcpListener::bind((ip, port)).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out:?}"))
}

fn learned(agent: &Agent) -> Vec<(String, String)> {
    let out = agent.ctl(&["dns", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["learned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["address"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn dns_resolve_then_connect_never_races_and_follows_changes() {
    setup();
    let port = free_port_range(1);
    listen_on("127.0.0.21", port);
    listen_on("127.0.0.22", port);
    let dns = Dnsmasq::start("127.0.0.21 a.svc.test\n", 1);
    let cg = TestCgroup::new("dns-race");
    let mut agent = Agent::start(&policy(&cg, &dns, port, ""));
    let server = "127.0.0.53:53"; // nothing listens there: the proxy answers

    // Not resolved yet (wildcards are never resolved ahead): refused.
    let r = probe_in(&cg.path, &["tcp", &format!("127.0.0.21:{port}")]);
    assert!(r.eperm(), "before any lookup: {r:?}");

    // Resolve and connect at once, 1000 times: never refused.
    let r = probe_in(
        &cg.path,
        &[
            "dns-connect",
            server,
            "a.svc.test",
            &port.to_string(),
            "1000",
        ],
    );
    assert_eq!(r.stdout.trim(), "ok=1000 eperm=0 err=0", "{r:?}");

    // The upstream moves the name: the next lookup's address is allowed at once.
    dns.set_hosts("127.0.0.22 a.svc.test\n");
    let r = probe_in(&cg.path, &["dns", server, "a.svc.test", "A"]);
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.22", "{r:?}");
    let r = probe_in(&cg.path, &["tcp", &format!("127.0.0.22:{port}")]);
    assert!(r.ok(), "new address: {r:?}");
    assert!(learned(&agent).contains(&("a.svc.test".into(), "127.0.0.22".into())));

    // A reload flips to a new ruleset: learned addresses move with it, no new lookup needed.
    agent.rewrite_config(&policy(&cg, &dns, port, ""));
    agent.signal(libc::SIGHUP);
    agent.wait_for_log(
        |l| l.matches("policy applied").count() >= 2,
        "the reload to be applied",
    );
    let r = probe_in(&cg.path, &["tcp", &format!("127.0.0.22:{port}")]);
    assert!(r.ok(), "learned address after a reload: {r:?}");
}

#[test]
fn dns_upstream_down_gives_servfail_not_a_hang() {
    setup();
    let cg = TestCgroup::new("dns-down");
    // Nothing listens on the upstream's port.
    let dead = format!("127.0.0.1:{}", free_port_range(1));
    let body = format!(
        r#"[[policy]]
name = "sandbox"
cgroups = ["{}"]
allow = ["*.svc.test:443"]
dns = ["{dead}"]

[dns]
upstream_timeout = "300ms"
upstream_attempts = 2
"#,
        cg.rel()
    );
    let _agent = Agent::start(&body);
    // The probe waits 5 s for an answer: a hanging proxy would show as a timeout.
    for transport in [&[][..], &["tcp"][..]] {
        let mut args = vec!["dns", "127.0.0.53:53", "a.svc.test", "A"];
        args.extend_from_slice(transport);
        let r = probe_in(&cg.path, &args);
        assert!(
            r.stdout.contains("rcode=Server Failure"),
            "{transport:?}: {r:?}"
        );
    }
}

#[test]
fn dns_refused_names_never_reach_the_upstream() {
    setup();
    let dns = Dnsmasq::start("127.0.0.21 a.svc.test\n127.0.0.23 evil.example\n", 1);
    let cg = TestCgroup::new("dns-refuse");
    let mut agent = Agent::start(&policy(&cg, &dns, 443, ""));
    let server = "127.0.0.53:53";
    let schema = Schema::load();

    let r = probe_in(&cg.path, &["dns", server, "evil.example", "A"]);
    assert!(r.stdout.contains("rcode=Query Refused"), "{r:?}");
    // Data smuggled in labels under an allowed wildcard, and TXT/NULL for an allowed name.
    let tunnel = format!("{}.svc.test", "a".repeat(50));
    let r = probe_in(&cg.path, &["dns", server, &tunnel, "A"]);
    assert!(r.stdout.contains("rcode=Query Refused"), "{r:?}");
    for t in ["TXT", "NULL"] {
        let r = probe_in(&cg.path, &["dns", server, "a.svc.test", t]);
        assert!(r.stdout.contains("rcode=No Error answers= "), "{t}: {r:?}");
    }
    // The allowed A lookup does reach it (over UDP and over TCP).
    let r = probe_in(&cg.path, &["dns", server, "a.svc.test", "A"]);
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.21", "{r:?}");
    let r = probe_in(&cg.path, &["dns", server, "a.svc.test", "AAAA", "tcp"]);
    assert_eq!(r.code, Some(0), "{r:?}");

    let log = dns.log();
    assert!(log.contains("query[A] a.svc.test"), "{log}");
    for never in ["evil.example", "aaaaaaaaaa", "query[TXT]", "query[NULL]"] {
        assert!(!log.contains(never), "{never} reached the upstream:\n{log}");
    }

    // Every lookup is on record, refusals with their reason.
    agent.stop();
    let records = agent.records();
    let dns_records: Vec<_> = records.iter().filter(|r| r["type"] == "dns").collect();
    let refused = dns_records
        .iter()
        .find(|r| r["query"] == "evil.example")
        .expect("a dns record of the refusal");
    assert_eq!(refused["verdict"], "refuse");
    assert_eq!(refused["reason"], "name_not_allowed");
    assert_eq!(refused["rcode"], "REFUSED");
    assert_eq!(refused["policy"], "sandbox");
    // The process and cgroup behind each query, as the kernel saw them leave.
    for r in &dns_records {
        assert_eq!(r["comm"], "probe", "{r}");
        assert!(r["pid"].as_u64().is_some_and(|p| p > 0), "{r}");
        assert!(
            r["cgroup"].as_str().is_some_and(|c| c.ends_with(&cg.rel())),
            "{r}"
        );
    }
    assert!(dns_records.iter().any(|r| r["transport"] == "tcp"));
    assert!(
        dns_records
            .iter()
            .any(|r| r["query"] == tunnel.as_str() && r["reason"] == "tunnel_pattern")
    );
    let allowed = dns_records
        .iter()
        .find(|r| r["query"] == "a.svc.test" && r["qtype"] == "A")
        .unwrap();
    assert_eq!(allowed["verdict"], "allow");
    assert_eq!(allowed["answers"], serde_json::json!(["127.0.0.21"]));
    for r in &records {
        schema.check(r);
    }
}

#[test]
fn dns_hardcoded_resolvers_tcp_and_truncation_all_go_through_the_proxy() {
    setup();
    // 120 addresses: more than a UDP answer to the proxy holds (it offers 1,232 bytes).
    let many: String = (1..=120)
        .map(|i| format!("127.0.1.{i} big.svc.test\n"))
        .collect();
    let dns = Dnsmasq::start(&format!("127.0.0.21 a.svc.test\n{many}"), 1);
    let cg = TestCgroup::new("dns-paths");
    let agent = Agent::start(&policy(&cg, &dns, 443, ""));

    // A resolver address the process picked itself, UDP: answered, and the answer seems to
    // come from where it was sent (resolvers check that).
    let r = probe_in(&cg.path, &["dns", "127.0.0.99:53", "a.svc.test", "A"]);
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.21", "{r:?}");
    assert_eq!(field(&r.stdout, "from"), "127.0.0.99:53", "{r:?}");
    // The same over TCP.
    let r = probe_in(
        &cg.path,
        &["dns", "127.0.0.98:53", "a.svc.test", "A", "tcp"],
    );
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.21", "{r:?}");
    assert_eq!(field(&r.stdout, "from"), "127.0.0.98:53", "{r:?}");
    // IPv6 TCP to a resolver address on ::1.
    let r = probe_in(&cg.path, &["dns", "[::1]:53", "a.svc.test", "A", "tcp"]);
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.21", "{r:?}");

    // Too big for UDP: the proxy fetches it whole over TCP from the upstream, allows all 120
    // addresses, and tells the UDP client to retry over TCP.
    let r = probe_in(&cg.path, &["dns", "127.0.0.99:53", "big.svc.test", "A"]);
    assert_eq!(field(&r.stdout, "tc"), "1", "{r:?}");
    let big: Vec<_> = learned(&agent)
        .into_iter()
        .filter(|(n, _)| n == "big.svc.test")
        .collect();
    assert_eq!(big.len(), 120, "{big:?}");
    let r = probe_in(
        &cg.path,
        &["dns", "127.0.0.99:53", "big.svc.test", "A", "tcp"],
    );
    assert_eq!(field(&r.stdout, "answers").split(',').count(), 120, "{r:?}");
    assert_eq!(field(&r.stdout, "tc"), "0", "{r:?}");
}

/// Reads what the other end of `conn` sent (up to 1.5 s).
fn arrived(conn: &mut std::net::TcpStream) -> String {
    conn.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(conn, &mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn dns_learned_addresses_expire_unless_a_connection_is_open() {
    setup();
    let port = free_port_range(1);
    let held_server = std::net::TcpListener::bind(("127.0.0.21", port)).unwrap();
    listen_on("127.0.0.23", port);
    let static_server = std::net::TcpListener::bind(("127.0.0.24", port)).unwrap();
    let dns = Dnsmasq::start("127.0.0.21 held.svc.test\n127.0.0.23 idle.svc.test\n", 1);
    let cg = TestCgroup::new("dns-expiry");
    // 127.0.0.24 is allowed by address: nothing to keep alive, so it is not followed.
    let body = policy(&cg, &dns, port, "")
        .replace("allow = [", &format!("allow = [\"127.0.0.24:{port}\", "));
    let agent = Agent::start(&body);
    let server = "127.0.0.53:53";
    for name in ["held.svc.test", "idle.svc.test"] {
        let r = probe_in(&cg.path, &["dns", server, name, "A"]);
        assert_eq!(r.code, Some(0), "{name}: {r:?}");
    }
    // A connection to one of them stays open past the TTL (2 s).
    let held: SocketAddr = format!("127.0.0.21:{port}").parse().unwrap();
    let mut open = RunningProbe::start(&cg.path, &["tcp-presocket", &held.to_string()]);
    let (mut conn, _) = held_server.accept().unwrap();
    let mut open_static =
        RunningProbe::start(&cg.path, &["tcp-presocket", &format!("127.0.0.24:{port}")]);
    let (_static_conn, _) = static_server.accept().unwrap();
    assert_eq!(
        pinned_map_len(&agent.pin_dir.join("v2/maps/OPEN_CONNS"), 8),
        1,
        "only the connection to the learned address is followed"
    );
    std::thread::sleep(Duration::from_secs(5));

    let r = probe_in(&cg.path, &["tcp", &format!("127.0.0.23:{port}")]);
    assert!(r.eperm(), "expired, no connection open: {r:?}");
    let r = probe_in(&cg.path, &["tcp", &held.to_string()]);
    assert!(r.ok(), "a connection to it is open, so it stays: {r:?}");
    open.go();
    assert_eq!(open.finish().trim(), "ok");
    assert_eq!(
        arrived(&mut conn),
        "presocket",
        "the open connection survives"
    );
    drop(conn);
    open_static.go();
    assert_eq!(open_static.finish().trim(), "ok");

    // Closed: it goes too (re-checked every 5 s).
    std::thread::sleep(Duration::from_secs(8));
    let r = probe_in(&cg.path, &["tcp", &held.to_string()]);
    assert!(r.eperm(), "expired after the connection closed: {r:?}");
}

#[test]
fn dns_garbage_gets_an_error_or_nothing_and_the_proxy_keeps_serving() {
    setup();
    let dns = Dnsmasq::start("127.0.0.21 a.svc.test\n", 1);
    let cg = TestCgroup::new("dns-garbage");
    let _agent = Agent::start(&policy(&cg, &dns, 443, ""));
    let server = "127.0.0.53:53";
    let header_then_junk = format!("abcd01000005000000000000{}", "ff".repeat(40));
    let response_bit = "abcd81000001000000000000";
    let cases: [(&str, &str); 5] = [
        ("ab", "no-reply"),
        (response_bit, "no-reply"),
        // FORMERR (rcode 1) with the request's id.
        (&header_then_junk, "reply=abcd8181"),
        // Opcode 2 (status): NOTIMP (4).
        ("abcd10000000000000000000", "reply=abcd9084"),
        (&"00".repeat(3000), "reply=000080810000"),
    ];
    for (bytes, want) in cases {
        let r = probe_in(&cg.path, &["dns-raw", server, bytes]);
        assert!(
            r.stdout.trim().starts_with(want),
            "{bytes:.40}: {r:?} (want {want})"
        );
    }
    let r = probe_in(&cg.path, &["dns", server, "a.svc.test", "A"]);
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.21", "{r:?}");
}

#[test]
fn dns_direct_mode_learns_exact_names_ahead_and_leaves_dns_alone() {
    setup();
    let port = free_port_range(1);
    listen_on("127.0.0.24", port);
    let dns = Dnsmasq::start("127.0.0.24 api.exact.test\n", 1);
    let cg = TestCgroup::new("dns-direct");
    let body = format!(
        r#"[[policy]]
name = "sandbox"
cgroups = ["{}"]
allow = ["api.exact.test:{port}"]
dns = ["{}"]

[dns]
mode = "direct"
"#,
        cg.rel(),
        dns.addr
    );
    let agent = Agent::start(&body);
    // Pre-resolved by the agent: the process connects without looking the name up.
    let mut ok = false;
    for _ in 0..50 {
        if probe_in(&cg.path, &["tcp", &format!("127.0.0.24:{port}")]).ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ok,
        "pre-resolved address not allowed; log:\n{}",
        agent.log_text()
    );
    // DNS is not redirected: the configured resolver is reachable, any other is not.
    let r = probe_in(
        &cg.path,
        &["dns", &dns.addr.to_string(), "api.exact.test", "A"],
    );
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.24", "{r:?}");
    let r = probe_in(&cg.path, &["dns", "127.0.0.53:53", "api.exact.test", "A"]);
    assert!(r.stdout.contains("os error 1)"), "EPERM expected: {r:?}");
}

#[test]
fn dns_learned_addresses_and_their_connections_survive_an_agent_restart() {
    setup();
    let port = free_port_range(1);
    let held_server = std::net::TcpListener::bind(("127.0.0.21", port)).unwrap();
    let dns = Dnsmasq::start("127.0.0.21 held.svc.test\n", 1);
    let cg = TestCgroup::new("dns-restart");
    let body = format!(
        r#"[[policy]]
name = "sandbox"
cgroups = ["{}"]
allow = ["*.svc.test:{port}"]
dns = ["{}"]

[dns]
min_ttl = "60s"
"#,
        cg.rel(),
        dns.addr
    );
    let mut agent = Agent::start(&body);
    let r = probe_in(&cg.path, &["dns", "127.0.0.53:53", "held.svc.test", "A"]);
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.21", "{r:?}");
    let held = format!("127.0.0.21:{port}");
    let mut open = RunningProbe::start(&cg.path, &["tcp-presocket", &held]);
    let (mut conn, _) = held_server.accept().unwrap();

    // A crash and a new agent: it adopts what the old one learned.
    agent.kill9();
    agent.spawn();
    let adopted = learned(&agent);
    assert!(
        adopted
            .iter()
            .any(|(n, a)| a == "127.0.0.21" && n.contains("restart")),
        "{adopted:?}"
    );
    open.go();
    assert_eq!(open.finish().trim(), "ok");
    assert_eq!(
        arrived(&mut conn),
        "presocket",
        "the open connection survives"
    );
    let r = probe_in(&cg.path, &["tcp", &held]);
    assert!(r.ok(), "the learned address is still allowed: {r:?}");

    // A restart with a config that no longer allows the name: the address goes at once.
    drop(conn);
    agent.kill9();
    agent.rewrite_config(&body.replace("*.svc.test", "*.other.test"));
    agent.spawn();
    let r = probe_in(&cg.path, &["tcp", &held]);
    assert!(r.eperm(), "adopted despite the new config: {r:?}");
    assert!(learned(&agent).is_empty());
}

#[test]
fn dns_answers_never_make_the_metadata_service_or_the_host_reachable() {
    setup();
    let dns = Dnsmasq::start(
        "169.254.169.254 meta.svc.test\n127.0.0.21 meta.svc.test\n",
        1,
    );
    let cg = TestCgroup::new("dns-rebind");
    // The harness's [dns] table keeps only 169.254.0.0/16 in never_learn (its destinations are
    // loopback); the default list also has loopback, 0.0.0.0/8, multicast and fe80::/10.
    let agent = Agent::start(&policy(&cg, &dns, 443, ""));
    let r = probe_in(&cg.path, &["dns", "127.0.0.53:53", "meta.svc.test", "A"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let got = learned(&agent);
    assert!(
        got.iter().any(|(_, a)| a == "127.0.0.21")
            && !got.iter().any(|(_, a)| a.starts_with("169.254.")),
        "{got:?}"
    );
    // Asked of the agent, not tried: no traffic leaves for the metadata address.
    let out = agent.ctl(&["check", "169.254.169.254:443"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
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

#[test]
fn dns_is_redirected_only_while_the_proxy_address_belongs_to_the_host() {
    setup();
    let dns = Dnsmasq::start("127.0.0.21 a.svc.test\n", 1);
    let cg = TestCgroup::new("dns-local");
    // TEST-NET-1: on no interface of this machine until the test puts it on its own veth.
    let body = format!(
        r#"[[policy]]
name = "sandbox"
cgroups = ["{}"]
allow = ["*.svc.test:443"]
dns = ["{}"]

[dns]
listen = "192.0.2.53"
"#,
        cg.rel(),
        dns.addr
    );
    // Left by a killed earlier run.
    drop(Veth("egtest-dns0"));
    let agent = Agent::start(&body);
    assert!(
        agent
            .log_text()
            .contains("not (yet) an address of this host")
    );
    // Not redirected: the query meets the policy like any other traffic, and is refused.
    let r = probe_in(&cg.path, &["dns", "127.0.0.53:53", "a.svc.test", "A"]);
    assert!(r.stdout.contains("os error 1)"), "EPERM expected: {r:?}");

    let ip = |args: &[&str]| {
        assert!(
            std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap()
                .success(),
            "ip {args:?}"
        )
    };
    let _dummy = Veth("egtest-dns0");
    ip(&[
        "link",
        "add",
        "egtest-dns0",
        "type",
        "veth",
        "peer",
        "name",
        "egtest-dns1",
    ]);
    ip(&["addr", "add", "192.0.2.53/32", "dev", "egtest-dns0"]);
    ip(&["link", "set", "egtest-dns0", "up"]);
    // Within the agent's next check (every second), the redirect is on.
    let mut answered = None;
    for _ in 0..50 {
        let r = probe_in(&cg.path, &["dns", "127.0.0.53:53", "a.svc.test", "A"]);
        if r.stdout.starts_with("rcode=") {
            answered = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = answered.expect("no answer after the address appeared");
    assert_eq!(field(&r.stdout, "answers"), "127.0.0.21", "{r:?}");
}
