//! The sink against a fake CloudWatch on loopback: retries, timeouts, quarantine, backoff,
//! status.

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
            let v: serde_json::Value =
                serde_json::from_str(&e.message).unwrap_or_else(|_| serde_json::json!({ "n": -1 }));
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
