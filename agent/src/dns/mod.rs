//! Hostname allowlists: the DNS proxy, and the addresses it learns.
//!
//! - `names`: which names a policy allows (exact, `*.suffix`), with which port rules;
//! - `message`: what to do with one request, what an upstream answer says (pure; fuzzed);
//! - `upstream`: asking the policy's resolvers (UDP, TCP on truncation, timeouts, retries);
//! - `learned`: answered addresses in the kernel's allow maps, TTLs, expiry, the quota of
//!   pairs per container and eviction;
//! - `limits`: who asked (the container's cgroup), the name budget per container, this host's
//!   addresses and private ranges (never learned / refused), counters;
//! - `proxy`: the listeners (one port per policy) and the life of a query.
//!
//! In `proxy` mode the kernel redirects every DNS query of a guarded process here (see
//! `agent-ebpf`); in `direct` mode the agent only resolves the exact names itself
//! (pre-resolution, which both modes do, so clients that cache addresses keep working).

pub mod learned;
pub mod limits;
pub mod message;
pub mod names;
pub mod proxy;
pub mod records;
pub mod upstream;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};
use tokio::task::JoinHandle;

use crate::{config, kernel::maps::LearnMaps};
use learned::Learner;
use message::{Question, read_answer};
use names::PolicyNames;
use proxy::{PolicyDns, Proxy};
use upstream::{Upstream, random_id};

/// How often expiry and pre-resolution run.
const TICK: Duration = Duration::from_secs(1);
/// After a failed pre-resolution, try again this soon.
const PREFETCH_RETRY: Duration = Duration::from_secs(5);

/// One policy as the DNS side serves it.
pub struct PolicySetup {
    pub policy: String,
    pub slot: u32,
    /// The proxy port of the policy (`None` in direct mode).
    pub port: Option<u16>,
    pub audit: bool,
    pub names: PolicyNames,
    pub upstream: Upstream,
}

/// Exact names resolved by the agent itself, and when next.
#[derive(Default)]
struct Prefetch {
    /// (policy, name) → (upstream, due).
    due: HashMap<(String, String), (Upstream, Instant)>,
}

pub struct Service {
    cfg: config::Dns,
    pub learner: Arc<Mutex<Learner>>,
    proxy: Option<Proxy>,
    prefetch: Arc<Mutex<Prefetch>>,
    task: Option<JoinHandle<()>>,
    /// The redirects the kernel holds while the proxy's address is local (see `redirect`).
    redirects: Arc<Mutex<Redirects>>,
}

/// Which slots redirect DNS to which proxy port, and whether the proxy's address belongs to
/// this host. Traffic to the proxy address is allowed by the kernel, so the redirect is on
/// only while that address is this host's: otherwise the queries, and anything a process
/// sends to that port, could be routed off the host to whoever holds the address.
struct Redirects {
    map: Option<crate::kernel::maps::DnsProxyMap>,
    listen: std::net::Ipv4Addr,
    slots: Vec<(u32, u16)>,
    local: bool,
}

/// Whether `addr` is an address of this host (binding to it works without IP_FREEBIND).
fn is_local(addr: std::net::Ipv4Addr) -> bool {
    std::net::UdpSocket::bind((addr, 0)).is_ok()
}

impl Redirects {
    /// Re-checks the address; switches the redirects on or off when it appeared or went.
    fn refresh(&mut self) {
        let local = is_local(self.listen);
        if local == self.local {
            return;
        }
        self.local = local;
        let Some(map) = &mut self.map else {
            return;
        };
        for &(slot, port) in &self.slots {
            let to = local.then(|| std::net::SocketAddrV4::new(self.listen, port));
            if let Err(e) = map.set(slot, to) {
                tracing::error!("switching the DNS redirect of slot {slot}: {e:#}");
            }
        }
        if local {
            tracing::info!(
                "the DNS proxy address {} is now an address of this host: guarded processes' DNS goes to the proxy",
                self.listen
            );
        } else {
            tracing::warn!(
                "the DNS proxy address {} is not an address of this host: DNS of guarded processes is not redirected (their queries are refused) until it is",
                self.listen
            );
        }
    }
}

impl Service {
    pub fn new(
        cfg: &config::Dns,
        maps: LearnMaps,
        clients: Option<crate::kernel::maps::DnsClients>,
        redirect_map: Option<crate::kernel::maps::DnsProxyMap>,
        records: records::DnsRecords,
    ) -> Self {
        let learner = Arc::new(Mutex::new(Learner::new(maps, cfg)));
        let proxy = (cfg.mode == config::DnsMode::Proxy)
            .then(|| Proxy::new(cfg.listen, cfg.refuse, learner.clone(), records, clients));
        Self {
            cfg: cfg.clone(),
            learner,
            proxy,
            prefetch: Arc::new(Mutex::new(Prefetch::default())),
            task: None,
            redirects: Arc::new(Mutex::new(Redirects {
                map: redirect_map,
                listen: cfg.listen,
                slots: Vec::new(),
                local: is_local(cfg.listen),
            })),
        }
    }

    /// Where the policy in `slot` has its DNS redirected now: its proxy port, if the proxy
    /// runs and its address belongs to this host (else nothing is redirected, and the
    /// queries meet the policy like any other traffic: refused).
    pub fn redirect_of(&self, slot: u32) -> Option<std::net::SocketAddrV4> {
        let port = self.port_of(slot)?;
        let local = self.redirects.lock().map(|r| r.local).unwrap_or(false);
        local.then(|| std::net::SocketAddrV4::new(self.cfg.listen, port))
    }

    /// The proxy port of the policy in `slot`.
    pub fn port_of(&self, slot: u32) -> Option<u16> {
        self.proxy.as_ref()?;
        u16::try_from(u32::from(self.cfg.port) + slot).ok()
    }

    /// Serves exactly `setups`: proxy listeners (before the kernel redirects to them) and the
    /// names to pre-resolve. Call inside the runtime.
    pub fn serve(&mut self, setups: Vec<PolicySetup>) -> anyhow::Result<()> {
        if let Ok(mut r) = self.redirects.lock() {
            r.slots = setups
                .iter()
                .filter_map(|s| Some((s.slot, s.port?)))
                .collect();
        }
        let mut wanted = HashMap::new();
        if let Ok(mut p) = self.prefetch.lock() {
            let old = std::mem::take(&mut p.due);
            for s in &setups {
                for name in s.names.exact_names() {
                    let key = (s.policy.clone(), name.to_string());
                    let due = old.get(&key).map_or_else(Instant::now, |(_, d)| *d);
                    wanted.insert(key, (s.upstream.clone(), due));
                }
            }
            p.due = wanted;
        }
        if let Some(proxy) = &mut self.proxy {
            let by_port = setups
                .into_iter()
                .filter_map(|s| {
                    Some((
                        s.port?,
                        PolicyDns {
                            policy: s.policy,
                            audit: s.audit,
                            names: s.names,
                            upstream: s.upstream,
                        },
                    ))
                })
                .collect();
            proxy.serve(by_port)?;
        }
        Ok(())
    }

    /// Starts expiry and pre-resolution.
    pub fn start(&mut self) {
        let (learner, prefetch) = (self.learner.clone(), self.prefetch.clone());
        let redirects = self.redirects.clone();
        let (min_ttl, max_ttl) = (self.cfg.min_ttl, self.cfg.max_ttl);
        let watch_host = self.cfg.never_learn_host;
        self.task = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            loop {
                tick.tick().await;
                if let Ok(mut r) = redirects.lock() {
                    r.refresh();
                }
                // `"host"` in never_learn: the host's addresses as they are now (the same
                // once-a-second look as the proxy address's check above).
                if watch_host {
                    match limits::host_addresses() {
                        Ok(addrs) => {
                            if let Ok(mut l) = learner.lock() {
                                l.set_host_addresses(addrs);
                            }
                        }
                        Err(e) => tracing::warn!("listing this host's addresses: {e}"),
                    }
                }
                let now = Instant::now();
                match learner.lock().map(|mut l| l.expire(now)) {
                    Ok(Ok(n)) if n > 0 => tracing::debug!("{n} learned addresses expired"),
                    Ok(Err(e)) => tracing::error!("expiring learned addresses: {e:#}"),
                    _ => {}
                }
                let due: Vec<((String, String), Upstream)> = match prefetch.lock() {
                    Ok(mut p) => p
                        .due
                        .iter_mut()
                        .filter(|(_, (_, d))| *d <= now)
                        .map(|(k, (u, d))| {
                            // Not again until this round is done.
                            *d = now + max_ttl;
                            (k.clone(), u.clone())
                        })
                        .collect(),
                    Err(_) => Vec::new(),
                };
                for ((policy, name), upstream) in due {
                    let (learner, prefetch) = (learner.clone(), prefetch.clone());
                    tokio::spawn(async move {
                        let next = match resolve(&upstream, &name).await {
                            Ok(addrs) => {
                                let ttl = addrs.iter().map(|a| a.1).min();
                                if let Ok(mut l) = learner.lock()
                                    && let Err(e) =
                                        l.learn(&policy, &name, &addrs, limits::Owner::Agent)
                                {
                                    tracing::warn!(policy = %policy, name = %name, "pre-resolution: {e}");
                                }
                                let life = Duration::from_secs(u64::from(ttl.unwrap_or(0)))
                                    .clamp(min_ttl, max_ttl);
                                // Well before the addresses expire.
                                life.mul_f32(0.8)
                            }
                            Err(e) => {
                                tracing::warn!(policy = %policy, name = %name, "pre-resolution failed: {e}");
                                PREFETCH_RETRY
                            }
                        };
                        if let Ok(mut p) = prefetch.lock()
                            && let Some((_, d)) = p.due.get_mut(&(policy, name))
                        {
                            *d = Instant::now() + next;
                        }
                    });
                }
            }
        }));
    }

    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(p) = &mut self.proxy {
            p.stop();
        }
    }
}

/// The A and AAAA addresses of `name`, with TTLs.
async fn resolve(upstream: &Upstream, name: &str) -> Result<Vec<(std::net::IpAddr, u32)>, String> {
    let mut out = Vec::new();
    for qtype in [RecordType::A, RecordType::AAAA] {
        let id = random_id();
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        let qname = Name::from_ascii(format!("{name}.")).map_err(|e| e.to_string())?;
        m.add_query(Query::query(qname, qtype));
        let bytes = m.to_vec().map_err(|e| e.to_string())?;
        let reply = upstream.ask(&bytes, false).await?;
        let q = Question {
            id,
            name: name.to_string(),
            qtype,
        };
        let (answer, _) = read_answer(&reply.bytes, &q, u32::MAX)
            .map_err(|e| format!("{}: {e}", reply.server))?;
        out.extend(answer.addrs);
    }
    Ok(out)
}
