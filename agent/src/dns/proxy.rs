//! The DNS proxy: one UDP and one TCP listener per policy (the port says which policy asks),
//! request → [`plan`] → answer locally, or ask upstream, learn, then answer.

use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::op::Message;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    task::JoinHandle,
    time::timeout,
};

use super::{
    learned::{LearnError, Learner},
    limits::{Charge, Owner},
    message::{
        Local, MAX_UDP_MESSAGE, Plan, Question, plan, rcode_name, read_answer, refusal,
        restore_question, servfail, upstream_query,
    },
    names::PolicyNames,
    upstream::{Upstream, random_id},
};
use crate::config;

/// Per policy: queries answered or forwarded at the same time; beyond, UDP queries are
/// dropped (the client retries) and TCP connections wait. Per policy, so one policy's
/// containers cannot starve another's DNS.
const MAX_IN_FLIGHT: usize = 1024;
const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// One policy as the proxy serves it.
pub struct PolicyDns {
    pub policy: String,
    pub audit: bool,
    pub names: PolicyNames,
    pub upstream: Upstream,
}

/// A policy's listener state: its settings (replaced on reload) and its own limits.
struct Port {
    policy: Mutex<Arc<PolicyDns>>,
    in_flight: Arc<Semaphore>,
    tcp_slots: Arc<Semaphore>,
}

struct Shared {
    refuse: config::Refusal,
    /// Who is behind a query (the kernel notes it as the query leaves the process).
    clients: Option<crate::kernel::maps::DnsClients>,
    learner: Arc<Mutex<Learner>>,
    records: super::records::DnsRecords,
}

/// The running proxy.
pub struct Proxy {
    listen: std::net::Ipv4Addr,
    shared: Arc<Shared>,
    listeners: HashMap<u16, (Arc<Port>, [JoinHandle<()>; 2])>,
}

/// Why a port can be taken although nothing listens on it: it lies in the range the kernel
/// hands out to outgoing connections, which (with their TIME_WAIT remains) can hold it.
fn ephemeral_hint(port: u16) -> String {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let bounds: Vec<u16> = range
        .iter()
        .flat_map(|r| r.split_whitespace())
        .filter_map(|n| n.parse().ok())
        .collect();
    match bounds[..] {
        [lo, hi] if (lo..=hi).contains(&port) => format!(
            "; port {port} lies in the kernel's ephemeral port range {lo}-{hi} (net.ipv4.ip_local_port_range), where outgoing connections can hold it: choose a port below {lo}"
        ),
        _ => String::new(),
    }
}

impl Proxy {
    pub fn new(
        listen: std::net::Ipv4Addr,
        refuse: config::Refusal,
        learner: Arc<Mutex<Learner>>,
        records: super::records::DnsRecords,
        clients: Option<crate::kernel::maps::DnsClients>,
    ) -> Self {
        Self {
            listen,
            shared: Arc::new(Shared {
                refuse,
                clients,
                learner,
                records,
            }),
            listeners: HashMap::new(),
        }
    }

    /// Serves exactly `policies` (port → policy): listens on new ports first, so a redirect
    /// never points at a closed port, then stops listening on ports no longer used. Must be
    /// called inside the tokio runtime.
    pub fn serve(&mut self, policies: HashMap<u16, PolicyDns>) -> anyhow::Result<()> {
        for (port, policy) in policies.iter().map(|(p, d)| (*p, d)) {
            if self.listeners.contains_key(&port) {
                continue;
            }
            let addr = SocketAddrV4::new(self.listen, port);
            let (udp, tcp) = bind(addr).map_err(|e| {
                anyhow::anyhow!(
                    "the DNS proxy cannot listen on {addr} (UDP and TCP): {e}; set [dns] port to a free range (policy N uses port + N) and [dns] listen to an address the guarded containers reach (Docker's bridge gateway, 172.17.0.1 by default){}",
                    ephemeral_hint(port)
                )
            })?;
            let state = Arc::new(Port {
                policy: Mutex::new(Arc::new(PolicyDns {
                    policy: policy.policy.clone(),
                    audit: policy.audit,
                    names: policy.names.clone(),
                    upstream: policy.upstream.clone(),
                })),
                in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
                tcp_slots: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            });
            let u = tokio::spawn(serve_udp(udp, port, state.clone(), self.shared.clone()));
            let t = tokio::spawn(serve_tcp(tcp, port, state.clone(), self.shared.clone()));
            self.listeners.insert(port, (state, [u, t]));
        }
        self.listeners.retain(|port, (_, tasks)| {
            let keep = policies.contains_key(port);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
            }
            keep
        });
        for (port, policy) in policies {
            if let Some((state, _)) = self.listeners.get(&port)
                && let Ok(mut p) = state.policy.lock()
            {
                *p = Arc::new(policy);
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        for (_, (_, tasks)) in self.listeners.drain() {
            tasks.iter().for_each(JoinHandle::abort);
        }
    }
}

/// Binds UDP and TCP on `addr` with IP_FREEBIND: the agent starts before Docker (so no
/// container runs unguarded), when Docker's bridge address does not exist yet. Until it does,
/// the kernel does not redirect to it (see `dns::Redirects`) and queries are refused.
fn bind(addr: SocketAddrV4) -> std::io::Result<(UdpSocket, TcpListener)> {
    use nix::sys::socket::{
        self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, setsockopt, sockopt,
    };
    use std::os::fd::{AsRawFd as _, OwnedFd};
    if std::net::UdpSocket::bind((*addr.ip(), 0)).is_err() {
        tracing::warn!(
            "the DNS proxy address {} is not (yet) an address of this host: DNS of guarded processes is not redirected (their queries are refused) until it is (Docker creates its bridge when it starts)",
            addr.ip()
        );
    }
    let open = |ty: SockType| -> std::io::Result<OwnedFd> {
        let fd = socket::socket(
            AddressFamily::Inet,
            ty,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
        // SO_REUSEADDR for TCP only (a restart rebinds at once); on UDP it would let
        // another socket share the port and take the queries.
        if ty == SockType::Stream {
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        }
        socket::bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
        if ty == SockType::Stream {
            socket::listen(&fd, Backlog::new(1024)?)?;
        }
        Ok(fd)
    };
    let udp = std::net::UdpSocket::from(open(SockType::Datagram)?);
    let tcp = std::net::TcpListener::from(open(SockType::Stream)?);
    Ok((UdpSocket::from_std(udp)?, TcpListener::from_std(tcp)?))
}

fn policy_of(state: &Port) -> Option<Arc<PolicyDns>> {
    state.policy.lock().ok().map(|p| p.clone())
}

async fn serve_udp(sock: UdpSocket, port: u16, state: Arc<Port>, shared: Arc<Shared>) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; MAX_UDP_MESSAGE];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("DNS proxy port {port}: receiving: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(policy) = policy_of(&state) else {
            continue;
        };
        let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(
                "DNS proxy port {port}: {MAX_IN_FLIGHT} queries in flight; dropping one from {client}"
            );
            continue;
        };
        let request = buf[..n].to_vec();
        let (sock, shared) = (sock.clone(), shared.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&shared, &policy, request, client, false).await {
                let _ = sock.send_to(&reply, client).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(listener: TcpListener, port: u16, state: Arc<Port>, shared: Arc<Shared>) {
    loop {
        let Ok(permit) = state.tcp_slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, client) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("DNS proxy port {port}: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (state, shared) = (state.clone(), shared.clone());
        tokio::spawn(async move {
            tcp_client(stream, client, &state, &shared).await;
            drop(permit);
        });
    }
}

/// Length-prefixed requests, answered in order, until the client closes, idles, or stops
/// reading.
async fn tcp_client(mut stream: TcpStream, client: SocketAddr, state: &Port, shared: &Shared) {
    loop {
        let mut len = [0u8; 2];
        match timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut request = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match timeout(TCP_IDLE, stream.read_exact(&mut request)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(policy) = policy_of(state) else {
            return;
        };
        let Some(reply) = answer(shared, &policy, request, client, true).await else {
            return;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&reply);
        if !matches!(timeout(TCP_IDLE, stream.write_all(&out)).await, Ok(Ok(()))) {
            return;
        }
    }
}

/// The whole life of one query; `None`: no answer (not a request).
async fn answer(
    shared: &Shared,
    policy: &PolicyDns,
    request: Vec<u8>,
    client: SocketAddr,
    tcp: bool,
) -> Option<Vec<u8>> {
    // Who asked: the kernel noted the task as the query left it. Limits are per owner (its
    // cgroup: a container).
    let task = shared
        .clients
        .as_ref()
        .and_then(|c| c.task_of(client, if tcp { 6 } else { 17 }));
    let owner = Owner::of(task.as_ref(), client);
    let mut rec = Rec {
        policy: &policy.policy,
        client,
        task,
        tcp,
        question: None,
        verdict: "allow",
        reason: None,
        rcode: String::new(),
        answers: Vec::new(),
        cnames: Vec::new(),
        not_learned: Vec::new(),
        evicted: None,
        upstream: None,
    };
    let (question, would_refuse) = match plan(&request, &policy.names, policy.audit, shared.refuse)
    {
        Plan::Drop => return None,
        Plan::Reply {
            bytes,
            question,
            why,
        } => {
            rec.question = question;
            rec.verdict = if matches!(why, Local::Refused(_)) {
                "refuse"
            } else {
                "local"
            };
            rec.reason = Some(why.reason());
            rec.rcode = rcode_of(&bytes);
            shared.write(&rec);
            return Some(bytes);
        }
        Plan::Forward {
            question,
            would_refuse,
            ..
        } => (question, would_refuse.map(Local::reason)),
    };
    let mut would_refuse = would_refuse;
    rec.question = Some(question.clone());
    // A name only a wildcard allows costs the asker one of its distinct names per minute
    // before it leaves the host (the volume limit on data carried in names).
    if would_refuse.is_none() && !policy.names.is_exact(&question.name) {
        let charge = shared
            .learner
            .lock()
            .map(|mut l| l.charge_name(&policy.policy, owner, &question.name, Instant::now()))
            .unwrap_or(Charge::Within);
        if matches!(charge, Charge::Spent { .. }) {
            if !policy.audit {
                return Some(shared.refuse(&mut rec, &request, "name_budget"));
            }
            would_refuse = Some("name_budget");
        }
    }
    if let Some(why) = would_refuse {
        rec.verdict = "would_refuse";
        rec.reason = Some(why);
    }
    // The proxy's own query, with a fresh id; the client's id and question go back on the
    // answer.
    let up_id = random_id();
    let fail = |rec: &mut Rec, why: String| {
        tracing::warn!(policy = %policy.policy, name = %question.name, "DNS: answering SERVFAIL: {why}");
        rec.verdict = "error";
        rec.reason = Some("upstream_failed");
        rec.rcode = "SERVFAIL".into();
        shared.write(rec);
        Some(servfail(&question))
    };
    let up_request = match upstream_query(&question, up_id) {
        Ok(q) => q,
        Err(e) => return fail(&mut rec, e.to_string()),
    };
    let reply = match policy.upstream.ask(&up_request, tcp).await {
        Ok(r) => r,
        Err(e) => return fail(&mut rec, e),
    };
    rec.upstream = Some(reply.server);
    let max_ttl = shared
        .learner
        .lock()
        .map(|l| l.max_ttl())
        .unwrap_or(Duration::from_secs(3600));
    let up_q = Question {
        id: up_id,
        ..question.clone()
    };
    let (answer, rewritten) = match read_answer(
        &reply.bytes,
        &up_q,
        max_ttl.as_secs().min(u64::from(u32::MAX)) as u32,
    ) {
        Ok(a) => a,
        Err(e) => return fail(&mut rec, format!("{}: {e}", reply.server)),
    };
    rec.answers = answer.addrs.iter().map(|(ip, _)| ip.to_string()).collect();
    rec.cnames = answer.cnames.clone();
    // Learn before answering: when the client has the address, the kernel allows it.
    if would_refuse.is_none() && !answer.addrs.is_empty() {
        let learned = match shared.learner.lock() {
            Ok(mut l) => l.learn(&policy.policy, &question.name, &answer.addrs, owner),
            Err(_) => Err(LearnError::Kernel(anyhow::anyhow!(
                "learner state poisoned"
            ))),
        };
        match learned {
            Ok(l) => {
                if !l.withheld.is_empty() {
                    rec.reason = Some("never_learn");
                    rec.not_learned = l.withheld.iter().map(ToString::to_string).collect();
                }
                if l.evicted > 0 {
                    rec.evicted = Some(l.evicted);
                }
            }
            Err(e @ (LearnError::Quota { .. } | LearnError::Private(_))) => {
                let reason = match &e {
                    LearnError::Quota { first, .. } => {
                        if *first {
                            tracing::warn!(policy = %policy.policy, name = %question.name, "DNS: {e}: its answers are refused until some of its pairs expire or become idle");
                        }
                        "learned_quota"
                    }
                    _ => {
                        tracing::warn!(policy = %policy.policy, name = %question.name, "DNS: {e}");
                        "private_answer"
                    }
                };
                rec.not_learned = rec.answers.clone();
                if !policy.audit {
                    return Some(shared.refuse(&mut rec, &request, reason));
                }
                rec.verdict = "would_refuse";
                rec.reason = Some(reason);
            }
            Err(e) => {
                tracing::error!(policy = %policy.policy, name = %question.name, "DNS: cannot allow the answered addresses: {e}");
                rec.verdict = "error";
                rec.reason = Some(if matches!(e, LearnError::Full { .. }) {
                    "learned_full"
                } else {
                    "learn_failed"
                });
                rec.rcode = "SERVFAIL".into();
                shared.write(&rec);
                return Some(servfail(&question));
            }
        }
    }
    let mut bytes = rewritten.unwrap_or(reply.bytes);
    bytes[..2].copy_from_slice(&question.id.to_be_bytes());
    restore_question(&mut bytes, &request);
    if !tcp && bytes.len() > client_udp_limit(&request) {
        // The full answer (over TCP from the upstream, or a large UDP one) does not fit the
        // client's UDP size: tell it to ask again over TCP (the addresses are already
        // allowed).
        bytes = truncated(&bytes).unwrap_or(bytes);
    }
    rec.rcode = answer.rcode.clone();
    shared.write(&rec);
    Some(bytes)
}

fn rcode_of(bytes: &[u8]) -> String {
    bytes.get(3).map_or_else(|| "?".into(), |b| rcode_name(*b))
}

/// The largest UDP answer the client accepts: its EDNS size, else 512.
fn client_udp_limit(request: &[u8]) -> usize {
    Message::from_vec(request)
        .ok()
        .and_then(|m| m.edns.map(|e| usize::from(e.max_payload())))
        .unwrap_or(512)
        .max(512)
}

fn truncated(bytes: &[u8]) -> Option<Vec<u8>> {
    let m = Message::from_vec(bytes).ok()?;
    m.truncate().to_vec().ok()
}

/// What a `dns` audit record says.
struct Rec<'a> {
    policy: &'a str,
    client: SocketAddr,
    /// The task behind the query, when the kernel saw it leave.
    task: Option<agent_common::event::EventHeader>,
    tcp: bool,
    question: Option<Question>,
    verdict: &'static str,
    reason: Option<&'static str>,
    rcode: String,
    answers: Vec<String>,
    cnames: Vec<String>,
    /// Answered addresses not allowed in the kernel (never_learn, this host's, or all of a
    /// refused answer).
    not_learned: Vec<String>,
    /// Learned pairs evicted to make room for this answer.
    evicted: Option<usize>,
    upstream: Option<SocketAddr>,
}

impl Shared {
    /// Refuses a request a limit stopped (`[dns] refuse`), and records it.
    fn refuse(&self, rec: &mut Rec, request: &[u8], reason: &'static str) -> Vec<u8> {
        let bytes = refusal(request, self.refuse);
        rec.verdict = "refuse";
        rec.reason = Some(reason);
        rec.rcode = rcode_of(&bytes);
        self.write(rec);
        bytes
    }

    fn write(&self, r: &Rec) {
        let (query, qtype) = match &r.question {
            Some(q) => (
                Value::from(q.name.clone()),
                Value::from(q.qtype.to_string()),
            ),
            None => (Value::Null, Value::Null),
        };
        let mut fields = json!({
            "policy": r.policy,
            "client": r.client.to_string(),
            "transport": if r.tcp { "tcp" } else { "udp" },
            "query": query,
            "qtype": qtype,
            "verdict": r.verdict,
            "reason": r.reason,
            "rcode": r.rcode,
            "answers": r.answers,
            "cnames": r.cnames,
            "not_learned": r.not_learned,
            "upstream": r.upstream.map(|u| u.to_string()),
        });
        if let Some(n) = r.evicted {
            fields["evicted"] = n.into();
        }
        self.records.send((fields, r.task));
    }
}
