//! The kernel's counts of allowed UDP sends (agent-ebpf's `send_flows`): two pinned per-CPU
//! tables, one the programs count into (`SEND_FLOW_SIDE`), one the agent drains.
//!
//! Every `udp_aggregate_seconds` the agent flips the side, waits [`SETTLE`] for programs that
//! read the old side to finish counting, then writes one `net.send` record per entry and only
//! then deletes the entries. The counts live in pinned maps: a killed agent loses none, the
//! next one drains them (a kill between writing and deleting writes them twice, like the
//! ring's at-least-once delivery).

use std::time::{Duration, Instant};

use agent_common::event::{
    EVENT_VERSION, EventHeader, NetEvent, SendFlowCount, SendFlowKey, VERDICT_ALLOW, kind, reason,
};
use anyhow::Context as _;
use aya::maps::{Array, MapData};

use crate::kernel::SendFlowTable;

/// How long after a flip the old table is drained. A program counts within microseconds of
/// reading the side; only one preempted for longer than this between the two could count
/// into an entry being drained (and lose that one count).
pub const SETTLE: Duration = Duration::from_millis(50);

/// One flow's sends in the drained interval, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub key: SendFlowKey,
    pub count: u64,
    /// The earliest CPU's first send: its time and thread.
    pub first_ns: u64,
    pub tid: u32,
}

impl Flow {
    /// The flow as the ring record of its first send, for the enricher.
    pub fn as_event(&self) -> NetEvent {
        let k = &self.key;
        NetEvent {
            hdr: EventHeader {
                kind: kind::NET_SEND,
                version: EVENT_VERSION,
                slot: k.slot,
                ts_ns: self.first_ns,
                pid: self.tid,
                tgid: k.tgid,
                uid: k.uid,
                _pad: 0,
                cgroup_id: k.cgroup_id,
                comm: k.comm,
            },
            addr: k.addr,
            port: k.port,
            proto: k.proto,
            verdict: VERDICT_ALLOW,
            v4: k.v4,
            reason: reason::RULE,
            ..NetEvent::default()
        }
    }
}

/// Sums one flow's per-CPU counts; `None` if no CPU counted a send.
pub fn sum(key: SendFlowKey, per_cpu: &[SendFlowCount]) -> Option<Flow> {
    let count: u64 = per_cpu.iter().map(|c| c.count).sum();
    let first = per_cpu
        .iter()
        .filter(|c| c.count > 0)
        .min_by_key(|c| c.first_ns)?;
    Some(Flow {
        key,
        count,
        first_ns: first.first_ns,
        tid: first.tid,
    })
}

pub struct SendFlows {
    side: Array<MapData, u32>,
    tables: [SendFlowTable; 2],
    /// The table flipped away from, and when.
    flipped: Option<(u32, Instant)>,
    last_flip: Instant,
}

impl SendFlows {
    pub fn new(side: Array<MapData, u32>, tables: [SendFlowTable; 2]) -> Self {
        Self {
            side,
            tables,
            flipped: None,
            last_flip: Instant::now(),
        }
    }

    /// Makes the programs count into the other table, if `every` has passed since the last
    /// flip (always with `now`) and the last flipped table has been drained.
    pub fn flip(&mut self, every: Duration, now: bool) -> anyhow::Result<()> {
        if self.flipped.is_some() || (!now && self.last_flip.elapsed() < every) {
            return Ok(());
        }
        let current = self.side.get(&0, 0).context("reading SEND_FLOW_SIDE")? & 1;
        self.side
            .set(0, 1 - current, 0)
            .context("writing SEND_FLOW_SIDE")?;
        self.flipped = Some((current, Instant::now()));
        self.last_flip = Instant::now();
        Ok(())
    }

    /// How long until the flipped table may be drained; `None` if none is waiting.
    pub fn settling(&self) -> Option<Duration> {
        self.flipped
            .map(|(_, at)| SETTLE.saturating_sub(at.elapsed()))
    }

    /// The flipped table's flows, once it has settled; `None` while there is none to drain.
    pub fn read(&self) -> anyhow::Result<Option<Vec<Flow>>> {
        let Some((table, at)) = self.flipped else {
            return Ok(None);
        };
        if at.elapsed() < SETTLE {
            return Ok(None);
        }
        let map = &self.tables[table as usize];
        let mut flows = Vec::new();
        for key in map.keys() {
            let key = key.context("listing a send-flow table")?;
            // Only this agent deletes entries, so a listed one is there to read.
            let values = map.get(&key, 0).context("reading a send flow")?;
            if let Some(flow) = sum(key, &values) {
                flows.push(flow);
            }
        }
        Ok(Some(flows))
    }

    /// Deletes the flows read (once their records are written) and ends the drain. An entry
    /// made after the read (a program preempted past `SETTLE`) stays for the table's next
    /// drain.
    pub fn drained(&mut self, flows: &[Flow]) -> anyhow::Result<()> {
        let Some((table, _)) = self.flipped.take() else {
            return Ok(());
        };
        let map = &mut self.tables[table as usize];
        for f in flows {
            map.remove(&f.key).context("deleting a drained send flow")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(count: u64, first_ns: u64, tid: u32) -> SendFlowCount {
        SendFlowCount {
            count,
            first_ns,
            tid,
            _pad: 0,
        }
    }

    #[test]
    fn a_flow_sums_its_cpus_and_starts_at_the_earliest_send() {
        let key = SendFlowKey {
            tgid: 7,
            ..Default::default()
        };
        let f = sum(key, &[at(0, 0, 0), at(3, 500, 11), at(2, 200, 12)]).unwrap();
        assert_eq!((f.count, f.first_ns, f.tid), (5, 200, 12));
        let e = f.as_event();
        assert_eq!(
            (e.hdr.kind, e.hdr.tgid, e.hdr.pid, e.verdict),
            (kind::NET_SEND, 7, 12, VERDICT_ALLOW)
        );
        assert_eq!(sum(key, &[at(0, 0, 0), at(0, 0, 0)]), None);
    }
}
