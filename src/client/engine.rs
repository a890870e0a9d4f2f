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

use super::lane::{Lane, Orphans, RxLane, SendError};
use super::{Handler, Invocation, MethodError, Responder};
use crate::model::policy::{Action as PolicyAction, PeerRules};
use crate::model::FailureKind;
use crate::shm::DoorbellSegment;
use crate::wait::{Backoff, Doorbell, WaitStrategy};
use crate::wire::frame::ToGateway;
use crate::wire::frame::{Instance, MethodDef, PeerId};
use crate::wire::record::{self, KIND_CANCEL, KIND_INVOKE, KIND_RESULT};
use crate::wire::Value;
use std::cell::{Cell, UnsafeCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// Call ids are sequential; hashing them is wasted work.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | *b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type CallMap = HashMap<u64, Arc<CallSlot>, std::hash::BuildHasherDefault<IdHasher>>;

/// Longest single sleep: bounds the damage of a doorbell a peer scribbled on.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Records read from one lane before moving to the next.
const BATCH: usize = 64;
/// Tasks queued for the dispatcher before the pumper stops reading lanes.
const MAX_QUEUED_TASKS: usize = 65_536;
/// Bytes read past a pause for a full blocking subscriber while a call to the same peer waits
/// for its reply (they queue for the subscriber beyond its bound).
const MAX_PAST_STALL: usize = 16 << 20;

/// A call's outcome as delivered to its waiter.
pub(crate) type Outcome = Result<Value, (FailureKind, String, Option<Value>)>;

const SLOT_PENDING: u32 = 0;
const SLOT_WRITING: u32 = 1;
const SLOT_DONE: u32 = 2;

/// A pending call: written once by whoever completes it, read once by the thread that made it.
pub(crate) struct CallSlot {
    state: AtomicU32,
    outcome: UnsafeCell<Option<Outcome>>,
    /// The server the call went to; only its lane may answer it.
    pub peer: PeerId,
    owner: u64,
}

// SAFETY: `outcome` is written only by the single thread that wins the PENDING -> WRITING
// compare-exchange, before it publishes DONE with Release; it is read only by the owner after
// it observed DONE with Acquire (`take`). No other access exists.
unsafe impl Sync for CallSlot {}

thread_local! {
    /// A cheap per-thread token (std's ThreadId costs an Arc clone to obtain), and a spare slot.
    static THREAD_TOKEN: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        // Relaxed: only unique tokens are needed; nothing is published through the counter.
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
    static SPARE_SLOT: Cell<Option<Arc<CallSlot>>> = const { Cell::new(None) };
}

fn thread_token() -> u64 {
    THREAD_TOKEN.with(|t| *t)
}

impl CallSlot {
    /// A slot for a call to `peer`, reusing this thread's spare when nobody else holds it.
    pub(crate) fn new(peer: PeerId) -> Arc<Self> {
        let owner = thread_token();
        if let Some(mut spare) = SPARE_SLOT.with(|c| c.take()) {
            if let Some(s) = Arc::get_mut(&mut spare) {
                *s.state.get_mut() = SLOT_PENDING;
                *s.outcome.get_mut() = None;
                s.peer = peer;
                s.owner = owner;
                return spare;
            }
        }
        Arc::new(Self {
            state: AtomicU32::new(SLOT_PENDING),
            outcome: UnsafeCell::new(None),
            peer,
            owner,
        })
    }

    /// Hands a finished slot back for reuse by this thread.
    pub(crate) fn recycle(slot: Arc<CallSlot>) {
        SPARE_SLOT.with(|c| c.set(Some(slot)));
    }

    pub(crate) fn is_done(&self) -> bool {
        // SYNC(slot): pairs with the Release store in `complete`.
        self.state.load(Ordering::Acquire) == SLOT_DONE
    }

    /// Records the outcome; the first completion wins. Returns whether this one did.
    fn complete(&self, o: Outcome) -> bool {
        // Acquire/Relaxed: winning the exchange only grants the right to write; publication is
        // the Release store below.
        if self
            .state
            .compare_exchange(
                SLOT_PENDING,
                SLOT_WRITING,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return false;
        }
        // SAFETY: we won PENDING -> WRITING, so we are the only writer, and the owner does not
        // read before DONE.
        unsafe { *self.outcome.get() = Some(o) };
        // SYNC(slot): the outcome is visible to whoever sees DONE.
        self.state.store(SLOT_DONE, Ordering::Release);
        true
    }

    /// The outcome, once done. Only the thread that made the call calls this, once.
    pub(crate) fn take(&self) -> Option<Outcome> {
        if !self.is_done() {
            return None;
        }
        debug_assert_eq!(self.owner, thread_token());
        // SAFETY: DONE was observed with Acquire, so the writer is finished and its write is
        // visible; only the owning thread reads, and it does so once.
        unsafe { (*self.outcome.get()).take() }
    }
}

/// Work for the dispatch thread.
pub(crate) enum Task {
    /// A peer invoked one of our methods (arguments decoded by the pumper).
    Invoke {
        lane: Arc<Lane>,
        call_id: u64,
        method_id: u32,
        args: Result<Value, crate::wire::codec::DecodeError>,
    },
    /// A peer invoked one of our methods through the gateway.
    RelayInvoke {
        invocation: u64,
        /// The connection it came on (an answer on a later one would be misread).
        epoch: u64,
        caller: Arc<Instance>,
        method_id: u32,
        args: Value,
    },
    /// A context changed (or a subscription's first callback).
    Context {
        entry: Arc<super::contexts::CtxEntry>,
        ev: Box<super::contexts::ContextUpdate>,
        only: Option<u64>,
        /// Counted in the entry's `queued` (it went through the shared queue).
        counted: bool,
    },
    /// Deliver a stream subscriber's queued items.
    StreamDrain(Arc<super::streams::ClientSub>),
    /// A bus message for our subscriptions.
    Bus(super::bus::BusMessage),
    /// Small raw bus messages from one lane, read in one round (dispatch thread only).
    BusBatch(super::bus::BusBatch),
    /// Stream items from one lane for one subscription, read in one round (dispatch thread
    /// only).
    StreamBatch(super::streams::StreamBatch),
    /// We invoked one of our own methods.
    LocalInvoke {
        slot: Arc<CallSlot>,
        method_id: u32,
        args: Value,
    },
    /// A peer asks to subscribe to one of our streams (the stream's request handler, or the
    /// acceptance).
    Request(Box<dyn FnOnce() + Send>),
    /// Anything else (event callbacks).
    Call(Box<dyn FnOnce() + Send>),
}

impl Task {
    /// A request that a caller waits on (an invocation of one of our methods, a subscription
    /// to one of our streams), as opposed to a delivery (bus, stream items, contexts, events):
    /// a wait too deep to run deliveries still runs these, since the caller may be the very
    /// peer this client's waits are waiting for (it calls back).
    fn is_request(&self) -> bool {
        matches!(
            self,
            Task::Invoke { .. }
                | Task::RelayInvoke { .. }
                | Task::LocalInvoke { .. }
                | Task::Request(_)
        )
    }
}

/// A peer as we know it.
pub(crate) struct RemotePeer {
    pub identity: Arc<Instance>,
    pub transport: crate::wire::frame::Transport,
    pub methods: BTreeMap<u32, Arc<MethodDef>>,
    /// What the gateway's policy lets it do (`None`: everything).
    pub rules: Option<Arc<PeerRules>>,
}

/// A peer's rules worth keeping: `None` when they allow everything (nothing to check).
pub(crate) fn restrictive(rules: PeerRules) -> Option<Arc<PeerRules>> {
    (!rules.is_open()).then(|| Arc::new(rules))
}

/// One of our own methods.
pub(crate) struct MethodEntry {
    pub name: Arc<str>,
    pub handler: Handler,
}

/// Our replica of the gateway's registry, our lanes, and our methods.
pub(crate) struct State {
    pub peers: BTreeMap<PeerId, RemotePeer>,
    pub lanes: HashMap<PeerId, Arc<Lane>, std::hash::BuildHasherDefault<IdHasher>>,
    pub my_methods: BTreeMap<u32, Arc<MethodDef>>,
    pub next_method_id: u32,
    /// Bumped on every change to peers or methods.
    pub generation: u64,
    /// Peers that left recently, so late events (a context update read after its writer
    /// quit) still name their author.
    pub departed: VecDeque<Arc<Instance>>,
}

impl State {
    /// Keeps a departed peer's identity for late events (the last 256).
    pub(crate) fn remember_departed(&mut self, who: Arc<Instance>) {
        if self.departed.len() >= 256 {
            self.departed.pop_front();
        }
        self.departed.push_back(who);
    }
}

/// A doorbell directory and our doorbell in it (from a `Welcome`).
pub(crate) struct Bells {
    pub seg: DoorbellSegment,
    pub index: u32,
}

/// The inbound lanes, held by the pumper.
pub(crate) struct RxSet {
    lanes: Vec<RxLane>,
    buf: Vec<u8>,
    /// Tasks the pumper found while it is the dispatch thread: run once the set is released,
    /// without a trip through the shared queue.
    ready: Vec<Task>,
    /// Contexts whose logs we follow.
    ctx: Vec<super::contexts::CtxFollow>,
}

impl RxSet {
    fn has_data(&self) -> bool {
        self.lanes.iter().any(|l| l.consumer.has_data()) || self.ctx.iter().any(|c| c.has_data())
    }
}

thread_local! {
    /// The `Shared` whose dispatch thread this is (while it dispatches), as an address.
    static DISPATCHING: Cell<usize> = const { Cell::new(0) };
    /// How many waits of the dispatch thread that run callbacks are on its stack: a callback
    /// that waits (an `invoke` from inside a handler) runs the callbacks queued meanwhile,
    /// one of which may wait in turn.
    static NESTING: Cell<u32> = const { Cell::new(0) };
    /// Set while a wait on the dispatch thread is one too deep to run callbacks.
    static CAPPED: Cell<bool> = const { Cell::new(false) };
}

/// What a call to a peer that left fails with (io.Connect's words).
pub(crate) const PEER_LEFT: &str = "Peer has left while waiting for result";
/// Why [`Shared::await_view`] found nothing.
pub(crate) enum ViewWait {
    Deadline,
    Closed,
    Disconnected,
}

/// What a server answers for a method it no longer has (io.Connect's words).
pub(crate) const METHOD_REMOVED: &str = "Method has been removed";

/// Most waits on the dispatch thread that run every kind of callback, one inside another. A
/// wait deeper than this runs requests only (invocations of our methods, subscriptions to our
/// streams: [`Task::is_request`]), which a caller waits on and which may be the very call-back
/// this client's waits need; deliveries (bus, stream items, contexts, events) stay queued for
/// the levels below. So a callback that invokes from every message of a flood does not nest
/// once per message until the stack overflows, and a server that calls back still gets its
/// answer.
pub const MAX_NESTING: u32 = 8;

/// Most waits on the dispatch thread one inside another, requests included: a wait deeper
/// than this runs nothing, so a flood of requests whose handlers wait (invocations that
/// invoke) cannot grow the stack without bound either. Such a wait is answered from other
/// threads and peers only, and may wait for its timeout.
pub const MAX_DEPTH: u32 = 32;

/// A wait of the dispatch thread: what it may run, and what it counts while it lasts
/// ([`NESTING`], [`CAPPED`]).
struct Nest {
    /// Runs every queued task (and takes what it pumps into its own `ready` list).
    dispatching: bool,
    /// Runs queued requests only.
    capped: bool,
    /// Set [`CAPPED`], which it clears when it ends.
    caps: bool,
}

impl Nest {
    fn enter(dispatch_thread: bool) -> Nest {
        // Built once, at the end: a `Nest` dropped on the way would undo what it counts.
        let nest = |dispatching, capped, caps| Nest {
            dispatching,
            capped,
            caps,
        };
        if !dispatch_thread {
            return nest(false, false, false);
        }
        let depth = NESTING.with(Cell::get);
        if depth >= MAX_DEPTH {
            return nest(false, false, false);
        }
        NESTING.with(|n| n.set(depth + 1));
        if CAPPED.with(Cell::get) {
            // Inside a request run by a capped wait: capped too.
            return nest(false, true, false);
        }
        if depth >= MAX_NESTING {
            CAPPED.with(|c| c.set(true));
            return nest(false, true, true);
        }
        nest(true, false, false)
    }

    /// Whether this wait is counted in [`NESTING`] (it runs something).
    fn counted(&self) -> bool {
        self.dispatching || self.capped
    }

    /// Whether something this wait may run is queued.
    fn has_work(&self, sh: &Shared) -> bool {
        (self.dispatching && sh.has_tasks()) || (self.capped && sh.has_requests())
    }

    /// Runs up to `max` of the queued tasks this wait may run. Returns how many ran.
    fn run(&self, sh: &Arc<Shared>, max: usize) -> usize {
        if self.dispatching {
            sh.run_tasks(max)
        } else if self.capped {
            sh.run_requests(max)
        } else {
            0
        }
    }
}

impl Drop for Nest {
    fn drop(&mut self) {
        if self.caps {
            CAPPED.with(|c| c.set(false));
        }
        if self.counted() {
            NESTING.with(|n| n.set(n.get() - 1));
        }
    }
}

/// Everything the client's threads share.
///
/// What the gateway assigns per connection — our identity, the doorbell directory and our
/// doorbell in it, the payload limit — changes when the client reconnects, so it is read
/// through accessors (`me`, `my_id`, `bells`, `max_payload`).
pub(crate) struct Shared {
    me: std::sync::RwLock<Arc<Instance>>,
    /// `me.peer_id`, readable without a lock.
    my_id: AtomicU64,
    pub wait: WaitStrategy,
    pub poll_mode: bool,
    /// We asked to be reached (and to reach others) through the gateway only.
    pub relay_only: bool,
    max_payload: AtomicUsize,
    /// How to connect again.
    pub hello: super::reconnect::HelloParams,
    pub conn: super::conn::Conn,
    /// The current doorbell directory and our index in it: points into an `Arc` held by
    /// `all_bells`.
    bells: AtomicPtr<Bells>,
    /// Every directory installed so far (one per connection), kept for as long as `self`, so
    /// that a reference obtained through `bells` stays valid however often it is replaced.
    all_bells: Mutex<Vec<Arc<Bells>>>,
    local: Doorbell,
    rx: Mutex<RxSet>,
    /// Whether a thread holds the receive set: a hint for the sleep predicates of threads
    /// waiting for it (SYNC(rx_busy)); the mutex `rx` is what hands the set over.
    rx_busy: AtomicBool,
    /// Threads waiting for the receive set; the dispatcher lets go of it when non-zero.
    rx_wanted: AtomicUsize,
    /// Set after pushing to `new_rx`/`new_ctx` or closing a lane; the pumper swaps it off and
    /// rescans (SYNC(rx_dirty)).
    rx_dirty: AtomicBool,
    new_rx: Mutex<Vec<RxLane>>,
    new_ctx: Mutex<Vec<super::contexts::CtxFollow>>,
    /// Contexts: known names, mapped ones, waiting subscriptions.
    pub ctx: Mutex<super::contexts::CtxState>,
    /// Bus subscriptions, ours and everyone's, and publish routes.
    pub bus: Mutex<super::bus::BusState>,
    /// Our bus subscriptions as a list (rebuilt on change), kept by the delivering thread
    /// while unchanged (`client/bus.rs::deliver`).
    pub bus_subs: super::cow::CowList<Arc<super::bus::MySub>>,
    /// Bumped whenever bus subscriptions change: routes computed before are stale (checked
    /// without a lock by publishers, `client/bus.rs::Route::is_current`).
    pub bus_routes: AtomicU64,
    /// Channel membership and followers.
    pub channels: Mutex<super::channels::ChannelState>,
    /// Streams we serve and stream subscriptions we hold.
    pub streams: Mutex<super::streams::StreamsState>,
    /// The next id of a stream subscription of ours. Ids are the subscriber's (a server keys
    /// them by subscriber and id), so each client numbers its own.
    pub next_stream_sub: AtomicU64,
    /// Stream items queued for slow subscribers (flushed by the dispatch loop).
    pub stream_pending: AtomicUsize,
    /// Lanes paused for blocking stream subscribers (so draining checks only when some are).
    pub stalled_lanes: AtomicUsize,
    calls: Mutex<CallMap>,
    next_call: AtomicU64,
    queue: Mutex<VecDeque<Task>>,
    queue_len: AtomicUsize,
    /// How many of the queued tasks are requests ([`Task::is_request`]).
    queued_requests: AtomicUsize,
    pub state: Mutex<State>,
    pub state_changed: Condvar,
    pub handlers: RwLock<HashMap<u32, Arc<MethodEntry>, std::hash::BuildHasherDefault<IdHasher>>>,
    /// Discovery event callbacks: id, callback, and whether it still runs (cleared when its
    /// `EventSubscription` is dropped, so events already queued skip it).
    pub subscribers: Mutex<Vec<(u64, super::EventCallback, Arc<AtomicBool>)>>,
    /// Held from a change of methods or peers until its discovery events are queued, and by a
    /// new event subscription while it takes its replay and joins: each change is then either
    /// in the replay or among the events it gets, never both or neither
    /// (`interop::events_gate`). Taken before the state lock, never while holding it, and
    /// never around user code.
    pub events_gate: Mutex<()>,
    pub closed: AtomicBool,
    /// What the gateway's policy lets us do (`None`: everything), to refuse early.
    pub my_rules: RwLock<Option<Arc<PeerRules>>>,
    /// Whether `my_rules` is set (so the common case takes no lock).
    pub my_rules_on: AtomicBool,
    /// Whether any peer we know has restrictive rules (else incoming work is not checked).
    pub policy_on: AtomicBool,
    /// Tests only: never refuse our own operations early (the gateway and the receivers
    /// still check), kept across reconnections.
    pub skip_own_policy: AtomicBool,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        me: Instance,
        wait: WaitStrategy,
        poll_mode: bool,
        hello: super::reconnect::HelloParams,
        max_payload: usize,
        conn: super::conn::Conn,
        bells: Bells,
        peers: BTreeMap<PeerId, RemotePeer>,
    ) -> Self {
        let bells = Arc::new(bells);
        Self {
            my_id: AtomicU64::new(me.peer_id.0),
            me: std::sync::RwLock::new(Arc::new(me)),
            wait,
            poll_mode,
            relay_only: hello.relay_only,
            hello,
            max_payload: AtomicUsize::new(max_payload),
            conn,
            bells: AtomicPtr::new(Arc::as_ptr(&bells).cast_mut()),
            all_bells: Mutex::new(vec![bells]),
            local: Doorbell::new(),
            rx: Mutex::new(RxSet {
                lanes: Vec::new(),
                buf: Vec::new(),
                ready: Vec::new(),
                ctx: Vec::new(),
            }),
            rx_busy: AtomicBool::new(false),
            rx_wanted: AtomicUsize::new(0),
            rx_dirty: AtomicBool::new(false),
            new_rx: Mutex::new(Vec::new()),
            new_ctx: Mutex::new(Vec::new()),
            ctx: Mutex::new(Default::default()),
            bus: Mutex::new(Default::default()),
            bus_subs: Default::default(),
            bus_routes: AtomicU64::new(0),
            streams: Mutex::new(Default::default()),
            channels: Mutex::new(Default::default()),
            next_stream_sub: AtomicU64::new(1),
            stream_pending: AtomicUsize::new(0),
            stalled_lanes: AtomicUsize::new(0),
            calls: Mutex::new(CallMap::default()),
            next_call: AtomicU64::new(1),
            queue: Mutex::new(VecDeque::new()),
            queue_len: AtomicUsize::new(0),
            queued_requests: AtomicUsize::new(0),
            state: Mutex::new(State {
                peers,
                lanes: HashMap::default(),
                my_methods: BTreeMap::new(),
                next_method_id: 1,
                generation: 0,
                departed: VecDeque::new(),
            }),
            state_changed: Condvar::new(),
            handlers: RwLock::new(HashMap::default()),
            subscribers: Mutex::new(Vec::new()),
            events_gate: Mutex::new(()),
            closed: AtomicBool::new(false),
            my_rules: RwLock::new(None),
            my_rules_on: AtomicBool::new(false),
            policy_on: AtomicBool::new(false),
            skip_own_policy: AtomicBool::new(false),
        }
    }

    /// Whether our own rules allow `action` on `resource`; the error a refusal becomes.
    pub(crate) fn check_mine(&self, action: PolicyAction, resource: &str) -> Result<(), String> {
        // Relaxed: set once at connect, before any caller can get here.
        if !self.my_rules_on.load(Ordering::Relaxed) {
            return Ok(());
        }
        let rules = self.my_rules.read().unwrap_or_else(|e| e.into_inner());
        match &*rules {
            Some(r) if !r.allows(action, resource) => Err(format!(
                "the gateway's policy does not allow this application to {} {resource:?}",
                action.name()
            )),
            _ => Ok(()),
        }
    }

    /// Whether `peer` may do `action` on `resource` to us. A refusal is reported to the
    /// gateway (which logs it). Cheap when no peer has restrictive rules.
    pub(crate) fn peer_allowed(&self, peer: PeerId, action: PolicyAction, resource: &str) -> bool {
        // Relaxed: a hint; the rules themselves are read under the state lock.
        if !self.policy_on.load(Ordering::Relaxed) {
            return true;
        }
        let rules = self
            .lock_state()
            .peers
            .get(&peer)
            .and_then(|p| p.rules.clone());
        match rules {
            Some(r) if !r.allows(action, resource) => {
                crate::log::warn(format_args!(
                    "refused: {peer} may not {} {resource:?} (gateway policy)",
                    action.name()
                ));
                let _ = self.conn.send(&ToGateway::denied(peer, action, resource));
                false
            }
            _ => true,
        }
    }

    /// Looks at the view (peers and their methods) with `look` until it finds something,
    /// waiting for each change of the view until `until`. The generation is read before each
    /// wait and compared with the one read before the look that failed, so a change between
    /// the two is looked at, not waited for (reading it after the look only, a server announced
    /// in between was waited for in vain, for the whole wait). `need_gateway`: give up when the
    /// gateway is away, since nobody can tell of changes then.
    pub(crate) fn await_view<T>(
        &self,
        until: Instant,
        need_gateway: bool,
        mut look: impl FnMut() -> Option<T>,
    ) -> Result<T, ViewWait> {
        let mut looked_at: Option<u64> = None;
        loop {
            if let Some(t) = look() {
                return Ok(t);
            }
            let st = self.lock_state();
            let gen = st.generation;
            if looked_at.replace(gen) != Some(gen) {
                continue;
            }
            // Closed while waiting (by another thread): that, not "nothing found".
            if self.is_closed() {
                return Err(ViewWait::Closed);
            }
            if need_gateway && !self.conn.is_connected() {
                return Err(ViewWait::Disconnected);
            }
            let now = Instant::now();
            if now >= until {
                return Err(ViewWait::Deadline);
            }
            let _ = self
                .state_changed
                .wait_timeout_while(st, until - now, |st| {
                    st.generation == gen && !self.is_closed()
                })
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_closed(&self) -> bool {
        // SYNC(client-closed): pairs with the AcqRel swap in `ClientHandle::close` (client/mod.rs);
        // a stop flag: what is torn down after it is reached through its own locks.
        self.closed.load(Ordering::Acquire)
    }

    /// Who we are (the gateway's answer to our last hello).
    pub(crate) fn me(&self) -> Arc<Instance> {
        self.me.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Our peer id.
    pub(crate) fn my_id(&self) -> PeerId {
        // Relaxed: replaced only on reconnection; a reader racing it sees either id, both ours.
        PeerId(self.my_id.load(Ordering::Relaxed))
    }

    /// Largest payload the gateway allows.
    pub(crate) fn max_payload(&self) -> usize {
        // Relaxed: a plain setting, replaced only on reconnection.
        self.max_payload.load(Ordering::Relaxed)
    }

    /// A new connection: our new identity and payload limit.
    pub(crate) fn set_identity(&self, me: Instance, max_payload: usize) {
        // Relaxed: see `my_id` and `max_payload`.
        self.my_id.store(me.peer_id.0, Ordering::Relaxed);
        self.max_payload.store(max_payload, Ordering::Relaxed);
        *self.me.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(me);
    }

    fn current_bells(&self) -> &Bells {
        // SYNC(bells): pairs with the Release store in `install_bells`.
        let p = self.bells.load(Ordering::Acquire);
        // SAFETY: `p` came from `Arc::as_ptr` of an `Arc<Bells>` pushed into `all_bells` before
        // it was stored; `all_bells` only grows and lives as long as `self`, so the pointee is
        // alive and never mutated for the lifetime of the returned reference.
        unsafe { &*p }
    }

    /// Switches to the doorbell directory of a new connection (a reference obtained before
    /// stays valid: the old directory stays mapped).
    pub(crate) fn install_bells(&self, b: Bells) {
        let b = Arc::new(b);
        let p = Arc::as_ptr(&b).cast_mut();
        self.all_bells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(b);
        let old = self.bell();
        // SYNC(bells): the directory (mapped before) is visible to whoever loads the pointer.
        self.bells.store(p, Ordering::Release);
        // Whoever sleeps on the old doorbell wakes up and sleeps on the new one from now on.
        old.notify();
    }

    /// The doorbell directory.
    pub(crate) fn bells(&self) -> &DoorbellSegment {
        &self.current_bells().seg
    }

    /// Our doorbell: peers ring it after writing to us.
    fn bell(&self) -> &Doorbell {
        // The index was checked before the directory was installed; directories never shrink.
        let b = self.current_bells();
        b.seg.doorbell(b.index).unwrap_or(&self.local)
    }

    /// Wakes every waiter, local or on the shared doorbell.
    pub(crate) fn wake_all(&self) {
        self.local.notify();
        self.bell().notify();
    }

    fn is_dispatch_thread(&self) -> bool {
        DISPATCHING.with(|d| d.get() == self as *const Shared as usize)
    }

    // ----- lanes -----------------------------------------------------------------------------

    /// Hands a freshly mapped lane's receiving half to the pumper.
    pub(crate) fn add_rx(&self, rx: RxLane) {
        self.new_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rx);
        // SYNC(rx_dirty): the lane pushed to `new_rx` above is visible to the pumper that swaps
        // the flag in `pump`.
        self.rx_dirty.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Hands a context to follow to the pumper.
    pub(crate) fn add_ctx_follow(&self, f: super::contexts::CtxFollow) {
        self.new_ctx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(f);
        // SYNC(rx_dirty): the follow pushed to `new_ctx` above is visible to the pumper that
        // swaps the flag in `pump`.
        self.rx_dirty.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Queues a task for the dispatch thread.
    pub(crate) fn push_task(&self, t: Task) {
        self.enqueue(t);
    }

    /// Stops reading `lane` for a blocking stream subscriber whose queue is full, until
    /// [`Shared::resume_lanes`]. Called under that subscriber's inbox lock
    /// (`streams::accept_item`), so the drain that empties the queue sees the pause.
    pub(crate) fn pause_lane(&self, lane: &Lane) {
        // SYNC(stalled): the RMW makes each pause count once; pairs with the swaps in
        // `resume_lanes`/`retire_lanes` and the load in `pump_lane`.
        if !lane.stalled.swap(true, Ordering::AcqRel) {
            // SYNC(stalled_lanes): pairs with the load in `streams::drain`, which resumes lanes;
            // a hint, the swap above decides. A `resume_lanes` may take this pause between the
            // swap and the count, and subtract first: the count then wraps for a moment, which
            // costs at most a `resume_lanes` that finds nothing to resume.
            self.stalled_lanes.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Lets lanes paused for a blocking stream subscriber be read again.
    pub(crate) fn resume_lanes(&self) {
        let lanes: Vec<Arc<Lane>> = self.lock_state().lanes.values().cloned().collect();
        let mut any = false;
        for l in lanes {
            // SYNC(stalled): pairs with the pausing swap in `pause_lane`; the RMW lets one thread
            // take each pause, so `stalled_lanes` drops once for it.
            if l.stalled.swap(false, Ordering::AcqRel) {
                // SYNC(stalled_lanes): pairs with the load in `streams::drain`, a hint to call us;
                // the swap above decides what resumes.
                self.stalled_lanes.fetch_sub(1, Ordering::AcqRel);
                any = true;
            }
        }
        if any {
            self.wake_all();
        }
    }

    /// The identity behind a writer token (a peer id), if we know it.
    pub(crate) fn identity_of(&self, token: u64) -> Option<Arc<Instance>> {
        if token == self.my_id().0 {
            return Some(self.me());
        }
        let st = self.lock_state();
        if let Some(p) = st.peers.get(&PeerId(token)) {
            return Some(p.identity.clone());
        }
        st.departed.iter().find(|i| i.peer_id.0 == token).cloned()
    }

    /// [`Shared::identity_of`], waiting up to `wait` when `token` is newer than every peer we
    /// know of: the gateway announces a peer to everyone before it can write anything, so its
    /// announcement is on our connection, not yet read. (Peer ids only grow; the gateway's own
    /// token is `u64::MAX` and is never waited for.)
    pub(crate) fn identity_of_soon(&self, token: u64, wait: Duration) -> Option<Arc<Instance>> {
        if let Some(who) = self.identity_of(token) {
            return Some(who);
        }
        if token == u64::MAX || token == 0 {
            return None;
        }
        let deadline = crate::wait::deadline(wait);
        let mut st = self.lock_state();
        loop {
            if let Some(p) = st.peers.get(&PeerId(token)) {
                return Some(p.identity.clone());
            }
            let newest = st.peers.keys().next_back().map_or(0, |p| p.0);
            let now = Instant::now();
            if token <= newest || now >= deadline || self.is_closed() {
                return st.departed.iter().find(|i| i.peer_id.0 == token).cloned();
            }
            st = self
                .state_changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Marks the lane to `peer` closed; the pumper drops it at its next round.
    pub(crate) fn drop_lane(&self, peer: PeerId) {
        if let Some(lane) = self.lock_state().lanes.remove(&peer) {
            lane.close();
        }
        // SYNC(rx_dirty): the lane's `closed` (set above) is visible to the pumper that swaps the
        // flag in `pump`, which drains the lane and drops it.
        self.rx_dirty.store(true, Ordering::Release);
        self.wake_all();
    }

    /// A peer left (the gateway said so): its lane closes, and the calls pending on it fail
    /// once the pumper has drained what the peer wrote before it left, so a reply sent just
    /// before a server closed still reaches its caller. Calls to a peer without a lane fail
    /// at once.
    pub(crate) fn drop_departed_lane(&self, peer: PeerId, message: &str) {
        let lane = self.lock_state().lanes.remove(&peer);
        let Some(lane) = lane else {
            self.fail_calls_to(peer, FailureKind::PeerLeft, message);
            return;
        };
        // Closed first: a call sending on the lane from now on fails by itself, so every call
        // that could have a reply in the ring is among those collected below.
        lane.close();
        let pending = self.calls_to(peer);
        {
            let mut orphans = lane.orphans.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*orphans, Orphans::Drained) {
                drop(orphans);
                self.fail_calls(&pending, FailureKind::PeerLeft, message);
            } else {
                *orphans = Orphans::Pending(pending);
            }
        }
        // SYNC(rx_dirty): the lane's `closed` (set above) is visible to the pumper that swaps the
        // flag in `pump`, which drains the lane and drops it.
        self.rx_dirty.store(true, Ordering::Release);
        self.wake_all();
    }

    /// The pumper drained a closed lane: the calls its departed peer left pending and did not
    /// answer fail now.
    fn drained(&self, lane: &Lane) {
        let was = std::mem::replace(
            &mut *lane.orphans.lock().unwrap_or_else(|e| e.into_inner()),
            Orphans::Drained,
        );
        if let Orphans::Pending(ids) = was {
            self.fail_calls(&ids, FailureKind::PeerLeft, PEER_LEFT);
        }
    }

    /// Fails these calls, those still pending.
    fn fail_calls(&self, ids: &[u64], kind: FailureKind, message: &str) {
        let slots: Vec<Arc<CallSlot>> = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter().filter_map(|id| calls.remove(id)).collect()
        };
        for s in slots {
            s.complete(Err((kind, message.to_string(), None)));
        }
        self.wake_all();
    }

    /// Retires lanes of a gateway connection that is gone: closed (the pumper drains what the
    /// peers wrote before, then drops them), no longer counted as paused.
    pub(crate) fn retire_lanes(&self, lanes: &[Arc<Lane>]) {
        for l in lanes {
            l.close();
            // SYNC(stalled): pairs with the pausing swap in `pause_lane`; the RMW lets one thread
            // take each pause, so `stalled_lanes` drops once for it.
            if l.stalled.swap(false, Ordering::AcqRel) {
                // SYNC(stalled_lanes): pairs with the load in `streams::drain`, a hint to call us;
                // the swap above decides what resumes.
                self.stalled_lanes.fetch_sub(1, Ordering::AcqRel);
            }
        }
        // SYNC(rx_dirty): the lanes' `closed` (set above) is visible to the pumper that swaps the
        // flag in `pump`, which drains the lanes and drops them.
        self.rx_dirty.store(true, Ordering::Release);
        self.wake_all();
    }

    // ----- calls -----------------------------------------------------------------------------

    pub(crate) fn new_call(&self, peer: PeerId) -> (u64, Arc<CallSlot>) {
        // Relaxed: ids only need to be unique.
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let slot = CallSlot::new(peer);
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, slot.clone());
        (id, slot)
    }

    pub(crate) fn forget_call(&self, id: u64) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Completes a relayed call with the gateway's answer.
    pub(crate) fn complete_relayed(&self, call_id: u64, outcome: crate::wire::frame::RelayOutcome) {
        let slot = self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&call_id);
        let Some(slot) = slot else { return };
        let o = match outcome {
            crate::wire::frame::RelayOutcome::Ok(v) => Ok(v),
            crate::wire::frame::RelayOutcome::Err {
                status,
                message,
                context,
            } => {
                let kind = match status {
                    crate::Status::MethodFailed => FailureKind::Remote,
                    crate::Status::PeerLeft => FailureKind::PeerLeft,
                    crate::Status::Timeout => FailureKind::Timeout,
                    s => FailureKind::Delivery(s),
                };
                Err((
                    kind,
                    message,
                    if context.is_null() {
                        None
                    } else {
                        Some(context)
                    },
                ))
            }
        };
        self.complete(&slot, o);
    }

    /// Completes a call answered in this process.
    pub(crate) fn complete_local(&self, slot: &CallSlot, o: Outcome) {
        self.complete(slot, o)
    }

    fn complete(&self, slot: &CallSlot, o: Outcome) {
        if slot.complete(o) && slot.owner != thread_token() {
            self.wake_all();
        }
    }

    /// Fails every call pending on `peer`.
    pub(crate) fn fail_calls_to(&self, peer: PeerId, kind: FailureKind, message: &str) {
        self.fail_calls(&self.calls_to(peer), kind, message);
    }

    /// The ids of the calls to `peer` waiting for their answers.
    fn calls_to(&self, peer: PeerId) -> Vec<u64> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, s)| s.peer == peer)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether a call to `peer` waits for its reply.
    fn awaits_reply_from(&self, peer: PeerId) -> bool {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.values().any(|s| s.peer == peer)
    }

    /// Fails every pending call that went through the gateway (the connection is gone).
    pub(crate) fn fail_relayed_calls(&self, message: &str) {
        let relayed: std::collections::HashSet<PeerId> = {
            let st = self.lock_state();
            st.peers
                .iter()
                .filter(|(_, p)| {
                    self.relay_only || p.transport == crate::wire::frame::Transport::Relay
                })
                .map(|(id, _)| *id)
                .collect()
        };
        let slots: Vec<Arc<CallSlot>> = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u64> = calls
                .iter()
                .filter(|(_, s)| relayed.contains(&s.peer))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| calls.remove(id)).collect()
        };
        for s in slots {
            s.complete(Err((
                FailureKind::Delivery(crate::Status::Disconnected),
                message.to_string(),
                None,
            )));
        }
        self.wake_all();
    }

    /// Fails every pending call (the client is closing).
    pub(crate) fn fail_all_calls(&self, kind: FailureKind, message: &str) {
        let slots: Vec<Arc<CallSlot>> = self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in slots {
            s.complete(Err((kind, message.to_string(), None)));
        }
        self.wake_all();
    }

    // ----- tasks -----------------------------------------------------------------------------

    pub(crate) fn enqueue(&self, t: Task) {
        let request = t.is_request();
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.push_back(t);
            if request {
                // SYNC(queued_requests): a hint for the sleep predicates of capped waits (paired
                // with the Acquire in `has_requests`); the queue's mutex orders the tasks, and
                // the count changes under it.
                self.queued_requests.fetch_add(1, Ordering::Release);
            }
        }
        // SYNC(queue_len): a hint for sleep predicates (paired with the Acquire in `has_tasks`);
        // the queue's mutex orders the tasks themselves.
        self.queue_len.fetch_add(1, Ordering::Release);
        self.wake_all();
    }

    fn has_requests(&self) -> bool {
        // SYNC(queued_requests): pairs with `enqueue`; only a hint, the tasks are taken under
        // the queue's mutex.
        self.queued_requests.load(Ordering::Acquire) != 0
    }

    /// Runs queued requests only, oldest first, leaving deliveries queued (a wait too deep to
    /// run them: [`MAX_NESTING`]). Returns how many ran.
    fn run_requests(self: &Arc<Self>, max: usize) -> usize {
        let mut n = 0;
        while n < max && self.has_requests() {
            let t = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let Some(t) = q
                    .iter()
                    .position(Task::is_request)
                    .and_then(|i| q.remove(i))
                else {
                    break;
                };
                // Release: under the queue's mutex, as in `run_tasks`.
                self.queued_requests.fetch_sub(1, Ordering::Release);
                self.queue_len.fetch_sub(1, Ordering::Release);
                t
            };
            self.run_task(t);
            n += 1;
        }
        n
    }

    fn has_tasks(&self) -> bool {
        // SYNC(queue_len): pairs with `enqueue`; only a hint, the tasks are taken under the
        // queue's mutex.
        self.queue_len.load(Ordering::Acquire) != 0
    }

    /// Runs queued tasks on this (dispatch) thread. Returns how many ran.
    pub(crate) fn run_tasks(self: &Arc<Self>, max: usize) -> usize {
        if !self.has_tasks() {
            return 0;
        }
        let mut n = 0;
        while n < max {
            let t = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                match q.pop_front() {
                    Some(t) => {
                        // Release: under the queue's mutex, which orders the tasks;
                        // the counts are only hints for sleep predicates and backpressure.
                        self.queue_len.fetch_sub(1, Ordering::Release);
                        if t.is_request() {
                            self.queued_requests.fetch_sub(1, Ordering::Release);
                        }
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

    /// Runs one task; returns the count of messages it stands for (a batch stands for several).
    fn run_task(self: &Arc<Self>, t: Task) -> usize {
        let n = match &t {
            Task::BusBatch(b) => b.len(),
            Task::StreamBatch(b) => b.len(),
            _ => 1,
        };
        self.run_one(t);
        n
    }

    fn run_one(self: &Arc<Self>, t: Task) {
        match t {
            Task::Invoke {
                lane,
                call_id,
                method_id,
                args,
            } => {
                // Relaxed: a hint, as in `peer_allowed`, which reads the rules themselves under the
                // state lock.
                if self.policy_on.load(Ordering::Relaxed) {
                    let name = self
                        .handlers
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&method_id)
                        .map(|e| e.name.clone());
                    if let Some(name) = name {
                        if !self.peer_allowed(lane.peer, PolicyAction::Invoke, &name) {
                            let message =
                                format!("the gateway's policy does not allow invoking {name:?}");
                            return self.send_denied(&lane, call_id, &message);
                        }
                    }
                }
                let responder = Responder::lane(self.clone(), lane.clone(), call_id);
                let args = match args {
                    Ok(v) => v,
                    Err(e) => {
                        return responder.error(MethodError::new(format!("invalid arguments: {e}")))
                    }
                };
                self.call_handler(method_id, args, lane.identity.clone(), responder);
            }
            Task::RelayInvoke {
                invocation,
                epoch,
                caller,
                method_id,
                args,
            } => {
                let responder = Responder::relay(self.clone(), invocation, epoch);
                self.call_handler(method_id, args, caller, responder);
            }
            Task::LocalInvoke {
                slot,
                method_id,
                args,
            } => {
                let responder = Responder::local(self.clone(), slot);
                self.call_handler(method_id, args, self.me(), responder);
            }
            Task::Context {
                entry,
                ev,
                only,
                counted,
            } => {
                // Each callback runs contained (`isolated`).
                super::contexts::deliver(&entry, &ev, only, counted)
            }
            Task::StreamDrain(sub) => {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    super::streams::drain(self, &sub)
                }));
                if let Err(p) = r {
                    crate::log::warn(format_args!(
                        "a stream callback panicked: {}",
                        panic_message(&p)
                    ));
                }
            }
            Task::BusBatch(b) => super::bus::deliver_batch(self, b),
            Task::StreamBatch(b) => super::streams::deliver_batch(self, b),
            // Each callback runs contained (`isolated`).
            Task::Bus(msg) => super::bus::deliver(self, &msg),
            Task::Call(f) | Task::Request(f) => {
                if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
                    crate::log::warn(format_args!(
                        "an event callback panicked: {}",
                        panic_message(&*p)
                    ));
                }
            }
        }
    }

    fn call_handler(
        self: &Arc<Self>,
        method_id: u32,
        args: Value,
        caller: Arc<Instance>,
        responder: Responder,
    ) {
        let entry = self
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&method_id)
            .cloned();
        let Some(entry) = entry else {
            // Unregistered after the caller chose it: the caller may try it again under a new
            // registration (`interop::invoke`), so it is told apart from the method failing.
            return responder.removed();
        };
        let inv = Invocation {
            method: entry.name.clone(),
            args,
            caller,
        };
        match &entry.handler {
            Handler::Sync(f) => {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(&inv)));
                match r {
                    Ok(Ok(v)) => responder.ok(v),
                    Ok(Err(e)) => responder.error(e),
                    Err(p) => responder.error(MethodError::new(format!(
                        "method handler panicked: {}",
                        panic_message(&*p)
                    ))),
                }
            }
            Handler::Stream => responder.error(super::streams::not_invocable()),
            Handler::Async(f) => {
                // If the handler panics, the responder is dropped during unwinding and replies
                // with an error itself.
                if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| f(inv, responder))) {
                    crate::log::warn(format_args!(
                        "async method handler panicked: {}",
                        panic_message(&*p)
                    ));
                }
            }
        }
    }

    /// Runs one of our own methods for ourselves: inline when this thread may run callbacks
    /// (the dispatch thread, or any thread of a poll-mode client, which has no other), else on
    /// the dispatcher.
    pub(crate) fn local_invoke(self: &Arc<Self>, slot: Arc<CallSlot>, method_id: u32, args: Value) {
        let t = Task::LocalInvoke {
            slot,
            method_id,
            args,
        };
        if self.poll_mode || self.is_dispatch_thread() {
            self.run_task(t);
        } else {
            self.enqueue(t);
        }
    }

    /// Answers an invocation of a method no longer registered (the caller sees `NotFound`).
    pub(crate) fn send_removed(self: &Arc<Self>, lane: &Lane, call_id: u64) {
        SCRATCH.with(|s| {
            let mut body = s.take();
            record::result_removed(&mut body, call_id, METHOD_REMOVED);
            if let Err(e) = self.send_on(lane, KIND_RESULT, &body, REPLY_TIMEOUT) {
                crate::log::debug(format_args!("reply to {} lost: {e}", lane.peer));
            }
            s.set(body);
        });
    }

    /// Sends a reply on a lane (from any thread).
    /// Refuses an invocation the policy does not allow (the caller sees `PermissionDenied`).
    pub(crate) fn send_denied(self: &Arc<Self>, lane: &Lane, call_id: u64, message: &str) {
        SCRATCH.with(|s| {
            let mut body = s.take();
            record::result_denied(&mut body, call_id, message);
            if let Err(e) = self.send_on(lane, KIND_RESULT, &body, REPLY_TIMEOUT) {
                crate::log::debug(format_args!("refusal to {} lost: {e}", lane.peer));
            }
            s.set(body);
        });
    }

    pub(crate) fn send_result(
        self: &Arc<Self>,
        lane: &Lane,
        call_id: u64,
        outcome: Result<Value, (String, Option<Value>)>,
    ) {
        SCRATCH.with(|s| {
            let mut body = s.take();
            if let Err(e) = record::result(&mut body, call_id, &outcome) {
                let msg = format!("result cannot be sent: {e}");
                // A plain message always encodes.
                let _ = record::result(&mut body, call_id, &Err((msg, None)));
            } else if outcome.is_ok() {
                // The payload limit applies to results as to arguments (the value's encoded
                // size, which the record's payload is): an oversized result reaches the caller
                // as `PayloadTooLarge`.
                let size = body.len() - record::RESULT_HEADER;
                if let Some(msg) = record::result_over_limit(size, self.max_payload()) {
                    record::result_too_large(&mut body, call_id, &msg);
                }
            }
            if body.len() > lane.max_message {
                let msg = format!(
                    "result of {} bytes exceeds the limit of {} bytes",
                    body.len(),
                    lane.max_message
                );
                let _ = record::result(&mut body, call_id, &Err((msg, None)));
            }
            if let Err(e) = self.send_on(lane, KIND_RESULT, &body, REPLY_TIMEOUT) {
                crate::log::debug(format_args!("reply to {} lost: {e}", lane.peer));
            }
            s.set(body);
        })
    }

    /// Sends on a lane, draining our own inbound lanes while the peer's ring is full (for at
    /// most `timeout` from when it first finds it full).
    pub(crate) fn send_on(
        self: &Arc<Self>,
        lane: &Lane,
        kind: u16,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(), SendError> {
        self.send_many_on(lane, kind, std::iter::once(body), timeout)
    }

    /// [`Shared::send_on`] for several messages at once (one lock, one doorbell ring).
    pub(crate) fn send_many_on<'b>(
        self: &Arc<Self>,
        lane: &Lane,
        kind: u16,
        bodies: impl Iterator<Item = &'b [u8]>,
        timeout: Duration,
    ) -> Result<(), SendError> {
        let r = lane.send_many(kind, bodies, timeout, || {
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
            let r = match record::invoke(&mut body, call_id, method_id, ms, args) {
                Ok(()) => self.send_on(lane, KIND_INVOKE, &body, timeout),
                Err(e) => Err(e.into()),
            };
            s.set(body);
            r
        })
    }

    /// A lane's shared memory did not validate: drop it, fail its calls, tell the gateway.
    fn lane_fault(&self, peer: PeerId, why: &str) {
        crate::log::warn(format_args!(
            "lane to {peer} is corrupt ({why}); closing it"
        ));
        self.drop_lane(peer);
        self.fail_calls_to(
            peer,
            FailureKind::Delivery(crate::Status::Protocol),
            &format!("lane corrupt: {why}"),
        );
        let _ = self.conn.send(&crate::wire::frame::ToGateway::LaneFault {
            peer,
            reason: why.to_string(),
        });
    }

    // ----- pumping ---------------------------------------------------------------------------

    /// Reads every inbound lane once (up to a batch each). Returns records handled.
    fn pump(self: &Arc<Self>, rx: &mut RxSet) -> usize {
        let mut handled = 0;
        // What the dispatch thread reads goes to its `ready` list, run as soon as it lets go of
        // the receive set, ahead of the shared queue. Only while that queue is empty, though:
        // what another thread read earlier (pumping while it waited for a reply) and queued
        // must run first, or one peer's messages would reach the callbacks out of order. Only
        // the holder of the receive set reads lanes, so nothing read before this check can be
        // queued after it.
        let dispatching = self.is_dispatch_thread() && !CAPPED.with(Cell::get) && !self.has_tasks();
        // Load first: a swap on every round would bounce the line for nothing.
        // SYNC(rx_dirty): the swap's Acquire pairs with the Release stores in `add_rx`,
        // `add_ctx_follow`, `drop_lane`, `retire_lanes`: new lanes and follows, closed lanes.
        if self.rx_dirty.load(Ordering::Acquire) && self.rx_dirty.swap(false, Ordering::AcqRel) {
            let mut fresh =
                std::mem::take(&mut *self.new_rx.lock().unwrap_or_else(|e| e.into_inner()));
            rx.lanes.append(&mut fresh);
            // A closed lane (its peer left) is drained first: what the peer wrote before it
            // left is still delivered.
            let mut i = 0;
            while i < rx.lanes.len() {
                if rx.lanes[i].lane.is_closed() {
                    let mut l = rx.lanes.swap_remove(i);
                    let sink = if dispatching {
                        Some(&mut rx.ready)
                    } else {
                        None
                    };
                    let _ = self.pump_lane(&mut l, &mut rx.buf, sink, usize::MAX, false);
                    self.drained(&l.lane);
                } else {
                    i += 1;
                }
            }
            let mut fresh =
                std::mem::take(&mut *self.new_ctx.lock().unwrap_or_else(|e| e.into_inner()));
            rx.ctx.append(&mut fresh);
        }
        if !rx.ctx.is_empty() {
            rx.ctx.retain(|c| !c.is_closed());
            let RxSet { ctx, ready, .. } = rx;
            for c in ctx.iter_mut() {
                let sink = if dispatching { Some(&mut *ready) } else { None };
                handled += super::contexts::pump_follow(self, c, sink);
            }
        }
        // Backpressure: with too much queued for the dispatcher, leave records in the rings
        // (their writers then wait), so memory stays bounded. As for a full stream subscriber
        // (`pump_lane`), the lane of a peer whose reply a call awaits is read on, up to a
        // bound: the waiter may be the dispatch thread itself, in a wait too deep to run
        // callbacks (`MAX_NESTING`), and nobody else would drain the queue.
        // Relaxed: a threshold; a count a few tasks stale only moves when reading pauses.
        let full = self.queue_len.load(Ordering::Relaxed) >= MAX_QUEUED_TASKS;
        let mut faults = Vec::new();
        let RxSet {
            lanes, buf, ready, ..
        } = rx;
        for l in lanes.iter_mut() {
            let sink = if dispatching { Some(&mut *ready) } else { None };
            match self.pump_lane(l, buf, sink, BATCH, full) {
                Ok(n) => handled += n,
                Err(why) => faults.push((l.lane.peer, why)),
            }
        }
        for (peer, why) in faults {
            lanes.retain(|l| l.lane.peer != peer);
            self.lane_fault(peer, why);
        }
        handled
    }

    /// Reads up to `max` records of one lane.
    fn pump_lane(
        self: &Arc<Self>,
        l: &mut RxLane,
        buf: &mut Vec<u8>,
        mut sink: Option<&mut Vec<Task>>,
        max: usize,
        queue_full: bool,
    ) -> Result<usize, &'static str> {
        let mut n = 0;
        // Whether a call to this lane's peer waits (looked up once, when first needed).
        let mut awaited = None;
        while n < max {
            // A blocking-policy stream subscriber's queue is full: leave the rest in the ring
            // (its writer then waits) until the dispatcher drains it. Unless a call to the
            // peer waits: its reply is behind the subscriber's items, and the dispatcher may
            // be the very thread waiting (a stream callback that invokes the pushing server),
            // so the items are read on into the queue, up to a bound, until the reply is in.
            // SYNC(stalled): pairs with the swaps in `resume_lanes`/`retire_lanes`; only whether to
            // read on: the items themselves go through the inbox's lock.
            let stalled = queue_full || l.lane.stalled.load(Ordering::Acquire);
            if stalled {
                if l.past_stall >= MAX_PAST_STALL
                    || !*awaited.get_or_insert_with(|| self.awaits_reply_from(l.lane.peer))
                {
                    break;
                }
            } else if l.past_stall != 0 {
                l.past_stall = 0;
            }
            match l.consumer.pop_into(buf) {
                Ok(None) => break,
                Ok(Some(h)) => {
                    n += 1;
                    if stalled {
                        l.past_stall += buf.len().max(1);
                    }
                    if let Err(e) = self.on_record(l, h.kind, h.flags, buf, sink.as_deref_mut()) {
                        l.consumer.flush();
                        return Err(e);
                    }
                }
                Err(e) => return Err(e.0),
            }
        }
        l.consumer.flush();
        Ok(n)
    }

    fn on_record(
        self: &Arc<Self>,
        l: &mut RxLane,
        kind: u16,
        flags: u16,
        buf: &mut [u8],
        sink: Option<&mut Vec<Task>>,
    ) -> Result<(), &'static str> {
        match l.assembly.push(kind, flags, buf, l.lane.max_message)? {
            None => Ok(()),
            Some(msg) => self.on_message(&l.lane, kind, &msg, sink),
        }
    }

    /// Handles one whole message. The body is borrowed (usually the receive buffer, reused for
    /// the next record): what must outlive it is decoded here.
    fn on_message(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        kind: u16,
        body: &[u8],
        mut sink: Option<&mut Vec<Task>>,
    ) -> Result<(), &'static str> {
        match kind {
            KIND_RESULT => {
                let head = record::parse_result(body).map_err(|_| "malformed result record")?;
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
                    record::decode_payload(head.flags, payload).map_err(|e| {
                        (
                            FailureKind::Delivery(crate::Status::Protocol),
                            format!("undecodable result: {e}"),
                            None,
                        )
                    })
                } else {
                    match record::decode_error(payload) {
                        Ok((m, c)) if record::error_denied(payload) => {
                            Err((FailureKind::Delivery(crate::Status::PermissionDenied), m, c))
                        }
                        Ok((m, c)) if record::error_too_large(payload) => {
                            Err((FailureKind::Delivery(crate::Status::PayloadTooLarge), m, c))
                        }
                        Ok((m, c)) if record::error_removed(payload) => {
                            Err((FailureKind::Delivery(crate::Status::NotFound), m, c))
                        }
                        Ok((m, c)) => Err((FailureKind::Remote, m, c)),
                        Err(e) => {
                            Err((FailureKind::Remote, format!("undecodable error: {e}"), None))
                        }
                    }
                };
                self.complete(&slot, outcome);
                Ok(())
            }
            KIND_INVOKE => {
                let head = record::parse_invoke(body).map_err(|_| "malformed invoke record")?;
                let args = record::decode_payload(head.flags, &body[record::INVOKE_HEADER..]);
                let task = Task::Invoke {
                    lane: lane.clone(),
                    call_id: head.call_id,
                    method_id: head.method_id,
                    args,
                };
                match sink {
                    Some(ready) => ready.push(task),
                    None => self.enqueue(task),
                }
                Ok(())
            }
            crate::wire::record::KIND_BUS => {
                let p = super::bus::parse(body).ok_or("malformed bus record")?;
                if let Some(ready) = sink.as_deref_mut().filter(|_| super::bus::batchable(&p)) {
                    // Checked here, so a bad record still faults the lane.
                    let topic = std::str::from_utf8(p.topic).map_err(|_| "malformed bus record")?;
                    if let Some(k) = p.routing_key {
                        std::str::from_utf8(k).map_err(|_| "malformed bus record")?;
                    }
                    if self.peer_allowed(lane.peer, PolicyAction::Publish, topic) {
                        super::bus::batch_push(ready, lane, body);
                    }
                    return Ok(());
                }
                let (topic, routing_key, data) =
                    super::bus::decode(&p).ok_or("malformed bus record")?;
                if !self.peer_allowed(lane.peer, PolicyAction::Publish, &topic) {
                    return Ok(());
                }
                let msg = super::bus::BusMessage {
                    topic,
                    data,
                    routing_key,
                    source: lane.identity.clone(),
                };
                let task = Task::Bus(msg);
                match sink {
                    Some(ready) => ready.push(task),
                    None => self.enqueue(task),
                }
                Ok(())
            }
            crate::wire::record::KIND_SUB_REQUEST
            | crate::wire::record::KIND_SUB_REPLY
            | crate::wire::record::KIND_STREAM_DATA
            | crate::wire::record::KIND_SUB_CLOSE
            | crate::wire::record::KIND_SUB_DROP => {
                // A data record that fills a blocking subscriber's queue pauses the lane.
                if kind == crate::wire::record::KIND_STREAM_DATA {
                    super::streams::on_lane_data(self, lane, body, sink)?;
                } else {
                    let link = super::streams::Link::Lane(lane.clone());
                    super::streams::on_record(
                        self,
                        lane.peer,
                        lane.identity.clone(),
                        link,
                        kind,
                        body,
                    )?;
                }
                #[cfg(test)]
                super::hook::at("on_message: stream record handled");
                Ok(())
            }
            KIND_CANCEL => {
                record::parse_cancel(body).map_err(|_| "malformed cancel record")?;
                // Handlers are not interruptible; the caller has already stopped waiting.
                Ok(())
            }
            _ => Err("unknown record kind"),
        }
    }

    /// Lets go of the receive set; returns the tasks found for the dispatch thread, to run now
    /// that other threads may pump again.
    fn release_rx(&self, mut rx: MutexGuard<'_, RxSet>) -> Vec<Task> {
        let ready = if rx.ready.is_empty() {
            Vec::new()
        } else {
            std::mem::replace(&mut rx.ready, READY_SPARE.with(|c| c.take()))
        };
        // SYNC(rx_busy): pairs with the waiters' sleep predicates; a wake-up hint only, the set
        // itself is handed over by its mutex.
        self.rx_busy.store(false, Ordering::Release);
        drop(rx);
        self.local.notify();
        ready
    }

    fn run_ready(self: &Arc<Self>, mut ready: Vec<Task>) -> usize {
        let mut n = 0;
        for t in ready.drain(..) {
            n += self.run_task(t);
        }
        // The emptied list serves the next round (no allocation per round).
        READY_SPARE.with(|c| {
            let spare = c.take();
            c.set(if spare.capacity() >= ready.capacity() {
                spare
            } else {
                ready
            })
        });
        n
    }

    fn take_rx(&self) -> Option<MutexGuard<'_, RxSet>> {
        let rx = self.rx.try_lock().ok()?;
        // SYNC(rx_busy): a hint for the waiters' sleep predicates; the mutex taken above orders
        // the set itself.
        self.rx_busy.store(true, Ordering::Release);
        Some(rx)
    }

    // ----- waiting ---------------------------------------------------------------------------

    /// Waits until `slot` completes or `deadline` passes; pumps when it can. Returns whether
    /// the slot completed.
    pub(crate) fn wait_slot(self: &Arc<Self>, slot: &CallSlot, deadline: Instant) -> bool {
        self.wait_for(|| slot.is_done(), deadline)
    }

    /// Waits until `done()` holds or `deadline` passes, pumping (and, on the dispatch thread,
    /// running tasks) when it can. Returns `done()`'s last value.
    pub(crate) fn wait_for(self: &Arc<Self>, done: impl Fn() -> bool, deadline: Instant) -> bool {
        let nest = Nest::enter(self.is_dispatch_thread());
        let mut backoff = Backoff::new(self.wait);
        let mut wanted = false;
        let finished = loop {
            if done() {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break done();
            }
            if nest.run(self, 16) > 0 {
                backoff.reset();
                continue;
            }
            if let Some(mut rx) = self.take_rx() {
                if wanted {
                    // Relaxed: a count of waiters, a hint for the set's holder to let go;
                    // nothing is published through it.
                    self.rx_wanted.fetch_sub(1, Ordering::Relaxed);
                    wanted = false;
                }
                // Keep the receive set for the whole wait: we pump for everyone.
                let mut rounds = 0u32;
                loop {
                    if done() {
                        break;
                    }
                    if self.pump(&mut rx) > 0 {
                        backoff.reset();
                        // Nested dispatch: a call back into us must not deadlock. (A capped
                        // wait's pumping goes to the shared queue: a request it read runs
                        // now, not after the flood it came with.)
                        if !rx.ready.is_empty() || (nest.capped && self.has_requests()) {
                            break;
                        }
                        continue;
                    }
                    if nest.has_work(self) {
                        break;
                    }
                    rounds = rounds.wrapping_add(1);
                    // The clock is read every 64 rounds only: it costs as much as a round.
                    if rounds % 64 == 0 && Instant::now() >= deadline {
                        break;
                    }
                    if backoff.idle() {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        let limit = (deadline - now).min(MAX_SLEEP);
                        self.bell().sleep_until(
                            || {
                                done()
                                    || rx.has_data()
                                    // SYNC(rx_dirty): only a wake-up test;
                                    // the swap in `pump` takes the work.
                                    || self.rx_dirty.load(Ordering::Acquire)
                                    || nest.has_work(self)
                            },
                            Some(limit),
                        );
                    }
                }
                let ready = self.release_rx(rx);
                self.run_ready(ready);
            } else {
                if !wanted {
                    // Relaxed: a hint for the holder to let go sooner (see above).
                    self.rx_wanted.fetch_add(1, Ordering::Relaxed);
                    wanted = true;
                }
                if backoff.idle() {
                    let limit = (deadline - now).min(MAX_SLEEP);
                    self.local.sleep_until(
                        || {
                            done()
                                // SYNC(rx_busy): pairs with `release_rx`; a wake-up hint,
                                // `take_rx`'s try_lock is what hands the set over.
                                || !self.rx_busy.load(Ordering::Acquire)
                                || nest.has_work(self)
                        },
                        Some(limit),
                    );
                }
            }
        };
        if wanted {
            // Relaxed: a hint for the holder of the receive set; nothing is published through it.
            self.rx_wanted.fetch_sub(1, Ordering::Relaxed);
        }
        finished
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
            // Stream items queued for slow subscribers go out as room frees up; while any are
            // queued, sleep at most a millisecond.
            let deadline = if super::streams::pending(self) > 0 {
                super::streams::flush_all(self);
                Some(Instant::now() + Duration::from_millis(1))
            } else {
                None
            };
            if self.pump_round(&mut backoff, deadline) > 0 {
                backoff.reset();
            }
        }
        DISPATCHING.with(|d| d.set(0));
    }

    /// Pumps (holding the receive set while there is nothing to do, sleeping on the doorbell
    /// when the wait strategy says so, never past `deadline`), then runs what it found.
    /// Without the receive set, sleeps on the local doorbell instead. Returns tasks run.
    fn pump_round(self: &Arc<Self>, backoff: &mut Backoff, deadline: Option<Instant>) -> usize {
        let Some(mut rx) = self.take_rx() else {
            if backoff.idle() {
                let limit = deadline.map_or(MAX_SLEEP, |d| {
                    d.saturating_duration_since(Instant::now()).min(MAX_SLEEP)
                });
                self.local.sleep_until(
                    || {
                        self.has_tasks()
                            // SYNC(rx_busy): pairs with `release_rx`; a wake-up hint,
                            // `take_rx`'s try_lock is what hands the set over.
                            || !self.rx_busy.load(Ordering::Acquire)
                            || self.is_closed()
                    },
                    Some(limit),
                );
            }
            return 0;
        };
        let mut rounds = 0u32;
        loop {
            if self.pump(&mut rx) > 0 {
                backoff.reset();
            }
            if !rx.ready.is_empty()
                || self.has_tasks()
                || self.is_closed()
                // Relaxed: a hint to let go of the receive set; a late look costs one more round.
                || self.rx_wanted.load(Ordering::Relaxed) != 0
            {
                break;
            }
            rounds = rounds.wrapping_add(1);
            if let Some(d) = deadline {
                if rounds % 64 == 0 && Instant::now() >= d {
                    break;
                }
            }
            if backoff.idle() {
                let limit = deadline.map_or(MAX_SLEEP, |d| {
                    d.saturating_duration_since(Instant::now()).min(MAX_SLEEP)
                });
                if limit.is_zero() {
                    break;
                }
                self.bell().sleep_until(
                    || {
                        self.has_tasks()
                            || rx.has_data()
                            // SYNC(rx_dirty): only a wake-up test;
                            // the swap in `pump` takes the work.
                            || self.rx_dirty.load(Ordering::Acquire)
                            || self.is_closed()
                            // Relaxed: a hint to let go of the receive set;
                            // nothing is published through it.
                            || self.rx_wanted.load(Ordering::Relaxed) != 0
                    },
                    Some(limit),
                );
                // Back to the caller after a sleep: it re-checks closing and deadlines.
                break;
            }
        }
        let ready = self.release_rx(rx);
        self.run_ready(ready)
    }

    /// Poll mode: runs what is pending, waiting up to `timeout` for something. Returns how many
    /// callbacks ran.
    pub(crate) fn poll(self: &Arc<Self>, timeout: Duration) -> usize {
        let prev = DISPATCHING.with(|d| d.replace(Arc::as_ptr(self) as usize));
        let deadline = crate::wait::deadline(timeout);
        let mut backoff = Backoff::new(self.wait);
        let mut ran = 0;
        loop {
            ran += self.run_tasks(usize::MAX);
            if ran > 0 || self.is_closed() {
                break;
            }
            if super::streams::pending(self) > 0 {
                super::streams::flush_all(self);
            }
            ran += self.pump_round(&mut backoff, Some(deadline));
            ran += self.run_tasks(usize::MAX);
            if ran > 0 || Instant::now() >= deadline {
                break;
            }
        }
        DISPATCHING.with(|d| d.set(prev));
        ran
    }
}

#[cfg(test)]
impl Shared {
    /// A client's shared state with no gateway behind it and no threads of its own, for unit
    /// tests: its connection is one end of a socket pair, returned with it (what the client
    /// sends to the gateway arrives there).
    pub(crate) fn for_test() -> (Arc<Shared>, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = Instance {
            application: "test".into(),
            instance: "test".into(),
            pid: std::process::id(),
            user: "u".into(),
            machine: "m".into(),
            peer_id: PeerId(1),
        };
        let hello = super::reconnect::HelloParams {
            path: std::path::PathBuf::new(),
            application: "test".into(),
            relay_only: false,
            timeout: Duration::from_secs(1),
            reconnect: false,
        };
        let bells = Bells {
            seg: DoorbellSegment::open(crate::shm::create_doorbells(4).unwrap()).unwrap(),
            index: 0,
        };
        let shared = Shared::new(
            me,
            WaitStrategy::Park,
            false,
            hello,
            1 << 20,
            super::conn::Conn::new(Arc::new(ours)),
            bells,
            BTreeMap::new(),
        );
        (Arc::new(shared), theirs)
    }

    /// Handles a whole message read from `lane` as a thread other than the dispatcher does (one
    /// waiting for a reply): what it finds for the dispatcher goes to the shared queue.
    pub(crate) fn on_message_for_test(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        kind: u16,
        body: &[u8],
    ) -> Result<(), &'static str> {
        self.on_message(lane, kind, body, None)
    }

    /// Both ends of a lane (4 KiB rings) between us and `peer`: ours, listed among our lanes as
    /// one the gateway set up would be, and the peer's.
    pub(crate) fn lane_for_test(&self, peer: PeerId) -> ((Arc<Lane>, RxLane), (Arc<Lane>, RxLane)) {
        let fds = [crate::shm::create_lane(4096).unwrap()];
        let who = Arc::new(Instance {
            peer_id: peer,
            ..(*self.me()).clone()
        });
        let ours = Lane::open(peer, 1, 0, who, &fds, 1 << 20, self.bells(), 1).unwrap();
        let theirs = Lane::open(
            self.my_id(),
            1,
            1,
            self.me(),
            &fds,
            1 << 20,
            self.bells(),
            0,
        )
        .unwrap();
        self.lock_state().lanes.insert(peer, ours.0.clone());
        (ours, theirs)
    }
}

/// How long a reply may wait for room on the caller's lane.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

thread_local! {
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    /// An emptied `ready` list, handed back to the receive set on the next release.
    static READY_SPARE: Cell<Vec<Task>> = const { Cell::new(Vec::new()) };
}

/// Runs one subscriber's callback, containing a panic to it: the other subscriptions a
/// delivery goes to still get theirs (a loop over subscriptions inside one `catch_unwind`
/// stopped at the first that panicked, on every message). `what`: "a bus callback", …
pub(crate) fn isolated(what: &str, f: impl FnOnce()) {
    if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
        crate::log::warn(format_args!("{what} panicked: {}", panic_message(&*p)));
    }
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
