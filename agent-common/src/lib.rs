//! Types shared by the eBPF programs (`agent-ebpf`) and the agent (`egress-guard`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel half reads and writes it in maps,
//! the user half (feature `user`) gets `aya::Pod` impls to do the same from the agent.
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod event;
pub mod policy;

pub use policy::*;
