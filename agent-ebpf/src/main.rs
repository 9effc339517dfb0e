//! egress-guard's eBPF programs. Each hook is a thin entry point: it extracts the destination
//! and asks `decide::decide`, the one decision function. Maps are in `maps.rs`.
//!
//! The cgroup programs are loaded once per policy slot (the `POLICY_SLOT` constant is set at
//! load time) and attached to that policy's cgroups; the kernel runs them for the whole subtree.
#![no_std]
#![no_main]

mod decide;
mod emit;
mod klog;
mod maps;
mod process;
mod send_flows;

use agent_common::event::{kind, reason};
use agent_common::{
    Counter, DNS_PORT, DnsClientKey, DnsProxy, MAX_CGROUP_DEPTH, OpenConn, OrigDest,
};
use aya_ebpf::{
    Global,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_send_signal, bpf_sk_fullsock,
        generated::{bpf_sk_storage_get, bpf_skb_cgroup_id},
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, fentry, lsm, sock_ops, tracepoint},
    programs::{
        FEntryContext, LsmContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext,
        TracePointContext,
    },
};
use decide::{Dest, Verdict, count, count_verdict, decide};
use emit::Origin;
use maps::{
    CONTAINER_SLOTS, DNS_CLIENTS, DNS_REDIRECTED, GUARDED_CGROUPS, INBOUND_SOCKETS, OPEN_CONNS,
    SOCK_SLOTS,
};

/// The policy slot this copy of the programs enforces. The default (no slot) denies.
#[unsafe(no_mangle)]
static POLICY_SLOT: Global<u32> = Global::new(u32::MAX);

/// The slot deciding for cgroup `cgroup()`: a discovered container's own policy (its
/// selectors matched), else the policy of the guarded cgroup these programs are attached to.
/// Every hook asks: where no policy has selectors, the lookup is skipped.
#[inline(always)]
fn slot_of(cgroup: impl FnOnce() -> u64) -> u32 {
    let own = POLICY_SLOT.load();
    if !decide::selects_containers(own) {
        return own;
    }
    match unsafe { CONTAINER_SLOTS.get(cgroup()) } {
        Some(s) => *s,
        None => own,
    }
}

/// The slot deciding for the current task (syscall hooks).
#[inline(always)]
fn task_slot() -> u32 {
    slot_of(|| unsafe { bpf_get_current_cgroup_id() })
}

const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: i32 = 3;
const SOCK_PACKET: i32 = 10;
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
// connect() and sendmsg(): the destination the process asked for. DNS is redirected to the
// agent's proxy; recvmsg() makes its replies look as if they came from the server asked.
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
fn sock_addr_dest(ctx: &SockAddrContext, v6: bool) -> (Dest, u32, u16) {
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let proto = sa.protocol;
    let dest = if v6 {
        let w = user_ip6(ctx);
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
fn judge_sock_addr(ctx: &SockAddrContext, v6: bool, kind: u16, counters: [Counter; 3]) -> i32 {
    let slot = task_slot();
    let (dest, proto, port) = sock_addr_dest(ctx, v6);
    // DNS, to whatever server the process names, goes to the agent's proxy, which decides.
    if port == DNS_PORT
        && (proto == IPPROTO_TCP as u32 || proto == IPPROTO_UDP as u32)
        && decide::state(slot).is_some()
        && let Some(p) = decide::dns_proxy(slot)
    {
        redirect_dns(ctx, v6, &dest, p, slot);
        count(slot, Counter::DnsRedirected);
        return SYSCALL_OK;
    }
    let d = decide(slot, &dest, proto, port);
    let (v, why) = (d.verdict, d.reason);
    count_verdict(slot, &v, counters);
    if d.learned && v.passes() && proto == IPPROTO_TCP as u32 {
        // A connection to a learned address holds it: have the TCP tracker follow this one
        // (and only such ones: tracking costs every connect), under the policy deciding it,
        // which it cannot tell itself (it does not see the task).
        let mut value = slot;
        // SAFETY: the helper checks the context's socket itself.
        let stored = unsafe { SOCK_SLOTS.get_or_insert_ptr_mut(ctx, Some(&mut value)) };
        if stored.is_null() {
            klog::map_write_failed(
                "SOCK_SLOTS",
                0,
                "this connection to a learned address is not followed; the address may expire while it is open",
            );
        } else {
            // An earlier connect() of the same socket may have stored another slot.
            unsafe { *stored = slot };
        }
    }
    // Allowed sends are counted per flow, not recorded one by one.
    if kind == kind::NET_SEND
        && matches!(v, Verdict::Allow)
        && send_flows::count(slot, &dest, proto, port)
    {
        return SYSCALL_OK;
    }
    emit::net(
        kind,
        slot,
        &v,
        why,
        Origin::Task,
        &dest,
        proto,
        port,
        [0; 3],
    );
    if v.passes() {
        SYSCALL_OK
    } else {
        SYSCALL_EPERM
    }
}

/// The IPv4-mapped IPv6 form of an IPv4 address, as the four words of `user_ip6`.
#[inline(always)]
fn mapped_words(a: [u8; 4]) -> [u32; 4] {
    [
        0,
        0,
        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        u32::from_ne_bytes(a),
    ]
}

/// `user_ip6`, one 32-bit load per word (the context refuses wider reads).
#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let sa = ctx.sock_addr;
    unsafe {
        [
            core::ptr::read_volatile(&(*sa).user_ip6[0]),
            core::ptr::read_volatile(&(*sa).user_ip6[1]),
            core::ptr::read_volatile(&(*sa).user_ip6[2]),
            core::ptr::read_volatile(&(*sa).user_ip6[3]),
        ]
    }
}

#[inline(always)]
fn set_user_ip6(ctx: &SockAddrContext, w: [u32; 4]) {
    // One 32-bit store per word: the context only takes narrow writes here.
    let sa = ctx.sock_addr;
    unsafe {
        core::ptr::write_volatile(&mut (*sa).user_ip6[0], w[0]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[1], w[1]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[2], w[2]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[3], w[3]);
    }
}

/// Sends this socket's DNS to the proxy, remembering where it was going.
#[inline(always)]
fn redirect_dns(ctx: &SockAddrContext, v6: bool, dest: &Dest, p: &DnsProxy, slot: u32) {
    let orig = OrigDest {
        addr: dest.addr,
        port: DNS_PORT,
        v4: dest.v4 as u8,
        _pad: [0; 5],
        task: emit::header(0, slot, &Origin::Task),
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Err(e) = DNS_REDIRECTED.insert(cookie, orig, 0) {
        klog::map_write_failed(
            "DNS_REDIRECTED",
            e,
            "replies to this redirected DNS socket show the proxy's address",
        );
    }
    if v6 {
        // A dual-stack socket reaches the IPv4 proxy at its mapped address.
        set_user_ip6(ctx, mapped_words(p.addr));
    } else {
        unsafe { (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(p.addr) };
    }
    unsafe { (*ctx.sock_addr).user_port = u32::from(p.port.to_be()) };
}

/// recvmsg() on a redirected UDP socket (and getpeername() on a redirected one): the proxy
/// is shown as the server the process asked (resolvers check where replies come from).
#[inline(always)]
fn restore_dns_source(ctx: &SockAddrContext, v6: bool) {
    let slot = task_slot();
    let Some(p) = decide::dns_proxy(slot) else {
        return;
    };
    let sa = unsafe { &*ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != p.port {
        return;
    }
    let from_proxy = if v6 {
        user_ip6(ctx) == mapped_words(p.addr)
    } else {
        sa.user_ip4 == u32::from_ne_bytes(p.addr)
    };
    if !from_proxy {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let Some(orig) = (unsafe { DNS_REDIRECTED.get(cookie) }) else {
        return;
    };
    let a = orig.addr;
    if v6 {
        let w = if orig.v4 != 0 {
            mapped_words([a[0], a[1], a[2], a[3]])
        } else {
            [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ]
        };
        set_user_ip6(ctx, w);
    } else if orig.v4 != 0 {
        unsafe { (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]) };
    }
    unsafe { (*ctx.sock_addr).user_port = u32::from(orig.port.to_be()) };
}

/// recvmsg hooks must let the call proceed (1).
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, true);
    1
}

/// getpeername() on a redirected TCP socket: the server the process asked, not the proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, true);
    1
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, false, kind::NET_CONNECT, CONNECT_COUNTERS)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, true, kind::NET_CONNECT, CONNECT_COUNTERS)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, false, kind::NET_SEND, SEND_COUNTERS)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, true, kind::NET_SEND, SEND_COUNTERS)
}

// ---------------------------------------------------------------------------------------
// socket(): only TCP, UDP and ICMP echo (ping) sockets; no raw sockets.
// ---------------------------------------------------------------------------------------

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    let slot = task_slot();
    let sk = unsafe { &*ctx.sock };
    // The full protocol number: MPTCP (262) truncated to u8 would read as TCP.
    let ok = match (sk.type_, sk.protocol) {
        (SOCK_STREAM, p) => p == IPPROTO_TCP as u32,
        (SOCK_DGRAM, p) => {
            // UDP, and unprivileged ICMP echo sockets (their packets meet the backstop).
            p == IPPROTO_UDP as u32 || p == IPPROTO_ICMP || p == IPPROTO_ICMPV6
        }
        // Raw sockets, SCTP, MPTCP and anything else the hooks cannot judge.
        _ => false,
    };
    if ok || refuse_socket(slot, [sk.family, sk.type_, sk.protocol]).passes() {
        SYSCALL_OK
    } else {
        SYSCALL_EPERM
    }
}

/// Socket families a guarded task may create: INET and INET6 (judged by the cgroup hooks) and
/// the host-local UNIX and NETLINK. Everything else (AF_PACKET, AF_XDP, AF_VSOCK, RDS, TIPC,
/// ...) can reach the network past the cgroup hooks. `SOCK_PACKET` on an INET socket is
/// the old spelling of AF_PACKET. Raw INET sockets are refused by `sock_create` already;
/// `raw_inet` says whether this guard refuses them too.
#[inline(always)]
fn family_refused(family: i32, sock_type: i32, raw_inet: bool) -> bool {
    let t = sock_type & 0xf;
    match family {
        AF_UNIX | AF_NETLINK => false,
        AF_INET | AF_INET6 => t == SOCK_PACKET || (raw_inet && t == SOCK_RAW),
        _ => true,
    }
}

/// BPF LSM `socket_create`: socket families of guarded tasks the cgroup hooks cannot see
/// (cgroup `sock_create` never runs for AF_PACKET). LSM programs are global: find the task's
/// guarded ancestor cgroup first.
#[lsm(hook = "socket_create")]
pub fn lsm_socket_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    if stop_socket(family, sock_type, protocol as u32, kern != 0, true) {
        -EPERM
    } else {
        0
    }
}

/// The AF_PACKET guards' one question: must this socket creation be stopped? Only a refused
/// family asked for by a guarded task (not by the kernel itself) is; it is counted and
/// recorded, and audit mode lets it pass. `raw_inet`: whether raw INET sockets count as
/// refused here (the fallbacks leave them to the cgroup `sock_create` hook, which refuses them
/// with EPERM later in the same call).
#[inline(always)]
fn stop_socket(family: i32, sock_type: i32, protocol: u32, kern: bool, raw_inet: bool) -> bool {
    if kern || !family_refused(family, sock_type, raw_inet) {
        return false;
    }
    let Some(slot) = guarded_slot_of_current_task() else {
        return false;
    };
    !refuse_socket(slot, [family as u32, sock_type as u32, protocol]).passes()
}

/// What the fallback guards do instead of failing the call, which they cannot: kill the
/// caller, before it returns to user space.
#[inline(always)]
fn kill_current_task() {
    const SIGKILL: u32 = 9;
    unsafe { bpf_send_signal(SIGKILL) };
}

/// Counts and records a refused socket(); the verdict says whether audit mode lets it pass.
#[inline(always)]
fn refuse_socket(slot: u32, args: [u32; 3]) -> Verdict {
    let v = decide::verdict(decide::state(slot), false);
    let c = if v.passes() {
        Counter::SocketWouldDeny
    } else {
        Counter::SocketDenied
    };
    count(slot, c);
    emit::net(
        kind::NET_SOCKET,
        slot,
        &v,
        reason::SOCKET_TYPE,
        Origin::Task,
        &Dest::none(),
        0,
        0,
        args,
    );
    v
}

/// First fallback, where the BPF LSM is not available (most distributions leave it out of
/// `lsm=`): an fentry program on `__sock_create`, the function every socket creation goes
/// through (socket(), socketpair(), 32-bit syscalls, io_uring's IORING_OP_SOCKET). It cannot
/// fail the call, so a guarded task asking for a refused socket family is killed with SIGKILL
/// before it returns to user space. Unlike a syscall tracepoint it costs nothing to other
/// system calls, and unlike a kprobe it needs no perf_event_open (which Debian's
/// `perf_event_paranoid = 3` refuses without CAP_SYS_ADMIN). Best effort: a process sharing
/// the caller's file table but not its thread group survives; the BPF LSM has no such gap.
#[fentry(function = "__sock_create")]
pub fn socket_fentry(ctx: FEntryContext) -> u32 {
    // __sock_create(struct net *net, int family, int type, int protocol,
    //               struct socket **res, int kern)
    let family: i32 = ctx.arg(1);
    let sock_type: i32 = ctx.arg(2);
    let protocol: i32 = ctx.arg(3);
    let kern: i32 = ctx.arg(5);
    if stop_socket(family, sock_type, protocol as u32, kern != 0, false) {
        kill_current_task();
    }
    0
}

/// Last fallback, for kernels with neither the BPF LSM nor BPF trampolines (fentry): the
/// `syscalls:sys_enter_socket` tracepoint, which cannot fail the call either, so a guarded
/// task asking for a refused socket family is killed with SIGKILL. It does not see 32-bit
/// (ia32) syscalls or io_uring, and while it is attached every system call of every process
/// on the host takes the kernel's slower syscall-tracing path.
#[tracepoint]
pub fn socket_enter(ctx: TracePointContext) -> u32 {
    // struct trace_event_raw_sys_enter: 8 bytes common header, syscall nr, then args[6] as
    // unsigned longs. The kernel takes `int` arguments: compare the low 32 bits only, or
    // 0x1_0000_0011 would pass as "not AF_PACKET".
    const ARG0: usize = 16;
    const ARG1: usize = 24;
    const ARG2: usize = 32;
    let args = unsafe {
        (
            ctx.read_at::<u64>(ARG0),
            ctx.read_at::<u64>(ARG1),
            ctx.read_at::<u64>(ARG2),
        )
    };
    let (family, sock_type, protocol) = match args {
        (Ok(f), Ok(t), Ok(p)) => (f as u32 as i32, t as u32 as i32, p as u32),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            klog::syscall_args_unreadable(e);
            return 0;
        }
    };
    if stop_socket(family, sock_type, protocol, false, false) {
        kill_current_task();
    }
    0
}

#[inline(always)]
pub(crate) fn guarded_slot_of_current_task() -> Option<u32> {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH as i32 {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return None;
        }
        if let Some(&slot) = unsafe { GUARDED_CGROUPS.get(id) } {
            // A discovered container below it may have its own policy.
            if !decide::selects_containers(slot) {
                return Some(slot);
            }
            let own = unsafe { bpf_get_current_cgroup_id() };
            return Some(match unsafe { CONTAINER_SLOTS.get(own) } {
                Some(s) => *s,
                None => slot,
            });
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

/// What the packet backstop reads from an outgoing packet.
#[derive(Clone, Copy)]
struct Packet {
    dest: Dest,
    proto: u8,
    /// Destination port; 0 for protocols without one.
    port: u16,
    /// TCP flags; 0 for other protocols.
    tcp_flags: u8,
    /// No IPv4 options and no IPv6 routing header: the packet goes where its header says.
    plain: bool,
    /// Offset of the transport header.
    l4: u32,
}

/// Reads an outgoing packet; `None` if it cannot be judged: not IPv4/IPv6, too short, or a
/// non-first fragment. The cgroup egress hook runs before the kernel fragments, so a
/// fragment here was built by hand on a raw socket; it is judged as denied.
#[inline(always)]
fn read_packet(ctx: &SkBuffContext) -> Option<Packet> {
    match read_packet_inner(ctx) {
        Ok(Some(p)) => Some(p),
        Ok(None) => {
            let (ethertype, len) = packet_kind(ctx);
            klog::packet_not_plain(ethertype, len);
            None
        }
        Err(e) => {
            let (ethertype, len) = packet_kind(ctx);
            klog::packet_unreadable(ethertype, len, e);
            None
        }
    }
}

/// The packet's ethertype and length, for the kernel's log.
#[inline(always)]
fn packet_kind(ctx: &SkBuffContext) -> (u16, u32) {
    let skb = ctx.skb.skb;
    unsafe { (u16::from_be((*skb).protocol as u16), (*skb).len) }
}

/// Headers are read in one helper call each (IPv4 header, IPv6 header, the start of the
/// transport header), not field by field: the backstop runs for every packet.
#[inline(always)]
fn read_packet_inner(ctx: &SkBuffContext) -> Result<Option<Packet>, i64> {
    let skb = &ctx.skb;
    let l3 = u16::from_be(unsafe { (*skb.skb).protocol } as u16);
    let (dest, proto, l4, plain) = if l3 == ETH_P_IP {
        let ip: [u8; 20] = skb.load(0)?;
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        if frag & 0x1fff != 0 {
            return Ok(None);
        }
        let ihl = (ip[0] & 0x0f) as usize;
        (
            Dest::v4([ip[16], ip[17], ip[18], ip[19]]),
            ip[9],
            ihl * 4,
            ihl == 5,
        )
    } else if l3 == ETH_P_IPV6 {
        let ip: [u8; 40] = skb.load(0)?;
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&ip[24..40]);
        let mut next = ip[6];
        let mut off = 40usize;
        let mut plain = true;
        // Walk a bounded number of extension headers.
        let mut i = 0;
        while i < 4 {
            match next {
                0 | 43 | 60 => {
                    let hdr: [u8; 2] = skb.load(off)?;
                    plain &= next != 43;
                    next = hdr[0];
                    off += (hdr[1] as usize + 1) * 8;
                }
                44 => {
                    let hdr: [u8; 4] = skb.load(off)?;
                    if u16::from_be_bytes([hdr[2], hdr[3]]) >> 3 != 0 {
                        return Ok(None);
                    }
                    next = hdr[0];
                    off += 8;
                }
                _ => break,
            }
            i += 1;
        }
        (Dest::from_v6(dst), next, off, plain)
    } else {
        return Ok(None);
    };
    let (mut port, mut tcp_flags) = (0, 0);
    if proto == IPPROTO_TCP {
        // Ports, sequence and acknowledgment numbers, data offset, flags.
        let tcp: [u8; 14] = skb.load(l4)?;
        port = u16::from_be_bytes([tcp[2], tcp[3]]);
        tcp_flags = tcp[13];
    } else if proto == IPPROTO_UDP {
        let udp: [u8; 4] = skb.load(l4)?;
        port = u16::from_be_bytes([udp[2], udp[3]]);
    }
    Ok(Some(Packet {
        dest,
        proto,
        port,
        tcp_flags,
        plain,
        l4: l4 as u32,
    }))
}

#[cgroup_skb]
pub fn egress(ctx: SkBuffContext) -> i32 {
    // The socket's cgroup, not the current task's (softirq may send for anyone).
    let slot = slot_of(|| unsafe { bpf_skb_cgroup_id(ctx.skb.skb) });
    let Some(p) = read_packet(&ctx) else {
        let v = decide::verdict(decide::state(slot), false);
        return packet_verdict(
            &ctx,
            slot,
            &v,
            reason::UNREADABLE_PACKET,
            &Dest::none(),
            0,
            0,
        );
    };
    let d = decide(slot, &p.dest, p.proto as u32, p.port);
    let (v, why) = (d.verdict, d.reason);
    if let Verdict::Allow = v {
        count(slot, Counter::PacketAllowed);
        note_dns_client(&ctx, slot, &p);
        return PACKET_PASS;
    }
    if p.proto == IPPROTO_TCP && p.plain && is_inbound_reply(&ctx, &p) {
        count(slot, Counter::PacketInboundReply);
        return PACKET_PASS;
    }
    packet_verdict(&ctx, slot, &v, why, &p.dest, p.proto, p.port)
}

/// A packet of a redirected DNS socket on its way to the proxy: remember which task is behind
/// its source address and port, so the proxy's `dns` record can name the process and
/// container.
#[inline(always)]
fn note_dns_client(ctx: &SkBuffContext, slot: u32, p: &Packet) {
    let Some(px) = decide::dns_proxy(slot) else {
        return;
    };
    let a = &p.dest.addr;
    if !p.dest.v4 || [a[0], a[1], a[2], a[3]] != px.addr || p.port != px.port {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(orig) = (unsafe { DNS_REDIRECTED.get(cookie) }) else {
        return;
    };
    let (Ok(src), Ok(sport)) = (
        ctx.skb.load::<[u8; 4]>(12),
        ctx.skb.load::<u16>(p.l4 as usize),
    ) else {
        return;
    };
    let key = DnsClientKey {
        addr: src,
        port: u16::from_be(sport),
        proto: p.proto,
        _pad: 0,
    };
    if let Err(e) = DNS_CLIENTS.insert(key, orig.task, 0) {
        klog::map_write_failed(
            "DNS_CLIENTS",
            e,
            "the proxy's dns record of this query cannot name its process",
        );
    }
}

/// Counts and records a packet no rule allowed (or that could not be read: not IP, too
/// short, a hand-made fragment).
#[inline(always)]
fn packet_verdict(
    ctx: &SkBuffContext,
    slot: u32,
    v: &Verdict,
    why: u8,
    dest: &Dest,
    proto: u8,
    port: u16,
) -> i32 {
    let c = if v.passes() {
        Counter::PacketWouldDeny
    } else {
        Counter::PacketDenied
    };
    count(slot, c);
    let cgroup = Origin::Cgroup(unsafe { bpf_skb_cgroup_id(ctx.skb.skb) });
    emit::net(
        kind::NET_PACKET,
        slot,
        v,
        why,
        cgroup,
        dest,
        proto as u32,
        port,
        [0; 3],
    );
    if v.passes() { PACKET_PASS } else { PACKET_DROP }
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A TCP packet that answers a connection that came *in*, and goes nowhere else: a SYN-ACK
/// sent on behalf of a listening socket, or a packet of a socket the `inbound` sock_ops
/// program saw accepted, addressed to that socket's own peer.
#[inline(always)]
fn is_inbound_reply(ctx: &SkBuffContext, p: &Packet) -> bool {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return false;
    }
    let full = unsafe { &*full };
    if full.state == TCP_LISTEN {
        return p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    if unsafe { INBOUND_SOCKETS.get(cookie) }.is_none() {
        return false;
    }
    // bpf_sock.dst_port is in network byte order in its low 16 bits.
    if u16::from_be(full.dst_port as u16) != p.port {
        return false;
    }
    let a = &p.dest.addr;
    if p.dest.v4 {
        full.dst_ip4.to_ne_bytes() == [a[0], a[1], a[2], a[3]]
    } else {
        let w = full.dst_ip6;
        w[0].to_ne_bytes() == [a[0], a[1], a[2], a[3]]
            && w[1].to_ne_bytes() == [a[4], a[5], a[6], a[7]]
            && w[2].to_ne_bytes() == [a[8], a[9], a[10], a[11]]
            && w[3].to_ne_bytes() == [a[12], a[13], a[14], a[15]]
    }
}

/// Tracks TCP connections: accepted ones (so the packet backstop passes their replies) and
/// outgoing ones to learned addresses (so the agent keeps such an address allowed while one
/// is open); forgets them when they close.
#[sock_ops]
pub fn tcp_state(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            if let Err(e) = INBOUND_SOCKETS.insert(cookie, 1, 0) {
                klog::map_write_failed(
                    "INBOUND_SOCKETS",
                    e,
                    "the packet backstop judges this accepted connection's replies as outgoing",
                );
            }
            follow_state(&ctx);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // Only connections to learned addresses are followed (connect() said which, and
            // under which policy); the rest need no state and no close callback.
            let Some(slot) = learned_slot(&ctx) else {
                return 1;
            };
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            let dest = if ctx.family() == AF_INET as u32 {
                Dest::v4(ctx.remote_ip4().to_ne_bytes())
            } else {
                // One 32-bit load per word: the context refuses wider reads.
                let ops = ctx.ops;
                let w = unsafe {
                    [
                        core::ptr::read_volatile(&(*ops).remote_ip6[0]),
                        core::ptr::read_volatile(&(*ops).remote_ip6[1]),
                        core::ptr::read_volatile(&(*ops).remote_ip6[2]),
                        core::ptr::read_volatile(&(*ops).remote_ip6[3]),
                    ]
                };
                let mut a = [0u8; 16];
                a[0..4].copy_from_slice(&w[0].to_ne_bytes());
                a[4..8].copy_from_slice(&w[1].to_ne_bytes());
                a[8..12].copy_from_slice(&w[2].to_ne_bytes());
                a[12..16].copy_from_slice(&w[3].to_ne_bytes());
                Dest::from_v6(a)
            };
            let conn = OpenConn {
                slot,
                v4: dest.v4 as u32,
                addr: dest.addr,
            };
            if let Err(e) = OPEN_CONNS.insert(cookie, conn, 0) {
                klog::map_write_failed(
                    "OPEN_CONNS",
                    e,
                    "the learned address may expire while this connection is open",
                );
            }
            follow_state(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            let _ = INBOUND_SOCKETS.remove(cookie);
            let _ = OPEN_CONNS.remove(cookie);
        }
        _ => {}
    }
    1
}

/// The slot connect() stored on this socket when a learned address allowed it.
#[inline(always)]
fn learned_slot(ctx: &SockOpsContext) -> Option<u32> {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let map = core::ptr::from_ref(&SOCK_SLOTS).cast_mut().cast();
    // SAFETY: `sk` is the context's non-null socket; no value, no flags: a lookup only.
    let p = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) };
    if p.is_null() {
        return None;
    }
    Some(unsafe { *(p as *const u32) })
}

/// Asks for this socket's state changes, so `tcp_state` sees it close.
#[inline(always)]
fn follow_state(ctx: &SockOpsContext) {
    if let Err(e) = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32) {
        klog::map_write_failed(
            "the socket's callback flags",
            e,
            "its entries are not removed when it closes (they age out of their LRU maps)",
        );
    }
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
