//! Pinned BPF map helpers.

use std::path::Path;

/// How many entries the pinned BPF hash map at `path` holds (keys of `key_size` bytes): the
/// bpf syscall's BPF_OBJ_GET, then BPF_MAP_GET_NEXT_KEY until there is none.
pub fn pinned_map_len(path: &Path, key_size: usize) -> usize {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_GET_NEXT_KEY: u64 = 4;
    const BPF_OBJ_GET: u64 = 7;
    let bpf = |cmd: u64, attr: &mut [u64; 16]| {
        // SAFETY: `attr` is a zeroed bpf_attr-sized buffer laid out for `cmd`, and every
        // pointer in it is valid for the call.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128) }
    };
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr);
    assert!(
        fd >= 0,
        "opening {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut n = 0;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = fd as u64;
        attr[1] = if n == 0 { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) != 0 {
            break;
        }
        n += 1;
        std::mem::swap(&mut key, &mut next);
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd as i32) };
    n
}
