//! The one place atomics come from.
//!
//! Production builds use `std`'s atomics, which are the same type whether they sit on the heap or
//! in a mapping another process shares. Under `--cfg knit_loom` the lock-free algorithms (the ring
//! and the doorbell) are compiled against loom's atomics instead, so the very same source is
//! model-checked. The futex is emulated with loom's mutex and condition variable: a lost wake-up
//! then shows up as a deadlock that loom reports.

mod send_lock;
// Lanes, its one user, are not built for the loom models; the lock's own model is.
#[cfg_attr(knit_loom, allow(unused_imports))]
pub(crate) use send_lock::SendLock;

#[cfg(not(knit_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(knit_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// A hint that the caller is spinning. Under loom it yields, so the model can make progress.
#[inline(always)]
pub(crate) fn spin_hint() {
    #[cfg(not(knit_loom))]
    std::hint::spin_loop();
    #[cfg(knit_loom)]
    loom::thread::yield_now();
}

#[cfg(not(knit_loom))]
pub(crate) mod futex {
    //! Process-shared futex wait and wake on a word that may live in shared memory.
    use super::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `*word == expected`, at most `timeout`. Spurious returns are allowed; the
    /// caller re-checks its condition.
    pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
        crate::sys::futex::wait(word, expected, timeout);
    }

    /// Wakes every thread (of any process) sleeping on `word`.
    pub(crate) fn wake_all(word: &AtomicU32) {
        crate::sys::futex::wake_all(word);
    }
}

#[cfg(knit_loom)]
pub(crate) mod futex {
    //! Futex emulation for loom: the check of the word and the sleep happen under one lock, and
    //! a wake takes the same lock, so this never loses a wake-up on its own. Timeouts are not
    //! modelled (loom has no time): a wait ends only with a wake, so a protocol that relies on a
    //! timeout to recover deadlocks under the model, which is the point.
    use super::{AtomicU32, Ordering};
    use loom::sync::{Condvar, Mutex};
    use std::time::Duration;

    loom::lazy_static! {
        static ref LOCK: Mutex<()> = Mutex::new(());
        static ref CV: Condvar = Condvar::new();
    }

    pub(crate) fn wait(word: &AtomicU32, expected: u32, _timeout: Option<Duration>) {
        let guard = LOCK.lock().unwrap();
        // SeqCst, though LOCK is what orders this: a waker changes the word before it takes LOCK,
        // so a wait that takes LOCK after it sees the change. Loom builds only.
        if word.load(Ordering::SeqCst) == expected {
            drop(CV.wait(guard).unwrap());
        }
    }

    pub(crate) fn wake_all(_word: &AtomicU32) {
        let _guard = LOCK.lock().unwrap();
        CV.notify_all();
    }
}
