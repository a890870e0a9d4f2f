//! Interop streams for one connection. GW3 models a subscription as gateway state; knit's
//! streams are a conversation between subscriber and server in stream records
//! (`wire::stream`), relayed by the gateway for peers behind it. So the bridge plays both
//! roles of that conversation for its web peer:
//!
//! * as a **subscriber** (`subscribe`, `unsubscribe` → `subscribed`, `event`,
//!   `subscription-cancelled`): a request record to the server, whatever it is (native, web,
//!   or this very peer);
//! * as a **server** (`add-interest`, `remove-interest` ← `accepted`, `publish`, `post`,
//!   `drop-subscription`, `error`): records from subscribers become GW3 messages, and GW3
//!   answers become records.
//!
//! The GW3 subscription id is the gateway's: a web subscriber's record id is a number from the
//! bridge's id counter and its GW3 id `r-<node>-<number>`, so the server side of a web → web
//! subscription names it the same without asking; a native subscriber's subscription gets a
//! fresh GW3 id. Branches are GW3 `stream_id`s.

use super::{display_id, echo, gid_of, rid, rid_ref, HeldId, Meter, Session};
use crate::bridge::gw3::{self, Obj};
use crate::wire::frame::{PeerId, ToGateway};
use crate::wire::record::{
    KIND_STREAM_DATA, KIND_SUB_CLOSE, KIND_SUB_DROP, KIND_SUB_REPLY, KIND_SUB_REQUEST,
};
use crate::wire::stream as rec;
use crate::wire::Value;
use serde_json::{json, Value as J};
use std::collections::{BTreeMap, HashMap};

const SUB_FAIL: &str = "agm.errors.subscription.failure";
/// What GW3 servers (the client libraries) say when they reject.
const REJECTED_URI: &str = "com.tick42.agm.errors.subscription.failure";
const REJECTED_PREFIX: &str = "Subscription rejected by user. ";
const METHOD_REMOVED: &str = "Method has been removed";
const PEER_REMOVED: &str = "Peer has been removed";

/// A subscription this peer made.
struct OutSub {
    gid: String,
    request_id: HeldId,
    server: PeerId,
    /// The server's method (registry id).
    method: u32,
    accepted: bool,
}

/// A subscription to one of this peer's streams.
struct InSub {
    gid: String,
    peer: PeerId,
    /// The subscriber's id for it.
    sub_id: u64,
    /// Our method (registry id).
    method: u32,
    /// The `stream_id` (branch) it was accepted on.
    stream: Option<String>,
}

#[derive(Default)]
pub(super) struct StreamState {
    /// Ours, by record id.
    out: BTreeMap<u64, OutSub>,
    /// To our streams, in arrival order.
    inc: BTreeMap<u64, InSub>,
    next_in: u64,
    by_gid: HashMap<String, u64>,
    by_key: HashMap<(PeerId, u64), u64>,
    /// The request ids `out` holds.
    held: Meter,
}

impl StreamState {
    fn take_in(&mut self, n: u64) -> Option<InSub> {
        let s = self.inc.remove(&n)?;
        self.by_gid.remove(&s.gid);
        self.by_key.remove(&(s.peer, s.sub_id));
        Some(s)
    }
}

/// The `reason_uri` a subscriber sees for a server's close reason.
fn close_uri(reason: &str) -> J {
    match reason {
        METHOD_REMOVED => J::from("agm.method-removed"),
        PEER_REMOVED => J::from("agm.peer-removed"),
        _ => J::Null,
    }
}

/// A native subscriber's arguments as a GW3 server receives them: objects as they are, nothing
/// as `null`, anything else wrapped (io.Connect handlers take an object). A web subscriber's
/// go verbatim (what its library sent), as the reference gateway forwards them.
fn args_kv(v: &Value) -> J {
    match v {
        Value::Null => J::Null,
        other => gw3::to_kv(other),
    }
}

/// A record for `to`, relayed by the gateway.
fn record_to(to: PeerId, kind: u16, body: Vec<u8>) -> ToGateway {
    ToGateway::Record { to, kind, body }
}

impl Session {
    fn stream_error(&self, msg: &Obj, uri: &str, reason: &str) {
        self.send(gw3::error("agm", &rid(msg), &self.my_id(), uri, reason));
    }

    // ---- subscriber ------------------------------------------------------------------------

    pub(super) async fn stream_subscribe(&mut self, msg: &Obj) {
        let server = match msg.get("server_id") {
            Some(J::String(s)) => s.clone(),
            _ => return self.stream_error(msg, SUB_FAIL, "subscribe needs a string \"server_id\""),
        };
        let args = match (msg.get("arguments_kv"), msg.get("arguments")) {
            (None | Some(J::Null), None | Some(J::Null)) => Value::Null,
            (None | Some(J::Null), Some(a @ J::Array(_))) => Value::from(a.clone()),
            (None | Some(J::Null), Some(_)) => {
                return self.stream_error(msg, SUB_FAIL, "arguments must be an array")
            }
            // Opaque to the gateway, as for `call`.
            (Some(kv), _) => Value::from(kv.clone()),
        };
        let method = msg.get("method_id").cloned().unwrap_or(J::Null);
        let Some(me) = self.me.as_ref() else { return };
        let target = self.sh.ids.parse_peer(&server);
        let found = target.and_then(|p| Some((p, me.method_of(p, &method).flatten()?)));
        let Some((target, method_id)) = found else {
            let reason = super::no_method(&echo(&method), &gw3::clip(&server));
            return self.stream_error(msg, SUB_FAIL, &reason);
        };
        if me.streams.out.len() >= super::MAX_SUBSCRIPTIONS {
            return self.stream_error(msg, SUB_FAIL, "too many subscriptions on this connection");
        }
        let limit = self.sh.cfg.max_waiting_bytes;
        let request_id = match me.streams.held.hold(rid(msg), limit, "subscriptions") {
            Ok(h) => h,
            Err(reason) => return self.stream_error(msg, SUB_FAIL, &reason),
        };
        let n = self.sh.ids.number();
        let gid = self.sh.ids.with('r', n);
        let mut body = Vec::new();
        if let Err(e) = rec::request(&mut body, n, method_id, &args) {
            return self.stream_error(msg, SUB_FAIL, &e.to_string());
        }
        if let Some(me) = self.me.as_mut() {
            me.streams.out.insert(
                n,
                OutSub {
                    gid,
                    request_id,
                    server: target,
                    method: method_id,
                    accepted: false,
                },
            );
        }
        self.core(record_to(target, KIND_SUB_REQUEST, body)).await;
    }

    pub(super) async fn stream_unsubscribe(&mut self, msg: &Obj) {
        let gid = msg.get("subscription_id").cloned().unwrap_or(J::Null);
        let reason = match msg.get("reason") {
            Some(J::String(r)) if !r.is_empty() => r.clone(),
            _ => "ClientInitiated".to_string(),
        };
        let Some(me) = self.me.as_mut() else { return };
        let found = me
            .streams
            .out
            .iter()
            .find(|(_, s)| gid.as_str() == Some(s.gid.as_str()))
            .map(|(n, _)| *n);
        let Some(sub) = found.and_then(|n| me.streams.out.remove(&n).map(|s| (n, s))) else {
            let reason = format!("Unable to find subscription with id {}", echo(&gid));
            return self.stream_error(msg, "agm.errors.subscription.invalid_subscription", &reason);
        };
        let (n, s) = sub;
        self.core(record_to(s.server, KIND_SUB_CLOSE, rec::close(n, &reason)))
            .await;
        self.send_success("agm", rid_ref(msg));
    }

    /// Ends this peer's subscriptions on `server` (or all, with `None`) as the server is gone;
    /// pending ones fail their `subscribe` request.
    fn cancel_out(
        &mut self,
        server: Option<PeerId>,
        methods: Option<&[u32]>,
        uri: J,
        reason: &str,
    ) {
        let Some(me) = self.me.as_mut() else { return };
        let hit: Vec<u64> = me
            .streams
            .out
            .iter()
            .filter(|(_, s)| server.is_none_or(|p| s.server == p))
            .filter(|(_, s)| methods.is_none_or(|m| m.contains(&s.method)))
            .map(|(n, _)| *n)
            .collect();
        let me_id = me.id.clone();
        let mut frames = Vec::with_capacity(hit.len());
        for n in hit {
            let Some(s) = me.streams.out.remove(&n) else {
                continue;
            };
            frames.push(if s.accepted {
                json!({"domain": "agm", "type": "subscription-cancelled", "peer_id": me_id,
                    "subscription_id": s.gid, "reason_uri": uri, "reason": reason})
            } else {
                gw3::error("agm", &s.request_id.id, &me_id, SUB_FAIL, reason)
            });
        }
        for f in frames {
            self.send(f);
        }
    }

    /// Ends the subscriptions `peer` made to our streams (it left): `remove-interest` for each.
    fn drop_in_from(&mut self, peer: PeerId, uri: J, reason: J) {
        let Some(me) = self.me.as_mut() else { return };
        let hit: Vec<u64> = me
            .streams
            .inc
            .iter()
            .filter(|(_, s)| s.peer == peer)
            .map(|(n, _)| *n)
            .collect();
        let me_id = me.id.clone();
        let mut frames = Vec::with_capacity(hit.len());
        for n in hit {
            let Some(s) = me.streams.take_in(n) else {
                continue;
            };
            let method = me.methods.get(&s.method).map(|o| gid_of(o).clone());
            frames.push(
                json!({"domain": "agm", "type": "remove-interest", "peer_id": me_id,
                "subscription_id": s.gid, "method_id": method,
                "caller_id": self.sh.ids.peer(peer), "reason_uri": uri, "reason": reason}),
            );
        }
        for f in frames {
            self.send(f);
        }
    }

    /// A peer left the gateway: its streams and its subscriptions to ours are gone.
    pub(super) fn streams_peer_gone(&mut self, peer: PeerId) {
        self.cancel_out(Some(peer), None, J::from("agm.peer-removed"), PEER_REMOVED);
        self.drop_in_from(peer, J::from("agm.peer-removed"), J::from(PEER_REMOVED));
    }

    /// A web peer left `agm` cleanly: as the reference gateway reports it, its subscribers
    /// hear that the peer was removed, and the servers it subscribed to get no reasons.
    pub(super) fn streams_peer_left_agm(&mut self, peer: PeerId) {
        self.cancel_out(Some(peer), None, J::from("agm.peer-removed"), PEER_REMOVED);
        self.drop_in_from(peer, J::Null, J::Null);
    }

    /// Methods of `server` went away: subscriptions to them end.
    pub(super) fn streams_methods_removed(&mut self, server: PeerId, ids: &[u32]) {
        self.cancel_out(
            Some(server),
            Some(ids),
            J::from("agm.method-removed"),
            METHOD_REMOVED,
        );
    }

    // ---- server ----------------------------------------------------------------------------

    /// Our subscription by GW3 id.
    fn in_by_gid(&self, msg: &Obj) -> Option<u64> {
        let gid = msg.get("subscription_id")?.as_str()?;
        self.me.as_ref()?.streams.by_gid.get(gid).copied()
    }

    pub(super) async fn stream_accepted(&mut self, msg: &Obj) {
        let Some(n) = self.in_by_gid(msg) else { return };
        let stream = match msg.get("stream_id") {
            None | Some(J::Null) => String::new(),
            Some(v) => display_id(v),
        };
        let Some(me) = self.me.as_mut() else { return };
        let Some(s) = me.streams.inc.get_mut(&n) else {
            return;
        };
        if s.stream.is_some() {
            return; // accepted once already
        }
        s.stream = Some(stream.clone());
        let (peer, sub_id) = (s.peer, s.sub_id);
        let mut body = Vec::new();
        // A one-key map of a string: always encodes.
        let _ = rec::reply(
            &mut body,
            sub_id,
            true,
            &Value::object([("branch", Value::from(stream))]),
        );
        self.core(record_to(peer, KIND_SUB_REPLY, body)).await;
    }

    /// A server's `error` naming one of our subscriptions: a rejection of a pending one, the
    /// end of an accepted one (like `drop-subscription`). False when it names none.
    pub(super) async fn stream_rejected(&mut self, msg: &Obj) -> bool {
        let Some(gid) = msg.get("request_id").and_then(J::as_str) else {
            return false;
        };
        let Some(me) = self.me.as_mut() else {
            return false;
        };
        let Some(n) = me.streams.by_gid.get(gid).copied() else {
            return false;
        };
        let Some(s) = me.streams.take_in(n) else {
            return false;
        };
        let reason = match msg.get("reason") {
            Some(J::String(r)) => r.clone(),
            None | Some(J::Null) => String::new(),
            Some(other) => other.to_string(),
        };
        if s.stream.is_some() {
            // Accepted already: the server no longer serves it. It ends as if dropped, with the
            // reason — the subscriber must not stay subscribed to a stream nobody feeds it.
            self.core(record_to(
                s.peer,
                KIND_SUB_DROP,
                rec::close(s.sub_id, &reason),
            ))
            .await;
            return true;
        }
        let uri = msg
            .get("reason_uri")
            .and_then(J::as_str)
            .unwrap_or(REJECTED_URI)
            .to_string();
        let info = Value::object([
            (
                "reason",
                Value::from(reason.strip_prefix(REJECTED_PREFIX).unwrap_or(&reason)),
            ),
            ("reason_uri", Value::from(uri)),
            ("gw3_reason", Value::from(reason.as_str())),
        ]);
        let mut body = Vec::new();
        // A map of strings: always encodes.
        let _ = rec::reply(&mut body, s.sub_id, false, &info);
        self.core(record_to(s.peer, KIND_SUB_REPLY, body)).await;
        true
    }

    /// `publish` (to every subscription accepted on a `stream_id`) and `post` (to one).
    pub(super) async fn stream_push(&mut self, msg: &Obj, private: bool) {
        let Some(me) = self.me.as_ref() else { return };
        let targets: Vec<(PeerId, u64)> = if private {
            match self.in_by_gid(msg).and_then(|n| me.streams.inc.get(&n)) {
                Some(s) if s.stream.is_some() => vec![(s.peer, s.sub_id)],
                _ => return,
            }
        } else {
            let Some(stream) = msg.get("stream_id").filter(|v| !v.is_null()) else {
                return;
            };
            let stream = display_id(stream);
            me.streams
                .inc
                .values()
                .filter(|s| s.stream.as_deref() == Some(stream.as_str()))
                .map(|s| (s.peer, s.sub_id))
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        let mut extra = crate::wire::Map::new();
        for k in ["sequence", "snapshot"] {
            if let Some(v) = msg.get(k).filter(|v| !v.is_null()) {
                extra.insert(k.to_string(), Value::from(v.clone()));
            }
        }
        let data = Value::from(msg.get("data").cloned().unwrap_or(J::Null));
        // Over the payload limit a native server's library refuses the push; a web server has
        // none, so nobody gets it here (logged: the client libraries ignore an error to a
        // stream `publish`).
        if let Err(e) = crate::wire::record::check_payload(&data, self.sh.limits.max_payload) {
            crate::log::warn(format_args!("stream item not forwarded: {e}"));
            return;
        }
        let mut body = Vec::new();
        if let Err(e) = rec::data_with_extra(&mut body, private, &Value::Map(extra), &data) {
            // Too deep for native readers: nobody gets it (logged).
            crate::log::warn(format_args!("stream item not forwarded: {e}"));
            return;
        }
        for (peer, sub_id) in targets {
            rec::set_sub_id(&mut body, sub_id);
            self.core(record_to(peer, KIND_STREAM_DATA, body.clone()))
                .await;
        }
    }

    pub(super) async fn stream_drop(&mut self, msg: &Obj) {
        let Some(n) = self.in_by_gid(msg) else { return };
        let reason = match msg.get("reason") {
            Some(J::String(r)) => r.clone(),
            _ => "ServerInitiated".to_string(),
        };
        let Some(s) = self.me.as_mut().and_then(|me| me.streams.take_in(n)) else {
            return;
        };
        self.core(record_to(
            s.peer,
            KIND_SUB_DROP,
            rec::close(s.sub_id, &reason),
        ))
        .await;
    }

    /// Before our methods go (unregister, leaving `agm`): their subscribers are told, without a
    /// `remove-interest` to us (as the reference gateway does it). With `leaving`, web
    /// subscribers are not: the bridge tells their connections that we left `agm` directly,
    /// and they end what we served them then.
    pub(super) async fn streams_unregistering(&mut self, methods: &[u32], leaving: bool) {
        let Some(me) = self.me.as_mut() else { return };
        let hit: Vec<u64> = me
            .streams
            .inc
            .iter()
            .filter(|(_, s)| methods.contains(&s.method))
            .map(|(n, _)| *n)
            .collect();
        let mut closes = Vec::with_capacity(hit.len());
        for n in hit {
            if let Some(s) = me.streams.take_in(n) {
                let web = me.is_web(s.peer);
                if !(leaving && web) {
                    closes.push((s.peer, s.sub_id));
                }
            }
        }
        for (peer, sub_id) in closes {
            self.core(record_to(
                peer,
                KIND_SUB_DROP,
                rec::close(sub_id, METHOD_REMOVED),
            ))
            .await;
        }
    }

    /// Leaving `agm`: our own subscriptions end too. Native servers are told here; web servers'
    /// connections hear that we left `agm` from the bridge directly (a record could overtake
    /// that news and make a clean leave look like an unsubscribe).
    pub(super) async fn streams_leaving(&mut self) {
        let Some(me) = self.me.as_mut() else { return };
        let out = std::mem::take(&mut me.streams.out);
        let natives: Vec<(u64, PeerId)> = out
            .into_iter()
            .filter(|(_, s)| !me.is_web(s.server))
            .map(|(n, s)| (n, s.server))
            .collect();
        for (n, server) in natives {
            self.core(record_to(
                server,
                KIND_SUB_CLOSE,
                rec::close(n, "ClientInitiated"),
            ))
            .await;
        }
    }

    // ---- records ---------------------------------------------------------------------------

    /// A stream record from `from`.
    pub(super) async fn stream_record(&mut self, from: PeerId, kind: u16, body: &[u8]) {
        let r = match kind {
            KIND_SUB_REQUEST => self.on_sub_request(from, body).await,
            KIND_SUB_REPLY => self.on_sub_reply(from, body),
            KIND_STREAM_DATA => self.on_stream_data(from, body),
            KIND_SUB_CLOSE => self.on_sub_end(from, body, false),
            KIND_SUB_DROP => self.on_sub_end(from, body, true),
            _ => Err(crate::wire::record::RecordError::UnknownKind(kind)),
        };
        if let Err(e) = r {
            crate::log::debug(format_args!(
                "bridge: record {kind} from {from} dropped: {e}"
            ));
        }
    }

    async fn on_sub_request(
        &mut self,
        from: PeerId,
        body: &[u8],
    ) -> Result<(), crate::wire::record::RecordError> {
        let r = rec::parse_request(body)?;
        let Some(me) = self.me.as_mut() else {
            return Ok(());
        };
        let Some(method) = me.methods.get(&r.method_id).map(|o| gid_of(o).clone()) else {
            // Not (or no longer) ours: the subscriber hears so instead of waiting.
            let mut b = Vec::new();
            let info = Value::object([("reason", Value::from(METHOD_REMOVED))]);
            let _ = rec::reply(&mut b, r.sub_id, false, &info);
            self.core(record_to(from, KIND_SUB_REPLY, b)).await;
            return Ok(());
        };
        if me.streams.by_key.contains_key(&(from, r.sub_id)) {
            return Ok(()); // a repeat
        }
        if me.streams.inc.len() >= super::MAX_SUBSCRIPTIONS {
            let mut b = Vec::new();
            let info = Value::object([(
                "reason",
                Value::from("the server has too many subscriptions"),
            )]);
            let _ = rec::reply(&mut b, r.sub_id, false, &info);
            self.core(record_to(from, KIND_SUB_REPLY, b)).await;
            return Ok(());
        }
        let web = me.is_web(from);
        let gid = if web {
            self.sh.ids.with('r', r.sub_id)
        } else {
            self.sh.ids.fresh('r')
        };
        let n = me.streams.next_in;
        me.streams.next_in += 1;
        me.streams.by_gid.insert(gid.clone(), n);
        me.streams.by_key.insert((from, r.sub_id), n);
        me.streams.inc.insert(
            n,
            InSub {
                gid: gid.clone(),
                peer: from,
                sub_id: r.sub_id,
                method: r.method_id,
                stream: None,
            },
        );
        let frame = json!({"domain": "agm", "type": "add-interest", "subscription_id": gid,
            "peer_id": me.id, "method_id": method, "caller_id": self.sh.ids.peer(from),
            "arguments": null, "arguments_kv": if web { r.args.to_json() } else { args_kv(&r.args) },
            "flags": null, "context": null});
        self.send(frame);
        Ok(())
    }

    fn on_sub_reply(
        &mut self,
        from: PeerId,
        body: &[u8],
    ) -> Result<(), crate::wire::record::RecordError> {
        let r = rec::parse_reply(body)?;
        let Some(me) = self.me.as_mut() else {
            return Ok(());
        };
        let me_id = me.id.clone();
        let Some(s) = me.streams.out.get_mut(&r.sub_id) else {
            return Ok(());
        };
        if s.server != from || s.accepted {
            return Ok(());
        }
        if r.accepted {
            s.accepted = true;
            let frame = json!({"domain": "agm", "type": "subscribed", "request_id": s.request_id.id,
                "peer_id": me_id, "subscription_id": s.gid});
            self.send(frame);
            return Ok(());
        }
        let Some(s) = me.streams.out.remove(&r.sub_id) else {
            return Ok(());
        };
        let info = &r.info;
        let uri = info
            .get("reason_uri")
            .and_then(Value::as_str)
            .unwrap_or(REJECTED_URI)
            .to_string();
        let reason = match info.get("gw3_reason").and_then(Value::as_str) {
            Some(r) => r.to_string(),
            None => format!(
                "{REJECTED_PREFIX}{}",
                info.get("reason").and_then(Value::as_str).unwrap_or("")
            ),
        };
        self.send(gw3::error("agm", &s.request_id.id, &me_id, &uri, &reason));
        Ok(())
    }

    fn on_stream_data(
        &mut self,
        from: PeerId,
        body: &[u8],
    ) -> Result<(), crate::wire::record::RecordError> {
        let d = rec::parse_data(body)?;
        let Some(me) = self.me.as_ref() else {
            return Ok(());
        };
        let Some(s) = me.streams.out.get(&d.sub_id) else {
            return Ok(());
        };
        if s.server != from || !s.accepted {
            return Ok(());
        }
        let extra = |k: &str| {
            d.extra
                .as_ref()
                .and_then(|e| e.get(k))
                .map(Value::to_json)
                .unwrap_or(J::Null)
        };
        let frame = json!({"domain": "agm", "type": "event", "peer_id": me.id,
            "subscription_id": s.gid, "oob": d.private, "sequence": extra("sequence"),
            "snapshot": extra("snapshot"), "data": d.data.to_json()});
        self.send(frame);
        Ok(())
    }

    /// The end of a subscription: a subscriber leaving one of our streams (`SUB_CLOSE`), or a
    /// server dropping one of ours (`by_server`, `SUB_DROP`).
    fn on_sub_end(
        &mut self,
        from: PeerId,
        body: &[u8],
        by_server: bool,
    ) -> Result<(), crate::wire::record::RecordError> {
        let (sub_id, reason) = rec::parse_close(body)?;
        let Some(me) = self.me.as_mut() else {
            return Ok(());
        };
        let me_id = me.id.clone();
        if by_server {
            if me.streams.out.get(&sub_id).is_none_or(|s| s.server != from) {
                return Ok(());
            }
            if let Some(s) = me.streams.out.remove(&sub_id) {
                self.send(if s.accepted {
                    json!({"domain": "agm", "type": "subscription-cancelled", "peer_id": me_id,
                        "subscription_id": s.gid, "reason_uri": close_uri(&reason), "reason": reason})
                } else {
                    gw3::error("agm", &s.request_id.id, &me_id, SUB_FAIL, &reason)
                });
            }
        } else if let Some(n) = me.streams.by_key.get(&(from, sub_id)).copied() {
            if let Some(s) = me.streams.take_in(n) {
                let method = me.methods.get(&s.method).map(|o| gid_of(o).clone());
                self.send(
                    json!({"domain": "agm", "type": "remove-interest", "peer_id": me_id,
                    "subscription_id": s.gid, "method_id": method,
                    "caller_id": self.sh.ids.peer(from), "reason_uri": "", "reason": reason}),
                );
            }
        }
        Ok(())
    }
}
