//! Shared contexts for one connection (GW3 `create-context`, `update-context`,
//! `subscribe-context`, `unsubscribe-context`, `destroy-context`; `context-added`,
//! `context-updated`, `context-destroyed`). The registry owns the contexts, their lifetimes and
//! members; the bridge's [`Contexts`](crate::bridge::contexts::Contexts) maps their segments,
//! writes for web peers and follows the logs for them.

use super::{rid, rid_ref, Session};
use crate::bridge::contexts::GW3_NOTE;
use crate::bridge::delta::{self, Plan};
use crate::bridge::gw3::{self, Obj};
use crate::gateway::Outgoing;
use crate::status::Status;
use crate::store::context::{write_noted, WriteError};
use crate::store::StoreError;
use crate::wire::frame::{ContextGone, ContextLifetime, FromGateway, PeerId, ToGateway};
use crate::wire::Value;
use serde_json::{json, Value as J};
use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

/// How long a web write waits for a native writer holding the context's lock (off the
/// gateway's thread).
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Compare-and-set retries of a write computed from the current data.
const CAS_TRIES: usize = 64;

/// What one connection knows of contexts.
#[derive(Default)]
pub(super) struct CtxState {
    /// Contexts announced to the client: id → name.
    known: HashMap<u64, String>,
    /// Contexts mapped for this peer: id → whether it may write.
    open: HashMap<u64, bool>,
    /// Contexts it is a member of (gets `context-updated` for).
    member: HashSet<u64>,
}

/// A failed context request, as GW3 reports it.
struct Refusal {
    uri: &'static str,
    reason: String,
}

impl Refusal {
    fn failure(reason: impl Into<String>) -> Self {
        Refusal {
            uri: "global.errors.failure",
            reason: reason.into(),
        }
    }

    fn from_core(status: Status, message: String) -> Self {
        Refusal {
            uri: match status {
                Status::PermissionDenied => "global.errors.not_authorized",
                _ => "global.errors.failure",
            },
            reason: message,
        }
    }
}

fn unknown(gid: &J) -> Refusal {
    Refusal::failure(format!(
        "Unable to find context with id {}",
        super::echo(gid)
    ))
}

impl Session {
    /// Announces the contexts that exist at login (those of the peer's user only).
    pub(super) fn ctx_welcome(&mut self, contexts: &[(u64, String)], owners: &[(u64, PeerId)]) {
        for (id, name) in contexts {
            let owner = owners.iter().find(|(c, _)| c == id).map(|(_, p)| *p);
            self.ctx_added(*id, name.clone(), owner);
        }
    }

    /// A context the peer may see exists (`creator`: the owner at login, the creator later).
    pub(super) fn ctx_added(&mut self, id: u64, name: String, creator: Option<PeerId>) {
        let Some(me) = self.me.as_mut() else { return };
        me.ctx.known.insert(id, name.clone());
        let creator = creator.map(|p| J::String(self.sh.ids.peer(p)));
        let frame = json!({"domain": "global", "type": "context-added", "peer_id": me.id,
            "creator_id": creator, "context_id": self.sh.ids.ctx(id), "name": name});
        self.send(frame);
    }

    pub(super) fn ctx_destroyed(&mut self, id: u64, reason: ContextGone) {
        self.sh.ctxs.forget(id);
        let Some(me) = self.me.as_mut() else { return };
        me.ctx.known.remove(&id);
        me.ctx.open.remove(&id);
        me.ctx.member.remove(&id);
        let (uri, why) = match reason {
            ContextGone::Destroyed => ("global.destroyed", "Context destroyed explicitly"),
            ContextGone::LastMemberLeft => (
                "global.peer-left",
                "Context destroyed because its owner/last peer left",
            ),
            ContextGone::OwnerLeft => (
                "context.peer-left",
                "Context destroyed because its owner/last peer left",
            ),
        };
        let frame = json!({"domain": "global", "type": "context-destroyed", "peer_id": me.id,
            "context_id": self.sh.ids.ctx(id), "reason_uri": uri, "reason": why});
        self.send(frame);
    }

    /// A context message (`domain`: `global`, or `context` for clients that joined it).
    pub(super) async fn context(&mut self, domain: &str, ty: &str, msg: &Obj) -> bool {
        let r = match ty {
            "create-context" => self.create_context(domain, msg).await,
            "update-context" => self.update_context(domain, msg).await,
            "subscribe-context" => self.subscribe_context(domain, msg).await,
            "unsubscribe-context" => self.unsubscribe_context(domain, msg).await,
            "destroy-context" => self.destroy_context(domain, msg).await,
            _ => return false,
        };
        if let Err(r) = r {
            self.send(gw3::error(
                domain,
                &rid(msg),
                &self.my_id(),
                r.uri,
                &r.reason,
            ));
        }
        true
    }

    /// The registry context a message's `context_id` names, if this peer was told of it.
    fn ctx_id(&self, msg: &Obj) -> Result<u64, Refusal> {
        let gid = msg.get("context_id").cloned().unwrap_or(J::Null);
        let id = gid
            .as_str()
            .and_then(|s| self.sh.ids.parse_ctx(s))
            .ok_or_else(|| unknown(&gid))?;
        match &self.me {
            Some(me) if me.ctx.known.contains_key(&id) => Ok(id),
            _ => Err(unknown(&gid)),
        }
    }

    /// Maps the context for this peer (once); returns whether it may write.
    async fn ctx_open(&mut self, id: u64) -> Result<bool, Refusal> {
        let Some(me) = self.me.as_ref() else {
            return Err(Refusal::failure("not logged in"));
        };
        if let Some(w) = me.ctx.open.get(&id) {
            if self.sh.ctxs.is_mapped(id) {
                return Ok(*w);
            }
        }
        let name = me.ctx.known.get(&id).cloned().unwrap_or_default();
        let reply = self.ask(|req| ToGateway::OpenContext { req, name }).await;
        match reply {
            Some(Outgoing {
                msg:
                    FromGateway::ContextOpened {
                        id: got, writable, ..
                    },
                fds,
            }) if got == id => {
                self.ctx_map(id, &fds, writable)?;
                Ok(writable)
            }
            Some(Outgoing {
                msg: FromGateway::Fail {
                    status, message, ..
                },
                ..
            }) => Err(Refusal::from_core(status, message)),
            _ => Err(Refusal::failure(format!(
                "Unable to find context with id {}",
                self.sh.ids.ctx(id)
            ))),
        }
    }

    /// Maps the segment the gateway sent for context `id` and notes it as open for this peer.
    fn ctx_map(&mut self, id: u64, fds: &[Arc<OwnedFd>], writable: bool) -> Result<(), Refusal> {
        let fd = fds
            .first()
            .ok_or_else(|| Refusal::failure("no context segment"))?;
        self.sh
            .ctxs
            .map(id, fd, writable)
            .map_err(|e| Refusal::failure(e.to_string()))?;
        if let Some(me) = self.me.as_mut() {
            me.ctx.open.insert(id, writable);
        }
        Ok(())
    }

    /// Follows the context from now: returns its data for `subscribed-context`.
    fn ctx_follow(&mut self, id: u64) -> Result<J, Refusal> {
        let Some(me) = self.me.as_mut() else {
            return Err(Refusal::failure("not logged in"));
        };
        let data = self
            .sh
            .ctxs
            .follow(id, me.peer, self.wire.out.clone())
            .map_err(|e| Refusal::failure(e.to_string()))?;
        me.ctx.member.insert(id);
        Ok(data.to_json())
    }

    async fn create_context(&mut self, domain: &str, msg: &Obj) -> Result<(), Refusal> {
        let name = match msg.get("name") {
            Some(J::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(Refusal::failure(
                    "Please provide the name as a non-empty string!",
                ))
            }
        };
        let lifetime = match msg.get("lifetime").and_then(J::as_str) {
            Some("retained") => ContextLifetime::Retained,
            Some("ref-counted") => ContextLifetime::RefCounted,
            Some("ownership") => ContextLifetime::Ownership,
            // The reference gateway's words, value and all (it prints none).
            _ => {
                return Err(Refusal {
                    uri: "global.errors.bad_lifetime",
                    reason: "Bad lifetime value ".into(),
                })
            }
        };
        let data = match msg.get("data") {
            None | Some(J::Null) => Value::map(),
            Some(d @ J::Object(_)) => Value::from(d.clone()),
            Some(_) => return Err(Refusal::failure("Please provide the data as an object!")),
        };
        let reply = self
            .ask(|req| ToGateway::CreateContext {
                req,
                name: name.clone(),
                lifetime,
                data,
            })
            .await;
        let (id, created, writable, fds) = match reply {
            Some(Outgoing {
                msg:
                    FromGateway::ContextCreated {
                        id,
                        created,
                        writable,
                        ..
                    },
                fds,
            }) => (id, created, writable, fds),
            Some(Outgoing {
                msg: FromGateway::Fail {
                    status, message, ..
                },
                ..
            }) => return Err(Refusal::from_core(status, message)),
            _ => return Err(Refusal::failure("the gateway is stopping")),
        };
        self.ctx_map(id, &fds, writable)?;
        if let Some(me) = self.me.as_mut() {
            me.ctx.known.entry(id).or_insert(name);
        }
        let data = self.ctx_follow(id)?;
        let (me_id, cid) = (self.my_id(), self.sh.ids.ctx(id));
        self.send(if created {
            json!({"domain": domain, "type": "context-created", "request_id": rid(msg),
                "peer_id": me_id, "context_id": cid})
        } else {
            // An existing name: the caller joined it, its own data is ignored.
            json!({"domain": domain, "type": "subscribed-context", "request_id": rid(msg),
                "peer_id": me_id, "context_id": cid, "data": data})
        });
        Ok(())
    }

    async fn subscribe_context(&mut self, domain: &str, msg: &Obj) -> Result<(), Refusal> {
        let id = self.ctx_id(msg)?;
        self.ctx_open(id).await?;
        self.ask_ack(|req| ToGateway::SubscribeContext { req, id })
            .await?;
        let data = self.ctx_follow(id)?;
        self.send(
            json!({"domain": domain, "type": "subscribed-context", "request_id": rid(msg),
            "peer_id": self.my_id(), "context_id": self.sh.ids.ctx(id), "data": data}),
        );
        Ok(())
    }

    async fn unsubscribe_context(&mut self, domain: &str, msg: &Obj) -> Result<(), Refusal> {
        let id = self.ctx_id(msg)?;
        if let Some(me) = self.me.as_mut() {
            me.ctx.member.remove(&id);
            self.sh.ctxs.unfollow(id, me.peer);
        }
        self.ask_ack(|req| ToGateway::UnsubscribeContext { req, id })
            .await?;
        self.send_success(domain, rid_ref(msg));
        Ok(())
    }

    async fn destroy_context(&mut self, domain: &str, msg: &Obj) -> Result<(), Refusal> {
        let id = self.ctx_id(msg)?;
        self.ask_ack(|req| ToGateway::DestroyContext { req, id })
            .await?;
        self.send_success(domain, rid_ref(msg));
        Ok(())
    }

    /// Asks the core something answered with `Ack` or `Fail`.
    async fn ask_ack(&mut self, build: impl FnOnce(u64) -> ToGateway) -> Result<(), Refusal> {
        match self.ask(build).await {
            Some(Outgoing {
                msg: FromGateway::Ack { .. },
                ..
            }) => Ok(()),
            Some(Outgoing {
                msg: FromGateway::Fail {
                    status, message, ..
                },
                ..
            }) => Err(Refusal::from_core(status, message)),
            _ => Err(Refusal::failure("the gateway is stopping")),
        }
    }

    async fn update_context(&mut self, domain: &str, msg: &Obj) -> Result<(), Refusal> {
        let id = self.ctx_id(msg)?;
        let delta_json = msg.get("delta").unwrap_or(&J::Null);
        let parts = delta::parse(delta_json).map_err(|e| Refusal::failure(e.to_string()))?;
        let plan = delta::plan(&parts).map_err(|e| Refusal::failure(e.to_string()))?;
        if !self.ctx_open(id).await? {
            // The gateway mapped it read-only: have it log the refused write, as it logs its
            // own refusals (it checks the report against its policy).
            if let Some(me) = &self.me {
                let name = me.ctx.known.get(&id).map_or("", String::as_str);
                let action = crate::model::policy::Action::ContextWrite;
                let report = ToGateway::denied(me.peer, action, name);
                self.core(report).await;
            }
            return Err(Refusal {
                uri: "global.errors.not_authorized",
                reason: "Not authorized to update context".into(),
            });
        }
        let Some(token) = self.me.as_ref().map(|m| m.peer.0) else {
            return Ok(());
        };
        // Web subscribers get the writer's delta as it was sent (the reference forwards it
        // verbatim); native subscribers get the op.
        let note = delta_json.to_string();
        let max = usize::try_from(self.sh.limits.max_payload).unwrap_or(usize::MAX);
        let ctxs = self.sh.ctxs.clone();
        let mut tries = 0;
        let (version, changed, data) = loop {
            tries += 1;
            let Some((store, cache)) = ctxs.writer(id) else {
                return Err(Refusal::failure("the context is not writable here"));
            };
            let (op, expect) = match &plan {
                Plan::Op(op) => (op.clone(), None),
                Plan::Compute => {
                    let mut buf = Vec::new();
                    let info = store
                        .read(&mut buf)
                        .map_err(|e| Refusal::failure(e.to_string()))?;
                    let old = crate::store::context::decode_snapshot(&buf)
                        .map_err(|e| Refusal::failure(e.to_string()))?;
                    let mut new = old.clone();
                    delta::apply(&mut new, &parts).map_err(|e| Refusal::failure(e.to_string()))?;
                    (delta::diff(&old, &new), Some(info.version))
                }
            };
            // Uncontended (the usual case), the write happens right here; when a native
            // writer holds the lock, it waits off the gateway's thread.
            let quick = write_noted(
                &*store,
                token,
                &op,
                expect,
                max,
                Duration::ZERO,
                cache,
                Some((GW3_NOTE, Value::from(note.as_str()))),
            );
            let r = match quick {
                Err(WriteError::Store(StoreError::Busy)) => {
                    let note = Value::from(note.as_str());
                    tokio::task::spawn_blocking(move || {
                        write_noted(
                            &*store,
                            token,
                            &op,
                            expect,
                            max,
                            LOCK_TIMEOUT,
                            None,
                            Some((GW3_NOTE, note)),
                        )
                    })
                    .await
                    .unwrap_or(Err(WriteError::Store(StoreError::Busy)))
                }
                other => other,
            };
            match r {
                Ok(x) => break x,
                Err(WriteError::Stale { .. }) if tries < CAS_TRIES => continue,
                Err(e) => return Err(Refusal::failure(e.to_string())),
            }
        };
        ctxs.written(id, version, changed, data, &note);
        if changed {
            // The other web subscribers' frames are queued on their connections' tasks; let
            // those run first. Each frame costs its sender a loopback `send` that wakes the
            // receiving process (~24 µs on the 2-core VM), so sending this writer's `success`
            // first would delay every other subscriber by that much (docs/benchmarks.md §6.3).
            tokio::task::yield_now().await;
        }
        self.send_success(domain, rid_ref(msg));
        Ok(())
    }
}
