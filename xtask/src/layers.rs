//! The agent's module layers, checked by `cargo xtask test`: every top-level module of
//! `agent/src` may use only modules of a lower layer, so the dependency arrows run one way
//! (README, Layout). A `use crate::…` that points sideways or up fails the test with the file
//! that has it.

use std::{collections::BTreeMap, path::Path};

use anyhow::bail;

/// Lowest first. A module may use the modules of the layers before its own.
const LAYERS: &[&[&str]] = &[
    &["config", "notice", "jsonl", "random"],
    &["policy"],
    &["kernel"],
    &["containers", "dns", "cloudwatch"],
    &["audit", "check"],
    &["control"],
    &["daemon"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level modules a Rust file names with `crate::`.
fn used_modules(text: &str) -> Vec<String> {
    let mut used = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::X, b, c::{Y, Z}}`: the names at the group's top level.
            let (mut depth, mut name, mut at_top) = (0, String::new(), true);
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_top = true,
                    c if depth == 0 && at_top && (c.is_ascii_alphanumeric() || c == '_') => {
                        name.push(c)
                    }
                    _ => {
                        if !name.is_empty() {
                            used.push(std::mem::take(&mut name));
                        }
                        if !ch.is_whitespace() {
                            at_top = false;
                        }
                    }
                }
            }
            if !name.is_empty() {
                used.push(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used.push(name);
        }
    }
    used
}

/// Checks every file under `agent/src` (lib.rs and main.rs stand above all layers).
pub fn check(agent_src: &Path) -> anyhow::Result<()> {
    let mut wrong: BTreeMap<String, String> = BTreeMap::new();
    let mut files = vec![agent_src.to_path_buf()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for e in std::fs::read_dir(&path)? {
                files.push(e?.path());
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(agent_src)?;
        let top = rel
            .components()
            .next()
            .map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_string()
            })
            .unwrap_or_default();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = layer_of(&top) else {
            bail!(
                "agent/src/{}: module `{top}` is in no layer of xtask/src/layers.rs",
                rel.display()
            );
        };
        for used in used_modules(&std::fs::read_to_string(&path)?) {
            if used == top {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < own => {}
                _ => {
                    wrong.insert(
                        format!("agent/src/{} uses crate::{used}", rel.display()),
                        format!(
                            "`{top}` may use only: {}",
                            LAYERS[..own].concat().join(", ")
                        ),
                    );
                }
            }
        }
    }
    if !wrong.is_empty() {
        let lines: Vec<String> = wrong.iter().map(|(k, v)| format!("  {k}: {v}")).collect();
        bail!(
            "module layers broken (README, Layout):\n{}",
            lines.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_paths_and_groups_are_found() {
        let text = "use crate::{audit::EventFeed, check, kernel::{self, Kernel}};\n\
                    let x = crate::dns::learned::Learner::new();";
        assert_eq!(used_modules(text), ["audit", "check", "kernel", "dns"]);
    }

    #[test]
    fn an_upward_use_is_refused_with_its_file() {
        let src = std::env::temp_dir().join(format!("layers-{}", std::process::id()));
        std::fs::create_dir_all(src.join("config")).unwrap();
        std::fs::write(
            src.join("config/mod.rs"),
            "use crate::containers::Selector;",
        )
        .unwrap();
        std::fs::write(src.join("kernel.rs"), "use crate::{policy, config::X};").unwrap();
        let e = check(&src).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&src);
        assert!(
            e.contains("agent/src/config/mod.rs uses crate::containers"),
            "{e}"
        );
        assert!(!e.contains("kernel.rs"), "{e}");
    }

    #[test]
    fn the_agent_keeps_its_layers() {
        let src = crate::workspace_root().join("agent/src");
        check(&src).unwrap();
    }
}
