//! Which names a policy lets its processes resolve, and with which port rules.
//!
//! `api.example.com` matches exactly that name. `*.example.com` matches one or more labels in
//! front of `example.com` (`a.example.com`, `a.b.example.com`), never `example.com` itself.
//! Matching is case-insensitive and ignores a trailing dot.

use std::collections::HashMap;

use agent_common::{MAX_PORT_RULES, PortRule};

use crate::config::HostnameRule;

/// In the part of a name that a wildcard matched: at most this many labels, each at most
/// `MAX_WILDCARD_LABEL` long. Longer ones are how DNS tunnels carry data (base32 chunks in
/// labels under a domain the tunnel owns); real service names are short.
pub const MAX_WILDCARD_LABELS: usize = 4;
pub const MAX_WILDCARD_LABEL: usize = 40;

/// The hostname rules of one policy, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct PolicyNames {
    exact: HashMap<String, Vec<PortRule>>,
    /// `(suffix without "*.", rules)`.
    wildcards: Vec<(String, Vec<PortRule>)>,
    /// [`fingerprint`] of the rules.
    fingerprint: u64,
}

/// Why a name is not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No rule of the policy covers the name.
    NotAllowed,
    /// A wildcard covers it, but its labels look like a tunnel (too many or too long).
    TunnelPattern,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "name_not_allowed",
            Refusal::TunnelPattern => "tunnel_pattern",
        }
    }
}

fn port_rule(h: &HostnameRule) -> PortRule {
    PortRule {
        lo: h.ports.0,
        hi: h.ports.1,
        protos: h.protos,
        _pad: [0; 3],
    }
}

/// A fingerprint of a policy's hostname rules (order does not matter), kept in the kernel so
/// a restarted agent knows whether the addresses learned before still apply.
pub fn fingerprint(rules: &[HostnameRule]) -> u64 {
    let mut items: Vec<String> = rules
        .iter()
        .map(|h| format!("{}|{}|{}|{}", h.name, h.protos, h.ports.0, h.ports.1))
        .collect();
    items.sort();
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in items.join("\n").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h | 1
}

/// Lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl PolicyNames {
    pub fn new(rules: &[HostnameRule]) -> Self {
        let mut n = PolicyNames {
            fingerprint: fingerprint(rules),
            ..Default::default()
        };
        for h in rules {
            match h.name.strip_prefix("*.") {
                Some(suffix) => match n.wildcards.iter_mut().find(|(s, _)| s == suffix) {
                    Some((_, r)) => r.push(port_rule(h)),
                    None => n.wildcards.push((suffix.to_string(), vec![port_rule(h)])),
                },
                None => n
                    .exact
                    .entry(h.name.clone())
                    .or_default()
                    .push(port_rule(h)),
            }
        }
        n
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Every port rule any of the policy's hostnames can grant.
    pub fn all_rules(&self) -> Vec<PortRule> {
        let mut out: Vec<PortRule> = Vec::new();
        for r in self
            .exact
            .values()
            .chain(self.wildcards.iter().map(|(_, r)| r))
            .flatten()
        {
            if !out.contains(r) {
                out.push(*r);
            }
        }
        out
    }

    /// The exact names (the ones the agent can resolve ahead of time).
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.exact.keys().map(String::as_str)
    }

    /// Whether an exact rule lists `name` (normalized). Names only a wildcard allows are the
    /// ones charged to a container's name budget: the policy does not list them.
    pub fn is_exact(&self, name: &str) -> bool {
        self.exact.contains_key(name)
    }

    /// The port rules that apply to `name` (normalized): those of its exact rule and of every
    /// wildcard covering it; or why it is refused.
    pub fn rules_for(&self, name: &str) -> Result<Vec<PortRule>, Refusal> {
        let mut rules: Vec<PortRule> = self.exact.get(name).cloned().unwrap_or_default();
        let mut tunnel = false;
        for (suffix, r) in &self.wildcards {
            let Some(front) = name
                .strip_suffix(suffix.as_str())
                .and_then(|f| f.strip_suffix('.'))
            else {
                continue;
            };
            if front.is_empty() {
                continue;
            }
            let labels: Vec<&str> = front.split('.').collect();
            if labels.len() > MAX_WILDCARD_LABELS
                || labels.iter().any(|l| l.len() > MAX_WILDCARD_LABEL)
            {
                tunnel = true;
                continue;
            }
            rules.extend(r.iter().copied());
        }
        if rules.is_empty() {
            return Err(if tunnel {
                Refusal::TunnelPattern
            } else {
                Refusal::NotAllowed
            });
        }
        rules.dedup();
        rules.truncate(MAX_PORT_RULES);
        Ok(rules)
    }
}

#[cfg(test)]
mod tests {
    use agent_common::PROTO_TCP;

    use super::*;

    fn names(list: &[(&str, u16)]) -> PolicyNames {
        let rules: Vec<HostnameRule> = list
            .iter()
            .map(|(n, p)| HostnameRule {
                name: n.to_string(),
                protos: PROTO_TCP,
                ports: (*p, *p),
                line: 1,
            })
            .collect();
        PolicyNames::new(&rules)
    }

    #[test]
    fn exact_names_match_only_themselves() {
        let n = names(&[("api.example.com", 443)]);
        assert_eq!(n.rules_for("api.example.com").unwrap()[0].lo, 443);
        for other in [
            "example.com",
            "x.api.example.com",
            "api.example.co",
            "pi.example.com",
        ] {
            assert_eq!(n.rules_for(other), Err(Refusal::NotAllowed), "{other}");
        }
    }

    #[test]
    fn wildcards_match_one_or_more_labels_but_not_the_base() {
        let n = names(&[("*.example.com", 443)]);
        for ok in ["a.example.com", "a.b.example.com", "a.b.c.d.example.com"] {
            assert!(n.rules_for(ok).is_ok(), "{ok}");
        }
        for no in [
            "example.com",
            "aexample.com",
            "a.example.com.evil.net",
            "com",
        ] {
            assert_eq!(n.rules_for(no), Err(Refusal::NotAllowed), "{no}");
        }
    }

    #[test]
    fn tunnel_shaped_names_under_a_wildcard_are_refused() {
        let n = names(&[("*.example.com", 443)]);
        let long = format!("{}.example.com", "a".repeat(MAX_WILDCARD_LABEL + 1));
        assert_eq!(n.rules_for(&long), Err(Refusal::TunnelPattern));
        assert_eq!(
            n.rules_for("a.b.c.d.e.example.com"),
            Err(Refusal::TunnelPattern)
        );
        // An exact rule still allows its own name, however long.
        let exact = names(&[(long.as_str(), 443)]);
        assert!(exact.rules_for(&long).is_ok());
    }

    #[test]
    fn rules_of_exact_and_wildcard_entries_add_up() {
        let n = names(&[("api.example.com", 443), ("*.example.com", 8443)]);
        let r = n.rules_for("api.example.com").unwrap();
        assert_eq!(r.iter().map(|r| r.lo).collect::<Vec<_>>(), [443, 8443]);
        assert_eq!(n.rules_for("b.example.com").unwrap().len(), 1);
        assert!(n.is_exact("api.example.com"));
        assert!(!n.is_exact("b.example.com"));
    }

    #[test]
    fn normalize_lowercases_and_drops_the_root_dot() {
        assert_eq!(normalize("API.Example.COM."), "api.example.com");
    }
}
