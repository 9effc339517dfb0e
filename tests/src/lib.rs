//! Harness for the privileged end-to-end tests: test cgroups, the real agent binary, and the
//! probe run inside guarded cgroups. Everything a test creates is removed by a guard's Drop,
//! also when the test fails; `sweep` removes what a killed earlier run left behind.
//!
//! Rules (see the project's notes): never attach to the cgroup2 root or the cgroup holding
//! this shell; traffic only to loopback.

pub mod docker;

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Every cgroup and pin directory the tests create starts with this.
pub const PREFIX: &str = "egress-guard-test";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call.
pub fn unique(what: &str) -> String {
    format!(
        "{PREFIX}-{}-{}-{what}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn require_root() {
    // SAFETY: no arguments.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end tests load eBPF programs and must run as root"
    );
}

/// The agent binary: EGRESS_GUARD_BIN (set by `cargo xtask test`), else target/debug.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EGRESS_GUARD_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/egress-guard");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask test` (or build the agent first)",
        p.display()
    );
    p
}

/// The probe binary: cargo puts it in the target directory, one level above the test
/// executable (target/debug/deps/e2e-…).
pub fn probe_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(Path::parent).unwrap().join("probe");
    assert!(
        p.exists(),
        "{} is missing: build the egress-guard-e2e package",
        p.display()
    );
    p
}

pub fn cgroup2_root() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in text.lines() {
        if let Some((left, right)) = line.split_once(" - ")
            && right.starts_with("cgroup2 ")
        {
            return PathBuf::from(left.split(' ').nth(4).unwrap());
        }
    }
    panic!("no cgroup2 mount");
}

/// Removes cgroups and pins left by earlier runs whose process is gone.
pub fn sweep() {
    docker::sweep();
    let alive = |name: &str| {
        name.strip_prefix(&format!("{PREFIX}-"))
            .and_then(|r| r.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && !alive(&name) {
                let _ = Command::new(agent_bin())
                    .args(["uninstall", "--pin-dir"])
                    .arg(e.path())
                    .output();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(cgroup2_root()) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && !alive(&name) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}

/// Kills every process in the subtree and removes it, deepest first.
pub fn remove_cgroup_tree(path: &Path) {
    if let Ok(dir) = std::fs::read_dir(path) {
        for e in dir.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(path);
}

/// A cgroup under the cgroup2 root, removed (with its processes) on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(what: &str) -> Self {
        let path = cgroup2_root().join(unique(what));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    /// The path relative to the cgroup2 mount, as a config would name it.
    pub fn rel(&self) -> String {
        self.path
            .strip_prefix(cgroup2_root())
            .unwrap()
            .display()
            .to_string()
    }

    /// A child cgroup (removed with the parent).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir(&p).unwrap();
        p
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// A command that moves itself into `cgroup` before exec, so every socket it opens belongs
/// to that cgroup.
pub fn in_cgroup(cgroup: &Path, program: &Path) -> Command {
    use std::os::unix::ffi::OsStrExt as _;
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (open/write/close) between fork and exec; the path
    // was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd
}

/// Result of one probe run.
#[derive(Debug)]
pub struct ProbeResult {
    pub stdout: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ProbeResult {
    pub fn ok(&self) -> bool {
        self.code == Some(0) && self.stdout.trim() == "ok"
    }
    pub fn eperm(&self) -> bool {
        self.code == Some(1) && self.stdout.trim() == "EPERM"
    }
}

fn to_result(out: Output) -> ProbeResult {
    ProbeResult {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        code: out.status.code(),
        signal: out.status.signal(),
    }
}

/// Runs the probe inside `cgroup`.
pub fn probe_in(cgroup: &Path, args: &[&str]) -> ProbeResult {
    to_result(
        in_cgroup(cgroup, &probe_bin())
            .args(args)
            .output()
            .expect("running probe"),
    )
}

/// Runs the probe in the test's own (unguarded) cgroup.
pub fn probe_outside(args: &[&str]) -> ProbeResult {
    to_result(
        Command::new(probe_bin())
            .args(args)
            .output()
            .expect("running probe"),
    )
}

/// A TCP listener on loopback that accepts and drops connections in the background.
pub fn tcp_listener(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    addr
}

/// A UDP receiver on loopback.
pub fn udp_receiver(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind(format!("{ip}:0")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

/// Whether a datagram arrives on `s` within its read timeout.
pub fn received(s: &UdpSocket) -> bool {
    let mut buf = [0u8; 64];
    s.recv_from(&mut buf).is_ok()
}

/// The first of `n` consecutive loopback ports that are free for UDP and TCP right now.
pub fn free_port_range(n: u16) -> u16 {
    for _ in 0..200 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            ^ std::process::id()
            ^ COUNTER.fetch_add(1, Ordering::SeqCst).wrapping_mul(7919);
        let base = 20_000 + (seed % 30_000) as u16;
        let free = (base..base + n).all(|p| {
            TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free range of {n} loopback ports");
}

/// A real DNS server (dnsmasq) on loopback as the agent's upstream. Its records come from a
/// hosts file that [`Dnsmasq::set_hosts`] rewrites (dnsmasq re-reads it on SIGHUP); every
/// query it receives is logged, for "nothing reached the upstream" checks.
pub struct Dnsmasq {
    pub addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Dnsmasq {
    /// `hosts`: lines of a hosts file (`ADDRESS NAME`). TTL of every answer: `ttl` seconds.
    pub fn start(hosts: &str, ttl: u32) -> Self {
        let dir = std::env::temp_dir().join(unique("dnsmasq"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), hosts).unwrap();
        let port = free_port_range(1);
        let conf = format!(
            "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n\
             addn-hosts={hosts}\nlocal-ttl={ttl}\nlog-queries\nlog-facility={log}\n\
             local=/\n",
            hosts = dir.join("hosts").display(),
            log = dir.join("queries.log").display(),
        );
        std::fs::write(dir.join("dnsmasq.conf"), conf).unwrap();
        let child = Command::new("dnsmasq")
            .arg("--keep-in-foreground")
            .arg(format!(
                "--conf-file={}",
                dir.join("dnsmasq.conf").display()
            ))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq (installed by `cargo xtask setup`)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let d = Dnsmasq { addr, dir, child };
        let end = Instant::now() + Duration::from_secs(10);
        while !d.log().contains("started") && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// Replaces the records and has dnsmasq re-read them.
    pub fn set_hosts(&self, hosts: &str) {
        let before = self.log().matches("read ").count();
        std::fs::write(self.dir.join("hosts"), hosts).unwrap();
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        let end = Instant::now() + Duration::from_secs(10);
        while self.log().matches("read ").count() <= before && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything dnsmasq logged (with `log-queries`: one line per query it received).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("queries.log")).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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

/// The real agent, started with a config, stopped and uninstalled on drop.
pub struct Agent {
    pub pin_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    dir: PathBuf,
}

impl Agent {
    /// Writes `body` (a config without `pin_dir` and `[audit]`) to a file of its own, with a
    /// unique pin dir and audit file in the same directory.
    pub fn config_file(body: &str) -> (PathBuf, PathBuf, PathBuf) {
        let name = unique("agent");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&name);
        let config = dir.join("config.toml");
        std::fs::write(&config, Self::full_config(&pin_dir, &dir, body)).unwrap();
        (dir, config, pin_dir)
    }

    /// `body` with the test's pin dir in front, its audit file in the `[audit]` table (added
    /// at the end if `body` has none) and its control socket in `[control]` (likewise).
    fn full_config(pin_dir: &Path, dir: &Path, body: &str) -> String {
        let audit = format!(
            "[audit]\nfile = \"{}\"\nudp_aggregate_seconds = 1\n",
            dir.join("audit.jsonl").display()
        );
        let control = format!(
            "[control]\nsocket = \"{}\"\n",
            dir.join("control.sock").display()
        );
        // The DNS proxy on loopback (the tests' processes share the host's network), on a
        // port range of its own.
        // Loopback may be learned here: the tests' destinations are loopback addresses. A
        // test's own `[dns]` keys win.
        let mut dns = String::from("[dns]\n");
        for (key, value) in [
            ("listen", "\"127.0.0.1\"".to_string()),
            ("port", free_port_range(64).to_string()),
            ("never_learn", "[\"169.254.0.0/16\"]".to_string()),
        ] {
            if !body.contains(&format!("\n{key} =")) {
                dns.push_str(&format!("{key} = {value}\n"));
            }
        }
        let mut body = body.to_string();
        for (table, content) in [
            ("[audit]\n", audit),
            ("[control]\n", control),
            ("[dns]\n", dns),
        ] {
            body = if body.contains(table) {
                body.replace(table, &content)
            } else {
                format!("{body}\n{content}")
            };
        }
        format!("pin_dir = \"{}\"\n{body}", pin_dir.display())
    }

    /// The directory of this agent's files (config, audit file, socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The agent's control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Runs `egress-guard ARGS --socket <this agent's socket>`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap()
    }

    /// The audit file's records.
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}"))
            })
            .collect()
    }

    /// SIGTERM and wait: the agent flushes its audit trail and exits; pins stay.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "egress-guard exited with {status}; log:\n{}",
                self.log_text()
            );
        }
    }

    /// Starts the agent and waits until it reports that it is enforcing.
    pub fn start(body: &str) -> Self {
        let (dir, config, pin_dir) = Self::config_file(body);
        let mut agent = Agent {
            pin_dir,
            log: dir.join("agent.log"),
            config,
            child: None,
            dir,
        };
        agent.spawn();
        agent
    }

    /// (Re)starts the agent process on the same config and pins.
    pub fn spawn(&mut self) {
        let before = self.log_text().matches("egress-guard ready").count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("EGRESS_GUARD_LOG", "info")
            // For a [cloudwatch] table pointing at moto_server: static credentials, and never
            // the instance metadata service (no traffic leaves the host).
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting egress-guard");
        self.child = Some(child);
        self.wait_for_log(
            |l| l.matches("egress-guard ready").count() > before,
            "the agent to report it is ready",
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 30 s) until `pred` holds for the log; panics with the log otherwise.
    pub fn wait_for_log(&mut self, pred: impl Fn(&str) -> bool, what: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.log_text();
            if pred(&text) {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("egress-guard exited ({status}) while waiting for {what}; log:\n{text}");
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `egress-guard ARGS --pin-dir <this agent's pins>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output()
            .unwrap()
    }

    /// `stats --json` of one policy: counter name → value.
    pub fn counters(&self, policy: &str) -> serde_json::Map<String, serde_json::Value> {
        let out = self.cli(&["stats", "--json"]);
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["policy"] == policy)
            .unwrap_or_else(|| panic!("no policy {policy} in {v}"))["counters"]
            .as_object()
            .unwrap()
            .clone()
    }

    pub fn counter(&self, policy: &str, name: &str) -> u64 {
        self.counters(policy)[name].as_u64().unwrap()
    }

    /// Rewrites the config (keeping the pin dir and audit file) for a reload.
    pub fn rewrite_config(&self, body: &str) {
        std::fs::write(
            &self.config,
            Self::full_config(&self.pin_dir, &self.dir, body),
        )
        .unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(agent_bin())
            .args(["uninstall", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
        if std::thread::panicking() {
            eprintln!(
                "--- egress-guard log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a probe that keeps running (e.g. `udp-presocket`, `serve`) and waits for `ready`.
pub struct RunningProbe {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl RunningProbe {
    pub fn start(cgroup: &Path, args: &[&str]) -> Self {
        let mut child = in_cgroup(cgroup, &probe_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting probe");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "probe {args:?} did not get ready");
        Self { child, stdout }
    }

    /// Sends a line on stdin (the go-ahead for `udp-presocket`).
    pub fn go(&mut self) {
        use std::io::Write as _;
        self.child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"go\n")
            .unwrap();
    }

    /// Waits for the probe to finish; returns the rest of its output.
    pub fn finish(mut self) -> String {
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let _ = self.child.wait();
        rest
    }
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The record schema of docs/events.md: field → allowed JSON types, per section.
pub struct Schema {
    common: Vec<(String, Vec<String>)>,
    net: Vec<(String, Vec<String>)>,
    types: std::collections::HashMap<String, Vec<(String, Vec<String>)>>,
}

impl Schema {
    pub fn load() -> Self {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/events.md"),
        )
        .unwrap();
        let mut schema = Schema {
            common: Vec::new(),
            net: Vec::new(),
            types: Default::default(),
        };
        let mut section = String::new();
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("## ") {
                section = h.to_string();
            } else if let Some(h) = line.strip_prefix("### ") {
                section = h.trim_matches('`').to_string();
            } else if let Some(row) = line.strip_prefix("| `") {
                let row = row.replace("\\|", "/");
                let cols: Vec<&str> = row.split('|').map(str::trim).collect();
                let field = cols[0].trim_end_matches('`').to_string();
                let mut types: Vec<String> = cols[1].split('/').map(str::to_string).collect();
                // "… only: …" in the meaning marks a field that only some records have.
                if cols
                    .get(2)
                    .and_then(|m| m.split_once(':'))
                    .is_some_and(|(head, _)| head.ends_with(" only"))
                {
                    types.push("absent".into());
                }
                let target = match section.as_str() {
                    "Common fields" => &mut schema.common,
                    s if s.starts_with("Fields of kernel records") => &mut schema.net,
                    s => schema.types.entry(s.to_string()).or_default(),
                };
                target.push((field, types));
            }
        }
        assert!(
            schema.common.len() >= 4 && schema.types.len() >= 9,
            "docs/events.md did not parse"
        );
        schema
    }

    /// Panics with the reason if `record` does not follow the documented schema.
    pub fn check(&self, record: &serde_json::Value) {
        let obj = record
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {record}"));
        let ty = obj
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or_else(|| panic!("no type: {record}"));
        let specific = self
            .types
            .get(ty)
            .unwrap_or_else(|| panic!("undocumented type {ty}: {record}"));
        let mut required: Vec<&(String, Vec<String>)> = self.common.iter().collect();
        if ty.starts_with("net.") || ty.starts_with("proc.") {
            required.extend(self.net.iter());
        }
        for (field, types) in required.iter().copied().chain(specific.iter()) {
            match obj.get(field) {
                Some(v) => assert!(
                    types.iter().any(|t| json_type(v) == t),
                    "{ty}.{field} is {v}, documented as {types:?}: {record}"
                ),
                None => assert!(
                    types.iter().any(|t| t == "absent"),
                    "{ty} lacks {field}: {record}"
                ),
            }
        }
        for key in obj.keys() {
            let documented =
                required.iter().any(|(f, _)| f == key) || specific.iter().any(|(f, _)| f == key);
            assert!(documented, "{ty}.{key} is not in docs/events.md: {record}");
        }
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// How many entries the pinned BPF hash map at `path` holds (keys of `key_size` bytes): the
/// bpf syscall's BPF_OBJ_GET, then BPF_MAP_GET_NEXT_KEY until there is none.
pub fn pinned_map_len(path: &Path, key_size: usize) -> usize {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_GET_NEXT_KEY: u64 = 4;
    const BPF_OBJ_GET: u64 = 7;
    let bpf = |cmd: u64, attr: &mut [u64; 16]| {
        // SAFETY: `attr` is a zeroed bpf_attr-sized buffer laid out for `cmd`, and every
        // pointer in it is valid for the call.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128) }
    };
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr);
    assert!(
        fd >= 0,
        "opening {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut n = 0;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = fd as u64;
        attr[1] = if n == 0 { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) != 0 {
            break;
        }
        n += 1;
        std::mem::swap(&mut key, &mut next);
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd as i32) };
    n
}
