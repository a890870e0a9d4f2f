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

/// A read-only descriptor of the same memory (a writable mapping of it is refused); with the
/// memfd's mode narrowed to owner-read ([`restrict_mode`]) it cannot be reopened writable
/// through `/proc` as it is. Its holder owns the memfd, though, and may `fchmod` it back:
/// this keeps honest and buggy libraries from writing, not a hostile process of the same user
/// (docs/semantics.md §6). Writers keep the descriptors they already have.
pub(crate) fn read_only(fd: impl AsFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    Ok(fs::open(
        path,
        fs::OFlags::RDONLY | fs::OFlags::CLOEXEC,
        fs::Mode::empty(),
    )?)
}

/// Restricts a memfd's mode (see [`read_only`]).
pub(crate) fn restrict_mode(fd: impl AsFd) -> io::Result<()> {
    fs::fchmod(fd, fs::Mode::from_raw_mode(0o400))?;
    Ok(())
}

/// The size of a received segment, and whether it is sealed against shrinking. A segment that
/// could shrink under us would turn any access past the new end into SIGBUS, so unsealed
/// segments are refused.
pub(crate) fn inspect(fd: impl AsFd) -> io::Result<(u64, bool)> {
    let st = fs::fstat(fd.as_fd())?;
    let seals = fs::fcntl_get_seals(fd.as_fd()).unwrap_or(SealFlags::empty());
    Ok((st.st_size as u64, seals.contains(SealFlags::SHRINK)))
}

/// The (device, inode) of a descriptor: two descriptors of the same memfd have the same pair,
/// and no other live file has it, so it tells whether a segment received again is the one
/// already mapped.
pub(crate) fn file_id(fd: impl AsFd) -> io::Result<(u64, u64)> {
    let st = fs::fstat(fd.as_fd())?;
    Ok((st.st_dev as u64, st.st_ino as u64))
}
