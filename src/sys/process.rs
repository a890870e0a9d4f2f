//! Processes: whether one is alive, detaching a child into its own session, descriptor limits.

use std::io;

/// Whether process `pid` exists: `Some(false)` only when the kernel says there is no such
/// process (`ESRCH`); `None` for pid 0 or an answer that says nothing (it may be anyone's pid
/// after reuse: callers treat "alive" as "not known to be dead").
pub fn pid_alive(pid: u32) -> Option<bool> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    match rustix::process::test_kill_process(pid) {
        Ok(()) => Some(true),
        Err(rustix::io::Errno::SRCH) => Some(false),
        // EPERM: it exists and belongs to someone else.
        Err(rustix::io::Errno::PERM) => Some(true),
        Err(_) => None,
    }
}

/// Makes the calling process the leader of a new session (no controlling terminal, its own
/// process group), so signals aimed at its parent's terminal or group do not reach it.
///
/// Meant for `CommandExt::pre_exec`: `setsid` is async-signal-safe.
pub(crate) fn detach_session() -> io::Result<()> {
    rustix::process::setsid()?;
    Ok(())
}

/// Raises the soft limit on open descriptors to the hard limit (a process that holds one
/// descriptor per shared context needs many). Best effort.
pub(crate) fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}
