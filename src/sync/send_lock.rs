//! A lock for one end of a ring that several threads may write to.
//!
//! Not a `std` mutex, whose release is a locked exchange: a full barrier that makes the sender
//! wait until the record it has just written reaches the reader's cache (the reader polls those
//! very lines), which on a 2-core VM cost about one cross-core transfer per message
//! (docs/benchmarks.md §6.2). This lock is released with a plain Release store, so the sender
//! goes on while its stores drain; taking it is one compare-exchange. A holder keeps it only
//! while it writes or while the ring is full (bounded by the send deadline), so a waiter spins
//! briefly, then yields, then sleeps in short steps.

use super::{AtomicU32, Ordering};
use std::cell::UnsafeCell;

pub(crate) struct SendLock<T> {
    /// 0: free, 1: held.
    locked: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached only through a guard, and one guard exists at a time (`locked`,
// taken with an Acquire compare-exchange and released with a Release store), so the lock hands
// `T` from thread to thread one at a time: `T: Send` suffices.
unsafe impl<T: Send> Sync for SendLock<T> {}

/// Exclusive access to the value; released when dropped.
pub(crate) struct SendGuard<'a, T>(&'a SendLock<T>);

impl<T> SendLock<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            locked: AtomicU32::new(0),
            value: UnsafeCell::new(value),
        }
    }

    pub(crate) fn lock(&self) -> SendGuard<'_, T> {
        let mut spins = 0u32;
        loop {
            // SYNC(send-lock): Acquire pairs with the Release in `SendGuard::drop`: what the
            // previous holder wrote through its guard happens before what we do through ours.
            if self
                .locked
                .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return SendGuard(self);
            }
            // Relaxed: only a hint to try again; the compare-exchange above orders.
            while self.locked.load(Ordering::Relaxed) != 0 {
                spins = spins.saturating_add(1);
                wait_a_little(spins);
            }
        }
    }
}

#[cfg(not(knit_loom))]
fn wait_a_little(spins: u32) {
    if spins < 128 {
        std::hint::spin_loop();
    } else if spins < 1024 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(20));
    }
}

#[cfg(knit_loom)]
fn wait_a_little(_spins: u32) {
    loom::thread::yield_now();
}

impl<T> std::ops::Deref for SendGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (`SendLock::lock`), so nothing else touches the
        // value while it lives.
        unsafe { &*self.0.value.get() }
    }
}

impl<T> std::ops::DerefMut for SendGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.0.value.get() }
    }
}

impl<T> Drop for SendGuard<'_, T> {
    fn drop(&mut self) {
        // SYNC(send-lock): Release: our writes through the guard happen before the next
        // holder's Acquire. Also on unwinding: a ring is consistent at every step (nothing is
        // visible to its reader before commit).
        self.0.locked.store(0, Ordering::Release);
    }
}

#[cfg(all(test, knit_loom))]
mod loom_tests {
    use super::SendLock;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    /// Two threads take the lock and bump a counter held in a loom cell: loom fails the model on
    /// any access to the cell not ordered by the lock (so Acquire/Release must be enough), and
    /// the count shows that no increment was lost.
    #[test]
    fn loom_send_lock_excludes_and_orders() {
        loom::model(|| {
            let lock = Arc::new(SendLock::new(UnsafeCell::new(0u32)));
            let other = lock.clone();
            let t = loom::thread::spawn(move || {
                let g = other.lock();
                // SAFETY: the guard gives exclusive access to the cell.
                g.with_mut(|p| unsafe { *p += 1 });
            });
            {
                let g = lock.lock();
                // SAFETY: as above.
                g.with_mut(|p| unsafe { *p += 1 });
            }
            t.join().unwrap();
            let g = lock.lock();
            // SAFETY: as above; the other thread has finished.
            assert_eq!(g.with(|p| unsafe { *p }), 2);
        });
    }
}

#[cfg(all(test, not(knit_loom)))]
mod tests {
    use super::SendLock;
    use std::sync::Arc;

    #[test]
    fn threads_take_turns_and_lose_no_update() {
        let lock = Arc::new(SendLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *lock.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock.lock(), 40_000);
    }

    #[test]
    fn a_panic_while_holding_it_releases_it() {
        let lock = Arc::new(SendLock::new(1u32));
        let l2 = lock.clone();
        let r = std::thread::spawn(move || {
            let _g = l2.lock();
            panic!("holder dies");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(*lock.lock(), 1);
    }
}
