//! The control socket: HTTP/1.1 + JSON over a Unix socket (so `curl --unix-socket` works too).
//! Peer credentials decide access: root may do everything, members of the configured group
//! may read, everyone else is refused. Endpoints are documented in docs/control.md.

pub mod client;

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode, body::Frame, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use nix::{
    sys::stat::{Mode, umask},
    unistd::Group,
};
use serde_json::{Value, json};
use tokio::{
    net::UnixListener,
    sync::{broadcast, mpsc, oneshot},
};

use crate::{audit::EventFeed, check, kernel};

/// A reload request from the socket, answered with the outcome.
pub type ReloadRequest = oneshot::Sender<Result<Value, String>>;

/// What the endpoints read; the daemon keeps it current.
pub struct Shared {
    pub started: Instant,
    pub pin_dir: PathBuf,
    pub config_path: PathBuf,
    /// Status fields from the daemon (policies, guards, last apply).
    pub status: Mutex<Value>,
    /// The policies in force, for `policy` and `check`.
    pub policies: Mutex<Vec<check::PolicyView>>,
    pub events: Arc<EventFeed>,
    pub audit_file: PathBuf,
    pub reload: mpsc::Sender<ReloadRequest>,
    /// The group whose members may read.
    pub group: Option<(String, u32)>,
    /// The DNS side: mode and listeners (`dns` of the status), and the learned addresses.
    pub dns: Mutex<Value>,
    pub learner: Arc<Mutex<crate::dns::learned::Learner>>,
    /// The CloudWatch sink's delivery state, when `[cloudwatch]` is configured.
    pub cloudwatch: Option<Arc<Mutex<crate::cloudwatch::health::Health>>>,
    /// Container discovery: which container a selector gave to which policy.
    pub containers: Arc<crate::containers::Discovery>,
}

/// The policies in force, with the addresses learned so far.
fn policies_now(shared: &Shared) -> Vec<check::PolicyView> {
    let mut policies = shared
        .policies
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    if let Ok(l) = shared.learner.lock() {
        for p in &mut policies {
            p.learned = l.view(&p.name);
        }
    }
    policies
}

/// Serves the control socket until the task is dropped.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    // Bounded: a flood of connections (or followers) cannot take the agent's memory.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = match slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let access = access_of(&stream, shared.group.as_ref());
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone(), access));
            // Malformed requests, half-written ones and vanished clients end here, quietly.
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

/// Connections served at once.
const MAX_CONNECTIONS: usize = 512;

/// Creates the socket: mode 0660, group `gid`, in a directory of its own. Refuses to replace
/// anything but a dead socket.
pub fn bind(path: &Path, gid: Option<u32>) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "something already listens on {} (another egress-guard?)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // No moment with looser permissions: the socket is created 0660 under this umask
    // (process-wide, but only changed around this bind, at start-up).
    let old = umask(Mode::from_bits_truncate(0o117));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener =
        bound.with_context(|| format!("binding the control socket {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(listener)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Access {
    Admin,
    Read,
    None(u32),
}

fn access_of(stream: &tokio::net::UnixStream, group: Option<&(String, u32)>) -> Access {
    let Ok(cred) = stream.peer_cred() else {
        return Access::None(u32::MAX);
    };
    if cred.uid() == 0 {
        return Access::Admin;
    }
    match group {
        Some((_, gid)) if cred.gid() == *gid || peer_groups(stream).contains(gid) => Access::Read,
        _ => Access::None(cred.uid()),
    }
}

/// The supplementary groups of the connected process, as the kernel has them (SO_PEERGROUPS):
/// not the user database, so dropped or runtime-added groups count as they are.
fn peer_groups(stream: &tokio::net::UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd as _;
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // Raw libc: nix has no SO_PEERGROUPS socket option.
    // SAFETY: the buffer and its length are valid; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    groups
}

/// The gid of group `name`, if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    Some(Group::from_name(name).ok()??.gid.as_raw())
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("valid response")
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    json_response(status, &json!({ "error": msg.into() }))
}

/// `a=1&b=x` → pairs, percent-decoded.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 3 <= b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
    access: Access,
) -> Result<Response<Body>, Infallible> {
    if let Access::None(uid) = access {
        let group = shared
            .group
            .as_ref()
            .map_or("(none configured)".to_string(), |g| g.0.clone());
        return Ok(error(
            StatusCode::FORBIDDEN,
            format!(
                "permission denied: uid {uid} is neither root nor a member of the control group {group}"
            ),
        ));
    }
    let path = req.uri().path().to_string();
    let query = query_pairs(req.uri().query().unwrap_or(""));
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.clone());
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/status") => json_response(StatusCode::OK, &status(&shared)),
        (&Method::GET, "/v1/stats") => match stats(&shared) {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        },
        (&Method::GET, "/v1/targets") => json_response(StatusCode::OK, &targets(&shared)),
        (&Method::GET, "/v1/dns") => {
            let mut v = shared.dns.lock().map(|d| d.clone()).unwrap_or(Value::Null);
            let (learned, limits) = shared
                .learner
                .lock()
                .map(|l| (l.entries(), l.limits()))
                .unwrap_or_default();
            v["learned"] = serde_json::to_value(learned).unwrap_or(Value::Null);
            v["limits"] = limits;
            json_response(StatusCode::OK, &v)
        }
        (&Method::GET, p) if p == "/v1/policy" || p.starts_with("/v1/policy/") => {
            let name = p.strip_prefix("/v1/policy/").map(percent_decode);
            let policies = policies_now(&shared);
            let chosen: Vec<Value> = policies
                .iter()
                .filter(|p| name.as_ref().is_none_or(|n| *n == p.name))
                .map(check::PolicyView::to_json)
                .collect();
            match (name, chosen.is_empty()) {
                (Some(n), true) => error(StatusCode::NOT_FOUND, format!("no policy named {n:?}")),
                _ => json_response(StatusCode::OK, &json!({ "policies": chosen })),
            }
        }
        (&Method::GET, "/v1/check") => {
            let policies = policies_now(&shared);
            // A container a selector gave to a policy is decided by that policy.
            let container = get("container");
            let selected = container.as_deref().and_then(|c| {
                shared
                    .containers
                    .snapshot()
                    .into_iter()
                    .find(|f| f.container.starts_with(c) || f.name.as_deref() == Some(c))
                    .and_then(|f| f.policy)
            });
            match check::check(
                &policies,
                get("dest").as_deref(),
                get("policy").as_deref().or(selected.as_deref()),
                container.as_deref(),
                get("proto").as_deref(),
            ) {
                Ok(v) => json_response(StatusCode::OK, &v),
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            }
        }
        (&Method::GET, "/v1/events") => events(&shared, &query),
        (&Method::POST, "/v1/reload") => {
            if access != Access::Admin {
                error(
                    StatusCode::FORBIDDEN,
                    "permission denied: only root may reload",
                )
            } else {
                let (tx, rx) = oneshot::channel();
                match shared.reload.send(tx).await {
                    Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"),
                    Ok(()) => match rx.await {
                        Ok(Ok(v)) => json_response(StatusCode::OK, &v),
                        Ok(Err(reason)) => json_response(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            &json!({ "result": "refused", "error": reason, "note": "the previous policy stays in force" }),
                        ),
                        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "reload dropped"),
                    },
                }
            }
        }
        (_, p) if p.starts_with("/v1/") => error(
            StatusCode::NOT_FOUND,
            format!("no endpoint {} {p} (see docs/control.md)", req.method()),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "endpoints live under /v1/ (see docs/control.md)",
        ),
    };
    Ok(resp)
}

fn status(shared: &Shared) -> Value {
    let mut v = shared
        .status
        .lock()
        .map(|s| s.clone())
        .unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
        m.insert(
            "uptime_seconds".into(),
            shared.started.elapsed().as_secs().into(),
        );
        m.insert(
            "config".into(),
            shared.config_path.display().to_string().into(),
        );
        let audit_size = std::fs::metadata(&shared.audit_file).map(|m| m.len()).ok();
        m.insert(
            "audit".into(),
            json!({
                "file": shared.audit_file.display().to_string(),
                "file_bytes": audit_size,
                "records_since_start": shared.events.total(),
            }),
        );
        let cw = match &shared.cloudwatch {
            Some(h) => h
                .lock()
                .ok()
                .and_then(|h| serde_json::to_value(&*h).ok())
                .unwrap_or(Value::Null),
            None => json!({ "enabled": false }),
        };
        m.insert("cloudwatch".into(), cw);
        if let Ok(s) = stats(shared) {
            m.insert("stats".into(), s);
        }
    }
    v
}

fn stats(shared: &Shared) -> anyhow::Result<Value> {
    let mut v = kernel::counters_json(&shared.pin_dir)?;
    let records = shared.events.total();
    let uptime = shared.started.elapsed().as_secs_f64().max(1.0);
    v["audit_records"] = records.into();
    v["audit_records_per_second"] = (records as f64 / uptime).into();
    Ok(v)
}

fn targets(shared: &Shared) -> Value {
    let policies = shared
        .policies
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let root = kernel::mounts::cgroup2_root().ok();
    let found = shared.containers.snapshot();
    let mut out = Vec::new();
    for p in &policies {
        for cg in &p.cgroups {
            let rel = root
                .as_ref()
                .and_then(|r| cg.strip_prefix(r).ok())
                .map_or(cg.display().to_string(), |r| format!("/{}", r.display()));
            // A container is under the guarded cgroup's policy unless a selector took it.
            let containers: Vec<Value> = check::containers_under(cg)
                .into_iter()
                .map(|(id, path)| {
                    let f = found.iter().find(|f| f.cgroup == path);
                    json!({
                        "id": &id[..12],
                        "cgroup": path.display().to_string(),
                        "name": f.and_then(|f| f.name.clone()),
                        "policy": f.and_then(|f| f.policy.clone()).unwrap_or_else(|| p.name.clone()),
                        "selected": f.is_some_and(|f| f.policy.is_some()),
                    })
                })
                .collect();
            out.push(json!({ "policy": p.name, "mode": p.mode, "cgroup": rel, "containers": containers }));
        }
    }
    json!({ "targets": out })
}

fn matches(rec: &Value, query: &[(String, String)]) -> bool {
    query.iter().all(|(k, v)| match k.as_str() {
        "type" => rec["type"]
            .as_str()
            .is_some_and(|t| t == v || t.starts_with(&format!("{v}."))),
        "verdict" => rec["verdict"] == v.as_str(),
        "container" => {
            rec["container"]
                .as_str()
                .is_some_and(|c| v.starts_with(c) || c.starts_with(v.as_str()))
                || rec["container_name"] == v.as_str()
        }
        "policy" => rec["policy"] == v.as_str(),
        _ => true,
    })
}

fn events(shared: &Shared, query: &[(String, String)]) -> Response<Body> {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.clone());
    let since = match get("since").map(|s| humantime::parse_duration(&s)) {
        Some(Ok(d)) => match std::time::SystemTime::now().checked_sub(d) {
            Some(t) => Some(t),
            None => return error(StatusCode::BAD_REQUEST, "since: too far back"),
        },
        Some(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("since: {e} (e.g. 10m, 1h)"),
            );
        }
        None => None,
    };
    let limit: usize = get("limit").and_then(|l| l.parse().ok()).unwrap_or(100);
    let filters: Vec<(String, String)> = query
        .iter()
        .filter(|(k, _)| ["type", "verdict", "container", "policy"].contains(&k.as_str()))
        .cloned()
        .collect();
    let recent = shared.events.recent();
    let newer = |r: &Value| {
        since.is_none_or(|t| {
            r["ts"]
                .as_str()
                .and_then(|s| humantime::parse_rfc3339(s).ok())
                .is_some_and(|ts| ts >= t)
        })
    };
    let chosen: Vec<Arc<Value>> = recent
        .into_iter()
        .filter(|r| matches(r, &filters) && newer(r))
        .collect();
    let skip = chosen.len().saturating_sub(limit);
    let mut lines = Vec::new();
    for r in &chosen[skip..] {
        lines.extend(serde_json::to_vec(&**r).unwrap_or_default());
        lines.push(b'\n');
    }
    let follow = get("follow").is_some_and(|f| f != "0" && f != "false");
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson");
    if !follow {
        return builder
            .body(Full::new(Bytes::from(lines)).boxed())
            .expect("valid response");
    }
    // Follow: the backlog, then live records as they come; a reader too slow for the feed
    // is told how many it missed.
    let rx = shared.events.subscribe();
    let first =
        futures_util::stream::once(
            async move { Ok::<_, Infallible>(Frame::data(Bytes::from(lines))) },
        );
    let live = futures_util::stream::unfold((rx, filters), |(mut rx, filters)| async move {
        loop {
            match rx.recv().await {
                Ok(rec) if matches(&rec, &filters) => {
                    let mut line = serde_json::to_vec(&*rec).unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok(Frame::data(Bytes::from(line))), (rx, filters)));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let line = format!("{}\n", json!({ "type": "control.missed", "missed": n }));
                    return Some((Ok(Frame::data(Bytes::from(line))), (rx, filters)));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures_util::StreamExt as _;
    builder
        .body(http_body_util::BodyExt::boxed(StreamBody::new(
            first.chain(live),
        )))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            query_pairs("dest=127.0.0.1%3A443&policy=a+b&x"),
            vec![
                ("dest".into(), "127.0.0.1:443".into()),
                ("policy".into(), "a b".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn event_filters_match_types_verdicts_and_containers() {
        let rec = json!({ "type": "net.connect", "verdict": "deny", "container": "0123456789ab", "container_name": "sandbox-1" });
        let q = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert!(matches(&rec, &q("type", "net")));
        assert!(matches(&rec, &q("type", "net.connect")));
        assert!(!matches(&rec, &q("type", "proc")));
        assert!(matches(&rec, &q("verdict", "deny")));
        assert!(!matches(&rec, &q("verdict", "allow")));
        assert!(matches(&rec, &q("container", "0123456789abcdef")));
        assert!(matches(&rec, &q("container", "sandbox-1")));
        assert!(!matches(&rec, &q("container", "ffff")));
    }
}
