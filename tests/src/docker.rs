//! A real Docker engine for the end-to-end tests: Debian's dockerd with everything private
//! under a directory of its own, containers under a test cgroup, and an image made on the spot
//! (busybox-static and the probe) without a registry.
//!
//! Everything the daemon creates is written down in `<dir>/owned` before it can exist (the
//! bridges, the run directories it makes, the cgroup directories runc makes in every
//! hierarchy), and [`Dockerd`]'s Drop removes exactly that, also when a test fails; [`sweep`]
//! does the same for a daemon whose test process was killed.

use std::{
    io::Read as _,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{PREFIX, ProbeResult, TestCgroup, probe_bin, remove_cgroup_tree, unique};

/// Debian's client (`/usr/local/bin/docker` on these machines is another, newer one).
pub const DOCKER: &str = "/usr/bin/docker";
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The default bridge's gateway: the host as containers on it see it.
pub const GATEWAY: &str = "172.17.0.1";
/// The image every test container runs: busybox applets in /bin, the probe at /probe.
pub const IMAGE: &str = "egress-guard-test/probe";

const APPLETS: &[&str] = &[
    "sh", "sleep", "cat", "echo", "ls", "ps", "id", "true", "false", "nslookup", "wget", "nc",
    "ip", "hostname", "env",
];

/// A private dockerd whose containers land in `cgroup` (`<cgroup2>/<cgroup>/<64 hex id>`).
pub struct Dockerd {
    /// Everything of this daemon: data root, exec root, socket, logs, the image tree.
    pub dir: PathBuf,
    child: Option<Child>,
    // Last: removed after the daemon and its containers are gone.
    pub cgroup: TestCgroup,
}

impl Dockerd {
    /// Starts the daemon with a new test cgroup as its (absolute) cgroup parent, waits until
    /// it answers, and imports [`IMAGE`].
    pub fn start(what: &str) -> Self {
        let dockerd = Self::start_bare(what);
        dockerd.import_image();
        dockerd
    }

    /// [`Dockerd::start`] without the probe image: for callers that import their own
    /// ([`Dockerd::import_tree`]).
    pub fn start_bare(what: &str) -> Self {
        assert!(
            !link_exists("docker0"),
            "docker0 exists: another Docker daemon runs on this machine; the tests need the \
             bridge for their own"
        );
        let cgroup = TestCgroup::new(what);
        let dir = std::env::temp_dir().join(unique("dockerd"));
        std::fs::create_dir_all(&dir).unwrap();
        // What this daemon will create, written down before it exists.
        let mut owned = vec!["link docker0".to_string()];
        for p in ["/run/docker", "/run/containerd", "/etc/docker/key.json"] {
            if !Path::new(p).exists() {
                owned.push(format!("path {p}"));
            }
        }
        owned.push(format!("cgroup {}", cgroup.rel()));
        std::fs::write(dir.join("owned"), owned.join("\n") + "\n").unwrap();
        // No /etc/docker/daemon.json of the host; the trust key stays in here too.
        std::fs::write(
            dir.join("daemon.json"),
            format!(
                "{{\"deprecated-key-path\": \"{}\"}}\n",
                dir.join("key.json").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let d = |sub: &str| dir.join(sub).display().to_string();
        let child = Command::new(DOCKERD)
            .arg(format!("--config-file={}", d("daemon.json")))
            .arg(format!("--data-root={}", d("root")))
            .arg(format!("--exec-root={}", d("exec")))
            .arg(format!("--pidfile={}", d("dockerd.pid")))
            .arg(format!("--host=unix://{}", d("docker.sock")))
            .arg("--exec-opt=native.cgroupdriver=cgroupfs")
            .arg("--storage-driver=overlay2")
            .arg(format!("--bip={GATEWAY}/16"))
            .args(["--iptables=false", "--ip-forward=false", "--ip-masq=false"])
            // Absolute: a relative parent resolves against dockerd's own cgroup.
            .arg(format!("--cgroup-parent=/{}", cgroup.rel()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd (Debian's docker.io)");
        let mut dockerd = Dockerd {
            dir,
            child: Some(child),
            cgroup,
        };
        let end = Instant::now() + Duration::from_secs(30);
        while !dockerd.docker(&["info"]).status.success() {
            if let Some(status) = dockerd.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dockerd exited ({status}):\n{}", dockerd.log_tail());
            }
            assert!(
                Instant::now() < end,
                "dockerd did not answer:\n{}",
                dockerd.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        dockerd
    }

    /// `[docker] root` for the agent: where this daemon keeps container metadata.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The client, talking to this daemon only.
    pub fn client(&self) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.env(
            "DOCKER_HOST",
            format!("unix://{}", self.dir.join("docker.sock").display()),
        )
        .env("DOCKER_CONFIG", self.dir.join("client"));
        cmd
    }

    /// Runs `docker ARGS` against this daemon (60 s at most).
    pub fn docker(&self, args: &[&str]) -> Output {
        output_within(self.client().args(args), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
    }

    /// `docker ARGS`, which must succeed; its stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `docker run -d` of [`IMAGE`] running `cmd`; the full container id.
    pub fn run_detached(
        &self,
        name: &str,
        labels: &[&str],
        network: Option<&str>,
        cmd: &[&str],
    ) -> String {
        let mut args = vec!["run", "-d", "--name", name];
        for l in labels {
            args.extend(["--label", l]);
        }
        if let Some(n) = network {
            args.extend(["--network", n]);
        }
        args.push(IMAGE);
        args.extend(cmd);
        self.ok(&args)
    }

    /// `docker run --rm` of [`IMAGE`] running `cmd` in the foreground: its output and exit
    /// status (Docker's own failures are 125–127), and the container's full id.
    pub fn run_rm(&self, name: &str, cmd: &[&str]) -> (ProbeResult, String) {
        let cidfile = self.dir.join(format!("{name}.cid"));
        let cid = cidfile.display().to_string();
        let mut args = vec!["run", "--rm", "--name", name, "--cidfile", &cid, IMAGE];
        args.extend(cmd);
        let out = self.docker(&args);
        let id = std::fs::read_to_string(&cidfile).unwrap_or_default();
        let _ = std::fs::remove_file(&cidfile);
        (result(out), id.trim().to_string())
    }

    /// `docker exec ID CMD…`: its output and exit status.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> ProbeResult {
        let mut args = vec!["exec", id];
        args.extend(cmd);
        result(self.docker(&args))
    }

    /// The container's cgroup v2 directory (present while it runs).
    pub fn cgroup_of(&self, id: &str) -> PathBuf {
        self.cgroup.path.join(id)
    }

    /// `docker network create NAME` (a bridge `br-<id>`, removed with the daemon); its full
    /// id and gateway address.
    pub fn network_create(&self, name: &str) -> (String, String) {
        let id = self.ok(&["network", "create", name]);
        self.own(&format!("link br-{}", &id[..12]));
        let gw = self.ok(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
            name,
        ]);
        (id, gw)
    }

    fn own(&self, line: &str) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("owned"))
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        // Its warnings and errors (the info level is mostly gRPC chatter).
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("level=info") && !l.contains("level=debug"))
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The image: busybox-static with its applets, passwd/group, and the probe with the
    /// libraries `ldd` names (at the same paths), imported from a tar stream.
    fn import_image(&self) {
        let tree = self.dir.join("image");
        for sub in ["bin", "etc", "tmp"] {
            std::fs::create_dir_all(tree.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
            .expect("copying /bin/busybox (busybox-static)");
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
        }
        std::fs::write(
            tree.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(tree.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
        let probe = probe_bin();
        std::fs::copy(&probe, tree.join("probe")).unwrap();
        let ldd = Command::new("ldd").arg(&probe).output().expect("ldd");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-…so.2 (0x…)`
            let path = line
                .split_once("=>")
                .map_or(line, |(_, r)| r)
                .split_whitespace()
                .next()
                .unwrap_or("");
            if path.starts_with('/') {
                let to = tree.join(path.trim_start_matches('/'));
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(path, &to).unwrap_or_else(|e| panic!("copying {path}: {e}"));
            }
        }
        self.import_tree(&tree, &[r#"CMD ["/bin/sh"]"#], IMAGE);
    }

    /// `tar -C tree -c . | docker import -c CHANGE… - image`: an image made without a
    /// registry from a directory tree.
    pub fn import_tree(&self, tree: &Path, changes: &[&str], image: &str) {
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(tree)
            .args(["--numeric-owner", "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let mut import = self.client();
        import.arg("import");
        for c in changes {
            import.args(["-c", c]);
        }
        let out = import
            .args(["-", image])
            .stdin(Stdio::from(tar.stdout.take().unwrap()))
            .output()
            .unwrap();
        assert!(
            tar.wait().unwrap().success(),
            "tar of the image tree failed"
        );
        assert!(
            out.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- dockerd log ({}), last warnings ---\n{}",
                self.dir.display(),
                self.log_tail()
            );
        }
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none());
        if running {
            // The containers and networks first, while the daemon can still remove them.
            // Never a panic here (it may run while a failed test unwinds): bounded, unchecked.
            let run = |args: &[&str]| {
                output_within(self.client().args(args), Duration::from_secs(30)).ok()
            };
            let list = |args: &[&str]| {
                let out = run(args).map(|o| o.stdout).unwrap_or_default();
                String::from_utf8_lossy(&out)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            };
            let ids = list(&["ps", "-aq"]);
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.iter().map(String::as_str));
                run(&args);
            }
            let nets = list(&["network", "ls", "-q", "--filter", "type=custom"]);
            if !nets.is_empty() {
                let mut args = vec!["network", "rm"];
                args.extend(nets.iter().map(String::as_str));
                run(&args);
            }
            let child = self.child.as_mut().unwrap();
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        clean_up(&self.dir);
    }
}

/// Removes what the daemon of `dir` left: its processes (dockerd, its containerd, the shims),
/// the container cgroups in every hierarchy, the mounts under `dir`, the links and paths
/// written down in `dir/owned`, then `dir`. Idempotent.
fn clean_up(dir: &Path) {
    let owned = std::fs::read_to_string(dir.join("owned")).unwrap_or_default();
    kill_processes_of(dir);
    for line in owned.lines() {
        if let Some(rel) = line.strip_prefix("cgroup ") {
            // v1 hierarchies: runc made `<hierarchy>/<parent>/<id>` in each; the cgroup2
            // parent itself belongs to the TestCgroup, its children (containers) go here.
            for h in cgroup_hierarchies() {
                let p = h.path.join(rel);
                if h.v2 {
                    for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            remove_cgroup_tree(&e.path());
                        }
                    }
                } else {
                    remove_cgroup_tree(&p);
                }
            }
        }
    }
    unmount_under(dir);
    for line in owned.lines() {
        if let Some(link) = line.strip_prefix("link ")
            && link_exists(link)
        {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        } else if let Some(path) = line.strip_prefix("path ") {
            let p = Path::new(path);
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// SIGKILLs every process whose command line names `dir` (dockerd, its containerd, the
/// containerd shims) and waits until they are gone.
fn kill_processes_of(dir: &Path) {
    let mut needle = dir.as_os_str().as_bytes().to_vec();
    needle.push(b'/');
    let me = std::process::id();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = 0;
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let zombie = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            if pid != me && !zombie && cmdline.windows(needle.len()).any(|w| w == needle) {
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                left += 1;
            }
        }
        if left == 0 || Instant::now() > end {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts every mount at or under `dir`, deepest first, lazily (overlays, netns files, the
/// data root's own bind mount).
fn unmount_under(dir: &Path) {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.display().to_string();
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == d || p.starts_with(&format!("{d}/")))
        .map(str::to_string)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let c = std::ffi::CString::new(p).unwrap();
        // SAFETY: a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

struct Hierarchy {
    path: PathBuf,
    v2: bool,
}

/// Every mounted cgroup hierarchy (v1 controllers and cgroup2), from /proc/self/mountinfo.
fn cgroup_hierarchies() -> Vec<Hierarchy> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let path = PathBuf::from(left.split(' ').nth(4)?);
            (fstype == "cgroup" || fstype == "cgroup2").then(|| Hierarchy {
                path,
                v2: fstype == "cgroup2",
            })
        })
        .collect()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Removes daemons (and what they made) of earlier runs whose test process is gone, and the
/// v1 cgroup directories such runs left.
pub fn sweep() {
    let stale = |name: &str| {
        name.strip_prefix(&format!("{PREFIX}-"))
            .and_then(|r| r.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with("-dockerd") && stale(&name) {
            clean_up(&e.path());
        }
    }
    for h in cgroup_hierarchies().into_iter().filter(|h| !h.v2) {
        for e in std::fs::read_dir(&h.path).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && stale(&name) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}

fn result(out: Output) -> ProbeResult {
    use std::os::unix::process::ExitStatusExt as _;
    ProbeResult {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        code: out.status.code(),
        signal: out.status.signal(),
    }
}

/// `cmd.output()`, killed after `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> std::io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!("timed out after {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    })
}
