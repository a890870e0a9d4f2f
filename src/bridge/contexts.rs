//! Shared contexts for web peers. Web peers have no shared memory, so the bridge (inside the
//! gateway process) maps each context segment its peers use and does for them what a native
//! client does for itself:
//!
//! * **Writes** go through the same store path as native writes
//!   ([`crate::store::context::write_noted`]) with the web peer's id as the lock token (so the
//!   gateway breaks its lock if it dies), and ring the doorbells of native subscribers. The
//!   web writer's GW3 delta is noted in the log record, so other web subscribers get it
//!   verbatim, as the reference gateway forwards it.
//! * **Updates** reach web subscribers by following each context's delta log — one follower per
//!   context, however many web peers subscribe — and become `context-updated` frames with the
//!   delta a GW3 client applies to the same effect (see `delta.rs`), or `reset` with the snapshot
//!   when the follower was lapped.
//!
//! Native writers ring the doorbells in a context's subscriber table; for web subscribers the
//! gateway puts the bridge's own doorbell there. A waker thread sleeps on that doorbell (an
//! eventcount: native writers make a syscall only when it sleeps) and wakes the pump task on
//! the gateway's runtime, which reads the logs. Writes from web peers pump inline, on the
//! writer's task: a web → web update costs no thread hop at all.

use super::Outbox;
use crate::model::context::ContextOp;
use crate::shm::{ContextSegment, DoorbellSegment};
use crate::store::context::KIND_OP;
use crate::store::{Follower, LogEvent, Store};
use crate::wire::frame::PeerId;
use crate::wire::{codec, Value};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// The log key under which a web writer's GW3 delta travels beside the op.
pub(crate) const GW3_NOTE: &str = "gw3";

/// How often the waker looks at the logs even when nobody rang (a doorbell word a peer
/// scribbled on can cost at most this much latency, never an update).
const WAKER_TICK: Duration = Duration::from_millis(100);

type CtxStore = Store<ContextSegment>;
/// A decoded value at a version.
type Cached = Option<(u64, Arc<Value>)>;

/// A web peer following a context.
struct Sub {
    peer: PeerId,
    /// Versions up to this one are in what it was sent when it subscribed.
    start: u64,
    out: Arc<Outbox>,
}

struct Ctx {
    store: Arc<CtxStore>,
    /// Whether our mapping is writable (some peer of ours may write).
    writable: bool,
    follower: Follower,
    subs: Vec<Sub>,
    /// The last decoded value (saves decoding the snapshot on every web write).
    cache: Cached,
    buf: Vec<u8>,
}

/// What the waker watches: each followed context's log position as last seen.
struct Watched {
    id: u64,
    store: Arc<CtxStore>,
    seen: u64,
}

#[derive(Default)]
struct Watch {
    list: Mutex<Vec<Watched>>,
    changed: Notify,
    stop: AtomicBool,
}

impl Watch {
    fn list(&self) -> MutexGuard<'_, Vec<Watched>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a context cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CtxError {
    #[error("context segment: {0}")]
    Segment(String),
    #[error("context {0} is not mapped")]
    NotMapped(u64),
    #[error("context data: {0}")]
    Data(String),
}

/// The bridge's contexts.
pub(crate) struct Contexts {
    node: String,
    state: Mutex<HashMap<u64, Ctx>>,
    /// Our doorbell and the directory (natives' doorbells, rung after web writes).
    bells: Option<(u32, DoorbellSegment)>,
    watch: Arc<Watch>,
}

impl std::fmt::Debug for Contexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contexts").finish_non_exhaustive()
    }
}

/// `c-<node>-<id>`: a context's GW3 id.
pub(crate) fn gw3_id(node: &str, id: u64) -> String {
    format!("c-{node}-{id}")
}

fn decode_map(bytes: &[u8]) -> Result<Value, CtxError> {
    if bytes.is_empty() {
        return Ok(Value::map());
    }
    match codec::decode(bytes) {
        Ok(v @ Value::Map(_)) => Ok(v),
        Ok(_) => Err(CtxError::Data("snapshot is not an object".into())),
        Err(e) => Err(CtxError::Data(e.to_string())),
    }
}

impl Contexts {
    /// `bell`: the doorbell the gateway reserved for us and the directory it lives in.
    pub(crate) fn new(node: String, bell: Option<(u32, Arc<OwnedFd>)>) -> Arc<Contexts> {
        let bells = bell.and_then(|(i, fd)| match DoorbellSegment::open(&*fd) {
            Ok(dir) if dir.doorbell(i).is_some() => Some((i, dir)),
            Ok(_) => None,
            Err(e) => {
                crate::log::warn(format_args!("bridge: doorbell directory: {e}"));
                None
            }
        });
        Arc::new(Contexts {
            node,
            state: Mutex::new(HashMap::new()),
            bells,
            watch: Arc::new(Watch::default()),
        })
    }

    /// Starts the waker thread and the pump task (on the current runtime).
    pub(crate) fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let watch = self.watch.clone();
        let bells = self.bells.clone();
        std::thread::Builder::new()
            .name("knit-bridge-ctx".into())
            .spawn(move || waker(watch, bells))?;
        let me = self.clone();
        tokio::spawn(async move {
            // SYNC(stop): pairs with the Release store in `stop`; the flag carries no data, the
            // pairing only makes `stop`'s caller's earlier writes visible to the ending loop.
            while !me.watch.stop.load(Ordering::Acquire) {
                me.watch.changed.notified().await;
                me.pump_all();
            }
        });
        Ok(())
    }

    /// Stops the waker and the pump.
    pub(crate) fn stop(&self) {
        // SYNC(stop): pairs with the Acquire loads in the pump and the waker. The doorbell's
        // fences (in `notify` below and `sleep_until`) keep a sleeping waker from missing it.
        self.watch.stop.store(true, Ordering::Release);
        self.watch.changed.notify_one();
        if let Some((i, dir)) = &self.bells {
            if let Some(d) = dir.doorbell(*i) {
                d.notify();
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Ctx>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps context `id` from a descriptor the gateway sent (kept until the context goes; a
    /// read-only mapping is replaced by a writable one when one arrives).
    pub(crate) fn map(&self, id: u64, fd: &OwnedFd, writable: bool) -> Result<(), CtxError> {
        let mut st = self.lock();
        if st.get(&id).is_some_and(|c| c.writable || !writable) {
            return Ok(());
        }
        let seg = if writable {
            ContextSegment::open(fd)
        } else {
            ContextSegment::open_readonly(fd)
        }
        .map_err(|e| CtxError::Segment(e.to_string()))?;
        let store = Arc::new(Store::new(seg).map_err(|e| CtxError::Segment(e.to_string()))?);
        match st.get_mut(&id) {
            Some(c) => {
                // Same shared log: the follower's position stays valid.
                c.store = store.clone();
                c.writable = true;
                for w in self.watch.list().iter_mut().filter(|w| w.id == id) {
                    w.store = store.clone();
                }
            }
            None => {
                st.insert(
                    id,
                    Ctx {
                        follower: store.follower(),
                        store,
                        writable,
                        subs: Vec::new(),
                        cache: None,
                        buf: Vec::new(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Whether context `id` is mapped.
    pub(crate) fn is_mapped(&self, id: u64) -> bool {
        self.lock().contains_key(&id)
    }

    /// `peer` follows context `id` from now; returns the value it starts from.
    pub(crate) fn follow(
        &self,
        id: u64,
        peer: PeerId,
        out: Arc<Outbox>,
    ) -> Result<Value, CtxError> {
        let mut st = self.lock();
        let c = st.get_mut(&id).ok_or(CtxError::NotMapped(id))?;
        // Pending records first: they were meant for the subscribers already there.
        if !c.subs.is_empty() {
            self.pump_ctx(id, c, None);
        }
        let fresh = c.subs.is_empty();
        if fresh {
            c.follower = c.store.follower();
        }
        let info = c
            .store
            .read(&mut c.buf)
            .map_err(|e| CtxError::Data(e.to_string()))?;
        let data = decode_map(&c.buf)?;
        if c.cache.as_ref().is_none_or(|(v, _)| *v < info.version) {
            c.cache = Some((info.version, Arc::new(data.clone())));
        }
        if fresh {
            c.follower.resync(info.version);
            let store = c.store.clone();
            let seen = store.ctl().log_position();
            let mut w = self.watch.list();
            if !w.iter().any(|w| w.id == id) {
                w.push(Watched { id, store, seen });
            }
        }
        c.subs.retain(|s| s.peer != peer);
        c.subs.push(Sub {
            peer,
            start: info.version,
            out,
        });
        Ok(data)
    }

    /// `peer` stops following context `id`.
    pub(crate) fn unfollow(&self, id: u64, peer: PeerId) {
        let mut st = self.lock();
        if let Some(c) = st.get_mut(&id) {
            c.subs.retain(|s| s.peer != peer);
            if c.subs.is_empty() {
                self.watch.list().retain(|w| w.id != id);
            }
        }
    }

    /// A web peer is gone: it follows nothing any more.
    pub(crate) fn forget_peer(&self, peer: PeerId) {
        let mut st = self.lock();
        for (id, c) in st.iter_mut() {
            let before = c.subs.len();
            c.subs.retain(|s| s.peer != peer);
            if before != c.subs.len() && c.subs.is_empty() {
                self.watch.list().retain(|w| w.id != *id);
            }
        }
    }

    /// Forgets every mapped context the gateway has destroyed (its segment is marked retired,
    /// `StoreCtl::retire`): a connection forgets a context when it hears it destroyed, but one
    /// destroyed when no web peer of its user was left to hear it (an ownership context going
    /// with its last peer) would otherwise stay mapped for good.
    pub(crate) fn sweep_retired(&self) {
        let mut st = self.lock();
        let before = st.len();
        st.retain(|_, c| !c.store.ctl().is_retired());
        if st.len() != before {
            // The list under the map's lock, as `unfollow` takes them.
            self.watch.list().retain(|w| st.contains_key(&w.id));
        }
    }

    /// Context `id` was destroyed.
    pub(crate) fn forget(&self, id: u64) {
        self.lock().remove(&id);
        self.watch.list().retain(|w| w.id != id);
    }

    /// What a writer needs: the store and the cached value (taken: given back by
    /// [`Contexts::written`]). `None` when not mapped writable.
    pub(crate) fn writer(&self, id: u64) -> Option<(Arc<CtxStore>, Cached)> {
        let mut st = self.lock();
        let c = st.get_mut(&id).filter(|c| c.writable)?;
        Some((c.store.clone(), c.cache.take()))
    }

    /// A web peer wrote context `id` (now at `version`, holding `data`, with the GW3 delta
    /// `note`): native subscribers are woken and web subscribers told.
    pub(crate) fn written(
        &self,
        id: u64,
        version: u64,
        changed: bool,
        data: Arc<Value>,
        note: &str,
    ) {
        let mut st = self.lock();
        let Some(c) = st.get_mut(&id) else { return };
        if c.cache.as_ref().is_none_or(|(v, _)| *v <= version) {
            c.cache = Some((version, data));
        }
        if !changed {
            return;
        }
        if let Some((mine, dir)) = &self.bells {
            c.store.ctl().for_each_subscriber(|i| {
                if i != *mine {
                    if let Some(d) = dir.doorbell(i) {
                        d.notify();
                    }
                }
            });
        }
        self.pump_ctx(id, c, Some((version, note)));
    }

    /// Reads every followed log (the waker saw something move).
    pub(crate) fn pump_all(&self) {
        let mut st = self.lock();
        for (id, c) in st.iter_mut() {
            if !c.subs.is_empty() && c.follower.has_more(&c.store) {
                self.pump_ctx(*id, c, None);
            }
        }
    }

    /// Sends what the log of one context holds past our position to its web subscribers.
    /// `noted`: the version a web peer just wrote and its GW3 delta, for when the record was
    /// too large for the log (web subscribers then still get the writer's delta verbatim, as
    /// the reference gateway forwards it whatever its size).
    fn pump_ctx(&self, id: u64, c: &mut Ctx, noted: Option<(u64, &str)>) {
        if c.subs.is_empty() {
            return;
        }
        loop {
            match c.follower.next(&c.store, &mut c.buf) {
                Ok(None) => break,
                Ok(Some(LogEvent::Record {
                    kind: KIND_OP,
                    version,
                    updater,
                    payload_logged: true,
                })) => match delta_text(&c.buf, version, &mut c.cache) {
                    Some(delta) => self.emit(id, c, version, updater, &delta, true),
                    None => self.resync(id, c, None),
                },
                // A change too large for the log: its web writer's delta, else the snapshot
                // says what it did (and when nothing else happened since, its writer need not
                // hear of it).
                Ok(Some(LogEvent::Record {
                    version, updater, ..
                })) => match noted.filter(|(v, _)| *v == version) {
                    Some((_, delta)) => self.emit(id, c, version, updater, delta, true),
                    None => self.resync(id, c, Some((version, updater))),
                },
                Ok(Some(LogEvent::Gap)) => self.resync(id, c, None),
                Err(e) => {
                    crate::log::warn(format_args!("bridge: context {id} log: {e}"));
                    self.resync(id, c, None);
                    break;
                }
            }
        }
    }

    /// Sends one update to the subscribers that have not seen it (the updater excluded, as the
    /// reference gateway does, when `skip_updater`).
    fn emit(&self, id: u64, c: &Ctx, version: u64, updater: u64, delta: &str, skip_updater: bool) {
        let node = &self.node;
        let tail = format!(
            r#","context_id":"{}","updater_id":"p-{node}-{updater}","delta":{delta}}}"#,
            gw3_id(node, id)
        );
        for s in &c.subs {
            if version <= s.start || (skip_updater && s.peer.0 == updater) {
                continue;
            }
            let mut frame = format!(
                r#"{{"domain":"global","type":"context-updated","peer_id":"p-{node}-{}""#,
                s.peer.0
            );
            frame.push_str(&tail);
            s.out.push(frame);
        }
    }

    /// Lost track of the log (lapped, an oversized or unknown record): the snapshot goes out as
    /// a `reset`, and following resumes after it. `only`: the record (version, writer) that
    /// was not logged in full; when the snapshot is exactly that version, its writer is skipped
    /// as for any other update, and when the value before it is cached, the subscribers get
    /// the difference (as an `update` would tell it) instead of a `reset`.
    fn resync(&self, id: u64, c: &mut Ctx, only: Option<(u64, u64)>) {
        let info = match c.store.read(&mut c.buf) {
            Ok(i) => i,
            Err(e) => {
                crate::log::warn(format_args!("bridge: context {id}: {e}"));
                return;
            }
        };
        c.follower.resync(info.version);
        let data = match decode_map(&c.buf) {
            Ok(d) => d,
            Err(e) => {
                crate::log::warn(format_args!("bridge: context {id}: {e}"));
                return;
            }
        };
        let exact = only.is_some_and(|(v, _)| v == info.version);
        let before = match &c.cache {
            Some((v, old)) if exact && *v + 1 == info.version => old.as_map(),
            _ => None,
        };
        let delta = before
            .zip(data.as_map())
            .and_then(|(old, new)| super::delta::to_gw3(&super::delta::diff(old, new), false))
            .unwrap_or_else(|| serde_json::json!({ "reset": data.to_json() }))
            .to_string();
        self.emit(id, c, info.version, info.updater, &delta, exact);
        c.cache = Some((info.version, Arc::new(data)));
        for s in c.subs.iter_mut() {
            s.start = s.start.max(info.version);
        }
    }
}

/// The GW3 delta text of a logged op: the web writer's own when noted, else the translation of
/// the op, which also brings `cache` to `version` when it held the version before (so that a
/// later change too large for the log can be told as a difference). `None`: not translatable
/// (take the snapshot).
fn delta_text(payload: &[u8], version: u64, cache: &mut Cached) -> Option<String> {
    let Ok(Value::Map(mut m)) = codec::decode(payload) else {
        return None;
    };
    if let Some(Value::String(s)) = m.shift_remove(GW3_NOTE) {
        return Some(s);
    }
    let op = ContextOp::from_value_owned(Value::Map(m))?;
    if let Some((v, data)) = cache.as_mut().filter(|(v, _)| *v + 1 == version) {
        let applied = match Arc::make_mut(data) {
            Value::Map(m) => crate::model::context::apply_mut(m, true, &op).is_ok(),
            _ => false,
        };
        if applied {
            *v = version;
        } else {
            *cache = None;
        }
    }
    super::delta::to_gw3(&op, version == 1).map(|j| j.to_string())
}

/// Sleeps on the bridge's doorbell; when a followed log moved, wakes the pump.
fn waker(watch: Arc<Watch>, bells: Option<(u32, DoorbellSegment)>) {
    let moved = || {
        // SYNC(stop): pairs with the Release store in `Contexts::stop`.
        if watch.stop.load(Ordering::Acquire) {
            return true;
        }
        let mut any = false;
        for w in watch.list().iter_mut() {
            let now = w.store.ctl().log_position();
            if now != w.seen {
                w.seen = now;
                any = true;
            }
        }
        any
    };
    // SYNC(stop): pairs with the Release store in `Contexts::stop`.
    while !watch.stop.load(Ordering::Acquire) {
        let woke = match bells.as_ref().and_then(|(i, dir)| dir.doorbell(*i)) {
            Some(bell) => bell.sleep_until(moved, Some(WAKER_TICK)),
            None => {
                std::thread::sleep(WAKER_TICK / 10);
                moved()
            }
        };
        // SYNC(stop): as above.
        if woke && !watch.stop.load(Ordering::Acquire) {
            watch.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noted_deltas_travel_verbatim_and_ops_are_translated() {
        let op = ContextOp::Update(match Value::from(serde_json::json!({"a": 1})) {
            Value::Map(m) => m,
            _ => unreachable!(),
        });
        let mut v = op.to_value();
        let plain = codec::encode(&v).unwrap();
        assert_eq!(
            delta_text(&plain, 2, &mut None).as_deref(),
            Some(r#"{"commands":[{"type":"set","path":"a","value":1}]}"#)
        );
        if let Value::Map(m) = &mut v {
            m.insert(
                GW3_NOTE.into(),
                Value::from(r#"{"added":{"a":1},"updated":{}}"#),
            );
        }
        assert_eq!(
            delta_text(&codec::encode(&v).unwrap(), 2, &mut None).as_deref(),
            Some(r#"{"added":{"a":1},"updated":{}}"#)
        );
        assert_eq!(delta_text(b"\xff\xff", 2, &mut None), None);
    }
}
