//! Records the programs write to the `EVENTS` ring buffer for the audit trail.
//!
//! Every record starts with an [`EventHeader`]; `kind` says which struct follows. A change
//! to a record's layout bumps [`EVENT_VERSION`] (and `LAYOUT_VERSION`, since the ring is pinned).

pub const EVENT_VERSION: u16 = 1;

/// Default size of the ring buffer (bytes, a power of two).
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;

/// Whether writing a record of `record_size` bytes into a ring of `ring_size` bytes holding
/// `avail` unread bytes should wake the agent. The agent drains the ring on a short timer
/// anyway; the kernel wakes it early when a batch is waiting (an eighth of the ring, at most
/// 64 KiB). Only the records overlapping a small window at that mark ask (records of other
/// CPUs may step over any exact point): every forced wake-up is an interrupt, and asking on
/// every record while the agent drains made a connect() decision twice as slow.
#[inline(always)]
pub fn ring_wakeup(avail: u64, record_size: u64, ring_size: u64) -> bool {
    const WINDOW: u64 = 2048;
    let batch = if ring_size / 8 < 65_536 {
        ring_size / 8
    } else {
        65_536
    };
    avail + record_size >= batch && avail < batch + WINDOW
}

/// `EventHeader::kind`.
pub mod kind {
    /// connect() decision: [`super::NetEvent`].
    pub const NET_CONNECT: u16 = 1;
    /// sendmsg() decision on an unconnected UDP socket: [`super::NetEvent`].
    pub const NET_SEND: u16 = 2;
    /// A packet the backstop refused: [`super::NetEvent`] (no process: packets can leave
    /// from interrupt context).
    pub const NET_PACKET: u16 = 3;
    /// A socket() refusal: [`super::NetEvent`] with the family, type and protocol.
    pub const NET_SOCKET: u16 = 4;
    /// A successful execve() in a guarded cgroup: [`super::ExecEvent`].
    pub const PROC_EXEC: u16 = 5;
    /// A guarded process ended (its last thread exited): [`super::ExitEvent`].
    pub const PROC_EXIT: u16 = 6;
}

/// Bytes of the executable path kept (NUL included).
pub const FILENAME_LEN: usize = 256;
/// Bytes of the NUL-separated argument list kept; longer lists are cut (and say so).
pub const ARGS_LEN: usize = 1024;

/// `NetEvent::reason`: why the decision went the way it did.
pub mod reason {
    /// A rule of the policy allows it.
    pub const RULE: u8 = 0;
    /// No entry of the policy covers the destination address.
    pub const NO_RULE_FOR_ADDRESS: u8 = 1;
    /// The address is listed, but not for this protocol and port.
    pub const PORT_OR_PROTOCOL: u8 = 2;
    /// The program's policy slot holds no active policy (fail closed).
    pub const NO_ACTIVE_POLICY: u8 = 3;
    /// An IP protocol no rule can allow (not TCP, UDP or ICMP).
    pub const PROTOCOL: u8 = 4;
    /// A socket family or type the hooks cannot judge.
    pub const SOCKET_TYPE: u8 = 5;
    /// A packet that could not be read (not IP, too short, a hand-made fragment).
    pub const UNREADABLE_PACKET: u8 = 6;
}

/// `NetEvent::verdict`.
pub const VERDICT_ALLOW: u8 = 0;
pub const VERDICT_DENY: u8 = 1;
/// Audit mode: would have been denied, was let through.
pub const VERDICT_WOULD_DENY: u8 = 2;

pub const COMM_LEN: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u16,
    pub version: u16,
    /// Policy slot whose program decided.
    pub slot: u32,
    /// CLOCK_BOOTTIME, ns.
    pub ts_ns: u64,
    /// Thread id and process id (tgid) of the caller; 0 where there is no process.
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub _pad: u32,
    /// The cgroup v2 id of the caller (or of the packet's socket).
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetEvent {
    pub hdr: EventHeader,
    /// Destination, network byte order; IPv4 in the first four bytes when `v4` is 1.
    pub addr: [u8; 16],
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1/58 ICMP), or 0.
    pub proto: u8,
    pub verdict: u8,
    pub v4: u8,
    /// See [`reason`].
    pub reason: u8,
    pub _pad: [u8; 2],
    /// NET_SOCKET only: socket(2) arguments.
    pub sock_family: u32,
    pub sock_type: u32,
    pub sock_protocol: u32,
    pub _pad2: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub hdr: EventHeader,
    /// The parent's process id (0 if it could not be read).
    pub ppid: u32,
    /// Bytes of `args` filled, and the full length of the argument list.
    pub args_len: u32,
    pub args_total: u32,
    /// Bytes of `filename` filled, NUL included.
    pub filename_len: u32,
    pub filename: [u8; FILENAME_LEN],
    /// argv, each argument NUL-terminated, as the process's memory holds it.
    pub args: [u8; ARGS_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvent {
    pub hdr: EventHeader,
    /// The kernel's `task_struct::exit_code`: `status << 8`, or the signal number.
    pub exit_code: u32,
    pub _pad: u32,
    /// Time since the process started, ns (0 if unknown).
    pub lifetime_ns: u64,
}

/// Allowed UDP sends are not written to the ring one by one: the programs count them per
/// flow in one of two pinned per-CPU tables (`SEND_FLOWS_0`, `SEND_FLOWS_1`);
/// `SEND_FLOW_SIDE[0]` says which. The agent flips the side every `udp_aggregate_seconds`,
/// lets the programs still counting into the old table finish, writes one `net.send` record
/// per entry and deletes it. The counts outlive the agent. A send that finds its table full
/// is written to the ring as before.
pub const MAX_SEND_FLOWS: u32 = 16_384;

/// A flow of allowed sends: who sent (cgroup, process, user, command) where.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SendFlowKey {
    pub cgroup_id: u64,
    /// Policy slot whose program decided.
    pub slot: u32,
    pub tgid: u32,
    pub uid: u32,
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub v4: u8,
    /// Network byte order; IPv4 in the first four bytes when `v4` is 1.
    pub addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
}

/// One CPU's count of a flow's sends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendFlowCount {
    pub count: u64,
    /// CLOCK_BOOTTIME of this CPU's first send of the flow, ns.
    pub first_ns: u64,
    /// Thread id of that send.
    pub tid: u32,
    pub _pad: u32,
}

/// Where the process-event programs find kernel fields (bytes), read from the kernel's BTF
/// by the agent and passed in as the load-time constant [`TASK_OFFSETS_GLOBAL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub task_exit_code: u32,
    pub task_start_boottime: u32,
    pub task_mm: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub task_signal: u32,
    pub task_group_leader: u32,
    pub signal_live: u32,
    pub signal_flags: u32,
    pub signal_group_exit_code: u32,
    /// `linux_binprm::filename`: the executable as execve resolved it.
    pub bprm_filename: u32,
    /// 1 when the offsets were found; the programs read no fields otherwise.
    pub valid: u32,
}

pub const TASK_OFFSETS_GLOBAL: &str = "TASK_OFFSETS";

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C) plain data with explicit padding.
    unsafe impl aya::Pod for EventHeader {}
    unsafe impl aya::Pod for NetEvent {}
    unsafe impl aya::Pod for ExecEvent {}
    unsafe impl aya::Pod for ExitEvent {}
    unsafe impl aya::Pod for TaskOffsets {}
    unsafe impl aya::Pod for SendFlowKey {}
    unsafe impl aya::Pod for SendFlowCount {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_wakes_the_agent_once_per_batch() {
        let ring = u64::from(DEFAULT_RING_BYTES);
        let batch = 65_536;
        let net = core::mem::size_of::<NetEvent>() as u64;
        let exec = core::mem::size_of::<ExecEvent>() as u64;
        assert!(
            !ring_wakeup(0, net, ring),
            "an empty ring: the timer will do"
        );
        assert!(!ring_wakeup(batch - net - 1, net, ring));
        assert!(
            ring_wakeup(batch - net, net, ring),
            "the record that reaches the mark"
        );
        assert!(
            ring_wakeup(batch + 1000, net, ring),
            "within the window after it"
        );
        assert!(
            !ring_wakeup(batch + 4096, net, ring),
            "past the window: no more"
        );
        assert!(
            !ring_wakeup(ring / 2, net, ring),
            "the agent is already awake"
        );
        assert!(
            ring_wakeup(batch - 10, exec, ring),
            "a large record stepping over it"
        );
        // Writing records one after another from empty asks only a few times per batch.
        let (mut avail, mut asked) = (0, 0);
        while avail < 4 * batch {
            if ring_wakeup(avail, net, ring) {
                asked += 1;
            }
            avail += net;
        }
        assert!((1..=2048 / net + 1).contains(&asked), "{asked}");
        // A small ring: a batch is an eighth of it.
        assert!(ring_wakeup(4096 - net, net, 32_768));
        assert!(!ring_wakeup(1000, net, 32_768));
    }

    #[test]
    fn event_layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<EventHeader>(), 56);
        assert_eq!(core::mem::size_of::<NetEvent>(), 56 + 16 + 8 + 16);
        assert_eq!(
            core::mem::size_of::<ExecEvent>(),
            56 + 16 + FILENAME_LEN + ARGS_LEN
        );
        assert_eq!(core::mem::size_of::<ExitEvent>(), 56 + 16);
        assert_eq!(core::mem::size_of::<TaskOffsets>(), 56);
        assert_eq!(core::mem::size_of::<SendFlowKey>(), 24 + 16 + COMM_LEN);
        assert_eq!(core::mem::size_of::<SendFlowCount>(), 24);
    }
}
