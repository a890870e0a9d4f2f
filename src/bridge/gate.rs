//! Back-pressure from web subscribers to publishers (web ones, and native ones whose messages
//! the gateway relays to web peers).
//!
//! The registry hands each message to every subscriber's queue without waiting (it serves
//! everyone and must never block on one peer); a queue that overflows means a peer that does
//! not keep up, which is disconnected. A web publisher flooding the bus can outrun subscribers
//! that do read: all connections share the gateway's thread, and writing a message out to
//! several subscribers costs more than reading it in once. So while any web connection's
//! queue holds a backlog (a quarter of `queue_depth`), connections that publish stop reading
//! their sockets, until every backlog is down to a sixteenth. The publisher's own socket then
//! fills and its client waits: nothing is dropped, and readers are not cut off for a flood
//! they did read. A native peer whose bus messages or stream items the gateway relays (to web
//! subscribers) is held back the same way: the gateway stops reading its socket, and its
//! `publish` blocks until the web subscribers caught up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// How often a publisher held back by the gate looks again (the gate's wake-up is not kept
/// for a waiter that registers late).
pub(crate) const RECHECK: Duration = Duration::from_millis(5);

/// How many connections have a backlog, and a wake-up for when none has.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    congested: AtomicUsize,
    eased: Notify,
}

impl Gate {
    /// Whether publishers should wait.
    pub(crate) fn closed(&self) -> bool {
        // Relaxed: advisory. A stale value lets one more frame in, or leaves a publisher
        // waiting until its periodic re-check; the counter itself is exact (RMW operations).
        self.congested.load(Ordering::Relaxed) > 0
    }

    /// Resolves when the last backlog cleared (callers also re-check on a timer: a wake-up
    /// that happens before this is polled is not kept).
    pub(crate) async fn eased(&self) {
        self.eased.notified().await
    }

    /// Returns once the gate is open (at once if it is).
    pub(crate) async fn open(&self) {
        while self.closed() {
            tokio::select! {
                _ = self.eased() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// A connection reports its backlog (`backlog` of `depth`); `mark` is its state.
    pub(crate) fn observe(&self, mark: &mut bool, backlog: usize, depth: usize) {
        let high = (depth / 4).max(1);
        let low = depth / 16;
        if !*mark && backlog >= high {
            *mark = true;
            self.congested.fetch_add(1, Ordering::Relaxed);
        } else if *mark && backlog <= low {
            self.release(mark);
        }
    }

    /// A connection's backlog is gone (drained, or the connection ended).
    pub(crate) fn release(&self, mark: &mut bool) {
        if std::mem::replace(mark, false) && self.congested.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.eased.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_closes_the_gate_until_it_is_drained_below_a_sixteenth() {
        let g = Gate::default();
        let (mut a, mut b) = (false, false);
        g.observe(&mut a, 15, 64);
        assert!(!g.closed());
        g.observe(&mut a, 16, 64);
        g.observe(&mut b, 40, 64);
        assert!(g.closed() && a && b);
        // Between the marks nothing changes; a drained connection lets go of its share.
        g.observe(&mut a, 10, 64);
        assert!(a);
        g.observe(&mut a, 4, 64);
        assert!(!a && g.closed());
        // A connection that ends releases once; releasing again changes nothing.
        g.release(&mut b);
        g.release(&mut b);
        assert!(!g.closed());
        assert_eq!(g.congested.load(Ordering::Relaxed), 0);
    }
}
