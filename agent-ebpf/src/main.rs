//! egress-guard's eBPF programs. Each hook is a thin entry point: it extracts the destination
//! and asks `decide::decide`, the one decision function. Maps are in `maps.rs`.
//!
//! The cgroup programs are loaded once per policy slot (the `POLICY_SLOT` constant is set at
//! load time) and attached to that policy's cgroups; the kernel runs them for the whole subtree.
#![no_std]
#![no_main]

mod decide;
mod maps;

use agent_common::{Counter, MAX_CGROUP_DEPTH};
use aya_ebpf::{
    Global,
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie, bpf_send_signal, bpf_sk_fullsock,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm, sock_ops, tracepoint},
    programs::{
        LsmContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext, TracePointContext,
    },
};
use decide::{Dest, Verdict, count, count_verdict, decide};
use maps::{GUARDED_CGROUPS, INBOUND_SOCKETS};

/// The policy slot this copy of the programs enforces. The default (no slot) denies.
#[unsafe(no_mangle)]
static POLICY_SLOT: Global<u32> = Global::new(u32::MAX);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_PACKET: i32 = 17;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: i32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u32 = 58;
const TCP_LISTEN: u32 = 10;
const TCP_CLOSE: u32 = 7;
const EPERM: i32 = 1;

/// sock_addr and sock hooks: 1 lets the syscall proceed, 0 fails it with EPERM.
const SYSCALL_OK: i32 = 1;
const SYSCALL_EPERM: i32 = 0;

// ---------------------------------------------------------------------------------------
// connect() and sendmsg(): the destination the process asked for.
// ---------------------------------------------------------------------------------------

const CONNECT_COUNTERS: [Counter; 3] = [
    Counter::ConnectAllowed,
    Counter::ConnectDenied,
    Counter::ConnectWouldDeny,
];
const SEND_COUNTERS: [Counter; 3] = [
    Counter::SendAllowed,
    Counter::SendDenied,
    Counter::SendWouldDeny,
];

#[inline(always)]
fn sock_addr_dest(ctx: &SockAddrContext, v6: bool) -> (Dest, u8, u16) {
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let proto = sa.protocol as u8;
    let dest = if v6 {
        let w = sa.user_ip6;
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&w[0].to_ne_bytes());
        a[4..8].copy_from_slice(&w[1].to_ne_bytes());
        a[8..12].copy_from_slice(&w[2].to_ne_bytes());
        a[12..16].copy_from_slice(&w[3].to_ne_bytes());
        Dest::from_v6(a)
    } else {
        Dest::v4(sa.user_ip4.to_ne_bytes())
    };
    (dest, proto, port)
}

#[inline(always)]
fn judge_sock_addr(ctx: &SockAddrContext, v6: bool, counters: [Counter; 3]) -> i32 {
    let slot = POLICY_SLOT.load();
    let (dest, proto, port) = sock_addr_dest(ctx, v6);
    let v = decide(slot, &dest, proto, port);
    count_verdict(slot, &v, counters);
    if v.passes() {
        SYSCALL_OK
    } else {
        SYSCALL_EPERM
    }
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, false, CONNECT_COUNTERS)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, true, CONNECT_COUNTERS)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, false, SEND_COUNTERS)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, true, SEND_COUNTERS)
}

// ---------------------------------------------------------------------------------------
// socket(): only TCP, UDP and ICMP echo (ping) sockets; no raw sockets.
// ---------------------------------------------------------------------------------------

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    let slot = POLICY_SLOT.load();
    let sk = unsafe { &*ctx.sock };
    let ok = match (sk.type_, sk.protocol as u8) {
        (SOCK_STREAM, IPPROTO_TCP) => true,
        (SOCK_DGRAM, IPPROTO_UDP) => true,
        // Unprivileged ICMP echo sockets; their packets still meet the packet backstop.
        (SOCK_DGRAM, p) => p as u32 == IPPROTO_ICMP || p as u32 == IPPROTO_ICMPV6,
        // Raw sockets, SCTP, MPTCP and anything else the hooks cannot judge.
        _ => false,
    };
    if ok {
        return SYSCALL_OK;
    }
    match decide::verdict(decide::state(slot), false) {
        Verdict::WouldDeny => {
            count(slot, Counter::SocketWouldDeny);
            SYSCALL_OK
        }
        _ => {
            count(slot, Counter::SocketDenied);
            SYSCALL_EPERM
        }
    }
}

/// BPF LSM `socket_create`: AF_PACKET (and raw INET) sockets of guarded tasks. Cgroup
/// `sock_create` never sees AF_PACKET, so this is the only guard for it. LSM programs are
/// global: find the task's guarded ancestor cgroup first.
#[lsm(hook = "socket_create")]
pub fn lsm_socket_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let kern: i32 = ctx.arg(3);
    let raw =
        sock_type & 0xf == SOCK_RAW && (family == AF_INET as i32 || family == AF_INET6 as i32);
    if kern != 0 || !(family == AF_PACKET || raw) {
        return 0;
    }
    let Some(slot) = guarded_slot_of_current_task() else {
        return 0;
    };
    match decide::verdict(decide::state(slot), false) {
        Verdict::WouldDeny => {
            count(slot, Counter::SocketWouldDeny);
            0
        }
        _ => {
            count(slot, Counter::SocketDenied);
            -EPERM
        }
    }
}

/// Fallback where the BPF LSM is not active (most distributions leave it out of `lsm=`):
/// the `syscalls:sys_enter_socket` tracepoint cannot fail the call, so a guarded task asking
/// for an AF_PACKET socket is killed with SIGKILL before it can use it.
#[tracepoint]
pub fn socket_enter(ctx: TracePointContext) -> u32 {
    // struct trace_event_raw_sys_enter: 8 bytes common header, syscall nr, then args[6].
    const ARG0: usize = 16;
    let family: u64 = match unsafe { ctx.read_at(ARG0) } {
        Ok(f) => f,
        Err(_) => return 0,
    };
    if family != AF_PACKET as u64 {
        return 0;
    }
    let Some(slot) = guarded_slot_of_current_task() else {
        return 0;
    };
    match decide::verdict(decide::state(slot), false) {
        Verdict::WouldDeny => count(slot, Counter::SocketWouldDeny),
        _ => {
            count(slot, Counter::SocketDenied);
            const SIGKILL: u32 = 9;
            unsafe { bpf_send_signal(SIGKILL) };
        }
    }
    0
}

#[inline(always)]
fn guarded_slot_of_current_task() -> Option<u32> {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH as i32 {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return None;
        }
        if let Some(slot) = unsafe { GUARDED_CGROUPS.get(id) } {
            return Some(*slot);
        }
        level += 1;
    }
    None
}

// ---------------------------------------------------------------------------------------
// Packets: the backstop for anything the socket hooks did not see (ICMP, sockets opened
// before the guard was attached, ...).
// ---------------------------------------------------------------------------------------

const PACKET_PASS: i32 = 1;
const PACKET_DROP: i32 = 0;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// What the packet backstop reads from a packet.
enum Packet {
    /// Destination, IP protocol, destination port (0 without one).
    To(Dest, u8, u16),
    /// A non-first fragment: it has no transport header, and without raw or packet sockets
    /// only the kernel fragmenting an already judged datagram can produce one.
    LaterFragment,
    /// Not IPv4/IPv6, or too short to read.
    Unreadable,
}

#[inline(always)]
fn read_packet(ctx: &SkBuffContext) -> Packet {
    match read_packet_inner(ctx) {
        Ok(p) => p,
        Err(_) => Packet::Unreadable,
    }
}

#[inline(always)]
fn read_packet_inner(ctx: &SkBuffContext) -> Result<Packet, i64> {
    let skb = &ctx.skb;
    let l3 = u16::from_be(unsafe { (*skb.skb).protocol } as u16);
    let (dest, proto, l4) = if l3 == ETH_P_IP {
        let b0: u8 = skb.load(0)?;
        let frag: u16 = u16::from_be(skb.load(6)?);
        if frag & 0x1fff != 0 {
            return Ok(Packet::LaterFragment);
        }
        let proto: u8 = skb.load(9)?;
        let dst: [u8; 4] = skb.load(16)?;
        (Dest::v4(dst), proto, ((b0 & 0x0f) as usize) * 4)
    } else if l3 == ETH_P_IPV6 {
        let dst: [u8; 16] = skb.load(24)?;
        let mut next: u8 = skb.load(6)?;
        let mut off = 40usize;
        // Walk a bounded number of extension headers.
        let mut i = 0;
        while i < 4 {
            match next {
                0 | 43 | 60 => {
                    let hdr: [u8; 2] = skb.load(off)?;
                    next = hdr[0];
                    off += (hdr[1] as usize + 1) * 8;
                }
                44 => {
                    let hdr: [u8; 4] = skb.load(off)?;
                    if u16::from_be_bytes([hdr[2], hdr[3]]) >> 3 != 0 {
                        return Ok(Packet::LaterFragment);
                    }
                    next = hdr[0];
                    off += 8;
                }
                _ => break,
            }
            i += 1;
        }
        (Dest::from_v6(dst), next, off)
    } else {
        return Ok(Packet::Unreadable);
    };
    let port = if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        u16::from_be(skb.load(l4 + 2)?)
    } else {
        0
    };
    Ok(Packet::To(dest, proto, port))
}

#[cgroup_skb]
pub fn egress(ctx: SkBuffContext) -> i32 {
    let slot = POLICY_SLOT.load();
    let (dest, proto, port) = match read_packet(&ctx) {
        Packet::To(d, p, port) => (d, p, port),
        Packet::LaterFragment => return PACKET_PASS,
        Packet::Unreadable => return packet_denied(slot),
    };
    let v = decide(slot, &dest, proto, port);
    if let Verdict::Allow = v {
        count(slot, Counter::PacketAllowed);
        return PACKET_PASS;
    }
    if proto == IPPROTO_TCP && is_inbound_reply(&ctx) {
        count(slot, Counter::PacketInboundReply);
        return PACKET_PASS;
    }
    packet_verdict(slot, &v)
}

/// A packet no rule can allow (not IP, or unreadable).
#[inline(always)]
fn packet_denied(slot: u32) -> i32 {
    packet_verdict(slot, &decide::verdict(decide::state(slot), false))
}

#[inline(always)]
fn packet_verdict(slot: u32, v: &Verdict) -> i32 {
    count_verdict(
        slot,
        v,
        [
            Counter::PacketAllowed,
            Counter::PacketDenied,
            Counter::PacketWouldDeny,
        ],
    );
    if v.passes() { PACKET_PASS } else { PACKET_DROP }
}

/// A TCP packet that answers a connection that came *in*: a SYN-ACK (sent on behalf of a
/// listening socket) or anything on a socket the `inbound` sock_ops program saw accepted.
#[inline(always)]
fn is_inbound_reply(ctx: &SkBuffContext) -> bool {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    if !full.is_null() && unsafe { (*full).state } == TCP_LISTEN {
        return true;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    unsafe { INBOUND_SOCKETS.get(cookie) }.is_some()
}

/// Marks accepted TCP sockets (passive open) and forgets them when they close.
#[sock_ops]
pub fn inbound(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            let _ = INBOUND_SOCKETS.insert(cookie, 1, 0);
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            let _ = INBOUND_SOCKETS.remove(cookie);
        }
        _ => {}
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic; this is never called.
    loop {}
}

/// BPF LSM programs and some helpers require a GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
