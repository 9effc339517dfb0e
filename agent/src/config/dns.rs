//! `[dns]`: the DNS proxy and hostname learning; the table's schema, defaults and checks.

use std::{fmt, net::Ipv4Addr, time::Duration};

use agent_common::MAX_POLICIES;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::{LineIndex, Problem, entries::parse_net};

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
pub(super) struct RawDns {
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

/// The `[dns]` step of `validate`: absent or invalid, the defaults; every problem is reported
/// on the table's line.
pub(super) fn validate_dns_table(
    raw: Option<Spanned<RawDns>>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Dns {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    match raw {
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

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use agent_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::config::tests::{GOOD, cfg, one_problem};

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
    fn the_shipped_dns_block_shows_the_defaults() {
        // Uncommenting every setting of the shipped [dns] block changes nothing.
        let text = include_str!("../../../packaging/config.toml");
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
}
