//! Everything that touches the kernel: mounts, the pinned maps, and the program attachments.
//!
//! Pins live under `<pin_dir>/v<LAYOUT_VERSION>/`:
//! - `maps/<NAME>`: the maps (see agent-common);
//! - `links/<program>-<slot>-<cgroup id>-<object id>`: one cgroup attachment (bpffs refuses
//!   dots in names);
//! - `links/lsm_socket_create-<object id>`, `links/socket_fentry-<object id>` or
//!   `links/socket_enter-<object id>`: the global AF_PACKET guard (BPF LSM, else the fentry,
//!   else the tracepoint fallback).
//!
//! The pins keep enforcement in force when the agent dies. [`Kernel::apply`] is the same on
//! first start, restart and reload: write the new rulesets and flip each policy to its new one,
//! attach what is missing, then detach what is no longer wanted (new before old, so there is
//! never a moment without a guard).

mod apply;
pub mod btf;
pub mod ebpf_log;
pub mod maps;
pub mod mounts;
pub mod programs;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    path::{Path, PathBuf},
};

use agent_common::{
    LAYOUT_VERSION, MAX_POLICIES, PolicyState, STATE_ACTIVE, STATE_AUDIT, map_names,
};
use anyhow::{Context as _, bail};
use aya::programs::links::PinnedLink;

use crate::{config::Mode, policy::Compiled};
pub use maps::{Maps, state_name};
use programs::{LSM_PROGRAM, SOCKET_FENTRY_PROGRAM, SOCKET_TRACEPOINT_PROGRAM};

/// One policy as the kernel should enforce it.
pub struct Target {
    pub name: String,
    pub mode: Mode,
    pub compiled: Compiled,
    pub cgroups: Vec<PathBuf>,
    /// Where the policy's DNS is redirected (the agent's proxy), if it is.
    pub dns_proxy: Option<std::net::SocketAddrV4>,
    /// Addresses learned from DNS answers, carried into the new ruleset (exact entries,
    /// written after `compiled`, with the static rules already merged in).
    pub learned: Vec<(std::net::IpAddr, agent_common::AllowValue)>,
    /// Fingerprint of the policy's hostname rules (kept in the policy's state).
    pub hostnames: u64,
    /// The policy takes containers by selector (`containers = [...]`).
    pub selectors: bool,
}

/// What an [`Kernel::apply`] did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ApplyReport {
    /// Attachments found pinned and kept (a restart with the same programs).
    pub adopted: usize,
    pub attached: usize,
    pub detached: usize,
    pub policies: Vec<AppliedPolicy>,
    pub removed_policies: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AppliedPolicy {
    pub name: String,
    pub slot: u32,
    /// The active ruleset id after the flip.
    #[serde(skip)]
    pub ruleset: u32,
    pub mode: Mode,
    pub entries: usize,
    pub cgroups: usize,
}

pub struct Kernel {
    /// Held for the agent's lifetime (see [`lock_pin_dir`]).
    _lock: nix::fcntl::Flock<File>,
    root: PathBuf,
    maps: Maps,
    params: programs::LoadParams,
    audit_maps: Option<AuditMaps>,
    /// The programs' own log lines, until the daemon starts forwarding them.
    kernel_log: Option<ebpf_log::KernelLog>,
    object_id: String,
    /// Whether the kernel lists the BPF LSM as active.
    lsm_listed: bool,
    /// How AF_PACKET sockets of guarded tasks are stopped.
    pub socket_guard: SocketGuard,
    /// Whether exec/exit of guarded processes is recorded.
    pub process_events: bool,
}

/// The audit trail's kernel side: the record ring and the count of records it dropped.
/// A send-flow table: per flow, per CPU, the count of allowed sends.
pub type SendFlowTable = aya::maps::PerCpuHashMap<
    aya::maps::MapData,
    agent_common::event::SendFlowKey,
    agent_common::event::SendFlowCount,
>;

pub struct AuditMaps {
    /// The ring buffer (read by `audit::ring`, which commits consumption itself).
    pub events: aya::maps::MapData,
    pub lost: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    /// The kernel's counts of allowed UDP sends: which table the programs count into, and
    /// the two tables (read by `audit::send_flows`).
    pub send_flow_side: aya::maps::Array<aya::maps::MapData, u32>,
    pub send_flows: [SendFlowTable; 2],
}

/// The guard against AF_PACKET sockets, which no cgroup hook sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketGuard {
    /// BPF LSM `socket_create`: the call fails with EPERM.
    Lsm,
    /// An fentry program on `__sock_create`: the task is killed with SIGKILL.
    Fentry,
    /// `syscalls:sys_enter_socket` tracepoint, where the kernel has no BPF trampolines either:
    /// the task is killed with SIGKILL; io_uring and 32-bit calls are not seen.
    Tracepoint,
    /// Neither could be attached: AF_PACKET sockets are not stopped.
    None,
}

impl SocketGuard {
    fn pin_program(self) -> &'static str {
        match self {
            SocketGuard::Lsm => LSM_PROGRAM,
            SocketGuard::Fentry => SOCKET_FENTRY_PROGRAM,
            SocketGuard::Tracepoint | SocketGuard::None => SOCKET_TRACEPOINT_PROGRAM,
        }
    }
}

/// `<pin_dir>/v<LAYOUT_VERSION>`.
pub fn pin_root(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}"))
}

impl Kernel {
    /// Mounts what is missing, and creates or reopens the pinned maps.
    pub fn open(pin_dir: &Path, ring_bytes: u32) -> anyhow::Result<Self> {
        mounts::ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        let lock = lock_pin_dir(pin_dir)?;
        let root = pin_root(pin_dir);
        for d in ["maps", "links"] {
            std::fs::create_dir_all(root.join(d))
                .with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        raise_memlock_limit();
        // A pinned ring keeps its size; use it, or the user-space view would not match.
        let ring_pin = root.join("maps").join(map_names::EVENTS);
        let ring_bytes = match aya::maps::MapInfo::from_pin(&ring_pin) {
            Ok(info) => {
                let pinned = info.max_entries();
                if pinned != ring_bytes {
                    tracing::warn!(
                        "the pinned audit ring holds {pinned} bytes, not the configured {ring_bytes}; the new size takes effect after `egress-guard uninstall`"
                    );
                }
                pinned
            }
            Err(_) => ring_bytes,
        };
        let params = programs::LoadParams {
            ring_bytes,
            offsets: programs::task_offsets(),
        };
        let mut base = programs::load_object(&root.join("maps"), u32::MAX, &params)?;
        let maps = Maps::from_ebpf(&mut base)?;
        let events = match base
            .take_map(map_names::EVENTS)
            .context("the eBPF object has no EVENTS map")?
        {
            aya::maps::Map::RingBuf(data) => data,
            _ => bail!("the EVENTS map is not a ring buffer"),
        };
        let lost = base
            .take_map(map_names::LOST_EVENTS)
            .context("the eBPF object has no LOST_EVENTS map")?
            .try_into()?;
        let send_flow_side = base
            .take_map(map_names::SEND_FLOW_SIDE)
            .context("the eBPF object has no SEND_FLOW_SIDE map")?
            .try_into()?;
        let send_flows = [
            base.take_map(map_names::SEND_FLOWS[0])
                .context("the eBPF object has no SEND_FLOWS_0 map")?
                .try_into()?,
            base.take_map(map_names::SEND_FLOWS[1])
                .context("the eBPF object has no SEND_FLOWS_1 map")?
                .try_into()?,
        ];
        // Diagnostics only: the agent runs without them.
        let kernel_log = ebpf_log::KernelLog::take(&mut base)
            .inspect_err(|e| tracing::warn!("{e:#}; the eBPF programs' own log lines are lost"))
            .ok();
        let lsm_listed = match mounts::bpf_lsm_active() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(
                    "cannot tell whether the BPF LSM is active ({e:#}); assuming it is not"
                );
                false
            }
        };
        Ok(Self {
            _lock: lock,
            root,
            maps,
            params,
            audit_maps: Some(AuditMaps {
                events,
                lost,
                send_flow_side,
                send_flows,
            }),
            kernel_log,
            object_id: programs::object_id(),
            lsm_listed,
            socket_guard: SocketGuard::None,
            process_events: false,
        })
    }

    /// The pinned maps still answer (the watchdog's health check).
    pub fn check_maps(&self) -> anyhow::Result<()> {
        self.maps.states().map(|_| ())
    }

    /// Hands the programs' log ring to its reader (once).
    pub fn take_kernel_log(&mut self) -> Option<ebpf_log::KernelLog> {
        self.kernel_log.take()
    }

    /// Hands the audit maps to the audit pipeline (once).
    pub fn take_audit_maps(&mut self) -> Option<AuditMaps> {
        self.audit_maps.take()
    }

    /// The learned (DNS-answered) entries of each policy's active ruleset, by policy name:
    /// what a restarted agent adopts, so connections to them keep working.
    #[allow(clippy::type_complexity)]
    pub fn learned_entries(
        &self,
    ) -> anyhow::Result<HashMap<String, (u64, Vec<(std::net::IpAddr, agent_common::AllowValue)>)>>
    {
        let mut out: HashMap<String, (u64, Vec<_>)> = HashMap::new();
        let entries = self.maps.learned_entries()?;
        for st in self.maps.states()? {
            if st.flags & STATE_ACTIVE == 0 {
                continue;
            }
            let mine: Vec<_> = entries
                .iter()
                .filter(|(r, _, _)| *r == st.ruleset)
                .map(|(_, ip, v)| (*ip, *v))
                .collect();
            if !mine.is_empty() {
                out.insert(state_name(&st), (st.hostnames, mine));
            }
        }
        Ok(out)
    }

    /// Policy names by slot, as the kernel holds them.
    pub fn policy_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.maps.states()?.iter().map(state_name).collect())
    }

    /// Where the maps are pinned.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The slots `apply(targets)` will use (a policy keeps its slot across restarts and
    /// reloads); the DNS proxy port of a policy depends on it.
    pub fn slots(&self, targets: &[Target]) -> anyhow::Result<Vec<u32>> {
        assign_slots(targets, &self.maps.states()?, &self.link_pins()?)
    }

    /// Names of the link pins.
    fn link_pins(&self) -> anyhow::Result<HashSet<String>> {
        let dir = self.links_dir();
        let mut out = HashSet::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            out.insert(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(out)
    }
}

/// Slots: a policy keeps the slot it had (by name); a new one takes a slot that is neither
/// active nor still has attachments, so it never briefly enforces another policy's links.
fn assign_slots(
    targets: &[Target],
    states: &[PolicyState],
    pins: &HashSet<String>,
) -> anyhow::Result<Vec<u32>> {
    let pinned_slots: HashSet<u32> = pins
        .iter()
        .filter_map(|p| p.split('-').nth(1)?.parse().ok())
        .collect();
    let by_name: HashMap<String, u32> = states
        .iter()
        .enumerate()
        .filter(|(_, s)| s.flags & STATE_ACTIVE != 0)
        .map(|(i, s)| (state_name(s), i as u32))
        .collect();
    let mut taken: HashSet<u32> = by_name.values().copied().chain(pinned_slots).collect();
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let slot = match by_name.get(&t.name) {
            Some(&s) => s,
            None => match (0..MAX_POLICIES).find(|s| !taken.contains(s)) {
                Some(s) => s,
                None => bail!(
                    "no free policy slot: {MAX_POLICIES} policies at most (stale pins? run `egress-guard uninstall`)"
                ),
            },
        };
        taken.insert(slot);
        out.push(slot);
    }
    Ok(out)
}

fn detach_pin(path: &Path) -> anyhow::Result<()> {
    let link = PinnedLink::from_pin(path)
        .with_context(|| format!("opening pinned link {}", path.display()))?;
    // Unpinning drops the last reference once the returned fd closes: the program detaches.
    drop(
        link.unpin()
            .with_context(|| format!("unpinning {}", path.display()))?,
    );
    Ok(())
}

/// The `v<N>` layout directories under `pin_dir`.
fn version_dirs(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(pin_dir).with_context(|| format!("listing {}", pin_dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_dir()
            && name
                .strip_prefix('v')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            out.push(e.path());
        }
    }
    Ok(out)
}

/// Detaches every link and removes every map pin of one layout directory.
fn remove_version_dir(dir: &Path) -> anyhow::Result<(usize, usize)> {
    let (mut links, mut maps) = (0, 0);
    let links_dir = dir.join("links");
    if links_dir.is_dir() {
        for e in std::fs::read_dir(&links_dir)? {
            detach_pin(&e?.path())?;
            links += 1;
        }
        std::fs::remove_dir(&links_dir)?;
    }
    let maps_dir = dir.join("maps");
    if maps_dir.is_dir() {
        for e in std::fs::read_dir(&maps_dir)? {
            std::fs::remove_file(e?.path())?;
            maps += 1;
        }
        std::fs::remove_dir(&maps_dir)?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok((links, maps))
}

/// Removes every attachment and map pin under `pin_dir` on purpose. Returns (links, maps).
/// Touches only egress-guard's own `v<N>` directories, and refuses while an agent holds
/// the pin directory.
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<(usize, usize)> {
    if !pin_dir.exists() {
        return Ok((0, 0));
    }
    let _lock = lock_pin_dir(pin_dir)?;
    let (mut links, mut maps) = (0, 0);
    for dir in version_dirs(pin_dir)? {
        let (l, m) = remove_version_dir(&dir)?;
        links += l;
        maps += m;
    }
    // Only if nothing else lives there.
    let _ = std::fs::remove_dir(pin_dir);
    Ok((links, maps))
}

/// The process holding the pin directory's lock (the agent running on these pins), from
/// /proc/locks: `ID: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END`.
pub fn pin_dir_holder(pin_dir: &Path) -> Option<i32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(pin_dir).ok()?;
    let (major, minor) = (
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
    );
    let file = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&file.as_str()) {
            f.get(4)?.parse().ok()
        } else {
            None
        }
    })
}

/// Stops the agent running on `pin_dir`, and only that one (SIGTERM, then waits until it let
/// go of the pins); its pid, or None if no agent held them.
pub fn stop_agent_on(pin_dir: &Path, wait: std::time::Duration) -> anyhow::Result<Option<i32>> {
    let Some(pid) = pin_dir_holder(pin_dir) else {
        return Ok(None);
    };
    use nix::sys::signal::{Signal, kill};
    kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM)
        .map_err(std::io::Error::from)
        .with_context(|| format!("stopping the agent (pid {pid}) on {}", pin_dir.display()))?;
    let end = std::time::Instant::now() + wait;
    while pin_dir_holder(pin_dir) == Some(pid) {
        if std::time::Instant::now() > end {
            bail!(
                "the agent (pid {pid}) on {} did not stop within {wait:?}",
                pin_dir.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(Some(pid))
}

/// An exclusive lock on the pin directory, held for as long as the returned file lives: two
/// agents on one pin_dir would undo each other's work.
pub fn lock_pin_dir(pin_dir: &Path) -> anyhow::Result<nix::fcntl::Flock<File>> {
    use nix::{
        errno::Errno,
        fcntl::{Flock, FlockArg},
    };
    let dir = File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => bail!(
            "another egress-guard agent is using {} (stop it first: systemctl stop egress-guard)",
            pin_dir.display()
        ),
        Err((_, e)) => {
            Err(std::io::Error::from(e)).with_context(|| format!("locking {}", pin_dir.display()))
        }
    }
}

/// The per-policy decision counters from the pins in `pin_dir`, as JSON:
/// `{"policies": [{"policy", "mode", "counters": {name: value}}]}`.
pub fn counters_json(pin_dir: &Path) -> anyhow::Result<serde_json::Value> {
    let maps_dir = pin_root(pin_dir).join("maps");
    let maps = Maps::from_pins(&maps_dir).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\nis the agent installed? no pins under {}",
            maps_dir.display()
        )
    })?;
    let mut out = Vec::new();
    for (slot, st) in maps.states()?.iter().enumerate() {
        if st.flags & STATE_ACTIVE == 0 {
            continue;
        }
        let c = maps.counters(slot as u32)?;
        let counters: serde_json::Map<String, serde_json::Value> = agent_common::Counter::ALL
            .iter()
            .map(|k| (k.name().to_string(), c[*k as usize].into()))
            .collect();
        let mode = if st.flags & STATE_AUDIT != 0 {
            "audit"
        } else {
            "enforce"
        };
        out.push(
            serde_json::json!({ "policy": state_name(st), "mode": mode, "counters": counters }),
        );
    }
    // Audit records the kernel could not write (ring full), since the ring was created.
    let lost = aya::maps::MapData::from_pin(maps_dir.join(agent_common::map_names::LOST_EVENTS))
        .ok()
        .and_then(|d| {
            aya::maps::PerCpuArray::<_, u64>::try_from(aya::maps::Map::from_map_data(d).ok()?).ok()
        })
        .and_then(|m| m.get(&0, 0).ok())
        .map(|v| v.iter().sum::<u64>());
    Ok(serde_json::json!({ "policies": out, "audit_records_lost": lost }))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!("could not raise RLIMIT_MEMLOCK: {e}");
    }
}
