//! Learning an answer ([`Learner::learn`]): the owner's quota and the policy's limit, and
//! the eviction of idle pairs that makes room.

use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{Learner, pairs::Pair};
use crate::dns::limits::{Owner, is_private};

/// A learned pair is never evicted within this time of being answered to its owner: the
/// client that just got the address connects to it (the promise of learning before
/// answering), and only then does an open connection protect it.
pub const EVICTION_GRACE: Duration = Duration::from_secs(10);

/// What [`Learner::learn`] did besides allowing the answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Learned {
    /// Answered addresses not allowed: in `[dns] never_learn`, or this host's.
    pub withheld: Vec<IpAddr>,
    /// Learned pairs evicted to make room (idle: no open connection, older than the grace).
    pub evicted: usize,
}

/// Why an answer could not be learned.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("policy {0:?} is not loaded")]
    UnknownPolicy(String),
    #[error(
        "policy {policy:?} already holds {max} learned (name, address) pairs ([dns] max_learned) and none can be evicted (each is shared, recent or has an open connection)"
    )]
    Full { policy: String, max: usize },
    #[error(
        "{owner} already holds {max} learned pairs in policy {policy:?} ([dns] max_learned_per_container) and none can be evicted (recent, or with an open connection)"
    )]
    Quota {
        policy: String,
        owner: String,
        max: usize,
        /// The first refusal since the owner last learned something (log it once).
        first: bool,
    },
    #[error("the answer holds private addresses ([dns] private_answers = \"refuse\"): {0:?}")]
    Private(Vec<IpAddr>),
    #[error("{0:#}")]
    Kernel(anyhow::Error),
}

/// `::ffff:a.b.c.d` is `a.b.c.d` (the kernel judges it so).
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether (ip, name), last answered to its owner at `stamp`, may be evicted now: not part
/// of the answer being learned, no open connection to the address, out of the grace period.
fn evictable(
    slot: u32,
    open: &HashSet<(u32, IpAddr)>,
    answer: (&str, &[(IpAddr, u32)]),
    (ip, name, stamp): (IpAddr, &str, Instant),
    now: Instant,
) -> bool {
    let in_answer = name == answer.0 && answer.1.iter().any(|(a, _)| *a == ip);
    !in_answer
        && !open.contains(&(slot, ip))
        && now.saturating_duration_since(stamp) >= EVICTION_GRACE
}

impl Learner {
    /// Records that `name` resolved to `addrs` (address, TTL) for `policy`, in an answer to
    /// `owner`, and makes sure the kernel allows them. Returns when the kernel has them.
    ///
    /// Limits (a design against one container taking a policy's name resolution down):
    /// - an owner holds at most `max_learned_per_container` pairs: beyond, its own idle pairs
    ///   go first, least recently answered first; if none can, its answer is refused
    ///   ([`LearnError::Quota`]) and nothing else changes;
    /// - a policy holds at most `max_learned` pairs: beyond, idle pairs that only one
    ///   container holds go, those of the container holding the most first (least recently
    ///   answered first); a pair several containers hold stays. If none can, the answer gets
    ///   SERVFAIL ([`LearnError::Full`]).
    ///
    /// Idle: no open TCP connection to the address in this policy (OPEN_CONNS) and answered
    /// to its owner more than [`EVICTION_GRACE`] ago. So one container can only evict its own
    /// pairs, or those of whoever holds more than anyone else; the pre-resolved pairs of exact
    /// names (the agent's) are never evicted.
    pub fn learn(
        &mut self,
        policy: &str,
        name: &str,
        addrs: &[(IpAddr, u32)],
        owner: Owner,
    ) -> Result<Learned, LearnError> {
        self.learn_at(policy, name, addrs, owner, Instant::now())
    }

    /// [`Learner::learn`] at `now`.
    pub(super) fn learn_at(
        &mut self,
        policy: &str,
        name: &str,
        addrs: &[(IpAddr, u32)],
        owner: Owner,
        now: Instant,
    ) -> Result<Learned, LearnError> {
        let mut keep: Vec<(IpAddr, u32)> = Vec::new();
        let mut withheld: Vec<IpAddr> = Vec::new();
        let mut private: Vec<IpAddr> = Vec::new();
        for &(ip, ttl) in addrs {
            let ip = unmap(ip);
            if self.never(ip) {
                if !withheld.contains(&ip) {
                    withheld.push(ip);
                }
            } else if self.refuse_private && is_private(ip) {
                if !private.contains(&ip) {
                    private.push(ip);
                }
            } else {
                match keep.iter_mut().find(|(k, _)| *k == ip) {
                    Some(k) => k.1 = k.1.max(ttl),
                    None => keep.push((ip, ttl)),
                }
            }
        }
        let p = self
            .policies
            .get_mut(policy)
            .ok_or_else(|| LearnError::UnknownPolicy(policy.into()))?;
        if p.names.rules_for(name).is_err() {
            return Ok(Learned::default());
        }
        let counters = self.counters.entry(policy.to_string()).or_default();
        if !withheld.is_empty() {
            counters.not_learned += withheld.len() as u64;
            tracing::warn!(
                policy,
                name,
                "not allowing {withheld:?}: in [dns] never_learn or an address of this host (DNS rebinding guard: the metadata service, the host itself, …)"
            );
        }
        if !private.is_empty() {
            counters.private_refused += 1;
            return Err(LearnError::Private(private));
        }
        let mut evicted = 0;
        let mut open: Option<HashSet<(u32, IpAddr)>> = None;
        let mut touched: Vec<IpAddr> = Vec::new();

        // The owner's quota.
        if owner != Owner::Agent {
            let held = p.held.get(&owner).copied().unwrap_or(0);
            let new = keep
                .iter()
                .filter(|(ip, _)| !p.holds(*ip, name, owner))
                .count();
            if held + new > self.quota {
                let need = held + new - self.quota;
                let o = open.insert(self.maps.open_connections().map_err(LearnError::Kernel)?);
                let mut cands: Vec<(Instant, IpAddr, String)> = p
                    .ips
                    .iter()
                    .flat_map(|(ip, names)| {
                        names.iter().filter_map(move |(n, pair)| {
                            Some((pair.stamp_of(owner)?, *ip, n.clone()))
                        })
                    })
                    .filter(|(at, ip, n)| evictable(p.slot, o, (name, &keep), (*ip, n, *at), now))
                    .collect();
                if cands.len() < need {
                    counters.learned_quota_refused += 1;
                    return Err(LearnError::Quota {
                        policy: policy.into(),
                        owner: owner.describe(),
                        max: self.quota,
                        first: self.quota_refusing.insert((policy.to_string(), owner)),
                    });
                }
                cands.sort();
                for (_, ip, n) in cands.into_iter().take(need) {
                    if p.disown(ip, &n, owner) {
                        evicted += 1;
                        touched.push(ip);
                    }
                }
            }
        }

        // The policy's limit.
        let new_pairs = keep.iter().filter(|(ip, _)| !p.has(*ip, name)).count();
        if p.pairs + new_pairs > self.max_pairs {
            let need = p.pairs + new_pairs - self.max_pairs;
            let o = match open {
                Some(ref o) => o,
                None => open.insert(self.maps.open_connections().map_err(LearnError::Kernel)?),
            };
            let held = &p.held;
            let mut cands: Vec<(std::cmp::Reverse<usize>, Instant, IpAddr, String, Owner)> = p
                .ips
                .iter()
                .flat_map(|(ip, names)| {
                    names
                        .iter()
                        .filter_map(move |(n, pair)| match pair.owners[..] {
                            [(o, at)] if o != Owner::Agent => Some((
                                std::cmp::Reverse(held.get(&o).copied().unwrap_or(0)),
                                at,
                                *ip,
                                n.clone(),
                                o,
                            )),
                            _ => None,
                        })
                })
                .filter(|(_, at, ip, n, _)| evictable(p.slot, o, (name, &keep), (*ip, n, *at), now))
                .collect();
            if cands.len() < need {
                counters.learned_full += 1;
                counters.learned_evicted += evicted as u64;
                // What was evicted for the quota is gone: bring the kernel in line.
                for ip in touched {
                    p.sync(self.maps.as_mut(), ip).map_err(LearnError::Kernel)?;
                }
                return Err(LearnError::Full {
                    policy: policy.into(),
                    max: self.max_pairs,
                });
            }
            cands.sort();
            for (_, _, ip, n, o) in cands.into_iter().take(need) {
                if p.disown(ip, &n, o) {
                    evicted += 1;
                    touched.push(ip);
                }
            }
        }
        counters.learned_evicted += evicted as u64;
        if evicted > 0 {
            tracing::info!(
                policy,
                "evicted {evicted} idle learned pairs to make room for {name} ({})",
                owner.describe()
            );
        }
        for ip in touched {
            p.sync(self.maps.as_mut(), ip).map_err(LearnError::Kernel)?;
        }

        for &(ip, ttl) in &keep {
            let life = Duration::from_secs(u64::from(ttl)).clamp(self.min_ttl, self.max_ttl);
            let names = p.ips.entry(ip).or_default();
            let mut new_pair = false;
            let pair = names.entry(name.to_string()).or_insert_with(|| {
                new_pair = true;
                Pair {
                    until: now,
                    owners: Vec::new(),
                }
            });
            pair.until = pair.until.max(now + life);
            match pair.owners.iter_mut().find(|(o, _)| *o == owner) {
                Some(o) => o.1 = now,
                None => {
                    pair.owners.push((owner, now));
                    *p.held.entry(owner).or_default() += 1;
                }
            }
            if new_pair {
                p.pairs += 1;
            }
            // Also when only the expiry moved: the kernel entry records it for a restart.
            let v = p.value(ip);
            self.maps
                .write(p.ruleset, ip, &v)
                .map_err(LearnError::Kernel)?;
        }
        if !self.quota_refusing.is_empty() {
            self.quota_refusing.remove(&(policy.to_string(), owner));
        }
        Ok(Learned { withheld, evicted })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::learned::tests::{A, B, C, counters, learner, one};

    #[test]
    fn a_container_at_its_quota_evicts_its_own_idle_pairs_else_is_refused() {
        let (mut l, fake) = learner("max_learned = 100\nmax_learned_per_container = 3");
        let t0 = Instant::now();
        for i in 1..=3 {
            let r = l.learn_at(
                "p",
                &format!("a{i}.svc.test"),
                &one(&format!("192.0.2.{i}")),
                A,
                t0,
            );
            assert_eq!(r.unwrap(), Learned::default());
        }
        // A fourth pair within the grace period: refused, nothing changes.
        let e = l
            .learn_at("p", "a4.svc.test", &one("192.0.2.4"), A, t0)
            .unwrap_err();
        assert!(matches!(e, LearnError::Quota { first: true, .. }), "{e}");
        let e = l
            .learn_at("p", "a5.svc.test", &one("192.0.2.5"), A, t0)
            .unwrap_err();
        assert!(matches!(e, LearnError::Quota { first: false, .. }), "{e}");
        assert!(!fake.allowed("192.0.2.4"));
        assert_eq!(counters(&l).learned_quota_refused, 2);
        // Another container of the same policy is not affected.
        assert!(
            l.learn_at("p", "b1.svc.test", &one("192.0.2.50"), B, t0)
                .is_ok()
        );
        assert!(fake.allowed("192.0.2.50"));
        // Asking again for what it holds is not a new pair.
        assert!(
            l.learn_at("p", "a1.svc.test", &one("192.0.2.1"), A, t0)
                .is_ok()
        );

        // Later: one of its idle pairs goes, least recently answered first (all three were
        // answered at t0; a connection to a2's address is open, so a2 stays).
        fake.open("192.0.2.2");
        let later = t0 + EVICTION_GRACE;
        let r = l
            .learn_at("p", "a4.svc.test", &one("192.0.2.4"), A, later)
            .unwrap();
        assert_eq!(r.evicted, 1);
        assert!(fake.allowed("192.0.2.4") && fake.allowed("192.0.2.2"));
        assert_eq!(
            ["192.0.2.1", "192.0.2.3"].map(|ip| fake.allowed(ip)),
            [false, true],
            "one idle pair went (equal times: the lowest address first)"
        );
        assert_eq!(counters(&l).learned_evicted, 1);
        assert_eq!(l.policies["p"].held[&A], 3);
        assert_eq!(l.policies["p"].pairs, 4);
    }

    #[test]
    fn a_full_policy_evicts_idle_pairs_of_the_heaviest_container_only() {
        let (mut l, fake) = learner("max_learned = 6\nmax_learned_per_container = 6");
        let t0 = Instant::now();
        // A (the flooder) holds 4, B holds 1, and a pair both hold.
        for i in 1..=4 {
            l.learn_at(
                "p",
                &format!("f{i}.svc.test"),
                &one(&format!("198.51.100.{i}")),
                A,
                t0,
            )
            .unwrap();
        }
        l.learn_at("p", "b.svc.test", &one("192.0.2.10"), B, t0)
            .unwrap();
        for o in [A, B] {
            l.learn_at("p", "shared.svc.test", &one("192.0.2.20"), o, t0)
                .unwrap();
        }
        assert_eq!(l.policies["p"].pairs, 6);
        // Full, and everything is recent: SERVFAIL for C, nothing evicted.
        let e = l
            .learn_at("p", "c.svc.test", &one("192.0.2.30"), C, t0)
            .unwrap_err();
        assert!(matches!(e, LearnError::Full { .. }), "{e}");
        assert_eq!(counters(&l).learned_full, 1);
        // Later: A's oldest idle pairs make room; B's pair and the shared one stay.
        let later = t0 + EVICTION_GRACE;
        let two = vec![
            ("192.0.2.30".parse().unwrap(), 300),
            ("192.0.2.31".parse().unwrap(), 300),
        ];
        let r = l.learn_at("p", "c.svc.test", &two, C, later).unwrap();
        assert_eq!(r.evicted, 2);
        for ip in ["192.0.2.10", "192.0.2.20", "192.0.2.30", "192.0.2.31"] {
            assert!(fake.allowed(ip), "{ip}");
        }
        assert_eq!(
            (1..=4)
                .filter(|i| fake.allowed(&format!("198.51.100.{i}")))
                .count(),
            2
        );
        assert_eq!(l.policies["p"].held[&A], 3);
        // Pre-resolved pairs (the agent's) are never evicted: with only those, SERVFAIL.
        let (mut l, _) = learner("max_learned = 1");
        l.learn_at("p", "api.exact.test", &one("192.0.2.40"), Owner::Agent, t0)
            .unwrap();
        let e = l
            .learn_at("p", "x.svc.test", &one("192.0.2.41"), A, later)
            .unwrap_err();
        assert!(matches!(e, LearnError::Full { .. }), "{e}");
    }
}
