//! The .deb built by `cargo xtask package`: installed here, its files where
//! docs/operator-guide.md says, its unit verified, the binary started exactly as the unit's
//! ExecStart says (readiness and watchdog through a notify socket), then removed (the
//! containers unguarded on purpose) and purged. No systemd runs as PID 1 on these machines.

use std::{
    collections::HashSet,
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use egress_guard_e2e::*;

use crate::setup;

const UNIT: &str = "/lib/systemd/system/egress-guard.service";

fn dpkg(args: &[&str]) -> std::process::Output {
    Command::new("dpkg")
        .args(args)
        .output()
        .expect("running dpkg")
}

fn succeeded(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the agent it started, purges the package and removes the slice cgroup, also when
/// the test fails.
struct Cleanup {
    slice: PathBuf,
    agent: Option<std::process::Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            // SAFETY: plain kill(2) of our child.
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let _ = a.wait();
        }
        let _ = dpkg(&["--purge", "egress-guard"]);
        remove_cgroup_tree(&self.slice);
    }
}

/// The system calls a `SystemCallFilter` group or name stands for (groups expanded).
fn syscalls_of(entry: &str, out: &mut HashSet<String>) {
    if !entry.starts_with('@') {
        out.insert(entry.to_string());
        return;
    }
    let text = Command::new("systemd-analyze")
        .args(["syscall-filter", entry])
        .output()
        .expect("systemd-analyze syscall-filter");
    for line in String::from_utf8_lossy(&text.stdout).lines().skip(1) {
        let t = line.trim();
        if !t.is_empty() && !t.starts_with('#') {
            syscalls_of(t, out);
        }
    }
}

/// The unit's `KEY=` values, every line of it.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines().filter_map(|l| l.strip_prefix(key)).collect()
}

/// Waits for a datagram on the notify socket that contains `what`.
fn wait_notify(sock: &UnixDatagram, what: &str) -> String {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no {what} on the notify socket"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains(what) {
                return msg;
            }
        }
    }
}

#[test]
fn the_deb_installs_runs_as_its_unit_says_and_removes_cleanly() {
    setup();
    let deb = std::env::var("EGRESS_GUARD_DEB")
        .expect("EGRESS_GUARD_DEB: the .deb to test (`cargo xtask test` builds it)");
    assert!(
        !dpkg(&["-s", "egress-guard"]).status.success(),
        "egress-guard is installed on this machine; this test installs and purges it"
    );
    // The default config guards openhands.slice (systemd would create it: the unit wants it).
    let slice = cgroup2_root().join("openhands.slice");
    assert!(!slice.exists(), "{} exists already", slice.display());
    std::fs::create_dir(&slice).unwrap();
    let mut cleanup = Cleanup {
        slice: slice.clone(),
        agent: None,
    };

    succeeded(&dpkg(&["-i", &deb]), "dpkg -i");
    // Files where the operator guide says.
    for f in [
        "/usr/bin/egress-guard",
        UNIT,
        "/lib/systemd/system/openhands.slice",
        "/etc/egress-guard/config.toml",
        "/usr/lib/tmpfiles.d/egress-guard.conf",
        "/usr/lib/sysusers.d/egress-guard.conf",
        "/usr/share/bash-completion/completions/egress-guard",
        "/usr/share/zsh/vendor-completions/_egress-guard",
        "/usr/share/fish/vendor_completions.d/egress-guard.fish",
        "/usr/share/man/man1/egress-guard.1.gz",
        "/usr/share/doc/egress-guard/operator-guide.md",
        "/usr/share/doc/egress-guard/daemon.json.example",
        "/usr/share/doc/egress-guard/cloudwatch/egress-guard.yaml",
        "/usr/share/doc/egress-guard/iam/egress-guard-policy.json",
        "/etc/systemd/system/multi-user.target.wants/egress-guard.service",
    ] {
        assert!(Path::new(f).exists(), "{f} was not installed");
    }
    let conffiles = dpkg(&["-s", "egress-guard"]);
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/egress-guard/config.toml"),
        "the config is not a conffile"
    );
    // The group and the directories (sysusers, tmpfiles).
    let group = Command::new("getent")
        .args(["group", "egress-guard"])
        .output()
        .unwrap();
    succeeded(&group, "getent group egress-guard");
    let gid: u32 = String::from_utf8_lossy(&group.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    for (dir, mode, dir_gid) in [
        ("/run/egress-guard", 0o750, gid),
        ("/var/log/egress-guard", 0o750, gid),
        ("/var/lib/egress-guard", 0o700, 0),
    ] {
        let m = std::fs::metadata(dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!((m.mode() & 0o7777, m.gid()), (mode, dir_gid), "{dir}");
    }
    assert_eq!(
        std::fs::metadata("/etc/egress-guard/config.toml")
            .unwrap()
            .mode()
            & 0o777,
        0o640
    );

    // The unit: verified, and its exposure score is the one the README states.
    succeeded(
        &Command::new("systemd-analyze")
            .args(["verify", UNIT])
            .output()
            .unwrap(),
        "systemd-analyze verify",
    );
    let sec = Command::new("systemd-analyze")
        .args(["security", "--offline=true", UNIT])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&sec.stdout);
    let score = text
        .lines()
        .find_map(|l| l.split("egress-guard.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no exposure level in {text}"))
        .to_string();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    assert!(
        readme.contains(&format!("exposure level **{score}**")),
        "the README does not state the unit's exposure level {score}"
    );

    // The unit's syscall filter keeps what the agent needs (no systemd runs here to apply it).
    let unit = std::fs::read_to_string(UNIT).unwrap();
    // The first line is an allow list; later lines add to it or (`~`) take from it, in order.
    let mut allowed = HashSet::new();
    for v in unit_values(&unit, "SystemCallFilter=") {
        let mut these = HashSet::new();
        let list = v.strip_prefix('~');
        for entry in list.unwrap_or(v).split_whitespace() {
            syscalls_of(entry, &mut these);
        }
        if list.is_some() {
            allowed.retain(|s| !these.contains(s));
        } else {
            allowed.extend(these);
        }
    }
    for needed in [
        "bpf",
        "perf_event_open",
        "ioctl",
        "inotify_init1",
        "inotify_add_watch",
        "prlimit64",
        "chown",
        "setsockopt",
        "epoll_wait",
    ] {
        assert!(
            allowed.contains(needed),
            "the unit's SystemCallFilter refuses {needed}"
        );
    }

    // Start the binary as the unit does: ExecStartPre, then ExecStart with a notify socket,
    // with exactly the unit's capabilities (CapabilityBoundingSet, applied with setpriv).
    let exec = |key: &str| -> Vec<String> {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let pre = exec("ExecStartPre=");
    succeeded(
        &Command::new(&pre[0]).args(&pre[1..]).output().unwrap(),
        "ExecStartPre",
    );
    let dir = std::env::temp_dir().join(unique("notify"));
    std::fs::create_dir(&dir).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // What systemd does for the unit (RequiresMountsFor=/sys/fs/bpf): bpffs is mounted.
    let mounted = Command::new("mountpoint")
        .args(["-q", "/sys/fs/bpf"])
        .status()
        .unwrap();
    if !mounted.success() {
        succeeded(
            &Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .output()
                .unwrap(),
            "mounting bpffs",
        );
    }
    let caps: Vec<String> = unit_values(&unit, "CapabilityBoundingSet=")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty(), "the unit bounds no capabilities");
    let start = exec("ExecStart=");
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let agent = Command::new("setpriv")
        .arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg("--inh-caps=-all")
        .args(&start)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = agent.id() as i32;
    cleanup.agent = Some(agent);
    let ready = wait_notify(&notify, "READY=1");
    assert!(ready.contains("STATUS=enforcing"), "{ready}");
    wait_notify(&notify, "WATCHDOG=1");
    // With only those capabilities everything came up: process records, a socket guard.
    let log = std::fs::read_to_string(&log_path).unwrap();
    for bad in ["unavailable", "NONE could be attached", "ERROR"] {
        assert!(
            !log.contains(bad),
            "the agent is degraded under the unit's capabilities ({bad}):\n{log}"
        );
    }

    // Enforcing on the slice: a raw socket is refused there (no packet needs to leave).
    assert!(
        probe_in(&slice, &["raw"]).eperm(),
        "openhands.slice is not guarded"
    );
    let status = Command::new("/usr/bin/egress-guard")
        .args(["status", "--json"])
        .output()
        .unwrap();
    succeeded(&status, "egress-guard status (default socket)");

    // Removal without systemd stops the agent running on the package's pins, and no other
    // process of that name (another agent, an SRE's `egress-guard events --follow`): a
    // bystander named egress-guard must survive it. Then it detaches, on purpose.
    let bystander_bin = dir.join("egress-guard");
    std::fs::copy("/bin/sleep", &bystander_bin).unwrap();
    let mut bystander = Command::new(&bystander_bin).arg("300").spawn().unwrap();
    let removed = dpkg(&["-r", "egress-guard"]);
    let bystander_lived = bystander.try_wait().unwrap().is_none();
    let _ = bystander.kill();
    let _ = bystander.wait();
    succeeded(&removed, "dpkg -r");
    assert!(
        bystander_lived,
        "removal killed another process named egress-guard"
    );
    let agent_exit = cleanup.agent.as_mut().unwrap().try_wait().unwrap();
    assert!(
        agent_exit.is_some_and(|s| s.success()),
        "removal did not stop the agent (pid {pid}) cleanly: {agent_exit:?}"
    );
    cleanup.agent = None;
    assert!(
        probe_in(&slice, &["raw"]).ok(),
        "removal left the containers guarded without a DNS proxy"
    );
    assert!(
        !Path::new("/sys/fs/bpf/egress-guard").exists(),
        "pins left after removal"
    );
    assert!(!Path::new("/usr/bin/egress-guard").exists());
    assert!(
        Path::new("/etc/egress-guard/config.toml").exists(),
        "removal must keep the config"
    );

    succeeded(&dpkg(&["--purge", "egress-guard"]), "dpkg --purge");
    for gone in [
        "/etc/egress-guard",
        "/var/lib/egress-guard",
        "/var/log/egress-guard",
        UNIT,
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert!(!dpkg(&["-s", "egress-guard"]).status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
