//! What the learner shows: the learned pairs and limits (the CLI), an address's kernel
//! entry (`check`), the names of an address (audit records).

use std::{net::IpAddr, time::Instant};

use agent_common::AllowValue;

use super::Learner;

/// What listings call an address adopted from the agent that ran before.
pub const ADOPTED: &str = "(learned before the agent restarted)";

/// One learned (name, address) pair, for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LearnedEntry {
    pub policy: String,
    pub name: String,
    pub address: IpAddr,
    pub expires_in_secs: u64,
}

impl Learner {
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
