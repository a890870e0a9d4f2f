//! The bus on the client (features.md §7): publishers write each message once into the lane of
//! every peer with a matching subscription (the gateway announces subscriptions to everyone), so
//! messages never pass through the gateway between native peers. Peers behind the gateway get
//! the message relayed; our own subscriptions get it locally.

use super::conn::Reply;
use super::cow::{with_kept, Kept};
use super::engine::{Shared, Task};
use super::lane::{Lane, SendError};
use super::ClientError;
use crate::model::bus::{identity_matches, routing_matches, topic_matches};
use crate::model::policy::Action as PolicyAction;
use crate::status::Status;
use crate::wire::frame::{BusSubInfo, Instance, PeerId, ToGateway, Transport};
use crate::wire::record::{self, KIND_BUS};
use crate::wire::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish may wait for a full subscriber lane.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A message as a subscriber sees it.
#[derive(Debug, Clone)]
pub struct BusMessage {
    /// The topic it was published on.
    pub topic: Arc<str>,
    pub data: Value,
    pub routing_key: Option<String>,
    /// The publisher.
    pub source: Arc<Instance>,
}

/// Options of a subscription.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Only messages published with this key, or with none.
    pub routing_key: Option<String>,
    /// Only messages from publishers whose identity has every one of these values (exact).
    pub source: Option<Map>,
}

/// Options of a publish.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Only subscribers that used this key, or none.
    pub routing_key: Option<String>,
    /// Only subscribers whose identity has every one of these values (exact).
    pub target: Option<Map>,
}

pub(crate) type BusCallback = Arc<dyn Fn(&BusMessage) + Send + Sync>;

pub(crate) struct MySub {
    id: u64,
    topic: String,
    routing_key: Option<String>,
    source: Option<Map>,
    cb: BusCallback,
    /// Cleared when the subscription ends (`SYNC(bus-sub-active)`): no more callbacks.
    active: AtomicBool,
}

/// Where one (topic, routing key) goes.
struct Route {
    /// `Shared::bus_routes` when it was computed.
    generation: u64,
    lanes: Vec<Arc<Lane>>,
    relay: bool,
    local: bool,
}

impl Route {
    /// Whether no subscription changed since and every lane is still open.
    fn is_current(&self, shared: &Shared) -> bool {
        // SYNC(bus_routes): pairs with the Release bump in `routes_changed`: a route is used
        // only while no change since it was computed has been seen.
        self.generation == shared.bus_routes.load(Ordering::Acquire)
            && self.lanes.iter().all(|l| !l.is_closed())
    }
}

/// Subscriptions changed: every computed route is stale, and is dropped with the lanes it
/// holds (a stale route was kept until a gateway reconnection: a publisher to per-subscriber
/// topics kept every departed subscriber's lane mapped).
fn routes_changed(shared: &Shared, st: &mut BusState) {
    // SYNC(bus_routes): Release pairs with the Acquire in `Route::is_current`; the routes
    // themselves are read under the bus lock or were computed after this load.
    shared.bus_routes.fetch_add(1, Ordering::Release);
    st.routes.clear();
}

/// Routes kept at most: a publisher on ever new topics (or routing keys) keeps no more (they
/// are computed again when next used).
const MAX_ROUTES: usize = 4096;

#[derive(Default)]
pub(crate) struct BusState {
    mine: BTreeMap<u64, Arc<MySub>>,
    remote: BTreeMap<(PeerId, u64), BusSubInfo>,
    /// Routes computed so far, valid while `Shared::bus_routes` stays at their generation
    /// (publishing threads also keep the one they used last, see `ROUTE_CACHE`).
    routes: HashMap<(String, Option<String>), Arc<Route>>,
}

/// Our subscriptions changed (`st` holds them): the delivering thread's list
/// (`Shared::bus_subs`) and every route are stale.
fn mine_changed(shared: &Shared, st: &mut BusState) {
    shared
        .bus_subs
        .change(|v| *v = st.mine.values().cloned().collect());
    routes_changed(shared, st);
}

/// A subscription; dropping it (or `unsubscribe`) ends it.
pub struct BusSubscription {
    shared: std::sync::Weak<Shared>,
    sub: Arc<MySub>,
}

impl std::fmt::Debug for BusSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusSubscription")
            .field("topic", &self.sub.topic)
            .finish()
    }
}

impl BusSubscription {
    /// Ends the subscription.
    pub fn unsubscribe(self) {}
}

impl Drop for BusSubscription {
    fn drop(&mut self) {
        // SYNC(bus-sub-active): pairs with the Acquire loads in `deliver_to` and `restore`; the
        // flag is the whole message (no more callbacks), nothing else is published through it.
        self.sub.active.store(false, Ordering::Release);
        if let Some(shared) = self.shared.upgrade() {
            let _gate = shared.conn.gate.enter();
            let mut st = shared.bus.lock().unwrap_or_else(|e| e.into_inner());
            st.mine.remove(&self.sub.id);
            mine_changed(&shared, &mut st);
            drop(st);
            // Fire and forget (request id 0 is never used).
            let _ = shared.conn.send(&ToGateway::BusUnsubscribe {
                req: 0,
                sub: self.sub.id,
            });
        }
    }
}

static NEXT_SUB: AtomicU64 = AtomicU64::new(1);

pub(crate) fn subscribe(
    shared: &Arc<Shared>,
    topic: &str,
    opts: SubscribeOptions,
    cb: BusCallback,
) -> Result<BusSubscription, ClientError> {
    check_topic(topic)?;
    let sub = Arc::new(MySub {
        // Relaxed: a counter for ids; nothing is published through it.
        id: NEXT_SUB.fetch_add(1, Ordering::Relaxed),
        topic: topic.to_string(),
        routing_key: opts.routing_key,
        source: opts.source,
        cb,
        active: AtomicBool::new(true),
    });
    let (id, topic, routing_key) = (sub.id, sub.topic.clone(), sub.routing_key.clone());
    let _gate = shared.conn.gate.enter();
    // Ours before the gateway announces it: a publisher that routes to us as soon as it knows
    // must find the subscription here when its first message arrives.
    let add = |on: bool| {
        let mut st = shared.bus.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            st.mine.insert(sub.id, sub.clone());
        } else {
            st.mine.remove(&sub.id);
        }
        mine_changed(shared, &mut st);
    };
    add(true);
    let reply = shared.conn.request(
        |req| ToGateway::BusSubscribe {
            req,
            sub: id,
            topic,
            routing_key,
        },
        CONTROL_TIMEOUT,
    );
    if let Err(e) = Reply::ack(reply, "bus subscribe") {
        // SYNC(bus-sub-active): as in `drop`: the dispatcher may already hold the sub in its
        // list and skips the sub once it sees the flag.
        sub.active.store(false, Ordering::Release);
        add(false);
        return Err(e);
    }
    Ok(BusSubscription {
        shared: Arc::downgrade(shared),
        sub,
    })
}

/// The gateway announced a subscription (control thread).
pub(crate) fn remote_subscribed(shared: &Shared, info: BusSubInfo) {
    let mut st = shared.bus.lock().unwrap_or_else(|e| e.into_inner());
    st.remote.insert((info.peer, info.sub), info);
    routes_changed(shared, &mut st);
}

/// The gateway announced the end of a subscription (control thread).
pub(crate) fn remote_unsubscribed(shared: &Shared, peer: PeerId, sub: u64) {
    let mut st = shared.bus.lock().unwrap_or_else(|e| e.into_inner());
    st.remote.remove(&(peer, sub));
    routes_changed(shared, &mut st);
}

/// A peer left (control thread): its subscriptions go with it. The gateway announces no
/// `BusUnsubscribed` for them (one per subscription would be a burst every peer must absorb).
pub(crate) fn peer_left(shared: &Shared, peer: PeerId) {
    let mut st = shared.bus.lock().unwrap_or_else(|e| e.into_inner());
    let gone: Vec<(PeerId, u64)> = st
        .remote
        .range((peer, 0)..=(peer, u64::MAX))
        .map(|(k, _)| *k)
        .collect();
    if gone.is_empty() {
        return;
    }
    for k in gone {
        st.remote.remove(&k);
    }
    routes_changed(shared, &mut st);
}

/// Seeds the remote subscriptions from the welcome.
pub(crate) fn seed(shared: &Shared, subs: Vec<BusSubInfo>) {
    let mut st = shared.bus.lock().unwrap_or_else(|e| e.into_inner());
    for s in subs {
        st.remote.insert((s.peer, s.sub), s);
    }
    routes_changed(shared, &mut st);
}

fn route(
    shared: &Arc<Shared>,
    topic: &str,
    opts: &PublishOptions,
) -> Result<Arc<Route>, ClientError> {
    let (generation, peers, local) = {
        let st = shared.bus.lock().unwrap_or_else(|e| e.into_inner());
        // SYNC(bus_routes): read under the lock, before the route: a change after this makes
        // the route stale.
        let generation = shared.bus_routes.load(Ordering::Acquire);
        if opts.target.is_none() {
            let key = (topic.to_string(), opts.routing_key.clone());
            if let Some(r) = st.routes.get(&key).filter(|r| r.is_current(shared)) {
                return Ok(r.clone());
            }
        }
        let mut peers: Vec<PeerId> = Vec::new();
        for s in st.remote.values() {
            if !peers.contains(&s.peer)
                && topic_matches(&s.topic, topic)
                && routing_matches(s.routing_key.as_deref(), opts.routing_key.as_deref())
            {
                peers.push(s.peer);
            }
        }
        let local = st.mine.values().any(|s| {
            topic_matches(&s.topic, topic)
                && routing_matches(s.routing_key.as_deref(), opts.routing_key.as_deref())
        });
        (generation, peers, local)
    };
    let me_value = shared.me().to_value();
    // A subscriber gets a topic only if its `subscribe` rules allow that topic, whatever
    // pattern it subscribed with: the gateway checked only the pattern's text (docs/semantics.md
    // §7). Decided here, once per route, so the publish path pays nothing more.
    let local = local
        && opts
            .target
            .as_ref()
            .is_none_or(|t| identity_matches(t, &me_value))
        && shared.check_mine(PolicyAction::Subscribe, topic).is_ok();
    let mut lanes = Vec::new();
    let mut relay = false;
    for p in peers {
        let (identity, transport, rules) = {
            let st = shared.lock_state();
            match st.peers.get(&p) {
                Some(rp) => (rp.identity.clone(), rp.transport, rp.rules.clone()),
                None => continue,
            }
        };
        if rules.is_some_and(|r| !r.allows(PolicyAction::Subscribe, topic)) {
            continue;
        }
        if let Some(t) = &opts.target {
            if !identity_matches(t, &identity.to_value()) {
                continue;
            }
        }
        if transport == Transport::Relay || shared.relay_only {
            relay = true;
            continue;
        }
        match super::interop::lane_to(shared, p, None) {
            Ok(l) => lanes.push(l),
            // The subscriber is leaving; it misses nothing it would have seen.
            Err((Status::PeerLeft, _)) => {}
            Err((status, message)) => return Err(ClientError::Gateway { status, message }),
        }
    }
    let r = Arc::new(Route {
        generation,
        lanes,
        relay,
        local,
    });
    if opts.target.is_none() {
        let mut st = shared.bus.lock().unwrap_or_else(|e| e.into_inner());
        // Computed from an older state than the map holds now: not kept. SYNC(bus_routes):
        // under the bus lock, which every `routes_changed` holds too, so a change after this
        // check clears the map after the insert.
        if generation == shared.bus_routes.load(Ordering::Acquire) {
            if st.routes.len() >= MAX_ROUTES {
                st.routes.clear();
            }
            st.routes
                .insert((topic.to_string(), opts.routing_key.clone()), r.clone());
        }
    }
    Ok(r)
}

/// Encodes a bus record: topic, routing key, payload flags, payload.
pub(crate) fn encode(
    out: &mut Vec<u8>,
    topic: &str,
    routing_key: Option<&str>,
    data: &Value,
) -> Result<(), crate::wire::codec::EncodeError> {
    out.clear();
    encode_append(out, topic, routing_key, data)
}

/// [`encode`] appending to `out` (several records side by side for a batch).
fn encode_append(
    out: &mut Vec<u8>,
    topic: &str,
    routing_key: Option<&str>,
    data: &Value,
) -> Result<(), crate::wire::codec::EncodeError> {
    out.extend_from_slice(&(topic.len() as u32).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    match routing_key {
        Some(k) => {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
        }
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let flags = record::encode_payload(data, out)?;
    out[at..at + 4].copy_from_slice(&flags.to_le_bytes());
    Ok(())
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Some(h)
}

fn take_u32(b: &mut &[u8]) -> Option<u32> {
    take(b, 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

thread_local! {
    /// Our subscriptions as `deliver` last used them.
    static SUBS_KEPT: Kept<Shared, Arc<MySub>> = const { std::cell::Cell::new(None) };
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    /// The last topic seen by this (pumping) thread: a subscriber of one busy topic then
    /// shares one string instead of allocating one per message.
    static LAST_TOPIC: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
}

/// A bus record's fields, borrowed from its body (strings not yet validated).
pub(crate) struct Parsed<'a> {
    pub topic: &'a [u8],
    pub routing_key: Option<&'a [u8]>,
    pub flags: u32,
    pub payload: &'a [u8],
}

/// Splits a bus record into its fields; `None` when the framing is broken.
pub(crate) fn parse(mut b: &[u8]) -> Option<Parsed<'_>> {
    let n = take_u32(&mut b)? as usize;
    let topic = take(&mut b, n)?;
    let routing_key = match take_u32(&mut b)? {
        u32::MAX => None,
        n => Some(take(&mut b, n as usize)?),
    };
    let flags = take_u32(&mut b)?;
    Some(Parsed {
        topic,
        routing_key,
        flags,
        payload: b,
    })
}

/// Decodes a parsed bus record into (topic, routing key, data).
pub(crate) fn decode(p: &Parsed<'_>) -> Option<(Arc<str>, Option<String>, Value)> {
    let topic = LAST_TOPIC.with(|c| {
        let mut c = c.borrow_mut();
        match &*c {
            // Equal bytes to a valid string: no need to validate again.
            Some(t) if t.as_bytes() == p.topic => Some(t.clone()),
            _ => {
                let t: Arc<str> = Arc::from(std::str::from_utf8(p.topic).ok()?);
                *c = Some(t.clone());
                Some(t)
            }
        }
    })?;
    let rk = match p.routing_key {
        None => None,
        Some(k) => Some(std::str::from_utf8(k).ok()?.to_string()),
    };
    let data = record::decode_payload(p.flags, p.payload).ok()?;
    Some((topic, rk, data))
}

/// Raw payloads up to this size are delivered in batches (larger ones, and encoded values, as
/// one task each: copying them into a batch would cost more than the task).
pub(crate) const BATCH_MAX_PAYLOAD: usize = 4096;

/// Raw-payload messages one pump round read from one lane, copied side by side, delivered by
/// the dispatch thread in one go: one subscription-list lookup and one reused message per
/// batch, no allocation per message.
pub(crate) struct BusBatch {
    lane: Arc<Lane>,
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

thread_local! {
    /// Emptied batch buffers, reused by the next batch this (dispatch) thread fills.
    static BATCH_SPARE: std::cell::Cell<Option<(Vec<u8>, Vec<u32>)>> = const { std::cell::Cell::new(None) };
}

/// Whether a bus record (parsed and checked by the pumper) goes into a batch.
pub(crate) fn batchable(p: &Parsed<'_>) -> bool {
    p.flags & record::PAYLOAD_RAW != 0 && p.payload.len() <= BATCH_MAX_PAYLOAD
}

/// Appends a record to the batch of `lane` at the end of `ready`, or starts one there (a task
/// of another kind in between starts a new batch, so the order of a lane's messages holds).
pub(crate) fn batch_push(ready: &mut Vec<Task>, lane: &Arc<Lane>, body: &[u8]) {
    if let Some(Task::BusBatch(b)) = ready.last_mut() {
        if Arc::ptr_eq(&b.lane, lane) {
            b.bytes.extend_from_slice(body);
            b.ends.push(b.bytes.len() as u32);
            return;
        }
    }
    let (mut bytes, mut ends) = BATCH_SPARE.with(|c| c.take()).unwrap_or_default();
    bytes.extend_from_slice(body);
    ends.push(bytes.len() as u32);
    ready.push(Task::BusBatch(BusBatch {
        lane: lane.clone(),
        bytes,
        ends,
    }));
}

impl BusBatch {
    /// The messages in it.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }
}

/// Delivers a batch (dispatch thread).
pub(crate) fn deliver_batch(shared: &Arc<Shared>, batch: BusBatch) {
    let BusBatch {
        lane,
        mut bytes,
        mut ends,
    } = batch;
    let mut msg: Option<BusMessage> = None;
    let mut start = 0usize;
    for &end in &ends {
        let body = &bytes[start..end as usize];
        start = end as usize;
        // Checked by the pumper (framing and UTF-8), so only a topic or key that differs from
        // the previous message's is converted again; a record that fails now cannot occur.
        let Some(p) = parse(body) else { continue };
        let m = msg.get_or_insert_with(|| BusMessage {
            topic: Arc::from(""),
            data: Value::Bytes(Vec::new()),
            routing_key: None,
            source: lane.identity.clone(),
        });
        if m.topic.as_bytes() != p.topic {
            let Ok(t) = std::str::from_utf8(p.topic) else {
                continue;
            };
            m.topic = Arc::from(t);
        }
        if m.routing_key.as_deref().map(str::as_bytes) != p.routing_key {
            m.routing_key = match p.routing_key.map(std::str::from_utf8) {
                None => None,
                Some(Ok(k)) => Some(k.to_string()),
                Some(Err(_)) => continue,
            };
        }
        match &mut m.data {
            Value::Bytes(v) => {
                v.clear();
                v.extend_from_slice(p.payload);
            }
            other => *other = Value::Bytes(p.payload.to_vec()),
        }
        // Each callback runs contained (`isolated`).
        deliver(shared, m);
    }
    // Keep the buffers for the next batch unless a burst of large messages grew them.
    if bytes.capacity() <= 1 << 20 {
        bytes.clear();
        ends.clear();
        BATCH_SPARE.with(|c| c.set(Some((bytes, ends))));
    }
}

/// A topic one may subscribe to or publish on: not empty, and no longer than the gateway takes
/// a subscription's (a longer one could be subscribed to with a pattern only).
fn check_topic(topic: &str) -> Result<(), ClientError> {
    if topic.is_empty() {
        return Err(ClientError::InvalidArgument(
            "Please provide the topic as a non-empty string!".into(),
        ));
    }
    crate::model::check_name_len("topic", topic, crate::model::MAX_NAME_LEN)
        .map_err(ClientError::InvalidArgument)
}

/// The checks every publish makes before routing.
fn check_publish(shared: &Shared, topic: &str) -> Result<(), ClientError> {
    check_topic(topic)?;
    if shared.is_closed() {
        return Err(ClientError::Closed);
    }
    shared
        .check_mine(PolicyAction::Publish, topic)
        .map_err(|message| ClientError::Gateway {
            status: Status::PermissionDenied,
            message,
        })
}

/// A route remembered by a publishing thread (see [`with_route`]).
struct CachedRoute {
    /// Whose route (a weak reference: the address cannot be reused while cached).
    shared: std::sync::Weak<Shared>,
    topic: String,
    routing_key: Option<String>,
    route: Arc<Route>,
}

thread_local! {
    static ROUTE_CACHE: std::cell::Cell<Option<CachedRoute>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the route of (`topic`, `opts`): the one this thread used last while it is
/// current, so a publisher of one topic takes no lock and no reference count per message (a
/// locked instruction right after the previous message's stores waits for them to reach the
/// subscriber, docs/benchmarks.md §6.2); else a route computed now and kept for next time.
fn with_route<T>(
    shared: &Arc<Shared>,
    topic: &str,
    opts: &PublishOptions,
    f: impl FnOnce(&Route) -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    if opts.target.is_some() {
        return f(&*route(shared, topic, opts)?);
    }
    let cached = ROUTE_CACHE.with(|c| c.take()).filter(|c| {
        std::ptr::eq(c.shared.as_ptr(), Arc::as_ptr(shared))
            && c.topic == topic
            && c.routing_key.as_deref() == opts.routing_key.as_deref()
            && c.route.is_current(shared)
    });
    let cached = match cached {
        Some(c) => c,
        None => CachedRoute {
            shared: Arc::downgrade(shared),
            topic: topic.to_string(),
            routing_key: opts.routing_key.clone(),
            route: route(shared, topic, opts)?,
        },
    };
    let r = f(&cached.route);
    ROUTE_CACHE.with(|c| c.set(Some(cached)));
    r
}

/// A subscriber lane failed mid-publish: its route is stale. The other subscribers still get
/// the message; the first failure the caller can act on is reported after all were tried.
fn lane_failed(shared: &Shared, e: SendError, failed: &mut Option<ClientError>) {
    routes_changed(
        shared,
        &mut shared.bus.lock().unwrap_or_else(|e| e.into_inner()),
    );
    if shared.is_closed() {
        // Our own close shut the lane under the send: the publish did not go out.
        failed.get_or_insert(ClientError::Closed);
        return;
    }
    if e.status() != Status::PeerLeft && failed.is_none() {
        *failed = Some(ClientError::Gateway {
            status: e.status(),
            message: e.to_string(),
        });
    }
}

/// What the gateway relays and our own subscriptions get, for one message.
fn relay_and_local(
    shared: &Shared,
    r: &Route,
    topic: &str,
    opts: &PublishOptions,
    data: Value,
) -> Result<(), ClientError> {
    if r.relay {
        let target = opts.target.clone().map(Value::Map).unwrap_or(Value::Null);
        shared.conn.send(&ToGateway::BusPublish {
            topic: topic.to_string(),
            routing_key: opts.routing_key.clone(),
            target,
            data: data.clone(),
        })?;
    }
    if r.local {
        shared.push_task(Task::Bus(BusMessage {
            topic: Arc::from(topic),
            data,
            routing_key: opts.routing_key.clone(),
            source: shared.me(),
        }));
    }
    Ok(())
}

pub(crate) fn publish(
    shared: &Arc<Shared>,
    topic: &str,
    data: Value,
    opts: &PublishOptions,
) -> Result<(), ClientError> {
    check_publish(shared, topic)?;
    with_route(shared, topic, opts, |r| {
        let mut failed = None;
        if !r.lanes.is_empty() || r.relay {
            let mut body = SCRATCH.with(|s| s.take());
            encode(&mut body, topic, opts.routing_key.as_deref(), &data)?;
            // The same limit wherever the subscribers are (the topic and key are not payload).
            let size = body.len().saturating_sub(topic.len() + 12);
            if size > shared.max_payload() {
                SCRATCH.with(|s| s.set(body));
                return Err(ClientError::PayloadTooLarge {
                    size,
                    max: shared.max_payload(),
                });
            }
            for l in &r.lanes {
                if let Err(e) = shared.send_on(l, KIND_BUS, &body, SEND_TIMEOUT) {
                    lane_failed(shared, e, &mut failed);
                }
            }
            SCRATCH.with(|s| s.set(body));
        } else {
            // Only local subscribers (or none): the same checks, without encoding.
            crate::wire::codec::check(&data)?;
            let size = crate::wire::record::payload_len(&data);
            if size > shared.max_payload() {
                return Err(ClientError::PayloadTooLarge {
                    size,
                    max: shared.max_payload(),
                });
            }
        }
        relay_and_local(shared, r, topic, opts, data)?;
        failed.map_or(Ok(()), Err)
    })
}

/// Publishes several messages on one topic: one route, and one lock and one doorbell ring per
/// subscriber lane for the whole batch (a publisher of a fast feed pays the per-message
/// synchronisation once per batch). Each message is delivered as if published on its own, in
/// order; an error is reported after every subscriber was tried, as by [`publish`].
pub(crate) fn publish_batch(
    shared: &Arc<Shared>,
    topic: &str,
    items: &[Value],
    opts: &PublishOptions,
) -> Result<(), ClientError> {
    check_publish(shared, topic)?;
    if items.is_empty() {
        return Ok(());
    }
    with_route(shared, topic, opts, |r| {
        // Every message is checked before any is sent: a batch is refused whole.
        let mut body = SCRATCH.with(|s| s.take());
        body.clear();
        let mut ends = Vec::with_capacity(items.len());
        for v in items {
            let start = body.len();
            if let Err(e) = encode_append(&mut body, topic, opts.routing_key.as_deref(), v) {
                SCRATCH.with(|s| s.set(body));
                return Err(e.into());
            }
            let size = (body.len() - start).saturating_sub(topic.len() + 12);
            if size > shared.max_payload() {
                SCRATCH.with(|s| s.set(body));
                return Err(ClientError::PayloadTooLarge {
                    size,
                    max: shared.max_payload(),
                });
            }
            ends.push(body.len());
        }
        let mut failed = None;
        for l in &r.lanes {
            if let Err(e) = shared.send_many_on(
                l,
                KIND_BUS,
                super::lane::split_at(&body, &ends),
                SEND_TIMEOUT,
            ) {
                lane_failed(shared, e, &mut failed);
            }
        }
        SCRATCH.with(|s| s.set(body));
        if r.relay || r.local {
            for v in items {
                relay_and_local(shared, r, topic, opts, v.clone())?;
            }
        }
        failed.map_or(Ok(()), Err)
    })
}

/// Runs one message through our subscriptions (dispatch thread). The list is kept per thread
/// while the subscriptions are unchanged, so a busy subscriber takes no lock per message; a
/// callback that subscribes is seen by the next message.
pub(crate) fn deliver(shared: &Arc<Shared>, msg: &BusMessage) {
    with_kept(
        &SUBS_KEPT,
        shared,
        |s| &s.bus_subs,
        |subs| deliver_to(subs, msg),
    );
}

fn deliver_to(subs: &[Arc<MySub>], msg: &BusMessage) {
    let mut source_value: Option<Value> = None;
    for s in subs.iter() {
        // SYNC(bus-sub-active): pairs with the Release stores in `drop` and `subscribe`; only
        // the flag is read.
        if !s.active.load(Ordering::Acquire)
            || !topic_matches(&s.topic, &msg.topic)
            || !routing_matches(s.routing_key.as_deref(), msg.routing_key.as_deref())
        {
            continue;
        }
        if let Some(f) = &s.source {
            let v = source_value.get_or_insert_with(|| msg.source.to_value());
            if !identity_matches(f, v) {
                continue;
            }
        }
        super::engine::isolated("a bus callback", || (s.cb)(msg));
    }
}

/// A new gateway connection (control thread): the subscriptions others hold are the ones its
/// welcome lists; every cached route is stale (its lanes are retired).
pub(crate) fn connection_reset(shared: &Shared, subs: Vec<BusSubInfo>) {
    let mut st = shared.bus.lock().unwrap_or_else(|e| e.into_inner());
    st.remote.clear();
    for s in subs {
        st.remote.insert((s.peer, s.sub), s);
    }
    routes_changed(shared, &mut st);
}

/// Subscribes our subscriptions again, with the same ids (restore thread).
pub(crate) fn restore(shared: &Arc<Shared>) {
    let subs: Vec<Arc<MySub>> = shared
        .bus
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .mine
        .values()
        // SYNC(bus-sub-active): pairs with the Release stores in `drop` and `subscribe`; only
        // the flag is read.
        .filter(|s| s.active.load(Ordering::Acquire))
        .cloned()
        .collect();
    // All requests first, then the answers: each waits for every peer to route to it.
    let pending: Vec<_> = subs
        .iter()
        .map(|s| {
            shared.conn.start(|req| ToGateway::BusSubscribe {
                req,
                sub: s.id,
                topic: s.topic.clone(),
                routing_key: s.routing_key.clone(),
            })
        })
        .collect();
    for (s, p) in subs.iter().zip(pending) {
        let r = p.and_then(|p| p.wait(&shared.conn, CONTROL_TIMEOUT));
        super::reconnect::expect_ack(&format!("the bus subscription to {:?}", s.topic), r);
    }
}

#[cfg(test)]
mod tests {
    use super::MAX_ROUTES;
    use crate::client::testing::TestGateway;
    use crate::client::{Client, PublishOptions, SubscribeOptions};
    use crate::Value;
    use std::time::{Duration, Instant};

    /// (routes kept, lanes they hold) of `c`.
    fn kept(c: &Client) -> (usize, usize) {
        let st = c.shared().bus.lock().unwrap();
        let lanes = st.routes.values().map(|r| r.lanes.len()).sum();
        (st.routes.len(), lanes)
    }

    #[test]
    fn routes_are_bounded_and_go_with_the_subscriptions_they_were_computed_from() {
        // Routes were only ever added: 200 000 topics published once grew a publisher by
        // 33 MB, and departed subscribers' lanes stayed mapped through their routes.
        let gw = TestGateway::new("bus-routes");
        let publisher = Client::builder("pub")
            .socket(gw.socket())
            .connect()
            .unwrap();
        let o = PublishOptions::default();
        for i in 0..MAX_ROUTES + 100 {
            publisher
                .publish(&format!("t.{i}"), Value::map(), &o)
                .unwrap();
        }
        assert!(kept(&publisher).0 <= MAX_ROUTES, "{:?}", kept(&publisher));
        // Subscribers on topics of their own, each published to once.
        let subs: Vec<Client> = (0..4)
            .map(|i| {
                Client::builder(format!("sub{i}"))
                    .socket(gw.socket())
                    .connect()
                    .unwrap()
            })
            .collect();
        let held: Vec<_> = subs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.subscribe(&format!("own.{i}"), SubscribeOptions::default(), |_| {})
                    .unwrap()
            })
            .collect();
        for i in 0..4 {
            publisher
                .publish(&format!("own.{i}"), Value::map(), &o)
                .unwrap();
        }
        assert_eq!(kept(&publisher).1, 4, "a lane per subscriber's route");
        drop(held);
        for c in subs {
            c.close();
        }
        // Once the publisher hears they left, no route holds their lanes.
        let deadline = Instant::now() + Duration::from_secs(10);
        while kept(&publisher).1 != 0 {
            assert!(
                Instant::now() < deadline,
                "still held: {:?}",
                kept(&publisher)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
