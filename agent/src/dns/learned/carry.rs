//! Learned addresses across a restart (adopted from the kernel entries of the agent before)
//! and across a reload (carried into the new rulesets, then [`Learner::rebind`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use agent_common::{AllowValue, MAX_PORT_RULES, PortRule};

use super::{Learner, pairs::PolicyLearned, store::boottime_secs};
use crate::{dns::names::PolicyNames, policy::Compiled};

/// Adopted addresses: their port rules and until when they stay.
type AdoptedIps = HashMap<IpAddr, (Vec<PortRule>, Instant)>;

/// Addresses adopted from the agent before a restart, and the fingerprint of the hostname
/// rules they were learned under.
#[derive(Clone, Debug, Default)]
pub(super) struct Adopted {
    pub(super) hostnames: u64,
    pub(super) ips: AdoptedIps,
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

/// Where one policy's learned addresses go.
pub struct Binding {
    pub policy: String,
    pub slot: u32,
    /// The policy's active ruleset id.
    pub ruleset: u32,
    pub compiled: Compiled,
    pub names: PolicyNames,
}

impl Learner {
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
}

#[cfg(test)]
mod tests {
    use agent_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::config::HostnameRule;
    use crate::dns::learned::tests::{Fake, RULESET, SLOT, test_names};

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
}
