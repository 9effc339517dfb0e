//! The filesystems the agent needs: cgroup2 (found, never assumed), bpffs (mounted if absent,
//! for pins) and securityfs (to learn whether the BPF LSM is active).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use nix::mount::MsFlags;

/// Mount points of `fstype` from /proc/self/mountinfo.
fn mounts_of(fstype: &str) -> anyhow::Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text, fstype))
}

fn parse_mountinfo(text: &str, fstype: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            // "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            (right.split(' ').next()? == fstype).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on most hosts; elsewhere on
/// hybrid set-ups, e.g. /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    match mounts_of("cgroup2")?.into_iter().next() {
        Some(p) => Ok(p),
        None => bail!(
            "no cgroup2 filesystem is mounted; egress-guard needs the unified cgroup hierarchy (cgroup v2)"
        ),
    }
}

/// The cgroup v2 path of this process, under `root`.
pub fn own_cgroup(root: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("/proc/self/cgroup has no cgroup v2 entry")?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// Makes sure `dir` lies on a bpf filesystem, mounting one at /sys/fs/bpf when none covers it.
pub fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    let mounts = mounts_of("bpf")?;
    if mounts.iter().any(|m| dir.starts_with(m)) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !dir.starts_with(default) {
        bail!(
            "pin_dir {} is not on a bpf filesystem (bpffs is mounted at: {}); mount one or use a pin_dir under /sys/fs/bpf",
            dir.display(),
            if mounts.is_empty() {
                "nowhere".into()
            } else {
                mounts
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    mount("bpf", default, "bpf").context("mounting bpffs at /sys/fs/bpf")?;
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

fn mount(source: &str, target: &Path, fstype: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    nix::mount::mount(
        Some(source),
        target,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)?;
    Ok(())
}

/// Makes sure tracefs is at /sys/kernel/tracing (tracepoint ids are read from it).
pub fn ensure_tracefs() -> anyhow::Result<()> {
    let path = Path::new("/sys/kernel/tracing");
    if mounts_of("tracefs")?.iter().any(|m| m == path) {
        return Ok(());
    }
    mount("tracefs", path, "tracefs").context("mounting tracefs at /sys/kernel/tracing")?;
    tracing::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(())
}

/// Whether the BPF LSM is in the kernel's active LSM list. Mounts securityfs if needed.
pub fn bpf_lsm_active() -> anyhow::Result<bool> {
    let lsm = Path::new("/sys/kernel/security/lsm");
    if !lsm.exists() && mounts_of("securityfs")?.is_empty() {
        mount(
            "securityfs",
            Path::new("/sys/kernel/security"),
            "securityfs",
        )
        .context("mounting securityfs")?;
    }
    let list =
        std::fs::read_to_string(lsm).with_context(|| format!("reading {}", lsm.display()))?;
    Ok(list.trim().split(',').any(|l| l == "bpf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_by_type() {
        let text = "\
25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 25 0:40 / /sys/fs/bpf rw shared:9 - bpf bpf rw,mode=700
51 25 0:41 / /mnt/with\\040space rw - bpf bpf rw
";
        assert_eq!(
            parse_mountinfo(text, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(
            parse_mountinfo(text, "bpf"),
            vec![
                PathBuf::from("/sys/fs/bpf"),
                PathBuf::from("/mnt/with space")
            ]
        );
        assert!(parse_mountinfo(text, "securityfs").is_empty());
    }
}
