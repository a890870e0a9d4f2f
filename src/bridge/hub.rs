//! What the bridge's connections share about the web peers behind them: the GW3 identity each
//! one logged in with, the method objects it registered (forwarded verbatim to other web peers,
//! as the reference gateway does), and whether it has joined the `agm` domain — GW3 announces a
//! peer to the others only once it has. The registry knows none of this; it sees web peers as
//! ordinary relay peers.
//!
//! Entries are keyed by the peer's user and instance id ([`key`]; the bridge chooses the
//! instance, or the client gives it) before the registry admits the peer, so another
//! connection that hears of the newcomer from the registry always finds its entry.

use crate::wire::frame::PeerId;
use serde_json::Value as J;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, Notify};

/// A bridge-internal notice for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HubEvent {
    /// A web peer (same user) joined `agm`: announce it.
    AgmJoined(PeerId),
    /// A web peer (same user) left `agm`: it is gone for GW3 purposes.
    AgmLeft(PeerId),
}

/// Ends a connection from outside its task, with a reason for the close frame.
#[derive(Debug, Default)]
pub(crate) struct Kill {
    notify: Notify,
    reason: Mutex<Option<(u16, String)>>,
}

impl Kill {
    /// Asks the connection to close with `code` and `reason` (the first request wins).
    pub(crate) fn kill(&self, code: u16, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some((code, reason.into()));
        }
        drop(r);
        self.notify.notify_one();
    }

    /// Resolves once [`Kill::kill`] was called; gives the code and reason.
    pub(crate) async fn killed(&self) -> (u16, String) {
        loop {
            if let Some(r) = self
                .reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return r;
            }
            self.notify.notified().await;
        }
    }
}

struct WebPeer {
    peer: Option<PeerId>,
    user: String,
    /// Shared with every connection that knows the peer (one copy however many there are: an
    /// identity or method object is as large as a client makes it).
    identity: Arc<J>,
    in_agm: bool,
    /// Registry method id → the method object exactly as the client registered it.
    methods: HashMap<u32, Arc<J>>,
    events: mpsc::Sender<HubEvent>,
    kill: Arc<Kill>,
}

/// The web peers of one bridge.
#[derive(Default)]
pub(crate) struct Hub {
    inner: Mutex<HashMap<String, WebPeer>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// A web peer's key in the hub: its user and its instance id (unique within the user's world,
/// as in the reference gateway; two users' apps may use the same instance id).
pub(crate) fn key(user: &str, instance: &str) -> String {
    format!("{}:{user}/{instance}", user.len())
}

/// Close code for a peer that cannot keep up (RFC 6455 1008, policy violation).
pub(crate) const CLOSE_SLOW: u16 = 1008;

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, WebPeer>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves the peer `key` ([`key`]) for a connection about to be admitted. False if a web peer already
    /// holds it.
    pub(crate) fn reserve(
        &self,
        key: &str,
        user: &str,
        identity: Arc<J>,
        events: mpsc::Sender<HubEvent>,
        kill: Arc<Kill>,
    ) -> bool {
        let mut m = self.lock();
        if m.contains_key(key) {
            return false;
        }
        m.insert(
            key.to_string(),
            WebPeer {
                peer: None,
                user: user.to_string(),
                identity,
                in_agm: false,
                methods: HashMap::new(),
                events,
                kill,
            },
        );
        true
    }

    /// Records the registry id the reserved key was admitted as.
    pub(crate) fn admitted(&self, key: &str, peer: PeerId) {
        if let Some(w) = self.lock().get_mut(key) {
            w.peer = Some(peer);
        }
    }

    /// Forgets a web peer (its connection ended or its admission failed).
    pub(crate) fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    /// The GW3 identity of the web peer with this key, if it is one.
    pub(crate) fn identity(&self, key: &str) -> Option<Arc<J>> {
        self.lock().get(key).map(|w| w.identity.clone())
    }

    /// Whether the web peer with this key has joined `agm` (false if unknown).
    pub(crate) fn in_agm(&self, key: &str) -> bool {
        self.lock().get(key).is_some_and(|w| w.in_agm)
    }

    /// Stores the method objects a web peer is registering.
    pub(crate) fn add_methods(&self, key: &str, methods: impl IntoIterator<Item = (u32, Arc<J>)>) {
        if let Some(w) = self.lock().get_mut(key) {
            w.methods.extend(methods);
        }
    }

    /// Drops method objects.
    pub(crate) fn remove_methods(&self, key: &str, ids: &[u32]) {
        if let Some(w) = self.lock().get_mut(key) {
            for id in ids {
                w.methods.remove(id);
            }
        }
    }

    /// The verbatim object of a web peer's method.
    pub(crate) fn method(&self, key: &str, id: u32) -> Option<Arc<J>> {
        self.lock()
            .get(key)
            .and_then(|w| w.methods.get(&id).cloned())
    }

    /// Marks a web peer in or out of `agm` and tells the other web peers of its user (their
    /// connections handle this news before the registry's notices, see `session.rs`). A
    /// connection whose notice queue is full is closed as a slow consumer, never skipped.
    pub(crate) fn set_agm(&self, key: &str, joined: bool) {
        let m = self.lock();
        let Some(me) = m.get(key) else {
            return;
        };
        let (Some(peer), user) = (me.peer, me.user.clone()) else {
            return;
        };
        drop(m);
        let mut m = self.lock();
        if let Some(me) = m.get_mut(key) {
            me.in_agm = joined;
        }
        let ev = if joined {
            HubEvent::AgmJoined(peer)
        } else {
            HubEvent::AgmLeft(peer)
        };
        for (inst, w) in m.iter() {
            if inst == key || w.user != user || w.peer.is_none() {
                continue;
            }
            if w.events.try_send(ev.clone()).is_err() {
                w.kill.kill(
                    CLOSE_SLOW,
                    "slow consumer: too many peer notices waiting to be sent",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn add(
        hub: &Hub,
        inst: &str,
        user: &str,
        peer: u64,
        depth: usize,
    ) -> (mpsc::Receiver<HubEvent>, Arc<Kill>) {
        let (tx, rx) = mpsc::channel(depth);
        let kill = Arc::new(Kill::default());
        let identity = Arc::new(json!({"application": inst}));
        assert!(hub.reserve(inst, user, identity, tx, kill.clone()));
        hub.admitted(inst, PeerId(peer));
        (rx, kill)
    }

    #[test]
    fn agm_membership_reaches_peers_of_the_same_user_only() {
        let hub = Hub::default();
        let (mut ra, _) = add(&hub, "a", "u", 1, 8);
        let (mut rb, _) = add(&hub, "b", "u", 2, 8);
        let (mut rc, _) = add(&hub, "c", "other", 3, 8);
        assert!(!hub.in_agm("a"));
        hub.set_agm("a", true);
        assert!(hub.in_agm("a"));
        assert_eq!(rb.try_recv().unwrap(), HubEvent::AgmJoined(PeerId(1)));
        assert!(ra.try_recv().is_err(), "no notice to itself");
        assert!(rc.try_recv().is_err(), "no notice across users");
        hub.set_agm("a", false);
        assert_eq!(rb.try_recv().unwrap(), HubEvent::AgmLeft(PeerId(1)));
    }

    #[test]
    fn an_instance_is_reserved_once_and_a_full_queue_kills_instead_of_dropping() {
        let hub = Hub::default();
        let (_ra, _) = add(&hub, "a", "u", 1, 8);
        let (tx, _rx) = mpsc::channel(1);
        let identity = Arc::new(json!({}));
        assert!(!hub.reserve("a", "u", identity, tx, Arc::new(Kill::default())));
        let (_rb, kb) = add(&hub, "b", "u", 2, 1);
        hub.set_agm("a", true);
        hub.set_agm("a", false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (code, reason) = rt.block_on(kb.killed());
        assert_eq!(code, CLOSE_SLOW);
        assert!(reason.contains("slow consumer"), "{reason}");
    }

    #[test]
    fn method_objects_are_kept_verbatim() {
        let hub = Hub::default();
        let (_ra, _) = add(&hub, "a", "u", 1, 8);
        hub.add_methods(
            "a",
            [(1, Arc::new(json!({"id": 7, "name": "M", "x": [1]})))],
        );
        assert_eq!(
            hub.method("a", 1).as_deref(),
            Some(&json!({"id": 7, "name": "M", "x": [1]}))
        );
        hub.remove_methods("a", &[1]);
        assert_eq!(hub.method("a", 1), None);
        hub.remove("a");
        assert_eq!(hub.identity("a"), None);
    }
}
