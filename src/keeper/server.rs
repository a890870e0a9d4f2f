//! The keeper process's loop: one thread, `poll` over the listening socket and its
//! connections. It holds descriptors and a few counters; it never maps a segment, never reads
//! one, and trusts its callers only as far as the kernel's credentials say they are our uid.

use super::{send_frame, Counters, FromKeeper, KeeperError, KeptContext, ToKeeper, PROTOCOL};
use crate::sys::identity;
use crate::wire::frame::{decode_body, encode_frame, FrameReader};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest sleep between checks that the socket file is still ours.
const TICK: Duration = Duration::from_secs(1);
/// How long the keeper waits for a slow reader of its state before dropping it.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

struct Conn {
    sock: UnixStream,
    frames: FrameReader,
    /// Said `Hello` last: its disappearance starts the linger countdown.
    owner: bool,
}

#[derive(Default)]
struct Kept {
    contexts: BTreeMap<u64, (KeptContext, OwnedFd)>,
    counters: Counters,
    peers: BTreeMap<u64, u32>,
}

enum Step {
    Continue,
    Close,
    Exit,
}

/// Runs a keeper on `socket` until told to exit, or until no gateway has been connected for
/// `linger`, or until the socket file is removed or replaced.
pub fn run(socket: &Path, linger: Duration) -> Result<(), KeeperError> {
    let dir = crate::control::socket_dir(socket);
    crate::control::ensure_private_dir(dir).map_err(super::io_err("keeper directory"))?;
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            // Another keeper answers there: it serves this gateway; we are not needed.
            return Ok(());
        }
        std::fs::remove_file(socket).map_err(super::io_err("removing a stale keeper socket"))?;
    }
    let listener =
        UnixListener::bind(socket).map_err(super::io_err("binding the keeper socket"))?;
    let ino = std::fs::metadata(socket)
        .map(|m| m.ino())
        .map_err(super::io_err("keeper socket"))?;
    crate::sys::process::raise_fd_limit();
    let r = serve(&listener, socket, ino, linger);
    // Remove the socket file only if it is still ours (not a successor's).
    if std::fs::metadata(socket).is_ok_and(|m| m.ino() == ino) {
        let _ = std::fs::remove_file(socket);
    }
    r
}

fn serve(
    listener: &UnixListener,
    path: &Path,
    ino: u64,
    linger: Duration,
) -> Result<(), KeeperError> {
    listener
        .set_nonblocking(true)
        .map_err(super::io_err("keeper socket"))?;
    let my_uid = identity::euid();
    let mut kept = Kept::default();
    let mut conns: Vec<Conn> = Vec::new();
    // Nobody is connected yet: the gateway that started us connects at once; if it never
    // does, we go after `linger`.
    let mut orphaned_since = Some(Instant::now());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // The socket file removed or replaced: nobody can reach us any more.
        match std::fs::metadata(path) {
            Ok(m) if m.ino() == ino => {}
            _ => return Ok(()),
        }
        if let Some(since) = orphaned_since {
            if since.elapsed() >= linger {
                return Ok(());
            }
        }
        let wait = orphaned_since
            .map(|s| linger.saturating_sub(s.elapsed()))
            .unwrap_or(TICK)
            .min(TICK);
        let mut pfds = Vec::with_capacity(conns.len() + 1);
        pfds.push(rustix::event::PollFd::new(
            listener,
            rustix::event::PollFlags::IN,
        ));
        for c in &conns {
            pfds.push(rustix::event::PollFd::new(
                &c.sock,
                rustix::event::PollFlags::IN,
            ));
        }
        let ts = rustix::time::Timespec::try_from(wait).unwrap_or(rustix::time::Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        match rustix::event::poll(&mut pfds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(super::io_err("poll")(e.into())),
        }
        let ready: Vec<bool> = pfds.iter().map(|p| !p.revents().is_empty()).collect();
        drop(pfds);
        if ready[0] {
            while let Ok((sock, _)) = listener.accept() {
                match identity::peer_cred(&sock) {
                    Ok(c) if c.uid == my_uid => {}
                    _ => continue,
                }
                if sock.set_nonblocking(true).is_err() {
                    continue;
                }
                conns.push(Conn {
                    sock,
                    frames: FrameReader::default(),
                    owner: false,
                });
            }
        }
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            if !ready.get(i + 1).copied().unwrap_or(false) {
                continue;
            }
            match read_conn(&mut conns, i, &mut kept, &mut buf) {
                Step::Continue => {}
                Step::Close => {
                    let c = conns.swap_remove(i);
                    if c.owner {
                        orphaned_since = Some(Instant::now());
                    }
                }
                Step::Exit => return Ok(()),
            }
        }
        if conns.iter().any(|c| c.owner) {
            orphaned_since = None;
        }
    }
}

/// Reads what connection `i` sent and acts on every whole frame.
fn read_conn(conns: &mut [Conn], i: usize, kept: &mut Kept, buf: &mut [u8]) -> Step {
    // Frames that arrived before the end of the stream still count (a gateway's last words
    // are `Exit`).
    let mut ended = false;
    loop {
        let mut fds = Vec::new();
        match crate::sys::fdpass::recv(conns[i].sock.as_fd(), buf, &mut fds) {
            Ok(0) => {
                ended = true;
                break;
            }
            Ok(n) => {
                conns[i].frames.push_bytes(&buf[..n]);
                conns[i].frames.push_fds(fds);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                ended = true;
                break;
            }
        }
    }
    let end = if ended { Step::Close } else { Step::Continue };
    loop {
        let (body, mut fds) = match conns[i].frames.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return end,
            Err(_) => return Step::Close,
        };
        let Ok(msg) = decode_body::<ToKeeper>(&body) else {
            return Step::Close;
        };
        match msg {
            ToKeeper::Hello { protocol } => {
                if protocol != PROTOCOL {
                    let _ = reply(&conns[i].sock, &state_frame(kept, 0), &[]);
                    return Step::Close;
                }
                if send_state(&conns[i].sock, kept).is_err() {
                    return Step::Close;
                }
                // The peers belonged to the previous gateway; the new one announces its own.
                kept.peers.clear();
                for (j, c) in conns.iter_mut().enumerate() {
                    c.owner = j == i;
                }
            }
            ToKeeper::Put(rec) => {
                if let Some(fd) = fds.pop() {
                    kept.contexts.insert(rec.id, (rec, fd));
                }
            }
            ToKeeper::Drop { id } => {
                kept.contexts.remove(&id);
            }
            ToKeeper::Counters(c) => {
                kept.counters.next_peer = kept.counters.next_peer.max(c.next_peer);
                kept.counters.next_context = kept.counters.next_context.max(c.next_context);
            }
            ToKeeper::PeerUp { peer, pid } => {
                kept.peers.insert(peer, pid);
            }
            ToKeeper::PeerDown { peer } => {
                kept.peers.remove(&peer);
            }
            ToKeeper::Exit => return Step::Exit,
        }
    }
}

fn state_frame(kept: &Kept, contexts: u64) -> Vec<u8> {
    let msg = FromKeeper::State {
        protocol: PROTOCOL,
        counters: kept.counters,
        peers: kept.peers.iter().map(|(k, v)| (*k, *v)).collect(),
        contexts,
    };
    encode_frame(&msg, 0).unwrap_or_default()
}

fn reply(sock: &UnixStream, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_frame(sock.as_fd(), frame, fds, Instant::now() + SEND_TIMEOUT)
}

/// Sends everything kept: the state, one frame per segment, the end marker.
fn send_state(sock: &UnixStream, kept: &Kept) -> io::Result<()> {
    reply(sock, &state_frame(kept, kept.contexts.len() as u64), &[])?;
    for (rec, fd) in kept.contexts.values() {
        let frame = encode_frame(&FromKeeper::Kept(rec.clone()), 1)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        reply(sock, &frame, &[fd.as_fd()])?;
    }
    let end = encode_frame(&FromKeeper::End, 0)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    reply(sock, &end, &[])
}
