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
    /// Starts `egress-guard run --config CONFIG` with `env`, and waits for its READY=1
    /// (sd_notify on a socket in the scratch directory). Returns the agent's pid.
    pub fn start_agent(&mut self, config: &Path, env: &[(&str, &str)]) -> anyhow::Result<u32> {
        let ready = self.dir.join("ready.sock");
        let sock = UnixDatagram::bind(&ready)?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))?;
        let agent = Command::new(&self.bin)
            .args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &ready)
            .envs(env.iter().copied())
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

/// A helper process (a DNS server, a test CloudWatch), killed on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
