//! The gateway's side of shared contexts: it creates each context's segment, hands it to the
//! peers that use it, keeps the table of subscribers' doorbells in the segment, announces
//! contexts, destroys them, and frees the writer lock of a peer that died holding it. The data
//! itself never passes through here: writers write the segment directly.

use super::registry::{log_denial, Registry};
use crate::shm::{self, ContextSegment};
use crate::status::Status;
use crate::store::Store;
use crate::wire::frame::{FromGateway, PeerId};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

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
    /// Peers subscribed, with their doorbell (None for peers behind the gateway).
    subscribers: HashMap<PeerId, Option<u32>>,
}

/// All contexts.
#[derive(Default)]
pub(crate) struct Contexts {
    by_id: HashMap<u64, ContextRec>,
    by_name: HashMap<(String, String), u64>,
    /// The last id handed out.
    pub(super) next_id: u64,
}

impl ContextRec {
    /// The segment's (writable) descriptor.
    pub(super) fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }
}

impl Contexts {
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
        self.by_name.insert((user.clone(), name.clone()), id);
        self.by_id.insert(
            id,
            ContextRec {
                id,
                name,
                user,
                fd: Arc::new(fd),
                ro_fd: None,
                store,
                subscribers: HashMap::new(),
            },
        );
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

impl Registry {
    fn user_of(&self, peer: PeerId) -> Option<String> {
        self.peers.get(&peer).map(|p| p.identity.user.clone())
    }

    /// Creates context `name` for `user` if missing; returns its id. Announces new contexts to
    /// everyone of that user.
    pub(crate) fn ensure_context(
        &mut self,
        user: &str,
        name: &str,
    ) -> Result<u64, (Status, String)> {
        if let Some(c) = self.contexts.find(user, name) {
            return Ok(c.id);
        }
        if name.is_empty() || name.len() > self.limits.max_name_len {
            return Err((
                Status::InvalidArgument,
                "Please provide the name as a non-empty string!".into(),
            ));
        }
        if self.contexts.by_id.len() >= self.limits.max_contexts {
            return Err((
                Status::Busy,
                format!("at most {} contexts", self.limits.max_contexts),
            ));
        }
        let snapshot = (self.limits.max_payload as usize)
            .div_ceil(8)
            .clamp(1, shm::MAX_SNAPSHOT / 8)
            * 8;
        let fd = shm::create_context(snapshot, self.limits.context_log)
            .map_err(|e| (Status::Internal, format!("context segment: {e}")))?;
        // Narrow the memfd's mode: a read-only descriptor then cannot be reopened writable.
        crate::sys::memfd::restrict_mode(&fd)
            .map_err(|e| (Status::Internal, format!("context segment: {e}")))?;
        let seg = ContextSegment::open(&fd)
            .map_err(|e| (Status::Internal, format!("context segment: {e}")))?;
        let store =
            Store::new(seg).map_err(|e| (Status::Internal, format!("context segment: {e}")))?;
        self.contexts.next_id += 1;
        let id = self.contexts.next_id;
        self.contexts.by_id.insert(
            id,
            ContextRec {
                id,
                name: name.to_string(),
                user: user.to_string(),
                fd: Arc::new(fd),
                ro_fd: None,
                store,
                subscribers: HashMap::new(),
            },
        );
        self.contexts
            .by_name
            .insert((user.to_string(), name.to_string()), id);
        self.keep_context_created(id);
        let audience: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.identity.user == user)
            .map(|(id, _)| *id)
            .collect();
        for p in audience {
            self.send(
                p,
                FromGateway::ContextAdded {
                    id,
                    name: name.to_string(),
                },
                Vec::new(),
            );
        }
        Ok(id)
    }

    /// Maps context `name` for `from` (creating it when asked).
    pub(crate) fn open_context(&mut self, from: PeerId, req: u64, name: String, create: bool) {
        let Some(user) = self.user_of(from) else {
            return;
        };
        let (read, write) = self.context_access(from, &name);
        if !read {
            let msg = "Not authorized to read context".to_string();
            if let Some(p) = self.peers.get(&from) {
                log_denial(&p.identity, "context.read", &name, "the gateway");
            }
            return self.fail(from, req, Status::PermissionDenied, msg);
        }
        let id = match self.contexts.find(&user, &name) {
            Some(c) => c.id,
            None if create && !write => {
                if let Some(p) = self.peers.get(&from) {
                    log_denial(&p.identity, "context.write", &name, "the gateway");
                }
                let msg = "Not authorized to create context".to_string();
                return self.fail(from, req, Status::PermissionDenied, msg);
            }
            None if create => match self.ensure_context(&user, &name) {
                Ok(id) => id,
                Err((s, m)) => return self.fail(from, req, s, m),
            },
            None => {
                return self.fail(
                    from,
                    req,
                    Status::NotFound,
                    format!("context with {name} does not exist"),
                )
            }
        };
        let Some(c) = self.contexts.by_id.get_mut(&id) else {
            return;
        };
        let fd = if write {
            c.fd.clone()
        } else {
            if c.ro_fd.is_none() {
                match crate::sys::memfd::read_only(&*c.fd) {
                    Ok(fd) => c.ro_fd = Some(Arc::new(fd)),
                    Err(e) => {
                        return self.fail(
                            from,
                            req,
                            Status::Internal,
                            format!("read-only segment: {e}"),
                        )
                    }
                }
            }
            c.ro_fd.clone().unwrap_or_else(|| c.fd.clone())
        };
        let msg = FromGateway::ContextOpened {
            req,
            id,
            name,
            writable: write,
        };
        self.send(from, msg, vec![fd]);
    }

    /// Adds `from`'s doorbell to context `id`'s subscribers.
    pub(crate) fn subscribe_context(&mut self, from: PeerId, req: u64, id: u64) {
        let (Some(user), Some(peer)) = (self.user_of(from), self.peers.get(&from)) else {
            return;
        };
        let doorbell = peer.doorbell;
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

    /// Removes `from` from context `id`'s subscribers.
    pub(crate) fn unsubscribe_context(&mut self, from: PeerId, req: u64, id: u64) {
        if let Some(c) = self.contexts.by_id.get_mut(&id) {
            if let Some(Some(d)) = c.subscribers.remove(&from) {
                c.store.ctl().remove_subscriber(d);
            }
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
                if !self.context_access(from, &c.name).1 {
                    if let Some(p) = self.peers.get(&from) {
                        log_denial(&p.identity, "context.write", &c.name, "the gateway");
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
        self.remove_context(id);
        self.send(from, FromGateway::Ack { req }, Vec::new());
    }

    /// Forgets a context and tells everyone of its user.
    pub(crate) fn remove_context(&mut self, id: u64) {
        let Some(c) = self.contexts.by_id.remove(&id) else {
            return;
        };
        self.contexts
            .by_name
            .remove(&(c.user.clone(), c.name.clone()));
        self.keep_context_removed(id);
        let audience: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.identity.user == c.user)
            .map(|(id, _)| *id)
            .collect();
        for p in audience {
            self.send(
                p,
                FromGateway::ContextDestroyed {
                    id,
                    name: c.name.clone(),
                },
                Vec::new(),
            );
        }
    }

    /// A peer left: drop its subscriptions and free any writer lock it held (it may have died
    /// mid-update; the store's commit order keeps the data consistent either way).
    pub(crate) fn contexts_peer_left(&mut self, peer: PeerId) {
        let mut notify = Vec::new();
        for c in self.contexts.by_id.values_mut() {
            if let Some(Some(d)) = c.subscribers.remove(&peer) {
                c.store.ctl().remove_subscriber(d);
            }
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
        }
        for d in notify {
            self.ring(d);
        }
    }
}
