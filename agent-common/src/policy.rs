//! Map keys, map values and constants of the policy maps.
//!
//! How a decision is made (see `agent-ebpf/src/decide.rs`): the program attached to a guarded
//! cgroup knows its policy *slot* (a load-time constant). `POLICY_STATE[slot]` names the
//! slot's active *ruleset* id and mode. Allowed destinations are keyed by `(ruleset, address)`:
//! exact addresses in hash maps, CIDRs in LPM tries. A reload writes a new ruleset under the
//! slot's other ruleset id and then flips `POLICY_STATE[slot]`, so a policy change is atomic.

/// Version of the pinned map layout. Pins live under `<pin_dir>/v<LAYOUT_VERSION>/`; a change
/// to any type in this file must bump it.
pub const LAYOUT_VERSION: u32 = 2;

/// How many policies (slots) one agent can hold.
pub const MAX_POLICIES: u32 = 64;
/// Port rules one address or CIDR entry can carry (after merging the rules of the CIDRs
/// that contain it).
pub const MAX_PORT_RULES: usize = 8;
/// Entries in each address map (shared by all policies and both ruleset banks).
pub const MAX_EXACT_ENTRIES: u32 = 262_144;
pub const MAX_CIDR_ENTRIES: u32 = 262_144;
/// Accepted TCP connections tracked so their replies pass the packet backstop.
pub const MAX_INBOUND_SOCKETS: u32 = 65_536;
/// Sockets whose DNS was redirected to the agent's proxy (their replies are made to look as if
/// they came from the server the process asked).
pub const MAX_DNS_REDIRECTED: u32 = 65_536;
/// Outgoing TCP connections tracked so a learned address stays allowed while they are open.
pub const MAX_OPEN_CONNS: u32 = 65_536;
/// Recent DNS query sources and the tasks behind them.
pub const MAX_DNS_CLIENTS: u32 = 16_384;
/// The port DNS is redirected from (UDP and TCP, any address).
pub const DNS_PORT: u16 = 53;
/// Guarded cgroups, for the BPF LSM socket hook which sees tasks, not cgroup attachments.
pub const MAX_GUARDED_CGROUPS: u32 = 4_096;
/// Discovered container cgroups that a policy's selectors took over.
pub const MAX_CONTAINERS: u32 = 16_384;
/// Depth of the cgroup tree the LSM hook walks looking for a guarded ancestor.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Protocol bits of a port rule.
pub const PROTO_TCP: u8 = 1;
pub const PROTO_UDP: u8 = 2;
pub const PROTO_ICMP: u8 = 4;

/// Maps a kernel IP protocol number to its rule bit (0: a protocol no rule can allow).
/// Takes the full number: IPPROTO_MPTCP (262) must not pass as TCP (6).
#[inline(always)]
pub const fn proto_bit(ip_proto: u32) -> u8 {
    match ip_proto {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        1 | 58 => PROTO_ICMP,
        _ => 0,
    }
}

/// One allowed `protocols × [lo, hi]` port range. ICMP rules use `0..=65535`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    pub lo: u16,
    pub hi: u16,
    pub protos: u8,
    pub _pad: [u8; 3],
}

/// The value of an address map entry: the port rules that apply to that address or CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowValue {
    pub count: u32,
    /// 0 for a configured entry. For an address learned from a DNS answer: until when (whole
    /// seconds of CLOCK_BOOTTIME) it stays allowed, so a restarted agent can adopt it. The
    /// programs do not read it.
    pub learned_until: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

impl AllowValue {
    /// Does any rule allow `proto_bit` to `port`?
    #[inline(always)]
    pub fn allows(&self, proto_bit: u8, port: u16) -> bool {
        let mut i = 0;
        // Bounded by MAX_PORT_RULES, so the verifier sees a fixed trip count.
        while i < MAX_PORT_RULES {
            if i as u32 >= self.count {
                return false;
            }
            let r = &self.rules[i];
            if r.protos & proto_bit != 0 && port >= r.lo && port <= r.hi {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Key of the IPv4 maps. In the LPM trie the prefix length counts the 32 ruleset bits too,
/// so entries of different rulesets never match each other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr4Key {
    pub ruleset: u32,
    /// Network byte order.
    pub addr: [u8; 4],
}

/// Key of the IPv6 maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr6Key {
    pub ruleset: u32,
    /// Network byte order.
    pub addr: [u8; 16],
}

/// Bits in the LPM key that belong to the ruleset id.
pub const RULESET_PREFIX_BITS: u32 = 32;

/// `PolicyState::flags`: the slot holds a policy (a program attached to an inactive slot
/// denies everything: fail closed).
pub const STATE_ACTIVE: u32 = 1;
/// `PolicyState::flags`: audit mode, decide and count but let everything through.
pub const STATE_AUDIT: u32 = 2;
/// `PolicyState::flags`: some policy takes containers by selector, so a container below this
/// slot's cgroups may be decided by another slot (`CONTAINER_SLOTS`). Without it the hooks
/// skip that lookup.
pub const STATE_CONTAINERS: u32 = 4;

/// Length of the policy name kept in the state map (for adoption after a restart).
pub const POLICY_NAME_LEN: usize = 48;

/// `POLICY_STATE[slot]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyState {
    pub ruleset: u32,
    pub flags: u32,
    pub name: [u8; POLICY_NAME_LEN],
    /// A fingerprint of the policy's hostname rules: a restarted agent adopts the addresses
    /// learned for them only if they are unchanged. The programs do not read it.
    pub hostnames: u64,
}

impl Default for PolicyState {
    fn default() -> Self {
        Self {
            ruleset: 0,
            flags: 0,
            name: [0; POLICY_NAME_LEN],
            hostnames: 0,
        }
    }
}

/// The two ruleset ids a slot alternates between.
pub const fn ruleset_ids(slot: u32) -> [u32; 2] {
    [slot * 2 + 1, slot * 2 + 2]
}

/// Per-policy decision counters: `COUNTERS[slot * COUNTERS_PER_POLICY + counter]`, per CPU.
pub const COUNTERS_PER_POLICY: u32 = 16;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    ConnectAllowed = 0,
    ConnectDenied = 1,
    ConnectWouldDeny = 2,
    SendAllowed = 3,
    SendDenied = 4,
    SendWouldDeny = 5,
    PacketAllowed = 6,
    PacketDenied = 7,
    PacketWouldDeny = 8,
    SocketDenied = 9,
    SocketWouldDeny = 10,
    /// Replies on accepted TCP connections that passed the packet backstop.
    PacketInboundReply = 11,
    /// DNS queries (connect or sendmsg to port 53) redirected to the agent's proxy.
    DnsRedirected = 12,
}

impl Counter {
    pub const ALL: [Counter; 13] = [
        Counter::ConnectAllowed,
        Counter::ConnectDenied,
        Counter::ConnectWouldDeny,
        Counter::SendAllowed,
        Counter::SendDenied,
        Counter::SendWouldDeny,
        Counter::PacketAllowed,
        Counter::PacketDenied,
        Counter::PacketWouldDeny,
        Counter::SocketDenied,
        Counter::SocketWouldDeny,
        Counter::PacketInboundReply,
        Counter::DnsRedirected,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectAllowed => "connect_allowed",
            Counter::ConnectDenied => "connect_denied",
            Counter::ConnectWouldDeny => "connect_would_deny",
            Counter::SendAllowed => "send_allowed",
            Counter::SendDenied => "send_denied",
            Counter::SendWouldDeny => "send_would_deny",
            Counter::PacketAllowed => "packet_allowed",
            Counter::PacketDenied => "packet_denied",
            Counter::PacketWouldDeny => "packet_would_deny",
            Counter::SocketDenied => "socket_denied",
            Counter::SocketWouldDeny => "socket_would_deny",
            Counter::PacketInboundReply => "packet_inbound_reply",
            Counter::DnsRedirected => "dns_redirected",
        }
    }

    #[inline(always)]
    pub const fn index(self, slot: u32) -> u32 {
        slot * COUNTERS_PER_POLICY + self as u32
    }
}

/// `DNS_PROXY[slot]`: where the slot's DNS goes. With `enabled`, every connect() and sendmsg()
/// to port 53 (UDP or TCP, any address) is rewritten to `addr:port`, the agent's proxy for
/// this policy, and traffic to that address and port is allowed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsProxy {
    pub enabled: u32,
    /// IPv4, network byte order. IPv6 sockets are sent to its IPv4-mapped form.
    pub addr: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// `DNS_REDIRECTED[socket cookie]`: the server a redirected socket asked for, and the task
/// that asked (when it connected or sent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDest {
    /// Network byte order; an IPv4 address in the first four bytes.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub v4: u8,
    pub _pad: [u8; 5],
    pub task: crate::event::EventHeader,
}

/// `DNS_CLIENTS` key: the source of a DNS query as the proxy sees it. The packet backstop
/// fills it from redirected sockets' packets, so the proxy can name the process and container
/// behind a query.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsClientKey {
    /// IPv4, network byte order (the proxy listens on IPv4).
    pub addr: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `OPEN_CONNS[socket cookie]`: an established outgoing TCP connection of a guarded cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenConn {
    pub slot: u32,
    pub v4: u32,
    /// Network byte order; an IPv4 address in the first four bytes.
    pub addr: [u8; 16],
}

/// Map names, shared so the agent opens exactly what the programs declare.
pub mod map_names {
    pub const POLICY_STATE: &str = "POLICY_STATE";
    pub const ALLOW_EXACT4: &str = "ALLOW_EXACT4";
    pub const ALLOW_EXACT6: &str = "ALLOW_EXACT6";
    pub const ALLOW_CIDR4: &str = "ALLOW_CIDR4";
    pub const ALLOW_CIDR6: &str = "ALLOW_CIDR6";
    pub const COUNTERS: &str = "COUNTERS";
    pub const GUARDED_CGROUPS: &str = "GUARDED_CGROUPS";
    pub const INBOUND_SOCKETS: &str = "INBOUND_SOCKETS";
    pub const EVENTS: &str = "EVENTS";
    pub const LOST_EVENTS: &str = "LOST_EVENTS";
    pub const DNS_PROXY: &str = "DNS_PROXY";
    pub const DNS_REDIRECTED: &str = "DNS_REDIRECTED";
    pub const OPEN_CONNS: &str = "OPEN_CONNS";
    pub const DNS_CLIENTS: &str = "DNS_CLIENTS";
    pub const CONTAINER_SLOTS: &str = "CONTAINER_SLOTS";
    pub const SEND_FLOW_SIDE: &str = "SEND_FLOW_SIDE";
    pub const SEND_FLOWS: [&str; 2] = ["SEND_FLOWS_0", "SEND_FLOWS_1"];
    pub const ALL: [&str; 18] = [
        POLICY_STATE,
        ALLOW_EXACT4,
        ALLOW_EXACT6,
        ALLOW_CIDR4,
        ALLOW_CIDR6,
        COUNTERS,
        GUARDED_CGROUPS,
        INBOUND_SOCKETS,
        EVENTS,
        LOST_EVENTS,
        DNS_PROXY,
        DNS_REDIRECTED,
        OPEN_CONNS,
        DNS_CLIENTS,
        CONTAINER_SLOTS,
        SEND_FLOW_SIDE,
        SEND_FLOWS[0],
        SEND_FLOWS[1],
    ];
}

/// Name of the load-time constant holding a program's policy slot.
pub const POLICY_SLOT_GLOBAL: &str = "POLICY_SLOT";

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C) plain data with explicit padding fields.
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for AllowValue {}
    unsafe impl aya::Pod for Addr4Key {}
    unsafe impl aya::Pod for Addr6Key {}
    unsafe impl aya::Pod for PolicyState {}
    unsafe impl aya::Pod for DnsProxy {}
    unsafe impl aya::Pod for OrigDest {}
    unsafe impl aya::Pod for OpenConn {}
    unsafe impl aya::Pod for DnsClientKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<PortRule>(), 8);
        assert_eq!(core::mem::size_of::<AllowValue>(), 8 + 8 * MAX_PORT_RULES);
        assert_eq!(core::mem::size_of::<Addr4Key>(), 8);
        assert_eq!(core::mem::size_of::<Addr6Key>(), 20);
        assert_eq!(core::mem::size_of::<PolicyState>(), 8 + POLICY_NAME_LEN + 8);
        assert_eq!(core::mem::size_of::<DnsProxy>(), 16);
        assert_eq!(
            core::mem::size_of::<OrigDest>(),
            24 + core::mem::size_of::<crate::event::EventHeader>()
        );
        assert_eq!(core::mem::size_of::<DnsClientKey>(), 8);
        assert_eq!(core::mem::size_of::<OpenConn>(), 24);
    }

    #[test]
    fn allow_value_matches_proto_and_port_range() {
        let mut v = AllowValue::default();
        v.rules[0] = PortRule {
            lo: 443,
            hi: 443,
            protos: PROTO_TCP,
            _pad: [0; 3],
        };
        v.rules[1] = PortRule {
            lo: 8000,
            hi: 8100,
            protos: PROTO_TCP | PROTO_UDP,
            _pad: [0; 3],
        };
        v.count = 2;
        assert!(v.allows(PROTO_TCP, 443));
        assert!(!v.allows(PROTO_UDP, 443));
        assert!(v.allows(PROTO_UDP, 8000));
        assert!(v.allows(PROTO_TCP, 8100));
        assert!(!v.allows(PROTO_TCP, 8101));
        assert!(!v.allows(PROTO_ICMP, 0));
        // Rules past `count` are ignored.
        v.count = 1;
        assert!(!v.allows(PROTO_UDP, 8000));
    }

    #[test]
    fn ruleset_ids_are_distinct_and_nonzero() {
        let mut seen = std::collections::HashSet::new();
        for slot in 0..MAX_POLICIES {
            for id in ruleset_ids(slot) {
                assert!(id != 0);
                assert!(seen.insert(id));
            }
        }
    }
}
