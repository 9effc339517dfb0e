//! `cargo xtask demo`: a guarded cgroup, the agent with an example policy, one allowed and one
//! refused connection from inside, the kernel's counters, then everything removed again.
//! Loopback only: the "LLM API" is a local listener on 127.0.0.2, the "exfiltration target"
//! one on 127.0.0.3.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{is_root, workspace_root};

/// Runs the probe inside `cgroup` and describes the outcome.
fn connect_from(cgroup: Option<&Path>, probe: &Path, to: &str) -> anyhow::Result<String> {
    let mut cmd = match cgroup {
        Some(cg) => {
            // Join the cgroup first (via a shell), so the socket belongs to it.
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" tcp \"$1\"",
                cg.display()
            ));
            c.arg(probe).arg(to);
            c
        }
        None => {
            let mut c = Command::new(probe);
            c.args(["tcp", to]);
            c
        }
    };
    let out = cmd.output()?;
    Ok(match String::from_utf8_lossy(&out.stdout).trim() {
        "ok" => "connected".into(),
        "EPERM" => {
            "REFUSED by the kernel: connect() failed with EPERM (Operation not permitted)".into()
        }
        other => format!("error: {other}"),
    })
}

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs into the kernel: run `cargo xtask demo` as root");
    }
    crate::build_binaries()?;
    let target = workspace_root().join("target/debug");
    let (bin, probe) = (target.join("egress-guard"), target.join("probe"));

    let name = format!("egress-guard-demo-{}", std::process::id());
    let mut demo = crate::scratch::Scratch::new(&name, &bin)?;
    demo.farewell = Some(
        "\n==> cleaning up: stopping the agent, `egress-guard uninstall`, removing the cgroup",
    );

    let llm_port = crate::scratch::listener("127.0.0.2")?.port();
    let other_port = crate::scratch::listener("127.0.0.3")?.port();
    let audit_file = demo.dir.join("audit.jsonl");
    let config = format!(
        r#"# The demo's policy: the sandbox may reach its "LLM API" and nothing else.
mode = "enforce"
pin_dir = "{pin}"

[audit]
file = "{audit}"

{dns}
[[policy]]
name = "openhands-sandbox"
cgroups = ["{cg}"]
allow = ["127.0.0.2:{llm_port}"]
"#,
        pin = demo.pin_dir.display(),
        audit = audit_file.display(),
        dns = crate::scratch::LOOPBACK_DNS,
        cg = name,
    );
    let config_path = demo.dir.join("config.toml");
    std::fs::write(&config_path, &config)?;
    println!("\n==> a guarded cgroup: {}", demo.cgroup.display());
    println!("==> the policy ({}):\n{config}", config_path.display());

    let log_path = demo.dir.join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    println!(
        "==> starting: egress-guard run --config {}",
        config_path.display()
    );
    demo.agent = Some(
        Command::new(&demo.bin)
            .args(["run", "--config"])
            .arg(&config_path)
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("egress-guard ready") {
            for line in text.lines() {
                println!("    agent | {line}");
            }
            break;
        }
        if let Some(status) = demo.agent.as_mut().unwrap().try_wait()? {
            bail!("the agent exited ({status}):\n{text}");
        }
        if Instant::now() > deadline {
            bail!("the agent did not start enforcing within 30 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let allowed = format!("127.0.0.2:{llm_port}");
    let refused = format!("127.0.0.3:{other_port}");
    println!("\n==> from a process inside the guarded cgroup:");
    println!(
        "    connect {allowed:<16} (allowed by the policy) -> {}",
        connect_from(Some(&demo.cgroup), &probe, &allowed)?
    );
    println!(
        "    connect {refused:<16} (not in the policy)     -> {}",
        connect_from(Some(&demo.cgroup), &probe, &refused)?
    );
    println!("\n==> from a process outside it, the same refused destination:");
    println!(
        "    connect {refused:<16}                          -> {}",
        connect_from(None, &probe, &refused)?
    );

    println!(
        "\n==> the kernel's decision counters (egress-guard stats --pin-dir {}):",
        demo.pin_dir.display()
    );
    let stats = Command::new(&demo.bin)
        .args(["stats", "--pin-dir"])
        .arg(&demo.pin_dir)
        .output()?;
    for line in String::from_utf8_lossy(&stats.stdout).lines() {
        println!("    {line}");
    }

    // Stop the agent (SIGTERM) so it flushes the audit trail, then show it.
    if let Some(agent) = demo.agent.take() {
        let mut agent = agent;
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        agent.wait()?;
    }
    println!(
        "\n==> the audit trail ({}), one JSON record per line:",
        audit_file.display()
    );
    for line in std::fs::read_to_string(&audit_file)
        .unwrap_or_default()
        .lines()
    {
        println!("    {line}");
    }
    println!(
        "\n(the agent is stopped; its pinned programs would keep enforcing until `egress-guard uninstall`)"
    );
    Ok(())
}
