//! What the kernel allows and refuses for processes in a guarded cgroup.

use egress_guard_e2e::*;

use crate::setup;

/// A policy allowing one TCP and one UDP destination on 127.0.0.2, and one TCP port on ::1.
fn policy(cgroup: &TestCgroup, tcp: u16, udp: u16, tcp6: u16, mode: &str) -> String {
    format!(
        r#"mode = "{mode}"
[[policy]]
name = "sandbox"
cgroups = ["{}"]
allow = ["127.0.0.2:{tcp}", "udp/127.0.0.2:{udp}", "[::1]:{tcp6}", "api.example.com:443"]
dns = ["127.0.0.1:9"]
"#,
        cgroup.rel()
    )
}

#[test]
fn guarded_processes_reach_only_allowed_destinations() {
    setup();
    let cg = TestCgroup::new("enforce");
    let allowed = tcp_listener("127.0.0.2");
    let other_port = tcp_listener("127.0.0.2");
    let other_addr = tcp_listener("127.0.0.3");
    let allowed6 = tcp_listener("[::1]");
    let udp_ok = udp_receiver("127.0.0.2");
    let udp_other = udp_receiver("127.0.0.2");
    let udp_ok_addr = udp_ok.local_addr().unwrap();
    let udp_other_addr = udp_other.local_addr().unwrap();
    let agent = Agent::start(&policy(
        &cg,
        allowed.port(),
        udp_ok_addr.port(),
        allowed6.port(),
        "enforce",
    ));

    let s = |a: std::net::SocketAddr| a.to_string();
    // Allowed: TCP and UDP to the listed address:port, IPv6, and the IPv4-mapped form.
    assert!(probe_in(&cg.path, &["tcp", &s(allowed)]).ok());
    assert!(probe_in(&cg.path, &["udp", &s(udp_ok_addr)]).ok());
    assert!(received(&udp_ok), "the allowed datagram did not arrive");
    assert!(probe_in(&cg.path, &["tcp", &s(allowed6)]).ok());
    let mapped_allowed = format!("[::ffff:127.0.0.2]:{}", allowed.port());
    assert!(probe_in(&cg.path, &["tcp", &mapped_allowed]).ok());

    // Refused: another port, another address, the IPv4-mapped form of another address,
    // UDP to another port, a raw socket.
    let r = probe_in(&cg.path, &["tcp", &s(other_port)]);
    assert!(r.eperm(), "other port: {r:?}");
    let r = probe_in(&cg.path, &["tcp", &s(other_addr)]);
    assert!(r.eperm(), "other address: {r:?}");
    let mapped_other = format!("[::ffff:127.0.0.3]:{}", other_addr.port());
    let r = probe_in(&cg.path, &["tcp", &mapped_other]);
    assert!(r.eperm(), "IPv4-mapped other address: {r:?}");
    let r = probe_in(&cg.path, &["udp", &s(udp_other_addr)]);
    assert!(r.eperm(), "UDP to another port: {r:?}");
    assert!(!received(&udp_other), "a refused datagram arrived");
    let r = probe_in(&cg.path, &["raw"]);
    assert!(r.eperm(), "raw socket: {r:?}");

    // A process outside the cgroup is unaffected.
    assert!(probe_outside(&["tcp", &s(other_addr)]).ok());
    assert!(probe_outside(&["tcp", &mapped_other]).ok());

    // A child cgroup created after the agent started is guarded too.
    let child = cg.child("late-container");
    assert!(probe_in(&child, &["tcp", &s(allowed)]).ok());
    let r = probe_in(&child, &["tcp", &s(other_addr)]);
    assert!(r.eperm(), "child cgroup: {r:?}");

    // The kernel counted what it decided.
    let c = agent.counters("sandbox");
    assert!(c["connect_allowed"].as_u64().unwrap() >= 4, "{c:?}");
    assert!(c["connect_denied"].as_u64().unwrap() >= 4, "{c:?}");
    assert!(c["send_allowed"].as_u64().unwrap() >= 1, "{c:?}");
    assert!(c["send_denied"].as_u64().unwrap() >= 1, "{c:?}");
    assert!(c["socket_denied"].as_u64().unwrap() >= 1, "{c:?}");
    assert_eq!(c["connect_would_deny"].as_u64().unwrap(), 0, "{c:?}");

    // AF_PACKET, by socket() and through io_uring: refused with EPERM by the BPF LSM guard,
    // else the caller is killed (see the next test).
    let guard = check_af_packet(&cg, &agent.log_text());
    assert!(
        probe_outside(&["packet"]).ok() && probe_outside(&["packet-uring"]).ok(),
        "AF_PACKET outside the cgroup must work"
    );
    assert_eq!(
        agent.counters("sandbox")["socket_denied"].as_u64(),
        Some(if guard == "tracepoint" { 2 } else { 3 }),
        "raw, packet and (unless the tracepoint guard) packet-uring"
    );
}

/// AF_PACKET from the guarded cgroup, through socket() and through io_uring, as the socket
/// guard the agent's log names should treat it; returns that guard.
fn check_af_packet(cg: &TestCgroup, log: &str) -> &'static str {
    let socket = probe_in(&cg.path, &["packet"]);
    let uring = probe_in(&cg.path, &["packet-uring"]);
    let killed = |how: &str, r: &ProbeResult| {
        assert_eq!(r.signal, Some(libc::SIGKILL), "{how}: {r:?}\n{log}");
        assert!(r.stdout.is_empty(), "{how}: the probe got to report: {r:?}");
    };
    if log.contains("AF_PACKET guard: BPF LSM socket_create") {
        assert!(socket.eperm(), "socket() with the LSM guard: {socket:?}");
        assert!(uring.eperm(), "io_uring with the LSM guard: {uring:?}");
        "lsm"
    } else if log.contains("using fentry on __sock_create") {
        killed("socket() with the fentry guard", &socket);
        killed("io_uring with the fentry guard", &uring);
        "fentry"
    } else {
        assert!(
            log.contains("using the sys_enter_socket tracepoint"),
            "no socket guard: {log}"
        );
        killed("socket() with the tracepoint guard", &socket);
        // The gap the README states: the tracepoint is on the socket() system call only.
        assert!(uring.ok(), "io_uring with the tracepoint guard: {uring:?}");
        "tracepoint"
    }
}

/// Most distributions leave the BPF LSM out of `lsm=`; there the AF_PACKET guard is an fentry
/// program on `__sock_create`, below every way to create a socket, so a guarded process asking for
/// AF_PACKET is killed whether it calls socket() or submits IORING_OP_SOCKET to io_uring; on a
/// kernel without BPF trampolines it is the `sys_enter_socket` tracepoint, which sees socket() only.
/// The agent is shown a copy of /sys/kernel/security/lsm without `bpf`. Raw INET sockets are
/// still refused with EPERM by the cgroup hook, and nothing outside the cgroup is touched.
#[test]
fn without_the_bpf_lsm_af_packet_callers_are_killed() {
    setup();
    let cg = TestCgroup::new("fallback-guard");
    let mut agent = Agent::start_without_bpf_lsm(&policy(&cg, 1, 2, 3, "enforce"));
    let guard = check_af_packet(&cg, &agent.log_text());
    assert_ne!(guard, "lsm", "the BPF LSM was not hidden");
    assert!(
        probe_outside(&["packet"]).ok() && probe_outside(&["packet-uring"]).ok(),
        "AF_PACKET outside the cgroup must work"
    );
    let r = probe_in(&cg.path, &["raw"]);
    assert!(r.eperm(), "a raw INET socket is refused, not killed: {r:?}");
    let status = agent.ctl(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!("socket guard: {guard}")),
        "{status}"
    );

    agent.stop();
    let records = agent.records();
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["type"] == "net.socket" && r["verdict"] == "deny")
        .map(|r| r["family"].as_str().unwrap_or("?"))
        .collect();
    let expected: &[&str] = if guard == "fentry" {
        &["packet", "packet", "inet"]
    } else {
        &["packet", "inet"]
    };
    assert_eq!(refused, expected, "{records:?}");
    let start = records.iter().find(|r| r["type"] == "agent.start").unwrap();
    assert_eq!(start["socket_guard"], guard, "{start}");
}

#[test]
fn the_packet_backstop_drops_sends_on_sockets_opened_before_the_guard() {
    setup();
    let cg = TestCgroup::new("backstop");
    let target = udp_receiver("127.0.0.3");
    let to = target.local_addr().unwrap().to_string();
    // The socket is connected before any program is attached, so no connect/sendmsg hook
    // will see its sends: only the cgroup_skb egress program can stop them.
    let mut early = RunningProbe::start(&cg.path, &["udp-presocket", &to]);
    let agent = Agent::start(&policy(&cg, 1, 2, 3, "enforce"));
    early.go();
    // The cgroup_skb drop surfaces as EPERM from send() on a locally generated packet.
    assert_eq!(
        early.finish().trim(),
        "EPERM",
        "the packet backstop did not refuse the send"
    );
    assert!(
        !received(&target),
        "a packet to a refused destination left the guarded cgroup"
    );
    assert!(agent.counter("sandbox", "packet_denied") >= 1);
}

#[test]
fn the_packet_backstop_stops_tcp_connections_opened_before_the_guard() {
    setup();
    let cg = TestCgroup::new("backstop-tcp");
    let server = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    let to = server.local_addr().unwrap().to_string();
    // Established before any program is attached: no connect hook saw it, and it is an
    // outbound connection, so the inbound-reply rule must not let it through either.
    let mut early = RunningProbe::start(&cg.path, &["tcp-presocket", &to]);
    let (mut conn, _) = server.accept().unwrap();
    let agent = Agent::start(&policy(&cg, 1, 2, 3, "enforce"));
    early.go();
    let _ = early.finish();
    conn.set_read_timeout(Some(std::time::Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let got = std::io::Read::read(&mut conn, &mut buf).unwrap_or(0);
    assert_eq!(
        got, 0,
        "data on a pre-existing connection to a refused destination arrived"
    );
    assert!(agent.counter("sandbox", "packet_denied") >= 1);
}

#[test]
fn a_hand_made_fragment_is_dropped_and_the_kernel_says_why() {
    setup();
    let cg = TestCgroup::new("fragment");
    // A raw socket opened before the guard (sock_create refuses them after): the only way a
    // guarded process builds a non-first fragment where the cgroup hook runs. The backstop
    // cannot read its ports, so it judges it unreadable, whatever its address.
    let mut early = RunningProbe::start(&cg.path, &["fragment-presocket", "127.0.0.2"]);
    let mut agent = Agent::start(&policy(&cg, 1, 2, 3, "enforce"));
    // A restarted agent adopts the pinned programs and reads their pinned log ring.
    agent.kill9();
    agent.spawn();
    let log = agent.log_text();
    let restarted = log.lines().rfind(|l| l.contains("enforcing;")).unwrap();
    assert!(!restarted.contains("adopted=0 "), "{restarted}");
    early.go();
    assert_eq!(
        early.finish().trim(),
        "EPERM",
        "the packet backstop did not refuse the fragment"
    );
    assert!(agent.counter("sandbox", "packet_denied") >= 1);
    // The kernel's own words (aya-log), forwarded to the agent's log at debug level.
    agent.wait_for_log(
        |l| {
            l.lines().any(|l| {
                l.contains("eBPF: a 28-byte packet (ethertype 0x800) is not IP or is a non-first fragment: judged unreadable")
            })
        },
        "the kernel's line about the fragment",
    );
    agent.stop();
    let records = agent.records();
    let packet = records
        .iter()
        .find(|r| r["type"] == "net.packet")
        .unwrap_or_else(|| panic!("no net.packet record: {records:?}"));
    assert_eq!(
        (packet["verdict"].as_str(), packet["reason"].as_str()),
        (Some("deny"), Some("unreadable_packet")),
        "{packet}"
    );
}

#[test]
fn replies_to_inbound_tcp_connections_pass() {
    setup();
    let cg = TestCgroup::new("inbound");
    let agent = Agent::start(&policy(&cg, 1, 2, 3, "enforce"));
    // A server inside the guarded cgroup; the client outside connects from 127.0.0.1, an
    // address the policy does not allow, so only the inbound-reply rule lets answers out.
    let port = std::net::TcpListener::bind("127.0.0.4:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let on = format!("127.0.0.4:{port}");
    let server = RunningProbe::start(&cg.path, &["serve", &on]);
    let mut client = std::net::TcpStream::connect(&on).expect("connecting to the guarded server");
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut client, &mut got).expect("reading the reply");
    assert_eq!(got, "hello");
    assert_eq!(server.finish().trim(), "ok");
    assert!(agent.counter("sandbox", "packet_inbound_reply") >= 1);
    // And the same server cannot open connections of its own to that client address.
    let r = probe_in(
        &cg.path,
        &[
            "tcp",
            &format!("127.0.0.1:{}", tcp_listener("127.0.0.1").port()),
        ],
    );
    assert!(r.eperm(), "{r:?}");
}

#[test]
fn audit_mode_lets_everything_through_and_counts_would_be_denials() {
    setup();
    let cg = TestCgroup::new("audit");
    let allowed = tcp_listener("127.0.0.2");
    let other_addr = tcp_listener("127.0.0.3");
    let udp_other = udp_receiver("127.0.0.2");
    let agent = Agent::start(&policy(&cg, allowed.port(), 9, 9, "audit"));
    let s = |a: std::net::SocketAddr| a.to_string();

    assert!(probe_in(&cg.path, &["tcp", &s(allowed)]).ok());
    assert!(probe_in(&cg.path, &["tcp", &s(other_addr)]).ok());
    assert!(
        probe_in(
            &cg.path,
            &["tcp", &format!("[::ffff:127.0.0.3]:{}", other_addr.port())]
        )
        .ok()
    );
    assert!(probe_in(&cg.path, &["udp", &s(udp_other.local_addr().unwrap())]).ok());
    assert!(received(&udp_other), "audit mode must deliver");
    assert!(probe_in(&cg.path, &["raw"]).ok());
    assert!(probe_in(&cg.path, &["packet"]).ok());

    let c = agent.counters("sandbox");
    assert_eq!(c["connect_denied"].as_u64().unwrap(), 0, "{c:?}");
    assert_eq!(c["send_denied"].as_u64().unwrap(), 0, "{c:?}");
    assert!(c["connect_allowed"].as_u64().unwrap() >= 1, "{c:?}");
    assert!(c["connect_would_deny"].as_u64().unwrap() >= 2, "{c:?}");
    assert!(c["send_would_deny"].as_u64().unwrap() >= 1, "{c:?}");
    assert!(
        c["socket_would_deny"].as_u64().unwrap() >= 2,
        "raw and packet: {c:?}"
    );
    let out = agent.cli(&["stats"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("sandbox") && table.contains("audit"),
        "{table}"
    );
}
