//! The client's engine: the receive set, pending calls, the task queue and the waits.
//!
//! Threads that wait (the dispatcher, a thread blocked in `invoke`, a thread in `poll`) take
//! turns at being the *pumper*: whoever holds the receive set reads every inbound lane, completes
//! the pending calls replies belong to (whoever waits for them) and queues incoming invocations
//! as tasks. Tasks — user callbacks — run only on the dispatch thread (the dispatcher, or the
//! thread inside `poll`). The pumper sleeps on our shared-memory doorbell, which peers ring after
//! writing to us; every other waiter sleeps on a process-local doorbell, rung when a call
//! completes, a task is queued or the receive set is released. So a lone invoker spinning for its
//! reply reads the reply itself — no thread hand-off on the hot path.

use super::lane::{Lane, RxLane, SendError};
use super::{Handler, Invocation, MethodError, Responder};
use crate::model::FailureKind;
use crate::shm::DoorbellSegment;
use crate::wait::{Backoff, Doorbell, WaitStrategy};
use crate::wire::frame::{Instance, MethodDef, PeerId};
use crate::wire::record::{self, FRAG_MORE, KIND_CANCEL, KIND_INVOKE, KIND_RESULT};
use crate::wire::Value;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// Longest single sleep: bounds the damage of a doorbell a peer scribbled on.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Records read from one lane before moving to the next.
const BATCH: usize = 64;

/// A call's outcome as delivered to its waiter.
pub(crate) type Outcome = Result<Value, (FailureKind, String, Option<Value>)>;

/// A pending call.
pub(crate) struct CallSlot {
    done: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    /// The server the call went to; only its lane may answer it.
    pub peer: PeerId,
    owner: ThreadId,
}

impl CallSlot {
    pub(crate) fn new(peer: PeerId) -> Arc<Self> {
        Arc::new(Self { done: AtomicBool::new(false), outcome: Mutex::new(None), peer, owner: std::thread::current().id() })
    }

    pub(crate) fn is_done(&self) -> bool {
        // SYNC(slot): pairs with the Release store in `complete`.
        self.done.load(Ordering::Acquire)
    }

    /// Records the outcome; the first completion wins. Returns whether this one did.
    fn complete(&self, o: Outcome) -> bool {
        let mut g = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if self.done.load(Ordering::Relaxed) {
            return false;
        }
        *g = Some(o);
        // SYNC(slot): the outcome is visible to whoever sees `done`.
        self.done.store(true, Ordering::Release);
        true
    }

    pub(crate) fn take(&self) -> Option<Outcome> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Work for the dispatch thread.
pub(crate) enum Task {
    /// A peer invoked one of our methods.
    Invoke { lane: Arc<Lane>, call_id: u64, method_id: u32, flags: u32, payload: Vec<u8> },
    /// We invoked one of our own methods.
    LocalInvoke { slot: Arc<CallSlot>, method_id: u32, args: Value },
    /// Anything else (event callbacks).
    Call(Box<dyn FnOnce() + Send>),
}

/// A peer as we know it.
pub(crate) struct RemotePeer {
    pub identity: Arc<Instance>,
    pub methods: BTreeMap<u32, Arc<MethodDef>>,
}

/// One of our own methods.
pub(crate) struct MethodEntry {
    pub def: Arc<MethodDef>,
    pub handler: Handler,
}

/// Our replica of the gateway's registry, our lanes, and our methods.
pub(crate) struct State {
    pub peers: BTreeMap<PeerId, RemotePeer>,
    pub lanes: HashMap<PeerId, Arc<Lane>>,
    pub my_methods: BTreeMap<u32, Arc<MethodDef>>,
    pub next_method_id: u32,
    /// Bumped on every change to peers or methods.
    pub generation: u64,
}

/// The inbound lanes, held by the pumper.
pub(crate) struct RxSet {
    lanes: Vec<RxLane>,
    buf: Vec<u8>,
}

impl RxSet {
    fn has_data(&self) -> bool {
        self.lanes.iter().any(|l| l.consumer.has_data())
    }
}

thread_local! {
    /// The `Shared` whose dispatch thread this is (while it dispatches), as an address.
    static DISPATCHING: Cell<usize> = const { Cell::new(0) };
}

/// Everything the client's threads share.
pub(crate) struct Shared {
    pub me: Arc<Instance>,
    pub wait: WaitStrategy,
    pub poll_mode: bool,
    pub max_payload: usize,
    #[allow(dead_code)]
    pub lane_capacity: usize,
    pub conn: super::conn::Conn,
    bell: DoorbellSegment,
    local: Doorbell,
    rx: Mutex<RxSet>,
    rx_busy: AtomicBool,
    rx_dirty: AtomicBool,
    new_rx: Mutex<Vec<RxLane>>,
    calls: Mutex<HashMap<u64, Arc<CallSlot>>>,
    next_call: AtomicU64,
    queue: Mutex<VecDeque<Task>>,
    queue_len: AtomicUsize,
    pub state: Mutex<State>,
    pub state_changed: Condvar,
    pub handlers: RwLock<HashMap<u32, Arc<MethodEntry>>>,
    pub subscribers: Mutex<Vec<(u64, super::EventCallback)>>,
    pub closed: AtomicBool,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        me: Instance,
        wait: WaitStrategy,
        poll_mode: bool,
        max_payload: usize,
        lane_capacity: usize,
        conn: super::conn::Conn,
        bell: DoorbellSegment,
        peers: BTreeMap<PeerId, RemotePeer>,
    ) -> Self {
        Self {
            me: Arc::new(me),
            wait,
            poll_mode,
            max_payload,
            lane_capacity,
            conn,
            bell,
            local: Doorbell::new(),
            rx: Mutex::new(RxSet { lanes: Vec::new(), buf: Vec::new() }),
            rx_busy: AtomicBool::new(false),
            rx_dirty: AtomicBool::new(false),
            new_rx: Mutex::new(Vec::new()),
            calls: Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(1),
            queue: Mutex::new(VecDeque::new()),
            queue_len: AtomicUsize::new(0),
            state: Mutex::new(State {
                peers,
                lanes: HashMap::new(),
                my_methods: BTreeMap::new(),
                next_method_id: 1,
                generation: 0,
            }),
            state_changed: Condvar::new(),
            handlers: RwLock::new(HashMap::new()),
            subscribers: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Wakes every waiter, local or on the shared doorbell.
    pub(crate) fn wake_all(&self) {
        self.local.notify();
        self.bell.doorbell().notify();
    }

    fn is_dispatch_thread(&self) -> bool {
        DISPATCHING.with(|d| d.get() == self as *const Shared as usize)
    }

    // ----- lanes -----------------------------------------------------------------------------

    /// Hands a freshly mapped lane's receiving half to the pumper.
    pub(crate) fn add_rx(&self, rx: RxLane) {
        self.new_rx.lock().unwrap_or_else(|e| e.into_inner()).push(rx);
        self.rx_dirty.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Marks the lane to `peer` closed; the pumper drops it at its next round.
    pub(crate) fn drop_lane(&self, peer: PeerId) {
        if let Some(lane) = self.lock_state().lanes.remove(&peer) {
            lane.close();
        }
        self.rx_dirty.store(true, Ordering::Release);
        self.wake_all();
    }

    // ----- calls -----------------------------------------------------------------------------

    pub(crate) fn new_call(&self, peer: PeerId) -> (u64, Arc<CallSlot>) {
        // Relaxed: ids only need to be unique.
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let slot = CallSlot::new(peer);
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).insert(id, slot.clone());
        (id, slot)
    }

    pub(crate) fn forget_call(&self, id: u64) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Completes a call answered in this process.
    pub(crate) fn complete_local(&self, slot: &CallSlot, o: Outcome) {
        self.complete(slot, o)
    }

    fn complete(&self, slot: &CallSlot, o: Outcome) {
        if slot.complete(o) && slot.owner != std::thread::current().id() {
            self.wake_all();
        }
    }

    /// Fails every call pending on `peer`.
    pub(crate) fn fail_calls_to(&self, peer: PeerId, kind: FailureKind, message: &str) {
        let slots: Vec<Arc<CallSlot>> = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u64> = calls.iter().filter(|(_, s)| s.peer == peer).map(|(id, _)| *id).collect();
            ids.iter().filter_map(|id| calls.remove(id)).collect()
        };
        for s in slots {
            s.complete(Err((kind, message.to_string(), None)));
        }
        self.wake_all();
    }

    /// Fails every pending call (the client is closing).
    pub(crate) fn fail_all_calls(&self, kind: FailureKind, message: &str) {
        let slots: Vec<Arc<CallSlot>> = self.calls.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, s)| s).collect();
        for s in slots {
            s.complete(Err((kind, message.to_string(), None)));
        }
        self.wake_all();
    }

    // ----- tasks -----------------------------------------------------------------------------

    pub(crate) fn enqueue(&self, t: Task) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back(t);
        // Relaxed: a hint for sleep predicates; the queue's mutex orders the real data.
        self.queue_len.fetch_add(1, Ordering::Release);
        self.wake_all();
    }

    fn has_tasks(&self) -> bool {
        self.queue_len.load(Ordering::Acquire) != 0
    }

    /// Runs queued tasks on this (dispatch) thread. Returns how many ran.
    pub(crate) fn run_tasks(self: &Arc<Self>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let t = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                match q.pop_front() {
                    Some(t) => {
                        self.queue_len.fetch_sub(1, Ordering::Release);
                        t
                    }
                    None => break,
                }
            };
            self.run_task(t);
            n += 1;
        }
        n
    }

    fn run_task(self: &Arc<Self>, t: Task) {
        match t {
            Task::Invoke { lane, call_id, method_id, flags, payload } => {
                let responder = Responder::lane(self.clone(), lane.clone(), call_id);
                let args = match record::decode_payload(flags, &payload) {
                    Ok(v) => v,
                    Err(e) => return responder.error(MethodError::new(format!("invalid arguments: {e}"))),
                };
                self.call_handler(method_id, args, lane.identity.clone(), responder);
            }
            Task::LocalInvoke { slot, method_id, args } => {
                let responder = Responder::local(self.clone(), slot);
                self.call_handler(method_id, args, self.me.clone(), responder);
            }
            Task::Call(f) => {
                if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
                    crate::log::warn(format_args!("an event callback panicked: {}", panic_message(&p)));
                }
            }
        }
    }

    fn call_handler(self: &Arc<Self>, method_id: u32, args: Value, caller: Arc<Instance>, responder: Responder) {
        let entry = self.handlers.read().unwrap_or_else(|e| e.into_inner()).get(&method_id).cloned();
        let Some(entry) = entry else {
            return responder.error(MethodError::new("Method has been removed"));
        };
        let inv = Invocation { method: entry.def.name.clone(), args, caller };
        match &entry.handler {
            Handler::Sync(f) => {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(&inv)));
                match r {
                    Ok(Ok(v)) => responder.ok(v),
                    Ok(Err(e)) => responder.error(e),
                    Err(p) => responder.error(MethodError::new(format!("method handler panicked: {}", panic_message(&p)))),
                }
            }
            Handler::Async(f) => {
                // If the handler panics, the responder is dropped during unwinding and replies
                // with an error itself.
                if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| f(inv, responder))) {
                    crate::log::warn(format_args!("async method handler panicked: {}", panic_message(&p)));
                }
            }
        }
    }

    /// Runs one of our own methods for ourselves: inline when this thread may run callbacks
    /// (the dispatch thread, or any thread of a poll-mode client, which has no other), else on
    /// the dispatcher.
    pub(crate) fn local_invoke(self: &Arc<Self>, slot: Arc<CallSlot>, method_id: u32, args: Value) {
        let t = Task::LocalInvoke { slot, method_id, args };
        if self.poll_mode || self.is_dispatch_thread() {
            self.run_task(t);
        } else {
            self.enqueue(t);
        }
    }

    /// Sends a reply on a lane (from any thread).
    pub(crate) fn send_result(self: &Arc<Self>, lane: &Lane, call_id: u64, outcome: Result<Value, (String, Option<Value>)>) {
        let mut body = Vec::new();
        record::result(&mut body, call_id, &outcome);
        if body.len() > lane.max_message {
            let msg = format!("result of {} bytes exceeds the limit of {} bytes", body.len(), lane.max_message);
            record::result(&mut body, call_id, &Err((msg, None)));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        if let Err(e) = self.send_on(lane, KIND_RESULT, &body, deadline) {
            crate::log::debug(format_args!("reply to {} lost: {e}", lane.peer));
        }
    }

    /// Sends on a lane, draining our own inbound lanes while the peer's ring is full.
    pub(crate) fn send_on(self: &Arc<Self>, lane: &Lane, kind: u16, body: &[u8], deadline: Instant) -> Result<(), SendError> {
        let r = lane.send(kind, body, deadline, || {
            if let Ok(mut rx) = self.rx.try_lock() {
                self.pump(&mut rx);
            }
        });
        if let Err(SendError::Corrupt(peer, why)) = &r {
            self.lane_fault(*peer, why);
        }
        r
    }

    /// Sends an invocation to `lane`'s peer.
    pub(crate) fn send_invoke(
        self: &Arc<Self>,
        lane: &Lane,
        call_id: u64,
        method_id: u32,
        args: &Value,
        timeout: Duration,
    ) -> Result<(), SendError> {
        SCRATCH.with(|s| {
            let mut body = s.take();
            let ms = timeout.as_millis().min(u32::MAX as u128) as u32;
            record::invoke(&mut body, call_id, method_id, ms, args);
            let r = self.send_on(lane, KIND_INVOKE, &body, Instant::now() + timeout);
            s.set(body);
            r
        })
    }

    /// A lane's shared memory did not validate: drop it, fail its calls, tell the gateway.
    fn lane_fault(&self, peer: PeerId, why: &str) {
        crate::log::warn(format_args!("lane to {peer} is corrupt ({why}); closing it"));
        self.drop_lane(peer);
        self.fail_calls_to(peer, FailureKind::Delivery(crate::Status::Protocol), &format!("lane corrupt: {why}"));
        let _ = self.conn.send(&crate::wire::frame::ToGateway::LaneFault { peer, reason: why.to_string() });
    }

    // ----- pumping ---------------------------------------------------------------------------

    /// Reads every inbound lane once (up to a batch each). Returns records handled.
    fn pump(&self, rx: &mut RxSet) -> usize {
        if self.rx_dirty.swap(false, Ordering::AcqRel) {
            let mut fresh = std::mem::take(&mut *self.new_rx.lock().unwrap_or_else(|e| e.into_inner()));
            rx.lanes.append(&mut fresh);
            rx.lanes.retain(|l| !l.lane.is_closed());
        }
        let mut handled = 0;
        let mut faults = Vec::new();
        let RxSet { lanes, buf } = rx;
        for l in lanes.iter_mut() {
            for _ in 0..BATCH {
                match l.consumer.pop_into(buf) {
                    Ok(None) => break,
                    Ok(Some(h)) => {
                        handled += 1;
                        if let Err(why) = self.on_record(l, h.kind, h.flags, buf) {
                            faults.push((l.lane.peer, why));
                            break;
                        }
                    }
                    Err(e) => {
                        faults.push((l.lane.peer, e.0));
                        break;
                    }
                }
            }
        }
        for (peer, why) in faults {
            lanes.retain(|l| l.lane.peer != peer);
            self.lane_fault(peer, why);
        }
        handled
    }

    fn on_record(&self, l: &mut RxLane, kind: u16, flags: u16, buf: &mut Vec<u8>) -> Result<(), &'static str> {
        if flags & FRAG_MORE != 0 || l.assembly.is_some() {
            let (k, bytes) = l.assembly.get_or_insert_with(|| (kind, Vec::new()));
            if *k != kind {
                return Err("fragment kinds differ");
            }
            if bytes.len() + buf.len() > l.lane.max_message {
                return Err("message exceeds the payload limit");
            }
            bytes.extend_from_slice(buf);
            if flags & FRAG_MORE != 0 {
                return Ok(());
            }
            let (_, whole) = l.assembly.take().unwrap_or_default();
            return self.on_message(&l.lane, kind, whole);
        }
        self.on_message(&l.lane, kind, std::mem::take(buf))
    }

    fn on_message(&self, lane: &Arc<Lane>, kind: u16, body: Vec<u8>) -> Result<(), &'static str> {
        match kind {
            KIND_RESULT => {
                let head = record::parse_result(&body).map_err(|_| "malformed result record")?;
                let slot = {
                    let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
                    match calls.get(&head.call_id) {
                        // Only the peer a call went to may answer it.
                        Some(s) if s.peer == lane.peer => calls.remove(&head.call_id),
                        _ => None,
                    }
                };
                // A reply for a call that timed out or was never made is dropped.
                let Some(slot) = slot else { return Ok(()) };
                let payload = &body[record::RESULT_HEADER..];
                let outcome = if head.ok {
                    record::decode_payload(head.flags, payload)
                        .map_err(|e| (FailureKind::Delivery(crate::Status::Protocol), format!("undecodable result: {e}"), None))
                } else {
                    match record::decode_error(payload) {
                        Ok((m, c)) => Err((FailureKind::Remote, m, c)),
                        Err(e) => Err((FailureKind::Remote, format!("undecodable error: {e}"), None)),
                    }
                };
                self.complete(&slot, outcome);
                Ok(())
            }
            KIND_INVOKE => {
                let head = record::parse_invoke(&body).map_err(|_| "malformed invoke record")?;
                let mut payload = body;
                payload.drain(..record::INVOKE_HEADER);
                self.enqueue(Task::Invoke {
                    lane: lane.clone(),
                    call_id: head.call_id,
                    method_id: head.method_id,
                    flags: head.flags,
                    payload,
                });
                Ok(())
            }
            KIND_CANCEL => {
                record::parse_cancel(&body).map_err(|_| "malformed cancel record")?;
                // Handlers are not interruptible; the caller has already stopped waiting.
                Ok(())
            }
            _ => Err("unknown record kind"),
        }
    }

    fn release_rx(&self, rx: MutexGuard<'_, RxSet>) {
        self.rx_busy.store(false, Ordering::Release);
        drop(rx);
        self.local.notify();
    }

    // ----- waiting ---------------------------------------------------------------------------

    /// Waits until `slot` completes or `deadline` passes; pumps when it can. Returns whether
    /// the slot completed.
    pub(crate) fn wait_slot(self: &Arc<Self>, slot: &CallSlot, deadline: Instant) -> bool {
        let dispatching = self.is_dispatch_thread();
        let mut backoff = Backoff::new(self.wait);
        loop {
            if slot.is_done() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return slot.is_done();
            }
            if dispatching && self.run_tasks(16) > 0 {
                backoff.reset();
                continue;
            }
            if let Ok(mut rx) = self.rx.try_lock() {
                self.rx_busy.store(true, Ordering::Release);
                // Keep the receive set for the whole wait: we pump for everyone.
                loop {
                    if slot.is_done() {
                        break;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    if self.pump(&mut rx) > 0 {
                        backoff.reset();
                        continue;
                    }
                    if dispatching && self.has_tasks() {
                        // Nested dispatch: a call back into us must not deadlock.
                        break;
                    }
                    if backoff.idle() {
                        let limit = (deadline - now).min(MAX_SLEEP);
                        self.bell.doorbell().sleep_until(
                            || {
                                slot.is_done()
                                    || rx.has_data()
                                    || self.rx_dirty.load(Ordering::Acquire)
                                    || (dispatching && self.has_tasks())
                            },
                            Some(limit),
                        );
                    }
                }
                self.release_rx(rx);
            } else if backoff.idle() {
                let limit = (deadline - now).min(MAX_SLEEP);
                self.local.sleep_until(
                    || slot.is_done() || !self.rx_busy.load(Ordering::Acquire) || (dispatching && self.has_tasks()),
                    Some(limit),
                );
            }
        }
    }

    /// The dispatcher thread's loop.
    pub(crate) fn dispatch_loop(self: &Arc<Self>) {
        DISPATCHING.with(|d| d.set(Arc::as_ptr(self) as usize));
        let mut backoff = Backoff::new(self.wait);
        while !self.is_closed() {
            if self.run_tasks(64) > 0 {
                backoff.reset();
                continue;
            }
            self.pump_or_sleep(&mut backoff, MAX_SLEEP);
        }
        DISPATCHING.with(|d| d.set(0));
    }

    /// One round of pumping, or a sleep of at most `limit` when there is nothing to do.
    fn pump_or_sleep(&self, backoff: &mut Backoff, limit: Duration) {
        if let Ok(mut rx) = self.rx.try_lock() {
            self.rx_busy.store(true, Ordering::Release);
            if self.pump(&mut rx) > 0 {
                backoff.reset();
            } else if !self.has_tasks() && backoff.idle() {
                self.bell.doorbell().sleep_until(
                    || self.has_tasks() || rx.has_data() || self.rx_dirty.load(Ordering::Acquire) || self.is_closed(),
                    Some(limit),
                );
            }
            self.release_rx(rx);
        } else if backoff.idle() {
            self.local.sleep_until(
                || self.has_tasks() || !self.rx_busy.load(Ordering::Acquire) || self.is_closed(),
                Some(limit),
            );
        }
    }

    /// Poll mode: runs what is pending, waiting up to `timeout` for something. Returns how many
    /// callbacks ran.
    pub(crate) fn poll(self: &Arc<Self>, timeout: Duration) -> usize {
        let prev = DISPATCHING.with(|d| d.replace(Arc::as_ptr(self) as usize));
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new(self.wait);
        let mut ran = 0;
        loop {
            ran += self.run_tasks(usize::MAX);
            if ran > 0 || self.is_closed() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                // One last look, so poll(0) still picks up what is already there.
                if let Ok(mut rx) = self.rx.try_lock() {
                    self.rx_busy.store(true, Ordering::Release);
                    self.pump(&mut rx);
                    self.release_rx(rx);
                }
                ran += self.run_tasks(usize::MAX);
                break;
            }
            self.pump_or_sleep(&mut backoff, (deadline - now).min(MAX_SLEEP));
        }
        DISPATCHING.with(|d| d.set(prev));
        ran
    }
}

thread_local! {
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
