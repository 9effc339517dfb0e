//! Every map the programs use. Their key and value types live in `agent-common`.
//! All are pinned by name, so each per-policy load of the programs shares them, and they
//! outlive the agent (fail closed).

use agent_common::{
    Addr4Key, Addr6Key, AllowValue, COUNTERS_PER_POLICY, DnsClientKey, DnsProxy, MAX_CIDR_ENTRIES,
    MAX_CONTAINERS, MAX_DNS_CLIENTS, MAX_DNS_REDIRECTED, MAX_EXACT_ENTRIES, MAX_GUARDED_CGROUPS,
    MAX_INBOUND_SOCKETS, MAX_OPEN_CONNS, MAX_POLICIES, OpenConn, OrigDest, PolicyState,
    event::{DEFAULT_RING_BYTES, EventHeader, MAX_SEND_FLOWS, SendFlowCount, SendFlowKey},
};
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};

/// Per slot: active ruleset id, mode and name.
#[map]
pub static POLICY_STATE: Array<PolicyState> = Array::pinned(MAX_POLICIES, 0);

/// Allocated as entries are written, so a large maximum costs nothing until used.
const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

/// Exact addresses (and the rules of the CIDRs containing them, merged by the agent).
#[map]
pub static ALLOW_EXACT4: HashMap<Addr4Key, AllowValue> =
    HashMap::pinned(MAX_EXACT_ENTRIES, NO_PREALLOC);
#[map]
pub static ALLOW_EXACT6: HashMap<Addr6Key, AllowValue> =
    HashMap::pinned(MAX_EXACT_ENTRIES, NO_PREALLOC);

/// CIDRs, longest prefix wins (the agent merges enclosing CIDRs' rules into each entry).
#[map]
pub static ALLOW_CIDR4: LpmTrie<Addr4Key, AllowValue> = LpmTrie::pinned(MAX_CIDR_ENTRIES, 0);
#[map]
pub static ALLOW_CIDR6: LpmTrie<Addr6Key, AllowValue> = LpmTrie::pinned(MAX_CIDR_ENTRIES, 0);

/// Decision counters, `slot * COUNTERS_PER_POLICY + Counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_POLICIES * COUNTERS_PER_POLICY, 0);

/// Guarded cgroup id → slot, for the LSM hook (it sees the task, not a cgroup attachment).
#[map]
pub static GUARDED_CGROUPS: HashMap<u64, u32> = HashMap::pinned(MAX_GUARDED_CGROUPS, 0);

/// Cookies of TCP sockets that were accepted (inbound), so the packet backstop lets their
/// replies through. LRU: a flood can only evict entries, which fails closed.
#[map]
pub static INBOUND_SOCKETS: LruHashMap<u64, u8> = LruHashMap::pinned(MAX_INBOUND_SOCKETS, 0);

/// Audit records (see agent-common's `event`). Its size is set by the agent at creation.
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(DEFAULT_RING_BYTES, 0);

/// `[0]`: records that did not fit in `EVENTS` (kernel, per CPU). `[1]`: how many of them the
/// agent has reported (written by the agent), so a restarted agent reports only the rest.
#[map]
pub static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(2, 0);

/// Per slot: where its DNS is redirected (the agent's proxy), if anywhere.
#[map]
pub static DNS_PROXY: Array<DnsProxy> = Array::pinned(MAX_POLICIES, 0);

/// Socket cookie → the DNS server a redirected socket asked for, so `recvmsg` can show the
/// reply as coming from it. LRU: an evicted entry only leaves the proxy's address visible.
#[map]
pub static DNS_REDIRECTED: LruHashMap<u64, OrigDest> = LruHashMap::pinned(MAX_DNS_REDIRECTED, 0);

/// Socket cookie → destination of an established outgoing TCP connection to a learned
/// address, so the agent keeps that address allowed while a connection to it is open. LRU: an evicted entry can only
/// let an address expire early (fail closed).
#[map]
pub static OPEN_CONNS: LruHashMap<u64, OpenConn> = LruHashMap::pinned(MAX_OPEN_CONNS, 0);

/// Source address and port of a DNS query on its way to the proxy → the task behind it
/// (written by the packet backstop from `DNS_REDIRECTED`, read by the proxy for its records).
#[map]
pub static DNS_CLIENTS: LruHashMap<DnsClientKey, EventHeader> =
    LruHashMap::pinned(MAX_DNS_CLIENTS, 0);

/// A discovered container's cgroup id → the slot its policy's selectors gave it. The programs
/// attached to the guarded cgroup above it decide with that slot instead of their own.
#[map]
pub static CONTAINER_SLOTS: HashMap<u64, u32> = HashMap::pinned(MAX_CONTAINERS, 0);

/// Per socket: the slot whose learned address allowed its TCP connect(): the TCP tracker
/// follows only these connections, and files each under the policy that decided it (a
/// discovered container's, not necessarily the attached programs' own). Socket-local storage,
/// freed with the socket: asking it costs the tracker about nothing, where the lookup of the
/// socket cookie in a 65,536-entry LRU hash cost ~210 ns per connection (measured; cache
/// misses on its random bucket are the likely reason).
/// Not pinned (aya's BTF maps cannot be): each loaded copy of the programs has its own, shared
/// by its connect4/6 and tcp_state; a connection whose connect() and establishment straddle
/// an upgrade is not followed (fail closed: the learned address may expire while it is open).
#[btf_map]
pub static SOCK_SLOTS: SkStorage<u32> = SkStorage::new();

/// `[0]`: which of the two send-flow tables the programs count allowed UDP sends into (the
/// agent flips it and drains the other; see agent-common's `SendFlowKey`).
#[map]
pub static SEND_FLOW_SIDE: Array<u32> = Array::pinned(1, 0);

/// Allowed UDP sends per flow, per CPU. Not LRU: an evicted flow would lose its count; a full
/// table makes the send go to the ring instead.
#[map]
pub static SEND_FLOWS_0: PerCpuHashMap<SendFlowKey, SendFlowCount> =
    PerCpuHashMap::pinned(MAX_SEND_FLOWS, NO_PREALLOC);
#[map]
pub static SEND_FLOWS_1: PerCpuHashMap<SendFlowKey, SendFlowCount> =
    PerCpuHashMap::pinned(MAX_SEND_FLOWS, NO_PREALLOC);
