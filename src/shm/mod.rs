//! Shared-memory segments: a versioned header followed by the regions of one kind of segment.
//!
//! The byte-exact format is in `docs/shm-format.md`; the structs here are `#[repr(C)]` and their
//! sizes and offsets are asserted at compile time. The gateway creates every segment (a sealed
//! memfd), initialises it, and writes the layout version **last**; a peer maps what it receives
//! and validates the header before it touches anything else. Initialisation is a state
//! ("version 0 = not initialised yet"), distinct from a version the peer does not understand.
//!
//! Kinds:
//! * **lane** — two SPSC rings between two peers ([`LaneSegment`]);
//! * **doorbell directory** — one doorbell per peer, 128 bytes apart; every native peer maps it,
//!   so any writer can wake any reader ([`DoorbellSegment`]);
//! * **context** — a shared context: writer lock, double-buffered snapshot, delta log
//!   ([`ContextSegment`], algorithm in [`crate::store`]).

use crate::ring::shm_memory::ShmRing;
use crate::ring::{Consumer, Producer, RingCtl};
use crate::store::{StoreCtl, StoreMemory};
use crate::sys::{memfd, mmap::Mapping};
use crate::wait::Doorbell;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// `b"KNITSHM\0"` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"KNITSHM\0");
/// The layout version this build writes and accepts.
pub const LAYOUT_VERSION: u32 = 2;
/// Page size the layouts are arranged around.
pub const PAGE: usize = 4096;
/// Smallest ring capacity a lane may declare.
pub const MIN_RING: usize = 4096;
/// Largest ring capacity a lane may declare.
pub const MAX_RING: usize = 1 << 30;
/// Most doorbells a directory may hold.
pub const MAX_DOORBELLS: usize = 1 << 16;
/// Distance between two doorbells in a directory (own cache line pair).
const DOORBELL_STRIDE: usize = 128;
/// Largest context snapshot capacity (bytes per buffer).
pub const MAX_SNAPSHOT: usize = 1 << 30;
/// Context log capacity bounds (bytes).
pub const MIN_LOG: usize = 4096;
/// See [`MIN_LOG`].
pub const MAX_LOG: usize = 1 << 28;

/// What a segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SegmentKind {
    /// Two rings between two peers.
    Lane = 1,
    /// The doorbell directory.
    Doorbells = 2,
    /// A shared context.
    Context = 3,
}

/// The first 128 bytes of every segment. All fields are atomics: another process may write them
/// (and a hostile one may write anything), so each is read once and validated.
#[repr(C, align(128))]
#[derive(Debug)]
pub struct SegmentHeader {
    magic: AtomicU64,
    /// Written last by the creator (Release); 0 means "not initialised yet".
    version: AtomicU32,
    kind: AtomicU32,
    total_len: AtomicU64,
    creator_pid: AtomicU32,
    /// Lanes: data bytes per ring. Directories: doorbells. Contexts: snapshot bytes per buffer.
    param: AtomicU32,
    /// Contexts: log bytes. Others: 0.
    param2: AtomicU32,
}

const HEADER_SIZE: usize = 128;
const _: () = {
    assert!(std::mem::size_of::<SegmentHeader>() == HEADER_SIZE);
    assert!(std::mem::offset_of!(SegmentHeader, version) == 8);
    assert!(std::mem::offset_of!(SegmentHeader, kind) == 12);
    assert!(std::mem::offset_of!(SegmentHeader, total_len) == 16);
    assert!(std::mem::offset_of!(SegmentHeader, creator_pid) == 24);
    assert!(std::mem::offset_of!(SegmentHeader, param) == 28);
    assert!(std::mem::offset_of!(SegmentHeader, param2) == 32);
    assert!(std::mem::size_of::<RingCtl>() == 256);
    assert!(std::mem::size_of::<Doorbell>() <= DOORBELL_STRIDE);
};

/// Lane layout: header, ring 0 control, ring 1 control, then the data areas from the next page.
const LANE_CTL: [usize; 2] = [HEADER_SIZE, HEADER_SIZE + 256];
const LANE_DATA: usize = PAGE;
/// Directory layout: header, then doorbells from the next page.
const DIR_FIRST: usize = PAGE;

/// Why a segment could not be used.
#[derive(Debug, Error)]
pub enum ShmError {
    /// The kernel refused (memfd, seal, map).
    #[error("shared memory: {0}")]
    Io(#[from] std::io::Error),
    /// The creator has not finished initialising it (a start-up race, not corruption).
    #[error("segment not initialised yet")]
    NotInitialised,
    /// Initialised by a build with another layout.
    #[error("segment layout version {found}, this build understands {expected}")]
    VersionMismatch { found: u32, expected: u32 },
    /// Not a knit segment, or not the kind expected, or its fields do not add up.
    #[error("invalid segment: {0}")]
    Invalid(&'static str),
}

fn round_page(n: usize) -> usize {
    n.div_ceil(PAGE) * PAGE
}

/// The length of a segment of `kind` with these parameters, or why they are invalid.
fn layout_len(kind: SegmentKind, param: usize, param2: usize) -> Result<usize, ShmError> {
    match kind {
        SegmentKind::Lane => {
            if !param.is_power_of_two() || !(MIN_RING..=MAX_RING).contains(&param) {
                return Err(ShmError::Invalid(
                    "ring capacity must be a power of two in [4 KiB, 1 GiB]",
                ));
            }
            Ok(LANE_DATA + 2 * param)
        }
        SegmentKind::Doorbells => {
            if param == 0 || param > MAX_DOORBELLS {
                return Err(ShmError::Invalid("doorbell count out of range"));
            }
            Ok(DIR_FIRST + round_page(param * DOORBELL_STRIDE))
        }
        SegmentKind::Context => {
            if param % 8 != 0 || param == 0 || param > MAX_SNAPSHOT {
                return Err(ShmError::Invalid(
                    "snapshot capacity must be a non-zero multiple of 8 up to 1 GiB",
                ));
            }
            if !param2.is_power_of_two() || !(MIN_LOG..=MAX_LOG).contains(&param2) {
                return Err(ShmError::Invalid(
                    "log capacity must be a power of two in [4 KiB, 256 MiB]",
                ));
            }
            Ok(context_layout(param, param2).total)
        }
    }
}

/// Context layout: header, store control block, then two snapshot buffers and the log, each
/// page-aligned. A buffer holds 4 header words and then the snapshot bytes.
struct ContextLayout {
    ctl: usize,
    buffers: [usize; 2],
    log: usize,
    total: usize,
}

fn context_layout(snapshot: usize, log: usize) -> ContextLayout {
    let ctl = HEADER_SIZE;
    let buf_len = round_page(crate::store::BUFFER_HEADER_WORDS * 8 + snapshot);
    let first = round_page(ctl + std::mem::size_of::<StoreCtl>());
    let log_off = first + 2 * buf_len;
    ContextLayout {
        ctl,
        buffers: [first, first + buf_len],
        log: log_off,
        total: log_off + log,
    }
}

/// A mapped, validated segment.
#[derive(Clone, Debug)]
pub struct Segment {
    map: Arc<Mapping>,
    kind: SegmentKind,
    param: usize,
    param2: usize,
}

impl Segment {
    fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping is at least HEADER_SIZE bytes (checked at map time), page-aligned,
        // and the header holds only atomics.
        unsafe { &*(self.map.as_ptr() as *const SegmentHeader) }
    }

    /// The kind of segment.
    pub fn kind(&self) -> SegmentKind {
        self.kind
    }

    /// The pid that created it, as written in the header (informational, not trusted).
    pub fn creator_pid(&self) -> u32 {
        // Relaxed: written before `version` was published, which `open` read with Acquire before
        // this segment existed; the value is informational anyway.
        self.header().creator_pid.load(Ordering::Relaxed)
    }

    /// Creates, initialises and seals a segment. Returns the descriptor to pass to peers.
    fn create(kind: SegmentKind, param: usize, param2: usize) -> Result<OwnedFd, ShmError> {
        let total = layout_len(kind, param, param2)?;
        let name = match kind {
            SegmentKind::Lane => "knit-lane",
            SegmentKind::Doorbells => "knit-doorbells",
            SegmentKind::Context => "knit-context",
        };
        let fd = memfd::create_sealed(name, total as u64)?;
        let map = Mapping::map(&fd, total)?;
        // SAFETY: fresh zero-filled mapping of `total >= HEADER_SIZE` bytes; only we have it.
        let h = unsafe { &*(map.as_ptr() as *const SegmentHeader) };
        // Relaxed: published by the Release store of `version` below.
        h.magic.store(MAGIC, Ordering::Relaxed);
        h.kind.store(kind as u32, Ordering::Relaxed);
        h.total_len.store(total as u64, Ordering::Relaxed);
        h.creator_pid
            .store(crate::sys::identity::pid(), Ordering::Relaxed);
        h.param.store(param as u32, Ordering::Relaxed);
        h.param2.store(param2 as u32, Ordering::Relaxed);
        // Rings, doorbells and stores start as all-zero, which is their initial state.
        // SYNC(version): everything above is visible to a reader that sees the version.
        h.version.store(LAYOUT_VERSION, Ordering::Release);
        Ok(fd)
    }

    /// Maps a segment received from the gateway and validates it.
    pub fn open(fd: impl AsFd, expected: SegmentKind) -> Result<Self, ShmError> {
        Self::open_with(fd, expected, true)
    }

    fn open_with(fd: impl AsFd, expected: SegmentKind, writable: bool) -> Result<Self, ShmError> {
        let (size, sealed) = memfd::inspect(&fd)?;
        if !sealed {
            return Err(ShmError::Invalid("segment is not sealed against shrinking"));
        }
        if size < HEADER_SIZE as u64 || size > (1u64 << 34) {
            return Err(ShmError::Invalid("segment size out of range"));
        }
        let map = Arc::new(if writable {
            Mapping::map(&fd, size as usize)?
        } else {
            Mapping::map_readonly(&fd, size as usize)?
        });
        // SAFETY: as in `header()`: at least HEADER_SIZE bytes, page-aligned, atomics only.
        let h = unsafe { &*(map.as_ptr() as *const SegmentHeader) };
        // SYNC(version): pairs with the creator's Release store.
        let version = h.version.load(Ordering::Acquire);
        // Relaxed, this and the header loads below: ordered after the Acquire load of `version`;
        // when it is 0 the fields are not trusted (we return `NotInitialised`).
        if h.magic.load(Ordering::Relaxed) != MAGIC {
            return Err(if version == 0 {
                ShmError::NotInitialised
            } else {
                ShmError::Invalid("bad magic")
            });
        }
        match version {
            0 => return Err(ShmError::NotInitialised),
            LAYOUT_VERSION => {}
            found => {
                return Err(ShmError::VersionMismatch {
                    found,
                    expected: LAYOUT_VERSION,
                })
            }
        }
        // Relaxed: as for `magic`, the Acquire load of `version` orders these.
        if h.kind.load(Ordering::Relaxed) != expected as u32 {
            return Err(ShmError::Invalid("unexpected segment kind"));
        }
        if h.total_len.load(Ordering::Relaxed) != size {
            return Err(ShmError::Invalid(
                "header length differs from the segment size",
            ));
        }
        let param = h.param.load(Ordering::Relaxed) as usize;
        let param2 = h.param2.load(Ordering::Relaxed) as usize;
        if layout_len(expected, param, param2)? as u64 != size {
            return Err(ShmError::Invalid(
                "parameters do not match the segment size",
            ));
        }
        Ok(Self {
            map,
            kind: expected,
            param,
            param2,
        })
    }
}

/// Creates a lane segment with two rings of `ring_capacity` bytes each.
pub fn create_lane(ring_capacity: usize) -> Result<OwnedFd, ShmError> {
    Segment::create(SegmentKind::Lane, ring_capacity, 0)
}

/// Creates a doorbell directory with `count` doorbells.
pub fn create_doorbells(count: usize) -> Result<OwnedFd, ShmError> {
    Segment::create(SegmentKind::Doorbells, count, 0)
}

/// Creates a context segment: two snapshot buffers of `snapshot` bytes and a log of `log` bytes.
pub fn create_context(snapshot: usize, log: usize) -> Result<OwnedFd, ShmError> {
    Segment::create(SegmentKind::Context, snapshot, log)
}

/// A mapped lane: ring `side` is written by side `side` and read by the other.
#[derive(Clone, Debug)]
pub struct LaneSegment(Segment);

impl LaneSegment {
    /// Maps and validates a lane segment.
    pub fn open(fd: impl AsFd) -> Result<Self, ShmError> {
        Segment::open(fd, SegmentKind::Lane).map(Self)
    }

    /// Data bytes per ring.
    pub fn ring_capacity(&self) -> usize {
        self.0.param
    }

    fn ring(&self, index: usize) -> ShmRing {
        let cap = self.0.param;
        // SAFETY: `open` checked the segment is exactly LANE_DATA + 2 * cap bytes, so both
        // control blocks and both data areas lie inside it; each `LaneSegment` user takes one
        // role per ring (the client builds one producer and one consumer per lane).
        unsafe {
            ShmRing::new(
                self.0.map.clone(),
                LANE_CTL[index],
                LANE_DATA + index * cap,
                cap,
            )
        }
    }

    /// The producer end for `side` (0 or 1).
    pub fn producer(&self, side: u8) -> Result<Producer<ShmRing>, crate::ring::RingError> {
        Producer::new(self.ring(side as usize & 1))
    }

    /// The consumer end for `side` (0 or 1): it reads the other side's ring.
    pub fn consumer(&self, side: u8) -> Result<Consumer<ShmRing>, crate::ring::RingError> {
        Consumer::new(self.ring(1 - (side as usize & 1)))
    }
}

/// The mapped doorbell directory.
#[derive(Clone, Debug)]
pub struct DoorbellSegment(Segment);

impl DoorbellSegment {
    /// Maps and validates a doorbell directory.
    pub fn open(fd: impl AsFd) -> Result<Self, ShmError> {
        Segment::open(fd, SegmentKind::Doorbells).map(Self)
    }

    /// How many doorbells it holds.
    pub fn len(&self) -> usize {
        self.0.param
    }

    /// Whether it holds none (never, for a validated directory).
    pub fn is_empty(&self) -> bool {
        self.0.param == 0
    }

    /// Doorbell `index`, if in range.
    pub fn doorbell(&self, index: u32) -> Option<&Doorbell> {
        let i = index as usize;
        if i >= self.0.param {
            return None;
        }
        // SAFETY: `open` checked the segment holds `param` doorbells of DOORBELL_STRIDE bytes
        // from DIR_FIRST; the offset is 128-aligned and Doorbell holds only atomics.
        Some(unsafe {
            &*(self.0.map.as_ptr().add(DIR_FIRST + i * DOORBELL_STRIDE) as *const Doorbell)
        })
    }
}

/// A mapped context segment.
#[derive(Clone, Debug)]
pub struct ContextSegment {
    seg: Segment,
}

impl ContextSegment {
    /// Maps and validates a context segment.
    pub fn open(fd: impl AsFd) -> Result<Self, ShmError> {
        Segment::open(fd, SegmentKind::Context).map(|seg| Self { seg })
    }

    /// Maps a context segment read-only (for peers that may read but not write it: the
    /// store's readers and followers never write).
    pub fn open_readonly(fd: impl AsFd) -> Result<Self, ShmError> {
        Segment::open_with(fd, SegmentKind::Context, false).map(|seg| Self { seg })
    }

    /// Snapshot capacity in bytes.
    pub fn snapshot_capacity(&self) -> usize {
        self.seg.param
    }

    /// Faults in the pages a context's hot path touches (the log and the start of both
    /// snapshot buffers), so the first laps of the log do not pay a page fault per page.
    /// Best effort: kernels without `MADV_POPULATE_*` simply fault later.
    pub fn prefault(&self, writable: bool) {
        let l = context_layout(self.seg.param, self.seg.param2);
        let buf_pages =
            round_page(crate::store::BUFFER_HEADER_WORDS * 8 + self.seg.param).min(4 * PAGE);
        let advice = if writable {
            rustix::mm::Advice::LinuxPopulateWrite
        } else {
            rustix::mm::Advice::LinuxPopulateRead
        };
        for (off, len) in [
            (l.buffers[0], buf_pages),
            (l.buffers[1], buf_pages),
            (l.log, self.seg.param2),
        ] {
            // SAFETY: the range lies inside our mapping (checked layout); populating changes no
            // data, it only faults pages in.
            unsafe {
                let _ = rustix::mm::madvise(self.seg.map.as_ptr().add(off).cast(), len, advice);
            }
        }
    }
}

// SAFETY: `open` validated the layout for (param, param2): the control block and the three word
// regions lie inside the mapping, 8-aligned, with the sizes reported here; everything in them is
// accessed as atomics.
unsafe impl StoreMemory for ContextSegment {
    fn ctl(&self) -> &StoreCtl {
        let l = context_layout(self.seg.param, self.seg.param2);
        // SAFETY: see the impl's safety note.
        unsafe { &*(self.seg.map.as_ptr().add(l.ctl) as *const StoreCtl) }
    }
    fn buffer(&self, i: usize) -> &[AtomicU64] {
        let l = context_layout(self.seg.param, self.seg.param2);
        let words = crate::store::BUFFER_HEADER_WORDS + self.seg.param / 8;
        // SAFETY: see the impl's safety note.
        unsafe {
            std::slice::from_raw_parts(
                self.seg.map.as_ptr().add(l.buffers[i & 1]) as *const AtomicU64,
                words,
            )
        }
    }
    fn log(&self) -> &[AtomicU64] {
        let l = context_layout(self.seg.param, self.seg.param2);
        // SAFETY: see the impl's safety note.
        unsafe {
            std::slice::from_raw_parts(
                self.seg.map.as_ptr().add(l.log) as *const AtomicU64,
                self.seg.param2 / 8,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_round_trip_through_a_sealed_memfd() {
        let fd = create_lane(4096).unwrap();
        let a = LaneSegment::open(&fd).unwrap();
        let b = LaneSegment::open(&fd).unwrap();
        let mut pa = a.producer(0).unwrap();
        let mut cb = b.consumer(1).unwrap();
        let mut pb = b.producer(1).unwrap();
        let mut ca = a.consumer(0).unwrap();
        pa.push(1, 0, b"to b").unwrap();
        pb.push(2, 0, b"to a").unwrap();
        let mut buf = Vec::new();
        assert_eq!(cb.pop_into(&mut buf).unwrap().unwrap().kind, 1);
        assert_eq!(buf, b"to b");
        assert_eq!(ca.pop_into(&mut buf).unwrap().unwrap().kind, 2);
        assert_eq!(buf, b"to a");
    }

    #[test]
    fn wrong_kind_is_refused() {
        let fd = create_doorbells(8).unwrap();
        assert!(matches!(LaneSegment::open(&fd), Err(ShmError::Invalid(_))));
        let dir = DoorbellSegment::open(&fd).unwrap();
        assert_eq!(dir.len(), 8);
        assert!(dir.doorbell(7).is_some());
        assert!(dir.doorbell(8).is_none());
        assert!(ContextSegment::open(&fd).is_err());
        let ctx = create_context(4096, 4096).unwrap();
        assert!(ContextSegment::open(&ctx).is_ok());
        assert!(DoorbellSegment::open(&ctx).is_err());
    }

    #[test]
    fn unsealed_or_foreign_memfd_is_refused() {
        let fd = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        assert!(matches!(LaneSegment::open(&fd), Err(ShmError::Invalid(_))));
        // Sealed but all zeroes: a segment nobody initialised.
        let fd = memfd::create_sealed("x", 8192 + 4096).unwrap();
        assert!(matches!(
            LaneSegment::open(&fd),
            Err(ShmError::NotInitialised)
        ));
    }

    #[test]
    fn version_mismatch_and_bad_capacity_are_typed() {
        let fd = create_lane(4096).unwrap();
        let seg = LaneSegment::open(&fd).unwrap();
        seg.0.header().version.store(99, Ordering::SeqCst);
        assert!(matches!(
            LaneSegment::open(&fd),
            Err(ShmError::VersionMismatch {
                found: 99,
                expected: LAYOUT_VERSION
            })
        ));
        seg.0
            .header()
            .version
            .store(LAYOUT_VERSION, Ordering::SeqCst);
        seg.0.header().param.store(5000, Ordering::SeqCst);
        assert!(matches!(LaneSegment::open(&fd), Err(ShmError::Invalid(_))));
    }

    #[test]
    fn bad_ring_capacity_is_refused_at_creation() {
        assert!(create_lane(1000).is_err());
        assert!(create_lane(1024).is_err());
    }
}
