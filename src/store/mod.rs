//! The shared-context store: what lives in a context segment and how writers and readers use it.
//!
//! * a **writer lock** (`lock`: 0 when free, else the holder's token): writers of one context
//!   take turns; the gateway frees the lock of a writer that died holding it;
//! * a **version** (`version`): the committed version, one total order per context;
//! * two **snapshot buffers**, each guarded by a sequence word (a seqlock): version `v` lives in
//!   buffer `v & 1`, so a writer fills the buffer readers are not using and then publishes the
//!   new version. Readers never block writers; a reader that raced a writer retries;
//! * a **delta log**: a broadcast ring of records (`kind`, `version`, `updater`, payload) that
//!   subscribers follow at their own pace. Writers never wait for them; a follower that is lapped
//!   notices (by position and by version) and resynchronises from the snapshot;
//! * a **subscriber table** of doorbell indices, maintained by the gateway, rung by writers.
//!
//! Commit order (a writer holding the lock): fill the free buffer (seq odd → data → seq even),
//! write the log record at `log_tail`, publish `version` (Release), publish `log_tail`
//! (Release), release the lock. A writer that dies before publishing `version` leaves
//! everything as it was; one that dies after leaves a consistent snapshot and at worst a missing
//! log record, which followers see as a version gap and resynchronise over.
//!
//! All regions are arrays of `AtomicU64` accessed with Relaxed loads and stores (the seqlock
//! recipe that is data-race-free in the Rust model), ordered by the Acquire/Release pairs tagged
//! `SYNC(...)`. Everything read is validated: lengths against capacities, record headers against
//! the log's bounds. Written once over [`StoreMemory`], so loom checks the same code.

#[cfg(not(knit_loom))]
pub mod context;
#[cfg(all(test, knit_loom))]
mod loom_tests;
#[cfg(all(test, not(knit_loom)))]
mod tests;

use crate::sync::{fence, spin_hint, AtomicU32, AtomicU64, Ordering};
use std::cell::Cell;
use thiserror::Error;

/// Words at the start of each snapshot buffer: version, updater, byte length, reserved.
pub const BUFFER_HEADER_WORDS: usize = 4;
/// Words in a log record header: (len | kind << 32 | flags << 48), version, updater.
const LOG_HEADER_WORDS: usize = 3;
/// Log record kind reserved for padding at the wrap.
const LOG_PAD: u16 = 0xFFFF;
/// Most subscribers whose doorbells a context rings.
#[cfg(not(knit_loom))]
pub const MAX_SUBSCRIBERS: usize = 256;
/// Most subscribers whose doorbells a context rings (small under loom, to keep the model small).
#[cfg(knit_loom)]
pub const MAX_SUBSCRIBERS: usize = 2;

/// The control block of a context segment.
#[repr(C, align(128))]
pub struct StoreCtl {
    lock: AtomicU64,
    _pad0: [u8; 120],
    version: AtomicU64,
    log_tail: AtomicU64,
    /// One past the highest subscriber slot ever used (writers scan no further).
    sub_hi: AtomicU32,
    /// Non-zero once the context was destroyed (set by the gateway only, `retire`): writers
    /// refuse to write it.
    retired: AtomicU32,
    _pad1: [u8; 104],
    seq: [SeqWord; 2],
    /// Doorbell indices + 1 of subscribers (0: empty slot). Written by the gateway only.
    subscribers: [AtomicU32; MAX_SUBSCRIBERS],
}

#[repr(C, align(128))]
struct SeqWord {
    seq: AtomicU64,
    _pad: [u8; 120],
}

#[cfg(not(knit_loom))]
const _: () = {
    assert!(std::mem::offset_of!(StoreCtl, version) == 128);
    assert!(std::mem::offset_of!(StoreCtl, retired) == 148);
    assert!(std::mem::offset_of!(StoreCtl, seq) == 256);
    assert!(std::mem::offset_of!(StoreCtl, subscribers) == 512);
};

impl std::fmt::Debug for StoreCtl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCtl")
            .field("lock", &self.lock.load(Ordering::Relaxed))
            .field("version", &self.version.load(Ordering::Relaxed))
            .field("log_tail", &self.log_tail.load(Ordering::Relaxed))
            .finish()
    }
}

impl StoreCtl {
    /// A fresh control block (all zero), for heap-backed stores.
    pub fn new() -> Self {
        Self {
            lock: AtomicU64::new(0),
            _pad0: [0; 120],
            version: AtomicU64::new(0),
            log_tail: AtomicU64::new(0),
            sub_hi: AtomicU32::new(0),
            retired: AtomicU32::new(0),
            _pad1: [0; 104],
            seq: [
                SeqWord {
                    seq: AtomicU64::new(0),
                    _pad: [0; 120],
                },
                SeqWord {
                    seq: AtomicU64::new(0),
                    _pad: [0; 120],
                },
            ],
            subscribers: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    /// The committed version (0: never written).
    pub fn version(&self) -> u64 {
        // SYNC(version): pairs with the writer's Release store in `commit`.
        self.version.load(Ordering::Acquire)
    }

    /// The log's tail position: it moves with every commit (a follower that saw one value and
    /// sees another knows there is something to read).
    pub fn log_position(&self) -> u64 {
        // SYNC(log_tail): pairs with the writer's Release store in `commit`.
        self.log_tail.load(Ordering::Acquire)
    }

    /// The token of the writer holding the lock, 0 if free.
    pub fn lock_holder(&self) -> u64 {
        self.lock.load(Ordering::Acquire)
    }

    /// Frees the lock if `holder` still holds it (the gateway, after that writer died).
    pub fn break_lock(&self, holder: u64) -> bool {
        self.lock
            .compare_exchange(holder, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Marks the context destroyed (gateway only, before it tells anyone the context is gone):
    /// a peer that has not read that notice yet still has the segment mapped, and its writes
    /// would land where nobody looks; they find this instead (`is_retired`). Never undone.
    pub fn retire(&self) {
        // SYNC(retired): pairs with the Acquire load in `is_retired`. Stored before the gateway
        // sends any notice or acknowledgement of the destroy, so whoever acts on one of those
        // (and then writes, or has another peer write) loads 1.
        self.retired.store(1, Ordering::Release);
    }

    /// Whether the context was destroyed ([`StoreCtl::retire`]).
    pub fn is_retired(&self) -> bool {
        // SYNC(retired): pairs with the Release store in `retire`; only the flag is read.
        self.retired.load(Ordering::Acquire) != 0
    }

    /// Adds a subscriber's doorbell index (gateway only). False if the table is full.
    pub fn add_subscriber(&self, doorbell: u32) -> bool {
        let want = doorbell.wrapping_add(1);
        if self
            .subscribers
            .iter()
            .any(|s| s.load(Ordering::Relaxed) == want)
        {
            return true;
        }
        for (i, s) in self.subscribers.iter().enumerate() {
            if s.compare_exchange(0, want, Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                // Release: the slot is visible to a writer that sees the bound.
                self.sub_hi.fetch_max(i as u32 + 1, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Removes a subscriber's doorbell index (gateway only).
    pub fn remove_subscriber(&self, doorbell: u32) {
        let want = doorbell.wrapping_add(1);
        for s in &self.subscribers {
            let _ = s.compare_exchange(want, 0, Ordering::Release, Ordering::Relaxed);
        }
    }

    /// Empties the subscriber table (a gateway adopting a segment from a previous run: the
    /// indices refer to that run's doorbell directory; subscribers subscribe again).
    pub fn clear_subscribers(&self) {
        for s in &self.subscribers {
            // Relaxed: an index is only a hint whom to wake (see `for_each_subscriber`).
            s.store(0, Ordering::Relaxed);
        }
        // Release: a writer that sees the lowered bound also sees the emptied slots.
        self.sub_hi.store(0, Ordering::Release);
    }

    /// Calls `f` with each subscriber's doorbell index.
    pub fn for_each_subscriber(&self, mut f: impl FnMut(u32)) {
        // A hostile bound is clamped to the table.
        let hi = (self.sub_hi.load(Ordering::Acquire) as usize).min(MAX_SUBSCRIBERS);
        for s in &self.subscribers[..hi] {
            // Relaxed: an index is only a hint whom to wake; a stale one causes a spurious wake.
            let v = s.load(Ordering::Relaxed);
            if v != 0 {
                f(v - 1);
            }
        }
    }
}

impl Default for StoreCtl {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a store lives.
///
/// # Safety
/// `ctl()`, `buffer(0)`, `buffer(1)` and `log()` must stay valid for as long as `self`, never
/// change size, and never overlap; each buffer has at least `BUFFER_HEADER_WORDS + 1` words;
/// the log has a power-of-two number of words, at least 64.
pub unsafe trait StoreMemory {
    /// The control block.
    fn ctl(&self) -> &StoreCtl;
    /// Snapshot buffer `i` (0 or 1): header words then data words.
    fn buffer(&self, i: usize) -> &[AtomicU64];
    /// The delta log.
    fn log(&self) -> &[AtomicU64];
}

/// Why a store operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The snapshot does not fit the context's capacity.
    #[error("value of {size} bytes exceeds the context's capacity of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// Another writer held the lock past the deadline (or a reader kept racing writers).
    #[error("context busy")]
    Busy,
    /// The shared state does not validate: the context is corrupt (a hostile or broken peer).
    #[error("context corrupt: {0}")]
    Corrupt(&'static str),
}

/// Stores `bytes` into consecutive atomic words (little-endian, zero-padded), Relaxed.
fn store_bytes(dst: &[AtomicU64], bytes: &[u8]) {
    for (d, c) in dst.iter().zip(bytes.chunks(8)) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        d.store(u64::from_le_bytes(w), Ordering::Relaxed);
    }
}

/// Loads `len` bytes from consecutive atomic words into `out` (replacing it), Relaxed.
fn load_bytes(src: &[AtomicU64], len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(len + 8);
    for w in src.iter().take(len.div_ceil(8)) {
        out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    out.truncate(len);
}

/// A snapshot as read: version, the writer's token, and the encoded value in the caller's
/// buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub version: u64,
    pub updater: u64,
}

/// A store over some memory.
#[derive(Debug)]
pub struct Store<M: StoreMemory> {
    mem: M,
    /// Data bytes a buffer can hold.
    snap_cap: usize,
    /// Words in the log (power of two).
    log_words: u64,
}

impl<M: StoreMemory> Store<M> {
    /// Wraps memory that satisfies [`StoreMemory`]'s contract.
    pub fn new(mem: M) -> Result<Self, StoreError> {
        let b0 = mem.buffer(0).len();
        let b1 = mem.buffer(1).len();
        let log = mem.log().len();
        if b0 != b1 || b0 <= BUFFER_HEADER_WORDS || !log.is_power_of_two() || log < 64 {
            return Err(StoreError::Corrupt("store regions have impossible sizes"));
        }
        Ok(Self {
            snap_cap: (b0 - BUFFER_HEADER_WORDS) * 8,
            log_words: log as u64,
            mem,
        })
    }

    /// The control block.
    pub fn ctl(&self) -> &StoreCtl {
        self.mem.ctl()
    }

    /// Largest encoded value a snapshot can hold.
    pub fn snapshot_capacity(&self) -> usize {
        self.snap_cap
    }

    /// Largest log payload; larger deltas are logged without payload (followers resync).
    pub fn max_log_payload(&self) -> usize {
        ((self.log_words / 4) as usize - LOG_HEADER_WORDS) * 8
    }

    /// Reads the current snapshot into `out` (encoded bytes). Never blocks a writer; retries
    /// while racing one, up to a bound (then `Busy`).
    pub fn read(&self, out: &mut Vec<u8>) -> Result<SnapshotInfo, StoreError> {
        for attempt in 0..10_000u32 {
            let ctl = self.mem.ctl();
            // SYNC(version): pairs with the writer's Release store; the buffer for this version
            // was filled before it.
            let v = ctl.version.load(Ordering::Acquire);
            if v == 0 {
                out.clear();
                return Ok(SnapshotInfo {
                    version: 0,
                    updater: 0,
                });
            }
            let b = (v & 1) as usize;
            // SYNC(seq): pairs with the writer's Release store of the even sequence.
            let s1 = ctl.seq[b].seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let buf = self.mem.buffer(b);
                let bv = buf[0].load(Ordering::Relaxed);
                let updater = buf[1].load(Ordering::Relaxed);
                let len = buf[2].load(Ordering::Relaxed) as usize;
                if bv == v && len <= self.snap_cap {
                    load_bytes(&buf[BUFFER_HEADER_WORDS..], len, out);
                    // SYNC(seq): the data loads above happen before this re-check.
                    fence(Ordering::Acquire);
                    let s2 = ctl.seq[b].seq.load(Ordering::Relaxed);
                    if s1 == s2 {
                        return Ok(SnapshotInfo {
                            version: v,
                            updater,
                        });
                    }
                } else if bv == v {
                    // A stable buffer with an impossible length: corrupt, not a race.
                    fence(Ordering::Acquire);
                    if ctl.seq[b].seq.load(Ordering::Relaxed) == s1 {
                        return Err(StoreError::Corrupt("snapshot length exceeds the capacity"));
                    }
                }
            }
            if attempt > 16 {
                std::thread::yield_now();
            } else {
                spin_hint();
            }
        }
        Err(StoreError::Busy)
    }

    /// Takes the writer lock for `token` (non-zero), spinning then yielding, until `deadline`
    /// (checked with `expired`).
    pub fn lock(
        &self,
        token: u64,
        mut expired: impl FnMut() -> bool,
    ) -> Result<WriteGuard<'_, M>, StoreError> {
        debug_assert_ne!(token, 0);
        let mut spins = 0u32;
        loop {
            // Acquire: the previous holder's writes (buffer, log, version) happen before ours.
            if self
                .mem
                .ctl()
                .lock
                .compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                // Relaxed: the Acquire above ordered every earlier commit before us, and only
                // lock holders change these. Read once, here: they share the line followers
                // poll, so every later read of it would likely be another cache miss.
                let ctl = self.mem.ctl();
                let version = ctl.version.load(Ordering::Relaxed);
                let tail = ctl.log_tail.load(Ordering::Relaxed);
                return Ok(WriteGuard {
                    store: self,
                    token,
                    version: Cell::new(version),
                    tail: Cell::new(tail),
                });
            }
            spins = spins.wrapping_add(1);
            if spins < 64 {
                spin_hint();
            } else {
                if expired() {
                    return Err(StoreError::Busy);
                }
                #[cfg(not(knit_loom))]
                std::thread::sleep(std::time::Duration::from_micros(if spins < 256 {
                    0
                } else {
                    50
                }));
                #[cfg(knit_loom)]
                loom::thread::yield_now();
            }
        }
    }

    /// Starts following the log from now: records committed after this call (and possibly a
    /// few before, which `next` skips by version).
    pub fn follower(&self) -> Follower {
        // SYNC(log_tail): pairs with the writer's Release store.
        let tail = self.mem.ctl().log_tail.load(Ordering::Acquire);
        Follower {
            pos: tail,
            next_version: 0,
        }
    }
}

/// Exclusive right to write a store; released when dropped.
#[derive(Debug)]
pub struct WriteGuard<'a, M: StoreMemory> {
    store: &'a Store<M>,
    token: u64,
    /// The committed version and the log tail when the lock was taken (only lock holders
    /// change them).
    version: Cell<u64>,
    tail: Cell<u64>,
}

impl<M: StoreMemory> WriteGuard<'_, M> {
    /// The committed version (stable while we hold the lock).
    pub fn version(&self) -> u64 {
        self.version.get()
    }

    /// Reads the current snapshot (no race: only lock holders write).
    pub fn read(&self, out: &mut Vec<u8>) -> Result<SnapshotInfo, StoreError> {
        let v = self.version();
        if v == 0 {
            out.clear();
            return Ok(SnapshotInfo {
                version: 0,
                updater: 0,
            });
        }
        let buf = self.store.mem.buffer((v & 1) as usize);
        let len = buf[2].load(Ordering::Relaxed) as usize;
        if buf[0].load(Ordering::Relaxed) != v || len > self.store.snap_cap {
            return Err(StoreError::Corrupt(
                "snapshot buffer does not match the version",
            ));
        }
        load_bytes(&buf[BUFFER_HEADER_WORDS..], len, out);
        Ok(SnapshotInfo {
            version: v,
            updater: buf[1].load(Ordering::Relaxed),
        })
    }

    /// Publishes a new snapshot and its log record as version `version() + 1`. `payload` of
    /// `None`, or larger than the log allows, logs the record without payload (followers then
    /// resynchronise from the snapshot). Returns the new version.
    pub fn commit(
        &self,
        snapshot: &[u8],
        kind: u16,
        payload: Option<&[u8]>,
    ) -> Result<u64, StoreError> {
        let store = self.store;
        if snapshot.len() > store.snap_cap {
            return Err(StoreError::TooLarge {
                size: snapshot.len(),
                max: store.snap_cap,
            });
        }
        debug_assert!(kind != LOG_PAD);
        let ctl = store.mem.ctl();
        let v = self.version().wrapping_add(1);

        // 1. The free buffer, under its sequence word.
        let b = (v & 1) as usize;
        let buf = store.mem.buffer(b);
        let s = ctl.seq[b].seq.load(Ordering::Relaxed) | 1;
        ctl.seq[b].seq.store(s, Ordering::Relaxed);
        // SYNC(seq): the odd sequence is visible before any data store below.
        fence(Ordering::Release);
        buf[0].store(v, Ordering::Relaxed);
        buf[1].store(self.token, Ordering::Relaxed);
        buf[2].store(snapshot.len() as u64, Ordering::Relaxed);
        store_bytes(&buf[BUFFER_HEADER_WORDS..], snapshot);
        // SYNC(seq): the data is visible to a reader that sees the even sequence.
        ctl.seq[b].seq.store(s.wrapping_add(1), Ordering::Release);
        // 2. The log record at the tail (padding first if it would straddle the end).
        let payload = payload.filter(|p| p.len() <= store.max_log_payload());
        let (plen, flags) = match payload {
            Some(p) => (p.len(), 0u16),
            None => (0, 1u16),
        };
        let rec_words = (LOG_HEADER_WORDS + plen.div_ceil(8)) as u64;
        let log = store.mem.log();
        let mask = store.log_words - 1;
        let mut tail = self.tail.get();
        let room = store.log_words - (tail & mask);
        if room < rec_words {
            log[(tail & mask) as usize].store(
                pack_header(((room - 1) * 8) as u32, LOG_PAD, 0),
                Ordering::Relaxed,
            );
            // Wrapping: positions are compared by difference, and a hostile peer may have put
            // the tail anywhere.
            tail = tail.wrapping_add(room);
        }
        let at = (tail & mask) as usize;
        log[at].store(pack_header(plen as u32, kind, flags), Ordering::Relaxed);
        log[at + 1].store(v, Ordering::Relaxed);
        log[at + 2].store(self.token, Ordering::Relaxed);
        if let Some(p) = payload {
            store_bytes(&log[at + LOG_HEADER_WORDS..], p);
        }
        // 3. Commit: the version, then the log tail.
        // SYNC(version): buffer and log record are visible to whoever sees the new version.
        ctl.version.store(v, Ordering::Release);
        // SYNC(log_tail): the record is visible to followers that see the new tail.
        ctl.log_tail
            .store(tail.wrapping_add(rec_words), Ordering::Release);
        self.version.set(v);
        self.tail.set(tail.wrapping_add(rec_words));
        Ok(v)
    }
}

impl<M: StoreMemory> WriteGuard<'_, M> {
    /// Logs the current version again, without payload and under the updater recorded in its
    /// snapshot. For the gateway after it broke a dead writer's lock: that writer may have
    /// published its version and died before its log record, so followers would hear of the
    /// change only at the next write. Harmless otherwise: a follower that already has this
    /// version skips the record; one that does not resynchronises from the snapshot. Returns
    /// the version announced (0: nothing was ever written, nothing logged).
    pub fn reannounce(&self, kind: u16) -> u64 {
        let store = self.store;
        let v = self.version();
        if v == 0 {
            return 0;
        }
        debug_assert!(kind != LOG_PAD);
        let ctl = store.mem.ctl();
        // Relaxed: we hold the lock, which ordered the snapshot's writer before us.
        let updater = store.mem.buffer((v & 1) as usize)[1].load(Ordering::Relaxed);
        let log = store.mem.log();
        let mask = store.log_words - 1;
        let mut tail = self.tail.get();
        let room = store.log_words - (tail & mask);
        let rec_words = LOG_HEADER_WORDS as u64;
        if room < rec_words {
            log[(tail & mask) as usize].store(
                pack_header(((room - 1) * 8) as u32, LOG_PAD, 0),
                Ordering::Relaxed,
            );
            tail += room;
        }
        let at = (tail & mask) as usize;
        // Flag 1: no payload logged (take the data from the snapshot).
        log[at].store(pack_header(0, kind, 1), Ordering::Relaxed);
        log[at + 1].store(v, Ordering::Relaxed);
        log[at + 2].store(updater, Ordering::Relaxed);
        // SYNC(log_tail): the record is visible to followers that see the new tail.
        ctl.log_tail.store(tail + rec_words, Ordering::Release);
        self.tail.set(tail + rec_words);
        v
    }
}

impl<M: StoreMemory> Drop for WriteGuard<'_, M> {
    fn drop(&mut self) {
        // Release: our commit happens before the next holder's Acquire.
        let _ = self.store.mem.ctl().lock.compare_exchange(
            self.token,
            0,
            Ordering::Release,
            Ordering::Relaxed,
        );
    }
}

fn pack_header(len: u32, kind: u16, flags: u16) -> u64 {
    len as u64 | (kind as u64) << 32 | (flags as u64) << 48
}

/// What a follower found in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// The next version's record; its payload is in the caller's buffer. `payload_logged` is
    /// false when the delta was too large for the log (take the data from the snapshot).
    Record {
        kind: u16,
        version: u64,
        updater: u64,
        payload_logged: bool,
    },
    /// Records were lost to us (we were lapped, or a writer died between its commit and its
    /// log record): resynchronise from the snapshot.
    Gap,
}

/// A reader's position in the log.
#[derive(Debug, Clone)]
pub struct Follower {
    pos: u64,
    /// The version we expect next; 0 until the first record or `resync`.
    next_version: u64,
}

impl Follower {
    /// After reading a snapshot at `version`: deliver only records after it.
    pub fn resync(&mut self, version: u64) {
        self.next_version = version.wrapping_add(1);
    }

    /// Gives up on everything before `tail` after finding a corrupt record.
    fn skip_corrupt(&mut self, tail: u64, why: &'static str) -> StoreError {
        self.pos = tail;
        self.next_version = 0;
        StoreError::Corrupt(why)
    }

    /// Whether the log has records past our position.
    pub fn has_more<M: StoreMemory>(&self, store: &Store<M>) -> bool {
        // SYNC(log_tail): pairs with the writer's Release store.
        store.mem.ctl().log_tail.load(Ordering::Acquire) != self.pos
    }

    /// The next record, `Ok(None)` when caught up.
    ///
    /// A record that does not validate is `Err(Corrupt)`, and the follower moves past it to the
    /// end of the log (nothing before the tail can be trusted to line up any more), so the
    /// next call makes progress: the caller resynchronises from the snapshot, as after a
    /// [`LogEvent::Gap`]. A corrupt log never makes a follower loop.
    pub fn next<M: StoreMemory>(
        &mut self,
        store: &Store<M>,
        out: &mut Vec<u8>,
    ) -> Result<Option<LogEvent>, StoreError> {
        let log = store.mem.log();
        let lw = store.log_words;
        let mask = lw - 1;
        loop {
            // SYNC(log_tail): pairs with the writer's Release store: records before it are
            // complete.
            let tail = store.mem.ctl().log_tail.load(Ordering::Acquire);
            let behind = tail.wrapping_sub(self.pos);
            if behind == 0 {
                return Ok(None);
            }
            if behind > lw / 2 {
                // Too far behind to read safely: skip to now.
                self.pos = tail;
                self.next_version = 0;
                return Ok(Some(LogEvent::Gap));
            }
            let at = (self.pos & mask) as usize;
            let h = log[at].load(Ordering::Relaxed);
            let (len, kind, flags) = (h as u32 as usize, (h >> 32) as u16, (h >> 48) as u16);
            let room = lw - (self.pos & mask);
            if kind == LOG_PAD {
                if (len / 8) as u64 + 1 != room || room > behind {
                    return Err(self.skip_corrupt(tail, "log padding does not reach the end"));
                }
                self.pos = self.pos.wrapping_add(room);
                continue;
            }
            let rec = (LOG_HEADER_WORDS + len.div_ceil(8)) as u64;
            if len > store.max_log_payload() || rec > room || rec > behind {
                return Err(self.skip_corrupt(tail, "log record length out of range"));
            }
            let version = log[at + 1].load(Ordering::Relaxed);
            let updater = log[at + 2].load(Ordering::Relaxed);
            load_bytes(&log[at + LOG_HEADER_WORDS..at + rec as usize], len, out);
            // SYNC(log_tail): the loads above happen before this check; if a writer could
            // have started overwriting them, the tail shows it.
            fence(Ordering::Acquire);
            let now = store.mem.ctl().log_tail.load(Ordering::Relaxed);
            if now.wrapping_sub(self.pos) > lw / 2 {
                self.pos = now;
                self.next_version = 0;
                return Ok(Some(LogEvent::Gap));
            }
            self.pos = self.pos.wrapping_add(rec);
            if self.next_version != 0 && version < self.next_version {
                // Older than the snapshot we started from: already reflected.
                continue;
            }
            if self.next_version != 0 && version > self.next_version {
                self.next_version = 0;
                return Ok(Some(LogEvent::Gap));
            }
            self.next_version = version.wrapping_add(1);
            return Ok(Some(LogEvent::Record {
                kind,
                version,
                updater,
                payload_logged: flags & 1 == 0,
            }));
        }
    }
}

/// A store on the heap (tests, loom).
#[derive(Debug, Clone)]
pub struct HeapStore(std::sync::Arc<HeapInner>);

#[derive(Debug)]
struct HeapInner {
    ctl: StoreCtl,
    buffers: [Vec<AtomicU64>; 2],
    log: Vec<AtomicU64>,
}

impl HeapStore {
    /// A store with `snapshot` data bytes per buffer and `log_words` log words.
    pub fn new(snapshot: usize, log_words: usize) -> Self {
        let buf = || {
            (0..BUFFER_HEADER_WORDS + snapshot.div_ceil(8))
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        Self(std::sync::Arc::new(HeapInner {
            ctl: StoreCtl::new(),
            buffers: [buf(), buf()],
            log: (0..log_words).map(|_| AtomicU64::new(0)).collect(),
        }))
    }
}

impl HeapStore {
    /// Overwrites the store's words, as a hostile peer with a writable mapping could: the
    /// control words (lock, version, log tail, subscriber bound, both sequence words), then
    /// both buffers, then the log, as far as `words` goes. For tests and fuzz targets.
    #[doc(hidden)]
    pub fn scribble_for_test(&self, words: impl IntoIterator<Item = u64>) {
        let ctl = &self.0.ctl;
        let control = [
            &ctl.lock,
            &ctl.version,
            &ctl.log_tail,
            &ctl.seq[0].seq,
            &ctl.seq[1].seq,
        ];
        let mut words = words.into_iter();
        for (w, v) in control.into_iter().zip(words.by_ref()) {
            w.store(v, Ordering::Relaxed);
        }
        if let Some(v) = words.next() {
            ctl.sub_hi.store(v as u32, Ordering::Relaxed);
        }
        let regions = self.0.buffers[0]
            .iter()
            .chain(&self.0.buffers[1])
            .chain(&self.0.log);
        for (w, v) in regions.zip(words) {
            w.store(v, Ordering::Relaxed);
        }
    }

    /// The words [`scribble_for_test`](Self::scribble_for_test) writes, in the same order
    /// (seed images for the fuzz targets).
    #[doc(hidden)]
    pub fn image_for_test(&self) -> Vec<u64> {
        let ctl = &self.0.ctl;
        let mut out: Vec<u64> = [
            &ctl.lock,
            &ctl.version,
            &ctl.log_tail,
            &ctl.seq[0].seq,
            &ctl.seq[1].seq,
        ]
        .iter()
        .map(|w| w.load(Ordering::Relaxed))
        .collect();
        out.push(ctl.sub_hi.load(Ordering::Relaxed) as u64);
        let regions = self.0.buffers[0]
            .iter()
            .chain(&self.0.buffers[1])
            .chain(&self.0.log);
        out.extend(regions.map(|w| w.load(Ordering::Relaxed)));
        out
    }

    /// Sets the log tail (tests and fuzz targets).
    #[doc(hidden)]
    pub fn set_log_tail_for_test(&self, tail: u64) {
        self.0.ctl.log_tail.store(tail, Ordering::Relaxed);
    }
}

// SAFETY: fixed-size heap regions owned by the Arc, never resized; `new` sizes them per the
// contract (callers pass a power-of-two log of at least 64 words, checked by `Store::new`).
unsafe impl StoreMemory for HeapStore {
    fn ctl(&self) -> &StoreCtl {
        &self.0.ctl
    }
    fn buffer(&self, i: usize) -> &[AtomicU64] {
        &self.0.buffers[i & 1]
    }
    fn log(&self) -> &[AtomicU64] {
        &self.0.log
    }
}
