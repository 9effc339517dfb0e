//! The CLI side of the control socket: one request per command, a human rendering by
//! default and the JSON as it came with `--json`.

use std::{io::Write as _, path::Path, process::ExitCode};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Sends one request; returns the status and the response (body still to read).
async fn send(
    socket: &Path,
    method: Method,
    path: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied on {}: only root and members of the agent's control group may use it",
            socket.display()
        ),
        Err(e) => bail!(
            "cannot reach the agent at {} ({e}): is egress-guard running? another path: --socket",
            socket.display()
        ),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "egress-guard")
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(req).await?)
}

async fn fetch(socket: &Path, method: Method, path: &str) -> anyhow::Result<(StatusCode, Value)> {
    let resp = send(socket, method, path).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&body).with_context(|| {
        format!(
            "the agent answered {status} with: {}",
            String::from_utf8_lossy(&body)
        )
    })?;
    Ok((status, v))
}

/// A request that must succeed: non-2xx answers become errors with the agent's message.
async fn get_ok(socket: &Path, path: &str) -> anyhow::Result<Value> {
    let (status, v) = fetch(socket, Method::GET, path).await?;
    if !status.is_success() {
        bail!("{}", v["error"].as_str().unwrap_or(&v.to_string()));
    }
    Ok(v)
}

pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Builds `?k=v&…` from the pairs that are set.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let v = runtime()?.block_on(get_ok(socket, "/v1/status"))?;
    if json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "egress-guard {} — up {} s, config {}",
        v["agent_version"].as_str().unwrap_or("?"),
        v["uptime_seconds"],
        v["config"].as_str().unwrap_or("?")
    );
    for p in v["policies"].as_array().into_iter().flatten() {
        println!(
            "  policy {:<20} {:<8} {:>6} kernel entries, {} cgroups",
            p["name"].as_str().unwrap_or("?"),
            p["mode"].as_str().unwrap_or("?"),
            p["entries"],
            p["cgroups"]
        );
    }
    println!(
        "  cgroup hooks: {}",
        v["cgroup_hooks"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|h| h.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    let guard = v["socket_guard"].as_str().unwrap_or("?");
    println!(
        "  socket guard: {}   process records: {}",
        match guard {
            "lsm" => "lsm (refused with EPERM)",
            "fentry" => "fentry (the caller is killed; add bpf to lsm= for EPERM)",
            "tracepoint" => "tracepoint (socket() callers are killed; io_uring is NOT seen)",
            "none" => "NONE: AF_PACKET sockets of guarded processes are NOT stopped (see the log)",
            other => other,
        },
        if v["process_events"] == true {
            "on"
        } else {
            "OFF"
        }
    );
    let pins = &v["pins"];
    println!(
        "  pins: {} (last apply: adopted {}, attached {}, detached {})",
        pins["dir"].as_str().unwrap_or("?"),
        pins["adopted"],
        pins["attached"],
        pins["detached"]
    );
    let audit = &v["audit"];
    println!(
        "  audit: {} ({} bytes), {} records since start",
        audit["file"].as_str().unwrap_or("?"),
        audit["file_bytes"],
        audit["records_since_start"]
    );
    let cw = &v["cloudwatch"];
    if cw["log_group"].is_string() {
        println!(
            "  cloudwatch: {}/{}; last delivery {}; delivered {}, rejected {}, quarantined {}, timed-out requests {}; spool backlog {} bytes{}{}",
            cw["log_group"].as_str().unwrap_or("?"),
            cw["log_stream"].as_str().unwrap_or("?"),
            cw["last_delivery"].as_str().unwrap_or("never"),
            cw["delivered_events"],
            cw["rejected_events"],
            cw["quarantined_events"],
            cw["timeouts"],
            cw["spool_pending_bytes"],
            cw["oldest_undelivered_age_ms"]
                .as_u64()
                .map(|ms| format!(", oldest waiting {:.1} s", ms as f64 / 1000.0))
                .unwrap_or_default(),
            cw["last_error"]
                .as_str()
                .map(|e| format!("; LAST ERROR: {e}"))
                .unwrap_or_default()
        );
    } else {
        println!("  cloudwatch: off (no [cloudwatch] in the config)");
    }
    Ok(())
}

pub fn targets(socket: &Path, json: bool) -> anyhow::Result<()> {
    let v = runtime()?.block_on(get_ok(socket, "/v1/targets"))?;
    if json {
        print_json(&v);
        return Ok(());
    }
    println!("{:<20} {:<8} {:<50} CONTAINERS", "POLICY", "MODE", "CGROUP");
    for t in v["targets"].as_array().into_iter().flatten() {
        // id (name) → policy, where a selector gave the container another policy.
        let containers: Vec<String> = t["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let id = c["id"].as_str().unwrap_or("?");
                let name = c["name"]
                    .as_str()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                if c["selected"].as_bool() == Some(true) {
                    format!("{id}{name} → {}", c["policy"].as_str().unwrap_or("?"))
                } else {
                    format!("{id}{name}")
                }
            })
            .collect();
        println!(
            "{:<20} {:<8} {:<50} {}",
            t["policy"].as_str().unwrap_or("?"),
            t["mode"].as_str().unwrap_or("?"),
            t["cgroup"].as_str().unwrap_or("?"),
            if containers.is_empty() {
                "-".into()
            } else {
                containers.join(",")
            }
        );
    }
    Ok(())
}

pub fn dns(socket: &Path, json: bool) -> anyhow::Result<()> {
    let v = runtime()?.block_on(get_ok(socket, "/v1/dns"))?;
    if json {
        print_json(&v);
        return Ok(());
    }
    println!("mode: {}", v["mode"].as_str().unwrap_or("?"));
    for p in v["proxy"].as_array().into_iter().flatten() {
        println!(
            "proxy: policy {} on {} (UDP and TCP), upstreams {}",
            p["policy"].as_str().unwrap_or("?"),
            p["listen"].as_str().unwrap_or("?"),
            p["upstreams"]
                .as_array()
                .map(|u| u
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
    }
    let l = &v["limits"];
    println!(
        "limits: {} distinct wildcard names per minute and container, {} learned pairs per container, {} per policy; private answers {}",
        l["wildcard_names_per_minute"],
        l["max_learned_per_container"],
        l["max_learned"],
        l["private_answers"].as_str().unwrap_or("?")
    );
    for p in l["policies"].as_array().into_iter().flatten() {
        println!(
            "limits: policy {}: {} pairs; refused: name budget {}, pair quota {}, private {}; evicted {}, full {}, not learned {}",
            p["policy"].as_str().unwrap_or("?"),
            p["learned_pairs"],
            p["name_budget_refused"],
            p["learned_quota_refused"],
            p["private_refused"],
            p["learned_evicted"],
            p["learned_full"],
            p["not_learned"]
        );
    }
    println!();
    println!(
        "{:<20} {:<40} {:<40} EXPIRES IN",
        "POLICY", "NAME", "ADDRESS"
    );
    for e in v["learned"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<40} {:<40} {}s",
            e["policy"].as_str().unwrap_or("?"),
            e["name"].as_str().unwrap_or("?"),
            e["address"].as_str().unwrap_or("?"),
            e["expires_in_secs"]
        );
    }
    Ok(())
}

pub fn policy(socket: &Path, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let path = match name {
        Some(n) => format!("/v1/policy/{}", encode(n)),
        None => "/v1/policy".into(),
    };
    let v = runtime()?.block_on(get_ok(socket, &path))?;
    if json {
        print_json(&v);
        return Ok(());
    }
    for p in v["policies"].as_array().into_iter().flatten() {
        println!(
            "policy {} ({}, {} kernel entries)",
            p["name"].as_str().unwrap_or("?"),
            p["mode"].as_str().unwrap_or("?"),
            p["kernel_entries"]
        );
        for a in p["addresses"].as_array().into_iter().flatten() {
            let protos: Vec<&str> = a["protocols"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str())
                .collect();
            println!(
                "  {:<40} {:<10} ports {:<12} (line {})",
                a["network"].as_str().unwrap_or("?"),
                protos.join("+"),
                a["ports"].as_str().unwrap_or("?"),
                a["line"]
            );
        }
        for h in p["hostnames"].as_array().into_iter().flatten() {
            let ips: Vec<&str> = h["learned_ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str())
                .collect();
            println!(
                "  {:<40} hostname   ports {:<12} (line {}) — now: {}",
                h["name"].as_str().unwrap_or("?"),
                h["ports"].as_str().unwrap_or("?"),
                h["line"],
                if ips.is_empty() {
                    "no address learned".to_string()
                } else {
                    ips.join(", ")
                }
            );
        }
    }
    Ok(())
}

pub fn check(
    socket: &Path,
    dest: &str,
    policy: Option<String>,
    container: Option<String>,
    proto: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let q = query(&[
        ("dest", Some(dest.to_string())),
        ("policy", policy),
        ("container", container),
        ("proto", proto),
    ]);
    let v = runtime()?.block_on(get_ok(socket, &format!("/v1/check{q}")))?;
    if json {
        print_json(&v);
    } else {
        let head = format!(
            "{} {}:{}/{} (policy {}, {} mode)",
            v["verdict"].as_str().unwrap_or("?").to_uppercase(),
            v["dest"].as_str().unwrap_or("?"),
            v["port"],
            v["proto"].as_str().unwrap_or("?"),
            v["policy"].as_str().unwrap_or("?"),
            v["mode"].as_str().unwrap_or("?")
        );
        let entry = &v["entry"];
        if let Some(names) = entry.get("learned_from") {
            println!("{head}: allowed as an address answered for {names}");
        } else if entry.is_object() {
            println!(
                "{head}: allowed by entry {} (line {})",
                entry["entry"], entry["line"]
            );
        } else {
            println!("{head}: {}", v["reason"].as_str().unwrap_or(""));
        }
        if let Some(names) = v["hostnames"].as_array() {
            println!("learned from DNS answers for: {names:?}");
        }
    }
    Ok(if v["verdict"] == "allow" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Control characters from records (argv and names are chosen by the guarded processes)
/// must not reach the terminal as escape sequences.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn render_event(r: &Value) -> String {
    let s = |k: &str| {
        r[k].as_str().map(str::to_string).unwrap_or_else(|| {
            if r[k].is_null() {
                "-".into()
            } else {
                r[k].to_string()
            }
        })
    };
    let ty = s("type");
    let what = if ty.starts_with("net.socket") {
        format!("socket family {} type {}", s("family"), s("sock_type"))
    } else if ty.starts_with("net.") {
        format!(
            "{} {}:{}{}",
            s("proto"),
            s("dst"),
            s("port"),
            r["count"]
                .as_u64()
                .map(|c| format!(" ×{c}"))
                .unwrap_or_default()
        )
    } else if ty == "proc.exec" {
        r["argv"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    } else if ty == "proc.exit" {
        if r["signal"].is_null() {
            format!("exit {}", s("exit_code"))
        } else {
            format!("signal {}", s("signal"))
        }
    } else {
        String::new()
    };
    printable(&format!(
        "{} {:<13} {:<10} {:<15} pid {:<7} {} [{} {}]",
        s("ts"),
        ty,
        s("verdict"),
        s("comm"),
        s("pid"),
        what,
        s("policy"),
        s("container")
    ))
}

#[allow(clippy::too_many_arguments)]
pub fn events(
    socket: &Path,
    follow: bool,
    ty: Option<String>,
    verdict: Option<String>,
    container: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
    json: bool,
) -> anyhow::Result<()> {
    let q = query(&[
        ("type", ty),
        ("verdict", verdict),
        ("container", container),
        ("since", since),
        ("limit", limit.map(|l| l.to_string())),
        ("follow", follow.then(|| "1".to_string())),
    ]);
    runtime()?.block_on(async {
        let resp = send(socket, Method::GET, &format!("/v1/events{q}")).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            bail!(
                "{}",
                v["error"]
                    .as_str()
                    .unwrap_or(&String::from_utf8_lossy(&bytes))
            );
        }
        let mut pending = Vec::new();
        let mut out = std::io::stdout().lock();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                if json {
                    writeln!(out, "{text}")?;
                } else if let Ok(r) = serde_json::from_str::<Value>(text) {
                    if r["type"] == "control.missed" {
                        writeln!(
                            out,
                            "... {} records missed: this reader was too slow",
                            r["missed"]
                        )?;
                    } else {
                        writeln!(out, "{}", render_event(&r))?;
                    }
                }
                out.flush()?;
            }
        }
        Ok(())
    })
}

pub fn stats(socket: &Path, json: bool) -> anyhow::Result<()> {
    let v = runtime()?.block_on(get_ok(socket, "/v1/stats"))?;
    if json {
        print_json(&v);
        return Ok(());
    }
    print_stats_table(&v);
    println!(
        "audit records: {} ({:.1}/s since start), lost to a full kernel ring: {}",
        v["audit_records"],
        v["audit_records_per_second"].as_f64().unwrap_or(0.0),
        v["audit_records_lost"]
    );
    Ok(())
}

/// The per-policy counter table (also used when reading the pins directly).
pub fn print_stats_table(v: &Value) {
    println!(
        "{:<20} {:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "POLICY",
        "MODE",
        "CONN_OK",
        "CONN_DENY",
        "SEND_OK",
        "SEND_DENY",
        "PKT_DROP",
        "SOCK_DENY",
        "WOULD_DENY"
    );
    for p in v["policies"].as_array().into_iter().flatten() {
        let c = |k: &str| p["counters"][k].as_u64().unwrap_or(0);
        let would = c("connect_would_deny")
            + c("send_would_deny")
            + c("packet_would_deny")
            + c("socket_would_deny");
        println!(
            "{:<20} {:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            p["policy"].as_str().unwrap_or("?"),
            p["mode"].as_str().unwrap_or("?"),
            c("connect_allowed"),
            c("connect_denied"),
            c("send_allowed"),
            c("send_denied"),
            c("packet_denied"),
            c("socket_denied"),
            would
        );
    }
}

pub fn reload(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let (status, v) = runtime()?.block_on(fetch(socket, Method::POST, "/v1/reload"))?;
    if json {
        print_json(&v);
    } else if status.is_success() {
        println!("reload applied");
        for p in v["policies"].as_array().into_iter().flatten() {
            println!(
                "  policy {} ({}): {} kernel entries, {} cgroups",
                p["name"].as_str().unwrap_or("?"),
                p["mode"].as_str().unwrap_or("?"),
                p["entries"],
                p["cgroups"]
            );
        }
        for r in v["removed_policies"].as_array().into_iter().flatten() {
            println!("  policy {} removed", r.as_str().unwrap_or("?"));
        }
    } else {
        println!(
            "reload refused: {}",
            v["error"].as_str().unwrap_or(&v.to_string())
        );
        if let Some(n) = v["note"].as_str() {
            println!("({n})");
        }
    }
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
