//! Random numbers from the kernel (DNS query ids, retry jitter).

/// 16 random bits from the kernel's CSPRNG.
pub fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    // Raw libc: nix has no getrandom(2).
    // SAFETY: a valid buffer of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 2 {
        // getrandom on 2 bytes does not fail on Linux ≥ 3.17; fall back to the clock anyway.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        return t as u16 ^ (t >> 16) as u16;
    }
    u16::from_ne_bytes(b)
}
