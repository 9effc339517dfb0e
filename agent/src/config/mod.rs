//! The policy configuration: TOML schema, parsing and validation.
//!
//! Every mistake is reported as `FILE:LINE: reason`, all of them at once, and nothing is
//! applied unless the whole file is valid (a bad reload keeps the old policy in force).
//! Cgroup paths are checked against the live cgroup2 tree separately, in [`resolve_cgroups`].
//!
//! Here: the [`Config`] as a whole, loading and `validate`'s order of steps; each table's
//! schema and checks are in the file named after it.

mod cgroups;
mod cloudwatch;
mod dns;
mod entries;
mod policy;
mod problems;
mod settings;

use std::{
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use cloudwatch::RawCloudWatch;
use dns::RawDns;
use policy::RawPolicy;
use settings::RawDocker;

pub use cgroups::{ResolvedCgroup, resolve_cgroups};
pub use cloudwatch::{CloudWatch, DEFAULT_SPOOL_DIR};
pub use dns::{
    DEFAULT_DNS_LISTEN, DEFAULT_DNS_PORT, DEFAULT_NEVER_LEARN, DEFAULT_WILDCARD_NAMES_PER_MINUTE,
    Dns, DnsMode, NEVER_LEARN_HOST, PrivateAnswers, Refusal,
};
pub use entries::{Dest, enclosing, parse_entry};
pub use policy::{CgroupEntry, HostnameRule, Policy, Rule, Selector};
pub use problems::{ConfigError, Problem};
pub use settings::{
    Audit, Control, DEFAULT_AUDIT_FILE, DEFAULT_CONTROL_SOCKET, DEFAULT_DOCKER_ROOT,
    DEFAULT_PIN_DIR,
};

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

/// Checks the file as written, table by table; every problem is collected in `problems`.
fn validate(raw: RawConfig, path: &Path, lines: &LineIndex, problems: &mut Vec<Problem>) -> Config {
    let default_mode = raw.mode.as_ref().map_or(Mode::Enforce, |m| *m.get_ref());
    let log_level = settings::validate_log_level(raw.log_level, lines, problems);
    let pin_dir = settings::validate_pin_dir(raw.pin_dir, lines, problems);
    let audit = settings::validate_audit(raw.audit, lines, problems);
    let control = settings::validate_control(raw.control, lines, problems);
    let dns = dns::validate_dns_table(raw.dns, lines, problems);
    let cloudwatch = cloudwatch::validate_cloudwatch_table(raw.cloudwatch, lines, problems);
    let policies = policy::validate_policies(raw.policy, default_mode, dns.mode, lines, problems);
    cgroups::check_one_policy_per_cgroup(&policies, problems);
    policy::check_selectors_have_cgroups(&policies, problems);
    let docker_root = settings::validate_docker(raw.docker, lines, problems);

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

#[cfg(test)]
mod tests {
    use agent_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

    use super::*;

    pub(super) fn cfg(text: &str) -> Result<Config, Vec<Problem>> {
        parse(text, Path::new("test.toml")).map_err(|e| match e {
            ConfigError::Invalid { problems, .. } => problems,
            other => panic!("{other}"),
        })
    }

    pub(super) fn one_problem(text: &str) -> Problem {
        let p = cfg(text).expect_err("config should be refused");
        assert_eq!(p.len(), 1, "{p:?}");
        p.into_iter().next().unwrap()
    }
    pub(super) const GOOD: &str = r#"
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
        let c = cfg(include_str!("../../../packaging/config.toml")).unwrap();
        assert_eq!(c.policies.len(), 3);
        // The slice's policy first, then the app and the sandboxes taken over by selectors.
        assert_eq!(c.policies[0].cgroups.len(), 1);
        assert!(c.policies[0].hostnames.is_empty());
        for p in &c.policies[1..] {
            assert_eq!(p.containers.len(), 1, "{}", p.name);
            assert_eq!(p.hostnames.len(), 3, "{}", p.name);
        }
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
    fn all_problems_are_reported_at_once() {
        let p = cfg(
            "[[policy]]\nname = \"a\"\ncgroups = [\"x\"]\nallow = [\"1.2.3.4\", \"5.6.7.8:0\"]\n",
        )
        .unwrap_err();
        assert_eq!(p.len(), 2);
    }
}
