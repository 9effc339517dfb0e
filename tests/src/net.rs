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
pub fn free_port_range(n: u16) -> u16 {
    for _ in 0..200 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            ^ std::process::id()
            ^ COUNTER.fetch_add(1, Ordering::SeqCst).wrapping_mul(7919);
        let base = 20_000 + (seed % 30_000) as u16;
        let free = (base..base + n).all(|p| {
            TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free range of {n} loopback ports");
}
