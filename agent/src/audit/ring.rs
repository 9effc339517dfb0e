//! The kernel's audit ring buffer, read with a consumer position the agent commits itself.
//!
//! aya's `RingBuf` gives the kernel a record's space back as soon as the item is dropped:
//! before the record reached the audit file and the CloudWatch spool, so a kill -9 in between
//! lost it from both. Here reading and consuming are apart: [`Ring::read`] reads ahead, and
//! [`Ring::commit`] hands the space back only once the caller has written what it read to
//! every sink that keeps records across a crash. A crash re-reads the uncommitted records at
//! the next start (at least once; never lost).
//!
//! The layout is the kernel's (kernel/bpf/ringbuf.c): one read-write page with the consumer
//! position, then one read-only page with the producer position and the data pages, mapped
//! twice in a row so that a record wrapping around the end reads as one slice. Each record
//! has an 8-byte header (length with a busy and a discard bit, page offset) and is padded to
//! 8 bytes.

use std::{
    num::NonZeroUsize,
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence},
};

use anyhow::{Context as _, bail};
use aya::maps::MapData;
use nix::{
    sys::mman::{MapFlags, ProtFlags, mmap, munmap},
    unistd::{SysconfVar, sysconf},
};

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER: usize = 8;

/// One `mmap` of the ring's fd, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd, len: usize, prot: ProtFlags, offset: usize) -> anyhow::Result<Self> {
        let length = NonZeroUsize::new(len).context("mapping an empty audit ring buffer")?;
        // Unsafe also in nix: the mapping is shared memory the kernel writes.
        // SAFETY: a fresh shared mapping of a BPF ring buffer fd; the kernel checks the
        // offsets and protections it allows.
        let ptr = unsafe {
            mmap(
                None,
                length,
                prot,
                MapFlags::MAP_SHARED,
                fd,
                offset.try_into()?,
            )
        }
        .map_err(std::io::Error::from)
        .context("mapping the audit ring buffer")?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unsafe also in nix: nothing may use the region afterwards.
        // SAFETY: exactly the region mmap returned.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

pub struct Ring {
    /// Keeps the fd (and so the mappings' map) alive.
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    size: usize,
    /// Where the next record is read: ahead of the committed position while a batch is open.
    read_pos: usize,
    /// The producer position last seen.
    producer_pos: usize,
}

// Raw pointers to shared memory are not Send by themselves.
// SAFETY: the mappings are owned by the Ring and only touched through &mut self (the shared
// positions through atomics), so moving it to another thread is sound.
unsafe impl Send for Ring {}

impl Ring {
    pub fn new(map: MapData) -> anyhow::Result<Self> {
        let size = map.info()?.max_entries() as usize;
        let page = sysconf(SysconfVar::PAGE_SIZE)?.context("no page size")? as usize;
        if !size.is_power_of_two() || !size.is_multiple_of(page) {
            bail!("the audit ring buffer has an unexpected size of {size} bytes");
        }
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, ProtFlags::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            size,
            read_pos: 0,
            producer_pos: 0,
        };
        // A ring adopted from the pins starts where the last agent committed.
        ring.read_pos = ring.consumer_pos().load(Ordering::Acquire);
        ring.producer_pos = ring.load_producer_pos();
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // Raw pointer: shared memory the kernel reads.
        // SAFETY: the first word of the consumer page, aligned, alive as long as self.
        unsafe { &*self.consumer.ptr.as_ptr().cast::<AtomicUsize>() }
    }

    fn load_producer_pos(&self) -> usize {
        // Raw pointer: shared memory written by the kernel.
        // SAFETY: the first word of the producer page, aligned, alive as long as self. The
        // kernel writes it with release semantics after the record headers.
        unsafe { &*self.producer.ptr.as_ptr().cast::<AtomicUsize>() }.load(Ordering::Acquire)
    }

    /// The next committed record after those read so far, or None if there is none yet (or the
    /// next one is still being written). Its space stays the kernel's to keep until
    /// [`Ring::commit`].
    pub fn read(&mut self) -> Option<&[u8]> {
        loop {
            if self.read_pos == self.producer_pos {
                self.producer_pos = self.load_producer_pos();
                if self.read_pos == self.producer_pos {
                    return None;
                }
            }
            let offset = self.read_pos & (self.size - 1);
            // Raw pointer: shared memory written by the kernel.
            // SAFETY: offset < size, and the data pages are mapped twice, so a record's header
            // and data (at most size bytes) lie within the mapping.
            let header = unsafe {
                &*self
                    .producer
                    .ptr
                    .as_ptr()
                    .add(self.page + offset)
                    .cast::<AtomicU32>()
            }
            .load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                return None;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            let start = self.read_pos;
            self.read_pos += (HEADER + len).next_multiple_of(8);
            if header & DISCARD_BIT != 0 || len > self.size {
                continue;
            }
            // Raw pointer: shared memory written by the kernel.
            // SAFETY: as above; the kernel wrote these bytes before it cleared the busy bit,
            // and does not reuse them until the consumer position passes them.
            let data = unsafe {
                std::slice::from_raw_parts(
                    self.producer
                        .ptr
                        .as_ptr()
                        .add(self.page + (start & (self.size - 1)) + HEADER),
                    len,
                )
            };
            return Some(data);
        }
    }

    /// Gives the kernel back the space of every record read so far: call only when they are
    /// in every sink that must survive a crash.
    pub fn commit(&mut self) {
        self.consumer_pos().store(self.read_pos, Ordering::Release);
        // Either a producer sees the new position (and wakes us for its next record), or the
        // next read sees its record.
        fence(Ordering::SeqCst);
    }

    /// Bytes of records read but not yet committed.
    pub fn uncommitted(&self) -> usize {
        self.read_pos - self.consumer_pos().load(Ordering::Relaxed)
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
