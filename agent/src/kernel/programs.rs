//! The embedded eBPF object, its hooks, and how each is loaded, attached and pinned.

use std::{fs::File, path::Path};

use agent_common::{
    POLICY_SLOT_GLOBAL,
    event::{TASK_OFFSETS_GLOBAL, TaskOffsets},
    map_names,
};
use anyhow::{Context as _, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, FEntry, Lsm,
        RawTracePoint, SockOps, TracePoint, links::FdLink,
    },
};

/// The programs, built by build.rs (aya-build) and embedded in the binary.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-guard"));

/// A build identity given at compile time (`EGRESS_GUARD_BUILD_ID`, e.g. a release pipeline's
/// commit); empty by default. It is part of the programs' identity: two builds with different
/// ids never adopt each other's links, so an upgrade between them replaces every program (the
/// real-host test upgrades to such a build).
pub const BUILD_ID: &str = match option_env!("EGRESS_GUARD_BUILD_ID") {
    Some(id) => id,
    None => "",
};

/// A short identity of the embedded programs (and the build id): link pins carry it, so a
/// restart with the same binary adopts its links and an upgrade attaches new ones before
/// detaching the old.
pub fn object_id() -> String {
    // FNV-1a: stable across builds and Rust versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT.iter().chain(BUILD_ID.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The per-cgroup hooks, in attach order. The packet backstop and the TCP tracker go first,
/// so the socket hooks never run without them; the DNS reply rewrite goes before the
/// redirects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    TcpState,
    Egress,
    SockCreate,
    Recvmsg4,
    Recvmsg6,
    Getpeername4,
    Getpeername6,
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
}

impl Hook {
    pub const ALL: [Hook; 11] = [
        Hook::TcpState,
        Hook::Egress,
        Hook::SockCreate,
        Hook::Recvmsg4,
        Hook::Recvmsg6,
        Hook::Getpeername4,
        Hook::Getpeername6,
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
    ];

    /// The program's function name in agent-ebpf, also used in pin names.
    pub fn program(self) -> &'static str {
        match self {
            Hook::TcpState => "tcp_state",
            Hook::Recvmsg4 => "recvmsg4",
            Hook::Recvmsg6 => "recvmsg6",
            Hook::Getpeername4 => "getpeername4",
            Hook::Getpeername6 => "getpeername6",
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
pub const SOCKET_FENTRY_PROGRAM: &str = "socket_fentry";
pub const SOCKET_TRACEPOINT_PROGRAM: &str = "socket_enter";

/// What every load of the object needs besides the policy slot.
#[derive(Clone, Copy)]
pub struct LoadParams {
    /// Size of the audit ring buffer (it must match a pinned ring's size).
    pub ring_bytes: u32,
    /// Kernel struct field offsets for the process-event programs.
    pub offsets: TaskOffsets,
}

/// Loads the object: maps come from (or go to) their pins in `maps_dir`; the cgroup
/// programs, once loaded, enforce policy `slot`.
pub fn load_object(maps_dir: &Path, slot: u32, params: &LoadParams) -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        // aya-log's ring is not declared pinned; pin it so every copy shares one.
        .map_pin_path(super::ebpf_log::RING, maps_dir.join(super::ebpf_log::RING))
        .map_max_entries(map_names::EVENTS, params.ring_bytes)
        .override_global(TASK_OFFSETS_GLOBAL, &params.offsets, true)
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
        Hook::Connect4
        | Hook::Connect6
        | Hook::Sendmsg4
        | Hook::Sendmsg6
        | Hook::Recvmsg4
        | Hook::Recvmsg6
        | Hook::Getpeername4
        | Hook::Getpeername6 => {
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
        Hook::TcpState => {
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

/// The process-event programs and their raw tracepoints.
pub const PROCESS_TRACEPOINTS: [(&str, &str); 2] = [
    ("proc_exec", "sched_process_exec"),
    ("proc_exit", "sched_process_exit"),
];

/// Loads and attaches one of [`PROCESS_TRACEPOINTS`]: raw tracepoints, which need no tracefs.
pub fn attach_process_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    event: &str,
) -> anyhow::Result<FdLink> {
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?;
    let p: &mut RawTracePoint = prog.try_into()?;
    p.load().with_context(|| format!("loading {program}"))?;
    let id = p.attach(event)?;
    Ok(p.take_link(id)?.into())
}

/// Kernel struct offsets for the process programs, from the kernel's BTF.
pub fn task_offsets() -> TaskOffsets {
    let find = || -> anyhow::Result<TaskOffsets> {
        let btf = super::btf::Btf::from_sys_fs()?;
        Ok(TaskOffsets {
            task_real_parent: btf.offset_of("task_struct", "real_parent")?,
            task_tgid: btf.offset_of("task_struct", "tgid")?,
            task_exit_code: btf.offset_of("task_struct", "exit_code")?,
            task_start_boottime: btf.offset_of("task_struct", "start_boottime")?,
            task_mm: btf.offset_of("task_struct", "mm")?,
            mm_arg_start: btf.offset_of("mm_struct", "arg_start")?,
            mm_arg_end: btf.offset_of("mm_struct", "arg_end")?,
            task_signal: btf.offset_of("task_struct", "signal")?,
            task_group_leader: btf.offset_of("task_struct", "group_leader")?,
            signal_live: btf.offset_of("signal_struct", "live")?,
            signal_flags: btf.offset_of("signal_struct", "flags")?,
            signal_group_exit_code: btf.offset_of("signal_struct", "group_exit_code")?,
            bprm_filename: btf.offset_of("linux_binprm", "filename")?,
            valid: 1,
        })
    };
    find().unwrap_or_else(|e| {
        tracing::warn!("process records will lack ppid, argv, exit code and lifetime: {e:#}");
        TaskOffsets::default()
    })
}

/// The kernel function every socket creation passes through (socket(), socketpair(), 32-bit
/// syscalls, io_uring); exported, so it is never inlined away.
const SOCKET_CREATE_FUNCTION: &str = "__sock_create";

/// Loads and attaches the `__sock_create` fentry fallback (kills guarded tasks that ask for
/// AF_PACKET sockets) for kernels without an active BPF LSM. Preferred to the
/// `sys_enter_socket` tracepoint: enabling any syscall tracepoint sends every system call of
/// every process on the host through the slow path, and attaching one (like a kprobe) takes
/// perf_event_open, which Debian's `kernel.perf_event_paranoid = 3` refuses without
/// CAP_SYS_ADMIN. Needs BPF trampolines (x86_64, arm64 from 6.0).
pub fn attach_socket_fentry(ebpf: &mut Ebpf) -> anyhow::Result<FdLink> {
    let btf = Btf::from_sys_fs().context("reading kernel BTF (/sys/kernel/btf/vmlinux)")?;
    let prog = ebpf
        .program_mut(SOCKET_FENTRY_PROGRAM)
        .ok_or_else(|| anyhow!("the eBPF object has no program {SOCKET_FENTRY_PROGRAM}"))?;
    let p: &mut FEntry = prog.try_into()?;
    p.load(SOCKET_CREATE_FUNCTION, &btf)
        .with_context(|| format!("loading the fentry program for {SOCKET_CREATE_FUNCTION}"))?;
    let id = p.attach()?;
    Ok(p.take_link(id)?.into())
}

/// Loads and attaches the `syscalls:sys_enter_socket` fallback (kills guarded tasks that ask
/// for AF_PACKET sockets) for kernels with neither an active BPF LSM nor BPF trampolines.
/// Needs perf_event_open (see [`attach_socket_fentry`]).
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
