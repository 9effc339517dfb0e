//! The audit trail: kernel records from the `EVENTS` ring and the agent's own happenings,
//! decoded and enriched once (`record`), written to the sinks (`file`, the CloudWatch spool,
//! the in-memory feed).
//!
//! Nothing is dropped silently: the kernel counts records that did not fit in the ring
//! (`LOST_EVENTS`), and every increase becomes an `agent.events_lost` record. Nothing is lost
//! to a crash of the agent either: a batch read from the ring is consumed (`ring`) only once
//! its records are written to the audit file and then to the spool, in that order, so the
//! file holds every record the spool ships.

mod feed;
pub mod file;
pub mod record;
pub mod ring;
pub mod send_flows;

pub use feed::{EventFeed, RECENT_EVENTS};

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use agent_common::event::{EVENT_VERSION, EventHeader, ExecEvent, ExitEvent, NetEvent, kind};
use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use aya::maps::{MapData, PerCpuArray, PerCpuValues};

use crate::{config, dns::records::DnsRecordQueue, notice::Notice};
use record::Enricher;

/// A record of type `T` from ring bytes, if they are long enough.
fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    // Not a system call: ring bytes read as a plain-data record.
    // SAFETY: T is plain data and the slice holds at least size_of::<T>() bytes; unaligned
    // because ring records are only 8-byte aligned by contract.
    (bytes.len() >= std::mem::size_of::<T>())
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// `LOST_EVENTS` indexes: counted by the kernel, reported by the agent.
const LOST_TOTAL: u32 = 0;
const LOST_REPORTED: u32 = 1;

/// Allowed UDP sends to one destination that came through the ring (the kernel's send-flow
/// table was full), waiting to be written as one record.
struct Flow {
    record: Value,
    count: u64,
    since: Instant,
}

pub struct Audit {
    lost: PerCpuArray<MapData, u64>,
    enricher: Enricher,
    file: file::FileSink,
    flows: HashMap<(u64, u32, [u8; 16], u16), Flow>,
    /// The kernel's counts of allowed sends.
    send_flows: send_flows::SendFlows,
    aggregate: Duration,
    lost_reported: u64,
    /// The in-memory sink (for the control socket's `events`).
    feed: std::sync::Arc<EventFeed>,
    /// Records read from the ring that could not be decoded, not yet reported.
    undecodable: u64,
    /// The CloudWatch sink's spool, when `[cloudwatch]` is configured.
    spool: Option<SpoolLink>,
    /// Lines for the spool, appended once the audit file has them.
    spool_pending: Vec<String>,
    /// Written to the spool since its last sync.
    spool_dirty: bool,
    /// When the spool was last synced (it is synced every `SPOOL_SYNC_EVERY`, not per batch).
    spool_synced: Instant,
    /// Records the spool dropped (full) since start.
    spool_dropped: u64,
    /// `dns` records the proxy could not queue, not yet reported.
    dns_dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// CloudWatch metrics counted from the records (with the spool only).
    metrics: crate::cloudwatch::metrics::Metrics,
    metrics_since: Instant,
}

/// Records decoded per batch before the task yields to its other work. A batch keeps its ring
/// space until its records are in the sinks (then it is committed), so it is kept small: with
/// 2,048 a paced storm of 100,000 records/s overflowed the 1 MiB ring (2 % lost), with 512 none.
const DRAIN_BATCH: usize = 512;
/// How old the newest spooled record may get before the spool is synced: what a power loss
/// can cost (README, Known limits). A sync per batch cost a storm a third of its drain rate.
const SPOOL_SYNC_EVERY: Duration = Duration::from_millis(50);
/// The CloudWatch sink is woken before its flush interval when this much is spooled.
const SPOOL_WAKE_BYTES: u64 = 512 << 10;

/// The CloudWatch sink's side of the pipeline: its spool, and how to wake it.
pub struct SpoolLink {
    pub spool: std::sync::Arc<std::sync::Mutex<crate::cloudwatch::spool::Spool>>,
    pub wake: std::sync::Arc<tokio::sync::Notify>,
    /// How often the EMF metrics go into the spool.
    pub metrics_every: Duration,
}
/// The kernel wakes the agent only for a batch of records (see agent-ebpf's `wakeup_flags`);
/// anything less waits at most this long.
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// Allowed-send flows aggregated at once.
const MAX_FLOWS: usize = 10_000;

impl Audit {
    pub fn new(
        lost: PerCpuArray<MapData, u64>,
        send_flows: send_flows::SendFlows,
        cfg: &config::Audit,
        cgroup_root: PathBuf,
        feed: std::sync::Arc<EventFeed>,
    ) -> anyhow::Result<Self> {
        let file = file::FileSink::open(&cfg.file, cfg.file_max_bytes, cfg.file_keep)?;
        let mut audit = Self {
            lost,
            enricher: Enricher::new(cgroup_root),
            file,
            flows: HashMap::new(),
            send_flows,
            aggregate: Duration::from_secs(cfg.udp_aggregate_seconds),
            lost_reported: 0,
            feed,
            undecodable: 0,
            spool: None,
            spool_pending: Vec::new(),
            spool_dirty: false,
            spool_synced: Instant::now(),
            spool_dropped: 0,
            dns_dropped: Default::default(),
            metrics: Default::default(),
            metrics_since: Instant::now(),
        };
        // What earlier agents already reported; the rest (lost while no agent was reading)
        // is reported at the first check.
        audit.lost_reported = audit.lost_counter(LOST_REPORTED)?;
        Ok(audit)
    }

    /// Every record also goes to the CloudWatch sink's spool.
    pub fn set_spool(&mut self, link: SpoolLink) {
        self.spool = Some(link);
    }

    /// Where container names come from (`[docker] root`).
    pub fn set_docker_root(&mut self, root: std::path::PathBuf) {
        self.enricher.set_docker_root(root);
    }

    /// Lets records name containers from what discovery saw, also after they are gone.
    pub fn set_known_cgroups(&mut self, known: std::sync::Arc<crate::containers::KnownCgroups>) {
        self.enricher.known = Some(known);
    }

    /// Lets `net.*` records name the hostnames their destination was answered for.
    pub fn set_learner(
        &mut self,
        learner: std::sync::Arc<std::sync::Mutex<crate::dns::learned::Learner>>,
    ) {
        self.enricher.learned = Some(learner);
    }

    /// `LOST_EVENTS[index]`, summed over CPUs.
    fn lost_counter(&self, index: u32) -> anyhow::Result<u64> {
        Ok(self
            .lost
            .get(&index, 0)
            .context("reading LOST_EVENTS")?
            .iter()
            .sum())
    }

    /// Records how many lost records have been reported, for the next agent.
    fn store_reported(&mut self) -> anyhow::Result<()> {
        let mut values = vec![0u64; aya::util::nr_cpus().map_err(|(_, e)| e)?];
        values[0] = self.lost_reported;
        self.lost
            .set(LOST_REPORTED, PerCpuValues::try_from(values)?, 0)
            .context("writing LOST_EVENTS")?;
        Ok(())
    }

    /// Every sink gets every record.
    fn write(&mut self, record: Value) {
        match serde_json::to_string(&record) {
            Ok(line) => {
                if let Err(e) = self.file.write_line(&line) {
                    tracing::error!("audit file sink: {e:#}");
                }
                if self.spool.is_some() {
                    self.metrics.count(&record);
                    self.spool_pending.push(line);
                }
            }
            Err(e) => tracing::error!("audit record cannot be serialized: {e}"),
        }
        // Moved, not copied, into the in-memory sink.
        self.feed.push(std::sync::Arc::new(record));
    }

    /// The EMF metrics of the period that ended (or, with `now`, of the one so far), into the
    /// spool only (they are CloudWatch's).
    fn emit_metrics(&mut self, now: bool) {
        let Some(sp) = &self.spool else {
            return;
        };
        if !now && self.metrics_since.elapsed() < sp.metrics_every {
            return;
        }
        self.metrics_since = Instant::now();
        let pending = sp.spool.lock().map(|s| s.pending_bytes()).unwrap_or(0);
        let instance = self.enricher.identity();
        for rec in self.metrics.take(&instance, pending) {
            if let Ok(line) = serde_json::to_string(&rec) {
                self.spool_pending.push(line);
            }
        }
    }

    /// Appends lines the file already has to the spool.
    fn spool_lines(&mut self, lines: &[String]) {
        let Some(sp) = &self.spool else {
            return;
        };
        let dropped = match sp.spool.lock() {
            Ok(mut s) => s.append_all(lines),
            Err(_) => Err(anyhow::anyhow!("spool poisoned")),
        };
        self.spool_dirty = true;
        match dropped {
            Ok(0) => {}
            Ok(n) => {
                self.spool_dropped += n;
                tracing::error!("the CloudWatch spool is full: dropped its {n} oldest records");
                let rec = self.enricher.agent(
                    "agent.events_lost",
                    json!({ "count": n, "total": self.spool_dropped, "cause": "cloudwatch spool full: its oldest records were dropped" }),
                );
                // Into the file and the feed; the spool has just made room for it.
                self.write(rec);
            }
            Err(e) => tracing::error!("CloudWatch spool: {e:#}"),
        }
    }

    /// Makes what was spooled durable once the last sync is `SPOOL_SYNC_EVERY` old (or now,
    /// with `force`), and wakes the sink when a batch is waiting.
    fn sync_spool(&mut self, force: bool) {
        if !self.spool_dirty || (!force && self.spool_synced.elapsed() < SPOOL_SYNC_EVERY) {
            return;
        }
        self.spool_dirty = false;
        self.spool_synced = Instant::now();
        let Some(sp) = &self.spool else {
            return;
        };
        if let Ok(mut s) = sp.spool.lock() {
            if let Err(e) = s.sync() {
                tracing::error!("CloudWatch spool: {e:#}");
            }
            if s.pending_bytes() >= SPOOL_WAKE_BYTES {
                sp.wake.notify_one();
            }
        }
    }

    /// A network record: written at once, or (allowed UDP sends) added to its flow.
    fn on_event(&mut self, e: &NetEvent) -> Option<Value> {
        if record::is_allowed_send(e) {
            let key = record::flow_key(e);
            if let Some(f) = self.flows.get_mut(&key) {
                f.count += 1;
                return None;
            }
            let rec = self.enricher.net(e);
            // Bounded: a container spraying destinations gets its sends written one by one.
            if self.flows.len() >= MAX_FLOWS {
                return Some(rec);
            }
            self.flows.insert(
                key,
                Flow {
                    record: rec,
                    count: 1,
                    since: Instant::now(),
                },
            );
            return None;
        }
        Some(self.enricher.net(e))
    }

    /// Writes aggregated sends whose interval is over (all of them with `all`).
    fn flush_flows(&mut self, all: bool) {
        let due: Vec<_> = self
            .flows
            .iter()
            .filter(|(_, f)| all || f.since.elapsed() >= self.aggregate)
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            if let Some(mut f) = self.flows.remove(&k) {
                f.record["count"] = f.count.into();
                let rec = f.record;
                self.write(rec);
            }
        }
    }

    /// Writes the flows of the kernel's flipped send-flow table once it has settled, and
    /// flips when the aggregation interval is over.
    fn drain_send_flows(&mut self) {
        match self.send_flows.read() {
            Ok(Some(flows)) => {
                for f in &flows {
                    let mut rec = self.enricher.net(&f.as_event());
                    rec["count"] = f.count.into();
                    self.write(rec);
                }
                // In the file and the spool before the kernel's counts are deleted.
                self.flush();
                if let Err(e) = self.send_flows.drained(&flows) {
                    tracing::error!("{e:#}");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!("{e:#}"),
        }
        if let Err(e) = self.send_flows.flip(self.aggregate, false) {
            tracing::error!("{e:#}");
        }
    }

    /// At stop: writes every allowed send counted so far (a table being drained, then the
    /// current one). Sends after the last flip wait in the kernel for the next agent.
    async fn finish_send_flows(&mut self) {
        for _ in 0..2 {
            if self.send_flows.settling().is_none()
                && let Err(e) = self.send_flows.flip(self.aggregate, true)
            {
                tracing::error!("{e:#}");
                return;
            }
            if let Some(wait) = self.send_flows.settling() {
                tokio::time::sleep(wait).await;
            }
            self.drain_send_flows();
        }
    }

    fn check_lost(&mut self) {
        let dns = self
            .dns_dropped
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        if dns > 0 {
            tracing::error!(
                "{dns} dns records were lost: the DNS proxy made them faster than the audit trail could write them"
            );
            let rec = self.enricher.agent(
                "agent.events_lost",
                json!({ "count": dns, "cause": "dns records queue full: the DNS proxy answered faster than they could be written" }),
            );
            self.write(rec);
        }
        if self.undecodable > 0 {
            let count = std::mem::take(&mut self.undecodable);
            tracing::error!(
                "{count} kernel records could not be decoded (an older or newer program layout?)"
            );
            let rec = self.enricher.agent(
                "agent.events_lost",
                json!({ "count": count, "undecodable": true }),
            );
            self.write(rec);
        }
        match self.lost_counter(LOST_TOTAL) {
            Ok(total) if total > self.lost_reported => {
                let count = total - self.lost_reported;
                self.lost_reported = total;
                tracing::warn!("{count} audit records were lost: the kernel ring buffer was full");
                let rec = self.enricher.agent(
                    "agent.events_lost",
                    json!({ "count": count, "total": total }),
                );
                self.write(rec);
                // The report must be on disk before it counts as made.
                match self.file.flush() {
                    Ok(()) => {
                        if let Err(e) = self.store_reported() {
                            tracing::error!("{e:#}");
                        }
                    }
                    Err(e) => tracing::error!("audit file sink: {e:#}"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!("{e:#}"),
        }
    }

    fn on_notice(&mut self, n: Notice) {
        match n {
            Notice::Agent(type_, fields) => {
                let rec = self.enricher.agent(type_, fields);
                self.write(rec);
            }
            Notice::Policies(names, guarded) => {
                self.metrics.know_policies(&names);
                self.enricher.set_policies(names, guarded)
            }
        }
    }

    /// Runs until the notice channel closes (the daemon is stopping), then drains the ring.
    pub async fn run(
        mut self,
        ring: ring::Ring,
        mut notices: mpsc::UnboundedReceiver<Notice>,
        mut dns: DnsRecordQueue,
    ) -> anyhow::Result<()> {
        // Not a system call: tokio makes the caller vouch for the fd's lifetime.
        // SAFETY: the ring buffer owns its fd for as long as it lives, and the AsyncFd owns it.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("watching the audit ring buffer: {e}"))?;
        self.dns_dropped = dns.dropped.clone();
        self.check_lost();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut poll = tokio::time::interval(DRAIN_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopped = false;
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    // A bounded batch, then back to select!: signals, notices and the tick
                    // are served even while a container floods the ring.
                    if !self.drain(guard.get_inner_mut(), DRAIN_BATCH) {
                        guard.clear_ready();
                    }
                    self.flush();
                }
                Some((fields, task)) = dns.rx.recv() => {
                    let rec = self.enricher.dns(fields, task.as_ref());
                    self.write(rec);
                }
                n = notices.recv() => match n {
                    Some(n) => {
                        let stop = matches!(n, Notice::Agent("agent.stop", _));
                        if stop {
                            // Everything the kernel and the proxy recorded comes before the
                            // stop record.
                            while let Ok((fields, task)) = dns.rx.try_recv() {
                                let rec = self.enricher.dns(fields, task.as_ref());
                                self.write(rec);
                            }
                            while self.drain(ring.get_mut(), DRAIN_BATCH) {}
                            self.flush_flows(true);
                            self.finish_send_flows().await;
                            self.check_lost();
                        }
                        self.on_notice(n);
                        // The last record: other senders (the DNS proxy) may still be alive.
                        if stop {
                            stopped = true;
                            break;
                        }
                    }
                    None => break,
                },
                _ = poll.tick() => {
                    // Everything, batch by batch: the kernel asks for a wake-up only at the
                    // batch mark, so a backlog already past it is the timer's to clear.
                    while self.drain(ring.get_mut(), DRAIN_BATCH) {
                        tokio::task::yield_now().await;
                    }
                    self.flush();
                    self.drain_send_flows();
                    self.sync_spool(true);
                }
                _ = tick.tick() => {
                    self.emit_metrics(false);
                    self.enricher.refresh_clock();
                    self.flush_flows(false);
                    self.check_lost();
                    self.flush();
                }
            }
        }
        while self.drain(ring.get_mut(), DRAIN_BATCH) {}
        self.flush_flows(true);
        // After agent.stop, sends wait in the kernel for the next agent.
        if !stopped {
            self.finish_send_flows().await;
        }
        self.check_lost();
        self.emit_metrics(true);
        self.flush();
        self.sync_spool(true);
        Ok(())
    }

    /// Pushes what was written to disk: the file sink first, then the same lines into the
    /// spool (so that every record shipped is also in the file), and syncs the spool.
    fn flush(&mut self) {
        if let Err(e) = self.file.flush() {
            tracing::error!("audit file sink: {e:#}");
        }
        // Appending may drop the spool's oldest records and say so in a record of its own,
        // which goes through here again.
        while !self.spool_pending.is_empty() {
            let lines = std::mem::take(&mut self.spool_pending);
            self.spool_lines(&lines);
            if let Err(e) = self.file.flush() {
                tracing::error!("audit file sink: {e:#}");
            }
        }
        self.sync_spool(false);
    }

    /// Decodes up to `max` records and writes them to the sinks; only then gives their space
    /// back to the kernel. Returns whether more may be waiting.
    fn drain(&mut self, ring: &mut ring::Ring, max: usize) -> bool {
        let mut more = true;
        for _ in 0..max {
            let Some(item) = ring.read() else {
                more = false;
                break;
            };
            // The header's first fields say which record follows, and in which layout.
            let hdr = read::<EventHeader>(item);
            let decoded = match hdr.map(|h| (h.kind, h.version)) {
                Some((kind::PROC_EXEC, EVENT_VERSION)) => {
                    read::<ExecEvent>(item).map(|e| self.enricher.exec(&e))
                }
                Some((kind::PROC_EXIT, EVENT_VERSION)) => {
                    read::<ExitEvent>(item).map(|e| self.enricher.exit(&e))
                }
                Some((k, EVENT_VERSION)) if (kind::NET_CONNECT..=kind::NET_SOCKET).contains(&k) => {
                    read::<NetEvent>(item).and_then(|e| self.on_event(&e))
                }
                _ => {
                    self.undecodable += 1;
                    None
                }
            };
            if let Some(rec) = decoded {
                self.write(rec);
            }
        }
        if ring.uncommitted() > 0 {
            // In the file and the spool (a kill -9 from here on loses none of them), then
            // consumed. Allowed UDP sends that reached the ring because the kernel's send-flow
            // table was full are the exception: their count so far lives in memory until
            // the interval ends.
            self.flush();
            ring.commit();
        }
        more
    }
}
