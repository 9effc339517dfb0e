//! Project tasks: `cargo xtask setup | test | demo | bench | dist | package | fuzz`.
//!
//! `setup` makes a fresh machine able to build and test (idempotent; `test` and `demo` run it
//! first). `test` is the whole check CI runs. `demo` shows the agent at work in a throwaway
//! cgroup on loopback; `demo openhands` guards the real OpenHands agent server.

mod bench;
mod bench_audit;
mod bench_cloudwatch;
mod bench_dns;
mod bench_host;
mod bench_lifecycle;
mod bench_peers;
mod bench_throughput;
mod demo;
mod demo_openhands;
mod empty_hooks;
mod fuzz;
mod layers;
mod package;
mod scratch;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "egress-guard project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks: rust-src, bpf-linker (built against the toolchain's
    /// own LLVM) and the Debian packages the tests need. Safe to run again.
    Setup,
    /// Set up, then: rustfmt check, clippy (-D warnings, the eBPF crate too), unit tests and the
    /// privileged end-to-end tests (root; loopback only).
    Test,
    /// Set up, build, and show an allowed and a refused connection from a guarded cgroup (root).
    /// `demo openhands`: the real OpenHands agent server (PyPI) in a guarded sandbox under a
    /// private Docker engine, driven by a scripted LLM that tries to get out; builds its image
    /// (Debian trixie + pinned wheels, no registry) the first time, ~4 minutes, cached in
    /// target/openhands.
    Demo {
        #[arg(value_enum)]
        which: Option<DemoWhich>,
    },
    /// connect() cost from a guarded cgroup vs bare, iptables and nftables, at 10 to 100,000
    /// allowed addresses, then the audit pipeline under connect and exec storms (root;
    /// loopback only), throughput (bulk TCP, UDP sends), the lifecycle (time to enforcing, restart
    /// and upgrade gaps), the DNS proxy's added latency, CloudWatch delivery latency, the peer
    /// comparison (HTTPS through egress-guard vs an allowlisting squid proxy vs bare), and what
    /// the agent costs processes it does not guard. Writes docs/benchmarks/*. EG_BENCH=connect,
    /// throughput, host, lifecycle, audit, dns, cloudwatch or peers runs one part;
    /// EG_BENCH_SIZES=10,1000 picks policy sizes.
    Bench,
    /// Build the release binary and write shell completions and the man page to target/dist.
    Dist,
    /// Build the .deb (binary, systemd unit and slice, default config, tmpfiles and sysusers
    /// entries, completions, man page, docs) into target/debian.
    Package,
    /// The real-host test (root; ~15 minutes): a Debian 12 machine with systemd, Docker and
    /// distribution kernels (6.1, 6.12) boots under qemu's emulation, installs the .deb as an
    /// operator would and runs the scenarios in xtask/vm/scenario. `test` runs it too.
    VmTest {
        /// Keep the machines' disks in target/vm and print how to boot them with a console.
        #[arg(long)]
        keep: bool,
    },
    /// Fuzz the DNS proxy's handling of requests and upstream answers (cargo fuzz, libFuzzer),
    /// each target for SECONDS (default 60). `test` runs it for a few seconds.
    Fuzz {
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DemoWhich {
    /// The real OpenHands agent server under the guard.
    Openhands,
}

/// Debian packages the tests, demo and benchmarks need (checked with dpkg, installed with
/// apt-get).
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "python3",
    "dnsmasq-base",
    // Real Docker for the container tests, and a busybox image for their containers.
    "docker.io",
    "busybox-static",
    // The real-host test: a Debian image built with debootstrap (qemu comes from backports).
    "debootstrap",
    // The benchmark's kernel time per program (it reads kernel.bpf_stats through bpftool).
    "bpftool",
    // The peer comparison: curl as the client, squid as the allowlisting proxy.
    "curl",
    "squid",
];

/// How long `test` fuzzes each DNS target (`cargo xtask fuzz` for longer runs).
const FUZZ_SECONDS_IN_TEST: u64 = 15;

/// The bpf-linker release the build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Fuzz { seconds } => {
            setup()?;
            fuzz::run_all(seconds)
        }
        Task::Test => test(),
        Task::Demo { which: None } => {
            setup()?;
            demo::run()
        }
        Task::Demo {
            which: Some(DemoWhich::Openhands),
        } => {
            setup()?;
            demo_openhands::run()
        }
        Task::Bench => {
            setup()?;
            bench::run()
        }
        Task::Dist => {
            setup()?;
            dist()
        }
        Task::VmTest { keep } => {
            setup()?;
            vm::run_all(keep)
        }
        Task::Package => {
            setup()?;
            package::package().map(|_| ())
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command in the workspace root, failing with its command line.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    eprintln!("==> {}", describe(cmd));
    let started = std::time::Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    // Where CI's time goes, step by step.
    eprintln!("<== {:.0} s", started.elapsed().as_secs_f64());
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Where the cgroup v2 hierarchy is mounted (never assumed: /sys/fs/cgroup/unified on hybrid hosts).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| PathBuf::from(left.split(' ').nth(4).unwrap_or("")))
        })
        .context("no cgroup2 filesystem is mounted")
}

pub fn is_root() -> bool {
    // The effective uid, from /proc (no libc dependency needed).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

// ------------------------------------------------------------------------------------------
// setup
// ------------------------------------------------------------------------------------------

fn setup() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_apt_packages()?;
    ensure_qemu()?;
    ensure_python_packages()?;
    eprintln!("==> setup complete");
    Ok(())
}

fn sysroot() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(
        output(Command::new("rustc").args(["--print", "sysroot"]))?.trim(),
    ))
}

/// The bpfel target is tier 3: core is built from source, which needs rust-src.
fn ensure_rust_src() -> anyhow::Result<()> {
    if sysroot()?
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

/// bpf-linker must read the bitcode of this rustc: build it against the toolchain's own
/// libLLVM (no LLVM dev package of that version exists for Debian 12).
fn ensure_bpf_linker() -> anyhow::Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Ok(());
    }
    let sysroot = sysroot()?;
    let llvm_lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}/lib", sysroot.display()))?;
    let version = output(Command::new("rustc").arg("-vV"))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV shows no LLVM version")?
        .to_string();
    // A persistent prefix: bpf-linker keeps it as its library search path (RUNPATH).
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home
        .join("egress-guard-llvm")
        .join(llvm_lib.file_name().unwrap());
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for name in [
        std::ffi::OsStr::new("libLLVM.so"),
        llvm_lib.file_name().unwrap(),
    ] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm_lib, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args([
            "install",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix))
}

/// The CloudWatch tests' server (moto_server) and client (boto3), and cfn-lint for the
/// shipped CloudFormation template, from PyPI.
const PIP_PACKAGES: &[&str] = &["moto[server]>=5,<6", "boto3", "cfn-lint"];

fn ensure_python_packages() -> anyhow::Result<()> {
    let have = Command::new("python3")
        .args(["-c", "import moto.server, boto3, flask, cfnlint"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet"])
        .args(PIP_PACKAGES))
}

/// qemu 8 or newer for the real-host test: Debian 12's 7.2 boots the 6.12 kernel into a
/// double fault most of the time under emulation (seen in 7 of 8 boots; 10.0 from
/// bookworm-backports booted it every time). Installed from backports through a source
/// list of its own for this one command: the machine's apt configuration is not changed.
fn ensure_qemu() -> anyhow::Result<()> {
    let major = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let v = text
                .split("version ")
                .nth(1)?
                .split('.')
                .next()?
                .to_string();
            v.parse::<u32>().ok()
        });
    if major.is_some_and(|m| m >= 8) {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the real-host test needs qemu-system-x86 8 or newer (bookworm-backports): run as root"
        );
    }
    let list = std::env::temp_dir().join("egress-guard-backports.list");
    std::fs::write(
        &list,
        "deb http://deb.debian.org/debian bookworm main\n\
         deb http://deb.debian.org/debian bookworm-backports main\n",
    )?;
    let with_backports = |cmd: &mut Command| {
        cmd.arg("-o")
            .arg(format!("Dir::Etc::sourcelist={}", list.display()))
            .args([
                "-o",
                "Dir::Etc::sourceparts=-",
                "-o",
                "APT::Get::List-Cleanup=0",
            ]);
    };
    let mut update = Command::new("apt-get");
    with_backports(&mut update);
    run(update.args(["update", "-q"]))?;
    let mut install = Command::new("apt-get");
    with_backports(&mut install);
    run(install
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
        ])
        .arg("qemu-system-x86")
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: run as root, or `apt-get install {}`",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // The package starts a proxy on port 3128 where it can; the bench runs its own instance.
    if missing.contains(&"squid") {
        bench_peers::stop_distro_squid();
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// test
// ------------------------------------------------------------------------------------------

fn test() -> anyhow::Result<()> {
    setup()?;
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    layers::check(&workspace_root().join("agent/src"))?;
    run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The library as the fuzz targets build it: without the CloudWatch sink (the AWS SDK).
    run(Command::new("cargo").args([
        "clippy",
        "-p",
        "egress-guard",
        "--lib",
        "--no-default-features",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo")
        .args([
            "clippy",
            "-p",
            "agent-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--", "-D", "warnings"])
        .env("RUSTC_BOOTSTRAP", "1"))?;
    run(Command::new("cargo").args([
        "test",
        "--workspace",
        "--exclude",
        "egress-guard-e2e",
        "--exclude",
        "agent-ebpf",
    ]))?;
    fuzz::run_all(FUZZ_SECONDS_IN_TEST)?;
    // The CloudWatch packaging: the template lints clean, the dashboard and IAM policy agree
    // with it and with what the agent calls.
    let cw = workspace_root().join("packaging/cloudwatch");
    run(Command::new("python3")
        .args([
            "-c",
            "import sys; from cfnlint.runner import main; sys.argv[0] = 'cfn-lint'; sys.exit(main())",
        ])
        .arg(cw.join("egress-guard.yaml")))?;
    run(Command::new("python3").arg(cw.join("check.py")))?;
    if !is_root() {
        bail!("the end-to-end tests load eBPF programs: run `cargo xtask test` as root");
    }
    build_binaries()?;
    // The .deb the package test installs and purges.
    let deb = package::package()?;
    // One at a time: the tests share the kernel (cgroups, bpffs, tracepoints).
    run(Command::new("cargo")
        .args([
            "test",
            "-p",
            "egress-guard-e2e",
            "--test",
            "e2e",
            "--",
            "--test-threads=1",
        ])
        .env(
            "EGRESS_GUARD_BIN",
            workspace_root().join("target/debug/egress-guard"),
        )
        .env("EGRESS_GUARD_DEB", deb))?;
    vm::run_all(false)
}

/// The agent and the test probe, in target/debug.
pub fn build_binaries() -> anyhow::Result<()> {
    run(Command::new("cargo").args([
        "build",
        "-p",
        "egress-guard",
        "-p",
        "egress-guard-e2e",
        "--bins",
    ]))
}

/// target/dist: the release binary, completions for bash, zsh and fish, and the man page,
/// all generated from the clap definition.
pub fn dist() -> anyhow::Result<()> {
    dist_build(None)
}

/// `dist` for a build with this build id (`EGRESS_GUARD_BUILD_ID`), or none.
pub fn dist_build(build_id: Option<&str>) -> anyhow::Result<()> {
    let mut build = Command::new("cargo");
    build.args(["build", "--release", "-p", "egress-guard"]);
    match build_id {
        Some(id) => build.env("EGRESS_GUARD_BUILD_ID", id),
        None => build.env_remove("EGRESS_GUARD_BUILD_ID"),
    };
    run(&mut build)?;
    let bin = workspace_root().join("target/release/egress-guard");
    let out = workspace_root().join("target/dist");
    std::fs::create_dir_all(out.join("completions"))?;
    std::fs::copy(&bin, out.join("egress-guard"))?;
    for (what, file) in [
        ("bash", "completions/egress-guard.bash"),
        ("zsh", "completions/_egress-guard"),
        ("fish", "completions/egress-guard.fish"),
        ("man", "egress-guard.1"),
    ] {
        let text = output(Command::new(&bin).args(["generate", what]))?;
        std::fs::write(out.join(file), text)?;
    }
    eprintln!("==> wrote {}", out.display());
    Ok(())
}
