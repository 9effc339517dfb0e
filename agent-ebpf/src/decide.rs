//! The one decision function every hook asks: may this policy slot reach this destination?

use agent_common::{
    Addr4Key, Addr6Key, AllowValue, Counter, PolicyState, RULESET_PREFIX_BITS, STATE_ACTIVE,
    STATE_AUDIT, STATE_CONTAINERS, event::reason, proto_bit,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::maps::{
    ALLOW_CIDR4, ALLOW_CIDR6, ALLOW_EXACT4, ALLOW_EXACT6, COUNTERS, DNS_PROXY, POLICY_STATE,
};

/// A destination as the hooks see it, in network byte order; an IPv4 address sits in the
/// first four bytes. A plain struct, not an enum: every byte is initialised, which the
/// verifier requires of anything copied through the stack.
#[derive(Clone, Copy)]
pub struct Dest {
    pub v4: bool,
    pub addr: [u8; 16],
}

impl Dest {
    /// No destination (socket refusals, unreadable packets).
    #[inline(always)]
    pub fn none() -> Dest {
        Dest {
            v4: false,
            addr: [0; 16],
        }
    }

    #[inline(always)]
    pub fn v4(a: [u8; 4]) -> Dest {
        Dest {
            v4: true,
            addr: [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    /// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is judged as the IPv4 address it is.
    #[inline(always)]
    pub fn from_v6(addr: [u8; 16]) -> Dest {
        if addr[..10] == [0u8; 10] && addr[10] == 0xff && addr[11] == 0xff {
            Dest::v4([addr[12], addr[13], addr[14], addr[15]])
        } else {
            Dest { v4: false, addr }
        }
    }
}

/// What the hook should do, and which counter records it.
pub enum Verdict {
    Allow,
    Deny,
    /// Audit mode: would have been denied, let through.
    WouldDeny,
}

impl Verdict {
    #[inline(always)]
    pub fn passes(&self) -> bool {
        !matches!(self, Verdict::Deny)
    }
}

#[inline(always)]
pub fn state(slot: u32) -> Option<&'static PolicyState> {
    match POLICY_STATE.get(slot) {
        Some(s) if s.flags & STATE_ACTIVE != 0 => Some(s),
        // A program attached for a slot without an active policy denies: fail closed.
        _ => None,
    }
}

/// May a container below this slot's cgroups be decided by another slot (some policy takes
/// containers by selector)? If not, `CONTAINER_SLOTS` need not be asked.
#[inline(always)]
pub fn selects_containers(slot: u32) -> bool {
    matches!(POLICY_STATE.get(slot), Some(s) if s.flags & STATE_CONTAINERS != 0)
}

#[inline(always)]
fn lookup(ruleset: u32, dest: &Dest) -> Option<&'static AllowValue> {
    let a = &dest.addr;
    if dest.v4 {
        let key = Addr4Key {
            ruleset,
            addr: [a[0], a[1], a[2], a[3]],
        };
        if let Some(v) = unsafe { ALLOW_EXACT4.get(key) } {
            return Some(v);
        }
        ALLOW_CIDR4.get(Key::new(RULESET_PREFIX_BITS + 32, key))
    } else {
        let key = Addr6Key { ruleset, addr: *a };
        if let Some(v) = unsafe { ALLOW_EXACT6.get(key) } {
            return Some(v);
        }
        ALLOW_CIDR6.get(Key::new(RULESET_PREFIX_BITS + 128, key))
    }
}

/// The slot's DNS proxy, if its DNS is redirected.
#[inline(always)]
pub fn dns_proxy(slot: u32) -> Option<&'static agent_common::DnsProxy> {
    match DNS_PROXY.get(slot) {
        Some(p) if p.enabled != 0 => Some(p),
        _ => None,
    }
}

/// Is this the slot's own DNS proxy (where its port-53 traffic was redirected)?
#[inline(always)]
fn is_dns_proxy(slot: u32, dest: &Dest, bit: u8, port: u16) -> bool {
    match dns_proxy(slot) {
        Some(p) => {
            let a = &dest.addr;
            dest.v4
                && [a[0], a[1], a[2], a[3]] == p.addr
                && port == p.port
                && bit & (agent_common::PROTO_TCP | agent_common::PROTO_UDP) != 0
        }
        None => false,
    }
}

/// Is `ip_proto` to `dest:port` allowed by the slot's active ruleset? `reason::RULE` if so,
/// else why not; and whether the allowing entry is an address learned from a DNS answer.
#[inline(always)]
pub fn allowed(
    slot: u32,
    state: &PolicyState,
    dest: &Dest,
    ip_proto: u32,
    port: u16,
) -> (u8, bool) {
    let bit = proto_bit(ip_proto);
    if bit == 0 {
        return (reason::PROTOCOL, false);
    }
    if is_dns_proxy(slot, dest, bit, port) {
        return (reason::RULE, false);
    }
    match lookup(state.ruleset, dest) {
        Some(v) if v.allows(bit, port) => (reason::RULE, v.learned_until != 0),
        Some(_) => (reason::PORT_OR_PROTOCOL, false),
        None => (reason::NO_RULE_FOR_ADDRESS, false),
    }
}

/// Turns "allowed?" into a verdict under the slot's mode.
#[inline(always)]
pub fn verdict(state: Option<&PolicyState>, allowed: bool) -> Verdict {
    match state {
        _ if allowed => Verdict::Allow,
        Some(s) if s.flags & STATE_AUDIT != 0 => Verdict::WouldDeny,
        _ => Verdict::Deny,
    }
}

/// The answer for one destination.
pub struct Decision {
    pub verdict: Verdict,
    /// `reason::*`, as the record gives it.
    pub reason: u8,
    /// Allowed by an address learned from a DNS answer: it expires unless a connection to it
    /// is open, so the TCP tracker must follow this connection.
    pub learned: bool,
}

/// The full question for one destination.
#[inline(always)]
pub fn decide(slot: u32, dest: &Dest, ip_proto: u32, port: u16) -> Decision {
    let st = state(slot);
    let (reason, learned) = match st {
        Some(s) => allowed(slot, s, dest, ip_proto, port),
        None => {
            crate::klog::fail_closed(slot);
            (reason::NO_ACTIVE_POLICY, false)
        }
    };
    Decision {
        verdict: verdict(st, reason == reason::RULE),
        reason,
        learned,
    }
}

#[inline(always)]
pub fn count(slot: u32, counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter.index(slot)) {
        // Per-CPU slot. Not atomic: the bpf target's core has no atomic add, and a packet
        // program in softirq interrupting a syscall program on the same CPU mid-increment
        // (rare) can lose one count.
        unsafe { *c += 1 };
    }
}

/// Counts a verdict with one of three counters (allowed, denied, would-deny).
#[inline(always)]
pub fn count_verdict(slot: u32, v: &Verdict, counters: [Counter; 3]) {
    let c = match v {
        Verdict::Allow => counters[0],
        Verdict::Deny => counters[1],
        Verdict::WouldDeny => counters[2],
    };
    count(slot, c);
}
