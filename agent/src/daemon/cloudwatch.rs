//! The CloudWatch sink's thread: started with the audit trail, given a grace period at stop.

use super::*;

/// How long a stopping agent lets the CloudWatch sink deliver what is spooled.
pub(super) const SINK_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The CloudWatch sink's thread: its health, and how to stop it.
pub(super) struct CloudWatch {
    pub(super) health: Arc<Mutex<crate::cloudwatch::health::Health>>,
    pub(super) stop: tokio::sync::watch::Sender<bool>,
    pub(super) wake: Arc<tokio::sync::Notify>,
    /// Says when the sink is done.
    pub(super) done: tokio::sync::oneshot::Receiver<()>,
}

impl Agent<'_> {
    /// A build without the `cloudwatch` feature (the fuzz targets' library) cannot ship.
    #[cfg(not(feature = "cloudwatch"))]
    pub(super) fn start_cloudwatch(
        &self,
        _audit: &mut Audit,
    ) -> anyhow::Result<Option<CloudWatch>> {
        if self.config.cloudwatch.is_some() {
            anyhow::bail!(
                "this egress-guard was built without CloudWatch (cargo feature `cloudwatch`); remove [cloudwatch] from the config"
            );
        }
        Ok(None)
    }

    /// With `[cloudwatch]`: the spool, linked to the audit trail, and the sink on its thread.
    #[cfg(feature = "cloudwatch")]
    pub(super) fn start_cloudwatch(&self, audit: &mut Audit) -> anyhow::Result<Option<CloudWatch>> {
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
}

/// The CloudWatch sink on a thread and runtime of its own: reading the spool, building
/// batches and waiting for CloudWatch never delay the audit drain (and so the kernel ring) or
/// the DNS proxy on the main runtime. The receiver says when it is done.
#[cfg(feature = "cloudwatch")]
pub(super) fn spawn_sink(
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
pub(super) const SINK_NICE: i32 = 10;

/// Sets the calling thread's nice value (Linux: nice is per thread). Failure only costs
/// priority, so it is logged, not fatal.
#[cfg(feature = "cloudwatch")]
pub(super) fn lower_this_threads_priority(nice: i32) {
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
