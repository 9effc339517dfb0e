//! Container discovery: which policy a Docker container under a guarded cgroup gets.
//!
//! A policy's `containers` selectors (`name:GLOB`, `label:KEY=GLOB`, `label:KEY`) pick
//! containers by their Docker metadata. The agent watches every guarded cgroup with inotify;
//! when a child cgroup carrying a container id appears (`docker-<id>.scope` with the systemd
//! driver, `<id>` with cgroupfs), it reads `<docker root>/containers/<id>/config.v2.json` and
//! writes the matching policy's slot into `CONTAINER_SLOTS`. The programs attached to the
//! guarded parent then decide that container's traffic with that policy. Until the match (a
//! few milliseconds) the parent's own policy applies, so a container is never unguarded.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ffi::CString,
    os::{
        fd::AsFd as _,
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData};
use nix::{
    poll::{PollFd, PollFlags, poll},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
};
use serde::Serialize;

use crate::config::Selector;

/// How long a container cgroup whose metadata is not readable yet is retried.
const METADATA_WAIT: Duration = Duration::from_secs(5);

/// How long a removed container cgroup stays known (its last records may still be in the
/// ring), and how many are kept at most.
const KEEP_GONE: Duration = Duration::from_secs(600);
const MAX_KNOWN: usize = 65_536;

/// The cgroups that appear under the guarded cgroups (containers, systemd scopes), by cgroup
/// id, from the moment they appear until a while after they are removed. Records are enriched
/// when the agent drains the ring, and a `docker run --rm` container that lived a fraction of a
/// second is gone by then (its cgroup and its Docker metadata): its records are still named
/// from here.
#[derive(Debug, Default)]
pub struct KnownCgroups(Mutex<HashMap<u64, Known>>);

#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    /// The cgroup directory (absolute).
    pub cgroup: PathBuf,
    /// The full container id, if the cgroup is a container's.
    pub container: Option<String>,
    /// Docker's name; None if its metadata was never readable.
    pub name: Option<String>,
    gone_at: Option<Instant>,
}

impl KnownCgroups {
    pub fn get(&self, cgroup_id: u64) -> Option<Known> {
        self.lock().get(&cgroup_id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Known>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cgroup that exists now; a name seen earlier is kept when its metadata is gone.
    fn seen(&self, cgroup_id: u64, cgroup: &Path, container: Option<&str>, name: Option<String>) {
        let mut known = self.lock();
        if known.len() >= MAX_KNOWN && !known.contains_key(&cgroup_id) {
            forget_gone(&mut known, Duration::ZERO);
        }
        let name = name.or_else(|| known.get(&cgroup_id).and_then(|k| k.name.clone()));
        known.insert(
            cgroup_id,
            Known {
                cgroup: cgroup.to_path_buf(),
                container: container.map(str::to_string),
                name,
                gone_at: None,
            },
        );
    }

    /// Marks every known cgroup not in `alive` as removed now, and forgets the long gone.
    fn keep_only(&self, alive: &HashSet<u64>) {
        let mut known = self.lock();
        let now = Instant::now();
        for (id, k) in known.iter_mut() {
            if !alive.contains(id) && k.gone_at.is_none() {
                k.gone_at = Some(now);
            }
        }
        forget_gone(&mut known, KEEP_GONE);
    }

    /// The cgroup at `path` was removed.
    fn gone(&self, path: &Path) {
        let mut known = self.lock();
        for k in known.values_mut().filter(|k| k.cgroup == path) {
            k.gone_at.get_or_insert_with(Instant::now);
        }
        forget_gone(&mut known, KEEP_GONE);
    }
}

/// Drops the cgroups removed more than `age` ago.
fn forget_gone(known: &mut HashMap<u64, Known>, age: Duration) {
    known.retain(|_, k| k.gone_at.is_none_or(|t| t.elapsed() < age));
}

impl Selector {
    pub fn matches(&self, c: &Container) -> bool {
        match self {
            Selector::Name(glob) => glob_match(glob, &c.name),
            Selector::Label { key, value } => match (c.labels.get(key), value) {
                (Some(_), None) => true,
                (Some(v), Some(glob)) => glob_match(glob, v),
                (None, _) => false,
            },
        }
    }
}

/// `*` matches any run of characters (none included); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No '*': the whole text must be the pattern.
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// What Docker says about a container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Container {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Reads a container's name and labels from Docker's metadata; `None` if it is not there.
pub fn read_docker(root: &Path, id: &str) -> Option<Container> {
    let path = root.join("containers").join(id).join("config.v2.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let name = v["Name"].as_str()?.trim_start_matches('/').to_string();
    let labels = v["Config"]["Labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Some(Container { name, labels })
}

/// The container id in a cgroup path: `.../docker-<id>.scope` (systemd driver) or
/// `.../<id>` (cgroupfs driver), 64 hex digits.
pub fn container_of(path: &str) -> Option<String> {
    let last = path.rsplit('/').next()?;
    let id = last
        .strip_prefix("docker-")
        .and_then(|r| r.strip_suffix(".scope"))
        .unwrap_or(last);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// A policy with selectors, and its slot in the kernel.
#[derive(Debug, Clone)]
pub struct Rule {
    pub policy: String,
    pub slot: u32,
    pub selectors: Vec<Selector>,
}

/// A container cgroup seen under a guarded cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    pub cgroup: PathBuf,
    #[serde(skip)]
    pub cgroup_id: u64,
    pub container: String,
    /// Docker's name; None while its metadata is not readable.
    pub name: Option<String>,
    /// The policy a selector picked; None: the guarded parent's policy applies.
    pub policy: Option<String>,
    #[serde(skip)]
    slot: Option<u32>,
}

struct State {
    map: BpfHashMap<MapData, u64, u32>,
    rules: Vec<Rule>,
    docker_root: PathBuf,
    /// Watch descriptor → guarded cgroup directory.
    watches: HashMap<WatchDescriptor, PathBuf>,
    found: BTreeMap<PathBuf, Found>,
    /// Container cgroups whose metadata was missing, retried until the deadline.
    pending: BTreeMap<PathBuf, Instant>,
    /// What names the records of containers, also after they are gone.
    known: Arc<KnownCgroups>,
}

/// The discovery service: a thread reading inotify, and [`Discovery::update`] after each
/// (re)load.
pub struct Discovery {
    state: Arc<Mutex<State>>,
    known: Arc<KnownCgroups>,
    inotify: Arc<Inotify>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Discovery {
    /// Opens the pinned `CONTAINER_SLOTS` map and starts watching (nothing until `update`).
    pub fn start(maps_dir: &Path, docker_root: PathBuf) -> anyhow::Result<Self> {
        let map: BpfHashMap<MapData, u64, u32> =
            crate::kernel::maps::open_pinned(maps_dir, agent_common::map_names::CONTAINER_SLOTS)?
                .try_into()?;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(std::io::Error::from)
            .context("inotify_init1")?;
        let inotify = Arc::new(inotify);
        let known = Arc::new(KnownCgroups::default());
        let state = Arc::new(Mutex::new(State {
            map,
            rules: Vec::new(),
            docker_root,
            watches: HashMap::new(),
            found: BTreeMap::new(),
            pending: BTreeMap::new(),
            known: known.clone(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("containers".into())
            .spawn({
                let (state, inotify, stop) = (state.clone(), inotify.clone(), stop.clone());
                move || watch_loop(&state, &inotify, &stop)
            })?;
        Ok(Self {
            state,
            known,
            inotify,
            stop,
            thread: Some(thread),
        })
    }

    /// After a (re)load: the guarded cgroups to watch and the policies' selectors. Every
    /// container under them is matched again, and the kernel map made to agree.
    pub fn update(&self, parents: &[PathBuf], rules: Vec<Rule>) -> anyhow::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (&wd, _) in st.watches.iter() {
            let _ = self.inotify.rm_watch(wd);
        }
        st.watches.clear();
        st.rules = rules;
        let mut failed = None;
        for p in parents {
            let c = CString::new(p.as_os_str().as_bytes())?;
            let mask = AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_ONLYDIR;
            match self.inotify.add_watch(c.as_c_str(), mask) {
                Ok(wd) => {
                    st.watches.insert(wd, p.clone());
                }
                Err(e) => {
                    // The others are still watched; the caller hears about this one.
                    let e = std::io::Error::from(e);
                    failed.get_or_insert(anyhow::anyhow!(
                        "watching {} with inotify: {e}",
                        p.display()
                    ));
                }
            }
        }
        // Scan after the watches are in place, so nothing created in between is missed; the
        // kernel map then agrees with what was found, whatever failed above.
        st.rescan();
        st.sync_map()?;
        failed.map_or(Ok(()), Err)
    }

    /// The containers' cgroups by id, for the audit trail (kept after they are gone).
    pub fn known(&self) -> Arc<KnownCgroups> {
        self.known.clone()
    }

    /// The containers seen, for the control socket.
    pub fn snapshot(&self) -> Vec<Found> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.found.values().cloned().collect()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl State {
    /// Looks at one child cgroup of a guarded cgroup; matches it if it is a container and
    /// returns (cgroup id, slot) when a selector picked it.
    fn consider(&mut self, path: &Path) -> Option<(u64, u32)> {
        let meta = std::fs::metadata(path).ok()?;
        let Some(id) = container_of(&path.to_string_lossy()) else {
            // Not a container (a systemd scope, say): known by its path only.
            self.known.seen(meta.ino(), path, None, None);
            return None;
        };
        let info = read_docker(&self.docker_root, &id);
        let rule = info.as_ref().and_then(|c| {
            self.rules
                .iter()
                .find(|r| r.selectors.iter().any(|s| s.matches(c)))
        });
        if info.is_none() {
            self.pending
                .entry(path.to_path_buf())
                .or_insert_with(|| Instant::now() + METADATA_WAIT);
        } else {
            self.pending.remove(path);
        }
        let found = Found {
            cgroup: path.to_path_buf(),
            cgroup_id: meta.ino(),
            container: id,
            name: info.map(|c| c.name),
            policy: rule.map(|r| r.policy.clone()),
            slot: rule.map(|r| r.slot),
        };
        if let Some(r) = rule {
            tracing::info!(
                cgroup = %path.display(),
                container = found.name.as_deref().unwrap_or("?"),
                policy = %r.policy,
                "container matched"
            );
        }
        let pick = found.slot.map(|s| (found.cgroup_id, s));
        self.known.seen(
            found.cgroup_id,
            path,
            Some(&found.container),
            found.name.clone(),
        );
        self.found.insert(path.to_path_buf(), found);
        pick
    }

    /// `consider`, and the match written into the kernel at once.
    fn admit(&mut self, path: &Path) {
        if let Some((id, slot)) = self.consider(path)
            && let Err(e) = self.map.insert(id, slot, 0)
        {
            tracing::error!(
                "container {} stays under its parent's policy: {e}",
                path.display()
            );
        }
    }

    /// Writes the matches into the kernel map and removes everything else from it.
    fn sync_map(&mut self) -> anyhow::Result<()> {
        let wanted: HashMap<u64, u32> = self
            .found
            .values()
            .filter_map(|f| Some((f.cgroup_id, f.slot?)))
            .collect();
        for (id, slot) in &wanted {
            self.map
                .insert(id, slot, 0)
                .context("writing CONTAINER_SLOTS")?;
        }
        let stale: Vec<u64> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for k in stale {
            let _ = self.map.remove(&k);
        }
        Ok(())
    }

    /// Every child of every watched cgroup, from scratch (start, reload, lost events).
    fn rescan(&mut self) {
        self.found.clear();
        self.pending.clear();
        let parents: Vec<PathBuf> = self.watches.values().cloned().collect();
        let mut alive = HashSet::new();
        for p in parents {
            match std::fs::read_dir(&p) {
                Ok(entries) => {
                    for e in entries.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            alive.extend(e.metadata().ok().map(|m| m.ino()));
                            self.consider(&e.path());
                        }
                    }
                }
                Err(e) => tracing::error!("listing {}: {e}", p.display()),
            }
        }
        self.known.keep_only(&alive);
    }

    fn gone(&mut self, path: &Path) {
        self.pending.remove(path);
        if let Some(f) = self.found.remove(path) {
            let _ = self.map.remove(&f.cgroup_id);
        }
        self.known.gone(path);
    }
}

fn watch_loop(state: &Mutex<State>, inotify: &Inotify, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let _ = poll(
            &mut [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)],
            100u16,
        );
        // The descriptor is non-blocking: nothing to read (EAGAIN) is no events.
        let events = inotify.read_events().unwrap_or_default();
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        for ev in events {
            let name = ev.name.as_deref().unwrap_or_default();
            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                // Events were lost: look at everything again.
                tracing::warn!("container discovery: inotify queue overflowed; rescanning");
                st.rescan();
                if let Err(e) = st.sync_map() {
                    tracing::error!("container discovery: {e:#}");
                }
                continue;
            }
            if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                if let Some(p) = st.watches.remove(&ev.wd) {
                    tracing::error!(
                        "guarded cgroup {} was removed: what is created there again is guarded only after a reload or restart",
                        p.display()
                    );
                }
                continue;
            }
            let Some(parent) = st.watches.get(&ev.wd).cloned() else {
                continue;
            };
            let path = parent.join(name);
            if ev
                .mask
                .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            {
                st.admit(&path);
            } else if ev.mask.contains(AddWatchFlags::IN_DELETE) {
                st.gone(&path);
            }
        }
        // Metadata that was not there yet (a container still being created).
        let now = Instant::now();
        let due: Vec<(PathBuf, Instant)> =
            st.pending.iter().map(|(p, d)| (p.clone(), *d)).collect();
        for (path, deadline) in due {
            st.admit(&path);
            if now > deadline && st.pending.remove(&path).is_some() {
                tracing::warn!(
                    "no Docker metadata for {} after {METADATA_WAIT:?}: it stays under its parent's policy",
                    path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("openhands-app", "openhands-app"));
        assert!(!glob_match("openhands-app", "openhands-app2"));
        assert!(glob_match("openhands-runtime-*", "openhands-runtime-abc"));
        assert!(glob_match("openhands-runtime-*", "openhands-runtime-"));
        assert!(!glob_match("openhands-runtime-*", "openhands-app"));
        assert!(glob_match("*-app", "openhands-app"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn selectors_parse_and_match() {
        let c = Container {
            name: "openhands-runtime-7".into(),
            labels: [("role".to_string(), "sandbox".to_string())].into(),
        };
        let s = |t: &str| t.parse::<Selector>().unwrap();
        assert!(s("name:openhands-runtime-*").matches(&c));
        assert!(!s("name:openhands-app").matches(&c));
        assert!(s("label:role").matches(&c));
        assert!(s("label:role=sand*").matches(&c));
        assert!(!s("label:role=app").matches(&c));
        assert!(!s("label:other").matches(&c));
        for bad in [
            "openhands-app",
            "name:",
            "name:a b",
            "label:",
            "label:a*=b",
            "id:x",
        ] {
            let e = bad.parse::<Selector>().unwrap_err();
            assert!(e.contains("name:GLOB"), "{bad}: {e}");
        }
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "0123456789abcdef".repeat(4);
        assert_eq!(
            container_of(&format!("/system.slice/docker-{id}.scope")),
            Some(id.clone())
        );
        assert_eq!(container_of(&format!("/openhands/{id}")), Some(id.clone()));
        assert_eq!(container_of("/openhands.slice/something"), None);
        assert_eq!(container_of("/docker/short"), None);
    }

    #[test]
    fn known_cgroups_outlive_their_containers_for_a_while() {
        let known = KnownCgroups::default();
        let dir = |id: u64| PathBuf::from(format!("/sys/fs/cgroup/s/{id}"));
        let container = "ab".repeat(32);
        known.seen(7, &dir(7), Some(&container), Some("short-lived".into()));
        // Metadata gone by a later look (the container was removed): the name stays.
        known.seen(7, &dir(7), Some(&container), None);
        known.gone(&dir(7));
        let k = known.get(7).expect("a removed container is still known");
        assert_eq!(k.name.as_deref(), Some("short-lived"));
        assert_eq!(k.container.as_deref(), Some(container.as_str()));
        assert!(k.gone_at.is_some());
        // Other cgroups (a systemd scope) are known by their path.
        known.seen(8, &dir(8), None, None);
        assert_eq!(known.get(8).unwrap().cgroup, dir(8));
        // A rescan marks what it did not find as gone, and keeps what it found alive.
        known.seen(9, &dir(9), Some(&container), Some("vanished".into()));
        known.keep_only(&HashSet::from([8]));
        assert!(known.get(8).unwrap().gone_at.is_none());
        assert!(known.get(9).unwrap().gone_at.is_some());
        // Only the long gone are forgotten.
        forget_gone(&mut known.lock(), Duration::ZERO);
        assert!(known.get(7).is_none() && known.get(9).is_none());
        assert!(known.get(8).is_some());
    }

    #[test]
    fn docker_metadata_gives_name_and_labels() {
        let root = std::env::temp_dir().join(format!("eg-containers-{}", std::process::id()));
        let id = "ab".repeat(32);
        std::fs::create_dir_all(root.join("containers").join(&id)).unwrap();
        std::fs::write(
            root.join("containers").join(&id).join("config.v2.json"),
            r#"{"Name":"/openhands-app","Config":{"Labels":{"role":"app"}}}"#,
        )
        .unwrap();
        let c = read_docker(&root, &id).unwrap();
        assert_eq!(c.name, "openhands-app");
        assert_eq!(c.labels.get("role").map(String::as_str), Some("app"));
        assert_eq!(read_docker(&root, &"cd".repeat(32)), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
