//! Do-nothing programs at the cgroup hooks the agent uses: the floor under its kernel time.
//! What the kernel spends calling *a* program at connect(), at each packet, at each TCP
//! callback and at socket() is paid by any cgroup eBPF enforcer; only what the agent's
//! programs cost above it is theirs to cut.
//!
//! Each is two instructions (`r0 = 1; exit`: allow), loaded and attached with the bpf(2)
//! system call itself, so the bench needs no compiler for them. They are attached with
//! `BPF_F_ALLOW_MULTI` like the agent's, and detached on drop.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// One hook: program type, attach type, and the name bpftool will list.
struct Hook {
    prog_type: u32,
    attach_type: u32,
    name: &'static str,
}

/// The agent's hooks on the connect and send paths (the AF_PACKET guard aside: it is not a
/// cgroup hook).
const HOOKS: [Hook; 5] = [
    // BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT
    Hook {
        prog_type: 18,
        attach_type: 10,
        name: "empty_connect4",
    },
    // BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_SENDMSG
    Hook {
        prog_type: 18,
        attach_type: 14,
        name: "empty_sendmsg4",
    },
    // BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_EGRESS
    Hook {
        prog_type: 8,
        attach_type: 1,
        name: "empty_egress",
    },
    // BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS
    Hook {
        prog_type: 13,
        attach_type: 3,
        name: "empty_sock_ops",
    },
    // BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_CREATE
    Hook {
        prog_type: 9,
        attach_type: 2,
        name: "empty_sock_crt",
    },
];

/// The names bpftool lists them under, paired with the agent's program at the same hook.
pub const PAIRS: [(&str, &str); 5] = [
    ("empty_connect4", "connect4"),
    ("empty_sendmsg4", "sendmsg4"),
    ("empty_egress", "egress"),
    ("empty_sock_ops", "tcp_state"),
    ("empty_sock_crt", "sock_create"),
];

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer laid out for `cmd`; the kernel reads
    // at most its 128 bytes and the pointers in it outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put_u32(attr: &mut [u8; 128], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn load(hook: &Hook) -> anyhow::Result<OwnedFd> {
    // r0 = 1; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, hook.prog_type);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    let name = hook.name.as_bytes();
    attr[48..48 + name.len()].copy_from_slice(name);
    put_u32(&mut attr, 68, hook.attach_type);
    let fd = bpf(BPF_PROG_LOAD, &mut attr).with_context(|| format!("loading {}", hook.name))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn attach_attr(cgroup: &OwnedFd, prog: &OwnedFd, hook: &Hook, flags: u32) -> [u8; 128] {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, hook.attach_type);
    put_u32(&mut attr, 12, flags);
    attr
}

/// The empty programs, attached to one cgroup until dropped.
pub struct EmptyHooks {
    cgroup: OwnedFd,
    progs: Vec<(OwnedFd, &'static Hook)>,
}

impl EmptyHooks {
    pub fn attach(cgroup: &Path) -> anyhow::Result<Self> {
        let dir =
            std::fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut hooks = EmptyHooks {
            cgroup: OwnedFd::from(dir),
            progs: Vec::new(),
        };
        for hook in &HOOKS {
            let prog = load(hook)?;
            let mut attr = attach_attr(&hooks.cgroup, &prog, hook, BPF_F_ALLOW_MULTI);
            bpf(BPF_PROG_ATTACH, &mut attr)
                .with_context(|| format!("attaching {} to {}", hook.name, cgroup.display()))?;
            hooks.progs.push((prog, hook));
        }
        if hooks.progs.len() != HOOKS.len() {
            bail!("not every empty program is attached");
        }
        Ok(hooks)
    }
}

impl Drop for EmptyHooks {
    fn drop(&mut self) {
        for (prog, hook) in &self.progs {
            let mut attr = attach_attr(&self.cgroup, prog, hook, 0);
            let _ = bpf(BPF_PROG_DETACH, &mut attr);
        }
    }
}
