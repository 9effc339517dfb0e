//! egress-guard: kernel-enforced egress allowlists for the containers of an OpenHands host.
//!
//! `egress-guard run` is the daemon; the other subcommands are tools around it.
//! Where things are: config parsing in `config.rs`, rule compilation in `policy.rs`, kernel
//! maps and attachments in `kernel/`, the daemon loop in `daemon.rs`; the per-packet decision
//! itself is in `agent-ebpf/src/decide.rs`.

mod audit;
mod config;
mod daemon;
mod kernel;
mod policy;

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use agent_common::{Counter, STATE_ACTIVE, STATE_AUDIT};
use clap::{Parser, Subcommand};

const DEFAULT_CONFIG: &str = "/etc/egress-guard/config.toml";

/// Kernel-enforced egress allowlists for OpenHands containers.
///
/// eBPF programs attached to the guarded cgroups decide every connect(), sendmsg(), socket()
/// and outgoing packet in the kernel: allowed destinations pass, everything else fails with
/// EPERM or is dropped. The programs are pinned, so the policy stays enforced when the agent
/// stops or crashes; a restarted agent adopts them without a gap.
#[derive(Parser)]
#[command(name = "egress-guard", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: apply the config to the kernel and keep it applied.
    ///
    /// SIGHUP re-reads the config (a bad config is refused and the running policy stays);
    /// SIGTERM stops the agent and leaves the policy enforced. Log level: `log_level` in the
    /// config, overridden by the EGRESS_GUARD_LOG environment variable (e.g. "debug").
    Run {
        /// The policy configuration (TOML).
        #[arg(long, short, env = "EGRESS_GUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check a config without applying it: syntax, addresses, overlaps and cgroups.
    CheckConfig {
        #[arg(long, short, env = "EGRESS_GUARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show per-policy decision counters, read from the pinned maps (works with the agent stopped).
    Stats {
        #[command(flatten)]
        pins: PinArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove every pinned program and map on purpose: guarded cgroups become unguarded.
    ///
    /// Stop the agent first (systemctl stop egress-guard), or it re-attaches on its next reload.
    Uninstall {
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(clap::Args)]
struct PinArgs {
    /// The bpffs directory holding the pins [default: pin_dir of the config, else /sys/fs/bpf/egress-guard].
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Take pin_dir from this config.
    #[arg(long, short, env = "EGRESS_GUARD_CONFIG")]
    config: Option<PathBuf>,
}

impl PinArgs {
    fn resolve(&self) -> anyhow::Result<PathBuf> {
        if let Some(d) = &self.pin_dir {
            return Ok(d.clone());
        }
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        match config::load(&path) {
            Ok(c) => Ok(c.pin_dir),
            Err(_) if self.config.is_none() => Ok(PathBuf::from(config::DEFAULT_PIN_DIR)),
            Err(e) => Err(e.into()),
        }
    }
}

fn init_logging(config_level: Option<&str>) {
    let filter = std::env::var("EGRESS_GUARD_LOG")
        .ok()
        .or_else(|| config_level.map(str::to_string))
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("egress-guard: log filter {filter:?} is invalid ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    // journald stamps lines itself and shows no colours.
    let tty = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(tty)
        .with_target(false);
    if tty {
        fmt.init();
    } else {
        fmt.without_time().init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config: path } => {
            let config = match config::load(&path) {
                Ok(c) => c,
                Err(e) => return config_refused(&e),
            };
            init_logging(config.log_level.as_deref());
            tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), "egress-guard starting");
            match daemon::run(&path, config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => match e.downcast_ref::<config::ConfigError>() {
                    Some(ce) => config_refused(ce),
                    None => {
                        tracing::error!("egress-guard cannot start: {e:#}");
                        ExitCode::FAILURE
                    }
                },
            }
        }
        Command::CheckConfig { config: path } => {
            let checked = config::load(&path)
                .map_err(anyhow::Error::from)
                .and_then(|c| {
                    let targets = daemon::prepare(&c)??;
                    Ok((c, targets))
                });
            match checked {
                Ok((c, targets)) => {
                    for (p, t) in c.policies.iter().zip(&targets) {
                        println!(
                            "policy {:?}: {} mode, {} cgroups, {} address rules ({} kernel entries), {} hostnames",
                            p.name,
                            p.mode,
                            t.cgroups.len(),
                            p.rules.len(),
                            t.compiled.len(),
                            p.hostnames.len()
                        );
                    }
                    println!("{}: OK", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => match e.downcast_ref::<config::ConfigError>() {
                    Some(ce) => config_refused(ce),
                    None => fail(e),
                },
            }
        }
        Command::Stats { pins, json } => match stats(&pins, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Uninstall { pins } => {
            init_logging(None);
            let run = || -> anyhow::Result<()> {
                let dir = pins.resolve()?;
                let (links, maps) = kernel::uninstall(&dir)?;
                println!(
                    "removed {links} attachments and {maps} maps from {}; the cgroups are no longer guarded",
                    dir.display()
                );
                Ok(())
            };
            match run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}

fn config_refused(e: &config::ConfigError) -> ExitCode {
    eprintln!("{e}");
    eprintln!("egress-guard: configuration refused; nothing was changed");
    ExitCode::from(2)
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("egress-guard: {e:#}");
    ExitCode::FAILURE
}

fn stats(pins: &PinArgs, json: bool) -> anyhow::Result<()> {
    let dir = pins.resolve()?;
    let maps_dir = kernel::pin_root(&dir).join("maps");
    let maps = kernel::Maps::from_pins(&maps_dir).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\nis the agent installed? no pins under {}",
            maps_dir.display()
        )
    })?;
    let mut rows = Vec::new();
    for (slot, st) in maps.states()?.iter().enumerate() {
        if st.flags & STATE_ACTIVE == 0 {
            continue;
        }
        let counters = maps.counters(slot as u32)?;
        let mode = if st.flags & STATE_AUDIT != 0 {
            "audit"
        } else {
            "enforce"
        };
        rows.push((kernel::state_name(st), mode, counters));
    }
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|(name, mode, c)| {
                let counters: serde_json::Map<String, serde_json::Value> = Counter::ALL
                    .iter()
                    .map(|k| (k.name().to_string(), c[*k as usize].into()))
                    .collect();
                serde_json::json!({ "policy": name, "mode": mode, "counters": counters })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "policies": out }))?
        );
    } else {
        println!(
            "{:<20} {:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "POLICY",
            "MODE",
            "CONN_OK",
            "CONN_DENY",
            "SEND_OK",
            "SEND_DENY",
            "PKT_DROP",
            "SOCK_DENY",
            "WOULD_DENY"
        );
        for (name, mode, c) in &rows {
            let would = c[Counter::ConnectWouldDeny as usize]
                + c[Counter::SendWouldDeny as usize]
                + c[Counter::PacketWouldDeny as usize]
                + c[Counter::SocketWouldDeny as usize];
            println!(
                "{:<20} {:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                name,
                mode,
                c[Counter::ConnectAllowed as usize],
                c[Counter::ConnectDenied as usize],
                c[Counter::SendAllowed as usize],
                c[Counter::SendDenied as usize],
                c[Counter::PacketDenied as usize],
                c[Counter::SocketDenied as usize],
                would
            );
        }
    }
    Ok(())
}
