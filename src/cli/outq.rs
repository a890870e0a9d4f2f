//! The hand-over from a subscription's callback (the client's dispatch thread) to the thread
//! that prints (`sub`, `ctx watch`, `stream sub`): bounded in lines and in bytes, so a reader
//! that does not keep up (`knit sub flood | sleep 40`) makes the callback wait, and the
//! library's own slow-consumer handling applies (a bus publisher waits, then gets BUSY; context
//! updates are conflated; a stream's policy blocks, drops or conflates) instead of this process
//! buffering without limit.
//!
//! Dropping the [`Receiver`] (the printing loop ended: `--count` reached, an error) releases a
//! waiting callback at once, so nothing that stops a subscription can wait for a callback stuck
//! here. Dropping the [`Sender`] (the library dropped the callback) ends the receiving side.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Lines held for the printer at most.
pub(crate) const MAX_LINES: usize = 4096;
/// Bytes of lines held for the printer at most (one line is always let through, whatever its
/// size: the gateway bounds a message to its payload limit).
pub(crate) const MAX_BYTES: usize = 4 << 20;

struct State<T> {
    items: VecDeque<(T, usize)>,
    bytes: usize,
    sender_gone: bool,
    receiver_gone: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled when an item arrives or the sender goes.
    ready: Condvar,
    /// Signalled when room is made or the receiver goes.
    room: Condvar,
    max_lines: usize,
    max_bytes: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct Sender<T>(Arc<Shared<T>>);
pub(crate) struct Receiver<T>(Arc<Shared<T>>);

/// Why [`Receiver::recv_timeout`] returned nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecvError {
    Timeout,
    /// The sender is gone and everything it sent was received.
    Disconnected,
}

pub(crate) fn bounded<T>(max_lines: usize, max_bytes: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            bytes: 0,
            sender_gone: false,
            receiver_gone: false,
        }),
        ready: Condvar::new(),
        room: Condvar::new(),
        max_lines: max_lines.max(1),
        max_bytes,
    });
    (Sender(shared.clone()), Receiver(shared))
}

/// With the CLI's bounds.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    bounded(MAX_LINES, MAX_BYTES)
}

impl<T> Sender<T> {
    /// Queues `item` (weighing `bytes`), waiting for room as long as the receiver is there.
    /// `Err(item)` when the receiver is gone.
    pub(crate) fn send(&self, item: T, bytes: usize) -> Result<(), T> {
        let sh = &self.0;
        let mut st = sh.lock();
        while !st.receiver_gone
            && !st.items.is_empty()
            && (st.items.len() >= sh.max_lines || st.bytes.saturating_add(bytes) > sh.max_bytes)
        {
            st = sh.room.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.receiver_gone {
            return Err(item);
        }
        st.bytes += bytes;
        st.items.push_back((item, bytes));
        drop(st);
        sh.ready.notify_one();
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.0.lock().sender_gone = true;
        self.0.ready.notify_all();
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting up to `timeout` for one.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvError> {
        let sh = &self.0;
        let deadline = Instant::now().checked_add(timeout);
        let mut st = sh.lock();
        loop {
            if let Some((item, bytes)) = st.items.pop_front() {
                st.bytes -= bytes;
                drop(st);
                sh.room.notify_one();
                return Ok(item);
            }
            if st.sender_gone {
                return Err(RecvError::Disconnected);
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                return Err(RecvError::Timeout);
            }
            st = sh
                .ready
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut st = self.0.lock();
            st.receiver_gone = true;
            st.bytes = 0;
            std::mem::take(&mut st.items)
        };
        self.0.room.notify_all();
        // Outside the lock: what the items own is freed without holding up a sender.
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_holds_the_sender_until_the_receiver_takes_or_goes() {
        let (tx, rx) = bounded::<u32>(2, 100);
        tx.send(1, 10).unwrap();
        tx.send(2, 10).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let r = tx.send(3, 10);
            done_tx.send(()).unwrap();
            // Waits for room again (one taken below makes room for this one only).
            let r2 = tx.send(4, 10);
            (r, r2)
        });
        assert_eq!(rx.recv_timeout(Duration::ZERO), Ok(1));
        done_rx.recv().unwrap();
        drop(rx);
        let (r, r2) = t.join().unwrap();
        assert_eq!(r, Ok(()));
        assert_eq!(
            r2,
            Err(4),
            "a receiver that went releases the waiting sender"
        );
    }

    #[test]
    fn bytes_bound_the_queue_but_one_item_always_passes() {
        let (tx, rx) = bounded::<u32>(100, 10);
        tx.send(1, 1000).unwrap();
        let t = std::thread::spawn(move || tx.send(2, 1));
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(1));
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(2));
        assert_eq!(t.join().unwrap(), Ok(()));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)),
            Err(RecvError::Disconnected)
        );
    }

    #[test]
    fn an_empty_queue_times_out() {
        let (_tx, rx) = bounded::<u32>(1, 1);
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(1)),
            Err(RecvError::Timeout)
        );
    }
}
