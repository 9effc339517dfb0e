//! `cargo xtask fuzz`: the DNS proxy's fuzz targets (agent/fuzz, cargo fuzz + libFuzzer), each
//! for a while, starting from a few real DNS messages. `test` runs it briefly.

use std::process::Command;

use anyhow::Context as _;

use crate::{run, workspace_root};

/// The cargo-fuzz release the targets are known to build with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Targets and their seeds (hex): requests a resolver sends, answers an upstream gives.
const TARGETS: [(&str, &[&str]); 2] = [
    (
        "dns_request",
        &[
            // api.example.com A, RD
            "42420100000100000000000003617069076578616d706c6503636f6d0000010001",
            // a.svc.example TXT with an EDNS OPT record
            "424201000001000000000001016103737663076578616d706c65000010000100002904d0000000000000",
        ],
    ),
    (
        "dns_answer",
        &[
            // api.example.com A → CNAME edge.cdn.net → A 192.0.2.1
            "42428180000100020000000003617069076578616d706c6503636f6d0000010001c00c0005000100000e10000e04656467650363646e036e657400c02d00010001000151800004c0000201",
        ],
    ),
];

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    Ok(())
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex seed"))
        .collect()
}

/// Runs every target for `seconds`; a crash fails the run (libFuzzer keeps the input in
/// agent/fuzz/artifacts).
pub fn run_all(seconds: u64) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("agent/fuzz");
    for (target, seeds) in TARGETS {
        let corpus = workspace_root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(corpus.join(format!("seed-{i}")), unhex(seed))?;
        }
        run(Command::new("cargo")
            .args(["fuzz", "run", "--sanitizer", "none", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=4096")
            // The bpf object embedded in the library is built with -Z build-std.
            .env("RUSTC_BOOTSTRAP", "1"))
        .with_context(|| format!("fuzz target {target} failed"))?;
    }
    Ok(())
}
