//! Busy-polling the gateway's runtime for a short while after bridge traffic.
//!
//! A GW3 round trip through the gateway makes the gateway's thread wake twice (the request in,
//! the answer in). On these machines a thread asleep in `epoll_wait` costs tens of
//! microseconds to wake (DESIGN §1), a large share of a bridge hop. So after each frame the
//! bridge keeps the runtime polling its sockets without sleeping for `budget` (a task that
//! yields: the runtime then polls the I/O driver with a zero timeout instead of blocking), and
//! lets it sleep once traffic stops. A chatty web app keeps one core busy; an idle gateway costs
//! nothing. `budget` zero turns it off. Each round in which no frame arrived also offers the
//! core to the kernel (`sched_yield`): a web client woken on the gateway's core runs at once
//! instead of waiting for the spin to be preempted (on the 2-core VM: mean invoke round trip
//! −12 %, context propagation p50 −7 %). A round right after a frame does not, so the frame's
//! forwarding tasks, which may be queued behind this one, write it first (docs/benchmarks.md
//! §6.3).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct Spin {
    budget: Duration,
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last activity.
    last: AtomicU64,
    wake: Notify,
}

impl Spin {
    pub(crate) fn new(budget: Duration) -> Arc<Spin> {
        Arc::new(Spin {
            budget,
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            wake: Notify::new(),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Traffic happened: keep polling for a while.
    pub(crate) fn touch(&self) {
        if self.budget.is_zero() {
            return;
        }
        // Relaxed: a stale value only makes the spin end a little early or late.
        self.last.store(self.now(), Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Runs until the runtime ends: parks while idle, spins after traffic.
    pub(crate) async fn run(self: Arc<Self>) {
        if self.budget.is_zero() {
            return;
        }
        let budget = u64::try_from(self.budget.as_nanos()).unwrap_or(u64::MAX);
        loop {
            self.wake.notified().await;
            let mut seen = None;
            loop {
                // Relaxed: only a time stamp that decides how long to keep polling; a stale one
                // ends the spin a little early or late, and nothing else is read through it.
                let last = self.last.load(Ordering::Relaxed);
                if self.now().saturating_sub(last) >= budget {
                    break;
                }
                // The thread's core to any other runnable thread, unless a frame came in since
                // the last round: then the tasks that forward it may be queued behind this one,
                // and giving the core away now would hold the frame back until the kernel gives
                // it back.
                if seen == Some(last) {
                    std::thread::yield_now();
                }
                seen = Some(last);
                // The runtime's other tasks, then a zero-timeout poll of its sockets.
                tokio::task::yield_now().await;
            }
        }
    }
}
