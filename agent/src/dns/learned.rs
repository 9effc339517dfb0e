//! Addresses learned from DNS answers, and their life in the kernel's allow maps.
//!
//! An answered address is written into the policy's active ruleset *before* the answer goes
//! back, with the port rules of the name (and of any static rule covering the address). It
//! stays for the answer's TTL (raised to `min_ttl`, capped at `max_ttl`), longer while an
//! outgoing TCP connection to it is open, and goes when no name that resolved to it is still
//! fresh. A reload rewrites every ruleset: [`Learner::entries_for`] carries the learned
//! addresses over, and [`Learner::rebind`] points the learner at the new rulesets. Each kernel
//! entry says until when it was learned (`learned_until`), so a restarted agent adopts the
//! addresses of the one before ([`Learner::adopt`]): connections to them survive the restart.

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

/// What listings call an address adopted from the agent that ran before.
pub const ADOPTED: &str = "(learned before the agent restarted)";

/// Adopted addresses: their port rules and until when they stay.
type Adopted = HashMap<IpAddr, (Vec<PortRule>, Instant)>;

/// CLOCK_BOOTTIME in whole seconds (the clock of `AllowValue::learned_until`).
fn boottime_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer; CLOCK_BOOTTIME exists on every kernel this runs on.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64
}

/// `until` as CLOCK_BOOTTIME seconds (rounded up, at least 1: 0 means "not learned").
fn until_boottime(until: Instant) -> u32 {
    let left = until.saturating_duration_since(Instant::now());
    let secs = boottime_secs() + left.as_secs() + u64::from(left.subsec_nanos() > 0);
    secs.clamp(1, u64::from(u32::MAX)) as u32
}

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
    /// Addresses the agent before a restart had learned (names unknown).
    adopted: Adopted,
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
    /// Adopted at start, for policies not bound yet.
    pending: HashMap<String, Adopted>,
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
    /// The kernel entry for `ip`: static rules first, then each fresh name's rules, then those
    /// adopted from before a restart; `learned_until` is the latest expiry among them.
    fn value(&self, ip: IpAddr) -> AllowValue {
        let mut v = static_value(&self.statics, ip).unwrap_or_default();
        let mut rules: Vec<PortRule> = v.rules[..v.count as usize].to_vec();
        let mut until: Option<Instant> = None;
        let mut add = |rs: &[PortRule]| {
            for r in rs {
                if !rules.contains(r) {
                    rules.push(*r);
                }
            }
        };
        if let Some(names) = self.ips.get(&ip) {
            for (name, e) in names {
                add(&self.names.rules_for(name).unwrap_or_default());
                until = until.max(Some(*e));
            }
        }
        if let Some((rs, e)) = self.adopted.get(&ip) {
            add(rs);
            until = until.max(Some(*e));
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
        v.learned_until = until.map_or(0, until_boottime);
        v
    }

    fn learned_ips(&self) -> impl Iterator<Item = &IpAddr> {
        self.ips
            .keys()
            .chain(self.adopted.keys().filter(|ip| !self.ips.contains_key(*ip)))
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
            pending: HashMap::new(),
        }
    }

    /// Takes over the learned entries the kernel holds from the agent that ran before (see
    /// `Kernel::learned_entries`), before the first apply. Each stays until its recorded time;
    /// one whose time passed while no agent ran goes at the first expiry round unless a
    /// connection to it is open.
    pub fn adopt(&mut self, entries: HashMap<String, Vec<(IpAddr, AllowValue)>>) -> usize {
        let now_boot = boottime_secs();
        let now = Instant::now();
        let mut n = 0;
        for (policy, list) in entries {
            let adopted = self.pending.entry(policy).or_default();
            for (ip, v) in list {
                let left = u64::from(v.learned_until).saturating_sub(now_boot);
                let rules = v.rules[..(v.count as usize).min(MAX_PORT_RULES)].to_vec();
                adopted.insert(ip, (rules, now + Duration::from_secs(left)));
                n += 1;
            }
        }
        n
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
            }
            // Also when only the expiry moved: the kernel entry records it for a restart.
            let v = p.value(ip);
            self.maps
                .write(p.ruleset, ip, &v)
                .map_err(LearnError::Kernel)?;
        }
        Ok(())
    }

    /// Forgets (name, address) pairs whose time is up, unless a TCP connection to the
    /// address is open; updates or removes the kernel entries. Returns how many went.
    pub fn expire(&mut self, now: Instant) -> anyhow::Result<usize> {
        let due = self.policies.values().any(|p| {
            p.ips.values().flat_map(|n| n.values()).any(|&e| e <= now)
                || p.adopted.values().any(|(_, e)| *e <= now)
        });
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
            for (ip, (_, e)) in p.adopted.iter_mut() {
                if *e > now {
                    continue;
                }
                if open.contains(&(p.slot, *ip)) {
                    *e = now + OPEN_CONNECTION_RECHECK;
                } else {
                    changed.push(*ip);
                    gone += 1;
                }
            }
            p.adopted.retain(|_, (_, e)| *e > now);
            changed.sort();
            changed.dedup();
            for ip in changed {
                if p.ips.get(&ip).is_some_and(|n| n.is_empty()) {
                    p.ips.remove(&ip);
                }
                if !p.ips.contains_key(&ip) && !p.adopted.contains_key(&ip) {
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
        let (ips, adopted) = match (self.policies.get(policy), self.pending.get(policy)) {
            (Some(old), _) => (old.ips.clone(), old.adopted.clone()),
            (None, Some(pending)) => (HashMap::new(), pending.clone()),
            (None, None) => return Vec::new(),
        };
        let next = PolicyLearned {
            slot: 0,
            ruleset: 0,
            statics: compiled.entries.iter().copied().collect(),
            names: names.clone(),
            ips: ips
                .into_iter()
                .map(|(ip, n)| {
                    let kept = n
                        .into_iter()
                        .filter(|(name, _)| names.rules_for(name).is_ok())
                        .collect::<BTreeMap<_, _>>();
                    (ip, kept)
                })
                .filter(|(_, n)| !n.is_empty())
                .collect(),
            adopted,
            pairs: 0,
        };
        next.learned_ips()
            .map(|ip| (*ip, next.value(*ip)))
            .collect()
    }

    /// After a (re)load: the policies, their slots and active rulesets. Learned pairs of
    /// policies that stay are kept (the new ruleset already holds them: see `entries_for`).
    pub fn rebind(&mut self, bindings: Vec<Binding>) {
        let mut old = std::mem::take(&mut self.policies);
        for b in bindings {
            let previous = old.remove(&b.policy);
            let adopted = match &previous {
                Some(p) => p.adopted.clone(),
                None => self.pending.remove(&b.policy).unwrap_or_default(),
            };
            let mut ips = previous.map(|p| p.ips).unwrap_or_default();
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
                    adopted,
                    pairs,
                },
            );
        }
        // Adopted entries of policies that no longer exist went with their rulesets.
        self.pending.clear();
    }

    /// Every learned pair, for the CLI.
    pub fn entries(&self) -> Vec<LearnedEntry> {
        let now = Instant::now();
        let left = |e: &Instant| e.saturating_duration_since(now).as_secs();
        let mut out: Vec<LearnedEntry> = Vec::new();
        for (policy, p) in &self.policies {
            for (ip, names) in &p.ips {
                for (name, e) in names {
                    out.push(LearnedEntry {
                        policy: policy.clone(),
                        name: name.clone(),
                        address: *ip,
                        expires_in_secs: left(e),
                    });
                }
            }
            for (ip, (_, e)) in &p.adopted {
                out.push(LearnedEntry {
                    policy: policy.clone(),
                    name: ADOPTED.into(),
                    address: *ip,
                    expires_in_secs: left(e),
                });
            }
        }
        out.sort_by(|a, b| (&a.policy, &a.name, a.address).cmp(&(&b.policy, &b.name, b.address)));
        out
    }

    /// `policy`'s learned addresses as the kernel holds them: address, entry, names.
    pub fn view(&self, policy: &str) -> Vec<(IpAddr, AllowValue, Vec<String>)> {
        let Some(p) = self.policies.get(policy) else {
            return Vec::new();
        };
        p.learned_ips()
            .map(|ip| {
                let mut names: Vec<String> = p
                    .ips
                    .get(ip)
                    .map(|n| n.keys().cloned().collect())
                    .unwrap_or_default();
                if p.adopted.contains_key(ip) {
                    names.push(ADOPTED.into());
                }
                (*ip, p.value(*ip), names)
            })
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
