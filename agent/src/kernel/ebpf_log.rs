//! The eBPF programs' own log lines (aya-log; agent-ebpf's `klog` says when they speak),
//! forwarded to the agent's log at debug level under the target `egress_guard::ebpf`.
//! Records and counters stay the audit trail; these lines explain a rare path: a map write
//! that failed, headers that could not be read, a fail-closed default taken.
//!
//! Their ring (`AYA_LOGS`) is pinned with the other maps, so every copy of the programs,
//! those a previous agent attached included, writes to the one ring this agent reads.

use anyhow::Context as _;
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

/// The name aya-log gives its ring buffer in the eBPF object.
pub const RING: &str = "AYA_LOGS";

/// Reads the programs' log ring.
pub struct KernelLog(EbpfLogger<ToTracing>);

impl KernelLog {
    /// Takes the log ring of a loaded object (see `programs::load_object`).
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        EbpfLogger::init_with_logger(ebpf, ToTracing)
            .map(KernelLog)
            .context("opening the eBPF programs' log ring")
    }

    /// Forwards every line, as it arrives, until the runtime stops. Call inside the runtime.
    pub fn spawn(self) {
        let reader = tokio::spawn(self.forward());
        // The reader only ends by a panic (aya-log's on a malformed line): say so.
        tokio::spawn(async move {
            if let Err(e) = reader.await
                && e.is_panic()
            {
                tracing::warn!("the eBPF programs' log reader stopped: {e}");
            }
        });
    }

    async fn forward(self) {
        // Not a system call: tokio makes the caller vouch for the fd's lifetime.
        // SAFETY: the logger owns its ring's fd for as long as it lives, and the AsyncFd owns it.
        let mut ring = match unsafe { AsyncFd::register_with_interest(self.0, Interest::READABLE) }
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot wait on the eBPF programs' log ring: {e}");
                return;
            }
        };
        loop {
            let mut ready = match ring.readable_mut().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("waiting on the eBPF programs' log ring failed: {e}");
                    return;
                }
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}

/// aya-log speaks `log`; the agent logs with `tracing`.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        tracing::debug!(target: "egress_guard::ebpf", "eBPF: {}", record.args());
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_tracing_under_the_kernel_target() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt as _;

        #[derive(Clone, Default)]
        struct Seen(Arc<Mutex<Vec<(String, tracing::Level, String)>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                struct Message(String);
                impl tracing::field::Visit for Message {
                    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                        if f.name() == "message" {
                            self.0 = format!("{v:?}");
                        }
                    }
                }
                let mut m = Message(String::new());
                event.record(&mut m);
                let meta = event.metadata();
                self.0
                    .lock()
                    .unwrap()
                    .push((meta.target().to_string(), *meta.level(), m.0));
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            log::Log::log(
                &ToTracing,
                &log::Record::builder()
                    .args(format_args!("writing SOCK_SLOTS failed (error -7)"))
                    .level(log::Level::Debug)
                    .target("egress_guard::klog")
                    .build(),
            );
        });
        let got = seen.0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![(
                "egress_guard::ebpf".to_string(),
                tracing::Level::DEBUG,
                "eBPF: writing SOCK_SLOTS failed (error -7)".to_string()
            )]
        );
    }
}
