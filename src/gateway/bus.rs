//! The gateway's side of the bus: it keeps every peer's subscriptions and announces them, so
//! native publishers write straight into their subscribers' lanes; it delivers only what must
//! pass through it (to or from peers reached by relay).

use super::registry::Registry;
use crate::model::bus::{identity_matches, routing_matches, topic_matches};
use crate::status::Status;
use crate::wire::frame::{BusSubInfo, FromGateway, PeerId, Transport};
use crate::wire::Value;
use std::collections::BTreeMap;

/// Every bus subscription.
#[derive(Default)]
pub(crate) struct Bus {
    subs: BTreeMap<(PeerId, u64), BusSubInfo>,
}

impl Bus {
    /// The subscriptions of the given peers.
    pub(crate) fn of_peers(&self, peers: &[PeerId]) -> Vec<BusSubInfo> {
        self.subs
            .values()
            .filter(|s| peers.contains(&s.peer))
            .cloned()
            .collect()
    }
}

impl Registry {
    pub(crate) fn bus_subscribe(
        &mut self,
        from: PeerId,
        req: u64,
        sub: u64,
        topic: String,
        routing_key: Option<String>,
    ) {
        if topic.is_empty() || topic.len() > self.limits.max_name_len {
            let msg = "Please provide the topic as a non-empty string!".to_string();
            return self.fail(from, req, Status::InvalidArgument, msg);
        }
        let info = BusSubInfo {
            peer: from,
            sub,
            topic,
            routing_key,
        };
        self.bus.subs.insert((from, sub), info.clone());
        self.send(from, FromGateway::Ack { req }, Vec::new());
        for p in self.audience(from) {
            self.send(p, FromGateway::BusSubscribed(info.clone()), Vec::new());
        }
    }

    pub(crate) fn bus_unsubscribe(&mut self, from: PeerId, req: u64, sub: u64) {
        if self.bus.subs.remove(&(from, sub)).is_some() {
            for p in self.audience(from) {
                self.send(
                    p,
                    FromGateway::BusUnsubscribed { peer: from, sub },
                    Vec::new(),
                );
            }
        }
        self.send(from, FromGateway::Ack { req }, Vec::new());
    }

    /// Delivers a message from `from` to the matching subscribers that cannot be reached over a
    /// lane: peers behind the gateway and, when `everyone` (the publisher is itself behind the
    /// gateway), native peers too. One message per peer; each peer matches its own
    /// subscriptions (and the source filters on them). Never to the publisher: publishers
    /// deliver to their own subscriptions themselves.
    pub(crate) fn bus_publish(
        &mut self,
        from: PeerId,
        topic: String,
        routing_key: Option<String>,
        target: Value,
        data: Value,
        everyone: bool,
    ) {
        let Some(user) = self.peers.get(&from).map(|p| p.identity.user.clone()) else {
            return;
        };
        let target = target.as_map().cloned();
        let mut dests: Vec<PeerId> = Vec::new();
        for s in self.bus.subs.values() {
            if dests.contains(&s.peer)
                || !topic_matches(&s.topic, &topic)
                || !routing_matches(s.routing_key.as_deref(), routing_key.as_deref())
            {
                continue;
            }
            let Some(p) = self.peers.get(&s.peer) else {
                continue;
            };
            if s.peer == from
                || p.identity.user != user
                || (!everyone && p.transport != Transport::Relay)
            {
                continue;
            }
            if let Some(t) = &target {
                if !identity_matches(t, &p.attributes) {
                    continue;
                }
            }
            dests.push(s.peer);
        }
        for d in dests {
            let msg = FromGateway::BusMessage {
                from,
                topic: topic.clone(),
                routing_key: routing_key.clone(),
                data: data.clone(),
            };
            self.send(d, msg, Vec::new());
        }
    }

    /// A peer left: its subscriptions go.
    pub(crate) fn bus_peer_left(&mut self, peer: PeerId, audience: &[PeerId]) {
        let subs: Vec<u64> = self
            .bus
            .subs
            .keys()
            .filter(|(p, _)| *p == peer)
            .map(|(_, s)| *s)
            .collect();
        for sub in subs {
            self.bus.subs.remove(&(peer, sub));
            for a in audience {
                self.send(*a, FromGateway::BusUnsubscribed { peer, sub }, Vec::new());
            }
        }
    }
}
