//! A tiny network probe the end-to-end tests run inside guarded cgroups.
//!
//! Prints one line per attempt: `ok`, `EPERM`, or `err <reason>`, and exits 0 if every
//! attempt succeeded, 1 if any was refused with EPERM, 2 on other errors.
//!
//! probe tcp ADDR:PORT              connect (and close)
//! probe udp ADDR:PORT [N]          sendto one (or N) datagrams from one socket
//! probe raw                        socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)
//! probe packet                     socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)
//! probe packet-uring               the same through io_uring (IORING_OP_SOCKET), not socket(2)
//! probe socket FAMILY TYPE PROTO    the raw socket(2) syscall with 64-bit arguments
//! probe tcp-presocket ADDR:PORT    connect, print `ready`, wait for a line, then write
//! probe udp-presocket ADDR:PORT    connect a UDP socket, print `ready`, wait for a line on
//!                                  stdin, then send on it (the socket predates the guard)
//! probe fragment-presocket ADDR    open a raw IPv4 socket, print `ready`, wait for a line,
//!                                  then send a hand-made non-first UDP fragment to ADDR
//! probe serve ADDR:PORT            listen, print `ready`, accept one connection, write `hello`
//! probe serve-forever ADDR:PORT    listen, print `ready`, then accept connections until killed,
//!                                  writing `hello` to each (a stand-in for a remote API)
//! probe tcp-name HOST:PORT         resolve HOST with the system resolver (resolv.conf, as any
//!                                  program in a container would), connect to its first address;
//!                                  prints `ADDR ok`, `ADDR EPERM` or `err lookup: …`
//! probe loop tcp ADDR:PORT MILLIS  connect repeatedly for MILLIS; prints `ok=N eperm=M err=K`
//! probe bench-connect ADDR:PORT MILLIS  connect + close (RST) for MILLIS; prints
//!                                  `ns_per_connect=X cpu_ns_per_connect=Y connects=N`
//! probe storm tcp ADDR:PORT N      N connects as fast as possible (a burst of audit records);
//!                                  prints `ok=N eperm=M err=K`
//! probe bench-syscalls MILLIS     getppid() for MILLIS, then socket()+close() for MILLIS;
//!                                  prints `ns_per_getppid=X ns_per_socket=Y`
//! probe dns SERVER:PORT NAME TYPE [tcp]   one DNS query (UDP from an unconnected socket, or
//!                                  TCP); prints `rcode=R answers=A,B from=ADDR:PORT tc=0|1`
//!                                  (`from`: where the answer appeared to come from)
//! probe dns-connect SERVER:PORT NAME PORT N  N times: resolve NAME (A, UDP), connect to the
//!                                  first answer on PORT; prints `ok=N eperm=M err=K`
//! probe dns-raw SERVER:PORT HEX    send these bytes over UDP; prints `reply=HEX` or `no-reply`
//! probe dns-bench SERVER:PORT NAME QPS COUNT  COUNT A queries paced at QPS from one UDP
//!                                  socket; prints `n=N timeouts=T us=L1,L2,…` (latencies)

use std::{
    io::{BufRead as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

#[derive(PartialEq)]
enum Outcome {
    Ok,
    Eperm,
    Err(String),
}

fn classify<T>(r: std::io::Result<T>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Outcome::Eperm,
        Err(e) => Outcome::Err(e.to_string()),
    }
}

fn report(o: Outcome) -> ExitCode {
    match o {
        Outcome::Ok => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Outcome::Eperm => {
            println!("EPERM");
            ExitCode::from(1)
        }
        Outcome::Err(e) => {
            println!("err {e}");
            ExitCode::from(2)
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

/// One connect of a storm, closed at once with a reset (no TIME_WAIT pile-up), counted.
fn storm_connect(to: SocketAddr, ok: &mut u64, eperm: &mut u64, err: &mut u64) {
    match TcpStream::connect(to) {
        Ok(s) => {
            close_with_reset(s);
            *ok += 1
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => *eperm += 1,
        Err(_) => *err += 1,
    }
}

fn tcp(to: SocketAddr) -> Outcome {
    classify(TcpStream::connect_timeout(&to, Duration::from_secs(2)))
}

fn udp(to: SocketAddr) -> Outcome {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    classify(UdpSocket::bind(bind).and_then(|s| s.send_to(b"probe", to)))
}

fn raw_socket(family: i32, ty: i32, proto: i32) -> Outcome {
    // SAFETY: plain syscalls; the fd is closed right away.
    let fd = unsafe { libc::socket(family, ty, proto) };
    if fd < 0 {
        return classify::<()>(Err(std::io::Error::last_os_error()));
    }
    unsafe { libc::close(fd) };
    Outcome::Ok
}

/// Creates a socket through io_uring (IORING_OP_SOCKET), which does not pass the socket()
/// system call: a guard on that system call would not see it.
fn uring_socket(family: i32, ty: i32, proto: i32) -> Outcome {
    use io_uring::{IoUring, opcode};
    let mut ring = match IoUring::new(2) {
        Ok(r) => r,
        Err(e) => return Outcome::Err(format!("io_uring_setup: {e}")),
    };
    let sqe = opcode::Socket::new(family, ty, proto).build();
    // SAFETY: the entry holds no pointers.
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        return Outcome::Err("the submission queue is full".into());
    }
    if let Err(e) = ring.submit_and_wait(1) {
        return Outcome::Err(format!("io_uring_enter: {e}"));
    }
    let Some(cqe) = ring.completion().next() else {
        return Outcome::Err("no completion".into());
    };
    let fd = cqe.result();
    if fd < 0 {
        return classify::<()>(Err(std::io::Error::from_raw_os_error(-fd)));
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    Outcome::Ok
}

/// Sends, on a raw IPPROTO_RAW socket (the header is ours), a UDP fragment at offset 8
/// bytes: a non-first fragment, which only a raw socket builds where the cgroup hooks run.
fn send_fragment(fd: i32, to: std::net::Ipv4Addr) -> std::io::Result<()> {
    let mut pkt = [0u8; 28];
    pkt[0] = 0x45; // IPv4, 20-byte header
    pkt[2..4].copy_from_slice(&28u16.to_be_bytes());
    pkt[4..6].copy_from_slice(&0x4547u16.to_be_bytes());
    pkt[6..8].copy_from_slice(&1u16.to_be_bytes()); // fragment offset 1 (8 bytes), no flags
    pkt[8] = 64;
    pkt[9] = libc::IPPROTO_UDP as u8;
    pkt[12..16].copy_from_slice(&[127, 0, 0, 1]);
    pkt[16..20].copy_from_slice(&to.octets());
    pkt[20..28].copy_from_slice(b"fragment");
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid buffer and address of the sizes given.
    let n = unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// This thread's CPU time (user and system, softirq work done in its context included).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Closes with RST (SO_LINGER 0), so a connect loop leaves no TIME_WAIT sockets behind.
fn close_with_reset(s: TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option struct for its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// One DNS query; the answer and the address it came from.
fn dns_query(
    server: SocketAddr,
    name: &str,
    qtype: &str,
    over_tcp: bool,
) -> Result<(hickory_proto::op::Message, SocketAddr), String> {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RecordType},
    };
    let t: RecordType = qtype.parse().map_err(|e| format!("{e}"))?;
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).map_err(|e| e.to_string())?,
        t,
    ));
    let req = m.to_vec().map_err(|e| e.to_string())?;
    let (bytes, from) = if over_tcp {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut out = (req.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&req);
        s.write_all(&out).map_err(|e| e.to_string())?;
        let mut len = [0u8; 2];
        std::io::Read::read_exact(&mut s, &mut len).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        std::io::Read::read_exact(&mut s, &mut buf).map_err(|e| e.to_string())?;
        let peer = s.peer_addr().map_err(|e| e.to_string())?;
        (buf, peer)
    } else {
        let bind = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        s.send_to(&req, server).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        let (n, from) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
        buf.truncate(n);
        (buf, from)
    };
    let msg = Message::from_vec(&bytes).map_err(|e| e.to_string())?;
    Ok((msg, from))
}

fn addresses(m: &hickory_proto::op::Message) -> Vec<std::net::IpAddr> {
    use hickory_proto::rr::RData;
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(std::net::IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn wait_for_line() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["tcp", to] => report(tcp(addr(to))),
        ["udp", to] => report(udp(addr(to))),
        ["udp", to, n] => {
            let n: u32 = n.parse().expect("count");
            let bind = if addr(to).is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = UdpSocket::bind(bind).expect("bind");
            for _ in 0..n {
                if let Err(e) = sock.send_to(b"probe", addr(to)) {
                    return report(classify::<()>(Err(e)));
                }
            }
            report(Outcome::Ok)
        }
        ["raw"] => report(raw_socket(
            libc::AF_INET,
            libc::SOCK_RAW,
            libc::IPPROTO_ICMP,
        )),
        ["packet"] => report(raw_socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )),
        ["packet-uring"] => report(uring_socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )),
        ["socket", family, ty, proto] => {
            let arg = |s: &str| -> i64 {
                match s.strip_prefix("0x") {
                    Some(hex) => i64::from_str_radix(hex, 16).expect("hex number"),
                    None => s.parse().expect("number"),
                }
            };
            // SAFETY: plain syscall; 64-bit arguments on purpose (the kernel takes ints).
            let fd = unsafe { libc::syscall(libc::SYS_socket, arg(family), arg(ty), arg(proto)) };
            if fd < 0 {
                return report(classify::<()>(Err(std::io::Error::last_os_error())));
            }
            unsafe { libc::close(fd as i32) };
            report(Outcome::Ok)
        }
        ["tcp-presocket", to] => {
            let mut s = match TcpStream::connect_timeout(&addr(to), Duration::from_secs(2)) {
                Ok(s) => s,
                Err(e) => return report(classify::<()>(Err(e))),
            };
            println!("ready");
            let _ = std::io::stdout().flush();
            wait_for_line();
            report(classify(s.write_all(b"presocket").and_then(|_| s.flush())))
        }
        ["udp-presocket", to] => {
            let to = addr(to);
            let s = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect(to).map(|_| s));
            let s = match s {
                Ok(s) => s,
                Err(e) => return report(classify::<()>(Err(e))),
            };
            println!("ready");
            let _ = std::io::stdout().flush();
            wait_for_line();
            report(classify(s.send(b"presocket")))
        }
        ["fragment-presocket", to] => {
            let to: std::net::Ipv4Addr = to.parse().expect("an IPv4 address");
            // SAFETY: plain syscall; the fd is closed when the probe exits.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd < 0 {
                return report(classify::<()>(Err(std::io::Error::last_os_error())));
            }
            println!("ready");
            let _ = std::io::stdout().flush();
            wait_for_line();
            report(classify(send_fragment(fd, to)))
        }
        ["serve", on] => {
            let l = match TcpListener::bind(addr(on)) {
                Ok(l) => l,
                Err(e) => return report(classify::<()>(Err(e))),
            };
            println!("ready");
            let _ = std::io::stdout().flush();
            report(classify(
                l.accept().and_then(|(mut c, _)| c.write_all(b"hello")),
            ))
        }
        ["serve-forever", on] => {
            let l = match TcpListener::bind(addr(on)) {
                Ok(l) => l,
                Err(e) => return report(classify::<()>(Err(e))),
            };
            println!("ready");
            let _ = std::io::stdout().flush();
            for c in l.incoming().flatten() {
                let mut c = c;
                let _ = c.write_all(b"hello");
            }
            ExitCode::SUCCESS
        }
        ["tcp-name", host_port] => {
            use std::net::ToSocketAddrs as _;
            let to = match host_port.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(to)) => to,
                Ok(None) => return report(Outcome::Err("lookup: no address".into())),
                Err(e) => return report(Outcome::Err(format!("lookup: {e}"))),
            };
            print!("{to} ");
            report(tcp(to))
        }
        ["loop", "tcp", to, millis] => {
            let to = addr(to);
            let end = Instant::now() + Duration::from_millis(millis.parse().expect("millis"));
            let (mut ok, mut eperm, mut err) = (0u64, 0u64, 0u64);
            // The longest time without a successful connect (availability during a restart).
            let (mut last_ok, mut max_gap) = (Instant::now(), Duration::ZERO);
            while Instant::now() < end {
                match tcp(to) {
                    Outcome::Ok => {
                        ok += 1;
                        max_gap = max_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Outcome::Eperm => eperm += 1,
                    Outcome::Err(_) => err += 1,
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            println!(
                "ok={ok} eperm={eperm} err={err} max_ok_gap_us={}",
                max_gap.as_micros()
            );
            ExitCode::SUCCESS
        }
        // Connect attempts at a fixed rate (a paced storm): how many were made, in how long.
        ["storm-paced", "tcp", to, rate, seconds] => {
            let to = addr(to);
            let rate: f64 = rate.parse().expect("rate");
            let total = (rate * seconds.parse::<f64>().expect("seconds")) as u64;
            let start = Instant::now();
            let (mut ok, mut eperm, mut err) = (0u64, 0u64, 0u64);
            for i in 0..total {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                storm_connect(to, &mut ok, &mut eperm, &mut err);
            }
            println!(
                "ok={ok} eperm={eperm} err={err} seconds={:.3}",
                start.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        // Bulk TCP for MILLIS: bytes per second sent.
        ["bulk", to, millis] => {
            let mut s = match TcpStream::connect(addr(to)) {
                Ok(s) => s,
                Err(e) => return report(classify::<()>(Err(e))),
            };
            let buf = vec![0u8; 1 << 16];
            let budget = Duration::from_millis(millis.parse().expect("millis"));
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < budget {
                match s.write(&buf) {
                    Ok(n) => sent += n as u64,
                    Err(e) => return report(classify::<()>(Err(e))),
                }
            }
            println!(
                "bytes_per_second={:.0}",
                sent as f64 / start.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        // Unconnected UDP sends of 64 bytes for MILLIS: datagrams per second.
        ["udp-flood", to, millis, how @ ("sendto" | "connected")] => {
            let to = addr(to);
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
            // A connected socket is judged once, at connect(); sendto() is judged per datagram.
            let connected = *how == "connected";
            if connected && let Err(e) = sock.connect(to) {
                return report(classify::<()>(Err(e)));
            }
            let budget = Duration::from_millis(millis.parse().expect("millis"));
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < budget {
                for _ in 0..64 {
                    let sent = if connected {
                        sock.send(&[0u8; 64])
                    } else {
                        sock.send_to(&[0u8; 64], to)
                    };
                    if let Err(e) = sent {
                        return report(classify::<()>(Err(e)));
                    }
                    n += 1;
                }
            }
            println!(
                "datagrams_per_second={:.0}",
                n as f64 / start.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        ["storm", "tcp", to, n] => {
            let to = addr(to);
            let (mut ok, mut eperm, mut err) = (0u64, 0u64, 0u64);
            for _ in 0..n.parse::<u64>().expect("count") {
                storm_connect(to, &mut ok, &mut eperm, &mut err);
            }
            println!("ok={ok} eperm={eperm} err={err}");
            ExitCode::SUCCESS
        }
        ["bench-connect", to, millis] => {
            let to = addr(to);
            let budget = Duration::from_millis(millis.parse().expect("millis"));
            let start = Instant::now();
            let cpu_start = thread_cpu_ns();
            let mut n = 0u128;
            while start.elapsed() < budget {
                match TcpStream::connect(to) {
                    Ok(s) => close_with_reset(s),
                    Err(e) => return report(classify::<()>(Err(e))),
                }
                n += 1;
            }
            // CPU time too: unlike wall time, it does not depend on how fast the other CPU
            // wakes up (the listener's), only on the work done on this one.
            println!(
                "ns_per_connect={} cpu_ns_per_connect={} connects={n}",
                start.elapsed().as_nanos() / n.max(1),
                u128::from(thread_cpu_ns() - cpu_start) / n.max(1)
            );
            ExitCode::SUCCESS
        }
        ["bench-syscalls", millis] => {
            // What the agent costs a process it does not guard: a system call no hook is on
            // (getppid), and socket() + close(), which the socket guard sees.
            let budget = Duration::from_millis(millis.parse().expect("millis"));
            let per_call = |call: &mut dyn FnMut()| {
                let start = Instant::now();
                let mut n = 0u128;
                while start.elapsed() < budget {
                    for _ in 0..64 {
                        call();
                    }
                    n += 64;
                }
                start.elapsed().as_nanos() / n
            };
            // SAFETY: plain syscalls; the descriptor is closed right away.
            let getppid = per_call(&mut || unsafe {
                libc::getppid();
            });
            let socket = per_call(&mut || unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                if fd >= 0 {
                    libc::close(fd);
                }
            });
            println!("ns_per_getppid={getppid} ns_per_socket={socket}");
            ExitCode::SUCCESS
        }
        ["dns", server, name, qtype, rest @ ..] => {
            match dns_query(addr(server), name, qtype, rest == ["tcp"]) {
                Ok((m, from)) => {
                    let answers: Vec<String> =
                        addresses(&m).iter().map(|a| a.to_string()).collect();
                    println!(
                        "rcode={} answers={} from={from} tc={}",
                        m.metadata.response_code.to_str(),
                        answers.join(","),
                        u8::from(m.metadata.truncation)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("err {e}");
                    ExitCode::from(2)
                }
            }
        }
        ["dns-connect", server, name, port, n] => {
            let port: u16 = port.parse().expect("port");
            let (mut ok, mut eperm, mut err) = (0u64, 0u64, 0u64);
            for _ in 0..n.parse::<u32>().expect("count") {
                let first = dns_query(addr(server), name, "A", false)
                    .ok()
                    .and_then(|(m, _)| addresses(&m).first().copied());
                let Some(ip) = first else {
                    err += 1;
                    continue;
                };
                match TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(2))
                {
                    Ok(s) => {
                        close_with_reset(s);
                        ok += 1
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                    Err(_) => err += 1,
                }
            }
            println!("ok={ok} eperm={eperm} err={err}");
            ExitCode::SUCCESS
        }
        ["dns-bench", server, name, qps, count] => {
            let (server, qps, count): (SocketAddr, f64, u32) = (
                addr(server),
                qps.parse().expect("qps"),
                count.parse().expect("count"),
            );
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let (mut lat, mut timeouts) = (Vec::new(), 0u32);
            let start = Instant::now();
            let mut buf = [0u8; 4096];
            for i in 0..count {
                let due = start + Duration::from_secs_f64(f64::from(i) / qps);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let id = (i % 65_536) as u16;
                let mut q = vec![0u8; 12];
                q[..2].copy_from_slice(&id.to_be_bytes());
                q[2] = 0x01; // RD
                q[5] = 1; // one question
                for label in name.split('.') {
                    q.push(label.len() as u8);
                    q.extend_from_slice(label.as_bytes());
                }
                q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, A, IN
                let sent = Instant::now();
                s.send_to(&q, server).expect("send");
                loop {
                    match s.recv_from(&mut buf) {
                        Ok((n, _)) if n >= 2 && buf[..2] == id.to_be_bytes() => {
                            lat.push(sent.elapsed().as_micros());
                            break;
                        }
                        Ok(_) => continue,
                        Err(_) => {
                            timeouts += 1;
                            break;
                        }
                    }
                }
            }
            let us: Vec<String> = lat.iter().map(u128::to_string).collect();
            println!("n={} timeouts={timeouts} us={}", lat.len(), us.join(","));
            ExitCode::SUCCESS
        }
        ["dns-raw", server, bytes] => {
            let raw: Vec<u8> = (0..bytes.len() / 2)
                .map(|i| u8::from_str_radix(&bytes[2 * i..2 * i + 2], 16).expect("hex"))
                .collect();
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            if let Err(e) = s.send_to(&raw, addr(server)) {
                return report(classify::<()>(Err(e)));
            }
            let mut buf = [0u8; 4096];
            match s.recv_from(&mut buf) {
                Ok((n, _)) => println!("reply={}", hex(&buf[..n])),
                Err(_) => println!("no-reply"),
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: probe tcp|udp ADDR:PORT | raw | packet | udp-presocket ADDR:PORT | serve ADDR:PORT | loop tcp ADDR:PORT MILLIS"
            );
            ExitCode::from(3)
        }
    }
}
