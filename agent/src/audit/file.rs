//! The JSON-lines file sink, rotated by size: `audit.jsonl`, then `.1` … `.N` (oldest last).

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::jsonl::whole_lines_len;
use serde_json::Value;

pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    out: BufWriter<File>,
    size: u64,
}

fn open(path: &Path) -> anyhow::Result<(BufWriter<File>, u64)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Records hold argv and command names: not for every local user.
    let mut f = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("opening the audit file {}", path.display()))?;
    let len = f.metadata()?.len();
    // Every line one record, also after a crash mid-write: a torn last line is cut (its
    // record was not consumed from the kernel ring, so it is read and written again).
    let size = whole_lines_len(&mut f, len)?;
    if size != len {
        f.set_len(size)?;
        tracing::warn!(
            "the audit file {} ended in a torn record (a crash while writing); cut {} bytes",
            path.display(),
            len - size
        );
    }
    Ok((BufWriter::new(f), size))
}

impl FileSink {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let (out, size) = open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            out,
            size,
        })
    }

    pub fn write(&mut self, record: &Value) -> anyhow::Result<()> {
        self.write_line(&serde_json::to_string(record)?)
    }

    /// One record, already serialized (without the newline).
    pub fn write_line(&mut self, record: &str) -> anyhow::Result<()> {
        let mut line = Vec::with_capacity(record.len() + 1);
        line.extend_from_slice(record.as_bytes());
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            // A failed rotation still leaves an open file: report it and keep writing.
            if let Err(e) = self.rotate() {
                tracing::error!("audit file sink: {e:#}");
            }
        }
        self.out.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> anyhow::Result<()> {
        self.flush()?;
        let _ = std::fs::remove_file(self.numbered(self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(self.numbered(n), self.numbered(n + 1));
        }
        // If the file was moved away behind our back, start a new one rather than stall.
        let renamed = std::fs::rename(&self.path, self.numbered(1));
        (self.out, self.size) = open(&self.path)?;
        renamed
            .with_context(|| format!("rotating {} (a new file was started)", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = std::env::temp_dir().join(format!("eg-file-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let mut sink = FileSink::open(&path, 4096, 2).unwrap();
        let rec = serde_json::json!({ "pad": "x".repeat(1000) });
        for _ in 0..20 {
            sink.write(&rec).unwrap();
        }
        sink.flush().unwrap();
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 4096 && size(&path) > 0);
        assert!(size(&dir.join("audit.jsonl.1")) > 3000);
        assert!(size(&dir.join("audit.jsonl.2")) > 3000);
        assert!(
            !dir.join("audit.jsonl.3").exists(),
            "keeps only 2 rotated files"
        );
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            serde_json::from_str::<Value>(line).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_cut_before_the_next_record() {
        let dir = std::env::temp_dir().join(format!("eg-file-torn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        // A crash mid-write left half a record after a whole one (longer than one backward
        // read, so the search crosses a chunk).
        let whole = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(100_000));
        std::fs::write(&path, format!("{whole}{{\"version\":1,\"cgro")).unwrap();
        let mut sink = FileSink::open(&path, 1 << 30, 2).unwrap();
        sink.write(&serde_json::json!({ "next": 1 })).unwrap();
        sink.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{whole}{{\"next\":1}}\n"));
        // No newline at all: nothing whole is kept.
        std::fs::write(&path, "{\"torn").unwrap();
        drop(FileSink::open(&path, 1 << 30, 2).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
