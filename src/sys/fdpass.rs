//! Sending and receiving bytes with file descriptors attached (SCM_RIGHTS) on a Unix stream.
//!
//! `interprocess` gives us the socket, its name handling and peer credentials; it does not pass
//! descriptors, so the frames that carry memfds go through `sendmsg`/`recvmsg` here.

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

/// The most descriptors one frame may carry.
pub(crate) const MAX_FDS: usize = 4;

/// One `sendmsg`: sends a prefix of `bytes`, attaching `fds` (if any) to its first byte.
/// Returns how many bytes went out; `WouldBlock` on a full non-blocking socket.
pub(crate) fn send_some(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    loop {
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("ancillary buffer too small"));
        }
        match sendmsg(
            sock,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(0) if !bytes.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends all of `bytes` on a blocking socket, `fds` attached to the first byte.
pub(crate) fn send_all(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut sent = send_some(sock, bytes, fds)?;
    while sent < bytes.len() {
        match send_some(sock, &bytes[sent..], &[]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(sock)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn wait_writable(sock: BorrowedFd<'_>) -> io::Result<()> {
    let mut fds = [rustix::event::PollFd::new(
        &sock,
        rustix::event::PollFlags::OUT,
    )];
    rustix::event::poll(&mut fds, None)?;
    Ok(())
}

/// Reads what is available into `buf` (at most its length), appending received descriptors to
/// `fds`. Returns 0 at end of stream.
pub(crate) fn recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        match recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(iter) = m {
                        fds.extend(iter);
                    }
                }
                return Ok(msg.bytes);
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
