//! The real agent binary: its config, starting and stopping it, its log, CLI and control socket.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{free_port_range, unique};

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

/// Mounts a `fstype` file system at `path` unless something is mounted there.
fn ensure_mounted(fstype: &str, path: &Path) {
    let mounted = Command::new("mountpoint").arg("-q").arg(path).status();
    if !mounted.is_ok_and(|s| s.success()) {
        let status = Command::new("mount")
            .args(["-t", fstype, fstype])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mounting {fstype} at {}", path.display());
    }
}

/// The real agent, started with a config, stopped and uninstalled on drop.
pub struct Agent {
    pub pin_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    dir: PathBuf,
    /// Runs in a mount namespace whose /sys/kernel/security/lsm does not list `bpf`.
    hide_bpf_lsm: bool,
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
        // Sends are aggregated for a second unless the test says otherwise.
        let mut audit = format!(
            "[audit]\nfile = \"{}\"\n",
            dir.join("audit.jsonl").display()
        );
        if !body.contains("\nudp_aggregate_seconds =") {
            audit.push_str("udp_aggregate_seconds = 1\n");
        }
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
        Self::start_with(body, false)
    }

    /// Starts the agent as on a kernel without an active BPF LSM (most distributions' default),
    /// so that it falls back to its fentry (or tracepoint) socket guard: it runs in a mount
    /// namespace of its own where a copy of /sys/kernel/security/lsm without `bpf` is mounted
    /// over the real one.
    pub fn start_without_bpf_lsm(body: &str) -> Self {
        // The agent's own bpffs mount would stay in its namespace: mount it here first.
        ensure_mounted("bpf", Path::new("/sys/fs/bpf"));
        ensure_mounted("securityfs", Path::new("/sys/kernel/security"));
        Self::start_with(body, true)
    }

    fn start_with(body: &str, hide_bpf_lsm: bool) -> Self {
        let (dir, config, pin_dir) = Self::config_file(body);
        if hide_bpf_lsm {
            let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap();
            let without: Vec<&str> = lsm.trim().split(',').filter(|l| *l != "bpf").collect();
            std::fs::write(dir.join("lsm"), without.join(",")).unwrap();
        }
        let mut agent = Agent {
            pin_dir,
            log: dir.join("agent.log"),
            config,
            child: None,
            dir,
            hide_bpf_lsm,
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
        let mut cmd = if self.hide_bpf_lsm {
            // unshare and sh exec in place: the child's pid stays the agent's.
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "slave", "sh", "-c"])
                .arg("mount --bind \"$0\" /sys/kernel/security/lsm && exec \"$@\"")
                .arg(self.dir.join("lsm"))
                .arg(agent_bin());
            c
        } else {
            Command::new(agent_bin())
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&self.config)
            // The eBPF programs' own lines (aya-log) too: a failing test's log shows them.
            .env("EGRESS_GUARD_LOG", "info,egress_guard::ebpf=debug")
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
