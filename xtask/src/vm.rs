//! `cargo xtask vm-test`: the real-host system test. A Debian 12 machine built from Debian's
//! packages (systemd, docker.io, distribution kernels: xtask/vm/build-image.sh) boots under
//! qemu's software emulation, installs the .deb as an operator would and runs a scenario from
//! xtask/vm/scenario/. The machine has no network device: nothing leaves this machine.
//!
//! Boots, in order:
//! - `host` on Debian 12's kernel (6.1): the operator guide end to end with systemd and Docker;
//! - `kernel` on bookworm-backports' 6.12: the programs load and enforce under the shipped unit.
//!
//! Input reaches the guest as a raw tar on a second disk; the scenario's output comes back on a
//! virtio-serial port (the cloud kernel has no 9p). The guest powers itself off at the end.

use std::{
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{output, run, workspace_root};

/// The package version of the upgrade the `host` scenario installs over the first build.
const UPGRADE_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+vmtest2");

struct Boot {
    scenario: &'static str,
    /// The start of the kernel's version (`vmlinuz-<this>…` in the image).
    kernel: &'static str,
    /// The kernel's `lsm=` list: with `bpf` as the operator guide asks, or without it, as
    /// most distributions boot (the agent then falls back to its fentry socket guard).
    lsm: &'static str,
    timeout: Duration,
}

const BOOTS: &[Boot] = &[
    Boot {
        scenario: "host",
        kernel: "6.1.",
        lsm: "lockdown,capability,landlock,bpf",
        timeout: Duration::from_secs(30 * 60),
    },
    Boot {
        scenario: "kernel",
        kernel: "6.12.",
        lsm: "lockdown,capability,landlock",
        timeout: Duration::from_secs(15 * 60),
    },
];

const KERNEL_ARGS: &str =
    "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 panic=-1";

fn vm_dir() -> PathBuf {
    workspace_root().join("target/vm")
}

pub fn run_all(keep: bool) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the real-host test builds an image with debootstrap: run it as root");
    }
    let started = Instant::now();
    let base = base_image()?;
    let input = input_dir()?;
    let mut failed = Vec::new();
    for boot in BOOTS {
        if let Err(e) = boot_once(&base, &input, boot, keep) {
            eprintln!("==> vm-test {} on {}: {e:#}", boot.scenario, boot.kernel);
            failed.push(boot.scenario);
        }
    }
    eprintln!("==> vm-test took {} s in all", started.elapsed().as_secs());
    if !failed.is_empty() {
        bail!("the real-host test failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The Debian image, built once and kept in target/vm/base while its recipe is unchanged.
fn base_image() -> anyhow::Result<PathBuf> {
    let recipe = workspace_root().join("xtask/vm");
    let mut key = Vec::new();
    for f in ["build-image.sh", "guest/vmtest", "guest/vmtest.service"] {
        key.extend(std::fs::read(recipe.join(f))?);
    }
    let key = format!("{:016x}", fnv(&key));
    let base = vm_dir().join("base");
    if std::fs::read_to_string(base.join("recipe")).ok().as_deref() == Some(key.as_str())
        && base.join("root.img").exists()
    {
        eprintln!("==> the Debian image in {} is up to date", base.display());
        return Ok(base);
    }
    let t = Instant::now();
    run(Command::new("bash")
        .arg(recipe.join("build-image.sh"))
        .arg(&base))?;
    std::fs::write(base.join("recipe"), &key)?;
    eprintln!("==> built the Debian image in {} s", t.elapsed().as_secs());
    Ok(base)
}

/// What every boot gets on its input disk: the scenarios, the two packages, the probe and a
/// container image with the probe and the Docker client.
fn input_dir() -> anyhow::Result<PathBuf> {
    let dir = vm_dir().join("input");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(dir.join("debs/first"))?;
    std::fs::create_dir_all(dir.join("debs/upgrade"))?;
    let root = workspace_root();
    for f in std::fs::read_dir(root.join("xtask/vm/scenario"))? {
        let f = f?.path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap()))?;
    }
    // The first build, then a second one with another build id: its programs are new.
    for (version, build_id, to) in [
        (env!("CARGO_PKG_VERSION"), None, "debs/first"),
        (UPGRADE_VERSION, Some("vmtest2"), "debs/upgrade"),
    ] {
        let deb = crate::package::package_build(version, build_id)?;
        std::fs::copy(&deb, dir.join(to).join(deb.file_name().unwrap()))?;
    }
    crate::build_binaries()?;
    let probe = root.join("target/debug/probe");
    std::fs::copy(&probe, dir.join("probe"))?;
    container_image(&probe, &dir.join("probe-image.tar"))?;
    Ok(dir)
}

/// A container image without a registry: busybox, the probe and the Docker client (with the
/// libraries they link), for `docker import`.
fn container_image(probe: &Path, tar: &Path) -> anyhow::Result<()> {
    let tree = vm_dir().join("image-tree");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    for d in ["bin", "etc", "tmp", "usr/bin"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("busybox-static is missing (cargo xtask setup installs it)")?;
    let applets = output(Command::new("/bin/busybox").arg("--list"))?;
    for a in applets.lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(a))?;
    }
    std::fs::copy(probe, tree.join("probe"))?;
    std::fs::copy("/usr/bin/docker", tree.join("usr/bin/docker"))
        .context("Debian's docker client is missing (cargo xtask setup installs docker.io)")?;
    for bin in [probe, Path::new("/usr/bin/docker")] {
        for lib in linked_libraries(bin)? {
            let dest = tree.join(lib.strip_prefix("/")?);
            std::fs::create_dir_all(dest.parent().unwrap())?;
            std::fs::copy(&lib, &dest)?;
        }
    }
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    std::fs::write(tree.join("etc/group"), "root:x:0:\n")?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(tar)
        .arg("."))
}

/// The shared libraries (and the loader) `ldd` names for a binary.
fn linked_libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

fn boot_once(base: &Path, input: &Path, boot: &Boot, keep: bool) -> anyhow::Result<()> {
    let kernel = std::fs::read_dir(base)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find_map(|n| {
            n.strip_prefix("vmlinuz-")
                .filter(|v| v.starts_with(boot.kernel))
                .map(str::to_string)
        })
        .with_context(|| format!("no {}* kernel in {}", boot.kernel, base.display()))?;
    eprintln!("==> vm-test: scenario {} on Linux {kernel}", boot.scenario);
    let dir = vm_dir().join(format!("run-{}", boot.scenario));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    // A fresh copy of the machine for each boot (sparse: a few seconds).
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(base.join("root.img"))
        .arg(dir.join("root.img")))?;
    std::fs::write(input.join("scenario"), boot.scenario)?;
    run(Command::new("tar")
        .arg("-C")
        .arg(input)
        .arg("-cf")
        .arg(dir.join("input.tar"))
        .arg("."))?;

    let qemu = qemu_command(base, &kernel, boot.lsm, &dir, true);
    let t = Instant::now();
    let mut child = Command::new("timeout")
        .arg(boot.timeout.as_secs().to_string())
        .args(&qemu)
        .spawn()
        .context("starting qemu-system-x86_64 (cargo xtask setup installs qemu-system-x86)")?;
    // Show the scenario's output as it arrives.
    let out_log = dir.join("out.log");
    let mut shown = 0u64;
    let status = loop {
        std::thread::sleep(Duration::from_millis(500));
        shown = print_new(&out_log, shown);
        if let Some(status) = child.try_wait()? {
            print_new(&out_log, shown);
            break status;
        }
    };
    let out = std::fs::read_to_string(&out_log).unwrap_or_default();
    let passed = out.lines().any(|l| l == "VMTEST PASS");
    eprintln!(
        "==> vm-test {} on {kernel}: {} after {} s (qemu: {status})",
        boot.scenario,
        if passed { "passed" } else { "FAILED" },
        t.elapsed().as_secs()
    );
    if !passed {
        let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
        let tail: Vec<&str> = serial.lines().rev().take(60).collect();
        eprintln!("--- the guest's console (last 60 lines) ---");
        for l in tail.into_iter().rev() {
            eprintln!("{l}");
        }
    }
    if keep {
        eprintln!(
            "==> kept {}; boot it with a console (root, no password; the test does not run \
             without its input disk):\n    {}",
            dir.display(),
            qemu_command(base, &kernel, boot.lsm, &dir, false).join(" ")
        );
    } else {
        std::fs::remove_dir_all(&dir)?;
    }
    if !passed {
        bail!("the scenario did not pass");
    }
    Ok(())
}

/// qemu under software emulation (`/dev/kvm` here is kvm_pvm and hangs stock kernels), from
/// bookworm-backports (`cargo xtask setup`: Debian 12's qemu 7.2 boots 6.12 into a double
/// fault most of the time with two emulated CPUs). With
/// `test`, the input disk, the output port and the console in a file; without, a console on
/// the terminal for a person.
fn qemu_command(base: &Path, kernel: &str, lsm: &str, dir: &Path, test: bool) -> Vec<String> {
    let p = |p: PathBuf| p.display().to_string();
    let mut args: Vec<String> = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "3G",
        "-nic",
        "none",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
    ]
    .map(String::from)
    .to_vec();
    args.push(p(base.join(format!("vmlinuz-{kernel}"))));
    args.push("-initrd".into());
    args.push(p(base.join(format!("initrd.img-{kernel}"))));
    args.push("-append".into());
    let append = format!("{KERNEL_ARGS} lsm={lsm}");
    args.push(if test { append } else { format!("'{append}'") });
    args.push("-drive".into());
    args.push(format!(
        "file={},format=raw,if=virtio,cache=unsafe",
        p(dir.join("root.img"))
    ));
    if test {
        args.extend([
            "-drive".to_string(),
            format!(
                "file={},format=raw,if=virtio,readonly=on",
                p(dir.join("input.tar"))
            ),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!("file,id=out,path={}", p(dir.join("out.log"))),
            "-device".into(),
            "virtserialport,chardev=out,name=ci.out".into(),
            "-serial".into(),
            format!("file:{}", p(dir.join("serial.log"))),
            "-monitor".into(),
            "none".into(),
        ]);
    } else {
        args.extend(["-serial".to_string(), "mon:stdio".into()]);
    }
    args
}

/// Prints what `path` gained since `from`; returns the new length.
fn print_new(path: &Path, from: u64) -> u64 {
    let Ok(mut f) = std::fs::File::open(path) else {
        return from;
    };
    let mut buf = Vec::new();
    if f.seek(std::io::SeekFrom::Start(from)).is_err() || f.read_to_end(&mut buf).is_err() {
        return from;
    }
    let _ = std::io::stderr().write_all(&buf);
    from + buf.len() as u64
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
