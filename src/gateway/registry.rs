//! The gateway's state: peers, their methods, the lanes between them, relayed calls. A state
//! machine driven by the server loop; it owns no sockets, only each peer's outbound queue of
//! typed notices (a native peer's writer encodes them as frames, the WebSocket bridge translates
//! them to GW3), so it is tested without I/O.

use crate::model::policy::{Action as PolicyAction, PeerRules, Policy, Who};
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
    /// Most bus subscriptions one peer may hold.
    pub max_bus_subs_per_peer: usize,
    /// Bytes of each context's delta log (a power of two).
    pub context_log: usize,
    /// Most contexts at once (also bounded by the descriptors and memory mappings the process
    /// may have: an eighth of each is kept for everything else).
    pub max_contexts: usize,
    /// Most contexts one user may have (the users a bridge logs in share a gateway: one must
    /// not be able to take every context, and descriptor, from the others); never more than
    /// seven eighths of the contexts there is room for.
    pub max_contexts_per_user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: 16 << 20,
            lane_capacity: 256 << 10,
            max_peers: 4096,
            max_methods_per_peer: 100_000,
            max_name_len: crate::model::MAX_NAME_LEN,
            max_pending_calls: 100_000,
            max_bus_subs_per_peer: 100_000,
            context_log: 64 << 10,
            max_contexts: 100_000,
            max_contexts_per_user: 50_000,
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
    /// The ids of `methods` by name (names are unique per peer): a registration checks each new
    /// name without scanning what the peer already holds.
    method_names: HashMap<String, u32>,
    /// Native peers' doorbell index in the directory.
    pub(super) doorbell: Option<u32>,
    /// What a bus `target` from a web publisher is matched against: this peer's identity as
    /// web peers see it (the GW3 identity the bridge announces; for a native peer, the GW3
    /// form of its identity). A native publisher's target is matched against
    /// `seen_by_native`, the identity as native peers see it. See [`Peer::seen_by`].
    seen_by_web: Value,
    seen_by_native: Value,
    /// Whether it is a web peer (it logged in with a GW3 identity).
    pub(super) web: bool,
    tx: PeerTx,
    /// Relayed calls this peer has waiting, in all and per callee.
    pending: usize,
    pending_on: HashMap<PeerId, usize>,
    /// What the policy lets it do.
    pub(super) rules: Arc<PeerRules>,
    /// Lane faults this peer reported that disconnected the accused (see `lane_fault`).
    accusations: u32,
    /// Its queue overflowed: it is being disconnected, and nothing more is queued for it (one
    /// `Disconnect`, one log line, however many messages it would have missed).
    overflowed: bool,
}

/// Takes one off `key`'s count, forgetting keys that reach zero (so the map holds only what
/// is held).
pub(super) fn count_down(counts: &mut HashMap<PeerId, usize>, key: PeerId) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

impl Peer {
    /// One of its relayed calls to `callee` was answered (or failed).
    fn answered(&mut self, callee: PeerId) {
        self.pending = self.pending.saturating_sub(1);
        count_down(&mut self.pending_on, callee);
    }

    /// Its identity as `viewer` sees it (a web peer sees the GW3 form): what a bus `target`
    /// from `viewer` is matched against, key by key.
    pub(super) fn seen_by(&self, viewer: &Peer) -> &Value {
        if viewer.web {
            &self.seen_by_web
        } else {
            &self.seen_by_native
        }
    }
}

/// Lane faults by one peer that disconnect the accused; later ones only drop the lane.
const MAX_ACCUSATIONS: u32 = 8;

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
    /// This peer's queue is closed: its connection is already ending (its `Closed` event is on
    /// the way). Closed again to be sure, without the warning a misbehaving peer gets.
    Ending(PeerId),
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
    /// Our own mapping of it: slots are reset before they are handed out again.
    bells: shm::DoorbellSegment,
    /// Free slots, taken from the end; freed slots go to the front, so a slot is reused as
    /// late as possible (a notifier that has not yet heard of its owner's death only causes a
    /// spurious wake-up).
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
    /// Access control (see `model::policy`).
    policy: Policy,
    /// The keeper and what adoption left behind (see `keep.rs`).
    pub(super) keep: super::keep::Keep,
    pub(super) next_peer: u64,
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

/// Who refused something, as a denial's log line names it.
#[derive(Clone, Copy)]
pub(super) enum DeniedBy<'a> {
    /// The gateway itself.
    Gateway,
    /// The offender's own library, whose mapping of the context is read-only (it reported it).
    ReadOnlyMapping,
    /// The peer that received it over a lane (it reported it).
    Peer(&'a Instance),
}

impl std::fmt::Display for DeniedBy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeniedBy::Gateway => f.write_str("the gateway"),
            DeniedBy::ReadOnlyMapping => f.write_str("a read-only mapping"),
            DeniedBy::Peer(p) => write!(f, "{:?} ({})", p.application, p.peer_id),
        }
    }
}

/// A denial's log line. Whatever a peer chose (names, the resource) is quoted with `{:?}`,
/// which escapes control characters: a newline in an application name cannot forge a line.
fn denial_line(who: &Instance, action: PolicyAction, resource: &str, by: DeniedBy<'_>) -> String {
    format!(
        "denied by policy ({by}): application {:?} user {:?} peer {} may not {} {resource:?}",
        who.application,
        who.user,
        who.peer_id,
        action.name()
    )
}

/// Logs a refusal (always: a denial is something an administrator wants to see).
pub(super) fn log_denial(who: &Instance, action: PolicyAction, resource: &str, by: DeniedBy<'_>) {
    crate::log::warn(format_args!("{}", denial_line(who, action, resource, by)));
}

/// What a lane that could not be made is to the peer that asked: out of descriptors or
/// memory is a shortage that passes (peers leave), as a context refused for it is, so `Busy`;
/// anything else is a fault.
fn lane_failure_status(e: &shm::ShmError) -> Status {
    use rustix::io::Errno;
    match e {
        shm::ShmError::Io(io)
            if matches!(
                Errno::from_io_error(io),
                Some(Errno::MFILE | Errno::NFILE | Errno::NOMEM)
            ) =>
        {
            Status::Busy
        }
        _ => Status::Internal,
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
        let bells = shm::DoorbellSegment::open(&*doorbells)?;
        Ok(Self {
            limits,
            doorbells,
            bells,
            // Popped from the end: hand out low indices first.
            free_doorbells: (0..n as u32).rev().collect(),
            peers: BTreeMap::new(),
            lanes: HashMap::new(),
            relayed: HashMap::new(),
            contexts: Default::default(),
            bus: Default::default(),
            channels: Default::default(),
            policy: Policy::default(),
            keep: Default::default(),
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

    /// Sets the access-control policy (before any peer joins).
    pub(crate) fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Whether `peer` may do `action` on `resource`; a refusal is logged.
    pub(crate) fn allowed(&self, peer: PeerId, action: PolicyAction, resource: &str) -> bool {
        let Some(p) = self.peers.get(&peer) else {
            return false;
        };
        if p.rules.allows(action, resource) {
            return true;
        }
        log_denial(&p.identity, action, resource, DeniedBy::Gateway);
        false
    }

    /// A peer reports it refused something `offender` sent it over a lane, or (`offender` is
    /// the peer itself) that it refused its own write to a context the gateway mapped
    /// read-only for it. Logged only when the policy does deny it: a report is a claim, and a
    /// peer cannot write lines into the gateway's log with made-up ones.
    pub(crate) fn denied_by_peer(
        &self,
        by: PeerId,
        offender: PeerId,
        action: &str,
        resource: &str,
    ) {
        let (Some(b), Some(o)) = (self.peers.get(&by), self.peers.get(&offender)) else {
            return;
        };
        let Some(action) = PolicyAction::from_name(action) else {
            crate::log::debug(format_args!("{by} reported a denial of an unknown action"));
            return;
        };
        let denied = if by == offender {
            // Its own write: refused because the gateway's mapping is read-only.
            action == PolicyAction::ContextWrite && !self.context_access(offender, resource).1
        } else {
            !o.rules.allows(action, resource)
        };
        if !denied {
            crate::log::debug(format_args!(
                "{by} reported a denial the policy does not make: {} {resource:?}",
                action.name()
            ));
            return;
        }
        let by = if by == offender {
            DeniedBy::ReadOnlyMapping
        } else {
            DeniedBy::Peer(&b.identity)
        };
        log_denial(&o.identity, action, resource, by);
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
        let Some(peer) = self.peers.get_mut(&to) else {
            return;
        };
        if peer.overflowed {
            return;
        }
        match peer.tx.try_send(Outgoing { msg, fds }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                peer.overflowed = true;
                self.actions.push(Action::Disconnect(
                    to,
                    "outbound queue overflow: peer is not reading".into(),
                ));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                peer.overflowed = true;
                self.actions.push(Action::Ending(to));
            }
        }
    }

    /// Rings doorbell `slot` (a subscriber's, after the gateway logged something for it).
    pub(super) fn ring(&self, slot: u32) {
        if let Some(bell) = self.bells.doorbell(slot) {
            bell.notify();
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
        // The executable of a kernel-verified pid: policies may name it.
        let exe = std::fs::read_link(format!("/proc/{}/exe", cred.pid))
            .ok()
            .and_then(|p| p.to_str().map(str::to_owned));
        self.admit_with(adm, tx, exe.as_deref()).map(|(id, _)| id)
    }

    /// Admits a peer. It is sent its `Welcome` (the snapshot of every peer it can see, which is
    /// also returned), and everyone who can see it a `PeerAdded`. Native peers get a doorbell.
    pub(crate) fn admit(
        &mut self,
        adm: Admission,
        tx: PeerTx,
    ) -> Result<(PeerId, Welcome), (Status, String)> {
        self.admit_with(adm, tx, None)
    }

    /// [`Registry::admit`], with the peer's executable when the kernel vouches for its pid.
    fn admit_with(
        &mut self,
        adm: Admission,
        tx: PeerTx,
        exe: Option<&str>,
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
                // Unique within the user's world (as in the reference gateway): another
                // user's app cannot hold an instance id, nor learn that it is taken.
                if self
                    .peers
                    .values()
                    .any(|p| p.identity.instance == i && p.identity.user == adm.user)
                {
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
        let rules = Arc::new(self.policy.for_peer(Who {
            app: &adm.application,
            user: &adm.user,
            exe,
        }));
        self.keep_peer_joined(id, adm.pid, adm.transport == Transport::Shm);
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
                rules: (*p.rules).clone(),
            })
            .collect();
        let (seen_by_web, web) = match adm.attributes {
            Value::Map(mut m) => {
                // Announced, but not matched by the reference gateway.
                m.shift_remove("login");
                (Value::Map(m), true)
            }
            _ => (
                Value::from(crate::bridge::gw3::native_identity(&identity)),
                false,
            ),
        };
        self.peers.insert(
            id,
            Peer {
                identity: identity.clone(),
                transport: adm.transport,
                seen_by_web,
                seen_by_native: identity.to_value(),
                web,
                methods: BTreeMap::new(),
                method_names: HashMap::new(),
                doorbell,
                tx,
                pending: 0,
                pending_on: HashMap::new(),
                rules: rules.clone(),
                accusations: 0,
                overflowed: false,
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
            rules: (*rules).clone(),
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
                rules: (*rules).clone(),
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

    /// Adds methods to a peer; acknowledges, and announces them to the peer's audience. Costs
    /// O(methods sent), whatever the peer already holds (`Peer::method_names`).
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
            } else if peer.method_names.contains_key(&m.def.name)
                || !seen_names.insert(m.def.name.as_str())
            {
                Some((Status::AlreadyExists, m.def.name_taken()))
            } else if !peer.rules.allows(PolicyAction::Register, &m.def.name) {
                log_denial(
                    &peer.identity,
                    PolicyAction::Register,
                    &m.def.name,
                    DeniedBy::Gateway,
                );
                Some((
                    Status::PermissionDenied,
                    format!(
                        "the gateway's policy does not allow registering {:?}",
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
            peer.method_names.insert(m.def.name.clone(), m.id);
        }
        // The others hear of the methods before the registrant's answer: a web client that
        // sees its `register` resolve may rely on another client of the same process (or one
        // it told) already listing them, as with the reference gateway.
        let msg = FromGateway::MethodsAdded {
            peer: from,
            methods,
        };
        for other in self.audience(from) {
            self.send(other, msg.clone(), Vec::new());
        }
        self.send(from, FromGateway::Ack { req }, Vec::new());
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
            if let Some(def) = peer.methods.remove(id) {
                peer.method_names.remove(&def.name);
            }
        }
        // The others first, as for `register`.
        let msg = FromGateway::MethodsRemoved { peer: from, ids };
        for other in self.audience(from) {
            self.send(other, msg.clone(), Vec::new());
        }
        self.send(from, FromGateway::Ack { req }, Vec::new());
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
                Err(e) => {
                    return self.fail(from, req, lane_failure_status(&e), format!("lane: {e}"))
                }
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

    /// `from` found the lane to `other` corrupt: forget the lane, tell `other`, and disconnect
    /// `other`, the only other process that maps the lane: a peer that writes garbage into
    /// shared memory is not trusted with any (DESIGN §2; the victim has already dropped the
    /// lane and failed its calls, and carries on with everyone else).
    ///
    /// The gateway cannot verify the accusation: both ends map the whole segment read-write, so
    /// either could have written anything, and "which ring" a report names would be the
    /// accuser's word too. What bounds a false accusation:
    /// * the lane must exist between the two: a peer accuses only a peer it holds a live lane
    ///   with, and a lane yields at most one disconnection (it is forgotten at the first report,
    ///   so the accused's counter-report finds nothing);
    /// * every native peer runs as the gateway's own OS user (other uids are refused at accept),
    ///   so the accuser could as well signal or ptrace the accused: lying gains it nothing it
    ///   does not have;
    /// * a peer's accusations disconnect at most [`MAX_ACCUSATIONS`] peers over its lifetime;
    ///   after that its reports only drop the lane (a peer that finds everyone corrupt is more
    ///   likely the broken one).
    pub(crate) fn lane_fault(&mut self, from: PeerId, other: PeerId, reason: &str) {
        crate::log::warn(format_args!(
            "{from} reports a corrupt lane from {other}: {}",
            crate::log::Escaped(reason)
        ));
        let Some(rec) = self.lanes.remove(&lane_key(from, other)) else {
            return;
        };
        let msg = FromGateway::LaneClosed {
            peer: from,
            lane: rec.id,
            reason: reason.to_string(),
        };
        self.send(other, msg, Vec::new());
        let Some(accuser) = self.peers.get_mut(&from) else {
            return;
        };
        if accuser.accusations >= MAX_ACCUSATIONS {
            crate::log::warn(format_args!(
                "{from} has reported {MAX_ACCUSATIONS} corrupt peers; keeping {other} connected"
            ));
            return;
        }
        accuser.accusations += 1;
        self.actions.push(Action::Disconnect(
            other,
            format!("wrote garbage into its lane to {from} ({reason})"),
        ));
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
            // Gone before the call came (the caller's view was behind): `NotFound`, as for a
            // method it no longer has; the caller looks again (`client/interop.rs::again`).
            // A server leaving with the call pending is `PeerLeft`.
            Some(relay_error(
                Status::NotFound,
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
        } else if let Err(message) = self.check_payload(&args) {
            // A web caller's (whose library checks nothing) or a modified native library's:
            // refused as the caller's own library would, and the callee never sees it.
            Some(relay_error(Status::PayloadTooLarge, message))
        } else if self.peers[&from].pending >= self.limits.max_pending_calls {
            Some(relay_error(
                Status::Busy,
                "too many calls waiting for an answer",
            ))
        } else if self.peers[&from]
            .pending_on
            .get(&peer)
            .copied()
            .unwrap_or(0)
            >= (self.limits.max_pending_calls / 2).max(1)
        {
            // A server that never answers (but stays) must not take the caller's whole budget:
            // calls to other servers still go through.
            Some(relay_error(
                Status::Busy,
                "too many calls waiting for an answer from this server",
            ))
        } else if !self.allowed(
            from,
            PolicyAction::Invoke,
            &self.peers[&peer].methods[&method_id].name,
        ) {
            Some(relay_error(
                Status::PermissionDenied,
                format!(
                    "the gateway's policy does not allow invoking {:?}",
                    self.peers[&peer].methods[&method_id].name
                ),
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
            *p.pending_on.entry(peer).or_default() += 1;
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
        // A web server's library checks nothing: the limit a native one applies, applied here.
        let outcome =
            outcome.within(usize::try_from(self.limits.max_payload).unwrap_or(usize::MAX));
        if let Some(r) = self.relayed.remove(&invocation) {
            self.finish(r, outcome);
        }
    }

    /// `Err` with the message when `v` is a payload larger than `max_payload`, measured and
    /// worded as a native library does ([`record::payload_len`](crate::wire::record::payload_len)).
    pub(crate) fn check_payload(&self, v: &Value) -> Result<(), String> {
        crate::wire::record::check_payload(v, self.limits.max_payload)
    }

    fn finish(&mut self, r: Relayed, outcome: RelayOutcome) {
        if let Some(p) = self.peers.get_mut(&r.caller) {
            p.answered(r.callee);
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
    /// A stream subscription request is checked against the subscriber's rules here: every
    /// request to or from a peer behind the gateway (a web app) passes through, and a web
    /// server has no library of its own to check it. A refusal is answered for the server.
    pub(crate) fn relay_record(&mut self, from: PeerId, to: PeerId, kind: u16, body: Vec<u8>) {
        if !self.visible(from, to) {
            return;
        }
        if kind == crate::wire::record::KIND_SUB_REQUEST {
            if let Some(refusal) = self.refused_subscription(from, to, &body) {
                let answer = FromGateway::Record {
                    from: to,
                    kind: crate::wire::record::KIND_SUB_REPLY,
                    body: refusal,
                };
                return self.send(from, answer, Vec::new());
            }
        }
        self.send(to, FromGateway::Record { from, kind, body }, Vec::new());
    }

    /// The refusal of a stream subscription request `from` may not make, if it may not.
    fn refused_subscription(&self, from: PeerId, to: PeerId, request: &[u8]) -> Option<Vec<u8>> {
        use crate::wire::stream;
        let r = stream::parse_request(request).ok()?;
        let name = &self.peers.get(&to)?.methods.get(&r.method_id)?.name;
        if self.allowed(from, PolicyAction::Invoke, name) {
            return None;
        }
        let mut body = Vec::new();
        let info = stream::denial(name);
        stream::reply(&mut body, r.sub_id, false, &info).ok()?;
        Some(body)
    }

    /// Forgets relayed calls long past their deadline (their callers gave up already).
    pub(crate) fn expire(&mut self, now: Instant) {
        self.bus_expire(now);
        let old: Vec<u64> = self
            .relayed
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        let gone: Vec<Relayed> = old
            .into_iter()
            .filter_map(|k| self.relayed.remove(&k))
            .collect();
        self.fail_all(
            gone,
            relay_error(Status::Timeout, "no answer from the method"),
        );
    }

    /// Fails relayed calls alike: one notice per caller, however many of its calls there are
    /// (a caller with more calls waiting than its queue holds must not be disconnected because
    /// its callee left).
    fn fail_all(&mut self, gone: Vec<Relayed>, outcome: RelayOutcome) {
        let mut by_caller: BTreeMap<PeerId, Vec<u64>> = BTreeMap::new();
        for r in gone {
            if let Some(p) = self.peers.get_mut(&r.caller) {
                p.answered(r.callee);
            }
            by_caller.entry(r.caller).or_default().push(r.call);
        }
        for (caller, mut calls) in by_caller {
            calls.sort_unstable();
            let msg = if let [call] = calls[..] {
                FromGateway::CallResult {
                    call,
                    outcome: outcome.clone(),
                }
            } else {
                FromGateway::CallsFailed {
                    calls,
                    outcome: outcome.clone(),
                }
            };
            self.send(caller, msg, Vec::new());
        }
    }

    /// Removes a peer: its methods, lanes and relayed calls go, and everyone who could see it is
    /// told. Calls relayed to it fail with "peer has left".
    pub(crate) fn remove(&mut self, id: PeerId, reason: &str) {
        let audience = self.audience(id);
        self.contexts_peer_left(id);
        self.bus_peer_left(id);
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        if let Some(slot) = peer.doorbell {
            if let Some(bell) = self.bells.doorbell(slot) {
                bell.reset();
            }
            self.free_doorbells.insert(0, slot);
        }
        self.keep_peer_left(id);
        self.lanes.retain(|(a, b), _| *a != id && *b != id);
        let orphaned: Vec<u64> = self
            .relayed
            .iter()
            .filter(|(_, r)| r.callee == id || r.caller == id)
            .map(|(k, _)| *k)
            .collect();
        let failed: Vec<Relayed> = orphaned
            .into_iter()
            .filter_map(|k| self.relayed.remove(&k))
            .filter(|r| r.callee == id)
            .collect();
        self.fail_all(
            failed,
            relay_error(Status::PeerLeft, "Peer has left while waiting for result"),
        );
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
pub(crate) mod tests {
    use super::*;
    use crate::wire::frame::ContextLifetime;

    #[test]
    fn a_denial_line_shows_what_peers_chose_escaped() {
        let forged = "x\nknit warn: FORGED: application \"ops\" was granted root";
        let who = |app: &str| Instance {
            application: app.into(),
            instance: "i".into(),
            pid: 1,
            user: forged.into(),
            machine: "m".into(),
            peer_id: PeerId(7),
        };
        let (offender, reporter) = (who(forged), who(forged));
        for by in [
            DeniedBy::Gateway,
            DeniedBy::ReadOnlyMapping,
            DeniedBy::Peer(&reporter),
        ] {
            let line = denial_line(&offender, PolicyAction::Invoke, forged, by);
            assert!(!line.contains('\n'), "{line}");
            assert!(line.starts_with("denied by policy ("), "{line}");
        }
    }

    fn recv(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<(FromGateway, usize)> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            out.push((o.msg, o.fds.len()));
        }
        out
    }

    /// Admits a peer behind the gateway (a web peer) of `user`; also used by the context tests.
    pub(crate) fn join_web(
        reg: &mut Registry,
        app: &str,
        user: &str,
    ) -> (PeerId, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(1024);
        let (id, _) = reg.admit(web_admission(app, user), tx).unwrap();
        (id, rx)
    }

    /// What a peer behind the gateway (a web peer) of `user` asks to be admitted with.
    pub(crate) fn web_admission(app: &str, user: &str) -> Admission {
        Admission {
            application: app.into(),
            instance: None,
            pid: 0,
            user: user.into(),
            transport: Transport::Relay,
            attributes: Value::Null,
        }
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
    fn the_others_hear_of_a_registration_before_the_registrant_is_answered() {
        // Two peers behind the gateway share one queue here, so its order is the order the
        // registry sent in: the bridge wakes their connections in that order, and a web app
        // whose `register` resolved finds the method already listed by another client.
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let (a, _) = reg.admit(web_admission("A", "u"), tx.clone()).unwrap();
        reg.admit(web_admission("C", "u"), tx).unwrap();
        recv(&mut rx);
        let order = |rx: &mut mpsc::Receiver<Outgoing>, req: u64| -> Vec<&str> {
            recv(rx)
                .iter()
                .map(|(m, _)| match m {
                    FromGateway::MethodsAdded { peer, .. } if *peer == a => "added",
                    FromGateway::MethodsRemoved { peer, .. } if *peer == a => "removed",
                    FromGateway::Ack { req: r } if *r == req => "ack",
                    _ => "other",
                })
                .collect()
        };
        reg.register(a, 1, vec![spec(1, "M")]);
        assert_eq!(order(&mut rx, 1), ["added", "ack"]);
        reg.unregister(a, 2, vec![1]);
        assert_eq!(order(&mut rx, 2), ["removed", "ack"]);
    }

    fn synced_ticket(msgs: &[(FromGateway, usize)], sub: u64) -> Option<u64> {
        msgs.iter().find_map(|(m, _)| match m {
            FromGateway::BusSubscribedSync { info, ticket } if info.sub == sub => Some(*ticket),
            _ => None,
        })
    }

    fn acked(msgs: &[(FromGateway, usize)], req: u64) -> bool {
        msgs.iter()
            .any(|(m, _)| matches!(m, FromGateway::Ack { req: r } if *r == req))
    }

    #[test]
    fn a_bus_subscription_is_acknowledged_once_every_native_peer_routes_to_it() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        let (c, mut rc) = join(&mut reg, "C", "u");
        let (_w, mut rw) = join_web(&mut reg, "W", "u");
        let (s, mut rs) = join(&mut reg, "S", "u");
        for r in [&mut ra, &mut rc, &mut rw, &mut rs] {
            recv(r);
        }
        reg.bus_subscribe(s, 7, 1, "t".into(), None);
        assert!(
            !acked(&recv(&mut rs), 7),
            "acknowledged before the publishers knew"
        );
        let ta = synced_ticket(&recv(&mut ra), 1).expect("A was not asked to confirm");
        let tc = synced_ticket(&recv(&mut rc), 1).expect("C was not asked to confirm");
        // The web peer publishes through the gateway: it is told, not asked.
        let web = recv(&mut rw);
        assert!(synced_ticket(&web, 1).is_none());
        assert!(web
            .iter()
            .any(|(m, _)| matches!(m, FromGateway::BusSubscribed(i) if i.sub == 1)));
        reg.bus_synced(a, ta);
        assert!(
            !acked(&recv(&mut rs), 7),
            "acknowledged with C still unsure"
        );
        reg.bus_synced(c, tc);
        assert!(acked(&recv(&mut rs), 7));

        // A peer that leaves confirms by leaving; one that never answers is waited for only
        // until the deadline.
        reg.bus_subscribe(s, 8, 2, "t".into(), None);
        let ta = synced_ticket(&recv(&mut ra), 2).unwrap();
        reg.bus_synced(a, ta);
        reg.remove(c, "gone");
        assert!(acked(&recv(&mut rs), 8));
        reg.bus_subscribe(s, 9, 3, "t".into(), None);
        reg.expire(Instant::now());
        assert!(!acked(&recv(&mut rs), 9));
        reg.expire(Instant::now() + Duration::from_secs(60));
        assert!(acked(&recv(&mut rs), 9));
    }

    /// A peer of `user` whose queue holds `depth` messages.
    fn join_with_depth(
        reg: &mut Registry,
        app: &str,
        user: &str,
        depth: usize,
    ) -> (PeerId, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(depth);
        let id = reg
            .hello(PeerCred { pid: 42, uid: 1 }, user.into(), hello(app), tx)
            .unwrap();
        (id, rx)
    }

    #[test]
    fn a_departing_peer_costs_the_others_no_notice_per_item_it_held() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        // Bystanders with queues far smaller than what the hog holds.
        let (native, mut rn) = join_with_depth(&mut reg, "native", "u", 64);
        let (tx, mut rw) = mpsc::channel(64);
        let (web, _) = reg.admit(web_admission("web", "u"), tx).unwrap();
        let (hog, mut rh) = join_web(&mut reg, "hog", "u");
        recv(&mut rn);
        recv(&mut rw);
        for i in 0..500u64 {
            reg.bus_subscribe(hog, i, i, format!("t.{i}"), None);
            let lifetime = if i % 2 == 0 {
                ContextLifetime::Ownership
            } else {
                ContextLifetime::RefCounted
            };
            if i < 40 {
                reg.create_context(hog, 1000 + i, format!("c{i}"), lifetime, Value::map());
            }
            // The bystanders keep up with the hog's requests, one notice each.
            recv(&mut rn);
            recv(&mut rw);
            recv(&mut rh);
        }
        assert!(reg.take_actions().is_empty());
        reg.remove(hog, "peer has left");
        assert_eq!(reg.take_actions(), [], "a bystander's queue overflowed");
        for (who, rx) in [(native, &mut rn), (web, &mut rw)] {
            let msgs = recv(rx);
            assert!(
                msgs.len() <= 3,
                "{who} was sent {} notices: {:?}",
                msgs.len(),
                msgs.first()
            );
            let gone: usize = msgs
                .iter()
                .map(|(m, _)| match m {
                    FromGateway::ContextsDestroyed { gone } => gone.len(),
                    _ => 0,
                })
                .sum();
            assert_eq!(gone, 40, "{who}: {msgs:?}");
            assert!(msgs
                .iter()
                .any(|(m, _)| matches!(m, FromGateway::PeerRemoved { peer, .. } if *peer == hog)));
        }
        assert!(reg.bus.of_peers(&[hog]).is_empty());
    }

    #[test]
    fn a_peer_whose_queue_overflows_is_disconnected_once() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (slow, _rs) = join_with_depth(&mut reg, "slow", "u", 2);
        let (busy, _rb) = join(&mut reg, "busy", "u");
        for i in 0..100 {
            reg.register(busy, i, vec![spec(i as u32, &format!("m{i}"))]);
        }
        let actions = reg.take_actions();
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert!(matches!(&actions[0], Action::Disconnect(p, _) if *p == slow));
    }

    #[test]
    fn method_names_stay_unique_through_unregistration() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        recv(&mut ra);
        reg.register(a, 1, vec![spec(1, "M"), spec(2, "N")]);
        reg.register(a, 2, vec![spec(3, "M")]);
        reg.unregister(a, 3, vec![1]);
        reg.register(a, 4, vec![spec(4, "M")]);
        reg.register(a, 5, vec![spec(5, "N")]);
        let msgs = recv(&mut ra);
        let outcome: Vec<bool> = msgs
            .iter()
            .filter_map(|(m, _)| match m {
                FromGateway::Ack { .. } => Some(true),
                FromGateway::Fail { .. } => Some(false),
                _ => None,
            })
            .collect();
        assert_eq!(outcome, [true, false, true, true, false], "{msgs:?}");
        assert_eq!(reg.peers[&a].method_names.len(), 2);
        assert_eq!(reg.peers[&a].method_names["M"], 4);
    }

    /// A web peer's admission, with the GW3 identity the bridge announces for it.
    fn web_with_identity(
        reg: &mut Registry,
        app: &str,
        gw3: &str,
    ) -> (PeerId, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(1024);
        let mut adm = web_admission(app, "u");
        adm.pid = 4242;
        adm.attributes = Value::from_json_str(gw3).unwrap();
        let (id, _) = reg.admit(adm, tx).unwrap();
        (id, rx)
    }

    fn bus_delivered(rx: &mut mpsc::Receiver<Outgoing>) -> usize {
        recv(rx)
            .iter()
            .filter(|(m, _)| matches!(m, FromGateway::BusMessage { .. }))
            .count()
    }

    #[test]
    fn a_bus_target_matches_the_subscriber_as_the_publisher_sees_it() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (w1, _r1) = web_with_identity(
            &mut reg,
            "w1",
            r#"{"application":"w1","applicationName":"w1","machine":"127.0.0.1","process":7,"user":"u","login":"u","instance":"i-1"}"#,
        );
        let (w2, mut r2) = web_with_identity(
            &mut reg,
            "w2",
            r#"{"application":"w2","applicationName":"w2","machine":"127.0.0.1","process":4242,"user":"u","login":"u","instance":"i-2"}"#,
        );
        let (n, mut rn) = join(&mut reg, "nat", "u");
        reg.bus_subscribe(w2, 1, 1, "t".into(), None);
        reg.bus_subscribe(n, 2, 2, "t".into(), None);
        recv(&mut r2);
        recv(&mut rn);
        let publish = |reg: &mut Registry, from: PeerId, target: &str| {
            let target = Value::from_json_str(target).unwrap();
            reg.bus_publish(from, "t".into(), None, target, Value::Null, false);
        };
        let machine = crate::sys::identity::host_name();
        // A web publisher sees GW3 identities: the web subscriber's as it logged in...
        for t in [
            r#"{"machine":"127.0.0.1"}"#,
            r#"{"process":4242}"#,
            r#"{"applicationName":"w2","instance":"i-2"}"#,
        ] {
            publish(&mut reg, w1, t);
            assert_eq!(bus_delivered(&mut r2), 1, "web target {t}");
        }
        for t in [
            r#"{"pid":4242}"#,
            r#"{"login":"u"}"#,
            &format!(r#"{{"machine":{machine:?}}}"#),
        ] {
            publish(&mut reg, w1, t);
            assert_eq!(bus_delivered(&mut r2), 0, "web target {t}");
        }
        // ...and the native one's in GW3 form (the host name above reached it).
        recv(&mut rn);
        for t in [
            r#"{"applicationName":"nat"}"#,
            r#"{"process":42}"#,
            &format!(r#"{{"machine":{machine:?},"application":"nat"}}"#),
        ] {
            publish(&mut reg, w1, t);
            assert_eq!(bus_delivered(&mut rn), 1, "native target {t}");
        }
        publish(&mut reg, w1, r#"{"pid":42}"#);
        assert_eq!(bus_delivered(&mut rn), 0);
        // A native publisher sees knit identities.
        let (np, _rp) = join(&mut reg, "np", "u");
        recv(&mut r2);
        for (t, n) in [
            (r#"{"pid":4242}"#.to_string(), 1),
            (format!(r#"{{"machine":{machine:?}}}"#), 1),
            (r#"{"process":4242}"#.to_string(), 0),
        ] {
            publish(&mut reg, np, &t);
            assert_eq!(bus_delivered(&mut r2), n, "native publisher, target {t}");
        }
    }

    #[test]
    fn doorbell_slots_of_departed_peers_are_reused() {
        let limits = Limits {
            max_peers: 2,
            ..Limits::default()
        };
        let mut reg = Registry::new(limits).unwrap();
        let (keep, _rk) = join(&mut reg, "K", "u");
        let mut slots = std::collections::BTreeSet::new();
        for i in 0..10 {
            let (p, _rp) = join(&mut reg, &format!("P{i}"), "u");
            slots.insert(reg.peers[&p].doorbell.unwrap());
            reg.remove(p, "left");
        }
        // One slot is K's; the other is handed out again and again.
        assert_eq!(slots.len(), 1);
        assert!(!slots.contains(&reg.peers[&keep].doorbell.unwrap()));
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

    /// A peer whose connection is ending (its queue's reader gone, its `Closed` event not yet
    /// handled) is not reported as one that does not read, however many messages come for it.
    #[test]
    fn a_peer_whose_queue_is_closed_is_ending_not_slow() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (tx, rx) = mpsc::channel(2);
        let leaving = reg
            .hello(
                PeerCred { pid: 1, uid: 1 },
                "u".into(),
                hello("leaving"),
                tx,
            )
            .unwrap();
        drop(rx);
        let others: Vec<_> = (0..3)
            .map(|i| join(&mut reg, &format!("n{i}"), "u"))
            .collect();
        assert_eq!(reg.take_actions(), [Action::Ending(leaving)]);
        drop(others);
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

    /// What peers without a library of ours send (web peers, a modified native library) obeys
    /// `max_payload` and `max_name_len` as a native library's would: arguments over the limit are
    /// refused to the caller and never reach the callee; a result over it reaches the caller as
    /// `PayloadTooLarge`; a message over it, or with a topic longer than a name may be, reaches
    /// nobody. (Nothing was checked: a web peer's 50 000-byte arguments, results and messages
    /// all went through with a 1000-byte limit.)
    #[test]
    fn a_lane_refused_for_lack_of_descriptors_or_memory_is_busy() {
        let io = |errno: i32| shm::ShmError::Io(std::io::Error::from_raw_os_error(errno));
        let (emfile, enfile, enomem, einval) = (24, 23, 12, 22);
        for shortage in [emfile, enfile, enomem] {
            assert_eq!(
                lane_failure_status(&io(shortage)),
                Status::Busy,
                "{shortage}"
            );
        }
        assert_eq!(lane_failure_status(&io(einval)), Status::Internal);
        assert_eq!(
            lane_failure_status(&shm::ShmError::Invalid("x")),
            Status::Internal
        );
    }

    #[test]
    fn relayed_calls_results_and_messages_obey_the_payload_and_name_limits() {
        let limits = Limits {
            max_payload: 1000,
            ..Limits::default()
        };
        let mut reg = Registry::new(limits).unwrap();
        let (native, mut rn) = join(&mut reg, "native", "u");
        let (web, mut rw) = join_web(&mut reg, "web", "u");
        reg.register(web, 1, vec![spec(7, "Web.Echo")]);
        recv(&mut rn);
        recv(&mut rw);
        let big = Value::from("x".repeat(5000));
        let size = crate::wire::record::payload_len(&big);
        reg.call(native, 11, web, 7, big.clone(), 1000);
        assert!(recv(&mut rw).is_empty(), "the callee never sees it");
        match recv(&mut rn).remove(0).0 {
            FromGateway::CallResult {
                call: 11,
                outcome:
                    RelayOutcome::Err {
                        status, message, ..
                    },
            } => {
                assert_eq!(status, Status::PayloadTooLarge);
                let want = format!("payload of {size} bytes exceeds the limit of 1000 bytes");
                assert_eq!(message, want);
            }
            other => panic!("{other:?}"),
        }
        reg.call(native, 12, web, 7, Value::from("small"), 1000);
        let invocation = match recv(&mut rw).remove(0).0 {
            FromGateway::Invoke { invocation, .. } => invocation,
            other => panic!("{other:?}"),
        };
        reg.yield_(web, invocation, RelayOutcome::Ok(big.clone()));
        match recv(&mut rn).remove(0).0 {
            FromGateway::CallResult {
                call: 12,
                outcome:
                    RelayOutcome::Err {
                        status, message, ..
                    },
            } => {
                assert_eq!(status, Status::PayloadTooLarge);
                let want = format!("result of {size} bytes exceeds the limit of 1000 bytes");
                assert_eq!(message, want);
            }
            other => panic!("{other:?}"),
        }
        // An error whose context is over the limit keeps its status, not its context.
        reg.call(native, 13, web, 7, Value::from("small"), 1000);
        let invocation = match recv(&mut rw).remove(0).0 {
            FromGateway::Invoke { invocation, .. } => invocation,
            other => panic!("{other:?}"),
        };
        let failed = RelayOutcome::Err {
            status: Status::MethodFailed,
            message: "boom".into(),
            context: big.clone(),
        };
        reg.yield_(web, invocation, failed);
        match recv(&mut rn).remove(0).0 {
            FromGateway::CallResult {
                call: 13,
                outcome:
                    RelayOutcome::Err {
                        status,
                        message,
                        context,
                    },
            } => {
                assert_eq!(status, Status::MethodFailed);
                let want = format!(
                    "error of {} bytes exceeds the limit of 1000 bytes",
                    4 + size
                );
                assert_eq!(message, want);
                assert_eq!(context, Value::Null);
            }
            other => panic!("{other:?}"),
        }
        // The bus: the native peer subscribes to everything; only what is within the limits
        // reaches it.
        reg.bus_subscribe(native, 1, 1, ">".into(), None);
        recv(&mut rn);
        recv(&mut rw);
        let publish = |reg: &mut Registry, topic: String, data: Value| {
            reg.bus_publish(web, topic, None, Value::Null, data, false);
        };
        publish(&mut reg, "t".into(), big.clone());
        publish(&mut reg, "t".repeat(1025), Value::from(1));
        assert_eq!(bus_delivered(&mut rn), 0);
        publish(&mut reg, "t".repeat(1024), Value::from("x".repeat(990)));
        assert_eq!(bus_delivered(&mut rn), 1);
    }

    /// A callee that never answers (but stays) takes at most half of a caller's
    /// `max_pending_calls`: the caller can still call other servers. (It took all of it, and
    /// every later call of that caller, to anyone, was refused for as long as the callee stayed.)
    #[test]
    fn a_callee_that_never_answers_takes_half_of_a_callers_waiting_calls_at_most() {
        let limits = Limits {
            max_pending_calls: 4,
            ..Limits::default()
        };
        let mut reg = Registry::new(limits).unwrap();
        let (caller, mut rc) = join_web(&mut reg, "caller", "u");
        let (mute, mut rm) = join_web(&mut reg, "mute", "u");
        let (fine, mut rf) = join_web(&mut reg, "fine", "u");
        reg.register(mute, 1, vec![spec(1, "Mute")]);
        reg.register(fine, 2, vec![spec(1, "Fine")]);
        recv(&mut rc);
        recv(&mut rm);
        recv(&mut rf);
        let busy = |m: &FromGateway, want: u64| matches!(m, FromGateway::CallResult { call, outcome: RelayOutcome::Err { status: Status::Busy, .. } } if *call == want);
        for call in 1..=3 {
            reg.call(caller, call, mute, 1, Value::Null, u32::MAX);
        }
        let msgs = recv(&mut rc);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(busy(&msgs[0].0, 3), "{msgs:?}");
        assert_eq!(
            recv(&mut rm).len(),
            2,
            "two invocations reach the mute callee"
        );
        for call in 4..=6 {
            reg.call(caller, call, fine, 1, Value::Null, u32::MAX);
        }
        let msgs = recv(&mut rc);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(
            busy(&msgs[0].0, 6),
            "the caller's own limit still holds: {msgs:?}"
        );
        let invocations: Vec<u64> = recv(&mut rf)
            .into_iter()
            .filter_map(|(m, _)| match m {
                FromGateway::Invoke { invocation, .. } => Some(invocation),
                _ => None,
            })
            .collect();
        assert_eq!(invocations.len(), 2);
        // Answers give the places back.
        reg.yield_(fine, invocations[0], RelayOutcome::Ok(Value::Null));
        reg.call(caller, 7, fine, 1, Value::Null, u32::MAX);
        let msgs = recv(&mut rc);
        assert!(
            matches!(
                msgs[0].0,
                FromGateway::CallResult {
                    call: 4,
                    outcome: RelayOutcome::Ok(_)
                }
            ),
            "{msgs:?}"
        );
        assert_eq!(msgs.len(), 1, "call 7 is waiting: {msgs:?}");
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
        // A peer gone before the call came: not found (the caller may look again).
        reg.call(a, 3, PeerId(999), 1, Value::Null, 1000);
        assert!(matches!(
            &recv(&mut ra)[0].0,
            FromGateway::CallResult {
                call: 3,
                outcome: RelayOutcome::Err {
                    status: Status::NotFound,
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

    #[test]
    fn a_lane_fault_disconnects_the_accused_once_and_only_over_a_live_lane() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (victim, mut rv) = join(&mut reg, "victim", "u");
        let (vandal, mut rx) = join(&mut reg, "vandal", "u");
        let (bystander, _rb) = join(&mut reg, "bystander", "u");
        // No lane between them: nothing happens (a peer accuses only a peer it has a lane with).
        reg.lane_fault(victim, bystander, "made up");
        assert!(reg.take_actions().is_empty());
        reg.open_lane(vandal, 1, victim);
        recv(&mut rv);
        recv(&mut rx);
        reg.lane_fault(
            victim,
            vandal,
            "ring corrupt: producer position out of range",
        );
        let actions = reg.take_actions();
        assert!(
            matches!(&actions[..], [Action::Disconnect(p, why)] if *p == vandal && why.contains("garbage")),
            "{actions:?}"
        );
        assert_eq!(reg.lane_count(), 0);
        assert!(matches!(
            &recv(&mut rx)[0].0,
            FromGateway::LaneClosed { peer, .. } if *peer == victim
        ));
        // The accused's counter-accusation finds no lane: the victim stays.
        reg.lane_fault(vandal, victim, "you did it");
        assert!(reg.take_actions().is_empty());
    }

    #[test]
    fn a_peer_that_finds_everyone_corrupt_stops_disconnecting_them() {
        let mut reg = Registry::new(Limits::default()).unwrap();
        let (accuser, _ra) = join(&mut reg, "accuser", "u");
        let mut disconnected = 0;
        let mut keep = Vec::new();
        for i in 0..MAX_ACCUSATIONS + 3 {
            let (p, rp) = join(&mut reg, &format!("p{i}"), "u");
            keep.push(rp);
            reg.open_lane(accuser, 1, p);
            reg.lane_fault(accuser, p, "corrupt");
            disconnected += reg.take_actions().len() as u32;
            assert_eq!(reg.lane_count(), 0, "the lane is dropped either way");
        }
        assert_eq!(disconnected, MAX_ACCUSATIONS);
    }

    #[test]
    fn bus_subscriptions_per_peer_are_bounded_and_given_back() {
        let mut reg = Registry::new(Limits {
            max_bus_subs_per_peer: 3,
            ..Limits::default()
        })
        .unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        let (b, mut rb) = join(&mut reg, "B", "u");
        recv(&mut ra);
        let fails = |r: &mut mpsc::Receiver<Outgoing>| -> Vec<u64> {
            recv(r)
                .into_iter()
                .filter_map(|(m, _)| match m {
                    FromGateway::Fail {
                        req,
                        status: Status::Busy,
                        message,
                    } if message.contains("at most 3 bus subscriptions") => Some(req),
                    _ => None,
                })
                .collect()
        };
        for i in 0..3 {
            reg.bus_subscribe(a, i, i, format!("t{i}"), None);
        }
        // Re-subscribing a held one replaces it; a fourth is refused; another peer is not
        // affected.
        reg.bus_subscribe(a, 10, 2, "t2".into(), None);
        reg.bus_subscribe(a, 11, 3, "t3".into(), None);
        reg.bus_subscribe(b, 12, 1, "t".into(), None);
        assert_eq!(fails(&mut ra), [11]);
        assert_eq!(fails(&mut rb), Vec::<u64>::new());
        // An unsubscribe gives its place back (a second one for the same id gives nothing).
        reg.bus_unsubscribe(a, 13, 0);
        reg.bus_unsubscribe(a, 14, 0);
        reg.bus_subscribe(a, 15, 4, "t4".into(), None);
        reg.bus_subscribe(a, 16, 5, "t5".into(), None);
        assert_eq!(fails(&mut ra), [16]);
        assert_eq!(reg.bus.of_peers(&[a]).len(), 3);
        // Leaving gives every place back.
        reg.remove(a, "peer has left");
        assert!(!reg.bus.held.contains_key(&a));
    }

    #[test]
    fn registration_floods_are_refused_with_typed_errors() {
        let mut reg = Registry::new(Limits {
            max_methods_per_peer: 1000,
            max_name_len: 64,
            ..Limits::default()
        })
        .unwrap();
        let (a, mut ra) = join(&mut reg, "A", "u");
        let (_b, mut rb) = join(&mut reg, "B", "u");
        recv(&mut rb);
        // In batches up to the limit: accepted.
        for batch in 0..10u32 {
            let specs = (0..100).map(|i| spec(batch * 100 + i, &format!("m{batch}.{i}")));
            reg.register(a, batch as u64, specs.collect());
        }
        assert_eq!(reg.peers[&a].methods.len(), 1000);
        recv(&mut ra);
        // One more, or a whole flood at once: refused, nothing registered, nobody told.
        reg.register(a, 99, vec![spec(5000, "one.more")]);
        let flood = (0..100_000)
            .map(|i| spec(10_000 + i, &format!("f{i}")))
            .collect();
        reg.register(a, 100, flood);
        for (req, (m, _)) in [99u64, 100].iter().zip(recv(&mut ra)) {
            assert!(
                matches!(&m, FromGateway::Fail { req: r, status: Status::Busy, message } if r == req && message.contains("at most 1000")),
                "{m:?}"
            );
        }
        assert_eq!(reg.peers[&a].methods.len(), 1000);
        assert_eq!(
            recv(&mut rb).len(),
            10,
            "only the accepted batches were announced"
        );
        // Oversized names are refused too.
        reg.register(a, 101, vec![spec(7000, &"n".repeat(65))]);
        assert!(matches!(
            recv(&mut ra)[0].0,
            FromGateway::Fail {
                status: Status::InvalidArgument,
                ..
            }
        ));
    }

    #[test]
    fn a_flood_of_peers_is_refused_beyond_the_limit() {
        let mut reg = Registry::new(Limits {
            max_peers: 50,
            ..Limits::default()
        })
        .unwrap();
        let mut keep = Vec::new();
        for i in 0..50 {
            let (tx, rx) = mpsc::channel(4096);
            reg.hello(PeerCred { pid: i, uid: 1 }, "u".into(), hello("p"), tx)
                .unwrap();
            keep.push(rx);
        }
        for i in 0..1000 {
            let (tx, _rx) = mpsc::channel(8);
            let e = reg
                .hello(PeerCred { pid: i, uid: 1 }, "u".into(), hello("p"), tx)
                .unwrap_err();
            assert_eq!(e.0, Status::Busy);
        }
        assert_eq!(reg.peer_count(), 50);
        // A long application name is refused, not stored.
        let (tx, _rx) = mpsc::channel(8);
        reg.remove(PeerId(1), "left");
        let e = reg
            .hello(
                PeerCred { pid: 1, uid: 1 },
                "u".into(),
                hello(&"a".repeat(5000)),
                tx,
            )
            .unwrap_err();
        assert_eq!(e.0, Status::InvalidArgument);
    }

    #[test]
    fn peers_that_leave_give_their_place_back() {
        let mut reg = Registry::new(Limits {
            max_peers: 4,
            ..Limits::default()
        })
        .unwrap();
        let (stay, _rs) = join(&mut reg, "stay", "u");
        // Ten times as many native peers as there are doorbells, one after the other.
        for i in 0..40 {
            let (p, _rp) = join(&mut reg, &format!("churn{i}"), "u");
            reg.remove(p, "peer has left");
            reg.take_actions();
        }
        assert_eq!(reg.peer_count(), 1);
        assert!(reg.peers[&stay].doorbell.is_some());
        let mut bells: Vec<u32> = (0..3)
            .map(|i| {
                let (p, rp) = join(&mut reg, &format!("last{i}"), "u");
                std::mem::forget(rp);
                reg.peers[&p].doorbell.unwrap()
            })
            .collect();
        bells.push(reg.peers[&stay].doorbell.unwrap());
        bells.sort();
        assert_eq!(bells, [0, 1, 2, 3], "every doorbell in use once");
    }
}
