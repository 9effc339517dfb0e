//! The durable spool between the audit pipeline and CloudWatch: records are appended to
//! segment files (`seg-<sequence>.jsonl`, one JSON record a line) and synced before they count
//! as accepted; a batch leaves the spool only when CloudWatch has accepted it (the `cursor`
//! file, replaced atomically, says how far). A restart, a crash or an outage loses nothing: the
//! reader starts again at the cursor. Delivery is at least once; duplicates only for a batch
//! sent but not yet acknowledged when the agent died.
//!
//! The spool has a size cap. When it is full, the oldest segment goes, acknowledged or not,
//! and `append` says how many records were dropped, so the agent can write an
//! `agent.events_lost` record about them.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// A segment is closed and a new one started at this size.
const SEGMENT_BYTES: u64 = 8 << 20;

/// A place in the spool: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Segments on disk, oldest first, with their sizes.
    segments: Vec<(u64, u64)>,
    writer: File,
    /// Acknowledged up to here.
    cursor: Position,
    /// Read (handed out in batches) up to here; back to `cursor` after a failed delivery.
    read: Position,
}

fn segment_name(seq: u64) -> String {
    format!("seg-{seq:020}.jsonl")
}

fn parse_segment(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

impl Spool {
    /// Opens (or creates) the spool in `dir`; a torn last line (a crash mid-write) is cut off.
    pub fn open(dir: &Path, max_bytes: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut segments = Vec::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            if let Some(seq) = parse_segment(&e.file_name().to_string_lossy()) {
                segments.push((seq, e.metadata()?.len()));
            }
        }
        segments.sort();
        if segments.is_empty() {
            segments.push((1, 0));
        }
        let (last, len) = *segments.last().expect("one segment");
        let path = dir.join(segment_name(last));
        let mut writer = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // Keep whole lines only.
        let whole = crate::jsonl::whole_lines_len(&mut writer, len)?;
        if whole != len {
            writer.set_len(whole)?;
            tracing::warn!(
                "spool segment {} ended in a torn record (a crash while writing); cut at {whole} bytes",
                path.display()
            );
        }
        let last_len = whole;
        if let Some(s) = segments.last_mut() {
            s.1 = last_len;
        }
        let cursor = read_cursor(dir).unwrap_or_default();
        let first = segments[0].0;
        let cursor = if cursor.segment < first {
            Position {
                segment: first,
                offset: 0,
            }
        } else {
            cursor
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            segments,
            writer,
            cursor,
            read: cursor,
        })
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// Appends one record (one line of JSON, without the newline). Returns how many older
    /// records were dropped to stay under the cap (0 almost always).
    pub fn append(&mut self, record: &str) -> anyhow::Result<u64> {
        self.append_all(&[record])
    }

    /// Appends records in order, with one write per segment they land in (a storm spools
    /// thousands of records a second: one write each would cost more than everything else).
    /// Returns how many older records were dropped to stay under the cap.
    pub fn append_all<S: AsRef<str>>(&mut self, records: &[S]) -> anyhow::Result<u64> {
        let mut buf = Vec::with_capacity(records.iter().map(|r| r.as_ref().len() + 1).sum());
        for record in records {
            let (seq, len) = *self.segments.last().expect("one segment");
            if len + buf.len() as u64 >= SEGMENT_BYTES {
                self.write_out(&mut buf)?;
                self.roll(seq + 1)?;
            }
            buf.extend_from_slice(record.as_ref().as_bytes());
            buf.push(b'\n');
        }
        self.write_out(&mut buf)?;
        let mut dropped = 0;
        while self.bytes() > self.max_bytes && self.segments.len() > 1 {
            dropped += self.drop_oldest()?;
        }
        Ok(dropped)
    }

    /// Writes `buf` at the end of the newest segment and empties it.
    fn write_out(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.writer.write_all(buf).context("writing the spool")?;
        if let Some(s) = self.segments.last_mut() {
            s.1 += buf.len() as u64;
        }
        buf.clear();
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.writer.sync_data().context("syncing the spool")
    }

    fn roll(&mut self, seq: u64) -> anyhow::Result<()> {
        self.writer.sync_data()?;
        let path = self.dir.join(segment_name(seq));
        self.writer = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        self.segments.push((seq, 0));
        Ok(())
    }

    /// Deletes the oldest segment; returns how many records in it were not yet acknowledged.
    fn drop_oldest(&mut self) -> anyhow::Result<u64> {
        let (seq, _) = self.segments.remove(0);
        let path = self.dir.join(segment_name(seq));
        let unacked = if self.cursor.segment > seq {
            0
        } else {
            let skip = if self.cursor.segment == seq {
                self.cursor.offset
            } else {
                0
            };
            count_lines_from(&path, skip)?
        };
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        let next = Position {
            segment: self.segments[0].0,
            offset: 0,
        };
        if self.cursor.segment <= seq {
            self.cursor = next;
            write_cursor(&self.dir, self.cursor)?;
        }
        if self.read.segment <= seq {
            self.read = next;
        }
        Ok(unacked)
    }

    /// Up to `max` records after what was already handed out, each with the position just
    /// after it. Call `ack` with a position once everything before it is delivered, `unread`
    /// to hand records out again from a position, or `rewind` after a failed delivery.
    pub fn next_records(&mut self, max: usize) -> anyhow::Result<Vec<(String, Position)>> {
        self.next_records_within(max, usize::MAX)
    }

    /// As `next_records`, and no more than needed to reach `max_bytes` (lines with their
    /// newlines): reading stops after the record that reaches it, so a batch builder that
    /// takes at most `max_bytes` reads little it does not use.
    pub fn next_records_within(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<(String, Position)>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut pos = self.read;
        while out.len() < max && bytes < max_bytes {
            let Some(&(seq, len)) = self.segments.iter().find(|s| s.0 >= pos.segment) else {
                break;
            };
            if seq != pos.segment {
                pos = Position {
                    segment: seq,
                    offset: 0,
                };
            }
            if pos.offset >= len {
                // This segment is read to its end; the next one, if any.
                match self.segments.iter().find(|s| s.0 > seq) {
                    Some(&(next, _)) => {
                        pos = Position {
                            segment: next,
                            offset: 0,
                        };
                        continue;
                    }
                    None => break,
                }
            }
            let path = self.dir.join(segment_name(seq));
            let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            f.seek(SeekFrom::Start(pos.offset))?;
            let mut r = BufReader::new(f).take(len - pos.offset);
            let mut line = String::new();
            while out.len() < max && bytes < max_bytes {
                line.clear();
                let n = r.read_line(&mut line)?;
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                pos.offset += n as u64;
                bytes += n;
                out.push((line.trim_end_matches('\n').to_string(), pos));
            }
            if pos.offset < len && out.len() < max && bytes < max_bytes {
                break;
            }
        }
        self.read = pos;
        Ok(out)
    }

    /// What was handed out and not acknowledged is handed out again (a delivery failed).
    pub fn rewind(&mut self) {
        self.read = self.cursor;
    }

    /// Records after `pos` are handed out again (they did not fit the batch).
    pub fn unread(&mut self, pos: Position) {
        self.read = pos.max(self.cursor);
    }

    /// Everything up to `pos` was delivered: persist it and delete segments read to the end.
    pub fn ack(&mut self, pos: Position) -> anyhow::Result<()> {
        if pos <= self.cursor {
            return Ok(());
        }
        self.cursor = pos;
        write_cursor(&self.dir, pos)?;
        while self.segments.len() > 1 && self.segments[0].0 < pos.segment {
            let (seq, _) = self.segments.remove(0);
            let path = self.dir.join(segment_name(seq));
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    /// Bytes appended and not yet acknowledged, at this moment: the segments' lengths past the
    /// acknowledged cursor (records handed out in a batch still count until CloudWatch took
    /// them). Kept current by `append`, `ack` and the cap, so O(segments) and no I/O: status and
    /// the `SpoolPendingBytes` metric read it whenever they like.
    pub fn pending_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|&(seq, len)| match seq.cmp(&self.cursor.segment) {
                std::cmp::Ordering::Less => 0,
                std::cmp::Ordering::Equal => len.saturating_sub(self.cursor.offset),
                std::cmp::Ordering::Greater => len,
            })
            .sum()
    }

    /// The oldest record not yet acknowledged (the first after the cursor; records are spooled
    /// in the order they are written), if any. One read of one line.
    pub fn oldest_pending(&self) -> anyhow::Result<Option<String>> {
        for &(seq, len) in self.segments.iter().filter(|s| s.0 >= self.cursor.segment) {
            let offset = if seq == self.cursor.segment {
                self.cursor.offset
            } else {
                0
            };
            if offset >= len {
                continue;
            }
            let path = self.dir.join(segment_name(seq));
            let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            f.seek(SeekFrom::Start(offset))?;
            let mut line = String::new();
            BufReader::new(f).take(len - offset).read_line(&mut line)?;
            if !line.ends_with('\n') {
                return Ok(None);
            }
            line.pop();
            return Ok(Some(line));
        }
        Ok(None)
    }
}

fn count_lines_from(path: &Path, offset: u64) -> anyhow::Result<u64> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut n = 0;
    for line in BufReader::new(f).split(b'\n') {
        line?;
        n += 1;
    }
    Ok(n)
}

fn read_cursor(dir: &Path) -> Option<Position> {
    let text = std::fs::read_to_string(dir.join("cursor")).ok()?;
    let (seg, off) = text.trim().split_once(' ')?;
    Some(Position {
        segment: seg.parse().ok()?,
        offset: off.parse().ok()?,
    })
}

/// Replaces the cursor file atomically (write, sync, rename).
fn write_cursor(dir: &Path, pos: Position) -> anyhow::Result<()> {
    let tmp = dir.join("cursor.tmp");
    let mut f = File::create(&tmp)?;
    writeln!(f, "{} {}", pos.segment, pos.offset)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("cursor")).context("replacing the spool cursor")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(recs: Vec<(String, Position)>) -> (Vec<String>, Position) {
        let end = recs.last().map(|r| r.1).unwrap_or_default();
        (recs.into_iter().map(|r| r.0).collect(), end)
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("eg-spool-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_come_back_in_order_until_acknowledged_also_after_a_restart() {
        let d = dir("order");
        let mut s = Spool::open(&d, 1 << 30).unwrap();
        for i in 0..10 {
            s.append(&format!("{{\"n\":{i}}}")).unwrap();
        }
        s.sync().unwrap();
        let (first, at) = lines(s.next_records(4).unwrap());
        assert_eq!(first, ["{\"n\":0}", "{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
        s.ack(at).unwrap();
        let (second, _) = lines(s.next_records(4).unwrap());
        assert_eq!(second[0], "{\"n\":4}");
        // Not acknowledged: a new agent gets them again (at least once).
        drop(s);
        let mut s = Spool::open(&d, 1 << 30).unwrap();
        let (again, at) = lines(s.next_records(100).unwrap());
        assert_eq!(again.len(), 6);
        assert_eq!(again[0], "{\"n\":4}");
        // A failed delivery rewinds.
        s.rewind();
        let (again2, _) = lines(s.next_records(100).unwrap());
        assert_eq!(again2, again);
        // Records that did not fit a batch come again.
        let recs = s.next_records(100).unwrap();
        assert!(recs.is_empty());
        s.rewind();
        let recs = s.next_records(100).unwrap();
        s.unread(recs[1].1);
        let (rest, _) = lines(s.next_records(100).unwrap());
        assert_eq!(rest[0], "{\"n\":6}");
        s.ack(at).unwrap();
        assert_eq!(s.pending_bytes(), 0);
        assert!(s.next_records(100).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The backlog is exact at any moment, whatever was handed out in batches: what the segment
    /// files hold past the cursor file's position.
    #[test]
    fn pending_bytes_and_the_oldest_record_are_exact_at_any_moment() {
        let d = dir("pending");
        let on_disk = |d: &Path| -> u64 {
            let cursor = read_cursor(d).unwrap_or_default();
            let mut segs: Vec<(u64, u64)> = std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .filter_map(|e| {
                    let seq = parse_segment(&e.file_name().to_string_lossy())?;
                    Some((seq, e.metadata().ok()?.len()))
                })
                .collect();
            segs.sort();
            segs.iter()
                .filter(|s| s.0 >= cursor.segment)
                .map(|&(seq, len)| {
                    if seq == cursor.segment {
                        len - cursor.offset
                    } else {
                        len
                    }
                })
                .sum()
        };
        let mut s = Spool::open(&d, 1 << 30).unwrap();
        assert_eq!((s.pending_bytes(), s.oldest_pending().unwrap()), (0, None));
        let line = |i: usize| format!("{{\"n\":{i},\"pad\":\"{}\"}}", "z".repeat(1000));
        let mut n = 0;
        for _ in 0..10 {
            s.append(&line(n)).unwrap();
            n += 1;
        }
        s.sync().unwrap();
        assert_eq!(s.pending_bytes(), 10 * (line(0).len() as u64 + 1));
        assert_eq!(s.pending_bytes(), on_disk(&d));
        // Handed out in a batch (in flight): still pending, and more arrive meanwhile.
        let batch = s.next_records(4).unwrap();
        for _ in 0..(SEGMENT_BYTES as usize / 1000) {
            s.append(&line(n)).unwrap();
            n += 1;
        }
        s.sync().unwrap();
        assert!(s.segments.len() >= 2, "a second segment");
        assert_eq!(s.pending_bytes(), on_disk(&d));
        assert_eq!(s.oldest_pending().unwrap(), Some(line(0)));
        // That batch delivered: what follows it.
        s.ack(batch[3].1).unwrap();
        assert_eq!(s.pending_bytes(), on_disk(&d));
        assert_eq!(s.oldest_pending().unwrap(), Some(line(4)));
        // The first segment delivered to its last byte: the oldest is in the next one.
        let first_len = s.segments[0].1;
        let mut last_of_first = None;
        while let Some((_, pos)) = s.next_records(1).unwrap().pop() {
            if pos.segment != s.segments[0].0 {
                break;
            }
            last_of_first = Some(pos);
        }
        let at = last_of_first.unwrap();
        assert_eq!(at.offset, first_len);
        s.ack(at).unwrap();
        assert_eq!(s.pending_bytes(), on_disk(&d));
        let oldest = s.oldest_pending().unwrap().unwrap();
        let first_n: usize = oldest[5..].split(',').next().unwrap().parse().unwrap();
        assert!(first_n > 4 && first_n < n, "{first_n}");
        // A new agent on the same spool sees the same backlog.
        let before = s.pending_bytes();
        drop(s);
        let s = Spool::open(&d, 1 << 30).unwrap();
        assert_eq!(s.pending_bytes(), before);
        assert_eq!(s.oldest_pending().unwrap(), Some(oldest));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_last_record_is_cut_at_open() {
        let d = dir("torn");
        let mut s = Spool::open(&d, 1 << 30).unwrap();
        s.append("{\"n\":1}").unwrap();
        s.sync().unwrap();
        drop(s);
        let seg = d.join(segment_name(1));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"n\":2, \"half").unwrap();
        drop(f);
        let mut s = Spool::open(&d, 1 << 30).unwrap();
        s.append("{\"n\":3}").unwrap();
        let (all, _) = lines(s.next_records(10).unwrap());
        assert_eq!(all, ["{\"n\":1}", "{\"n\":3}"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_segment_and_says_how_many_records() {
        let d = dir("full");
        let line = "x".repeat(1023);
        let mut s = Spool::open(&d, 3 * SEGMENT_BYTES).unwrap();
        let per_segment = SEGMENT_BYTES / 1024;
        let mut dropped = 0;
        for _ in 0..(4 * per_segment + 10) {
            dropped += s.append(&line).unwrap();
        }
        // Segments of `per_segment` records each: the 4th segment's first record and the 5th
        // segment's first record each pushed the spool over the cap, so two whole segments
        // went, all of them unacknowledged.
        assert_eq!(dropped, 2 * per_segment);
        assert!(s.bytes() <= 3 * SEGMENT_BYTES);
        // What is left is read from the oldest remaining segment on.
        let recs = s.next_records(usize::MAX).unwrap();
        assert_eq!(recs.len() as u64, 2 * per_segment + 10);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn acknowledged_segments_are_deleted() {
        let d = dir("ack");
        let mut s = Spool::open(&d, 1 << 30).unwrap();
        let line = "y".repeat(1023);
        for _ in 0..(SEGMENT_BYTES / 1024 + 5) {
            s.append(&line).unwrap();
        }
        assert_eq!(s.segments.len(), 2);
        let (_, at) = lines(s.next_records(usize::MAX).unwrap());
        s.ack(at).unwrap();
        assert_eq!(s.segments.len(), 1);
        assert_eq!(s.pending_bytes(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// One call across a segment boundary: the records before it close the old segment, the
    /// rest start the new one, in order, and the segments' sizes are what is on disk.
    #[test]
    fn a_batch_that_crosses_a_segment_boundary_is_split_in_order() {
        let d = dir("batch");
        let mut s = Spool::open(&d, 1 << 30).unwrap();
        let n = SEGMENT_BYTES / 1024 + 5;
        let batch: Vec<String> = (0..n).map(|i| format!("{i:01023}")).collect();
        assert_eq!(s.append_all(&batch).unwrap(), 0);
        assert_eq!(s.segments.len(), 2);
        for (seq, len) in &s.segments {
            let on_disk = std::fs::metadata(d.join(segment_name(*seq))).unwrap().len();
            assert_eq!(*len, on_disk);
        }
        assert_eq!(s.segments[0].1, SEGMENT_BYTES);
        let (back, _) = lines(s.next_records(usize::MAX).unwrap());
        assert_eq!(back, batch);
        let _ = std::fs::remove_dir_all(&d);
    }
}
