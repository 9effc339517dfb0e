//! The running agent: what the start-up steps inside the runtime, the main loop, reloads and
//! the stop share.

use super::{cloudwatch::SINK_GRACE, *};

/// The running agent: what the steps inside the runtime, the main loop and the stop share.
pub(super) struct Agent<'a> {
    pub(super) config_path: &'a Path,
    /// The config in force (a reload that applies replaces it).
    pub(super) config: Config,
    pub(super) targets: Vec<Target>,
    pub(super) kernel: Kernel,
    pub(super) dns: dns::Service,
    pub(super) discovery: Arc<Discovery>,
    /// The agent's own records, to the audit trail.
    pub(super) tx: mpsc::UnboundedSender<Notice>,
}

/// The control socket and its server.
pub(super) struct Control {
    pub(super) shared: Arc<Shared>,
    /// Reloads asked for on the socket, each with its reply channel.
    pub(super) reloads: mpsc::Receiver<ReloadRequest>,
    pub(super) socket: PathBuf,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Agent<'_> {
    pub(super) fn say(&self, n: Notice) {
        // The receiver lives until `stop`.
        let _ = self.tx.send(n);
    }

    /// The audit trail, and the kernel ring it is to read.
    pub(super) fn open_audit(
        &mut self,
        feed: Arc<EventFeed>,
    ) -> anyhow::Result<(Audit, aya::maps::MapData)> {
        let AuditMaps {
            events,
            lost,
            send_flow_side,
            send_flows,
        } = self
            .kernel
            .take_audit_maps()
            .context("audit maps already taken")?;
        let mut audit = Audit::new(
            lost,
            crate::audit::send_flows::SendFlows::new(send_flow_side, send_flows),
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

    /// The `agent.start` record, and the policies in force.
    pub(super) fn say_started(&self, report: &ApplyReport) {
        self.say(Notice::Agent(
            "agent.start",
            json!({ "agent_version": env!("CARGO_PKG_VERSION"), "config": self.config_path.display().to_string(),
                    "socket_guard": self.kernel.socket_guard }),
        ));
        announce(&|n| self.say(n), &self.kernel, &self.targets, report);
    }

    /// The control socket's shared view, made current, and its server.
    pub(super) fn start_control(
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
    pub(super) async fn serve(
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
    pub(super) fn apply_reload(&mut self, shared: &Shared) -> Result<Value, String> {
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
    pub(super) async fn stop(
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

/// Makes the control socket's view current after a (re)load.
pub(super) fn publish(
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
pub(super) fn announce(
    say: &impl Fn(Notice),
    kernel: &Kernel,
    targets: &[Target],
    report: &ApplyReport,
) {
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
pub(super) fn reload(
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
