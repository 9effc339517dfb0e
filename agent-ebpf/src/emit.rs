//! Audit records: written to the `EVENTS` ring buffer; when it is full, `LOST_EVENTS` counts
//! what could not be written, so the agent can say how many records are missing.

use agent_common::event::{
    EVENT_VERSION, EventHeader, NetEvent, VERDICT_ALLOW, VERDICT_DENY, VERDICT_WOULD_DENY,
    ring_wakeup,
};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
};

use crate::{
    decide::{Dest, Verdict},
    maps::{EVENTS, LOST_EVENTS},
};

/// Who the record is about.
pub enum Origin {
    /// The calling task (syscall hooks).
    Task,
    /// A packet: no reliable task (it may leave from interrupt context); the socket's cgroup.
    Cgroup(u64),
}

#[inline(always)]
fn verdict_byte(v: &Verdict) -> u8 {
    match v {
        Verdict::Allow => VERDICT_ALLOW,
        Verdict::Deny => VERDICT_DENY,
        Verdict::WouldDeny => VERDICT_WOULD_DENY,
    }
}

#[inline(always)]
pub fn header(kind: u16, slot: u32, origin: &Origin) -> EventHeader {
    let mut h = EventHeader {
        kind,
        version: EVENT_VERSION,
        slot,
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        ..EventHeader::default()
    };
    match origin {
        Origin::Task => {
            let pid_tgid = bpf_get_current_pid_tgid();
            h.pid = pid_tgid as u32;
            h.tgid = (pid_tgid >> 32) as u32;
            h.uid = bpf_get_current_uid_gid() as u32;
            h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
            if let Ok(comm) = bpf_get_current_comm() {
                h.comm = comm;
            }
        }
        Origin::Cgroup(id) => h.cgroup_id = *id,
    }
    h
}

/// A network decision (`kind::NET_*`). `sock` holds socket(2)'s family, type and protocol for
/// socket refusals, zeros otherwise.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn net(
    kind: u16,
    slot: u32,
    v: &Verdict,
    reason: u8,
    origin: Origin,
    dest: &Dest,
    proto: u32,
    port: u16,
    sock: [u32; 3],
) {
    let event = NetEvent {
        hdr: header(kind, slot, &origin),
        addr: dest.addr,
        port,
        proto: proto as u8,
        verdict: verdict_byte(v),
        v4: dest.v4 as u8,
        reason,
        _pad: [0; 2],
        sock_family: sock[0],
        sock_type: sock[1],
        sock_protocol: sock[2],
        _pad2: 0,
    };
    let flags = wakeup_flags(core::mem::size_of::<NetEvent>() as u64);
    if EVENTS.output::<NetEvent>(&event, flags).is_err() {
        lost();
    }
}

/// The ring's wake-up flag for a record of `record_size` bytes about to be written: forced
/// only when `agent_common::event::ring_wakeup` says a batch is waiting, else none.
#[inline(always)]
pub fn wakeup_flags(record_size: u64) -> u64 {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_RING_SIZE: u64 = 1;
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA);
    let ring = EVENTS.query(BPF_RB_RING_SIZE);
    if ring_wakeup(avail, record_size, ring) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
pub fn lost() {
    if let Some(n) = LOST_EVENTS.get_ptr_mut(0) {
        // Per-CPU slot. Not atomic: the bpf target's core has no atomic add, and a packet
        // program in softirq interrupting a syscall program on the same CPU mid-increment
        // (rare) can lose one count.
        unsafe { *n += 1 };
    }
}
