//! The probe binary, run inside a cgroup or outside, once or kept running.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use crate::in_cgroup;

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
