//! The embedded eBPF object, its hooks, and how each is loaded, attached and pinned.

use std::{fs::File, path::Path};

use agent_common::{POLICY_SLOT_GLOBAL, map_names};
use anyhow::{Context as _, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Lsm, SockOps,
        TracePoint, links::FdLink,
    },
};

/// The programs, built by build.rs (aya-build) and embedded in the binary.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-guard"));

/// A short identity of the embedded programs: link pins carry it, so a restart with the same
/// binary adopts its links and an upgrade attaches new ones before detaching the old.
pub fn object_id() -> String {
    // FNV-1a: stable across builds and Rust versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The per-cgroup hooks, in attach order. The packet backstop and the inbound marker go first,
/// so the socket hooks never run without them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Inbound,
    Egress,
    SockCreate,
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
}

impl Hook {
    pub const ALL: [Hook; 7] = [
        Hook::Inbound,
        Hook::Egress,
        Hook::SockCreate,
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
    ];

    /// The program's function name in agent-ebpf, also used in pin names.
    pub fn program(self) -> &'static str {
        match self {
            Hook::Inbound => "inbound",
            Hook::Egress => "egress",
            Hook::SockCreate => "sock_create",
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Sendmsg6 => "sendmsg6",
        }
    }
}

pub const LSM_PROGRAM: &str = "lsm_socket_create";
pub const SOCKET_TRACEPOINT_PROGRAM: &str = "socket_enter";

/// Loads the object: maps come from (or go to) their pins in `maps_dir`; the cgroup
/// programs, once loaded, enforce policy `slot`. `ring_bytes` sizes the audit ring buffer
/// (it must match a pinned ring's size).
pub fn load_object(maps_dir: &Path, slot: u32, ring_bytes: u32) -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .map_max_entries(map_names::EVENTS, ring_bytes)
        .override_global(POLICY_SLOT_GLOBAL, &slot, true)
        .load(OBJECT)
        .context("loading the eBPF object")
}

/// Loads (if needed) and attaches `hook` of `ebpf` to `cgroup`; returns the link to pin.
pub fn attach(ebpf: &mut Ebpf, hook: Hook, cgroup: &File) -> anyhow::Result<FdLink> {
    let name = hook.program();
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
    let mode = CgroupAttachMode::Single;
    let link: FdLink = match hook {
        Hook::Connect4 | Hook::Connect6 | Hook::Sendmsg4 | Hook::Sendmsg6 => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            if p.fd().is_err() {
                p.load().with_context(|| format!("loading {name}"))?;
            }
            let id = p.attach(cgroup, mode)?;
            p.take_link(id)?.try_into()?
        }
        Hook::SockCreate => {
            let p: &mut CgroupSock = prog.try_into()?;
            if p.fd().is_err() {
                p.load().with_context(|| format!("loading {name}"))?;
            }
            let id = p.attach(cgroup, mode)?;
            p.take_link(id)?.try_into()?
        }
        Hook::Egress => {
            let p: &mut CgroupSkb = prog.try_into()?;
            if p.fd().is_err() {
                p.load().with_context(|| format!("loading {name}"))?;
            }
            let id = p.attach(cgroup, CgroupSkbAttachType::Egress, mode)?;
            p.take_link(id)?.try_into()?
        }
        Hook::Inbound => {
            let p: &mut SockOps = prog.try_into()?;
            if p.fd().is_err() {
                p.load().with_context(|| format!("loading {name}"))?;
            }
            let id = p.attach(cgroup, mode)?;
            p.take_link(id)?.try_into()?
        }
    };
    Ok(link)
}

/// Loads and attaches the BPF LSM `socket_create` program (global; it finds guarded tasks
/// through GUARDED_CGROUPS).
pub fn attach_lsm(ebpf: &mut Ebpf) -> anyhow::Result<FdLink> {
    let btf = Btf::from_sys_fs().context("reading kernel BTF (/sys/kernel/btf/vmlinux)")?;
    let prog = ebpf
        .program_mut(LSM_PROGRAM)
        .ok_or_else(|| anyhow!("the eBPF object has no program {LSM_PROGRAM}"))?;
    let p: &mut Lsm = prog.try_into()?;
    p.load("socket_create", &btf)
        .context("loading the LSM socket_create program")?;
    let id = p.attach()?;
    Ok(p.take_link(id)?.into())
}

/// Loads and attaches the `syscalls:sys_enter_socket` fallback (kills guarded tasks that ask
/// for AF_PACKET sockets) for kernels without an active BPF LSM.
pub fn attach_socket_tracepoint(ebpf: &mut Ebpf) -> anyhow::Result<FdLink> {
    super::mounts::ensure_tracefs()?;
    let prog = ebpf
        .program_mut(SOCKET_TRACEPOINT_PROGRAM)
        .ok_or_else(|| anyhow!("the eBPF object has no program {SOCKET_TRACEPOINT_PROGRAM}"))?;
    let p: &mut TracePoint = prog.try_into()?;
    p.load().context("loading the sys_enter_socket program")?;
    let id = p.attach("syscalls", "sys_enter_socket")?;
    Ok(p.take_link(id)?.try_into()?)
}
