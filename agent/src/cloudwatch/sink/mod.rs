//! The CloudWatch Logs sink: reads the spool, sends legal batches with PutLogEvents, and
//! acknowledges them only when CloudWatch accepted them.
//!
//! Errors are classified: throttling, 5xx, transport failures and requests that get no answer
//! in time (see `ATTEMPT_TIMEOUT`) are retried with capped, jittered backoff; a missing group
//! or stream is created, after the same backoff; access denied keeps everything in the spool
//! and retries slowly with a clear log line; an invalid-parameter batch is moved to a
//! quarantine file (with an `agent.cloudwatch_quarantined` record) instead of being retried
//! forever, and stays spooled while that file cannot be written; events CloudWatch rejects
//! (too old, too new) are counted and reported.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
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

pub use super::health::Health;
use super::{
    batch::{self, Batch, Event},
    health::{Backlog, now_ms},
    spool::{Position, Spool},
};
use crate::notice::Notice;

/// How long one request (PutLogEvents, CreateLogGroup, CreateLogStream) may go unanswered
/// before it is abandoned and retried with the backoff. CloudWatch answers a PutLogEvents in
/// well under a second, and the largest batch (1 MiB) uploads in under a second at 10 Mbit/s;
/// 10 s leaves room for a slow link (a full batch still fits at ~1 Mbit/s, so a timeout never
/// livelocks delivery) while a request that will never be answered costs 10 flush intervals
/// (at the 1 s default), which the spool absorbs, instead of stalling delivery forever.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole call, attempt included (the SDK's own retries are off: this loop retries, so
/// that every timed-out attempt is counted, logged and backed off like any other failure).
/// A backstop a little above one attempt.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);

/// `[cloudwatch]` as the sink needs it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub log_group: String,
    pub log_stream: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub flush_interval: Duration,
}

/// How a failed PutLogEvents is handled.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Throttling, 5xx, connection errors: try again after a backoff.
    Retry(String),
    /// No answer in time: try again after a backoff (counted in `Health::timeouts`).
    Timeout(String),
    /// The group or stream is missing: create it after a backoff, then try again.
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
        let why: String = why.chars().take(300).collect();
        let timed_out = match e {
            SdkError::TimeoutError(_) => true,
            SdkError::DispatchFailure(d) => d.is_timeout(),
            _ => false,
        };
        return if timed_out {
            Failure::Timeout(why)
        } else {
            Failure::Retry(why)
        };
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
    let jitter = f64::from(crate::random::random_u16()) / f64::from(u16::MAX);
    step.mul_f64(0.5 + 0.5 * jitter)
}

/// Writes a quarantine file for `events` in `dir` and makes it durable (file and directory
/// entry); returns its path. A file that could not be written whole is removed.
fn write_quarantine(dir: &Path, events: &[Event]) -> std::io::Result<PathBuf> {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let text: String = events.iter().map(|e| format!("{}\n", e.message)).collect();
    // A new name, never an existing quarantine file (two in the same millisecond).
    let (file, mut f) = (0..100)
        .map(|n| match n {
            0 => dir.join(format!("quarantine-{ms}.jsonl")),
            n => dir.join(format!("quarantine-{ms}-{n}.jsonl")),
        })
        .find_map(|p| {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
            {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
                r => Some(r.map(|f| (p, f))),
            }
        })
        .unwrap_or_else(|| Err(std::io::ErrorKind::AlreadyExists.into()))?;
    let written = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::File::open(dir)?.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&file);
        return Err(e);
    }
    Ok(file)
}

pub struct Sink {
    settings: Settings,
    spool: Arc<Mutex<Spool>>,
    pub health: Arc<Mutex<Health>>,
    records: mpsc::UnboundedSender<Notice>,
    /// Woken when the spool has a batch's worth, or to stop.
    pub wake: Arc<Notify>,
    quarantine_dir: PathBuf,
}

impl Sink {
    pub fn new(
        settings: Settings,
        spool: Arc<Mutex<Spool>>,
        quarantine_dir: PathBuf,
        records: mpsc::UnboundedSender<Notice>,
    ) -> Self {
        let health = Health {
            log_group: settings.log_group.clone(),
            log_stream: settings.log_stream.clone(),
            backlog: Backlog::of(spool.clone()),
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

    /// The SDK configuration: region and endpoint from the settings, credentials from the
    /// default chain, the timeouts above, and no retries of the SDK's own (`run` retries).
    fn sdk_config(&self) -> aws_config::ConfigLoader {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(aws_config::retry::RetryConfig::disabled());
        if let Some(r) = &self.settings.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(e) = &self.settings.endpoint {
            loader = loader.endpoint_url(e);
        }
        loader
    }

    /// The next batch: as many spooled records as the rules allow, in time order, and the
    /// spool position after the last one. Linear in the records read: each is decoded once
    /// (its `ts` only) and joins the batch in O(1).
    fn next_batch(&self) -> anyhow::Result<Option<(Vec<Event>, Position)>> {
        let mut spool = self
            .spool
            .lock()
            .map_err(|_| anyhow::anyhow!("spool poisoned"))?;
        let recs = spool.next_records_within(batch::MAX_BATCH_EVENTS, batch::MAX_BATCH_BYTES)?;
        let now_ms = now_ms();
        let mut batch = Batch::default();
        let mut end = None;
        for (line, pos) in recs {
            let e = Event {
                timestamp_ms: batch::timestamp_of(&line, now_ms),
                message: line,
            }
            .fit();
            if !batch.fits(&e) {
                break;
            }
            batch.push(e);
            end = Some(pos);
        }
        let Some(end) = end else {
            return Ok(None);
        };
        spool.unread(end);
        Ok(Some((batch.into_events(), end)))
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

    /// A batch CloudWatch refused: into a quarantine file, on record, and acknowledged, only
    /// once that file is durable. Otherwise the batch stays spooled (rewound) and `false`
    /// says to retry it after a backoff.
    fn quarantine(&self, events: &[Event], end: Position, why: &str) -> bool {
        let file = match write_quarantine(&self.quarantine_dir, events) {
            Ok(f) => f,
            Err(e) => {
                let text = format!(
                    "CloudWatch refused a batch of {} events ({why}), and writing its quarantine file in {} failed ({e}): the batch stays in the spool; retrying",
                    events.len(),
                    self.quarantine_dir.display()
                );
                tracing::error!("{text}");
                if let Ok(mut h) = self.health.lock() {
                    h.last_error = Some(text);
                }
                self.rewind();
                return false;
            }
        };
        tracing::error!(
            "CloudWatch refused a batch of {} events ({why}); kept in {}",
            events.len(),
            file.display()
        );
        let _ = self.records.send(Notice::Agent(
            "agent.cloudwatch_quarantined",
            json!({ "count": events.len(), "reason": why, "file": file.display().to_string() }),
        ));
        if let Ok(mut h) = self.health.lock() {
            h.quarantined_events += events.len() as u64;
        }
        self.acknowledge(end);
        true
    }

    /// Runs until `stop` turns true and the spool is empty (or the task is dropped).
    pub async fn run(self, stop: tokio::sync::watch::Receiver<bool>) {
        let client = Client::new(&self.sdk_config().load().await);
        self.run_with(client, stop).await;
    }

    async fn run_with(self, client: Client, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut attempt = 0u32;
        let mut stream_ready = false;
        // Timed-out requests in a row: logged at the first, and when an answer comes again.
        let mut timed_out = 0u32;
        loop {
            if !stream_ready {
                match self.ensure_stream(&client).await {
                    Ok(()) => stream_ready = true,
                    Err(f) => {
                        self.failed(&f, &mut timed_out);
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
                    self.answered(&mut timed_out);
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
                    self.answered(&mut timed_out);
                    if self.quarantine(&events, end, &why) {
                        attempt = 0;
                    } else {
                        attempt += 1;
                        tokio::time::sleep(backoff(attempt, Duration::from_secs(30))).await;
                    }
                }
                Err(f) => {
                    if f == Failure::Missing {
                        stream_ready = false;
                    }
                    self.failed(&f, &mut timed_out);
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

    /// CloudWatch answered (whatever it said): the end of a streak of timeouts.
    fn answered(&self, timed_out: &mut u32) {
        if *timed_out > 0 {
            tracing::info!(
                "CloudWatch: requests are answered again, after {} timed out in a row",
                *timed_out
            );
            *timed_out = 0;
        }
    }

    fn failed(&self, f: &Failure, timed_out: &mut u32) {
        let text = match f {
            Failure::Denied(m) => format!(
                "access denied ({m}): check the instance role's permissions (packaging/iam); the spool keeps every record, retrying every 60 s"
            ),
            Failure::Retry(m) => format!("{m}; retrying"),
            Failure::Timeout(m) => format!(
                "no answer within {} s ({m}); {} timed-out requests in a row; the spool keeps every record, retrying",
                ATTEMPT_TIMEOUT.as_secs(),
                *timed_out + 1
            ),
            Failure::Missing => "log group or stream missing; creating it".into(),
            Failure::Invalid(m) => m.clone(),
        };
        if let Failure::Timeout(_) = f {
            // Once per streak: a dead endpoint would otherwise log every few seconds.
            if *timed_out == 0 {
                tracing::warn!("CloudWatch: {text}");
            } else {
                tracing::debug!("CloudWatch: {text}");
            }
            *timed_out += 1;
        } else {
            // Another failure ends a streak of timeouts; it says what it is itself.
            *timed_out = 0;
            tracing::warn!("CloudWatch: {text}");
        }
        if let Ok(mut h) = self.health.lock() {
            if let Failure::Timeout(_) = f {
                h.timeouts += 1;
            }
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
        }
    }
}

#[cfg(test)]
mod tests;
