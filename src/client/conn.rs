//! The client's control connection: requests to the gateway and the thread that reads its
//! frames (replies, discovery events, lanes), and that reconnects when the gateway goes away
//! (`reconnect.rs`).

use super::engine::{RemotePeer, Shared};
use super::lane::Lane;
use super::ClientError;
use crate::model::FailureKind;
use crate::status::Status;
use crate::wire::frame::{decode_body, encode_frame, FrameReader, FromGateway, PeerId, ToGateway};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A reply to a control request.
pub(crate) enum Reply {
    Ack,
    Fail(Status, String),
    Lane(Arc<Lane>),
    Context(Arc<super::contexts::CtxEntry>),
    /// The answer to `OpenOrCreate`: the context, and whether the gateway made it holding our
    /// data (at `version`).
    Created {
        entry: Arc<super::contexts::CtxEntry>,
        created: bool,
        version: u64,
    },
}

impl Reply {
    /// The outcome of a request `what` that the gateway answers with `Ack`: a refusal is the
    /// gateway's error, any other reply a protocol error.
    pub(crate) fn ack(r: Result<Reply, ClientError>, what: &str) -> Result<(), ClientError> {
        match r? {
            Reply::Ack => Ok(()),
            Reply::Fail(status, message) => Err(ClientError::Gateway { status, message }),
            _ => Err(ClientError::Protocol(format!("unexpected reply to {what}"))),
        }
    }
}

/// Why the connection is down.
#[derive(Debug, Clone)]
pub(crate) struct Down {
    pub since: Instant,
    pub reason: String,
    /// The gateway said it was stopping before the connection closed.
    pub stopping: bool,
}

pub(crate) struct Conn {
    /// The socket requests go out on, `None` while disconnected.
    sock: Mutex<Option<Arc<UnixStream>>>,
    /// Keeps each frame whole when several threads send (held while sending: never taken by
    /// `shutdown`, which must work while a send is stuck).
    write: Mutex<()>,
    /// A connection being set up, so that closing the client can interrupt its handshake.
    handshake: Mutex<Option<Arc<UnixStream>>>,
    next_req: AtomicU64,
    pending: Mutex<HashMap<u64, SyncSender<Reply>>>,
    connected: AtomicBool,
    /// Bumped at every (re)connection: what was tied to an older one is stale.
    epoch: AtomicU64,
    /// The gateway announced it is stopping, on the current connection.
    stopping: AtomicBool,
    down: Mutex<Option<Down>>,
    /// Registration changes wait while a reconnection restores registrations.
    pub(crate) gate: Gate,
}

/// A request sent, its reply not yet awaited.
pub(crate) struct Pending {
    req: u64,
    rx: Receiver<Reply>,
}

impl Conn {
    pub(crate) fn new(sock: Arc<UnixStream>) -> Self {
        Self {
            sock: Mutex::new(Some(sock)),
            write: Mutex::new(()),
            handshake: Mutex::new(None),
            next_req: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(true),
            epoch: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            down: Mutex::new(None),
            gate: Gate::default(),
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        // SYNC(connected): pairs with the Release stores in `disconnected` and `install`.
        self.connected.load(Ordering::Acquire)
    }

    /// Which connection this is (1 for the first).
    pub(crate) fn epoch(&self) -> u64 {
        // Acquire: pairs with the Release increment in `install`; what `install` set up before
        // is visible to whoever sees the new epoch.
        self.epoch.load(Ordering::Acquire)
    }

    /// Why the connection is down, if it is.
    pub(crate) fn down(&self) -> Option<Down> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends one message.
    pub(crate) fn send(&self, msg: &ToGateway) -> Result<(), ClientError> {
        let frame = encode_frame(msg, 0).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let Some(s) = self.sock.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Err(ClientError::Disconnected);
        };
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        crate::sys::fdpass::send_all(s.as_fd(), &frame, &[]).map_err(|_| ClientError::Disconnected)
    }

    /// Sends a request built around a fresh request id and waits for its reply.
    pub(crate) fn request(
        &self,
        build: impl FnOnce(u64) -> ToGateway,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        self.start(build)?.wait(self, timeout)
    }

    /// Sends a request; its reply is awaited later (several requests then travel together).
    pub(crate) fn start(
        &self,
        build: impl FnOnce(u64) -> ToGateway,
    ) -> Result<Pending, ClientError> {
        // Relaxed: ids only need to be unique.
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req, tx);
        if let Err(e) = self.send(&build(req)) {
            self.forget(req);
            return Err(e);
        }
        Ok(Pending { req, rx })
    }

    fn forget(&self, req: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&req);
    }

    fn complete(&self, req: u64, reply: Reply) {
        if let Some(tx) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&req)
        {
            let _ = tx.try_send(reply);
        }
    }

    /// The connection is gone: sends fail from now on and every waiting request fails (their
    /// senders drop).
    fn disconnected(&self, reason: &str) -> Down {
        // SYNC(connected): see `is_connected`.
        self.connected.store(false, Ordering::Release);
        *self.sock.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let down = Down {
            since: Instant::now(),
            reason: reason.to_string(),
            // Relaxed: a flag on its own (written by the control thread; others only read it,
            // `announced_stop`); nothing is published through it.
            stopping: self.stopping.swap(false, Ordering::Relaxed),
        };
        *self.down.lock().unwrap_or_else(|e| e.into_inner()) = Some(down.clone());
        down
    }

    /// Whether the gateway announced a clean stop on the current connection, or the last one
    /// closed after such an announcement.
    pub(crate) fn announced_stop(&self) -> bool {
        // Relaxed: a flag on its own (see `disconnected`).
        self.stopping.load(Ordering::Relaxed)
            || self
                .down
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|d| d.stopping && !self.is_connected())
    }

    /// A new connection is up: requests go out on `sock`.
    pub(crate) fn install(&self, sock: Arc<UnixStream>) {
        *self.sock.lock().unwrap_or_else(|e| e.into_inner()) = Some(sock);
        *self.down.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Release: see `epoch`.
        self.epoch.fetch_add(1, Ordering::Release);
        // SYNC(connected): see `is_connected`.
        self.connected.store(true, Ordering::Release);
    }

    /// Records (or clears) the socket of a handshake in progress.
    pub(crate) fn set_handshake(&self, sock: Option<Arc<UnixStream>>) {
        *self.handshake.lock().unwrap_or_else(|e| e.into_inner()) = sock;
    }

    /// Closes the socket (and any handshake in progress); the reader thread then ends.
    pub(crate) fn shutdown(&self) {
        let socks = [
            self.sock.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            self.handshake
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        ];
        for s in socks.into_iter().flatten() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Pending {
    /// Waits for the reply.
    pub(crate) fn wait(self, conn: &Conn, timeout: Duration) -> Result<Reply, ClientError> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                conn.forget(self.req);
                Err(ClientError::Timeout)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Disconnected),
        }
    }
}

/// Keeps registration changes (methods, bus and context subscriptions) from interleaving with
/// a reconnection that re-sends them all: changes wait while a restore runs, and a restore
/// starts once the changes under way are done. Without it, a method registered just as the
/// connection came back could be sent twice, or one removed could be brought back.
#[derive(Default)]
pub(crate) struct Gate {
    st: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    restoring: bool,
    active: usize,
}

/// A registration change under way; ends when dropped.
pub(crate) struct GateGuard<'a>(&'a Gate);

/// Longest a change waits for a restore (a restore is a few control round trips).
const GATE_WAIT: Duration = Duration::from_secs(10);

impl Gate {
    /// Starts a registration change, after any restore in progress.
    pub(crate) fn enter(&self) -> GateGuard<'_> {
        let st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        let (mut st, _) = self
            .cv
            .wait_timeout_while(st, GATE_WAIT, |s| s.restoring)
            .unwrap_or_else(|e| e.into_inner());
        st.active += 1;
        GateGuard(self)
    }

    /// Starts a restore once the changes under way are done (waiting at most `max`: those
    /// fail fast while disconnected).
    pub(crate) fn begin_restore(&self, max: Duration) {
        let st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        let (mut st, _) = self
            .cv
            .wait_timeout_while(st, max, |s| s.restoring || s.active > 0)
            .unwrap_or_else(|e| e.into_inner());
        st.restoring = true;
    }

    /// Ends a restore.
    pub(crate) fn end_restore(&self) {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).restoring = false;
        self.cv.notify_all();
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.st.lock().unwrap_or_else(|e| e.into_inner());
        st.active = st.active.saturating_sub(1);
        drop(st);
        self.0.cv.notify_all();
    }
}

/// Reads control frames; when the connection ends, reconnects (unless the client is closed or
/// was built without reconnection) and reads on.
pub(crate) fn reader_loop(shared: Arc<Shared>, mut sock: Arc<UnixStream>, mut frames: FrameReader) {
    loop {
        let why = read_until_closed(&shared, &sock, &mut frames);
        let closed = shared.is_closed();
        if !closed {
            crate::log::warn(format_args!("connection to the gateway lost: {why}"));
        }
        let down = shared.conn.disconnected(&why);
        super::reconnect::connection_lost(&shared, &down);
        if closed || !shared.hello.reconnect {
            break;
        }
        match super::reconnect::run(&shared) {
            Some((s, f)) => {
                sock = s;
                frames = f;
            }
            None => break,
        }
    }
    shared.state_changed.notify_all();
    shared.wake_all();
}

/// Handles frames until the socket closes; returns why it did.
fn read_until_closed(shared: &Arc<Shared>, sock: &UnixStream, frames: &mut FrameReader) -> String {
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds = Vec::new();
    loop {
        loop {
            match frames.next_frame() {
                Ok(Some((body, fds))) => match decode_body::<FromGateway>(&body) {
                    Ok(msg) => handle(shared, msg, fds),
                    Err(e) => return format!("undecodable frame from the gateway: {e}"),
                },
                Ok(None) => break,
                Err(e) => return format!("bad frame from the gateway: {e}"),
            }
        }
        match crate::sys::fdpass::recv(sock.as_fd(), &mut buf, &mut fds) {
            Ok(0) => return "gateway closed the connection".to_string(),
            Ok(n) => {
                frames.push_bytes(&buf[..n]);
                frames.push_fds(fds.drain(..));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// A peer is gone (the gateway said so, or, while disconnected, its process vanished): calls
/// pending on it fail, its lane and stream subscriptions end, removal events go out.
pub(crate) fn peer_removed(shared: &Arc<Shared>, peer: PeerId, reason: String) {
    // The removal and its events under the events gate (nothing below calls user code while
    // it is held); the rest after, as before.
    let events = super::interop::events_gate(shared);
    let gone = {
        let mut st = shared.lock_state();
        st.generation += 1;
        let gone = st.peers.remove(&peer);
        if let Some(p) = &gone {
            st.remember_departed(p.identity.clone());
        }
        gone
    };
    if let Some(p) = &gone {
        super::interop::removed_methods(shared, &p.identity, p.methods.values().cloned().collect());
        super::interop::emit(
            shared,
            super::InteropEvent::ServerRemoved {
                server: (*p.identity).clone(),
                reason,
            },
        );
    }
    drop(events);
    super::bus::peer_left(shared, peer);
    shared.drop_departed_lane(peer, super::engine::PEER_LEFT);
    super::streams::peer_left(shared, peer);
    shared.state_changed.notify_all();
}

/// The entry for the context segment a frame carried (its first descriptor); the reply that
/// fails the request when there is none or it cannot be mapped.
fn attach_context(
    shared: &Arc<Shared>,
    fds: &[OwnedFd],
    id: u64,
    name: String,
    writable: bool,
) -> Result<Arc<super::contexts::CtxEntry>, Reply> {
    let fd = fds
        .first()
        .ok_or_else(|| "context frame without a descriptor".to_string());
    fd.and_then(|fd| super::contexts::attach(shared, id, name, writable, fd))
        .map_err(|e| Reply::Fail(Status::Protocol, e))
}

fn handle(shared: &Arc<Shared>, msg: FromGateway, fds: Vec<OwnedFd>) {
    match msg {
        FromGateway::Ack { req } => shared.conn.complete(req, Reply::Ack),
        FromGateway::Fail {
            req,
            status,
            message,
        } => shared.conn.complete(req, Reply::Fail(status, message)),
        FromGateway::LaneOpened {
            req,
            peer,
            lane,
            side,
            peer_doorbell,
        } => match attach_lane(shared, peer, lane, side, peer_doorbell, &fds) {
            Ok(l) => shared.conn.complete(req, Reply::Lane(l)),
            Err(e) => shared.conn.complete(req, Reply::Fail(Status::Protocol, e)),
        },
        FromGateway::LaneOffered {
            peer,
            lane,
            side,
            peer_doorbell,
        } => {
            if let Err(e) = attach_lane(shared, peer, lane, side, peer_doorbell, &fds) {
                crate::log::warn(format_args!("cannot map the lane {peer} opened: {e}"));
            }
        }
        FromGateway::LaneClosed { peer, lane, reason } => {
            let ours = shared
                .lock_state()
                .lanes
                .get(&peer)
                .is_some_and(|l| l.id == lane);
            if ours {
                shared.drop_lane(peer);
                shared.fail_calls_to(
                    peer,
                    FailureKind::Delivery(Status::Protocol),
                    &format!("lane closed: {reason}"),
                );
            }
        }
        FromGateway::PeerAdded {
            identity,
            transport,
            rules,
        } => {
            let identity = Arc::new(identity);
            let events = super::interop::events_gate(shared);
            {
                let rules = super::engine::restrictive(rules);
                if rules.is_some() {
                    // Relaxed: a hint read before taking the state lock, which orders the rules.
                    shared.policy_on.store(true, Ordering::Relaxed);
                }
                let mut st = shared.lock_state();
                st.peers.insert(
                    identity.peer_id,
                    RemotePeer {
                        identity: identity.clone(),
                        transport,
                        methods: Default::default(),
                        rules,
                    },
                );
                st.generation += 1;
            }
            shared.state_changed.notify_all();
            super::interop::emit(
                shared,
                super::InteropEvent::ServerAdded((*identity).clone()),
            );
            drop(events);
        }
        FromGateway::PeerRemoved { peer, reason } => peer_removed(shared, peer, reason),
        FromGateway::MethodsAdded { peer, methods } => {
            super::interop::methods_added(shared, peer, methods)
        }
        FromGateway::MethodsRemoved { peer, ids } => {
            super::interop::methods_removed(shared, peer, ids)
        }
        FromGateway::Invoke {
            invocation,
            caller,
            method_id,
            args,
        } => {
            let caller = shared
                .lock_state()
                .peers
                .get(&caller)
                .map(|p| p.identity.clone());
            match caller {
                Some(caller) => shared.enqueue(super::engine::Task::RelayInvoke {
                    invocation,
                    epoch: shared.conn.epoch(),
                    caller,
                    method_id,
                    args,
                }),
                None => {
                    let outcome = crate::wire::frame::RelayOutcome::Err {
                        status: Status::PeerLeft,
                        message: "caller unknown".into(),
                        context: crate::wire::Value::Null,
                    };
                    let _ = shared.conn.send(&ToGateway::Yield {
                        invocation,
                        outcome,
                    });
                }
            }
        }
        FromGateway::CallResult { call, outcome } => shared.complete_relayed(call, outcome),
        FromGateway::CallsFailed { calls, outcome } => {
            for call in calls {
                shared.complete_relayed(call, outcome.clone());
            }
        }
        FromGateway::ContextOpened {
            req,
            id,
            name,
            writable,
        } => {
            let r = attach_context(shared, &fds, id, name, writable).map(Reply::Context);
            shared.conn.complete(req, r.unwrap_or_else(|e| e));
        }
        FromGateway::ContextAdded { id, name, .. } => super::contexts::announced(shared, id, name),
        FromGateway::BusSubscribed(info) => super::bus::remote_subscribed(shared, info),
        FromGateway::BusSubscribedSync { info, ticket } => {
            super::bus::remote_subscribed(shared, info);
            // Our routes include it now (the next publish sees the new generation).
            let _ = shared.conn.send(&ToGateway::BusSynced { ticket });
        }
        FromGateway::Record { from, kind, body } => {
            if let Some(identity) = shared.identity_of(from.0) {
                let link = super::streams::Link::Relay(from);
                if let Err(e) = super::streams::on_record(shared, from, identity, link, kind, &body)
                {
                    crate::log::debug(format_args!("relayed record from {from} dropped: {e}"));
                }
            }
        }
        FromGateway::BusUnsubscribed { peer, sub } => {
            super::bus::remote_unsubscribed(shared, peer, sub)
        }
        FromGateway::BusMessage {
            from,
            topic,
            routing_key,
            data,
        } => {
            if let Some(source) = shared.identity_of(from.0) {
                let msg = super::bus::BusMessage {
                    topic: Arc::from(topic),
                    data,
                    routing_key,
                    source,
                };
                shared.push_task(super::engine::Task::Bus(msg));
            }
        }
        FromGateway::ContextDestroyed { id, name, .. } => {
            super::contexts::destroy_notice(shared, id, &name)
        }
        FromGateway::ContextsDestroyed { gone } => {
            for (id, name, _) in gone {
                super::contexts::destroy_notice(shared, id, &name)
            }
        }
        FromGateway::Shutdown { reason } => {
            crate::log::info(format_args!("gateway is stopping: {reason}"));
            // Relaxed: a flag on its own, read when the connection closes and by
            // `announced_stop`; nothing is published through it.
            shared.conn.stopping.store(true, Ordering::Relaxed);
        }
        // The answer to `OpenOrCreate` (native clients never send GW3's `CreateContext`).
        FromGateway::ContextCreated {
            req,
            id,
            name,
            created,
            writable,
            version,
        } => {
            let r = attach_context(shared, &fds, id, name, writable).map(|entry| Reply::Created {
                entry,
                created,
                version,
            });
            shared.conn.complete(req, r.unwrap_or_else(|e| e));
        }
        FromGateway::Welcome(_) | FromGateway::Refused { .. } => {
            crate::log::warn(format_args!("unexpected handshake frame from the gateway"));
        }
    }
}

fn attach_lane(
    shared: &Arc<Shared>,
    peer: PeerId,
    id: u64,
    side: u8,
    peer_doorbell: u32,
    fds: &[OwnedFd],
) -> Result<Arc<Lane>, String> {
    let mut st = shared.lock_state();
    if let Some(l) = st.lanes.get(&peer) {
        if l.id == id && !l.is_closed() {
            return Ok(l.clone());
        }
    }
    let identity = st
        .peers
        .get(&peer)
        .map(|p| p.identity.clone())
        .ok_or_else(|| format!("lane offered by unknown peer {peer}"))?;
    // Fixed header + payload: the largest message body either side may send.
    let max_message = shared.max_payload() + crate::wire::record::INVOKE_HEADER;
    let (lane, rx) = Lane::open(
        peer,
        id,
        side,
        identity,
        fds,
        max_message,
        shared.bells(),
        peer_doorbell,
    )?;
    if let Some(old) = st.lanes.insert(peer, lane.clone()) {
        old.close();
    }
    drop(st);
    shared.add_rx(rx);
    Ok(lane)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_waits_for_changes_under_way_and_changes_wait_for_a_restore() {
        let gate = Arc::new(Gate::default());
        let change = gate.enter();
        let restorer = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.begin_restore(Duration::from_secs(30)))
        };
        // The restore cannot start while the change is under way (a negative check: it is
        // given time to go wrong).
        std::thread::sleep(Duration::from_millis(50));
        assert!(!restorer.is_finished(), "a restore started during a change");
        drop(change);
        restorer.join().unwrap();
        let changer = {
            let gate = gate.clone();
            std::thread::spawn(move || drop(gate.enter()))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !changer.is_finished(),
            "a change went ahead during a restore"
        );
        gate.end_restore();
        changer.join().unwrap();
    }
}
