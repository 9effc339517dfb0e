//! Harness for the privileged end-to-end tests: test cgroups, the real agent binary, and the
//! probe run inside guarded cgroups. Everything a test creates is removed by a guard's Drop,
//! also when the test fails; `sweep` removes what a killed earlier run left behind.
//!
//! Rules (see the project's notes): never attach to the cgroup2 root or the cgroup holding
//! this shell; traffic only to loopback.
//!
//! One module per concern; every item is re-exported here, so tests name it
//! `egress_guard_e2e::Name`: `cgroups` (test cgroups, clean-up), `agent` (the agent
//! process), `probes` (the probe binary), `net` (loopback listeners, free ports),
//! `dns_upstream` (dnsmasq), `moto` (moto_server and the fault proxy), `audit` (the
//! record schema), `bpf` (pinned maps), [`docker`] (a private dockerd), [`openhands`] (the real
//! OpenHands agent server under the guard: its image and the scripted-LLM scenario).

mod agent;
mod audit;
mod bpf;
mod cgroups;
mod dns_upstream;
pub mod docker;
mod moto;
mod net;
pub mod openhands;
mod probes;

pub use agent::{Agent, agent_bin};
pub use audit::Schema;
pub use bpf::pinned_map_len;
pub use cgroups::{
    PREFIX, TestCgroup, cgroup2_root, in_cgroup, remove_cgroup_tree, require_root, sweep, unique,
};
pub use dns_upstream::Dnsmasq;
pub use moto::{Fault, FaultProxy, Moto, SentBatch};
pub use net::{free_port_range, received, tcp_listener, udp_receiver};
pub use openhands::{Outcome, build_rootfs, run_scenario};
pub use probes::{ProbeResult, RunningProbe, probe_bin, probe_in, probe_outside};
