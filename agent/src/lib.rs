//! egress-guard: kernel-enforced egress allowlists for the containers of an OpenHands host.
//!
//! Where things are: config parsing in `config/` (one file per table, `validate`'s steps in
//! `mod.rs`), rule compilation in `policy.rs`, kernel maps and attachments in `kernel/`, the
//! DNS proxy and learned addresses in `dns/`, the audit trail in `audit/`, CloudWatch in
//! `cloudwatch/`, the control socket in `control/`, container discovery (policy selectors) in
//! `containers.rs`, the start-up steps and the main loop in `daemon/`; the per-packet decision itself is in
//! `agent-ebpf/src/decide.rs`. Modules use only the layers below them (README, Layout;
//! `xtask/src/layers.rs` checks it).
//!
//! A library so the fuzz targets (`agent/fuzz`) reach the request handling; the binary is
//! `main.rs`.

pub mod audit;
pub mod check;
pub mod cloudwatch;
pub mod config;
pub mod containers;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod jsonl;
pub mod kernel;
pub mod notice;
pub mod policy;
pub mod random;
