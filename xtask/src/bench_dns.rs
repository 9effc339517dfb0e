//! `EG_BENCH=dns cargo xtask bench`: the DNS proxy's added latency. A process in a guarded
//! cgroup asks 127.0.0.53:53 (redirected by the kernel to the proxy, which asks dnsmasq and
//! writes the answer's address into the kernel map before replying) vs the same process outside
//! any guard asking dnsmasq directly. Interleaved rounds, at 1 and at 1,000+ queries/s.
//! Writes docs/benchmarks/dns.{json,txt}.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::json;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Latencies (µs) of `count` queries at `qps` from `probe`, inside `cgroup` if given.
fn sample(
    probe: &Path,
    cgroup: Option<&Path>,
    server: &str,
    qps: u32,
    count: u32,
) -> anyhow::Result<(Vec<u64>, u64)> {
    let args = format!(
        "{} dns-bench {server} a.bench.test {qps} {count}",
        probe.display()
    );
    let script = match cgroup {
        Some(cg) => format!("echo $$ > {}/cgroup.procs && exec {args}", cg.display()),
        None => format!("exec {args}"),
    };
    let out = Command::new("sh").args(["-c", &script]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
            .with_context(|| format!("probe said {text:?}"))
    };
    let timeouts: u64 = field("timeouts=")?.parse()?;
    let us = field("us=")?;
    let lat = us
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((lat, timeouts))
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

pub fn run(bin: &Path, probe: &Path) -> anyhow::Result<String> {
    let name = format!("egress-guard-bench-dns-{}", std::process::id());
    let mut setup = crate::scratch::Scratch::new(&name, bin)?;
    let (cgroup, dir) = (setup.cgroup.clone(), setup.dir.clone());
    std::fs::write(dir.join("hosts"), "127.0.0.21 a.bench.test\n")?;
    let port = free_port()?;
    let _dnsmasq = crate::scratch::KillOnDrop(
        Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--local=/",
                "--local-ttl=60",
                &format!("--port={port}"),
                &format!("--addn-hosts={}", dir.join("hosts").display()),
                &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq (cargo xtask setup installs it)")?,
    );
    let upstream = format!("127.0.0.1:{port}");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "pin_dir = \"{}\"\nlog_level = \"warn\"\n{}[audit]\nfile = \"{}\"\n[control]\nsocket = \"{}\"\n[[policy]]\nname = \"bench\"\ncgroups = [\"{name}\"]\nallow = [\"*.bench.test:443\"]\ndns = [\"{upstream}\"]\n",
            setup.pin_dir.display(),
            crate::scratch::LOOPBACK_DNS,
            dir.join("audit.jsonl").display(),
            dir.join("control.sock").display()
        ),
    )?;
    let _ = setup.start_agent(&config, &[])?;

    // (queries per second, rounds, queries per round and variant)
    let plan: [(u32, usize, u32); 3] = [(1, 20, 1), (1000, 6, 2000), (4000, 6, 4000)];
    let mut report = String::new();
    let mut rows = Vec::new();
    writeln!(
        report,
        "DNS proxy latency: guarded process → kernel redirect → proxy → dnsmasq, vs the same\nprocess asking dnsmasq directly (one UDP socket, paced queries, interleaved rounds)."
    )?;
    for (qps, rounds, count) in plan {
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        let (mut t_direct, mut t_proxied) = (0, 0);
        for round in 0..rounds {
            // Alternate which goes first.
            for first in [round % 2 == 0, round % 2 == 1] {
                if first {
                    let (l, t) = sample(probe, None, &upstream, qps, count)?;
                    direct.extend(l);
                    t_direct += t;
                } else {
                    let (l, t) = sample(probe, Some(&cgroup), "127.0.0.53:53", qps, count)?;
                    proxied.extend(l);
                    t_proxied += t;
                }
            }
            if qps == 1 {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        if direct.is_empty() || proxied.is_empty() {
            bail!("no answers at {qps} q/s");
        }
        let (d50, d99) = (pct(&mut direct, 0.5), pct(&mut direct, 0.99));
        let (p50, p99) = (pct(&mut proxied, 0.5), pct(&mut proxied, 0.99));
        writeln!(
            report,
            "{qps:>5} q/s: direct p50 {d50} µs p99 {d99} µs ({} answers, {t_direct} timeouts) | through the proxy p50 {p50} µs p99 {p99} µs ({} answers, {t_proxied} timeouts) | added p50 {} µs, p99 {} µs",
            direct.len(),
            proxied.len(),
            p50 as i64 - d50 as i64,
            p99 as i64 - d99 as i64
        )?;
        rows.push(json!({ "qps": qps, "direct": { "answers": direct.len(), "timeouts": t_direct, "p50_us": d50, "p99_us": d99 },
                          "proxy": { "answers": proxied.len(), "timeouts": t_proxied, "p50_us": p50, "p99_us": p99 },
                          "added_p50_us": p50 as i64 - d50 as i64, "added_p99_us": p99 as i64 - d99 as i64 }));
    }
    writeln!(
        report,
        "The answered address is in the kernel map before the answer leaves the proxy (the proxy writes it, then replies): a connect right after the lookup never races it."
    )?;
    let out = crate::workspace_root().join("docs/benchmarks");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("dns.json"),
        serde_json::to_string_pretty(
            &json!({ "benchmark": "dns", "machine": crate::bench::machine(), "rates": rows }),
        )?,
    )?;
    std::fs::write(out.join("dns.txt"), &report)?;
    Ok(report)
}
