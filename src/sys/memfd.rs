//! Anonymous shared-memory files: created by the gateway, sealed against resizing, passed to peers
//! over the control socket. They have no name in `/dev/shm`, so a crash leaks nothing.

use rustix::fs::{self, MemfdFlags, SealFlags};
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// Creates a memfd of `len` bytes (zero-filled) and seals its size.
pub(crate) fn create_sealed(name: &str, len: u64) -> io::Result<OwnedFd> {
    let fd = fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    fs::ftruncate(&fd, len)?;
    fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// The size of a received segment, and whether it is sealed against shrinking. A segment that
/// could shrink under us would turn any access past the new end into SIGBUS, so unsealed
/// segments are refused.
pub(crate) fn inspect(fd: impl AsFd) -> io::Result<(u64, bool)> {
    let st = fs::fstat(fd.as_fd())?;
    let seals = fs::fcntl_get_seals(fd.as_fd()).unwrap_or(SealFlags::empty());
    Ok((st.st_size as u64, seals.contains(SealFlags::SHRINK)))
}
