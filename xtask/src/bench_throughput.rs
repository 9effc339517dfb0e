//! Throughput from a guarded cgroup against a bare one, interleaved: bulk TCP over loopback
//! (every segment passes the packet backstop) and 64-byte UDP sends: with sendto() on an
//! unconnected socket each passes the sendmsg hook (which counts it in the kernel's send-flow
//! table) and the backstop; on a connected socket (judged once, at connect()) each passes the
//! backstop only. A third cgroup has do-nothing programs at the same hooks
//! (`empty_hooks`): the share of bare that any cgroup eBPF enforcer keeps at best.
//!
//! Placement as in the connect part: the probe alone on CPU 1, the agent on CPU 0, whose CPU
//! time during the guarded samples is reported (the records it turns into the audit trail).

use std::{
    fmt::Write as _,
    io::Read as _,
    net::{TcpListener, UdpSocket},
    path::Path,
};

use std::process::Command;

use serde_json::json;

use crate::scratch::{BareCgroup, Scratch, field, median, probe_in};

const ROUNDS: usize = 9;
const SAMPLE_MILLIS: &str = "1000";

pub fn run(bin: &Path, probe: &Path) -> anyhow::Result<String> {
    let name = format!("egress-guard-bench-tput-{}", std::process::id());
    let mut setup = Scratch::new(&name, bin)?;
    let bare = BareCgroup::new(&format!("{name}-bare"))?;
    let tcp = TcpListener::bind("127.0.0.2:0")?;
    let tcp_to = tcp.local_addr()?.to_string();
    std::thread::spawn(move || {
        for c in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = vec![0u8; 1 << 16];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    // Never read: a full receive buffer drops datagrams after the sender's hooks ran.
    let udp = UdpSocket::bind("127.0.0.2:0")?;
    let udp_to = udp.local_addr()?.to_string();
    let config = setup.write_config("", &[&tcp_to, &format!("udp/{udp_to}")])?;
    let agent = setup.start_agent(&config, &[])?;
    crate::scratch::pin_to_cpu0(agent)?;
    let empty_cgroup = BareCgroup::new(&format!("{name}-empty"))?;
    let _empty = crate::empty_hooks::EmptyHooks::attach(&empty_cgroup.0)?;
    let cgroups = [
        ("bare", bare.0.clone()),
        ("egress-guard", setup.cgroup.clone()),
        ("empty-hooks", empty_cgroup.0.clone()),
    ];
    // (what is reported, the probe's output field, the probe's arguments)
    let tests = [
        (
            "bytes_per_second",
            "bytes_per_second",
            vec!["bulk", &tcp_to, SAMPLE_MILLIS],
        ),
        (
            "datagrams_per_second_sendto",
            "datagrams_per_second",
            vec!["udp-flood", &udp_to, SAMPLE_MILLIS, "sendto"],
        ),
        (
            "datagrams_per_second_connected",
            "datagrams_per_second",
            vec!["udp-flood", &udp_to, SAMPLE_MILLIS, "connected"],
        ),
    ];
    let mut report = String::new();
    writeln!(
        report,
        "throughput from a guarded cgroup vs a bare one and one with empty programs at the same hooks, {SAMPLE_MILLIS} ms samples, {ROUNDS} interleaved rounds"
    )?;
    let mut rows = Vec::new();
    for (label, key, args) in &tests {
        let mut samples = [Vec::new(), Vec::new(), Vec::new()];
        // The agent's CPU time during each guarded sample, as a share of one core.
        let mut agent_cpu = Vec::new();
        for round in 0..ROUNDS {
            for k in 0..cgroups.len() {
                let i = (k + round) % cgroups.len();
                let before = (
                    crate::bench::process_cpu_ns(agent),
                    std::time::Instant::now(),
                );
                let out = probe_in(&cgroups[i].1, probe, Some(1), args)?;
                samples[i].push(field(&out, key)?);
                if i == 1
                    && let (Some(a), Some(b)) = (before.0, crate::bench::process_cpu_ns(agent))
                {
                    agent_cpu
                        .push(b.saturating_sub(a) as f64 / before.1.elapsed().as_nanos() as f64);
                }
            }
        }
        let (b, g, e) = (
            median(&samples[0]),
            median(&samples[1]),
            median(&samples[2]),
        );
        let spread = |s: &[f64]| {
            (
                s.iter().copied().fold(f64::INFINITY, f64::min),
                s.iter().copied().fold(0.0, f64::max),
            )
        };
        let (bmin, bmax) = spread(&samples[0]);
        let (gmin, gmax) = spread(&samples[1]);
        let (emin, emax) = spread(&samples[2]);
        writeln!(
            report,
            "{label}: bare {b:.4e} ({bmin:.3e}..{bmax:.3e}), egress-guard {g:.4e} ({gmin:.3e}..{gmax:.3e}): {:.1} % of bare; agent {:.0} % of CPU 0; empty hooks {e:.4e} ({emin:.3e}..{emax:.3e}): {:.1} % of bare",
            g / b * 100.0,
            median(&agent_cpu) * 100.0,
            e / b * 100.0
        )?;
        rows.push(
            json!({ "measure": label, "bare_median": b, "guarded_median": g, "ratio_to_bare": g / b,
                          "empty_hooks_median": e, "empty_hooks_ratio_to_bare": e / b,
                          "agent_cpu_share_median": median(&agent_cpu),
                          "bare_samples": samples[0], "guarded_samples": samples[1],
                          "empty_hooks_samples": samples[2] }),
        );
    }
    // Nothing may be lost on the way: the records the kernel could not write to its ring.
    let stats = Command::new(bin)
        .args(["stats", "--json", "--pin-dir"])
        .arg(&setup.pin_dir)
        .output()?;
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout)?;
    let lost = stats["audit_records_lost"].as_u64();
    writeln!(
        report,
        "audit records the kernel could not write (ring full) during the run: {}",
        lost.map_or("unknown".to_string(), |n| n.to_string())
    )?;
    let out = crate::workspace_root().join("docs/benchmarks");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("throughput.json"),
        serde_json::to_string_pretty(&json!({ "benchmark": "throughput", "rounds": ROUNDS,
            "sample_millis": SAMPLE_MILLIS, "rows": rows, "audit_records_lost": lost, "machine": crate::bench::machine() }))?,
    )?;
    std::fs::write(out.join("throughput.txt"), &report)?;
    Ok(report)
}
