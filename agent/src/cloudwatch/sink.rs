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
mod tests {
    use super::*;

    fn settings(endpoint: Option<String>) -> Settings {
        Settings {
            log_group: "g".into(),
            log_stream: "s".into(),
            region: Some("us-east-1".into()),
            endpoint,
            flush_interval: Duration::from_millis(50),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("eg-sink-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A record of ours, made `ago` before now.
    fn record(n: usize, ago: Duration) -> String {
        let ts = humantime::format_rfc3339_nanos(SystemTime::now() - ago);
        format!("{{\"version\":1,\"ts\":\"{ts}\",\"type\":\"test\",\"n\":{n}}}")
    }

    /// How a `FakeLogs` answers one PutLogEvents call.
    #[derive(Clone, Copy)]
    enum Answer {
        Accept,
        Error(u16, &'static str),
        /// Reads the request and never answers (the connection stays open).
        Hang,
    }

    /// A CloudWatch Logs endpoint on loopback: CreateLogGroup and CreateLogStream say the
    /// resource exists, the n-th PutLogEvents (from 0) gets `answer(n)`.
    struct FakeLogs {
        url: String,
        /// When each PutLogEvents arrived, and how many events it carried.
        puts: Arc<Mutex<Vec<(std::time::Instant, usize)>>>,
        creates: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl FakeLogs {
        fn start(answer: fn(usize) -> Answer) -> Self {
            use std::io::{BufRead as _, Read as _};
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}", l.local_addr().unwrap());
            let puts = Arc::new(Mutex::new(Vec::new()));
            let creates = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (p, c) = (puts.clone(), creates.clone());
            std::thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    let (p, c) = (p.clone(), c.clone());
                    std::thread::spawn(move || -> std::io::Result<()> {
                        let mut out = conn.try_clone()?;
                        let mut r = std::io::BufReader::new(conn);
                        loop {
                            let mut head = String::new();
                            loop {
                                let mut line = String::new();
                                if r.read_line(&mut line)? == 0 {
                                    return Ok(());
                                }
                                head.push_str(&line);
                                if line == "\r\n" {
                                    break;
                                }
                            }
                            let header = |name: &str| {
                                head.lines().find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                                })
                            };
                            let len = header("content-length").map_or(0, |v| v.parse().unwrap());
                            let mut body = vec![0; len];
                            r.read_exact(&mut body)?;
                            let target = header("x-amz-target").unwrap_or_default();
                            let answer = if target.ends_with(".PutLogEvents") {
                                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                                let events = v["logEvents"].as_array().map_or(0, Vec::len);
                                let mut puts = p.lock().unwrap();
                                puts.push((std::time::Instant::now(), events));
                                answer(puts.len() - 1)
                            } else {
                                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                Answer::Error(400, "ResourceAlreadyExistsException")
                            };
                            let (status, text) = match answer {
                                Answer::Accept => (200, "{}".to_string()),
                                Answer::Error(status, kind) => (
                                    status,
                                    format!("{{\"__type\":\"{kind}\",\"message\":\"fake\"}}"),
                                ),
                                Answer::Hang => {
                                    // Never answer; read until the client gives up.
                                    std::io::copy(&mut r, &mut std::io::sink())?;
                                    return Ok(());
                                }
                            };
                            write!(
                                out,
                                "HTTP/1.1 {status} X\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{text}",
                                text.len()
                            )?;
                        }
                    });
                }
            });
            Self { url, puts, creates }
        }

        fn puts(&self) -> usize {
            self.puts.lock().unwrap().len()
        }
    }

    /// A sink on a spool holding `n` records, talking to `fake` with test credentials and
    /// `attempt_timeout`; and its spool, health and notices.
    struct Running {
        spool: Arc<Mutex<Spool>>,
        health: Arc<Mutex<Health>>,
        notices: mpsc::UnboundedReceiver<Notice>,
        cancel: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    }

    fn run_sink(
        dir: &Path,
        quarantine_dir: PathBuf,
        fake: &FakeLogs,
        n: usize,
        attempt_timeout: Duration,
    ) -> Running {
        let spool = Arc::new(Mutex::new(
            Spool::open(&dir.join("spool"), 1 << 30).unwrap(),
        ));
        for i in 0..n {
            spool
                .lock()
                .unwrap()
                .append(&record(i, Duration::ZERO))
                .unwrap();
        }
        let (tx, notices) = mpsc::unbounded_channel();
        let sink = Sink::new(
            settings(Some(fake.url.clone())),
            spool.clone(),
            quarantine_dir,
            tx,
        );
        let health = sink.health.clone();
        let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let config = sink
                    .sdk_config()
                    .credentials_provider(aws_sdk_cloudwatchlogs::config::Credentials::new(
                        "test", "test", None, None, "test",
                    ))
                    .timeout_config(
                        aws_config::timeout::TimeoutConfig::builder()
                            .operation_attempt_timeout(attempt_timeout)
                            .operation_timeout(attempt_timeout * 2)
                            .build(),
                    )
                    .load()
                    .await;
                let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                tokio::select! {
                    _ = sink.run_with(Client::new(&config), stop_rx) => {}
                    _ = cancelled => {}
                }
            });
        });
        Running {
            spool,
            health,
            notices,
            cancel,
            thread,
        }
    }

    impl Running {
        /// Stops the sink.
        fn stop(self) {
            let _ = self.cancel.send(());
            self.thread.join().unwrap();
        }
    }

    /// Waits (up to 10 s) until `cond` holds.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < end, "waited in vain for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn quarantine_notices(rx: &mut mpsc::UnboundedReceiver<Notice>) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Ok(n) = rx.try_recv() {
            if let Notice::Agent("agent.cloudwatch_quarantined", v) = n {
                out.push(v);
            }
        }
        out
    }

    /// A refused batch whose quarantine file cannot be written stays spooled (not
    /// acknowledged, no record naming a file that does not exist) and is tried again later;
    /// once the file can be written, it is quarantined and acknowledged.
    #[test]
    fn a_refused_batch_stays_spooled_while_its_quarantine_file_cannot_be_written() {
        let dir = temp_dir("quarantine");
        let fake = FakeLogs::start(|_| Answer::Error(400, "InvalidParameterException"));
        // A file where the quarantine directory should be: creating a file in it fails
        // (ENOTDIR), also for root.
        let qdir = dir.join("quarantine");
        std::fs::write(&qdir, "").unwrap();
        let mut r = run_sink(&dir, qdir.clone(), &fake, 3, Duration::from_secs(5));
        let pending = r.spool.lock().unwrap().pending_bytes();
        assert!(pending > 0);
        wait_until("a second PutLogEvents of the refused batch", || {
            assert_eq!(
                r.spool.lock().unwrap().pending_bytes(),
                pending,
                "acknowledged, though its quarantine file could not be written"
            );
            fake.puts() >= 2
        });
        assert_eq!(
            r.spool.lock().unwrap().pending_bytes(),
            pending,
            "still spooled"
        );
        assert_eq!(
            quarantine_notices(&mut r.notices),
            Vec::<serde_json::Value>::new()
        );
        {
            let h = r.health.lock().unwrap();
            assert_eq!(h.quarantined_events, 0);
            let e = h.last_error.clone().unwrap_or_default();
            assert!(
                e.contains("quarantine file") && e.contains("stays in the spool"),
                "{e}"
            );
        }
        // The directory is there now: the next retry quarantines the batch.
        std::fs::remove_file(&qdir).unwrap();
        std::fs::create_dir(&qdir).unwrap();
        wait_until("the batch acknowledged", || {
            r.spool.lock().unwrap().pending_bytes() == 0
        });
        let notices = quarantine_notices(&mut r.notices);
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(notices[0]["count"], 3);
        let file = PathBuf::from(notices[0]["file"].as_str().unwrap());
        assert_eq!(file.parent(), Some(qdir.as_path()));
        let kept = std::fs::read_to_string(&file).unwrap();
        assert_eq!(kept.lines().count(), 3, "{kept}");
        assert_eq!(r.health.lock().unwrap().quarantined_events, 3);
        r.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A missing group or stream is created again, but after the backoff: a stream that keeps
    /// disappearing is not hammered.
    #[test]
    fn resource_not_found_is_retried_with_backoff() {
        let dir = temp_dir("missing");
        let fake = FakeLogs::start(|_| Answer::Error(400, "ResourceNotFoundException"));
        let r = run_sink(&dir, dir.clone(), &fake, 1, Duration::from_secs(5));
        std::thread::sleep(Duration::from_secs(2));
        let e = r.health.lock().unwrap().last_error.clone();
        r.stop();
        let puts = fake.puts.lock().unwrap().clone();
        // Waits of 200–400, 400–800, 800–1600 ms: at most 4 PutLogEvents in 2 s.
        assert!(
            (2..=4).contains(&puts.len()),
            "{} PutLogEvents in 2 s",
            puts.len()
        );
        let first_gap = puts[1].0 - puts[0].0;
        assert!(first_gap >= Duration::from_millis(200), "{first_gap:?}");
        // The group and stream were created again before each retry (2 calls each time).
        assert!(fake.creates.load(std::sync::atomic::Ordering::SeqCst) >= 2 * puts.len());
        assert!(e.is_some_and(|e| e.contains("missing")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A request that is never answered is abandoned after the attempt timeout, counted,
    /// reported in `last_error` while the streak lasts, and retried until it goes through.
    #[test]
    fn an_unanswered_request_times_out_and_is_retried() {
        let dir = temp_dir("hang");
        let fake = FakeLogs::start(|n| if n < 2 { Answer::Hang } else { Answer::Accept });
        let r = run_sink(&dir, dir.clone(), &fake, 5, Duration::from_millis(300));
        wait_until("the second attempt", || fake.puts() >= 2);
        {
            let h = r.health.lock().unwrap();
            assert_eq!(h.timeouts, 1);
            let e = h.last_error.clone().unwrap_or_default();
            assert!(e.contains("no answer within"), "{e}");
        }
        // Acknowledged in the spool first, then counted in health: wait for the count.
        wait_until("delivery", || {
            r.health.lock().unwrap().delivered_events == 5
        });
        assert_eq!(r.spool.lock().unwrap().pending_bytes(), 0);
        let puts = fake.puts.lock().unwrap().clone();
        assert_eq!(puts.len(), 3);
        assert!(
            puts.iter().all(|p| p.1 == 5),
            "the same batch each time: {puts:?}"
        );
        assert!(puts[1].0 - puts[0].0 >= Duration::from_millis(300 + 200));
        let h = r.health.lock().unwrap().clone();
        assert_eq!((h.timeouts, h.delivered_events), (2, 5));
        assert_eq!(h.last_error, None);
        r.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Status reads the backlog from the spool when it is asked: exact while a batch is in
    /// flight and while records keep coming, with the oldest waiting record's age.
    #[test]
    fn status_shows_the_live_backlog_and_the_oldest_age() {
        let dir = temp_dir("status");
        let spool = Arc::new(Mutex::new(
            Spool::open(&dir.join("spool"), 1 << 30).unwrap(),
        ));
        let (tx, _rx) = mpsc::unbounded_channel();
        let sink = Sink::new(settings(None), spool.clone(), dir.clone(), tx);
        let status = || serde_json::to_value(&*sink.health.lock().unwrap()).unwrap();
        let v = status();
        assert_eq!(v["spool_pending_bytes"], 0);
        assert!(v["oldest_undelivered_age_ms"].is_null(), "{v}");
        assert_eq!(v["timeouts"], 0);
        let (old, new) = (record(0, Duration::from_secs(5)), record(1, Duration::ZERO));
        spool.lock().unwrap().append(&old).unwrap();
        spool.lock().unwrap().append(&new).unwrap();
        let v = status();
        assert_eq!(v["spool_pending_bytes"], (old.len() + new.len() + 2) as u64);
        let age = v["oldest_undelivered_age_ms"].as_u64().unwrap();
        assert!((5000..6000).contains(&age), "{age}");
        // In flight (handed out in a batch), and a third record meanwhile.
        let (events, end) = sink.next_batch().unwrap().unwrap();
        assert_eq!(events.len(), 2);
        let third = record(2, Duration::ZERO);
        spool.lock().unwrap().append(&third).unwrap();
        let v = status();
        assert_eq!(
            v["spool_pending_bytes"],
            (old.len() + new.len() + third.len() + 3) as u64
        );
        assert!(v["oldest_undelivered_age_ms"].as_u64().unwrap() >= age);
        // Delivered: the third record waits, younger.
        sink.delivered(2, 0, end);
        let v = status();
        assert_eq!(v["spool_pending_bytes"], (third.len() + 1) as u64);
        assert!(
            v["oldest_undelivered_age_ms"].as_u64().unwrap() < 1000,
            "{v}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

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

    /// Builds every batch out of a spool of `records` and acknowledges it; returns the time
    /// per record.
    fn time_batch_building(name: &str, records: impl Iterator<Item = String>) -> f64 {
        let dir = std::env::temp_dir().join(format!("eg-sink-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Arc::new(Mutex::new(Spool::open(&dir, 1 << 30).unwrap()));
        let mut total = 0;
        {
            let mut s = spool.lock().unwrap();
            for r in records {
                s.append(&r).unwrap();
                total += 1;
            }
            s.sync().unwrap();
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
        let start = std::time::Instant::now();
        let (mut n, mut batches, mut building) = (0usize, 0, Duration::ZERO);
        loop {
            let t = std::time::Instant::now();
            let Some((events, end)) = sink.next_batch().unwrap() else {
                break;
            };
            building += t.elapsed();
            n += events.len();
            batches += 1;
            spool.lock().unwrap().ack(end).unwrap();
        }
        let took = start.elapsed();
        assert_eq!(n, total);
        let per = took.as_nanos() as f64 / total as f64;
        println!(
            "batch building, {name}: {total} records in {batches} batches, {took:?}: {per:.0} ns per record with the acknowledgements, {:.0} ns in next_batch",
            building.as_nanos() as f64 / total as f64
        );
        let _ = std::fs::remove_dir_all(&dir);
        per
    }

    /// What building batches costs per record, for 30,000 records the size of a
    /// `net.connect` record (~3,000 a batch) and 30,000 short ones (10,000 a batch):
    /// `cargo test -p egress-guard --release batch_building_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run it by name"]
    fn batch_building_cost_per_record() {
        let ts = |i: u32| {
            format!(
                "2026-11-22T05:{:02}:{:02}.{:09}Z",
                i / 60_000 % 60,
                i / 1000 % 60,
                i
            )
        };
        time_batch_building(
            "net.connect records",
            (0..30_000u32).map(|i| format!(
                "{{\"version\":1,\"ts\":\"{}\",\"type\":\"net.connect\",\"verdict\":\"deny\",\"policy\":\"sandbox\",\"pid\":{i},\"tid\":{i},\"comm\":\"probe\",\"exe\":\"/usr/local/bin/probe\",\"cgroup\":\"/system.slice/docker-0123456789abcdef.scope\",\"container\":{{\"id\":\"0123456789ab\",\"name\":\"sandbox-1\"}},\"family\":\"inet\",\"proto\":\"tcp\",\"dst\":\"127.0.0.3\",\"dport\":9,\"hostnames\":[],\"kernel_ns\":{}}}",
                ts(i),
                u64::from(i) * 1000
            )),
        );
        time_batch_building(
            "short records",
            (0..30_000u32).map(|i| format!("{{\"version\":1,\"ts\":\"{}\",\"n\":{i}}}", ts(i))),
        );
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
