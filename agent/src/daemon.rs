//! The daemon: start-up order, signals, reload, readiness.
//!
//! Start-up, as [`run`] lists it: read and check the config → mount bpffs → open or create
//! the pinned maps → the DNS proxy listens → write rulesets → attach (adopting pins left by a
//! previous run) → match containers → audit trail, CloudWatch sink, control socket → READY.
//! A config that fails any check is refused before the kernel is touched; on reload the old
//! policy stays.

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

/// How long a stopping agent lets the CloudWatch sink deliver what is spooled.
const SINK_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

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

/// The running agent: what the steps inside the runtime, the main loop and the stop share.
struct Agent<'a> {
    config_path: &'a Path,
    /// The config in force (a reload that applies replaces it).
    config: Config,
    targets: Vec<Target>,
    kernel: Kernel,
    dns: dns::Service,
    discovery: Arc<Discovery>,
    /// The agent's own records, to the audit trail.
    tx: mpsc::UnboundedSender<Notice>,
}

/// The CloudWatch sink's thread: its health, and how to stop it.
struct CloudWatch {
    health: Arc<Mutex<crate::cloudwatch::health::Health>>,
    stop: tokio::sync::watch::Sender<bool>,
    wake: Arc<tokio::sync::Notify>,
    /// Says when the sink is done.
    done: tokio::sync::oneshot::Receiver<()>,
}

/// The control socket and its server.
struct Control {
    shared: Arc<Shared>,
    /// Reloads asked for on the socket, each with its reply channel.
    reloads: mpsc::Receiver<ReloadRequest>,
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Agent<'_> {
    fn say(&self, n: Notice) {
        // The receiver lives until `stop`.
        let _ = self.tx.send(n);
    }

    /// The audit trail, and the kernel ring it is to read.
    fn open_audit(&mut self, feed: Arc<EventFeed>) -> anyhow::Result<(Audit, aya::maps::MapData)> {
        let AuditMaps { events, lost } = self
            .kernel
            .take_audit_maps()
            .context("audit maps already taken")?;
        let mut audit = Audit::new(
            lost,
            &self.config.audit,
            kernel::mounts::cgroup2_root()?,
            feed,
        )
        .context("starting the audit trail (see [audit] in the config)")?;
        audit.set_learner(self.dns.learner.clone());
        audit.set_docker_root(self.config.docker_root.clone());
        audit.set_known_cgroups(self.discovery.known());
        Ok((audit, events))
    }

    /// A build without the `cloudwatch` feature (the fuzz targets' library) cannot ship.
    #[cfg(not(feature = "cloudwatch"))]
    fn start_cloudwatch(&self, _audit: &mut Audit) -> anyhow::Result<Option<CloudWatch>> {
        if self.config.cloudwatch.is_some() {
            anyhow::bail!(
                "this egress-guard was built without CloudWatch (cargo feature `cloudwatch`); remove [cloudwatch] from the config"
            );
        }
        Ok(None)
    }

    /// With `[cloudwatch]`: the spool, linked to the audit trail, and the sink on its thread.
    #[cfg(feature = "cloudwatch")]
    fn start_cloudwatch(&self, audit: &mut Audit) -> anyhow::Result<Option<CloudWatch>> {
        let Some(cw) = &self.config.cloudwatch else {
            return Ok(None);
        };
        let spool = crate::cloudwatch::spool::Spool::open(&cw.spool_dir, cw.spool_max_bytes)
            .with_context(|| {
                format!(
                    "opening the CloudWatch spool {} (see [cloudwatch] spool_dir)",
                    cw.spool_dir.display()
                )
            })?;
        let spool = Arc::new(Mutex::new(spool));
        let stream = cw.log_stream.clone().unwrap_or_else(|| {
            crate::audit::record::ec2_instance_id().unwrap_or_else(crate::audit::record::hostname)
        });
        let sink = crate::cloudwatch::sink::Sink::new(
            crate::cloudwatch::sink::Settings {
                log_group: cw.log_group.clone(),
                log_stream: stream.clone(),
                region: cw.region.clone(),
                endpoint: cw.endpoint.clone(),
                flush_interval: cw.flush_interval,
            },
            spool.clone(),
            cw.spool_dir.clone(),
            self.tx.clone(),
        );
        audit.set_spool(crate::audit::SpoolLink {
            spool,
            wake: sink.wake.clone(),
            metrics_every: cw.metrics_interval,
        });
        let health = sink.health.clone();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let wake = sink.wake.clone();
        tracing::info!(log_group = %cw.log_group, log_stream = %stream, spool = %cw.spool_dir.display(), "shipping the audit trail to CloudWatch Logs");
        if cw.metrics_interval > std::time::Duration::from_secs(60) {
            tracing::warn!(
                "[cloudwatch] metrics_interval is {:?}: the shipped AgentSilent alarms expect a Heartbeat at least every minute and will fire; keep it at 60s or less",
                cw.metrics_interval
            );
        }
        let done = spawn_sink(sink, stop_rx)?;
        Ok(Some(CloudWatch {
            health,
            stop,
            wake,
            done,
        }))
    }

    /// The `agent.start` record, and the policies in force.
    fn say_started(&self, report: &ApplyReport) {
        self.say(Notice::Agent(
            "agent.start",
            json!({ "agent_version": env!("CARGO_PKG_VERSION"), "config": self.config_path.display().to_string(),
                    "socket_guard": self.kernel.socket_guard }),
        ));
        announce(&|n| self.say(n), &self.kernel, &self.targets, report);
    }

    /// The control socket's shared view, made current, and its server.
    fn start_control(
        &self,
        feed: Arc<EventFeed>,
        cloudwatch: Option<&CloudWatch>,
        report: &ApplyReport,
    ) -> anyhow::Result<Control> {
        let config = &self.config;
        let (reload, reloads) = mpsc::channel::<ReloadRequest>(4);
        let group = match control::group_id(&config.control.group) {
            Some(gid) => Some((config.control.group.clone(), gid)),
            None => {
                tracing::warn!(
                    "control group {:?} does not exist: only root can use the control socket",
                    config.control.group
                );
                None
            }
        };
        let shared = Arc::new(Shared {
            started: std::time::Instant::now(),
            pin_dir: config.pin_dir.clone(),
            config_path: self.config_path.to_path_buf(),
            status: Mutex::new(Value::Null),
            policies: Mutex::new(Vec::new()),
            events: feed,
            audit_file: config.audit.file.clone(),
            reload,
            group,
            dns: Mutex::new(Value::Null),
            learner: self.dns.learner.clone(),
            cloudwatch: cloudwatch.map(|c| c.health.clone()),
            containers: self.discovery.clone(),
        });
        publish(&shared, config, &self.targets, report, &self.kernel);
        let socket = config.control.socket.clone();
        let listener = control::bind(&socket, shared.group.as_ref().map(|g| g.1))
            .context("starting the control socket (see [control] in the config)")?;
        tracing::info!(socket = %socket.display(), "control socket listening");
        let task = tokio::spawn(control::serve(listener, shared.clone()));
        Ok(Control {
            shared,
            reloads,
            socket,
            task,
        })
    }

    /// The main loop, until SIGTERM or SIGINT: feeds the watchdog, and reloads on SIGHUP or a
    /// request on the control socket. Fails when the audit trail ends.
    async fn serve(
        &mut self,
        signals: &mut Signals,
        audit_task: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
        control: &mut Control,
    ) -> anyhow::Result<()> {
        let mut watchdog = watchdog_interval();
        loop {
            // A reload comes from SIGHUP or from the control socket (with a reply channel).
            let reply = tokio::select! {
                // Fed from this loop: a hung reload or a kernel that stopped answering makes
                // systemd restart the agent (the pins keep enforcing meanwhile).
                _ = watchdog.tick() => {
                    match self.kernel.check_maps() {
                        Ok(()) => notify("WATCHDOG=1"),
                        Err(e) => tracing::error!("not feeding the watchdog: {e:#}"),
                    }
                    continue;
                }
                _ = signals.hup.recv() => None,
                Some(reply) = control.reloads.recv() => Some(reply),
                _ = signals.term.recv() => break,
                _ = signals.int.recv() => break,
                // The audit trail must not die unnoticed: stop (systemd restarts the agent).
                ended = &mut *audit_task => {
                    let why = match ended {
                        Ok(Ok(())) => "it stopped".to_string(),
                        Ok(Err(e)) => format!("{e:#}"),
                        Err(e) => format!("it panicked: {e}"),
                    };
                    control.task.abort();
                    let _ = std::fs::remove_file(&control.socket);
                    anyhow::bail!("the audit trail failed ({why}); stopping so that the agent is restarted");
                }
            };
            notify("RELOADING=1");
            let outcome = self.apply_reload(&control.shared);
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
            notify("READY=1");
        }
        Ok(())
    }

    /// Re-reads and applies the config (see [`reload`]); once applied, discovery, the audit
    /// trail and the control socket follow the new policy. The answer for the control socket.
    fn apply_reload(&mut self, shared: &Shared) -> Result<Value, String> {
        match reload(
            self.config_path,
            &self.config,
            &self.targets,
            &mut self.kernel,
            &mut self.dns,
        ) {
            Ok((new, new_targets, report)) => {
                if let Err(e) = self
                    .discovery
                    .update(&guarded_dirs(&new_targets), selector_rules(&new, &report))
                {
                    // The kernel keeps the previous matches; new containers fall under
                    // their guarded cgroup's policy.
                    tracing::error!("container discovery after the reload: {e:#}");
                }
                self.say(Notice::Agent(
                    "agent.reload",
                    json!({ "result": "applied" }),
                ));
                announce(&|n| self.say(n), &self.kernel, &new_targets, &report);
                publish(shared, &new, &new_targets, &report, &self.kernel);
                self.config = new;
                self.targets = new_targets;
                Ok(
                    json!({ "result": "applied", "policies": report.policies, "removed_policies": report.removed_policies }),
                )
            }
            Err(reason) => {
                self.say(Notice::Agent(
                    "agent.reload",
                    json!({ "result": "refused", "reason": reason }),
                ));
                Err(reason)
            }
        }
    }

    /// Stops serving; the policy stays enforced by the pins. The audit trail writes what is
    /// left (the stop record too) and the CloudWatch sink gets a moment to deliver it.
    async fn stop(
        self,
        control: Control,
        audit_task: tokio::task::JoinHandle<anyhow::Result<()>>,
        cloudwatch: Option<CloudWatch>,
    ) -> anyhow::Result<()> {
        tracing::info!(
            "stopping; the policy stays enforced by the pinned programs in {} (run `egress-guard uninstall` to remove it)",
            kernel::pin_root(&self.config.pin_dir).display()
        );
        notify("STOPPING=1");
        let Agent { mut dns, tx, .. } = self;
        dns.stop();
        drop(dns);
        control.task.abort();
        let _ = std::fs::remove_file(&control.socket);
        let _ = tx.send(Notice::Agent(
            "agent.stop",
            json!({ "enforcement": "stays in force (pinned)" }),
        ));
        drop(tx);
        let audited = audit_task
            .await
            .context("the audit task panicked")?
            .context("audit trail");
        // The sink gets a moment to deliver the rest (the stop record too); what it cannot
        // stays in the spool for the next start.
        if let Some(mut cw) = cloudwatch {
            let _ = cw.stop.send(true);
            cw.wake.notify_one();
            if tokio::time::timeout(SINK_GRACE, &mut cw.done)
                .await
                .is_err()
            {
                // Its thread ends with the process.
                tracing::warn!(
                    "CloudWatch: undelivered records stay in the spool for the next start"
                );
            }
        }
        audited
    }
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

/// Makes the control socket's view current after a (re)load.
fn publish(
    shared: &Shared,
    config: &Config,
    targets: &[Target],
    report: &ApplyReport,
    kernel: &Kernel,
) {
    let views: Vec<PolicyView> = targets
        .iter()
        .filter_map(|t| {
            let p = config.policies.iter().find(|p| p.name == t.name)?;
            Some(PolicyView {
                name: t.name.clone(),
                mode: t.mode,
                cgroups: t.cgroups.clone(),
                rules: p.rules.clone(),
                hostnames: p.hostnames.clone(),
                compiled: t.compiled.clone(),
                learned: Vec::new(),
            })
        })
        .collect();
    let status = json!({
        "policies": report.policies,
        "cgroup_hooks": Hook::ALL.iter().map(|h| h.program()).collect::<Vec<_>>(),
        "socket_guard": kernel.socket_guard,
        "process_events": kernel.process_events,
        "pins": { "dir": kernel::pin_root(&config.pin_dir).display().to_string(),
                  "adopted": report.adopted, "attached": report.attached, "detached": report.detached },
    });
    if let Ok(mut s) = shared.status.lock() {
        *s = status;
    }
    if let Ok(mut p) = shared.policies.lock() {
        *p = views;
    }
    let proxy: Vec<Value> = report
        .policies
        .iter()
        .filter_map(|applied| {
            let t = targets.iter().find(|t| t.name == applied.name)?;
            let p = config.policies.iter().find(|p| p.name == applied.name)?;
            let listen = t.dns_proxy?;
            Some(json!({ "policy": applied.name, "listen": listen.to_string(),
                         "upstreams": p.upstreams.iter().map(|u| u.to_string()).collect::<Vec<_>>() }))
        })
        .collect();
    if let Ok(mut d) = shared.dns.lock() {
        *d = json!({ "mode": config.dns.mode, "proxy": proxy });
    }
}

/// Tells the audit trail which policies are in force (names by slot, guarded cgroups) and
/// records each as an `agent.policy` event.
fn announce(say: &impl Fn(Notice), kernel: &Kernel, targets: &[Target], report: &ApplyReport) {
    match kernel.policy_names() {
        Ok(names) => say(Notice::Policies(
            names,
            targets.iter().flat_map(|t| t.cgroups.clone()).collect(),
        )),
        Err(e) => tracing::error!("reading policy names for the audit trail: {e:#}"),
    }
    for p in &report.policies {
        say(Notice::Agent(
            "agent.policy",
            json!({ "policy": p.name, "change": "applied", "mode": p.mode, "map_entries": p.entries, "cgroups": p.cgroups }),
        ));
    }
    for name in &report.removed_policies {
        say(Notice::Agent(
            "agent.policy",
            json!({ "policy": name, "change": "removed" }),
        ));
    }
}

/// Re-reads the config; on any problem the running policy stays as it is, and the reason
/// is returned.
fn reload(
    path: &Path,
    current: &Config,
    current_targets: &[Target],
    kernel: &mut Kernel,
    dns: &mut dns::Service,
) -> Result<(Config, Vec<Target>, ApplyReport), String> {
    tracing::info!("reloading {}", path.display());
    let refused = |reason: String| {
        tracing::error!("reload refused, the previous policy stays in force:\n{reason}");
        reason
    };
    let new = config::load(path).map_err(|e| refused(e.to_string()))?;
    if new.pin_dir != current.pin_dir {
        return Err(refused(format!(
            "pin_dir changed ({} → {}); this needs a restart",
            current.pin_dir.display(),
            new.pin_dir.display()
        )));
    }
    if new.control != current.control || new.audit != current.audit || new.dns != current.dns {
        tracing::warn!(
            "changes to [control], [audit] and [dns] take effect when the agent restarts"
        );
    }
    // The running [dns] settings stay (listeners, mode) until a restart.
    let mut new = new;
    new.dns = current.dns.clone();
    let mut targets = match prepare(&new) {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(refused(e.to_string())),
        Err(e) => return Err(refused(format!("{e:#}"))),
    };
    match apply(kernel, dns, &new, &mut targets) {
        Ok(report) => {
            log_applied(&new, &report, kernel);
            Ok((new, targets, report))
        }
        Err(e) => {
            // Attachments are added before old ones are removed, so every cgroup stayed
            // guarded; put the previous policy back in full.
            let reason = format!("applying to the kernel failed: {e:#}");
            tracing::error!("reload failed, restoring the previous policy: {reason}");
            let mut previous: Vec<Target> = current_targets
                .iter()
                .map(|t| Target {
                    name: t.name.clone(),
                    mode: t.mode,
                    compiled: t.compiled.clone(),
                    cgroups: t.cgroups.clone(),
                    dns_proxy: None,
                    learned: Vec::new(),
                    hostnames: t.hostnames,
                    selectors: t.selectors,
                })
                .collect();
            match apply(kernel, dns, current, &mut previous) {
                Ok(report) => log_applied(current, &report, kernel),
                Err(e) => tracing::error!(
                    "restoring the previous policy failed too; the kernel may hold a mix of both: {e:#}"
                ),
            }
            Err(reason)
        }
    }
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
        SocketGuard::Tracepoint => tracing::warn!(
            "AF_PACKET guard: BPF LSM not available, using the sys_enter_socket tracepoint: a guarded process that opens an AF_PACKET socket is killed (SIGKILL); add 'bpf' to the kernel's lsm= boot parameter to refuse with EPERM instead"
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

/// The CloudWatch sink on a thread and runtime of its own: reading the spool, building
/// batches and waiting for CloudWatch never delay the audit drain (and so the kernel ring) or
/// the DNS proxy on the main runtime. The receiver says when it is done.
#[cfg(feature = "cloudwatch")]
fn spawn_sink(
    sink: crate::cloudwatch::sink::Sink,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cloudwatch".into())
        .spawn(move || {
            lower_this_threads_priority(SINK_NICE);
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(sink.run(stop)),
                Err(e) => tracing::error!("CloudWatch: no runtime for the sink: {e}"),
            }
            let _ = done.send(());
        })
        .context("starting the CloudWatch sink's thread")?;
    Ok(done_rx)
}

/// The CloudWatch sink's nice value. Its work can wait (the spool holds every record), the
/// ring drain cannot (a full ring loses records): under a storm on a busy host the kernel
/// scheduler gives the drain the CPU first. The sink's helper threads inherit it.
#[cfg(feature = "cloudwatch")]
const SINK_NICE: i32 = 10;

/// Sets the calling thread's nice value (Linux: nice is per thread). Failure only costs
/// priority, so it is logged, not fatal.
#[cfg(feature = "cloudwatch")]
fn lower_this_threads_priority(nice: i32) {
    // No safe wrapper in nix for setpriority; gettid and setpriority have no preconditions.
    let rc = unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc != 0 {
        tracing::debug!(
            "could not lower the CloudWatch sink's priority: {}",
            std::io::Error::last_os_error()
        );
    }
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
