//! Interop on the client: registering, invoking, discovery and its events.

use super::conn::Reply;
use super::engine::{MethodEntry, Shared, State, ViewWait};
use super::lane::Lane;
use super::{ClientError, EventCallback, EventSubscription, Handler, InvokeError};
use crate::model::policy::Action as PolicyAction;
use crate::model::target::{method_matches, select};
use crate::model::{
    CallFailure, FailureKind, InstanceFilter, InvocationResult, ReturnValue, Target,
};
use crate::status::Status;
use crate::wire::codec;
use crate::wire::frame::{Instance, MethodDef, MethodSpec, PeerId, ToGateway, Transport};
use crate::wire::Value;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long control requests (register, open a lane) may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of [`Client::invoke`](super::Client::invoke). `wait` (for a server to appear) and
/// `timeout` (for each reply) are separate, as in io.Connect; both default to 30 s.
#[derive(Debug, Clone)]
pub struct InvokeOptions {
    pub target: Target,
    /// How long to wait for a matching server to appear. Zero: fail at once.
    pub wait: Duration,
    /// How long each server has to answer, from when the call is sent.
    pub timeout: Duration,
}

impl Default for InvokeOptions {
    fn default() -> Self {
        Self {
            target: Target::Best,
            wait: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
        }
    }
}

impl InvokeOptions {
    /// Defaults with this target.
    pub fn target(target: Target) -> Self {
        Self {
            target,
            ..Default::default()
        }
    }
}

/// A method and the servers offering it.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodInfo {
    pub def: MethodDef,
    pub servers: Vec<Instance>,
}

impl MethodInfo {
    /// The JSON shape `knit methods --json` prints for one method: its definition
    /// (`name`, `displayName`, `description`, `objectTypes`, `accepts`, `returns`, `version`,
    /// `flags`, `supportsStreaming`) and `servers: [{application, instance, pid, peerId}]`.
    pub fn to_value(&self) -> Value {
        let d = &self.def;
        let servers = self
            .servers
            .iter()
            .map(|s| {
                Value::object([
                    ("application", Value::from(s.application.as_str())),
                    ("instance", Value::from(s.instance.as_str())),
                    ("pid", Value::from(s.pid)),
                    ("peerId", Value::from(s.peer_id.to_string())),
                ])
            })
            .collect();
        Value::object([
            ("name", Value::from(d.name.as_str())),
            ("displayName", Value::from(d.display_name.clone())),
            ("description", Value::from(d.description.clone())),
            (
                "objectTypes",
                Value::Array(
                    d.object_types
                        .iter()
                        .map(|s| Value::from(s.as_str()))
                        .collect(),
                ),
            ),
            ("accepts", Value::from(d.accepts.clone())),
            ("returns", Value::from(d.returns.clone())),
            ("version", Value::from(d.version)),
            ("flags", d.flags.clone()),
            ("supportsStreaming", Value::from(d.streaming)),
            ("servers", Value::Array(servers)),
        ])
    }
}

/// Discovery events (io.Connect's `methodAdded`, `serverAdded`, …).
#[derive(Debug, Clone, PartialEq)]
pub enum InteropEvent {
    /// A peer joined (every peer, with or without methods).
    ServerAdded(Instance),
    /// A peer left.
    ServerRemoved { server: Instance, reason: String },
    /// The first server of a method identity (name, accepts, returns) appeared.
    MethodAdded(MethodDef),
    /// The last server of a method identity went away.
    MethodRemoved(MethodDef),
    /// A server registered a method.
    ServerMethodAdded { server: Instance, method: MethodDef },
    /// A server unregistered a method (or left).
    ServerMethodRemoved { server: Instance, method: MethodDef },
    /// The connection to the gateway was lost (`gateway_stopped`: the gateway said it was
    /// stopping). Lanes to live peers and mapped contexts keep working; the client
    /// reconnects by itself unless built with `reconnect(false)`.
    Disconnected {
        reason: String,
        gateway_stopped: bool,
    },
    /// The client is connected again, as this instance (a new peer id). Every remote peer
    /// was forgotten first (`ServerRemoved` with reason "reset") and is announced again as it
    /// is rediscovered; our methods, streams and subscriptions are being restored.
    Reconnected(Instance),
}

/// io.Connect's method identity: `lowercase(name + accepts + returns)`.
fn identity_key(d: &MethodDef) -> String {
    format!(
        "{}{}{}",
        d.name.to_lowercase(),
        d.accepts.as_deref().unwrap_or("").to_lowercase(),
        d.returns.as_deref().unwrap_or("").to_lowercase()
    )
}

/// Orders discovery changes with new event subscriptions (see `Shared::events_gate`).
pub(crate) fn events_gate(shared: &Shared) -> std::sync::MutexGuard<'_, ()> {
    shared.events_gate.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether anyone listens for discovery events. The `MethodAdded`/`MethodRemoved` bookkeeping
/// looks at every method known (O(methods) per announcement, on every peer): without listeners
/// it is skipped, so registering 10 000 methods among 256 peers does not cost each peer
/// 10 000 × 10 000 key comparisons.
fn listening(shared: &Shared) -> bool {
    !shared
        .subscribers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_empty()
}

fn method_error(status: Status, message: String) -> ClientError {
    ClientError::Gateway { status, message }
}

pub(crate) fn register(
    shared: &Arc<Shared>,
    def: MethodDef,
    handler: Handler,
) -> Result<u32, ClientError> {
    register_with(shared, def, |_| handler)
}

/// As [`register`], with the handler made once the method's id is known, before anyone can
/// learn the method exists (a stream puts its entry in place there, so a subscription request
/// that follows the announcement at once finds it).
pub(crate) fn register_with(
    shared: &Arc<Shared>,
    def: MethodDef,
    make_handler: impl FnOnce(u32) -> Handler,
) -> Result<u32, ClientError> {
    if shared.is_closed() {
        return Err(ClientError::Closed);
    }
    if def.name.is_empty() {
        return Err(ClientError::InvalidArgument(
            "Method definition is required. Please, provide either a unique string for a method name or a \u{201c}methodDefinition\u{201d} object with a required \u{201c}name\u{201d} property.".into(),
        ));
    }
    let def = Arc::new(def);
    let _gate = shared.conn.gate.enter();
    let id = {
        let mut st = shared.lock_state();
        if st.my_methods.values().any(|d| d.name == def.name) {
            return Err(method_error(Status::AlreadyExists, def.name_taken()));
        }
        let id = st.next_method_id;
        st.next_method_id += 1;
        id
    };
    // The handler is in place before anyone can learn the method exists.
    let handler = make_handler(id);
    shared
        .handlers
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id,
            Arc::new(MethodEntry {
                name: Arc::from(def.name.as_str()),
                handler,
            }),
        );
    let spec = MethodSpec {
        id,
        def: (*def).clone(),
    };
    let reply = shared.conn.request(
        |req| ToGateway::Register {
            req,
            methods: vec![spec],
        },
        CONTROL_TIMEOUT,
    );
    let fail = |e| {
        shared
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        Err(e)
    };
    match reply {
        Ok(Reply::Ack) => {}
        Ok(Reply::Fail(status, message)) => return fail(method_error(status, message)),
        Ok(_) => return fail(ClientError::Protocol("unexpected reply to register".into())),
        Err(e) => return fail(e),
    }
    let _events = events_gate(shared);
    let listening = listening(shared);
    let first_of_identity = {
        let mut st = shared.lock_state();
        let key = identity_key(&def);
        let first = listening
            && !st.my_methods.values().any(|d| identity_key(d) == key)
            && !st
                .peers
                .values()
                .any(|p| p.methods.values().any(|d| identity_key(d) == key));
        st.my_methods.insert(id, def.clone());
        st.generation += 1;
        first
    };
    shared.state_changed.notify_all();
    if first_of_identity {
        emit(shared, InteropEvent::MethodAdded((*def).clone()));
    }
    emit(
        shared,
        InteropEvent::ServerMethodAdded {
            server: (*shared.me()).clone(),
            method: (*def).clone(),
        },
    );
    Ok(id)
}

pub(crate) fn unregister(shared: &Arc<Shared>, name: &str) -> Result<(), ClientError> {
    if shared.is_closed() {
        return Err(ClientError::Closed);
    }
    let _gate = shared.conn.gate.enter();
    let (id, def) = {
        let st = shared.lock_state();
        match st.my_methods.iter().find(|(_, d)| d.name == name) {
            Some((id, d)) => (*id, d.clone()),
            None => {
                return Err(method_error(
                    Status::NotFound,
                    format!("Method with a name \"{name}\" does not exist or is not registered by your application!"),
                ))
            }
        }
    };
    match shared.conn.request(
        |req| ToGateway::Unregister { req, ids: vec![id] },
        CONTROL_TIMEOUT,
    )? {
        Reply::Ack => {}
        Reply::Fail(status, message) => return Err(method_error(status, message)),
        _ => {
            return Err(ClientError::Protocol(
                "unexpected reply to unregister".into(),
            ))
        }
    }
    shared
        .handlers
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    let _events = events_gate(shared);
    let listening = listening(shared);
    let last_of_identity = {
        let mut st = shared.lock_state();
        st.my_methods.remove(&id);
        st.generation += 1;
        let key = identity_key(&def);
        listening
            && !st.my_methods.values().any(|d| identity_key(d) == key)
            && !st
                .peers
                .values()
                .any(|p| p.methods.values().any(|d| identity_key(d) == key))
    };
    emit(
        shared,
        InteropEvent::ServerMethodRemoved {
            server: (*shared.me()).clone(),
            method: (*def).clone(),
        },
    );
    if last_of_identity {
        emit(shared, InteropEvent::MethodRemoved((*def).clone()));
    }
    Ok(())
}

/// A server chosen for a call: who, its id for the method, how to reach it, and our lane to it
/// if one is open.
#[derive(Clone)]
struct Chosen {
    server: Arc<Instance>,
    method_id: u32,
    relay: bool,
    lane: Option<Arc<Lane>>,
}

/// The servers an invocation goes to.
enum Choice {
    /// The common case (`best`): one server, without a list.
    One(Chosen),
    /// Any number, in target order (none: no server yet).
    Many(Vec<Chosen>),
}

impl Choice {
    fn is_empty(&self) -> bool {
        matches!(self, Choice::Many(v) if v.is_empty())
    }
}

/// Servers of `method` in discovery order, ourselves first, filtered by `target`, leaving out
/// the registrations in `stale` (`(server, method id)`: ones a server said it no longer has).
fn choose(shared: &Arc<Shared>, method: &str, target: &Target, stale: &[(PeerId, u32)]) -> Choice {
    let st = shared.lock_state();
    let servers = servers_of(shared, &st, method);
    let my_id = shared.my_id();
    let mut cands = servers.iter().filter_map(|&(peer, method_id)| {
        if !stale.is_empty() && stale.contains(&(peer.unwrap_or(my_id), method_id)) {
            return None;
        }
        let Some(peer) = peer else {
            return Some(Chosen {
                server: shared.me(),
                method_id,
                relay: false,
                lane: None,
            });
        };
        let p = st.peers.get(&peer)?;
        Some(Chosen {
            server: p.identity.clone(),
            method_id,
            relay: p.transport == Transport::Relay || shared.relay_only,
            lane: st.lanes.get(&peer).cloned(),
        })
    });
    if *target == Target::Best {
        // The hot path: the first candidate, without building a list.
        return match cands.next() {
            Some(c) => Choice::One(c),
            None => Choice::Many(Vec::new()),
        };
    }
    let cands: Vec<Chosen> = cands.collect();
    let insts: Vec<&Instance> = cands.iter().map(|c| &*c.server).collect();
    Choice::Many(
        select(target, shared.my_id(), &insts)
            .iter()
            .filter_map(|i| {
                cands
                    .iter()
                    .find(|c| c.server.peer_id == i.peer_id)
                    .cloned()
            })
            .collect(),
    )
}

/// `(peer, method id)` of every server of `method`, ourselves first (`None`: any method of
/// that name), then the others in discovery order (not streams).
fn scan_servers(st: &State, method: &str) -> Servers {
    let mine = st
        .my_methods
        .iter()
        .find(|(_, d)| method_matches(method, d))
        .map(|(id, _)| (None, *id));
    let theirs = st.peers.iter().filter_map(|(peer, p)| {
        let (id, _) = p
            .methods
            .iter()
            .find(|(_, d)| !d.streaming && method_matches(method, d))?;
        Some((Some(*peer), *id))
    });
    mine.into_iter().chain(theirs).collect()
}

/// The servers of a method: shared, so a cache hit costs a reference count, not an allocation.
/// Ourselves as `None`, not by peer id: the id changes when the client reconnects (a new
/// gateway), and an answer cached a moment before must not then miss our own method.
type Servers = Arc<[(Option<PeerId>, u32)]>;

/// A thread's recent answers of [`scan_servers`], valid while the client's `generation` (bumped
/// on every change to peers or methods) has not moved.
struct ServersCache {
    /// Whose state it describes. Holding the `Weak` keeps the allocation, so the address cannot
    /// be reused by another client while the entry exists.
    owner: std::sync::Weak<Shared>,
    generation: u64,
    method: Box<str>,
    servers: Servers,
}

const SERVERS_CACHE_ENTRIES: usize = 8;

thread_local! {
    static SERVERS_CACHE: std::cell::RefCell<Vec<ServersCache>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// [`scan_servers`], remembered per thread. The scan looks at every method of every peer
/// (10 000 methods: tens of microseconds per call); a thread calling the same few methods
/// again pays it only after the registry changed. `st` must be `shared`'s state, locked.
fn servers_of(shared: &Arc<Shared>, st: &State, method: &str) -> Servers {
    SERVERS_CACHE
        .try_with(|cache| {
            // Not re-entered (nothing below calls out), but a failed borrow must not panic.
            let Ok(mut cache) = cache.try_borrow_mut() else {
                return scan_servers(st, method);
            };
            let mine = |e: &ServersCache| std::ptr::eq(e.owner.as_ptr(), Arc::as_ptr(shared));
            if let Some(e) = cache
                .iter()
                .find(|e| mine(e) && e.generation == st.generation && &*e.method == method)
            {
                return e.servers.clone();
            }
            let servers = scan_servers(st, method);
            // Drop entries of dead clients and the stale entry of this method.
            cache.retain(|e| e.owner.strong_count() > 0 && !(mine(e) && &*e.method == method));
            if cache.len() >= SERVERS_CACHE_ENTRIES {
                cache.remove(0);
            }
            cache.push(ServersCache {
                owner: Arc::downgrade(shared),
                generation: st.generation,
                method: method.into(),
                servers: servers.clone(),
            });
            servers
        })
        .unwrap_or_else(|_| scan_servers(st, method))
}

pub(crate) fn lane_to(
    shared: &Arc<Shared>,
    peer: PeerId,
    known: Option<&Arc<Lane>>,
) -> Result<Arc<Lane>, (Status, String)> {
    if let Some(l) = known {
        if !l.is_closed() {
            return Ok(l.clone());
        }
    }
    match shared
        .conn
        .request(|req| ToGateway::OpenLane { req, peer }, CONTROL_TIMEOUT)
    {
        Ok(Reply::Lane(l)) => Ok(l),
        Ok(Reply::Fail(Status::NotFound, _)) => {
            Err((Status::PeerLeft, super::engine::PEER_LEFT.into()))
        }
        Ok(Reply::Fail(s, m)) => Err((s, m)),
        Ok(_) => Err((Status::Protocol, "unexpected reply to open-lane".into())),
        Err(e) => Err((e.status(), e.to_string())),
    }
}

pub(crate) fn invoke(
    shared: &Arc<Shared>,
    method: &str,
    args: Value,
    opts: &InvokeOptions,
) -> Result<InvocationResult, InvokeError> {
    if shared.is_closed() {
        return Err(ClientError::Closed.into());
    }
    crate::model::check_method_name(method).map_err(InvokeError::InvalidArgument)?;
    if let Err(message) = shared.check_mine(PolicyAction::Invoke, method) {
        return Err(ClientError::Gateway {
            status: Status::PermissionDenied,
            message,
        }
        .into());
    }
    codec::check(&args).map_err(|e| InvokeError::InvalidArgument(e.to_string()))?;
    let size = crate::wire::record::payload_len(&args);
    let max = shared.max_payload();
    if size > max {
        return Err(InvokeError::PayloadTooLarge { size, max });
    }
    // Find servers, waiting for one to appear if need be (the clock is read only then).
    let first = choose(shared, method, &opts.target, &[]);
    let chosen = if !first.is_empty() {
        first
    } else {
        let until = crate::wait::deadline(opts.wait);
        let found = shared.await_view(until, true, || {
            let c = choose(shared, method, &opts.target, &[]);
            #[cfg(test)]
            if c.is_empty() {
                super::hook::at("invoke: waiting for a server");
            }
            (!c.is_empty()).then_some(c)
        });
        match found {
            Ok(c) => c,
            Err(ViewWait::Disconnected) => return Err(ClientError::Disconnected.into()),
            Err(ViewWait::Closed) => return Err(ClientError::Closed.into()),
            Err(ViewWait::Deadline) => {
                return Err(InvokeError::NoServer {
                    method: method.to_string(),
                    target: opts.target.to_string(),
                })
            }
        }
    };
    let deadline = crate::wait::deadline(opts.timeout);
    let many = match chosen {
        Choice::One(c) => {
            // One server (`best`): no list of calls or outcomes to build.
            let sent = send_call(shared, &c, &args, opts);
            let mut o = call_outcome(shared, &c, sent, deadline, method, opts);
            if is_removed(&o) {
                o = match again(shared, method, &args, opts, &c, None, o) {
                    Again::Outcome(o) => o,
                    // Gone, and no other server within the wait: as if there had been none.
                    // As the wait for a server says it: without the gateway, that.
                    Again::NoServer(_) if !shared.conn.is_connected() && !shared.is_closed() => {
                        return Err(ClientError::Disconnected.into());
                    }
                    Again::NoServer(_) => {
                        return Err(InvokeError::NoServer {
                            method: method.to_string(),
                            target: opts.target.to_string(),
                        })
                    }
                };
            }
            return InvocationResult::aggregate_one(method, args, o)
                .map_err(|r| InvokeError::Failed(Box::new(r)));
        }
        Choice::Many(cs) => cs,
    };
    // Send one call per server, then collect the outcomes in target order.
    let sent: Vec<Sent> = many
        .iter()
        .map(|c| send_call(shared, c, &args, opts))
        .collect();
    let outcomes = many
        .iter()
        .zip(sent)
        .map(|(c, p)| {
            let o = call_outcome(shared, c, p, deadline, method, opts);
            if is_removed(&o) {
                let only = Some(c.server.peer_id);
                match again(shared, method, &args, opts, c, only, o) {
                    Again::Outcome(o) | Again::NoServer(o) => o,
                }
            } else {
                o
            }
        })
        .collect();
    InvocationResult::aggregate(method, args, outcomes)
        .map_err(|r| InvokeError::Failed(Box::new(r)))
}

/// Whether a call failed because its server no longer has the registration the caller chose
/// (unregistered meanwhile: `Method has been removed` over a lane, or the gateway's `NotFound`
/// for a relayed call).
fn is_removed(o: &Result<ReturnValue, CallFailure>) -> bool {
    matches!(o, Err(f) if f.kind == FailureKind::Delivery(Status::NotFound))
}

/// What [`again`] ended with.
enum Again {
    /// The call's outcome (the last one, when it gave up with the old registration still in
    /// the view).
    Outcome(Result<ReturnValue, CallFailure>),
    /// The view dropped the old registration and showed no other in time (with the last
    /// failure, for a caller that keeps it).
    NoServer(Result<ReturnValue, CallFailure>),
}

/// Calls `method` again after the server of `first` said it no longer has that registration.
/// The caller's view of the servers comes through the gateway, later than what a server does
/// on its lane: a method unregistered and registered again (a new id) was still the old
/// registration in the view, and the call failed though the method stood. Waits (within
/// `opts.wait`) for the view to catch up and calls the registration it then shows: any server
/// the target picks, or with `only`, that server alone (`all`: each server keeps its place).
/// Gives up when nothing shows up in time, or, with `only`, when the view has dropped the old
/// registration and that server has no other.
fn again(
    shared: &Arc<Shared>,
    method: &str,
    args: &Value,
    opts: &InvokeOptions,
    first: &Chosen,
    only: Option<PeerId>,
    mut last: Result<ReturnValue, CallFailure>,
) -> Again {
    let mut stale = vec![(first.server.peer_id, first.method_id)];
    let wait_until = crate::wait::deadline(opts.wait);
    loop {
        let gen = shared.lock_state().generation;
        let next = match choose(shared, method, &opts.target, &stale) {
            Choice::One(c) => Some(c),
            Choice::Many(cs) => cs
                .into_iter()
                .find(|c| only.is_none_or(|p| c.server.peer_id == p)),
        };
        if let Some(c) = next {
            // `timeout` counts from when a call is sent: this one's own (the wait for the view
            // may have outlasted the first call's).
            let deadline = crate::wait::deadline(opts.timeout);
            let sent = send_call(shared, &c, args, opts);
            last = call_outcome(shared, &c, sent, deadline, method, opts);
            if !is_removed(&last) {
                return Again::Outcome(last);
            }
            stale.push((c.server.peer_id, c.method_id));
            continue;
        }
        // Whether the view still holds a registration a server said it no longer has (of
        // that server, with `only`).
        let held = {
            let st = shared.lock_state();
            let my_id = shared.my_id();
            servers_of(shared, &st, method).iter().any(|&(peer, id)| {
                let peer = peer.unwrap_or(my_id);
                only.is_none_or(|p| p == peer) && stale.contains(&(peer, id))
            })
        };
        if only.is_some() && !held {
            // That server has the method no longer.
            return Again::NoServer(last);
        }
        let st = shared.lock_state();
        let now = Instant::now();
        if now >= wait_until || shared.is_closed() || !shared.conn.is_connected() {
            return if held || shared.is_closed() {
                Again::Outcome(last)
            } else {
                Again::NoServer(last)
            };
        }
        let _ = shared
            .state_changed
            .wait_timeout_while(st, wait_until - now, |st| {
                st.generation == gen && !shared.is_closed()
            })
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// A call on its way to one server: its id (`None`: run here) and the slot its outcome comes
/// to; or why it could not be sent.
type Sent = Result<(Option<u64>, Arc<super::engine::CallSlot>), (Status, String)>;

/// Sends the call to one chosen server: run here, relayed through the gateway, or on its lane.
fn send_call(shared: &Arc<Shared>, c: &Chosen, args: &Value, opts: &InvokeOptions) -> Sent {
    let my_id = shared.my_id();
    if c.server.peer_id == my_id {
        let slot = super::engine::CallSlot::new(my_id);
        shared.local_invoke(slot.clone(), c.method_id, args.clone());
        Ok((None, slot))
    } else if c.relay {
        let (id, slot) = shared.new_call(c.server.peer_id);
        let msg = ToGateway::Call {
            call: id,
            peer: c.server.peer_id,
            method_id: c.method_id,
            args: args.clone(),
            timeout_ms: opts.timeout.as_millis().min(u32::MAX as u128) as u32,
        };
        match shared.conn.send(&msg) {
            Ok(()) => Ok((Some(id), slot)),
            Err(e) => {
                shared.forget_call(id);
                Err((e.status(), e.to_string()))
            }
        }
    } else {
        let lane = lane_to(shared, c.server.peer_id, c.lane.as_ref())?;
        let (id, slot) = shared.new_call(c.server.peer_id);
        match shared.send_invoke(&lane, id, c.method_id, args, opts.timeout) {
            Ok(()) => Ok((Some(id), slot)),
            Err(e) => {
                shared.forget_call(id);
                Err((e.status(), e.to_string()))
            }
        }
    }
}

/// Waits for one server's outcome, until `deadline`.
fn call_outcome(
    shared: &Arc<Shared>,
    c: &Chosen,
    sent: Sent,
    deadline: Instant,
    method: &str,
    opts: &InvokeOptions,
) -> Result<ReturnValue, CallFailure> {
    let failure = |kind, message: String, context| CallFailure {
        executed_by: c.server.clone(),
        message,
        context,
        kind,
    };
    let (id, slot) = match sent {
        Ok(s) => s,
        Err((status, message)) => {
            // Not sent because the server had left (its lane closed): not the server leaving
            // with the call pending (`PeerLeft`), but a registration gone before the call, as
            // `NotFound` is; the caller looks again (`again`).
            let kind = if shared.is_closed() {
                // Our own close shut the lane under the send.
                FailureKind::Delivery(Status::Closed)
            } else if status == Status::PeerLeft {
                FailureKind::Delivery(Status::NotFound)
            } else {
                FailureKind::Delivery(status)
            };
            return Err(failure(kind, message, None));
        }
    };
    if !shared.wait_slot(&slot, deadline) {
        if let Some(id) = id {
            shared.forget_call(id);
        }
        let ms = opts.timeout.as_millis();
        return Err(failure(
            FailureKind::Timeout,
            format!(
                "Invocation timeout ({ms} ms) reached for method name: {method}, target instance: {}",
                c.server.to_value()
            ),
            None,
        ));
    }
    let o = match slot.take() {
        Some(Ok(v)) => Ok(ReturnValue {
            executed_by: c.server.clone(),
            returned: v,
        }),
        Some(Err((kind, m, ctx))) => Err(failure(kind, m, ctx)),
        None => Err(failure(
            FailureKind::Delivery(Status::Internal),
            "outcome lost".into(),
            None,
        )),
    };
    super::engine::CallSlot::recycle(slot);
    o
}

pub(crate) fn servers(shared: &Shared) -> Vec<Instance> {
    let st = shared.lock_state();
    std::iter::once((*shared.me()).clone())
        .chain(st.peers.values().map(|p| (*p.identity).clone()))
        .collect()
}

pub(crate) fn methods(shared: &Shared) -> Vec<MethodInfo> {
    let st = shared.lock_state();
    // In order of first appearance; the index keeps this linear in the number of methods.
    let mut out: Vec<MethodInfo> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = Default::default();
    let me = shared.me();
    let mine = st.my_methods.values().map(|d| (&*me, d));
    let theirs = st
        .peers
        .values()
        .flat_map(|p| p.methods.values().map(move |d| (&*p.identity, d)));
    for (server, def) in mine.chain(theirs) {
        match index.entry(identity_key(def)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                out[*e.get()].servers.push(server.clone())
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(MethodInfo {
                    def: (**def).clone(),
                    servers: vec![server.clone()],
                });
            }
        }
    }
    out
}

pub(crate) fn methods_for(shared: &Shared, filter: &InstanceFilter) -> Vec<MethodDef> {
    let st = shared.lock_state();
    let mut out = Vec::new();
    if filter.matches(&shared.me()) {
        out.extend(st.my_methods.values().map(|d| (**d).clone()));
    }
    for p in st.peers.values().filter(|p| filter.matches(&p.identity)) {
        out.extend(p.methods.values().map(|d| (**d).clone()));
    }
    out
}

pub(crate) fn wait_for_method(
    shared: &Shared,
    name: &str,
    timeout: Duration,
) -> Option<MethodInfo> {
    // No method has such a name: none will appear.
    if crate::model::check_method_name(name).is_err() {
        return None;
    }
    let until = crate::wait::deadline(timeout);
    // Matched as `invoke` matches (case-insensitive in every script): a method `invoke`
    // reaches is one this finds.
    shared
        .await_view(until, false, || {
            methods(shared)
                .into_iter()
                .find(|m| method_matches(name, &m.def))
        })
        .ok()
}

static NEXT_SUB: AtomicU64 = AtomicU64::new(1);

pub(crate) fn subscribe(shared: &Arc<Shared>, cb: EventCallback) -> EventSubscription {
    let id = NEXT_SUB.fetch_add(1, Ordering::Relaxed);
    // Replay what exists now, then deliver changes; both go through the task queue so the
    // replay precedes any later event, and the gate keeps changes out of the time between.
    let _events = events_gate(shared);
    let mut replay: Vec<InteropEvent> = servers(shared)
        .into_iter()
        .map(InteropEvent::ServerAdded)
        .collect();
    let ms = methods(shared);
    replay.extend(ms.iter().map(|m| InteropEvent::MethodAdded(m.def.clone())));
    for m in &ms {
        for s in &m.servers {
            replay.push(InteropEvent::ServerMethodAdded {
                server: s.clone(),
                method: m.def.clone(),
            });
        }
    }
    let active = Arc::new(AtomicBool::new(true));
    {
        let mut subs = shared.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let (cb2, active2) = (cb.clone(), active.clone());
        shared.enqueue(super::engine::Task::Call(Box::new(move || {
            for e in &replay {
                // SYNC(event-sub-active): pairs with the Release store of
                // `EventSubscription::drop`; only the flag is read.
                if !active2.load(Ordering::Acquire) {
                    return;
                }
                super::engine::isolated("an event callback", || cb2(e));
            }
        })));
        subs.push((id, cb, active.clone()));
    }
    EventSubscription {
        shared: Arc::downgrade(shared),
        id,
        active,
    }
}

/// Queues `e` for every subscriber.
pub(crate) fn emit(shared: &Arc<Shared>, e: InteropEvent) {
    let subs: Vec<(EventCallback, Arc<AtomicBool>)> = shared
        .subscribers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(_, c, a)| (c.clone(), a.clone()))
        .collect();
    if subs.is_empty() {
        return;
    }
    shared.enqueue(super::engine::Task::Call(Box::new(move || {
        for (s, active) in &subs {
            // SYNC(event-sub-active): as in `subscribe`.
            if active.load(Ordering::Acquire) {
                super::engine::isolated("an event callback", || s(&e));
            }
        }
    })));
}

pub(crate) fn methods_added(shared: &Arc<Shared>, peer: PeerId, methods: Vec<MethodSpec>) {
    let _events = events_gate(shared);
    let mut events = Vec::new();
    let listening = listening(shared);
    {
        let mut st = shared.lock_state();
        let known: std::collections::HashSet<String> = if listening {
            st.my_methods
                .values()
                .chain(st.peers.values().flat_map(|p| p.methods.values()))
                .map(|d| identity_key(d))
                .collect()
        } else {
            Default::default()
        };
        let Some(p) = st.peers.get_mut(&peer) else {
            return;
        };
        let server = (*p.identity).clone();
        let mut new_keys = std::collections::HashSet::new();
        for m in methods {
            if listening {
                let key = identity_key(&m.def);
                if !known.contains(&key) && new_keys.insert(key) {
                    events.push(InteropEvent::MethodAdded(m.def.clone()));
                }
                events.push(InteropEvent::ServerMethodAdded {
                    server: server.clone(),
                    method: m.def.clone(),
                });
            }
            p.methods.insert(m.id, Arc::new(m.def));
        }
        st.generation += 1;
    }
    shared.state_changed.notify_all();
    for e in events {
        emit(shared, e);
    }
}

pub(crate) fn methods_removed(shared: &Arc<Shared>, peer: PeerId, ids: Vec<u32>) {
    let _events = events_gate(shared);
    let (server, gone) = {
        let mut st = shared.lock_state();
        let Some(p) = st.peers.get_mut(&peer) else {
            return;
        };
        let gone: Vec<Arc<MethodDef>> = ids.iter().filter_map(|id| p.methods.remove(id)).collect();
        st.generation += 1;
        (st.peers[&peer].identity.clone(), gone)
    };
    shared.state_changed.notify_all();
    removed_methods(shared, &server, gone);
}

/// Emits the removal events for methods `server` no longer offers (already taken out of the
/// state). The caller holds the events gate.
pub(crate) fn removed_methods(shared: &Arc<Shared>, server: &Instance, gone: Vec<Arc<MethodDef>>) {
    if !listening(shared) {
        return;
    }
    let remaining: std::collections::HashSet<String> = {
        let st = shared.lock_state();
        st.my_methods
            .values()
            .chain(st.peers.values().flat_map(|p| p.methods.values()))
            .map(|d| identity_key(d))
            .collect()
    };
    let mut announced = std::collections::HashSet::new();
    for d in gone {
        emit(
            shared,
            InteropEvent::ServerMethodRemoved {
                server: server.clone(),
                method: (*d).clone(),
            },
        );
        let key = identity_key(&d);
        if !remaining.contains(&key) && announced.insert(key) {
            emit(shared, InteropEvent::MethodRemoved((*d).clone()));
        }
    }
}

/// Registers every one of our methods and streams again, with the same ids (restore thread,
/// after a reconnection).
pub(crate) fn restore(shared: &Arc<Shared>) {
    let methods: Vec<MethodSpec> = shared
        .lock_state()
        .my_methods
        .iter()
        .map(|(id, d)| MethodSpec {
            id: *id,
            def: (**d).clone(),
        })
        .collect();
    if methods.is_empty() {
        return;
    }
    let n = methods.len();
    let r = shared
        .conn
        .request(|req| ToGateway::Register { req, methods }, CONTROL_TIMEOUT);
    if super::reconnect::expect_ack("registering our methods", r) {
        crate::log::debug(format_args!("{n} methods registered again"));
    }
}

type PeerMethods = (Arc<Instance>, Vec<Arc<MethodDef>>);

/// The events of a reconnection (control thread): every old peer is forgotten (its methods
/// removed, `ServerRemoved` with reason "reset"), we are `Reconnected`, and the new peers are
/// discovered, as if they had just joined. Our own methods count as present throughout.
pub(crate) fn reset_events(
    shared: &Arc<Shared>,
    removed: Vec<PeerMethods>,
    added: Vec<PeerMethods>,
) {
    let mine: std::collections::HashSet<String> = shared
        .lock_state()
        .my_methods
        .values()
        .map(|d| identity_key(d))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (server, methods) in &removed {
        for d in methods {
            emit(
                shared,
                InteropEvent::ServerMethodRemoved {
                    server: (**server).clone(),
                    method: (**d).clone(),
                },
            );
            let key = identity_key(d);
            if !mine.contains(&key) && seen.insert(key) {
                emit(shared, InteropEvent::MethodRemoved((**d).clone()));
            }
        }
        emit(
            shared,
            InteropEvent::ServerRemoved {
                server: (**server).clone(),
                reason: "reset".into(),
            },
        );
    }
    emit(shared, InteropEvent::Reconnected((*shared.me()).clone()));
    let mut seen = std::collections::HashSet::new();
    for (server, methods) in &added {
        emit(shared, InteropEvent::ServerAdded((**server).clone()));
        for d in methods {
            let key = identity_key(d);
            if !mine.contains(&key) && seen.insert(key) {
                emit(shared, InteropEvent::MethodAdded((**d).clone()));
            }
            emit(
                shared,
                InteropEvent::ServerMethodAdded {
                    server: (**server).clone(),
                    method: (**d).clone(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::hook;
    use crate::client::{Client, InvokeOptions};
    use crate::model::Target;
    use crate::{Status, Value};
    use std::time::Duration;

    /// A call waiting for a server when another thread closes the client fails with `Closed`,
    /// not "no server".
    #[test]
    fn a_call_waiting_for_a_server_fails_closed_when_the_client_closes() {
        let gw = crate::client::testing::TestGateway::new("interop-close");
        let c = std::sync::Arc::new(Client::builder("c").socket(gw.socket()).connect().unwrap());
        let point = "invoke: waiting for a server";
        let other = c.clone();
        hook::set(point, move || hook::elsewhere(move || other.close()));
        let opts = InvokeOptions {
            target: Target::Best,
            wait: Duration::from_secs(60),
            ..InvokeOptions::default()
        };
        let e = c.invoke("Nobody", Value::map(), &opts).unwrap_err();
        assert!(!hook::is_set(point), "the call never waited");
        assert_eq!(e.status(), Status::Closed, "{e:?}");
    }

    /// A server announced after the caller looked for one and before it waited is found at
    /// once: the caller waited for a further change, the whole `wait` (here 20 s; every few
    /// hundred rounds of a register/invoke/unregister loop).
    #[test]
    fn a_server_announced_between_the_look_and_the_wait_is_not_waited_for() {
        let gw = crate::client::testing::TestGateway::new("interop-window");
        let c = Client::builder("c").socket(gw.socket()).connect().unwrap();
        let server = Client::builder("s").socket(gw.socket()).connect().unwrap();
        let point = "invoke: waiting for a server";
        let viewer = c.clone();
        let registrar = server.clone();
        hook::set(point, move || {
            hook::elsewhere(move || {
                registrar
                    .register("Late", |inv| Ok(inv.args.clone()))
                    .unwrap();
                // In the caller's view before the caller goes on to wait.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !viewer.methods().iter().any(|m| m.def.name == "Late") {
                    assert!(std::time::Instant::now() < deadline, "never announced");
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        });
        let opts = InvokeOptions {
            target: Target::Best,
            wait: Duration::from_secs(20),
            ..InvokeOptions::default()
        };
        let started = std::time::Instant::now();
        let r = c.invoke("Late", Value::map(), &opts).unwrap();
        assert!(!hook::is_set(point), "the call never waited");
        assert_eq!(r.returned, Value::map());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "found after {:?}",
            started.elapsed()
        );
    }
}
