//! Lifecycle: time from `egress-guard run` to enforcing (READY=1), and what guarded processes
//! see while the agent restarts (kill -9, then start, as systemd does after a crash) and is
//! upgraded (stopped, then started with another build's programs pinned): denied connects that
//! got through (the enforcement gap, expected 0) and the longest time without a successful
//! allowed connect.

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::json;

use crate::scratch::{Scratch, field, listener, median, probe_in};

const STARTS: usize = 5;
const LOOP_MILLIS: &str = "3000";

fn stop(setup: &mut Scratch, signal: i32) {
    if let Some(mut a) = setup.agent.take() {
        // SAFETY: plain kill(2) of our child.
        unsafe { libc::kill(a.id() as i32, signal) };
        let _ = a.wait();
    }
}

/// Makes the pins look like another build's: link pins end in the object id.
fn pins_of_another_build(pin_dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for layout in std::fs::read_dir(pin_dir)?.flatten() {
        let links = layout.path().join("links");
        for e in std::fs::read_dir(&links)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((head, _)) = name.rsplit_once('-') {
                std::fs::rename(e.path(), links.join(format!("{head}-0123456789abcdef")))?;
                n += 1;
            }
        }
    }
    Ok(n)
}

pub fn run(bin: &Path, probe: &Path) -> anyhow::Result<String> {
    let name = format!("egress-guard-bench-life-{}", std::process::id());
    let mut setup = Scratch::new(&name, bin)?;
    let allowed = listener("127.0.0.2")?.to_string();
    let denied = listener("127.0.0.3")?.to_string();
    let config = setup.write_config("", &[&allowed])?;
    let pin_dir = setup.pin_dir.clone();
    let uninstall = || {
        Command::new(bin)
            .args(["uninstall", "--pin-dir"])
            .arg(&pin_dir)
            .output()
    };

    // Cold starts: nothing pinned, so each start loads, attaches and pins everything.
    let mut starts = Vec::new();
    for _ in 0..STARTS {
        uninstall()?;
        let t = Instant::now();
        setup.start_agent(&config, &[])?;
        starts.push(t.elapsed().as_secs_f64() * 1000.0);
        stop(&mut setup, libc::SIGTERM);
    }
    let mut report = String::new();
    writeln!(
        report,
        "time from `egress-guard run` to READY=1 (enforcing), cold, {STARTS} starts: median {:.0} ms (min {:.0}, max {:.0})",
        median(&starts),
        starts.iter().copied().fold(f64::INFINITY, f64::min),
        starts.iter().copied().fold(0.0, f64::max)
    )?;

    let mut rows = Vec::new();
    for what in ["restart", "upgrade"] {
        setup.start_agent(&config, &[])?;
        let loops: Vec<_> = [&allowed, &denied]
            .into_iter()
            .map(|to| {
                let (cg, probe, to) = (setup.cgroup.clone(), probe.to_path_buf(), to.clone());
                std::thread::spawn(move || {
                    probe_in(&cg, &probe, None, &["loop", "tcp", &to, LOOP_MILLIS])
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        if what == "restart" {
            stop(&mut setup, libc::SIGKILL);
        } else {
            stop(&mut setup, libc::SIGTERM);
            if pins_of_another_build(&setup.pin_dir)? == 0 {
                bail!("no link pins to replace");
            }
        }
        let t = Instant::now();
        setup.start_agent(&config, &[])?;
        let ready_ms = t.elapsed().as_secs_f64() * 1000.0;
        let mut outs = Vec::new();
        for l in loops {
            outs.push(l.join().map_err(|_| anyhow::anyhow!("probe thread"))??);
        }
        let (a, d) = (&outs[0], &outs[1]);
        let denied_through = field(d, "ok")?;
        let allowed_failed = field(a, "eperm")? + field(a, "err")?;
        let gap_ms = field(a, "max_ok_gap_us")? / 1000.0;
        writeln!(
            report,
            "{what}: READY after {ready_ms:.0} ms; denied connects that got through: {denied_through}; allowed connects refused or failed: {allowed_failed}; longest time without an allowed connect: {gap_ms:.1} ms (a loop connects every ~1 ms)"
        )?;
        rows.push(
            json!({ "event": what, "ready_ms": ready_ms, "denied_through": denied_through,
                          "allowed_failed": allowed_failed, "max_allowed_gap_ms": gap_ms,
                          "allowed_ok": field(a, "ok")?, "denied_refused": field(d, "eperm")? }),
        );
        stop(&mut setup, libc::SIGTERM);
    }
    let out = crate::workspace_root().join("docs/benchmarks");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("lifecycle.json"),
        serde_json::to_string_pretty(&json!({ "benchmark": "lifecycle", "cold_start_ms": starts,
            "events": rows, "machine": crate::bench::machine() }))?,
    )?;
    std::fs::write(out.join("lifecycle.txt"), &report)?;
    Ok(report)
}
