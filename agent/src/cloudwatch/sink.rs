//! The CloudWatch Logs sink: reads the spool, sends legal batches with PutLogEvents, and
//! acknowledges them only when CloudWatch accepted them.
//!
//! Errors are classified: throttling, 5xx and transport failures are retried with capped,
//! jittered backoff; a missing group or stream is created; access denied keeps everything in
//! the spool and retries slowly with a clear log line; an invalid-parameter batch is moved to a
//! quarantine file (with an `agent.cloudwatch_quarantined` record) instead of being retried
//! forever; events CloudWatch rejects (too old, too new) are counted and reported.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aws_sdk_cloudwatchlogs::{
    Client,
    error::{ProvideErrorMetadata as _, SdkError},
    types::InputLogEvent,
};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

use super::{
    batch::{self, Event},
    spool::{Position, Spool},
};
use crate::audit::Notice;

/// `[cloudwatch]` as the sink needs it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub log_group: String,
    pub log_stream: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub flush_interval: Duration,
}

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
    pub spool_pending_bytes: u64,
    /// The last failure, until a batch goes through again.
    pub last_error: Option<String>,
    /// From a record's time to CloudWatch accepting it, over the last accepted records (ms).
    pub latency_ms_p50: Option<u64>,
    pub latency_ms_p99: Option<u64>,
    /// The samples behind the percentiles (the last `LATENCY_SAMPLES`).
    #[serde(skip)]
    latencies: std::collections::VecDeque<u64>,
}

/// Delivery latencies kept for the percentiles in `status`.
const LATENCY_SAMPLES: usize = 10_000;

impl Health {
    fn record_latencies(&mut self, events: &[Event]) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
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

/// How a failed PutLogEvents is handled.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Throttling, 5xx, timeouts, connection errors: try again after a backoff.
    Retry(String),
    /// The group or stream is missing: create it, then try again.
    Missing,
    /// Credentials or permissions: keep the spool, retry slowly.
    Denied(String),
    /// CloudWatch refuses the batch itself: quarantine it.
    Invalid(String),
}

fn classify<E, R>(e: &SdkError<E, R>) -> Failure
where
    E: aws_sdk_cloudwatchlogs::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let Some(service) = e.as_service_error() else {
        let why =
            std::error::Error::source(e).map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
        return Failure::Retry(why.chars().take(300).collect());
    };
    let code = service.code().unwrap_or("");
    let msg = format!("{code}: {}", service.message().unwrap_or(""));
    match code {
        "ResourceNotFoundException" => Failure::Missing,
        "InvalidParameterException" | "ValidationException" | "SerializationException" => {
            Failure::Invalid(msg)
        }
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "ExpiredTokenException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken" => Failure::Denied(msg),
        _ => Failure::Retry(msg),
    }
}

/// Capped exponential backoff with jitter: 200 ms doubling to `cap`, each wait a random
/// 50–100 % of its step.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let step = Duration::from_millis(200)
        .saturating_mul(1u32 << attempt.min(16))
        .min(cap);
    let jitter = f64::from(crate::dns::upstream::random_id()) / f64::from(u16::MAX);
    step.mul_f64(0.5 + 0.5 * jitter)
}

pub struct Sink {
    settings: Settings,
    spool: Arc<Mutex<Spool>>,
    pub health: Arc<Mutex<Health>>,
    records: mpsc::UnboundedSender<Notice>,
    /// Woken when the spool has a batch's worth, or to stop.
    pub wake: Arc<Notify>,
    quarantine_dir: std::path::PathBuf,
}

impl Sink {
    pub fn new(
        settings: Settings,
        spool: Arc<Mutex<Spool>>,
        quarantine_dir: std::path::PathBuf,
        records: mpsc::UnboundedSender<Notice>,
    ) -> Self {
        let health = Health {
            log_group: settings.log_group.clone(),
            log_stream: settings.log_stream.clone(),
            ..Health::default()
        };
        Self {
            settings,
            spool,
            health: Arc::new(Mutex::new(health)),
            records,
            wake: Arc::new(Notify::new()),
            quarantine_dir,
        }
    }

    async fn client(&self) -> Client {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &self.settings.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(e) = &self.settings.endpoint {
            loader = loader.endpoint_url(e);
        }
        Client::new(&loader.load().await)
    }

    /// The next batch: as many spooled records as the rules allow, in time order, and the
    /// spool position after the last one.
    fn next_batch(&self) -> anyhow::Result<Option<(Vec<Event>, Position)>> {
        let mut spool = self
            .spool
            .lock()
            .map_err(|_| anyhow::anyhow!("spool poisoned"))?;
        let recs = spool.next_records(batch::MAX_BATCH_EVENTS)?;
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        let mut events = Vec::new();
        let mut bytes = 0;
        let mut end = None;
        for (line, pos) in recs {
            let e = Event {
                timestamp_ms: batch::timestamp_of(&line, now_ms),
                message: line,
            }
            .fit();
            if !batch::fits(&events, bytes, &e) {
                break;
            }
            bytes += e.cost();
            events.push(e);
            end = Some(pos);
        }
        let Some(end) = end else {
            return Ok(None);
        };
        spool.unread(end);
        if let Ok(mut h) = self.health.lock() {
            h.spool_pending_bytes = spool.pending_bytes();
        }
        batch::order(&mut events);
        Ok(Some((events, end)))
    }

    async fn ensure_stream(&self, client: &Client) -> Result<(), Failure> {
        let s = &self.settings;
        if let Err(e) = client
            .create_log_group()
            .log_group_name(&s.log_group)
            .send()
            .await
            && e.as_service_error().and_then(|x| x.code()) != Some("ResourceAlreadyExistsException")
        {
            return Err(classify(&e));
        }
        if let Err(e) = client
            .create_log_stream()
            .log_group_name(&s.log_group)
            .log_stream_name(&s.log_stream)
            .send()
            .await
            && e.as_service_error().and_then(|x| x.code()) != Some("ResourceAlreadyExistsException")
        {
            return Err(classify(&e));
        }
        Ok(())
    }

    /// Sends one batch; `Ok(rejected)` once CloudWatch accepted it.
    async fn put(&self, client: &Client, events: &[Event]) -> Result<u64, Failure> {
        let input: Vec<InputLogEvent> = events
            .iter()
            .map(|e| {
                InputLogEvent::builder()
                    .timestamp(e.timestamp_ms)
                    .message(e.message.clone())
                    .build()
                    .expect("timestamp and message are set")
            })
            .collect();
        let out = client
            .put_log_events()
            .log_group_name(&self.settings.log_group)
            .log_stream_name(&self.settings.log_stream)
            .set_log_events(Some(input))
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let rejected = out.rejected_log_events_info().map_or(0, |r| {
            let n = events.len() as i64;
            let too_old = r.too_old_log_event_end_index().map_or(0, i64::from);
            let expired = r.expired_log_event_end_index().map_or(0, i64::from);
            let too_new = r
                .too_new_log_event_start_index()
                .map_or(0, |i| n - i64::from(i));
            (too_old.max(expired) + too_new).clamp(0, n) as u64
        });
        Ok(rejected)
    }

    fn quarantine(&self, events: &[Event], why: &str) {
        let file = self.quarantine_dir.join(format!(
            "quarantine-{}.jsonl",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        ));
        let text: String = events.iter().map(|e| format!("{}\n", e.message)).collect();
        if let Err(e) = std::fs::write(&file, text) {
            tracing::error!("writing {}: {e}", file.display());
        }
        tracing::error!(
            "CloudWatch refused a batch of {} events ({why}); kept in {}",
            events.len(),
            file.display()
        );
        let _ = self.records.send(Notice::Agent(
            "agent.cloudwatch_quarantined",
            json!({ "count": events.len(), "reason": why, "file": file.display().to_string() }),
        ));
    }

    /// Runs until `stop` turns true and the spool is empty (or the task is dropped).
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let client = self.client().await;
        let mut attempt = 0u32;
        let mut stream_ready = false;
        loop {
            if !stream_ready {
                match self.ensure_stream(&client).await {
                    Ok(()) => stream_ready = true,
                    Err(f) => {
                        self.failed(&f);
                        attempt += 1;
                        tokio::time::sleep(self.wait_for(&f, attempt)).await;
                        continue;
                    }
                }
            }
            let batch = match self.next_batch() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("reading the CloudWatch spool: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some((events, end)) = batch else {
                if *stop.borrow() {
                    return;
                }
                // Nothing pending: wait for the flush interval, a full batch, or the stop.
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.flush_interval) => {}
                    _ = self.wake.notified() => {}
                    _ = stop.changed() => {}
                }
                continue;
            };
            match self.put(&client, &events).await {
                Ok(rejected) => {
                    attempt = 0;
                    if rejected > 0 {
                        tracing::warn!(
                            "CloudWatch rejected {rejected} events (too old or too new)"
                        );
                        let _ = self.records.send(Notice::Agent(
                            "agent.cloudwatch_rejected",
                            json!({ "count": rejected }),
                        ));
                    }
                    if let Ok(mut h) = self.health.lock() {
                        h.record_latencies(&events);
                    }
                    self.delivered(events.len() as u64, rejected, end);
                }
                Err(Failure::Invalid(why)) => {
                    self.quarantine(&events, &why);
                    if let Ok(mut h) = self.health.lock() {
                        h.quarantined_events += events.len() as u64;
                    }
                    self.acknowledge(end);
                }
                Err(Failure::Missing) => {
                    stream_ready = false;
                    self.rewind();
                }
                Err(f) => {
                    self.failed(&f);
                    self.rewind();
                    attempt += 1;
                    tokio::time::sleep(self.wait_for(&f, attempt)).await;
                }
            }
        }
    }

    fn wait_for(&self, f: &Failure, attempt: u32) -> Duration {
        match f {
            Failure::Denied(_) => Duration::from_secs(60),
            _ => backoff(attempt, Duration::from_secs(30)),
        }
    }

    fn failed(&self, f: &Failure) {
        let text = match f {
            Failure::Denied(m) => format!(
                "access denied ({m}): check the instance role's permissions (packaging/iam); the spool keeps every record, retrying every 60 s"
            ),
            Failure::Retry(m) => format!("{m}; retrying"),
            Failure::Missing => "log group or stream missing; creating it".into(),
            Failure::Invalid(m) => m.clone(),
        };
        tracing::warn!("CloudWatch: {text}");
        if let Ok(mut h) = self.health.lock() {
            h.last_error = Some(text);
        }
    }

    fn rewind(&self) {
        if let Ok(mut s) = self.spool.lock() {
            s.rewind();
        }
    }

    fn acknowledge(&self, end: Position) {
        if let Ok(mut s) = self.spool.lock()
            && let Err(e) = s.ack(end)
        {
            tracing::error!("acknowledging the CloudWatch spool: {e:#}");
        }
    }

    fn delivered(&self, n: u64, rejected: u64, end: Position) {
        self.acknowledge(end);
        if let Ok(mut h) = self.health.lock() {
            h.delivered_events += n - rejected;
            h.rejected_events += rejected;
            h.last_error = None;
            h.last_delivery = Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string());
            if let Ok(s) = self.spool.lock() {
                h.spool_pending_bytes = s.pending_bytes();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of 30,000 records (a few of them oversized) leaves the spool in legal batches,
    /// each record exactly once, in order.
    #[test]
    fn a_burst_leaves_the_spool_in_legal_batches() {
        let dir = std::env::temp_dir().join(format!("eg-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Arc::new(Mutex::new(Spool::open(&dir, 1 << 30).unwrap()));
        let mut sent = Vec::new();
        {
            let mut s = spool.lock().unwrap();
            for i in 0..30_000u32 {
                let pad = if i % 7_000 == 0 { 300_000 } else { 150 };
                let line = format!(
                    "{{\"version\":1,\"ts\":\"2026-11-22T05:00:{:02}.{:09}Z\",\"n\":{i},\"pad\":\"{}\"}}",
                    i / 1000 % 60,
                    i,
                    "p".repeat(pad)
                );
                s.append(&line).unwrap();
                sent.push(i);
            }
        }
        let (tx, _rx) = mpsc::unbounded_channel();
        let sink = Sink::new(
            Settings {
                log_group: "g".into(),
                log_stream: "s".into(),
                region: None,
                endpoint: None,
                flush_interval: Duration::from_secs(1),
            },
            spool.clone(),
            dir.clone(),
            tx,
        );
        let mut seen = Vec::new();
        let mut batches = 0;
        while let Some((events, end)) = sink.next_batch().unwrap() {
            batch::check(&events).unwrap_or_else(|e| panic!("batch {batches}: {e}"));
            for e in &events {
                let v: serde_json::Value = serde_json::from_str(&e.message)
                    .unwrap_or_else(|_| serde_json::json!({ "n": -1 }));
                if e.message.ends_with(batch::TRUNCATED_MARKER) {
                    // Cut to fit: the record's number is still at its start.
                    let n = e.message.split("\"n\":").nth(1).unwrap();
                    seen.push(n.split(',').next().unwrap().parse::<u32>().unwrap());
                } else {
                    seen.push(v["n"].as_u64().unwrap() as u32);
                }
            }
            spool.lock().unwrap().ack(end).unwrap();
            batches += 1;
        }
        assert_eq!(seen, sent, "every record once, in order");
        assert!(batches >= 3, "{batches} batches");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let cap = Duration::from_secs(30);
        for attempt in 0..20 {
            let d = backoff(attempt, cap);
            let step = Duration::from_millis(200)
                .saturating_mul(1u32 << attempt.min(16))
                .min(cap);
            assert!(d >= step / 2 && d <= step, "{attempt}: {d:?}");
        }
    }
}
