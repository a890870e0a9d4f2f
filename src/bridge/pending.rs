//! Connections that have not logged in yet have a budget of their own, smaller than
//! `max_connections`: when it is full, a new connection evicts the one that has waited longest.
//!
//! Without it, a local process opening sockets and never logging in could hold every slot (each
//! for the upgrade timeout or `hello_timeout`) and keep real clients out. With it, such a
//! process only ever holds `max_pending_logins` slots, and a real client, which logs in within
//! milliseconds, is evicted only if that many connections arrive while it logs in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The connections waiting to log in, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    waiting: BTreeMap<u64, Arc<Notify>>,
    evicted: u64,
    /// Connections open and not evicted (logged in or waiting): what `max_connections` bounds.
    live: usize,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Held only to insert or remove one entry; never across an await.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection; when `max` are already waiting, the oldest is told to go.
    /// The ticket leaves the budget when it is dropped (logged in, or the connection ended).
    pub(crate) fn admit(self: &Arc<Self>, max: usize) -> Ticket {
        let mut g = self.lock();
        let before = g.evicted;
        while g.waiting.len() >= max.max(1) {
            let Some((_, oldest)) = g.waiting.pop_first() else {
                break;
            };
            // `notify_one` keeps a permit when the connection is not waiting on it yet.
            oldest.notify_one();
            g.evicted += 1;
            // An evicted connection stops counting at once, though its task ends later.
            g.live -= 1;
        }
        let seq = g.next;
        g.next += 1;
        let go = Arc::new(Notify::new());
        g.waiting.insert(seq, go.clone());
        g.live += 1;
        let evicted = g.evicted;
        drop(g);
        // Logged at the 1st, 10th, 100th… eviction.
        if evicted > before && milestone(evicted) {
            crate::log::warn(format_args!(
                "bridge: evicted a connection that had not logged in ({evicted} so far): {}",
                reason(max)
            ));
        }
        Ticket {
            pending: self.clone(),
            seq,
            go,
            logged_in: false,
        }
    }

    /// Connections open and not evicted.
    pub(crate) fn live(&self) -> usize {
        self.lock().live
    }

    /// Connections waiting to log in.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Connections evicted so far.
    #[cfg(test)]
    pub(crate) fn evicted(&self) -> u64 {
        self.lock().evicted
    }
}

/// One connection's place: among those waiting to log in, then among the live ones.
#[derive(Debug)]
pub(crate) struct Ticket {
    pending: Arc<Pending>,
    seq: u64,
    go: Arc<Notify>,
    logged_in: bool,
}

impl Ticket {
    /// Resolves when the connection has been evicted (never once it has logged in).
    /// Cancel-safe.
    pub(crate) async fn evicted(&self) {
        self.go.notified().await;
    }

    /// Whether it still waits to log in (it has not, or it was evicted first).
    pub(crate) fn waiting(&self) -> bool {
        !self.logged_in
    }

    /// The connection logged in: it leaves the waiting ones (and can no longer be evicted).
    /// Returns false if it had been evicted already.
    pub(crate) fn logged_in(&mut self) -> bool {
        if self.logged_in {
            return true;
        }
        self.logged_in = self.pending.lock().waiting.remove(&self.seq).is_some();
        self.logged_in
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.pending.lock();
        // Still waiting, or logged in: it counted until now. Evicted: it stopped counting
        // when it was evicted.
        if g.waiting.remove(&self.seq).is_some() || self.logged_in {
            g.live -= 1;
        }
    }
}

/// Whether `n` is 1, 10, 100, … (the evictions worth a log line).
fn milestone(mut n: u64) -> bool {
    while n >= 10 && n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

/// The close reason of an evicted connection.
pub(crate) fn reason(max: usize) -> String {
    format!(
        "too many connections waiting to log in: this one waited longest ({max} at most, max_pending_logins)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_are_powers_of_ten() {
        let m: Vec<u64> = (0..2000).filter(|&n| milestone(n)).collect();
        assert_eq!(m, [1, 10, 100, 1000]);
    }

    #[tokio::test]
    async fn the_oldest_waiting_connection_is_evicted_and_a_logged_in_one_frees_its_place() {
        let p = Arc::new(Pending::default());
        let a = p.admit(2);
        let mut b = p.admit(2);
        assert_eq!((p.waiting(), p.live()), (2, 2));
        let c = p.admit(2);
        // `a` was told to go, even though it was not waiting on the notice yet, and stopped
        // counting at once.
        a.evicted().await;
        assert_eq!((p.evicted(), p.waiting(), p.live()), (1, 2, 2));
        // `b` logs in: its place among the waiting is free, so `d` evicts nobody; it still
        // counts as live until it ends.
        assert!(b.logged_in());
        let d = p.admit(2);
        assert_eq!((p.evicted(), p.waiting(), p.live()), (1, 2, 3));
        drop(b);
        assert_eq!(p.live(), 2);
        let poll = |t: &Ticket| {
            let f = t.evicted();
            futures_util::pin_mut!(f);
            let w = futures_util::task::noop_waker();
            f.poll(&mut std::task::Context::from_waker(&w)).is_ready()
        };
        use std::future::Future;
        assert!(!poll(&c) && !poll(&d));
        // Dropping an evicted ticket removes nothing else; an evicted one cannot log in.
        let mut a = a;
        assert!(!a.logged_in());
        drop(a);
        assert_eq!((p.waiting(), p.live()), (2, 2));
        drop((c, d));
        assert_eq!((p.waiting(), p.live()), (0, 0));
    }
}
