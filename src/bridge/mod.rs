//! The WebSocket bridge: web apps using the published io.Connect / Glue42 client libraries
//! (`@interopio/core` 6.x, `@glue42/core` 5.x) join knit by speaking GW3 — one JSON object per
//! text frame — to `ws://127.0.0.1:8385/` (any path).
//!
//! Each WebSocket connection that logs in becomes an ordinary peer of the gateway's registry
//! (a *relay* peer: its calls travel through the gateway instead of over a shared-memory lane),
//! so web and native apps see each other's methods and call each other both ways. The bridge
//! runs inside the gateway's runtime and talks to the core only through its `CoreHandle`: it
//! admits peers, sends their requests as [`crate::wire::frame::ToGateway`], and translates the
//! typed notices the registry queues for them back into GW3.
//!
//! What the bridge keeps itself, because GW3 needs it and the registry has no use for it: the
//! full GW3 identity each web peer logged in with, its method ids (any JSON value, mapped to the
//! registry's numbers and back) and method objects (forwarded verbatim), its `agm` membership
//! (GW3 announces a peer only once it joined `agm`), and the ids of pending invocations.
//!
//! Every frame is untrusted: frames have a size limit (the gateway's payload limit plus room
//! for the envelope), JSON nesting is bounded, every field is type-checked, and a frame that is
//! not a JSON object gets a plain-text error frame (as the reference gateway's WebSocket front
//! does). Nothing is dropped silently: requests apply back-pressure to the socket, and a peer
//! that does not read what it is sent is disconnected with a close frame that says why.
//!
//! See `docs/bridge.md` for the configuration and `docs/gw3-conformance.md` for how the bridge
//! compares with the reference gateway.

pub(crate) mod auth;
mod contexts;
mod delta;
pub(crate) mod gate;
pub(crate) mod gw3;
mod hub;
mod peers;
mod pending;
mod session;
mod spin;

pub use auth::{read_token, token_path, AuthMode, Password, UserEntry};

use crate::gateway::{CoreHandle, Limits};
use crate::status::Status;
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The default bridge address (DESIGN §5).
pub const DEFAULT_ADDR: &str = "127.0.0.1:8385";

/// How the bridge is set up.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Where to listen. Port 0 picks a free port (see `Gateway::ws_addr`).
    pub addr: SocketAddr,
    /// How `secret` logins are checked.
    pub auth: AuthMode,
    /// Browser origins allowed besides loopback ones (`http(s)://localhost|127.0.0.1|[::1]`
    /// with any port). `"*"` allows every origin. Connections without an `Origin` header
    /// (non-browser clients) are not affected.
    pub origins: Vec<String>,
    /// Users that may log in with a password (token mode).
    pub users: Vec<UserEntry>,
    /// Allow a non-loopback `addr` (token authentication only).
    pub allow_remote: bool,
    /// Largest frame accepted; `None`: the gateway's payload limit plus 64 KiB for the
    /// envelope. A larger frame closes the connection with 1009 (message too big).
    pub max_frame: Option<usize>,
    /// Bytes that may wait to be written to one connection before it is closed as a slow
    /// consumer (1008).
    pub max_queued_bytes: usize,
    /// Registry notices that may wait for one connection's task.
    pub queue_depth: usize,
    /// Bytes of `request_id`s one connection's calls waiting for an answer may hold, and
    /// separately its stream subscriptions (the bridge keeps each to answer with it; a client
    /// chooses their size). A `call` or `subscribe` beyond it gets an error.
    pub max_waiting_bytes: usize,
    /// Bytes of method objects one connection may hold registered (they are kept verbatim,
    /// and a client chooses their size). A `register` beyond it is refused.
    pub max_method_bytes: usize,
    /// Largest GW3 identity a `hello` may carry (kept for the connection's life and shown to
    /// every peer that sees it).
    pub max_identity_bytes: usize,
    /// Most WebSocket connections at once (logged in or not).
    pub max_connections: usize,
    /// Most connections at once that have not logged in yet (they count against
    /// `max_connections` too). When full, a new connection evicts the one that has waited
    /// longest, so connections that never log in cannot keep real clients out.
    pub max_pending_logins: usize,
    /// How long a connection may stay without a successful `hello` before it is closed.
    pub hello_timeout: Duration,
    /// The token file; `None`: next to the gateway socket ([`token_path`]).
    pub token_file: Option<PathBuf>,
    /// How long the gateway's thread keeps polling its sockets without sleeping after bridge
    /// traffic (saves the wake-up of a sleeping thread on the next frame); zero: never.
    pub spin: Duration,
    /// A logged-in peer that sends nothing for this long is closed (1008) and removed, as the
    /// reference gateway does after 60 s (the client libraries `ping` every 30 s); zero: never.
    pub inactive_timeout: Duration,
}

impl BridgeConfig {
    /// Defaults, listening on `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            auth: AuthMode::Token,
            origins: Vec::new(),
            users: Vec::new(),
            allow_remote: false,
            max_frame: None,
            max_queued_bytes: 64 << 20,
            queue_depth: 65_536,
            max_waiting_bytes: 16 << 20,
            max_method_bytes: 64 << 20,
            max_identity_bytes: 64 << 10,
            max_connections: 1024,
            max_pending_logins: 128,
            hello_timeout: Duration::from_secs(30),
            token_file: None,
            spin: Duration::from_micros(300),
            inactive_timeout: Duration::from_secs(60),
        }
    }

    /// Defaults on `127.0.0.1` with a free port: what tests use.
    pub fn loopback_ephemeral() -> Self {
        Self::new(SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

/// Why the bridge could not start.
#[derive(Debug, Error)]
pub enum BridgeError {
    /// The address is not a loopback one and `allow_remote` is off.
    #[error("the WebSocket bridge listens on loopback addresses only, not {0} (set \"allow_remote\": true in the configuration to change that)")]
    NotLoopback(SocketAddr),
    /// `open` authentication with a non-loopback address.
    #[error("--ws-auth open is for loopback addresses only")]
    OpenRemote,
    /// Binding failed.
    #[error("binding the WebSocket bridge to {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    /// The token file could not be read or written.
    #[error("bridge token {path}: {source}")]
    Token { path: PathBuf, source: io::Error },
}

impl BridgeError {
    /// The status for this error.
    pub fn status(&self) -> Status {
        match self {
            BridgeError::NotLoopback(_) | BridgeError::OpenRemote => Status::InvalidArgument,
            BridgeError::Bind { .. } | BridgeError::Token { .. } => Status::GatewayUnreachable,
        }
    }
}

/// A bridge whose socket is bound, not yet serving.
#[derive(Debug)]
pub(crate) struct Bound {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    cfg: BridgeConfig,
    auth: auth::Authenticator,
}

/// Binds the bridge's socket and prepares authentication (creating the token file).
pub(crate) fn bind(
    cfg: &BridgeConfig,
    socket: &Path,
    os_user: String,
) -> Result<Bound, BridgeError> {
    if !cfg.addr.ip().is_loopback() {
        if cfg.auth == AuthMode::Open {
            return Err(BridgeError::OpenRemote);
        }
        if !cfg.allow_remote {
            return Err(BridgeError::NotLoopback(cfg.addr));
        }
    }
    let path = cfg.token_file.clone().unwrap_or_else(|| token_path(socket));
    let token = auth::load_or_create_token(&path).map_err(|source| BridgeError::Token {
        path: path.clone(),
        source,
    })?;
    let bind_err = |source| BridgeError::Bind {
        addr: cfg.addr,
        source,
    };
    let listener = std::net::TcpListener::bind(cfg.addr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let auth = auth::Authenticator::new(cfg.auth, os_user, token, cfg.users.clone());
    Ok(Bound {
        listener,
        addr,
        cfg: cfg.clone(),
        auth,
    })
}

impl Bound {
    /// The address actually bound.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts accepting connections on the current runtime.
    pub(crate) fn start(
        self,
        core: CoreHandle,
        limits: Limits,
        bell: Option<(u32, Arc<std::os::fd::OwnedFd>)>,
        gate: Arc<gate::Gate>,
    ) -> Result<Running, io::Error> {
        let listener = TcpListener::from_std(self.listener)?;
        let mut node = [0u8; 16];
        getrandom::fill(&mut node).map_err(|e| io::Error::other(format!("random bytes: {e}")))?;
        let node: String = node.iter().map(|b| format!("{b:02x}")).collect();
        let ctxs = contexts::Contexts::new(node.clone(), bell);
        ctxs.start()?;
        let spin = spin::Spin::new(self.cfg.spin);
        let spin_task = tokio::spawn(spin.clone().run());
        let shared = Arc::new(session::Shared {
            core,
            hub: hub::Hub::default(),
            views: Default::default(),
            ids: gw3::Ids::new(node),
            auth: self.auth,
            limits,
            cfg: self.cfg,
            ctxs,
            spin,
            pending: Default::default(),
            gate,
        });
        crate::log::info(format_args!(
            "bridge listening on ws://{}/ ({} authentication)",
            self.addr,
            match shared.cfg.auth {
                AuthMode::Token => "token",
                AuthMode::Open => "open",
            }
        ));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let ctxs = shared.ctxs.clone();
        let task = tokio::spawn(accept_loop(listener, shared, stop_rx));
        Ok(Running {
            stop: stop_tx,
            task,
            ctxs,
            spin_task,
        })
    }
}

/// A serving bridge.
#[derive(Debug)]
pub(crate) struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    ctxs: Arc<contexts::Contexts>,
    spin_task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting and gives open connections a moment to send their close frames (the
    /// registry has already told each one the gateway is stopping).
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.ctxs.stop();
        self.spin_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<session::Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut conns = tokio::task::JoinSet::new();
    // Connections being refused (over `max_connections`): answered with HTTP 503, a few at once.
    let mut refusals = tokio::task::JoinSet::new();
    let mut acc = crate::sys::accept::Accepting::new(listener, "bridge");
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => acc.retry_now(),
            Some(_) = refusals.join_next(), if !refusals.is_empty() => acc.retry_now(),
            (stream, remote) = acc.next() => {
                // Evicted connections no longer count (their tasks may not have ended yet).
                let live = shared.pending.live();
                if live >= shared.cfg.max_connections {
                    let why = format!(
                        "the bridge is full: {live} connections open (max_connections)"
                    );
                    crate::log::warn(format_args!("bridge: refused a connection from {remote}: {why}"));
                    if refusals.len() < MAX_REFUSING {
                        refusals.spawn(refuse(stream, why));
                    }
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let ticket = shared.pending.admit(shared.cfg.max_pending_logins);
                conns.spawn(connection(stream, remote, shared.clone(), ticket));
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

/// Most refusals answered at once; connections beyond are dropped without an answer.
const MAX_REFUSING: usize = 16;

/// Answers a WebSocket upgrade with HTTP 503 and `why` (after reading the request, so the
/// answer is not lost to a TCP reset); gives up after a short while.
async fn refuse(stream: TcpStream, why: String) {
    // The signature is tungstenite's callback contract.
    #[allow(clippy::result_large_err)]
    let no = move |_: &Request, _: Response| -> Result<Response, ErrorResponse> {
        let body = format!("{why}\n");
        let mut r = ErrorResponse::new(Some(body.clone()));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let h = r.headers_mut();
        h.insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert("content-length", body.len().into());
        h.insert("connection", HeaderValue::from_static("close"));
        Err(r)
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_tungstenite::accept_hdr_async(stream, no),
    )
    .await;
}

/// Whether a browser `Origin` may connect: loopback origins always, others when configured.
fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let Some(rest) = rest else {
        return false;
    };
    let host = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return false,
        }
    } else {
        match rest.split_once(':') {
            Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return false,
            None => rest,
        }
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    shared: Arc<session::Shared>,
    ticket: pending::Ticket,
) {
    let max_frame = shared.cfg.max_frame.unwrap_or_else(|| {
        usize::try_from(shared.limits.max_payload)
            .unwrap_or(usize::MAX)
            .saturating_add(64 << 10)
    });
    // A small read buffer: tungstenite zero-fills it before every read, and GW3 messages are
    // small (a 128 KiB buffer cost ~10 µs per frame, 16 KiB still showed in profiles; larger
    // messages just take more reads).
    let config = WebSocketConfig::default()
        .read_buffer_size(4 << 10)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    let origins = shared.cfg.origins.clone();
    // The signature is tungstenite's callback contract.
    #[allow(clippy::result_large_err)]
    let check = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if let Some(origin) = req.headers().get("origin") {
            let ok = origin
                .to_str()
                .map(|o| origin_allowed(o, &origins))
                .unwrap_or(false);
            if !ok {
                let mut r = ErrorResponse::new(Some("origin not allowed".into()));
                *r.status_mut() = StatusCode::FORBIDDEN;
                return Err(r);
            }
        }
        Ok(resp)
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config));
    let handshake = tokio::time::timeout(Duration::from_secs(10), handshake);
    let ws = tokio::select! {
        r = handshake => match r {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                crate::log::debug(format_args!("bridge: handshake with {remote} failed: {e}"));
                return;
            }
            Err(_) => return,
        },
        // Evicted before it even upgraded: there is no WebSocket to send a reason on.
        _ = ticket.evicted() => return,
    };
    session::run(ws, remote, shared, ticket).await;
}

/// What waits to be written to one connection: a queue bounded in bytes. The connection's own
/// task queues its answers here; other tasks (a context update fanned out to every web
/// subscriber) queue frames too and wake it. Full means the peer does not read: the connection
/// is closed as a slow consumer with a reason, never silently skipped.
pub(crate) struct Outbox {
    /// Frames, each marked if it is the one allowed over the bound.
    queue: Mutex<VecDeque<(Message, bool)>>,
    /// Bytes queued, the frame over the bound not counted.
    bytes: AtomicUsize,
    /// The size of the frame allowed over the bound, if one is queued.
    over: AtomicUsize,
    max_bytes: usize,
    /// A close frame is queued: nothing may follow it.
    closing: AtomicBool,
    /// A frame was refused: nothing may follow but the close frame.
    refused: AtomicBool,
    kill: Arc<hub::Kill>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Relaxed: a Debug print of a byte count; nothing is read through it.
        f.debug_struct("Outbox")
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The queue is full: the peer does not read what it is sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Overflow {
    /// Bytes waiting.
    pub bytes: usize,
    /// The size of the frame that did not fit.
    pub adding: usize,
    pub max_bytes: usize,
}

impl Overflow {
    /// The close reason.
    pub(crate) fn reason(&self) -> String {
        format!(
            "slow consumer: {} bytes waiting to be sent, {} more would pass the limit ({})",
            self.bytes, self.adding, self.max_bytes
        )
    }
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize, kill: Arc<hub::Kill>) -> Self {
        Outbox {
            queue: Mutex::new(VecDeque::new()),
            bytes: AtomicUsize::new(0),
            over: AtomicUsize::new(0),
            max_bytes,
            closing: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            kill,
            wake: tokio::sync::Notify::new(),
        }
    }

    fn q(&self) -> std::sync::MutexGuard<'_, VecDeque<(Message, bool)>> {
        // Held only to push or pop one frame, never across an await.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a text frame. Once one was refused, nothing more is queued (the peer must see
    /// a prefix of its messages, then the close frame that says why).
    pub(crate) fn text(&self, s: String) -> Result<(), Overflow> {
        let mut q = self.q();
        // Relaxed, here and for `bytes`/`over` below: these fields change only under the queue
        // lock we hold, which orders them; they are atomics so `queued` can read them without it.
        if self.closing.load(Ordering::Relaxed) || self.refused.load(Ordering::Relaxed) {
            return Ok(()); // the connection is ending; the close frame says why
        }
        let queued = self.bytes.load(Ordering::Relaxed);
        let over = self.over.load(Ordering::Relaxed);
        let fits = queued.saturating_add(s.len()) <= self.max_bytes;
        // One frame larger than the bound is taken when no other is queued (it must still go
        // out, even behind a few small ones); the bound is on the rest.
        if !fits && (over > 0 || s.len() <= self.max_bytes) {
            // Relaxed: under the queue lock, like the loads above.
            self.refused.store(true, Ordering::Relaxed);
            return Err(Overflow {
                bytes: queued + over,
                adding: s.len(),
                max_bytes: self.max_bytes,
            });
        }
        // Relaxed: under the queue lock, like the loads above.
        if fits {
            self.bytes.store(queued + s.len(), Ordering::Relaxed);
        } else {
            self.over.store(s.len(), Ordering::Relaxed);
        }
        q.push_back((Message::text(s), !fits));
        Ok(())
    }

    /// Bytes waiting to be written.
    pub(crate) fn queued(&self) -> usize {
        // Relaxed: read without the queue lock as an estimate (to pace a replay); it publishes
        // nothing, and the two loads may be from slightly different moments.
        self.bytes.load(Ordering::Relaxed) + self.over.load(Ordering::Relaxed)
    }

    /// Queues a frame from another task and wakes the connection; a full queue closes the
    /// connection as a slow consumer.
    pub(crate) fn push(&self, s: String) {
        if let Err(o) = self.text(s) {
            self.kill.kill(hub::CLOSE_SLOW, o.reason());
        }
        self.wake.notify_one();
    }

    /// Queues the close frame; with `discard`, frames still waiting are dropped first (the
    /// peer is being disconnected for not reading them).
    pub(crate) fn close(&self, code: u16, reason: &str, discard: bool) {
        let mut q = self.q();
        // Relaxed: under the queue lock, which orders `closing`, `bytes` and `over` below.
        if self.closing.swap(true, Ordering::Relaxed) {
            return;
        }
        if discard {
            q.clear();
            self.bytes.store(0, Ordering::Relaxed);
            self.over.store(0, Ordering::Relaxed);
        }
        // A close reason has at most 123 bytes.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason[..end].to_string().into(),
        };
        q.push_back((Message::Close(Some(frame)), false));
    }

    fn pop(&self) -> Option<Message> {
        let mut q = self.q();
        let (m, over) = q.pop_front()?;
        // Relaxed: `over` and `bytes` change only under the queue lock we hold.
        if over {
            self.over.store(0, Ordering::Relaxed);
        } else if let Message::Text(t) = &m {
            let b = self.bytes.load(Ordering::Relaxed);
            self.bytes.store(b - t.len().min(b), Ordering::Relaxed);
        }
        Some(m)
    }

    fn is_empty(&self) -> bool {
        self.q().is_empty()
    }

    /// Resolves when another task queued something.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }
}

/// The writing side of one connection: its [`Outbox`], written to the socket by the
/// connection's own task (before it reads the next frame, so answers go out in order and before
/// a client's close is read), never blocking the task when the peer does not read.
pub(crate) struct Wire {
    sink: futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>,
    pub(crate) out: Arc<Outbox>,
    /// Frames were handed to the socket and not flushed yet.
    dirty: bool,
    failed: bool,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("out", &self.out)
            .finish_non_exhaustive()
    }
}

impl Wire {
    fn new(
        sink: futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>,
        out: Arc<Outbox>,
    ) -> Wire {
        Wire {
            sink,
            out,
            dirty: false,
            failed: false,
        }
    }

    /// Queues a text frame.
    pub(crate) fn text(&self, s: String) -> Result<(), Overflow> {
        self.out.text(s)
    }

    /// Queues the close frame (see [`Outbox::close`]).
    pub(crate) fn close(&self, code: u16, reason: &str, discard: bool) {
        self.out.close(code, reason, discard)
    }

    /// Whether there is something to write or flush.
    pub(crate) fn busy(&self) -> bool {
        !self.failed && (self.dirty || !self.out.is_empty())
    }

    /// Writes and flushes what is queued; pending while the socket is full. An error means the
    /// connection is gone.
    pub(crate) async fn progress(&mut self) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let r = futures_util::future::poll_fn(|cx| {
            use futures_util::Sink;
            use std::task::Poll;
            loop {
                if self.out.is_empty() {
                    if self.dirty {
                        match Pin::new(&mut self.sink).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.dirty = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                match Pin::new(&mut self.sink).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
                let Some(m) = self.out.pop() else {
                    continue;
                };
                Pin::new(&mut self.sink).start_send(m)?;
                self.dirty = true;
            }
        })
        .await;
        if r.is_err() {
            self.failed = true;
            self.out.q().clear();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(out: &Outbox) -> Vec<usize> {
        std::iter::from_fn(|| out.pop())
            .map(|m| match m {
                Message::Text(t) => t.len(),
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn one_frame_may_pass_the_bound_and_nothing_follows_a_refused_one() {
        let out = Outbox::new(100, Arc::default());
        let s = |n: usize| "x".repeat(n);
        // A large frame behind a small one (a `methods-added` after its `peer-added`).
        out.text(s(30)).unwrap();
        out.text(s(300)).unwrap();
        out.text(s(70)).unwrap();
        assert_eq!(out.queued(), 400);
        let o = out.text(s(5)).unwrap_err();
        assert_eq!((o.bytes, o.adding), (400, 5));
        assert!(o.reason().contains("400 bytes waiting"), "{}", o.reason());
        // Refused once: what comes after is not queued, the close frame is.
        out.text(s(1)).unwrap();
        out.close(1008, &o.reason(), false);
        assert_eq!(drain(&out), [30, 300, 70, 0]);
        // Written out, the large frame makes room for another.
        let out = Outbox::new(100, Arc::default());
        out.text(s(300)).unwrap();
        out.text(s(100)).unwrap();
        assert_eq!(drain(&out), [300, 100]);
        out.text(s(50)).unwrap();
        out.text(s(200)).unwrap();
        assert_eq!(out.queued(), 250);
    }

    #[test]
    fn loopback_origins_pass_and_others_need_configuring() {
        let none: Vec<String> = vec![];
        for ok in [
            "http://localhost",
            "http://localhost:3000",
            "https://127.0.0.1:8443",
            "http://[::1]:80",
            "http://127.0.0.2",
        ] {
            assert!(origin_allowed(ok, &none), "{ok}");
        }
        for bad in [
            "null",
            "http://evil.example",
            "http://localhost.evil.example",
            "http://127.0.0.1.evil.example:80",
            "http://localhost:80@evil.example",
            "file://",
            "http://[::1]x",
        ] {
            assert!(!origin_allowed(bad, &none), "{bad}");
        }
        let cfg = vec!["https://app.example.com".to_string()];
        assert!(origin_allowed("https://APP.example.com", &cfg));
        assert!(!origin_allowed("https://app.example.com.evil", &cfg));
        assert!(origin_allowed("null", &["*".to_string()]));
    }
}
