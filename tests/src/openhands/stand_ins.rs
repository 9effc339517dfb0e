//! The scenario's stand-ins on this host: the LLM's and the metadata service's addresses, the
//! scripted LLM server, and listeners that accept and close.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::{Value, json};

use super::{LLM_ADDR, LLM_PORT, METADATA_ADDR};
use crate::unique;

/// The scripted LLM server (Python stdlib).
pub const FAKE_LLM: &str = include_str!("../../openhands/fake_llm.py");

/// The LLM's and the metadata stand-in's addresses on `lo` (this kernel may lack the dummy
/// link type), labelled `lo:eg<pid>` so a sweep finds those of dead runs; removed on drop.
pub struct HostAddrs {
    pub label: String,
}

impl HostAddrs {
    pub fn new() -> Self {
        sweep_links();
        let addrs = HostAddrs {
            label: format!("lo:eg{}", std::process::id()),
        };
        for a in [LLM_ADDR, METADATA_ADDR] {
            let _ = Command::new("ip")
                .args(["addr", "del", &format!("{a}/32"), "dev", "lo"])
                .output();
            let out = Command::new("ip")
                .args(["addr", "add", &format!("{a}/32"), "dev", "lo", "label"])
                .arg(&addrs.label)
                .output()
                .expect("ip");
            assert!(
                out.status.success(),
                "ip addr add {a}/32 dev lo: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        addrs
    }
}

impl Default for HostAddrs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HostAddrs {
    fn drop(&mut self) {
        for a in [LLM_ADDR, METADATA_ADDR] {
            let _ = Command::new("ip")
                .args(["addr", "del", &format!("{a}/32"), "dev", "lo"])
                .output();
        }
    }
}

/// Removes the addresses of earlier runs whose process is gone (their `lo:eg<pid>` label).
pub fn sweep_links() {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "dev", "lo"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(label)) = (
            words
                .iter()
                .position(|w| *w == "inet")
                .and_then(|i| words.get(i + 1)),
            words.iter().find(|w| w.starts_with("lo:eg")),
        ) else {
            continue;
        };
        let pid = &label["lo:eg".len()..];
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["addr", "del", addr, "dev", "lo"])
                .output();
        }
    }
}

/// The scripted LLM: `fake_llm.py` on [`LLM_ADDR`]:[`LLM_PORT`], killed on drop.
pub struct FakeLlm {
    child: Child,
    dir: PathBuf,
}

impl FakeLlm {
    pub fn start(steps: &[String]) -> Self {
        let dir = std::env::temp_dir().join(unique("fake-llm"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("fake_llm.py"), FAKE_LLM).unwrap();
        std::fs::write(dir.join("steps.json"), json!(steps).to_string()).unwrap();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut child = Command::new("python3")
            .arg(dir.join("fake_llm.py"))
            .arg(format!("{LLM_ADDR}:{LLM_PORT}"))
            .arg(dir.join("steps.json"))
            .arg(dir.join("requests"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("python3 for the scripted LLM");
        let mut line = [0u8; 9];
        let ok = child.stdout.as_mut().unwrap().read_exact(&mut line).is_ok();
        let llm = FakeLlm { child, dir };
        assert!(
            ok && &line == b"listening",
            "the scripted LLM did not start: {}",
            std::fs::read_to_string(llm.dir.join("server.log")).unwrap_or_default()
        );
        llm
    }

    /// The requests it served, in order: (path, body).
    pub fn requests(&self) -> Vec<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.join("requests"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files
            .iter()
            .filter_map(|f| serde_json::from_str(&std::fs::read_to_string(f).ok()?).ok())
            .collect()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A listener that accepts and closes connections (so a connect that got through would
/// succeed); None when the address cannot be bound.
pub(super) fn listen(addr: &str) -> Option<SocketAddr> {
    let l = TcpListener::bind(addr).ok()?;
    let a = l.local_addr().ok()?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    Some(a)
}
