//! Files of one JSON record a line (the audit file, the CloudWatch spool): after a crash,
//! only whole lines count.

use std::fs::File;

/// The length of the whole lines at the start of `f` (`len` bytes long): up to and with its
/// last newline. Reads backwards from the end, so a long file costs one small read.
pub fn whole_lines_len(f: &mut File, len: u64) -> anyhow::Result<u64> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}
