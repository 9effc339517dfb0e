//! Privileged end-to-end tests: the real `egress-guard` binary, real cgroups, real kernel
//! decisions, loopback traffic only. Run by `cargo xtask test` (as root, one at a time).

mod config_errors;
mod enforce;
mod lifecycle;

/// Every test starts here: root check, and removal of what a killed earlier run left.
pub fn setup() {
    egress_guard_e2e::require_root();
    egress_guard_e2e::sweep();
}
