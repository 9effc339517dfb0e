//! What `status` says about CloudWatch delivery. Apart from the sink (which needs the AWS
//! SDK, and is left out of builds without the `cloudwatch` feature, such as the fuzz targets').

use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::ser::SerializeStruct as _;

use super::{
    batch::{self, Event},
    spool::Spool,
};

/// What `status` says about delivery.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Health {
    pub log_group: String,
    pub log_stream: String,
    /// When CloudWatch last accepted a batch (RFC 3339).
    pub last_delivery: Option<String>,
    pub delivered_events: u64,
    pub rejected_events: u64,
    pub quarantined_events: u64,
    /// Requests that got no answer in time (`ATTEMPT_TIMEOUT`, or no connection within the
    /// SDK's connect timeout), since start. Each was retried.
    pub timeouts: u64,
    /// `spool_pending_bytes` and `oldest_undelivered_age_ms`, read from the spool whenever
    /// status is asked.
    #[serde(flatten)]
    pub(super) backlog: Backlog,
    /// The last failure, until a batch goes through again.
    pub last_error: Option<String>,
    /// From a record's time to CloudWatch accepting it, over the last accepted records (ms).
    pub latency_ms_p50: Option<u64>,
    pub latency_ms_p99: Option<u64>,
    /// The samples behind the percentiles (the last `LATENCY_SAMPLES`).
    #[serde(skip)]
    #[cfg_attr(not(feature = "cloudwatch"), allow(dead_code))] // used by the sink
    pub(super) latencies: std::collections::VecDeque<u64>,
}

/// The spool's backlog as status shows it, live: `spool_pending_bytes` (bytes spooled and not
/// yet accepted by CloudWatch, including a batch in flight) and `oldest_undelivered_age_ms`
/// (now minus the `ts` of the oldest record not yet accepted; null when none waits). Null
/// both when the spool cannot be read.
#[derive(Clone, Default)]
pub(super) struct Backlog(Option<Arc<Mutex<Spool>>>);

impl Backlog {
    #[cfg_attr(not(feature = "cloudwatch"), allow(dead_code))] // used by the sink
    pub(super) fn of(spool: Arc<Mutex<Spool>>) -> Self {
        Self(Some(spool))
    }
}

impl std::fmt::Debug for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backlog")
    }
}

impl serde::Serialize for Backlog {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The spool's lock is taken under the Health lock (the control server holds it while
        // serializing): the sink never locks Health while it holds the spool.
        let (bytes, oldest) = match self.0.as_ref().map(|sp| sp.lock()) {
            Some(Ok(sp)) => (Some(sp.pending_bytes()), sp.oldest_pending().ok().flatten()),
            _ => (None, None),
        };
        let age = oldest
            .as_deref()
            .and_then(batch::record_time_ms)
            .map(|t| (now_ms() - t).max(0) as u64);
        let mut st = s.serialize_struct("Backlog", 2)?;
        st.serialize_field("spool_pending_bytes", &bytes)?;
        st.serialize_field("oldest_undelivered_age_ms", &age)?;
        st.end()
    }
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// Delivery latencies kept for the percentiles in `status`.
#[cfg_attr(not(feature = "cloudwatch"), allow(dead_code))]
const LATENCY_SAMPLES: usize = 10_000;

impl Health {
    #[cfg_attr(not(feature = "cloudwatch"), allow(dead_code))] // used by the sink
    pub(super) fn record_latencies(&mut self, events: &[Event]) {
        let now = now_ms();
        for e in events {
            self.latencies
                .push_back((now - e.timestamp_ms).max(0) as u64);
            if self.latencies.len() > LATENCY_SAMPLES {
                self.latencies.pop_front();
            }
        }
        let mut v: Vec<u64> = self.latencies.iter().copied().collect();
        v.sort_unstable();
        let at = |p: f64| {
            v.get(((v.len() as f64 - 1.0) * p).round() as usize)
                .copied()
        };
        self.latency_ms_p50 = at(0.5);
        self.latency_ms_p99 = at(0.99);
    }
}
