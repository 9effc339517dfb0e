//! `EG_BENCH=host cargo xtask bench`: what the agent costs the processes it does not guard.
//! The socket guard is global (LSM and fentry programs see every task on the host), so a
//! process outside every guarded cgroup pays for it too: a system call no program is on
//! (`getppid`) and `socket()` + `close()`, which the socket guard sees. Three variants,
//! interleaved: no agent, the agent as it starts here (the BPF LSM guard where the kernel has
//! it active), and the agent with the BPF LSM hidden from it, as on most distributions (the
//! fentry guard, or the tracepoint where the kernel has no BPF trampolines). The table names the guard
//! each variant got. The probe runs alone on CPU 1, in a cgroup no policy names.

use std::{fmt::Write as _, path::Path, process::Command};

use serde_json::json;

use crate::scratch::{BareCgroup, Scratch, field, median, probe_in};

const ROUNDS: usize = 7;
/// Per measured call (the probe measures getppid, then socket, for this long each).
const SAMPLE_MILLIS: &str = "500";
const VARIANTS: [&str; 3] = ["no agent", "agent", "agent, BPF LSM hidden"];

pub fn run(bin: &Path, probe: &Path) -> anyhow::Result<String> {
    let name = format!("egress-guard-bench-host-{}", std::process::id());
    let mut setup = Scratch::new(&name, bin)?;
    let outside = BareCgroup::new(&format!("{name}-outside"))?;
    let config = setup.write_config("", &["127.0.0.2:9"])?;
    // [variant] -> (getppid ns, socket ns) samples.
    let mut samples: [(Vec<f64>, Vec<f64>); 3] = Default::default();
    let mut guards = [String::new(), String::new(), String::new()];
    for round in 0..ROUNDS {
        for k in 0..VARIANTS.len() {
            let v = (k + round) % VARIANTS.len();
            if v != 0 {
                if v == 1 {
                    setup.start_agent(&config, &[])?;
                } else {
                    setup.start_agent_without_bpf_lsm(&config)?;
                }
                guards[v] = socket_guard(bin, &setup.dir.join("control.sock"))?;
            }
            let out = probe_in(
                &outside.0,
                probe,
                Some(1),
                &["bench-syscalls", SAMPLE_MILLIS],
            )?;
            samples[v].0.push(field(&out, "ns_per_getppid")?);
            samples[v].1.push(field(&out, "ns_per_socket")?);
            setup.stop_and_uninstall();
        }
    }
    let mut report = String::new();
    writeln!(
        report,
        "a process in no guarded cgroup, on CPU 1: ns per call (median of {ROUNDS} interleaved {SAMPLE_MILLIS} ms samples)"
    )?;
    writeln!(
        report,
        "{:<22} {:>12} {:>10} {:>16} {:>10}  socket guard",
        "", "getppid()", "Δ", "socket()+close()", "Δ"
    )?;
    let base = (median(&samples[0].0), median(&samples[0].1));
    let mut rows = Vec::new();
    for (v, label) in VARIANTS.iter().enumerate() {
        let (g, s) = (median(&samples[v].0), median(&samples[v].1));
        writeln!(
            report,
            "{label:<22} {g:>12.1} {:>+10.1} {s:>16.1} {:>+10.1}  {}",
            g - base.0,
            s - base.1,
            if v == 0 { "-" } else { &guards[v] }
        )?;
        rows.push(json!({ "variant": label, "socket_guard": guards[v],
            "getppid_ns_median": g, "socket_close_ns_median": s,
            "getppid_ns_samples": samples[v].0, "socket_close_ns_samples": samples[v].1 }));
    }
    let out = crate::workspace_root().join("docs/benchmarks");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("host.json"),
        serde_json::to_string_pretty(&json!({ "benchmark": "host", "rounds": ROUNDS,
            "sample_millis": SAMPLE_MILLIS, "rows": rows, "machine": crate::bench::machine() }))?,
    )?;
    std::fs::write(out.join("host.txt"), &report)?;
    Ok(report)
}

/// The socket guard the running agent reports (`lsm`, `fentry`, `tracepoint` or `none`).
fn socket_guard(bin: &Path, socket: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(status["socket_guard"].as_str().unwrap_or("?").to_string())
}
