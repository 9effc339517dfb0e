//! Compiles a policy's rules into the entries of the kernel's address maps.
//!
//! The kernel looks an address up once: exact addresses in a hash map, otherwise the longest
//! matching CIDR in an LPM trie. For that single lookup to be right, every entry carries its
//! own port rules *and* those of every CIDR that contains it.

use std::collections::HashMap;

use agent_common::{AllowValue, MAX_PORT_RULES, PortRule};
use ipnet::IpNet;

use crate::config::{Policy, Problem, Rule, enclosing};

/// The kernel entries of one policy: `(network, rules)`; host routes (/32, /128) go to the
/// exact maps, the rest to the LPM tries.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Compiled {
    pub entries: Vec<(IpNet, AllowValue)>,
}

impl Compiled {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Builds the map entries of `policy`; refuses a network on which more port rules apply
/// than one kernel entry can hold.
pub fn compile(policy: &Policy) -> Result<Compiled, Vec<Problem>> {
    let mut by_net: HashMap<IpNet, Vec<&Rule>> = HashMap::new();
    for r in &policy.rules {
        by_net.entry(r.net).or_default().push(r);
    }
    let mut problems = Vec::new();
    let mut entries = Vec::with_capacity(by_net.len());
    for (net, own) in &by_net {
        let applying: Vec<&Rule> = enclosing(*net)
            .filter_map(|n| by_net.get(&n))
            .flatten()
            .copied()
            .collect();
        if applying.len() > MAX_PORT_RULES {
            problems.push(Problem {
                line: own[0].line,
                reason: format!(
                    "policy {:?}: {} port rules apply to {net} (its own and those of the CIDRs containing it); at most {MAX_PORT_RULES} fit: merge port ranges",
                    policy.name,
                    applying.len()
                ),
            });
            continue;
        }
        let mut value = AllowValue {
            count: applying.len() as u32,
            ..Default::default()
        };
        for (slot, r) in value.rules.iter_mut().zip(&applying) {
            *slot = PortRule {
                lo: r.ports.0,
                hi: r.ports.1,
                protos: r.protos,
                _pad: [0; 3],
            };
        }
        entries.push((*net, value));
    }
    if problems.is_empty() {
        // Deterministic order: easier to read in listings and tests.
        entries.sort_by_key(|e| e.0);
        Ok(Compiled { entries })
    } else {
        problems.sort_by_key(|p| p.line);
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use agent_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::config::parse;

    fn policy(allow: &str) -> Policy {
        let text = format!("[[policy]]\nname = \"p\"\ncgroups = [\"x\"]\nallow = [{allow}]\n");
        parse(&text, Path::new("t.toml"))
            .unwrap()
            .policies
            .remove(0)
    }

    fn value_of<'a>(c: &'a Compiled, net: &str) -> &'a AllowValue {
        let net: IpNet = net.parse().unwrap();
        &c.entries.iter().find(|(n, _)| *n == net).unwrap().1
    }

    #[test]
    fn contained_entries_inherit_enclosing_rules() {
        let c = compile(&policy(
            "\"10.0.0.0/8:80\", \"10.1.0.0/16:443\", \"10.1.2.3:22\", \"udp/10.1.2.3:53\"",
        ))
        .unwrap();
        assert_eq!(c.len(), 3);
        let host = value_of(&c, "10.1.2.3/32");
        assert_eq!(host.count, 4);
        for (proto, port) in [
            (PROTO_TCP, 80),
            (PROTO_TCP, 443),
            (PROTO_TCP, 22),
            (PROTO_UDP, 53),
        ] {
            assert!(host.allows(proto, port), "{proto} {port}");
        }
        assert!(!host.allows(PROTO_UDP, 80));
        let mid = value_of(&c, "10.1.0.0/16");
        assert!(
            mid.allows(PROTO_TCP, 80) && mid.allows(PROTO_TCP, 443) && !mid.allows(PROTO_TCP, 22)
        );
        let top = value_of(&c, "10.0.0.0/8");
        assert!(top.allows(PROTO_TCP, 80) && !top.allows(PROTO_TCP, 443));
    }

    #[test]
    fn too_many_rules_on_one_address_is_refused() {
        let allow: Vec<String> = (1..=9).map(|p| format!("\"192.0.2.1:{p}\"")).collect();
        let e = compile(&policy(&allow.join(", "))).unwrap_err();
        assert!(
            e[0].reason.contains("9 port rules apply to 192.0.2.1/32"),
            "{}",
            e[0].reason
        );
    }
}
