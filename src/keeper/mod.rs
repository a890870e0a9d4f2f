//! The keeper: a small process that holds the descriptors of the gateway's context segments so
//! that retained contexts outlive the gateway (`docs/design.md` §12, `docs/guarantees.md`).
//!
//! Context segments are memfds written directly by clients; their memory lives as long as
//! some process holds a descriptor or a mapping. The gateway hands every context segment it
//! creates to the keeper (`SCM_RIGHTS`, with its id, user and name) and tells it when one is
//! destroyed. When the gateway dies the keeper still holds them, so the data is exactly what
//! the last writer committed — nothing is copied, nothing lags. A restarted gateway connects
//! to the keeper, receives every descriptor back, validates each segment as untrusted input and
//! adopts it under the same id and name (`gateway/keep.rs`).
//!
//! Like systemd's file-descriptor store, but ours: the keeper is `knit __keeper`, spawned
//! detached (its own session, standard streams on `/dev/null`) by the first gateway on a
//! socket, listening on `<socket>.keeper` in the gateway's private directory and accepting only
//! connections of its own uid. A gateway that stops cleanly tells it to exit; one that vanishes
//! leaves it lingering (10 minutes by default) for a successor, after which it exits and the
//! memory is freed. It also exits when its socket file disappears (the directory was removed).
//!
//! Protocol (frames as on the control socket, `wire::frame`): the gateway says `Hello`; the
//! keeper answers `State` (counters, the previous gateway's peers), one `Kept` frame per
//! segment (one descriptor each) and `End`. Then the gateway sends `Put` (one descriptor),
//! `Drop`, `Counters`, `PeerUp`/`PeerDown` as things happen, and `Exit` when it stops cleanly.
//! The keeper never sends anything else.

mod server;

pub use server::run;

use crate::sys::identity;
use crate::wire::frame::{decode_body, encode_frame, FrameReader};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Bumped when the keeper protocol changes incompatibly.
pub const PROTOCOL: u32 = 1;
/// How long a keeper whose gateway vanished waits for a successor.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(600);
/// How long one exchange with the keeper may take before the link is given up.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a gateway waits for a keeper it spawned to listen.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The keeper's socket for the gateway socket `gateway_socket` (same directory).
pub fn socket_path(gateway_socket: &Path) -> PathBuf {
    crate::control::own_file(gateway_socket, "keeper")
}

/// How a gateway finds or starts its keeper.
#[derive(Debug, Clone)]
pub struct KeeperConfig {
    /// The `knit` executable to spawn as `knit __keeper` when no keeper answers.
    pub program: PathBuf,
    /// How long the keeper waits for a new gateway after its gateway vanished.
    pub linger: Duration,
}

impl KeeperConfig {
    /// A keeper spawned from `program`, lingering [`DEFAULT_LINGER`].
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            linger: DEFAULT_LINGER,
        }
    }
}

/// What the keeper knows about one kept context segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptContext {
    /// The gateway's id for it (kept across restarts).
    pub id: u64,
    /// Contexts are per user.
    pub user: String,
    pub name: String,
}

/// Id counters that must keep increasing across gateway runs, so a restarted gateway never
/// hands out an id (a peer id is a context writer's token) that the previous run used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Peer ids below this may have been used.
    pub next_peer: u64,
    /// Context ids below this may have been used.
    pub next_context: u64,
}

/// Gateway → keeper.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToKeeper {
    /// First frame: the keeper answers with what it holds.
    Hello { protocol: u32 },
    /// Keep this segment (one descriptor attached). Replaces a segment of the same id.
    Put(KeptContext),
    /// The context was destroyed: close its descriptor.
    Drop { id: u64 },
    /// New high-water marks.
    Counters(Counters),
    /// A native peer joined (its pid, from the kernel).
    PeerUp { peer: u64, pid: u32 },
    /// It left.
    PeerDown { peer: u64 },
    /// The gateway stops cleanly: close everything and exit.
    Exit,
}

/// Keeper → gateway, in answer to `Hello` only.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromKeeper {
    State {
        protocol: u32,
        counters: Counters,
        /// Peers of the previous gateway that had not left: (peer id, pid).
        peers: Vec<(u64, u32)>,
        /// `Kept` frames that follow.
        contexts: u64,
    },
    /// One segment (one descriptor attached).
    Kept(KeptContext),
    End,
}

/// Why the keeper could not be reached or used.
#[derive(Debug, Error)]
pub enum KeeperError {
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: io::Error,
    },
    /// The keeper could not be started.
    #[error("cannot start the keeper {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    /// Something answers on the keeper socket but does not speak the protocol.
    #[error("keeper protocol: {0}")]
    Protocol(String),
    /// The socket is not owned by our uid.
    #[error("the keeper socket belongs to uid {0}")]
    Foreign(u32),
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> KeeperError {
    move |source| KeeperError::Io { context, source }
}

/// One segment handed back by the keeper, not yet validated: its record (or why it does not
/// decode) and its descriptor (if one came).
#[derive(Debug)]
pub struct Recovered {
    pub record: Result<KeptContext, String>,
    pub fd: Option<OwnedFd>,
}

/// What a keeper handed back to a (re)starting gateway.
#[derive(Debug, Default)]
pub struct State {
    pub counters: Counters,
    /// Peers of the previous gateway run that had not left: (peer id, pid).
    pub peers: Vec<(u64, u32)>,
    pub contexts: Vec<Recovered>,
}

/// The gateway's connection to its keeper.
#[derive(Debug)]
pub struct Link {
    sock: UnixStream,
    broken: bool,
}

/// Sends one whole frame, waiting for room until `deadline`.
pub(crate) fn send_frame(
    sock: BorrowedFd<'_>,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
    deadline: Instant,
) -> io::Result<()> {
    let mut sent = 0;
    while sent < frame.len() {
        let attach: &[BorrowedFd<'_>] = if sent == 0 { fds } else { &[] };
        match crate::sys::fdpass::send_some(sock, &frame[sent..], attach) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let mut pfd = [rustix::event::PollFd::new(
                    &sock,
                    rustix::event::PollFlags::OUT,
                )];
                let ts = rustix::time::Timespec::try_from(left).unwrap_or(rustix::time::Timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                });
                match rustix::event::poll(&mut pfd, Some(&ts)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Link {
    /// Connects to the keeper of `gateway_socket`, starting one from `cfg` when none answers,
    /// and receives what it holds.
    pub fn attach(gateway_socket: &Path, cfg: &KeeperConfig) -> Result<(Link, State), KeeperError> {
        let path = socket_path(gateway_socket);
        let sock = match connect(&path) {
            Ok(s) => s,
            Err(KeeperError::Foreign(uid)) => return Err(KeeperError::Foreign(uid)),
            Err(_) => {
                spawn(cfg, &path)?;
                connect(&path)?
            }
        };
        Link::handshake(sock)
    }

    /// Connects to a keeper that already listens at `path` (no spawning) and receives what it
    /// holds.
    pub fn connect(path: &Path) -> Result<(Link, State), KeeperError> {
        Link::handshake(connect(path)?)
    }

    fn handshake(sock: UnixStream) -> Result<(Link, State), KeeperError> {
        sock.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(io_err("keeper socket"))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))
            .map_err(io_err("keeper socket"))?;
        let mut link = Link {
            sock,
            broken: false,
        };
        link.send(&ToKeeper::Hello { protocol: PROTOCOL }, None)
            .map_err(io_err("greeting the keeper"))?;
        let mut frames = FrameReader::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut next = |frames: &mut FrameReader| -> Result<(Vec<u8>, Vec<OwnedFd>), KeeperError> {
            loop {
                if let Some(f) = frames
                    .next_frame()
                    .map_err(|e| KeeperError::Protocol(e.to_string()))?
                {
                    return Ok(f);
                }
                let mut fds = Vec::new();
                match crate::sys::fdpass::recv(link.sock.as_fd(), &mut buf, &mut fds) {
                    Ok(0) => return Err(KeeperError::Protocol("the keeper hung up".into())),
                    Ok(n) => {
                        frames.push_bytes(&buf[..n]);
                        frames.push_fds(fds);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err("reading from the keeper")(e)),
                }
            }
        };
        let (body, _) = next(&mut frames)?;
        let (counters, peers, count) = match decode_body::<FromKeeper>(&body) {
            Ok(FromKeeper::State {
                protocol: PROTOCOL,
                counters,
                peers,
                contexts,
            }) => (counters, peers, contexts),
            Ok(FromKeeper::State { protocol, .. }) => {
                return Err(KeeperError::Protocol(format!(
                    "keeper speaks protocol {protocol}, we speak {PROTOCOL}"
                )))
            }
            Ok(other) => {
                return Err(KeeperError::Protocol(format!(
                    "expected the keeper's state, got {other:?}"
                )))
            }
            Err(e) => return Err(KeeperError::Protocol(e.to_string())),
        };
        let mut state = State {
            counters,
            peers,
            contexts: Vec::new(),
        };
        // Each record is checked on its own: one that does not decode is reported and
        // skipped, the others are still adopted.
        loop {
            let (body, mut fds) = next(&mut frames)?;
            match decode_body::<FromKeeper>(&body) {
                Ok(FromKeeper::End) => break,
                Ok(FromKeeper::Kept(k)) => state.contexts.push(Recovered {
                    record: Ok(k),
                    fd: fds.pop(),
                }),
                Ok(other) => state.contexts.push(Recovered {
                    record: Err(format!("unexpected frame {other:?}")),
                    fd: fds.pop(),
                }),
                Err(e) => state.contexts.push(Recovered {
                    record: Err(e.to_string()),
                    fd: fds.pop(),
                }),
            }
            if state.contexts.len() as u64 > count.saturating_add(16) {
                return Err(KeeperError::Protocol(
                    "the keeper sent more records than it announced".into(),
                ));
            }
        }
        Ok((link, state))
    }

    /// Whether the keeper is gone (a send failed, or it hung up: it never speaks after its
    /// state, so anything readable on the socket means it closed). Never blocks.
    pub fn is_broken(&mut self) -> bool {
        if !self.broken {
            let mut pfd = [rustix::event::PollFd::new(
                &self.sock,
                rustix::event::PollFlags::IN,
            )];
            let zero = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if matches!(rustix::event::poll(&mut pfd, Some(&zero)), Ok(n) if n > 0) {
                self.broken = true;
            }
        }
        self.broken
    }

    pub(crate) fn send(&mut self, msg: &ToKeeper, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if self.broken {
            return Err(io::ErrorKind::NotConnected.into());
        }
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let r = encode_frame(msg, fds.len())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            .and_then(|frame| {
                send_frame(self.sock.as_fd(), &frame, &fds, Instant::now() + IO_TIMEOUT)
            });
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Keeps a segment.
    pub fn put(&mut self, rec: &KeptContext, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.send(&ToKeeper::Put(rec.clone()), Some(fd))
    }

    /// Forgets a segment.
    pub fn drop_context(&mut self, id: u64) -> io::Result<()> {
        self.send(&ToKeeper::Drop { id }, None)
    }

    /// Records new high-water marks.
    pub fn counters(&mut self, c: Counters) -> io::Result<()> {
        self.send(&ToKeeper::Counters(c), None)
    }

    /// Records a native peer's pid.
    pub fn peer_up(&mut self, peer: u64, pid: u32) -> io::Result<()> {
        self.send(&ToKeeper::PeerUp { peer, pid }, None)
    }

    /// Records that a peer left.
    pub fn peer_down(&mut self, peer: u64) -> io::Result<()> {
        self.send(&ToKeeper::PeerDown { peer }, None)
    }

    /// Tells the keeper to exit (a clean stop: nothing is kept).
    pub fn exit(mut self) {
        let _ = self.send(&ToKeeper::Exit, None);
    }
}

/// Connects to `path` and checks that the other end runs as our uid.
fn connect(path: &Path) -> Result<UnixStream, KeeperError> {
    let sock = UnixStream::connect(path).map_err(io_err("connecting to the keeper"))?;
    let cred = identity::peer_cred(&sock).map_err(io_err("keeper credentials"))?;
    if cred.uid != identity::euid() {
        return Err(KeeperError::Foreign(cred.uid));
    }
    Ok(sock)
}

/// The pid of the keeper listening for `gateway_socket`, if one answers (from the kernel's
/// peer credentials; for tools and tests that must stop it).
pub fn keeper_pid(gateway_socket: &Path) -> Option<u32> {
    let sock = UnixStream::connect(socket_path(gateway_socket)).ok()?;
    identity::peer_cred(&sock).ok().map(|c| c.pid)
}

/// Starts `knit __keeper` detached and waits until it listens at `path`.
fn spawn(cfg: &KeeperConfig, path: &Path) -> Result<(), KeeperError> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(&cfg.program);
    cmd.arg("__keeper")
        .arg("--socket")
        .arg(path)
        .arg("--linger-ms")
        .arg(cfg.linger.as_millis().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only calls `setsid`,
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(crate::sys::process::detach_session);
    }
    let mut child = cmd.spawn().map_err(|source| KeeperError::Spawn {
        program: cfg.program.clone(),
        source,
    })?;
    let deadline = Instant::now() + SPAWN_TIMEOUT;
    loop {
        if UnixStream::connect(path).is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(KeeperError::Spawn {
                program: cfg.program.clone(),
                source: io::Error::other(format!("the keeper exited at once ({status})")),
            });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(KeeperError::Spawn {
                program: cfg.program.clone(),
                source: io::ErrorKind::TimedOut.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Reap it when it exits (it outlives us when we crash; then init does).
    let _ = std::thread::Builder::new()
        .name("knit-keeper-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    Ok(())
}

#[cfg(test)]
mod tests;
