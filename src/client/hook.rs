//! Tests only: a step a test runs at a named point of the client's code, on the thread that
//! passes it, the next time it does. A test puts another thread's whole operation there (it
//! spawns it and joins it) to check one interleaving deterministically, with no sleeps.
//! Compiled out of every other build.

use std::cell::RefCell;

type Step = Box<dyn FnOnce()>;

thread_local! {
    static STEPS: RefCell<Vec<(&'static str, Step)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `step` the next time this thread passes `point`.
pub(crate) fn set(point: &'static str, step: impl FnOnce() + 'static) {
    STEPS.with(|s| s.borrow_mut().push((point, Box::new(step))));
}

/// Whether a step set at `point` has not run yet.
pub(crate) fn is_set(point: &'static str) -> bool {
    STEPS.with(|s| s.borrow().iter().any(|(p, _)| *p == point))
}

/// Called at `point`: runs the step set there, if any.
pub(crate) fn at(point: &'static str) {
    let step = STEPS.with(|s| {
        let mut s = s.borrow_mut();
        let i = s.iter().position(|(p, _)| *p == point)?;
        Some(s.remove(i).1)
    });
    if let Some(step) = step {
        step();
    }
}

/// Runs `f` on a thread of its own, start to end, as another thread of the client would: the
/// step a test usually sets.
pub(crate) fn elsewhere(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(f).join().unwrap();
}
