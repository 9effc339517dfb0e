//! One policy's learned (name, address) pairs, who holds them, and the kernel entry each
//! address gets (static rules merged with those of its fresh names).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Instant,
};

use agent_common::{AllowValue, MAX_PORT_RULES, PortRule};
use ipnet::IpNet;

use super::{
    carry::Adopted,
    store::{Store, until_boottime},
};
use crate::dns::{limits::Owner, names::PolicyNames};

/// One learned (name, address) pair.
#[derive(Clone, Debug)]
pub(super) struct Pair {
    /// Until when it stays (the latest answer's TTL, clamped).
    pub(super) until: Instant,
    /// Who got it in an answer, and when last. A pair counts against the quota of each of
    /// its owners, and is evicted only when its last owner lets go of it.
    pub(super) owners: Vec<(Owner, Instant)>,
}

impl Pair {
    pub(super) fn stamp_of(&self, owner: Owner) -> Option<Instant> {
        self.owners
            .iter()
            .find(|(o, _)| *o == owner)
            .map(|(_, at)| *at)
    }
}

pub(super) struct PolicyLearned {
    pub(super) slot: u32,
    pub(super) ruleset: u32,
    /// The static entries, to merge their rules into a learned address's entry.
    pub(super) statics: HashMap<IpNet, AllowValue>,
    pub(super) names: PolicyNames,
    /// Address → the names it was answered for.
    pub(super) ips: HashMap<IpAddr, BTreeMap<String, Pair>>,
    /// Addresses the agent before a restart had learned (names unknown).
    pub(super) adopted: Adopted,
    /// Learned pairs in `ips`.
    pub(super) pairs: usize,
    /// Pairs each owner holds (a pair with two owners counts for both).
    pub(super) held: HashMap<Owner, usize>,
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
    pub(super) fn value(&self, ip: IpAddr) -> AllowValue {
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

    pub(super) fn learned_ips(&self) -> impl Iterator<Item = &IpAddr> {
        self.ips.keys().chain(
            self.adopted
                .ips
                .keys()
                .filter(|ip| !self.ips.contains_key(*ip)),
        )
    }

    /// Puts the kernel entry of `ip` in line with what is learned for it: the merged entry,
    /// else the static exact entry of its own, else none (a covering CIDR decides again).
    pub(super) fn sync(&self, maps: &mut dyn Store, ip: IpAddr) -> anyhow::Result<()> {
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
    pub(super) fn recount(&mut self) {
        self.pairs = self.ips.values().map(BTreeMap::len).sum();
        self.held.clear();
        for pair in self.ips.values().flat_map(BTreeMap::values) {
            for (o, _) in &pair.owners {
                *self.held.entry(*o).or_default() += 1;
            }
        }
    }

    pub(super) fn has(&self, ip: IpAddr, name: &str) -> bool {
        self.ips.get(&ip).is_some_and(|n| n.contains_key(name))
    }

    pub(super) fn holds(&self, ip: IpAddr, name: &str, owner: Owner) -> bool {
        self.ips
            .get(&ip)
            .and_then(|n| n.get(name))
            .is_some_and(|p| p.stamp_of(owner).is_some())
    }

    /// `owner` lets go of (ip, name); the pair goes when it was the last owner. Returns
    /// whether the pair went.
    pub(super) fn disown(&mut self, ip: IpAddr, name: &str, owner: Owner) -> bool {
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
