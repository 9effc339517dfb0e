//! Cgroup paths: the same cgroup may not be in two policies (checked when parsing), and every
//! path is resolved against the live cgroup2 hierarchy (checked when applying).

use std::{
    collections::HashMap,
    path::{Component, Path, PathBuf},
};

use super::{Config, ConfigError, Policy, Problem};

/// Cgroup paths as written, made comparable: no leading/trailing slashes.
fn normalize_cgroup_text(p: &str) -> String {
    p.trim_matches('/').to_string()
}

/// The step of `validate` after the policies: each cgroup is listed once, in one policy.
pub(super) fn check_one_policy_per_cgroup(policies: &[Policy], problems: &mut Vec<Problem>) {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });

    // The same cgroup in two policies would run both programs: contradictory.
    let mut seen: HashMap<String, (String, usize)> = HashMap::new();
    for p in policies {
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
    use crate::config::{parse, tests::one_problem};

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
