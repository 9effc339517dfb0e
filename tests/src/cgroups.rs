//! Test cgroups: unique names, creation, clean-up, and sweeping what a killed earlier run left.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{agent_bin, docker};

/// Every cgroup and pin directory the tests create starts with this.
pub const PREFIX: &str = "egress-guard-test";

/// Numbers the names [`unique`] makes; also seeds `free_port_range`.
pub(crate) static COUNTER: AtomicU32 = AtomicU32::new(0);

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
