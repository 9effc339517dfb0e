//! Kernel events and agent happenings become JSON records of one documented schema
//! (docs/events.md): decode, then enrich once (policy name, cgroup, container, host, time).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use agent_common::event::{
    ARGS_LEN, EventHeader, ExecEvent, ExitEvent, FILENAME_LEN, NetEvent, VERDICT_ALLOW,
    VERDICT_DENY, kind, reason,
};
use nix::{
    time::{ClockId, clock_gettime},
    unistd::gethostname,
};
use serde_json::{Map, Value};

/// Version of the record schema (docs/events.md).
pub const SCHEMA_VERSION: u32 = 1;

/// Everything a record is enriched with.
pub struct Enricher {
    host: String,
    /// The EC2 instance id, where the machine is one.
    instance: Option<String>,
    /// Where Docker keeps container metadata (`containers/<id>/config.v2.json`).
    docker_root: PathBuf,
    /// Full container id → name.
    container_names: HashMap<String, Option<String>>,
    /// Wall clock minus CLOCK_BOOTTIME, to turn kernel timestamps into wall-clock time.
    boot_to_wall_ns: i128,
    /// Policy names by slot.
    policies: Vec<String>,
    cgroup_root: PathBuf,
    guarded: Vec<PathBuf>,
    /// Cgroup id → path relative to the cgroup2 root (None: not found under a guarded cgroup).
    cgroups: HashMap<u64, Option<String>>,
    /// When the last scan of the guarded cgroups started (CLOCK_BOOTTIME ns, the clock of
    /// kernel timestamps).
    last_scan_ns: Option<u64>,
    /// The DNS learner: which names a destination was answered for.
    pub learned: Option<std::sync::Arc<std::sync::Mutex<crate::dns::learned::Learner>>>,
    /// Container cgroups by id from discovery, kept after they are gone.
    pub known: Option<std::sync::Arc<crate::containers::KnownCgroups>>,
}

fn clock_ns(clock: ClockId) -> i128 {
    // The clocks used here always exist on Linux.
    clock_gettime(clock).map_or(0, |ts| {
        i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())
    })
}

pub fn hostname() -> String {
    match gethostname() {
        Ok(name) => name.to_string_lossy().into_owned(),
        Err(_) => "unknown".into(),
    }
}

impl Enricher {
    pub fn new(cgroup_root: PathBuf) -> Self {
        Self {
            host: hostname(),
            instance: ec2_instance_id(),
            docker_root: PathBuf::from(crate::config::DEFAULT_DOCKER_ROOT),
            container_names: HashMap::new(),
            boot_to_wall_ns: clock_ns(ClockId::CLOCK_REALTIME) - clock_ns(ClockId::CLOCK_BOOTTIME),
            policies: Vec::new(),
            cgroup_root,
            guarded: Vec::new(),
            cgroups: HashMap::new(),
            last_scan_ns: None,
            learned: None,
            known: None,
        }
    }

    /// Where Docker keeps its container metadata (`[docker] root`).
    pub fn set_docker_root(&mut self, root: PathBuf) {
        self.docker_root = root;
    }

    /// This machine, as metrics name it: the EC2 instance id, else the host name.
    pub fn identity(&self) -> String {
        self.instance.clone().unwrap_or_else(|| self.host.clone())
    }

    /// Re-reads the wall-clock offset: the clock may have been stepped (NTP) since start.
    pub fn refresh_clock(&mut self) {
        self.boot_to_wall_ns =
            clock_ns(ClockId::CLOCK_REALTIME) - clock_ns(ClockId::CLOCK_BOOTTIME);
    }

    /// After a (re)load: policy names by slot, and the guarded cgroups.
    pub fn set_policies(&mut self, by_slot: Vec<String>, guarded: Vec<PathBuf>) {
        self.policies = by_slot;
        self.guarded = guarded;
        self.cgroups.clear();
        self.last_scan_ns = None;
    }

    fn ts(&self, boot_ns: u64) -> String {
        let wall = i128::from(boot_ns) + self.boot_to_wall_ns;
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(wall.max(0) as u64);
        humantime::format_rfc3339_nanos(t).to_string()
    }

    fn now(&self) -> String {
        humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
    }

    /// The record's common fields.
    fn base(&self, ts: String, type_: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("version".into(), SCHEMA_VERSION.into());
        m.insert("ts".into(), ts.into());
        m.insert("type".into(), type_.into());
        m.insert("host".into(), self.host.clone().into());
        m.insert(
            "instance".into(),
            self.instance.clone().map_or(Value::Null, Value::from),
        );
        m
    }

    /// An `agent.*` record.
    pub fn agent(&self, type_: &str, fields: Value) -> Value {
        let mut m = self.base(self.now(), type_);
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        Value::Object(m)
    }

    /// A `net.*` record from the kernel.
    pub fn net(&mut self, e: &NetEvent) -> Value {
        let h = &e.hdr;
        let type_ = match h.kind {
            kind::NET_CONNECT => "net.connect",
            kind::NET_SEND => "net.send",
            kind::NET_PACKET => "net.packet",
            kind::NET_SOCKET => "net.socket",
            _ => "net.unknown",
        };
        let mut m = self.base(self.ts(h.ts_ns), type_);
        self.task_fields(&mut m, h);
        m.insert("verdict".into(), verdict(e.verdict).into());
        m.insert("reason".into(), reason_name(e.reason).into());
        if h.kind == kind::NET_SOCKET {
            m.insert("family".into(), family(e.sock_family));
            m.insert("sock_type".into(), (e.sock_type & 0xf).into());
            m.insert("protocol".into(), e.sock_protocol.into());
        } else {
            m.insert("proto".into(), proto(e.proto));
            m.insert("dst".into(), dst(e));
            m.insert("port".into(), e.port.into());
            m.insert("hostnames".into(), self.hostnames(e));
        }
        Value::Object(m)
    }

    /// The names the destination was answered for by the DNS proxy (in this policy).
    fn hostnames(&self, e: &NetEvent) -> Value {
        let ip = if e.v4 != 0 {
            std::net::IpAddr::from([e.addr[0], e.addr[1], e.addr[2], e.addr[3]])
        } else {
            std::net::IpAddr::from(e.addr)
        };
        let names = match &self.learned {
            Some(l) => l
                .lock()
                .map(|l| l.names_of(e.hdr.slot, ip))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        Value::from(names)
    }

    /// A `dns` record: the proxy's fields, and the process and container behind the query
    /// (null when the kernel did not see it).
    pub fn dns(&mut self, fields: Value, task: Option<&EventHeader>) -> Value {
        let mut m = self.base(self.now(), "dns");
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        match task {
            Some(h) => self.process_fields(&mut m, h),
            None => {
                for k in [
                    "cgroup",
                    "container",
                    "container_name",
                    "pid",
                    "tid",
                    "uid",
                    "comm",
                ] {
                    m.insert(k.into(), Value::Null);
                }
            }
        }
        Value::Object(m)
    }

    /// The fields every record about a process carries (`net.*` and `proc.*`).
    fn task_fields(&mut self, m: &mut Map<String, Value>, h: &EventHeader) {
        let policy = self
            .policies
            .get(h.slot as usize)
            .filter(|n| !n.is_empty())
            .cloned();
        m.insert("policy".into(), policy.map_or(Value::Null, Value::from));
        // The record's identity across deliveries: a record read again after a crash (at
        // least once) has the same kernel_ns, while its wall-clock ts may differ slightly.
        m.insert("kernel_ns".into(), h.ts_ns.into());
        self.process_fields(m, h);
    }

    /// Cgroup, container and process of `h`.
    fn process_fields(&mut self, m: &mut Map<String, Value>, h: &EventHeader) {
        let known = self.known.as_ref().and_then(|k| k.get(h.cgroup_id));
        let (cgroup, container, name) = match known {
            // A child of a guarded cgroup, as discovery saw it appear: also when it is gone by
            // now (a `docker run --rm` container that lived a fraction of a second).
            Some(k) => {
                let name = match (&k.name, &k.container) {
                    (Some(n), _) => Some(n.clone()),
                    (None, Some(id)) => self.container_name(id),
                    (None, None) => None,
                };
                (Some(self.relative(&k.cgroup)), k.container, name)
            }
            None => {
                let cgroup = self.cgroup_path(h.cgroup_id, h.ts_ns);
                let container = cgroup.as_deref().and_then(crate::containers::container_of);
                let name = container.as_deref().and_then(|id| self.container_name(id));
                (cgroup, container, name)
            }
        };
        m.insert(
            "container".into(),
            container.map_or(Value::Null, |id| Value::from(&id[..12])),
        );
        m.insert(
            "container_name".into(),
            name.map_or(Value::Null, Value::from),
        );
        m.insert("cgroup".into(), cgroup.map_or(Value::Null, Value::from));
        if h.tgid != 0 {
            m.insert("pid".into(), h.tgid.into());
            m.insert("tid".into(), h.pid.into());
            m.insert("uid".into(), h.uid.into());
            m.insert("comm".into(), comm(&h.comm).into());
        } else {
            for k in ["pid", "tid", "uid", "comm"] {
                m.insert(k.into(), Value::Null);
            }
        }
    }

    /// A `proc.exec` record.
    pub fn exec(&mut self, e: &ExecEvent) -> Value {
        let mut m = self.base(self.ts(e.hdr.ts_ns), "proc.exec");
        self.task_fields(&mut m, &e.hdr);
        m.insert(
            "ppid".into(),
            if e.ppid == 0 {
                Value::Null
            } else {
                e.ppid.into()
            },
        );
        let name_len = (e.filename_len as usize).min(FILENAME_LEN);
        m.insert("filename".into(), comm(&e.filename[..name_len]).into());
        let args_len = (e.args_len as usize).min(ARGS_LEN);
        let mut argv: Vec<String> = e.args[..args_len]
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // The list ends with a NUL; a cut list ends inside an argument.
        if argv.last().is_some_and(String::is_empty) {
            argv.pop();
        }
        m.insert("argv".into(), argv.into());
        m.insert("argv_truncated".into(), (e.args_total > e.args_len).into());
        Value::Object(m)
    }

    /// A `proc.exit` record.
    pub fn exit(&mut self, e: &ExitEvent) -> Value {
        let mut m = self.base(self.ts(e.hdr.ts_ns), "proc.exit");
        self.task_fields(&mut m, &e.hdr);
        let signal = e.exit_code & 0x7f;
        let (code, sig) = if signal != 0 {
            (Value::Null, signal.into())
        } else {
            (((e.exit_code >> 8) & 0xff).into(), Value::Null)
        };
        m.insert("exit_code".into(), code);
        m.insert("signal".into(), sig);
        m.insert(
            "lifetime_ms".into(),
            if e.lifetime_ns == 0 {
                Value::Null
            } else {
                (e.lifetime_ns as f64 / 1e6).into()
            },
        );
        Value::Object(m)
    }

    /// Docker's name for a container (without the leading '/'), from its metadata file.
    fn container_name(&mut self, full_id: &str) -> Option<String> {
        if let Some(n) = self.container_names.get(full_id) {
            return n.clone();
        }
        let name = crate::containers::read_docker(&self.docker_root, full_id).map(|c| c.name);
        // Bounded: forget everything when many containers have come and gone.
        if self.container_names.len() > 4096 {
            self.container_names.clear();
        }
        self.container_names
            .insert(full_id.to_string(), name.clone());
        name
    }

    /// The cgroup of `id` relative to the cgroup2 root, found under a guarded cgroup, for an
    /// event at `event_ns` (CLOCK_BOOTTIME).
    fn cgroup_path(&mut self, id: u64, event_ns: u64) -> Option<String> {
        if let Some(p) = self.cgroups.get(&id) {
            return p.clone();
        }
        // Rescan only for an event newer than the last scan: its cgroup existed when it
        // happened, so a scan started now finds it (a container's first connect), while a storm
        // of records from one drained batch walks the tree once.
        if self.last_scan_ns.is_none_or(|t| event_ns > t) {
            self.last_scan_ns = Some(clock_ns(ClockId::CLOCK_BOOTTIME) as u64);
            for g in self.guarded.clone() {
                self.scan(&g, 0);
            }
        }
        // A miss is not cached: the cgroup may appear in the next scan (a container starting).
        self.cgroups.get(&id).cloned().flatten()
    }

    /// A cgroup directory as records write it: relative to the cgroup2 root, with a leading '/'.
    fn relative(&self, dir: &Path) -> String {
        format!(
            "/{}",
            dir.strip_prefix(&self.cgroup_root).unwrap_or(dir).display()
        )
    }

    fn scan(&mut self, dir: &Path, depth: usize) {
        // Bounded: cgroups of containers long gone are forgotten.
        if depth == 0 && self.cgroups.len() > 65_536 {
            self.cgroups.clear();
        }
        if let Ok(meta) = std::fs::metadata(dir) {
            let rel = self.relative(dir);
            self.cgroups.insert(meta.ino(), Some(rel));
        }
        if depth >= 16 {
            return;
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    self.scan(&e.path(), depth + 1);
                }
            }
        }
    }
}

fn comm(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn reason_name(r: u8) -> &'static str {
    match r {
        reason::RULE => "rule",
        reason::NO_RULE_FOR_ADDRESS => "no_rule_for_address",
        reason::PORT_OR_PROTOCOL => "port_or_protocol_not_allowed",
        reason::NO_ACTIVE_POLICY => "no_active_policy",
        reason::PROTOCOL => "protocol_not_allowed",
        reason::SOCKET_TYPE => "socket_type_refused",
        reason::UNREADABLE_PACKET => "unreadable_packet",
        _ => "unknown",
    }
}

fn verdict(v: u8) -> &'static str {
    match v {
        VERDICT_ALLOW => "allow",
        VERDICT_DENY => "deny",
        _ => "would_deny",
    }
}

fn proto(p: u8) -> Value {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 | 58 => "icmp".into(),
        0 => Value::Null,
        n => n.into(),
    }
}

fn family(f: u32) -> Value {
    match f {
        2 => "inet".into(),
        10 => "inet6".into(),
        17 => "packet".into(),
        n => n.into(),
    }
}

fn dst(e: &NetEvent) -> Value {
    if e.addr == [0; 16] && e.port == 0 && e.proto == 0 {
        return Value::Null;
    }
    if e.v4 != 0 {
        std::net::Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3])
            .to_string()
            .into()
    } else {
        std::net::Ipv6Addr::from(e.addr).to_string().into()
    }
}

/// The EC2 instance id: Nitro instances expose it as the DMI board asset tag.
pub fn ec2_instance_id() -> Option<String> {
    let tag = std::fs::read_to_string("/sys/devices/virtual/dmi/id/board_asset_tag").ok()?;
    let tag = tag.trim();
    tag.starts_with("i-").then(|| tag.to_string())
}

/// Whether a record is an allowed UDP send (aggregated per flow).
pub fn is_allowed_send(e: &NetEvent) -> bool {
    e.hdr.kind == kind::NET_SEND && e.verdict == VERDICT_ALLOW
}

/// Aggregation key of an allowed UDP send: process, cgroup and destination.
pub fn flow_key(e: &NetEvent) -> (u64, u32, [u8; 16], u16) {
    (e.hdr.cgroup_id, e.hdr.tgid, e.addr, e.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_come_from_docker_metadata() {
        let root = std::env::temp_dir().join(format!("eg-docker-{}", std::process::id()));
        let id = "0123456789abcdef".repeat(4);
        std::fs::create_dir_all(root.join("containers").join(&id)).unwrap();
        std::fs::write(
            root.join("containers").join(&id).join("config.v2.json"),
            r#"{"Name":"/openhands-runtime-1"}"#,
        )
        .unwrap();
        let mut en = Enricher::new(PathBuf::from("/nonexistent"));
        en.docker_root = root.clone();
        assert_eq!(
            en.container_name(&id).as_deref(),
            Some("openhands-runtime-1")
        );
        assert_eq!(en.container_name(&"f".repeat(64)), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn net_records_carry_the_schema_fields() {
        let mut en = Enricher::new(PathBuf::from("/nonexistent"));
        en.set_policies(vec!["app".into()], Vec::new());
        let mut e = NetEvent::default();
        e.hdr.kind = kind::NET_CONNECT;
        e.hdr.tgid = 42;
        e.hdr.pid = 43;
        e.hdr.comm[..5].copy_from_slice(b"curl\0");
        e.addr[..4].copy_from_slice(&[192, 0, 2, 7]);
        e.v4 = 1;
        e.port = 443;
        e.proto = 6;
        e.verdict = VERDICT_DENY;
        let r = en.net(&e);
        assert_eq!(r["type"], "net.connect");
        assert_eq!(r["policy"], "app");
        assert_eq!(r["pid"], 42);
        assert_eq!(r["comm"], "curl");
        assert_eq!(r["dst"], "192.0.2.7");
        assert_eq!(r["port"], 443);
        assert_eq!(r["proto"], "tcp");
        assert_eq!(r["verdict"], "deny");
        assert_eq!(
            r["reason"], "rule",
            "reason 0 is the allowing rule (set by the kernel)"
        );
        assert_eq!(r["version"], SCHEMA_VERSION);
        assert!(r["ts"].as_str().unwrap().ends_with('Z'));
    }
}
