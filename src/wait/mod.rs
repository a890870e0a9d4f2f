//! Waiting for work without burning a core, and waking without a syscall when nobody sleeps.
//!
//! A [`Doorbell`] is two 32-bit words (`seq`, `sleepers`) that every writer into a consumer can
//! see: the consumer's own doorbell lives in a small shared segment handed to each peer that opens
//! a lane to it. It is an *eventcount*:
//!
//! * a writer commits its record, then calls [`Doorbell::notify`]: a SeqCst fence, then one
//!   load of `sleepers`; only when somebody sleeps does it bump `seq` and `FUTEX_WAKE`;
//! * a consumer out of work calls [`Doorbell::sleep_until`]: it announces itself in `sleepers`,
//!   fences, samples `seq`, re-checks its condition, and only then `FUTEX_WAIT`s on `seq`.
//!
//! The two fences make a Dekker pair: either the writer sees the sleeper, or the sleeper's
//! re-check sees the record. The loom model in `wait/loom_tests.rs` checks exactly that.
//!
//! Several threads may sleep on one doorbell (`sleepers` counts them, and a wake wakes all).
//! A peer that scribbles on the words can only cause spurious wake-ups or make us sleep until
//! the timeout every caller passes, never an unbounded hang.

#[cfg(all(test, knit_loom))]
mod loom_tests;

use crate::sync::{fence, futex, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The moment `after` from now, saturating: a caller's "wait forever" (`Duration::MAX`) is a
/// century, not an overflow panic.
pub(crate) fn deadline(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// The eventcount words. `#[repr(C)]`: this struct is part of the shared-memory format.
#[repr(C)]
#[derive(Debug)]
pub struct Doorbell {
    seq: AtomicU32,
    sleepers: AtomicU32,
}

impl Default for Doorbell {
    fn default() -> Self {
        Self::new()
    }
}

impl Doorbell {
    /// A doorbell nobody sleeps on.
    pub fn new() -> Self {
        Self {
            seq: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
        }
    }

    /// Makes a doorbell fit for a new owner (the gateway, before handing a freed slot to a new
    /// peer): a previous owner that died asleep left `sleepers` above zero, which would cost
    /// every notifier a futex syscall. Anyone still waiting on it is woken.
    pub fn reset(&self) {
        // Relaxed: the new owner learns of its slot through the gateway's socket, which orders
        // these stores before anything it does; the wake below covers leftover sleepers.
        self.sleepers.store(0, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Relaxed);
        futex::wake_all(&self.seq);
    }

    /// Call after publishing work the sleeper should see. No syscall unless somebody sleeps.
    #[inline]
    pub fn notify(&self) {
        // SYNC(doorbell): orders the caller's publication (e.g. a ring's tail) before our read of
        // `sleepers`; pairs with the fence in `sleep_until`.
        fence(Ordering::SeqCst);
        // Relaxed: the fence above provides the ordering that matters.
        if self.sleepers.load(Ordering::Relaxed) != 0 {
            self.wake();
        }
    }

    #[cold]
    fn wake(&self) {
        // SYNC(seq): Release so a sleeper that reads the new `seq` also sees the work.
        self.seq.fetch_add(1, Ordering::Release);
        futex::wake_all(&self.seq);
    }

    /// Sleeps until `ready()` holds, a notify happens, or `timeout` passes (never, with `None`).
    /// Returns `ready()`'s last value. Spurious returns are possible; callers loop.
    pub fn sleep_until(&self, mut ready: impl FnMut() -> bool, timeout: Option<Duration>) -> bool {
        if ready() {
            return true;
        }
        // Relaxed: the fence below orders it before the re-check.
        self.sleepers.fetch_add(1, Ordering::Relaxed);
        // SYNC(doorbell): pairs with the fence in `notify`.
        fence(Ordering::SeqCst);
        // SYNC(seq): pairs with the Release bump in `wake`.
        let seq = self.seq.load(Ordering::Acquire);
        if ready() {
            // Relaxed: nothing is published through the count; a notifier that still sees us
            // counted only makes one wake-up nobody needs.
            self.sleepers.fetch_sub(1, Ordering::Relaxed);
            return true;
        }
        futex::wait(&self.seq, seq, timeout);
        // Relaxed: as above; we are awake, so a notifier that misses us loses nothing.
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
        ready()
    }
}

/// How a thread waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Never sleep: lowest latency, one core spent per waiting thread.
    BusySpin,
    /// Spin for the given time, then sleep on the doorbell. The default, with 50 µs.
    SpinThenPark(Duration),
    /// Sleep at once: lowest CPU, a futex wake-up (tens of µs across cores) per message.
    Park,
}

impl Default for WaitStrategy {
    fn default() -> Self {
        WaitStrategy::SpinThenPark(Duration::from_micros(50))
    }
}

impl WaitStrategy {
    /// Parses `spin`, `park`, or `spin-then-park[:MICROS]`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "spin" | "busy-spin" => Some(Self::BusySpin),
            "park" => Some(Self::Park),
            "spin-then-park" => Some(Self::default()),
            _ => {
                let us = s.strip_prefix("spin-then-park:")?.parse().ok()?;
                Some(Self::SpinThenPark(Duration::from_micros(us)))
            }
        }
    }
}

/// One wait in progress: tells the caller whether to keep spinning or to sleep now.
#[derive(Debug)]
pub struct Backoff {
    strategy: WaitStrategy,
    started: Option<Instant>,
    spins: u32,
}

impl Backoff {
    /// Starts a wait.
    pub fn new(strategy: WaitStrategy) -> Self {
        Self {
            strategy,
            started: None,
            spins: 0,
        }
    }

    /// Called once per idle round. `true`: sleep now. `false`: spin once more (the call already
    /// issued the spin hint).
    #[inline]
    pub fn idle(&mut self) -> bool {
        match self.strategy {
            WaitStrategy::BusySpin => {
                crate::sync::spin_hint();
                false
            }
            WaitStrategy::Park => true,
            WaitStrategy::SpinThenPark(budget) => {
                self.spins = self.spins.wrapping_add(1);
                // Reading the clock costs ~20 ns; look at it every 64 rounds only.
                if self.spins % 64 == 1 {
                    let start = *self.started.get_or_insert_with(Instant::now);
                    if start.elapsed() >= budget {
                        return true;
                    }
                }
                crate::sync::spin_hint();
                false
            }
        }
    }

    /// Work arrived: the next idle round starts a fresh spin budget.
    #[inline]
    pub fn reset(&mut self) {
        self.started = None;
        self.spins = 0;
    }
}

#[cfg(all(test, not(knit_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn notify_without_sleepers_changes_nothing() {
        let d = Doorbell::new();
        d.notify();
        assert_eq!(d.seq.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn sleeper_wakes_on_notify() {
        let d = Arc::new(Doorbell::new());
        let flag = Arc::new(AtomicBool::new(false));
        let (d2, f2) = (d.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            // No timeout: only a notify can end this wait.
            while !d2.sleep_until(|| f2.load(Ordering::SeqCst), None) {}
        });
        // Wait until the sleeper is announced, then publish and ring.
        while d.sleepers.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        flag.store(true, Ordering::SeqCst);
        d.notify();
        t.join().unwrap();
    }

    #[test]
    fn sleep_times_out_when_nothing_happens() {
        let d = Doorbell::new();
        assert!(!d.sleep_until(|| false, Some(Duration::from_millis(5))));
        assert_eq!(d.sleepers.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn parse_strategies() {
        assert_eq!(WaitStrategy::parse("spin"), Some(WaitStrategy::BusySpin));
        assert_eq!(WaitStrategy::parse("park"), Some(WaitStrategy::Park));
        assert_eq!(
            WaitStrategy::parse("spin-then-park:10"),
            Some(WaitStrategy::SpinThenPark(Duration::from_micros(10)))
        );
        assert_eq!(WaitStrategy::parse("nope"), None);
    }

    #[test]
    fn backoff_spin_then_park_eventually_parks() {
        let mut b = Backoff::new(WaitStrategy::SpinThenPark(Duration::from_micros(1)));
        let start = Instant::now();
        while !b.idle() {
            assert!(start.elapsed() < Duration::from_secs(5));
        }
        let mut b = Backoff::new(WaitStrategy::BusySpin);
        assert!((0..10_000).all(|_| !b.idle()));
        assert!(Backoff::new(WaitStrategy::Park).idle());
    }
}
