//! Privileged end-to-end tests: the real `egress-guard` binary, real cgroups, real kernel
//! decisions, loopback traffic only. Run by `cargo xtask test` (as root, one at a time).

mod audit;
mod cloudwatch;
mod cloudwatch_faults;
mod config_errors;
mod containers;
mod control;
mod dns;
mod dns_abuse;
mod enforce;
mod lifecycle;
mod openhands;
mod package;

/// Every test starts here: root check, and removal of what a killed earlier run left.
pub fn setup() {
    egress_guard_e2e::require_root();
    egress_guard_e2e::sweep();
}

/// Runs last (tests run one at a time, in name order): nothing this run created is left.
#[test]
fn zz_nothing_is_left_behind() {
    setup();
    let mine = format!("{}-{}-", egress_guard_e2e::PREFIX, std::process::id());
    for dir in [
        egress_guard_e2e::cgroup2_root(),
        std::path::PathBuf::from("/sys/fs/bpf"),
    ] {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&mine))
            .collect();
        assert!(
            left.is_empty(),
            "left behind in {}: {left:?}",
            dir.display()
        );
    }
}
