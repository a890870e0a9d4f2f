//! The other peers a web connection knows, as it knows them: shared between connections.
//!
//! Every connection keeps its own picture of the peers of its user — it learns of them, and of
//! their methods, from its own queue of registry notices, at its own pace, and its client is told
//! exactly what that picture holds when it holds it. The picture of one peer (its GW3 identity
//! and its method table, indexed by GW3 id for calls) is a [`PeerView`]; a connection holds a
//! pointer to one per peer it knows, and connections whose pictures of a peer are the same share
//! one view. A view never changes once shared: a connection that hears a change makes the next
//! version (or finds the one another connection made from the same version with the same change,
//! [`PeerView`]'s link to it) and moves its pointer, while connections that have not heard it yet
//! keep theirs. An idle crowd of N peers of one user thus holds N views, not N² (the connections'
//! own cost per peer is a pointer and a flag, `session::Known`).
//!
//! [`Views`] remembers the newest shared views of each peer, so that a connection that learns of
//! a peer from its welcome or from `PeerAdded` finds an equal view to share instead of making its
//! own; and a connection whose view drifted from the others' (it learnt of the peer at another
//! point of its history) joins theirs again at the first change after which they are equal.
//!
//! A peer with more than [`SHARE_MAX`] methods is held by each connection privately, changed in
//! place as before: sharing would copy its table at every change (its versions cannot share
//! structure), O(methods) where a change now costs O(methods changed).

use super::gw3;
use crate::wire::frame::{MethodSpec, PeerId};
use serde_json::Value as J;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

/// The largest method table that is shared between connections (see the module's comment).
pub(super) const SHARE_MAX: usize = 256;

/// How many shared versions of one peer [`Views`] remembers.
const TIPS: usize = 4;

/// The GW3 id of a method object (`null` when it has none).
pub(super) fn gid_of(obj: &J) -> &J {
    obj.get("id").unwrap_or(&J::Null)
}

/// Whether two GW3 ids are the same id: the same JSON text ([`gw3::id_key`]), which for two
/// strings, the usual case, is string equality.
fn same_id(a: &J, b: &J) -> bool {
    match (a, b) {
        (J::String(x), J::String(y)) => x == y,
        _ => gw3::id_key(a) == gw3::id_key(b),
    }
}

/// A change to a peer's methods, as the registry announced it. Every connection of a user hears
/// the same changes of a peer in the same order (the registry tells the peer's whole audience at
/// once), so a version and a change name the next version.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    Added(Vec<MethodSpec>),
    Removed(Vec<u32>),
}

/// A peer as connections that know it see it at one point of its history.
pub(super) struct PeerView {
    /// The GW3 identity shown in `peer-added` (a web peer's is shared with the hub).
    identity: Arc<J>,
    /// The hub key of a web peer (whose `agm` membership the hub knows); `None` for natives.
    web: Option<String>,
    /// Registry method id → method object (its `id` is the GW3 id; a web peer's object is
    /// shared with the hub). Changed only through [`PeerView::add_method`] and
    /// [`PeerView::remove_method`], which keep `by_gid` in step.
    methods: BTreeMap<u32, Arc<J>>,
    /// A hash of each method's GW3 id (as [`gw3::id_key`] writes it) → registry method id: a
    /// call names its method by GW3 id, and a server may have thousands. Hashes, not the ids:
    /// an id is any JSON a client chose, and a copy per version would undo the sharing of method
    /// objects. A peer's GW3 ids are distinct (a registration repeating one is refused; a native
    /// method's is its registry id); a hit is checked against the method's id, and if two ids
    /// ever share a hash the lookup falls back to a scan.
    by_gid: HashMap<u64, u32>,
    gid_hasher: RandomState,
    gid_collision: bool,
    /// The version the first connection to apply a change to this one made, with the change:
    /// the others apply the same change by moving to it.
    next: OnceLock<(Change, Arc<PeerView>)>,
    /// Made after every version with a smaller one: a link goes from a version to a later one
    /// only (a change can lead back to an earlier version's content, and a link back would be a
    /// cycle that is never freed).
    gen: u64,
}

/// Numbers versions in the order they are made ([`PeerView::gen`]).
static GEN: AtomicU64 = AtomicU64::new(0);

fn next_gen() -> u64 {
    // Relaxed: the numbers need only be distinct and grow in each thread's order of making
    // versions (every read-modify-write of one atomic sees the latest value); nothing is
    // published through them.
    GEN.fetch_add(1, Ordering::Relaxed)
}

impl std::fmt::Debug for PeerView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerView")
            .field("identity", &self.identity)
            .field("web", &self.web)
            .field("methods", &self.methods.len())
            .finish_non_exhaustive()
    }
}

/// A copy to change: everything but the link to the next version.
impl Clone for PeerView {
    fn clone(&self) -> Self {
        PeerView {
            identity: self.identity.clone(),
            web: self.web.clone(),
            methods: self.methods.clone(),
            by_gid: self.by_gid.clone(),
            gid_hasher: self.gid_hasher.clone(),
            gid_collision: self.gid_collision,
            next: OnceLock::new(),
            gen: next_gen(),
        }
    }
}

/// Versions are dropped one after another, not recursively: a connection far behind holds a
/// chain as long as the changes it has not heard yet.
impl Drop for PeerView {
    fn drop(&mut self) {
        let mut next = self.next.take();
        while let Some((_, v)) = next {
            next = match Arc::try_unwrap(v) {
                Ok(mut v) => v.next.take(),
                Err(_) => None,
            };
        }
    }
}

impl PeerView {
    /// A peer with no methods.
    pub(super) fn new(identity: Arc<J>, web: Option<String>) -> PeerView {
        PeerView {
            identity,
            web,
            methods: BTreeMap::new(),
            by_gid: HashMap::new(),
            gid_hasher: RandomState::new(),
            gid_collision: false,
            next: OnceLock::new(),
            gen: next_gen(),
        }
    }

    pub(super) fn identity(&self) -> &Arc<J> {
        &self.identity
    }

    /// The hub key of a web peer (`hub::key`); `None` for natives.
    pub(super) fn web(&self) -> Option<&str> {
        self.web.as_deref()
    }

    /// The method objects, by registry id.
    pub(super) fn methods(&self) -> impl Iterator<Item = &Arc<J>> {
        self.methods.values()
    }

    /// Whether two views show the same thing (`next` aside).
    fn same(&self, other: &PeerView) -> bool {
        self.identity == other.identity && self.web == other.web && self.methods == other.methods
    }

    /// The hash of `id`'s JSON text, without writing the text out.
    fn gid_hash(&self, id: &J) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        struct Feed<H>(H);
        impl<H: Hasher> std::io::Write for Feed<H> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.write(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut feed = Feed(self.gid_hasher.build_hasher());
        // Writing JSON into a hasher cannot fail: a `serde_json::Value` has string keys only.
        let _ = serde_json::to_writer(&mut feed, id);
        feed.0.finish()
    }

    /// The registry id of the method with GW3 id `id`.
    pub(super) fn method_by_gw3(&self, id: &J) -> Option<u32> {
        if self.gid_collision {
            return self
                .methods
                .iter()
                .find(|(_, o)| same_id(gid_of(o), id))
                .map(|(n, _)| *n);
        }
        let n = *self.by_gid.get(&self.gid_hash(id))?;
        let obj = self.methods.get(&n)?;
        same_id(gid_of(obj), id).then_some(n)
    }

    /// Adds (or replaces) a method: only while the view is not shared.
    pub(super) fn add_method(&mut self, n: u32, obj: Arc<J>) {
        let h = self.gid_hash(gid_of(&obj));
        if let Some(&other) = self.by_gid.get(&h) {
            if other != n {
                self.gid_collision = true;
            }
        }
        self.by_gid.insert(h, n);
        self.methods.insert(n, obj);
    }

    fn remove_method(&mut self, n: u32) -> Option<Arc<J>> {
        let obj = self.methods.remove(&n)?;
        let h = self.gid_hash(gid_of(&obj));
        if self.by_gid.get(&h) == Some(&n) {
            self.by_gid.remove(&h);
        }
        Some(obj)
    }

    fn apply(&mut self, change: &Change, obj: &dyn Fn(&MethodSpec) -> Arc<J>) {
        match change {
            Change::Added(specs) => {
                for m in specs {
                    self.add_method(m.id, obj(m));
                }
            }
            Change::Removed(ids) => {
                for n in ids {
                    self.remove_method(*n);
                }
            }
        }
    }
}

/// The newest shared views of every peer some connection knows (see the module's comment).
#[derive(Default)]
pub(super) struct Views {
    tips: Mutex<HashMap<PeerId, Vec<Weak<PeerView>>>>,
}

impl std::fmt::Debug for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Views").finish_non_exhaustive()
    }
}

impl Views {
    fn lock(&self) -> MutexGuard<'_, HashMap<PeerId, Vec<Weak<PeerView>>>> {
        self.tips.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A view equal to `v` that other connections hold, or `v` itself, remembered for the next
    /// ones if it is small enough to share.
    pub(super) fn share(&self, peer: PeerId, v: PeerView) -> Arc<PeerView> {
        let mut tips = self.lock();
        let list = tips.entry(peer).or_default();
        list.retain(|w| w.strong_count() > 0);
        if let Some(t) = list.iter().filter_map(Weak::upgrade).find(|t| t.same(&v)) {
            return t;
        }
        let v = Arc::new(v);
        if v.methods.len() <= SHARE_MAX {
            list.insert(0, Arc::downgrade(&v));
            list.truncate(TIPS);
        }
        if list.is_empty() {
            tips.remove(&peer);
        }
        v
    }

    /// `view` with `specs` added (`obj` makes a method's object); gives their objects, in order.
    pub(super) fn add_methods(
        &self,
        peer: PeerId,
        view: &mut Arc<PeerView>,
        specs: &[MethodSpec],
        obj: &dyn Fn(&MethodSpec) -> Arc<J>,
    ) -> Vec<Arc<J>> {
        self.change(peer, view, Change::Added(specs.to_vec()), obj);
        specs
            .iter()
            .filter_map(|m| view.methods.get(&m.id).cloned())
            .collect()
    }

    /// `view` without the methods `ids`; gives the GW3 ids of those it had, in order.
    pub(super) fn remove_methods(
        &self,
        peer: PeerId,
        view: &mut Arc<PeerView>,
        ids: &[u32],
    ) -> Vec<J> {
        let gone = ids
            .iter()
            .filter_map(|n| view.methods.get(n).map(|o| gid_of(o).clone()))
            .collect();
        self.change(peer, view, Change::Removed(ids.to_vec()), &|m| {
            Arc::new(gw3::method_to_gw3(m.id, &m.def))
        });
        gone
    }

    /// Moves `view` to its next version after `change`.
    fn change(
        &self,
        peer: PeerId,
        view: &mut Arc<PeerView>,
        change: Change,
        obj: &dyn Fn(&MethodSpec) -> Arc<J>,
    ) {
        // Another connection made it already.
        if let Some((c, next)) = view.next.get() {
            if *c == change {
                *view = next.clone();
                return;
            }
        }
        // Nobody else holds this version (a remembered one is forgotten): changed in place.
        if Arc::strong_count(view) == 1 {
            let v = Arc::make_mut(view);
            v.next = OnceLock::new();
            v.apply(&change, obj);
            if v.methods.len() <= SHARE_MAX {
                // Others may hold an equal one (they learnt of the peer later).
                if let Some(t) = self.equal_tip(peer, view) {
                    *view = t;
                }
            }
            return;
        }
        let mut v = PeerView::clone(view);
        v.apply(&change, obj);
        if v.methods.len() > SHARE_MAX {
            // Held privately from now on (see the module's comment).
            *view = Arc::new(v);
            return;
        }
        let next = self.share(peer, v);
        if next.gen > view.gen {
            // Fails only when another connection applied another change to this version (it
            // did not hear the same news): it keeps its own link.
            let _ = view.next.set((change, next.clone()));
        }
        *view = next;
    }

    /// A remembered view equal to `v` (not `v` itself), or else `v` is remembered.
    fn equal_tip(&self, peer: PeerId, v: &Arc<PeerView>) -> Option<Arc<PeerView>> {
        let mut tips = self.lock();
        let list = tips.entry(peer).or_default();
        list.retain(|w| w.strong_count() > 0);
        if let Some(t) = list
            .iter()
            .filter_map(Weak::upgrade)
            .find(|t| !Arc::ptr_eq(t, v) && t.same(v))
        {
            return Some(t);
        }
        if !list
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(v)))
        {
            list.insert(0, Arc::downgrade(v));
            list.truncate(TIPS);
        }
        None
    }

    /// Forgets what no connection holds any more of `peers` (a connection let go of them).
    pub(super) fn release(&self, peers: impl IntoIterator<Item = PeerId>) {
        let mut tips = self.lock();
        for p in peers {
            if let Some(list) = tips.get_mut(&p) {
                list.retain(|w| w.strong_count() > 0);
                if list.is_empty() {
                    tips.remove(&p);
                }
            }
        }
    }

    /// How many peers have views remembered (for tests).
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::MethodDef;
    use serde_json::json;

    fn view() -> PeerView {
        PeerView::new(Arc::new(J::Null), None)
    }

    fn spec(id: u32) -> MethodSpec {
        MethodSpec {
            id,
            def: MethodDef {
                name: format!("M{id}"),
                ..Default::default()
            },
        }
    }

    fn obj(m: &MethodSpec) -> Arc<J> {
        Arc::new(gw3::method_to_gw3(m.id, &m.def))
    }

    fn ids(v: &PeerView) -> Vec<u32> {
        v.methods.keys().copied().collect()
    }

    /// A call names its method by GW3 id (a string, a number, any JSON); the index answers as
    /// the method table does, through additions and removals.
    #[test]
    fn known_methods_are_found_by_gw3_id_until_removed() {
        let mut k = view();
        let ids = [json!("a"), json!(7), json!("7"), json!({"x": [1]})];
        for (n, id) in (10u32..).zip(&ids) {
            k.add_method(n, Arc::new(json!({"id": id, "name": format!("m{n}")})));
        }
        for (n, id) in (10u32..).zip(&ids) {
            assert_eq!(k.method_by_gw3(id), Some(n), "{id}");
        }
        assert_eq!(k.method_by_gw3(&json!("b")), None);
        let gone = k.remove_method(11).map(|o| gid_of(&o).clone());
        assert_eq!(gone, Some(json!(7)));
        assert_eq!(k.method_by_gw3(&json!(7)), None);
        assert_eq!(k.method_by_gw3(&json!("7")), Some(12));
        assert_eq!(k.remove_method(11), None);
        assert_eq!(k.methods.len(), 3);
        assert_eq!(k.by_gid.len(), 3);
    }

    /// Were two ids ever to share a hash, every lookup still finds the right method.
    #[test]
    fn a_hash_shared_by_two_ids_falls_back_to_the_scan() {
        let mut k = view();
        k.add_method(1, Arc::new(json!({"id": "a"})));
        k.add_method(2, Arc::new(json!({"id": "b"})));
        // Forge the collision: "b"'s entry now claims "a"'s hash too.
        let (ha, hb) = (k.gid_hash(&json!("a")), k.gid_hash(&json!("b")));
        k.by_gid.remove(&hb);
        k.by_gid.insert(ha, 2);
        assert_eq!(
            k.method_by_gw3(&json!("a")),
            None,
            "the hit is checked against the id"
        );
        k.gid_collision = true;
        assert_eq!(k.method_by_gw3(&json!("a")), Some(1));
        assert_eq!(k.method_by_gw3(&json!("b")), Some(2));
    }

    /// Connections that hear the same news of a peer hold one view of it, however they learnt of
    /// it (`PeerAdded`, or a welcome listing it with its methods), and at whatever pace they
    /// follow; one that has not heard a change yet still sees the peer as it was.
    #[test]
    fn connections_hearing_the_same_news_share_one_view_and_each_sees_only_what_it_heard() {
        let views = Views::default();
        let p = PeerId(7);
        let ident = Arc::new(json!({"application": "p"}));
        let fresh = || PeerView::new(ident.clone(), Some("i-p".into()));
        let mut a = views.share(p, fresh());
        let mut b = views.share(p, fresh());
        assert!(Arc::ptr_eq(&a, &b), "PeerAdded: one view");

        let objs = views.add_methods(p, &mut a, &[spec(1), spec(2)], &obj);
        assert_eq!(objs.len(), 2);
        assert_eq!(ids(&a), [1, 2]);
        assert_eq!(ids(&b), [] as [u32; 0], "b has not heard it yet");
        assert_eq!(a.method_by_gw3(&json!("1")), Some(1));
        assert_eq!(b.method_by_gw3(&json!("1")), None);
        let gone = views.remove_methods(p, &mut a, &[1]);
        assert_eq!(gone, [json!("1")]);

        // A newcomer's welcome lists the peer as it is now: it shares a's view.
        let mut snap = fresh();
        snap.add_method(2, obj(&spec(2)));
        let c = views.share(p, snap);
        assert!(Arc::ptr_eq(&a, &c), "welcome: the same view");

        // b catches up, one change at a time, through the same versions.
        let before = Arc::clone(&b);
        let objs_b = views.add_methods(p, &mut b, &[spec(1), spec(2)], &obj);
        assert!(Arc::ptr_eq(&objs[0], &objs_b[0]), "the same method objects");
        assert_eq!(ids(&before), [] as [u32; 0], "a version never changes");
        assert_eq!(views.remove_methods(p, &mut b, &[1]), [json!("1")]);
        assert!(Arc::ptr_eq(&a, &b), "b caught up: one view again");
        assert_eq!(b.method_by_gw3(&json!("2")), Some(2));
    }

    /// A connection that learnt of a peer at another point of its history (its view is its own)
    /// joins the others' view once it has heard the changes that make them equal.
    #[test]
    fn a_view_of_its_own_joins_the_shared_one_once_equal() {
        let views = Views::default();
        let p = PeerId(3);
        let mut a = views.share(p, view());
        views.add_methods(p, &mut a, &[spec(1)], &obj);
        views.add_methods(p, &mut a, &[spec(2)], &obj);
        // b's welcome came between the two registrations; a's versions went on meanwhile.
        let mut snap = view();
        snap.add_method(1, obj(&spec(1)));
        let mut b = views.share(p, snap);
        assert!(!Arc::ptr_eq(&a, &b));
        views.add_methods(p, &mut b, &[spec(2)], &obj);
        assert!(Arc::ptr_eq(&a, &b));
    }

    /// The entry a connection keeps per peer it knows is a pointer to a shared view and a flag:
    /// a per-connection copy of a peer's identity or methods would not fit.
    #[test]
    fn a_connection_s_entry_for_a_peer_is_a_pointer_and_a_flag() {
        assert!(std::mem::size_of::<super::super::session::Known>() <= 16);
    }

    /// A change back to an earlier version's content moves to that version without linking
    /// back to it (a cycle of links would never be freed).
    #[test]
    fn a_change_back_to_an_earlier_version_links_no_cycle() {
        let views = Views::default();
        let p = PeerId(2);
        let v0 = views.share(p, view());
        let mut a = Arc::clone(&v0);
        views.add_methods(p, &mut a, &[spec(1)], &obj);
        let v1 = Arc::clone(&a);
        views.remove_methods(p, &mut a, &[1]);
        assert!(Arc::ptr_eq(&a, &v0), "back to the first version");
        assert!(v1.next.get().is_none(), "no link back");
        let weak = Arc::downgrade(&v1);
        drop((a, v1, v0));
        assert_eq!(weak.strong_count(), 0, "all freed");
    }

    /// A large method table is each connection's own (changed in place, not copied at every
    /// change): one connection's change does not show in another's.
    #[test]
    fn large_method_tables_are_held_privately() {
        let views = Views::default();
        let p = PeerId(1);
        let specs: Vec<MethodSpec> = (0..=SHARE_MAX as u32).map(spec).collect();
        let mut a = views.share(p, view());
        let mut b = views.share(p, view());
        views.add_methods(p, &mut a, &specs, &obj);
        views.add_methods(p, &mut b, &specs, &obj);
        assert!(!Arc::ptr_eq(&a, &b));
        let ptr = Arc::as_ptr(&a);
        views.add_methods(p, &mut a, &[spec(100_000)], &obj);
        assert_eq!(Arc::as_ptr(&a), ptr, "changed in place");
        assert_eq!(a.methods.len(), SHARE_MAX + 2);
        assert_eq!(b.methods.len(), SHARE_MAX + 1);
    }

    /// A connection far behind holds a long chain of versions; dropping it does not recurse.
    #[test]
    fn a_long_chain_of_versions_drops_without_recursing() {
        let views = Views::default();
        let p = PeerId(1);
        let behind = views.share(p, view());
        let mut ahead = Arc::clone(&behind);
        // Every version different ({n}, {n, n + 1}, {n + 1}, ...), each held by the one before.
        for n in 0..50_000 {
            let keep = Arc::clone(&ahead);
            views.add_methods(p, &mut ahead, &[spec(n + 1)], &obj);
            drop(keep);
            let keep = Arc::clone(&ahead);
            views.remove_methods(p, &mut ahead, &[n]);
            drop(keep);
        }
        assert_eq!(ids(&behind), [] as [u32; 0]);
        drop(ahead);
        drop(behind);
        views.release([p]);
        assert_eq!(views.remembered(), 0, "nothing held, nothing remembered");
    }
}
