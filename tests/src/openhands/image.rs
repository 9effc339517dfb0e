//! The sandbox image: Debian trixie minbase from debootstrap, a venv with the hash-pinned
//! OpenHands packages from PyPI, `docker import`ed (no registry); its root filesystem cached
//! under `target/openhands/<key>/` by the hash of what goes into it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::docker::Dockerd;

/// The pinned requirements (194 distributions with sha256 hashes, for CPython 3.13).
pub const LOCK: &str = include_str!("../../openhands/requirements.lock");
/// The OpenHands release the lock pins.
pub const VERSION: &str = "1.58.2";
/// Debian packages of the image (debootstrap `--include`): Python and its venv module, and
/// what the agent server and the scripted commands use (tmux for the terminal tool, tini as
/// PID 1, git as in the official image; curl, nc, ps).
pub const PACKAGES: &[&str] = &[
    "python3",
    "python3-venv",
    "ca-certificates",
    "tmux",
    "tini",
    "git",
    "curl",
    "netcat-openbsd",
    "procps",
];
/// The Debian release and mirror of the image.
const SUITE: &str = "trixie";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Bump when the build steps change (part of the cache key).
const RECIPE: &str = "1";

/// Where the image's rootfs is cached: `target/openhands/<key>/`.
pub fn cache_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/openhands")
}

/// The image's tag: the release and the cache key, so a changed lock is a new image.
pub fn image_tag() -> String {
    format!(
        "egress-guard-demo/openhands-sandbox:{VERSION}-{}",
        cache_key()
    )
}

/// sha256 of the lock, the package list, the suite and the recipe; 16 hex digits.
pub fn cache_key() -> String {
    let input = format!("{LOCK}\n{}\n{SUITE}\n{RECIPE}\n", PACKAGES.join(","));
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..16].to_string()
}

/// The image's root filesystem, built unless cached.
pub struct Rootfs {
    pub path: PathBuf,
    /// How long this call built it; None when it came from the cache.
    pub built_in: Option<Duration>,
    /// The build's steps and their times, from this build or the cached one's record.
    pub steps: Vec<(String, f64)>,
}

/// Builds (or finds) the rootfs in `target/openhands/<key>/rootfs`: debootstrap of trixie
/// minbase with [`PACKAGES`], a venv at /opt/openhands, and `pip install --require-hashes` of
/// the lock in a chroot (the host's CA bundle given to pip, for hosts behind a TLS proxy).
/// Progress goes to stderr.
pub fn build_rootfs() -> Rootfs {
    let dir = cache_root().join(cache_key());
    let path = dir.join("rootfs");
    let done = dir.join("built.json");
    let read_steps = |done: &Path| -> Vec<(String, f64)> {
        let v: Value = std::fs::read_to_string(done)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        v["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s[0].as_str().unwrap_or("").to_string(),
                    s[1].as_f64().unwrap_or(0.0),
                )
            })
            .collect()
    };
    if done.exists() && path.join("opt/openhands/bin/agent-server").exists() {
        return Rootfs {
            steps: read_steps(&done),
            path,
            built_in: None,
        };
    }
    let started = Instant::now();
    let tmp = dir.join("rootfs.partial");
    unmount_under(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&dir).unwrap();
    let mut steps = Vec::new();
    let mut step = |name: &str, cmd: &mut Command| {
        eprintln!("[openhands image] {name}");
        let t = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if !out.status.success() {
            unmount_under(&tmp);
            let err = String::from_utf8_lossy(&out.stderr);
            let outp = String::from_utf8_lossy(&out.stdout);
            let tail = |s: &str| s.lines().rev().take(25).collect::<Vec<_>>().join("\n");
            panic!(
                "{name} failed ({}):\n{}\n{}",
                out.status,
                tail(&outp),
                tail(&err)
            );
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!("[openhands image] {name}: {secs:.0} s");
        steps.push((name.to_string(), secs));
    };
    step(
        "debootstrap",
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&tmp)
            .arg(MIRROR),
    );
    // What pip needs in the chroot: a resolver, the lock, and the host's CA bundle (a host
    // behind a TLS-inspecting proxy trusts its CA there; on others it is Debian's own).
    let ca = std::env::var("PIP_CERT").unwrap_or("/etc/ssl/certs/ca-certificates.crt".into());
    std::fs::copy("/etc/resolv.conf", tmp.join("etc/resolv.conf")).unwrap();
    std::fs::write(tmp.join("tmp/requirements.lock"), LOCK).unwrap();
    std::fs::copy(&ca, tmp.join("tmp/host-ca.crt"))
        .unwrap_or_else(|e| panic!("copying the CA bundle {ca}: {e}"));
    let chroot = |args: &[&str]| {
        let mut c = Command::new("chroot");
        // env -i: none of this host's pip settings (find-links, index) leak in.
        c.arg(&tmp).args([
            "env",
            "-i",
            "PATH=/opt/openhands/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            "PIP_CERT=/tmp/host-ca.crt",
            "PIP_DISABLE_PIP_VERSION_CHECK=1",
            "PIP_DEFAULT_TIMEOUT=120",
        ]);
        c.args(args);
        c
    };
    step(
        "python3 -m venv /opt/openhands",
        &mut chroot(&["python3", "-m", "venv", "/opt/openhands"]),
    );
    step(
        "pip install --require-hashes (the lock)",
        &mut chroot(&[
            "/opt/openhands/bin/pip",
            "install",
            "--no-cache-dir",
            "--require-hashes",
            "-r",
            "/tmp/requirements.lock",
        ]),
    );
    for f in [
        "tmp/requirements.lock",
        "tmp/host-ca.crt",
        "etc/resolv.conf",
    ] {
        let _ = std::fs::remove_file(tmp.join(f));
    }
    let _ = std::fs::write(tmp.join("etc/resolv.conf"), "");
    let _ = std::fs::remove_dir_all(tmp.join("var/cache/apt/archives"));
    let _ = std::fs::remove_dir_all(tmp.join("var/lib/apt/lists"));
    std::fs::create_dir_all(tmp.join("var/lib/apt/lists/partial")).unwrap();
    std::fs::create_dir_all(tmp.join("workspace")).unwrap();
    unmount_under(&tmp);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::rename(&tmp, &path).unwrap();
    let built_in = started.elapsed();
    std::fs::write(
        &done,
        json!({"seconds": built_in.as_secs_f64(), "steps": steps}).to_string(),
    )
    .unwrap();
    Rootfs {
        path,
        built_in: Some(built_in),
        steps,
    }
}

/// Unmounts what a failed debootstrap may have left mounted under `dir` (its /proc, /sys).
fn unmount_under(dir: &Path) {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.display().to_string();
    let mut points: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&format!("{d}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).output();
    }
}

/// `docker import` of the rootfs into `d` as [`image_tag`], with the image's settings (the
/// agent server as the entry point under tini, as in OpenHands' own image). Returns the time.
pub fn import_image(d: &Dockerd, rootfs: &Path) -> Duration {
    let t = Instant::now();
    let tag = image_tag();
    d.import_tree(
        rootfs,
        &[
            "ENV PATH=/opt/openhands/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            "ENV LC_ALL=C.UTF-8",
            "WORKDIR /workspace",
            "EXPOSE 8000",
            r#"ENTRYPOINT ["/usr/bin/tini", "--", "/opt/openhands/bin/agent-server"]"#,
            r#"CMD ["--host", "0.0.0.0", "--port", "8000"]"#,
        ],
        &tag,
    );
    t.elapsed()
}
