//! The daemon: start-up order, signals, reload, readiness.
//!
//! Start-up, as [`run`] lists it: read and check the config → mount bpffs → open or create
//! the pinned maps → the DNS proxy listens → write rulesets → attach (adopting pins left by a
//! previous run) → match containers → audit trail, CloudWatch sink, control socket → READY.
//! A config that fails any check is refused before the kernel is touched; on reload the old
//! policy stays.
//!
//! Here: the start-up steps; `agent` is the running agent (main loop, reload, stop),
//! `cloudwatch` the CloudWatch sink's thread.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::json;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};

use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::{
    audit::{Audit, EventFeed},
    check::PolicyView,
    config::{self, Config, ConfigError, Mode, Problem},
    containers::Discovery,
    control::{self, ReloadRequest, Shared},
    dns::{
        self, PolicySetup, learned::Binding, names::PolicyNames, records::DnsRecords,
        upstream::Upstream,
    },
    kernel::{self, ApplyReport, AuditMaps, Kernel, SocketGuard, Target, programs::Hook},
    notice::Notice,
    policy,
};

mod agent;
mod cloudwatch;

use agent::Agent;
use cloudwatch::CloudWatch;

/// Applies `targets` with their DNS side: the proxy listens on each policy's port and the
/// learned addresses are carried into the new rulesets before the kernel flips to them; then
/// the learner writes into the new rulesets. Call inside the runtime.
fn apply(
    kernel: &mut Kernel,
    dns: &mut dns::Service,
    config: &Config,
    targets: &mut [Target],
) -> anyhow::Result<ApplyReport> {
    let slots = kernel.slots(targets)?;
    let mut setups = Vec::new();
    let mut names_of = Vec::new();
    {
        let learner = dns
            .learner
            .lock()
            .map_err(|_| anyhow::anyhow!("DNS learner state poisoned"))?;
        for (t, &slot) in targets.iter_mut().zip(&slots) {
            let p = config
                .policies
                .iter()
                .find(|p| p.name == t.name)
                .context("target without a policy")?;
            let names = PolicyNames::new(&p.hostnames);
            let port = dns.port_of(slot);
            t.dns_proxy = dns.redirect_of(slot);
            t.learned = learner.entries_for(&t.name, &t.compiled, &names);
            setups.push(PolicySetup {
                policy: t.name.clone(),
                slot,
                port,
                audit: t.mode == Mode::Audit,
                names: names.clone(),
                upstream: Upstream {
                    servers: p.upstreams.clone(),
                    timeout: config.dns.upstream_timeout,
                    attempts: config.dns.upstream_attempts,
                },
            });
            names_of.push(names);
        }
    }
    // Listen before the kernel redirects to the ports.
    dns.serve(setups)?;
    let report = kernel.apply(targets)?;
    let bindings = report
        .policies
        .iter()
        .zip(targets.iter().zip(names_of))
        .map(|(applied, (t, names))| Binding {
            policy: applied.name.clone(),
            slot: applied.slot,
            ruleset: applied.ruleset,
            compiled: t.compiled.clone(),
            names,
        })
        .collect();
    dns.learner
        .lock()
        .map_err(|_| anyhow::anyhow!("DNS learner state poisoned"))?
        .rebind(bindings);
    Ok(report)
}

/// Everything about a config that can be checked without changing the kernel: cgroups
/// resolved against the live hierarchy, rules compiled to map entries, and whether it all fits
/// the kernel maps. Every problem is reported, sorted by line.
pub fn prepare(config: &Config) -> anyhow::Result<Result<Vec<Target>, ConfigError>> {
    let root = kernel::mounts::cgroup2_root()?;
    let own = match kernel::mounts::own_cgroup(&root) {
        Ok(own) => Some(own),
        Err(e) => {
            tracing::warn!(
                "cannot tell which cgroup the agent runs in ({e:#}); not checking that it is outside the guarded ones"
            );
            None
        }
    };
    let mut problems: Vec<Problem> = Vec::new();
    let resolved = match config::resolve_cgroups(config, &root, own.as_deref()) {
        Ok(r) => r,
        Err(ConfigError::Invalid { problems: p, .. }) => {
            problems.extend(p);
            Vec::new()
        }
        Err(e) => return Ok(Err(e)),
    };
    let mut targets = Vec::new();
    for p in &config.policies {
        match policy::compile(p) {
            Ok(compiled) => targets.push(Target {
                name: p.name.clone(),
                mode: p.mode,
                compiled,
                cgroups: resolved
                    .iter()
                    .filter(|c| c.policy == p.name)
                    .map(|c| c.path.clone())
                    .collect(),
                // Filled in by `apply` once the policy's slot is known.
                dns_proxy: None,
                learned: Vec::new(),
                hostnames: dns::names::fingerprint(&p.hostnames),
                selectors: !p.containers.is_empty(),
            }),
            Err(e) => problems.extend(e),
        }
    }
    problems.extend(capacity_problems(&targets));
    if problems.is_empty() {
        Ok(Ok(targets))
    } else {
        problems.sort_by_key(|p| p.line);
        Ok(Err(ConfigError::Invalid {
            file: config.path.display().to_string(),
            problems,
        }))
    }
}

/// The kernel maps are shared by all policies and, during a reload, hold the old and the new
/// rules at once: refuse what could not be written, before anything is.
fn capacity_problems(targets: &[Target]) -> Vec<Problem> {
    use agent_common::{MAX_CIDR_ENTRIES, MAX_EXACT_ENTRIES, MAX_GUARDED_CGROUPS};
    let mut counts = [0usize; 4]; // exact v4, exact v6, cidr v4, cidr v6
    for t in targets {
        for (net, _) in &t.compiled.entries {
            let host = net.prefix_len() == net.max_prefix_len();
            counts[usize::from(!host) * 2 + usize::from(matches!(net, ipnet::IpNet::V6(_)))] += 1;
        }
    }
    let limits = [
        ("exact IPv4 addresses", counts[0], MAX_EXACT_ENTRIES),
        ("exact IPv6 addresses", counts[1], MAX_EXACT_ENTRIES),
        ("IPv4 CIDRs", counts[2], MAX_CIDR_ENTRIES),
        ("IPv6 CIDRs", counts[3], MAX_CIDR_ENTRIES),
    ];
    let mut problems = Vec::new();
    for (what, n, max) in limits {
        if n > max as usize / 2 {
            problems.push(Problem {
                line: 1,
                reason: format!(
                    "{n} {what} across all policies; at most {} fit (the kernel holds the old and the new policy during a reload)",
                    max / 2
                ),
            });
        }
    }
    let cgroups: usize = targets.iter().map(|t| t.cgroups.len()).sum();
    if cgroups > MAX_GUARDED_CGROUPS as usize {
        problems.push(Problem {
            line: 1,
            reason: format!("{cgroups} guarded cgroups; at most {MAX_GUARDED_CGROUPS}"),
        });
    }
    problems
}

pub fn run(config_path: &Path, config: Config) -> anyhow::Result<()> {
    // Signal handlers first: a SIGTERM during start-up is handled once started, not fatal.
    let (rt, mut signals) = runtime_with_signals()?;
    // Every check before the kernel is touched: a config that fails one changes nothing.
    let mut targets = prepare(&config)??;
    let mut kernel = Kernel::open(&config.pin_dir, config.audit.ring_buffer_bytes).context(
        "setting up the eBPF maps failed (egress-guard needs root, or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_RESOURCE)",
    )?;
    // The audit channels first: the DNS proxy writes `dns` records to its own (bounded) one.
    let (tx, rx) = mpsc::unbounded_channel();
    let (dns_records, dns_queue) = crate::dns::records::dns_records();
    let mut dns = dns_service(&rt, &config, &kernel, dns_records)?;
    // The addresses the previous agent learned: connections to them survive the restart.
    adopt_learned(&kernel, &dns)?;
    // The policy: the DNS proxy listens before the kernel redirects to it; pins a previous
    // run left are adopted, and old attachments go only once the new are in (`Kernel::apply`).
    let report = {
        let _in_runtime = rt.enter();
        apply(&mut kernel, &mut dns, &config, &mut targets)
            .context("attaching the policy to the kernel failed")?
    };
    log_applied(&config, &report, &kernel);
    // Containers under the guarded cgroups that selectors give to other policies: matched
    // before READY, watched from now on.
    let discovery = start_discovery(&kernel, &config, &targets, &report)?;
    let mut agent = Agent {
        config_path,
        config,
        targets,
        kernel,
        dns,
        discovery,
        tx,
    };
    rt.block_on(async move {
        agent.dns.start();
        // The programs' own log lines (rare paths), to the agent's log at debug level.
        if let Some(log) = agent.kernel.take_kernel_log() {
            log.spawn();
        }
        // The audit trail and the control socket, before READY: nothing the guarded
        // processes do goes unrecorded, and the CLI answers as soon as systemd says "started".
        let feed = Arc::new(EventFeed::new());
        let (mut audit, events) = agent.open_audit(feed.clone())?;
        // CloudWatch: every record is spooled before it counts as accepted; the sink sends
        // from the spool and acknowledges what CloudWatch took.
        let cloudwatch = agent.start_cloudwatch(&mut audit)?;
        agent.say_started(&report);
        let ring =
            crate::audit::ring::Ring::new(events).context("reading the audit ring buffer")?;
        let mut audit_task = tokio::spawn(audit.run(ring, rx, dns_queue));
        let mut control = agent.start_control(feed, cloudwatch.as_ref(), &report)?;
        // READY=1 last: units ordered after the agent (Docker) start only once the programs
        // are attached, the DNS proxy listens, the containers are matched, and the audit
        // trail and the control socket run.
        notify_ready(report.policies.len());
        // Until SIGTERM or SIGINT: reloads, the watchdog, and the audit trail's health.
        agent
            .serve(&mut signals, &mut audit_task, &mut control)
            .await?;
        // The policy stays in force (pinned); the audit trail and CloudWatch get the rest.
        agent.stop(control, audit_task, cloudwatch).await
    })
}

/// Tells systemd that the agent has started: it enforces `policies` policies.
fn notify_ready(policies: usize) {
    notify(&format!("READY=1\nSTATUS=enforcing {policies} policies"));
    tracing::info!("egress-guard ready");
}

/// The signals the agent answers: SIGHUP reloads, SIGTERM and SIGINT stop it.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

/// The agent's runtime (one thread), with the signal handlers installed.
fn runtime_with_signals() -> anyhow::Result<(tokio::runtime::Runtime, Signals)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signals = {
        let _in_runtime = rt.enter();
        Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        }
    };
    Ok((rt, signals))
}

/// The DNS side on the pinned maps: the learner, the proxy (if `[dns] mode` has one; its
/// `dns` records go to `records`) and the redirects.
fn dns_service(
    rt: &tokio::runtime::Runtime,
    config: &Config,
    kernel: &Kernel,
    records: DnsRecords,
) -> anyhow::Result<dns::Service> {
    let learn_maps = kernel::maps::LearnMaps::from_pins(&kernel.maps_dir())?;
    let clients = kernel::maps::DnsClients::from_pins(&kernel.maps_dir())
        .inspect_err(|e| tracing::warn!("dns records will not name processes: {e:#}"))
        .ok();
    let _in_runtime = rt.enter();
    let redirect_map = kernel::maps::DnsProxyMap::from_pins(&kernel.maps_dir())?;
    Ok(dns::Service::new(
        &config.dns,
        learn_maps,
        clients,
        Some(redirect_map),
        records,
    ))
}

/// Gives the learner the addresses the previous agent learned (kept in the pinned rulesets).
fn adopt_learned(kernel: &Kernel, dns: &dns::Service) -> anyhow::Result<()> {
    match kernel.learned_entries() {
        Ok(entries) => {
            let n = dns
                .learner
                .lock()
                .map_err(|_| anyhow::anyhow!("DNS learner state poisoned"))?
                .adopt(entries);
            if n > 0 {
                tracing::info!("adopted {n} addresses learned from DNS before the restart");
            }
        }
        Err(e) => tracing::warn!("cannot adopt learned addresses: {e:#}"),
    }
    Ok(())
}

/// Starts container discovery and matches the containers there are now.
fn start_discovery(
    kernel: &Kernel,
    config: &Config,
    targets: &[Target],
    report: &ApplyReport,
) -> anyhow::Result<Arc<Discovery>> {
    let discovery = Arc::new(
        Discovery::start(&kernel.maps_dir(), config.docker_root.clone())
            .context("starting container discovery")?,
    );
    discovery
        .update(&guarded_dirs(targets), selector_rules(config, report))
        .context("matching containers to policies")?;
    Ok(discovery)
}

/// Every guarded cgroup: discovery watches them for containers.
fn guarded_dirs(targets: &[Target]) -> Vec<PathBuf> {
    targets
        .iter()
        .flat_map(|t| t.cgroups.iter().cloned())
        .collect()
}

/// The policies with container selectors, in config order (the first match wins), with the
/// slots the kernel gave them.
fn selector_rules(config: &Config, report: &ApplyReport) -> Vec<crate::containers::Rule> {
    config
        .policies
        .iter()
        .filter(|p| !p.containers.is_empty())
        .filter_map(|p| {
            let applied = report.policies.iter().find(|a| a.name == p.name)?;
            Some(crate::containers::Rule {
                policy: p.name.clone(),
                slot: applied.slot,
                selectors: p.containers.clone(),
            })
        })
        .collect()
}

fn log_applied(config: &Config, report: &ApplyReport, kernel: &Kernel) {
    for p in &report.policies {
        tracing::info!(
            policy = %p.name,
            mode = %p.mode,
            slot = p.slot,
            map_entries = p.entries,
            cgroups = p.cgroups,
            "policy applied"
        );
    }
    for name in &report.removed_policies {
        tracing::info!(policy = %name, "policy removed");
    }
    match kernel.socket_guard {
        SocketGuard::Lsm => {
            tracing::info!("AF_PACKET guard: BPF LSM socket_create (the call fails with EPERM)")
        }
        SocketGuard::Fentry => tracing::warn!(
            "AF_PACKET guard: BPF LSM not available, using fentry on __sock_create: a guarded process that opens an AF_PACKET socket is killed (SIGKILL); add 'bpf' to the kernel's lsm= boot parameter to refuse with EPERM instead"
        ),
        SocketGuard::Tracepoint => tracing::warn!(
            "AF_PACKET guard: neither the BPF LSM nor BPF trampolines (fentry) available, using the sys_enter_socket tracepoint: a guarded process that opens an AF_PACKET socket through socket() is killed (SIGKILL), io_uring and 32-bit calls are not seen, and every system call on the host is slower while it is attached; add 'bpf' to the kernel's lsm= boot parameter"
        ),
        SocketGuard::None => tracing::error!(
            "AF_PACKET guard: NONE could be attached; guarded processes with CAP_NET_RAW can send raw frames past the policy (drop CAP_NET_RAW from the containers)"
        ),
    }
    let hooks: Vec<&str> = Hook::ALL.iter().map(|h| h.program()).collect();
    tracing::info!(
        adopted = report.adopted,
        attached = report.attached,
        detached = report.detached,
        pins = %kernel::pin_root(&config.pin_dir).display(),
        "enforcing; cgroup guards: {}",
        hooks.join(", ")
    );
}

/// Half of systemd's `WatchdogSec` (from `$WATCHDOG_USEC`), or practically never.
fn watchdog_interval() -> tokio::time::Interval {
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&u| u > 0);
    let period = usec.map_or(std::time::Duration::from_secs(86_400 * 365), |u| {
        std::time::Duration::from_micros((u / 2).max(1_000))
    });
    tokio::time::interval(period)
}

/// sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.
fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    let sent = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_os_str().as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!("sd_notify to {} failed: {e}", path.display());
    }
}
