//! Typed handles on the pinned maps, and the writes the agent makes to them.

use std::{net::IpAddr, path::Path};

use agent_common::{
    Addr4Key, Addr6Key, AllowValue, COUNTERS_PER_POLICY, Counter, DnsProxy, MAX_POLICIES, OpenConn,
    PolicyState, RULESET_PREFIX_BITS, map_names,
};
use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
};
use nix::errno::Errno;

use crate::policy::Compiled;

pub struct Maps {
    state: Array<MapData, PolicyState>,
    exact4: HashMap<MapData, Addr4Key, AllowValue>,
    exact6: HashMap<MapData, Addr6Key, AllowValue>,
    cidr4: LpmTrie<MapData, Addr4Key, AllowValue>,
    cidr6: LpmTrie<MapData, Addr6Key, AllowValue>,
    counters: PerCpuArray<MapData, u64>,
    guarded: HashMap<MapData, u64, u32>,
    dns_proxy: Array<MapData, DnsProxy>,
    open_conns: HashMap<MapData, u64, OpenConn>,
    /// Discovered containers → slot (absent in pins made before discovery existed).
    containers: Option<HashMap<MapData, u64, u32>>,
}

/// Per-policy counter values, summed over CPUs, in `Counter` order.
pub type CounterValues = [u64; COUNTERS_PER_POLICY as usize];

impl Maps {
    /// Takes the maps out of a loaded object (created, or reused from their pins).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::build(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
        })
    }

    /// Opens the pinned maps without loading anything (for `stats` and `uninstall`).
    pub fn from_pins(dir: &Path) -> anyhow::Result<Self> {
        Self::build(|name| open_pinned(dir, name))
    }

    fn build(mut take: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        Ok(Self {
            state: take(map_names::POLICY_STATE)?.try_into()?,
            exact4: take(map_names::ALLOW_EXACT4)?.try_into()?,
            exact6: take(map_names::ALLOW_EXACT6)?.try_into()?,
            cidr4: take(map_names::ALLOW_CIDR4)?.try_into()?,
            cidr6: take(map_names::ALLOW_CIDR6)?.try_into()?,
            counters: take(map_names::COUNTERS)?.try_into()?,
            guarded: take(map_names::GUARDED_CGROUPS)?.try_into()?,
            dns_proxy: take(map_names::DNS_PROXY)?.try_into()?,
            open_conns: take(map_names::OPEN_CONNS)?.try_into()?,
            containers: take(map_names::CONTAINER_SLOTS)
                .ok()
                .and_then(|m| m.try_into().ok()),
        })
    }

    /// Forgets the containers that selectors gave to `slot` (its policy is gone: a later
    /// policy reusing the slot must not inherit them).
    pub fn forget_containers(&mut self, slot: u32) -> anyhow::Result<()> {
        if let Some(map) = self.containers.as_mut() {
            remove_where(map, |s| *s == slot);
        }
        Ok(())
    }

    /// Every slot's state.
    pub fn states(&self) -> anyhow::Result<Vec<PolicyState>> {
        (0..MAX_POLICIES)
            .map(|i| Ok(self.state.get(&i, 0)?))
            .collect()
    }

    pub fn set_state(&mut self, slot: u32, state: &PolicyState) -> anyhow::Result<()> {
        self.state
            .set(slot, state, 0)
            .with_context(|| format!("writing POLICY_STATE[{slot}]"))
    }

    /// Forgets the open connections recorded for `slot` (its policy is gone, so their close
    /// would never be seen, and they must not keep a later policy's learned addresses alive).
    pub fn forget_open_connections(&mut self, slot: u32) -> anyhow::Result<()> {
        remove_where(&mut self.open_conns, |c| c.slot == slot);
        Ok(())
    }

    /// Where the slot's DNS is redirected (`None`: not redirected).
    pub fn set_dns_proxy(
        &mut self,
        slot: u32,
        to: Option<std::net::SocketAddrV4>,
    ) -> anyhow::Result<()> {
        self.dns_proxy
            .set(slot, dns_proxy_value(to), 0)
            .with_context(|| format!("writing DNS_PROXY[{slot}]"))
    }

    /// Allows `value` to the single address `ip` under `ruleset` (a learned address).
    pub fn write_exact(
        &mut self,
        ruleset: u32,
        ip: IpAddr,
        value: &AllowValue,
    ) -> anyhow::Result<()> {
        let net = ipnet::IpNet::from(ip);
        self.write_ruleset(
            ruleset,
            &Compiled {
                entries: vec![(net, *value)],
            },
        )
    }

    /// Writes every entry of `compiled` under `ruleset`.
    pub fn write_ruleset(&mut self, ruleset: u32, compiled: &Compiled) -> anyhow::Result<()> {
        for (net, value) in &compiled.entries {
            let res = match (net.addr(), net.prefix_len()) {
                (IpAddr::V4(a), 32) => self.exact4.insert(
                    Addr4Key {
                        ruleset,
                        addr: a.octets(),
                    },
                    value,
                    0,
                ),
                (IpAddr::V6(a), 128) => self.exact6.insert(
                    Addr6Key {
                        ruleset,
                        addr: a.octets(),
                    },
                    value,
                    0,
                ),
                (IpAddr::V4(a), len) => {
                    let key = Key::new(
                        RULESET_PREFIX_BITS + u32::from(len),
                        Addr4Key {
                            ruleset,
                            addr: a.octets(),
                        },
                    );
                    self.cidr4.insert(&key, value, 0)
                }
                (IpAddr::V6(a), len) => {
                    let key = Key::new(
                        RULESET_PREFIX_BITS + u32::from(len),
                        Addr6Key {
                            ruleset,
                            addr: a.octets(),
                        },
                    );
                    self.cidr6.insert(&key, value, 0)
                }
            };
            res.with_context(|| format!("writing allow entry {net} (are the address maps full?)"))?;
        }
        Ok(())
    }

    /// Every exact entry learned from DNS, as `(ruleset, address, entry)`.
    pub fn learned_entries(&self) -> anyhow::Result<Vec<(u32, IpAddr, AllowValue)>> {
        let mut out = Vec::new();
        for e in self.exact4.iter() {
            let (k, v) = e.context("reading ALLOW_EXACT4")?;
            if v.learned_until != 0 {
                out.push((k.ruleset, IpAddr::from(k.addr), v));
            }
        }
        for e in self.exact6.iter() {
            let (k, v) = e.context("reading ALLOW_EXACT6")?;
            if v.learned_until != 0 {
                out.push((k.ruleset, IpAddr::from(k.addr), v));
            }
        }
        Ok(out)
    }

    /// Removes every entry of `ruleset`.
    pub fn clear_ruleset(&mut self, ruleset: u32) -> anyhow::Result<()> {
        // Collect first: deleting while iterating a BPF map restarts the iteration.
        macro_rules! clear {
            ($map:expr, $ruleset_of:expr) => {{
                // An iteration error must not leave entries behind: they would become allowed
                // when this ruleset id is next flipped to.
                let keys: Vec<_> = $map.keys().collect::<Result<Vec<_>, _>>()?;
                for k in keys.iter().filter(|k| $ruleset_of(k) == ruleset) {
                    $map.remove(k)?;
                }
            }};
        }
        clear!(self.exact4, |k: &Addr4Key| k.ruleset);
        clear!(self.exact6, |k: &Addr6Key| k.ruleset);
        clear!(self.cidr4, |k: &Key<Addr4Key>| k.data().ruleset);
        clear!(self.cidr6, |k: &Key<Addr6Key>| k.data().ruleset);
        Ok(())
    }

    /// Makes GUARDED_CGROUPS exactly `wanted` (cgroup id → slot).
    pub fn set_guarded(
        &mut self,
        wanted: &std::collections::HashMap<u64, u32>,
    ) -> anyhow::Result<()> {
        for (id, slot) in wanted {
            self.guarded.insert(id, slot, 0)?;
        }
        let keys: Vec<u64> = self.guarded.keys().collect::<Result<_, _>>()?;
        let stale: Vec<u64> = keys
            .into_iter()
            .filter(|id| !wanted.contains_key(id))
            .collect();
        for id in stale {
            self.guarded.remove(&id)?;
        }
        Ok(())
    }

    /// The counters of `slot`, summed over CPUs.
    pub fn counters(&self, slot: u32) -> anyhow::Result<CounterValues> {
        let mut out = [0u64; COUNTERS_PER_POLICY as usize];
        for c in Counter::ALL {
            let per_cpu = self.counters.get(&c.index(slot), 0)?;
            out[c as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

/// The policy name kept in a state entry.
pub fn state_name(state: &PolicyState) -> String {
    let end = state
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(state.name.len());
    String::from_utf8_lossy(&state.name[..end]).into_owned()
}

/// The maps the DNS proxy writes learned addresses to, and the open connections it checks
/// before letting one expire. A handle of its own, opened from the pins.
pub struct LearnMaps {
    exact4: HashMap<MapData, Addr4Key, AllowValue>,
    exact6: HashMap<MapData, Addr6Key, AllowValue>,
    open_conns: HashMap<MapData, u64, OpenConn>,
}

impl LearnMaps {
    pub fn from_pins(dir: &Path) -> anyhow::Result<Self> {
        let open = |name: &str| open_pinned(dir, name);
        Ok(Self {
            exact4: open(map_names::ALLOW_EXACT4)?.try_into()?,
            exact6: open(map_names::ALLOW_EXACT6)?.try_into()?,
            open_conns: open(map_names::OPEN_CONNS)?.try_into()?,
        })
    }

    /// Allows `value` to `ip` under `ruleset`.
    pub fn write(&mut self, ruleset: u32, ip: IpAddr, value: &AllowValue) -> anyhow::Result<()> {
        match ip {
            IpAddr::V4(a) => self.exact4.insert(
                Addr4Key {
                    ruleset,
                    addr: a.octets(),
                },
                value,
                0,
            ),
            IpAddr::V6(a) => self.exact6.insert(
                Addr6Key {
                    ruleset,
                    addr: a.octets(),
                },
                value,
                0,
            ),
        }
        .with_context(|| format!("writing learned address {ip} (are the address maps full?)"))
    }

    /// Removes the exact entry for `ip` under `ruleset` (absent is fine).
    pub fn remove(&mut self, ruleset: u32, ip: IpAddr) -> anyhow::Result<()> {
        let res = match ip {
            IpAddr::V4(a) => self.exact4.remove(&Addr4Key {
                ruleset,
                addr: a.octets(),
            }),
            IpAddr::V6(a) => self.exact6.remove(&Addr6Key {
                ruleset,
                addr: a.octets(),
            }),
        };
        match res {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(Errno::ENOENT as i32) =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("removing learned address {ip}")),
        }
    }

    /// `(slot, address)` of every open outgoing TCP connection of a guarded cgroup.
    pub fn open_connections(&self) -> anyhow::Result<std::collections::HashSet<(u32, IpAddr)>> {
        let mut out = std::collections::HashSet::new();
        for entry in self.open_conns.iter() {
            let (_, c) = entry.context("reading OPEN_CONNS")?;
            let ip = if c.v4 != 0 {
                IpAddr::from([c.addr[0], c.addr[1], c.addr[2], c.addr[3]])
            } else {
                IpAddr::from(c.addr)
            };
            out.insert((c.slot, ip));
        }
        Ok(out)
    }
}

/// Who is behind a DNS query, by its source address and port (see `DNS_CLIENTS`).
pub struct DnsClients {
    map: HashMap<MapData, agent_common::DnsClientKey, agent_common::event::EventHeader>,
}

impl DnsClients {
    pub fn from_pins(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            map: open_pinned(dir, map_names::DNS_CLIENTS)?.try_into()?,
        })
    }

    /// The task that sent from `client` over `proto` (6 TCP, 17 UDP), if the kernel saw it.
    pub fn task_of(
        &self,
        client: std::net::SocketAddr,
        proto: u8,
    ) -> Option<agent_common::event::EventHeader> {
        let IpAddr::V4(ip) = client.ip() else {
            return None;
        };
        let key = agent_common::DnsClientKey {
            addr: ip.octets(),
            port: client.port(),
            proto,
            _pad: 0,
        };
        self.map.get(&key, 0).ok()
    }
}

/// Opens the map pinned as `dir/name`.
pub fn open_pinned(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// Removes the entries (keyed by cookie or cgroup id) whose value matches.
fn remove_where<V: aya::Pod>(map: &mut HashMap<MapData, u64, V>, matches: impl Fn(&V) -> bool) {
    let stale: Vec<u64> = map
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(_, v)| matches(v))
        .map(|(k, _)| k)
        .collect();
    for k in stale {
        let _ = map.remove(&k);
    }
}

/// A `DNS_PROXY` entry: redirect to `to`, or (None) do not redirect.
fn dns_proxy_value(to: Option<std::net::SocketAddrV4>) -> DnsProxy {
    match to {
        Some(a) => DnsProxy {
            enabled: 1,
            addr: a.ip().octets(),
            port: a.port(),
            _pad: [0; 6],
        },
        None => DnsProxy::default(),
    }
}

/// The slots' DNS redirects (`DNS_PROXY`), for the DNS service to switch them on only while
/// the proxy's address belongs to this host.
pub struct DnsProxyMap {
    map: Array<MapData, DnsProxy>,
}

impl DnsProxyMap {
    pub fn from_pins(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            map: open_pinned(dir, map_names::DNS_PROXY)?.try_into()?,
        })
    }

    pub fn set(&mut self, slot: u32, to: Option<std::net::SocketAddrV4>) -> anyhow::Result<()> {
        self.map
            .set(slot, dns_proxy_value(to), 0)
            .with_context(|| format!("writing DNS_PROXY[{slot}]"))
    }
}
