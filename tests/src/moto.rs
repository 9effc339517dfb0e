//! The CloudWatch Logs stand-in: moto_server, and a fault-injecting proxy in front of it.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use crate::free_port_range;

/// moto_server on loopback: the CloudWatch Logs API for the tests. Read back with boto3.
pub struct Moto {
    pub port: u16,
    child: Option<Child>,
}

impl Moto {
    pub fn start() -> Self {
        let mut m = Moto {
            port: free_port_range(1),
            child: None,
        };
        m.restart();
        m
    }

    /// (Re)starts the server on the same port (it starts empty).
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server (installed by `cargo xtask setup`)");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < end, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every message in `group`/`stream`, oldest first (empty if they do not exist).
    pub fn messages(&self, group: &str, stream: &str) -> Vec<String> {
        let script = r#"
import sys, json, boto3
c = boto3.client("logs", endpoint_url=sys.argv[1], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing")
kw = dict(logGroupName=sys.argv[2], logStreamName=sys.argv[3], startFromHead=True)
token = None
try:
    while True:
        r = c.get_log_events(**kw, **({"nextToken": token} if token else {}))
        for e in r["events"]:
            print(json.dumps(e["message"]))
        if r.get("nextForwardToken") in (None, token):
            break
        token = r["nextForwardToken"]
except c.exceptions.ResourceNotFoundException:
    pass
"#;
        let out = Command::new("python3")
            .args(["-c", script, &self.endpoint(), group, stream])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "reading CloudWatch: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<String>(l).unwrap())
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fault to inject into the next PutLogEvents calls. `(status, "ErrorType")` converts into
/// `Fault::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An error answer: HTTP status and error type.
    Error(u16, &'static str),
    /// No answer, ever: the request is read and not forwarded, and the connection stays open
    /// until the client closes it.
    Hang,
}

impl From<(u16, &'static str)> for Fault {
    fn from((status, kind): (u16, &'static str)) -> Self {
        Fault::Error(status, kind)
    }
}

/// What the fault proxy saw of one PutLogEvents batch: (events, bytes as CloudWatch counts
/// them), or the rule it broke.
pub type SentBatch = Result<(usize, usize), String>;

/// An HTTP proxy on loopback in front of moto_server that answers the next PutLogEvents calls
/// with injected errors (throttling, 5xx, invalid parameter) or not at all (a hang), and
/// forwards everything else.
pub struct FaultProxy {
    pub port: u16,
    faults: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Fault>>>,
    /// PutLogEvents calls seen (faulted or forwarded).
    pub puts: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// PutLogEvents calls held without an answer (`Fault::Hang`).
    pub hung: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Every PutLogEvents batch sent: (events, bytes as CloudWatch counts them, or a rule it
    /// broke).
    pub batches: std::sync::Arc<std::sync::Mutex<Vec<SentBatch>>>,
}

/// Checks a PutLogEvents request body against the API's rules (which moto does not enforce).
fn check_put(body: &[u8]) -> SentBatch {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let events = v["logEvents"].as_array().ok_or("no logEvents")?;
    let mut bytes = 0;
    let mut last = i64::MIN;
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    for e in events {
        let m = e["message"].as_str().ok_or("no message")?;
        let t = e["timestamp"].as_i64().ok_or("no timestamp")?;
        if m.len() + 26 > 262_144 {
            return Err(format!("an event of {} bytes", m.len()));
        }
        if t < last {
            return Err("events out of time order".into());
        }
        last = t;
        lo = lo.min(t);
        hi = hi.max(t);
        bytes += m.len() + 26;
    }
    if events.is_empty() || events.len() > 10_000 {
        return Err(format!("{} events", events.len()));
    }
    if bytes > 1_048_576 {
        return Err(format!("{bytes} bytes"));
    }
    if hi - lo > 24 * 3600 * 1000 {
        return Err("a batch spanning more than 24 h".into());
    }
    Ok((events.len(), bytes))
}

impl FaultProxy {
    pub fn start(upstream: u16) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let faults = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let puts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let hung = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let batches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (f, p, h, b) = (faults.clone(), puts.clone(), hung.clone(), batches.clone());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (f, p, h, b) = (f.clone(), p.clone(), h.clone(), b.clone());
                std::thread::spawn(move || {
                    let _ = proxy_connection(c, upstream, &f, &p, &h, &b);
                });
            }
        });
        Self {
            port,
            faults,
            puts,
            hung,
            batches,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next PutLogEvents calls get these answers, one each.
    pub fn inject<F: Into<Fault> + Copy>(&self, faults: &[F]) {
        self.faults
            .lock()
            .unwrap()
            .extend(faults.iter().map(|&f| f.into()));
    }

    pub fn pending(&self) -> usize {
        self.faults.lock().unwrap().len()
    }
}

/// One HTTP/1.1 message (head and Content-Length body) from `r`.
fn read_http(r: &mut BufReader<std::net::TcpStream>) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

fn proxy_connection(
    client: std::net::TcpStream,
    upstream: u16,
    faults: &std::sync::Mutex<std::collections::VecDeque<Fault>>,
    puts: &std::sync::atomic::AtomicU32,
    hung: &std::sync::atomic::AtomicU32,
    batches: &std::sync::Mutex<Vec<SentBatch>>,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = client.try_clone()?;
    let mut from_client = BufReader::new(client);
    let server = std::net::TcpStream::connect(("127.0.0.1", upstream))?;
    let mut to_server = server.try_clone()?;
    let mut from_server = BufReader::new(server);
    while let Some((head, body)) = read_http(&mut from_client)? {
        if head.contains("Logs_20140328.PutLogEvents") {
            puts.fetch_add(1, Ordering::SeqCst);
            batches.lock().unwrap().push(check_put(&body));
            let fault = faults.lock().unwrap().pop_front();
            if fault == Some(Fault::Hang) {
                // Never answer: hold the connection until the client gives up on it.
                hung.fetch_add(1, Ordering::SeqCst);
                std::io::copy(&mut from_client, &mut std::io::sink())?;
                return Ok(());
            }
            if let Some(Fault::Error(status, kind)) = fault {
                let msg = format!("{{\"__type\":\"{kind}\",\"message\":\"injected by the test\"}}");
                write!(
                    out,
                    "HTTP/1.1 {status} Injected\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-ErrorType: {kind}\r\nContent-Length: {}\r\n\r\n{msg}",
                    msg.len()
                )?;
                continue;
            }
        }
        to_server.write_all(head.as_bytes())?;
        to_server.write_all(&body)?;
        let Some((rhead, rbody)) = read_http(&mut from_server)? else {
            return Ok(());
        };
        out.write_all(rhead.as_bytes())?;
        out.write_all(&rbody)?;
    }
    Ok(())
}
