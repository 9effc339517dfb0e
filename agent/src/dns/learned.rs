//! Addresses learned from DNS answers, and their life in the kernel's allow maps.
//!
//! An answered address is written into the policy's active ruleset *before* the answer goes
//! back, with the port rules of the name (and of any static rule covering the address). It
//! stays for the answer's TTL (raised to `min_ttl`, capped at `max_ttl`), longer while an
//! outgoing TCP connection to it is open, and goes when no name that resolved to it is still
//! fresh. A reload rewrites every ruleset: [`Learner::entries_for`] carries the learned
//! addresses over, and [`Learner::rebind`] points the learner at the new rulesets.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use agent_common::{AllowValue, MAX_PORT_RULES, PortRule};
use ipnet::IpNet;

use super::names::PolicyNames;
use crate::{kernel::maps::LearnMaps, policy::Compiled};

/// How often an address whose TTL ran out, but which still has an open connection, is looked
/// at again.
const OPEN_CONNECTION_RECHECK: Duration = Duration::from_secs(5);

/// Where one policy's learned addresses go.
pub struct Binding {
    pub policy: String,
    pub slot: u32,
    /// The policy's active ruleset id.
    pub ruleset: u32,
    pub compiled: Compiled,
    pub names: PolicyNames,
}

struct PolicyLearned {
    slot: u32,
    ruleset: u32,
    /// The static entries, to merge their rules into a learned address's entry.
    statics: HashMap<IpNet, AllowValue>,
    names: PolicyNames,
    /// Address → the names it was answered for, with when each stops counting.
    ips: HashMap<IpAddr, BTreeMap<String, Instant>>,
    pairs: usize,
}

/// One learned (name, address) pair, for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LearnedEntry {
    pub policy: String,
    pub name: String,
    pub address: IpAddr,
    pub expires_in_secs: u64,
}

pub struct Learner {
    maps: LearnMaps,
    min_ttl: Duration,
    max_ttl: Duration,
    max_pairs: usize,
    policies: HashMap<String, PolicyLearned>,
}

/// Why an answer could not be learned (the client gets SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("policy {0:?} is not loaded")]
    UnknownPolicy(String),
    #[error(
        "policy {policy:?} already holds {max} learned (name, address) pairs ([dns] max_learned)"
    )]
    Full { policy: String, max: usize },
    #[error("{0:#}")]
    Kernel(anyhow::Error),
}

/// The static entry that decides `ip`: its exact entry, else the longest CIDR containing it.
fn static_value(statics: &HashMap<IpNet, AllowValue>, ip: IpAddr) -> Option<AllowValue> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (0..=max)
        .rev()
        .find_map(|len| statics.get(&IpNet::new(ip, len).ok()?.trunc()).copied())
}

impl PolicyLearned {
    /// The kernel entry for `ip`: static rules first, then each fresh name's rules.
    fn value(&self, ip: IpAddr) -> AllowValue {
        let mut v = static_value(&self.statics, ip).unwrap_or_default();
        let mut rules: Vec<PortRule> = v.rules[..v.count as usize].to_vec();
        if let Some(names) = self.ips.get(&ip) {
            for name in names.keys() {
                for r in self.names.rules_for(name).unwrap_or_default() {
                    if !rules.contains(&r) {
                        rules.push(r);
                    }
                }
            }
        }
        if rules.len() > MAX_PORT_RULES {
            tracing::warn!(
                "{ip}: {} port rules apply (static and learned); only the first {MAX_PORT_RULES} are enforced",
                rules.len()
            );
            rules.truncate(MAX_PORT_RULES);
        }
        v.count = rules.len() as u32;
        v.rules = [PortRule::default(); MAX_PORT_RULES];
        v.rules[..rules.len()].copy_from_slice(&rules);
        v
    }
}

impl Learner {
    pub fn new(maps: LearnMaps, min_ttl: Duration, max_ttl: Duration, max_pairs: usize) -> Self {
        Self {
            maps,
            min_ttl,
            max_ttl,
            max_pairs,
            policies: HashMap::new(),
        }
    }

    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// Records that `name` resolved to `addrs` (address, TTL) for `policy`, and makes sure
    /// the kernel allows them. Returns when the kernel has them.
    pub fn learn(
        &mut self,
        policy: &str,
        name: &str,
        addrs: &[(IpAddr, u32)],
    ) -> Result<(), LearnError> {
        let p = self
            .policies
            .get_mut(policy)
            .ok_or_else(|| LearnError::UnknownPolicy(policy.into()))?;
        if p.names.rules_for(name).is_err() {
            return Ok(());
        }
        let now = Instant::now();
        for &(ip, ttl) in addrs {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            let life = Duration::from_secs(u64::from(ttl)).clamp(self.min_ttl, self.max_ttl);
            let names = p.ips.entry(ip).or_default();
            let new_pair = !names.contains_key(name);
            if new_pair && p.pairs >= self.max_pairs {
                if names.is_empty() {
                    p.ips.remove(&ip);
                }
                return Err(LearnError::Full {
                    policy: policy.into(),
                    max: self.max_pairs,
                });
            }
            let expiry = names.entry(name.to_string()).or_insert(now);
            *expiry = (*expiry).max(now + life);
            if new_pair {
                p.pairs += 1;
                let v = p.value(ip);
                self.maps
                    .write(p.ruleset, ip, &v)
                    .map_err(LearnError::Kernel)?;
            }
        }
        Ok(())
    }

    /// Forgets (name, address) pairs whose time is up, unless a TCP connection to the
    /// address is open; updates or removes the kernel entries. Returns how many went.
    pub fn expire(&mut self, now: Instant) -> anyhow::Result<usize> {
        let due = self
            .policies
            .values()
            .any(|p| p.ips.values().flat_map(|n| n.values()).any(|&e| e <= now));
        if !due {
            return Ok(0);
        }
        let open = self.maps.open_connections()?;
        let mut gone = 0;
        for p in self.policies.values_mut() {
            let mut changed = Vec::new();
            for (ip, names) in p.ips.iter_mut() {
                let before = names.len();
                if open.contains(&(p.slot, *ip)) {
                    for e in names.values_mut().filter(|e| **e <= now) {
                        *e = now + OPEN_CONNECTION_RECHECK;
                    }
                    continue;
                }
                names.retain(|_, e| *e > now);
                if names.len() != before {
                    gone += before - names.len();
                    p.pairs -= before - names.len();
                    changed.push(*ip);
                }
            }
            for ip in changed {
                if p.ips.get(&ip).is_some_and(|n| n.is_empty()) {
                    p.ips.remove(&ip);
                    match p.statics.get(&IpNet::from(ip)) {
                        // A static exact entry of its own: back to just that.
                        Some(v) => self.maps.write(p.ruleset, ip, v)?,
                        // Else no exact entry (a covering CIDR, if any, decides again).
                        None => self.maps.remove(p.ruleset, ip)?,
                    }
                } else {
                    let v = p.value(ip);
                    self.maps.write(p.ruleset, ip, &v)?;
                }
            }
        }
        Ok(gone)
    }

    /// The learned entries `policy` should carry into a new ruleset built from `compiled`
    /// and `names` (pairs whose name the new policy no longer allows are left out).
    pub fn entries_for(
        &self,
        policy: &str,
        compiled: &Compiled,
        names: &PolicyNames,
    ) -> Vec<(IpAddr, AllowValue)> {
        let Some(old) = self.policies.get(policy) else {
            return Vec::new();
        };
        let next = PolicyLearned {
            slot: old.slot,
            ruleset: 0,
            statics: compiled.entries.iter().copied().collect(),
            names: names.clone(),
            ips: old
                .ips
                .iter()
                .map(|(ip, n)| {
                    let kept = n
                        .iter()
                        .filter(|(name, _)| names.rules_for(name).is_ok())
                        .map(|(k, v)| (k.clone(), *v))
                        .collect::<BTreeMap<_, _>>();
                    (*ip, kept)
                })
                .filter(|(_, n)| !n.is_empty())
                .collect(),
            pairs: 0,
        };
        next.ips.keys().map(|ip| (*ip, next.value(*ip))).collect()
    }

    /// After a (re)load: the policies, their slots and active rulesets. Learned pairs of
    /// policies that stay are kept (the new ruleset already holds them: see `entries_for`).
    pub fn rebind(&mut self, bindings: Vec<Binding>) {
        let mut old = std::mem::take(&mut self.policies);
        for b in bindings {
            let mut ips = old.remove(&b.policy).map(|p| p.ips).unwrap_or_default();
            for n in ips.values_mut() {
                n.retain(|name, _| b.names.rules_for(name).is_ok());
            }
            ips.retain(|_, n| !n.is_empty());
            let pairs = ips.values().map(BTreeMap::len).sum();
            self.policies.insert(
                b.policy,
                PolicyLearned {
                    slot: b.slot,
                    ruleset: b.ruleset,
                    statics: b.compiled.entries.into_iter().collect(),
                    names: b.names,
                    ips,
                    pairs,
                },
            );
        }
    }

    /// Every learned pair, for the CLI.
    pub fn entries(&self) -> Vec<LearnedEntry> {
        let now = Instant::now();
        let mut out: Vec<LearnedEntry> = self
            .policies
            .iter()
            .flat_map(|(policy, p)| {
                p.ips.iter().flat_map(move |(ip, names)| {
                    names.iter().map(move |(name, e)| LearnedEntry {
                        policy: policy.clone(),
                        name: name.clone(),
                        address: *ip,
                        expires_in_secs: e.saturating_duration_since(now).as_secs(),
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.policy, &a.name, a.address).cmp(&(&b.policy, &b.name, b.address)));
        out
    }

    /// `policy`'s learned addresses as the kernel holds them: address, entry, names.
    pub fn view(&self, policy: &str) -> Vec<(IpAddr, AllowValue, Vec<String>)> {
        let Some(p) = self.policies.get(policy) else {
            return Vec::new();
        };
        p.ips
            .iter()
            .map(|(ip, names)| (*ip, p.value(*ip), names.keys().cloned().collect()))
            .collect()
    }

    /// The names `ip` was answered for in the policy in `slot` (for audit records).
    pub fn names_of(&self, slot: u32, ip: IpAddr) -> Vec<String> {
        self.policies
            .values()
            .filter(|p| p.slot == slot)
            .filter_map(|p| p.ips.get(&ip))
            .flat_map(|n| n.keys().cloned())
            .collect()
    }
}
