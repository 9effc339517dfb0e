//! The proxy's `dns` records on their way to the audit task: a bounded queue, so a flood of
//! queries costs counted records, not the agent's memory.

use agent_common::event::EventHeader;
use serde_json::Value;
use tokio::sync::mpsc;

/// A `dns` record from the proxy: its fields, and the task behind the query when the kernel
/// saw it.
pub type DnsRecord = (Value, Option<EventHeader>);

/// How many `dns` records may wait for the audit task. The proxy makes one per query, as fast
/// as containers ask; beyond this many waiting, its records are counted and reported lost
/// rather than growing the agent's memory without end.
const DNS_RECORDS_QUEUED: usize = 16_384;

/// The DNS proxy's side of the audit trail.
#[derive(Clone)]
pub struct DnsRecords {
    tx: mpsc::Sender<DnsRecord>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl DnsRecords {
    /// Queues a record for the audit task, or counts it as lost when the queue is full.
    pub fn send(&self, record: DnsRecord) {
        if self.tx.try_send(record).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The proxy's records: its sender, and the audit task's receiver.
pub fn dns_records() -> (DnsRecords, DnsRecordQueue) {
    let (tx, rx) = mpsc::channel(DNS_RECORDS_QUEUED);
    let dropped = std::sync::Arc::default();
    (
        DnsRecords {
            tx,
            dropped: std::sync::Arc::clone(&dropped),
        },
        DnsRecordQueue { rx, dropped },
    )
}

/// The audit task's end: the records, and how many the proxy could not queue.
pub struct DnsRecordQueue {
    pub rx: mpsc::Receiver<DnsRecord>,
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}
