//! One lane as the client sees it: our ring to the peer (any thread may send, under a lock)
//! and the peer's ring to us (read only by the thread that holds the receive set).

use crate::ring::shm_memory::ShmRing;
use crate::ring::{Consumer, Producer, PushError, RingError};
use crate::shm::{DoorbellSegment, LaneSegment};
use crate::status::Status;
use crate::sync::SendLock;
use crate::wire::frame::{Instance, PeerId};
use crate::wire::record::{FRAG_CONT, FRAG_MORE};
use std::borrow::Cow;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a message could not be sent on a lane.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("lane to {0} is closed")]
    Closed(PeerId),
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("peer {0} is not reading (ring full past the deadline)")]
    Stalled(PeerId),
    #[error("lane to {0} is corrupt: {1}")]
    Corrupt(PeerId, &'static str),
    /// The message cannot be encoded (a value the receiver could not decode).
    #[error("invalid value: {0}")]
    Encode(#[from] crate::wire::codec::EncodeError),
}

impl SendError {
    pub(crate) fn status(&self) -> Status {
        match self {
            SendError::Closed(_) => Status::PeerLeft,
            SendError::TooLarge { .. } => Status::PayloadTooLarge,
            SendError::Stalled(_) => Status::Busy,
            SendError::Corrupt(..) => Status::Protocol,
            SendError::Encode(_) => Status::BadInput,
        }
    }
}

pub(crate) struct Lane {
    pub peer: PeerId,
    pub id: u64,
    pub identity: Arc<Instance>,
    tx: SendLock<Producer<ShmRing>>,
    /// The doorbell directory and the peer's index in it (validated at open).
    bells: DoorbellSegment,
    peer_doorbell: u32,
    closed: AtomicBool,
    /// Reading paused: a blocking stream subscriber's queue is full. Set and cleared by swaps,
    /// so each pause is counted once in `Shared::stalled_lanes` (SYNC(stalled)).
    pub stalled: AtomicBool,
    /// Largest message body (fixed header + payload) accepted in either direction.
    pub max_message: usize,
    /// Calls to the peer that were pending when it left (`Shared::drop_departed_lane`): their
    /// replies may still be in the ring, so they fail only once it is drained.
    pub orphans: Mutex<Orphans>,
}

/// Where the calls of a departed peer's lane stand (see [`Lane::orphans`]).
#[derive(Debug, Default)]
pub(crate) enum Orphans {
    /// The peer has not left (or left with no call pending).
    #[default]
    None,
    /// Left with these calls pending: the pumper fails those still pending once it drained the
    /// lane.
    Pending(Vec<u64>),
    /// The pumper drained the lane: calls found pending later fail at once.
    Drained,
}

/// The receiving half, owned by the receive set.
pub(crate) struct RxLane {
    pub lane: Arc<Lane>,
    pub consumer: Consumer<ShmRing>,
    /// Fragments of a message being reassembled.
    pub assembly: Reassembly,
    /// Bytes read since the lane was paused for a full blocking subscriber, to reach the reply
    /// to a call waiting behind the subscriber's items (`Shared::pump_lane`).
    pub past_stall: usize,
}

/// Puts fragmented messages back together (`wire::record`: `FRAG_MORE` on all fragments but
/// the last, `FRAG_CONT` on all but the first).
#[derive(Debug, Default)]
pub(crate) struct Reassembly {
    /// Kind and bytes so far of the message being reassembled, if any.
    partial: Option<(u16, Vec<u8>)>,
    /// Messages dropped because their sender gave up part-way.
    pub abandoned: u64,
}

impl Reassembly {
    /// Takes one record. Returns the message it completes (`None` while more fragments are due);
    /// an error is a protocol violation by the peer (a lane fault). A record that starts a
    /// message while another is incomplete drops the incomplete one: its sender gave up (ring
    /// full past its deadline) and will never send the rest.
    pub(crate) fn push<'a>(
        &mut self,
        kind: u16,
        flags: u16,
        body: &'a [u8],
        max_message: usize,
    ) -> Result<Option<Cow<'a, [u8]>>, &'static str> {
        if flags & FRAG_CONT == 0 {
            if self.partial.take().is_some() {
                self.abandoned += 1;
            }
            if flags & FRAG_MORE == 0 {
                return Ok(Some(Cow::Borrowed(body)));
            }
            if body.len() > max_message {
                return Err("message exceeds the payload limit");
            }
            self.partial = Some((kind, body.to_vec()));
            return Ok(None);
        }
        let Some((k, bytes)) = self.partial.as_mut() else {
            return Err("fragment continues no message");
        };
        if *k != kind {
            return Err("fragment kinds differ");
        }
        if bytes.len() + body.len() > max_message {
            return Err("message exceeds the payload limit");
        }
        bytes.extend_from_slice(body);
        if flags & FRAG_MORE != 0 {
            return Ok(None);
        }
        Ok(self.partial.take().map(|(_, whole)| Cow::Owned(whole)))
    }
}

impl Lane {
    /// Maps a lane segment received from the gateway.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        peer: PeerId,
        id: u64,
        side: u8,
        identity: Arc<Instance>,
        fds: &[OwnedFd],
        max_message: usize,
        bells: &DoorbellSegment,
        peer_doorbell: u32,
    ) -> Result<(Arc<Lane>, RxLane), String> {
        let [lane_fd] = fds else {
            return Err(format!(
                "lane frame carried {} descriptors, expected 1",
                fds.len()
            ));
        };
        if side > 1 {
            return Err(format!("lane side {side} out of range"));
        }
        let seg = LaneSegment::open(lane_fd).map_err(|e| e.to_string())?;
        if bells.doorbell(peer_doorbell).is_none() {
            return Err(format!("peer doorbell {peer_doorbell} out of range"));
        }
        let producer = seg.producer(side).map_err(|e| e.to_string())?;
        let consumer = seg.consumer(side).map_err(|e| e.to_string())?;
        let lane = Arc::new(Lane {
            peer,
            id,
            identity,
            tx: SendLock::new(producer),
            bells: bells.clone(),
            peer_doorbell,
            closed: AtomicBool::new(false),
            orphans: Mutex::new(Orphans::None),
            stalled: AtomicBool::new(false),
            max_message,
        });
        Ok((
            lane.clone(),
            RxLane {
                lane,
                consumer,
                assembly: Reassembly::default(),
                past_stall: 0,
            },
        ))
    }

    /// Wakes the peer if it sleeps.
    #[inline]
    fn ring_peer(&self) {
        if let Some(d) = self.bells.doorbell(self.peer_doorbell) {
            d.notify();
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        // SYNC(lane-closed): pairs with `close`; a stop flag, nothing else rides on it (the
        // pumper learns of closed lanes through SYNC(rx_dirty) in engine.rs).
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn close(&self) {
        // SYNC(lane-closed): senders and the pumper see the lane closed; nothing else rides on
        // the flag (the rings have their own SYNC(tail)/SYNC(head)).
        self.closed.store(true, Ordering::Release);
    }

    /// Closes the lane because the peer's side of the ring is corrupt (`why`); the error to
    /// return.
    fn fault(&self, why: &'static str) -> SendError {
        self.close();
        SendError::Corrupt(self.peer, why)
    }

    /// Whether a message of `len` bytes can ever be in the ring at once (else only a blocking
    /// [`Lane::send_many`], which waits for the peer to make room fragment by fragment, gets it
    /// across).
    pub(crate) fn fits_at_once(&self, len: usize) -> bool {
        let tx = self.tx.lock();
        let max = tx.max_payload();
        // The ring holds a little over two maximal records.
        len + len.div_ceil(max.max(1)) * 16 + max + 16 <= 2 * (max + 8)
    }

    /// Sends a message without waiting: `Ok(false)` when the ring has no room for all of it
    /// now, so the caller can apply its own policy.
    pub(crate) fn try_send(&self, kind: u16, body: &[u8]) -> Result<bool, SendError> {
        if self.is_closed() {
            return Err(SendError::Closed(self.peer));
        }
        let mut tx = self.tx.lock();
        let max = tx.max_payload();
        if body.len() > max {
            // Several records: send them only if they all fit now, so nothing waits and no
            // message is ever left half-sent. Each record costs at most its payload plus a
            // header rounded to 8, and one wrap may waste up to a whole record's room.
            if body.len() > self.max_message {
                return Ok(false);
            }
            let records = body.len().div_ceil(max);
            let need = body.len() + records * 16 + max + 16;
            let free = tx.free_bytes().map_err(|RingError(why)| self.fault(why))?;
            if free < need {
                self.ring_peer();
                return Ok(false);
            }
            let mut chunks = body.chunks(max).peekable();
            while let Some(chunk) = chunks.next() {
                let flags = if chunks.peek().is_some() {
                    FRAG_MORE
                } else {
                    0
                };
                match tx.push(kind, flags, chunk) {
                    Ok(()) => {}
                    Err(PushError::Corrupt(why)) => return Err(self.fault(why)),
                    // Room was checked above; the consumer only ever frees more.
                    Err(_) => return Err(SendError::Corrupt(self.peer, "internal: no room")),
                }
            }
            self.ring_peer();
            return Ok(true);
        }
        match tx.push(kind, 0, body) {
            Ok(()) => {
                self.ring_peer();
                Ok(true)
            }
            Err(PushError::Full) => {
                self.ring_peer();
                Ok(false)
            }
            Err(PushError::Corrupt(why)) => Err(self.fault(why)),
            Err(_) => Err(SendError::Corrupt(self.peer, "internal: bad record")),
        }
    }

    /// Sends messages (each fragmented if needed) under one lock and rings the peer's doorbell
    /// once at the end, and whenever the ring fills so the reader drains it. While the ring is
    /// full it calls `stall` (which lets the caller drain its own inbound rings, so two peers
    /// flooding each other cannot deadlock) and gives up `timeout` after it first found the
    /// ring full; the messages before the one that failed were sent.
    pub(crate) fn send_many<'b>(
        &self,
        kind: u16,
        bodies: impl Iterator<Item = &'b [u8]>,
        timeout: Duration,
        mut stall: impl FnMut(),
    ) -> Result<(), SendError> {
        if self.is_closed() {
            return Err(SendError::Closed(self.peer));
        }
        let mut tx = self.tx.lock();
        let mut patience = Patience {
            timeout,
            until: None,
        };
        let mut r = Ok(());
        for body in bodies {
            r = self.push_message(&mut tx, kind, body, &mut patience, &mut stall);
            if r.is_err() {
                break;
            }
        }
        self.ring_peer();
        r
    }

    /// Writes one message, in fragments when it is larger than a record.
    fn push_message(
        &self,
        tx: &mut Producer<ShmRing>,
        kind: u16,
        body: &[u8],
        patience: &mut Patience,
        stall: &mut impl FnMut(),
    ) -> Result<(), SendError> {
        if body.len() > self.max_message {
            return Err(SendError::TooLarge {
                size: body.len(),
                max: self.max_message,
            });
        }
        if body.is_empty() {
            return self.push_one(tx, kind, 0, &[], patience, stall);
        }
        let mut chunks = body.chunks(tx.max_payload()).peekable();
        let mut cont = 0;
        while let Some(chunk) = chunks.next() {
            let more = if chunks.peek().is_some() {
                FRAG_MORE
            } else {
                0
            };
            // Giving up part-way leaves an incomplete message in the ring; the receiver drops
            // it when the next message starts (a record without FRAG_CONT).
            self.push_one(tx, kind, more | cont, chunk, patience, stall)?;
            cont = FRAG_CONT;
        }
        Ok(())
    }

    /// Writes one record, waiting for room while the ring is full. The caller rings the peer
    /// once it has written what it has (here only while waiting).
    fn push_one(
        &self,
        tx: &mut Producer<ShmRing>,
        kind: u16,
        flags: u16,
        chunk: &[u8],
        patience: &mut Patience,
        stall: &mut impl FnMut(),
    ) -> Result<(), SendError> {
        let mut rounds = 0u32;
        loop {
            match tx.push(kind, flags, chunk) {
                Ok(()) => return Ok(()),
                Err(PushError::Full) => {
                    // Make sure the reader is awake (once), then let it catch up: spin first
                    // (it frees room in batches), drain our own inbound lanes now and then
                    // (two peers flooding each other must not deadlock), yield, then sleep.
                    if rounds == 0 {
                        patience.start();
                        self.ring_peer();
                    }
                    rounds = rounds.wrapping_add(1);
                    if rounds % 256 == 0 {
                        if self.is_closed() {
                            return Err(SendError::Closed(self.peer));
                        }
                        if patience.over() {
                            return Err(SendError::Stalled(self.peer));
                        }
                        self.ring_peer();
                        stall();
                    }
                    if rounds < 4096 {
                        std::hint::spin_loop();
                    } else if rounds < 8192 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                Err(PushError::Corrupt(why)) => return Err(self.fault(why)),
                Err(PushError::TooLarge { .. }) | Err(PushError::ReservedKind(_)) => {
                    // Chunks are at most `max_payload` and kinds come from `wire::record`.
                    return Err(SendError::Corrupt(self.peer, "internal: bad record"));
                }
            }
        }
    }
}

/// How long a send may wait while the ring is full: `timeout` from the first time it found the
/// ring full, so a send that finds room reads no clock.
struct Patience {
    timeout: Duration,
    until: Option<Instant>,
}

impl Patience {
    /// The ring is full: the wait starts now, unless it started earlier in this send.
    fn start(&mut self) {
        if self.until.is_none() {
            self.until = Some(crate::wait::deadline(self.timeout));
        }
    }

    fn over(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() >= u)
    }
}

/// Messages side by side in `body`, ending at `ends` (each end is the next one's start).
pub(crate) fn split_at<'a>(body: &'a [u8], ends: &'a [usize]) -> impl Iterator<Item = &'a [u8]> {
    ends.iter().scan(0, move |at, &end| {
        let b = &body[*at..end];
        *at = end;
        Some(b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::Instance;

    fn identity() -> Arc<Instance> {
        Arc::new(Instance {
            application: "t".into(),
            instance: "t".into(),
            pid: 0,
            user: "u".into(),
            machine: "m".into(),
            peer_id: PeerId(2),
        })
    }

    /// Both ends of one lane with 4 KiB rings (records of at most 2040 bytes).
    fn lane() -> ((Arc<Lane>, RxLane), (Arc<Lane>, RxLane)) {
        let fd = crate::shm::create_lane(4096).unwrap();
        let bells = DoorbellSegment::open(crate::shm::create_doorbells(4).unwrap()).unwrap();
        let fds = [fd];
        let a = Lane::open(PeerId(2), 1, 0, identity(), &fds, 1 << 20, &bells, 1).unwrap();
        let b = Lane::open(PeerId(1), 1, 1, identity(), &fds, 1 << 20, &bells, 0).unwrap();
        (a, b)
    }

    fn send(lane: &Lane, kind: u16, body: &[u8], timeout: Duration) -> Result<(), SendError> {
        lane.send_many(kind, std::iter::once(body), timeout, || {})
    }

    /// Every whole message `rx` can read now.
    fn receive(rx: &mut RxLane) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(h) = rx.consumer.pop_into(&mut buf).unwrap() {
            if let Some(m) = rx
                .assembly
                .push(h.kind, h.flags, &buf, rx.lane.max_message)
                .unwrap()
            {
                out.push((h.kind, m.into_owned()));
            }
        }
        rx.consumer.flush();
        out
    }

    #[test]
    fn a_message_abandoned_part_way_is_dropped_not_glued_to_the_next() {
        let ((a, _a_rx), (_b, mut b_rx)) = lane();
        // Three fragments; only two fit while the receiver does not read, and the deadline has
        // passed: the send gives up after committing two.
        let big = vec![7u8; 3 * 2040];
        let r = send(&a, 1, &big, Duration::ZERO);
        assert!(matches!(r, Err(SendError::Stalled(_))), "{r:?}");
        // The receiver sees the incomplete message, then the next one whole (before FRAG_CONT
        // the next message was appended to the incomplete one: a garbled message of the same
        // kind, or a lane fault for another kind).
        assert!(receive(&mut b_rx).is_empty());
        send(&a, 1, b"next", Duration::from_secs(5)).unwrap();
        assert_eq!(receive(&mut b_rx), vec![(1, b"next".to_vec())]);
        assert_eq!(b_rx.assembly.abandoned, 1);
        // A fragmented message after that arrives whole.
        let big: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let t = {
            let a = a.clone();
            let big = big.clone();
            std::thread::spawn(move || send(&a, 2, &big, Duration::from_secs(10)))
        };
        let mut got = Vec::new();
        while got.is_empty() {
            got = receive(&mut b_rx);
            std::thread::yield_now();
        }
        t.join().unwrap().unwrap();
        assert_eq!(got, vec![(2, big)]);
    }

    #[test]
    fn a_fragmented_send_over_a_corrupt_consumer_position_is_a_fault_not_a_full_ring() {
        let ((a, _a_rx), (_b, _b_rx)) = lane();
        {
            let tx = a.tx.lock();
            let ctl = crate::ring::RingMemory::ctl(tx.mem_for_test());
            // The peer claims to have read far more than was ever written.
            ctl.set_for_test(1 << 40, 0);
        }
        // Two fragments: room is checked for the whole message first.
        let r = a.try_send(1, &[7u8; 3000]);
        assert!(matches!(r, Err(SendError::Corrupt(..))), "{r:?}");
        assert!(a.is_closed());
    }

    #[test]
    fn fragments_that_continue_nothing_or_change_kind_are_faults() {
        let mut r = Reassembly::default();
        assert!(r.push(1, FRAG_CONT, b"x", 100).is_err());
        assert_eq!(r.push(1, FRAG_MORE, b"ab", 100), Ok(None));
        assert!(r.push(2, FRAG_CONT, b"cd", 100).is_err());
        let mut r = Reassembly::default();
        assert_eq!(r.push(1, FRAG_MORE, b"ab", 100), Ok(None));
        assert_eq!(r.push(1, FRAG_MORE | FRAG_CONT, b"cd", 100), Ok(None));
        assert_eq!(
            r.push(1, FRAG_CONT, b"ef", 100),
            Ok(Some(Cow::Owned(b"abcdef".to_vec())))
        );
        // The size limit counts the whole message.
        assert_eq!(r.push(1, FRAG_MORE, &[0; 60], 100), Ok(None));
        assert!(r.push(1, FRAG_CONT, &[0; 60], 100).is_err());
    }
}
