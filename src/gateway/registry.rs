//! The gateway's state: peers, their methods, the lanes between them. A state machine driven by
//! the server loop; it owns no sockets, only each peer's outbound queue, so it is tested
//! without I/O.

use crate::shm;
use crate::status::Status;
use crate::sys::identity::PeerCred;
use crate::wire::frame::{
    encode_frame, FromGateway, Hello, Instance, MethodDef, MethodSpec, PeerId, PeerSnapshot,
    Welcome, PROTOCOL_VERSION,
};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: 16 << 20,
            lane_capacity: 256 << 10,
            max_peers: 4096,
            max_methods_per_peer: 100_000,
            max_name_len: 1024,
        }
    }
}

/// One frame for one peer, with descriptors to attach.
pub(crate) struct Outgoing {
    pub frame: Vec<u8>,
    pub fds: Vec<Arc<OwnedFd>>,
}

/// A peer's outbound queue. Bounded: a peer that stops reading its control socket is
/// disconnected rather than letting the gateway's memory grow.
pub(crate) type PeerTx = mpsc::Sender<Outgoing>;

struct Peer {
    identity: Instance,
    methods: BTreeMap<u32, MethodDef>,
    doorbell: Arc<OwnedFd>,
    tx: PeerTx,
}

struct LaneRec {
    id: u64,
    /// The peer writing ring 0.
    side0: PeerId,
    fd: Arc<OwnedFd>,
}

/// What the server loop must do after a registry call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Close this peer's connection (its queue overflowed or it misbehaved).
    Disconnect(PeerId, String),
}

/// Peers, methods and lanes.
pub(crate) struct Registry {
    limits: Limits,
    peers: BTreeMap<PeerId, Peer>,
    lanes: HashMap<(PeerId, PeerId), LaneRec>,
    next_peer: u64,
    next_lane: u64,
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

impl Registry {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            peers: BTreeMap::new(),
            lanes: HashMap::new(),
            next_peer: 1,
            next_lane: 1,
            machine: crate::sys::identity::host_name(),
            actions: Vec::new(),
        }
    }

    /// Actions accumulated since the last call.
    pub(crate) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    pub(crate) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    fn send(&mut self, to: PeerId, msg: &FromGateway, fds: Vec<Arc<OwnedFd>>) {
        let Some(peer) = self.peers.get(&to) else {
            return;
        };
        let frame = match encode_frame(msg, fds.len()) {
            Ok(f) => f,
            Err(e) => {
                crate::log::warn(format_args!("cannot encode a frame for {to}: {e}"));
                return;
            }
        };
        if peer.tx.try_send(Outgoing { frame, fds }).is_err() {
            self.actions.push(Action::Disconnect(
                to,
                "control queue overflow: peer is not reading".into(),
            ));
        }
    }

    /// Peers that may see `of` (same user), excluding `of` itself.
    fn audience(&self, of: PeerId) -> Vec<PeerId> {
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

    /// Admits a peer. On success the peer has been sent its `Welcome` and everyone who can see
    /// it a `PeerAdded`.
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
        if hello.application.trim().is_empty() || hello.application.len() > self.limits.max_name_len
        {
            return Err((
                Status::InvalidArgument,
                "application name must be 1..=1024 bytes".into(),
            ));
        }
        if self.peers.len() >= self.limits.max_peers {
            return Err((
                Status::Busy,
                format!("gateway full ({} peers)", self.limits.max_peers),
            ));
        }
        let id = PeerId(self.next_peer);
        let instance = match hello.instance {
            Some(i) if !i.is_empty() => {
                if i.len() > self.limits.max_name_len {
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
            _ => format!("{}-{}-{}", hello.application, cred.pid, id.0),
        };
        let doorbell =
            shm::create_doorbell().map_err(|e| (Status::Internal, format!("doorbell: {e}")))?;
        self.next_peer += 1;
        let identity = Instance {
            application: hello.application,
            instance,
            pid: cred.pid,
            user,
            machine: self.machine.clone(),
            peer_id: id,
        };
        let peers = self
            .peers
            .values()
            .filter(|p| p.identity.user == identity.user)
            .map(|p| PeerSnapshot {
                identity: p.identity.clone(),
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
        let doorbell = Arc::new(doorbell);
        self.peers.insert(
            id,
            Peer {
                identity: identity.clone(),
                methods: BTreeMap::new(),
                doorbell: doorbell.clone(),
                tx,
            },
        );
        let welcome = FromGateway::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            identity: identity.clone(),
            max_payload: self.limits.max_payload,
            lane_capacity: self.limits.lane_capacity as u32,
            peers,
            gateway_pid: crate::sys::identity::pid(),
        });
        self.send(id, &welcome, vec![doorbell]);
        for other in self.audience(id) {
            self.send(
                other,
                &FromGateway::PeerAdded {
                    identity: identity.clone(),
                },
                Vec::new(),
            );
        }
        Ok(id)
    }

    fn fail(&mut self, to: PeerId, req: u64, status: Status, message: String) {
        self.send(
            to,
            &FromGateway::Fail {
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
        for m in &methods {
            let err = if m.def.name.is_empty() || m.def.name.len() > self.limits.max_name_len {
                Some((
                    Status::InvalidArgument,
                    "method name must be 1..=1024 bytes".to_string(),
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
        self.send(from, &FromGateway::Ack { req }, Vec::new());
        let msg = FromGateway::MethodsAdded {
            peer: from,
            methods,
        };
        for other in self.audience(from) {
            self.send(other, &msg, Vec::new());
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
        self.send(from, &FromGateway::Ack { req }, Vec::new());
        let msg = FromGateway::MethodsRemoved { peer: from, ids };
        for other in self.audience(from) {
            self.send(other, &msg, Vec::new());
        }
    }

    /// Brokers a lane between `from` and `to` (or hands out the existing one).
    pub(crate) fn open_lane(&mut self, from: PeerId, req: u64, to: PeerId) {
        if from == to {
            return self.fail(
                from,
                req,
                Status::InvalidArgument,
                "a peer needs no lane to itself".into(),
            );
        }
        if !self.visible(from, to) {
            return self.fail(
                from,
                req,
                Status::NotFound,
                format!("Unable to find peer with id {to}"),
            );
        }
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
            let to_bell = self.peers[&from].doorbell.clone();
            let offer = FromGateway::LaneOffered {
                peer: from,
                lane: id,
                side: 1,
            };
            let lane_fd = rec.fd.clone();
            self.lanes.insert(key, rec);
            self.send(to, &offer, vec![lane_fd, to_bell]);
        }
        let rec = &self.lanes[&key];
        let side = if rec.side0 == from { 0 } else { 1 };
        let msg = FromGateway::LaneOpened {
            req,
            peer: to,
            lane: rec.id,
            side,
        };
        let fds = vec![rec.fd.clone(), self.peers[&to].doorbell.clone()];
        self.send(from, &msg, fds);
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
            self.send(other, &msg, Vec::new());
        }
    }

    /// Removes a peer: its methods and lanes go, and everyone who could see it is told.
    pub(crate) fn remove(&mut self, id: PeerId, reason: &str) {
        let audience = self.audience(id);
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        self.lanes.retain(|(a, b), _| *a != id && *b != id);
        let ids: Vec<u32> = peer.methods.keys().copied().collect();
        for other in audience {
            if !ids.is_empty() {
                self.send(
                    other,
                    &FromGateway::MethodsRemoved {
                        peer: id,
                        ids: ids.clone(),
                    },
                    Vec::new(),
                );
            }
            self.send(
                other,
                &FromGateway::PeerRemoved {
                    peer: id,
                    reason: reason.to_string(),
                },
                Vec::new(),
            );
        }
    }

    /// Tells every peer the gateway is stopping.
    pub(crate) fn shutdown(&mut self, reason: &str) {
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.send(
                id,
                &FromGateway::Shutdown {
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
    use crate::wire::frame::{decode_body, FrameReader};

    fn recv(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<(FromGateway, usize)> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            let mut r = FrameReader::default();
            r.push_bytes(&o.frame);
            // Descriptors are attached out of band; the test only counts them.
            let n = o.fds.len();
            r.push_fds(o.fds.iter().map(|f| f.try_clone().unwrap()));
            let (body, _) = r.next_frame().unwrap().unwrap();
            out.push((decode_body(&body).unwrap(), n));
        }
        out
    }

    fn hello(app: &str) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            application: app.into(),
            instance: None,
            api: "test".into(),
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
        let mut reg = Registry::new(Limits::default());
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
        assert!(matches!(&msgs[2].0, FromGateway::PeerAdded { identity } if identity.peer_id == b));
    }

    #[test]
    fn users_do_not_see_each_other() {
        let mut reg = Registry::new(Limits::default());
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
        let mut reg = Registry::new(Limits::default());
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
        let mut reg = Registry::new(Limits::default());
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
                2
            )
        ));
        assert!(matches!(
            mb[0],
            (FromGateway::LaneOffered { side: 1, .. }, 2)
        ));
        assert!(matches!(
            mb[1],
            (
                FromGateway::LaneOpened {
                    req: 2,
                    side: 1,
                    ..
                },
                2
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
        let mut reg = Registry::new(Limits::default());
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
        let mut reg = Registry::new(Limits::default());
        let (tx, _rx) = mpsc::channel(2);
        let slow = reg
            .hello(PeerCred { pid: 1, uid: 1 }, "u".into(), hello("slow"), tx)
            .unwrap();
        for i in 0..3 {
            join(&mut reg, &format!("n{i}"), "u");
        }
        assert!(reg.take_actions().contains(&Action::Disconnect(
            slow,
            "control queue overflow: peer is not reading".into()
        )));
    }

    #[test]
    fn bad_hellos_are_refused() {
        let mut reg = Registry::new(Limits {
            max_peers: 1,
            ..Limits::default()
        });
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
}
