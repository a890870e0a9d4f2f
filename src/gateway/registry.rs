//! The gateway's state: peers, their methods, the lanes between them, relayed calls. A state
//! machine driven by the server loop; it owns no sockets, only each peer's outbound queue of
//! typed notices (a native peer's writer encodes them as frames, the WebSocket bridge translates
//! them to GW3), so it is tested without I/O.

use crate::shm;
use crate::status::Status;
use crate::sys::identity::PeerCred;
use crate::wire::frame::{
    FromGateway, Hello, Instance, MethodDef, MethodSpec, PeerId, PeerSnapshot, RelayOutcome,
    Transport, Welcome, PROTOCOL_VERSION,
};
use crate::wire::Value;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Limits and sizes the gateway enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload a peer may send in one message.
    pub max_payload: u64,
    /// Data bytes per ring in each lane.
    pub lane_capacity: usize,
    /// Most peers connected at once.
    pub max_peers: usize,
    /// Most methods one peer may register.
    pub max_methods_per_peer: usize,
    /// Longest method or application name.
    pub max_name_len: usize,
    /// Most relayed calls one peer may have waiting.
    pub max_pending_calls: usize,
    /// Bytes of each context's delta log (a power of two).
    pub context_log: usize,
    /// Most contexts at once.
    pub max_contexts: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: 16 << 20,
            lane_capacity: 256 << 10,
            max_peers: 4096,
            max_methods_per_peer: 100_000,
            max_name_len: 1024,
            max_pending_calls: 100_000,
            context_log: 64 << 10,
            max_contexts: 100_000,
        }
    }
}

/// One message for one peer, with descriptors to attach (native peers only).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub msg: FromGateway,
    pub fds: Vec<Arc<OwnedFd>>,
}

/// A peer's outbound queue. Bounded: a peer that stops reading is disconnected rather than
/// letting the gateway's memory grow.
pub(crate) type PeerTx = mpsc::Sender<Outgoing>;

pub(super) struct Peer {
    pub(super) identity: Instance,
    pub(super) transport: Transport,
    methods: BTreeMap<u32, MethodDef>,
    /// Native peers' doorbell index in the directory.
    pub(super) doorbell: Option<u32>,
    /// What identity filters (bus `target`) match: the identity, plus the attributes a peer
    /// behind the gateway logged in with (a web peer's GW3 identity).
    pub(super) attributes: Value,
    tx: PeerTx,
    /// Relayed calls this peer has waiting.
    pending: usize,
}

struct LaneRec {
    id: u64,
    /// The peer writing ring 0.
    side0: PeerId,
    fd: Arc<OwnedFd>,
}

/// A call relayed through the gateway, waiting for the callee's answer.
struct Relayed {
    caller: PeerId,
    call: u64,
    callee: PeerId,
    deadline: Instant,
}

/// What the server loop must do after a registry call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Close this peer's connection (its queue overflowed or it misbehaved).
    Disconnect(PeerId, String),
}

/// What a new peer says about itself.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    pub application: String,
    pub instance: Option<String>,
    pub pid: u32,
    pub user: String,
    pub transport: Transport,
    /// More identity attributes (a map; `Null`: none), matched by identity filters.
    pub attributes: Value,
}

/// Peers, methods, lanes and relayed calls.
pub(crate) struct Registry {
    pub(super) limits: Limits,
    /// The doorbell directory every native peer maps, and its free indices.
    doorbells: Arc<OwnedFd>,
    free_doorbells: Vec<u32>,
    pub(super) peers: BTreeMap<PeerId, Peer>,
    lanes: HashMap<(PeerId, PeerId), LaneRec>,
    relayed: HashMap<u64, Relayed>,
    /// Shared contexts (see `contexts.rs`).
    pub(super) contexts: super::contexts::Contexts,
    /// Bus subscriptions (see `bus.rs`).
    pub(super) bus: super::bus::Bus,
    /// Channel definitions and restrictions (see `channels.rs`).
    pub(super) channels: super::channels::ChannelConfig,
    next_peer: u64,
    next_lane: u64,
    next_invocation: u64,
    machine: String,
    actions: Vec<Action>,
}

fn lane_key(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

fn relay_error(status: Status, message: impl Into<String>) -> RelayOutcome {
    RelayOutcome::Err {
        status,
        message: message.into(),
        context: Value::Null,
    }
}

impl Registry {
    pub(crate) fn new(limits: Limits) -> Result<Self, crate::shm::ShmError> {
        let n = limits.max_peers.clamp(1, crate::shm::MAX_DOORBELLS);
        let doorbells = Arc::new(shm::create_doorbells(n)?);
        Ok(Self {
            limits,
            doorbells,
            // Popped from the end: hand out low indices first.
            free_doorbells: (0..n as u32).rev().collect(),
            peers: BTreeMap::new(),
            lanes: HashMap::new(),
            relayed: HashMap::new(),
            contexts: Default::default(),
            bus: Default::default(),
            channels: Default::default(),
            next_peer: 1,
            next_lane: 1,
            next_invocation: 1,
            machine: crate::sys::identity::host_name(),
            actions: Vec::new(),
        })
    }

    /// Actions accumulated since the last call.
    /// Sets the channel definitions and restrictions.
    pub(crate) fn set_channels(&mut self, cfg: super::channels::ChannelConfig) {
        self.channels = cfg;
    }

    /// Takes a doorbell for the gateway's own use (the WebSocket bridge sleeps on it, and it is
    /// rung for context subscribers behind the gateway). Returns its index and the directory.
    pub(crate) fn reserve_doorbell(&mut self) -> Option<(u32, Arc<OwnedFd>)> {
        let i = self.free_doorbells.pop()?;
        self.contexts.relay_bell = Some(i);
        Some((i, self.doorbells.clone()))
    }

    pub(crate) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    pub(crate) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub(super) fn send(&mut self, to: PeerId, msg: FromGateway, fds: Vec<Arc<OwnedFd>>) {
        let Some(peer) = self.peers.get(&to) else {
            return;
        };
        if peer.tx.try_send(Outgoing { msg, fds }).is_err() {
            self.actions.push(Action::Disconnect(
                to,
                "outbound queue overflow: peer is not reading".into(),
            ));
        }
    }

    /// Peers that may see `of` (same user), excluding `of` itself.
    pub(super) fn audience(&self, of: PeerId) -> Vec<PeerId> {
        let Some(p) = self.peers.get(&of) else {
            return Vec::new();
        };
        let user = &p.identity.user;
        self.peers
            .iter()
            .filter(|(id, q)| **id != of && &q.identity.user == user)
            .map(|(id, _)| *id)
            .collect()
    }

    fn visible(&self, a: PeerId, b: PeerId) -> bool {
        match (self.peers.get(&a), self.peers.get(&b)) {
            (Some(x), Some(y)) => x.identity.user == y.identity.user,
            _ => false,
        }
    }

    /// Admits a native peer (from its hello and the kernel's credentials).
    pub(crate) fn hello(
        &mut self,
        cred: PeerCred,
        user: String,
        hello: Hello,
        tx: PeerTx,
    ) -> Result<PeerId, (Status, String)> {
        if hello.protocol != PROTOCOL_VERSION {
            return Err((
                Status::Protocol,
                format!(
                    "protocol version {} not supported (gateway speaks {PROTOCOL_VERSION})",
                    hello.protocol
                ),
            ));
        }
        let adm = Admission {
            application: hello.application,
            instance: hello.instance,
            pid: cred.pid,
            user,
            transport: hello.transport,
            attributes: Value::Null,
        };
        self.admit(adm, tx).map(|(id, _)| id)
    }

    /// Admits a peer. It is sent its `Welcome` (the snapshot of every peer it can see, which is
    /// also returned), and everyone who can see it a `PeerAdded`. Native peers get a doorbell.
    pub(crate) fn admit(
        &mut self,
        adm: Admission,
        tx: PeerTx,
    ) -> Result<(PeerId, Welcome), (Status, String)> {
        let max = self.limits.max_name_len;
        if adm.application.trim().is_empty() || adm.application.len() > max {
            return Err((
                Status::InvalidArgument,
                format!("application name must be 1..={max} bytes"),
            ));
        }
        if self.peers.len() >= self.limits.max_peers {
            return Err((
                Status::Busy,
                format!("gateway full ({} peers)", self.limits.max_peers),
            ));
        }
        let id = PeerId(self.next_peer);
        let instance = match adm.instance {
            Some(i) if !i.is_empty() => {
                if i.len() > max {
                    return Err((Status::InvalidArgument, "instance id too long".into()));
                }
                if self.peers.values().any(|p| p.identity.instance == i) {
                    return Err((
                        Status::AlreadyExists,
                        format!("instance {i:?} is already connected"),
                    ));
                }
                i
            }
            _ => format!("{}-{}-{}", adm.application, adm.pid, id.0),
        };
        self.ensure_channels(&adm.user);
        let doorbell = match adm.transport {
            Transport::Shm => Some(
                self.free_doorbells
                    .pop()
                    .ok_or((Status::Busy, "no free doorbell".to_string()))?,
            ),
            Transport::Relay => None,
        };
        self.next_peer += 1;
        let identity = Instance {
            application: adm.application,
            instance,
            pid: adm.pid,
            user: adm.user,
            machine: self.machine.clone(),
            peer_id: id,
        };
        let peers = self
            .peers
            .values()
            .filter(|p| p.identity.user == identity.user)
            .map(|p| PeerSnapshot {
                identity: p.identity.clone(),
                transport: p.transport,
                methods: p
                    .methods
                    .iter()
                    .map(|(id, def)| MethodSpec {
                        id: *id,
                        def: def.clone(),
                    })
                    .collect(),
            })
            .collect();
        let mut attributes = identity.to_value();
        if let (Value::Map(all), Value::Map(extra)) = (&mut attributes, adm.attributes) {
            for (k, v) in extra {
                all.entry(k).or_insert(v);
            }
        }
        self.peers.insert(
            id,
            Peer {
                identity: identity.clone(),
                transport: adm.transport,
                attributes,
                methods: BTreeMap::new(),
                doorbell,
                tx,
                pending: 0,
            },
        );
        let welcome = Welcome {
            protocol: PROTOCOL_VERSION,
            identity: identity.clone(),
            max_payload: self.limits.max_payload,
            lane_capacity: self.limits.lane_capacity as u32,
            peers,
            gateway_pid: crate::sys::identity::pid(),
            doorbell: doorbell.unwrap_or(u32::MAX),
            contexts: self.contexts.visible_to(&identity.user),
            bus: {
                let same_user: Vec<PeerId> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.identity.user == identity.user)
                    .map(|(id, _)| *id)
                    .collect();
                self.bus.of_peers(&same_user)
            },
            context_owners: self.contexts.owners_visible_to(&identity.user),
        };
        let fds = if doorbell.is_some() {
            vec![self.doorbells.clone()]
        } else {
            Vec::new()
        };
        self.send(id, FromGateway::Welcome(welcome.clone()), fds);
        for other in self.audience(id) {
            let msg = FromGateway::PeerAdded {
                identity: identity.clone(),
                transport: adm.transport,
            };
            self.send(other, msg, Vec::new());
        }
        Ok((id, welcome))
    }

    pub(super) fn fail(&mut self, to: PeerId, req: u64, status: Status, message: String) {
        self.send(
            to,
            FromGateway::Fail {
                req,
                status,
                message,
            },
            Vec::new(),
        );
    }

    /// Adds methods to a peer; acknowledges, and announces them to the peer's audience.
    pub(crate) fn register(&mut self, from: PeerId, req: u64, methods: Vec<MethodSpec>) {
        let Some(peer) = self.peers.get(&from) else {
            return;
        };
        let mut seen_ids = std::collections::HashSet::new();
        let mut seen_names = std::collections::HashSet::new();
        let max = self.limits.max_name_len;
        for m in &methods {
            let err = if m.def.name.is_empty() || m.def.name.len() > max {
                Some((
                    Status::InvalidArgument,
                    format!("method name must be 1..={max} bytes"),
                ))
            } else if peer.methods.contains_key(&m.id) || !seen_ids.insert(m.id) {
                Some((
                    Status::AlreadyExists,
                    format!("method id {} is already registered", m.id),
                ))
            } else if peer.methods.values().any(|d| d.name == m.def.name)
                || !seen_names.insert(m.def.name.clone())
            {
                Some((
                    Status::AlreadyExists,
                    format!(
                        "A method with the name \"{}\" already exists! Please, provide a unique name for the method.",
                        m.def.name
                    ),
                ))
            } else {
                None
            };
            if let Some((status, message)) = err {
                return self.fail(from, req, status, message);
            }
        }
        if peer.methods.len() + methods.len() > self.limits.max_methods_per_peer {
            let max = self.limits.max_methods_per_peer;
            return self.fail(
                from,
                req,
                Status::Busy,
                format!("at most {max} methods per peer"),
            );
        }
        let peer = self.peers.get_mut(&from).expect("checked above");
        for m in &methods {
            peer.methods.insert(m.id, m.def.clone());
        }
        self.send(from, FromGateway::Ack { req }, Vec::new());
        let msg = FromGateway::MethodsAdded {
            peer: from,
            methods,
        };
        for other in self.audience(from) {
            self.send(other, msg.clone(), Vec::new());
        }
    }

    /// Removes methods of a peer.
    pub(crate) fn unregister(&mut self, from: PeerId, req: u64, ids: Vec<u32>) {
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        if let Some(bad) = ids.iter().find(|id| !peer.methods.contains_key(id)) {
            let msg = format!("method id {bad} is not registered by this peer");
            return self.fail(from, req, Status::NotFound, msg);
        }
        for id in &ids {
            peer.methods.remove(id);
        }
        self.send(from, FromGateway::Ack { req }, Vec::new());
        let msg = FromGateway::MethodsRemoved { peer: from, ids };
        for other in self.audience(from) {
            self.send(other, msg.clone(), Vec::new());
        }
    }

    /// Brokers a lane between `from` and `to` (or hands out the existing one).
    pub(crate) fn open_lane(&mut self, from: PeerId, req: u64, to: PeerId) {
        if from == to {
            let msg = "a peer needs no lane to itself".into();
            return self.fail(from, req, Status::InvalidArgument, msg);
        }
        if !self.visible(from, to) {
            return self.fail(
                from,
                req,
                Status::NotFound,
                format!("Unable to find peer with id {to}"),
            );
        }
        let (Some(from_bell), Some(to_bell)) =
            (self.peers[&from].doorbell, self.peers[&to].doorbell)
        else {
            let msg = format!("{to} is reached through the gateway, not over a lane");
            return self.fail(from, req, Status::InvalidArgument, msg);
        };
        let key = lane_key(from, to);
        if !self.lanes.contains_key(&key) {
            let fd = match shm::create_lane(self.limits.lane_capacity) {
                Ok(fd) => fd,
                Err(e) => return self.fail(from, req, Status::Internal, format!("lane: {e}")),
            };
            let id = self.next_lane;
            self.next_lane += 1;
            let rec = LaneRec {
                id,
                side0: from,
                fd: Arc::new(fd),
            };
            let offer = FromGateway::LaneOffered {
                peer: from,
                lane: id,
                side: 1,
                peer_doorbell: from_bell,
            };
            let lane_fd = rec.fd.clone();
            self.lanes.insert(key, rec);
            self.send(to, offer, vec![lane_fd]);
        }
        let rec = &self.lanes[&key];
        let side = if rec.side0 == from { 0 } else { 1 };
        let msg = FromGateway::LaneOpened {
            req,
            peer: to,
            lane: rec.id,
            side,
            peer_doorbell: to_bell,
        };
        let fds = vec![rec.fd.clone()];
        self.send(from, msg, fds);
    }

    /// `from` found the lane to `other` corrupt: forget the lane and tell `other`.
    pub(crate) fn lane_fault(&mut self, from: PeerId, other: PeerId, reason: &str) {
        crate::log::warn(format_args!(
            "{from} reports a corrupt lane from {other}: {reason}"
        ));
        if let Some(rec) = self.lanes.remove(&lane_key(from, other)) {
            let msg = FromGateway::LaneClosed {
                peer: from,
                lane: rec.id,
                reason: reason.to_string(),
            };
            self.send(other, msg, Vec::new());
        }
    }

    /// Relays a call from `from` to `peer`'s method (for peers without a lane between them).
    pub(crate) fn call(
        &mut self,
        from: PeerId,
        call: u64,
        peer: PeerId,
        method_id: u32,
        args: Value,
        timeout_ms: u32,
    ) {
        let outcome = if !self.peers.contains_key(&peer) {
            Some(relay_error(
                Status::PeerLeft,
                format!("Unable to find peer with id {peer}"),
            ))
        } else if !self.visible(from, peer) {
            Some(relay_error(
                Status::PermissionDenied,
                "Unable to invoke methods across different users",
            ))
        } else if !self.peers[&peer].methods.contains_key(&method_id) {
            Some(relay_error(
                Status::NotFound,
                format!("Unable to find method with id {method_id}"),
            ))
        } else if self.peers[&from].pending >= self.limits.max_pending_calls {
            Some(relay_error(
                Status::Busy,
                "too many calls waiting for an answer",
            ))
        } else {
            None
        };
        if let Some(outcome) = outcome {
            return self.send(from, FromGateway::CallResult { call, outcome }, Vec::new());
        }
        let invocation = self.next_invocation;
        self.next_invocation += 1;
        // The caller times out on its own; this only bounds how long we remember the call.
        let deadline =
            Instant::now() + Duration::from_millis(timeout_ms as u64) + Duration::from_secs(5);
        self.relayed.insert(
            invocation,
            Relayed {
                caller: from,
                call,
                callee: peer,
                deadline,
            },
        );
        if let Some(p) = self.peers.get_mut(&from) {
            p.pending += 1;
        }
        self.send(
            peer,
            FromGateway::Invoke {
                invocation,
                caller: from,
                method_id,
                args,
            },
            Vec::new(),
        );
    }

    /// The callee's answer to a relayed call.
    pub(crate) fn yield_(&mut self, from: PeerId, invocation: u64, outcome: RelayOutcome) {
        // Only the callee may answer; anything else is ignored.
        if self
            .relayed
            .get(&invocation)
            .is_none_or(|r| r.callee != from)
        {
            return;
        }
        if let Some(r) = self.relayed.remove(&invocation) {
            self.finish(r, outcome);
        }
    }

    fn finish(&mut self, r: Relayed, outcome: RelayOutcome) {
        if let Some(p) = self.peers.get_mut(&r.caller) {
            p.pending = p.pending.saturating_sub(1);
        }
        self.send(
            r.caller,
            FromGateway::CallResult {
                call: r.call,
                outcome,
            },
            Vec::new(),
        );
    }

    /// Relays a data-plane record between two peers that have no lane (one is behind the
    /// gateway). Dropped when the destination is gone or invisible.
    pub(crate) fn relay_record(&mut self, from: PeerId, to: PeerId, kind: u16, body: Vec<u8>) {
        if self.visible(from, to) {
            self.send(to, FromGateway::Record { from, kind, body }, Vec::new());
        }
    }

    /// Forgets relayed calls long past their deadline (their callers gave up already).
    pub(crate) fn expire(&mut self, now: Instant) {
        let old: Vec<u64> = self
            .relayed
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            if let Some(r) = self.relayed.remove(&k) {
                self.finish(r, relay_error(Status::Timeout, "no answer from the method"));
            }
        }
    }

    /// Removes a peer: its methods, lanes and relayed calls go, and everyone who could see it is
    /// told. Calls relayed to it fail with "peer has left".
    pub(crate) fn remove(&mut self, id: PeerId, reason: &str) {
        let audience = self.audience(id);
        self.contexts_peer_left(id);
        self.bus_peer_left(id, &audience);
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        self.lanes.retain(|(a, b), _| *a != id && *b != id);
        let orphaned: Vec<u64> = self
            .relayed
            .iter()
            .filter(|(_, r)| r.callee == id || r.caller == id)
            .map(|(k, _)| *k)
            .collect();
        for k in orphaned {
            if let Some(r) = self.relayed.remove(&k) {
                if r.callee == id {
                    self.finish(
                        r,
                        relay_error(Status::PeerLeft, "Peer has left while waiting for result"),
                    );
                }
            }
        }
        let ids: Vec<u32> = peer.methods.keys().copied().collect();
        for other in audience {
            if !ids.is_empty() {
                self.send(
                    other,
                    FromGateway::MethodsRemoved {
                        peer: id,
                        ids: ids.clone(),
                    },
                    Vec::new(),
                );
            }
            let msg = FromGateway::PeerRemoved {
                peer: id,
                reason: reason.to_string(),
            };
            self.send(other, msg, Vec::new());
        }
    }

    /// Tells every peer the gateway is stopping.
    pub(crate) fn shutdown(&mut self, reason: &str) {
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.send(
                id,
                FromGateway::Shutdown {
                    reason: reason.to_string(),
                },
                Vec::new(),
            );
        }
    }

    #[cfg(test)]
    pub(crate) fn lane_count(&self) -> usize {
        self.lanes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<(FromGateway, usize)> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            out.push((o.msg, o.fds.len()));
        }
        out
    }

    fn join_web(reg: &mut Registry, app: &str, user: &str) -> (PeerId, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(1024);
        let adm = Admission {
            application: app.into(),
            instance: None,
            pid: 0,
            user: user.into(),
            transport: Transport::Relay,
            attributes: Value::Null,
        };
        let (id, _) = reg.admit(adm, tx).unwrap();
        (id, rx)
    }

    fn hello(app: &str) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            application: app.into(),
            instance: None,
            api: "test".into(),
            transport: Transport::Shm,
        }
    }

    fn join(reg: &mut Registry, app: &str, user: &str) -> (PeerId, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(1024);
        let id = reg
            .hello(PeerCred { pid: 42, uid: 1 }, user.into(), hello(app), tx)
            .unwrap();
        (id, rx)
    }

    fn spec(id: u32, name: &str) -> MethodSpec {
        MethodSpec {
            id,
            def: MethodDef::new(name),
        }
    }

    #[test]
    fn welcome_replays_peers_and_methods_and_others_hear_of_the_newcomer() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        reg.register(a, 1, vec![spec(1, "Sum")]);
        let (b, mut rb) = join(&mut reg, "B", "u");
        let msgs = recv(&mut rb);
        match &msgs[0] {
            (FromGateway::Welcome(w), 1) => {
                assert_eq!(w.identity.peer_id, b);
                assert_eq!(w.peers.len(), 1);
                assert_eq!(w.peers[0].methods[0].def.name, "Sum");
            }
            other => panic!("{other:?}"),
        }
        let msgs = recv(&mut ra);
        assert!(matches!(msgs[0].0, FromGateway::Welcome(_)));
        assert!(matches!(msgs[1].0, FromGateway::Ack { req: 1 }));
        assert!(
            matches!(&msgs[2].0, FromGateway::PeerAdded { identity, .. } if identity.peer_id == b)
        );
    }

    #[test]
    fn users_do_not_see_each_other() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (a, mut ra) = join(&mut reg, "A", "alice");
        let (b, mut rb) = join(&mut reg, "B", "bob");
        reg.register(b, 1, vec![spec(1, "Secret")]);
        recv(&mut rb);
        let msgs = recv(&mut ra);
        assert_eq!(msgs.len(), 1, "alice saw {msgs:?}");
        reg.open_lane(a, 9, b);
        let msgs = recv(&mut ra);
        assert!(matches!(
            msgs[0].0,
            FromGateway::Fail {
                req: 9,
                status: Status::NotFound,
                ..
            }
        ));
    }

    #[test]
    fn duplicate_method_names_are_refused() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        reg.register(a, 1, vec![spec(1, "Sum")]);
        reg.register(a, 2, vec![spec(2, "Sum")]);
        reg.register(a, 3, vec![spec(3, "X"), spec(4, "X")]);
        reg.register(a, 4, vec![spec(1, "Other")]);
        let msgs = recv(&mut ra);
        assert!(matches!(msgs[1].0, FromGateway::Ack { req: 1 }));
        for (i, m) in msgs[2..].iter().enumerate() {
            assert!(
                matches!(
                    m.0,
                    FromGateway::Fail {
                        status: Status::AlreadyExists,
                        ..
                    }
                ),
                "{i}: {m:?}"
            );
        }
    }

    #[test]
    fn lanes_are_brokered_once_per_pair() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        let (b, mut rb) = join(&mut reg, "B", "u");
        recv(&mut ra);
        recv(&mut rb);
        reg.open_lane(a, 1, b);
        reg.open_lane(b, 2, a);
        assert_eq!(reg.lane_count(), 1);
        let ma = recv(&mut ra);
        let mb = recv(&mut rb);
        assert!(matches!(
            ma[0],
            (
                FromGateway::LaneOpened {
                    req: 1,
                    side: 0,
                    ..
                },
                1
            )
        ));
        assert!(matches!(
            mb[0],
            (FromGateway::LaneOffered { side: 1, .. }, 1)
        ));
        assert!(matches!(
            mb[1],
            (
                FromGateway::LaneOpened {
                    req: 2,
                    side: 1,
                    ..
                },
                1
            )
        ));
        reg.open_lane(a, 3, a);
        assert!(matches!(
            recv(&mut ra)[0].0,
            FromGateway::Fail {
                status: Status::InvalidArgument,
                ..
            }
        ));
    }

    #[test]
    fn removing_a_peer_removes_its_methods_and_lanes_and_tells_everyone() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        let (b, mut rb) = join(&mut reg, "B", "u");
        reg.register(b, 1, vec![spec(1, "M"), spec(2, "N")]);
        reg.open_lane(a, 1, b);
        recv(&mut ra);
        recv(&mut rb);
        reg.remove(b, "peer has left");
        assert_eq!(reg.lane_count(), 0);
        let msgs = recv(&mut ra);
        assert!(
            matches!(&msgs[0].0, FromGateway::MethodsRemoved { peer, ids } if *peer == b && ids.len() == 2)
        );
        assert!(matches!(&msgs[1].0, FromGateway::PeerRemoved { peer, .. } if *peer == b));
        assert_eq!(reg.peer_count(), 1);
    }

    #[test]
    fn a_peer_that_does_not_read_is_disconnected() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (tx, _rx) = mpsc::channel(2);
        let slow = reg
            .hello(PeerCred { pid: 1, uid: 1 }, "u".into(), hello("slow"), tx)
            .unwrap();
        for i in 0..3 {
            join(&mut reg, &format!("n{i}"), "u");
        }
        assert!(reg.take_actions().contains(&Action::Disconnect(
            slow,
            "outbound queue overflow: peer is not reading".into()
        )));
    }

    #[test]
    fn bad_hellos_are_refused() {
        let mut reg = Registry::new(Limits {
            max_peers: 1,
            ..Limits::default()
        })
        .unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let mut h = hello("A");
        h.protocol = 99;
        assert_eq!(
            reg.hello(PeerCred { pid: 1, uid: 1 }, "u".into(), h, tx.clone())
                .unwrap_err()
                .0,
            Status::Protocol
        );
        assert_eq!(
            reg.hello(
                PeerCred { pid: 1, uid: 1 },
                "u".into(),
                hello(" "),
                tx.clone()
            )
            .unwrap_err()
            .0,
            Status::InvalidArgument
        );
        let mut h = hello("A");
        h.instance = Some("one".into());
        reg.hello(
            PeerCred { pid: 1, uid: 1 },
            "u".into(),
            h.clone(),
            tx.clone(),
        )
        .unwrap();
        assert_eq!(
            reg.hello(PeerCred { pid: 1, uid: 1 }, "u".into(), hello("B"), tx)
                .unwrap_err()
                .0,
            Status::Busy
        );
    }

    #[test]
    fn relayed_calls_reach_the_callee_and_answers_reach_the_caller() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (native, mut rn) = join(&mut reg, "native", "u");
        let (web, mut rw) = join_web(&mut reg, "web", "u");
        reg.register(web, 1, vec![spec(7, "WebSum")]);
        recv(&mut rn);
        let msgs = recv(&mut rw);
        match &msgs[0].0 {
            FromGateway::Welcome(w) => assert_eq!(w.peers[0].transport, Transport::Shm),
            other => panic!("{other:?}"),
        }
        assert_eq!(msgs[0].1, 0, "web peers get no doorbell directory");
        reg.call(native, 11, web, 7, Value::from(5), 1000);
        let invocation = match recv(&mut rw).remove(0).0 {
            FromGateway::Invoke {
                invocation,
                caller,
                method_id: 7,
                args,
            } => {
                assert_eq!(caller, native);
                assert_eq!(args, Value::from(5));
                invocation
            }
            other => panic!("{other:?}"),
        };
        // Only the callee may answer.
        reg.yield_(native, invocation, RelayOutcome::Ok(Value::from(0)));
        assert!(recv(&mut rn).is_empty());
        reg.yield_(web, invocation, RelayOutcome::Ok(Value::from(6)));
        match recv(&mut rn).remove(0).0 {
            FromGateway::CallResult {
                call: 11,
                outcome: RelayOutcome::Ok(v),
            } => assert_eq!(v, Value::from(6)),
            other => panic!("{other:?}"),
        }
        // A lane to a web peer is refused.
        reg.open_lane(native, 3, web);
        assert!(matches!(
            recv(&mut rn)[0].0,
            FromGateway::Fail {
                status: Status::InvalidArgument,
                ..
            }
        ));
    }

    #[test]
    fn relayed_calls_fail_when_the_callee_leaves_or_is_invisible() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        let (w, _rw) = join_web(&mut reg, "W", "u");
        let (x, _rx) = join_web(&mut reg, "X", "other");
        reg.register(w, 1, vec![spec(1, "M")]);
        reg.register(x, 1, vec![spec(1, "M")]);
        recv(&mut ra);
        reg.call(a, 1, w, 1, Value::Null, 1000);
        reg.remove(w, "peer has left");
        let msgs = recv(&mut ra);
        assert!(msgs.iter().any(|(m, _)| matches!(
            m,
            FromGateway::CallResult {
                call: 1,
                outcome: RelayOutcome::Err {
                    status: Status::PeerLeft,
                    ..
                }
            }
        )));
        reg.call(a, 2, x, 1, Value::Null, 1000);
        assert!(matches!(
            &recv(&mut ra)[0].0,
            FromGateway::CallResult {
                call: 2,
                outcome: RelayOutcome::Err {
                    status: Status::PermissionDenied,
                    ..
                }
            }
        ));
        reg.call(a, 3, PeerId(999), 1, Value::Null, 1000);
        assert!(matches!(
            &recv(&mut ra)[0].0,
            FromGateway::CallResult {
                call: 3,
                outcome: RelayOutcome::Err {
                    status: Status::PeerLeft,
                    ..
                }
            }
        ));
    }

    #[test]
    fn relayed_calls_are_forgotten_after_their_deadline() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        let (w, _rw) = join_web(&mut reg, "W", "u");
        reg.register(w, 1, vec![spec(1, "M")]);
        recv(&mut ra);
        reg.call(a, 5, w, 1, Value::Null, 0);
        reg.expire(Instant::now() + Duration::from_secs(60));
        assert!(matches!(
            &recv(&mut ra)[0].0,
            FromGateway::CallResult {
                call: 5,
                outcome: RelayOutcome::Err {
                    status: Status::Timeout,
                    ..
                }
            }
        ));
        assert!(reg.relayed.is_empty());
    }
}
