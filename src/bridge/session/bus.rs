//! The bus for one connection (GW3 domain `bus`: `subscribe`, `unsubscribe`, `publish`;
//! `event`). Subscriptions live in the registry, which announces them to native publishers;
//! those write messages for web subscribers to the gateway, which hands one copy per matching
//! peer to its connection, and the connection emits one `event` per matching subscription. A
//! web publisher's messages go through the gateway to everyone else; its own subscriptions get
//! them here (the reference gateway delivers a publisher's messages to itself too), when the
//! policy lets it publish and subscribe to the topic.

use super::{frame_text, rid, rid_ref, Session};
use crate::bridge::gw3::{self, Obj};
use crate::gateway::Outgoing;
use crate::model::bus::{identity_matches, routing_matches, topic_matches};
use crate::model::check_name_len;
use crate::model::policy::Action as PolicyAction;
use crate::wire::frame::{FromGateway, PeerId, ToGateway};
use crate::wire::record::check_payload;
use crate::wire::Value;
use serde_json::{json, Value as J};
use std::collections::BTreeMap;

const FAIL: &str = "bus.errors.failure";

struct BusSub {
    gid: String,
    topic: String,
    routing_key: Option<String>,
}

/// One connection's bus subscriptions, by number (creation order: events for one message go
/// out in the order the subscriptions were made).
#[derive(Default)]
pub(super) struct BusState {
    subs: BTreeMap<u64, BusSub>,
}

fn opt_string(msg: &Obj, key: &str) -> Result<Option<String>, String> {
    match msg.get(key) {
        None | Some(J::Null) => Ok(None),
        Some(J::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

impl Session {
    pub(super) async fn bus(&mut self, ty: &str, msg: &Obj) {
        match ty {
            "subscribe" => self.bus_subscribe(msg).await,
            "unsubscribe" => self.bus_unsubscribe(msg).await,
            "publish" => self.bus_publish(msg).await,
            _ => self.unhandled("bus", ty, msg),
        }
    }

    fn bus_error(&self, msg: &Obj, reason: &str) {
        self.send(gw3::error("bus", &rid(msg), &self.my_id(), FAIL, reason));
    }

    async fn bus_subscribe(&mut self, msg: &Obj) {
        // The empty topic too: the reference gateway takes it (and delivers what is published
        // on it).
        let topic = match msg.get("topic") {
            Some(J::String(t)) => t.clone(),
            _ => return self.bus_error(msg, "Please provide the topic as a string!"),
        };
        let routing_key = match opt_string(msg, "routing_key") {
            Ok(k) => k,
            Err(e) => return self.bus_error(msg, &e),
        };
        // `source` (a filter on publishers) is the client library's to apply, as in the
        // reference gateway.
        if self
            .me
            .as_ref()
            .is_some_and(|m| m.bus.subs.len() >= super::MAX_SUBSCRIPTIONS)
        {
            return self.bus_error(msg, "too many subscriptions on this connection");
        }
        let n = self.sh.ids.number();
        let reply = self
            .ask(|req| ToGateway::BusSubscribe {
                req,
                sub: n,
                topic: topic.clone(),
                routing_key: routing_key.clone(),
            })
            .await;
        match reply {
            Some(Outgoing {
                msg: FromGateway::Ack { .. },
                ..
            }) => {
                let gid = self.sh.ids.with('r', n);
                let Some(me) = self.me.as_mut() else { return };
                me.bus.subs.insert(
                    n,
                    BusSub {
                        gid: gid.clone(),
                        topic,
                        routing_key,
                    },
                );
                self.send(
                    json!({"domain": "bus", "type": "subscribed", "request_id": rid(msg),
                    "peer_id": self.my_id(), "subscription_id": gid}),
                );
            }
            Some(Outgoing {
                msg: FromGateway::Fail { message, .. },
                ..
            }) => self.bus_error(msg, &message),
            _ => self.bus_error(msg, "the gateway is stopping"),
        }
    }

    async fn bus_unsubscribe(&mut self, msg: &Obj) {
        let gid = msg.get("subscription_id").cloned().unwrap_or(J::Null);
        // The id carries the subscription's number: one lookup, however many there are.
        let n = gid
            .as_str()
            .and_then(|g| self.sh.ids.parse_numbered(g, 'r'));
        let Some(me) = self.me.as_mut() else { return };
        // An id this connection does not hold (unsubscribed already, another connection's,
        // never issued) is a success that changes nothing, as in the reference gateway: the
        // libraries send a second `unsubscribe` when an app calls it twice, and @glue42/core
        // leaves an error to it unhandled.
        if let Some(n) = n.filter(|n| me.bus.subs.contains_key(n)) {
            me.bus.subs.remove(&n);
            let _ = self
                .ask(|req| ToGateway::BusUnsubscribe { req, sub: n })
                .await;
        }
        self.send_success("bus", rid_ref(msg));
    }

    async fn bus_publish(&mut self, msg: &Obj) {
        // Fire-and-forget: a malformed publish gets no answer, as in the reference gateway.
        let Some(J::String(topic)) = msg.get("topic") else {
            return;
        };
        let Ok(routing_key) = opt_string(msg, "routing_key") else {
            return;
        };
        let target = match msg.get("target_identity") {
            None | Some(J::Null) => Value::Null,
            Some(t @ J::Object(_)) => Value::from(t.clone()),
            Some(_) => return,
        };
        const NULL: &J = &J::Null;
        let data = msg.get("data").unwrap_or(NULL);
        let value = Value::from(data.clone());
        // The limits a native publisher's library applies (a topic as long as a subscription's
        // may be, a payload within `max_payload`), answered here because the gateway cannot
        // answer a publish: an error for the publisher, the message for nobody.
        let limits = &self.sh.limits;
        let checked = check_name_len("topic", topic, limits.max_name_len)
            .and_then(|()| check_payload(&value, limits.max_payload));
        if let Err(reason) = checked {
            return self.bus_error(msg, &reason);
        }
        let Some(me) = self.me.as_ref() else { return };
        let peer = me.peer;
        // A publish the policy refuses reaches nobody, this peer included (the gateway refuses
        // and logs it below); nor does a topic its `subscribe` rules deny, whatever pattern it
        // subscribed with (as the gateway filters other subscribers).
        let allowed = me.rules.allows(PolicyAction::Publish, topic)
            && me.rules.allows(PolicyAction::Subscribe, topic);
        let mine = allowed
            && match &target {
                // `login` is announced but not matched (as in the reference gateway; the
                // registry matches other subscribers the same way).
                Value::Map(t) => !t.contains_key("login") && identity_matches(t, &me.attributes),
                _ => true,
            };
        if mine {
            self.bus_deliver(peer, topic, routing_key.as_deref(), data);
        }
        self.publisher = true;
        self.core(ToGateway::BusPublish {
            topic: topic.clone(),
            routing_key,
            target,
            data: value,
        })
        .await;
    }

    /// A message for this peer (from the gateway, or its own): one `event` per matching
    /// subscription.
    pub(super) fn bus_deliver(
        &mut self,
        from: PeerId,
        topic: &str,
        routing_key: Option<&str>,
        data: &J,
    ) {
        let Some(me) = self.me.as_ref() else { return };
        let matching: Vec<&BusSub> = me
            .bus
            .subs
            .values()
            .filter(|s| {
                topic_matches(&s.topic, topic)
                    && routing_matches(s.routing_key.as_deref(), routing_key)
            })
            .collect();
        if matching.is_empty() {
            return;
        }
        let publisher = if from == me.peer {
            me.identity.clone()
        } else {
            match me.known.get(&from) {
                Some(k) => k.view.identity().clone(),
                None => return, // not a peer we may see
            }
        };
        // Serialised in place: the publisher's identity and the data are not copied per event.
        let frames: Vec<String> = matching
            .iter()
            .map(|s| {
                frame_text(&Event {
                    domain: "bus",
                    ty: "event",
                    peer_id: &me.id,
                    subscription_id: &s.gid,
                    publisher_identity: &publisher,
                    data,
                })
            })
            .collect();
        for f in frames {
            self.send_text(f);
        }
    }
}

/// A bus `event` frame.
#[derive(serde::Serialize)]
struct Event<'a> {
    domain: &'static str,
    #[serde(rename = "type")]
    ty: &'static str,
    peer_id: &'a J,
    subscription_id: &'a str,
    #[serde(rename = "publisher-identity")]
    publisher_identity: &'a J,
    data: &'a J,
}
