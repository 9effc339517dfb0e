//! `cargo xtask demo openhands`: the real OpenHands agent server in a guarded sandbox, driven
//! by a scripted LLM that tries to get out. Runs as root (xtask builds it and sets it up).
//!
//! `openhands-demo [--build-only] [--enforce-only]`: build (or find) the image; run once in
//! audit mode with OpenHands' defaults to list what it reaches for by itself, then once in
//! enforce mode with those calls switched off and the attempts, and print what happened.

use std::time::{Duration, Instant};

use egress_guard_e2e::openhands::{self, Options, Outcome, describe};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let started = Instant::now();
    egress_guard_e2e::require_root();
    egress_guard_e2e::sweep();
    openhands::sweep_links();

    println!(
        "==> the sandbox image: Debian trixie minbase + openhands-agent-server {} (PyPI, \
         hash-pinned), built without a registry",
        openhands::VERSION
    );
    let rootfs = openhands::build_rootfs();
    match rootfs.built_in {
        Some(t) => println!("    built in {:.0} s", t.as_secs_f64()),
        None => println!("    cached in {}", rootfs.path.display()),
    }
    for (step, secs) in &rootfs.steps {
        println!(
            "      {step}: {secs:.0} s{}",
            if rootfs.built_in.is_none() {
                " (when it was built)"
            } else {
                ""
            }
        );
    }
    if args.iter().any(|a| a == "--build-only") {
        return;
    }

    if !args.iter().any(|a| a == "--enforce-only") {
        println!(
            "\n==> 1. audit mode, OpenHands' defaults: what does the agent server reach for by \
             itself? (the LLM finishes at once)"
        );
        let audit = openhands::run_scenario(
            &rootfs.path,
            &Options {
                audit: true,
                quiet_env: false,
                attempts: false,
                linger: Duration::from_secs(10),
            },
        );
        timings(&audit);
        if audit.other_records.is_empty() {
            println!("    nothing but the LLM");
        } else {
            println!("    besides the LLM, it reached for:");
            print_counted("      ", &audit.other_records);
        }
        println!(
            "    (raw.githubusercontent.com is litellm's model price map, fetched at start; \
             LITELLM_LOCAL_MODEL_COST_MAP=True keeps it local)"
        );
    }

    println!(
        "\n==> 2. enforce mode, with LITELLM_LOCAL_MODEL_COST_MAP=True and DO_NOT_TRACK=1; the \
         policy:"
    );
    let out = openhands::run_scenario(
        &rootfs.path,
        &Options {
            audit: false,
            quiet_env: true,
            attempts: true,
            linger: Duration::from_secs(2),
        },
    );
    for line in out.config.lines().filter(|l| !l.starts_with("root =")) {
        println!("    | {line}");
    }
    timings(&out);
    println!("    socket guard: {}", out.socket_guard);
    for (i, s) in out.steps.iter().enumerate() {
        println!("\n--- attempt {}: {}", i + 1, s.attempt.what);
        match &s.ran {
            Some(cmd) => println!("    $ {cmd}"),
            None => println!("    (the agent never ran it: {})", s.attempt.command),
        }
        for line in s.output.lines() {
            println!("    > {line}");
        }
        // The agent typing the command into its tmux terminal is not worth a line.
        let shown: Vec<serde_json::Value> = s
            .records
            .iter()
            .filter(|r| !(r["type"] == "proc.exec" && r["comm"] == "tmux"))
            .cloned()
            .collect();
        if shown.is_empty() {
            println!("    (no records)");
        }
        print_counted("    ", &shown);
    }
    println!(
        "\n--- the LLM calls ({} requests served by the scripted LLM):",
        out.llm_requests
    );
    print_counted("    ", &out.llm_records);
    if !out.other_records.is_empty() {
        println!("\n--- anything else the sandbox reached for:");
        print_counted("    ", &out.other_records);
    }
    println!(
        "\n--- after every refusal: the conversation is {:?}; GET /health answers {} {}",
        out.status, out.health_after.0, out.health_after.1
    );
    println!(
        "\n==> done in {:.0} s; the containers, the daemon, the cgroups, the pins and the \
         addresses added to lo are removed",
        started.elapsed().as_secs_f64()
    );
}

fn timings(o: &Outcome) {
    println!(
        "    image import {:.0} s, agent server answering /health after {:.1} s, conversation \
         {:.1} s ({})",
        o.import.as_secs_f64(),
        o.startup.as_secs_f64(),
        o.conversation.as_secs_f64(),
        o.status
    );
}

/// The records, one line each, in order; repeats (the same line but for the pid) once, with
/// their count.
fn print_counted(indent: &str, records: &[serde_json::Value]) {
    let mut lines: Vec<(String, usize)> = Vec::new();
    for r in records {
        let d = describe(r);
        let brief = match d.split_once(", pid") {
            Some((head, _)) => format!("{head})"),
            None => d,
        };
        match lines.iter_mut().find(|(l, _)| *l == brief) {
            Some((_, n)) => *n += 1,
            None => lines.push((brief, 1)),
        }
    }
    for (line, n) in lines {
        let times = if n > 1 {
            format!(" (x{n})")
        } else {
            String::new()
        };
        println!("{indent}record: {line}{times}");
    }
}
