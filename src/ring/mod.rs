//! Single-producer single-consumer rings of variable-length records.
//!
//! One algorithm, written once over [`RingMemory`]: in production the memory is a region of a
//! shared mapping (see [`crate::shm`]), under loom it is a heap buffer of tracked cells. The format
//! is described in `docs/shm-format.md`:
//!
//! * the ring has a power-of-two `capacity` of data bytes and two monotonically increasing `u64`
//!   positions, `head` (written only by the consumer) and `tail` (written only by the producer),
//!   each on its own 128-byte line;
//! * a record is an 8-byte header (`len: u32`, `kind: u16`, `flags: u16`, little-endian) followed
//!   by `len` payload bytes, padded to a multiple of 8; records never straddle the end of the
//!   buffer: a padding record (`kind == PAD`) fills the rest of the line instead;
//! * the producer claims space, writes, and commits by publishing `tail` (Release); the consumer
//!   reads `tail` (Acquire), copies the record out, and frees the space by publishing `head`
//!   (Release). Until a claim is committed the consumer cannot see it.
//!
//! Everything read from the ring is validated: a corrupt header or position is a [`RingError`],
//! never a panic or an access outside the buffer.

#[cfg(test)]
mod tests;

use crate::sync::{AtomicU64, Ordering};
use thiserror::Error;

/// Size of a record header in bytes.
pub const RECORD_HEADER: usize = 8;
/// Records start at multiples of this.
pub const RECORD_ALIGN: usize = 8;
/// The kind of a padding record. Real kinds are `1..PAD`.
pub const PAD: u16 = 0xFFFF;

/// The control block of one ring: the consumer's and the producer's positions on separate lines,
/// so the two sides never write the same cache line.
#[repr(C, align(128))]
pub struct RingCtl {
    head: AtomicU64,
    _pad_head: [u8; 120],
    tail: AtomicU64,
    _pad_tail: [u8; 120],
}

#[cfg(not(knit_loom))]
const _: () = {
    assert!(std::mem::size_of::<RingCtl>() == 256);
    assert!(std::mem::offset_of!(RingCtl, tail) == 128);
};

impl std::fmt::Debug for RingCtl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Relaxed: a Debug print; the positions are only shown, no record is read through them.
        f.debug_struct("RingCtl")
            .field("head", &self.head.load(Ordering::Relaxed))
            .field("tail", &self.tail.load(Ordering::Relaxed))
            .finish()
    }
}

impl RingCtl {
    /// Both positions at zero.
    pub fn new() -> Self {
        Self {
            head: AtomicU64::new(0),
            _pad_head: [0; 120],
            tail: AtomicU64::new(0),
            _pad_tail: [0; 120],
        }
    }
}

impl Default for RingCtl {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a ring lives.
///
/// # Safety
///
/// Implementors promise that `ctl()` is valid for as long as `self`, that `capacity()` is a power
/// of two of at least 64 that never changes, and that `write`/`read` access exactly the data
/// bytes `[off, off + len)` of a region of `capacity()` bytes owned by the ring.
pub unsafe trait RingMemory {
    /// The control block.
    fn ctl(&self) -> &RingCtl;
    /// Data bytes in the ring.
    fn capacity(&self) -> usize;
    /// Copies `src` into the data region at `off`.
    ///
    /// # Safety
    /// `off + src.len() <= capacity()`, and the bytes belong to the producer (claimed, not yet
    /// committed).
    unsafe fn write(&self, off: usize, src: &[u8]);
    /// Copies data bytes at `off` into `dst`.
    ///
    /// # Safety
    /// `off + dst.len() <= capacity()`, and the bytes belong to the consumer (committed, not yet
    /// released).
    unsafe fn read(&self, off: usize, dst: &mut [u8]);
}

/// A record's header as read from the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// What the record is (`1..PAD`), chosen by the layer above.
    pub kind: u16,
    /// Flags of the layer above.
    pub flags: u16,
}

impl RecordHeader {
    fn encode(self) -> [u8; RECORD_HEADER] {
        let mut b = [0u8; RECORD_HEADER];
        b[0..4].copy_from_slice(&self.len.to_le_bytes());
        b[4..6].copy_from_slice(&self.kind.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    fn decode(b: [u8; RECORD_HEADER]) -> Self {
        Self {
            len: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            kind: u16::from_le_bytes([b[4], b[5]]),
            flags: u16::from_le_bytes([b[6], b[7]]),
        }
    }
}

/// Why a record could not be written. "Full" is a value, not a failure: retry later.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PushError {
    /// Not enough free space right now; the consumer has not caught up.
    #[error("ring full")]
    Full,
    /// The record can never fit: split it (the lane layer fragments larger messages).
    #[error("record of {len} bytes exceeds the ring's limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The kind is reserved for padding.
    #[error("record kind {0:#x} is reserved")]
    ReservedKind(u16),
    /// The consumer's position read from shared memory is impossible.
    #[error("ring corrupt: {0}")]
    Corrupt(&'static str),
}

/// The ring's shared state does not validate. The peer that shares it is broken or hostile; the
/// ring cannot be used any more.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("ring corrupt: {0}")]
pub struct RingError(pub &'static str);

/// Whether `span`, the bytes between the two positions (one read from the peer), can be: at
/// most the ring and whole records. Every position read from the other side passes this before
/// it is used or kept.
#[inline]
const fn possible(span: u64, cap: u64) -> bool {
    span <= cap && span % RECORD_ALIGN as u64 == 0
}

#[inline]
const fn align_up(n: usize) -> usize {
    (n + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

/// The largest payload a ring of `capacity` bytes accepts in one record. Half the ring, so a
/// record always fits in an empty ring whatever the wrap position.
pub const fn max_payload(capacity: usize) -> usize {
    capacity / 2 - RECORD_HEADER
}

/// The writing end. Not `Clone`: there is exactly one per ring.
#[derive(Debug)]
pub struct Producer<M: RingMemory> {
    mem: M,
    cap: u64,
    /// Our position; mirrors `ctl.tail`.
    tail: u64,
    /// The consumer's position as last read; refreshed only when the ring looks full. Only a
    /// position at most `cap` behind `tail` is kept, so `tail - cached_head <= cap` always.
    cached_head: u64,
}

impl<M: RingMemory> Producer<M> {
    /// Attaches to a ring. The starting position is read from the ring (zero for a new one).
    pub fn new(mem: M) -> Result<Self, RingError> {
        let cap = mem.capacity() as u64;
        // Relaxed: the tail is ours; nobody else publishes it.
        let tail = mem.ctl().tail.load(Ordering::Relaxed);
        // SYNC(head): pairs with the consumer's Release store of `head`.
        let head = mem.ctl().head.load(Ordering::Acquire);
        let used = tail.wrapping_sub(head);
        if !possible(used, cap) || tail % RECORD_ALIGN as u64 != 0 {
            return Err(RingError("positions out of range at attach"));
        }
        Ok(Self {
            mem,
            cap,
            tail,
            cached_head: head,
        })
    }

    /// Largest payload one record may carry.
    pub fn max_payload(&self) -> usize {
        max_payload(self.cap as usize)
    }

    /// Claims room for a record of `len` payload bytes. Nothing is visible to the consumer until
    /// [`Claim::commit`]; dropping the claim abandons it.
    pub fn claim(&mut self, kind: u16, flags: u16, len: usize) -> Result<Claim<'_, M>, PushError> {
        if kind == PAD {
            return Err(PushError::ReservedKind(kind));
        }
        let max = self.max_payload();
        if len > max {
            return Err(PushError::TooLarge { len, max });
        }
        let rec = align_up(RECORD_HEADER + len) as u64;
        let mask = self.cap - 1;
        let pos = self.tail & mask;
        let contiguous = self.cap - pos;
        let pad = if contiguous < rec { contiguous } else { 0 };
        let need = pad + rec;
        if self.cap - self.tail.wrapping_sub(self.cached_head) < need {
            let used = self
                .refresh_head()
                .map_err(|RingError(why)| PushError::Corrupt(why))?;
            if self.cap - used < need {
                return Err(PushError::Full);
            }
        }
        if pad > 0 {
            let hdr = RecordHeader {
                len: (pad as usize - RECORD_HEADER) as u32,
                kind: PAD,
                flags: 0,
            };
            // SAFETY: `pos + 8 <= cap` (pad >= 8 because positions are 8-aligned) and the bytes
            // are free (checked above), so they belong to us until commit.
            unsafe { self.mem.write(pos as usize, &hdr.encode()) };
        }
        // Positions wrap (compared by difference): one read from shared memory may be anywhere.
        let start = (self.tail.wrapping_add(pad) & mask) as usize;
        let hdr = RecordHeader {
            len: len as u32,
            kind,
            flags,
        };
        // SAFETY: `start + rec <= cap` by the choice of `pad`, and the bytes are free.
        unsafe { self.mem.write(start, &hdr.encode()) };
        let new_tail = self.tail.wrapping_add(need);
        Ok(Claim {
            producer: self,
            start,
            len,
            new_tail,
        })
    }

    /// Claims, copies `payload` and commits.
    pub fn push(&mut self, kind: u16, flags: u16, payload: &[u8]) -> Result<(), PushError> {
        let mut c = self.claim(kind, flags, payload.len())?;
        c.write_at(0, payload);
        c.commit();
        Ok(())
    }

    /// The ring's memory, for tests that corrupt it on purpose.
    #[cfg(test)]
    pub(crate) fn mem_for_test(&self) -> &M {
        &self.mem
    }

    /// Bytes free right now (refreshing the consumer's position); an error when that position
    /// cannot be.
    pub fn free_bytes(&mut self) -> Result<usize, RingError> {
        let used = self.refresh_head()?;
        Ok((self.cap - used) as usize)
    }

    /// Reads the consumer's position and gives the bytes in use. The position is kept only if
    /// it is [`possible`]: `cached_head` stays within `cap` of `tail`, which `claim`'s fast
    /// check relies on.
    fn refresh_head(&mut self) -> Result<u64, RingError> {
        // SYNC(head): pairs with the consumer's Release store; the bytes it released are no
        // longer read, so we may overwrite them.
        let head = self.mem.ctl().head.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if !possible(used, self.cap) {
            return Err(RingError("consumer position out of range"));
        }
        self.cached_head = head;
        Ok(used)
    }
}

/// Room for one record, owned by the producer until committed.
#[derive(Debug)]
pub struct Claim<'a, M: RingMemory> {
    producer: &'a mut Producer<M>,
    start: usize,
    len: usize,
    new_tail: u64,
}

impl<M: RingMemory> Claim<'_, M> {
    /// Payload bytes claimed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the record has no payload.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `bytes` at `offset` within the payload.
    ///
    /// # Panics
    /// If `offset + bytes.len()` exceeds the claimed length (a bug in the caller, not input).
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) {
        assert!(
            offset
                .checked_add(bytes.len())
                .is_some_and(|end| end <= self.len),
            "write past claim"
        );
        // SAFETY: within the claimed record, which lies inside the buffer and is ours.
        unsafe {
            self.producer
                .mem
                .write(self.start + RECORD_HEADER + offset, bytes)
        };
    }

    /// Publishes the record (and any padding before it) to the consumer.
    pub fn commit(self) {
        // SYNC(tail): the record bytes written above become visible to the consumer's Acquire
        // load of `tail`.
        self.producer
            .mem
            .ctl()
            .tail
            .store(self.new_tail, Ordering::Release);
        self.producer.tail = self.new_tail;
    }
}

/// The reading end. Not `Clone`: there is exactly one per ring.
#[derive(Debug)]
pub struct Consumer<M: RingMemory> {
    mem: M,
    cap: u64,
    /// Our position (what we have read).
    head: u64,
    /// The position last published in `ctl.head` (what the producer may reuse).
    published: u64,
    /// The producer's position as last read; refreshed only when we caught up with it. Only a
    /// position at most `cap` ahead of `head` (and 8-aligned from it) is kept.
    cached_tail: u64,
}

impl<M: RingMemory> Consumer<M> {
    /// Attaches to a ring at the consumer's current position.
    pub fn new(mem: M) -> Result<Self, RingError> {
        let cap = mem.capacity() as u64;
        // Relaxed: the head is ours.
        let head = mem.ctl().head.load(Ordering::Relaxed);
        if head % RECORD_ALIGN as u64 != 0 {
            return Err(RingError("consumer position misaligned at attach"));
        }
        Ok(Self {
            mem,
            cap,
            head,
            published: head,
            cached_tail: head,
        })
    }

    /// Whether a committed record (or padding) is waiting. Cheap: one Acquire load when we had
    /// caught up.
    pub fn has_data(&self) -> bool {
        // SYNC(tail): pairs with the producer's Release store in `commit`.
        self.cached_tail != self.head || self.mem.ctl().tail.load(Ordering::Acquire) != self.head
    }

    /// Copies the next record's payload into `out` (replacing its contents) and frees its room.
    /// `Ok(None)` when the ring is empty.
    pub fn pop_into(&mut self, out: &mut Vec<u8>) -> Result<Option<RecordHeader>, RingError> {
        loop {
            if self.head == self.cached_tail {
                // SYNC(tail): pairs with the producer's Release store in `commit`: the record
                // bytes before `tail` are visible.
                let tail = self.mem.ctl().tail.load(Ordering::Acquire);
                let avail = tail.wrapping_sub(self.head);
                if !possible(avail, self.cap) {
                    // Not kept: `cached_tail` stays at most `cap` ahead of `head`.
                    return Err(RingError("producer position out of range"));
                }
                self.cached_tail = tail;
                if avail == 0 {
                    return Ok(None);
                }
            }
            let avail = self.cached_tail.wrapping_sub(self.head);
            let pos = (self.head & (self.cap - 1)) as usize;
            let contiguous = self.cap as usize - pos;
            let mut raw = [0u8; RECORD_HEADER];
            // SAFETY: avail >= 8 (non-zero multiple of 8) and pos is 8-aligned in a buffer whose
            // size is a multiple of 8, so the header lies inside the committed bytes.
            unsafe { self.mem.read(pos, &mut raw) };
            let hdr = RecordHeader::decode(raw);
            if hdr.kind == PAD {
                let size = hdr.len as usize + RECORD_HEADER;
                if size != contiguous || size as u64 > avail {
                    return Err(RingError(
                        "padding record does not reach the end of the buffer",
                    ));
                }
                self.release(size as u64);
                continue;
            }
            let size = align_up(RECORD_HEADER + hdr.len as usize);
            if hdr.len as usize > max_payload(self.cap as usize)
                || size > contiguous
                || size as u64 > avail
            {
                return Err(RingError("record length out of range"));
            }
            out.clear();
            out.resize(hdr.len as usize, 0);
            // SAFETY: `pos + 8 + len <= pos + size <= cap`, inside committed bytes.
            unsafe { self.mem.read(pos + RECORD_HEADER, out) };
            self.release(size as u64);
            return Ok(Some(hdr));
        }
    }

    fn release(&mut self, size: u64) {
        self.head = self.head.wrapping_add(size);
        // Publishing the position costs a cache-line transfer to the producer (which reads it
        // when the ring looks full), so it is batched: every eighth of the ring, or when we
        // have caught up, or on `flush`.
        if self.head.wrapping_sub(self.published) >= self.cap / 8 || self.head == self.cached_tail {
            self.flush();
        }
    }

    /// Publishes everything read so far as free space for the producer.
    pub fn flush(&mut self) {
        if self.published != self.head {
            self.published = self.head;
            // SYNC(head): we are done reading the released bytes (they were copied out);
            // pairs with the producer's Acquire load before it overwrites them.
            self.mem.ctl().head.store(self.head, Ordering::Release);
        }
    }
}

/// Ring memory inside a shared mapping (production).
#[cfg(not(knit_loom))]
pub mod shm_memory {
    use super::{RingCtl, RingMemory};
    use crate::sys::mmap::Mapping;
    use std::sync::Arc;

    /// A ring's control block and data area inside a mapping, kept alive by an `Arc`.
    #[derive(Debug)]
    pub struct ShmRing {
        _map: Arc<Mapping>,
        ctl: *const RingCtl,
        data: *mut u8,
        cap: usize,
    }

    // SAFETY: the pointers stay valid while `_map` lives; all access is through atomics (`ctl`)
    // or raw copies of bytes owned by this end under the ring protocol.
    unsafe impl Send for ShmRing {}

    impl ShmRing {
        /// # Safety
        /// `ctl_off` (128-aligned, 256 bytes) and `[data_off, data_off + cap)` must lie inside
        /// `map`, `cap` must be a power of two >= 64, and no other `ShmRing` in this process may
        /// play the same role on the same ring.
        pub(crate) unsafe fn new(
            map: Arc<Mapping>,
            ctl_off: usize,
            data_off: usize,
            cap: usize,
        ) -> Self {
            let base = map.as_ptr();
            // SAFETY: offsets are inside the mapping per the caller's contract.
            let (ctl, data) = unsafe { (base.add(ctl_off) as *const RingCtl, base.add(data_off)) };
            Self {
                _map: map,
                ctl,
                data,
                cap,
            }
        }
    }

    // SAFETY: `new`'s contract gives a valid control block and a data area of `cap` bytes.
    unsafe impl RingMemory for ShmRing {
        fn ctl(&self) -> &RingCtl {
            // SAFETY: valid and suitably aligned for the mapping's lifetime; RingCtl holds only
            // atomics, which may be shared with other processes.
            unsafe { &*self.ctl }
        }
        fn capacity(&self) -> usize {
            self.cap
        }
        unsafe fn write(&self, off: usize, src: &[u8]) {
            // SAFETY: the caller keeps the range inside the data area and owns those bytes.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.data.add(off), src.len()) }
        }
        unsafe fn read(&self, off: usize, dst: &mut [u8]) {
            // SAFETY: the caller keeps the range inside the data area. Bytes are copied out once
            // and validated afterwards, so a writer that changes them under us can only make us
            // decode garbage, which the decoders reject.
            unsafe {
                std::ptr::copy_nonoverlapping(self.data.add(off), dst.as_mut_ptr(), dst.len())
            }
        }
    }
}

/// Ring memory on the heap, for tests and the loom model.
pub mod heap_memory {
    use super::{RingCtl, RingMemory};
    use std::sync::Arc;

    #[cfg(knit_loom)]
    type Cell = loom::cell::UnsafeCell<u8>;
    #[cfg(not(knit_loom))]
    type Cell = std::cell::UnsafeCell<u8>;

    struct Inner {
        ctl: RingCtl,
        data: Box<[Cell]>,
    }

    /// A ring on the heap; `clone()` gives the other end.
    #[derive(Clone)]
    #[allow(missing_debug_implementations)]
    pub struct HeapRing(Arc<Inner>);

    // SAFETY: the cells are only touched under the ring protocol, which gives each byte a single
    // owner at a time and orders hand-overs with Release/Acquire on `head`/`tail`.
    unsafe impl Send for HeapRing {}
    // SAFETY: as above.
    unsafe impl Sync for HeapRing {}

    impl HeapRing {
        /// A ring of `cap` data bytes (a power of two, at least 64).
        // The cells are not `Sync` by type; the ring protocol shares them (see the impls above).
        #[allow(clippy::arc_with_non_send_sync)]
        pub fn new(cap: usize) -> Self {
            assert!(cap.is_power_of_two() && cap >= 64);
            let data = (0..cap).map(|_| Cell::new(0)).collect();
            Self(Arc::new(Inner {
                ctl: RingCtl::new(),
                data,
            }))
        }

        /// A copy of the data bytes, for tests (seed images for the fuzz targets).
        #[doc(hidden)]
        pub fn image_for_test(&self) -> Vec<u8> {
            let mut out = vec![0u8; self.0.data.len()];
            // SAFETY: single-threaded tests only; reads within the buffer.
            unsafe { <Self as RingMemory>::read(self, 0, &mut out) };
            out
        }

        /// Direct access to the control block, for tests that corrupt it on purpose.
        pub fn ctl_for_test(&self) -> &RingCtl {
            &self.0.ctl
        }

        /// Overwrites data bytes regardless of ownership, for tests that corrupt records.
        pub fn scribble_for_test(&self, off: usize, bytes: &[u8]) {
            // SAFETY: single-threaded tests only; bounds checked by indexing.
            for (i, b) in bytes.iter().enumerate() {
                #[cfg(not(knit_loom))]
                unsafe {
                    *self.0.data[off + i].get() = *b
                };
                #[cfg(knit_loom)]
                self.0.data[off + i].with_mut(|p| unsafe { *p = *b });
            }
        }
    }

    impl crate::ring::RingCtl {
        /// The positions (head, tail), for tests.
        #[doc(hidden)]
        pub fn positions_for_test(&self) -> (u64, u64) {
            // SeqCst: tests and fuzz harnesses call this with no other thread on the ring; any
            // order would do.
            (
                self.head.load(crate::sync::Ordering::SeqCst),
                self.tail.load(crate::sync::Ordering::SeqCst),
            )
        }

        /// Sets the positions, for tests that corrupt them on purpose.
        pub fn set_for_test(&self, head: u64, tail: u64) {
            // SeqCst: as above, single-threaded test use; any order would do.
            self.head.store(head, crate::sync::Ordering::SeqCst);
            self.tail.store(tail, crate::sync::Ordering::SeqCst);
        }
    }

    // SAFETY: `cap` is a power of two >= 64 and the data has exactly `cap` cells.
    unsafe impl RingMemory for HeapRing {
        fn ctl(&self) -> &RingCtl {
            &self.0.ctl
        }
        fn capacity(&self) -> usize {
            self.0.data.len()
        }
        unsafe fn write(&self, off: usize, src: &[u8]) {
            for (i, b) in src.iter().enumerate() {
                let cell = &self.0.data[off + i];
                #[cfg(not(knit_loom))]
                // SAFETY: the ring protocol gives the producer these bytes exclusively.
                unsafe {
                    *cell.get() = *b
                };
                #[cfg(knit_loom)]
                // SAFETY: as above; loom checks the claim.
                cell.with_mut(|p| unsafe { *p = *b });
            }
        }
        unsafe fn read(&self, off: usize, dst: &mut [u8]) {
            for (i, d) in dst.iter_mut().enumerate() {
                let cell = &self.0.data[off + i];
                #[cfg(not(knit_loom))]
                // SAFETY: the ring protocol gives the consumer these bytes exclusively.
                unsafe {
                    *d = *cell.get()
                };
                #[cfg(knit_loom)]
                // SAFETY: as above; loom checks the claim.
                cell.with(|p| *d = unsafe { *p });
            }
        }
    }
}
