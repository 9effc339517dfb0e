//! What the daemon and the CloudWatch sink tell the audit task: the agent's own happenings.
//! Few, so their channel is unbounded (the stop record must never be dropped).

use std::path::PathBuf;

use serde_json::Value;

pub enum Notice {
    /// An `agent.*` record to write: its type and fields.
    Agent(&'static str, Value),
    /// Policy names by slot and the guarded cgroups, after a (re)load.
    Policies(Vec<String>, Vec<PathBuf>),
}
