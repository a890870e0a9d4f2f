//! One lane as the client sees it: our ring to the peer (any thread may send, under a lock)
//! and the peer's ring to us (read only by the thread that holds the receive set).

use crate::ring::shm_memory::ShmRing;
use crate::ring::{Consumer, Producer, PushError};
use crate::shm::{DoorbellSegment, LaneSegment};
use crate::status::Status;
use crate::wire::frame::{Instance, PeerId};
use crate::wire::record::FRAG_MORE;
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
    tx: Mutex<Producer<ShmRing>>,
    /// The doorbell directory and the peer's index in it (validated at open).
    bells: DoorbellSegment,
    peer_doorbell: u32,
    closed: AtomicBool,
    /// Reading paused: a blocking stream subscriber's queue is full.
    pub stalled: AtomicBool,
    /// Largest message body (fixed header + payload) accepted in either direction.
    pub max_message: usize,
}

/// The receiving half, owned by the receive set.
pub(crate) struct RxLane {
    pub lane: Arc<Lane>,
    pub consumer: Consumer<ShmRing>,
    /// Fragments of a message being reassembled: its kind and bytes so far.
    pub assembly: Option<(u16, Vec<u8>)>,
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
            tx: Mutex::new(producer),
            bells: bells.clone(),
            peer_doorbell,
            closed: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            max_message,
        });
        Ok((
            lane.clone(),
            RxLane {
                lane,
                consumer,
                assembly: None,
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
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Sends a message that fits one record without waiting: `Ok(false)` when the ring is full
    /// (or the message needs fragments), so the caller can apply its own policy.
    pub(crate) fn try_send(&self, kind: u16, body: &[u8]) -> Result<bool, SendError> {
        if self.is_closed() {
            return Err(SendError::Closed(self.peer));
        }
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if body.len() > tx.max_payload() {
            return Ok(false);
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
            Err(PushError::Corrupt(why)) => {
                self.close();
                Err(SendError::Corrupt(self.peer, why))
            }
            Err(_) => Err(SendError::Corrupt(self.peer, "internal: bad record")),
        }
    }

    /// Sends one message (fragmenting it if needed) and rings the peer's doorbell. While the
    /// ring is full it calls `stall` (which lets the caller drain its own inbound rings, so two
    /// peers flooding each other cannot deadlock) and gives up after `deadline`.
    pub(crate) fn send(
        &self,
        kind: u16,
        body: &[u8],
        deadline: Instant,
        mut stall: impl FnMut(),
    ) -> Result<(), SendError> {
        if self.is_closed() {
            return Err(SendError::Closed(self.peer));
        }
        if body.len() > self.max_message {
            return Err(SendError::TooLarge {
                size: body.len(),
                max: self.max_message,
            });
        }
        // A poisoned lock only means another sender panicked mid-send; the ring itself is
        // consistent (nothing is published before commit).
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let max = tx.max_payload();
        let mut chunks = body.chunks(max).peekable();
        if body.is_empty() {
            return self.push_one(&mut tx, kind, 0, &[], deadline, &mut stall);
        }
        while let Some(chunk) = chunks.next() {
            let flags = if chunks.peek().is_some() {
                FRAG_MORE
            } else {
                0
            };
            self.push_one(&mut tx, kind, flags, chunk, deadline, &mut stall)?;
        }
        Ok(())
    }

    fn push_one(
        &self,
        tx: &mut Producer<ShmRing>,
        kind: u16,
        flags: u16,
        chunk: &[u8],
        deadline: Instant,
        stall: &mut impl FnMut(),
    ) -> Result<(), SendError> {
        let mut rounds = 0u32;
        loop {
            match tx.push(kind, flags, chunk) {
                Ok(()) => {
                    self.ring_peer();
                    return Ok(());
                }
                Err(PushError::Full) => {
                    // Make sure the reader is awake (once), then let it catch up: spin first
                    // (it frees room in batches), drain our own inbound lanes now and then
                    // (two peers flooding each other must not deadlock), yield, then sleep.
                    if rounds == 0 {
                        self.ring_peer();
                    }
                    rounds = rounds.wrapping_add(1);
                    if rounds % 256 == 0 {
                        if self.is_closed() {
                            return Err(SendError::Closed(self.peer));
                        }
                        if Instant::now() >= deadline {
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
                Err(PushError::Corrupt(why)) => {
                    self.close();
                    return Err(SendError::Corrupt(self.peer, why));
                }
                Err(PushError::TooLarge { .. }) | Err(PushError::ReservedKind(_)) => {
                    // Chunks are at most `max_payload` and kinds come from `wire::record`.
                    return Err(SendError::Corrupt(self.peer, "internal: bad record"));
                }
            }
        }
    }
}
