//! Interop streams (features.md §4) with bounded queues.
//!
//! A stream is a method with `streaming: true`. A subscriber sends a subscription request
//! straight to each chosen server (over the lane, or relayed by the gateway for peers behind
//! it); the server accepts (on a branch) or rejects; data then flows server → subscriber as
//! records on the same lane. Either side ends a subscription with a close record; a peer's
//! death ends all of its subscriptions.
//!
//! Nothing grows without bound. Each subscriber has a queue of `queue` items on both ends; when
//! it is full the stream's declared [`SlowConsumerPolicy`] decides: block the pusher up to a
//! timeout (then the subscription is closed as a slow consumer), drop the oldest item and count
//! the gap (reported with the next item delivered), or conflate by key (keep the latest item
//! per value of a field).

use super::cow::{with_kept, CowList, Kept};
use super::engine::{Shared, Task, ViewWait};
use super::lane::{split_at, Lane, SendError};
use super::{ClientError, MethodError};
use crate::model::policy::Action as PolicyAction;
use crate::model::target::{method_matches, select};
use crate::model::Target;
use crate::status::Status;
use crate::wire::frame::{Instance, MethodDef, PeerId, ToGateway, Transport};
use crate::wire::record::{
    KIND_STREAM_DATA, KIND_SUB_CLOSE, KIND_SUB_DROP, KIND_SUB_REPLY, KIND_SUB_REQUEST,
};
use crate::wire::stream as rec;
use crate::wire::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a full subscriber queue does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// The pusher waits up to this long for room; then the subscription is closed with
    /// "slow consumer".
    Block(Duration),
    /// The oldest queued item is dropped; the subscriber is told how many it missed.
    DropOldest,
    /// An item replaces a queued one whose `data[key]` is equal (the latest value per key
    /// wins); with no such item, the oldest is dropped and counted.
    Conflate(String),
}

impl Default for SlowConsumerPolicy {
    fn default() -> Self {
        SlowConsumerPolicy::Block(Duration::from_secs(5))
    }
}

impl SlowConsumerPolicy {
    fn to_value(&self) -> Value {
        match self {
            SlowConsumerPolicy::Block(d) => {
                Value::object([("block_ms", Value::from(d.as_millis() as u64))])
            }
            SlowConsumerPolicy::DropOldest => Value::object([("drop_oldest", Value::from(true))]),
            SlowConsumerPolicy::Conflate(k) => {
                Value::object([("conflate", Value::from(k.as_str()))])
            }
        }
    }

    fn from_value(v: &Value) -> SlowConsumerPolicy {
        if let Some(k) = v.get("conflate").and_then(Value::as_str) {
            return SlowConsumerPolicy::Conflate(k.to_string());
        }
        if v.get("drop_oldest").is_some() {
            return SlowConsumerPolicy::DropOldest;
        }
        let ms = v
            .get("block_ms")
            .and_then(Value::as_i64)
            .unwrap_or(5000)
            .max(0) as u64;
        SlowConsumerPolicy::Block(Duration::from_millis(ms))
    }
}

type RequestHandler = Box<dyn Fn(SubscriptionRequest) + Send + Sync>;
type SubHandler = Box<dyn Fn(&StreamSubscription) + Send + Sync>;

/// How a stream behaves.
pub struct StreamOptions {
    /// Decides each subscription request; without it every request is accepted on branch `""`.
    pub on_request: Option<RequestHandler>,
    /// Called after a subscription was accepted.
    pub on_added: Option<SubHandler>,
    /// Called when a subscription ends (subscriber closed it or left, or the server closed it).
    pub on_removed: Option<SubHandler>,
    /// What a full subscriber queue does.
    pub policy: SlowConsumerPolicy,
    /// Items queued per subscriber (on each side) before the policy applies.
    pub queue: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            on_request: None,
            on_added: None,
            on_removed: None,
            policy: SlowConsumerPolicy::default(),
            queue: 1024,
        }
    }
}

impl std::fmt::Debug for StreamOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOptions")
            .field("policy", &self.policy)
            .field("queue", &self.queue)
            .finish()
    }
}

/// How to reach a peer for stream records.
#[derive(Clone)]
pub(crate) enum Link {
    Lane(Arc<Lane>),
    Relay(PeerId),
}

fn link_to(shared: &Arc<Shared>, peer: PeerId) -> Result<Link, (Status, String)> {
    let relay = shared.relay_only
        || shared
            .lock_state()
            .peers
            .get(&peer)
            .is_some_and(|p| p.transport == Transport::Relay);
    if relay {
        return Ok(Link::Relay(peer));
    }
    super::interop::lane_to(shared, peer, None).map(Link::Lane)
}

fn send(
    shared: &Arc<Shared>,
    link: &Link,
    kind: u16,
    body: &[u8],
    timeout: Duration,
) -> Result<(), SendError> {
    send_many(shared, link, kind, std::iter::once(body), timeout)
}

/// Sends records in order (over a lane: one lock and one doorbell ring for all of them),
/// waiting up to `timeout` for room; the records before one that failed were sent.
fn send_many<'b>(
    shared: &Arc<Shared>,
    link: &Link,
    kind: u16,
    mut bodies: impl Iterator<Item = &'b [u8]>,
    timeout: Duration,
) -> Result<(), SendError> {
    match link {
        Link::Lane(l) => shared.send_many_on(l, kind, bodies, timeout),
        Link::Relay(p) => bodies.try_for_each(|body| {
            shared
                .conn
                .send(&ToGateway::Record {
                    to: *p,
                    kind,
                    body: body.to_vec(),
                })
                .map_err(|_| SendError::Closed(*p))
        }),
    }
}

/// How long an item too large to ever fit a lane at once may take to cross it (it goes
/// fragment by fragment as the subscriber reads).
const BIG_ITEM_WAIT: Duration = Duration::from_secs(5);

/// Sends a record that must not be lost: over `link` if it has room now, else around it
/// through the gateway (a full lane is often why it is sent: a slow subscriber dropped).
fn send_or_relay(shared: &Arc<Shared>, link: &Link, peer: PeerId, kind: u16, body: &[u8]) {
    if !matches!(try_send(shared, link, kind, body), Ok(true)) {
        let _ = send(shared, &Link::Relay(peer), kind, body, Duration::ZERO);
    }
}

fn try_send(shared: &Arc<Shared>, link: &Link, kind: u16, body: &[u8]) -> Result<bool, SendError> {
    match link {
        Link::Lane(l) => match l.try_send(kind, body)? {
            true => Ok(true),
            false if !l.fits_at_once(body.len()) => {
                send(shared, link, kind, body, BIG_ITEM_WAIT).map(|()| true)
            }
            false => Ok(false),
        },
        Link::Relay(_) => send(shared, link, kind, body, Duration::ZERO).map(|()| true),
    }
}

// ----- server side ----------------------------------------------------------------------------

/// One subscriber as the server sees it.
pub(crate) struct ServerSub {
    peer: PeerId,
    sub_id: u64,
    link: Link,
    caller: Arc<Instance>,
    args: Value,
    branch: String,
    out: Mutex<OutQueue>,
    /// Cleared once, by the swap in `drop_sub`; pushers stop at it (SYNC(sub-open)). A flag:
    /// what is queued is under `out`'s lock (and a pusher looks at the flag again under it).
    open: AtomicBool,
}

#[derive(Default)]
struct OutQueue {
    /// Encoded data records waiting for room, with their conflation key (dropping and
    /// conflating policies; under the blocking policy an item waits for room in the lane).
    pending: VecDeque<(Vec<u8>, Option<Value>)>,
    /// Items dropped since the last one delivered.
    gap: u32,
}

pub(crate) struct StreamEntry {
    name: Arc<str>,
    method_id: u32,
    options: StreamOptions,
    /// A pusher keeps the list it took while it is current ([`with_subs`]).
    subs: CowList<Arc<ServerSub>>,
    /// Set by `Stream::close`: requests are refused from then on (SYNC(stream-closed)).
    closed: AtomicBool,
}

/// A stream we serve. Cheap to clone.
#[derive(Clone)]
pub struct Stream {
    shared: Arc<Shared>,
    entry: Arc<StreamEntry>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("name", &self.entry.name)
            .finish()
    }
}

/// One accepted subscription, on the server.
#[derive(Clone)]
pub struct StreamSubscription {
    shared: Arc<Shared>,
    entry: Arc<StreamEntry>,
    sub: Arc<ServerSub>,
}

impl std::fmt::Debug for StreamSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSubscription")
            .field("branch", &self.sub.branch)
            .field("peer", &self.sub.peer)
            .finish()
    }
}

impl StreamSubscription {
    /// Who subscribed.
    pub fn instance(&self) -> &Instance {
        &self.sub.caller
    }
    /// The subscription's arguments.
    pub fn arguments(&self) -> &Value {
        &self.sub.args
    }
    /// The branch it was accepted on (`""` by default).
    pub fn branch(&self) -> &str {
        &self.sub.branch
    }
    /// Sends to this subscriber only (it sees `private: true`).
    pub fn push(&self, data: impl Into<Value>) -> Result<(), ClientError> {
        push_one(&self.shared, &self.entry, &self.sub, &data.into(), true)
    }
    /// Ends this subscription ("Server dropping a single subscription").
    pub fn close(&self) {
        drop_sub(
            &self.shared,
            &self.entry,
            &self.sub,
            "Server dropping a single subscription",
            true,
        );
    }
}

/// A subscription request waiting for the server's decision. Dropping it without deciding
/// leaves the subscriber waiting until its own timeout, as io.Connect does.
pub struct SubscriptionRequest {
    shared: Arc<Shared>,
    entry: Arc<StreamEntry>,
    peer: PeerId,
    sub_id: u64,
    link: Link,
    /// Who asks.
    pub instance: Arc<Instance>,
    /// The subscription's arguments.
    pub arguments: Value,
}

impl std::fmt::Debug for SubscriptionRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionRequest")
            .field("instance", &self.instance.application)
            .finish()
    }
}

impl SubscriptionRequest {
    /// Accepts on the default branch `""`.
    pub fn accept(self) {
        self.accept_on_branch("")
    }

    /// Accepts on a branch.
    pub fn accept_on_branch(self, branch: &str) {
        let sub = Arc::new(ServerSub {
            peer: self.peer,
            sub_id: self.sub_id,
            link: self.link.clone(),
            caller: self.instance.clone(),
            args: self.arguments.clone(),
            branch: branch.to_string(),
            out: Mutex::new(OutQueue::default()),
            open: AtomicBool::new(true),
        });
        #[cfg(test)]
        super::hook::at("accept_on_branch: subscription not added yet");
        let added = self.entry.subs.change(|v| {
            // SYNC(stream-closed): under the subscriber list's lock, which `Stream::close` takes
            // after setting the flag (to list the subscriptions it ends): either that close
            // lists this one, or the mutex orders its store before this load (so Relaxed is
            // enough). Looked at before the lock, a close could run in between and leave the
            // subscription on a closed stream, its subscriber never told.
            let open = !self.entry.closed.load(Ordering::Relaxed);
            if open {
                v.push(sub.clone());
            }
            open
        });
        if !added {
            return reply(
                &self.shared,
                &self.link,
                self.sub_id,
                false,
                "stream closed",
            );
        }
        let info = Value::object([
            ("branch", Value::from(branch)),
            ("policy", self.entry.options.policy.to_value()),
            ("queue", Value::from(self.entry.options.queue)),
        ]);
        reply_value(&self.shared, &self.link, self.sub_id, true, &info);
        if let Some(f) = &self.entry.options.on_added {
            f(&StreamSubscription {
                shared: self.shared.clone(),
                entry: self.entry.clone(),
                sub,
            });
        }
    }

    /// Rejects; the subscriber sees `Subscription rejected by user. <reason>`.
    pub fn reject(self, reason: &str) {
        reply(&self.shared, &self.link, self.sub_id, false, reason);
    }
}

fn reply(shared: &Arc<Shared>, link: &Link, sub_id: u64, accepted: bool, reason: &str) {
    reply_value(
        shared,
        link,
        sub_id,
        accepted,
        &Value::object([("reason", Value::from(reason))]),
    )
}

fn reply_value(shared: &Arc<Shared>, link: &Link, sub_id: u64, accepted: bool, info: &Value) {
    let mut body = Vec::new();
    if rec::reply(&mut body, sub_id, accepted, info).is_err() {
        // `info` is built here from names and numbers: never deep. Nothing half-built is sent.
        return;
    }
    let _ = send(shared, link, KIND_SUB_REPLY, &body, Duration::from_secs(5));
}

fn drop_sub(
    shared: &Arc<Shared>,
    entry: &Arc<StreamEntry>,
    sub: &Arc<ServerSub>,
    reason: &str,
    tell: bool,
) {
    // SYNC(sub-open): the RMW lets one caller drop the subscription; Release pairs with the
    // pushers' loads in `offer_ref`/`offer_batch` (a stop flag: the queue has its own lock, and
    // taking it below orders the swap before `offer_ref`'s second look, under that lock).
    if !sub.open.swap(false, Ordering::AcqRel) {
        return;
    }
    entry.subs.change(|v| v.retain(|s| !Arc::ptr_eq(s, sub)));
    let pending = std::mem::take(&mut sub.out.lock().unwrap_or_else(|e| e.into_inner()).pending);
    // SYNC(stream_pending): pairs with the load in `pending`; a count for the dispatch loop,
    // the queued items themselves are under each queue's lock.
    shared
        .stream_pending
        .fetch_sub(pending.len(), Ordering::AcqRel);
    if tell {
        let body = rec::close(sub.sub_id, reason);
        send_or_relay(shared, &sub.link, sub.peer, KIND_SUB_DROP, &body);
    }
    if let Some(f) = &entry.options.on_removed {
        f(&StreamSubscription {
            shared: shared.clone(),
            entry: entry.clone(),
            sub: sub.clone(),
        });
    }
}

thread_local! {
    static PUSH_SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    /// The subscriber list this thread pushed to last.
    static SUBS_KEPT: Kept<StreamEntry, Arc<ServerSub>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with a stream's subscribers, as this thread kept them while they are current, so a
/// pusher takes no lock and no reference count per push (a locked instruction right after the
/// previous item's stores waits for them to reach the subscriber, docs/benchmarks.md §6.2).
fn with_subs<T>(entry: &Arc<StreamEntry>, f: impl FnOnce(&[Arc<ServerSub>]) -> T) -> T {
    with_kept(&SUBS_KEPT, entry, |e| &e.subs, f)
}

/// An item larger than the gateway allows is refused to the pusher (it would otherwise close
/// every subscriber it was queued for).
fn check_size(shared: &Shared, body: &[u8]) -> Result<(), ClientError> {
    let size = body.len().saturating_sub(20);
    if size > shared.max_payload() {
        return Err(ClientError::PayloadTooLarge {
            size,
            max: shared.max_payload(),
        });
    }
    Ok(())
}

/// Queues or sends one data record to one subscriber under the stream's policy.
fn push_one(
    shared: &Arc<Shared>,
    entry: &Arc<StreamEntry>,
    sub: &Arc<ServerSub>,
    data: &Value,
    private: bool,
) -> Result<(), ClientError> {
    check_item(data)?;
    let mut body = Vec::new();
    rec::data_into(&mut body, private, data)?;
    check_size(shared, &body)?;
    rec::set_sub_id(&mut body, sub.sub_id);
    offer(shared, entry, sub, body, conflation_key(entry, data))
}

/// The key an item is conflated by, under the conflating policy.
fn conflation_key(entry: &StreamEntry, data: &Value) -> Option<Value> {
    match &entry.options.policy {
        SlowConsumerPolicy::Conflate(k) => data.get(k).cloned(),
        _ => None,
    }
}

/// Items are objects (or raw bytes, which travel as they are).
fn check_item(data: &Value) -> Result<(), ClientError> {
    match data {
        Value::Map(_) | Value::Bytes(_) => Ok(()),
        _ => Err(ClientError::InvalidArgument(
            "Invalid arguments. Data must be an object.".into(),
        )),
    }
}

/// [`offer_ref`] for several records side by side in `body` (`items` are their values, for
/// conflation keys). Under the blocking policy the batch goes under one queue lock and, over a
/// lane, one lane lock and one doorbell ring.
fn offer_batch(
    shared: &Arc<Shared>,
    entry: &Arc<StreamEntry>,
    sub: &Arc<ServerSub>,
    body: &mut [u8],
    ends: &[usize],
    items: &[Value],
) -> Result<(), ClientError> {
    let SlowConsumerPolicy::Block(timeout) = &entry.options.policy else {
        let mut at = 0;
        for (&end, v) in ends.iter().zip(items) {
            offer_ref(
                shared,
                entry,
                sub,
                &mut body[at..end],
                conflation_key(entry, v),
            )?;
            at = end;
        }
        return Ok(());
    };
    // SYNC(sub-open): pairs with the swap in `drop_sub`; a stop flag only.
    if sub.open.load(Ordering::Acquire) {
        let r = send_many(
            shared,
            &sub.link,
            KIND_STREAM_DATA,
            split_at(body, ends),
            *timeout,
        );
        blocked_send_failed(shared, entry, sub, r);
    }
    Ok(())
}

/// Under the blocking policy nothing waits in the subscriber's queue (items go straight to the
/// link, waiting for room there; records carry gap 0 as built), so a failed send ends the
/// subscription: a subscriber that did not make room in time is a slow consumer (and is told,
/// around the lane if need be); one whose link broke is gone.
fn blocked_send_failed(
    shared: &Arc<Shared>,
    entry: &Arc<StreamEntry>,
    sub: &Arc<ServerSub>,
    r: Result<(), SendError>,
) {
    match r {
        Ok(()) => {}
        Err(SendError::Stalled(_)) => drop_sub(shared, entry, sub, "slow consumer", true),
        Err(_) => drop_sub(shared, entry, sub, "subscriber gone", false),
    }
}

fn offer(
    shared: &Arc<Shared>,
    entry: &Arc<StreamEntry>,
    sub: &Arc<ServerSub>,
    body: Vec<u8>,
    key: Option<Value>,
) -> Result<(), ClientError> {
    let mut body = body;
    offer_ref(shared, entry, sub, &mut body, key)
}

/// [`offer`] on a borrowed record: copied only if it has to wait in the queue.
fn offer_ref(
    shared: &Arc<Shared>,
    entry: &Arc<StreamEntry>,
    sub: &Arc<ServerSub>,
    body: &mut [u8],
    key: Option<Value>,
) -> Result<(), ClientError> {
    // SYNC(sub-open): pairs with the swap in `drop_sub`; a stop flag only (the queue below is
    // under its own lock, and the flag is looked at again under it).
    if !sub.open.load(Ordering::Acquire) {
        return Ok(());
    }
    if let SlowConsumerPolicy::Block(timeout) = &entry.options.policy {
        let r = send(shared, &sub.link, KIND_STREAM_DATA, body, *timeout);
        blocked_send_failed(shared, entry, sub, r);
        return Ok(());
    }
    #[cfg(test)]
    super::hook::at("offer_ref: open, queue not locked yet");
    let mut out = sub.out.lock().unwrap_or_else(|e| e.into_inner());
    // SYNC(sub-open): again, under the queue's lock, which `drop_sub` takes after its swap: if
    // it has emptied the queue already, the mutex orders its swap before this load (so Relaxed
    // is enough) and nothing is queued, else it empties the queue after us. An item queued for
    // a dropped subscription would stay counted in `stream_pending` forever (and the dispatch
    // loop flush every millisecond for it).
    if !sub.open.load(Ordering::Relaxed) {
        return Ok(());
    }
    flush_locked(shared, sub, &mut out);
    if out.pending.is_empty() {
        rec::set_gap(body, out.gap);
        match try_send(shared, &sub.link, KIND_STREAM_DATA, body) {
            Ok(true) => {
                out.gap = 0;
                return Ok(());
            }
            Ok(false) => {}
            Err(_) => {
                drop(out);
                drop_sub(shared, entry, sub, "subscriber gone", false);
                return Ok(());
            }
        }
    }
    // Dropping the oldest, or conflating: the queue holds what the lane has no room for.
    if let Some(k) = &key {
        if let Some(slot) = out
            .pending
            .iter_mut()
            .find(|(_, pk)| pk.as_ref() == Some(k))
        {
            slot.0 = body.to_vec();
            return Ok(());
        }
    }
    if out.pending.len() >= entry.options.queue.max(1) {
        out.pending.pop_front();
        // SYNC(stream_pending): a count for `pending`; the item itself is under `out`'s lock.
        shared.stream_pending.fetch_sub(1, Ordering::AcqRel);
        out.gap = out.gap.saturating_add(1);
    }
    out.pending.push_back((body.to_vec(), key));
    // SYNC(stream_pending): a count for `pending`; the item itself is under `out`'s lock.
    shared.stream_pending.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// Sends what is queued for `sub` while there is room.
fn flush_locked(shared: &Arc<Shared>, sub: &ServerSub, out: &mut OutQueue) {
    while let Some((b, _)) = out.pending.front_mut() {
        rec::set_gap(b, out.gap);
        match try_send(shared, &sub.link, KIND_STREAM_DATA, b) {
            Ok(true) => {
                out.gap = 0;
                out.pending.pop_front();
                // SYNC(stream_pending): a count for `pending`; the queue is under `out`'s lock.
                shared.stream_pending.fetch_sub(1, Ordering::AcqRel);
            }
            _ => break,
        }
    }
}

/// The streams table (streams we serve, subscriptions we hold).
fn table(shared: &Shared) -> std::sync::MutexGuard<'_, StreamsState> {
    shared.streams.lock().unwrap_or_else(|e| e.into_inner())
}

/// The streams we serve, taken out of the lock (callers then lock each entry's subscribers).
fn served_streams(shared: &Shared) -> Vec<Arc<StreamEntry>> {
    table(shared).served.values().cloned().collect()
}

/// One of our subscriptions, by id.
fn client_sub(shared: &Shared, id: u64) -> Option<Arc<ClientSub>> {
    table(shared).subs.get(&id).cloned()
}

/// Drops one of our subscriptions from the table.
fn forget_client_sub(shared: &Shared, id: u64) {
    table(shared).subs.remove(&id);
}

/// Every subscription of ours, taken out of the lock.
fn client_subs(shared: &Shared) -> Vec<Arc<ClientSub>> {
    table(shared).subs.values().cloned().collect()
}

/// Flushes every subscriber queue (called by the dispatch loop while anything is queued).
pub(crate) fn flush_all(shared: &Arc<Shared>) {
    for e in served_streams(shared) {
        let subs = e.subs.snapshot();
        for s in subs.iter() {
            let mut out = s.out.lock().unwrap_or_else(|e| e.into_inner());
            if !out.pending.is_empty() {
                flush_locked(shared, s, &mut out);
            }
        }
    }
}

impl Stream {
    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// Pushes to every subscriber of every branch.
    pub fn push(&self, data: impl Into<Value>) -> Result<(), ClientError> {
        self.push_where(&data.into(), |_| true)
    }

    /// Pushes to the subscribers of the given branches (none subscribed: nothing happens).
    pub fn push_to_branches(
        &self,
        branches: &[&str],
        data: impl Into<Value>,
    ) -> Result<(), ClientError> {
        self.push_where(&data.into(), |b| branches.contains(&b))
    }

    /// Pushes several items to every subscriber, in order, each delivered as if pushed on its
    /// own. The per-push synchronisation is paid once per batch and subscriber: one look at
    /// the subscriber list, and under the blocking policy one queue lock and, over a lane, one
    /// lane lock and one doorbell ring. Every item is checked and encoded before any is sent: a
    /// bad item refuses the whole batch.
    pub fn push_batch(&self, items: &[Value]) -> Result<(), ClientError> {
        let mut body = PUSH_SCRATCH.with(|c| c.take());
        body.clear();
        let mut ends = Vec::with_capacity(items.len());
        for v in items {
            let at = body.len();
            let r = check_item(v)
                .and_then(|()| rec::data_append(&mut body, false, v).map_err(ClientError::from))
                .and_then(|()| check_size(&self.shared, &body[at..]));
            if let Err(e) = r {
                PUSH_SCRATCH.with(|c| c.set(body));
                return Err(e);
            }
            ends.push(body.len());
        }
        let r = with_subs(&self.entry, |subs| {
            for s in subs {
                let mut at = 0;
                for &end in &ends {
                    rec::set_sub_id(&mut body[at..end], s.sub_id);
                    at = end;
                }
                offer_batch(&self.shared, &self.entry, s, &mut body, &ends, items)?;
            }
            Ok(())
        });
        PUSH_SCRATCH.with(|c| c.set(body));
        r
    }

    fn push_where(&self, data: &Value, want: impl Fn(&str) -> bool) -> Result<(), ClientError> {
        check_item(data)?;
        with_subs(&self.entry, |subs| {
            if subs.is_empty() {
                return Ok(());
            }
            let key = conflation_key(&self.entry, data);
            // One encoding per push, in a reused buffer; only the subscription id differs.
            let mut body = PUSH_SCRATCH.with(|c| c.take());
            let mut r = rec::data_into(&mut body, false, data)
                .map_err(ClientError::from)
                .and_then(|()| check_size(&self.shared, &body));
            if r.is_ok() {
                for s in subs.iter().filter(|s| want(&s.branch)) {
                    rec::set_sub_id(&mut body, s.sub_id);
                    r = offer_ref(&self.shared, &self.entry, s, &mut body, key.clone());
                    if r.is_err() {
                        break;
                    }
                }
            }
            PUSH_SCRATCH.with(|c| c.set(body));
            r
        })
    }

    /// Every current subscription.
    pub fn subscriptions(&self) -> Vec<StreamSubscription> {
        self.entry
            .subs
            .snapshot()
            .iter()
            .map(|sub| StreamSubscription {
                shared: self.shared.clone(),
                entry: self.entry.clone(),
                sub: sub.clone(),
            })
            .collect()
    }

    /// Branch keys that have subscribers.
    pub fn branches(&self) -> Vec<String> {
        let mut b: Vec<String> = self
            .entry
            .subs
            .snapshot()
            .iter()
            .map(|s| s.branch.clone())
            .collect();
        b.sort();
        b.dedup();
        b
    }

    /// Ends every subscription on a branch.
    pub fn close_branch(&self, branch: &str) {
        for s in self
            .subscriptions()
            .into_iter()
            .filter(|s| s.branch() == branch)
        {
            drop_sub(
                &self.shared,
                &self.entry,
                &s.sub,
                "Server dropping a branch",
                true,
            );
        }
    }

    /// Ends every subscription and unregisters the stream. Closing again does nothing (the
    /// name may be a new stream's by then, which stays).
    pub fn close(&self) -> Result<(), ClientError> {
        // SYNC(stream-closed): new requests are refused (`accept_on_branch`, `on_request`); a flag
        // only, the subscriptions are dropped below under their own locks. The subscriber list's
        // lock, taken below to list them, orders the store before `accept_on_branch`'s look at
        // the flag, under the same lock, if that comes after. The RMW lets one caller close.
        if self.entry.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for s in self.subscriptions() {
            drop_sub(&self.shared, &self.entry, &s.sub, "Stream closed", true);
        }
        table(&self.shared).served.remove(&self.entry.method_id);
        super::interop::unregister(&self.shared, &self.entry.name)
    }
}

pub(crate) fn create(
    shared: &Arc<Shared>,
    mut def: MethodDef,
    options: StreamOptions,
) -> Result<Stream, ClientError> {
    def.streaming = true;
    let name: Arc<str> = Arc::from(def.name.as_str());
    // The entry is served before the stream is announced: a subscriber waiting for the
    // stream asks the moment it learns of it, and must find it.
    let mut made = None;
    let registered = super::interop::register_with(shared, def, |method_id| {
        let entry = Arc::new(StreamEntry {
            name,
            method_id,
            options,
            subs: CowList::default(),
            closed: AtomicBool::new(false),
        });
        table(shared).served.insert(method_id, entry.clone());
        made = Some(entry);
        super::Handler::Stream
    });
    match (registered, made) {
        (Ok(_), Some(entry)) => Ok(Stream {
            shared: shared.clone(),
            entry,
        }),
        (Err(e), made) => {
            if let Some(entry) = made {
                table(shared).served.remove(&entry.method_id);
            }
            Err(e)
        }
        (Ok(_), None) => Err(ClientError::Protocol(
            "a stream registered without its entry".into(),
        )),
    }
}

// ----- subscriber side ------------------------------------------------------------------------

/// What a stream subscriber receives.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// One item.
    Data {
        data: Value,
        server: Arc<Instance>,
        /// Sent to this subscriber alone.
        private: bool,
        /// Items the slow-consumer policy dropped before this one (0 normally).
        gap: u64,
    },
    /// The subscription ended: every server dropped it (`server_initiated`), or we closed it.
    Closed {
        reason: String,
        server_initiated: bool,
    },
}

/// Subscription parameters.
#[derive(Debug, Clone)]
pub struct StreamParams {
    pub arguments: Value,
    /// `Best`, `All`, an instance filter or a list (`SkipMine` is refused, as in io.Connect).
    pub target: Target,
    /// How long to wait for a server to appear.
    pub wait: Duration,
    /// How long a server has to accept.
    pub timeout: Duration,
}

impl Default for StreamParams {
    fn default() -> Self {
        Self {
            arguments: Value::map(),
            target: Target::Best,
            wait: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum ServerState {
    Pending,
    Accepted,
    Rejected(String),
    /// Refused by the access-control policy (the server's library or the gateway).
    Denied(String),
    /// The server no longer has the stream registration asked for (closed after the
    /// subscriber chose it; perhaps created again under another id).
    Removed(String),
    Gone,
}

/// Where a subscription's servers stand, taken together.
enum Standing<'a> {
    /// One of them accepted.
    Accepted,
    /// Every one answered no or is gone: the first refusal (`Rejected` or `Denied`), if any.
    Over(Option<&'a ServerState>),
    /// Answers are still due.
    Open,
}

fn standing(r: &[Remote]) -> Standing<'_> {
    if r.iter().any(|x| x.state == ServerState::Accepted) {
        return Standing::Accepted;
    }
    let over = |s: &ServerState| {
        matches!(
            s,
            ServerState::Rejected(_)
                | ServerState::Denied(_)
                | ServerState::Removed(_)
                | ServerState::Gone
        )
    };
    if r.iter().all(|x| over(&x.state)) {
        return Standing::Over(
            r.iter()
                .map(|x| &x.state)
                .find(|s| **s != ServerState::Gone),
        );
    }
    Standing::Open
}

struct Remote {
    peer: PeerId,
    /// The stream registration asked for.
    method: u32,
    identity: Arc<Instance>,
    link: Link,
    state: ServerState,
}

pub(crate) type StreamCallback = Arc<dyn Fn(&StreamEvent) + Send + Sync>;

pub(crate) struct ClientSub {
    id: u64,
    /// The stream and how it was subscribed (to subscribe again after a reconnection).
    name: String,
    params: StreamParams,
    cb: StreamCallback,
    /// Its servers and where each stands. A change wakes the client's waiters
    /// ([`Shared::wake_all`]): `subscribe` waits through [`Shared::wait_for`], which reads
    /// incoming records while it waits, so a subscription made inside a callback on the
    /// dispatch thread still hears its server's answer.
    remotes: Mutex<Vec<Remote>>,
    inbox: Mutex<Inbox>,
    /// The server's policy and queue bound (from its answer).
    policy: Mutex<(SlowConsumerPolicy, usize)>,
    /// Non-zero when the policy is blocking: items read on the dispatch thread may then skip
    /// the inbox ([`StreamBatch`]), this many at most per batch (the queue bound). Under the
    /// others the inbox is where a slow callback's backlog is dropped or conflated, so every
    /// item goes through it.
    batch_bound: AtomicUsize,
    /// Ended (by either side): no new items are accepted.
    /// Set by the swaps in `end_client_sub`, `server_gone`, `lost` (the winner ends it) or by
    /// `subscribe` on failure (SYNC(sub-closed)); a flag: the inbox has its own lock.
    closed: AtomicBool,
    /// Ended by us: queued items are not delivered any more.
    client_closed: AtomicBool,
}

#[derive(Default)]
struct Inbox {
    items: VecDeque<(StreamEvent, Option<Value>)>,
    gap: u64,
    scheduled: bool,
}

/// A subscription to a stream; `close` (or dropping it) ends it.
pub struct ClientSubscription {
    shared: Arc<Shared>,
    sub: Arc<ClientSub>,
}

impl std::fmt::Debug for ClientSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSubscription")
            .field("id", &self.sub.id)
            .finish()
    }
}

impl ClientSubscription {
    /// The servers that accepted.
    pub fn servers(&self) -> Vec<Instance> {
        let r = self.sub.remotes.lock().unwrap_or_else(|e| e.into_inner());
        r.iter()
            .filter(|x| x.state == ServerState::Accepted)
            .map(|x| (*x.identity).clone())
            .collect()
    }

    /// Ends the subscription ("ClientInitiated").
    pub fn close(&self) {
        end_client_sub(&self.shared, &self.sub, true, true);
    }
}

impl Drop for ClientSubscription {
    fn drop(&mut self) {
        end_client_sub(&self.shared, &self.sub, true, true);
    }
}

/// Ends our subscription `sub`: `tell` its servers, and give its callback the `Closed` event
/// (`closed_event`; not for a subscribe that failed).
fn end_client_sub(shared: &Arc<Shared>, sub: &Arc<ClientSub>, tell: bool, closed_event: bool) {
    // SYNC(sub-client-closed): stops delivery of queued items (`deliver_batch`, `drain`); a flag
    // only, nothing else rides on it.
    sub.client_closed.store(true, Ordering::Release);
    // SYNC(sub-closed): the RMW lets one caller end the subscription; Release pairs with the
    // loads that refuse new items (`accept_item`, `claim`, `StreamBatch::add`, `restore`).
    if sub.closed.swap(true, Ordering::AcqRel) {
        return;
    }
    forget_client_sub(shared, sub.id);
    let remotes: Vec<Link> = {
        let mut r = sub.remotes.lock().unwrap_or_else(|e| e.into_inner());
        let links = r
            .iter()
            .filter(|x| matches!(x.state, ServerState::Accepted | ServerState::Pending))
            .map(|x| x.link.clone())
            .collect();
        for x in r.iter_mut() {
            x.state = ServerState::Gone;
        }
        links
    };
    if tell {
        for l in remotes {
            let _ = send(
                shared,
                &l,
                KIND_SUB_CLOSE,
                &rec::close(sub.id, "ClientInitiated"),
                Duration::from_secs(1),
            );
        }
    }
    shared.wake_all();
    if !closed_event {
        return;
    }
    let ev = StreamEvent::Closed {
        reason: "ClientInitiated".into(),
        server_initiated: false,
    };
    let cb = sub.cb.clone();
    shared.push_task(Task::Call(Box::new(move || cb(&ev))));
}

pub(crate) fn subscribe(
    shared: &Arc<Shared>,
    name: &str,
    params: StreamParams,
    cb: StreamCallback,
) -> Result<ClientSubscription, StreamError> {
    if name.is_empty() {
        return Err(StreamError::InvalidArgument(
            "Please provide the stream name".into(),
        ));
    }
    // No stream can have a longer name: refused at once, not waited for.
    crate::model::check_name_len("stream name", name, crate::model::MAX_NAME_LEN)
        .map_err(StreamError::InvalidArgument)?;
    if params.target == Target::SkipMine {
        return Err(StreamError::InvalidArgument(
            "\"skipMine\" is not a valid target. Valid targets are \"all\", \"best\", or an instance.".into(),
        ));
    }
    if let Err(message) = shared.check_mine(PolicyAction::Invoke, name) {
        return Err(StreamError::Client(ClientError::Gateway {
            status: Status::PermissionDenied,
            message,
        }));
    }
    crate::wire::codec::check(&params.arguments)
        .map_err(|e| StreamError::InvalidArgument(e.to_string()))?;
    // Servers of the stream, waiting for one to appear.
    let wait_until = crate::wait::deadline(params.wait);
    let chosen = servers_within(shared, name, &params.target, &[], &[], wait_until)?;
    let sub = Arc::new(ClientSub {
        // Relaxed: ids only need to be unique; nothing is published through the counter.
        id: shared.next_stream_sub.fetch_add(1, Ordering::Relaxed),
        name: name.to_string(),
        params: params.clone(),
        cb,
        remotes: Mutex::new(Vec::new()),
        inbox: Mutex::new(Inbox::default()),
        policy: Mutex::new((SlowConsumerPolicy::default(), 1024)),
        batch_bound: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        client_closed: AtomicBool::new(false),
    });
    table(shared).subs.insert(sub.id, sub.clone());
    send_requests(shared, &sub, &chosen);
    // The first acceptance completes the subscription; later ones join it.
    let mut deadline = crate::wait::deadline(params.timeout);
    let remotes = || sub.remotes.lock().unwrap_or_else(|e| e.into_inner());
    let mut stale: Vec<(PeerId, u32)> = Vec::new();
    loop {
        shared.wait_for(|| !matches!(standing(&remotes()), Standing::Open), deadline);
        // Every server refused or is gone, and some said they no longer have the registration
        // asked for: the stream was closed after we chose it, perhaps created again under an
        // id our view (which comes through the gateway, later than the server's own lane)
        // does not show yet. Ask the registrations the view shows next, within the wait.
        let r = remotes();
        let removed = matches!(standing(&r), Standing::Over(_))
            && r.iter().any(|x| matches!(x.state, ServerState::Removed(_)));
        if !removed {
            break;
        }
        stale.extend(
            r.iter()
                .filter(|x| matches!(x.state, ServerState::Removed(_)))
                .map(|x| (x.peer, x.method)),
        );
        // Servers that answered otherwise are not asked again.
        let answered: Vec<PeerId> = r
            .iter()
            .filter(|x| !matches!(x.state, ServerState::Removed(_)))
            .map(|x| x.peer)
            .collect();
        drop(r);
        match servers_within(shared, name, &params.target, &stale, &answered, wait_until) {
            Ok(c) => {
                remotes().retain(|x| !matches!(x.state, ServerState::Removed(_)));
                // `timeout` counts from when a request is sent.
                deadline = crate::wait::deadline(params.timeout);
                send_requests(shared, &sub, &c);
            }
            // Nothing else in time: the refusal stands.
            Err(_) => break,
        }
    }
    // `Err(None)`: no answer in time.
    let r = remotes();
    let outcome = match standing(&r) {
        Standing::Accepted => Ok(()),
        Standing::Over(Some(ServerState::Denied(m))) => {
            Err(Some(StreamError::Client(ClientError::Gateway {
                status: Status::PermissionDenied,
                message: m.clone(),
            })))
        }
        Standing::Over(Some(ServerState::Rejected(m) | ServerState::Removed(m))) => {
            Err(Some(StreamError::Rejected(m.clone())))
        }
        // The servers were there, but reaching them needs the gateway.
        Standing::Over(_) if !shared.conn.is_connected() && !shared.is_closed() => {
            Err(Some(StreamError::Client(ClientError::Disconnected)))
        }
        Standing::Over(_) => Err(Some(StreamError::NoServer)),
        Standing::Open => Err(None),
    };
    drop(r);
    match outcome {
        Ok(()) => Ok(ClientSubscription {
            shared: shared.clone(),
            sub,
        }),
        Err(Some(e)) => {
            // SYNC(sub-closed): no new items are accepted (`accept_item`, `claim`); a flag only.
            sub.closed.store(true, Ordering::Release);
            forget_client_sub(shared, sub.id);
            Err(e)
        }
        Err(None) => {
            // The caller gets the error, not a `Closed` event of a subscription it never had
            // (a C app has freed what the callback would reach by then).
            end_client_sub(shared, &sub, true, false);
            Err(StreamError::Timeout(params.timeout))
        }
    }
}

/// The servers of stream `name` that `target` picks, leaving out `stale` registrations and the
/// servers in `answered`, waiting until `wait_until` for one to appear.
fn servers_within(
    shared: &Arc<Shared>,
    name: &str,
    target: &Target,
    stale: &[(PeerId, u32)],
    answered: &[PeerId],
    wait_until: Instant,
) -> Result<Vec<(Arc<Instance>, u32)>, StreamError> {
    let found = shared.await_view(wait_until, true, || {
        let mut c = candidates(shared, name, target, stale);
        c.retain(|(i, _)| !answered.contains(&i.peer_id));
        (!c.is_empty()).then_some(c)
    });
    found.map_err(|why| match why {
        ViewWait::Disconnected => StreamError::Client(ClientError::Disconnected),
        ViewWait::Closed => StreamError::Client(ClientError::Closed),
        ViewWait::Deadline => StreamError::NoServer,
    })
}

/// The servers of stream `name` that `target` picks, ourselves included, leaving out the
/// registrations in `stale` (`(server, method id)`: ones a server said it no longer has).
fn candidates(
    shared: &Shared,
    name: &str,
    target: &Target,
    stale: &[(PeerId, u32)],
) -> Vec<(Arc<Instance>, u32)> {
    let st = shared.lock_state();
    let mut cands: Vec<(Arc<Instance>, u32)> = Vec::new();
    let fresh = |peer: PeerId, id: u32| !stale.contains(&(peer, id));
    let my_id = shared.my_id();
    if let Some((id, _)) = st
        .my_methods
        .iter()
        .find(|(id, d)| d.streaming && method_matches(name, d) && fresh(my_id, **id))
    {
        cands.push((shared.me(), *id));
    }
    for p in st.peers.values() {
        let peer = p.identity.peer_id;
        if let Some((id, _)) = p
            .methods
            .iter()
            .find(|(id, d)| d.streaming && method_matches(name, d) && fresh(peer, **id))
        {
            cands.push((p.identity.clone(), *id));
        }
    }
    let insts: Vec<&Instance> = cands.iter().map(|c| &*c.0).collect();
    let picked: Vec<PeerId> = select(target, shared.my_id(), &insts)
        .iter()
        .map(|i| i.peer_id)
        .collect();
    picked
        .into_iter()
        .filter_map(|p| cands.iter().find(|c| c.0.peer_id == p).cloned())
        .collect()
}

/// Asks each chosen server for the subscription.
fn send_requests(shared: &Arc<Shared>, sub: &Arc<ClientSub>, chosen: &[(Arc<Instance>, u32)]) {
    let params = &sub.params;
    let my_id = shared.my_id();
    let mut body = Vec::new();
    for (server, method_id) in chosen {
        let link = if server.peer_id == my_id {
            Link::Relay(my_id)
        } else {
            match link_to(shared, server.peer_id) {
                Ok(l) => l,
                Err(_) => continue,
            }
        };
        if rec::request(&mut body, sub.id, *method_id, &params.arguments).is_err() {
            // Checked before the subscription was made; a failure here reaches nobody.
            continue;
        }
        sub.remotes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Remote {
                peer: server.peer_id,
                method: *method_id,
                identity: server.clone(),
                link: link.clone(),
                state: ServerState::Pending,
            });
        if server.peer_id == my_id {
            // Subscribing to ourselves: handled as if it came in from a peer.
            on_request(shared, my_id, shared.me(), Link::Relay(my_id), &body);
        } else if send(shared, &link, KIND_SUB_REQUEST, &body, params.timeout).is_err() {
            set_state(shared, sub, server.peer_id, ServerState::Gone);
        }
    }
}

fn set_state(shared: &Shared, sub: &ClientSub, peer: PeerId, s: ServerState) {
    let mut r = sub.remotes.lock().unwrap_or_else(|e| e.into_inner());
    for x in r.iter_mut().filter(|x| x.peer == peer) {
        if x.state != ServerState::Gone {
            x.state = s.clone();
        }
    }
    drop(r);
    shared.wake_all();
}

/// Why a stream subscription failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    InvalidArgument(String),
    /// No server matched within the wait.
    #[error("Subscription failed. No available servers matched the target params.")]
    NoServer,
    /// Every server rejected.
    #[error("Subscription rejected by user. {0}")]
    Rejected(String),
    /// No server answered in time.
    #[error("Subscription failed. Subscription attempt timed out after {} ms.", .0.as_millis())]
    Timeout(Duration),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl StreamError {
    /// The status code for this error.
    pub fn status(&self) -> Status {
        match self {
            StreamError::InvalidArgument(_) => Status::InvalidArgument,
            StreamError::NoServer => Status::NoServer,
            StreamError::Rejected(_) => Status::MethodFailed,
            StreamError::Timeout(_) => Status::Timeout,
            StreamError::Client(e) => e.status(),
        }
    }
}

// ----- records --------------------------------------------------------------------------------

/// A stream record arrived from `from` (over a lane or relayed; data read from a lane goes to
/// [`on_lane_data`] instead).
pub(crate) fn on_record(
    shared: &Arc<Shared>,
    from: PeerId,
    identity: Arc<Instance>,
    link: Link,
    kind: u16,
    body: &[u8],
) -> Result<(), &'static str> {
    let sub_id = rec::sub_id(body).map_err(|_| "short stream record")?;
    match kind {
        KIND_SUB_REQUEST => {
            on_request(shared, from, identity, link, body);
            Ok(())
        }
        KIND_SUB_REPLY => {
            let rec::Reply { accepted, info, .. } =
                rec::parse_reply(body).map_err(|_| "bad stream reply")?;
            let sub = client_sub(shared, sub_id).filter(|s| {
                s.remotes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .any(|x| x.peer == from && x.state != ServerState::Gone)
            });
            let Some(sub) = sub else {
                // An acceptance of a subscription we no longer hold (it timed out, or was
                // closed, before the server answered; our close found nothing to end then):
                // end it, or the server keeps feeding a subscriber that is not there.
                if accepted {
                    let body = rec::close(sub_id, "ClientInitiated");
                    send_or_relay(shared, &link, from, KIND_SUB_CLOSE, &body);
                }
                return Ok(());
            };
            if accepted {
                if let Some(p) = info.get("policy") {
                    let queue = info
                        .get("queue")
                        .and_then(Value::as_i64)
                        .unwrap_or(1024)
                        .clamp(1, 1 << 20) as usize;
                    let policy = SlowConsumerPolicy::from_value(p);
                    let batch = matches!(policy, SlowConsumerPolicy::Block(_));
                    // SYNC(batch_bound): pairs with `claim`; the value is all it carries
                    // (the policy, stored next, is read under its own lock).
                    sub.batch_bound
                        .store(if batch { queue } else { 0 }, Ordering::Release);
                    *sub.policy.lock().unwrap_or_else(|e| e.into_inner()) = (policy, queue);
                }
                set_state(shared, &sub, from, ServerState::Accepted);
            } else {
                let reason = info
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let flag = |k: &str| info.get(k).and_then(Value::as_bool) == Some(true);
                let state = if flag("denied") {
                    ServerState::Denied(reason)
                } else if flag("removed") {
                    ServerState::Removed(reason)
                } else {
                    ServerState::Rejected(reason)
                };
                set_state(shared, &sub, from, state);
            }
            Ok(())
        }
        // Relayed: no lane of ours to pause.
        KIND_STREAM_DATA => to_inbox(shared, client_sub(shared, sub_id), body, identity, None),
        KIND_SUB_CLOSE => {
            let (_, reason) = rec::parse_close(body).map_err(|_| "short stream close")?;
            // A subscriber leaving one of our streams.
            for e in served_streams(shared) {
                let hit = e
                    .subs
                    .snapshot()
                    .iter()
                    .find(|s| s.peer == from && s.sub_id == sub_id)
                    .cloned();
                if let Some(s) = hit {
                    drop_sub(shared, &e, &s, &reason, false);
                }
            }
            Ok(())
        }
        KIND_SUB_DROP => {
            let (_, reason) = rec::parse_close(body).map_err(|_| "short stream drop")?;
            // A server dropping us.
            let sub = client_sub(shared, sub_id);
            if let Some(sub) = sub {
                server_gone(shared, &sub, from, &reason);
            }
            Ok(())
        }
        _ => Err("unknown stream record"),
    }
}

fn on_request(
    shared: &Arc<Shared>,
    from: PeerId,
    identity: Arc<Instance>,
    link: Link,
    body: &[u8],
) {
    let (sub_id, method_id, args) = match rec::parse_request(body) {
        Ok(r) => (r.sub_id, r.method_id, r.args),
        Err(_) => {
            if let Ok(sub_id) = rec::sub_id(body) {
                reply(
                    shared,
                    &link,
                    sub_id,
                    false,
                    "malformed subscription request",
                );
            }
            return;
        }
    };
    let entry = table(shared).served.get(&method_id).cloned();
    // SYNC(stream-closed): pairs with `Stream::close`; a flag only (a closed stream refuses).
    let Some(entry) = entry.filter(|e| !e.closed.load(Ordering::Acquire)) else {
        let plain = shared
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&method_id);
        if plain {
            return reply(shared, &link, sub_id, false, "Method is not a stream");
        }
        // Closed after the subscriber chose it: `removed` lets it look for the stream again
        // (created anew under another id, which its view may not show yet).
        let info = Value::object([
            ("reason", Value::from(super::engine::METHOD_REMOVED)),
            ("removed", Value::from(true)),
        ]);
        return reply_value(shared, &link, sub_id, false, &info);
    };
    if !shared.peer_allowed(from, PolicyAction::Invoke, &entry.name) {
        return reply_value(shared, &link, sub_id, false, &rec::denial(&entry.name));
    }
    let req = SubscriptionRequest {
        shared: shared.clone(),
        entry: entry.clone(),
        peer: from,
        sub_id,
        link,
        instance: identity,
        arguments: args,
    };
    shared.push_task(Task::Request(Box::new(move || {
        match &entry.options.on_request {
            Some(f) => f(req),
            None => req.accept(),
        }
    })));
}

/// A data record for `sub` (none: one we no longer hold) through the inbox; `lane`, the one it
/// was read from, pauses if it fills a blocking subscriber's queue. Extra GW3 fields (sequence,
/// snapshot) have no place in knit's stream events.
fn to_inbox(
    shared: &Shared,
    sub: Option<Arc<ClientSub>>,
    body: &[u8],
    server: Arc<Instance>,
    lane: Option<&Lane>,
) -> Result<(), &'static str> {
    let d = rec::parse_data(body).map_err(|_| "undecodable stream data")?;
    let Some(sub) = sub else { return Ok(()) };
    let ev = StreamEvent::Data {
        data: d.data,
        server,
        private: d.private,
        gap: d.gap as u64,
    };
    accept_item(shared, &sub, ev, lane);
    Ok(())
}

/// Data items one pump round read from one lane for one of our subscriptions, delivered by the
/// dispatch thread right after the round: one table lookup and one inbox lock per batch instead
/// of a lookup, a policy lock, an inbox lock and a queued item each. The batch holds the
/// subscription's delivery claim (`Inbox::scheduled`), so items that arrive meanwhile by another
/// path (relayed, or read by a thread waiting for a reply) wait in the inbox and are delivered
/// after it, in order. Items are decoded into values a former batch left in `items`, so a feed
/// of like-shaped items is read without allocating.
pub(crate) struct StreamBatch {
    sub: Arc<ClientSub>,
    lane: Arc<Lane>,
    /// (item, private, gap); the first `len` are this batch's.
    items: Vec<(Value, bool, u32)>,
    len: usize,
    /// The subscription's queue bound: a batch holds no more (further items go to the inbox,
    /// which pauses the lane when it fills, so a subscriber that does not keep up holds at
    /// most two queues' worth and its server's pushes wait, as the blocking policy says).
    bound: usize,
    /// Record bytes read, to let go of the values after a batch of large items.
    bytes: usize,
}

impl StreamBatch {
    /// The items to deliver.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Decodes a record into the next slot.
    fn add(&mut self, body: &[u8]) -> Result<(), &'static str> {
        if self.len == self.items.len() {
            self.items.push((Value::Null, false, 0));
        }
        let slot = &mut self.items[self.len];
        let h = rec::parse_data_into(body, &mut slot.0).map_err(|_| "undecodable stream data")?;
        slot.1 = h.private;
        slot.2 = h.gap;
        self.bytes += body.len();
        // SYNC(sub-closed): pairs with the enders (`end_client_sub`, `server_gone`, ...); a flag:
        // an item read after the end is decoded but not delivered.
        if !self.sub.closed.load(Ordering::Acquire) {
            self.len += 1;
        }
        Ok(())
    }
}

thread_local! {
    /// The last batch's slots, reused by the next batch this (dispatch) thread starts.
    static STREAM_SPARE: std::cell::Cell<Vec<(Value, bool, u32)>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Above this many record bytes a batch's values are dropped rather than kept for reuse.
const SPARE_MAX_BYTES: usize = 1 << 20;

/// A data record read from a lane. `ready` is the dispatch thread's task list for this round
/// (None on any other thread): the item joins or starts a batch there when the subscription
/// has nothing waiting, else it goes through the inbox. A record that does not decode faults
/// the lane, whichever path it would have taken. The lane pauses when the item fills a
/// blocking subscriber's queue.
pub(crate) fn on_lane_data(
    shared: &Shared,
    lane: &Arc<Lane>,
    body: &[u8],
    mut ready: Option<&mut Vec<Task>>,
) -> Result<(), &'static str> {
    let sub_id = rec::sub_id(body).map_err(|_| "short stream record")?;
    if let Some(Some(Task::StreamBatch(b))) = ready.as_deref_mut().map(|r| r.last_mut()) {
        if b.sub.id == sub_id && Arc::ptr_eq(&b.lane, lane) && b.len < b.bound {
            b.add(body)?;
            return Ok(());
        }
    }
    let sub = client_sub(shared, sub_id);
    match (ready, sub) {
        (Some(ready), Some(sub)) if claim(&sub) => {
            // Relaxed: `claim` read it with Acquire just now.
            let bound = sub.batch_bound.load(Ordering::Relaxed);
            let mut b = StreamBatch {
                sub,
                lane: lane.clone(),
                items: STREAM_SPARE.with(|c| c.take()),
                len: 0,
                bound: bound.max(1),
                bytes: 0,
            };
            let r = b.add(body);
            ready.push(Task::StreamBatch(b));
            r
        }
        (_, sub) => to_inbox(shared, sub, body, lane.identity.clone(), Some(lane)),
    }
}

/// Takes a subscription's delivery claim for a batch: only under the blocking policy, when it
/// is open and nothing of it is queued or being delivered.
fn claim(sub: &ClientSub) -> bool {
    // SYNC(batch_bound): pairs with the store in `on_record`; SYNC(sub-closed): with the
    // enders. A bound and a flag; the inbox below is under its own lock.
    if sub.batch_bound.load(Ordering::Acquire) == 0 || sub.closed.load(Ordering::Acquire) {
        return false;
    }
    let mut inbox = sub.inbox.lock().unwrap_or_else(|e| e.into_inner());
    if inbox.scheduled {
        return false;
    }
    inbox.scheduled = true;
    true
}

/// Delivers a batch (dispatch thread), then whatever reached the inbox meanwhile, and lets go
/// of the claim.
pub(crate) fn deliver_batch(shared: &Shared, batch: StreamBatch) {
    let StreamBatch {
        sub,
        lane,
        mut items,
        len,
        bytes,
        ..
    } = batch;
    let mut ev = StreamEvent::Data {
        data: Value::Null,
        server: lane.identity.clone(),
        private: false,
        gap: 0,
    };
    for (data, private, gap) in &mut items[..len] {
        // SYNC(sub-client-closed): pairs with `end_client_sub`; a stop flag only.
        if sub.client_closed.load(Ordering::Acquire) {
            break;
        }
        if let StreamEvent::Data {
            data: d,
            private: p,
            gap: g,
            ..
        } = &mut ev
        {
            std::mem::swap(d, data);
            *p = *private;
            *g = *gap as u64;
        }
        call(&sub, &ev);
        if let StreamEvent::Data { data: d, .. } = &mut ev {
            std::mem::swap(d, data);
        }
    }
    if bytes > SPARE_MAX_BYTES {
        items.clear();
        items.shrink_to_fit();
    }
    STREAM_SPARE.with(|c| c.set(items));
    drain(shared, &sub);
}

/// Runs a subscription's callback; a panic is logged and the next item still delivered.
fn call(sub: &ClientSub, ev: &StreamEvent) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (sub.cb)(ev)));
    if let Err(p) = r {
        crate::log::warn(format_args!(
            "a stream callback panicked: {}",
            super::engine::panic_message(&p)
        ));
    }
}

/// Puts an item in the subscriber's inbox under the policy; schedules delivery. Pauses `lane`
/// (the one the item was read from) when the item fills a blocking subscriber's queue.
fn accept_item(shared: &Shared, sub: &Arc<ClientSub>, ev: StreamEvent, lane: Option<&Lane>) {
    // SYNC(sub-closed): pairs with the enders; a flag only, the inbox is under its own lock.
    if sub.closed.load(Ordering::Acquire) {
        return;
    }
    let (policy, bound) = sub.policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let key = match (&policy, &ev) {
        (SlowConsumerPolicy::Conflate(k), StreamEvent::Data { data, .. }) => data.get(k).cloned(),
        _ => None,
    };
    let mut inbox = sub.inbox.lock().unwrap_or_else(|e| e.into_inner());
    match policy {
        SlowConsumerPolicy::Block(_) => {
            inbox.items.push_back((ev, None));
            if let Some(lane) = lane.filter(|_| inbox.items.len() >= bound) {
                // Under the inbox's lock: the drain that takes this item locks it after us, so
                // it sees the pause and resumes the lane. Paused once the lock is let go, the
                // lane could miss a drain that emptied the inbox meanwhile and finished with
                // nothing scheduled, and stay paused.
                shared.pause_lane(lane);
            }
        }
        _ => {
            if let Some(k) = &key {
                if let Some(slot) = inbox
                    .items
                    .iter_mut()
                    .find(|(_, pk)| pk.as_ref() == Some(k))
                {
                    // Conflated: the older value is superseded, but a gap it carried is kept.
                    let carried = match &slot.0 {
                        StreamEvent::Data { gap, .. } => *gap,
                        _ => 0,
                    };
                    slot.0 = ev;
                    if let StreamEvent::Data { gap, .. } = &mut slot.0 {
                        *gap += carried;
                    }
                    return;
                }
            }
            if inbox.items.len() >= bound {
                // The dropped item may itself carry a count of items dropped before it.
                if let Some((StreamEvent::Data { gap, .. }, _)) = inbox.items.pop_front() {
                    inbox.gap += gap;
                }
                inbox.gap += 1;
            }
            inbox.items.push_back((ev, key));
        }
    }
    if !inbox.scheduled {
        inbox.scheduled = true;
        let s = sub.clone();
        shared.push_task(Task::StreamDrain(s));
    }
}

/// Delivers a subscriber's queued items (dispatch thread).
pub(crate) fn drain(shared: &Shared, sub: &Arc<ClientSub>) {
    loop {
        let batch: Vec<(StreamEvent, u64)> = {
            let mut inbox = sub.inbox.lock().unwrap_or_else(|e| e.into_inner());
            if inbox.items.is_empty() {
                inbox.scheduled = false;
                break;
            }
            let gap = std::mem::take(&mut inbox.gap);
            let mut out: Vec<(StreamEvent, u64)> =
                inbox.items.drain(..).map(|(e, _)| (e, 0)).collect();
            if let Some(first) = out.first_mut() {
                first.1 = gap;
            }
            out
        };
        // SYNC(stalled_lanes): pairs with the count in `Shared::pause_lane`; a hint:
        // `resume_lanes` swaps each lane's flag. A pause for an item taken above was made under
        // the inbox's lock (`accept_item`), which orders it before this load.
        if shared.stalled_lanes.load(Ordering::Acquire) > 0 {
            shared.resume_lanes();
        }
        for (mut ev, extra_gap) in batch {
            // SYNC(sub-client-closed): pairs with `end_client_sub`; a stop flag only.
            if sub.client_closed.load(Ordering::Acquire) {
                return;
            }
            if let StreamEvent::Data { gap, .. } = &mut ev {
                *gap += extra_gap;
            }
            call(sub, &ev);
        }
    }
}

fn server_gone(shared: &Shared, sub: &Arc<ClientSub>, peer: PeerId, reason: &str) {
    let last = {
        let mut r = sub.remotes.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for x in r.iter_mut().filter(|x| x.peer == peer) {
            any |= x.state == ServerState::Accepted || x.state == ServerState::Pending;
            x.state = ServerState::Gone;
        }
        any && !r
            .iter()
            .any(|x| x.state == ServerState::Accepted || x.state == ServerState::Pending)
    };
    shared.wake_all();
    // SYNC(sub-closed): the RMW lets one ender queue the Closed event; Release pairs with the
    // loads that refuse new items.
    if last && !sub.closed.swap(true, Ordering::AcqRel) {
        forget_client_sub(shared, sub.id);
        let ev = StreamEvent::Closed {
            reason: reason.to_string(),
            server_initiated: true,
        };
        // After any data still queued for it.
        sub.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .items
            .push_back((ev, None));
        let mut inbox = sub.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if !inbox.scheduled {
            inbox.scheduled = true;
            shared.push_task(Task::StreamDrain(sub.clone()));
        }
    }
}

/// A peer left: its subscriptions to our streams end, and our subscriptions lose it as a server.
pub(crate) fn peer_left(shared: &Arc<Shared>, peer: PeerId) {
    let (served, subs) = {
        let st = table(shared);
        (
            st.served.values().cloned().collect::<Vec<_>>(),
            st.subs.values().cloned().collect::<Vec<_>>(),
        )
    };
    for e in served {
        let gone: Vec<Arc<ServerSub>> = e
            .subs
            .snapshot()
            .iter()
            .filter(|s| s.peer == peer)
            .cloned()
            .collect();
        for s in gone {
            drop_sub(shared, &e, &s, "peer has left", false);
        }
    }
    for s in subs {
        server_gone(shared, &s, peer, "Peer has left");
    }
}

/// The client's streams: those we serve (by method id) and our subscriptions (by id).
#[derive(Default)]
pub(crate) struct StreamsState {
    pub served: HashMap<u32, Arc<StreamEntry>>,
    pub subs: HashMap<u64, Arc<ClientSub>>,
}

/// Invoking a stream as a method is an error.
pub(crate) fn not_invocable() -> MethodError {
    MethodError::new("this method is a stream: subscribe to it")
}

/// Items queued across all served streams' subscribers (for the dispatch loop's flushing).
pub(crate) fn pending(shared: &Shared) -> usize {
    // SYNC(stream_pending): pairs with the counts in `offer_ref`, `flush_locked`, `drop_sub`;
    // a hint, `flush_all` reads the queues under their locks.
    shared.stream_pending.load(Ordering::Acquire)
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Stream>();
    f::<StreamSubscription>();
}

/// A new gateway connection (control thread): every subscriber of our streams is a peer of the
/// old connection (it will subscribe again), so those subscriptions end.
pub(crate) fn connection_reset(shared: &Arc<Shared>) {
    for e in served_streams(shared) {
        let gone = e.subs.snapshot();
        for s in gone.iter() {
            drop_sub(shared, &e, s, "gateway connection reset", false);
        }
    }
}

/// A new gateway connection (control thread): our subscriptions lose their servers (peers of
/// the old connection) and wait for [`restore`].
pub(crate) fn forget_servers(shared: &Shared) {
    let subs = client_subs(shared);
    for s in subs {
        s.remotes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    shared.wake_all();
}

/// Subscribes our stream subscriptions again as their servers reappear (restore thread): each
/// waits up to its `wait` for a server and its `timeout` for an acceptance, as when it was
/// made; one that cannot be restored ends with `Closed` (`server_initiated`) and a reason that
/// says so. Stops early if the connection is reset again (a newer restore takes over).
pub(crate) fn restore(shared: &Arc<Shared>, epoch: u64) {
    struct Todo {
        sub: Arc<ClientSub>,
        wait_until: Instant,
        accept_until: Option<Instant>,
    }
    // SYNC(sub-closed): pairs with the enders; subscriptions already ended are not restored.
    let mut todo: Vec<Todo> = table(shared)
        .subs
        .values()
        .filter(|s| !s.closed.load(Ordering::Acquire))
        .map(|s| Todo {
            sub: s.clone(),
            wait_until: crate::wait::deadline(s.params.wait),
            accept_until: None,
        })
        .collect();
    while !todo.is_empty() {
        // A new connection restores what is left with a fresh start; while there is none, this
        // one can reach nobody (its requests would fail, its servers look gone).
        if shared.is_closed() || shared.conn.epoch() != epoch || !shared.conn.is_connected() {
            return;
        }
        let now = Instant::now();
        let mut failed: Vec<(Arc<ClientSub>, String)> = Vec::new();
        todo.retain_mut(|t| {
            // SYNC(sub-closed): pairs with the enders; one ended meanwhile needs no restoring.
            if t.sub.closed.load(Ordering::Acquire) {
                return false;
            }
            match t.accept_until {
                None => {
                    let c = candidates(shared, &t.sub.name, &t.sub.params.target, &[]);
                    if !c.is_empty() {
                        send_requests(shared, &t.sub, &c);
                        t.accept_until = Some(crate::wait::deadline(t.sub.params.timeout));
                    } else if now >= t.wait_until {
                        failed.push((t.sub.clone(), "no server offers the stream".into()));
                        return false;
                    }
                    true
                }
                Some(until) => {
                    let mut r = t.sub.remotes.lock().unwrap_or_else(|e| e.into_inner());
                    match restore_step(&r, now, until, t.wait_until) {
                        RestoreStep::Done => false,
                        RestoreStep::Wait => true,
                        RestoreStep::Retry => {
                            r.retain(|x| x.state != ServerState::Gone);
                            t.accept_until = None;
                            true
                        }
                        RestoreStep::Fail(why) => {
                            drop(r);
                            failed.push((t.sub.clone(), why));
                            false
                        }
                    }
                }
            }
        });
        for (sub, why) in failed {
            lost(
                shared,
                &sub,
                &format!("Subscription lost after the gateway connection was reset: {why}"),
            );
        }
        if todo.is_empty() {
            break;
        }
        // Servers come back when they reconnect; acceptances arrive on lanes.
        let st = shared.lock_state();
        let _ = shared
            .state_changed
            .wait_timeout_while(st, Duration::from_millis(20), |_| !shared.is_closed())
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// What restoring one subscription does next, from where its servers stand.
#[derive(Debug, PartialEq)]
enum RestoreStep {
    /// A server accepted: restored.
    Done,
    /// Answers are still due.
    Wait,
    /// No server answered or could be reached, and none rejected: ask again when servers are
    /// there (they may be reconnecting themselves, or the gateway went away again as the
    /// requests went out).
    Retry,
    Fail(String),
}

/// `until`: when the servers asked must have answered; `wait_until`: until when servers may
/// come back (the subscription's `wait` from the reconnection).
fn restore_step(r: &[Remote], now: Instant, until: Instant, wait_until: Instant) -> RestoreStep {
    match standing(r) {
        Standing::Accepted => RestoreStep::Done,
        Standing::Over(Some(ServerState::Rejected(m) | ServerState::Denied(m))) => {
            RestoreStep::Fail(format!("rejected: {m}"))
        }
        Standing::Over(_) if now < wait_until => RestoreStep::Retry,
        Standing::Over(_) => RestoreStep::Fail("its servers are gone".into()),
        Standing::Open if now >= until => RestoreStep::Fail("no server accepted in time".into()),
        Standing::Open => RestoreStep::Wait,
    }
}

/// Ends a subscription that could not be restored.
fn lost(shared: &Arc<Shared>, sub: &Arc<ClientSub>, reason: &str) {
    let links: Vec<Link> = sub
        .remotes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|x| x.state == ServerState::Pending)
        .map(|x| x.link.clone())
        .collect();
    for l in links {
        let _ = send(
            shared,
            &l,
            KIND_SUB_CLOSE,
            &rec::close(sub.id, "ClientInitiated"),
            Duration::from_secs(1),
        );
    }
    // SYNC(sub-closed): the RMW lets one ender queue the Closed event; Release pairs with the
    // loads that refuse new items.
    if sub.closed.swap(true, Ordering::AcqRel) {
        return;
    }
    forget_client_sub(shared, sub.id);
    let ev = StreamEvent::Closed {
        reason: reason.to_string(),
        server_initiated: true,
    };
    let mut inbox = sub.inbox.lock().unwrap_or_else(|e| e.into_inner());
    inbox.items.push_back((ev, None));
    if !inbox.scheduled {
        inbox.scheduled = true;
        shared.push_task(Task::StreamDrain(sub.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::hook::{self, elsewhere};

    /// Restoring after a reconnection: a request that reached nobody (the gateway went away
    /// again as it went out, or its server is reconnecting too) is asked again while the
    /// subscription's wait lasts, rather than ending the subscription as "servers gone".
    #[test]
    fn a_restore_that_reached_no_server_asks_again_within_the_wait() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let remote = |state| Remote {
            peer: PeerId(7),
            method: 1,
            identity: instance(PeerId(7)),
            link: Link::Relay(PeerId(7)),
            state,
        };
        let gone = [remote(ServerState::Gone)];
        assert_eq!(restore_step(&[], now, later, later), RestoreStep::Retry);
        assert_eq!(restore_step(&gone, now, later, later), RestoreStep::Retry);
        // Past the wait: gone for good.
        assert_eq!(
            restore_step(&gone, now, later, now),
            RestoreStep::Fail("its servers are gone".into())
        );
        // A rejection is final; an acceptance restores; a pending request waits for its answer.
        let rejected = [
            remote(ServerState::Rejected("no".into())),
            remote(ServerState::Gone),
        ];
        assert_eq!(
            restore_step(&rejected, now, later, later),
            RestoreStep::Fail("rejected: no".into())
        );
        let accepted = [remote(ServerState::Gone), remote(ServerState::Accepted)];
        assert_eq!(
            restore_step(&accepted, now, later, later),
            RestoreStep::Done
        );
        let pending = [remote(ServerState::Pending)];
        assert_eq!(restore_step(&pending, now, later, later), RestoreStep::Wait);
        assert_eq!(
            restore_step(&pending, later, now, later),
            RestoreStep::Fail("no server accepted in time".into())
        );
    }

    fn instance(peer: PeerId) -> Arc<Instance> {
        Arc::new(Instance {
            application: "subscriber".into(),
            instance: "subscriber".into(),
            pid: 0,
            user: "u".into(),
            machine: "m".into(),
            peer_id: peer,
        })
    }

    /// A stream served by `shared` (registered with no gateway: `Stream::close` then fails to
    /// unregister it, after ending its subscriptions).
    fn served(shared: &Arc<Shared>, options: StreamOptions) -> Stream {
        let entry = Arc::new(StreamEntry {
            name: Arc::from("s"),
            method_id: 1,
            options,
            subs: CowList::default(),
            closed: AtomicBool::new(false),
        });
        table(shared).served.insert(entry.method_id, entry.clone());
        Stream {
            shared: shared.clone(),
            entry,
        }
    }

    /// A subscription of `peer` to `stream`, accepted.
    fn subscribed(stream: &Stream, peer: PeerId, link: Link) -> StreamSubscription {
        let sub = Arc::new(ServerSub {
            peer,
            sub_id: 7,
            link,
            caller: instance(peer),
            args: Value::map(),
            branch: String::new(),
            out: Mutex::new(OutQueue::default()),
            open: AtomicBool::new(true),
        });
        stream.entry.subs.change(|v| v.push(sub.clone()));
        StreamSubscription {
            shared: stream.shared.clone(),
            entry: stream.entry.clone(),
            sub,
        }
    }

    /// The stream records the client sent through the gateway so far (relayed to peers).
    fn relayed(gw: &std::os::unix::net::UnixStream) -> Vec<(u16, Vec<u8>)> {
        use std::io::Read;
        gw.set_nonblocking(true).unwrap();
        let mut frames = crate::wire::frame::FrameReader::default();
        let mut buf = [0u8; 4096];
        loop {
            match (&*gw).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => frames.push_bytes(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading what the client sent: {e}"),
            }
        }
        let mut out = Vec::new();
        while let Some((body, _)) = frames.next_frame().unwrap() {
            if let ToGateway::Record { kind, body, .. } =
                crate::wire::frame::decode_body(&body).unwrap()
            {
                out.push((kind, body));
            }
        }
        out
    }

    #[test]
    fn a_lane_paused_for_a_full_subscriber_is_resumed_by_the_drain_that_empties_it() {
        let (shared, _gw) = Shared::for_test();
        let peer = PeerId(2);
        let ((lane, _), _server_end) = shared.lane_for_test(peer);
        let delivered = Arc::new(AtomicUsize::new(0));
        let counted = delivered.clone();
        // One of our subscriptions, accepted under the blocking policy with a queue of one.
        let sub = Arc::new(ClientSub {
            id: 7,
            name: "s".into(),
            params: StreamParams::default(),
            cb: Arc::new(move |_| {
                // Relaxed: read after the delivering thread was joined.
                counted.fetch_add(1, Ordering::Relaxed);
            }),
            remotes: Mutex::new(Vec::new()),
            inbox: Mutex::new(Inbox::default()),
            policy: Mutex::new((SlowConsumerPolicy::Block(Duration::from_secs(5)), 1)),
            batch_bound: AtomicUsize::new(1),
            closed: AtomicBool::new(false),
            client_closed: AtomicBool::new(false),
        });
        table(&shared).subs.insert(sub.id, sub.clone());
        let mut body = Vec::new();
        rec::data_into(&mut body, false, &Value::object([("n", Value::from(1))])).unwrap();
        rec::set_sub_id(&mut body, sub.id);
        // A thread that is not the dispatcher (one waiting for a reply) reads an item that fills
        // the queue. Once the item is in the inbox, the dispatcher runs the drain it scheduled,
        // start to end.
        let point = "on_message: stream record handled";
        let dispatcher = shared.clone();
        hook::set(point, move || {
            elsewhere(move || {
                dispatcher.run_tasks(usize::MAX);
            })
        });
        shared
            .on_message_for_test(&lane, KIND_STREAM_DATA, &body)
            .unwrap();
        assert!(!hook::is_set(point), "the item never reached the point");
        // Relaxed: see above.
        assert_eq!(delivered.load(Ordering::Relaxed), 1);
        assert!(!sub.inbox.lock().unwrap().scheduled);
        // Nothing is queued or scheduled for the subscriber, so nothing would resume the lane:
        // it must not be paused.
        // Relaxed: every thread that touched them was joined.
        assert!(
            !lane.stalled.load(Ordering::Relaxed),
            "the lane stays paused with its subscriber's queue empty"
        );
        assert_eq!(shared.stalled_lanes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_subscription_accepted_while_its_stream_closes_is_refused_not_kept() {
        let (shared, gw) = Shared::for_test();
        let added = Arc::new(AtomicUsize::new(0));
        let counted = added.clone();
        let options = StreamOptions {
            on_added: Some(Box::new(move |_| {
                // Relaxed: read after the accepting call returned, on the same thread.
                counted.fetch_add(1, Ordering::Relaxed);
            })),
            ..Default::default()
        };
        let stream = served(&shared, options);
        let peer = PeerId(2);
        let req = SubscriptionRequest {
            shared: shared.clone(),
            entry: stream.entry.clone(),
            peer,
            sub_id: 7,
            link: Link::Relay(peer),
            instance: instance(peer),
            arguments: Value::map(),
        };
        // The stream closes, start to end, while the request is being accepted.
        let point = "accept_on_branch: subscription not added yet";
        let closing = stream.clone();
        hook::set(point, move || {
            elsewhere(move || {
                // No gateway: unregistering fails, after the subscriptions were ended.
                let _ = closing.close();
            })
        });
        req.accept();
        assert!(!hook::is_set(point), "the accept never reached the point");
        assert!(
            stream.subscriptions().is_empty(),
            "a subscription outlived its stream"
        );
        // Relaxed: see above.
        assert_eq!(added.load(Ordering::Relaxed), 0);
        // The subscriber is told: refused (or, had it been accepted, closed).
        let told = relayed(&gw).iter().any(|(kind, body)| match *kind {
            KIND_SUB_REPLY => !rec::parse_reply(body).unwrap().accepted,
            KIND_SUB_CLOSE => true,
            _ => false,
        });
        assert!(told, "the subscriber was never told the stream ended");
    }

    #[test]
    fn an_item_pushed_while_its_subscription_is_dropped_is_not_left_queued() {
        let (shared, _gw) = Shared::for_test();
        let peer = PeerId(2);
        let ((lane, _), _subscriber_end) = shared.lane_for_test(peer);
        let options = StreamOptions {
            policy: SlowConsumerPolicy::DropOldest,
            queue: 4,
            ..Default::default()
        };
        let stream = served(&shared, options);
        let sub = subscribed(&stream, peer, Link::Lane(lane));
        // The subscriber reads nothing: its lane fills, then items wait in its queue.
        let item = Value::object([("n", Value::from(1))]);
        for _ in 0..10_000 {
            if pending(&shared) > 0 {
                break;
            }
            stream.push(item.clone()).unwrap();
        }
        assert!(pending(&shared) > 0, "the lane never filled");
        // The next push finds the subscription open; before it takes the queue's lock, the
        // subscription is dropped (its queue emptied and uncounted).
        let point = "offer_ref: open, queue not locked yet";
        let dropping = sub.clone();
        hook::set(point, move || elsewhere(move || dropping.close()));
        stream.push(item).unwrap();
        assert!(!hook::is_set(point), "the push never reached the point");
        // Nothing waits, or is counted, for a subscription nobody flushes any more (the
        // dispatch loop would flush every millisecond for ever).
        assert_eq!(
            pending(&shared),
            0,
            "an item was queued for a dropped subscription"
        );
        assert!(sub.sub.out.lock().unwrap().pending.is_empty());
    }
}
