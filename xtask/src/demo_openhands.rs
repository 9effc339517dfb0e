//! `cargo xtask demo openhands`: the real OpenHands agent server (openhands-agent-server from
//! PyPI, hash-pinned, in a Debian trixie image built without a registry) in a guarded sandbox
//! under a private Docker engine, driven through its REST API by a scripted LLM that asks it to
//! get out. The scenario is the e2e crate's `openhands-demo` binary
//! (`tests/src/openhands/`); this builds it and runs it as root.

use std::process::Command;

use anyhow::bail;

use crate::{is_root, workspace_root};

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the demo loads eBPF programs and runs a Docker engine: run `cargo xtask demo \
             openhands` as root"
        );
    }
    crate::build_binaries()?;
    let target = workspace_root().join("target/debug");
    crate::run(
        Command::new(target.join("openhands-demo"))
            .env("EGRESS_GUARD_BIN", target.join("egress-guard")),
    )
}
