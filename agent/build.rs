//! Builds the eBPF programs (`agent-ebpf`) with aya-build and leaves the object in OUT_DIR,
//! where `src/kernel/programs.rs` embeds it. A plain `cargo build` does it all.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    // The bpf target is tier 3: core is built from source (-Z build-std), which the stable
    // toolchain allows with RUSTC_BOOTSTRAP. aya-build passes this on to its cargo.
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // SAFETY: the build script is single-threaded.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    // The programs' map and event types live in agent-common: rebuild them when it changes.
    println!("cargo:rerun-if-changed=../agent-common/src");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../agent-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
    .context("building the eBPF programs failed; is bpf-linker installed? run `cargo xtask setup`")
}
