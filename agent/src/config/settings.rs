//! The agent's own settings: `log_level`, `pin_dir`, `[audit]`, `[control]` and `[docker]`;
//! their schema, defaults and checks.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{LineIndex, Problem};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress-guard";

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/egress-guard/control.sock";

/// `[docker] root`: where Docker keeps container metadata (names, labels).
pub const DEFAULT_DOCKER_ROOT: &str = "/var/lib/docker";

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
    /// Allowed UDP sends, counted in the kernel per process and destination, are written as
    /// one record per flow and this many seconds, with the count.
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDocker {
    root: PathBuf,
}

/// The `log_level` step of `validate`: a level or a tracing filter.
pub(super) fn validate_log_level(
    raw: Option<Spanned<String>>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Option<String> {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    raw.map(|l| {
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
    })
}

/// The `pin_dir` step: a directory of its own on a bpf filesystem (absent: the default).
pub(super) fn validate_pin_dir(
    raw: Option<Spanned<String>>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> PathBuf {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    match raw {
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
    }
}

/// The `[audit]` step: sizes and paths in range (absent: the defaults).
pub(super) fn validate_audit(
    raw: Option<Spanned<Audit>>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Audit {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    match raw {
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
    }
}

/// The `[control]` step: an absolute socket path (absent: the defaults).
pub(super) fn validate_control(
    raw: Option<Spanned<Control>>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Control {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    match raw {
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
    }
}

/// The `[docker]` step: an absolute `root` (absent: Docker's default).
pub(super) fn validate_docker(
    raw: Option<Spanned<RawDocker>>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> PathBuf {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    match raw {
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
        None => PathBuf::from(DEFAULT_DOCKER_ROOT),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{cfg, one_problem};

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
}
