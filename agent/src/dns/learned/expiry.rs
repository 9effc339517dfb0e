//! Expiry: learned pairs go when their TTL runs out, unless an outgoing TCP connection to
//! the address is open (OPEN_CONNS).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use super::Learner;

/// How often an address whose TTL ran out, but which still has an open connection, is looked
/// at again.
const OPEN_CONNECTION_RECHECK: Duration = Duration::from_secs(5);

impl Learner {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::learned::tests::{A, learner, one};

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
}
