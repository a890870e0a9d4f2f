//! The gateway: identity, discovery, lane brokering and liveness for every peer of one user.
//!
//! It listens on a Unix socket in a private directory (see [`crate::control`]), admits only
//! connections whose kernel-reported uid is its own, gives each peer a doorbell segment, tells
//! everyone about peers and methods, creates the shared-memory lane between two peers when one
//! asks, and, when a peer's socket closes, removes everything it owned and tells the others —
//! which fail the calls they had pending on it.
//!
//! Run it as a daemon with `knit gateway`, or embedded:
//!
//! ```no_run
//! let gw = knit::gateway::Gateway::bind(knit::gateway::GatewayConfig::new("/tmp/knit-demo/gw.sock"))?;
//! let handle = gw.spawn()?;
//! // ... connect clients to handle.socket_path() ...
//! handle.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod bus;
pub mod channels;
mod contexts;
mod keep;
mod registry;

pub use keep::AdoptError;
pub use registry::Limits;

use crate::status::Status;
use crate::sys::identity;
use crate::wire::frame::{decode_body, encode_frame, FrameReader, FromGateway, PeerId, ToGateway};
pub(crate) use registry::{Action, Admission, Outgoing, PeerTx, Registry};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// How the gateway is set up.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Socket path; its directory is created with mode 0700.
    pub socket: PathBuf,
    /// Sizes and limits.
    pub limits: Limits,
    /// Frames queued per peer before a peer that does not read is disconnected.
    pub queue_depth: usize,
    /// Colour channels and who may use them.
    pub channels: channels::ChannelConfig,
    /// The WebSocket bridge for web apps (GW3); `None`: native peers only.
    pub bridge: Option<crate::bridge::BridgeConfig>,
    /// Access control: who may register, invoke, publish, subscribe, read and write what
    /// (`model::policy`). The default allows everything.
    pub policy: crate::model::policy::Policy,
    /// The keeper that holds context segments across gateway restarts ([`crate::keeper`]);
    /// `None` (the default for embedded gateways): contexts live only as long as the gateway.
    /// `knit gateway` uses one unless told `--no-keeper`.
    pub keeper: Option<crate::keeper::KeeperConfig>,
}

impl GatewayConfig {
    /// Defaults for a socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            limits: Limits::default(),
            queue_depth: 65_536,
            channels: Default::default(),
            bridge: None,
            policy: Default::default(),
            keeper: None,
        }
    }
}

/// Why the gateway could not start or stopped.
#[derive(Debug, Error)]
pub enum GatewayError {
    /// Another gateway holds this socket.
    #[error("another gateway is already running on {0}")]
    AlreadyRunning(PathBuf),
    /// Something that is not a socket is at the socket's path: it is left alone.
    #[error("{0} exists and is not a socket: not replacing it (choose another --gateway path)")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// The WebSocket bridge could not start.
    #[error(transparent)]
    Bridge(#[from] crate::bridge::BridgeError),
    /// A configuration value the gateway cannot run with.
    #[error("invalid gateway configuration: {0}")]
    Config(String),
}

impl GatewayError {
    /// The status for this error.
    pub fn status(&self) -> Status {
        match self {
            GatewayError::AlreadyRunning(_) => Status::AlreadyRunning,
            GatewayError::NotASocket(_) => Status::InvalidArgument,
            GatewayError::Io { .. } => Status::GatewayUnreachable,
            GatewayError::Bridge(e) => e.status(),
            GatewayError::Config(_) => Status::InvalidArgument,
        }
    }
}

/// Refuses values the gateway cannot run with, before anything is bound (an embedding app's
/// `queue_depth: 0` made the gateway panic at the first connection; a `lane_capacity` or
/// `context_log` the shared memory cannot have failed every lane or context later).
fn check_config(cfg: &GatewayConfig) -> Result<(), GatewayError> {
    let bad = |m: String| Err(GatewayError::Config(m));
    let l = &cfg.limits;
    if cfg.queue_depth == 0 {
        return bad("queue_depth must be at least 1".into());
    }
    // Sizes of shared memory: what `shm` creates segments with.
    for (what, v, lo, hi) in [
        (
            "lane_capacity",
            l.lane_capacity,
            crate::shm::MIN_RING,
            crate::shm::MAX_RING,
        ),
        (
            "context_log",
            l.context_log,
            crate::shm::MIN_LOG,
            crate::shm::MAX_LOG,
        ),
    ] {
        if !v.is_power_of_two() || !(lo..=hi).contains(&v) {
            return bad(format!(
                "{what} {v} must be a power of two from {lo} to {hi}"
            ));
        }
    }
    for (what, v) in [
        ("max_payload", l.max_payload as usize),
        ("max_name_len", l.max_name_len),
        ("max_peers", l.max_peers),
    ] {
        if v == 0 {
            return bad(format!("{what} must be at least 1"));
        }
    }
    Ok(())
}

/// Whether a socket is at `path`; [`GatewayError::NotASocket`] when something else is.
fn socket_there(path: &Path) -> Result<bool, GatewayError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            Err(GatewayError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => Ok(true),
        Err(_) => Ok(false),
    }
}

fn ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> GatewayError {
    let context = context.into();
    move |source| GatewayError::Io { context, source }
}

/// A gateway whose socket is bound, ready to run.
#[derive(Debug)]
pub struct Gateway {
    cfg: GatewayConfig,
    listener: std::os::unix::net::UnixListener,
    bridge: Option<crate::bridge::Bound>,
    /// The keeper's link and what it handed back, adopted when serving starts.
    kept: Option<(crate::keeper::Link, crate::keeper::State)>,
    /// Taken by [`Gateway::run_until`], which releases it after the core stopped.
    lock: Option<Held>,
}

/// The gateway's exclusive lock, and the files it owns while it holds it.
#[derive(Debug)]
struct Held {
    lock: OwnedFd,
    lock_path: PathBuf,
    socket: PathBuf,
}

impl Held {
    /// A clean stop: removes the socket and the lock file while the lock is still held, so
    /// neither can be a starting gateway's by then (it takes the lock before it binds, and
    /// checks that the lock it took is on the file at the path: [`is_file_at`]).
    fn release(self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.lock_path);
        drop(self.lock);
    }
}

/// Whether `fd` is the file now at `path`.
fn is_file_at(fd: &OwnedFd, path: &Path) -> bool {
    match (rustix::fs::fstat(fd), rustix::fs::stat(path)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

impl Gateway {
    /// Takes the socket: refuses when another gateway answers there, replaces a stale socket
    /// file nobody answers on.
    pub fn bind(cfg: GatewayConfig) -> Result<Gateway, GatewayError> {
        use interprocess::local_socket::{prelude::*, GenericFilePath, Listener, ListenerOptions};
        check_config(&cfg)?;
        let dir = crate::control::socket_dir(&cfg.socket).to_path_buf();
        crate::control::ensure_private_dir(&dir)
            .map_err(ctx(format!("socket directory {}", dir.display())))?;
        // An exclusive lock held for the gateway's life settles races between two starting
        // gateways; the connect probe below catches a gateway that holds no lock.
        // Nothing but a socket is ever replaced: a mistyped path must not cost a file.
        socket_there(&cfg.socket)?;
        let lock_path = crate::control::own_file(&cfg.socket, "lock");
        let open_lock = || {
            rustix::fs::open(
                &lock_path,
                rustix::fs::OFlags::CREATE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .map_err(|e| ctx(format!("lock file {}", lock_path.display()))(e.into()))
        };
        let mut lock = open_lock()?;
        // A gateway that stopped a moment ago can still seem to hold both: a process that
        // forked just then (another thread of an app that embeds the gateway, spawning a
        // child) keeps copies of its lock and listening socket until that child execs, which
        // closes them. So a refusal is confirmed for a little while before it is reported;
        // a gateway that really runs holds them throughout.
        let confirm = std::time::Instant::now() + std::time::Duration::from_millis(250);
        loop {
            let locked =
                rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                    .is_ok();
            // A gateway that stops unlinks the lock file while it still holds it: a lock taken
            // on the file it unlinked locks nothing anyone else will open, so take the one at
            // the path now (created afresh if need be).
            if locked && !is_file_at(&lock, &lock_path) {
                // Within the same deadline: a file system on which the two never agree must
                // not keep us here.
                if std::time::Instant::now() >= confirm {
                    return Err(ctx(format!("lock file {}", lock_path.display()))(
                        std::io::Error::other("the file at the path is never the one locked"),
                    ));
                }
                lock = open_lock()?;
                continue;
            }
            let answered = locked
                && cfg.socket.exists()
                && std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok();
            if locked && !answered {
                break;
            }
            if std::time::Instant::now() >= confirm {
                return Err(GatewayError::AlreadyRunning(cfg.socket.clone()));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // A socket nobody answers on (checked again: a file put there since is not removed).
        if socket_there(&cfg.socket)? {
            std::fs::remove_file(&cfg.socket).map_err(ctx("removing a stale socket"))?;
        }
        let bridge = match &cfg.bridge {
            Some(b) => Some(crate::bridge::bind(
                b,
                &cfg.socket,
                identity::user_name(identity::euid()),
            )?),
            None => None,
        };
        // Before the socket listens: clients that connect find the adopted contexts.
        let kept = match &cfg.keeper {
            Some(k) => match crate::keeper::Link::attach(&cfg.socket, k) {
                Ok(x) => Some(x),
                Err(e) => {
                    crate::log::warn(format_args!(
                        "no keeper: contexts will not survive a gateway crash ({e})"
                    ));
                    None
                }
            },
            None => None,
        };
        let name = cfg
            .socket
            .as_path()
            .to_fs_name::<GenericFilePath>()
            .map_err(ctx("socket name"))?;
        let listener = ListenerOptions::new()
            .name(name)
            .create_sync()
            .map_err(ctx("binding the socket"))?;
        let Listener::UdSocket(l) = listener;
        let listener = std::os::unix::net::UnixListener::from(OwnedFd::from(l));
        listener.set_nonblocking(true).map_err(ctx("socket mode"))?;
        std::fs::set_permissions(
            &cfg.socket,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(ctx("socket permissions"))?;
        let socket = cfg.socket.clone();
        Ok(Gateway {
            cfg,
            listener,
            bridge,
            kept,
            lock: Some(Held {
                lock,
                lock_path,
                socket,
            }),
        })
    }

    /// Where it listens.
    pub fn socket_path(&self) -> &Path {
        &self.cfg.socket
    }

    /// Where the WebSocket bridge listens (the real port when the configuration said 0).
    pub fn ws_addr(&self) -> Option<std::net::SocketAddr> {
        self.bridge.as_ref().map(|b| b.local_addr())
    }

    /// Serves on the current thread until `shutdown` completes, then tells every peer, removes
    /// the socket file and returns.
    pub fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), GatewayError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ctx("starting the runtime"))?;
        let held = self.lock.take();
        // The gateway's core loop runs as a task of its own, not as the `block_on` future: the
        // runtime polls that future only after it has polled its sockets, so a message a
        // connection task hands to the core would wait for a poll of the driver (and for any
        // task queued meanwhile) before the core routes it on. As a task, the core is queued
        // behind the connection task and runs next (docs/benchmarks.md §6.3).
        let result = rt.block_on(async {
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let mut core = tokio::spawn(serve(self, async {
                let _ = stop_rx.await;
            }));
            tokio::pin!(shutdown);
            let done = tokio::select! {
                r = &mut core => r,
                _ = &mut shutdown => {
                    let _ = stop_tx.send(());
                    core.await
                }
            };
            done.unwrap_or_else(|e| Err(ctx("the gateway's core task")(std::io::Error::other(e))))
        });
        if let Some(held) = held {
            held.release();
        }
        result
    }

    /// Serves on a background thread.
    pub fn spawn(self) -> Result<GatewayHandle, GatewayError> {
        let (tx, rx) = oneshot::channel::<()>();
        let path = self.cfg.socket.clone();
        let ws_addr = self.ws_addr();
        let thread = std::thread::Builder::new()
            .name("knit-gateway".into())
            .spawn(move || {
                if let Err(e) = self.run_until(async {
                    let _ = rx.await;
                }) {
                    crate::log::warn(format_args!("gateway stopped: {e}"));
                }
            })
            .map_err(ctx("spawning the gateway thread"))?;
        Ok(GatewayHandle {
            path,
            ws_addr,
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

/// A gateway running on a background thread; stops when dropped.
#[derive(Debug)]
pub struct GatewayHandle {
    path: PathBuf,
    ws_addr: Option<std::net::SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GatewayHandle {
    /// Where it listens.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Where the WebSocket bridge listens, if it runs.
    pub fn ws_addr(&self) -> Option<std::net::SocketAddr> {
        self.ws_addr
    }

    /// Stops it and waits until it has cleaned up.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Closes a peer's connection from the core (native: shut the socket down; virtual: whatever
/// its front end supplied). The connection's reader then reports the peer closed.
pub(crate) type Closer = Box<dyn Fn() + Send>;

pub(crate) enum Event {
    Hello {
        stream: Arc<UnixStream>,
        cred: identity::PeerCred,
        hello: crate::wire::frame::Hello,
        tx: PeerTx,
        reply: oneshot::Sender<Result<PeerId, (Status, String)>>,
    },
    /// A peer that does not use the native socket (a WebSocket client of the bridge).
    Admit {
        adm: Admission,
        tx: PeerTx,
        closer: Closer,
        reply: oneshot::Sender<Result<(PeerId, crate::wire::frame::Welcome), (Status, String)>>,
    },
    Msg(PeerId, ToGateway),
    Closed(PeerId, String),
}

/// How front ends other than the native socket (the WebSocket bridge) talk to the core: they
/// admit peers, send their messages as [`ToGateway`], and receive [`Outgoing`] notices on the
/// queue they supplied.
#[derive(Clone)]
pub(crate) struct CoreHandle {
    tx: mpsc::Sender<Event>,
}

impl CoreHandle {
    /// Admits a peer; returns its id and the welcome (the peers it can see).
    pub(crate) async fn admit(
        &self,
        adm: Admission,
        tx: PeerTx,
        closer: Closer,
    ) -> Result<(PeerId, crate::wire::frame::Welcome), (Status, String)> {
        let (rtx, rrx) = oneshot::channel();
        self.tx
            .send(Event::Admit {
                adm,
                tx,
                closer,
                reply: rtx,
            })
            .await
            .map_err(|_| (Status::Disconnected, "gateway stopping".to_string()))?;
        rrx.await
            .map_err(|_| (Status::Disconnected, "gateway stopping".to_string()))?
    }

    /// Delivers a message from an admitted peer.
    pub(crate) async fn send(&self, peer: PeerId, msg: ToGateway) -> bool {
        self.tx.send(Event::Msg(peer, msg)).await.is_ok()
    }

    /// Reports that a peer's connection ended.
    pub(crate) async fn closed(&self, peer: PeerId, why: String) {
        let _ = self.tx.send(Event::Closed(peer, why)).await;
    }
}

async fn serve(
    gw: Gateway,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GatewayError> {
    let listener = tokio::net::UnixListener::from_std(gw.listener).map_err(ctx("socket"))?;
    // Backs off while `accept` fails (out of descriptors, it would fail again at once).
    let mut accepting = crate::sys::accept::Accepting::new(listener, "gateway");
    let my_uid = identity::euid();
    let user = identity::user_name(my_uid);
    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(4096);
    let mut registry = Registry::new(gw.cfg.limits.clone())
        .map_err(|e| ctx("doorbell directory")(std::io::Error::other(e)))?;
    registry.set_channels(gw.cfg.channels.clone());
    registry.set_policy(gw.cfg.policy.clone());
    match (gw.kept, &gw.cfg.keeper) {
        (Some((link, state)), Some(cfg)) => {
            registry.set_keeper(link, Some((gw.cfg.socket.clone(), cfg.clone())));
            let offered = state.contexts.len();
            let errors = registry.adopt(state);
            for e in &errors {
                crate::log::warn(format_args!("not adopted: {e}"));
            }
            if offered > 0 {
                crate::log::info(format_args!(
                    "adopted {} of {offered} contexts kept across the restart",
                    offered - errors.len()
                ));
            }
        }
        (None, Some(cfg)) => registry.set_keeper_source(gw.cfg.socket.clone(), cfg.clone()),
        _ => {}
    }
    // Held closed by web connections with a backlog: relaying peers wait (see `bridge::gate`).
    let gate = Arc::new(crate::bridge::gate::Gate::default());
    let bridge = match gw.bridge {
        Some(b) => {
            let core = CoreHandle { tx: ev_tx.clone() };
            // The bridge follows shared contexts for its web peers: it sleeps on a doorbell of
            // the directory that native writers ring.
            let bell = registry.reserve_doorbell();
            Some(
                b.start(core, gw.cfg.limits.clone(), bell, gate.clone())
                    .map_err(ctx("starting the bridge"))?,
            )
        }
        None => None,
    };
    let mut closers: HashMap<PeerId, Closer> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut writers = tokio::task::JoinSet::new();
    crate::log::info(format_args!(
        "gateway listening on {}",
        gw.cfg.socket.display()
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = sweep.tick() => {
                let now = std::time::Instant::now();
                registry.expire(now);
                registry.keep_sweep(now);
            }
            // Reap writers whose connection ended: a finished task stays in the set (about
            // 1.4 KiB each) until joined, so a gateway that saw many short-lived peers grew
            // without bound (docs/load.md).
            // A connection that ended freed its descriptor: an `accept` failing for the lack of
            // one may succeed now.
            Some(_) = writers.join_next(), if !writers.is_empty() => accepting.retry_now(),
            stream = accepting.next() => {
                let cred = match identity::peer_cred(&stream) {
                    Ok(c) => c,
                    Err(_) => continue,
                };
                if cred.uid != my_uid {
                    crate::log::warn(format_args!("refused a connection from uid {} (pid {})", cred.uid, cred.pid));
                    continue;
                }
                let ev_tx = ev_tx.clone();
                let depth = gw.cfg.queue_depth;
                let stream = Arc::new(stream);
                let (tx, rx) = mpsc::channel::<Outgoing>(depth);
                writers.spawn(writer(stream.clone(), rx));
                tokio::spawn(reader(stream, cred, tx, ev_tx, gate.clone()));
            }
            Some(ev) = ev_rx.recv() => {
                match ev {
                    Event::Hello { stream, cred, hello, tx, reply } => {
                        let r = registry.hello(cred, user.clone(), hello, tx);
                        if let Ok(id) = &r {
                            crate::log::debug(format_args!("peer {id} joined (pid {})", cred.pid));
                            closers.insert(*id, Box::new(move || {
                                // The reader then sees end-of-stream and reports the peer
                                // closed; cleanup follows the same path as a crash.
                                let _ = rustix::net::shutdown(stream.as_fd(), rustix::net::Shutdown::Both);
                            }));
                        }
                        let _ = reply.send(r);
                    }
                    Event::Admit { adm, tx, closer, reply } => {
                        let r = registry.admit(adm, tx);
                        if let Ok((id, _)) = &r {
                            closers.insert(*id, closer);
                        }
                        let _ = reply.send(r);
                    }
                    Event::Msg(peer, msg) => match msg {
                        ToGateway::Hello(_) => disconnect(&closers, peer),
                        ToGateway::Register { req, methods } => registry.register(peer, req, methods),
                        ToGateway::Unregister { req, ids } => registry.unregister(peer, req, ids),
                        ToGateway::OpenLane { req, peer: to } => registry.open_lane(peer, req, to),
                        ToGateway::LaneFault { peer: other, reason } => registry.lane_fault(peer, other, &reason),
                        ToGateway::Call { call, peer: to, method_id, args, timeout_ms } => {
                            registry.call(peer, call, to, method_id, args, timeout_ms)
                        }
                                                ToGateway::Yield { invocation, outcome } => registry.yield_(peer, invocation, outcome),
                        ToGateway::OpenContext { req, name } => registry.open_context(peer, req, name),
                        ToGateway::SubscribeContext { req, id } => registry.subscribe_context(peer, req, id),
                        ToGateway::UnsubscribeContext { req, id } => registry.unsubscribe_context(peer, req, id),
                        ToGateway::DestroyContext { req, id } => registry.destroy_context(peer, req, id),
                        ToGateway::BusSubscribe { req, sub, topic, routing_key } => {
                            registry.bus_subscribe(peer, req, sub, topic, routing_key)
                        }
                        ToGateway::BusUnsubscribe { req, sub } => registry.bus_unsubscribe(peer, req, sub),
                        ToGateway::Record { to, kind, body } => registry.relay_record(peer, to, kind, body),
                        ToGateway::BusPublish { topic, routing_key, target, data } => {
                            // Publishers deliver to their own subscriptions themselves (a web
                            // peer's session included).
                            registry.bus_publish(peer, topic, routing_key, target, data, false)
                        }
                        ToGateway::CreateContext { req, name, lifetime, data } => {
                            registry.create_context(peer, req, name, lifetime, data)
                        }
                        ToGateway::OpenOrCreate { req, name, data } => registry.open_or_create(peer, req, name, data),
                        ToGateway::BusSynced { ticket } => registry.bus_synced(peer, ticket),
                        ToGateway::Denied { peer: offender, action, resource } => {
                            registry.denied_by_peer(peer, offender, &action, &resource)
                        }
                        ToGateway::Goodbye => disconnect(&closers, peer),
                    },
                    Event::Closed(peer, why) => {
                        crate::log::debug(format_args!("peer {peer} left: {why}"));
                        closers.remove(&peer);
                        registry.remove(peer, "peer has left");
                    }
                }
                for action in registry.take_actions() {
                    match action {
                        Action::Disconnect(peer, why) => {
                            crate::log::warn(format_args!("disconnecting {peer}: {why}"));
                            disconnect(&closers, peer);
                        }
                        Action::Ending(peer) => {
                            crate::log::debug(format_args!("peer {peer} is leaving"));
                            disconnect(&closers, peer);
                        }
                    }
                }
            }
        }
    }
    crate::log::info(format_args!(
        "gateway stopping ({} peers)",
        registry.peer_count()
    ));
    registry.shutdown("gateway stopping");
    // A clean stop keeps nothing: the keeper exits with us.
    registry.keeper_exit();
    drop(registry);
    if let Some(b) = bridge {
        b.stop().await;
    }
    drop(ev_rx);
    // Give the writers a moment to flush the goodbyes; peers that do not read are not waited for.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while writers.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

fn disconnect(closers: &HashMap<PeerId, Closer>, peer: PeerId) {
    if let Some(close) = closers.get(&peer) {
        close();
    }
}

/// Reads frames from one connection and forwards them to the core.
async fn reader(
    stream: Arc<UnixStream>,
    cred: identity::PeerCred,
    tx: PeerTx,
    events: mpsc::Sender<Event>,
    gate: Arc<crate::bridge::gate::Gate>,
) {
    let mut frames = FrameReader::default();
    let mut fds = Vec::new();
    // The first frame must be a hello, within a few seconds.
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        next_msg(&stream, &mut frames, &mut fds),
    )
    .await;
    let hello = match first {
        Ok(Ok(Some(ToGateway::Hello(h)))) => h,
        _ => return,
    };
    let (rtx, rrx) = oneshot::channel();
    let refusal_tx = tx.clone();
    if events
        .send(Event::Hello {
            stream: stream.clone(),
            cred,
            hello,
            tx,
            reply: rtx,
        })
        .await
        .is_err()
    {
        return;
    }
    let peer = match rrx.await {
        Ok(Ok(id)) => id,
        Ok(Err((status, message))) => {
            let msg = FromGateway::Refused { status, message };
            let _ = refusal_tx
                .send(Outgoing {
                    msg,
                    fds: Vec::new(),
                })
                .await;
            return;
        }
        Err(_) => return,
    };
    drop(refusal_tx);
    // Whether this peer sent messages the gateway fans out to web peers' queues: from then on
    // it waits while web subscribers have a backlog, as web publishers do (`bridge::gate`).
    let mut relays = false;
    let why = loop {
        if relays {
            gate.open().await;
        }
        match next_msg(&stream, &mut frames, &mut fds).await {
            Ok(Some(msg)) => {
                relays |= matches!(msg, ToGateway::BusPublish { .. } | ToGateway::Record { .. });
                if events.send(Event::Msg(peer, msg)).await.is_err() {
                    return;
                }
            }
            Ok(None) => break "connection closed".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    let _ = events.send(Event::Closed(peer, why)).await;
}

thread_local! {
    /// The receive buffer of the connections this thread reads: one, not 64 KiB per connected
    /// peer (16 MiB at 256 peers).
    static RECV_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 64 * 1024]);
}

/// The next message, `None` at end of stream. Peers never send descriptors; any that arrive are
/// dropped (closed).
async fn next_msg(
    stream: &UnixStream,
    frames: &mut FrameReader,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Option<ToGateway>> {
    loop {
        match frames.next_frame() {
            Ok(Some((body, _fds))) => {
                return decode_body::<ToGateway>(&body)
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        stream.readable().await?;
        let fd = stream.as_raw_fd();
        // Used only between two awaits, so one buffer serves every connection of the thread.
        let got = RECV_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let r = stream.try_io(Interest::READABLE, || {
                // SAFETY: `fd` belongs to `stream`, which outlives this call.
                let sock = unsafe { BorrowedFd::borrow_raw(fd) };
                crate::sys::fdpass::recv(sock, &mut buf, fds)
            });
            if let Ok(n) = r {
                frames.push_bytes(&buf[..n]);
            }
            r
        });
        match got {
            Ok(0) => return Ok(None),
            Ok(_) => fds.clear(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes one peer's queued frames (with their descriptors) until the queue closes.
async fn writer(stream: Arc<UnixStream>, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let frame = match encode_frame(&out.msg, out.fds.len()) {
            Ok(f) => f,
            Err(e) => {
                crate::log::warn(format_args!("cannot encode a frame: {e}"));
                continue;
            }
        };
        if write_frame(&stream, &frame, &out.fds).await.is_err() {
            break;
        }
    }
    let _ = rustix::net::shutdown(stream.as_fd(), rustix::net::Shutdown::Write);
}

async fn write_frame(stream: &UnixStream, frame: &[u8], fds: &[Arc<OwnedFd>]) -> io::Result<()> {
    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let mut sent = 0;
    while sent < frame.len() {
        stream.writable().await?;
        let fd = stream.as_raw_fd();
        let attach: &[BorrowedFd<'_>] = if sent == 0 { &fds } else { &[] };
        match stream.try_io(Interest::WRITABLE, || {
            // SAFETY: `fd` belongs to `stream`, which outlives this call.
            let sock = unsafe { BorrowedFd::borrow_raw(fd) };
            crate::sys::fdpass::send_some(sock, &frame[sent..], attach)
        }) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
