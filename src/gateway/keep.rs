//! The gateway's half of the keeper ([`crate::keeper`]): adopting the context segments a
//! previous run left with the keeper, handing every new segment to it, keeping the id counters
//! ahead of anything the previous run used, and breaking writer locks that a writer of the
//! previous run left behind.
//!
//! Adoption treats everything the keeper hands back as untrusted: each record must decode,
//! name a plausible context, carry one descriptor, and the descriptor must map as a valid
//! context segment (the same checks as any segment a peer receives: seals, header, kind,
//! sizes). Anything else is reported ([`AdoptError`]), left out, and dropped from the keeper;
//! the gateway starts either way.

use super::channels::GATEWAY_TOKEN;
use super::registry::Registry;
use crate::keeper::{Counters, KeeperConfig, KeptContext, Link, State};
use crate::shm::{ContextSegment, ShmError};
use crate::store::{Store, StoreError};
use crate::wire::frame::PeerId;
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use thiserror::Error;

/// A lock held, without progress, by a writer that is not a peer of this run and whose
/// process we know nothing about (or that belongs to the previous gateway) is broken after
/// this long. Writers hold a lock for the time of one write; one waiting for it waits 5 s.
const STALE_LOCK_GRACE: Duration = Duration::from_secs(2);
/// The same when the holder was a peer of the previous run whose process still exists: it is
/// probably still writing (it will reconnect as a new peer), or stuck, or its pid was reused.
const LIVE_HOLDER_GRACE: Duration = Duration::from_secs(30);
/// Ids reserved with the keeper at a time.
const ID_BLOCK: u64 = 1024;
/// How often a lost keeper is looked for again.
const REATTACH_EVERY: Duration = Duration::from_secs(2);

/// Why a segment handed back by the keeper was not adopted.
#[derive(Debug, Error)]
pub enum AdoptError {
    /// The record does not decode.
    #[error("a kept record does not decode: {0}")]
    Malformed(String),
    /// The record is not a plausible context (bad name, duplicate id or name, no descriptor).
    #[error("kept context {id} ({name:?}): {why}")]
    Invalid {
        id: u64,
        name: String,
        why: &'static str,
    },
    /// The descriptor is not a valid context segment.
    #[error("kept context {id} ({name:?}): {source}")]
    Segment {
        id: u64,
        name: String,
        source: ShmError,
    },
    /// The segment's regions are inconsistent.
    #[error("kept context {id} ({name:?}): {source}")]
    Store {
        id: u64,
        name: String,
        source: StoreError,
    },
}

/// What the registry keeps about the keeper.
#[derive(Debug, Default)]
pub(crate) struct Keep {
    link: Option<Link>,
    /// Where to find (or start) the keeper again if the link breaks.
    source: Option<(PathBuf, KeeperConfig)>,
    last_attach: Option<Instant>,
    /// Ids below these are reserved with the keeper.
    reserved_peer: u64,
    reserved_context: u64,
    /// Peers of the previous run that had not left, by id (= writer token): their pid.
    previous: HashMap<u64, u32>,
    /// Locks held by writers that are not peers of this run: context id → (holder, version
    /// when last seen moving, since when).
    watch: HashMap<u64, (u64, u64, Instant)>,
}

impl Registry {
    /// Adopts what a keeper handed back (after [`Registry::set_keeper`], so that what is left
    /// out is dropped from the keeper too). Call before any peer is admitted. Returns what was
    /// left out and why.
    pub(crate) fn adopt(&mut self, state: State) -> Vec<AdoptError> {
        let mut errors = Vec::new();
        let mut rejected = Vec::new();
        let mut max_id = 0;
        for r in state.contexts {
            match self.adopt_one(r.record, r.fd) {
                Ok(id) => max_id = max_id.max(id),
                Err((id, e)) => {
                    rejected.extend(id);
                    errors.push(e);
                }
            }
        }
        self.contexts.next_id = self
            .contexts
            .next_id
            .max(max_id)
            .max(state.counters.next_context.saturating_sub(1));
        self.next_peer = self.next_peer.max(state.counters.next_peer).max(1);
        self.keep.previous = state.peers.into_iter().collect();
        // Do not offer what we refused to the next run either.
        if let Some(link) = self.keep.link.as_mut() {
            for id in rejected {
                let _ = link.drop_context(id);
            }
        }
        // Nothing of the previous run's may be handed out again, even if it did not survive.
        self.reserve(true);
        errors
    }

    fn adopt_one(
        &mut self,
        record: Result<KeptContext, String>,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> Result<u64, (Option<u64>, AdoptError)> {
        let rec = record.map_err(|e| (None, AdoptError::Malformed(e)))?;
        let (id, name) = (rec.id, rec.name.clone());
        let invalid = |why| {
            (
                Some(id),
                AdoptError::Invalid {
                    id,
                    name: name.clone(),
                    why,
                },
            )
        };
        if id == 0 || id == u64::MAX {
            return Err(invalid("id out of range"));
        }
        if rec.name.is_empty() || rec.name.len() > self.limits.max_name_len {
            return Err(invalid("name empty or too long"));
        }
        if rec.user.is_empty() || rec.user.len() > self.limits.max_name_len {
            return Err(invalid("user empty or too long"));
        }
        if self.contexts.get(id).is_some() {
            return Err(invalid("duplicate id"));
        }
        if self.contexts.find(&rec.user, &rec.name).is_some() {
            return Err(invalid("duplicate name"));
        }
        if self.contexts.len() >= self.limits.max_contexts {
            return Err(invalid("too many contexts"));
        }
        let fd = fd.ok_or_else(|| invalid("no descriptor"))?;
        let seg = ContextSegment::open(&fd).map_err(|source| {
            (
                Some(id),
                AdoptError::Segment {
                    id,
                    name: name.clone(),
                    source,
                },
            )
        })?;
        let store = Store::new(seg).map_err(|source| {
            (
                Some(id),
                AdoptError::Store {
                    id,
                    name: name.clone(),
                    source,
                },
            )
        })?;
        // Destroyed by the previous run, which stopped before the keeper heard of it.
        if store.ctl().is_retired() {
            return Err(invalid("destroyed"));
        }
        // As at creation: a read-only descriptor made later cannot be reopened writable as it
        // is.
        let _ = crate::sys::memfd::restrict_mode(&fd);
        // The table names doorbells of the previous run's directory: subscribers come back
        // and subscribe again.
        store.ctl().clear_subscribers();
        // The previous gateway is gone (we hold its lock file): a channel initialisation it
        // left half-done cannot finish.
        if store.ctl().break_lock(GATEWAY_TOKEN) {
            crate::log::warn(format_args!(
                "context {name:?}: freed the lock the previous gateway held"
            ));
        }
        self.contexts
            .insert_adopted(id, rec.name, rec.user, fd, store);
        Ok(id)
    }

    /// Starts handing segments to `link` (then call [`Registry::adopt`] with what it handed
    /// back); `source` says how to find the keeper again.
    pub(crate) fn set_keeper(&mut self, link: Link, source: Option<(PathBuf, KeeperConfig)>) {
        self.keep.link = Some(link);
        self.keep.source = source;
        self.keep.last_attach = Some(Instant::now());
    }

    /// Remembers how to find a keeper that could not be reached at start-up.
    pub(crate) fn set_keeper_source(&mut self, gateway_socket: PathBuf, cfg: KeeperConfig) {
        self.keep.source = Some((gateway_socket, cfg));
        self.keep.last_attach = Some(Instant::now());
    }

    /// Keeps the id counters reserved ahead of what is handed out.
    fn reserve(&mut self, force: bool) {
        let next_context = self.contexts.next_id + 1;
        if !force
            && self.next_peer < self.keep.reserved_peer
            && next_context < self.keep.reserved_context
        {
            return;
        }
        let c = Counters {
            next_peer: self.next_peer + ID_BLOCK,
            next_context: next_context + ID_BLOCK,
        };
        if let Some(link) = self.keep.link.as_mut() {
            if link.counters(c).is_ok() {
                self.keep.reserved_peer = c.next_peer;
                self.keep.reserved_context = c.next_context;
            }
        }
    }

    /// A peer was admitted (call after `next_peer` moved past it).
    pub(crate) fn keep_peer_joined(&mut self, id: PeerId, pid: u32, native: bool) {
        self.reserve(false);
        if native {
            if let Some(link) = self.keep.link.as_mut() {
                let _ = link.peer_up(id.0, pid);
            }
        }
    }

    /// A peer left.
    pub(crate) fn keep_peer_left(&mut self, id: PeerId) {
        if let Some(link) = self.keep.link.as_mut() {
            let _ = link.peer_down(id.0);
        }
    }

    /// A context segment was created.
    pub(crate) fn keep_context_created(&mut self, id: u64) {
        self.reserve(false);
        let Some(c) = self.contexts.get(id) else {
            return;
        };
        let rec = KeptContext {
            id,
            user: c.user.clone(),
            name: c.name.clone(),
        };
        let fd = c.fd().clone();
        if let Some(link) = self.keep.link.as_mut() {
            let _ = link.put(&rec, fd.as_fd());
        }
    }

    /// A context was destroyed.
    pub(crate) fn keep_context_removed(&mut self, id: u64) {
        if let Some(link) = self.keep.link.as_mut() {
            let _ = link.drop_context(id);
        }
    }

    /// The gateway stops cleanly: the keeper exits and nothing is kept.
    pub(crate) fn keeper_exit(&mut self) {
        if let Some(link) = self.keep.link.take() {
            link.exit();
        }
    }

    /// Once a second: frees locks left by writers of the previous run, and looks for the keeper
    /// again if its link broke.
    pub(crate) fn keep_sweep(&mut self, now: Instant) {
        self.break_stale_locks(now);
        let broken = self.keep.link.as_mut().is_none_or(Link::is_broken);
        let due = self
            .keep
            .last_attach
            .is_none_or(|t| now.duration_since(t) >= REATTACH_EVERY);
        if broken && due && self.keep.source.is_some() {
            self.reattach(now);
        }
    }

    /// Finds (or starts) a keeper again and hands it everything we hold now.
    fn reattach(&mut self, now: Instant) {
        self.keep.last_attach = Some(now);
        let Some((socket, cfg)) = self.keep.source.clone() else {
            return;
        };
        if self.keep.link.take().is_some() {
            crate::log::warn(format_args!("lost the keeper; starting another"));
        }
        let (mut link, state) = match Link::attach(&socket, &cfg) {
            Ok(x) => x,
            Err(e) => {
                crate::log::warn(format_args!("keeper unavailable: {e}"));
                return;
            }
        };
        // What it held is not ours to adopt mid-run: only what we hold now is kept.
        let ours: Vec<u64> = self.contexts.ids();
        for r in &state.contexts {
            if let Ok(rec) = &r.record {
                if !ours.contains(&rec.id) {
                    let _ = link.drop_context(rec.id);
                }
            }
        }
        for id in ours {
            if let Some(c) = self.contexts.get(id) {
                let rec = KeptContext {
                    id,
                    user: c.user.clone(),
                    name: c.name.clone(),
                };
                let _ = link.put(&rec, c.fd().as_fd());
            }
        }
        let natives: Vec<(u64, u32)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.doorbell.is_some())
            .map(|(id, p)| (id.0, p.identity.pid))
            .collect();
        for (id, pid) in natives {
            let _ = link.peer_up(id, pid);
        }
        self.keep.link = Some(link);
        self.reserve(true);
    }

    /// Breaks locks held, without progress, by writers that are not peers of this run: writers
    /// of the previous run that died (or never came back) and the previous gateway itself.
    /// Locks of this run's peers are freed when they leave (`contexts_peer_left`).
    fn break_stale_locks(&mut self, now: Instant) {
        let mut seen = Vec::new();
        let mut broken = Vec::new();
        for c in self.contexts.iter() {
            let holder = c.store.ctl().lock_holder();
            if holder == 0 || (holder != GATEWAY_TOKEN && self.peers.contains_key(&PeerId(holder)))
            {
                continue;
            }
            let version = c.store.ctl().version();
            seen.push(c.id);
            let w = self
                .keep
                .watch
                .entry(c.id)
                .or_insert((holder, version, now));
            if w.0 != holder || w.1 != version {
                *w = (holder, version, now);
                continue;
            }
            let idle = now.duration_since(w.2);
            let stale = match self.keep.previous.get(&holder) {
                // A writer of the previous run: gone for sure when its process is.
                Some(pid) => {
                    crate::sys::process::pid_alive(*pid) == Some(false) || idle >= LIVE_HOLDER_GRACE
                }
                None => holder == GATEWAY_TOKEN || idle >= STALE_LOCK_GRACE,
            };
            if stale && c.store.ctl().break_lock(holder) {
                broken.push((c.id, c.name.clone(), holder));
            }
        }
        self.keep.watch.retain(|id, _| seen.contains(id));
        for (id, name, holder) in broken {
            self.keep.watch.remove(&id);
            crate::log::warn(format_args!(
                "context {name:?}: freed the lock writer {holder} held since before the restart"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Limits;
    use crate::keeper::Recovered;

    fn rec(id: u64, name: &str) -> Result<KeptContext, String> {
        Ok(KeptContext {
            id,
            user: "u".into(),
            name: name.into(),
        })
    }

    #[test]
    fn adoption_skips_malformed_records_and_foreign_segments_and_keeps_the_rest() {
        let good = crate::shm::create_context(4096, 4096).unwrap();
        let lane = crate::shm::create_lane(4096).unwrap();
        let other = crate::shm::create_context(4096, 4096).unwrap();
        let unsealed = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&unsealed, 1 << 20).unwrap();
        let state = State {
            counters: Counters {
                next_peer: 500,
                next_context: 40,
            },
            peers: vec![(7, 1)],
            contexts: vec![
                Recovered {
                    record: rec(3, "good"),
                    fd: Some(good),
                },
                Recovered {
                    record: Err("frame body does not decode".into()),
                    fd: None,
                },
                Recovered {
                    record: rec(4, "a lane"),
                    fd: Some(lane),
                },
                Recovered {
                    record: rec(5, "unsealed"),
                    fd: Some(unsealed),
                },
                Recovered {
                    record: rec(6, "good"),
                    fd: Some(other),
                },
                Recovered {
                    record: rec(8, ""),
                    fd: None,
                },
                Recovered {
                    record: rec(9, "no fd"),
                    fd: None,
                },
            ],
        };
        let mut reg = Registry::new(Limits::default()).unwrap();
        let errors = reg.adopt(state);
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(matches!(errors[0], AdoptError::Malformed(_)));
        assert!(matches!(
            errors[1],
            AdoptError::Segment {
                id: 4,
                source: ShmError::Invalid("unexpected segment kind"),
                ..
            }
        ));
        assert!(matches!(errors[2], AdoptError::Segment { id: 5, .. }));
        assert!(matches!(
            errors[3],
            AdoptError::Invalid {
                id: 6,
                why: "duplicate name",
                ..
            }
        ));
        assert!(matches!(errors[4], AdoptError::Invalid { id: 8, .. }));
        assert!(matches!(
            errors[5],
            AdoptError::Invalid {
                why: "no descriptor",
                ..
            }
        ));
        assert_eq!(reg.contexts.visible_to("u"), vec![(3, "good".to_string())]);
        // Counters continue past the previous run's.
        assert!(reg.next_peer >= 500);
        let id = reg
            .new_context(
                "u",
                "new",
                crate::wire::frame::ContextLifetime::Retained,
                None,
            )
            .unwrap();
        assert!(id >= 40, "context id {id} reuses the previous run's range");
    }

    #[test]
    fn locks_left_by_the_previous_run_are_broken_once_stale() {
        let fd = crate::shm::create_context(4096, 4096).unwrap();
        let probe = Store::new(ContextSegment::open(&fd).unwrap()).unwrap();
        // A writer of the previous run whose process is gone, and a subscriber table that
        // names the previous run's doorbells.
        let dead_writer = 17;
        let guard = probe.lock(dead_writer, || true).unwrap();
        std::mem::forget(guard);
        probe.ctl().add_subscriber(3);
        let state = State {
            counters: Counters::default(),
            // pid 0 is never alive: unknown.
            peers: Vec::new(),
            contexts: vec![Recovered {
                record: rec(1, "c"),
                fd: Some(fd),
            }],
        };
        let mut reg = Registry::new(Limits::default()).unwrap();
        assert!(reg.adopt(state).is_empty());
        let mut subs = Vec::new();
        probe.ctl().for_each_subscriber(|i| subs.push(i));
        assert!(subs.is_empty(), "stale subscribers: {subs:?}");
        let t0 = Instant::now();
        reg.keep_sweep(t0);
        assert_eq!(probe.ctl().lock_holder(), dead_writer, "broken too early");
        reg.keep_sweep(t0 + Duration::from_secs(1));
        assert_eq!(probe.ctl().lock_holder(), dead_writer, "broken too early");
        reg.keep_sweep(t0 + STALE_LOCK_GRACE + Duration::from_millis(1));
        assert_eq!(probe.ctl().lock_holder(), 0, "a stale lock stays held");
    }

    #[test]
    fn a_lock_of_a_dead_previous_peer_is_broken_at_once_and_a_new_holder_gets_its_grace() {
        let fd = crate::shm::create_context(4096, 4096).unwrap();
        let probe = Store::new(ContextSegment::open(&fd).unwrap()).unwrap();
        std::mem::forget(probe.lock(21, || true).unwrap());
        // A pid that does not exist: beyond the kernel's pid_max.
        let state = State {
            counters: Counters::default(),
            peers: vec![(21, 0x7fff_fff0)],
            contexts: vec![Recovered {
                record: rec(1, "c"),
                fd: Some(fd),
            }],
        };
        let mut reg = Registry::new(Limits::default()).unwrap();
        assert!(reg.adopt(state).is_empty());
        let t0 = Instant::now();
        reg.keep_sweep(t0);
        reg.keep_sweep(t0 + Duration::from_millis(10));
        assert_eq!(probe.ctl().lock_holder(), 0);

        // A holder seen for the first time gets its grace, whenever the sweep runs.
        std::mem::forget(probe.lock(22, || true).unwrap());
        reg.keep_sweep(t0 + Duration::from_secs(60));
        assert_eq!(probe.ctl().lock_holder(), 22);
        assert!(probe.ctl().break_lock(22));
    }

    /// A keeper that hands back one good segment, one record that does not decode and one
    /// segment of the wrong kind: the gateway starts, serves the good context to clients, and
    /// tells the keeper to drop the one it refused.
    #[test]
    fn a_gateway_starts_and_adopts_what_validates_when_its_keeper_hands_back_garbage() {
        use crate::keeper::{send_frame, FromKeeper, KeeperConfig, ToKeeper};
        use crate::wire::frame::{decode_body, encode_frame, FrameReader};
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("knit-keep-fake-{}", std::process::id()));
        crate::control::ensure_private_dir(&dir).unwrap();
        let socket = dir.join("gw.sock");
        let listener = UnixListener::bind(crate::keeper::socket_path(&socket)).unwrap();
        let good = crate::shm::create_context(4096, 4096).unwrap();
        {
            let store = Store::new(ContextSegment::open(&good).unwrap()).unwrap();
            let mut m = crate::wire::Map::new();
            m.insert("kept".into(), crate::wire::Value::from(true));
            crate::store::context::write(
                &store,
                9,
                &crate::model::context::ContextOp::Set(m),
                None,
                1 << 20,
                Duration::from_secs(1),
                None,
            )
            .unwrap();
        }
        let lane = crate::shm::create_lane(4096).unwrap();
        let fake = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let deadline = || Instant::now() + Duration::from_secs(10);
            let frame = |m: &FromKeeper, n| encode_frame(m, n).unwrap();
            let mut frames = FrameReader::default();
            let mut buf = vec![0u8; 65536];
            let mut next = move |sock: &std::os::unix::net::UnixStream| loop {
                if let Some((body, _)) = frames.next_frame().unwrap() {
                    return Some(decode_body::<ToKeeper>(&body).unwrap());
                }
                let mut fds = Vec::new();
                match crate::sys::fdpass::recv(sock.as_fd(), &mut buf, &mut fds) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => {
                        frames.push_bytes(&buf[..n]);
                        frames.push_fds(fds);
                    }
                }
            };
            assert!(matches!(next(&sock), Some(ToKeeper::Hello { .. })));
            let state = FromKeeper::State {
                protocol: crate::keeper::PROTOCOL,
                counters: Counters::default(),
                peers: Vec::new(),
                contexts: 3,
            };
            send_frame(sock.as_fd(), &frame(&state, 0), &[], deadline()).unwrap();
            let kept = |id, name: &str| {
                FromKeeper::Kept(KeptContext {
                    id,
                    user: crate::sys::identity::user_name(crate::sys::identity::euid()),
                    name: name.into(),
                })
            };
            send_frame(
                sock.as_fd(),
                &frame(&kept(3, "good"), 1),
                &[good.as_fd()],
                deadline(),
            )
            .unwrap();
            // A well-framed record whose body is not a record.
            let mut garbage = vec![0u8; 8];
            garbage.extend_from_slice(&[0xff; 5]);
            garbage[0] = 5;
            send_frame(sock.as_fd(), &garbage, &[], deadline()).unwrap();
            send_frame(
                sock.as_fd(),
                &frame(&kept(4, "lane"), 1),
                &[lane.as_fd()],
                deadline(),
            )
            .unwrap();
            send_frame(sock.as_fd(), &frame(&FromKeeper::End, 0), &[], deadline()).unwrap();
            let mut dropped = Vec::new();
            while let Some(m) = next(&sock) {
                match m {
                    ToKeeper::Drop { id } => dropped.push(id),
                    ToKeeper::Exit => break,
                    _ => {}
                }
            }
            dropped
        });
        let mut cfg = super::super::GatewayConfig::new(&socket);
        // Never spawned: the fake answers.
        cfg.keeper = Some(KeeperConfig::new("/nonexistent/knit"));
        let gw = super::super::Gateway::bind(cfg).unwrap().spawn().unwrap();
        let c = crate::client::Client::builder("t")
            .socket(&socket)
            .connect()
            .unwrap();
        assert!(c.contexts().all().contains(&"good".to_string()));
        assert!(!c.contexts().all().contains(&"lane".to_string()));
        let snap = c.contexts().get("good").unwrap();
        assert_eq!(snap.data.get("kept"), Some(&crate::wire::Value::from(true)));
        c.close();
        gw.shutdown();
        assert_eq!(fake.join().unwrap(), vec![4]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
