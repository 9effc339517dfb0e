//! Every class of configuration mistake is refused at start with file, line and reason, and
//! the kernel is left untouched.

use std::process::Command;

use egress_guard_e2e::*;

use crate::setup;

/// Starts `egress-guard run` on `body` and returns (exit code, stderr, config path).
fn refused(body: &str) -> (i32, String, String) {
    let (dir, config, pin_dir) = Agent::config_file(body);
    let out = Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !pin_dir.exists(),
        "a refused config must not touch the kernel; pins at {}",
        pin_dir.display()
    );
    let _ = std::fs::remove_dir_all(dir);
    (
        out.status.code().unwrap_or(-1),
        stderr,
        config.display().to_string(),
    )
}

fn assert_refused(body: &str, line: usize, reason: &str) {
    let (code, stderr, path) = refused(body);
    assert_eq!(code, 2, "{stderr}");
    // The pin_dir line is line 1, so the body's lines start at 2.
    let want = format!("{path}:{}: ", line + 1);
    assert!(
        stderr.contains(&want) && stderr.contains(reason),
        "want {want}…{reason} in:\n{stderr}"
    );
    assert!(
        stderr.contains("configuration refused; nothing was changed"),
        "{stderr}"
    );
}

#[test]
fn unknown_keys_are_refused() {
    setup();
    let cg = TestCgroup::new("cfg");
    assert_refused(
        &format!(
            "[[policy]]\nname = \"a\"\ncgroups = [\"{}\"]\nalow = []\n",
            cg.rel()
        ),
        4,
        "unknown field `alow`",
    );
}

#[test]
fn bad_addresses_are_refused() {
    setup();
    let cg = TestCgroup::new("cfg");
    assert_refused(
        &format!(
            "[[policy]]\nname = \"a\"\ncgroups = [\"{}\"]\nallow = [\n  \"10.0.0.0/33:443\",\n]\n",
            cg.rel()
        ),
        5,
        "prefix length \"33\" is out of range",
    );
}

#[test]
fn overlapping_entries_are_refused() {
    setup();
    let cg = TestCgroup::new("cfg");
    assert_refused(
        &format!(
            "[[policy]]\nname = \"a\"\ncgroups = [\"{}\"]\nallow = [\"10.0.0.0/8:443\",\n \"10.1.2.3:443\"]\n",
            cg.rel()
        ),
        5,
        "overlaps \"10.0.0.0/8:443\" (line 5)",
    );
}

#[test]
fn contradictory_policies_are_refused() {
    setup();
    let cg = TestCgroup::new("cfg");
    let child = cg.child("sandbox");
    let rel = cg.rel();
    let child_rel = child
        .strip_prefix(cgroup2_root())
        .unwrap()
        .display()
        .to_string();
    // The same cgroup in two policies.
    assert_refused(
        &format!(
            "[[policy]]\nname = \"a\"\ncgroups = [\"{rel}\"]\n[[policy]]\nname = \"b\"\ncgroups = [\"{rel}\"]\n"
        ),
        6,
        "already guarded by policy \"a\"",
    );
    // Nested cgroups in two policies.
    assert_refused(
        &format!(
            "[[policy]]\nname = \"a\"\ncgroups = [\"{rel}\"]\n[[policy]]\nname = \"b\"\ncgroups = [\"{child_rel}\"]\n"
        ),
        6,
        "nests with",
    );
}

#[test]
fn missing_cgroups_are_refused() {
    setup();
    assert_refused(
        "[[policy]]\nname = \"a\"\ncgroups = [\"egress-guard-test-does-not-exist\"]\n",
        3,
        "does not exist",
    );
}
