//! `EG_BENCH=cloudwatch cargo xtask bench`: delivery latency of the CloudWatch sink, from a
//! record's time to CloudWatch (moto_server on loopback) accepting the batch holding it, under
//! a steady stream of denied connects from a guarded cgroup. The agent measures it per record
//! (`status`: `cloudwatch.latency_ms_p50/p99` over the last 10,000 records).
//! Writes docs/benchmarks/cloudwatch.{json,txt}.

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::json;

pub fn run(bin: &Path, probe: &Path) -> anyhow::Result<String> {
    let name = format!("egress-guard-bench-cw-{}", std::process::id());
    let mut setup = crate::scratch::Scratch::new(&name, bin)?;
    let (cgroup, dir) = (setup.cgroup.clone(), setup.dir.clone());
    let (_moto, port) = crate::scratch::moto_server()?;
    let socket = dir.join("control.sock");
    let (table, env) = crate::scratch::cloudwatch_table(&format!("http://127.0.0.1:{port}"), &dir);
    let config = setup.write_config(&table, &[])?;
    let _ = setup.start_agent(&config, &env)?;
    // About 1,000 denied connects a second for 10 s (the probe sleeps 1 ms between them).
    let to = std::net::TcpListener::bind("127.0.0.3:0")?.local_addr()?;
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "echo $$ > {}/cgroup.procs && exec {} loop tcp {to} 10000",
                cgroup.display(),
                probe.display()
            ),
        ])
        .output()?;
    let load = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::thread::sleep(Duration::from_secs(3));
    let status = Command::new(bin)
        .args(["status", "--json", "--socket"])
        .arg(&socket)
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&status.stdout)
        .with_context(|| format!("status: {}", String::from_utf8_lossy(&status.stderr)))?;
    let cw = &v["cloudwatch"];
    let (p50, p99) = (cw["latency_ms_p50"].as_u64(), cw["latency_ms_p99"].as_u64());
    let (Some(p50), Some(p99)) = (p50, p99) else {
        bail!("no latency in status: {cw}");
    };
    let mut report = String::new();
    writeln!(
        report,
        "CloudWatch delivery (moto_server on loopback, flush_interval 1 s), load: {load} over 10 s:\n  record time → batch accepted: p50 {p50} ms, p99 {p99} ms over the last {} records; delivered {}, spool backlog {} bytes",
        cw["delivered_events"].as_u64().unwrap_or(0).min(10_000),
        cw["delivered_events"],
        cw["spool_pending_bytes"]
    )?;
    let out = crate::workspace_root().join("docs/benchmarks");
    std::fs::write(
        out.join("cloudwatch.json"),
        serde_json::to_string_pretty(
            &json!({ "benchmark": "cloudwatch", "machine": crate::bench::machine(),
            "load": load, "latency_ms_p50": p50, "latency_ms_p99": p99, "cloudwatch": cw }),
        )?,
    )?;
    std::fs::write(out.join("cloudwatch.txt"), &report)?;
    Ok(report)
}
