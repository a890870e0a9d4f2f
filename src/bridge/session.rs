//! One WebSocket connection: GW3 in, registry requests out; registry notices in, GW3 out.
//! Interop methods are here; shared contexts, the bus and streams in the child modules.

mod bus;
mod ctx;
mod streams;

use super::auth::Authenticator;
use super::contexts::Contexts;
use super::gw3::{self, rid, rid_ref, yield_invocation, yield_result, CallReq, Ids, Obj};
use super::hub::{Hub, HubEvent, Kill, CLOSE_SLOW};
use super::peers::{gid_of, PeerView, Views};
use super::{BridgeConfig, Outbox, Wire};
use crate::gateway::{Admission, Closer, CoreHandle, Limits, Outgoing};
use crate::status::Status;
use crate::wire::frame::{FromGateway, MethodSpec, PeerId, RelayOutcome, ToGateway, Transport};
use crate::wire::Value;
use futures_util::StreamExt;
use serde_json::{json, Value as J};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// What every connection of one bridge shares.
pub(crate) struct Shared {
    pub core: CoreHandle,
    pub hub: Hub,
    /// The views of the peers connections know, shared between them.
    pub views: Views,
    pub ids: Ids,
    pub auth: Authenticator,
    pub limits: Limits,
    pub cfg: BridgeConfig,
    pub ctxs: Arc<Contexts>,
    pub spin: Arc<super::spin::Spin>,
    pub pending: Arc<super::pending::Pending>,
    pub gate: Arc<super::gate::Gate>,
}

/// Most bus subscriptions, stream subscriptions made, and subscriptions to its streams, that
/// one connection may have (each is state in the gateway).
pub(super) const MAX_SUBSCRIPTIONS: usize = 100_000;

/// A method id nobody registers: asks the registry whether a peer we do not know exists and
/// whether it is ours to call, without calling anything.
const NO_METHOD: u32 = u32::MAX;

/// Close codes (RFC 6455).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_PROTOCOL: u16 = 1002;
/// RFC 6455: the server met a condition that kept it from serving the connection.
const CLOSE_INTERNAL: u16 = 1011;

/// The `invoke` frame: with [`ResultFrame`], the two frames on the path of every call, which
/// are serialised straight from their parts instead of through a `serde_json::Value` tree
/// (docs/benchmarks.md §6.3). Same fields, in the same order, as the `json!` trees they
/// replaced.
#[derive(serde::Serialize)]
struct InvokeFrame<'a> {
    domain: &'static str,
    #[serde(rename = "type")]
    ty: &'static str,
    invocation_id: &'a str,
    peer_id: &'a J,
    method_id: &'a J,
    caller_id: &'a str,
    arguments: (),
    arguments_kv: gw3::Kv<'a>,
    context: (),
}

/// The `result` frame a caller gets for a successful call (see [`InvokeFrame`]).
#[derive(serde::Serialize)]
struct ResultFrame<'a> {
    domain: &'static str,
    #[serde(rename = "type")]
    ty: &'static str,
    request_id: &'a J,
    peer_id: &'a J,
    result: gw3::Kv<'a>,
}

/// The `success` answer to a request (see [`InvokeFrame`]), in the field order of the `json!`
/// tree it replaced.
#[derive(serde::Serialize)]
struct SuccessFrame<'a> {
    domain: &'a str,
    #[serde(rename = "type")]
    ty: &'static str,
    request_id: &'a J,
    peer_id: &'a J,
}

/// Another peer as this connection's client knows it: the view of it (shared with every other
/// connection that sees it the same, `peers.rs`), and whether the client was told about it.
pub(super) struct Known {
    view: Arc<PeerView>,
    /// Whether the client was sent `peer-added` for it.
    announced: bool,
}

impl Known {
    fn new(view: Arc<PeerView>) -> Known {
        Known {
            view,
            announced: false,
        }
    }

    /// Whether it is a web peer.
    fn web(&self) -> bool {
        self.view.web().is_some()
    }
}

/// A registry request waiting for `Ack`/`Fail`.
enum Req {
    Register {
        request_id: J,
        ids: Vec<u32>,
    },
    Unregister {
        request_id: J,
        ids: Vec<u32>,
    },
    /// Unregistering on `leave agm`: nothing to tell the client.
    Quiet {
        ids: Vec<u32>,
    },
}

struct PendingCall {
    request_id: HeldId,
    server: String,
    method: String,
}

/// The bytes of the request ids a connection keeps to answer with (those of its waiting calls,
/// or of its stream subscriptions), against `max_waiting_bytes`: a client chooses their size.
#[derive(Default)]
pub(super) struct Meter(Arc<AtomicUsize>);

/// A request id kept to answer with; its meter counts it until it is dropped.
pub(super) struct HeldId {
    pub(super) id: J,
    bytes: usize,
    meter: Arc<AtomicUsize>,
}

impl Meter {
    /// Holds `id` if it fits under `limit`; otherwise the reason, naming what is `waiting`.
    pub(super) fn hold(&self, id: J, limit: usize, waiting: &str) -> Result<HeldId, String> {
        let bytes = gw3::approx_len(&id);
        // Relaxed: only the connection's own task holds and drops its ids (the count is
        // atomic to be shared with them, not across threads).
        let held = self.0.load(Ordering::Relaxed);
        if held.saturating_add(bytes) > limit {
            return Err(format!(
                "too many {waiting}: their request ids hold {held} bytes, {bytes} more would \
                 pass the limit ({limit}, max_waiting_bytes)"
            ));
        }
        self.0.fetch_add(bytes, Ordering::Relaxed);
        Ok(HeldId {
            id,
            bytes,
            meter: self.0.clone(),
        })
    }
}

impl Drop for HeldId {
    fn drop(&mut self) {
        // Relaxed: the meter only bounds what a client may hold; nothing is published through
        // it, and the read-modify-write keeps the count exact.
        self.meter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The logged-in peer behind this connection.
struct Me {
    peer: PeerId,
    id: J,
    /// The GW3 identity it logged in with (resolved; shared with the hub).
    identity: Arc<J>,
    /// The same as knit values: what a bus `target` of its own publishes is matched against.
    attributes: Value,
    /// What the gateway's policy lets it do: its own publishes reach its own subscriptions
    /// only when these allow publishing and subscribing to the topic.
    rules: crate::model::policy::PeerRules,
    /// Its entry in the hub (`hub::key` of its user and instance).
    hub_key: String,
    user: String,
    in_agm: bool,
    /// Own methods: registry id → object (its `id` is the GW3 id; shared with the hub); and
    /// GW3 id key → registry id.
    methods: HashMap<u32, Arc<J>>,
    by_key: HashMap<String, u32>,
    next_method: u32,
    /// The other peers it knows (a view of each, shared: the connection's own cost per peer is
    /// [`Known`]'s).
    known: HashMap<PeerId, Known>,
    calls: HashMap<u64, PendingCall>,
    /// The request ids `calls` hold.
    waiting: Meter,
    /// What its registered method objects count against `max_method_bytes`.
    method_bytes: usize,
    next_call: u64,
    invocations: HashMap<String, u64>,
    reqs: HashMap<u64, Req>,
    next_req: u64,
    ctx: ctx::CtxState,
    bus: bus::BusState,
    streams: streams::StreamState,
}

impl Me {
    /// Whether `peer` speaks GW3: this connection, or a web peer it knows (a native one, or one
    /// it does not know, takes knit's own shapes).
    fn is_web(&self, peer: PeerId) -> bool {
        peer == self.peer || self.known.get(&peer).is_some_and(Known::web)
    }

    /// Whether a frame's `peer_id` names another peer than this connection's (null names none).
    fn is_other(&self, peer_id: &J) -> bool {
        !peer_id.is_null() && *peer_id != self.id
    }

    /// The registry id of the method with GW3 id `method` of peer `server`: one of this peer's
    /// own, or one `server` announced to it. `None` when this peer does not know `server`,
    /// `Some(None)` when it knows no such method of it.
    fn method_of(&self, server: PeerId, method: &J) -> Option<Option<u32>> {
        if server == self.peer {
            Some(self.by_key.get(&gw3::id_key(method)).copied())
        } else {
            Some(self.known.get(&server)?.view.method_by_gw3(method))
        }
    }
}

/// The reason the reference gives for a method (`method`, as [`echo`] gives it) that server
/// `server` does not have for this peer.
fn no_method(method: &str, server: &str) -> String {
    format!(
        "Unable to find method with id {method} on server id {server} registered with this peer"
    )
}

struct Session {
    sh: Arc<Shared>,
    wire: Wire,
    machine: String,
    kill: Arc<Kill>,
    hub_tx: mpsc::Sender<HubEvent>,
    reg_rx: Option<mpsc::Receiver<Outgoing>>,
    me: Option<Me>,
    /// Registry notices taken off the queue early (to look ahead), handled before the queue.
    stash: VecDeque<Outgoing>,
    /// Set when the connection must end (gateway stopping).
    done: Option<(u16, String)>,
    /// The `agm` replay under way, if any.
    replay: Option<Replay>,
    /// It has published on the bus: it waits while the gate is closed.
    publisher: bool,
    /// Its queue of registry notices has a backlog (it holds the gate closed).
    congested: bool,
}

/// What joining `agm` sends: every peer the client may see, with its methods, then the
/// `success`. It can be far larger than `max_queued_bytes` (method objects are forwarded
/// verbatim), so it is queued as the socket takes it — one frame at a time, whenever less than
/// half the bound waits — and the connection does nothing else meanwhile (its answers and the
/// registry's news stay in order behind the replay).
struct Replay {
    peers: VecDeque<PeerId>,
    frames: VecDeque<String>,
    /// The `success` of the `join`; none when the replay announces one large peer.
    then: Option<String>,
}

/// At most how many registry notices a connection handles before it writes what they made.
const BURST: usize = 32;

async fn recv_opt(rx: &mut Option<mpsc::Receiver<Outgoing>>) -> Option<Outgoing> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// A `peer-added` frame, serialised from the identity in place (it is shared, and can be large).
#[derive(serde::Serialize)]
struct PeerAdded<'a> {
    domain: &'static str,
    #[serde(rename = "type")]
    ty: &'static str,
    peer_id: &'a J,
    new_peer_id: &'a J,
    identity: &'a J,
    meta: Local,
}

#[derive(serde::Serialize)]
struct Local {
    local: bool,
}

/// A `methods-added` frame, serialised from the method objects in place (they are forwarded
/// verbatim and can be large: a `json!` value would copy each one first).
#[derive(serde::Serialize)]
struct MethodsAdded<'a> {
    domain: &'static str,
    #[serde(rename = "type")]
    ty: &'static str,
    peer_id: &'a J,
    source_type: &'static str,
    server_id: &'a J,
    methods: Vec<&'a J>,
}

/// The text of a frame made of JSON values and strings only (which always serialises).
pub(super) fn frame_text(frame: &impl serde::Serialize) -> String {
    serde_json::to_string(frame).unwrap_or_default()
}

fn methods_added(peer_id: &J, server_id: &J, methods: Vec<&J>) -> String {
    frame_text(&MethodsAdded {
        domain: "agm",
        ty: "methods-added",
        peer_id,
        source_type: "local",
        server_id,
        methods,
    })
}

/// About how many bytes of method objects one `methods-added` announcing a peer carries.
const ANNOUNCE_CHUNK: usize = 256 << 10;

/// Serves one connection until it closes.
pub(crate) async fn run(
    ws: WebSocketStream<TcpStream>,
    remote: SocketAddr,
    sh: Arc<Shared>,
    ticket: super::pending::Ticket,
) {
    let (sink, mut stream) = ws.split();
    let kill = Arc::new(Kill::default());
    let out = Arc::new(Outbox::new(sh.cfg.max_queued_bytes, kill.clone()));
    let wire = Wire::new(sink, out.clone());
    let (hub_tx, mut hub_rx) = mpsc::channel(1024);
    let mut s = Session {
        sh,
        wire,
        machine: remote.ip().to_string(),
        kill: kill.clone(),
        hub_tx,
        reg_rx: None,
        me: None,
        stash: VecDeque::new(),
        done: None,
        replay: None,
        publisher: false,
        congested: false,
    };
    let sh = s.sh.clone();
    let hello_deadline = tokio::time::sleep(s.sh.cfg.hello_timeout);
    tokio::pin!(hello_deadline);
    // A logged-in peer that sends nothing for `inactive_timeout` is gone (frozen, stopped, cut
    // off without a close), as the reference gateway decides (`clients.inactive_seconds`; the
    // client libraries send a `ping` every 30 s): checked four times per timeout, by one timer
    // made here; a frame only sets a flag (no clock read per frame). Closed after four quiet
    // checks in a row: silent for between one and one and a quarter timeouts.
    let inactive = s.sh.cfg.inactive_timeout;
    let mut idle_check = tokio::time::interval(if inactive.is_zero() {
        Duration::from_secs(3600)
    } else {
        (inactive / 4).max(Duration::from_millis(10))
    });
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut heard, mut quiet) = (false, 0u32);
    // Made once, not in every round of the loop: it is polled in every one.
    let killed = kill.killed();
    tokio::pin!(killed);
    // The connection's place among those waiting to log in, given up once it has.
    let mut ticket = ticket;
    let mut evicted = false;
    // `biased`: output first; then news from the bridge's other connections (a web peer joined
    // or left `agm`), which is always older than what the registry queued about the same peer
    // (a clean `leave` must not be overtaken by the disconnect right behind it; and `PeerAdded`
    // coming after the news that the peer joined is fine: it announces the peer then); then the
    // registry's notices; then frames from the client.
    let (why, close) = loop {
        if let Some((code, reason)) = s.done.take() {
            break (reason.clone(), Some((code, reason, false)));
        }
        // Logged in: out of the waiting ones (unless it was evicted meanwhile, which the
        // eviction arm below sees).
        if ticket.waiting() && s.me.is_some() {
            ticket.logged_in();
        }
        let replaying = s.replay.is_some();
        if replaying {
            // Its queue is not read during a replay, so its backlog is not known: it must not
            // hold publishers back meanwhile (a client that stops reading would hold them for
            // good). A queue that overflows meanwhile disconnects it, as before.
            s.sh.gate.release(&mut s.congested);
        }
        if replaying && s.wire.out.queued() <= s.sh.cfg.max_queued_bytes / 2 {
            s.replay_step();
            continue;
        }
        if let (false, Some(out)) = (replaying, s.stash.pop_front()) {
            s.on_core(out).await;
            s.observe_backlog();
            continue;
        }
        let throttled = s.publisher && sh.gate.closed();
        // Output first: answers go out before the next frame is read (a client that closes
        // right after its last requests still gets the answers), and a connection's frames are
        // handled in the order they arrived, without yielding to other connections in between.
        tokio::select! {
            biased;
            r = s.wire.progress(), if s.wire.busy() => {
                if let Err(e) = r {
                    break (format!("connection error: {e}"), None);
                }
            }
            (code, reason) = &mut killed => break (reason.clone(), Some((code, reason, true))),
            _ = &mut hello_deadline, if s.me.is_none() => {
                let why = "no successful hello in time".to_string();
                break (why.clone(), Some((CLOSE_SLOW, why, false)));
            }
            _ = idle_check.tick(), if !inactive.is_zero() && s.me.is_some() => {
                quiet = if std::mem::take(&mut heard) { 0 } else { quiet + 1 };
                if quiet >= 4 {
                    let why = format!(
                        "nothing received for {} ms: the peer is taken for gone",
                        inactive.as_millis()
                    );
                    break (why.clone(), Some((CLOSE_SLOW, why, false)));
                }
            }
            _ = ticket.evicted(), if ticket.waiting() => {
                let why = super::pending::reason(s.sh.cfg.max_pending_logins);
                evicted = true;
                break (why.clone(), Some((CLOSE_SLOW, why, false)));
            }
            Some(ev) = hub_rx.recv(), if !replaying => s.on_hub(ev),
            Some(out) = recv_opt(&mut s.reg_rx), if !replaying => {
                s.on_core(out).await;
                // What the registry queued for us at the same moment goes out in the same
                // write: a callee's removal and the failures of the calls waiting on it reach
                // the client in one read, as the reference gateway's do (its library then
                // reports them in one order), and a burst costs one flush.
                for _ in 1..BURST {
                    if s.replay.is_some() || !s.stash.is_empty() || s.done.is_some() {
                        break;
                    }
                    let Some(out) = s.reg_rx.as_mut().and_then(|r| r.try_recv().ok()) else {
                        break;
                    };
                    s.on_core(out).await;
                }
                s.observe_backlog();
            }
            // Another task queued frames for us (context updates).
            _ = out.woken() => {}
            // A publisher waiting for subscribers' backlogs to clear (see `gate`).
            _ = sh.gate.eased(), if throttled => {}
            // In a block: `select!` makes every branch's future in every round, enabled or not,
            // and a bare `sleep` reads the clock and sets up a timer entry when made.
            _ = async { tokio::time::sleep(super::gate::RECHECK).await }, if throttled => {}
            frame = stream.next(), if !replaying && !throttled => {
                heard |= matches!(frame, Some(Ok(_)));
                match frame {
                Some(Ok(Message::Text(t))) => {
                    s.sh.spin.touch();
                    s.on_text(t.as_str()).await
                }
                Some(Ok(Message::Binary(_))) => s.raw("GW3 messages are JSON text frames, not binary"),
                Some(Ok(Message::Close(_))) | None => break ("connection closed".to_string(), None),
                Some(Ok(_)) => {} // ping/pong: answered by the WebSocket layer
                Some(Err(e)) => {
                    use tokio_tungstenite::tungstenite::Error as E;
                    let code = match &e {
                        E::Capacity(_) => Some(CLOSE_TOO_BIG),
                        E::Protocol(_) | E::Utf8(_) => Some(CLOSE_PROTOCOL),
                        _ => None,
                    };
                    let why = format!("connection error: {e}");
                    break (why.clone(), code.map(|c| (c, why, false)));
                }
            }},
        }
    };
    if let Some((code, reason, discard)) = close {
        if discard {
            crate::log::warn(format_args!(
                "bridge: closing {}: {reason}",
                s.me.as_ref()
                    .map(|m| m.id.to_string())
                    .unwrap_or_else(|| s.machine.clone())
            ));
        }
        s.wire.close(code, &reason, discard);
    }
    if let Some(me) = s.me.take() {
        s.sh.ctxs.forget_peer(me.peer);
        s.sh.core.closed(me.peer, why).await;
        s.sh.hub.remove(&me.hub_key);
        // Contexts destroyed with no web peer of their user left to hear it (this one's, if the
        // registry has removed it by now; else the next departure's sweep finds them).
        s.sh.ctxs.sweep_retired();
        let peers: Vec<PeerId> = me.known.keys().copied().collect();
        drop(me);
        s.sh.views.release(peers);
    }
    s.sh.gate.release(&mut s.congested);
    let Session { mut wire, .. } = s;
    // Send what is queued (the close frame last) and read (and discard) what the client still
    // sends until it answers the close: closing a socket with unread input resets the
    // connection, and the client could lose the close frame that says why. A peer that neither
    // reads nor closes is waited for [`LINGER`] at most (a slow consumer, cut off, may be
    // stalled a while before it reads what was already on its way, then the close frame); the
    // connection keeps its slot meanwhile, its peer is gone from the registry.
    let linger = async {
        let flush = async { while wire.busy() && wire.progress().await.is_ok() {} };
        let drain = async { while let Some(Ok(_)) = stream.next().await {} };
        futures_util::future::join(flush, drain).await;
    };
    // An evicted connection does not linger: one attempt to send the close frame, then the
    // socket is closed (it no longer counts against `max_connections`, so its descriptor must
    // not outlive it). One that never logged in stops lingering when it is evicted.
    let ended = tokio::time::timeout(if evicted { Duration::ZERO } else { LINGER }, linger);
    if ticket.waiting() && !evicted {
        tokio::select! {
            _ = ended => {}
            _ = ticket.evicted() => {}
        }
    } else {
        let _ = ended.await;
    }
}

/// How long a closing connection waits for its peer to read the close frame and answer it.
const LINGER: Duration = Duration::from_secs(30);

fn display_id(v: &J) -> String {
    match v {
        J::String(s) => s.clone(),
        // As the reference prints a missing id: "Unable to find context with id " (ClojureScript
        // `(str nil)`), which `@glue42/core` 5.x makes happen by destroying a context it no
        // longer knows the id of.
        J::Null => String::new(),
        other => other.to_string(),
    }
}

/// An id from the client as an error message repeats it (clipped, [`gw3::clip`]).
fn echo(v: &J) -> String {
    gw3::clip(&display_id(v)).into_owned()
}

impl Session {
    /// Queues a GW3 message; a full queue ends the connection (slow consumer).
    fn send(&self, msg: J) {
        self.send_text(msg.to_string());
    }

    /// Queues a frame serialised straight from its parts (see [`InvokeFrame`]).
    fn send_frame<T: serde::Serialize>(&self, frame: &T) {
        match serde_json::to_string(frame) {
            Ok(text) => self.send_text(text),
            // Only a map with keys that are not strings fails, and frames have none; were it
            // to happen, the connection closes with the reason instead of losing the frame.
            Err(e) => self
                .kill
                .kill(CLOSE_INTERNAL, format!("cannot encode a frame: {e}")),
        }
    }

    /// Queues a plain-text frame (answers to frames that are not GW3 messages).
    fn raw(&self, text: &str) {
        self.send_text(text.to_string());
    }

    fn send_text(&self, text: String) {
        if let Err(o) = self.wire.text(text) {
            self.kill.kill(CLOSE_SLOW, o.reason());
        }
    }

    /// Queues the `success` answer to `request_id`.
    fn send_success(&self, domain: &str, request_id: &J) {
        self.send_text(self.success_text(domain, request_id));
    }

    /// The `success` answer to `request_id` (see [`SuccessFrame`]).
    fn success_text(&self, domain: &str, request_id: &J) -> String {
        frame_text(&SuccessFrame {
            domain,
            ty: "success",
            request_id,
            peer_id: self.me.as_ref().map_or(&J::Null, |m| &m.id),
        })
    }

    fn my_id(&self) -> J {
        self.me.as_ref().map(|m| m.id.clone()).unwrap_or(J::Null)
    }

    async fn core(&self, msg: ToGateway) {
        if let Some(me) = &self.me {
            self.sh.core.send(me.peer, msg).await;
        }
    }

    // ---- frames from the client ------------------------------------------------------------

    async fn on_text(&mut self, text: &str) {
        if let (Some(me), Some(h)) = (&self.me, gw3::hot(text)) {
            // A frame naming another peer is refused below.
            if !h.peer_id.as_ref().is_some_and(|p| me.is_other(p)) {
                return self.on_hot(h).await;
            }
        }
        let gw3::Envelope { domain, ty, msg } = match gw3::parse_envelope(text) {
            Ok(e) => e,
            Err(e @ gw3::EnvelopeError::NotObject(_)) => return self.send_text(e.to_string()),
            Err(ref e @ gw3::EnvelopeError::Invalid { ref head, .. }) => {
                return self.invalid(head, &e.to_string()).await
            }
            Err(ref e @ gw3::EnvelopeError::BadDomain { ref msg, .. }) => {
                return self.send(gw3::error(
                    "global",
                    &rid(msg),
                    &self.my_id(),
                    "global.errors.failure",
                    &e.to_string(),
                ));
            }
            Err(
                ref e @ gw3::EnvelopeError::NoType {
                    ref domain,
                    ref msg,
                },
            ) => {
                let uri = format!("{}.errors.unhandled_message", gw3::clip(domain));
                return self.send(gw3::error(
                    domain,
                    &rid(msg),
                    &self.my_id(),
                    &uri,
                    &e.to_string(),
                ));
            }
        };
        if ty == "ping" {
            return;
        }
        let Some(me) = &self.me else {
            if ty == "hello" {
                return self.hello(&msg).await;
            }
            let pid = msg.get("peer_id").cloned().unwrap_or(J::Null);
            let reason = format!("Unable to find peer with id {}", echo(&pid));
            return self.send(gw3::error(
                &domain,
                &rid(&msg),
                &pid,
                "global.errors.invalid_peer",
                &reason,
            ));
        };
        if let Some(p) = msg.get("peer_id").filter(|p| me.is_other(p)) {
            let reason = format!("Unable to find peer with id {}", echo(p));
            return self.send(gw3::error(
                &domain,
                &rid(&msg),
                p,
                "global.errors.invalid_peer",
                &reason,
            ));
        }
        match domain.as_str() {
            "global" => self.global(&ty, &msg).await,
            "agm" => self.agm(&ty, &msg).await,
            "bus" => self.bus(&ty, &msg).await,
            "metrics" => match ty.as_str() {
                "define" | "publish" => {} // metrics are accepted and not stored
                _ => self.unhandled("metrics", &ty, &msg),
            },
            // Clients that join the context domain explicitly use it for context messages.
            "context" => {
                if !self.context("context", &ty, &msg).await {
                    self.unhandled("context", &ty, &msg);
                }
            }
            other => {
                let reason = format!("Unable to find domain {}", gw3::clip(other));
                self.send(gw3::error(
                    other,
                    &rid(&msg),
                    &self.my_id(),
                    "global.errors.failure",
                    &reason,
                ));
            }
        }
    }

    /// A JSON object that does not parse as a whole: an error for its request, and when it
    /// answers an invocation (`yield`, `error`), the caller gets an error instead of waiting
    /// forever.
    async fn invalid(&mut self, head: &Obj, reason: &str) {
        let domain = match head.get("domain") {
            Some(J::String(d)) => d.clone(),
            _ => "global".to_string(),
        };
        // The invocation it answers: named by a `yield`'s invocation_id, an `error`'s request_id.
        let inv = match head.get("type").and_then(J::as_str) {
            Some("yield") => head.get("invocation_id"),
            Some("error") => head.get("request_id"),
            _ => None,
        };
        let inv = match (domain.as_str(), inv.and_then(J::as_str), self.me.as_mut()) {
            ("agm", Some(i), Some(me)) => me.invocations.remove(i),
            _ => None,
        };
        if let Some(invocation) = inv {
            let outcome = RelayOutcome::Err {
                status: Status::MethodFailed,
                message: format!("the server's answer could not be read ({reason})"),
                context: Value::Null,
            };
            self.core(ToGateway::Yield {
                invocation,
                outcome,
            })
            .await;
        }
        let peer = self.my_id();
        self.send(gw3::error(
            &domain,
            &rid(head),
            &peer,
            "global.errors.failure",
            reason,
        ));
    }

    fn unhandled(&self, domain: &str, ty: &str, msg: &Obj) {
        let (ty, d) = (gw3::clip(ty), gw3::clip(domain));
        let uri = format!("{d}.errors.unhandled_message");
        let reason = format!("Unhandled message type {ty} in domain {d}");
        self.send(gw3::error(domain, &rid(msg), &self.my_id(), &uri, &reason));
    }

    /// Sends a request to the core and waits for its answer (the `Ack`, `Fail`,
    /// `ContextOpened` or `ContextCreated` with its `req`), handling the notices queued before
    /// the answer in order. `None` when the gateway is stopping.
    async fn ask(&mut self, build: impl FnOnce(u64) -> ToGateway) -> Option<Outgoing> {
        let req = {
            let me = self.me.as_mut()?;
            let r = me.next_req;
            me.next_req += 1;
            r
        };
        self.core(build(req)).await;
        loop {
            let out = match self.stash.pop_front() {
                Some(o) => o,
                None => self.reg_rx.as_mut()?.recv().await?,
            };
            let answer = match &out.msg {
                FromGateway::Ack { req: r }
                | FromGateway::Fail { req: r, .. }
                | FromGateway::ContextOpened { req: r, .. }
                | FromGateway::ContextCreated { req: r, .. } => *r == req,
                _ => false,
            };
            if answer {
                return Some(out);
            }
            self.on_core(out).await;
        }
    }

    async fn hello(&mut self, msg: &Obj) {
        let request_id = rid(msg);
        let fail =
            |uri: &str, reason: &str| gw3::error("global", &request_id, &J::Null, uri, reason);
        let login = match self.sh.auth.authenticate(msg.get("authentication")) {
            Ok(l) => l,
            Err(reason) => return self.send(fail("global.errors.authentication.failure", &reason)),
        };
        // The login names the user (in `open` mode any login is a user of its own), which every
        // peer of that user carries in its identity: as long as a name may be, no longer.
        let max = self.sh.limits.max_name_len;
        let longest = login
            .login
            .as_ref()
            .map_or(0, String::len)
            .max(login.user.len());
        if longest > max {
            let reason = format!("the login is {longest} bytes, more than the limit ({max})");
            return self.send(fail("global.errors.authentication.failure", &reason));
        }
        let limit = self.sh.cfg.max_identity_bytes;
        let size = msg.get("identity").map_or(0, gw3::approx_len);
        if size > limit {
            let reason = format!(
                "the identity is {size} bytes, more than the limit ({limit}, max_identity_bytes)"
            );
            return self.send(fail("global.errors.bad_identity", &reason));
        }
        // In the reference's key order: `machine` first, then the app's keys as it sent them,
        // with `user`, `login` and `instance` in place when it sent them, else after them. The
        // machine is always the bridge's: an app does not get to say where it runs (the
        // reference keeps an app's own `machine`).
        let mut identity = match msg.get("identity") {
            Some(J::Object(o)) => {
                let mut ordered = Obj::with_capacity(o.len() + 4);
                ordered.insert("machine".into(), J::String(self.machine.clone()));
                for (k, v) in o {
                    if k != "machine" {
                        ordered.insert(k.clone(), v.clone());
                    }
                }
                ordered
            }
            _ => {
                return self.send(fail(
                    "global.errors.bad_identity",
                    "identity must be an object",
                ))
            }
        };
        let application = match identity.get("application") {
            Some(J::String(s)) if !s.trim().is_empty() && s.len() <= max => s.clone(),
            _ => {
                let reason = format!("identity.application must be a string of 1..={max} bytes");
                return self.send(fail("global.errors.bad_identity", &reason));
            }
        };
        let given = match identity.get("instance") {
            None | Some(J::Null) => None,
            Some(J::String(s)) if !s.is_empty() && s.len() <= max => Some(s.clone()),
            _ => {
                return self.send(fail(
                    "global.errors.bad_identity",
                    "identity.instance must be a non-empty string",
                ))
            }
        };
        let pid = identity
            .get("process")
            .and_then(J::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        let instance = given.clone().unwrap_or_else(|| self.sh.ids.fresh('i'));
        identity.insert("user".into(), J::String(login.user.clone()));
        if let Some(l) = &login.login {
            identity.insert("login".into(), J::String(l.clone()));
        }
        if given.is_none() {
            identity.insert("instance".into(), J::String(instance.clone()));
        }
        let identity = Arc::new(J::Object(identity));
        let hub = &self.sh.hub;
        // Instances are unique within a user's world, as in the reference gateway: another
        // user's app cannot hold an instance id (or learn that it is taken).
        let hub_key = super::hub::key(&login.user, &instance);
        if !hub.reserve(
            &hub_key,
            &login.user,
            identity.clone(),
            self.hub_tx.clone(),
            self.kill.clone(),
        ) {
            return self.send(fail(
                "global.errors.already_seen",
                "Hello already received once",
            ));
        }
        let (reg_tx, reg_rx) = mpsc::channel(self.sh.cfg.queue_depth.max(1));
        let kill = self.kill.clone();
        let closer: Closer = Box::new(move || {
            kill.kill(
                CLOSE_SLOW,
                "slow consumer: the gateway's queue for this peer overflowed",
            )
        });
        let attributes = Value::from((*identity).clone());
        let adm = Admission {
            application,
            instance: Some(instance.clone()),
            pid,
            user: login.user.clone(),
            transport: Transport::Relay,
            attributes: attributes.clone(),
        };
        let (peer, welcome) = match self.sh.core.admit(adm, reg_tx, closer).await {
            Ok(x) => x,
            Err((status, message)) => {
                hub.remove(&hub_key);
                return self.send(if status == Status::AlreadyExists {
                    fail("global.errors.already_seen", "Hello already received once")
                } else {
                    fail("global.errors.failure", &message)
                });
            }
        };
        hub.admitted(&hub_key, peer);
        let id = J::String(self.sh.ids.peer(peer));
        let mut known = HashMap::with_capacity(welcome.peers.len());
        for p in &welcome.peers {
            let mut v = self.view_of(&p.identity, p.transport);
            for m in &p.methods {
                v.add_method(m.id, self.method_object(v.web(), m));
            }
            let v = self.sh.views.share(p.identity.peer_id, v);
            known.insert(p.identity.peer_id, Known::new(v));
        }
        let mut w = json!({
            "domain": "global", "type": "welcome", "request_id": request_id, "peer_id": id,
            "available_domains": gw3::available_domains(), "resolved_identity": *identity,
        });
        if login.access_token {
            w["options"] = json!({"access_token": self.sh.auth.access_token(&login)});
        }
        self.me = Some(Me {
            peer,
            id,
            identity: identity.clone(),
            attributes,
            rules: welcome.rules.clone(),
            hub_key,
            user: login.user,
            in_agm: false,
            methods: HashMap::new(),
            by_key: HashMap::new(),
            next_method: 1,
            known,
            calls: HashMap::new(),
            waiting: Meter::default(),
            method_bytes: 0,
            next_call: 1,
            invocations: HashMap::new(),
            reqs: HashMap::new(),
            next_req: 1,
            ctx: Default::default(),
            bus: Default::default(),
            streams: Default::default(),
        });
        self.reg_rx = Some(reg_rx);
        self.send(w);
        // The contexts that exist, right after the welcome (of this user only: the reference
        // gateway also announces other users' contexts here, a leak knit does not copy).
        self.ctx_welcome(&welcome.contexts, &welcome.context_owners);
    }

    async fn global(&mut self, ty: &str, msg: &Obj) {
        let request_id = rid(msg);
        match ty {
            "join" | "leave" => {
                let dest = match msg.get("destination") {
                    Some(J::String(d)) => d.clone(),
                    other => other.map(display_id).unwrap_or_default(),
                };
                if !["agm", "bus", "metrics", "context", "activity", "global"]
                    .contains(&dest.as_str())
                {
                    let reason = format!("Unable to {ty} missing domain {}", gw3::clip(&dest));
                    return self.send(gw3::error(
                        "global",
                        &request_id,
                        &self.my_id(),
                        "global.errors.invalid_domain",
                        &reason,
                    ));
                }
                if dest == "agm" {
                    if ty == "join" {
                        return self.join_agm(self.success_text(&dest, &request_id));
                    } else {
                        self.leave_agm().await;
                    }
                }
                self.send_success(&dest, &request_id);
            }
            "create-token" => {
                let user = self.me.as_ref().map(|m| m.user.clone()).unwrap_or_default();
                let token = self.sh.auth.gateway_token(&user);
                self.send(
                    json!({"domain": "global", "type": "token", "request_id": request_id,
                                 "peer_id": self.my_id(), "token": token}),
                );
            }
            "hello" => {
                self.send(gw3::error(
                    "global",
                    &request_id,
                    &J::Null,
                    "global.errors.already_seen",
                    "Hello already received once",
                ));
            }
            _ => {
                if !self.context("global", ty, msg).await {
                    self.unhandled("global", ty, msg)
                }
            }
        }
    }

    async fn agm(&mut self, ty: &str, msg: &Obj) {
        match ty {
            "register" => self.register(msg).await,
            "unregister" => self.unregister(msg).await,
            "call" => self.call(msg).await,
            "yield" => self.yield_(msg).await,
            "error" => self.server_error(msg).await,
            "subscribe" => self.stream_subscribe(msg).await,
            "unsubscribe" => self.stream_unsubscribe(msg).await,
            // Fire-and-forget: no answers.
            "accepted" => self.stream_accepted(msg).await,
            "publish" => self.stream_push(msg, false).await,
            "post" => self.stream_push(msg, true).await,
            "drop-subscription" => self.stream_drop(msg).await,
            _ => self.unhandled("agm", ty, msg),
        }
    }

    /// A `call` or `yield` read by [`gw3::hot`]: handled as [`Session::agm`] handles it.
    async fn on_hot(&mut self, h: gw3::Hot<'_>) {
        if h.ty == "call" {
            self.call_req(CallReq::of_hot(h)).await
        } else {
            let result = h.result;
            self.yield_req(h.invocation_id, || result.unwrap_or(Value::Null))
                .await
        }
    }

    fn agm_error(&self, msg: &Obj, uri: &str, reason: &str) {
        self.send(gw3::error("agm", &rid(msg), &self.my_id(), uri, reason));
    }

    async fn register(&mut self, msg: &Obj) {
        const FAIL: &str = "agm.errors.registration.failure";
        let Some(J::Array(list)) = msg.get("methods") else {
            return self.agm_error(msg, FAIL, "register needs a \"methods\" array");
        };
        let Some(me) = self.me.as_mut() else { return };
        let mut specs = Vec::with_capacity(list.len());
        let mut entries = Vec::with_capacity(list.len());
        let mut keys = HashSet::new();
        let mut next = me.next_method;
        let adding: usize = list.iter().map(gw3::approx_len).sum();
        let limit = self.sh.cfg.max_method_bytes;
        if me.method_bytes.saturating_add(adding) > limit {
            let reason = format!(
                "registering these methods would hold {} bytes of method objects on this \
                 connection, more than the limit ({limit}, max_method_bytes)",
                me.method_bytes.saturating_add(adding)
            );
            return self.agm_error(msg, FAIL, &reason);
        }
        for m in list {
            let def = match gw3::method_def_from_gw3(m) {
                Ok(d) => d,
                Err(e) => return self.agm_error(msg, FAIL, &e.to_string()),
            };
            let id = gid_of(m);
            let key = gw3::id_key(id);
            if me.by_key.contains_key(&key) || !keys.insert(key.clone()) {
                let reason = format!("a method with id {} is already registered", echo(id));
                return self.agm_error(msg, FAIL, &reason);
            }
            let Some(after) = next.checked_add(1).filter(|n| *n != NO_METHOD) else {
                return self.agm_error(msg, FAIL, "too many registrations on this connection");
            };
            specs.push(MethodSpec { id: next, def });
            entries.push((next, key, Arc::new(m.clone())));
            next = after;
        }
        me.next_method = next;
        me.method_bytes += adding;
        let ids: Vec<u32> = entries.iter().map(|e| e.0).collect();
        self.sh
            .hub
            .add_methods(&me.hub_key, entries.iter().map(|(n, _, o)| (*n, o.clone())));
        for (n, key, obj) in entries {
            me.by_key.insert(key, n);
            me.methods.insert(n, obj);
        }
        let req = me.next_req;
        me.next_req += 1;
        me.reqs.insert(
            req,
            Req::Register {
                request_id: rid(msg),
                ids,
            },
        );
        self.core(ToGateway::Register {
            req,
            methods: specs,
        })
        .await;
    }

    async fn unregister(&mut self, msg: &Obj) {
        const FAIL: &str = "agm.errors.unregistration.failure";
        let Some(J::Array(list)) = msg.get("methods") else {
            return self.agm_error(msg, FAIL, "unregister needs a \"methods\" array of ids");
        };
        let Some(me) = self.me.as_mut() else { return };
        let mut ids = Vec::with_capacity(list.len());
        for id in list {
            match me.by_key.get(&gw3::id_key(id)) {
                Some(n) => ids.push(*n),
                None => {
                    let reason = format!(
                        "Unable to find method with id {} registered by this peer",
                        echo(id)
                    );
                    return self.agm_error(msg, FAIL, &reason);
                }
            }
        }
        let req = me.next_req;
        me.next_req += 1;
        me.reqs.insert(
            req,
            Req::Unregister {
                request_id: rid(msg),
                ids: ids.clone(),
            },
        );
        self.streams_unregistering(&ids, false).await;
        self.core(ToGateway::Unregister { req, ids }).await;
    }

    async fn call(&mut self, msg: &Obj) {
        self.call_req(CallReq::of(msg)).await
    }

    async fn call_req(&mut self, req: CallReq) {
        const FAIL: &str = "agm.errors.invocation.failure";
        let error = |s: &Self, reason: &str| {
            s.send(gw3::error("agm", &req.request_id, &s.my_id(), FAIL, reason))
        };
        let server = match &req.server_id {
            Some(J::String(s)) => s.clone(),
            _ => return error(self, "call needs a string \"server_id\""),
        };
        let args = match (req.arguments, req.arguments_kv) {
            (Some(_), Some(_)) => {
                return error(
                    self,
                    "Cant use positional and by-name arguments at the same time",
                )
            }
            // Opaque to the gateway: the client library passes arrays and scalars as they are,
            // and the reference gateway forwards them.
            (None, Some(kv)) => kv,
            (Some(a @ Value::Array(_)), None) => a,
            (Some(_), None) => return error(self, "arguments must be an array"),
            (None, None) => Value::map(),
        };
        let method = req.method_id;
        let Some(me) = self.me.as_mut() else { return };
        let Some(target) = self.sh.ids.parse_peer(&server) else {
            let reason = format!("Unable to find peer with id {}", gw3::clip(&server));
            return error(self, &reason);
        };
        // Not a peer we know: the registry says whether it is gone or another user's.
        let method_id = me.method_of(target, &method).unwrap_or(Some(NO_METHOD));
        let Some(method_id) = method_id else {
            return error(self, &no_method(&echo(&method), &gw3::clip(&server)));
        };
        let limit = self.sh.cfg.max_waiting_bytes;
        let request_id =
            match me
                .waiting
                .hold(req.request_id.clone(), limit, "calls waiting for an answer")
            {
                Ok(h) => h,
                Err(reason) => return error(self, &reason),
            };
        let call = me.next_call;
        me.next_call += 1;
        me.calls.insert(
            call,
            PendingCall {
                request_id,
                server,
                method: echo(&method),
            },
        );
        // GW3 has no call timeouts (the client keeps its own); the registry forgets the call
        // only when the callee answers or leaves.
        self.core(ToGateway::Call {
            call,
            peer: target,
            method_id,
            args,
            timeout_ms: u32::MAX,
        })
        .await;
    }

    async fn yield_(&mut self, msg: &Obj) {
        self.yield_req(yield_invocation(msg), || yield_result(msg))
            .await
    }

    /// A `yield` answering `invocation`; `result` is made only when it does.
    async fn yield_req(&mut self, invocation: Option<&str>, result: impl FnOnce() -> Value) {
        let Some(me) = self.me.as_mut() else { return };
        let Some(inv) = invocation.and_then(|i| me.invocations.remove(i)) else {
            return; // not ours or already answered: GW3 sends no reply to yield
        };
        let result = result();
        self.core(ToGateway::Yield {
            invocation: inv,
            outcome: RelayOutcome::Ok(result),
        })
        .await;
    }

    /// A server's `error`: `request_id` names the invocation it fails, or else the
    /// subscription it rejects.
    async fn server_error(&mut self, msg: &Obj) {
        let Some(me) = self.me.as_mut() else { return };
        let Some(inv) = msg
            .get("request_id")
            .and_then(J::as_str)
            .and_then(|i| me.invocations.remove(i))
        else {
            self.stream_rejected(msg).await;
            return;
        };
        let reason = match msg.get("reason") {
            Some(J::String(s)) => s.clone(),
            None | Some(J::Null) => String::new(),
            Some(other) => other.to_string(),
        };
        let context = Value::from(msg.get("context").cloned().unwrap_or(J::Null));
        self.core(ToGateway::Yield {
            invocation: inv,
            outcome: RelayOutcome::Err {
                status: Status::MethodFailed,
                message: reason,
                context,
            },
        })
        .await;
    }

    /// Joins `agm`; `then` (the `success`) follows the replay of the peers already there.
    fn join_agm(&mut self, then: String) {
        let Some(me) = self.me.as_mut() else { return };
        if !me.in_agm {
            me.in_agm = true;
            self.sh.hub.set_agm(&me.hub_key, true);
        }
        // In the order of the peers' ids, the order they came in.
        let mut peers: Vec<PeerId> = me.known.keys().copied().collect();
        peers.sort_unstable();
        let peers = peers.into();
        self.replay = Some(Replay {
            peers,
            frames: VecDeque::new(),
            then: Some(then),
        });
    }

    /// Queues the replay's next frame (announcing its next peer when needed).
    fn replay_step(&mut self) {
        let Some(r) = self.replay.as_mut() else {
            return;
        };
        if let Some(f) = r.frames.pop_front() {
            return self.send_text(f);
        }
        if let Some(p) = r.peers.pop_front() {
            let frames = self.announcement(p);
            if let Some(r) = self.replay.as_mut() {
                r.frames.extend(frames);
            }
            return;
        }
        if let Some(then) = self.replay.take().and_then(|r| r.then) {
            self.send_text(then);
        }
    }

    async fn leave_agm(&mut self) {
        let Some(me) = self.me.as_mut() else { return };
        if !me.in_agm {
            return;
        }
        me.in_agm = false;
        for k in me.known.values_mut() {
            k.announced = false;
        }
        // A peer that left agm serves nothing, for native peers either, and subscribes to
        // nothing.
        let ids: Vec<u32> = me.methods.keys().copied().collect();
        self.sh.hub.set_agm(&me.hub_key, false);
        self.streams_leaving().await;
        self.streams_unregistering(&ids, true).await;
        let Some(me) = self.me.as_mut() else { return };
        if !ids.is_empty() {
            let req = me.next_req;
            me.next_req += 1;
            me.reqs.insert(req, Req::Quiet { ids: ids.clone() });
            self.core(ToGateway::Unregister { req, ids }).await;
        }
    }

    // ---- notices from the registry ---------------------------------------------------------

    /// A peer the registry announces, with no methods yet (not shared yet).
    fn view_of(&self, identity: &crate::wire::frame::Instance, transport: Transport) -> PeerView {
        let key = super::hub::key(&identity.user, &identity.instance);
        let web = if transport == Transport::Relay {
            self.sh.hub.identity(&key)
        } else {
            None
        };
        PeerView::new(
            web.clone()
                .unwrap_or_else(|| Arc::new(gw3::native_identity(identity))),
            web.map(|_| key),
        )
    }

    /// The GW3 object of a method of a peer (`web`: its instance if it is a web peer): a web
    /// peer's as it registered it, a native's made from its definition.
    fn method_object(&self, web: Option<&str>, m: &MethodSpec) -> Arc<J> {
        web.and_then(|inst| self.sh.hub.method(inst, m.id))
            .unwrap_or_else(|| Arc::new(gw3::method_to_gw3(m.id, &m.def)))
    }

    /// Reports this connection's backlog of registry notices to the gate.
    fn observe_backlog(&mut self) {
        let backlog = self.reg_rx.as_ref().map_or(0, |r| r.len());
        self.sh
            .gate
            .observe(&mut self.congested, backlog, self.sh.cfg.queue_depth);
    }

    /// Tells the client about a peer (and its methods) if it may see it now.
    fn announce(&mut self, peer: PeerId) {
        let frames = self.announcement(peer);
        if frames.len() <= 2 {
            for f in frames {
                self.send_text(f);
            }
            return;
        }
        // Methods in several frames: queued as the socket takes them, like a join's replay
        // (nothing else is handled meanwhile, so what follows stays behind them).
        match &mut self.replay {
            Some(r) => r.frames.extend(frames),
            None => {
                self.replay = Some(Replay {
                    peers: VecDeque::new(),
                    frames: frames.into(),
                    then: None,
                })
            }
        }
    }

    /// The frames that announce a peer (and its methods) if the client may see it now; the
    /// peer counts as announced.
    fn announcement(&mut self, peer: PeerId) -> Vec<String> {
        let Some(me) = self.me.as_mut() else {
            return Vec::new();
        };
        let Some(k) = me.known.get_mut(&peer) else {
            return Vec::new();
        };
        if !me.in_agm || k.announced {
            return Vec::new();
        }
        if let Some(inst) = k.view.web() {
            if !self.sh.hub.in_agm(inst) {
                return Vec::new();
            }
        }
        k.announced = true;
        let server = J::String(self.sh.ids.peer(peer));
        let mut frames = vec![frame_text(&PeerAdded {
            domain: "agm",
            ty: "peer-added",
            peer_id: &me.id,
            new_peer_id: &server,
            identity: k.view.identity(),
            meta: Local { local: true },
        })];
        // Methods in frames of about ANNOUNCE_CHUNK bytes each: a peer may hold 100 000
        // methods, tens of MiB in one frame otherwise.
        let mut chunk = Vec::new();
        let mut bytes = 0;
        for o in k.view.methods() {
            let len = gw3::approx_len(o);
            if !chunk.is_empty() && bytes + len > ANNOUNCE_CHUNK {
                frames.push(methods_added(&me.id, &server, std::mem::take(&mut chunk)));
                bytes = 0;
            }
            bytes += len;
            chunk.push(&**o);
        }
        if !chunk.is_empty() {
            frames.push(methods_added(&me.id, &server, chunk));
        }
        frames
    }

    fn on_hub(&mut self, ev: HubEvent) {
        match ev {
            HubEvent::AgmJoined(p) => self.announce(p),
            HubEvent::AgmLeft(p) => {
                // Its subscriptions to our streams and its streams we subscribed to end first
                // (the records it sent on its way out come later, and find nothing).
                self.streams_peer_left_agm(p);
                let Some(me) = self.me.as_mut() else { return };
                let Some(k) = me.known.get_mut(&p) else {
                    return;
                };
                if !std::mem::replace(&mut k.announced, false) || !me.in_agm {
                    return;
                }
                let ids: Vec<J> = k.view.methods().map(|o| gid_of(o).clone()).collect();
                let (me_id, server) = (me.id.clone(), self.sh.ids.peer(p));
                if !ids.is_empty() {
                    self.send(
                        json!({"domain": "agm", "type": "methods-removed", "peer_id": me_id,
                        "server_id": server, "methods": ids}),
                    );
                }
                self.send(
                    json!({"domain": "agm", "type": "peer-removed", "peer_id": me_id,
                    "removed_id": server, "reason_uri": null, "reason": null}),
                );
            }
        }
    }

    async fn on_core(&mut self, out: Outgoing) {
        let Outgoing { msg, fds: _ } = out;
        let Some(me) = self.me.as_mut() else { return };
        let me_id = me.id.clone();
        match msg {
            FromGateway::Ack { req } => match me.reqs.remove(&req) {
                Some(Req::Register { request_id, ids }) => {
                    let objs: Vec<&J> = ids
                        .iter()
                        .filter_map(|n| me.methods.get(n))
                        .map(|o| &**o)
                        .collect();
                    let added = (!objs.is_empty()).then(|| methods_added(&me_id, &me_id, objs));
                    if let Some(added) = added {
                        self.send_text(added);
                    }
                    self.send_success("agm", &request_id);
                }
                Some(Req::Unregister { request_id, ids }) => {
                    let gids = self.forget_own(&ids);
                    self.send(
                        json!({"domain": "agm", "type": "methods-removed", "peer_id": me_id,
                        "server_id": me_id, "methods": gids}),
                    );
                    self.send_success("agm", &request_id);
                }
                Some(Req::Quiet { ids }) => {
                    self.forget_own(&ids);
                }
                None => {}
            },
            FromGateway::Fail { req, message, .. } => match me.reqs.remove(&req) {
                Some(Req::Register { request_id, ids }) => {
                    self.forget_own(&ids);
                    self.send(gw3::error(
                        "agm",
                        &request_id,
                        &me_id,
                        "agm.errors.registration.failure",
                        &message,
                    ));
                }
                Some(Req::Unregister { request_id, .. }) => {
                    self.send(gw3::error(
                        "agm",
                        &request_id,
                        &me_id,
                        "agm.errors.unregistration.failure",
                        &message,
                    ));
                }
                Some(Req::Quiet { .. }) | None => {}
            },
            FromGateway::PeerAdded {
                identity,
                transport,
                ..
            } => {
                let peer = identity.peer_id;
                let v = self.view_of(&identity, transport);
                let k = Known::new(self.sh.views.share(peer, v));
                if let Some(me) = self.me.as_mut() {
                    me.known.insert(peer, k);
                }
                self.announce(peer);
            }
            FromGateway::PeerRemoved { peer, .. } => {
                self.streams_peer_gone(peer);
                let Some(me) = self.me.as_mut() else { return };
                let Some(k) = me.known.remove(&peer) else {
                    return;
                };
                let announced = k.announced;
                drop(k);
                self.sh.views.release([peer]);
                let Some(me) = self.me.as_mut() else { return };
                if announced && me.in_agm {
                    self.send(
                        json!({"domain": "agm", "type": "peer-removed", "peer_id": me_id,
                        "removed_id": self.sh.ids.peer(peer),
                        "reason_uri": "agm.peer-removed", "reason": "Peer has been removed"}),
                    );
                }
            }
            FromGateway::MethodsAdded { peer, methods } => {
                let Some(mut k) = me.known.remove(&peer) else {
                    return;
                };
                let web = k.view.web().map(str::to_owned);
                let objs = self
                    .sh
                    .views
                    .add_methods(peer, &mut k.view, &methods, &|m| {
                        self.method_object(web.as_deref(), m)
                    });
                let show = k.announced && !objs.is_empty();
                let Some(me) = self.me.as_mut() else { return };
                me.known.insert(peer, k);
                if show && me.in_agm {
                    let server = J::String(self.sh.ids.peer(peer));
                    let objs = objs.iter().map(|o| &**o).collect();
                    self.send_text(methods_added(&me_id, &server, objs));
                }
            }
            FromGateway::MethodsRemoved { peer, ids } => {
                // Subscriptions to the methods end before the methods do. When the peer is
                // leaving, the registry queued its `PeerRemoved` right behind: then they end
                // because the peer did (as GW3 reports it).
                if self.stash.is_empty() {
                    if let Some(next) = self.reg_rx.as_mut().and_then(|r| r.try_recv().ok()) {
                        self.stash.push_back(next);
                    }
                }
                let leaving = matches!(
                    self.stash.front().map(|o| &o.msg),
                    Some(FromGateway::PeerRemoved { peer: p, .. }) if *p == peer
                );
                if leaving {
                    self.streams_peer_gone(peer);
                } else {
                    self.streams_methods_removed(peer, &ids);
                }
                let Some(me) = self.me.as_mut() else { return };
                let in_agm = me.in_agm;
                let Some(k) = me.known.get_mut(&peer) else {
                    return;
                };
                let gids = self.sh.views.remove_methods(peer, &mut k.view, &ids);
                if k.announced && in_agm && !gids.is_empty() {
                    self.send(
                        json!({"domain": "agm", "type": "methods-removed", "peer_id": me_id,
                        "server_id": self.sh.ids.peer(peer), "methods": gids}),
                    );
                }
            }
            FromGateway::Invoke {
                invocation,
                caller,
                method_id,
                args,
            } => {
                let gid = me.methods.get(&method_id).map(|o| gid_of(o).clone());
                let busy = me.invocations.len() >= self.sh.limits.max_pending_calls;
                let (Some(gid), false) = (gid, busy) else {
                    let (status, message) = if busy {
                        (Status::Busy, "the server has too many invocations waiting")
                    } else {
                        (Status::NotFound, "the method is not registered")
                    };
                    let outcome = RelayOutcome::Err {
                        status,
                        message: message.into(),
                        context: Value::Null,
                    };
                    return self
                        .core(ToGateway::Yield {
                            invocation,
                            outcome,
                        })
                        .await;
                };
                let inv_id = self.sh.ids.fresh('r');
                me.invocations.insert(inv_id.clone(), invocation);
                // A web caller's arguments are what its library sent (an array passes the
                // library's check too): forwarded verbatim, as the reference gateway does. A
                // native caller's non-object value is wrapped for the handler.
                let web = me.is_web(caller);
                let arguments_kv = if web {
                    gw3::Kv::AsIs(&args)
                } else {
                    gw3::Kv::Kv(&args)
                };
                self.send_frame(&InvokeFrame {
                    domain: "agm",
                    ty: "invoke",
                    invocation_id: &inv_id,
                    peer_id: &me_id,
                    method_id: &gid,
                    caller_id: &self.sh.ids.peer(caller),
                    arguments: (),
                    arguments_kv,
                    context: (),
                });
            }
            FromGateway::CallResult { call, outcome } => self.call_result(call, outcome),
            FromGateway::CallsFailed { calls, outcome } => {
                for call in calls {
                    self.call_result(call, outcome.clone());
                }
            }
            FromGateway::Shutdown { reason } => {
                self.done = Some((CLOSE_GOING_AWAY, reason));
            }
            FromGateway::ContextAdded { id, name, creator } => self.ctx_added(id, name, creator),
            FromGateway::ContextDestroyed { id, reason, .. } => self.ctx_destroyed(id, reason),
            FromGateway::ContextsDestroyed { gone } => {
                for (id, _, reason) in gone {
                    self.ctx_destroyed(id, reason);
                }
            }
            FromGateway::Record { from, kind, body } => self.stream_record(from, kind, &body).await,
            FromGateway::BusMessage {
                from,
                topic,
                routing_key,
                data,
            } => self.bus_deliver(from, &topic, routing_key.as_deref(), &data.to_json()),
            // The welcome came back from `admit`; lanes never concern relay peers; anything the
            // core adds later is ignored until the bridge learns it.
            _ => {}
        }
    }

    /// The outcome of one of our calls, as GW3 tells the caller.
    fn call_result(&mut self, call: u64, outcome: RelayOutcome) {
        let Some(pc) = self.me.as_mut().and_then(|me| me.calls.remove(&call)) else {
            return;
        };
        let Some(me) = self.me.as_ref() else { return };
        let me_id = &me.id;
        match outcome {
            RelayOutcome::Ok(v) => self.send_frame(&ResultFrame {
                domain: "agm",
                ty: "result",
                request_id: &pc.request_id.id,
                peer_id: me_id,
                result: gw3::Kv::Kv(&v),
            }),
            RelayOutcome::Err {
                status,
                message,
                context,
            } => {
                const FAIL: &str = "agm.errors.invocation.failure";
                let (uri, reason) = match status {
                    Status::MethodFailed => ("agm.errors.client_error", message),
                    Status::NotFound | Status::PeerLeft
                        if message.starts_with("Unable to find peer") =>
                    {
                        (FAIL, format!("Unable to find peer with id {}", pc.server))
                    }
                    Status::NotFound => (FAIL, no_method(&pc.method, &pc.server)),
                    _ => (FAIL, message),
                };
                let mut e = gw3::error("agm", &pc.request_id.id, me_id, uri, &reason);
                if status == Status::MethodFailed {
                    e["context"] = match context {
                        Value::Null => json!({}),
                        c => c.to_json(),
                    };
                }
                self.send(e);
            }
        }
    }

    /// Forgets own methods; returns their GW3 ids.
    fn forget_own(&mut self, ids: &[u32]) -> Vec<J> {
        let Some(me) = self.me.as_mut() else {
            return Vec::new();
        };
        self.sh.hub.remove_methods(&me.hub_key, ids);
        let mut gids = Vec::with_capacity(ids.len());
        for n in ids {
            if let Some(obj) = me.methods.remove(n) {
                let id = gid_of(&obj).clone();
                me.by_key.remove(&gw3::id_key(&id));
                me.method_bytes = me.method_bytes.saturating_sub(gw3::approx_len(&obj));
                gids.push(id);
            }
        }
        gids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `success` written from its parts is the text the `json!` tree made, whatever JSON the
    /// ids are.
    #[test]
    fn success_frames_are_written_as_the_tree_wrote_them() {
        let ids = [
            json!("r-1"),
            json!(7),
            J::Null,
            json!({"k": [1, "two", null], "a": {"z": 1, "b": 2}}),
            json!("quote \" and \\ and \u{1F600}"),
        ];
        for rid in &ids {
            for peer in &ids {
                let frame = SuccessFrame {
                    domain: "global",
                    ty: "success",
                    request_id: rid,
                    peer_id: peer,
                };
                assert_eq!(
                    frame_text(&frame),
                    json!({"domain": "global", "type": "success", "request_id": rid, "peer_id": peer})
                        .to_string()
                );
            }
        }
    }
}
