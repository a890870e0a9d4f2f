//! The client's control connection: requests to the gateway and the thread that reads its
//! frames (replies, discovery events, lanes).

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
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A reply to a control request.
pub(crate) enum Reply {
    Ack,
    Fail(Status, String),
    Lane(Arc<Lane>),
    Context(Arc<super::contexts::CtxEntry>),
}

pub(crate) struct Conn {
    sock: UnixStream,
    write: Mutex<()>,
    next_req: AtomicU64,
    pending: Mutex<HashMap<u64, SyncSender<Reply>>>,
    connected: AtomicBool,
}

impl Conn {
    pub(crate) fn new(sock: UnixStream) -> Self {
        Self {
            sock,
            write: Mutex::new(()),
            next_req: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(true),
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub(crate) fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Sends one message.
    pub(crate) fn send(&self, msg: &ToGateway) -> Result<(), ClientError> {
        if !self.is_connected() {
            return Err(ClientError::Disconnected);
        }
        let frame = encode_frame(msg, 0).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        crate::sys::fdpass::send_all(self.sock.as_fd(), &frame, &[])
            .map_err(|_| ClientError::Disconnected)
    }

    /// Sends a request built around a fresh request id and waits for its reply.
    pub(crate) fn request(
        &self,
        build: impl FnOnce(u64) -> ToGateway,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        // Relaxed: ids only need to be unique.
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req, tx);
        if let Err(e) = self.send(&build(req)) {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&req);
            return Err(e);
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&req);
                Err(ClientError::Timeout)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Disconnected),
        }
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

    /// The connection is gone: every waiting request fails (their senders drop).
    fn disconnected(&self) {
        self.connected.store(false, Ordering::Release);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Closes the socket; the reader thread then ends.
    pub(crate) fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// Reads control frames until the connection ends.
pub(crate) fn reader_loop(shared: Arc<Shared>, mut frames: FrameReader) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds = Vec::new();
    let why = 'outer: loop {
        loop {
            match frames.next_frame() {
                Ok(Some((body, fds))) => match decode_body::<FromGateway>(&body) {
                    Ok(msg) => handle(&shared, msg, fds),
                    Err(e) => break 'outer format!("undecodable frame from the gateway: {e}"),
                },
                Ok(None) => break,
                Err(e) => break 'outer format!("bad frame from the gateway: {e}"),
            }
        }
        match crate::sys::fdpass::recv(shared.conn.socket().as_fd(), &mut buf, &mut fds) {
            Ok(0) => break "gateway closed the connection".to_string(),
            Ok(n) => {
                frames.push_bytes(&buf[..n]);
                frames.push_fds(fds.drain(..));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break e.to_string(),
        }
    };
    if !shared.is_closed() {
        crate::log::warn(format_args!("connection to the gateway lost: {why}"));
    }
    shared.conn.disconnected();
    shared.state_changed.notify_all();
    shared.wake_all();
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
        } => {
            let identity = Arc::new(identity);
            {
                let mut st = shared.lock_state();
                st.peers.insert(
                    identity.peer_id,
                    RemotePeer {
                        identity: identity.clone(),
                        transport,
                        methods: Default::default(),
                    },
                );
                st.generation += 1;
            }
            shared.state_changed.notify_all();
            super::interop::emit(
                shared,
                super::InteropEvent::ServerAdded((*identity).clone()),
            );
        }
        FromGateway::PeerRemoved { peer, reason } => {
            let gone = {
                let mut st = shared.lock_state();
                st.generation += 1;
                let gone = st.peers.remove(&peer);
                if let Some(p) = &gone {
                    if st.departed.len() >= 256 {
                        st.departed.pop_front();
                    }
                    st.departed.push_back(p.identity.clone());
                }
                gone
            };
            shared.drop_lane(peer);
            shared.fail_calls_to(
                peer,
                FailureKind::PeerLeft,
                "Peer has left while waiting for result",
            );
            super::streams::peer_left(shared, peer);
            shared.state_changed.notify_all();
            if let Some(p) = gone {
                super::interop::removed_methods(
                    shared,
                    &p.identity,
                    p.methods.values().cloned().collect(),
                );
                super::interop::emit(
                    shared,
                    super::InteropEvent::ServerRemoved {
                        server: (*p.identity).clone(),
                        reason,
                    },
                );
            }
        }
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
        FromGateway::ContextOpened {
            req,
            id,
            name,
            writable,
        } => {
            let r = match fds.first() {
                Some(fd) => super::contexts::attach(shared, id, name, writable, fd),
                None => Err("context frame without a descriptor".to_string()),
            };
            match r {
                Ok(e) => shared.conn.complete(req, Reply::Context(e)),
                Err(e) => shared.conn.complete(req, Reply::Fail(Status::Protocol, e)),
            }
        }
        FromGateway::ContextAdded { id, name, .. } => super::contexts::announced(shared, id, name),
        FromGateway::BusSubscribed(info) => super::bus::remote_subscribed(shared, info),
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
            super::contexts::destroyed(shared, id, &name)
        }
        FromGateway::Shutdown { reason } => {
            crate::log::info(format_args!("gateway is stopping: {reason}"));
        }
        // Native clients never send `CreateContext` (a GW3 notion).
        FromGateway::ContextCreated { .. } => {}
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
    let max_message = shared.max_payload + crate::wire::record::INVOKE_HEADER;
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
