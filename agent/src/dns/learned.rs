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
//!
//! What one container may make the policy learn is limited: see [`Learner::learn`] (a quota
//! per container, eviction of idle pairs) and `limits` (the name budget, the host's addresses,
//! private answers).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use agent_common::{AllowValue, MAX_PORT_RULES, PortRule};
use ipnet::IpNet;
use nix::time::{ClockId, clock_gettime};

use super::{
    limits::{Charge, Counters, NameBudget, Owner, host_addresses, is_private},
    names::PolicyNames,
};
use crate::{config, kernel::maps::LearnMaps, policy::Compiled};

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
    // CLOCK_BOOTTIME exists on every kernel this runs on.
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |ts| ts.tv_sec() as u64)
}

/// `until` as CLOCK_BOOTTIME seconds (rounded up, at least 1: 0 means "not learned").
fn until_boottime(until: Instant) -> u32 {
    let left = until.saturating_duration_since(Instant::now());
    let secs = boottime_secs() + left.as_secs() + u64::from(left.subsec_nanos() > 0);
    secs.clamp(1, u64::from(u32::MAX)) as u32
}

/// The kernel side of learning: the policy's exact-address maps and the open connections.
/// A trait so the quota and eviction logic can be tested without a kernel.
pub trait Store: Send {
    /// Allows `value` to `ip` under `ruleset`.
    fn write(&mut self, ruleset: u32, ip: IpAddr, value: &AllowValue) -> anyhow::Result<()>;
    /// Removes the exact entry for `ip` under `ruleset` (absent is fine).
    fn remove(&mut self, ruleset: u32, ip: IpAddr) -> anyhow::Result<()>;
    /// `(slot, address)` of every open outgoing TCP connection of a guarded cgroup.
    fn open_connections(&self) -> anyhow::Result<HashSet<(u32, IpAddr)>>;
}

impl Store for LearnMaps {
    fn write(&mut self, ruleset: u32, ip: IpAddr, value: &AllowValue) -> anyhow::Result<()> {
        LearnMaps::write(self, ruleset, ip, value)
    }
    fn remove(&mut self, ruleset: u32, ip: IpAddr) -> anyhow::Result<()> {
        LearnMaps::remove(self, ruleset, ip)
    }
    fn open_connections(&self) -> anyhow::Result<HashSet<(u32, IpAddr)>> {
        LearnMaps::open_connections(self)
    }
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

/// A learned pair is never evicted within this time of being answered to its owner: the
/// client that just got the address connects to it (the promise of learning before
/// answering), and only then does an open connection protect it.
pub const EVICTION_GRACE: Duration = Duration::from_secs(10);

/// One learned (name, address) pair.
#[derive(Clone, Debug)]
struct Pair {
    /// Until when it stays (the latest answer's TTL, clamped).
    until: Instant,
    /// Who got it in an answer, and when last. A pair counts against the quota of each of
    /// its owners, and is evicted only when its last owner lets go of it.
    owners: Vec<(Owner, Instant)>,
}

impl Pair {
    fn stamp_of(&self, owner: Owner) -> Option<Instant> {
        self.owners
            .iter()
            .find(|(o, _)| *o == owner)
            .map(|(_, at)| *at)
    }
}

struct PolicyLearned {
    slot: u32,
    ruleset: u32,
    /// The static entries, to merge their rules into a learned address's entry.
    statics: HashMap<IpNet, AllowValue>,
    names: PolicyNames,
    /// Address → the names it was answered for.
    ips: HashMap<IpAddr, BTreeMap<String, Pair>>,
    /// Addresses the agent before a restart had learned (names unknown).
    adopted: Adopted,
    /// Learned pairs in `ips`.
    pairs: usize,
    /// Pairs each owner holds (a pair with two owners counts for both).
    held: HashMap<Owner, usize>,
}

/// One learned (name, address) pair, for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LearnedEntry {
    pub policy: String,
    pub name: String,
    pub address: IpAddr,
    pub expires_in_secs: u64,
}

/// What [`Learner::learn`] did besides allowing the answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Learned {
    /// Answered addresses not allowed: in `[dns] never_learn`, or this host's.
    pub withheld: Vec<IpAddr>,
    /// Learned pairs evicted to make room (idle: no open connection, older than the grace).
    pub evicted: usize,
}

pub struct Learner {
    maps: Box<dyn Store>,
    min_ttl: Duration,
    max_ttl: Duration,
    max_pairs: usize,
    /// `[dns] max_learned_per_container`.
    quota: usize,
    /// `[dns] never_learn`: addresses no answer makes allowed (DNS rebinding).
    never_learn: Vec<IpNet>,
    /// `"host"` in `never_learn`: also this host's addresses (`host`).
    never_learn_host: bool,
    /// This host's interface addresses, re-read every second ([`Learner::set_host_addresses`]).
    host: HashSet<IpAddr>,
    /// `[dns] private_answers = "refuse"`.
    refuse_private: bool,
    /// `[dns] wildcard_names_per_minute`, per owner.
    budget: NameBudget,
    /// Per policy, since the agent started.
    counters: BTreeMap<String, Counters>,
    /// (policy, owner) whose answers the quota refuses now (to log only the first).
    quota_refusing: HashSet<(String, Owner)>,
    policies: HashMap<String, PolicyLearned>,
    /// Adopted at start, for policies not bound yet.
    pending: HashMap<String, Adopted>,
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

/// The static entry that decides `ip`: its exact entry, else the longest CIDR containing it.
fn static_value(statics: &HashMap<IpNet, AllowValue>, ip: IpAddr) -> Option<AllowValue> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (0..=max)
        .rev()
        .find_map(|len| statics.get(&IpNet::new(ip, len).ok()?.trunc()).copied())
}

/// `::ffff:a.b.c.d` is `a.b.c.d` (the kernel judges it so).
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
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
            for (name, pair) in names {
                add(&self.names.rules_for(name).unwrap_or_default());
                until = until.max(Some(pair.until));
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

    /// Puts the kernel entry of `ip` in line with what is learned for it: the merged entry,
    /// else the static exact entry of its own, else none (a covering CIDR decides again).
    fn sync(&self, maps: &mut dyn Store, ip: IpAddr) -> anyhow::Result<()> {
        if self.ips.contains_key(&ip) || self.adopted.ips.contains_key(&ip) {
            maps.write(self.ruleset, ip, &self.value(ip))
        } else {
            match self.statics.get(&IpNet::from(ip)) {
                Some(v) => maps.write(self.ruleset, ip, v),
                None => maps.remove(self.ruleset, ip),
            }
        }
    }

    /// Counts pairs and what each owner holds again (after expiry, a reload, a purge).
    fn recount(&mut self) {
        self.pairs = self.ips.values().map(BTreeMap::len).sum();
        self.held.clear();
        for pair in self.ips.values().flat_map(BTreeMap::values) {
            for (o, _) in &pair.owners {
                *self.held.entry(*o).or_default() += 1;
            }
        }
    }

    fn has(&self, ip: IpAddr, name: &str) -> bool {
        self.ips.get(&ip).is_some_and(|n| n.contains_key(name))
    }

    fn holds(&self, ip: IpAddr, name: &str, owner: Owner) -> bool {
        self.ips
            .get(&ip)
            .and_then(|n| n.get(name))
            .is_some_and(|p| p.stamp_of(owner).is_some())
    }

    /// `owner` lets go of (ip, name); the pair goes when it was the last owner. Returns
    /// whether the pair went.
    fn disown(&mut self, ip: IpAddr, name: &str, owner: Owner) -> bool {
        let Some(names) = self.ips.get_mut(&ip) else {
            return false;
        };
        let Some(pair) = names.get_mut(name) else {
            return false;
        };
        let before = pair.owners.len();
        pair.owners.retain(|(o, _)| *o != owner);
        if pair.owners.len() < before
            && let Some(n) = self.held.get_mut(&owner)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(&owner);
            }
        }
        if !pair.owners.is_empty() {
            return false;
        }
        names.remove(name);
        if names.is_empty() {
            self.ips.remove(&ip);
        }
        self.pairs = self.pairs.saturating_sub(1);
        true
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
    pub fn new(maps: impl Store + 'static, cfg: &config::Dns) -> Self {
        let host = if cfg.never_learn_host {
            host_addresses().unwrap_or_else(|e| {
                tracing::error!("listing this host's addresses: {e}");
                HashSet::new()
            })
        } else {
            HashSet::new()
        };
        Self {
            maps: Box::new(maps),
            min_ttl: cfg.min_ttl,
            max_ttl: cfg.max_ttl,
            max_pairs: cfg.max_learned,
            quota: cfg.max_learned_per_container,
            never_learn: cfg.never_learn.clone(),
            never_learn_host: cfg.never_learn_host,
            host,
            refuse_private: cfg.private_answers == config::PrivateAnswers::Refuse,
            budget: NameBudget::new(cfg.wildcard_names_per_minute),
            counters: BTreeMap::new(),
            quota_refusing: HashSet::new(),
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

    /// Whether an answer with `ip` may be learned as far as `never_learn` (and the host's
    /// addresses) go.
    fn never(&self, ip: IpAddr) -> bool {
        self.never_learn.iter().any(|n| n.contains(&ip))
            || (self.never_learn_host && self.host.contains(&ip))
    }

    /// Whether no answer may make `ip` allowed now: [`Learner::never`], or a private address
    /// refused by `private_answers`. Applied to what a reload carries over and to what a
    /// restart adopts, too (an agent before this one may have learned it under other rules).
    fn unlearnable(&self, ip: IpAddr) -> bool {
        self.never(ip) || (self.refuse_private && is_private(ip))
    }

    /// Charges `name` (allowed by a wildcard, about to be sent upstream) to `owner`'s budget
    /// of distinct names per minute; counts a refusal.
    pub fn charge_name(&mut self, policy: &str, owner: Owner, name: &str, now: Instant) -> Charge {
        let c = self.budget.charge(owner, name, now);
        if let Charge::Spent { first } = c {
            self.counters
                .entry(policy.to_string())
                .or_default()
                .name_budget_refused += 1;
            if first {
                tracing::warn!(
                    policy,
                    "DNS: {} asked {} distinct names under a wildcard within a minute ([dns] wildcard_names_per_minute): its new names are refused, and not sent upstream, until the window moves on (in audit mode only recorded)",
                    owner.describe(),
                    self.budget.per_minute()
                );
            }
        }
        c
    }

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
    fn learn_at(
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

    /// This host's addresses, as they are now (re-read every second). A learned or adopted
    /// address that became one goes at once, open connections or not. Returns how many went.
    pub fn set_host_addresses(&mut self, now: HashSet<IpAddr>) -> usize {
        if !self.never_learn_host || now == self.host {
            return 0;
        }
        let added: Vec<IpAddr> = now.difference(&self.host).copied().collect();
        self.host = now;
        let mut gone = 0;
        for (policy, p) in &mut self.policies {
            let mut purged = false;
            for &ip in &added {
                let had = p.ips.remove(&ip).is_some() | p.adopted.ips.remove(&ip).is_some();
                if !had {
                    continue;
                }
                purged = true;
                gone += 1;
                tracing::warn!(
                    policy = %policy,
                    "{ip} became an address of this host: no longer allowed as a learned address"
                );
                if let Err(e) = p.sync(self.maps.as_mut(), ip) {
                    tracing::error!("removing learned address {ip}: {e:#}");
                }
            }
            if purged {
                p.recount();
            }
        }
        gone
    }

    /// Forgets (name, address) pairs whose time is up, unless a TCP connection to the
    /// address is open; updates or removes the kernel entries. Returns how many went. An
    /// address whose kernel entry cannot be changed keeps its state, to be tried again.
    pub fn expire(&mut self, now: Instant) -> anyhow::Result<usize> {
        let due = self.policies.values().any(|p| {
            p.ips
                .values()
                .flat_map(|n| n.values())
                .any(|pair| pair.until <= now)
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
                    .is_some_and(|n| n.values().any(|pair| pair.until <= now));
                let adopted_due = p.adopted.ips.get(&ip).is_some_and(|(_, e)| *e <= now);
                if !names_due && !adopted_due {
                    continue;
                }
                if open.contains(&(p.slot, ip)) {
                    for pair in p.ips.get_mut(&ip).into_iter().flat_map(|n| n.values_mut()) {
                        if pair.until <= now {
                            pair.until = now + OPEN_CONNECTION_RECHECK;
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
                left.retain(|_, pair| pair.until > now);
                let expired = old_names.as_ref().map_or(0, |n| n.len() - left.len())
                    + usize::from(adopted_due);
                if !left.is_empty() {
                    p.ips.insert(ip, left);
                }
                if let Some(a) = old_adopted.clone().filter(|(_, e)| *e > now) {
                    p.adopted.ips.insert(ip, a);
                }
                match p.sync(self.maps.as_mut(), ip) {
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
            p.recount();
        }
        let policies = &self.policies;
        self.quota_refusing
            .retain(|(policy, o)| policies.get(policy).is_some_and(|p| p.held.contains_key(o)));
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
            held: HashMap::new(),
        };
        next.learned_ips()
            .filter(|ip| !self.unlearnable(**ip))
            .map(|ip| (*ip, next.value(*ip)))
            .collect()
    }

    /// After a (re)load: the policies, their slots and active rulesets. Learned pairs of
    /// policies that stay are kept (the new ruleset already holds them: see `entries_for`).
    pub fn rebind(&mut self, bindings: Vec<Binding>) {
        let mut old = std::mem::take(&mut self.policies);
        for b in bindings {
            let previous = old.remove(&b.policy);
            let mut adopted = match &previous {
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
            ips.retain(|ip, n| !n.is_empty() && !self.unlearnable(*ip));
            adopted.ips.retain(|ip, _| !self.unlearnable(*ip));
            let mut p = PolicyLearned {
                slot: b.slot,
                ruleset: b.ruleset,
                statics: b.compiled.entries.into_iter().collect(),
                names: b.names,
                ips,
                adopted,
                pairs: 0,
                held: HashMap::new(),
            };
            p.recount();
            self.policies.insert(b.policy, p);
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
                for (name, pair) in names {
                    out.push(LearnedEntry {
                        policy: policy.clone(),
                        name: name.clone(),
                        address: *ip,
                        expires_in_secs: left(&pair.until),
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

    /// The limits and how often they acted, for `egress-guard dns` (`limits`).
    pub fn limits(&self) -> serde_json::Value {
        let mut names: Vec<&String> = self.policies.keys().collect();
        for n in self.counters.keys() {
            if !self.policies.contains_key(n) {
                names.push(n);
            }
        }
        names.sort();
        let policies: Vec<serde_json::Value> = names
            .into_iter()
            .map(|name| {
                let p = self.policies.get(name);
                let mut v =
                    serde_json::to_value(self.counters.get(name).copied().unwrap_or_default())
                        .unwrap_or_default();
                v["policy"] = name.as_str().into();
                v["learned_pairs"] = p.map_or(0, |p| p.pairs).into();
                v["owners"] = p.map_or(0, |p| p.held.len()).into();
                v["owners_at_quota"] = p
                    .map_or(0, |p| p.held.values().filter(|n| **n >= self.quota).count())
                    .into();
                v
            })
            .collect();
        let mut host: Vec<String> = self.host.iter().map(ToString::to_string).collect();
        host.sort();
        serde_json::json!({
            "wildcard_names_per_minute": self.budget.per_minute(),
            "max_learned": self.max_pairs,
            "max_learned_per_container": self.quota,
            "private_answers": if self.refuse_private { "refuse" } else { "allow" },
            "host_addresses": if self.never_learn_host { serde_json::json!(host) } else { serde_json::Value::Null },
            "policies": policies,
        })
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

    /// The kernel side, in memory: entries by (ruleset, address), and open connections.
    #[derive(Clone, Default)]
    struct Fake(std::sync::Arc<std::sync::Mutex<FakeState>>);

    #[derive(Default)]
    struct FakeState {
        entries: HashMap<(u32, IpAddr), AllowValue>,
        open: HashSet<(u32, IpAddr)>,
    }

    impl Store for Fake {
        fn write(&mut self, ruleset: u32, ip: IpAddr, v: &AllowValue) -> anyhow::Result<()> {
            self.0.lock().unwrap().entries.insert((ruleset, ip), *v);
            Ok(())
        }
        fn remove(&mut self, ruleset: u32, ip: IpAddr) -> anyhow::Result<()> {
            self.0.lock().unwrap().entries.remove(&(ruleset, ip));
            Ok(())
        }
        fn open_connections(&self) -> anyhow::Result<HashSet<(u32, IpAddr)>> {
            Ok(self.0.lock().unwrap().open.clone())
        }
    }

    impl Fake {
        fn allowed(&self, ip: &str) -> bool {
            self.0
                .lock()
                .unwrap()
                .entries
                .contains_key(&(RULESET, ip.parse().unwrap()))
        }
        fn open(&self, ip: &str) {
            self.0
                .lock()
                .unwrap()
                .open
                .insert((SLOT, ip.parse().unwrap()));
        }
    }

    const SLOT: u32 = 3;
    const RULESET: u32 = 7;
    const A: Owner = Owner::Cgroup(100);
    const B: Owner = Owner::Cgroup(200);
    const C: Owner = Owner::Cgroup(300);

    fn test_names() -> PolicyNames {
        PolicyNames::new(&[
            HostnameRule {
                name: "*.svc.test".into(),
                protos: PROTO_TCP,
                ports: (443, 443),
                line: 1,
            },
            HostnameRule {
                name: "api.exact.test".into(),
                protos: PROTO_TCP,
                ports: (443, 443),
                line: 2,
            },
        ])
    }

    #[test]
    fn what_an_earlier_agent_learned_is_not_adopted_if_it_may_not_be_learned_now() {
        let text = "[dns]\nnever_learn = [\"host\"]\nprivate_answers = \"refuse\"\n[[policy]]\nname = \"p\"\ncgroups = [\"x\"]\n";
        let mut dns = crate::config::parse(text, std::path::Path::new("t.toml"))
            .unwrap()
            .dns;
        dns.never_learn_host = false;
        let fake = Fake::default();
        let mut l = Learner::new(fake.clone(), &dns);
        l.never_learn_host = true;
        l.host.insert("192.0.2.2".parse().unwrap());
        let names = test_names();
        let v = AllowValue {
            count: 1,
            rules: [rule(443, PROTO_TCP); MAX_PORT_RULES],
            learned_until: u32::try_from(boottime_secs() + 300).unwrap(),
        };
        let list = ["192.0.2.2", "10.0.0.9", "198.51.100.1"]
            .iter()
            .map(|a| (a.parse().unwrap(), v))
            .collect();
        l.adopt(HashMap::from([(
            "p".to_string(),
            (names.fingerprint(), list),
        )]));
        let carried: Vec<IpAddr> = l
            .entries_for("p", &Compiled::default(), &names)
            .into_iter()
            .map(|(ip, _)| ip)
            .collect();
        assert_eq!(carried, ["198.51.100.1".parse::<IpAddr>().unwrap()]);
        l.rebind(vec![Binding {
            policy: "p".into(),
            slot: SLOT,
            ruleset: RULESET,
            compiled: Compiled::default(),
            names,
        }]);
        let kept: Vec<IpAddr> = l.view("p").into_iter().map(|(ip, _, _)| ip).collect();
        assert_eq!(kept, ["198.51.100.1".parse::<IpAddr>().unwrap()]);
    }

    /// A learner for policy "p" allowing `*.svc.test:443` and `api.exact.test:443`.
    fn learner(table: &str) -> (Learner, Fake) {
        let text = format!("[dns]\n{table}\n[[policy]]\nname = \"p\"\ncgroups = [\"x\"]\n");
        let cfg = crate::config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let mut dns = cfg.dns;
        // Tests must not depend on this machine's addresses.
        dns.never_learn_host = false;
        let fake = Fake::default();
        let mut l = Learner::new(fake.clone(), &dns);
        l.never_learn_host = table.contains("\"host\"");
        let names = test_names();
        l.rebind(vec![Binding {
            policy: "p".into(),
            slot: SLOT,
            ruleset: RULESET,
            compiled: Compiled::default(),
            names,
        }]);
        (l, fake)
    }

    fn one(ip: &str) -> Vec<(IpAddr, u32)> {
        vec![(ip.parse().unwrap(), 300)]
    }

    fn counters(l: &Learner) -> Counters {
        l.counters.get("p").copied().unwrap_or_default()
    }

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

    #[test]
    fn never_learn_host_addresses_and_private_answers() {
        let (mut l, fake) = learner("never_learn = [\"host\", \"fd00:ec2::/32\"]");
        l.host = ["192.0.2.2", "2001:db8::2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let t0 = Instant::now();
        let answer: Vec<(IpAddr, u32)> = [
            "192.0.2.2",
            "::ffff:192.0.2.2",
            "fd00:ec2::254",
            "198.51.100.7",
        ]
        .iter()
        .map(|a| (a.parse().unwrap(), 60))
        .collect();
        let r = l.learn_at("p", "a.svc.test", &answer, A, t0).unwrap();
        assert_eq!(
            r.withheld,
            ["192.0.2.2", "fd00:ec2::254"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert!(fake.allowed("198.51.100.7") && !fake.allowed("192.0.2.2"));
        assert_eq!(counters(&l).not_learned, 2);
        // An address that becomes the host's goes at once.
        l.learn_at("p", "b.svc.test", &one("203.0.113.77"), A, t0)
            .unwrap();
        assert!(fake.allowed("203.0.113.77"));
        let mut host = l.host.clone();
        host.insert("203.0.113.77".parse().unwrap());
        assert_eq!(l.set_host_addresses(host), 1);
        assert!(!fake.allowed("203.0.113.77"));
        assert_eq!(l.policies["p"].held[&A], 1);
        // Private answers: learned by default, refused whole when switched off.
        let r = l.learn_at("p", "vpce.svc.test", &one("10.1.2.3"), A, t0);
        assert!(r.is_ok() && fake.allowed("10.1.2.3"));
        let (mut l, fake) = learner("private_answers = \"refuse\"");
        let mixed: Vec<(IpAddr, u32)> = vec![
            ("198.51.100.9".parse().unwrap(), 60),
            ("172.16.5.5".parse().unwrap(), 60),
        ];
        let e = l.learn_at("p", "vpce.svc.test", &mixed, A, t0).unwrap_err();
        assert!(
            matches!(&e, LearnError::Private(ips) if ips.len() == 1),
            "{e}"
        );
        assert!(!fake.allowed("198.51.100.9") && !fake.allowed("172.16.5.5"));
        assert_eq!(counters(&l).private_refused, 1);
    }

    #[test]
    fn expiry_keeps_the_counts_of_owners() {
        let (mut l, fake) =
            learner("max_learned_per_container = 2\nmin_ttl = \"1s\"\nmax_ttl = \"1s\"");
        let t0 = Instant::now();
        l.learn_at("p", "a.svc.test", &one("192.0.2.1"), A, t0)
            .unwrap();
        l.learn_at("p", "b.svc.test", &one("192.0.2.2"), A, t0)
            .unwrap();
        assert!(
            l.learn_at("p", "c.svc.test", &one("192.0.2.3"), A, t0)
                .is_err()
        );
        assert_eq!(l.expire(t0 + Duration::from_secs(2)).unwrap(), 2);
        assert!(!fake.allowed("192.0.2.1"));
        assert!(l.policies["p"].held.is_empty());
        assert!(l.quota_refusing.is_empty());
        assert!(
            l.learn_at("p", "c.svc.test", &one("192.0.2.3"), A, t0)
                .is_ok()
        );
    }

    #[test]
    fn the_name_budget_is_counted_per_policy() {
        let (mut l, _) = learner("wildcard_names_per_minute = 1");
        let t0 = Instant::now();
        assert_eq!(l.charge_name("p", A, "a.svc.test", t0), Charge::Within);
        assert_eq!(
            l.charge_name("p", A, "b.svc.test", t0),
            Charge::Spent { first: true }
        );
        assert_eq!(counters(&l).name_budget_refused, 1);
        let v = l.limits();
        assert_eq!(v["policies"][0]["name_budget_refused"], 1);
        assert_eq!(v["wildcard_names_per_minute"], 1);
    }
}
