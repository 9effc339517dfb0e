//! The kernel side of learning ([`Store`]: the policy's exact-address maps, the open
//! connections) and the clock of `AllowValue::learned_until`.

use std::{collections::HashSet, net::IpAddr, time::Instant};

use agent_common::AllowValue;
use nix::time::{ClockId, clock_gettime};

use crate::kernel::maps::LearnMaps;

/// CLOCK_BOOTTIME in whole seconds (the clock of `AllowValue::learned_until`).
pub(super) fn boottime_secs() -> u64 {
    // CLOCK_BOOTTIME exists on every kernel this runs on.
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |ts| ts.tv_sec() as u64)
}

/// `until` as CLOCK_BOOTTIME seconds (rounded up, at least 1: 0 means "not learned").
pub(super) fn until_boottime(until: Instant) -> u32 {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn learned_until_is_in_boottime_seconds_and_never_zero() {
        let now = boottime_secs();
        let t = u64::from(until_boottime(Instant::now() + Duration::from_secs(90)));
        assert!((now + 89..=now + 92).contains(&t), "{now} {t}");
        assert!(until_boottime(Instant::now()) >= 1);
    }
}
