//! Gates: "when close/unregister returns, the callback is not running and will not run again".
//!
//! Every registration that calls into the app (a method handler, a context, bus or stream
//! subscription, a stream's request callback, a discovery-event callback) owns a [`Gate`]. Each
//! callback runs inside [`Gate::enter`]; closing the registration calls
//! [`Gate::close_and_wait`], which returns once no callback is running, except one on the
//! closing thread itself (a callback that closes its own registration cannot wait for itself).

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

thread_local! {
    /// The gates whose callbacks this thread is inside (nested calls stack up).
    static INSIDE: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Counts the running callbacks of one registration (a method, a subscription, a stream), and closes: after
/// [`Gate::close_and_wait`] no callback starts, and none is running except on the calling
/// thread itself.
pub(crate) struct Gate {
    open: AtomicBool,
    running: AtomicUsize,
    lock: Mutex<()>,
    idle: Condvar,
}

/// A running callback; dropping it marks it finished.
pub(crate) struct Inside<'a>(&'a Gate);

impl Gate {
    pub(crate) fn new() -> Self {
        Self {
            open: AtomicBool::new(true),
            running: AtomicUsize::new(0),
            lock: Mutex::new(()),
            idle: Condvar::new(),
        }
    }

    fn key(&self) -> usize {
        self as *const Gate as usize
    }

    /// Marks a callback as running; `None` once the gate is closed (then skip the callback).
    pub(crate) fn enter(&self) -> Option<Inside<'_>> {
        // SYNC(gate): SeqCst pair with `close_and_wait`: either we see the gate closed, or
        // the closer sees us running.
        self.running.fetch_add(1, Ordering::SeqCst);
        if !self.open.load(Ordering::SeqCst) {
            self.exit();
            return None;
        }
        let _ = INSIDE.try_with(|v| v.borrow_mut().push(self.key()));
        Some(Inside(self))
    }

    fn exit(&self) {
        // SYNC(gate): see `enter`.
        self.running.fetch_sub(1, Ordering::SeqCst);
        if !self.open.load(Ordering::SeqCst) {
            // Taking the lock orders this wake after the closer's check (no lost wake-up).
            let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.idle.notify_all();
        }
    }

    pub(crate) fn close_and_wait(&self) {
        // SYNC(gate): see `enter`.
        self.open.store(false, Ordering::SeqCst);
        let mine = INSIDE
            .try_with(|v| v.borrow().iter().filter(|&&k| k == self.key()).count())
            .unwrap_or(0);
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        while self.running.load(Ordering::SeqCst) > mine {
            g = self.idle.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        let _ = INSIDE.try_with(|v| v.borrow_mut().pop());
        self.0.exit();
    }
}

/// The app's `user_data`, handed back to its callbacks untouched.
#[derive(Clone, Copy)]
pub(crate) struct UserData(pub(crate) *mut c_void);

// SAFETY: knit never dereferences `user_data`; it only passes it back to the app's own
// callback, on knit's threads, which the contract (ffi/README.md) tells the app about.
unsafe impl Send for UserData {}
// SAFETY: as above.
unsafe impl Sync for UserData {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_gate_waits_for_running_callbacks_but_not_for_its_own_thread() {
        let g = Arc::new(Gate::new());
        {
            let _in = g.enter().unwrap();
            // Closing from inside the callback itself must not deadlock.
            g.close_and_wait();
        }
        assert!(g.enter().is_none(), "closed: no callback starts");

        let g = Arc::new(Gate::new());
        let left = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (g2, left2) = (g.clone(), left.clone());
        let t = std::thread::spawn(move || {
            let _in = g2.enter().unwrap();
            tx.send(()).unwrap();
            done_rx.recv().unwrap();
            left2.store(true, Ordering::SeqCst);
        });
        rx.recv().unwrap();
        let closer = {
            let (g, left) = (g.clone(), left.clone());
            std::thread::spawn(move || {
                g.close_and_wait();
                left.load(Ordering::SeqCst)
            })
        };
        assert!(!closer.is_finished(), "close returned while a callback ran");
        done_tx.send(()).unwrap();
        assert!(
            closer.join().unwrap(),
            "close returned before the callback left"
        );
        t.join().unwrap();
        assert_eq!(g.running.load(Ordering::SeqCst), 0);
    }
}
