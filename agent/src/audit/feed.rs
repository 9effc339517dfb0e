//! The in-memory sink: the last records for `egress-guard events`, and a live feed for
//! `events --follow`. The audit task fills it; the control socket reads it.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering},
};

use serde_json::Value;
use tokio::sync::broadcast;

/// How many recent records the in-memory sink keeps for `events`.
pub const RECENT_EVENTS: usize = 10_000;

pub struct EventFeed {
    recent: Mutex<VecDeque<Arc<Value>>>,
    live: broadcast::Sender<Arc<Value>>,
    total: AtomicU64,
}

impl Default for EventFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl EventFeed {
    pub fn new() -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(1024)),
            live: broadcast::channel(4096).0,
            total: 0.into(),
        }
    }

    /// Adds a record; never waits for readers (a slow follower only misses records, and is
    /// told how many).
    pub fn push(&self, rec: Arc<Value>) {
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == RECENT_EVENTS {
                r.pop_front();
            }
            r.push_back(rec.clone());
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        let _ = self.live.send(rec);
    }

    /// The records kept, oldest first.
    pub fn recent(&self) -> Vec<Arc<Value>> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Records from now on, as they come.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Value>> {
        self.live.subscribe()
    }

    /// Records pushed since the agent started.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}
