//! `cargo xtask package`: the .deb (dpkg-deb; no extra tools). Its layout is what
//! docs/operator-guide.md promises; tests/e2e/package.rs installs it and checks.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{output, run, workspace_root};

/// (source relative to the workspace, destination in the package, mode)
const FILES: &[(&str, &str, u32)] = &[
    ("target/dist/egress-guard", "usr/bin/egress-guard", 0o755),
    (
        "packaging/systemd/egress-guard.service",
        "lib/systemd/system/egress-guard.service",
        0o644,
    ),
    (
        "packaging/systemd/openhands.slice",
        "lib/systemd/system/openhands.slice",
        0o644,
    ),
    (
        "packaging/systemd/egress-guard.tmpfiles",
        "usr/lib/tmpfiles.d/egress-guard.conf",
        0o644,
    ),
    (
        "packaging/systemd/egress-guard.sysusers",
        "usr/lib/sysusers.d/egress-guard.conf",
        0o644,
    ),
    (
        "packaging/config.toml",
        "etc/egress-guard/config.toml",
        0o640,
    ),
    (
        "target/dist/completions/egress-guard.bash",
        "usr/share/bash-completion/completions/egress-guard",
        0o644,
    ),
    (
        "target/dist/completions/_egress-guard",
        "usr/share/zsh/vendor-completions/_egress-guard",
        0o644,
    ),
    (
        "target/dist/completions/egress-guard.fish",
        "usr/share/fish/vendor_completions.d/egress-guard.fish",
        0o644,
    ),
    ("README.md", "usr/share/doc/egress-guard/README.md", 0o644),
    (
        "docs/operator-guide.md",
        "usr/share/doc/egress-guard/operator-guide.md",
        0o644,
    ),
    (
        "docs/events.md",
        "usr/share/doc/egress-guard/events.md",
        0o644,
    ),
    (
        "docs/control.md",
        "usr/share/doc/egress-guard/control.md",
        0o644,
    ),
    (
        "packaging/docker/daemon.json.example",
        "usr/share/doc/egress-guard/daemon.json.example",
        0o644,
    ),
    (
        "packaging/cloudwatch/egress-guard.yaml",
        "usr/share/doc/egress-guard/cloudwatch/egress-guard.yaml",
        0o644,
    ),
    (
        "packaging/cloudwatch/dashboard.json",
        "usr/share/doc/egress-guard/cloudwatch/dashboard.json",
        0o644,
    ),
    (
        "packaging/cloudwatch/README.md",
        "usr/share/doc/egress-guard/cloudwatch/README.md",
        0o644,
    ),
    (
        "packaging/iam/egress-guard-policy.json",
        "usr/share/doc/egress-guard/iam/egress-guard-policy.json",
        0o644,
    ),
];

const SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];

/// Builds target/debian/egress-guard_<version>_<arch>.deb and returns its path.
pub fn package() -> anyhow::Result<PathBuf> {
    package_build(env!("CARGO_PKG_VERSION"), None)
}

/// The .deb of a build with this package version and, if given, this build id
/// (`EGRESS_GUARD_BUILD_ID`: part of the programs' identity, so an upgrade between two builds
/// replaces every program, as an upgrade with changed programs does).
pub fn package_build(version: &str, build_id: Option<&str>) -> anyhow::Result<PathBuf> {
    crate::dist_build(build_id)?;
    let root = workspace_root();
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let out = root.join("target/debian");
    let stage = out.join(format!("egress-guard_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    for (src, dest, mode) in FILES {
        install(&root.join(src), &stage.join(dest), *mode)?;
    }
    // The man page, compressed as Debian wants it.
    let man = stage.join("usr/share/man/man1/egress-guard.1.gz");
    std::fs::create_dir_all(man.parent().unwrap())?;
    run(Command::new("sh").arg("-c").arg(format!(
        "gzip -9n < {} > {}",
        root.join("target/dist/egress-guard.1").display(),
        man.display()
    )))?;
    std::fs::write(
        stage.join("usr/share/doc/egress-guard/copyright"),
        "egress-guard\nLicense: MIT OR Apache-2.0 (the eBPF programs: MIT OR GPL-2.0)\n",
    )?;

    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    for s in SCRIPTS {
        install(
            &root.join("packaging/debian").join(s),
            &debian.join(s),
            0o755,
        )?;
    }
    std::fs::write(debian.join("conffiles"), "/etc/egress-guard/config.toml\n")?;
    let size_kib = output(Command::new("du").args(["-sk"]).arg(&stage))?
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .to_string();
    std::fs::write(
        debian.join("control"),
        format!(
            "Package: egress-guard\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: egress-guard developers <egress-guard@example.invalid>\n\
             Installed-Size: {size_kib}\n\
             Depends: libc6 (>= 2.34), systemd\n\
             Section: net\n\
             Priority: optional\n\
             Description: kernel-enforced egress allowlists and audit for OpenHands containers\n \
             eBPF programs on the containers' cgroups decide every connect(), sendmsg() and\n \
             outgoing packet; a DNS proxy turns allowed hostnames into allowed addresses; every\n \
             decision, DNS lookup and process exec/exit is recorded and shipped to CloudWatch.\n"
        ),
    )?;
    let deb = out.join(format!("egress-guard_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    eprintln!("==> wrote {}", deb.display());
    Ok(deb)
}

fn install(src: &Path, dest: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest.parent().unwrap())?;
    std::fs::copy(src, dest)
        .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
