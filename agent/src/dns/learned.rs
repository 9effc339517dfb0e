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
type AdoptedIps = HashMap<IpAddr, (Vec<PortRule>, Instant)>;

/// Addresses adopted from the agent before a restart, and the fingerprint of the hostname
/// rules they were learned under.
#[derive(Clone, Debug, Default)]
struct Adopted {
    hostnames: u64,
    ips: AdoptedIps,
}

/// Adopted entries as far as `names` still grants them. Their names are unknown, so they are
/// kept only if the policy's hostname rules are exactly those they were learned under, with
/// the port rules those grant, for at most `max_ttl` from now: a config change at a restart
/// takes effect at once (connections to such addresses then need a new lookup).
fn restrict(adopted: &Adopted, names: &PolicyNames, max_ttl: Duration) -> Adopted {
    if adopted.hostnames != names.fingerprint() {
        return Adopted::default();
    }
    let grantable = names.all_rules();
    let latest = Instant::now() + max_ttl;
    let ips = adopted
        .ips
        .iter()
        .filter_map(|(ip, (rules, until))| {
            let kept: Vec<PortRule> = rules
                .iter()
                .filter(|r| grantable.contains(r))
                .copied()
                .collect();
            (!kept.is_empty()).then(|| (*ip, (kept, (*until).min(latest))))
        })
        .collect();
    Adopted {
        hostnames: adopted.hostnames,
        ips,
    }
}

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
    /// `[dns] never_learn`: addresses no answer makes allowed (DNS rebinding).
    never_learn: Vec<IpNet>,
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
        if let Some((rs, e)) = self.adopted.ips.get(&ip) {
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
        self.ips.keys().chain(
            self.adopted
                .ips
                .keys()
                .filter(|ip| !self.ips.contains_key(*ip)),
        )
    }
}

impl Learner {
    pub fn new(
        maps: LearnMaps,
        min_ttl: Duration,
        max_ttl: Duration,
        max_pairs: usize,
        never_learn: Vec<IpNet>,
    ) -> Self {
        Self {
            maps,
            min_ttl,
            max_ttl,
            max_pairs,
            never_learn,
            policies: HashMap::new(),
            pending: HashMap::new(),
        }
    }

    /// Takes over the learned entries the kernel holds from the agent that ran before (see
    /// `Kernel::learned_entries`), before the first apply. Each stays until its recorded time;
    /// one whose time passed while no agent ran goes at the first expiry round unless a
    /// connection to it is open.
    #[allow(clippy::type_complexity)]
    pub fn adopt(&mut self, entries: HashMap<String, (u64, Vec<(IpAddr, AllowValue)>)>) -> usize {
        let now_boot = boottime_secs();
        let now = Instant::now();
        let mut n = 0;
        for (policy, (hostnames, list)) in entries {
            let adopted = self.pending.entry(policy).or_default();
            adopted.hostnames = hostnames;
            for (ip, v) in list {
                let left = u64::from(v.learned_until).saturating_sub(now_boot);
                let rules = v.rules[..(v.count as usize).min(MAX_PORT_RULES)].to_vec();
                adopted
                    .ips
                    .insert(ip, (rules, now + Duration::from_secs(left)));
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
            if self.never_learn.iter().any(|n| n.contains(&ip)) {
                tracing::warn!(
                    policy,
                    name,
                    "not allowing {ip}: it is in [dns] never_learn (DNS rebinding guard: the metadata service, the host itself, …)"
                );
                continue;
            }
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
    /// address is open; updates or removes the kernel entries. Returns how many went. An
    /// address whose kernel entry cannot be changed keeps its state, to be tried again.
    pub fn expire(&mut self, now: Instant) -> anyhow::Result<usize> {
        let due = self.policies.values().any(|p| {
            p.ips.values().flat_map(|n| n.values()).any(|&e| e <= now)
                || p.adopted.ips.values().any(|(_, e)| *e <= now)
        });
        if !due {
            return Ok(0);
        }
        let open = self.maps.open_connections()?;
        let mut gone = 0;
        let mut failed = None;
        for p in self.policies.values_mut() {
            let ips: Vec<IpAddr> = p.learned_ips().copied().collect();
            for ip in ips {
                let names_due = p
                    .ips
                    .get(&ip)
                    .is_some_and(|n| n.values().any(|e| *e <= now));
                let adopted_due = p.adopted.ips.get(&ip).is_some_and(|(_, e)| *e <= now);
                if !names_due && !adopted_due {
                    continue;
                }
                if open.contains(&(p.slot, ip)) {
                    for e in p.ips.get_mut(&ip).into_iter().flat_map(|n| n.values_mut()) {
                        if *e <= now {
                            *e = now + OPEN_CONNECTION_RECHECK;
                        }
                    }
                    if let Some((_, e)) = p.adopted.ips.get_mut(&ip)
                        && *e <= now
                    {
                        *e = now + OPEN_CONNECTION_RECHECK;
                    }
                    continue;
                }
                let old_names = p.ips.remove(&ip);
                let old_adopted = p.adopted.ips.remove(&ip);
                let mut left = old_names.clone().unwrap_or_default();
                left.retain(|_, e| *e > now);
                let expired = old_names.as_ref().map_or(0, |n| n.len() - left.len())
                    + usize::from(adopted_due);
                if !left.is_empty() {
                    p.ips.insert(ip, left);
                }
                if let Some(a) = old_adopted.clone().filter(|(_, e)| *e > now) {
                    p.adopted.ips.insert(ip, a);
                }
                let res = if p.ips.contains_key(&ip) || p.adopted.ips.contains_key(&ip) {
                    let v = p.value(ip);
                    self.maps.write(p.ruleset, ip, &v)
                } else {
                    match p.statics.get(&IpNet::from(ip)) {
                        // A static exact entry of its own: back to just that.
                        Some(v) => self.maps.write(p.ruleset, ip, v),
                        // Else no exact entry (a covering CIDR, if any, decides again).
                        None => self.maps.remove(p.ruleset, ip),
                    }
                };
                match res {
                    Ok(()) => gone += expired,
                    Err(e) => {
                        // Put it back as it was: the next round tries again.
                        p.ips.remove(&ip);
                        p.adopted.ips.remove(&ip);
                        if let Some(n) = old_names {
                            p.ips.insert(ip, n);
                        }
                        if let Some(a) = old_adopted {
                            p.adopted.ips.insert(ip, a);
                        }
                        failed = Some(e);
                    }
                }
            }
            p.pairs = p.ips.values().map(BTreeMap::len).sum();
        }
        match failed {
            Some(e) => Err(
                e.context("an expired learned address could not be removed (retried every second)")
            ),
            None => Ok(gone),
        }
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
            (Some(old), _) => (old.ips.clone(), restrict(&old.adopted, names, self.max_ttl)),
            (None, Some(pending)) => (HashMap::new(), restrict(pending, names, self.max_ttl)),
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
                Some(p) => restrict(&p.adopted, &b.names, self.max_ttl),
                None => restrict(
                    &self.pending.remove(&b.policy).unwrap_or_default(),
                    &b.names,
                    self.max_ttl,
                ),
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
            for (ip, (_, e)) in &p.adopted.ips {
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
                if p.adopted.ips.contains_key(ip) {
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

#[cfg(test)]
mod tests {
    use agent_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::config::HostnameRule;

    fn rule(lo: u16, protos: u8) -> PortRule {
        PortRule {
            lo,
            hi: lo,
            protos,
            _pad: [0; 3],
        }
    }

    #[test]
    fn adopted_addresses_keep_only_what_the_new_policy_grants() {
        let names = PolicyNames::new(&[HostnameRule {
            name: "*.svc.test".into(),
            protos: PROTO_TCP,
            ports: (443, 443),
            line: 1,
        }]);
        let far = Instant::now() + Duration::from_secs(7 * 86_400);
        let mut adopted = Adopted {
            hostnames: names.fingerprint(),
            ips: HashMap::new(),
        };
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        // a: learned for 443 and (under the old config) for 22; b: only for 22.
        adopted
            .ips
            .insert(a, (vec![rule(443, PROTO_TCP), rule(22, PROTO_TCP)], far));
        adopted
            .ips
            .insert(b, (vec![rule(22, PROTO_TCP), rule(53, PROTO_UDP)], far));
        let kept = restrict(&adopted, &names, Duration::from_secs(3600)).ips;
        assert_eq!(kept.len(), 1, "{kept:?}");
        let (rules, until) = &kept[&a];
        assert_eq!(rules, &vec![rule(443, PROTO_TCP)]);
        assert!(*until <= Instant::now() + Duration::from_secs(3600));
        // Other hostname rules (even with the same ports), or none: nothing is kept.
        let other = PolicyNames::new(&[HostnameRule {
            name: "*.other.test".into(),
            protos: PROTO_TCP,
            ports: (443, 443),
            line: 1,
        }]);
        for n in [other, PolicyNames::new(&[])] {
            assert!(
                restrict(&adopted, &n, Duration::from_secs(60))
                    .ips
                    .is_empty()
            );
        }
    }

    #[test]
    fn learned_until_is_in_boottime_seconds_and_never_zero() {
        let now = boottime_secs();
        let t = u64::from(until_boottime(Instant::now() + Duration::from_secs(90)));
        assert!((now + 89..=now + 92).contains(&t), "{now} {t}");
        assert!(until_boottime(Instant::now()) >= 1);
    }
}
