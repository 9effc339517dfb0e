//! The policy configuration: TOML schema, parsing and validation.
//!
//! Every mistake is reported as `FILE:LINE: reason`, all of them at once, and nothing is
//! applied unless the whole file is valid (a bad reload keeps the old policy in force).
//! Cgroup paths are checked against the live cgroup2 tree separately, in [`resolve_cgroups`].

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::Range,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use agent_common::{MAX_POLICIES, POLICY_NAME_LEN, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress-guard";

/// Enforce refuses what the policy does not allow; audit decides and counts the same way but
/// lets everything through (for rollout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub log_level: Option<String>,
    pub pin_dir: PathBuf,
    pub audit: Audit,
    pub control: Control,
    pub dns: Dns,
    /// `[cloudwatch]`: absent, nothing is shipped.
    pub cloudwatch: Option<CloudWatch>,
    /// `[docker] root`: where Docker keeps container metadata (names, labels).
    pub docker_root: PathBuf,
    pub policies: Vec<Policy>,
}

pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/egress-guard/spool";

/// `[cloudwatch]`: shipping the audit trail to CloudWatch Logs.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudWatch {
    pub log_group: String,
    /// Default: the EC2 instance id, else the host name.
    pub log_stream: Option<String>,
    /// Default: the SDK's (AWS_REGION, the profile, IMDS on EC2).
    pub region: Option<String>,
    /// A VPC endpoint, or a test server.
    pub endpoint: Option<String>,
    pub flush_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// How often the EMF metrics are written (default 60 s).
    pub metrics_interval: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloudWatch {
    log_group: String,
    log_stream: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    flush_interval: Option<String>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    metrics_interval: Option<String>,
}

fn validate_cloudwatch(raw: RawCloudWatch) -> Result<CloudWatch, Vec<String>> {
    let mut problems = Vec::new();
    let name_ok = |s: &str, extra: &str| {
        !s.is_empty()
            && s.len() <= 512
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/#".contains(c) || extra.contains(c))
    };
    if !name_ok(&raw.log_group, "") {
        problems.push(format!(
            "[cloudwatch] log_group {:?}: 1 to 512 characters of letters, digits, '.', '_', '-', '/' and '#'",
            raw.log_group
        ));
    }
    if let Some(st) = &raw.log_stream
        && (st.is_empty() || st.len() > 512 || st.contains([':', '*']))
    {
        problems.push(format!(
            "[cloudwatch] log_stream {st:?}: 1 to 512 characters, no ':' or '*'"
        ));
    }
    if let Some(e) = &raw.endpoint
        && !(e.starts_with("https://") || e.starts_with("http://"))
    {
        problems.push(format!(
            "[cloudwatch] endpoint {e:?} must be a URL (https://logs.REGION.amazonaws.com, a VPC endpoint, or http:// for a test server)"
        ));
    }
    let flush_interval = match raw.flush_interval {
        Some(t) => match humantime::parse_duration(&t) {
            Ok(d) if (Duration::from_millis(100)..=Duration::from_secs(60)).contains(&d) => d,
            Ok(_) => {
                problems.push(format!(
                    "[cloudwatch] flush_interval = {t:?}: must be from 100ms to 60s"
                ));
                Duration::from_secs(1)
            }
            Err(e) => {
                problems.push(format!("[cloudwatch] flush_interval = {t:?}: {e}"));
                Duration::from_secs(1)
            }
        },
        None => Duration::from_secs(1),
    };
    let metrics_interval = match raw.metrics_interval {
        Some(t) => match humantime::parse_duration(&t) {
            Ok(d) if (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d) => d,
            _ => {
                problems.push(format!(
                    "[cloudwatch] metrics_interval = {t:?}: a duration from 1s to 1h"
                ));
                Duration::from_secs(60)
            }
        },
        None => Duration::from_secs(60),
    };
    let spool_dir = raw
        .spool_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR));
    if !spool_dir.is_absolute() {
        problems.push(format!(
            "[cloudwatch] spool_dir {:?} must be an absolute path",
            spool_dir
        ));
    }
    let spool_max_bytes = raw.spool_max_bytes.unwrap_or(1 << 30);
    if spool_max_bytes < 32 << 20 {
        problems.push(format!(
            "[cloudwatch] spool_max_bytes = {spool_max_bytes}: at least 33554432 (32 MiB)"
        ));
    }
    if problems.is_empty() {
        Ok(CloudWatch {
            log_group: raw.log_group,
            log_stream: raw.log_stream,
            region: raw.region,
            endpoint: raw.endpoint,
            flush_interval,
            spool_dir,
            spool_max_bytes,
            metrics_interval,
        })
    } else {
        Err(problems)
    }
}

/// How guarded processes resolve names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    /// All their DNS (UDP and TCP port 53, to any address) is redirected in the kernel to the
    /// agent's proxy, which answers only allowed names and learns the answered addresses.
    Proxy,
    /// Their DNS goes to the policy's `dns` servers directly; allowed hostnames are learned only
    /// by the agent resolving them itself (exact names only; no protection against DNS
    /// tunnelling).
    Direct,
}

impl fmt::Display for DnsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DnsMode::Proxy => "proxy",
            DnsMode::Direct => "direct",
        })
    }
}

/// What the proxy answers for a name the policy does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Refusal {
    Refused,
    Nxdomain,
}

/// What the proxy does with an answer holding private addresses (RFC 1918 IPv4, IPv6 unique
/// local `fc00::/7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivateAnswers {
    /// Learn them like any other address (VPC endpoints and private APIs answer with them).
    Allow,
    /// Refuse the whole answer (the client gets the `refuse` answer); nothing of it is learned.
    Refuse,
}

pub const DEFAULT_DNS_LISTEN: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);
pub const DEFAULT_DNS_PORT: u16 = 10053;

/// `[dns]`: the DNS proxy and hostname learning.
#[derive(Debug, Clone, PartialEq)]
pub struct Dns {
    pub mode: DnsMode,
    /// Where the proxy listens (an address of this host the guarded containers can reach:
    /// Docker's bridge gateway by default).
    pub listen: Ipv4Addr,
    /// The policy in slot N has its proxy on `port + N` (the port tells the proxy the policy).
    pub port: u16,
    pub refuse: Refusal,
    /// A learned address stays allowed for the answer's TTL, at least `min_ttl` and at most
    /// `max_ttl` (answers' TTLs are lowered to `max_ttl`, so clients never cache longer).
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// Per attempt; after `upstream_attempts` the client gets SERVFAIL.
    pub upstream_timeout: Duration,
    pub upstream_attempts: u32,
    /// Learned (name, address) pairs per policy. When full, idle pairs of the container
    /// holding the most are evicted; if none can be, answers are SERVFAIL.
    pub max_learned: usize,
    /// Learned pairs one container (cgroup) may hold in its policy; beyond it, its own idle
    /// pairs are evicted, else its answer is refused. Default: `max_learned` / 8.
    pub max_learned_per_container: usize,
    /// Distinct names under a wildcard one container may have sent upstream in any 60 s;
    /// beyond it, new names are refused without being sent.
    pub wildcard_names_per_minute: usize,
    /// Addresses never allowed from a DNS answer, whatever the name (DNS rebinding to the
    /// cloud metadata service, the host, …).
    pub never_learn: Vec<IpNet>,
    /// `"host"` in `never_learn`: every address of this host's (non-loopback) interfaces, as
    /// they are now (re-read every second).
    pub never_learn_host: bool,
    /// Answers with RFC 1918 / unique local addresses: learned, or refused.
    pub private_answers: PrivateAnswers,
}

/// `[dns] never_learn`'s word for every address of this host's interfaces.
pub const NEVER_LEARN_HOST: &str = "host";

/// The default `[dns] wildcard_names_per_minute`. Real work under a wildcard asks a handful
/// of distinct names a minute (pip: pypi.org and files.pythonhosted.org; a CDN: a few shard
/// hosts; S3: one per bucket), so 100 leaves an order of magnitude of headroom. A DNS tunnel
/// needs a new name for every ~100 bytes (4 labels of 40 base32 characters): 100 names a
/// minute caps it at ~10 KB a minute per container, where unlimited it was megabytes.
pub const DEFAULT_WILDCARD_NAMES_PER_MINUTE: usize = 100;

/// The default `[dns] never_learn`: this host (its interface addresses, kept current) and
/// network, link-local (the cloud metadata service at 169.254.169.254), AWS's IPv6 metadata,
/// DNS and time services (`fd00:ec2::254`, `::253`, `::123`), multicast and broadcast.
pub const DEFAULT_NEVER_LEARN: [&str; 11] = [
    NEVER_LEARN_HOST,
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "fe80::/10",
    "fd00:ec2::/32",
    "ff00::/8",
];

impl Default for Dns {
    fn default() -> Self {
        Self {
            mode: DnsMode::Proxy,
            listen: DEFAULT_DNS_LISTEN,
            port: DEFAULT_DNS_PORT,
            refuse: Refusal::Refused,
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
            upstream_timeout: Duration::from_millis(1500),
            upstream_attempts: 2,
            max_learned: 16_384,
            max_learned_per_container: 16_384 / 8,
            wildcard_names_per_minute: DEFAULT_WILDCARD_NAMES_PER_MINUTE,
            never_learn: DEFAULT_NEVER_LEARN
                .iter()
                .filter(|n| **n != NEVER_LEARN_HOST)
                .map(|n| n.parse().expect("constant"))
                .collect(),
            never_learn_host: true,
            private_answers: PrivateAnswers::Allow,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawDns {
    mode: Option<DnsMode>,
    listen: Option<String>,
    port: Option<u16>,
    refuse: Option<Refusal>,
    min_ttl: Option<String>,
    max_ttl: Option<String>,
    upstream_timeout: Option<String>,
    upstream_attempts: Option<u32>,
    max_learned: Option<usize>,
    max_learned_per_container: Option<usize>,
    wildcard_names_per_minute: Option<usize>,
    never_learn: Option<Vec<String>>,
    private_answers: Option<PrivateAnswers>,
}

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/egress-guard/control.sock";

/// `[control]`: the local control socket of the CLI.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Control {
    pub socket: PathBuf,
    /// Members of this group may read (status, events, …); only root may change state.
    pub group: String,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            group: "egress-guard".into(),
        }
    }
}

pub const DEFAULT_AUDIT_FILE: &str = "/var/log/egress-guard/audit.jsonl";

/// `[audit]`: where and how the audit trail is written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// JSON-lines file sink.
    pub file: PathBuf,
    /// Rotate the file when it reaches this size.
    pub file_max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` … `.N`); older ones are deleted.
    pub file_keep: u32,
    /// Size of the kernel ring buffer (a power of two, at least 4096); takes effect when the
    /// pinned ring is created (after `egress-guard uninstall`).
    pub ring_buffer_bytes: u32,
    /// Allowed UDP sends to one destination are written as one record per this many seconds,
    /// with a count.
    pub udp_aggregate_seconds: u64,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            file: PathBuf::from(DEFAULT_AUDIT_FILE),
            file_max_bytes: 100 << 20,
            file_keep: 5,
            ring_buffer_bytes: agent_common::event::DEFAULT_RING_BYTES,
            udp_aggregate_seconds: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub cgroups: Vec<CgroupEntry>,
    /// Containers under any guarded cgroup that this policy takes over (container discovery).
    pub containers: Vec<crate::containers::Selector>,
    /// Address and CIDR rules, including those implied by `ntp`, `allow_loopback` and, in
    /// direct DNS mode, `dns`.
    pub rules: Vec<Rule>,
    /// Hostname rules: their addresses are learned from DNS answers.
    pub hostnames: Vec<HostnameRule>,
    /// The `dns` servers: the proxy's upstreams (and, in direct mode, allowed directly).
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CgroupEntry {
    pub path: String,
    pub line: usize,
}

/// `protos` to `net` on ports `ports.0..=ports.1`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub net: IpNet,
    pub protos: u8,
    pub ports: (u16, u16),
    pub line: usize,
    /// The entry as written, for messages and `policy` listings.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostnameRule {
    /// Lower case, no trailing dot; `*.suffix` for wildcards.
    pub name: String,
    pub protos: u8,
    pub ports: (u16, u16),
    pub line: usize,
}

/// One thing wrong with the configuration, at a line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the configuration: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", render_problems(.file, .problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

fn render_problems(file: &str, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{file}:{}: {}", p.line, p.reason));
    }
    out
}

// ------------------------------------------------------------------------------------------
// The file as written.
// ------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mode: Option<Spanned<Mode>>,
    log_level: Option<Spanned<String>>,
    pin_dir: Option<Spanned<String>>,
    audit: Option<Spanned<Audit>>,
    control: Option<Spanned<Control>>,
    dns: Option<Spanned<RawDns>>,
    cloudwatch: Option<Spanned<RawCloudWatch>>,
    docker: Option<Spanned<RawDocker>>,
    #[serde(default)]
    policy: Vec<Spanned<RawPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    root: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    mode: Option<Spanned<Mode>>,
    #[serde(default)]
    cgroups: Vec<Spanned<String>>,
    #[serde(default)]
    containers: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    dns: Vec<Spanned<String>>,
    #[serde(default)]
    ntp: Vec<Spanned<String>>,
    allow_loopback: Option<Spanned<bool>>,
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates configuration text; `path` is used for messages.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let lines = LineIndex::new(text);
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
        file: file.clone(),
        problems: vec![Problem {
            line: e.span().map_or(1, |s| lines.line(s.start)),
            reason: e.message().trim().to_string(),
        }],
    })?;
    let mut problems = Vec::new();
    let config = validate(raw, path, &lines, &mut problems);
    if problems.is_empty() {
        Ok(config)
    } else {
        problems.sort_by_key(|p| p.line);
        Err(ConfigError::Invalid { file, problems })
    }
}

struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        Self(text.match_indices('\n').map(|(i, _)| i).collect())
    }
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&nl| nl < offset) + 1
    }
    fn of<T>(&self, s: &Spanned<T>) -> usize {
        self.line(s.span().start)
    }
    fn span(&self, r: Range<usize>) -> usize {
        self.line(r.start)
    }
}

fn validate(raw: RawConfig, path: &Path, lines: &LineIndex, problems: &mut Vec<Problem>) -> Config {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });

    let default_mode = raw.mode.as_ref().map_or(Mode::Enforce, |m| *m.get_ref());
    let log_level = raw.log_level.map(|l| {
        if let Err(e) = l.get_ref().parse::<tracing_subscriber::EnvFilter>() {
            problem(
                lines.of(&l),
                format!(
                    "log_level {:?} is not a valid level or filter: {e}",
                    l.get_ref()
                ),
            );
        }
        l.into_inner()
    });
    let pin_dir = match raw.pin_dir {
        Some(p) => {
            let dir = Path::new(p.get_ref());
            let own_dir = dir
                .components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .count()
                >= 4
                || !dir.starts_with("/sys/fs/bpf");
            if dir
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
                || !own_dir
                || dir == Path::new("/")
            {
                problem(
                    lines.of(&p),
                    format!(
                        "pin_dir {:?} must be a directory of its own on a bpf filesystem, without '..', e.g. {DEFAULT_PIN_DIR}",
                        p.get_ref()
                    ),
                );
            }
            if !p.get_ref().starts_with('/') {
                problem(
                    lines.of(&p),
                    format!(
                        "pin_dir {:?} must be an absolute path on a bpf filesystem",
                        p.get_ref()
                    ),
                );
            }
            PathBuf::from(p.into_inner())
        }
        None => PathBuf::from(DEFAULT_PIN_DIR),
    };

    let audit = match raw.audit {
        Some(a) => {
            let line = lines.of(&a);
            let a = a.into_inner();
            let r = a.ring_buffer_bytes;
            if !r.is_power_of_two() || !(4096..=1 << 30).contains(&r) {
                problem(
                    line,
                    format!(
                        "[audit] ring_buffer_bytes = {r}: must be a power of two from 4096 to 1073741824"
                    ),
                );
            }
            if !a.file.is_absolute() {
                problem(
                    line,
                    format!("[audit] file {:?} must be an absolute path", a.file),
                );
            }
            if a.file_max_bytes < 4096 {
                problem(line, "[audit] file_max_bytes must be at least 4096".into());
            }
            if a.file_keep == 0 {
                problem(line, "[audit] file_keep must be at least 1".into());
            }
            if a.udp_aggregate_seconds == 0 {
                problem(
                    line,
                    "[audit] udp_aggregate_seconds must be at least 1".into(),
                );
            }
            a
        }
        None => Audit::default(),
    };

    let control = match raw.control {
        Some(c) => {
            let line = lines.of(&c);
            let c = c.into_inner();
            if !c.socket.is_absolute() {
                problem(
                    line,
                    format!("[control] socket {:?} must be an absolute path", c.socket),
                );
            }
            c
        }
        None => Control::default(),
    };

    let dns = match raw.dns {
        Some(d) => {
            let line = lines.of(&d);
            validate_dns(d.into_inner()).unwrap_or_else(|reasons| {
                for r in reasons {
                    problem(line, r);
                }
                Dns::default()
            })
        }
        None => Dns::default(),
    };

    let cloudwatch = raw.cloudwatch.and_then(|c| {
        let line = lines.of(&c);
        validate_cloudwatch(c.into_inner())
            .map_err(|reasons| {
                for r in reasons {
                    problem(line, r);
                }
            })
            .ok()
    });

    if raw.policy.is_empty() {
        problem(1, "no [[policy]] table: define at least one policy with a name, cgroups and an allow list".into());
    }
    if raw.policy.len() > MAX_POLICIES as usize {
        problem(
            1,
            format!(
                "{} policies defined; at most {MAX_POLICIES} are supported",
                raw.policy.len()
            ),
        );
    }

    let mut policies = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for raw_policy in raw.policy {
        let table_line = lines.of(&raw_policy);
        let rp = raw_policy.into_inner();
        let name_line = lines.of(&rp.name);
        let name = rp.name.into_inner();
        if let Err(reason) = check_policy_name(&name) {
            problem(name_line, reason);
        }
        if let Some(first) = names.insert(name.clone(), name_line) {
            problem(
                name_line,
                format!("policy name {name:?} is already used on line {first}"),
            );
        }
        if rp.cgroups.is_empty() && rp.containers.is_empty() {
            problem(
                table_line.max(name_line),
                format!(
                    "policy {name:?} has no cgroups and no containers: list the cgroup v2 paths it guards, or container selectors"
                ),
            );
        }
        let mut containers = Vec::new();
        for c in &rp.containers {
            match c.get_ref().parse() {
                Ok(sel) => containers.push(sel),
                Err(reason) => problem(lines.of(c), format!("policy {name:?}: {reason}")),
            }
        }
        let mode = rp.mode.map_or(default_mode, |m| m.into_inner());
        let cgroups = rp
            .cgroups
            .into_iter()
            .map(|c| CgroupEntry {
                line: lines.of(&c),
                path: c.into_inner(),
            })
            .collect();

        let mut rules = Vec::new();
        let mut hostnames = Vec::new();
        let mut upstreams = Vec::new();
        let lists: [(&str, Vec<Spanned<String>>); 3] =
            [("allow", rp.allow), ("dns", rp.dns), ("ntp", rp.ntp)];
        for (list, entries) in lists {
            for entry in entries {
                let line = lines.span(entry.span());
                let text = entry.into_inner();
                match parse_entry(&text, list) {
                    Ok(Dest::Net { net, ports, .. }) if list == "dns" => {
                        upstreams.push(SocketAddr::new(net.addr(), ports.0));
                        // With the proxy, containers never talk to the resolver themselves.
                        if dns.mode == DnsMode::Direct {
                            rules.push(Rule {
                                net,
                                protos: PROTO_TCP | PROTO_UDP,
                                ports,
                                line,
                                text,
                            });
                        }
                    }
                    Ok(Dest::Net { net, protos, ports }) => rules.push(Rule {
                        net,
                        protos,
                        ports,
                        line,
                        text,
                    }),
                    Ok(Dest::Host {
                        name,
                        protos,
                        ports,
                    }) => hostnames.push(HostnameRule {
                        name,
                        protos,
                        ports,
                        line,
                    }),
                    Err(reason) => problem(
                        line,
                        format!("policy {name:?}: {list} entry {text:?}: {reason}"),
                    ),
                }
            }
        }
        if let Some(lb) = rp.allow_loopback
            && *lb.get_ref()
        {
            let line = lines.of(&lb);
            for net in ["127.0.0.0/8", "::1/128"] {
                rules.push(Rule {
                    net: net.parse().expect("constant"),
                    protos: PROTO_TCP | PROTO_UDP | PROTO_ICMP,
                    ports: (0, u16::MAX),
                    line,
                    text: format!("allow_loopback ({net})"),
                });
            }
        }
        for (line, reason) in overlaps(&rules)
            .into_iter()
            .chain(duplicate_hostnames(&hostnames))
        {
            problem(line, format!("policy {name:?}: {reason}"));
        }
        if let Some(h) = hostnames.first()
            && upstreams.is_empty()
        {
            problem(
                h.line,
                format!(
                    "policy {name:?} allows hostnames but has no dns server to resolve them: add dns = [\"<your resolver, e.g. the VPC's 169.254.169.253>\"]"
                ),
            );
        }
        if dns.mode == DnsMode::Direct {
            for h in hostnames.iter().filter(|h| h.name.starts_with("*.")) {
                problem(
                    h.line,
                    format!(
                        "policy {name:?}: wildcard {:?} can only be learned through the DNS proxy; with [dns] mode = \"direct\" list the exact names",
                        h.name
                    ),
                );
            }
        }
        policies.push(Policy {
            name,
            mode,
            cgroups,
            containers,
            rules,
            hostnames,
            upstreams,
        });
    }

    // The same cgroup in two policies would run both programs: contradictory.
    let mut seen: HashMap<String, (String, usize)> = HashMap::new();
    for p in &policies {
        for c in &p.cgroups {
            let key = normalize_cgroup_text(&c.path);
            if let Some((other, line)) = seen.get(&key) {
                let what = if *other == p.name {
                    "listed twice in policy".to_string()
                } else {
                    format!("already guarded by policy {other:?}")
                };
                problem(
                    c.line,
                    format!(
                        "cgroup {:?} is {what} (line {line}); a cgroup belongs to exactly one policy",
                        c.path
                    ),
                );
            } else {
                seen.insert(key, (p.name.clone(), c.line));
            }
        }
    }

    // Selectors pick containers under guarded cgroups: some policy must guard one.
    if policies.iter().any(|p| !p.containers.is_empty())
        && policies.iter().all(|p| p.cgroups.is_empty())
    {
        problem(
            1,
            "container selectors apply to containers under a guarded cgroup, but no policy lists cgroups: guard the cgroup Docker puts containers in (e.g. cgroups = [\"openhands.slice\"])".into(),
        );
    }
    let docker_root = match raw.docker {
        Some(d) => {
            let line = lines.of(&d);
            let root = d.into_inner().root;
            if !root.is_absolute() {
                problem(
                    line,
                    format!("[docker] root {root:?} must be an absolute path"),
                );
            }
            root
        }
        None => PathBuf::from(crate::containers::DEFAULT_DOCKER_ROOT),
    };

    Config {
        path: path.to_path_buf(),
        log_level,
        pin_dir,
        audit,
        control,
        dns,
        cloudwatch,
        docker_root,
        policies,
    }
}

/// Checks `[dns]`; every problem is returned.
fn validate_dns(raw: RawDns) -> Result<Dns, Vec<String>> {
    let mut d = Dns::default();
    let mut problems = Vec::new();
    if let Some(m) = raw.mode {
        d.mode = m;
    }
    if let Some(r) = raw.refuse {
        d.refuse = r;
    }
    if let Some(l) = raw.listen {
        match l.parse::<Ipv4Addr>() {
            Ok(a) if !a.is_unspecified() => d.listen = a,
            _ => problems.push(format!(
                "[dns] listen = {l:?}: must be one IPv4 address of this host that the guarded containers reach (e.g. Docker's bridge gateway {DEFAULT_DNS_LISTEN}); 0.0.0.0 would expose the proxy to the network"
            )),
        }
    }
    if let Some(p) = raw.port {
        if p == 0 || u32::from(p) + MAX_POLICIES > u32::from(u16::MAX) {
            problems.push(format!(
                "[dns] port = {p}: must be 1 to {} (policy N listens on port + N)",
                u32::from(u16::MAX) - MAX_POLICIES
            ));
        } else {
            d.port = p;
        }
    }
    let mut duration = |name: &str, text: Option<String>, into: &mut Duration| {
        if let Some(t) = text {
            match humantime::parse_duration(&t) {
                Ok(v) => *into = v,
                Err(e) => problems.push(format!(
                    "[dns] {name} = {t:?}: {e} (write e.g. \"30s\", \"5m\" or \"1h\")"
                )),
            }
        }
    };
    duration("min_ttl", raw.min_ttl, &mut d.min_ttl);
    duration("max_ttl", raw.max_ttl, &mut d.max_ttl);
    duration(
        "upstream_timeout",
        raw.upstream_timeout,
        &mut d.upstream_timeout,
    );
    if d.min_ttl > d.max_ttl {
        problems.push(format!(
            "[dns] min_ttl ({}) is longer than max_ttl ({})",
            humantime::format_duration(d.min_ttl),
            humantime::format_duration(d.max_ttl)
        ));
    }
    if d.max_ttl > Duration::from_secs(7 * 86_400) || d.max_ttl < Duration::from_secs(1) {
        problems.push("[dns] max_ttl must be from 1s to 7d".into());
    }
    if !(Duration::from_millis(50)..=Duration::from_secs(30)).contains(&d.upstream_timeout) {
        problems.push("[dns] upstream_timeout must be from 50ms to 30s".into());
    }
    if let Some(a) = raw.upstream_attempts {
        if (1..=5).contains(&a) {
            d.upstream_attempts = a;
        } else {
            problems.push(format!("[dns] upstream_attempts = {a}: must be 1 to 5"));
        }
    }
    if let Some(m) = raw.max_learned {
        if (1..=1 << 20).contains(&m) {
            d.max_learned = m;
        } else {
            problems.push(format!("[dns] max_learned = {m}: must be 1 to 1048576"));
        }
    }
    d.max_learned_per_container = (d.max_learned / 8).max(1);
    if let Some(q) = raw.max_learned_per_container {
        if (1..=d.max_learned).contains(&q) {
            d.max_learned_per_container = q;
        } else {
            problems.push(format!(
                "[dns] max_learned_per_container = {q}: must be 1 to max_learned ({})",
                d.max_learned
            ));
        }
    }
    if let Some(b) = raw.wildcard_names_per_minute {
        if (1..=100_000).contains(&b) {
            d.wildcard_names_per_minute = b;
        } else {
            problems.push(format!(
                "[dns] wildcard_names_per_minute = {b}: must be 1 to 100000"
            ));
        }
    }
    if let Some(p) = raw.private_answers {
        d.private_answers = p;
    }
    if let Some(list) = raw.never_learn {
        d.never_learn.clear();
        d.never_learn_host = false;
        for n in list {
            if n == NEVER_LEARN_HOST {
                d.never_learn_host = true;
                continue;
            }
            match parse_net(&n) {
                Ok(Some(net)) => d.never_learn.push(net),
                Ok(None) => problems.push(format!(
                    "[dns] never_learn entry {n:?} is not an address, a CIDR or \"{NEVER_LEARN_HOST}\" (this host's addresses)"
                )),
                Err(e) => problems.push(format!("[dns] never_learn entry {n:?}: {e}")),
            }
        }
    }
    if problems.is_empty() {
        Ok(d)
    } else {
        Err(problems)
    }
}

fn check_policy_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() >= POLICY_NAME_LEN {
        return Err(format!(
            "policy name {name:?} must be 1 to {} characters",
            POLICY_NAME_LEN - 1
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "policy name {name:?} may only contain letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Cgroup paths as written, made comparable: no leading/trailing slashes.
fn normalize_cgroup_text(p: &str) -> String {
    p.trim_matches('/').to_string()
}

// ------------------------------------------------------------------------------------------
// Allow entries.
// ------------------------------------------------------------------------------------------

/// A parsed allow, dns or ntp entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Dest {
    Net {
        net: IpNet,
        protos: u8,
        ports: (u16, u16),
    },
    Host {
        name: String,
        protos: u8,
        ports: (u16, u16),
    },
}

const ENTRY_SYNTAX: &str = "expected [tcp/|udp/|icmp/]DEST:PORTS with DEST an IPv4 address or CIDR, \
    [IPv6] or [IPv6/len], or a hostname (*.suffix for subdomains), and PORTS a port, LO-HI or *";

/// Parses one entry of the `allow` (`[tcp/|udp/|icmp/]DEST:PORTS`), `dns` or `ntp`
/// (`ADDRESS[:PORT]`) lists.
pub fn parse_entry(text: &str, list: &str) -> Result<Dest, String> {
    let text = text.trim();
    let (protos, rest, default_port) = match (list, text.split_once('/')) {
        ("dns" | "ntp", Some((p, _))) if looks_like_protocol(p) => {
            let what = if list == "dns" { "UDP and TCP" } else { "UDP" };
            return Err(format!(
                "{list} entries take no protocol prefix ({p:?}): they allow {what}"
            ));
        }
        ("dns", _) => (PROTO_TCP | PROTO_UDP, text, Some(53)),
        ("ntp", _) => (PROTO_UDP, text, Some(123)),
        (_, Some(("tcp", rest))) => (PROTO_TCP, rest, None),
        (_, Some(("udp", rest))) => (PROTO_UDP, rest, None),
        (_, Some(("icmp", rest))) => (PROTO_ICMP, rest, None),
        (_, Some((p, _))) if looks_like_protocol(p) => {
            return Err(format!(
                "unknown protocol {p:?}: use tcp/, udp/ or icmp/ (no prefix means tcp)"
            ));
        }
        _ => (PROTO_TCP, text, None),
    };
    if rest.is_empty() {
        return Err(ENTRY_SYNTAX.into());
    }
    let (host, ports) = split_host_ports(rest)?;
    let ports = match (protos, ports, default_port) {
        (PROTO_ICMP, None, _) => (0, u16::MAX),
        (PROTO_ICMP, Some(_), _) => return Err("icmp entries take no port: write icmp/DEST".into()),
        (_, Some(p), _) => parse_ports(p)?,
        (_, None, Some(d)) => (d, d),
        (_, None, None) => {
            return Err(format!(
                "missing port: write {rest}:PORT, {rest}:LO-HI or {rest}:* (any port)"
            ));
        }
    };
    if let Some(net) = parse_net(host)? {
        if list != "allow" {
            if net.prefix_len() != net.max_prefix_len() {
                return Err(format!(
                    "{list} servers are single addresses, not networks ({net})"
                ));
            }
            if ports.0 != ports.1 {
                return Err(format!("{list} servers take one port, not a range or *"));
            }
        }
        return Ok(Dest::Net { net, protos, ports });
    }
    if list != "allow" {
        return Err(format!(
            "{list} servers must be IP addresses (the agent must reach them before it can resolve names)"
        ));
    }
    let name = check_hostname(host)?;
    Ok(Dest::Host {
        name,
        protos,
        ports,
    })
}

/// Whether the text before a '/' is meant as a protocol name (not an address or a prefix).
fn looks_like_protocol(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('[')
        && !p.contains(['.', ':'])
        && !p.chars().all(|c| c.is_ascii_digit())
}

/// Splits `DEST[:PORTS]`, where an IPv6 DEST must be in brackets.
fn split_host_ports(s: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(inner) = s.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or("missing ']' after the IPv6 address")?;
        return match after {
            "" => Ok((host, None)),
            a => match a.strip_prefix(':') {
                Some(p) => Ok((host, Some(p))),
                None => Err(format!("unexpected {a:?} after ']': expected :PORTS")),
            },
        };
    }
    if s.matches(':').count() > 1 {
        return Err("IPv6 addresses need brackets: [2001:db8::1]:443 or [2001:db8::/32]:*".into());
    }
    Ok(match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    })
}

fn parse_ports(p: &str) -> Result<(u16, u16), String> {
    let port = |s: &str| -> Result<u16, String> {
        match s.parse::<u16>() {
            Ok(0) => Err("port 0 is not a destination port".to_string()),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
        }
    };
    match p {
        "*" => Ok((0, u16::MAX)),
        "" => Err("empty port after ':'".into()),
        _ => match p.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    Err(format!("port range {p} is reversed: write {hi}-{lo}"))
                } else {
                    Ok((lo, hi))
                }
            }
            None => Ok((port(p)?, port(p)?)),
        },
    }
}

/// An address or CIDR; `Ok(None)` when `s` is not one (so it may be a hostname).
/// IPv4-mapped IPv6 is stored as the IPv4 it is, since the kernel judges it that way.
fn parse_net(s: &str) -> Result<Option<IpNet>, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) if addr.contains(':') => {
            return Err(format!("{addr:?} is not a valid IPv6 address"));
        }
        Err(_) if addr.chars().all(|c| c.is_ascii_digit() || c == '.') => {
            return Err(format!("{addr:?} is not a valid IPv4 address"));
        }
        Err(_) if len.is_some() => {
            return Err(format!(
                "{s:?}: a prefix length needs an IP address before it"
            ));
        }
        Err(_) => return Ok(None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => {
                return Err(format!(
                    "prefix length {l:?} is out of range for {} (0-{max})",
                    if max == 32 { "IPv4" } else { "IPv6" }
                ));
            }
        },
    };
    let (addr, len) = match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) if len >= 96 => (IpAddr::V4(v4), len - 96),
            _ => (addr, len),
        },
        v4 => (v4, len),
    };
    let net = IpNet::new(addr, len).map_err(|e| e.to_string())?;
    if net.network() != addr {
        return Err(format!(
            "{s} has host bits set: did you mean {}?",
            net.trunc()
        ));
    }
    Ok(Some(net))
}

fn check_hostname(s: &str) -> Result<String, String> {
    let name = s.trim_end_matches('.').to_ascii_lowercase();
    let (wild, base) = match name.strip_prefix("*.") {
        Some(b) => (true, b),
        None => (false, name.as_str()),
    };
    if base.len() > 253 || base.is_empty() {
        return Err(format!("{s:?} is not a valid hostname"));
    }
    let labels: Vec<&str> = base.split('.').collect();
    if labels.len() < 2 {
        return Err(format!(
            "{s:?} is not a fully qualified hostname (expected e.g. api.example.com)"
        ));
    }
    for l in &labels {
        let ok = !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !l.starts_with('-')
            && !l.ends_with('-');
        if !ok {
            let hint = if l.contains('*') {
                ": '*' may only be the whole first label (*.example.com)"
            } else {
                ""
            };
            return Err(format!("{s:?} is not a valid hostname (label {l:?}){hint}"));
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!(
            "{s:?} is neither a valid IP address nor a hostname"
        ));
    }
    Ok(if wild {
        format!("*.{base}")
    } else {
        base.to_string()
    })
}

// ------------------------------------------------------------------------------------------
// Overlaps: two entries of a policy that allow some of the same (protocol, address, port)
// are refused, since one of them is redundant or the intent is unclear.
// ------------------------------------------------------------------------------------------

fn ports_overlap(a: (u16, u16), b: (u16, u16)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Finds overlapping rules. Two CIDRs overlap only if one contains the other, so for every
/// rule it is enough to look at the rules on its own network and on each enclosing prefix:
/// O(rules × prefix length), not O(rules²).
fn overlaps(rules: &[Rule]) -> Vec<(usize, String)> {
    let mut by_net: HashMap<IpNet, Vec<usize>> = HashMap::new();
    for (i, r) in rules.iter().enumerate() {
        by_net.entry(r.net).or_default().push(i);
    }
    let mut found = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        for other in enclosing(r.net).filter_map(|n| by_net.get(&n)).flatten() {
            let o = &rules[*other];
            // Same network: report each pair once, on the later line.
            if *other == i || (o.net == r.net && *other > i) {
                continue;
            }
            if o.protos & r.protos != 0 && ports_overlap(o.ports, r.ports) {
                let how = if o.net == r.net {
                    "repeats"
                } else {
                    "overlaps"
                };
                found.push((r.line, format!("{:?} {how} {:?} (line {}): the same protocol, address and port would be allowed twice", r.text, o.text, o.line)));
            }
        }
    }
    found
}

/// `net` and every prefix that contains it.
pub fn enclosing(net: IpNet) -> impl Iterator<Item = IpNet> {
    (0..=net.prefix_len())
        .rev()
        .map(move |len| IpNet::new(net.addr(), len).expect("shorter prefix").trunc())
}

fn duplicate_hostnames(hosts: &[HostnameRule]) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        if let Some(o) = hosts[..i].iter().find(|o| {
            o.name == h.name && o.protos & h.protos != 0 && ports_overlap(o.ports, h.ports)
        }) {
            found.push((
                h.line,
                format!(
                    "hostname {:?} repeats line {} with an overlapping protocol and port",
                    h.name, o.line
                ),
            ));
        }
    }
    found
}

// ------------------------------------------------------------------------------------------
// Cgroups: resolved against the live cgroup2 hierarchy.
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedCgroup {
    pub policy: String,
    pub path: PathBuf,
    pub line: usize,
}

/// Resolves every policy's cgroups under the cgroup2 mount `root` and checks them: they
/// exist, are not the root, do not contain the agent itself (`own`, the agent's cgroup), and
/// no two nest (nested guards would both run and intersect).
pub fn resolve_cgroups(
    config: &Config,
    root: &Path,
    own: Option<&Path>,
) -> Result<Vec<ResolvedCgroup>, ConfigError> {
    let mut problems = Vec::new();
    let mut out: Vec<ResolvedCgroup> = Vec::new();
    for p in &config.policies {
        for c in &p.cgroups {
            let mut problem = |reason: String| {
                problems.push(Problem {
                    line: c.line,
                    reason: format!("policy {:?}: cgroup {:?}: {reason}", p.name, c.path),
                })
            };
            let rel = Path::new(&c.path)
                .strip_prefix(root)
                .unwrap_or(Path::new(&c.path));
            if rel
                .components()
                .any(|k| matches!(k, Component::ParentDir | Component::CurDir))
            {
                problem("'.' and '..' are not allowed in cgroup paths".into());
                continue;
            }
            let rel: PathBuf = rel
                .components()
                .filter(|k| matches!(k, Component::Normal(_)))
                .collect();
            if rel.as_os_str().is_empty() {
                problem(format!(
                    "this is the cgroup2 root ({}): guarding it would cut off the whole host, the agent and sshd included",
                    root.display()
                ));
                continue;
            }
            let path = root.join(&rel);
            if !path.join("cgroup.procs").exists() {
                problem(format!(
                    "{} does not exist or is not a cgroup v2 directory (cgroup2 is mounted at {}); create it first, e.g. as a systemd slice",
                    path.display(),
                    root.display()
                ));
                continue;
            }
            if let Some(own) = own
                && own.starts_with(&path)
            {
                problem(format!(
                    "the agent itself runs in {}, inside this cgroup; run egress-guard outside the guarded cgroups",
                    own.display()
                ));
                continue;
            }
            if let Some(other) = out
                .iter()
                .find(|o| o.path.starts_with(&path) || path.starts_with(&o.path))
            {
                let reason = if other.path == path {
                    format!("the same cgroup as line {}", other.line)
                } else {
                    format!(
                        "nests with {} (policy {:?}, line {}); a guarded cgroup already covers its whole subtree, and nested guards would both apply",
                        other.path.display(),
                        other.policy,
                        other.line
                    )
                };
                problem(reason);
                continue;
            }
            out.push(ResolvedCgroup {
                policy: p.name.clone(),
                path,
                line: c.line,
            });
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        problems.sort_by_key(|p| p.line);
        Err(ConfigError::Invalid {
            file: config.path.display().to_string(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<Config, Vec<Problem>> {
        parse(text, Path::new("test.toml")).map_err(|e| match e {
            ConfigError::Invalid { problems, .. } => problems,
            other => panic!("{other}"),
        })
    }

    fn one_problem(text: &str) -> Problem {
        let p = cfg(text).expect_err("config should be refused");
        assert_eq!(p.len(), 1, "{p:?}");
        p.into_iter().next().unwrap()
    }

    #[test]
    fn container_selectors() {
        let c = cfg("[docker]\nroot = \"/srv/docker\"\n[[policy]]\nname = \"sandbox\"\ncgroups = [\"x\"]\n[[policy]]\nname = \"app\"\ncontainers = [\"name:openhands-app\", \"label:role=app\"]\n").unwrap();
        assert_eq!(c.docker_root, PathBuf::from("/srv/docker"));
        assert!(c.policies[1].cgroups.is_empty());
        assert_eq!(c.policies[1].containers.len(), 2);
        let p = one_problem(
            "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\ncontainers = [\n  \"name:ok\",\n  \"app\",\n]\n",
        );
        assert_eq!(p.line, 6, "{p:?}");
        assert!(p.reason.contains("name:GLOB"), "{}", p.reason);
        let p = one_problem("[[policy]]\nname = \"a\"\ncontainers = [\"name:x\"]\n");
        assert!(p.reason.contains("no policy lists cgroups"), "{}", p.reason);
        let p = one_problem(
            "[docker]\nroot = \"docker\"\n[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n",
        );
        assert!(p.reason.contains("absolute"), "{}", p.reason);
    }

    const GOOD: &str = r#"
mode = "enforce"

[[policy]]
name = "app"
cgroups = ["openhands.slice"]
allow = [
  "api.anthropic.com:443",
  "*.openai.azure.com:443",
  "192.0.2.0/24:443",
  "192.0.2.10:8000-8100",
  "udp/192.0.2.53:5353",
  "icmp/192.0.2.1",
  "[2001:db8::1]:443",
  "[2001:db8:1::/48]:*",
  "[::ffff:198.51.100.7]:443",
]
dns = ["10.0.0.2"]
ntp = ["169.254.169.123:123"]

[[policy]]
name = "sandbox"
mode = "audit"
cgroups = ["/openhands-sandbox.slice"]
allow_loopback = true
"#;

    #[test]
    fn dns_settings_and_direct_mode_are_checked() {
        let direct = GOOD.replacen("[[policy]]", "[dns]\nmode = \"direct\"\n\n[[policy]]", 1);
        let p = cfg(&direct).unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.reason.contains("*.openai.azure.com") && p.reason.contains("direct")),
            "{p:?}"
        );
        let ok = cfg(&direct.replace("\"*.openai.azure.com:443\",", "")).unwrap();
        let app = &ok.policies[0];
        // Direct mode: the containers talk to the resolver themselves.
        assert!(app.rules.iter().any(|r| r.net.to_string() == "10.0.0.2/32"
            && r.protos == PROTO_TCP | PROTO_UDP
            && r.ports == (53, 53)));
        for (table, want) in [
            ("listen = \"0.0.0.0\"", "would expose the proxy"),
            ("port = 65500", "must be 1 to"),
            ("min_ttl = \"2h\"", "longer than max_ttl"),
            ("max_ttl = \"soon\"", "write e.g."),
            ("upstream_attempts = 0", "must be 1 to 5"),
            ("refuse = \"drop\"", "unknown variant"),
        ] {
            let text = format!("[dns]\n{table}\n[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n");
            let p = one_problem(&text);
            assert!(p.reason.contains(want), "{table}: {p:?}");
        }
        let p = one_problem(
            "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\nallow = [\"api.example.com:443\"]\n",
        );
        assert!(p.reason.contains("no dns server"), "{p:?}");
        assert_eq!(p.line, 4);
    }

    #[test]
    fn dns_limits_and_never_learn_defaults() {
        let d = Dns::default();
        assert!(d.never_learn_host);
        assert_eq!(d.wildcard_names_per_minute, 100);
        assert_eq!(d.max_learned_per_container, 2048);
        assert_eq!(d.private_answers, PrivateAnswers::Allow);
        for ip in [
            "fd00:ec2::254",
            "fd00:ec2::253",
            "169.254.169.254",
            "127.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(d.never_learn.iter().any(|n| n.contains(&ip)), "{ip}");
        }
        let ok = |table: &str| {
            cfg(&format!(
                "[dns]\n{table}\n[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n"
            ))
            .unwrap()
            .dns
        };
        // The per-container quota follows max_learned unless set.
        assert_eq!(ok("max_learned = 100").max_learned_per_container, 12);
        assert_eq!(ok("max_learned = 4").max_learned_per_container, 1);
        let d = ok(
            "max_learned_per_container = 7\nwildcard_names_per_minute = 5\nprivate_answers = \"refuse\"",
        );
        assert_eq!(
            (
                d.max_learned_per_container,
                d.wildcard_names_per_minute,
                d.private_answers
            ),
            (7, 5, PrivateAnswers::Refuse)
        );
        // A list of one's own replaces the defaults, "host" included unless listed.
        let d = ok("never_learn = [\"169.254.0.0/16\"]");
        assert!(!d.never_learn_host);
        assert_eq!(d.never_learn.len(), 1);
        let d = ok("never_learn = [\"host\", \"10.0.0.0/8\"]");
        assert!(d.never_learn_host);
        assert_eq!(d.never_learn.len(), 1);
        for (table, want) in [
            ("max_learned_per_container = 0", "must be 1 to max_learned"),
            (
                "max_learned = 10\nmax_learned_per_container = 11",
                "must be 1 to max_learned (10)",
            ),
            ("wildcard_names_per_minute = 0", "must be 1 to 100000"),
            ("private_answers = \"drop\"", "unknown variant"),
            (
                "never_learn = [\"hosts\"]",
                "\"host\" (this host's addresses)",
            ),
        ] {
            let text = format!("[dns]\n{table}\n[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n");
            let p = one_problem(&text);
            assert!(p.reason.contains(want), "{table}: {p:?}");
        }
    }

    #[test]
    fn parses_a_full_config() {
        let c = cfg(GOOD).unwrap();
        assert_eq!(c.policies.len(), 2);
        let app = &c.policies[0];
        assert_eq!(app.mode, Mode::Enforce);
        assert_eq!(app.hostnames.len(), 2);
        assert_eq!(app.hostnames[1].name, "*.openai.azure.com");
        let texts: Vec<_> = app
            .rules
            .iter()
            .map(|r| (r.net.to_string(), r.protos, r.ports))
            .collect();
        assert!(texts.contains(&("192.0.2.0/24".into(), PROTO_TCP, (443, 443))));
        assert!(texts.contains(&("192.0.2.10/32".into(), PROTO_TCP, (8000, 8100))));
        assert!(texts.contains(&("192.0.2.53/32".into(), PROTO_UDP, (5353, 5353))));
        assert!(texts.contains(&("192.0.2.1/32".into(), PROTO_ICMP, (0, 65535))));
        assert!(texts.contains(&("2001:db8:1::/48".into(), PROTO_TCP, (0, 65535))));
        // IPv4-mapped IPv6 becomes the IPv4 address.
        assert!(texts.contains(&("198.51.100.7/32".into(), PROTO_TCP, (443, 443))));
        // With the DNS proxy (the default) the resolver is the proxy's upstream, not a
        // destination of the containers.
        assert!(!texts.iter().any(|t| t.0 == "10.0.0.2/32"));
        assert_eq!(app.upstreams, vec!["10.0.0.2:53".parse().unwrap()]);
        assert!(texts.contains(&("169.254.169.123/32".into(), PROTO_UDP, (123, 123))));
        let sb = &c.policies[1];
        assert_eq!(sb.mode, Mode::Audit);
        assert_eq!(sb.rules.len(), 2, "loopback v4 and v6");
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    }

    #[test]
    fn the_shipped_config_is_valid() {
        let c = cfg(include_str!("../../packaging/config.toml")).unwrap();
        assert_eq!(c.policies.len(), 2);
        // The slice's policy first, then the app taken over by its selector.
        assert_eq!(c.policies[0].cgroups.len(), 1);
        assert!(c.policies[0].hostnames.is_empty());
        assert_eq!(c.policies[1].containers.len(), 1);
        assert_eq!(c.policies[1].hostnames.len(), 3);
    }

    #[test]
    fn the_shipped_dns_block_shows_the_defaults() {
        // Uncommenting every setting of the shipped [dns] block changes nothing.
        let text = include_str!("../../packaging/config.toml");
        let mut in_dns = false;
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with('[') || line.starts_with("# [") {
                in_dns = line == "[dns]";
            }
            let setting = line.strip_prefix("# ").filter(|l| {
                let key = l.split(" =").next().unwrap_or("");
                l.contains(" = ") && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
            let continued = line
                .strip_prefix("#  ")
                .filter(|l| l.trim_start().starts_with('"'));
            match (in_dns, setting.or(continued)) {
                (true, Some(l)) => out.push_str(l),
                _ => out.push_str(line),
            }
            out.push('\n');
        }
        let d = cfg(&out).unwrap().dns;
        assert!(out.contains("\nnever_learn = [\"host\""), "{out}");
        assert_eq!(d, Dns::default());
    }

    #[test]
    fn audit_settings_are_checked() {
        let base = "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n";
        let c = cfg(&format!(
            "[audit]\nfile = \"/tmp/a.jsonl\"\nring_buffer_bytes = 65536\n{base}"
        ))
        .unwrap();
        assert_eq!(c.audit.ring_buffer_bytes, 65536);
        assert_eq!(c.audit.file_keep, 5);
        let p = one_problem(&format!("[audit]\nring_buffer_bytes = 5000\n{base}"));
        assert!(p.reason.contains("power of two"), "{}", p.reason);
        let p = one_problem(&format!("[audit]\nfiel = \"/x\"\n{base}"));
        assert!(p.reason.contains("unknown field `fiel`"), "{}", p.reason);
    }

    #[test]
    fn unknown_key_names_its_line() {
        let p = one_problem(
            "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\nalow = [\"192.0.2.1:443\"]\n",
        );
        assert_eq!(p.line, 4);
        assert!(p.reason.contains("unknown field `alow`"), "{}", p.reason);
    }

    #[test]
    fn bad_addresses_are_refused_with_reason() {
        let cases = [
            ("192.0.2.300:443", "not a valid IPv4"),
            ("192.0.2.0/33:443", "out of range"),
            (
                "192.0.2.1/24:443",
                "host bits set: did you mean 192.0.2.0/24",
            ),
            ("2001:db8::1:443", "need brackets"),
            ("[2001:db8::g]:443", "not a valid IPv6"),
            ("192.0.2.1", "missing port"),
            ("192.0.2.1:0", "port 0"),
            ("192.0.2.1:70000", "not a port"),
            ("192.0.2.1:90-80", "reversed"),
            ("sctp/192.0.2.1:80", "unknown protocol"),
            ("icmp/192.0.2.1:80", "take no port"),
            ("bad_*.example.com:443", "not a valid hostname"),
            ("icmp6/192.0.2.1", "unknown protocol \"icmp6\""),
            ("localhost:443", "fully qualified"),
        ];
        for (entry, want) in cases {
            let text = format!(
                "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\nallow = [\n  \"192.0.2.9:1\",\n  \"{entry}\",\n]\n"
            );
            let p = one_problem(&text);
            assert_eq!(p.line, 6, "{entry}");
            assert!(p.reason.contains(want), "{entry}: {}", p.reason);
        }
    }

    #[test]
    fn dns_and_ntp_take_one_address_and_one_port() {
        for (list, entry, want) in [
            ("dns", "0.0.0.0/0:*", "single addresses"),
            ("dns", "192.0.2.53:53-60", "one port"),
            ("ntp", "192.0.2.1:*", "one port"),
            ("dns", "udp/192.0.2.53", "no protocol prefix"),
        ] {
            let text =
                format!("[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n{list} = [\"{entry}\"]\n");
            let p = one_problem(&text);
            assert!(p.reason.contains(want), "{entry}: {}", p.reason);
        }
    }

    #[test]
    fn pin_dir_must_be_a_directory_of_its_own() {
        for dir in [
            "/sys/fs/bpf",
            "/sys/fs/bpf/",
            "/sys/fs/bpf/a/../b",
            "relative",
            "/",
        ] {
            let text =
                format!("pin_dir = \"{dir}\"\n[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n");
            let p = cfg(&text).expect_err(dir);
            assert!(p[0].reason.contains("pin_dir"), "{dir}: {p:?}");
        }
        cfg("pin_dir = \"/sys/fs/bpf/eg\"\n[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n").unwrap();
        cfg("pin_dir = \"/run/bpffs\"\n[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n").unwrap();
    }

    #[test]
    fn overlapping_entries_are_refused() {
        let p = one_problem(
            "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\nallow = [\"192.0.2.0/24:400-500\", \"192.0.2.7:443\"]\n",
        );
        assert!(p.reason.contains("overlaps"), "{}", p.reason);
        let p = one_problem(
            "[dns]\nmode = \"direct\"\n[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\nallow = [\"192.0.2.7:443\"]\ndns = [\"192.0.2.7:443\"]\n",
        );
        assert_eq!(p.line, 7);
        assert!(p.reason.contains("repeats"), "{}", p.reason);
        // Disjoint ports or protocols on nested networks are fine.
        cfg("[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\nallow = [\"192.0.2.0/24:80\", \"192.0.2.7:443\", \"udp/192.0.2.7:443\"]\n").unwrap();
        let p = one_problem(
            "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\nallow = [\"api.example.com:443\", \"API.example.com.:443\"]\ndns = [\"10.0.0.2\"]\n",
        );
        assert!(p.reason.contains("repeats"), "{}", p.reason);
    }

    #[test]
    fn contradictory_cgroups_are_refused() {
        let p = one_problem(
            "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n[[policy]]\nname = \"b\"\ncgroups = [\"/x/\"]\n",
        );
        assert_eq!(p.line, 6);
        assert!(
            p.reason.contains("already guarded by policy \"a\""),
            "{}",
            p.reason
        );
        let p = one_problem(
            "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n[[policy]]\nname = \"a\"\ncgroups = [\"y\"]\n",
        );
        assert!(p.reason.contains("already used on line 2"), "{}", p.reason);
    }

    #[test]
    fn missing_pieces_are_reported() {
        let p = one_problem("mode = \"enforce\"\n");
        assert!(p.reason.contains("no [[policy]]"), "{}", p.reason);
        let p = one_problem("mode = \"block\"\n[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\n");
        assert_eq!(p.line, 1);
        assert!(p.reason.contains("unknown variant `block`"), "{}", p.reason);
        let p = one_problem("[[policy]]\nname = \"a\"\n");
        assert!(p.reason.contains("no cgroups"), "{}", p.reason);
        let p = one_problem("[[policy]]\nname = \"a b\"\ncgroups = [\"x\"]\n");
        assert!(p.reason.contains("may only contain"), "{}", p.reason);
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let p = cfg(
            "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\nallow = [\"1.2.3.4\", \"5.6.7.8:0\"]\n",
        )
        .unwrap_err();
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn enclosing_walks_to_the_default_route() {
        let v: Vec<_> = enclosing("192.0.2.128/25".parse().unwrap())
            .map(|n| n.to_string())
            .collect();
        assert_eq!(v.first().unwrap(), "192.0.2.128/25");
        assert_eq!(v[1], "192.0.2.0/24");
        assert_eq!(v.last().unwrap(), "0.0.0.0/0");
        assert_eq!(v.len(), 26);
    }

    #[test]
    fn cgroups_resolve_against_the_mount() {
        let root = std::env::temp_dir().join(format!("eg-cfg-test-{}", std::process::id()));
        for d in ["a", "a/b", "c", "agent"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
            std::fs::write(root.join(d).join("cgroup.procs"), "").unwrap();
        }
        let text = |cgs: &str| format!("[[policy]]\nname = \"p\"\ncgroups = [{cgs}]\n");
        let resolve = |cgs: &str| {
            let c = parse(&text(cgs), Path::new("t.toml")).unwrap();
            resolve_cgroups(&c, &root, Some(&root.join("agent")))
        };
        let ok = resolve("\"a\", \"/c\"").unwrap();
        assert_eq!(ok[0].path, root.join("a"));
        assert_eq!(ok[1].path, root.join("c"));
        let abs = format!("\"{}\"", root.join("c").display());
        assert_eq!(resolve(&abs).unwrap()[0].path, root.join("c"));
        for (cgs, want) in [
            ("\"missing\"", "does not exist"),
            ("\"/\"", "cgroup2 root"),
            ("\"a/../c\"", "'..'"),
            ("\"a\", \"a/b\"", "nests with"),
            ("\"agent\"", "the agent itself"),
        ] {
            let e = resolve(cgs).unwrap_err().to_string();
            assert!(e.contains(want), "{cgs}: {e}");
            assert!(e.starts_with("t.toml:3: "), "{e}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
