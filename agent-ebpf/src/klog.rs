//! The programs' own words, for the rare paths where an operator needs them: a map write that
//! failed, headers that could not be read, a fail-closed default taken. They go through
//! aya-log's ring (`AYA_LOGS`, pinned with the other maps); the agent logs them at debug level
//! under the target `egress_guard::ebpf` (`EGRESS_GUARD_LOG=egress_guard::ebpf=debug`).
//!
//! Each is a function that is never inlined and is called only on its rare branch: the
//! logging code stays out of the hot paths' instructions. Records and counters remain the
//! audit trail; these lines only explain.

use aya_log_ebpf::debug;

/// No context is needed by aya-log's macros; they take one for symmetry with other loggers.
const CTX: () = ();

/// A program ran for a policy slot that holds no active policy: it denied.
#[inline(never)]
pub fn fail_closed(slot: u32) {
    debug!(
        &CTX,
        "policy slot {} holds no active policy: denied (fail closed)", slot
    );
}

/// A write to a map failed; `what` says what the program could then not do.
#[inline(never)]
pub fn map_write_failed(map: &str, err: i32, what: &str) {
    debug!(&CTX, "writing {} failed (error {}): {}", map, err, what);
}

/// The packet backstop could not read a packet's headers: it judged the packet unreadable.
#[inline(never)]
pub fn packet_unreadable(ethertype: u16, len: u32, err: i64) {
    debug!(
        &CTX,
        "could not read the headers of a {}-byte packet (ethertype 0x{:x}, error {}): judged unreadable",
        len,
        ethertype,
        err
    );
}

/// A packet that is not IPv4 or IPv6, or a non-first fragment (only a raw socket builds one
/// where the cgroup hook runs): judged unreadable.
#[inline(never)]
pub fn packet_not_plain(ethertype: u16, len: u32) {
    debug!(
        &CTX,
        "a {}-byte packet (ethertype 0x{:x}) is not IP or is a non-first fragment: judged unreadable",
        len,
        ethertype
    );
}

/// The socket() tracepoint could not read the call's arguments: the call was not judged.
#[inline(never)]
pub fn syscall_args_unreadable(err: i32) {
    debug!(
        &CTX,
        "could not read socket()'s arguments (error {}): the call was not judged", err
    );
}

/// A task field could not be read at its offset (from the kernel's BTF): the record has 0.
#[inline(never)]
pub fn task_field_unreadable(offset: u32, err: i32) {
    debug!(
        &CTX,
        "could not read a task field at offset {} (error {}): recorded as 0", offset, err
    );
}
