//! A throwaway guarded set-up for the demo and the benchmarks: a cgroup, a directory and a
//! pin directory of one name, and the agent; all removed on drop, also on failure.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

/// The `[dns]` table of throwaway set-ups: the DNS proxy on loopback (the guarded processes
/// share the host's network), not on Docker's bridge.
pub const LOOPBACK_DNS: &str =
    "[dns]\nlisten = \"127.0.0.1\"\nport = 10353\nnever_learn = [\"169.254.0.0/16\"]\n";

pub struct Scratch {
    pub cgroup: PathBuf,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub bin: PathBuf,
    pub agent: Option<Child>,
    /// Printed when cleaning up (the demo says what it removes).
    pub farewell: Option<&'static str>,
}

impl Scratch {
    /// Creates `<cgroup2>/<name>` and `<tmp>/<name>`; pins go to `/sys/fs/bpf/<name>`.
    pub fn new(name: &str, bin: &Path) -> anyhow::Result<Self> {
        let cgroup = crate::cgroup2_root()?.join(name);
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Ok(Self {
            cgroup,
            dir,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(name),
            bin: bin.to_path_buf(),
            agent: None,
            farewell: None,
        })
    }
}

impl Scratch {
    /// Writes `config.toml` in the scratch directory: quiet logs, the loopback DNS proxy, the
    /// audit file and control socket in the directory, `extra` tables, and one policy `bench`
    /// guarding the scratch cgroup with `allow`.
    pub fn write_config(&self, extra: &str, allow: &[&str]) -> anyhow::Result<PathBuf> {
        let name = self
            .cgroup
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
        let path = self.dir.join("config.toml");
        std::fs::write(
            &path,
            format!(
                "pin_dir = \"{}\"\nlog_level = \"warn\"\n{LOOPBACK_DNS}[audit]\nfile = \"{}\"\n[control]\nsocket = \"{}\"\n{extra}[[policy]]\nname = \"bench\"\ncgroups = [\"{name}\"]\nallow = [{}]\n",
                self.pin_dir.display(),
                self.dir.join("audit.jsonl").display(),
                self.dir.join("control.sock").display(),
                allow.join(", ")
            ),
        )?;
        Ok(path)
    }

    /// Starts `egress-guard run --config CONFIG` with `env`, and waits for its READY=1
    /// (sd_notify on a socket in the scratch directory). Returns the agent's pid.
    pub fn start_agent(&mut self, config: &Path, env: &[(&str, &str)]) -> anyhow::Result<u32> {
        let mut cmd = Command::new(&self.bin);
        cmd.envs(env.iter().copied());
        self.spawn_agent(cmd, config)
    }

    /// Starts the agent as on a kernel without an active BPF LSM (most distributions), so that
    /// it uses its fallback socket guard: in a mount namespace of its own, with a copy of
    /// /sys/kernel/security/lsm that does not list `bpf` mounted over the real one. bpffs is
    /// mounted here first (a mount made in that namespace would not be seen outside it).
    pub fn start_agent_without_bpf_lsm(&mut self, config: &Path) -> anyhow::Result<u32> {
        if !Command::new("mountpoint")
            .args(["-q", "/sys/fs/bpf"])
            .status()?
            .success()
        {
            crate::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        }
        let lsm = std::fs::read_to_string("/sys/kernel/security/lsm")
            .context("reading /sys/kernel/security/lsm")?;
        let without: Vec<&str> = lsm.trim().split(',').filter(|m| *m != "bpf").collect();
        let copy = self.dir.join("lsm");
        std::fs::write(&copy, without.join(","))?;
        let mut cmd = Command::new("unshare");
        // unshare and sh exec in place: the pid is the agent's.
        cmd.args(["--mount", "--propagation", "slave", "sh", "-c"])
            .arg("mount --bind \"$0\" /sys/kernel/security/lsm && exec \"$@\"")
            .arg(&copy)
            .arg(&self.bin);
        self.spawn_agent(cmd, config)
    }

    /// Stops the agent (SIGTERM) and removes its pins: nothing of it stays attached.
    pub fn stop_and_uninstall(&mut self) {
        if let Some(mut a) = self.agent.take() {
            // SAFETY: plain kill(2) of our child.
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let _ = a.wait();
        }
        let _ = Command::new(&self.bin)
            .args(["uninstall", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
    }

    /// Runs `CMD run --config CONFIG` and waits for its READY=1 (sd_notify on a socket in the
    /// scratch directory).
    fn spawn_agent(&mut self, mut cmd: Command, config: &Path) -> anyhow::Result<u32> {
        let ready = self.dir.join("ready.sock");
        // A socket file left by an earlier start here.
        let _ = std::fs::remove_file(&ready);
        let sock = UnixDatagram::bind(&ready)?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))?;
        let agent = cmd
            .args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &ready)
            .stdout(Stdio::null())
            .spawn()?;
        let pid = agent.id();
        self.agent = Some(agent);
        let mut buf = [0u8; 256];
        loop {
            let n = sock.recv(&mut buf).context("waiting for READY=1")?;
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                return Ok(pid);
            }
        }
    }
}

/// Pins every thread of process `pid` (the agent, a proxy) to CPU 0, leaving CPU 1 to the
/// measured client.
pub fn pin_to_cpu0(pid: u32) -> anyhow::Result<()> {
    crate::bench::run_quiet(Command::new("taskset").args(["-a", "-p", "-c", "0", &pid.to_string()]))
}

/// A helper process (a DNS server, a test CloudWatch), killed on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts moto_server (a test CloudWatch) on a free loopback port; returns it and the port.
/// It stands for a service on another machine, so it runs at nice 19: it gets the CPU the
/// host under test leaves idle, not the agent's (on 2 cores, a busy moto at nice 0 took the
/// agent's share and the audit bench lost up to a third of a 100,000 records/s storm).
pub fn moto_server() -> anyhow::Result<(KillOnDrop, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let moto = KillOnDrop(
        Command::new("nice")
            .args([
                "-n",
                "19",
                "python3",
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting moto_server (cargo xtask setup installs it)")?,
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((moto, port));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("moto_server did not listen on port {port} within 10 s")
}

/// The `[cloudwatch]` table for a test endpoint, spooling in `dir`, and the environment the
/// agent needs to sign requests to it.
pub fn cloudwatch_table(endpoint: &str, dir: &Path) -> (String, [(&'static str, &'static str); 3]) {
    (
        format!(
            "[cloudwatch]\nlog_group = \"/egress-guard/bench\"\nlog_stream = \"bench\"\nregion = \"us-east-1\"\nendpoint = \"{endpoint}\"\nspool_dir = \"{}\"\n",
            dir.join("spool").display()
        ),
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    )
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(f) = self.farewell {
            println!("{f}");
        }
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = Command::new(&self.bin)
            .args(["uninstall", "--pin-dir"])
            .arg(&self.pin_dir)
            .status();
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the test probe with `args` inside `cgroup` (pinned to `cpu` if given); its stdout.
pub fn probe_in(
    cgroup: &Path,
    probe: &Path,
    cpu: Option<usize>,
    args: &[&str],
) -> anyhow::Result<String> {
    let pin = cpu.map(|c| format!("taskset -c {c} ")).unwrap_or_default();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {pin}\"$0\" \"$@\"",
            cgroup.display()
        ))
        .arg(probe)
        .args(args)
        .output()
        .with_context(|| format!("running the probe in {}", cgroup.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `key=<number>` in a probe's output.
pub fn field(text: &str, key: &str) -> anyhow::Result<f64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key}= in the probe's output {text:?}"))
}

/// The median of a non-empty sample.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A cgroup of its own (a bare comparison), removed on drop.
pub struct BareCgroup(pub PathBuf);

impl BareCgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let p = crate::cgroup2_root()?.join(name);
        std::fs::create_dir(&p).with_context(|| format!("creating cgroup {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for BareCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A TCP listener on `ip` that accepts and drops every connection; its address.
pub fn listener(ip: &str) -> anyhow::Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind((ip, 0))?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    Ok(addr)
}
