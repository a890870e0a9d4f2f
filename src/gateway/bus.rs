//! The gateway's side of the bus: it keeps every peer's subscriptions and announces them, so
//! native publishers write straight into their subscribers' lanes; it delivers only what must
//! pass through it (to or from peers reached by relay).

use super::registry::Registry;
use crate::model::bus::{identity_matches, routing_matches, topic_matches};
use crate::model::check_name_len;
use crate::model::policy::Action as PolicyAction;
use crate::status::Status;
use crate::wire::frame::{BusSubInfo, FromGateway, PeerId, Transport};
use crate::wire::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// How long a subscriber waits for peers that do not confirm a new subscription (a stopped
/// process, say) before its `subscribe` returns anyway.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// Every bus subscription.
#[derive(Default)]
pub(crate) struct Bus {
    subs: BTreeMap<(PeerId, u64), BusSubInfo>,
    /// How many of `subs` each peer holds.
    pub(super) held: HashMap<PeerId, usize>,
    /// Subscriptions announced to native peers and not yet confirmed by all of them, by ticket.
    barriers: HashMap<u64, Barrier>,
    next_ticket: u64,
}

/// A subscription whose `Ack` waits until every native peer routes to it: native peers
/// publish straight into their subscribers' lanes, so "subscribed" must mean "every publisher
/// knows".
struct Barrier {
    subscriber: PeerId,
    req: u64,
    waiting: Vec<PeerId>,
    deadline: Instant,
}

impl Bus {
    /// The subscriptions of the given peers.
    pub(crate) fn of_peers(&self, peers: &[PeerId]) -> Vec<BusSubInfo> {
        peers
            .iter()
            .flat_map(|p| self.subs.range((*p, 0)..=(*p, u64::MAX)).map(|(_, s)| s))
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
        // An empty topic is a GW3 peer's (the reference gateway takes it); native clients
        // refuse it before asking.
        if let Err(msg) = check_name_len("topic", &topic, self.limits.max_name_len) {
            return self.fail(from, req, Status::InvalidArgument, msg);
        }
        if !self.allowed(from, PolicyAction::Subscribe, &topic) {
            let msg = format!("the gateway's policy does not allow subscribing to {topic:?}");
            return self.fail(from, req, Status::PermissionDenied, msg);
        }
        let held = self.bus.held.get(&from).copied().unwrap_or(0);
        let known = self.bus.subs.contains_key(&(from, sub));
        if !known && held >= self.limits.max_bus_subs_per_peer {
            let msg = format!(
                "at most {} bus subscriptions per peer (max_bus_subs_per_peer)",
                self.limits.max_bus_subs_per_peer
            );
            return self.fail(from, req, Status::Busy, msg);
        }
        let info = BusSubInfo {
            peer: from,
            sub,
            topic,
            routing_key,
        };
        if self.bus.subs.insert((from, sub), info.clone()).is_none() {
            *self.bus.held.entry(from).or_default() += 1;
        }
        let mut waiting = Vec::new();
        let ticket = self.bus.next_ticket;
        for p in self.audience(from) {
            let native = self
                .peers
                .get(&p)
                .is_some_and(|x| x.transport == Transport::Shm);
            if native {
                waiting.push(p);
                let msg = FromGateway::BusSubscribedSync {
                    info: info.clone(),
                    ticket,
                };
                self.send(p, msg, Vec::new());
            } else {
                // Peers behind the gateway publish through it: its table is their route.
                self.send(p, FromGateway::BusSubscribed(info.clone()), Vec::new());
            }
        }
        if waiting.is_empty() {
            self.send(from, FromGateway::Ack { req }, Vec::new());
        } else {
            self.bus.next_ticket += 1;
            let b = Barrier {
                subscriber: from,
                req,
                waiting,
                deadline: Instant::now() + SYNC_TIMEOUT,
            };
            self.bus.barriers.insert(ticket, b);
        }
    }

    /// A peer confirmed a subscription announcement.
    pub(crate) fn bus_synced(&mut self, from: PeerId, ticket: u64) {
        let done = match self.bus.barriers.get_mut(&ticket) {
            Some(b) => {
                b.waiting.retain(|p| *p != from);
                b.waiting.is_empty()
            }
            None => false,
        };
        if done {
            self.bus_release(ticket);
        }
    }

    fn bus_release(&mut self, ticket: u64) {
        if let Some(b) = self.bus.barriers.remove(&ticket) {
            self.send(b.subscriber, FromGateway::Ack { req: b.req }, Vec::new());
        }
    }

    /// Subscriptions whose announcement some peer never confirmed complete anyway.
    pub(crate) fn bus_expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .bus
            .barriers
            .iter()
            .filter(|(_, b)| b.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            if let Some(b) = self.bus.barriers.get(&t) {
                crate::log::debug(format_args!(
                    "bus subscription of {}: {} peer(s) did not confirm it in time",
                    b.subscriber,
                    b.waiting.len()
                ));
            }
            self.bus_release(t);
        }
    }

    pub(crate) fn bus_unsubscribe(&mut self, from: PeerId, req: u64, sub: u64) {
        if self.bus.subs.remove(&(from, sub)).is_some() {
            super::registry::count_down(&mut self.bus.held, from);
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

    /// Delivers a message from `from` to the matching subscribers it cannot reach over a lane:
    /// peers behind the gateway and, when the publisher is itself behind the gateway, native
    /// peers too. The publisher's own subscriptions get it only with `include_self` (a native
    /// client delivers to itself; a web peer's echo comes from here). One message per peer;
    /// each peer matches its own subscriptions (and the source filters on them).
    pub(crate) fn bus_publish(
        &mut self,
        from: PeerId,
        topic: String,
        routing_key: Option<String>,
        target: Value,
        data: Value,
        include_self: bool,
    ) {
        let Some(publisher) = self.peers.get(&from) else {
            return;
        };
        let everyone = publisher.transport == Transport::Relay;
        // The publisher's library refuses first (the bridge for a web one, answering it); this
        // is for one that does not: a topic longer than a subscription's may be, a payload
        // larger than the limit, reach nobody.
        if check_name_len("topic", &topic, self.limits.max_name_len).is_err()
            || self.check_payload(&data).is_err()
            || !self.allowed(from, PolicyAction::Publish, &topic)
        {
            return;
        }
        let target = target.as_map();
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
            if p.identity.user != publisher.identity.user
                || (s.peer == from && !include_self)
                || (s.peer != from && !everyone && p.transport != Transport::Relay)
            {
                continue;
            }
            // As the publisher sees the subscriber (the identity it was shown).
            if target.is_some_and(|t| !identity_matches(t, p.seen_by(publisher))) {
                continue;
            }
            // Its `subscribe` rules decide on the topic itself, whatever pattern it subscribed
            // with (`bus_subscribe` could check only the pattern's text). Not logged: the
            // subscriber asked for no topic in particular.
            if !p.rules.allows(PolicyAction::Subscribe, &topic) {
                continue;
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

    /// A peer left: its subscriptions go, silently (see below).
    pub(crate) fn bus_peer_left(&mut self, peer: PeerId) {
        // Barriers: a leaving subscriber's go; a leaving peer confirms nothing more.
        self.bus.barriers.retain(|_, b| b.subscriber != peer);
        let mut done = Vec::new();
        for (t, b) in self.bus.barriers.iter_mut() {
            b.waiting.retain(|p| *p != peer);
            if b.waiting.is_empty() {
                done.push(*t);
            }
        }
        for t in done {
            self.bus_release(t);
        }
        // No `BusUnsubscribed` per subscription: everyone who could see the peer drops its
        // subscriptions on the `PeerRemoved` that follows. A burst of one notice per
        // subscription (up to 100,000 for a web peer) to every peer of the user overflowed
        // their queues and disconnected them.
        let mine: Vec<(PeerId, u64)> = self
            .bus
            .subs
            .range((peer, 0)..=(peer, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in mine {
            self.bus.subs.remove(&k);
        }
        self.bus.held.remove(&peer);
    }
}
