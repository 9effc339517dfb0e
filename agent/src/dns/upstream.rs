//! Asking the policy's resolvers: UDP first, TCP when the answer is truncated (or the client
//! asked over TCP), a fresh socket and a random id per query, a timeout per attempt and a
//! bounded number of attempts across the servers. Never hangs: the caller gets an answer or an
//! error in at most `attempts × timeout` (twice that with a TCP fallback).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

use super::message::MAX_UDP_MESSAGE;

#[derive(Debug, Clone)]
pub struct Upstream {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub attempts: u32,
}

/// An upstream answer: the bytes (with the upstream id) and who gave it.
pub struct Reply {
    pub bytes: Vec<u8>,
    pub server: SocketAddr,
    pub tcp: bool,
}

/// A random 16-bit query id (the kernel's CSPRNG), so off-path answers are hard to forge.
pub fn random_id() -> u16 {
    crate::random::random_u16()
}

impl Upstream {
    /// Sends `request` (whose id the caller has set) and returns the first answer with that
    /// id. `tcp`: the client used TCP, so ask over TCP too.
    pub async fn ask(&self, request: &[u8], tcp: bool) -> Result<Reply, String> {
        if self.servers.is_empty() {
            return Err("no dns server configured for this policy".into());
        }
        let id = [request[0], request[1]];
        let mut last = String::new();
        for attempt in 0..self.attempts as usize {
            let server = self.servers[attempt % self.servers.len()];
            let res = if tcp {
                self.tcp(server, request, id).await.map(|b| (b, true))
            } else {
                match self.udp(server, request, id).await {
                    // Truncated: the whole answer only comes over TCP.
                    Ok(b) if b[2] & 0x02 != 0 => {
                        self.tcp(server, request, id).await.map(|b| (b, true))
                    }
                    other => other.map(|b| (b, false)),
                }
            };
            match res {
                Ok((bytes, tcp)) => return Ok(Reply { bytes, server, tcp }),
                Err(e) => last = format!("{server}: {e}"),
            }
        }
        Err(last)
    }

    async fn udp(
        &self,
        server: SocketAddr,
        request: &[u8],
        id: [u8; 2],
    ) -> Result<Vec<u8>, String> {
        let local: SocketAddr = if server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
        sock.connect(server).await.map_err(|e| e.to_string())?;
        sock.send(request).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; MAX_UDP_MESSAGE];
        let wait = async {
            loop {
                let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
                // Anything else (a late answer to nothing, a forgery with the wrong id) is
                // ignored, and the wait goes on.
                if n >= 12 && buf[..2] == id && buf[2] & 0x80 != 0 {
                    buf.truncate(n);
                    return Ok::<_, String>(std::mem::take(&mut buf));
                }
            }
        };
        timeout(self.timeout, wait)
            .await
            .map_err(|_| format!("no answer over UDP within {:?}", self.timeout))?
    }

    async fn tcp(
        &self,
        server: SocketAddr,
        request: &[u8],
        id: [u8; 2],
    ) -> Result<Vec<u8>, String> {
        let exchange = async {
            let mut s = TcpStream::connect(server)
                .await
                .map_err(|e| e.to_string())?;
            let len = u16::try_from(request.len()).map_err(|_| "request too long")?;
            let mut out = Vec::with_capacity(request.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(request);
            s.write_all(&out).await.map_err(|e| e.to_string())?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            if buf.len() < 12 || buf[..2] != id || buf[2] & 0x80 == 0 {
                return Err("answer over TCP with another id".to_string());
            }
            Ok(buf)
        };
        timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer over TCP within {:?}", self.timeout))?
    }
}
