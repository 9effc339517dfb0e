//! `[[policy]]` tables: their schema and validation, one policy at a time (name, cgroups,
//! container selectors, the `allow`, `dns` and `ntp` lists, `allow_loopback`).

use std::{collections::HashMap, net::SocketAddr};

use agent_common::{MAX_POLICIES, POLICY_NAME_LEN, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::{
    DnsMode, LineIndex, Mode, Problem,
    entries::{Dest, duplicate_hostnames, overlaps, parse_entry},
};

/// One `containers` entry of a policy.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// Docker's container name (without the leading `/`), `*` matching any run of characters.
    Name(String),
    /// A label: present (`value` None) or with a value matching the glob.
    Label { key: String, value: Option<String> },
}

impl std::str::FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            Err(format!(
                "container selector {s:?}: {why}; write name:GLOB, label:KEY=GLOB or label:KEY"
            ))
        };
        if let Some(glob) = s.strip_prefix("name:") {
            if glob.is_empty() || glob.chars().any(|c| c.is_whitespace() || c == '/') {
                return bad("the name pattern is empty or has spaces or '/'");
            }
            Ok(Selector::Name(glob.to_string()))
        } else if let Some(rest) = s.strip_prefix("label:") {
            let (key, value) = match rest.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (rest, None),
            };
            if key.is_empty() || key.contains('*') || key.chars().any(char::is_whitespace) {
                return bad("the label key is empty or has '*' or spaces");
            }
            Ok(Selector::Label {
                key: key.to_string(),
                value,
            })
        } else {
            bad("unknown kind")
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub cgroups: Vec<CgroupEntry>,
    /// Containers under any guarded cgroup that this policy takes over (container discovery).
    pub containers: Vec<Selector>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
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

/// The `[[policy]]` step of `validate`: at least one policy and at most `MAX_POLICIES`, each
/// checked on its own, no two with the same name.
pub(super) fn validate_policies(
    raw: Vec<Spanned<RawPolicy>>,
    default_mode: Mode,
    dns_mode: DnsMode,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Vec<Policy> {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    if raw.is_empty() {
        problem(1, "no [[policy]] table: define at least one policy with a name, cgroups and an allow list".into());
    }
    if raw.len() > MAX_POLICIES as usize {
        problem(
            1,
            format!(
                "{} policies defined; at most {MAX_POLICIES} are supported",
                raw.len()
            ),
        );
    }

    let mut policies = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for raw_policy in raw {
        policies.push(validate_policy(
            raw_policy,
            &mut names,
            default_mode,
            dns_mode,
            lines,
            problems,
        ));
    }
    policies
}

/// One `[[policy]]` table; `names` holds the names of the policies before it, with their lines.
fn validate_policy(
    raw_policy: Spanned<RawPolicy>,
    names: &mut HashMap<String, usize>,
    default_mode: Mode,
    dns_mode: DnsMode,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Policy {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
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

    let lists = [("allow", rp.allow), ("dns", rp.dns), ("ntp", rp.ntp)];
    let (mut rules, hostnames, upstreams) = parse_lists(&name, lists, dns_mode, lines, problems);
    rules.extend(loopback_rules(rp.allow_loopback, lines));
    check_lists(&name, &rules, &hostnames, &upstreams, dns_mode, problems);
    Policy {
        name,
        mode,
        cgroups,
        containers,
        rules,
        hostnames,
        upstreams,
    }
}

/// The `allow`, `dns` and `ntp` entries of policy `name`: its address and CIDR rules, its
/// hostname rules and its upstream resolvers.
fn parse_lists(
    name: &str,
    lists: [(&str, Vec<Spanned<String>>); 3],
    dns_mode: DnsMode,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> (Vec<Rule>, Vec<HostnameRule>, Vec<SocketAddr>) {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    let mut rules = Vec::new();
    let mut hostnames = Vec::new();
    let mut upstreams = Vec::new();
    for (list, entries) in lists {
        for entry in entries {
            let line = lines.span(entry.span());
            let text = entry.into_inner();
            match parse_entry(&text, list) {
                Ok(Dest::Net { net, ports, .. }) if list == "dns" => {
                    upstreams.push(SocketAddr::new(net.addr(), ports.0));
                    // With the proxy, containers never talk to the resolver themselves.
                    if dns_mode == DnsMode::Direct {
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
    (rules, hostnames, upstreams)
}

/// `allow_loopback = true`: every protocol and port to 127.0.0.0/8 and ::1.
fn loopback_rules(allow_loopback: Option<Spanned<bool>>, lines: &LineIndex) -> Vec<Rule> {
    let mut rules = Vec::new();
    if let Some(lb) = allow_loopback
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
    rules
}

/// What a policy's entries say together: no overlaps, a resolver for its hostnames, and (in
/// direct DNS mode) no wildcards.
fn check_lists(
    name: &str,
    rules: &[Rule],
    hostnames: &[HostnameRule],
    upstreams: &[SocketAddr],
    dns_mode: DnsMode,
    problems: &mut Vec<Problem>,
) {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    for (line, reason) in overlaps(rules)
        .into_iter()
        .chain(duplicate_hostnames(hostnames))
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
    if dns_mode == DnsMode::Direct {
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
}

/// The step of `validate` after the cgroups: container selectors need a guarded cgroup.
pub(super) fn check_selectors_have_cgroups(policies: &[Policy], problems: &mut Vec<Problem>) {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });

    // Selectors pick containers under guarded cgroups: some policy must guard one.
    if policies.iter().any(|p| !p.containers.is_empty())
        && policies.iter().all(|p| p.cgroups.is_empty())
    {
        problem(
            1,
            "container selectors apply to containers under a guarded cgroup, but no policy lists cgroups: guard the cgroup Docker puts containers in (e.g. cgroups = [\"openhands.slice\"])".into(),
        );
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::tests::{cfg, one_problem};

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
}
