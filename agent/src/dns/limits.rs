//! What one container can make the DNS side do, and what no answer may make allowed.
//!
//! - [`Owner`]: who asked, by the cgroup of the asking task (the kernel's `DNS_CLIENTS` note);
//! - [`NameBudget`]: distinct names under a wildcard a container may send upstream per
//!   minute (`[dns] wildcard_names_per_minute`), the volume limit on DNS exfiltration;
//! - [`host_addresses`]: this host's interface addresses (`"host"` in `[dns] never_learn`);
//! - [`is_private`]: RFC 1918 and IPv6 unique local addresses (`[dns] private_answers`);
//! - [`Counters`]: how often each limit acted, per policy (`egress-guard dns`).
//!
//! The per-container quota of learned pairs, and their eviction, live with the pairs in
//! `learned`.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};

/// The window of [`NameBudget`].
pub const BUDGET_WINDOW: Duration = Duration::from_secs(60);

/// Who a DNS query (and what it made the agent learn) is charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// The agent itself (pre-resolution of exact names): no quota, never evicted.
    Agent,
    /// The cgroup (v2 id) of the task that sent the query: a container, or a guarded cgroup.
    Cgroup(u64),
    /// The kernel did not note the task behind the query: its source address stands in.
    Client(IpAddr),
}

impl Owner {
    /// The owner of a query from `client`, sent by `task` when the kernel saw it.
    pub fn of(
        task: Option<&agent_common::event::EventHeader>,
        client: std::net::SocketAddr,
    ) -> Self {
        match task {
            Some(t) if t.cgroup_id != 0 => Owner::Cgroup(t.cgroup_id),
            _ => Owner::Client(client.ip()),
        }
    }

    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            Owner::Agent => "the agent".into(),
            Owner::Cgroup(id) => format!("cgroup id {id}"),
            Owner::Client(ip) => format!("client {ip} (task unknown)"),
        }
    }
}

/// How often each limit acted for one policy since the agent started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Queries refused because their container's name budget was spent (never sent upstream).
    pub name_budget_refused: u64,
    /// Answers refused because their container held its quota of learned pairs and none of
    /// them could be evicted.
    pub learned_quota_refused: u64,
    /// Learned pairs evicted (idle, no open connection) to make room.
    pub learned_evicted: u64,
    /// Answers that got SERVFAIL because the policy held `max_learned` pairs and none could
    /// be evicted.
    pub learned_full: u64,
    /// Answers refused because they held private addresses (`private_answers = "refuse"`).
    pub private_refused: u64,
    /// Answered addresses not learned: in `never_learn`, or this host's.
    pub not_learned: u64,
}

/// The outcome of [`NameBudget::charge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// Within the budget (or already charged in the window: asking again is free).
    Within,
    /// Spent; `first`: the first refusal since the owner was last within its budget.
    Spent { first: bool },
}

/// One owner's names in the window, oldest first.
#[derive(Default)]
struct Window {
    names: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
    refusing: bool,
}

impl Window {
    fn prune(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < BUDGET_WINDOW {
                break;
            }
            let (at, name) = self.order.pop_front().expect("front exists");
            if self.names.get(&name) == Some(&at) {
                self.names.remove(&name);
            }
        }
    }
}

/// Distinct names under a wildcard each owner sent upstream in the last 60 s (a sliding
/// window). A name is charged once per window, whatever its types (A and AAAA) and however
/// often it is asked, so caching resolvers and retries cost nothing; names an exact rule
/// allows are never charged (the policy lists them, they carry nothing). Memory: at most
/// `per_minute` names per owner that asked in the last minute.
pub struct NameBudget {
    per_minute: usize,
    owners: HashMap<Owner, Window>,
    last_sweep: Instant,
}

impl NameBudget {
    pub fn new(per_minute: usize) -> Self {
        Self {
            per_minute,
            owners: HashMap::new(),
            last_sweep: Instant::now(),
        }
    }

    pub fn per_minute(&self) -> usize {
        self.per_minute
    }

    /// Charges `name` to `owner` at `now`, if the budget allows.
    pub fn charge(&mut self, owner: Owner, name: &str, now: Instant) -> Charge {
        if now.saturating_duration_since(self.last_sweep) >= BUDGET_WINDOW {
            self.last_sweep = now;
            self.owners.retain(|_, w| {
                w.prune(now);
                !w.order.is_empty()
            });
        }
        let w = self.owners.entry(owner).or_default();
        w.prune(now);
        if w.names.contains_key(name) {
            return Charge::Within;
        }
        if w.names.len() >= self.per_minute {
            let first = !w.refusing;
            w.refusing = true;
            return Charge::Spent { first };
        }
        w.refusing = false;
        w.names.insert(name.to_string(), now);
        w.order.push_back((now, name.to_string()));
        Charge::Within
    }
}

/// Every address of this host's network interfaces, except those of loopback interfaces
/// (inside a container's network namespace, loopback is the container itself; `127.0.0.0/8`
/// and `::1` are in `never_learn`'s defaults). Read with getifaddrs(3): the bridge gateways
/// (Docker's `172.17.0.1`, which is also the proxy's address), the instance's VPC addresses,
/// and any other address an interface holds now.
pub fn host_addresses() -> std::io::Result<HashSet<IpAddr>> {
    let mut out = HashSet::new();
    for ifa in getifaddrs()? {
        if ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK) {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        if let Some(sa) = addr.as_sockaddr_in() {
            out.insert(IpAddr::from(sa.ip()));
        } else if let Some(sa) = addr.as_sockaddr_in6() {
            out.insert(IpAddr::from(sa.ip()));
        }
    }
    Ok(out)
}

/// RFC 1918 (10/8, 172.16/12, 192.168/16) and IPv6 unique local (`fc00::/7`) addresses.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private(),
        IpAddr::V6(a) => a.is_unique_local(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_charges_distinct_names_once_per_window() {
        let mut b = NameBudget::new(3);
        let t0 = Instant::now();
        let me = Owner::Cgroup(7);
        let other = Owner::Cgroup(8);
        for n in ["a.x", "b.x", "a.x", "c.x", "c.x"] {
            assert_eq!(b.charge(me, n, t0), Charge::Within, "{n}");
        }
        // A fourth name is refused; the first refusal says so, later ones do not.
        assert_eq!(b.charge(me, "d.x", t0), Charge::Spent { first: true });
        assert_eq!(b.charge(me, "e.x", t0), Charge::Spent { first: false });
        // Names already charged stay free; another owner has its own budget.
        assert_eq!(b.charge(me, "b.x", t0), Charge::Within);
        assert_eq!(b.charge(other, "d.x", t0), Charge::Within);
        // The window slides: a name charged 60 s ago no longer counts.
        let later = t0 + BUDGET_WINDOW;
        assert_eq!(b.charge(me, "d.x", later), Charge::Within);
        assert_eq!(b.charge(me, "e.x", later), Charge::Within);
        assert_eq!(b.charge(me, "f.x", later), Charge::Within);
        assert_eq!(b.charge(me, "g.x", later), Charge::Spent { first: true });
    }

    #[test]
    fn idle_owners_are_forgotten() {
        let mut b = NameBudget::new(2);
        let t0 = Instant::now();
        for id in 0..1000 {
            b.charge(Owner::Cgroup(id), "a.x", t0);
        }
        assert_eq!(b.owners.len(), 1000);
        b.charge(Owner::Cgroup(1), "b.x", t0 + BUDGET_WINDOW * 2);
        assert_eq!(b.owners.len(), 1);
    }

    #[test]
    fn private_ranges() {
        for p in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "fd12::1",
            "fc00::1",
        ] {
            assert!(is_private(p.parse().unwrap()), "{p}");
        }
        for p in [
            "172.32.0.1",
            "100.64.0.1",
            "8.8.8.8",
            "2001:db8::1",
            "fe80::1",
        ] {
            assert!(!is_private(p.parse().unwrap()), "{p}");
        }
    }

    #[test]
    fn host_addresses_skip_loopback() {
        let addrs = host_addresses().unwrap();
        assert!(!addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
    }

    #[test]
    fn owners_come_from_the_kernel_note_else_the_client() {
        let client: std::net::SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let t = agent_common::event::EventHeader {
            cgroup_id: 42,
            ..Default::default()
        };
        assert_eq!(Owner::of(Some(&t), client), Owner::Cgroup(42));
        assert_eq!(Owner::of(None, client), Owner::Client(client.ip()));
    }
}
