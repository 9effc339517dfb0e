//! Allowed UDP sends, counted per flow in the kernel instead of written to the ring one by
//! one: a record per datagram cost a 64-byte `sendto()` ~130 ns more than counting it does
//! (69 % vs 79 % of bare, docs/benchmarks.md), and an in-memory count in the agent died with
//! it. The agent turns each flow into one `net.send` record per interval
//! (agent/src/audit/send_flows.rs).

use agent_common::event::{SendFlowCount, SendFlowKey};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
};

use crate::{
    decide::Dest,
    maps::{SEND_FLOW_SIDE, SEND_FLOWS_0, SEND_FLOWS_1},
};

const BPF_NOEXIST: u64 = 1;

/// Counts one allowed send of the current task. False if it could not be counted (the table
/// is full): the caller writes the send to the ring instead. Not inlined: its key and value
/// on the sendmsg programs' own stack took them past the 512 bytes that Linux 6.1's verifier
/// allows for a program and the subprograms it calls.
#[inline(never)]
// By reference: a key passed by value is a fresh 56-byte copy on the stack per call.
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn count(slot: u32, dest: &Dest, proto: u32, port: u16) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let key = SendFlowKey {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        slot,
        tgid: (pid_tgid >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        port,
        proto: proto as u8,
        v4: dest.v4 as u8,
        addr: dest.addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    let table = match SEND_FLOW_SIDE.get(0) {
        Some(1) => &SEND_FLOWS_1,
        _ => &SEND_FLOWS_0,
    };
    // Twice at most: another CPU may create the entry between the lookup and the insert.
    for _ in 0..2 {
        if let Some(c) = table.get_ptr_mut(&key) {
            // This CPU's own slot. Not atomic (the bpf target's core has no atomic add): a
            // task preempted here by another sending on the same CPU can lose one count.
            let c = unsafe { &mut *c };
            if c.count == 0 {
                c.first_ns = unsafe { bpf_ktime_get_boot_ns() };
                c.tid = pid_tgid as u32;
            }
            c.count += 1;
            return true;
        }
        let first = SendFlowCount {
            count: 1,
            first_ns: unsafe { bpf_ktime_get_boot_ns() },
            tid: pid_tgid as u32,
            _pad: 0,
        };
        if table.insert(&key, &first, BPF_NOEXIST).is_ok() {
            return true;
        }
    }
    false
}
