//! The scenario's audit records: which attempt each belongs to, and one line per record as a
//! person reads it.

use serde_json::Value;

use super::{Attempt, LLM_ADDR, LLM_HOST, LLM_PORT};

pub fn is_llm_record(r: &Value) -> bool {
    (r["type"] == "dns" && r["query"] == LLM_HOST)
        || (r["type"].as_str().is_some_and(|t| t.starts_with("net."))
            && r["dst"] == LLM_ADDR
            && r["port"] == LLM_PORT)
}

/// A record of the container reaching for something: a DNS query, a connect, send or packet
/// to an address outside its loopback, a socket decision.
pub(super) fn reaches_out(r: &Value) -> bool {
    let t = r["type"].as_str().unwrap_or("");
    t == "dns"
        || (t.starts_with("net.")
            && !r["dst"]
                .as_str()
                .is_some_and(|d| d.starts_with("127.") || d == "::1"))
}

/// Which attempt a record belongs to: its DNS name, its destination, its socket family or
/// the program it started carries the attempt's marker.
pub(super) fn attribute(r: &Value, attempts: &[Attempt]) -> Option<usize> {
    let t = r["type"].as_str().unwrap_or("");
    attempts.iter().position(|a| {
        let m = a.marker.as_str();
        match t {
            "dns" => r["query"].as_str().is_some_and(|q| q.contains(m)),
            "net.socket" => r["family"] == "packet" && m == "AF_PACKET",
            t if t.starts_with("net.") => r["dst"]
                .as_str()
                .is_some_and(|d| format!("{d} {}", r["port"]) == m),
            "proc.exec" => argv(r).contains(m),
            _ => false,
        }
    })
}

pub fn describe(r: &Value) -> String {
    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
    let who = format!(
        "{} (comm {}, pid {})",
        s("container_name"),
        s("comm"),
        r["pid"]
    );
    let why = match r["reason"].as_str() {
        Some(reason) if !reason.is_empty() => format!(" ({reason})"),
        _ => String::new(),
    };
    match s("type").as_str() {
        "dns" => format!(
            "dns {} {} -> {}{} {} answers={}  {who}",
            s("qtype"),
            s("query"),
            s("verdict"),
            why,
            s("rcode"),
            r["answers"]
        ),
        "net.socket" => format!(
            "net.socket family={} type={} -> {}{}  {who}",
            r["family"],
            r["sock_type"],
            s("verdict"),
            why
        ),
        "proc.exec" => format!("proc.exec {}  {who}", argv(r)),
        t if t.starts_with("net.") => {
            let names = r["hostnames"]
                .as_array()
                .filter(|h| !h.is_empty())
                .map(|h| format!(" {}", Value::from(h.clone())))
                .unwrap_or_default();
            format!(
                "{t} {} {}:{}{names} -> {}{}  {who}",
                s("proto"),
                s("dst"),
                r["port"],
                s("verdict"),
                why
            )
        }
        t => format!("{t} {r}"),
    }
}

/// A `proc.exec` record's command line, its arguments joined by spaces.
fn argv(r: &Value) -> String {
    r["argv"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}
