//! The gateway's side of shared contexts: it creates each context's segment, hands it to the
//! peers that use it, keeps the table of subscribers' doorbells in the segment, announces
//! contexts, destroys them, and frees the writer lock of a peer that died holding it. The data
//! itself never passes through here: writers write the segment directly.
//!
//! Lifetimes (GW3's, asked for by web peers; native clients create `Retained` contexts):
//! `Retained` lives until destroyed; `RefCounted` until its last member (creator and
//! subscribers) unsubscribes or leaves; `Ownership` until its creator leaves, and only the
//! creator may destroy it. Peers behind the gateway (the WebSocket bridge's) have no doorbell of
//! their own: for them the bridge's doorbell goes into the subscriber table, once per context
//! however many of them subscribe.

use super::registry::{log_denial, DeniedBy, Registry};
use crate::model::policy::Action as PolicyAction;
use crate::shm::{self, ContextSegment};
use crate::status::Status;
use crate::store::Store;
use crate::wire::frame::{ContextGone, ContextLifetime, FromGateway, PeerId, Transport};
use crate::wire::Value;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// How many contexts this process has room for: each holds a descriptor and two memory
/// mappings, and the gateway must keep descriptors for connections and lanes and mappings for
/// everything else, whatever the contexts (a web client creating contexts in a loop once took
/// every descriptor, and then nobody could connect). An eighth of the descriptors (at least
/// 128) and of the mappings stays for the rest.
fn context_capacity() -> usize {
    static MAPS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let maps = *MAPS.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    });
    capacity_for(crate::sys::limits::nofile().0, maps)
}

/// [`context_capacity`] for a descriptor limit and a mapping limit (`None`: unlimited).
fn capacity_for(nofile: Option<u64>, max_maps: Option<u64>) -> usize {
    let fds = nofile.map_or(u64::MAX, |n| n - (n / 8).max(128).min(n));
    let maps = max_maps.map_or(u64::MAX, |n| (n - n / 8) / 2);
    usize::try_from(fds.min(maps)).unwrap_or(usize::MAX)
}

/// One context.
pub(crate) struct ContextRec {
    pub id: u64,
    pub name: String,
    /// Contexts are per user: two users may each have a context of the same name.
    pub user: String,
    fd: Arc<OwnedFd>,
    /// A read-only descriptor for peers that may not write (made on first need).
    ro_fd: Option<Arc<OwnedFd>>,
    pub store: Store<ContextSegment>,
    /// Peers subscribed (the members), with the doorbell rung for them.
    subscribers: HashMap<PeerId, Option<u32>>,
    pub lifetime: ContextLifetime,
    /// Who created it (the owner of an `Ownership` context); `None`: the gateway.
    pub creator: Option<PeerId>,
}

/// All contexts.
#[derive(Default)]
pub(crate) struct Contexts {
    by_id: HashMap<u64, ContextRec>,
    by_name: HashMap<(String, String), u64>,
    /// How many contexts each user has.
    per_user: HashMap<String, usize>,
    /// The last id handed out.
    pub(super) next_id: u64,
    /// The doorbell rung for subscribers behind the gateway (the bridge's), if it runs.
    pub(crate) relay_bell: Option<u32>,
}

impl ContextRec {
    /// The segment's (writable) descriptor.
    pub(super) fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }
}

impl Contexts {
    fn insert(&mut self, rec: ContextRec) {
        self.by_name
            .insert((rec.user.clone(), rec.name.clone()), rec.id);
        *self.per_user.entry(rec.user.clone()).or_default() += 1;
        self.by_id.insert(rec.id, rec);
    }

    fn remove(&mut self, id: u64) -> Option<ContextRec> {
        let c = self.by_id.remove(&id)?;
        self.by_name.remove(&(c.user.clone(), c.name.clone()));
        if let Some(n) = self.per_user.get_mut(&c.user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&c.user);
            }
        }
        Some(c)
    }

    /// How many contexts `user` has.
    pub(super) fn of_user(&self, user: &str) -> usize {
        self.per_user.get(user).copied().unwrap_or(0)
    }

    /// How many contexts exist.
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Every context's id.
    pub(super) fn ids(&self) -> Vec<u64> {
        self.by_id.keys().copied().collect()
    }

    /// Every context.
    pub(super) fn iter(&self) -> impl Iterator<Item = &ContextRec> {
        self.by_id.values()
    }

    /// Adds a context adopted from the keeper (validated by the caller; nobody subscribed).
    pub(super) fn insert_adopted(
        &mut self,
        id: u64,
        name: String,
        user: String,
        fd: OwnedFd,
        store: Store<ContextSegment>,
    ) {
        self.insert(ContextRec {
            id,
            name,
            user,
            fd: Arc::new(fd),
            ro_fd: None,
            store,
            subscribers: HashMap::new(),
            // The keeper holds segments, not lifetimes: an adopted context is retained
            // (its data is what a restart must not lose; docs/guarantees.md).
            lifetime: ContextLifetime::Retained,
            creator: None,
        });
    }

    /// (id, name) of every context `user` may see, by id.
    pub(crate) fn visible_to(&self, user: &str) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = self
            .by_id
            .values()
            .filter(|c| c.user == user)
            .map(|c| (c.id, c.name.clone()))
            .collect();
        v.sort();
        v
    }

    /// (id, owner) of the `Ownership` contexts `user` may see.
    pub(crate) fn owners_visible_to(&self, user: &str) -> Vec<(u64, PeerId)> {
        let mut v: Vec<(u64, PeerId)> = self
            .by_id
            .values()
            .filter(|c| c.user == user && c.lifetime == ContextLifetime::Ownership)
            .filter_map(|c| c.creator.map(|p| (c.id, p)))
            .collect();
        v.sort();
        v
    }

    /// A context by id.
    pub(crate) fn get(&self, id: u64) -> Option<&ContextRec> {
        self.by_id.get(&id)
    }

    /// A context by user and name.
    pub(crate) fn find(&self, user: &str, name: &str) -> Option<&ContextRec> {
        self.by_name
            .get(&(user.to_string(), name.to_string()))
            .and_then(|id| self.by_id.get(id))
    }
}

/// Forgets `peer` as a subscriber of `c`; its doorbell leaves the table when nobody else rings
/// it. Returns whether it was a member.
fn drop_subscriber(c: &mut ContextRec, peer: PeerId) -> bool {
    match c.subscribers.remove(&peer) {
        Some(Some(d)) => {
            if !c.subscribers.values().any(|x| *x == Some(d)) {
                c.store.ctl().remove_subscriber(d);
            }
            true
        }
        Some(None) => true,
        None => false,
    }
}

impl Registry {
    fn user_of(&self, peer: PeerId) -> Option<String> {
        self.peers.get(&peer).map(|p| p.identity.user.clone())
    }

    /// The doorbell to ring for `peer` when a context it subscribed to changes.
    fn doorbell_for(&self, peer: PeerId) -> Option<u32> {
        let p = self.peers.get(&peer)?;
        match (p.doorbell, p.transport) {
            (Some(d), _) => Some(d),
            (None, Transport::Relay) => self.contexts.relay_bell,
            (None, Transport::Shm) => None,
        }
    }

    /// A name no context may have (empty, or longer than `max_name_len`) is refused for every
    /// operation, as `BadInput` (what the client libraries have always said of an empty name)
    /// naming the limit.
    fn check_context_name(&self, name: &str) -> Result<(), (Status, String)> {
        crate::model::check_context_name(name, self.limits.max_name_len)
            .map_err(|m| (Status::BadInput, m))
    }

    /// Makes the segment and the record of a new context, without telling anyone yet.
    pub(crate) fn new_context(
        &mut self,
        user: &str,
        name: &str,
        lifetime: ContextLifetime,
        creator: Option<PeerId>,
    ) -> Result<u64, (Status, String)> {
        self.check_context_name(name)?;
        let max = self.limits.max_contexts.min(context_capacity());
        if self.contexts.len() >= max {
            return Err((Status::Busy, format!("at most {max} contexts")));
        }
        // One user never takes the others' last eighth.
        let per_user = self.limits.max_contexts_per_user.min(max - max / 8);
        if self.contexts.of_user(user) >= per_user {
            return Err((
                Status::Busy,
                format!("at most {per_user} contexts per user"),
            ));
        }
        let snapshot = (self.limits.max_payload as usize)
            .div_ceil(8)
            .clamp(1, shm::MAX_SNAPSHOT / 8)
            * 8;
        let fd = shm::create_context(snapshot, self.limits.context_log)
            .map_err(|e| (Status::Internal, format!("context segment: {e}")))?;
        // Narrow the memfd's mode: a read-only descriptor then cannot be reopened writable
        // as it is (its holder could change the mode back: `memfd::read_only`).
        crate::sys::memfd::restrict_mode(&fd)
            .map_err(|e| (Status::Internal, format!("context segment: {e}")))?;
        let seg = ContextSegment::open(&fd)
            .map_err(|e| (Status::Internal, format!("context segment: {e}")))?;
        let store =
            Store::new(seg).map_err(|e| (Status::Internal, format!("context segment: {e}")))?;
        self.contexts.next_id += 1;
        let id = self.contexts.next_id;
        self.contexts.insert(ContextRec {
            id,
            name: name.to_string(),
            user: user.to_string(),
            fd: Arc::new(fd),
            ro_fd: None,
            store,
            subscribers: HashMap::new(),
            lifetime,
            creator,
        });
        self.keep_context_created(id);
        Ok(id)
    }

    /// Tells everyone of the context's user (its creator included) that it exists.
    pub(crate) fn announce_context(&mut self, id: u64) {
        let Some(c) = self.contexts.by_id.get(&id) else {
            return;
        };
        let msg = FromGateway::ContextAdded {
            id,
            name: c.name.clone(),
            creator: c.creator,
        };
        let audience: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.identity.user == c.user)
            .map(|(id, _)| *id)
            .collect();
        for p in audience {
            self.send(p, msg.clone(), Vec::new());
        }
    }

    /// The descriptor `peer` may have for context `id`: read-write, or read-only when it may
    /// not write. `None` when it may not read, with the failure to send.
    fn context_fd(
        &mut self,
        peer: PeerId,
        id: u64,
    ) -> Result<(Arc<OwnedFd>, bool), (Status, String)> {
        let Some(c) = self.contexts.by_id.get(&id) else {
            return Err((
                Status::NotFound,
                format!("Unable to find context with id {id}"),
            ));
        };
        let (read, write) = self.context_access(peer, &c.name);
        if !read {
            if let Some(p) = self.peers.get(&peer) {
                log_denial(
                    &p.identity,
                    PolicyAction::ContextRead,
                    &c.name,
                    DeniedBy::Gateway,
                );
            }
            return Err((
                Status::PermissionDenied,
                "Not authorized to read context".into(),
            ));
        }
        let Some(c) = self.contexts.by_id.get_mut(&id) else {
            return Err((
                Status::NotFound,
                format!("Unable to find context with id {id}"),
            ));
        };
        if write {
            return Ok((c.fd.clone(), true));
        }
        if c.ro_fd.is_none() {
            let fd = crate::sys::memfd::read_only(&*c.fd)
                .map_err(|e| (Status::Internal, format!("read-only segment: {e}")))?;
            c.ro_fd = Some(Arc::new(fd));
        }
        Ok((c.ro_fd.clone().unwrap_or_else(|| c.fd.clone()), false))
    }

    /// Maps context `name` for `from` (a write to a missing one creates it with
    /// [`Registry::open_or_create`]).
    pub(crate) fn open_context(&mut self, from: PeerId, req: u64, name: String) {
        let Some(user) = self.user_of(from) else {
            return;
        };
        if let Err((s, m)) = self.check_context_name(&name) {
            return self.fail(from, req, s, m);
        }
        let (read, _) = self.context_access(from, &name);
        if !read {
            let msg = "Not authorized to read context".to_string();
            if let Some(p) = self.peers.get(&from) {
                log_denial(
                    &p.identity,
                    PolicyAction::ContextRead,
                    &name,
                    DeniedBy::Gateway,
                );
            }
            return self.fail(from, req, Status::PermissionDenied, msg);
        }
        let id = match self.contexts.find(&user, &name) {
            Some(c) => c.id,
            None => {
                return self.fail(
                    from,
                    req,
                    Status::NotFound,
                    format!("context with {name} does not exist"),
                )
            }
        };
        match self.context_fd(from, id) {
            Ok((fd, writable)) => {
                let msg = FromGateway::ContextOpened {
                    req,
                    id,
                    name,
                    writable,
                };
                self.send(from, msg, vec![fd]);
            }
            Err((s, m)) => self.fail(from, req, s, m),
        }
    }

    /// GW3's `create-context`: a new context holding `data` with the given lifetime, or (when
    /// the name exists) the existing one, whose data stays as it is. Either way `from` becomes a
    /// member; the answer carries the segment.
    pub(crate) fn create_context(
        &mut self,
        from: PeerId,
        req: u64,
        name: String,
        lifetime: ContextLifetime,
        data: Value,
    ) {
        let (id, created) = match self.existing_or_made(from, &name, lifetime, data) {
            Ok(Some(x)) => x,
            Ok(None) => return,
            Err((s, m)) => return self.fail(from, req, s, m),
        };
        let (fd, writable) = match self.context_fd(from, id) {
            Ok(x) => x,
            Err((s, m)) => {
                if created {
                    self.announce_context(id);
                }
                return self.fail(from, req, s, m);
            }
        };
        let doorbell = self.doorbell_for(from);
        if let Some(c) = self.contexts.by_id.get_mut(&id) {
            if let Some(d) = doorbell {
                if !c.store.ctl().add_subscriber(d) {
                    crate::log::warn(format_args!("context {name:?}: subscriber table full"));
                }
            }
            c.subscribers.insert(from, doorbell);
        }
        if created {
            self.announce_context(id);
        }
        let msg = self.created_reply(req, id, name, created, writable);
        self.send(from, msg, vec![fd]);
    }

    /// The context `name` of `from`'s user, or, when there is none and `from` may create it,
    /// one made holding `data` (`from` its creator and updater): `(id, created)`. `None`:
    /// `from` is gone.
    fn existing_or_made(
        &mut self,
        from: PeerId,
        name: &str,
        lifetime: ContextLifetime,
        data: Value,
    ) -> Result<Option<(u64, bool)>, (Status, String)> {
        let Some(user) = self.user_of(from) else {
            return Ok(None);
        };
        self.check_context_name(name)?;
        let (read, write) = self.context_access(from, name);
        let existing = self.contexts.find(&user, name).map(|c| c.id);
        if !read || (existing.is_none() && !write) {
            let (action, msg) = if read {
                (
                    PolicyAction::ContextWrite,
                    "Not authorized to create context",
                )
            } else {
                (PolicyAction::ContextRead, "Not authorized to read context")
            };
            if let Some(p) = self.peers.get(&from) {
                log_denial(&p.identity, action, name, DeniedBy::Gateway);
            }
            return Err((Status::PermissionDenied, msg.to_string()));
        }
        Ok(Some(match existing {
            Some(id) => (id, false),
            None => (
                self.new_context_holding(&user, name, lifetime, from, data)?,
                true,
            ),
        }))
    }

    /// The answer to `CreateContext` or `OpenOrCreate`, with the context's version now (when
    /// `created`: the version its data was written at).
    fn created_reply(
        &self,
        req: u64,
        id: u64,
        name: String,
        created: bool,
        writable: bool,
    ) -> FromGateway {
        let version = self
            .contexts
            .by_id
            .get(&id)
            .map_or(0, |c| c.store.ctl().version());
        FromGateway::ContextCreated {
            req,
            id,
            name,
            created,
            writable,
            version,
        }
    }

    /// A new context `name` of `user` holding `data` (an object), written with `creator` as
    /// the updater before anyone hears of the context; announced only after that.
    fn new_context_holding(
        &mut self,
        user: &str,
        name: &str,
        lifetime: ContextLifetime,
        creator: PeerId,
        data: Value,
    ) -> Result<u64, (Status, String)> {
        let Value::Map(data) = data else {
            return Err((
                Status::InvalidArgument,
                "Please provide the data as an object!".into(),
            ));
        };
        let id = self.new_context(user, name, lifetime, Some(creator))?;
        // Nobody else has the segment yet: the lock is free and the data is in place before
        // anyone hears of the context.
        let max = self.limits.max_payload as usize;
        let written = self.contexts.by_id.get(&id).map(|c| {
            crate::store::context::write(
                &c.store,
                creator.0,
                &crate::model::context::ContextOp::Set(data),
                None,
                max,
                std::time::Duration::from_secs(1),
                None,
            )
        });
        match written {
            Some(Err(e)) => {
                self.contexts.remove(id);
                let status = match e {
                    crate::store::context::WriteError::TooLarge { .. } => Status::PayloadTooLarge,
                    _ => Status::InvalidArgument,
                };
                Err((status, e.to_string()))
            }
            _ => Ok(id),
        }
    }

    /// A native write to a context the writer does not have: the context, or one made holding
    /// the writer's `data` before anyone hears of it, so nobody (web subscribers waiting for the
    /// name included) sees it empty first. The writer does not become a member.
    pub(crate) fn open_or_create(&mut self, from: PeerId, req: u64, name: String, data: Value) {
        let (id, created) =
            match self.existing_or_made(from, &name, ContextLifetime::Retained, data) {
                Ok(Some(x)) => x,
                Ok(None) => return,
                Err((s, m)) => return self.fail(from, req, s, m),
            };
        if created {
            self.announce_context(id);
        }
        match self.context_fd(from, id) {
            Ok((fd, writable)) => {
                // Asked for to write: a read-only mapping is the refusal of that write (the
                // writer's library reports it as `PERMISSION_DENIED`).
                if !writable {
                    if let Some(p) = self.peers.get(&from) {
                        log_denial(
                            &p.identity,
                            PolicyAction::ContextWrite,
                            &name,
                            DeniedBy::Gateway,
                        );
                    }
                }
                let msg = self.created_reply(req, id, name, created, writable);
                self.send(from, msg, vec![fd]);
            }
            Err((s, m)) => self.fail(from, req, s, m),
        }
    }

    /// Adds `from` to context `id`'s subscribers (members).
    pub(crate) fn subscribe_context(&mut self, from: PeerId, req: u64, id: u64) {
        let Some(user) = self.user_of(from) else {
            return;
        };
        let doorbell = self.doorbell_for(from);
        let readable = self
            .contexts
            .by_id
            .get(&id)
            .filter(|c| c.user == user)
            .map(|c| self.context_access(from, &c.name).0);
        match readable {
            None => {
                return self.fail(
                    from,
                    req,
                    Status::NotFound,
                    format!("Unable to find context with id {id}"),
                )
            }
            Some(false) => {
                return self.fail(
                    from,
                    req,
                    Status::PermissionDenied,
                    "Not authorized to read context".into(),
                )
            }
            Some(true) => {}
        }
        let Some(c) = self.contexts.by_id.get_mut(&id) else {
            return;
        };
        if let Some(d) = doorbell {
            if !c.store.ctl().add_subscriber(d) {
                let msg = "too many subscribers to one context".to_string();
                return self.fail(from, req, Status::Busy, msg);
            }
        }
        c.subscribers.insert(from, doorbell);
        self.send(from, FromGateway::Ack { req }, Vec::new());
    }

    /// Removes `from` from context `id`'s subscribers; a ref-counted context that loses its
    /// last member goes (everyone hears of it before the answer).
    pub(crate) fn unsubscribe_context(&mut self, from: PeerId, req: u64, id: u64) {
        let mut last = false;
        if let Some(c) = self.contexts.by_id.get_mut(&id) {
            last = drop_subscriber(c, from)
                && c.lifetime == ContextLifetime::RefCounted
                && c.subscribers.is_empty();
        }
        if last {
            self.remove_context(id, ContextGone::LastMemberLeft);
        }
        self.send(from, FromGateway::Ack { req }, Vec::new());
    }

    /// Destroys context `id` for everyone of its user.
    pub(crate) fn destroy_context(&mut self, from: PeerId, req: u64, id: u64) {
        let Some(user) = self.user_of(from) else {
            return;
        };
        match self.contexts.by_id.get(&id) {
            Some(c) if c.user == user => {
                let not_owner = c.lifetime == ContextLifetime::Ownership && c.creator != Some(from);
                // Destroying takes what writing takes: a peer that may not read a context may
                // not write it (it is refused a mapping), so neither may it destroy it.
                let (read, write) = self.context_access(from, &c.name);
                if not_owner || !read || !write {
                    let action = if read {
                        PolicyAction::ContextWrite
                    } else {
                        PolicyAction::ContextRead
                    };
                    if let Some(p) = self.peers.get(&from).filter(|_| !not_owner) {
                        log_denial(&p.identity, action, &c.name, DeniedBy::Gateway);
                    }
                    return self.fail(
                        from,
                        req,
                        Status::PermissionDenied,
                        "Not authorized to destroy context".into(),
                    );
                }
            }
            _ => {
                return self.fail(
                    from,
                    req,
                    Status::NotFound,
                    format!("context with id {id} does not exist"),
                )
            }
        }
        self.remove_context(id, ContextGone::Destroyed);
        self.send(from, FromGateway::Ack { req }, Vec::new());
    }

    /// Forgets a context and tells everyone of its user.
    pub(crate) fn remove_context(&mut self, id: u64, reason: ContextGone) {
        let Some(c) = self.take_context(id) else {
            return;
        };
        for p in self.same_user(&c.user) {
            self.send(
                p,
                FromGateway::ContextDestroyed {
                    id,
                    name: c.name.clone(),
                    reason,
                },
                Vec::new(),
            );
        }
    }

    /// Forgets context `id` without telling anyone (yet: the segment is retired first, so a
    /// peer that writes it before it reads the notice finds it gone, `StoreCtl::retire`).
    fn take_context(&mut self, id: u64) -> Option<ContextRec> {
        let c = self.contexts.remove(id)?;
        c.store.ctl().retire();
        self.keep_context_removed(id);
        Some(c)
    }

    /// Every peer of `user`.
    fn same_user(&self, user: &str) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.identity.user == user)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A peer left: drop its subscriptions and free any writer lock it held (it may have died
    /// mid-update; the store's commit order keeps the data consistent either way). Its
    /// ownership contexts go, and so do ref-counted contexts it was the last member of.
    pub(crate) fn contexts_peer_left(&mut self, peer: PeerId) {
        let mut notify = Vec::new();
        let mut gone = Vec::new();
        for c in self.contexts.by_id.values_mut() {
            let member = drop_subscriber(c, peer);
            if c.store.ctl().break_lock(peer.0) {
                crate::log::warn(format_args!(
                    "{peer} died holding the lock of context {:?}; freed",
                    c.name
                ));
                // It may have published its version and died before logging it: log the
                // current version again so subscribers hear of it now, not at the next write.
                // If another writer took the lock meanwhile, its record does that instead.
                let mut tries = 0;
                let guard = c.store.lock(super::channels::GATEWAY_TOKEN, || {
                    tries += 1;
                    tries > 1
                });
                if let Ok(g) = guard {
                    if g.reannounce(crate::store::context::KIND_OP) != 0 {
                        drop(g);
                        c.store.ctl().for_each_subscriber(|d| notify.push(d));
                    }
                }
            }
            match c.lifetime {
                ContextLifetime::Ownership if c.creator == Some(peer) => {
                    gone.push((c.id, ContextGone::OwnerLeft))
                }
                ContextLifetime::RefCounted if member && c.subscribers.is_empty() => {
                    gone.push((c.id, ContextGone::LastMemberLeft))
                }
                _ => {}
            }
        }
        // One notice per user for all of them: a peer may own up to `max_contexts`, and a
        // notice per context would be a burst beyond every other peer's queue.
        gone.sort_by_key(|g| g.0);
        let mut by_user: BTreeMap<String, Vec<(u64, String, ContextGone)>> = BTreeMap::new();
        for (id, reason) in gone {
            if let Some(c) = self.take_context(id) {
                by_user
                    .entry(c.user)
                    .or_default()
                    .push((id, c.name, reason));
            }
        }
        for (user, gone) in by_user {
            for p in self.same_user(&user) {
                let msg = FromGateway::ContextsDestroyed { gone: gone.clone() };
                self.send(p, msg, Vec::new());
            }
        }
        for d in notify {
            self.ring(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::registry::tests::{join_web, web_admission};
    use crate::gateway::registry::{Limits, Outgoing};
    use tokio::sync::mpsc;

    fn drain(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<FromGateway> {
        let mut v = Vec::new();
        while let Ok(o) = rx.try_recv() {
            v.push(o.msg);
        }
        v
    }

    fn created(msgs: &[FromGateway]) -> Option<(u64, bool)> {
        msgs.iter().find_map(|m| match m {
            FromGateway::ContextCreated { id, created, .. } => Some((*id, *created)),
            _ => None,
        })
    }

    fn destroyed(msgs: &[FromGateway]) -> Vec<(u64, ContextGone)> {
        msgs.iter()
            .flat_map(|m| match m {
                FromGateway::ContextDestroyed { id, reason, .. } => vec![(*id, *reason)],
                FromGateway::ContextsDestroyed { gone } => {
                    gone.iter().map(|(id, _, reason)| (*id, *reason)).collect()
                }
                _ => Vec::new(),
            })
            .collect()
    }

    fn registry() -> Registry {
        registry_with(Limits::default())
    }

    /// A registry without channels (their contexts would be in every count).
    fn registry_with(limits: Limits) -> Registry {
        let mut reg = Registry::new(limits).unwrap();
        reg.set_channels(crate::gateway::channels::ChannelConfig {
            channels: Vec::new(),
            restrictions: Vec::new(),
        });
        reg
    }

    #[test]
    fn contexts_leave_descriptors_and_mappings_for_everything_else() {
        assert_eq!(capacity_for(Some(20_000), Some(65_530)), 17_500);
        assert_eq!(capacity_for(Some(1024), Some(65_530)), 896);
        assert_eq!(capacity_for(Some(100), None), 0, "too few to spare any");
        assert_eq!(capacity_for(Some(1 << 20), Some(65_530)), 28_669);
        assert_eq!(capacity_for(None, None), usize::MAX);
    }

    #[test]
    fn one_user_cannot_take_every_context() {
        let mut reg = registry_with(Limits {
            max_contexts_per_user: 3,
            ..Limits::default()
        });
        let (m, mut rm) = join_web(&mut reg, "M", "mallory");
        let (a, mut ra) = join_web(&mut reg, "A", "alice");
        for i in 0..4 {
            reg.create_context(
                m,
                i,
                format!("c{i}"),
                ContextLifetime::Retained,
                Value::map(),
            );
        }
        let msgs = drain(&mut rm);
        let refused: Vec<&String> = msgs
            .iter()
            .filter_map(|m| match m {
                FromGateway::Fail {
                    status: Status::Busy,
                    message,
                    ..
                } => Some(message),
                _ => None,
            })
            .collect();
        assert_eq!(refused, ["at most 3 contexts per user"], "{msgs:?}");
        assert!(reg.contexts.find("mallory", "c3").is_none());
        reg.create_context(a, 9, "mine".into(), ContextLifetime::Retained, Value::map());
        assert!(created(&drain(&mut ra)).is_some(), "others still create");
        // A context destroyed gives its place back.
        let id = reg.contexts.find("mallory", "c0").unwrap().id;
        reg.remove_context(id, ContextGone::Destroyed);
        reg.create_context(
            m,
            10,
            "again".into(),
            ContextLifetime::Retained,
            Value::map(),
        );
        assert!(created(&drain(&mut rm)).is_some());
    }

    #[test]
    fn create_announces_to_the_user_and_joins_an_existing_name() {
        let mut reg = registry();
        let (a, mut ra) = join_web(&mut reg, "A", "u");
        let (b, mut rb) = join_web(&mut reg, "B", "u");
        let (_z, mut rz) = join_web(&mut reg, "Z", "other");
        drain(&mut ra);
        drain(&mut rb);
        drain(&mut rz);
        let data = Value::object([("a", Value::from(1))]);
        reg.create_context(a, 1, "c".into(), ContextLifetime::Retained, data);
        let msgs = drain(&mut ra);
        assert!(
            matches!(&msgs[0], FromGateway::ContextAdded { creator: Some(p), .. } if *p == a),
            "{msgs:?}"
        );
        let (id, fresh) = created(&msgs).unwrap();
        assert!(fresh);
        assert!(matches!(
            drain(&mut rb)[0],
            FromGateway::ContextAdded { .. }
        ));
        assert!(drain(&mut rz).is_empty(), "other users hear nothing");
        let c = reg.contexts.get(id).unwrap();
        let mut buf = Vec::new();
        assert_eq!(c.store.read(&mut buf).unwrap().updater, a.0);
        // The same name again: joined, data untouched.
        reg.create_context(b, 2, "c".into(), ContextLifetime::Retained, Value::map());
        assert_eq!(created(&drain(&mut rb)), Some((id, false)));
        let w = reg.admit(web_admission("W", "u"), mpsc::channel(8).0);
        assert_eq!(w.unwrap().1.contexts, vec![(id, "c".to_string())]);
        // A bad lifetime never reaches here; bad data does.
        reg.create_context(a, 3, "d".into(), ContextLifetime::Retained, Value::from(1));
        assert!(drain(&mut ra).iter().any(|m| matches!(
            m,
            FromGateway::Fail {
                req: 3,
                status: Status::InvalidArgument,
                ..
            }
        )));
        assert!(reg.contexts.find("u", "d").is_none());
    }

    #[test]
    fn a_write_creates_its_context_holding_the_data_before_announcing_it() {
        let mut reg = registry_with(Limits {
            max_payload: 64,
            ..Limits::default()
        });
        let (a, mut ra) = join_web(&mut reg, "A", "u");
        let (b, mut rb) = join_web(&mut reg, "B", "u");
        drain(&mut ra);
        drain(&mut rb);
        let data = Value::object([("a", Value::from(1))]);
        reg.open_or_create(a, 1, "n".into(), data.clone());
        let msgs = drain(&mut ra);
        let id = match &msgs[..] {
            [FromGateway::ContextAdded { id, .. }, FromGateway::ContextCreated {
                req: 1,
                id: made,
                created: true,
                version: 1,
                ..
            }] if id == made => *id,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            drain(&mut rb)[..],
            [FromGateway::ContextAdded { .. }]
        ));
        // Announced holding the data, with the writer as its updater; the writer is not a
        // member (unlike GW3's `create-context`).
        let c = reg.contexts.get(id).unwrap();
        let mut buf = Vec::new();
        let info = c.store.read(&mut buf).unwrap();
        assert_eq!((info.version, info.updater), (1, a.0));
        assert_eq!(crate::wire::codec::decode(&buf).unwrap(), data);
        assert!(c.subscribers.is_empty());
        // The name again: the context as it is, nothing written.
        reg.open_or_create(b, 2, "n".into(), Value::object([("b", Value::from(2))]));
        assert!(matches!(
            drain(&mut rb)[..],
            [FromGateway::ContextCreated {
                created: false,
                version: 1,
                ..
            }]
        ));
        // Data over the limit: refused, and nothing made or announced.
        let big = Value::object([("pad", Value::Bytes(vec![0; 100]))]);
        reg.open_or_create(a, 3, "big".into(), big);
        assert!(matches!(
            drain(&mut ra)[..],
            [FromGateway::Fail {
                req: 3,
                status: Status::PayloadTooLarge,
                ..
            }]
        ));
        assert!(drain(&mut rb).is_empty());
        assert!(reg.contexts.find("u", "big").is_none());
    }

    #[test]
    fn ref_counted_contexts_go_with_their_last_member() {
        let mut reg = registry();
        let (y, mut ry) = join_web(&mut reg, "Y", "u");
        let (w, mut rw) = join_web(&mut reg, "W", "u");
        reg.create_context(y, 1, "rc".into(), ContextLifetime::RefCounted, Value::map());
        let (id, _) = created(&drain(&mut ry)).unwrap();
        reg.subscribe_context(w, 2, id);
        reg.unsubscribe_context(y, 3, id);
        assert!(destroyed(&drain(&mut ry)).is_empty(), "W is still a member");
        drain(&mut rw);
        reg.unsubscribe_context(w, 4, id);
        let msgs = drain(&mut rw);
        assert_eq!(destroyed(&msgs), vec![(id, ContextGone::LastMemberLeft)]);
        assert!(
            matches!(msgs.last(), Some(FromGateway::Ack { req: 4 })),
            "destroyed before the answer: {msgs:?}"
        );
        // And when the last member leaves instead.
        reg.create_context(
            y,
            5,
            "rc2".into(),
            ContextLifetime::RefCounted,
            Value::map(),
        );
        let (id2, _) = created(&drain(&mut ry)).unwrap();
        reg.remove(y, "gone");
        assert_eq!(
            destroyed(&drain(&mut rw)),
            vec![(id2, ContextGone::LastMemberLeft)]
        );
    }

    #[test]
    fn ownership_contexts_belong_to_their_creator() {
        let mut reg = registry();
        let (y, mut ry) = join_web(&mut reg, "Y", "u");
        let (w, mut rw) = join_web(&mut reg, "W", "u");
        reg.create_context(w, 1, "own".into(), ContextLifetime::Ownership, Value::map());
        let (id, _) = created(&drain(&mut rw)).unwrap();
        drain(&mut ry);
        reg.destroy_context(y, 2, id);
        assert!(matches!(
            drain(&mut ry)[0],
            FromGateway::Fail {
                status: Status::PermissionDenied,
                ..
            }
        ));
        let (_, welcome) = reg
            .admit(web_admission("L", "u"), mpsc::channel(8).0)
            .unwrap();
        assert_eq!(welcome.context_owners, vec![(id, w)]);
        reg.remove(w, "gone");
        assert_eq!(
            destroyed(&drain(&mut ry)),
            vec![(id, ContextGone::OwnerLeft)]
        );
    }

    #[test]
    fn peers_behind_the_gateway_share_one_doorbell_per_context() {
        let mut reg = registry();
        let (bell, _dir) = reg.reserve_doorbell().unwrap();
        let (a, mut ra) = join_web(&mut reg, "A", "u");
        let (b, _rb) = join_web(&mut reg, "B", "u");
        reg.create_context(a, 1, "c".into(), ContextLifetime::Retained, Value::map());
        let (id, _) = created(&drain(&mut ra)).unwrap();
        reg.subscribe_context(b, 2, id);
        let bells = |reg: &Registry| {
            let mut v = Vec::new();
            reg.contexts
                .get(id)
                .unwrap()
                .store
                .ctl()
                .for_each_subscriber(|i| v.push(i));
            v
        };
        assert_eq!(bells(&reg), vec![bell]);
        reg.unsubscribe_context(a, 3, id);
        assert_eq!(bells(&reg), vec![bell], "B still needs it");
        reg.unsubscribe_context(b, 4, id);
        assert!(bells(&reg).is_empty());
    }
}
