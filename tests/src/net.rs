//! Loopback endpoints for the probes to reach, and free loopback ports.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::atomic::Ordering,
    time::Duration,
};

use crate::cgroups::COUNTER;

/// A TCP listener on loopback that accepts and drops connections in the background.
pub fn tcp_listener(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    addr
}

/// A UDP receiver on loopback.
pub fn udp_receiver(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind(format!("{ip}:0")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

/// Whether a datagram arrives on `s` within its read timeout.
pub fn received(s: &UdpSocket) -> bool {
    let mut buf = [0u8; 64];
    s.recv_from(&mut buf).is_ok()
}

/// The first of `n` consecutive loopback ports that are free for UDP and TCP right now.
///
/// The range lies below the kernel's ephemeral ports (`ip_local_port_range`): a port from
/// inside it can be free when chosen and then taken by one of the thousands of client
/// sockets (and their TIME_WAIT remains) that the probes open before an agent restarts on it.
pub fn free_port_range(n: u16) -> u16 {
    const LOWEST: u16 = 10_000;
    let ephemeral = first_ephemeral_port();
    assert!(
        ephemeral > LOWEST + n + 1_000,
        "ip_local_port_range starts at {ephemeral}: too low to keep test ports out of it"
    );
    let span = ephemeral - LOWEST - n;
    for _ in 0..200 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            ^ std::process::id()
            ^ COUNTER.fetch_add(1, Ordering::SeqCst).wrapping_mul(7919);
        let base = LOWEST + (seed % u32::from(span)) as u16;
        let free = (base..base + n).all(|p| {
            TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free range of {n} loopback ports");
}

/// The lowest port the kernel hands out to sockets that do not bind one (32768 by default).
fn first_ephemeral_port() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
