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
//!
//! Here: the [`Learner`], its settings and the name budget. Each concern has its file:
//! `learn` (an answer, the quota and the policy's limit, eviction), `pairs` (one policy's
//! learned pairs and its kernel entries), `expiry` (TTLs, held by open connections),
//! `guard` (never_learn, this host's addresses), `carry` (adoption after a restart,
//! carry-over across a reload), `listing` (for the CLI and audit records), `store` (the
//! kernel maps).

mod carry;
mod expiry;
mod guard;
mod learn;
mod listing;
mod pairs;
mod store;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use ipnet::IpNet;

use super::limits::{Charge, Counters, NameBudget, Owner, host_addresses};
use crate::config;

use carry::Adopted;
use pairs::PolicyLearned;

pub use carry::Binding;
pub use learn::{EVICTION_GRACE, LearnError, Learned};
pub use listing::{ADOPTED, LearnedEntry};
pub use store::Store;

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

    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
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
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use agent_common::{AllowValue, PROTO_TCP};

    use super::*;
    use crate::config::HostnameRule;
    use crate::dns::names::PolicyNames;
    use crate::policy::Compiled;

    /// The kernel side, in memory: entries by (ruleset, address), and open connections.
    #[derive(Clone, Default)]
    pub(super) struct Fake(std::sync::Arc<std::sync::Mutex<FakeState>>);

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
        pub(super) fn allowed(&self, ip: &str) -> bool {
            self.0
                .lock()
                .unwrap()
                .entries
                .contains_key(&(RULESET, ip.parse().unwrap()))
        }
        pub(super) fn open(&self, ip: &str) {
            self.0
                .lock()
                .unwrap()
                .open
                .insert((SLOT, ip.parse().unwrap()));
        }
    }

    pub(super) const SLOT: u32 = 3;
    pub(super) const RULESET: u32 = 7;
    pub(super) const A: Owner = Owner::Cgroup(100);
    pub(super) const B: Owner = Owner::Cgroup(200);
    pub(super) const C: Owner = Owner::Cgroup(300);

    pub(super) fn test_names() -> PolicyNames {
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

    /// A learner for policy "p" allowing `*.svc.test:443` and `api.exact.test:443`.
    pub(super) fn learner(table: &str) -> (Learner, Fake) {
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

    pub(super) fn one(ip: &str) -> Vec<(IpAddr, u32)> {
        vec![(ip.parse().unwrap(), 300)]
    }

    pub(super) fn counters(l: &Learner) -> Counters {
        l.counters.get("p").copied().unwrap_or_default()
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
