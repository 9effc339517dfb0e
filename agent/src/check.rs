//! The policies in force as the control socket shows them, and `check`: would this
//! destination be allowed, and by which entry? It answers from the same compiled entries the
//! kernel maps hold, with the kernel's lookup rule (exact address, else longest prefix).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use agent_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use ipnet::IpNet;
use serde_json::{Value, json};

use crate::{
    config::{HostnameRule, Mode, Rule},
    policy::Compiled,
};

#[derive(Clone, Debug)]
pub struct PolicyView {
    pub name: String,
    pub mode: Mode,
    pub cgroups: Vec<PathBuf>,
    pub rules: Vec<Rule>,
    pub hostnames: Vec<HostnameRule>,
    pub compiled: Compiled,
    /// Addresses learned from DNS answers (filled in when asked): address, kernel entry, the
    /// names it was answered for.
    pub learned: Vec<(IpAddr, agent_common::AllowValue, Vec<String>)>,
}

fn protos(bits: u8) -> Vec<&'static str> {
    [(PROTO_TCP, "tcp"), (PROTO_UDP, "udp"), (PROTO_ICMP, "icmp")]
        .into_iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| n)
        .collect()
}

fn ports(p: (u16, u16)) -> String {
    match p {
        (0, u16::MAX) => "*".into(),
        (a, b) if a == b => a.to_string(),
        (a, b) => format!("{a}-{b}"),
    }
}

impl PolicyView {
    pub fn to_json(&self) -> Value {
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|r| json!({ "entry": r.text, "line": r.line, "network": r.net.to_string(), "protocols": protos(r.protos), "ports": ports(r.ports) }))
            .collect();
        let hostnames: Vec<Value> = self
            .hostnames
            .iter()
            .map(|h| {
                let ips: Vec<String> = self
                    .learned
                    .iter()
                    .filter(|(_, _, names)| names.iter().any(|n| crate::dns::names::PolicyNames::new(std::slice::from_ref(h)).rules_for(n).is_ok()))
                    .map(|(ip, _, _)| ip.to_string())
                    .collect();
                json!({ "name": h.name, "line": h.line, "protocols": protos(h.protos), "ports": ports(h.ports), "learned_ips": ips })
            })
            .collect();
        json!({
            "name": self.name,
            "mode": self.mode,
            "cgroups": self.cgroups.iter().map(|c| c.display().to_string()).collect::<Vec<_>>(),
            "addresses": rules,
            "hostnames": hostnames,
            "kernel_entries": self.compiled.len(),
        })
    }
}

/// Docker containers (full id, cgroup path) in the subtree of `cgroup`.
pub fn containers_under(cgroup: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![(cgroup.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            if let Some(id) = crate::containers::container_of(&path.display().to_string()) {
                out.push((id, path.clone()));
            }
            if depth < 8 {
                stack.push((path, depth + 1));
            }
        }
    }
    out
}

/// Splits `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT`.
fn parse_dest(dest: &str) -> Result<(IpAddr, Option<u16>), String> {
    let bad = || format!("{dest:?} is not ADDRESS[:PORT] (IPv6 in brackets: [2001:db8::1]:443)");
    let (host, port) = if let Some(rest) = dest.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        (h, after.strip_prefix(':'))
    } else if dest.matches(':').count() == 1 {
        let (h, p) = dest.split_once(':').expect("one colon");
        (h, Some(p))
    } else {
        (dest, None)
    };
    let addr: IpAddr = host.parse().map_err(|_| bad())?;
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    let port = port
        .map(|p| p.parse::<u16>().map_err(|_| bad()))
        .transpose()?;
    Ok((addr, port))
}

/// Would `dest` be allowed? Picks the policy by name, by container, or the only one.
pub fn check(
    policies: &[PolicyView],
    dest: Option<&str>,
    policy: Option<&str>,
    container: Option<&str>,
    proto: Option<&str>,
) -> Result<Value, String> {
    let dest = dest.ok_or("give dest=ADDRESS[:PORT]")?;
    let (addr, port) = parse_dest(dest)?;
    let proto = proto.unwrap_or("tcp");
    let bit = match proto {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "icmp" => PROTO_ICMP,
        p => return Err(format!("proto {p:?}: use tcp, udp or icmp")),
    };
    let port = match (port, bit) {
        (Some(p), _) => p,
        (None, PROTO_ICMP) => 0,
        (None, _) => return Err(format!("give a port: {dest}:PORT")),
    };
    let p = match (policy, container) {
        (Some(name), _) => policies
            .iter()
            .find(|p| p.name == name)
            .ok_or(format!("no policy named {name:?}"))?,
        (None, Some(c)) => policies
            .iter()
            .find(|p| {
                p.cgroups
                    .iter()
                    .any(|cg| containers_under(cg).iter().any(|(id, _)| id.starts_with(c)))
            })
            .ok_or(format!("no guarded container {c:?}"))?,
        (None, None) if policies.len() == 1 => &policies[0],
        (None, None) => {
            return Err("several policies are in force: give policy=NAME or container=ID".into());
        }
    };
    // The kernel's lookup: the exact address (a learned one first), else the longest prefix
    // that contains it.
    let host = IpNet::from(addr);
    let learned = p.learned.iter().find(|(ip, _, _)| *ip == addr);
    let entry = p
        .compiled
        .entries
        .iter()
        .filter(|(net, _)| net.contains(&addr))
        .max_by_key(|(net, _)| net.prefix_len());
    let allowed = match learned {
        Some((_, v, _)) => v.allows(bit, port),
        None => entry.is_some_and(|(_, v)| v.allows(bit, port)),
    };
    let by_name = learned.filter(|(_, _, names)| {
        names.iter().any(|n| {
            p.hostnames.iter().any(|h| {
                h.protos & bit != 0
                    && port >= h.ports.0
                    && port <= h.ports.1
                    && crate::dns::names::PolicyNames::new(std::slice::from_ref(h))
                        .rules_for(n)
                        .is_ok()
            })
        })
    });
    let covering: Vec<&Rule> = p.rules.iter().filter(|r| r.net.contains(&addr)).collect();
    let matching = covering
        .iter()
        .find(|r| r.protos & bit != 0 && port >= r.ports.0 && port <= r.ports.1);
    let verdict = match (allowed, p.mode) {
        (true, _) => "allow",
        (false, Mode::Audit) => "would_deny",
        (false, Mode::Enforce) => "deny",
    };
    let mut out = json!({
        "policy": p.name,
        "mode": p.mode,
        "dest": host.addr().to_string(),
        "port": port,
        "proto": proto,
        "verdict": verdict,
    });
    if let (true, Some(r)) = (allowed, matching) {
        out["entry"] = json!({ "entry": r.text, "line": r.line });
    } else if let (true, Some((_, _, names))) = (allowed, by_name) {
        out["entry"] = json!({ "learned_from": names });
    } else if covering.is_empty() && learned.is_none() {
        out["reason"] = "no entry of the policy covers this address".into();
    } else {
        out["reason"] = format!(
            "the address is listed for other protocols or ports: {}",
            covering
                .iter()
                .map(|r| r.text.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
        .into();
    }
    if let Some((_, _, names)) = learned {
        out["hostnames"] = json!(names);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::parse, policy::compile};

    fn view(allow: &str) -> Vec<PolicyView> {
        let text = format!("[[policy]]\nname = \"p\"\ncgroups = [\"x\"]\nallow = [{allow}]\n");
        let p = parse(&text, Path::new("t.toml"))
            .unwrap()
            .policies
            .remove(0);
        let compiled = compile(&p).unwrap();
        vec![PolicyView {
            name: p.name,
            mode: p.mode,
            cgroups: vec![],
            rules: p.rules,
            hostnames: p.hostnames,
            compiled,
            learned: Vec::new(),
        }]
    }

    #[test]
    fn check_names_the_allowing_entry_or_the_reason() {
        let v = view("\"10.0.0.0/8:80\", \"10.1.2.3:443\", \"udp/10.1.2.3:53\"");
        let r = check(&v, Some("10.1.2.3:443"), None, None, None).unwrap();
        assert_eq!(
            (r["verdict"].as_str(), r["entry"]["entry"].as_str()),
            (Some("allow"), Some("10.1.2.3:443"))
        );
        // Inherited from the enclosing CIDR, as the kernel does it.
        let r = check(&v, Some("10.1.2.3:80"), None, None, None).unwrap();
        assert_eq!(
            (r["verdict"].as_str(), r["entry"]["entry"].as_str()),
            (Some("allow"), Some("10.0.0.0/8:80"))
        );
        let r = check(&v, Some("10.1.2.3:22"), None, None, None).unwrap();
        assert_eq!(r["verdict"], "deny");
        assert!(
            r["reason"]
                .as_str()
                .unwrap()
                .contains("other protocols or ports"),
            "{r}"
        );
        let r = check(&v, Some("[::ffff:10.1.2.3]:53"), None, None, Some("udp")).unwrap();
        assert_eq!(r["verdict"], "allow");
        let r = check(&v, Some("192.0.2.1:443"), None, None, None).unwrap();
        assert_eq!(
            (r["verdict"].as_str(), r["reason"].as_str()),
            (
                Some("deny"),
                Some("no entry of the policy covers this address")
            )
        );
        assert!(
            check(&v, Some("10.1.2.3"), None, None, None)
                .unwrap_err()
                .contains("give a port")
        );
        assert!(check(&v, Some("nonsense"), None, None, None).is_err());
    }
}
