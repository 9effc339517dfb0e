//! The eBPF crate links with bpf-linker; rebuild when it changes (it is installed by
//! `cargo xtask setup`, so it may appear after a first failed build).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
