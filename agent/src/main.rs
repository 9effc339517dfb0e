//! The `egress-guard` command: `egress-guard run` is the daemon; the other subcommands are
//! tools around it. The modules are in the library (`lib.rs` says where things are).

use egress_guard::{config, control, daemon, kernel};

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

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
    /// SIGHUP (or `egress-guard reload`) re-reads the config: a bad config is refused and the
    /// running policy stays. SIGTERM stops the agent and leaves the policy enforced. Log level:
    /// `log_level` in the config, overridden by the EGRESS_GUARD_LOG environment variable
    /// (e.g. "debug").
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
    /// Is the guard up and enforcing? Mode, uptime, policies, guards, pins, audit sink.
    Status {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Which cgroups and containers are guarded, by which policy.
    Targets {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// The DNS proxy and what it learned: which addresses each allowed hostname resolved to,
    /// and for how much longer they are allowed.
    Dns {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// The effective allowlist of one policy (or all): addresses, CIDRs, ports, hostnames.
    Policy {
        /// The policy's name; all policies without it.
        name: Option<String>,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Would a connection to DEST[:PORT] be allowed, and by which entry? Exit status 0 if
    /// allowed, 1 if not.
    Check {
        /// ADDRESS[:PORT]; IPv6 in brackets: [2001:db8::1]:443.
        dest: String,
        /// The policy to ask (needed when several are in force).
        #[arg(long)]
        policy: Option<String>,
        /// Ask the policy guarding this container (id prefix).
        #[arg(long)]
        container: Option<String>,
        /// tcp (default), udp or icmp.
        #[arg(long)]
        proto: Option<String>,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Recent audit records; with --follow, new ones as they happen.
    Events {
        /// Keep streaming new records.
        #[arg(long, short)]
        follow: bool,
        /// Only this type, or type family: net, net.connect, proc.exec, agent, …
        #[arg(long = "type")]
        ty: Option<String>,
        /// Only this verdict: allow, deny, would_deny.
        #[arg(long)]
        verdict: Option<String>,
        /// Only this container (id prefix or name).
        #[arg(long)]
        container: Option<String>,
        /// Only records newer than this (e.g. 10m, 2h).
        #[arg(long)]
        since: Option<String>,
        /// At most this many past records (default 100).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Decision counters per policy, audit records per second. With --pin-dir, read straight
    /// from the pinned maps (works with the agent stopped).
    Stats {
        /// Read the pins in this bpffs directory instead of asking the agent.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Re-read the config now (root only): prints what changed, or why it was refused.
    Reload {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Remove every pinned program and map on purpose: guarded cgroups become unguarded.
    ///
    /// Refused while an agent runs on the same pins: stop it first (systemctl stop egress-guard).
    Uninstall {
        #[command(flatten)]
        pins: PinArgs,
        /// First stop the agent running on these pins, and only that one (SIGTERM, then wait up
        /// to 30 s for it to let go of them). For hosts without systemd; with systemd, use
        /// `systemctl stop egress-guard`.
        #[arg(long)]
        stop_agent: bool,
    },
    /// Print shell completions or the man page (used by `cargo xtask dist`).
    #[command(hide = true)]
    Generate {
        /// bash, zsh, fish, elvish, powershell, or man.
        what: String,
    },
}

#[derive(clap::Args)]
struct SocketArgs {
    /// The agent's control socket.
    #[arg(long, env = "EGRESS_GUARD_SOCKET", default_value = config::DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    /// Print the JSON the agent answered instead of a table.
    #[arg(long)]
    json: bool,
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
        Command::Status { socket } => done(control::client::status(&socket.socket, socket.json)),
        Command::Targets { socket } => done(control::client::targets(&socket.socket, socket.json)),
        Command::Dns { socket } => done(control::client::dns(&socket.socket, socket.json)),
        Command::Policy { name, socket } => done(control::client::policy(
            &socket.socket,
            name.as_deref(),
            socket.json,
        )),
        Command::Check {
            dest,
            policy,
            container,
            proto,
            socket,
        } => control::client::check(&socket.socket, &dest, policy, container, proto, socket.json)
            .unwrap_or_else(fail),
        Command::Events {
            follow,
            ty,
            verdict,
            container,
            since,
            limit,
            socket,
        } => done(control::client::events(
            &socket.socket,
            follow,
            ty,
            verdict,
            container,
            since,
            limit,
            socket.json,
        )),
        Command::Stats {
            pin_dir: Some(dir),
            socket,
        } => done(stats_from_pins(&dir, socket.json)),
        Command::Stats {
            pin_dir: None,
            socket,
        } => done(control::client::stats(&socket.socket, socket.json)),
        Command::Reload { socket } => {
            control::client::reload(&socket.socket, socket.json).unwrap_or_else(fail)
        }
        Command::Generate { what } => done(generate(&what)),
        Command::Uninstall { pins, stop_agent } => {
            init_logging(None);
            let run = || -> anyhow::Result<()> {
                let dir = pins.resolve()?;
                if stop_agent
                    && let Some(pid) =
                        kernel::stop_agent_on(&dir, std::time::Duration::from_secs(30))?
                {
                    println!("stopped the agent (pid {pid}) running on {}", dir.display());
                }
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

/// Completions for a shell, or the man page, on stdout.
fn generate(what: &str) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    let mut out = std::io::stdout();
    if what == "man" {
        clap_mangen::Man::new(cmd).render(&mut out)?;
        return Ok(());
    }
    let shell: clap_complete::Shell = what
        .parse()
        .map_err(|e| anyhow::anyhow!("{what}: {e} (or: man)"))?;
    clap_complete::generate(shell, &mut cmd, "egress-guard", &mut out);
    Ok(())
}

fn done(r: anyhow::Result<()>) -> ExitCode {
    r.map_or_else(fail, |()| ExitCode::SUCCESS)
}

/// `stats --pin-dir`: the counters straight from the pinned maps.
fn stats_from_pins(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let v = kernel::counters_json(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        control::client::print_stats_table(&v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn man_page_and_completions_cover_every_subcommand() {
        let mut man = Vec::new();
        clap_mangen::Man::new(super::Cli::command())
            .render(&mut man)
            .unwrap();
        let man = String::from_utf8(man).unwrap();
        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut super::Cli::command(),
            "egress-guard",
            &mut bash,
        );
        let bash = String::from_utf8(bash).unwrap();
        for sub in [
            "run",
            "check\\-config",
            "status",
            "targets",
            "dns",
            "policy",
            "check",
            "events",
            "stats",
            "reload",
            "uninstall",
        ] {
            assert!(man.contains(sub), "man page lacks {sub}");
        }
        for sub in ["status", "events", "reload", "--follow", "--verdict"] {
            assert!(bash.contains(sub), "bash completions lack {sub}");
        }
    }
}
