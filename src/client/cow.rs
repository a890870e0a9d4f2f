//! A list that readers take whole and writers replace whole, with a generation that moves with
//! it. A thread that uses one owner's list over and over (the dispatcher delivering a
//! context's events, a pusher feeding a stream) keeps the list it took and uses it again while
//! the generation is unchanged: no lock and no reference count per use ([`with_kept`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::LocalKey;

pub(crate) struct CowList<T> {
    list: Mutex<Arc<Vec<T>>>,
    /// Moved, under `list`'s lock, by every change.
    gen: AtomicU64,
}

impl<T> Default for CowList<T> {
    fn default() -> Self {
        Self {
            list: Mutex::new(Arc::new(Vec::new())),
            gen: AtomicU64::new(0),
        }
    }
}

impl<T: Clone> CowList<T> {
    fn lock(&self) -> MutexGuard<'_, Arc<Vec<T>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The list as it is now.
    pub(crate) fn snapshot(&self) -> Arc<Vec<T>> {
        self.lock().clone()
    }

    /// Runs `f` on the list as it is now, under the lock every change takes: no change comes
    /// between what `f` reads and what it does.
    pub(crate) fn with_current<R>(&self, f: impl FnOnce(&[T]) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the list (a copy of it, when a reader holds the current one).
    pub(crate) fn change<R>(&self, f: impl FnOnce(&mut Vec<T>) -> R) -> R {
        let mut list = self.lock();
        let r = f(Arc::make_mut(&mut list));
        // Under the lock, so a reader that takes the lock sees a generation matching the list.
        // SYNC(gen): pairs with the Acquire in `with_kept`: a reader that sees the new generation
        // takes the new list.
        self.gen.fetch_add(1, Ordering::Release);
        r
    }
}

/// A thread's kept copy of one owner's list: the owner (weakly: its address cannot be reused
/// while the copy is kept), the generation, the list.
pub(crate) type Kept<O, T> = Cell<Option<(Weak<O>, u64, Arc<Vec<T>>)>>;

/// Runs `f` with `owner`'s list (`list(owner)`): the copy this thread kept in `kept` while the
/// generation is unchanged, else the list taken now and kept for next time. A use that races a
/// change sees the list from before it, as if it had come first. The copy is taken out of
/// `kept`, not borrowed, while `f` runs: `f` may come back in (it then takes the list afresh).
pub(crate) fn with_kept<O: 'static, T: Clone + 'static, R>(
    kept: &'static LocalKey<Kept<O, T>>,
    owner: &Arc<O>,
    list: impl Fn(&O) -> &CowList<T>,
    f: impl FnOnce(&[T]) -> R,
) -> R {
    let l = list(owner);
    // SYNC(gen): pairs with the bump in `CowList::change`. An unchanged generation means the
    // kept list is current; a new one sends us to the lock, which orders the list itself.
    let gen = l.gen.load(Ordering::Acquire);
    let cached = kept
        .with(|c| c.take())
        .filter(|(o, g, _)| *g == gen && std::ptr::eq(o.as_ptr(), Arc::as_ptr(owner)));
    let cached = match cached {
        Some(c) => c,
        None => {
            let guard = l.lock();
            // Relaxed: read under the lock that every change holds.
            let gen = l.gen.load(Ordering::Relaxed);
            (Arc::downgrade(owner), gen, guard.clone())
        }
    };
    let r = f(&cached.2);
    kept.with(|c| c.set(Some(cached)));
    r
}
