//! Shared-memory segments: a versioned header followed by the regions of one kind of segment.
//!
//! The byte-exact format is in `docs/shm-format.md`; the structs here are `#[repr(C)]` and their
//! sizes and offsets are asserted at compile time. The gateway creates every segment (a sealed
//! memfd), initialises it, and writes the layout version **last**; a peer maps what it receives
//! and validates the header before it touches anything else. Initialisation is a state
//! ("version 0 = not initialised yet"), distinct from a version the peer does not understand.

use crate::ring::shm_memory::ShmRing;
use crate::ring::{Consumer, Producer, RingCtl};
use crate::sys::{memfd, mmap::Mapping};
use crate::wait::Doorbell;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// `b"KNITSHM\0"` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"KNITSHM\0");
/// The layout version this build writes and accepts.
pub const LAYOUT_VERSION: u32 = 1;
/// Page size the layouts are arranged around.
pub const PAGE: usize = 4096;
/// Smallest and largest ring capacity a lane may declare.
pub const MIN_RING: usize = 4096;
/// See [`MIN_RING`].
pub const MAX_RING: usize = 1 << 30;

/// What a segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SegmentKind {
    /// Two rings between two peers.
    Lane = 1,
    /// One peer's doorbell.
    Doorbell = 2,
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
    /// Lanes: data bytes per ring. Doorbells: 0.
    ring_capacity: AtomicU32,
}

const HEADER_SIZE: usize = 128;
const _: () = {
    assert!(std::mem::size_of::<SegmentHeader>() == HEADER_SIZE);
    assert!(std::mem::offset_of!(SegmentHeader, version) == 8);
    assert!(std::mem::offset_of!(SegmentHeader, kind) == 12);
    assert!(std::mem::offset_of!(SegmentHeader, total_len) == 16);
    assert!(std::mem::offset_of!(SegmentHeader, creator_pid) == 24);
    assert!(std::mem::offset_of!(SegmentHeader, ring_capacity) == 28);
    assert!(std::mem::size_of::<RingCtl>() == 256);
};

/// Lane layout: header, ring 0 control, ring 1 control, then the data areas from the next page.
const LANE_CTL: [usize; 2] = [HEADER_SIZE, HEADER_SIZE + 256];
const LANE_DATA: usize = PAGE;
/// Doorbell layout: header, then the doorbell on its own line.
const DOORBELL_OFF: usize = HEADER_SIZE;
const DOORBELL_LEN: usize = PAGE;

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

/// A mapped, validated segment.
#[derive(Clone, Debug)]
pub struct Segment {
    map: Arc<Mapping>,
    kind: SegmentKind,
    ring_capacity: usize,
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
        self.header().creator_pid.load(Ordering::Relaxed)
    }

    /// Creates, initialises and seals a segment. Returns the descriptor to pass to peers.
    fn create(kind: SegmentKind, ring_capacity: usize) -> Result<OwnedFd, ShmError> {
        let total = match kind {
            SegmentKind::Lane => lane_len(ring_capacity)?,
            SegmentKind::Doorbell => DOORBELL_LEN,
        };
        let name = match kind {
            SegmentKind::Lane => "knit-lane",
            SegmentKind::Doorbell => "knit-doorbell",
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
        h.ring_capacity
            .store(ring_capacity as u32, Ordering::Relaxed);
        // Rings and doorbells start as all-zero, which is their initial state.
        // SYNC(version): everything above is visible to a reader that sees the version.
        h.version.store(LAYOUT_VERSION, Ordering::Release);
        Ok(fd)
    }

    /// Maps a segment received from the gateway and validates it.
    pub fn open(fd: impl AsFd, expected: SegmentKind) -> Result<Self, ShmError> {
        let (size, sealed) = memfd::inspect(&fd)?;
        if !sealed {
            return Err(ShmError::Invalid("segment is not sealed against shrinking"));
        }
        if size < HEADER_SIZE as u64 || size > (2 * MAX_RING + PAGE) as u64 {
            return Err(ShmError::Invalid("segment size out of range"));
        }
        let map = Arc::new(Mapping::map(&fd, size as usize)?);
        // SAFETY: as in `header()`: at least HEADER_SIZE bytes, page-aligned, atomics only.
        let h = unsafe { &*(map.as_ptr() as *const SegmentHeader) };
        // SYNC(version): pairs with the creator's Release store.
        let version = h.version.load(Ordering::Acquire);
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
        if h.kind.load(Ordering::Relaxed) != expected as u32 {
            return Err(ShmError::Invalid("unexpected segment kind"));
        }
        if h.total_len.load(Ordering::Relaxed) != size {
            return Err(ShmError::Invalid(
                "header length differs from the segment size",
            ));
        }
        let ring_capacity = h.ring_capacity.load(Ordering::Relaxed) as usize;
        let fits = match expected {
            SegmentKind::Lane => lane_len(ring_capacity)
                .map(|l| l as u64 == size)
                .unwrap_or(false),
            SegmentKind::Doorbell => size == DOORBELL_LEN as u64,
        };
        if !fits {
            return Err(ShmError::Invalid(
                "ring capacity does not match the segment size",
            ));
        }
        Ok(Self {
            map,
            kind: expected,
            ring_capacity,
        })
    }
}

fn lane_len(ring_capacity: usize) -> Result<usize, ShmError> {
    if !ring_capacity.is_power_of_two() || !(MIN_RING..=MAX_RING).contains(&ring_capacity) {
        return Err(ShmError::Invalid(
            "ring capacity must be a power of two in [4 KiB, 1 GiB]",
        ));
    }
    Ok(LANE_DATA + 2 * ring_capacity)
}

/// Creates a lane segment with two rings of `ring_capacity` bytes each.
pub fn create_lane(ring_capacity: usize) -> Result<OwnedFd, ShmError> {
    Segment::create(SegmentKind::Lane, ring_capacity)
}

/// Creates a doorbell segment.
pub fn create_doorbell() -> Result<OwnedFd, ShmError> {
    Segment::create(SegmentKind::Doorbell, 0)
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
        self.0.ring_capacity
    }

    fn ring(&self, index: usize) -> ShmRing {
        let cap = self.0.ring_capacity;
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

/// A mapped doorbell segment.
#[derive(Clone, Debug)]
pub struct DoorbellSegment(Segment);

impl DoorbellSegment {
    /// Maps and validates a doorbell segment.
    pub fn open(fd: impl AsFd) -> Result<Self, ShmError> {
        Segment::open(fd, SegmentKind::Doorbell).map(Self)
    }

    /// The doorbell.
    pub fn doorbell(&self) -> &Doorbell {
        // SAFETY: DOORBELL_OFF + size_of::<Doorbell>() < DOORBELL_LEN (the validated size), the
        // offset is 128-aligned, and Doorbell holds only atomics.
        unsafe { &*(self.0.map.as_ptr().add(DOORBELL_OFF) as *const Doorbell) }
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
        let fd = create_doorbell().unwrap();
        assert!(matches!(LaneSegment::open(&fd), Err(ShmError::Invalid(_))));
        assert!(DoorbellSegment::open(&fd).is_ok());
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
        seg.0.header().ring_capacity.store(5000, Ordering::SeqCst);
        assert!(matches!(LaneSegment::open(&fd), Err(ShmError::Invalid(_))));
    }

    #[test]
    fn bad_ring_capacity_is_refused_at_creation() {
        assert!(create_lane(1000).is_err());
        assert!(create_lane(1024).is_err());
    }
}
