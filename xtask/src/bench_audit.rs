//! The audit pipeline under load: a connect storm and an exec storm from a guarded cgroup with
//! the default ring size. Reports records per second, how many were written and lost, the
//! agent's CPU per 10,000 records, and its memory at rest and at peak.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// (CPU seconds used, VmRSS KiB, VmHWM KiB) of a process.
fn usage(pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" closing the command name: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (f[11].parse::<f64>()? + f[12].parse::<f64>()?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((cpu, kib("VmRSS:"), kib("VmHWM:")))
}

/// Runs `sh -c script` inside the cgroup; returns its stdout.
fn in_cgroup(cgroup: &Path, script: &str) -> anyhow::Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && {{ {script}; }}",
            cgroup.display()
        ))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Records in the audit file: (kernel records, lost reported).
fn counts(file: &Path) -> (u64, u64) {
    use std::io::BufRead as _;
    let (mut kernel, mut lost) = (0, 0);
    // The file and its rotated predecessors (`audit.jsonl.1` …): a storm may rotate it.
    let rotated = (1..=9).map(|n| PathBuf::from(format!("{}.{n}", file.display())));
    let lines = std::iter::once(file.to_path_buf())
        .chain(rotated)
        .filter_map(|p| std::fs::File::open(p).ok())
        .flat_map(|f| std::io::BufReader::new(f).lines().map_while(Result::ok));
    for line in lines {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let ty = v["type"].as_str().unwrap_or("");
        if ty.starts_with("net.") || ty.starts_with("proc.") {
            kernel += v["count"].as_u64().unwrap_or(1);
        } else if ty == "agent.events_lost" {
            lost += v["count"].as_u64().unwrap_or(0);
        }
    }
    (kernel, lost)
}

/// Waits until the audit file stops growing (the agent caught up).
fn settle(file: &Path) {
    let mut last = u64::MAX;
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if size == last {
            return;
        }
        last = size;
    }
}

/// Where the agent ships besides the audit file while the storms run.
#[derive(Clone, Copy)]
enum Sink {
    /// The audit file only.
    FileOnly,
    /// Also CloudWatch (moto_server on loopback), busy shipping every record of the storm.
    Moto,
    /// Also a CloudWatch endpoint that accepts connections and never answers: the sink sits
    /// in 10 s timeouts and backoff while every record piles up in the spool.
    Stalled,
}

impl Sink {
    fn name(self) -> &'static str {
        match self {
            Sink::FileOnly => "audit file only",
            Sink::Moto => "audit file + CloudWatch shipping to moto_server",
            Sink::Stalled => "audit file + CloudWatch endpoint that never answers",
        }
    }
}

pub fn run(bin: &Path, probe: &Path) -> anyhow::Result<String> {
    let mut report = String::new();
    let mut runs = Vec::new();
    for sink in [Sink::FileOnly, Sink::Moto, Sink::Stalled] {
        let (text, value) = storms(bin, probe, sink)?;
        writeln!(report, "== {} ==\n{text}", sink.name())?;
        runs.push(value);
    }
    let out = crate::workspace_root().join("docs/benchmarks");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("audit.json"),
        serde_json::to_string_pretty(&json!({ "benchmark": "audit", "runs": runs }))?,
    )?;
    std::fs::write(out.join("audit.txt"), &report)?;
    Ok(report)
}

/// One agent with `sink`, and the storms: the whole set with the file only, the paced ones
/// (where the file alone loses nothing) when CloudWatch is also busy or stalled.
fn storms(bin: &Path, probe: &Path, sink: Sink) -> anyhow::Result<(String, Value)> {
    let name = format!(
        "egress-guard-bench-audit-{}-{}",
        std::process::id(),
        sink as u8
    );
    let mut setup = crate::scratch::Scratch::new(&name, bin)?;
    let (cgroup, dir) = (setup.cgroup.clone(), setup.dir.clone());
    let audit_file = dir.join("audit.jsonl");
    // Held until the end: moto_server, or a listener whose connections are never answered.
    let mut _moto = None;
    let mut _silent = None;
    let endpoint = match sink {
        Sink::FileOnly => None,
        Sink::Moto => {
            let (moto, port) = crate::scratch::moto_server()?;
            _moto = Some(moto);
            Some(format!("http://127.0.0.1:{port}"))
        }
        Sink::Stalled => {
            let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
            let port = silent.local_addr()?.port();
            // The kernel completes the handshakes (backlog); nothing ever reads or answers.
            _silent = Some(silent);
            Some(format!("http://127.0.0.1:{port}"))
        }
    };
    let pid = match &endpoint {
        None => {
            let config = setup.write_config("", &[])?;
            setup.start_agent(&config, &[])?
        }
        Some(endpoint) => {
            let (table, env) = crate::scratch::cloudwatch_table(endpoint, &dir);
            let config = setup.write_config(&table, &[])?;
            setup.start_agent(&config, &env)?
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    let (_, rest_rss, _) = usage(pid)?;
    let listener = std::net::TcpListener::bind("127.0.0.3:0")?;
    let to = listener.local_addr()?.to_string();
    let mut report = String::new();
    let mut rows = Vec::new();
    // (what, script, probe processes in it)
    let storms: [(&str, String, u64); 6] = [
        (
            "connect storm (denied connects, 2 processes, 2 s)",
            format!(
                "{p} loop tcp {to} 2000 & {p} loop tcp {to} 2000; wait",
                p = probe.display()
            ),
            2,
        ),
        (
            "paced connect storm (20,000 denied connects/s, 1 process, 3 s)",
            format!("{p} storm-paced tcp {to} 20000 3", p = probe.display()),
            1,
        ),
        (
            "paced connect storm (2 processes x 25,000 denied connects/s, 3 s)",
            format!(
                "{p} storm-paced tcp {to} 25000 3 & {p} storm-paced tcp {to} 25000 3; wait",
                p = probe.display()
            ),
            2,
        ),
        (
            "paced connect storm (2 processes x 50,000 denied connects/s, 2 s)",
            format!(
                "{p} storm-paced tcp {to} 50000 2 & {p} storm-paced tcp {to} 50000 2; wait",
                p = probe.display()
            ),
            2,
        ),
        (
            // As fast as two processes go: where the ring overflows, if it does on this machine.
            "unpaced connect storm (2 processes x 200,000 denied connects as fast as they go)",
            format!(
                "{p} storm-paced tcp {to} 1000000 0.2 & {p} storm-paced tcp {to} 1000000 0.2; wait",
                p = probe.display()
            ),
            2,
        ),
        (
            "exec storm (/bin/true, 3000 times)",
            "i=0; while [ $i -lt 3000 ]; do /bin/true; i=$((i+1)); done".to_string(),
            0,
        ),
    ];
    let paced = |what: &str| what.starts_with("paced");
    for (what, script, probes) in storms {
        if !matches!(sink, Sink::FileOnly) && !paced(what) {
            continue;
        }
        let (before_kernel, before_lost) = counts(&audit_file);
        let (cpu0, _, _) = usage(pid)?;
        let started = Instant::now();
        let out = in_cgroup(&cgroup, &script)?;
        let secs = started.elapsed().as_secs_f64();
        settle(&audit_file);
        let (cpu1, _, peak) = usage(pid)?;
        let (after_kernel, after_lost) = counts(&audit_file);
        let written = after_kernel - before_kernel;
        let lost = after_lost - before_lost;
        let generated: u64 = if probes > 0 {
            // Each probe: its exec and exit, and one record per attempt; the shell's exit.
            out.split_whitespace()
                .filter_map(|w| w.strip_prefix("eperm="))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>()
                + 2 * probes
                + 1
        } else {
            // The shell joined the cgroup after its own exec: only its exit is recorded.
            3000 * 2 + 1
        };
        if written + lost != generated {
            bail!("{what}: {generated} records made, {written} written + {lost} lost");
        }
        let rate = generated as f64 / secs;
        let cpu_per_10k = (cpu1 - cpu0) * 1000.0 / (generated as f64 / 10_000.0);
        writeln!(
            report,
            "{what}: {generated} records in {secs:.2} s ({rate:.0}/s); written {written}, lost {lost}; agent CPU {cpu_per_10k:.0} ms per 10,000 records; agent peak RSS {peak} KiB"
        )?;
        rows.push(json!({ "storm": what, "records": generated, "seconds": secs, "records_per_second": rate,
                          "written": written, "lost": lost, "agent_cpu_ms_per_10k": cpu_per_10k, "agent_peak_rss_kib": peak }));
    }
    writeln!(report, "agent RSS at rest: {rest_rss} KiB")?;
    let mut cloudwatch = Value::Null;
    if endpoint.is_some() {
        let status = Command::new(bin)
            .args(["status", "--json", "--socket"])
            .arg(dir.join("control.sock"))
            .output()?;
        let v: Value = serde_json::from_slice(&status.stdout)
            .with_context(|| format!("status: {}", String::from_utf8_lossy(&status.stderr)))?;
        cloudwatch = v["cloudwatch"].clone();
        writeln!(
            report,
            "CloudWatch at the end: delivered {}, spool backlog {} bytes, oldest undelivered {} ms, timeouts {}",
            cloudwatch["delivered_events"],
            cloudwatch["spool_pending_bytes"],
            cloudwatch["oldest_undelivered_age_ms"],
            cloudwatch["timeouts"]
        )?;
    }
    Ok((
        report,
        json!({ "sink": sink.name(), "storms": rows, "agent_rest_rss_kib": rest_rss, "cloudwatch": cloudwatch }),
    ))
}
