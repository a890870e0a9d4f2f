//! Shared (not process-private) futexes: a wait in one process is woken by a wake in another.
//!
//! `atomic-wait` and std's parker use `FUTEX_PRIVATE_FLAG`, which keys the futex by virtual address
//! inside one process and therefore never wakes a sleeper in another process. We pass no flag.

use rustix::thread::futex;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, for at most `timeout` (forever when `None`). Returns on a
/// wake, a timeout, a signal, or at once when the word already differs: callers re-check.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|d| rustix::time::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos() as _,
    });
    // Errors are EAGAIN (the word changed), ETIMEDOUT and EINTR: all mean "re-check".
    let _ = futex::wait(word, futex::Flags::empty(), expected, ts.as_ref());
}

/// Wakes every sleeper on `word`, in any process that maps it.
pub(crate) fn wake_all(word: &AtomicU32) {
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}
