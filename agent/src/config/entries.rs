//! The entries of a policy's `allow`, `dns` and `ntp` lists: parsing (protocol, address or
//! CIDR, hostname, ports) and the overlaps between them.

use std::{collections::HashMap, net::IpAddr};

use agent_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use ipnet::IpNet;

use super::{HostnameRule, Rule};

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
pub(super) fn parse_net(s: &str) -> Result<Option<IpNet>, String> {
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
pub(super) fn overlaps(rules: &[Rule]) -> Vec<(usize, String)> {
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

pub(super) fn duplicate_hostnames(hosts: &[HostnameRule]) -> Vec<(usize, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{cfg, one_problem};

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
    fn enclosing_walks_to_the_default_route() {
        let v: Vec<_> = enclosing("192.0.2.128/25".parse().unwrap())
            .map(|n| n.to_string())
            .collect();
        assert_eq!(v.first().unwrap(), "192.0.2.128/25");
        assert_eq!(v[1], "192.0.2.0/24");
        assert_eq!(v.last().unwrap(), "0.0.0.0/0");
        assert_eq!(v.len(), 26);
    }
}
