//! The DNS rebinding guard: addresses no answer makes allowed (`[dns] never_learn`, this
//! host's addresses) and private answers refused.

use std::{collections::HashSet, net::IpAddr};

use super::Learner;
use crate::dns::limits::is_private;

impl Learner {
    /// Whether an answer with `ip` may be learned as far as `never_learn` (and the host's
    /// addresses) go.
    pub(super) fn never(&self, ip: IpAddr) -> bool {
        self.never_learn.iter().any(|n| n.contains(&ip))
            || (self.never_learn_host && self.host.contains(&ip))
    }

    /// Whether no answer may make `ip` allowed now: [`Learner::never`], or a private address
    /// refused by `private_answers`. Applied to what a reload carries over and to what a
    /// restart adopts, too (an agent before this one may have learned it under other rules).
    pub(super) fn unlearnable(&self, ip: IpAddr) -> bool {
        self.never(ip) || (self.refuse_private && is_private(ip))
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
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::dns::learned::{
        LearnError,
        tests::{A, counters, learner, one},
    };

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
}
