//! The Rust client: connect to the gateway, register methods, invoke them, discover who serves
//! what.
//!
//! ```no_run
//! use knit::client::{Client, InvokeOptions};
//! use knit::Value;
//!
//! let server = Client::builder("pricer").connect()?;
//! server.register("Price", |call| {
//!     let sym = call.args.get("symbol").and_then(Value::as_str).unwrap_or("?");
//!     Ok(Value::object([("symbol", Value::from(sym)), ("bid", Value::from(101.25))]))
//! })?;
//!
//! let client = Client::builder("blotter").connect()?;
//! let r = client.invoke("Price", Value::object([("symbol", Value::from("VOD.L"))]), &InvokeOptions::default())?;
//! assert_eq!(r.returned.get("bid"), Some(&Value::from(101.25)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Callbacks (method handlers, event callbacks) run on the client's dispatcher thread, or, for a
//! client built with [`ClientBuilder::poll_mode`], inside [`Client::poll`].

pub(crate) mod bus;
mod channels;
mod conn;
mod contexts;
mod cow;
mod engine;
#[cfg(test)]
mod hook;
mod interop;
pub(crate) mod lane;
mod reconnect;
mod streams;
#[cfg(test)]
mod testing;

pub use bus::{BusMessage, BusSubscription, PublishOptions, SubscribeOptions};
pub use channels::{ChannelContext, ChannelMode, ChannelSubscription, ChannelUpdate};
pub use contexts::{ContextError, ContextSnapshot, ContextSubscription, ContextUpdate};
pub use engine::{MAX_DEPTH, MAX_NESTING};

/// The dispatch thread's stack: 8 MiB, as a process's main thread has on Linux.
const DISPATCH_STACK: usize = 8 << 20;
pub use interop::{InteropEvent, InvokeOptions, MethodInfo};
pub use streams::{
    ClientSubscription, SlowConsumerPolicy, Stream, StreamError, StreamEvent, StreamOptions,
    StreamParams, StreamSubscription, SubscriptionRequest,
};

use crate::model::InvocationResult;
use crate::status::Status;
use crate::wait::WaitStrategy;
use crate::wire::frame::{self, Instance, ToGateway};
use crate::wire::Value;
use engine::{CallSlot, Shared};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Errors of the client API other than invocation outcomes.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nothing answers on the gateway socket.
    #[error("gateway unreachable at {path}: {source}")]
    GatewayUnreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The gateway refused our hello.
    #[error("gateway refused the connection: {message}")]
    Refused { status: Status, message: String },
    /// The gateway answered something this build does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection to the gateway is gone.
    #[error("the connection to the gateway is closed")]
    Disconnected,
    /// This client was closed.
    #[error("the client is closed")]
    Closed,
    /// A bad argument (empty name and the like).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The gateway did not answer in time.
    #[error("the gateway did not answer in time")]
    Timeout,
    /// A payload larger than the gateway allows.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { size: usize, max: usize },
    /// The gateway refused the request.
    #[error("{message}")]
    Gateway { status: Status, message: String },
}

impl ClientError {
    /// The status code for this error.
    pub fn status(&self) -> Status {
        match self {
            ClientError::GatewayUnreachable { .. } => Status::GatewayUnreachable,
            ClientError::Refused { status, .. } | ClientError::Gateway { status, .. } => *status,
            ClientError::Protocol(_) => Status::Protocol,
            ClientError::Disconnected => Status::Disconnected,
            ClientError::Closed => Status::Closed,
            ClientError::InvalidArgument(_) => Status::InvalidArgument,
            ClientError::Timeout => Status::Timeout,
            ClientError::PayloadTooLarge { .. } => Status::PayloadTooLarge,
        }
    }
}

impl From<crate::wire::codec::EncodeError> for ClientError {
    fn from(e: crate::wire::codec::EncodeError) -> Self {
        ClientError::InvalidArgument(e.to_string())
    }
}

/// Why an invocation failed.
#[derive(Debug, Error)]
pub enum InvokeError {
    /// Bad method name or options.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No server matched within the wait.
    #[error(
        "Can not find a method matching {{\"name\":{}}} with server filter {target}",
        serde_json::Value::from(crate::model::clip_name(method).as_ref())
    )]
    NoServer { method: String, target: String },
    /// The arguments are larger than the gateway allows.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { size: usize, max: usize },
    /// Every targeted server failed; the result says how (status via
    /// [`InvocationResult::failure_status`]).
    #[error("{}", .0.message)]
    Failed(Box<InvocationResult>),
    /// Not connected.
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl InvokeError {
    /// The status code for this error (the CLI's exit code follows from it).
    pub fn status(&self) -> Status {
        match self {
            InvokeError::InvalidArgument(_) => Status::InvalidArgument,
            InvokeError::NoServer { .. } => Status::NoServer,
            InvokeError::PayloadTooLarge { .. } => Status::PayloadTooLarge,
            InvokeError::Failed(r) => r.failure_status(),
            InvokeError::Client(e) => e.status(),
        }
    }
}

/// An error a method handler returns: a message and optional context, as io.Connect has.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodError {
    pub message: String,
    pub context: Option<Value>,
}

impl MethodError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            context: None,
        }
    }
    /// Adds context.
    pub fn with_context(mut self, context: Value) -> Self {
        self.context = Some(context);
        self
    }
}

impl<T: std::fmt::Display> From<T> for MethodError {
    fn from(e: T) -> Self {
        MethodError::new(e.to_string())
    }
}

/// One incoming call.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The method's name as registered.
    pub method: Arc<str>,
    /// The arguments.
    pub args: Value,
    /// Who called.
    pub caller: Arc<Instance>,
}

type SyncHandler = Box<dyn Fn(&Invocation) -> Result<Value, MethodError> + Send + Sync>;
type AsyncHandler = Box<dyn Fn(Invocation, Responder) + Send + Sync>;

pub(crate) enum Handler {
    Sync(SyncHandler),
    Async(AsyncHandler),
    /// A stream: subscribed to, not invoked.
    Stream,
}

/// The way to answer an asynchronous call, from any thread, exactly once. Dropping it without
/// answering answers with an error.
#[allow(missing_debug_implementations)]
pub struct Responder {
    shared: Arc<Shared>,
    target: Option<ReplyTarget>,
}

enum ReplyTarget {
    Lane { lane: Arc<lane::Lane>, call_id: u64 },
    Relay { invocation: u64, epoch: u64 },
    Local(Arc<CallSlot>),
}

impl Responder {
    fn lane(shared: Arc<Shared>, lane: Arc<lane::Lane>, call_id: u64) -> Self {
        Self {
            shared,
            target: Some(ReplyTarget::Lane { lane, call_id }),
        }
    }

    fn relay(shared: Arc<Shared>, invocation: u64, epoch: u64) -> Self {
        Self {
            shared,
            target: Some(ReplyTarget::Relay { invocation, epoch }),
        }
    }

    fn local(shared: Arc<Shared>, slot: Arc<CallSlot>) -> Self {
        Self {
            shared,
            target: Some(ReplyTarget::Local(slot)),
        }
    }

    fn send(&mut self, outcome: Result<Value, (String, Option<Value>)>) {
        match self.target.take() {
            Some(ReplyTarget::Lane { lane, call_id }) => {
                self.shared.send_result(&lane, call_id, outcome)
            }
            Some(ReplyTarget::Relay { invocation, epoch }) => {
                // The call came through a gateway connection that is gone; the new gateway's
                // invocation ids mean other calls.
                if epoch != self.shared.conn.epoch() {
                    crate::log::debug(format_args!(
                        "relayed reply dropped: the gateway connection was reset"
                    ));
                    return;
                }
                let outcome = relay_outcome(outcome, self.shared.max_payload());
                if let Err(e) = self.shared.conn.send(&ToGateway::Yield {
                    invocation,
                    outcome,
                }) {
                    crate::log::debug(format_args!("relayed reply lost: {e}"));
                }
            }
            Some(ReplyTarget::Local(slot)) => {
                let o = outcome.map_err(|(m, c)| (crate::model::FailureKind::Remote, m, c));
                self.shared.complete_local(&slot, o);
            }
            None => {}
        }
    }

    /// Answers with a result.
    pub fn ok(mut self, result: impl Into<Value>) {
        self.send(Ok(result.into()));
    }

    /// Answers with an error.
    pub fn error(mut self, e: impl Into<MethodError>) {
        let e = e.into();
        self.send(Err((e.message, e.context)));
    }

    /// Answers that the method invoked is not (any longer) registered here: `NotFound` for the
    /// caller, who may find it registered again under another id, not the method failing.
    pub(crate) fn removed(mut self) {
        let message = engine::METHOD_REMOVED;
        match self.target.take() {
            Some(ReplyTarget::Lane { lane, call_id }) => self.shared.send_removed(&lane, call_id),
            Some(ReplyTarget::Relay { invocation, epoch }) => {
                if epoch != self.shared.conn.epoch() {
                    return;
                }
                let outcome = frame::RelayOutcome::Err {
                    status: Status::NotFound,
                    message: message.into(),
                    context: Value::Null,
                };
                if let Err(e) = self.shared.conn.send(&ToGateway::Yield {
                    invocation,
                    outcome,
                }) {
                    crate::log::debug(format_args!("relayed reply lost: {e}"));
                }
            }
            Some(ReplyTarget::Local(slot)) => {
                let o = Err((
                    crate::model::FailureKind::Delivery(Status::NotFound),
                    message.into(),
                    None,
                ));
                self.shared.complete_local(&slot, o);
            }
            None => {}
        }
    }
}

/// A method's outcome as a relayed answer, within the payload limit as on a lane
/// (`RelayOutcome::within`): an oversized result reaches the caller as `PayloadTooLarge`, not
/// the method failing.
fn relay_outcome(
    outcome: Result<Value, (String, Option<Value>)>,
    max_payload: usize,
) -> frame::RelayOutcome {
    match outcome {
        Ok(v) => frame::RelayOutcome::Ok(v),
        Err((message, context)) => frame::RelayOutcome::Err {
            status: Status::MethodFailed,
            message,
            context: context.unwrap_or(Value::Null),
        },
    }
    .within(max_payload)
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.target.is_some() {
            self.send(Err(("method handler did not reply".into(), None)));
        }
    }
}

/// A registered event callback; `unsubscribe` (or dropping it) removes it.
#[derive(Debug)]
pub struct EventSubscription {
    shared: std::sync::Weak<Shared>,
    id: u64,
    /// Cleared on drop: events already queued for the callback skip it.
    active: Arc<std::sync::atomic::AtomicBool>,
}

impl EventSubscription {
    /// Stops the callback.
    pub fn unsubscribe(self) {}
}

impl Drop for EventSubscription {
    fn drop(&mut self) {
        // SYNC(event-sub-active): pairs with the Acquire loads of `interop::emit` and the
        // replay; the callback runs no more once they see it (none may still be running, on
        // the dispatch thread, when this is dropped from another).
        self.active
            .store(false, std::sync::atomic::Ordering::Release);
        if let Some(s) = self.shared.upgrade() {
            s.subscribers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(id, _, _)| *id != self.id);
        }
    }
}

pub(crate) type EventCallback = Arc<dyn Fn(&InteropEvent) + Send + Sync>;

/// Sets up a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    socket: Option<PathBuf>,
    application: String,
    instance: Option<String>,
    wait: WaitStrategy,
    poll_mode: bool,
    relay_only: bool,
    connect_timeout: Duration,
    skip_own_policy: bool,
    reconnect: bool,
}

/// The state of a client's connection to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected.
    Connected,
    /// The connection was lost at `since`; the client is trying to reconnect (unless it was
    /// built with [`ClientBuilder::reconnect`]`(false)`).
    Disconnected {
        since: Instant,
        reason: String,
        /// The gateway said it was stopping (a clean stop, not a crash).
        gateway_stopped: bool,
    },
    /// [`Client::close`] was called.
    Closed,
}

impl ClientBuilder {
    /// A client for `application`.
    pub fn new(application: impl Into<String>) -> Self {
        Self {
            socket: None,
            application: application.into(),
            instance: None,
            wait: WaitStrategy::default(),
            poll_mode: false,
            relay_only: false,
            connect_timeout: Duration::from_secs(5),
            skip_own_policy: false,
            reconnect: true,
        }
    }

    /// Testing only: do not refuse what the gateway's policy forbids us before sending it, as
    /// a modified client library would not — to show the gateway and the receiving peers
    /// refuse it anyway.
    #[doc(hidden)]
    pub fn skip_own_policy_checks(mut self) -> Self {
        self.skip_own_policy = true;
        self
    }

    /// The gateway socket (default: `KNIT_GATEWAY`, else the per-user default path).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Asks for a specific instance id (unique among connected peers).
    pub fn instance(mut self, id: impl Into<String>) -> Self {
        self.instance = Some(id.into());
        self
    }

    /// How the client's threads wait for messages.
    pub fn wait_strategy(mut self, w: WaitStrategy) -> Self {
        self.wait = w;
        self
    }

    /// No dispatcher thread: callbacks run inside [`Client::poll`].
    pub fn poll_mode(mut self, on: bool) -> Self {
        self.poll_mode = on;
        self
    }

    /// Route every call through the gateway instead of shared-memory lanes (for sandboxes
    /// without shared memory; slower: two socket hops per message).
    pub fn relay_only(mut self, on: bool) -> Self {
        self.relay_only = on;
        self
    }

    /// How long the handshake may take.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Whether to reconnect by itself when the gateway goes away (default: yes). A client
    /// that reconnects registers its methods and streams again, resubscribes its bus, context
    /// and stream subscriptions and keeps its channel membership; see `docs/guarantees.md`.
    pub fn reconnect(mut self, on: bool) -> Self {
        self.reconnect = on;
        self
    }

    /// Connects and says hello.
    pub fn connect(self) -> Result<Client, ClientError> {
        if self.application.trim().is_empty() {
            return Err(ClientError::InvalidArgument(
                "application name is empty".into(),
            ));
        }
        let hello = reconnect::HelloParams {
            path: crate::control::resolve_socket_path(self.socket.as_deref()),
            application: self.application.clone(),
            relay_only: self.relay_only,
            timeout: self.connect_timeout,
            reconnect: self.reconnect,
        };
        let hs = reconnect::handshake(&hello, self.instance.clone(), None)?;
        let bells = reconnect::bells_of(&hs, self.relay_only, true)?
            .ok_or_else(|| ClientError::Protocol("welcome without a doorbell directory".into()))?;
        let welcome = hs.welcome;
        let peers = reconnect::peers_of(welcome.peers);
        let my_rules = if self.skip_own_policy {
            None
        } else {
            engine::restrictive(welcome.rules.clone())
        };
        let policy_on = peers.values().any(|p| p.rules.is_some());
        let max_payload = usize::try_from(welcome.max_payload).unwrap_or(usize::MAX);
        let known_contexts = welcome.contexts.clone();
        let bus_subs = welcome.bus.clone();
        let sock = hs.sock;
        let frames = hs.frames;
        let shared = Arc::new(Shared::new(
            welcome.identity,
            self.wait,
            self.poll_mode,
            hello,
            max_payload,
            conn::Conn::new(sock.clone()),
            bells,
            peers,
        ));
        // Relaxed: nothing else runs on this client yet (its threads are spawned below).
        shared
            .my_rules_on
            .store(my_rules.is_some(), std::sync::atomic::Ordering::Relaxed);
        // Relaxed: as above; only threads started after this read it.
        shared
            .skip_own_policy
            .store(self.skip_own_policy, std::sync::atomic::Ordering::Relaxed);
        *shared.my_rules.write().unwrap_or_else(|e| e.into_inner()) = my_rules;
        // Relaxed: nothing else runs on this client yet.
        shared
            .policy_on
            .store(policy_on, std::sync::atomic::Ordering::Relaxed);
        shared.ctx.lock().unwrap_or_else(|e| e.into_inner()).known = known_contexts
            .into_iter()
            .map(|(id, name)| (name, id))
            .collect();
        bus::seed(&shared, bus_subs);
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("knit-control".into())
            .spawn(move || conn::reader_loop(s, sock, frames))
            .map_err(|e| ClientError::Protocol(format!("spawning the control thread: {e}")))?;
        let dispatcher = if self.poll_mode {
            None
        } else {
            let s = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("knit-dispatch".into())
                    // Callbacks run here, up to `MAX_DEPTH` of them one inside another
                    // (nested waits), in whatever language the app is written in: room for
                    // that (address space only, until touched).
                    .stack_size(DISPATCH_STACK)
                    .spawn(move || s.dispatch_loop())
                    .map_err(|e| ClientError::Protocol(format!("spawning the dispatcher: {e}")))?,
            )
        };
        Ok(Client {
            h: Arc::new(ClientHandle {
                shared,
                threads: Mutex::new(vec![reader].into_iter().chain(dispatcher).collect()),
            }),
        })
    }
}

struct ClientHandle {
    shared: Arc<Shared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl ClientHandle {
    fn close(&self) {
        let s = &self.shared;
        // SYNC(client-closed): an RMW, so only the first close goes on; its Release half pairs
        // with the Acquire in `Shared::is_closed` (engine.rs). Only the flag is read.
        if s.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let _ = s.conn.send(&ToGateway::Goodbye);
        s.conn.shutdown();
        s.fail_all_calls(
            crate::model::FailureKind::Delivery(Status::Closed),
            "the client is closed",
        );
        // A send waiting for room in a peer's full ring (a publish to a subscriber that stopped
        // reading) gives up when it sees its lane closed, not at its own deadline seconds later.
        let lanes: Vec<Arc<lane::Lane>> = s.lock_state().lanes.values().cloned().collect();
        for l in lanes {
            l.close();
        }
        s.state_changed.notify_all();
        s.wake_all();
        let me = std::thread::current().id();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            // A callback that drops the last handle runs on the dispatcher: do not join itself.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.close();
    }
}

/// A connection to the gateway. Cheap to clone; the connection closes when the last clone is
/// dropped or [`Client::close`] is called.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Client {
    h: Arc<ClientHandle>,
}

impl Client {
    /// A builder for `application`.
    pub fn builder(application: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(application)
    }

    /// Connects with defaults.
    pub fn connect(application: impl Into<String>) -> Result<Client, ClientError> {
        ClientBuilder::new(application).connect()
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.h.shared
    }

    /// Who we are, as the gateway resolved it. After a reconnection the peer id is new; the
    /// instance id stays the same.
    pub fn instance(&self) -> Arc<Instance> {
        self.shared().me()
    }

    /// Largest payload the gateway allows.
    pub fn max_payload(&self) -> usize {
        self.shared().max_payload()
    }

    /// Whether the client was closed ([`Client::close`], from any thread).
    pub fn is_closed(&self) -> bool {
        self.shared().is_closed()
    }

    /// Whether the control connection is up.
    pub fn is_connected(&self) -> bool {
        self.shared().conn.is_connected() && !self.shared().is_closed()
    }

    /// Whether the gateway announced a clean stop (Ctrl-C, SIGTERM) on the current connection,
    /// before or after the connection closed. A peer that stops with the gateway can be gone
    /// before this client's connection closes: this tells its departure apart from a crash.
    pub fn gateway_stopping(&self) -> bool {
        self.shared().conn.announced_stop()
    }

    /// Whether the control connection is up, and if not since when and why.
    pub fn connection_state(&self) -> ConnectionState {
        let s = self.shared();
        if s.is_closed() {
            return ConnectionState::Closed;
        }
        match s.conn.down() {
            Some(d) if !s.conn.is_connected() => ConnectionState::Disconnected {
                since: d.since,
                reason: d.reason,
                gateway_stopped: d.stopping,
            },
            _ => ConnectionState::Connected,
        }
    }

    /// Unregisters everything, says goodbye, stops the threads. Pending calls fail (callers of
    /// our methods see `PeerLeft` at once). Returns once a callback running on the dispatch
    /// thread has returned (not waited for when called from that callback itself): after it,
    /// none of this client's callbacks runs.
    pub fn close(&self) {
        self.h.close();
    }

    /// Poll mode: runs pending callbacks, waiting up to `timeout` for one. Returns how many ran.
    /// (Harmless, and returns 0 at once, on a client with a dispatcher thread.)
    pub fn poll(&self, timeout: Duration) -> usize {
        if !self.shared().poll_mode {
            return 0;
        }
        self.shared().poll(timeout)
    }

    /// Registers a method with a plain handler: return a value, or an error.
    pub fn register<F>(
        &self,
        def: impl Into<frame::MethodDef>,
        handler: F,
    ) -> Result<(), ClientError>
    where
        F: Fn(&Invocation) -> Result<Value, MethodError> + Send + Sync + 'static,
    {
        interop::register(self.shared(), def.into(), Handler::Sync(Box::new(handler))).map(|_| ())
    }

    /// Registers a method whose handler answers later, from any thread, through a [`Responder`].
    pub fn register_async<F>(
        &self,
        def: impl Into<frame::MethodDef>,
        handler: F,
    ) -> Result<(), ClientError>
    where
        F: Fn(Invocation, Responder) + Send + Sync + 'static,
    {
        interop::register(self.shared(), def.into(), Handler::Async(Box::new(handler))).map(|_| ())
    }

    /// Removes one of our methods.
    pub fn unregister(&self, name: &str) -> Result<(), ClientError> {
        interop::unregister(self.shared(), name)
    }

    /// Invokes a method.
    pub fn invoke(
        &self,
        method: &str,
        args: impl Into<Value>,
        opts: &InvokeOptions,
    ) -> Result<InvocationResult, InvokeError> {
        interop::invoke(self.shared(), method, args.into(), opts)
    }

    /// Every method known, with its servers (ourselves included).
    pub fn methods(&self) -> Vec<MethodInfo> {
        interop::methods(self.shared())
    }

    /// Every peer known, ourselves first.
    pub fn servers(&self) -> Vec<Instance> {
        interop::servers(self.shared())
    }

    /// Methods of the instances matching `filter`.
    pub fn methods_for(&self, filter: &crate::model::InstanceFilter) -> Vec<frame::MethodDef> {
        interop::methods_for(self.shared(), filter)
    }

    /// Waits until a method named `name` has a server; `None` after `timeout` (at once for a
    /// name no method can have: empty, or longer than [`crate::model::MAX_NAME_LEN`]). Names
    /// match as `invoke` matches them: case-insensitive, in every script.
    pub fn wait_for_method(&self, name: &str, timeout: Duration) -> Option<MethodInfo> {
        interop::wait_for_method(self.shared(), name, timeout)
    }

    /// Publishes `data` on `topic` (features.md §7). Fire-and-forget: delivered to every
    /// subscription that matches, the publisher's own included.
    pub fn publish(
        &self,
        topic: &str,
        data: impl Into<Value>,
        opts: &PublishOptions,
    ) -> Result<(), ClientError> {
        bus::publish(self.shared(), topic, data.into(), opts)
    }

    /// Publishes `items` on `topic`, in order, as if each were published alone, paying the
    /// per-message synchronisation (the lane lock, the doorbell's fence) once per batch. For
    /// fast feeds. The batch is checked whole before anything is sent (an item that cannot be
    /// encoded or is too large refuses the batch).
    pub fn publish_batch(
        &self,
        topic: &str,
        items: &[Value],
        opts: &PublishOptions,
    ) -> Result<(), ClientError> {
        bus::publish_batch(self.shared(), topic, items, opts)
    }

    /// Subscribes to `topic` (exact, or a pattern with `*` for one segment and `>` for the
    /// rest); `f` runs on the dispatch thread for each matching message.
    pub fn subscribe<F>(
        &self,
        topic: &str,
        opts: SubscribeOptions,
        f: F,
    ) -> Result<BusSubscription, ClientError>
    where
        F: Fn(&BusMessage) + Send + Sync + 'static,
    {
        bus::subscribe(self.shared(), topic, opts, Arc::new(f))
    }

    /// Creates a stream (a method with `streaming: true`) that subscribers follow.
    pub fn create_stream(
        &self,
        def: impl Into<frame::MethodDef>,
        options: StreamOptions,
    ) -> Result<Stream, ClientError> {
        streams::create(self.shared(), def.into(), options)
    }

    /// Subscribes to a stream; `f` runs on the dispatch thread for each item and once when the
    /// subscription ends. Returns when the first server accepted.
    pub fn subscribe_stream<F>(
        &self,
        name: &str,
        params: StreamParams,
        f: F,
    ) -> Result<ClientSubscription, StreamError>
    where
        F: Fn(&StreamEvent) + Send + Sync + 'static,
    {
        streams::subscribe(self.shared(), name, params, Arc::new(f))
    }

    /// Colour channels.
    pub fn channels(&self) -> Channels<'_> {
        Channels {
            shared: self.shared(),
        }
    }

    /// Shared contexts.
    pub fn contexts(&self) -> Contexts<'_> {
        Contexts {
            shared: self.shared(),
        }
    }

    /// Calls `f` for every discovery event. Current servers and methods are replayed first (as
    /// `*Added` events) on the dispatch thread.
    pub fn on_event<F>(&self, f: F) -> EventSubscription
    where
        F: Fn(&InteropEvent) + Send + Sync + 'static,
    {
        interop::subscribe(self.shared(), Arc::new(f))
    }
}

/// Shared contexts (features.md §5): named objects every app of the user sees, with versions.
///
/// ```no_run
/// # let client = knit::client::Client::connect("app")?;
/// use knit::Value;
/// let ctx = client.contexts();
/// let v = ctx.update("instrument", Value::object([("ric", Value::from("VOD.L"))]))?;
/// let snap = ctx.get("instrument")?;
/// assert_eq!(snap.version, v);
/// let _sub = ctx.subscribe("instrument", |u| println!("{} v{}: {}", u.name, u.version, u.delta))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy)]
pub struct Contexts<'a> {
    shared: &'a Arc<Shared>,
}

impl std::fmt::Debug for Contexts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Contexts")
    }
}

impl Contexts<'_> {
    /// Names of every context that exists.
    pub fn all(&self) -> Vec<String> {
        contexts::all(self.shared)
    }

    /// The current value (`{}` at version 0 when the context does not exist). Reads the shared
    /// snapshot directly: no message, no syscall; decoded once per version.
    pub fn get(&self, name: &str) -> Result<ContextSnapshot, ContextError> {
        contexts::get(self.shared, name)
    }

    /// Replaces the whole value. Returns the version after the call.
    pub fn set(&self, name: &str, data: impl Into<Value>) -> Result<u64, ContextError> {
        contexts::set(self.shared, name, data.into())
    }

    /// Replaces the given top-level keys whole; `null` deletes a key; keys not given stay.
    /// Nothing is written (and nobody told) when nothing changes. Creates the context (storing
    /// `data` as given) when missing.
    pub fn update(&self, name: &str, data: impl Into<Value>) -> Result<u64, ContextError> {
        contexts::update(self.shared, name, data.into(), None)
    }

    /// Like `update`, but only if the context is still at `version` (compare-and-set).
    pub fn update_if(
        &self,
        name: &str,
        version: u64,
        data: impl Into<Value>,
    ) -> Result<u64, ContextError> {
        contexts::update(self.shared, name, data.into(), Some(version))
    }

    /// Sets one dotted path (intermediates created; `null` deletes the leaf).
    pub fn set_path(
        &self,
        name: &str,
        path: &str,
        value: impl Into<Value>,
    ) -> Result<u64, ContextError> {
        contexts::set_paths(self.shared, name, vec![(path.to_string(), value.into())])
    }

    /// Sets several paths in one version, in order.
    pub fn set_paths(&self, name: &str, paths: Vec<(String, Value)>) -> Result<u64, ContextError> {
        contexts::set_paths(self.shared, name, paths)
    }

    /// Destroys the context for everyone.
    pub fn destroy(&self, name: &str) -> Result<(), ContextError> {
        contexts::destroy(self.shared, name)
    }

    /// Calls `f` with the current value (if the context exists) and then with every change, in
    /// version order, on the dispatch thread. Subscribing before the context exists is fine: the
    /// first call comes when it is created.
    pub fn subscribe<F>(&self, name: &str, f: F) -> Result<ContextSubscription, ContextError>
    where
        F: Fn(&ContextUpdate) + Send + Sync + 'static,
    {
        contexts::subscribe(self.shared, name, Arc::new(f))
    }
}

/// Colour channels (features.md §6).
///
/// ```no_run
/// # let client = knit::client::Client::connect("app")?;
/// use knit::Value;
/// let ch = client.channels();
/// ch.join("Red")?;
/// let _sub = ch.subscribe(|u| println!("{} now {}", u.channel, u.data))?;
/// ch.publish(Value::object([("instrument", Value::from("VOD.L"))]), None)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy)]
pub struct Channels<'a> {
    shared: &'a Arc<Shared>,
}

impl std::fmt::Debug for Channels<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channels")
    }
}

impl Channels<'_> {
    /// Names of all channels.
    pub fn all(&self) -> Vec<String> {
        channels::all(self.shared)
    }
    /// The context of every channel this client may read (those it may not are left out;
    /// [`Channels::all`] names them all).
    pub fn list(&self) -> Result<Vec<ChannelContext>, ContextError> {
        channels::list(self.shared)
    }
    /// One channel's context.
    pub fn get(&self, name: &str) -> Result<ChannelContext, ContextError> {
        channels::get(self.shared, name)
    }
    /// Single (default: joining replaces) or multi mode (joining adds).
    pub fn set_mode(&self, mode: ChannelMode) {
        channels::set_mode(self.shared, mode)
    }
    /// Joins a channel; followers immediately get its current data.
    pub fn join(&self, name: &str) -> Result<(), ContextError> {
        channels::join(self.shared, name)
    }
    /// Leaves one channel, or all (`None`). Not joined: nothing happens.
    pub fn leave(&self, name: Option<&str>) {
        channels::leave(self.shared, name)
    }
    /// The current channel (single mode), or the first joined.
    pub fn my(&self) -> Option<String> {
        channels::my_channels(self.shared).into_iter().next()
    }
    /// Every channel joined.
    pub fn my_channels(&self) -> Vec<String> {
        channels::my_channels(self.shared)
    }
    /// Replaces the given top-level keys of the data of the named channel, or of every joined
    /// channel. Returns the (last) context version.
    pub fn publish(&self, data: impl Into<Value>, name: Option<&str>) -> Result<u64, ContextError> {
        channels::publish(self.shared, data.into(), name)
    }
    /// Stores an FDC3 context (`{type, …}`) as the latest of its type.
    pub fn publish_fdc3(
        &self,
        context: impl Into<Value>,
        name: Option<&str>,
    ) -> Result<u64, ContextError> {
        channels::publish_fdc3(self.shared, context.into(), name)
    }
    /// Follows whatever channels this client is on.
    pub fn subscribe<F>(&self, f: F) -> Result<ChannelSubscription, ContextError>
    where
        F: Fn(&ChannelUpdate) + Send + Sync + 'static,
    {
        channels::subscribe(self.shared, Arc::new(f))
    }
    /// Follows one channel without joining it.
    pub fn subscribe_for<F>(&self, name: &str, f: F) -> Result<ChannelSubscription, ContextError>
    where
        F: Fn(&ChannelUpdate) + Send + Sync + 'static,
    {
        channels::subscribe_for(self.shared, name, Arc::new(f))
    }
    /// Calls `f` with the joined channels now and after every change.
    pub fn on_changed<F>(&self, f: F)
    where
        F: Fn(&[String]) + Send + Sync + 'static,
    {
        channels::on_changed(self.shared, Arc::new(f));
    }
}

impl From<&str> for frame::MethodDef {
    fn from(name: &str) -> Self {
        frame::MethodDef::new(name)
    }
}

impl From<String> for frame::MethodDef {
    fn from(name: String) -> Self {
        frame::MethodDef::new(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_result_over_the_payload_limit_becomes_payload_too_large() {
        let big = Value::from("x".repeat(5000));
        match relay_outcome(Ok(big.clone()), 1000) {
            frame::RelayOutcome::Err {
                status, message, ..
            } => {
                assert_eq!(status, Status::PayloadTooLarge);
                let size = crate::wire::record::payload_len(&big);
                assert_eq!(
                    message,
                    format!("result of {size} bytes exceeds the limit of 1000 bytes")
                );
            }
            other => panic!("{other:?}"),
        }
        // Within the limit, and errors (not results), go as they are.
        assert!(matches!(
            relay_outcome(Ok(big), 1 << 20),
            frame::RelayOutcome::Ok(_)
        ));
        assert!(matches!(
            relay_outcome(Err(("no".into(), None)), 1),
            frame::RelayOutcome::Err {
                status: Status::MethodFailed,
                ..
            }
        ));
    }
}
