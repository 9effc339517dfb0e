//! `cargo xtask bench`: connect() cost from a guarded cgroup against what users would use
//! instead, at growing policy sizes. Loopback only.
//!
//! Variants, each with its own cgroup, run interleaved (round-robin, rotated each round):
//! - `bare`: a cgroup with nothing attached;
//! - `egress-guard`: the agent's programs, N allowed addresses (exact) + the target;
//! - `iptables`: OUTPUT `-m cgroup --path` jumping to a chain of N ACCEPT rules + REJECT, as the
//!   seed design's iptables allowlist would;
//! - `nftables`: one rule matching the cgroup and an address set of N elements;
//! - `empty-hooks`: do-nothing programs at the agent's cgroup hooks (`empty_hooks`): what
//!   calling a program there costs, whatever it does.
//!
//! Writes docs/benchmarks/connect.json and docs/benchmarks/connect.svg, prints a table.

use std::{
    fmt::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{is_root, workspace_root};

/// The parts after the connect comparison, by their `EG_BENCH` name.
type Part = fn(&Path, &Path) -> anyhow::Result<String>;
const PARTS: [(&str, Part); 7] = [
    ("throughput", crate::bench_throughput::run),
    ("host", crate::bench_host::run),
    ("lifecycle", crate::bench_lifecycle::run),
    ("audit", crate::bench_audit::run),
    ("dns", crate::bench_dns::run),
    ("cloudwatch", crate::bench_cloudwatch::run),
    ("peers", crate::bench_peers::run),
];

/// Policy sizes (allowed addresses); `EG_BENCH_SIZES=10,1000` picks others.
const SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];
/// A multiple of 10: each round takes the next row of [`ORDERS`].
const ROUNDS: usize = 20;
/// The variants' order in each round: a balanced Latin square (Williams; for five variants a
/// square and its mirror), so every variant runs right after every other equally often and
/// none inherits another's leftovers more.
const ORDERS: [[usize; 5]; 10] = [
    [0, 1, 4, 2, 3],
    [1, 2, 0, 3, 4],
    [2, 3, 1, 4, 0],
    [3, 4, 2, 0, 1],
    [4, 0, 3, 1, 2],
    [3, 2, 4, 1, 0],
    [4, 3, 0, 2, 1],
    [0, 4, 1, 3, 2],
    [1, 0, 2, 4, 3],
    [2, 1, 3, 0, 4],
];
/// The probe runs on this CPU, the listener (this process) on CPU 0, to cut scheduling noise.
const PROBE_CPU: usize = 1;
/// How long one sample connects in a loop.
const SAMPLE_MILLIS: u32 = 400;
const VARIANTS: [&str; 5] = [
    "bare",
    "egress-guard",
    "iptables",
    "nftables",
    "empty-hooks",
];
/// Variants that let every destination through.
const OPEN: [&str; 2] = ["bare", "empty-hooks"];
const CHAIN: &str = "EG_BENCH";
const NFT_TABLE: &str = "egress_guard_bench";

/// Everything the bench set up; torn down on drop, also on failure.
struct Bench {
    cgroups: Vec<PathBuf>,
    empty: Option<crate::empty_hooks::EmptyHooks>,
    agent: Option<Child>,
    bin: PathBuf,
    pin_dir: PathBuf,
    dir: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.empty = None;
        self.stop_agent();
        let _ = Command::new(&self.bin)
            .args(["uninstall", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
        remove_iptables(&self.cgroup("iptables"));
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", NFT_TABLE])
            .output();
        for cg in &self.cgroups {
            let _ = std::fs::remove_dir(cg);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    fn cgroup(&self, variant: &str) -> String {
        format!("egress-guard-bench-{}-{variant}", std::process::id())
    }

    fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

fn remove_iptables(cgroup: &str) {
    let _ = Command::new("iptables")
        .args([
            "-D", "OUTPUT", "-m", "cgroup", "--path", cgroup, "-j", CHAIN,
        ])
        .output();
    let _ = Command::new("iptables").args(["-F", CHAIN]).output();
    let _ = Command::new("iptables").args(["-X", CHAIN]).output();
}

/// The i-th address of 198.18.0.0/15 (RFC 2544's benchmarking range: never a destination here).
fn bench_addr(i: usize) -> String {
    let n = (198u32 << 24) | (18 << 16) | (i as u32 + 1);
    std::net::Ipv4Addr::from(n).to_string()
}

pub(crate) fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// One timed loop of connects from inside a cgroup.
#[derive(Clone, Copy, serde::Serialize)]
struct Sample {
    /// Wall time per connect+close.
    ns: f64,
    /// The probe's own CPU time per connect+close (on its CPU; softirq work done in its
    /// context included).
    cpu_ns: f64,
    /// How often CPU 0 (the listener's and the agent's) went idle, per connect.
    cpu0_idle: f64,
    /// The agent's CPU time per connect (its threads, on CPU 0), if it runs.
    agent_cpu_ns: f64,
}

/// How many times CPU 0 entered an idle state (all states), if the kernel says.
fn cpu0_idle_entries() -> Option<u64> {
    let dir = Path::new("/sys/devices/system/cpu/cpu0/cpuidle");
    let mut n = 0;
    for e in std::fs::read_dir(dir).ok()? {
        let usage = std::fs::read_to_string(e.ok()?.path().join("usage")).ok()?;
        n += usage.trim().parse::<u64>().ok()?;
    }
    Some(n)
}

/// CPU time of every thread of `pid`, in ns (schedstat's first field).
pub(crate) fn process_cpu_ns(pid: u32) -> Option<u64> {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
        n += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(n)
}

fn measure(cgroup: &Path, probe: &Path, to: &str, agent: Option<u32>) -> anyhow::Result<Sample> {
    let idle_before = cpu0_idle_entries();
    let agent_before = agent.and_then(process_cpu_ns);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec taskset -c {PROBE_CPU} \"$0\" bench-connect \"$1\" {SAMPLE_MILLIS}",
            cgroup.display()
        ))
        .arg(probe)
        .arg(to)
        .output()?;
    let (idle_after, agent_after) = (cpu0_idle_entries(), agent.and_then(process_cpu_ns));
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse::<f64>().ok())
    };
    let (Some(ns), Some(cpu_ns), Some(n)) = (
        field("ns_per_connect"),
        field("cpu_ns_per_connect"),
        field("connects").filter(|n| *n > 0.0),
    ) else {
        bail!("probe in {} said {text:?}", cgroup.display());
    };
    let per_connect = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / n,
        _ => f64::NAN,
    };
    Ok(Sample {
        ns,
        cpu_ns,
        cpu0_idle: per_connect(idle_before, idle_after),
        agent_cpu_ns: per_connect(agent_before, agent_after),
    })
}

/// Accepts (and drops) the benchmark's connections on CPU 0 without ever sleeping: a
/// non-blocking accept in a loop, at SCHED_IDLE so anything else on CPU 0 (the agent) runs
/// first. A sleeping acceptor makes every connect pay for waking CPU 0 (an interrupt, and on
/// this VM a halt exit), unless something else keeps CPU 0 busy, as the agent does while it
/// drains records: that made the guarded loop measure faster than the bare one.
fn spin_acceptor(
    listener: TcpListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        let idle = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscall on this thread with a valid parameter.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((c, _)) => drop(c),
                Err(_) => std::hint::spin_loop(),
            }
        }
    }))
}

/// Keeps this process (the listener's accept threads) on CPU 0.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity take valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Whether one connect from inside `cgroup` succeeds.
fn connects(cgroup: &Path, probe: &Path, to: &str) -> anyhow::Result<bool> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" tcp \"$1\"",
            cgroup.display()
        ))
        .arg(probe)
        .arg(to)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "ok")
}

#[derive(serde::Serialize)]
struct Row {
    size: usize,
    variant: String,
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
    ratio_to_bare: f64,
    /// Median over rounds of (this variant − bare) in the same round.
    paired_delta_ns: f64,
    /// Median CPU time of the probe per connect, and its paired difference to bare.
    cpu_ns: f64,
    paired_cpu_delta_ns: f64,
    /// Median times CPU 0 went idle per connect (each a wake-up to pay for).
    cpu0_idle_per_connect: f64,
    /// Median CPU time of the agent per connect (records drained, on CPU 0).
    agent_cpu_ns_per_connect: f64,
    samples: Vec<Sample>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmark attaches eBPF programs and firewall rules: run `cargo xtask bench` as root"
        );
    }
    crate::run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "egress-guard",
        "-p",
        "egress-guard-e2e",
        "--bins",
    ]))?;
    let target = workspace_root().join("target/release");
    let probe = target.join("probe");
    let part = std::env::var("EG_BENCH").unwrap_or_default();
    let bin = target.join("egress-guard");
    if let Some((_, run_part)) = PARTS.iter().find(|(name, _)| *name == part) {
        print!("{}", run_part(&bin, &probe)?);
        return Ok(());
    }
    let root = crate::cgroup2_root()?;
    let dir = std::env::temp_dir().join(format!("egress-guard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut bench = Bench {
        cgroups: Vec::new(),
        empty: None,
        agent: None,
        bin: bin.clone(),
        pin_dir: PathBuf::from(format!(
            "/sys/fs/bpf/egress-guard-bench-{}",
            std::process::id()
        )),
        dir,
    };
    for v in VARIANTS {
        let p = root.join(bench.cgroup(v));
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        bench.cgroups.push(p);
    }
    bench.empty = Some(crate::empty_hooks::EmptyHooks::attach(&bench.cgroups[4])?);
    pin_to_cpu0();
    let listener = TcpListener::bind("127.0.0.2:0")?;
    let port = listener.local_addr()?.port();
    // A deep accept queue: an overflowing queue drops SYNs, and one retransmitted SYN (1 s)
    // would swamp a sample.
    {
        use std::os::fd::AsRawFd as _;
        // SAFETY: plain syscall on a listening socket we own.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acceptor = spin_acceptor(listener, stop.clone())?;
    // The acceptor must stop however the connect part ends.
    struct StopAcceptor(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopAcceptor {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let stop_acceptor = StopAcceptor(stop);
    let to = format!("127.0.0.2:{port}");
    let other = TcpListener::bind("127.0.0.3:0")?;
    let refused = other.local_addr()?.to_string();

    let mut rows = Vec::new();
    let mut startup = Vec::new();
    let mut breakdown = Vec::new();
    let sizes: Vec<usize> = match std::env::var("EG_BENCH_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|n| n.trim().parse())
            .collect::<Result<_, _>>()
            .context("EG_BENCH_SIZES")?,
        Err(_) => SIZES.to_vec(),
    };
    for &size in &sizes {
        eprintln!("==> policy size {size}");
        let t = setup_size(&mut bench, size, port)?;
        startup.push((size, t.as_secs_f64()));
        // Every filter must really be in force: a destination none allows gets through only
        // from the bare cgroup.
        for (i, v) in VARIANTS.iter().enumerate() {
            let passed = connects(&bench.cgroups[i], &probe, &refused)?;
            if passed != OPEN.contains(v) {
                bail!(
                    "sanity check: {v} at {size} entries {} 127.0.0.3",
                    if passed {
                        "let through a connection to"
                    } else {
                        "refused"
                    }
                );
            }
        }
        let agent = bench.agent.as_ref().map(Child::id);
        // One unrecorded sample each first (cold caches, first-touch allocations).
        for cg in &bench.cgroups {
            measure(cg, &probe, &to, agent)?;
        }
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); VARIANTS.len()];
        for round in 0..ROUNDS {
            for &i in &ORDERS[round % ORDERS.len()] {
                samples[i].push(measure(&bench.cgroups[i], &probe, &to, agent)?);
            }
        }
        breakdown.push((
            size,
            kernel_time_per_connect(&bench.cgroups[1], &probe, &to, &PROGRAMS, "connect4")?,
            kernel_time_per_connect(
                &bench.cgroups[4],
                &probe,
                &to,
                &crate::empty_hooks::PAIRS.map(|(empty, _)| empty),
                "empty_connect4",
            )?,
        ));
        let of = |s: &[Sample], f: fn(&Sample) -> f64| s.iter().map(f).collect::<Vec<_>>();
        let bare = &samples[0];
        for (i, v) in VARIANTS.iter().enumerate() {
            let s = &samples[i];
            let ns = of(s, |x| x.ns);
            // Paired by round: each sample against the bare one of the same round.
            let paired = |f: fn(&Sample) -> f64| {
                median(
                    &s.iter()
                        .zip(bare)
                        .map(|(x, b)| f(x) - f(b))
                        .collect::<Vec<_>>(),
                )
            };
            rows.push(Row {
                size,
                variant: v.to_string(),
                median_ns: median(&ns),
                min_ns: ns.iter().copied().fold(f64::INFINITY, f64::min),
                max_ns: ns.iter().copied().fold(0.0, f64::max),
                ratio_to_bare: median(&ns) / median(&of(bare, |x| x.ns)),
                paired_delta_ns: paired(|x| x.ns),
                cpu_ns: median(&of(s, |x| x.cpu_ns)),
                paired_cpu_delta_ns: paired(|x| x.cpu_ns),
                cpu0_idle_per_connect: median(&of(s, |x| x.cpu0_idle)),
                agent_cpu_ns_per_connect: median(&of(s, |x| x.agent_cpu_ns)),
                samples: s.clone(),
            });
        }
    }
    bench.stop_agent();
    drop(stop_acceptor);
    let _ = acceptor.join();

    let mut table = String::new();
    writeln!(
        table,
        "connect()+close to an allowed loopback destination, {SAMPLE_MILLIS} ms per sample, {ROUNDS} rounds in balanced orders;\n\
         wall time, then the probe's own CPU time (CPU 1), CPU 0's idle entries and the agent's CPU time (CPU 0), per connect;\n\
         \"Δ\": median over rounds of the difference to bare in the same round"
    )?;
    writeln!(
        table,
        "{:>8} {:<13} {:>10} {:>10} {:>10} {:>8} {:>9} {:>9} {:>9} {:>10} {:>11}",
        "entries",
        "variant",
        "median ns",
        "min ns",
        "max ns",
        "x bare",
        "Δ ns",
        "cpu ns",
        "Δ cpu ns",
        "cpu0 idle",
        "agent cpu ns"
    )?;
    for r in &rows {
        writeln!(
            table,
            "{:>8} {:<13} {:>10.0} {:>10.0} {:>10.0} {:>8.3} {:>9.0} {:>9.0} {:>9.0} {:>10.3} {:>11.0}",
            r.size,
            r.variant,
            r.median_ns,
            r.min_ns,
            r.max_ns,
            r.ratio_to_bare,
            r.paired_delta_ns,
            r.cpu_ns,
            r.paired_cpu_delta_ns,
            r.cpu0_idle_per_connect,
            r.agent_cpu_ns_per_connect
        )?;
    }
    if breakdown.iter().any(|(_, b, _)| !b.is_empty()) {
        writeln!(
            table,
            "\negress-guard's kernel time per connect, by program (kernel.bpf_stats_enabled, separate samples);\n\
             \"empty\": a do-nothing program at the same hook (the empty-hooks variant), measured the same way"
        )?;
        writeln!(
            table,
            "{:>8} {:<14} {:>13} {:>11} {:>15} {:>14} {:>17}",
            "entries",
            "program",
            "runs/connect",
            "ns/run",
            "ns/connect",
            "empty ns/run",
            "above empty/conn"
        )?;
        for (size, programs, empty) in &breakdown {
            let floor_of = |program: &str| {
                let (name, _) = crate::empty_hooks::PAIRS
                    .iter()
                    .find(|(_, ours)| *ours == program)?;
                empty.iter().find(|e| e.program == *name)
            };
            let mut above_total = 0.0;
            for b in programs {
                let (floor, above) = match floor_of(&b.program) {
                    Some(f) => {
                        let above = b.ns_per_connect - f.ns_per_run * b.runs_per_connect;
                        above_total += above;
                        (format!("{:.0}", f.ns_per_run), format!("{above:.0}"))
                    }
                    None => {
                        above_total += b.ns_per_connect;
                        ("-".into(), format!("{:.0}", b.ns_per_connect))
                    }
                };
                writeln!(
                    table,
                    "{size:>8} {:<14} {:>13.2} {:>11.0} {:>15.0} {floor:>14} {above:>17}",
                    b.program, b.runs_per_connect, b.ns_per_run, b.ns_per_connect
                )?;
            }
            let total: f64 = programs.iter().map(|b| b.ns_per_connect).sum();
            let empty_total: f64 = empty.iter().map(|b| b.ns_per_connect).sum();
            writeln!(
                table,
                "{size:>8} {:<14} {:>13} {:>11} {total:>15.0} {:>14} {above_total:>17.0}",
                "all", "", "", ""
            )?;
            writeln!(
                table,
                "{size:>8} {:<14} {:>13} {:>11} {empty_total:>15.0}",
                "empty, all", "", ""
            )?;
        }
    }
    writeln!(table, "\ntime from `egress-guard run` to enforcing:")?;
    for (size, secs) in &startup {
        writeln!(table, "{size:>8} entries: {secs:.2} s")?;
    }
    print!("{table}");

    let out = workspace_root().join("docs/benchmarks");
    std::fs::create_dir_all(&out)?;
    let json = serde_json::json!({
        "benchmark": "connect",
        "sample_millis": SAMPLE_MILLIS,
        "rounds": ROUNDS,
        "rows": rows,
        "kernel_time_per_connect": breakdown.iter().map(|(n, b, e)| serde_json::json!({"entries": n, "programs": b, "empty_programs": e})).collect::<Vec<_>>(),
        "startup_seconds": startup.iter().map(|(n, s)| serde_json::json!({"entries": n, "seconds": s})).collect::<Vec<_>>(),
        "machine": machine(),
    });
    std::fs::write(
        out.join("connect.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out.join("connect.txt"), &table)?;
    std::fs::write(out.join("connect.svg"), svg(&rows, &sizes))?;
    eprintln!("==> wrote {}/connect.{{json,txt,svg}}", out.display());
    drop(bench);
    if part != "connect" {
        for (name, run_part) in PARTS {
            eprintln!("==> {name}");
            print!("{}", run_part(&bin, &probe)?);
        }
    }
    Ok(())
}

/// Where a guarded connect's kernel time goes, by program.
#[derive(serde::Serialize)]
struct ProgramTime {
    program: String,
    runs_per_connect: f64,
    ns_per_run: f64,
    ns_per_connect: f64,
}

/// The programs the agent loads, by name, as bpftool lists them (the kernel keeps 15 bytes).
const PROGRAMS: [&str; 10] = [
    "connect4",
    "sendmsg4",
    "recvmsg4",
    "getpeername4",
    "sock_create",
    "egress",
    "tcp_state",
    // The AF_PACKET guard: one of these three, whichever the kernel took.
    "lsm_socket_crea",
    "socket_fentry",
    "socket_enter",
];

/// `(run_cnt, run_time_ns)` of each of the `programs` (by name) that has run.
fn program_stats(
    programs: &[&str],
) -> anyhow::Result<std::collections::HashMap<String, (u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool")?;
    let progs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let mut stats = std::collections::HashMap::new();
    for p in progs {
        let name = p["name"].as_str().unwrap_or_default();
        if programs.contains(&name) {
            let e = stats.entry(name.to_string()).or_insert((0, 0));
            e.0 += p["run_cnt"].as_u64().unwrap_or(0);
            e.1 += p["run_time_ns"].as_u64().unwrap_or(0);
        }
    }
    Ok(stats)
}

/// Kernel time per connect from `cgroup`, by program (of `programs`; `per` runs once per
/// connect): a few extra samples with the kernel's BPF run-time statistics on (they cost a
/// clock read per run, so the timed rounds run without). Needs bpftool (`cargo xtask setup`
/// installs it).
fn kernel_time_per_connect(
    cgroup: &Path,
    probe: &Path,
    to: &str,
    programs: &[&str],
    per: &str,
) -> anyhow::Result<Vec<ProgramTime>> {
    if Command::new("bpftool").arg("version").output().is_err() {
        bail!(
            "bpftool is missing (`cargo xtask setup` installs it): the kernel time breakdown needs it"
        );
    }
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS)?;
    std::fs::write(STATS, "1")?;
    let measured = (|| {
        let before = program_stats(programs)?;
        for _ in 0..3 {
            measure(cgroup, probe, to, None)?;
        }
        let after = program_stats(programs)?;
        anyhow::Ok((before, after))
    })();
    std::fs::write(STATS, was.trim())?;
    let (before, after) = measured?;
    let delta = |name: &str| {
        let (c0, t0) = before.get(name).copied().unwrap_or((0, 0));
        let (c1, t1) = after.get(name).copied().unwrap_or((0, 0));
        (c1.saturating_sub(c0), t1.saturating_sub(t0))
    };
    let (connects, _) = delta(per);
    if connects == 0 {
        bail!("no {per} runs counted: is kernel.bpf_stats_enabled honoured?");
    }
    let mut out = Vec::new();
    for &name in programs {
        let (runs, ns) = delta(name);
        if runs > 0 {
            out.push(ProgramTime {
                program: name.to_string(),
                runs_per_connect: runs as f64 / connects as f64,
                ns_per_run: ns as f64 / runs as f64,
                ns_per_connect: ns as f64 / connects as f64,
            });
        }
    }
    Ok(out)
}

/// Applies one policy size to every variant; returns the agent's time to enforcing.
fn setup_size(bench: &mut Bench, size: usize, port: u16) -> anyhow::Result<Duration> {
    // egress-guard: a fresh agent on a fresh config (also measures start-up at this size).
    bench.stop_agent();
    let _ = Command::new(&bench.bin)
        .args(["uninstall", "--pin-dir"])
        .arg(&bench.pin_dir)
        .output();
    let mut allow = format!("\"127.0.0.2:{port}\"");
    for i in 0..size {
        write!(allow, ",\n  \"{}:443\"", bench_addr(i))?;
    }
    let config = bench.dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "pin_dir = \"{}\"\nlog_level = \"warn\"\n{}[audit]\nfile = \"{}\"\n[[policy]]\nname = \"bench\"\ncgroups = [\"{}\"]\nallow = [\n  {allow}\n]\n",
            bench.pin_dir.display(),
            crate::scratch::LOOPBACK_DNS,
            bench.dir.join("audit.jsonl").display(),
            bench.cgroup("egress-guard")
        ),
    )?;
    let ready = bench.dir.join("ready.sock");
    let _ = std::fs::remove_file(&ready);
    let sock = std::os::unix::net::UnixDatagram::bind(&ready)?;
    let started = Instant::now();
    // On CPU 0, with the listener: the probe has CPU 1 to itself, and the agent's work (the
    // records it drains) shows as its own column instead of slowing the probe.
    bench.agent = Some(
        Command::new("taskset")
            .args(["-c", "0"])
            .arg(&bench.bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &ready)
            .stdout(Stdio::null())
            .spawn()?,
    );
    // Ready = the READY=1 notification, sent after the programs are attached.
    sock.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut buf = [0u8; 256];
    loop {
        let n = sock
            .recv(&mut buf)
            .context("waiting for the agent's READY=1")?;
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    let took = started.elapsed();

    // iptables: OUTPUT -m cgroup → chain of N accepts, then the target, then REJECT. The target
    // comes last, as one endpoint among many would: iptables walks its rules in order.
    let ipt_cg = bench.cgroup("iptables");
    remove_iptables(&ipt_cg);
    let mut rules = format!("*filter\n:{CHAIN} - [0:0]\n");
    for i in 0..size {
        writeln!(
            rules,
            "-A {CHAIN} -d {}/32 -p tcp --dport 443 -j ACCEPT",
            bench_addr(i)
        )?;
    }
    writeln!(
        rules,
        "-A {CHAIN} -d 127.0.0.2/32 -p tcp --dport {port} -j ACCEPT"
    )?;
    writeln!(
        rules,
        "-A {CHAIN} -j REJECT\n-A OUTPUT -m cgroup --path {ipt_cg} -j {CHAIN}\nCOMMIT"
    )?;
    let path = bench.dir.join("iptables.rules");
    std::fs::write(&path, rules)?;
    run_quiet(Command::new("iptables-restore").arg("--noflush").arg(&path))?;

    // nftables: one set, one rule. nft resolves cgroup paths under /sys/fs/cgroup whatever
    // the cgroup2 mount is (it is /sys/fs/cgroup/unified on hybrid hosts).
    let nft_cg = bench.cgroups[3]
        .strip_prefix("/sys/fs/cgroup")
        .context("cgroup2 is not under /sys/fs/cgroup")?
        .display()
        .to_string();
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", NFT_TABLE])
        .output();
    let mut elems = String::from("127.0.0.2");
    for i in 0..size {
        write!(elems, ", {}", bench_addr(i))?;
    }
    let nft = format!(
        "table inet {NFT_TABLE} {{\n set allowed {{ type ipv4_addr; elements = {{ {elems} }} }}\n chain out {{\n  type filter hook output priority 0;\n  socket cgroupv2 level 1 \"{nft_cg}\" ip daddr != @allowed reject\n }}\n}}\n"
    );
    let path = bench.dir.join("bench.nft");
    std::fs::write(&path, nft)?;
    run_quiet(Command::new("nft").arg("-f").arg(&path))?;
    Ok(took)
}

pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    serde_json::json!({ "cpu": cpu, "cores": cores, "kernel": kernel })
}

/// ns per connect against policy size (log scale), one line per variant.
fn svg(rows: &[Row], sizes: &[usize]) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 420.0, 70.0, 50.0, 40.0, 150.0);
    // Log scale on both axes: iptables grows by orders of magnitude, the others stay flat.
    let lo = rows
        .iter()
        .map(|r| r.median_ns)
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let hi = rows
        .iter()
        .map(|r| r.median_ns)
        .fold(1.0, f64::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let x = |size: usize| {
        let (lo, hi) = (
            (sizes[0] as f64).log10(),
            (sizes[sizes.len() - 1] as f64)
                .log10()
                .max((sizes[0] as f64).log10() + 1.0),
        );
        left + ((size as f64).log10() - lo) / (hi - lo) * (w - left - right)
    };
    let y = |ns: f64| h - bottom - (ns.log10() - lo) / (hi - lo) * (h - bottom - top);
    let colors = ["#888888", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"24\" font-size=\"14\">connect()+close from a filtered cgroup: median time vs allowed entries (log-log)</text>\n"
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>",
        h - bottom,
        w - right
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom
    );
    for &size in sizes {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{size}</text>",
            x(size),
            h - bottom + 18.0
        );
    }
    let mut e = lo;
    while e <= hi {
        let ns = 10f64.powf(e);
        let label = if ns >= 1e6 {
            format!("{} ms", ns / 1e6)
        } else {
            format!("{} µs", ns / 1e3)
        };
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{label}</text>",
            left - 6.0,
            y(ns) + 4.0
        );
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/>",
            y(ns),
            w - right
        );
        e += 1.0;
    }
    for (k, v) in VARIANTS.iter().enumerate() {
        let pts: Vec<String> = rows
            .iter()
            .filter(|r| r.variant == *v)
            .map(|r| format!("{:.1},{:.1}", x(r.size), y(r.median_ns)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            colors[k],
            pts.join(" ")
        );
        let ly = top + 20.0 + k as f64 * 18.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{ly}\" fill=\"{}\">{v}</text>",
            w - right + 15.0,
            colors[k]
        );
    }
    s.push_str("</svg>\n");
    s
}
