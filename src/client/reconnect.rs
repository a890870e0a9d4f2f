//! Connecting, and connecting again when the gateway goes away (features.md §2.4).
//!
//! While the connection is down, what does not need the gateway keeps working: lanes to peers
//! that are still alive (invocations, bus messages and stream items over them), and contexts
//! already mapped (reads, writes, followers). What needs the gateway fails at once with
//! `DISCONNECTED`: relayed calls (pending ones too), new lanes, control requests. Peers whose
//! process vanishes meanwhile are removed as if the gateway had said so.
//!
//! The control thread retries every 50–75 ms (every 250 ms after 5 s down). Once a new
//! `Welcome` arrives it swaps in the new identity and doorbell directory, forgets the old
//! peers (`ServerRemoved`, reason "reset") and learns the new ones, retires the old lanes
//! (calls still pending on them fail), and a restore thread then registers our methods and
//! streams again, resubscribes bus subscriptions and followed contexts (resynchronising a
//! subscriber whose context came back as a different segment), and finally resubscribes
//! stream subscriptions as their servers come back.

use super::conn::{Conn, Down};
use super::engine::{Bells, RemotePeer, Shared};
use super::{ClientError, InteropEvent};
use crate::shm::DoorbellSegment;
use crate::wire::frame::{
    self, FrameReader, FromGateway, Hello, PeerId, PeerSnapshot, ToGateway, Welcome,
    PROTOCOL_VERSION,
};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to say hello (again).
#[derive(Debug, Clone)]
pub(crate) struct HelloParams {
    pub path: PathBuf,
    pub application: String,
    pub relay_only: bool,
    /// How long one handshake may take.
    pub timeout: Duration,
    /// Reconnect when the connection is lost.
    pub reconnect: bool,
}

/// Retry interval while the gateway has been gone for less than [`SLOW_AFTER`]…
const RETRY: Duration = Duration::from_millis(50);
/// …plus up to this much jitter (so many clients do not knock at once)…
const JITTER_MS: u64 = 25;
/// …and after that.
const RETRY_SLOW: Duration = Duration::from_millis(250);
const SLOW_AFTER: Duration = Duration::from_secs(5);
/// Longest a handshake during reconnection may take (the gateway adopts its state before it
/// listens, so one that accepts answers at once).
const RECONNECT_HANDSHAKE: Duration = Duration::from_secs(2);

/// A connection that said hello and got its welcome.
pub(crate) struct Handshake {
    pub sock: Arc<UnixStream>,
    pub welcome: Welcome,
    pub bells_fd: Option<OwnedFd>,
    /// Frames already read after the welcome.
    pub frames: FrameReader,
}

/// Connects to the gateway and says hello. `conn` (when reconnecting) is told about the socket
/// so that closing the client interrupts the handshake.
pub(crate) fn handshake(
    p: &HelloParams,
    instance: Option<String>,
    conn: Option<&Conn>,
) -> Result<Handshake, ClientError> {
    let sock =
        crate::control::connect(&p.path).map_err(|source| ClientError::GatewayUnreachable {
            path: p.path.clone(),
            source,
        })?;
    let sock = Arc::new(sock);
    if let Some(c) = conn {
        c.set_handshake(Some(sock.clone()));
    }
    let r = say_hello(p, instance, &sock);
    if let Some(c) = conn {
        c.set_handshake(None);
    }
    let (welcome, bells_fd, frames) = r?;
    Ok(Handshake {
        sock,
        welcome,
        bells_fd,
        frames,
    })
}

fn say_hello(
    p: &HelloParams,
    instance: Option<String>,
    sock: &UnixStream,
) -> Result<(Welcome, Option<OwnedFd>, FrameReader), ClientError> {
    let hello = ToGateway::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        application: p.application.clone(),
        instance,
        api: concat!("knit-rust/", env!("CARGO_PKG_VERSION")).into(),
        transport: if p.relay_only {
            frame::Transport::Relay
        } else {
            frame::Transport::Shm
        },
    });
    let frame = frame::encode_frame(&hello, 0).map_err(|e| ClientError::Protocol(e.to_string()))?;
    crate::sys::fdpass::send_all(sock.as_fd(), &frame, &[])
        .map_err(|_| ClientError::Disconnected)?;
    read_welcome(sock, p.timeout)
}

fn read_welcome(
    sock: &UnixStream,
    timeout: Duration,
) -> Result<(Welcome, Option<OwnedFd>, FrameReader), ClientError> {
    let deadline = crate::wait::deadline(timeout);
    let mut frames = FrameReader::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds = Vec::new();
    loop {
        if let Some((body, mut got)) = frames
            .next_frame()
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            return match frame::decode_body::<FromGateway>(&body)
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                FromGateway::Welcome(w) if got.len() <= 1 => {
                    let fd = got.pop();
                    let _ = sock.set_read_timeout(None);
                    Ok((w, fd, frames))
                }
                FromGateway::Refused { status, message } => {
                    Err(ClientError::Refused { status, message })
                }
                other => Err(ClientError::Protocol(format!(
                    "expected a welcome, got {other:?}"
                ))),
            };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout);
        }
        let _ = sock.set_read_timeout(Some(left));
        match crate::sys::fdpass::recv(sock.as_fd(), &mut buf, &mut fds) {
            Ok(0) => return Err(ClientError::Disconnected),
            Ok(n) => {
                frames.push_bytes(&buf[..n]);
                frames.push_fds(fds.drain(..));
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(ClientError::Timeout)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(ClientError::Disconnected),
        }
    }
}

/// The doorbell directory a welcome came with, validated. A relay-only peer gets none: on
/// the first connection it makes a private one (its own threads still sleep on a doorbell),
/// later it keeps that one (`Ok(None)`).
pub(crate) fn bells_of(
    hs: &Handshake,
    relay_only: bool,
    first: bool,
) -> Result<Option<Bells>, ClientError> {
    let (fd, index) = match (&hs.bells_fd, relay_only) {
        (Some(fd), _) => (
            fd.try_clone()
                .map_err(|e| ClientError::Protocol(e.to_string()))?,
            hs.welcome.doorbell,
        ),
        (None, true) if first => (
            crate::shm::create_doorbells(1)
                .map_err(|e| ClientError::Protocol(format!("doorbell: {e}")))?,
            0,
        ),
        (None, true) => return Ok(None),
        (None, false) => {
            return Err(ClientError::Protocol(
                "welcome without a doorbell directory".into(),
            ))
        }
    };
    let seg =
        DoorbellSegment::open(&fd).map_err(|e| ClientError::Protocol(format!("doorbells: {e}")))?;
    if seg.doorbell(index).is_none() {
        return Err(ClientError::Protocol(format!(
            "doorbell index {index} out of range"
        )));
    }
    Ok(Some(Bells { seg, index }))
}

/// The peers of a welcome, as the client keeps them.
pub(crate) fn peers_of(peers: Vec<PeerSnapshot>) -> BTreeMap<PeerId, RemotePeer> {
    peers
        .into_iter()
        .map(|p| {
            let methods = p
                .methods
                .into_iter()
                .map(|m| (m.id, Arc::new(m.def)))
                .collect();
            (
                p.identity.peer_id,
                RemotePeer {
                    identity: Arc::new(p.identity),
                    transport: p.transport,
                    methods,
                    rules: super::engine::restrictive(p.rules),
                },
            )
        })
        .collect()
}

/// The connection just closed (control thread): calls relayed through the gateway fail,
/// waiters wake up, `Disconnected` goes to event subscribers.
pub(crate) fn connection_lost(shared: &Arc<Shared>, down: &Down) {
    shared.fail_relayed_calls("gateway connection lost");
    if !shared.is_closed() {
        super::interop::emit(
            shared,
            InteropEvent::Disconnected {
                reason: down.reason.clone(),
                gateway_stopped: down.stopping,
            },
        );
    }
    shared.state_changed.notify_all();
    shared.wake_all();
}

/// Reconnects (control thread). Returns the new socket and the frames read after its welcome,
/// or `None` once the client is closed.
pub(crate) fn run(shared: &Arc<Shared>) -> Option<(Arc<UnixStream>, FrameReader)> {
    let down_since = Instant::now();
    let mut rng =
        (std::process::id() as u64) << 32 ^ down_since.elapsed().subsec_nanos() as u64 | 1;
    loop {
        if shared.is_closed() {
            return None;
        }
        forget_vanished_peers(shared);
        let instance = Some(shared.me().instance.clone());
        let mut p = shared.hello.clone();
        p.timeout = p.timeout.min(RECONNECT_HANDSHAKE);
        match handshake(&p, instance, Some(&shared.conn)) {
            Ok(hs) => match apply(shared, hs) {
                Ok(x) => {
                    crate::log::info(format_args!(
                        "reconnected to the gateway after {:?}",
                        down_since.elapsed()
                    ));
                    return Some(x);
                }
                Err(e) => crate::log::warn(format_args!("reconnection refused: {e}")),
            },
            Err(ClientError::Refused { message, .. }) => {
                crate::log::debug(format_args!("reconnection refused: {message}"))
            }
            Err(_) => {}
        }
        // xorshift: jitter only, no quality needed.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let pause = if down_since.elapsed() < SLOW_AFTER {
            RETRY + Duration::from_millis(rng % (JITTER_MS + 1))
        } else {
            RETRY_SLOW
        };
        let st = shared.lock_state();
        let _ = shared
            .state_changed
            .wait_timeout_while(st, pause, |_| !shared.is_closed())
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// While nobody tells us who left, we look: a native peer whose process is gone is removed
/// (its pending calls fail with "peer has left" instead of waiting for their timeout).
fn forget_vanished_peers(shared: &Arc<Shared>) {
    let gone: Vec<PeerId> = shared
        .lock_state()
        .peers
        .iter()
        .filter(|(_, p)| {
            p.transport == frame::Transport::Shm
                && crate::sys::process::pid_alive(p.identity.pid) == Some(false)
        })
        .map(|(id, _)| *id)
        .collect();
    for peer in gone {
        super::conn::peer_removed(shared, peer, "peer has left".into());
    }
}

/// Takes a new connection into use (control thread): new identity and doorbells, old peers
/// forgotten and new ones learnt, old lanes retired; then a restore thread re-registers.
fn apply(
    shared: &Arc<Shared>,
    hs: Handshake,
) -> Result<(Arc<UnixStream>, FrameReader), ClientError> {
    let bells = bells_of(&hs, shared.relay_only, false)?;
    let Handshake {
        sock,
        welcome,
        frames,
        ..
    } = hs;
    // Subscribers of our streams were peers of the old connection: their subscriptions end
    // (before the gate closes: `on_removed` callbacks may register things).
    super::streams::connection_reset(shared);
    // Registration changes under way (failing fast: we are disconnected) finish first; new
    // ones wait until the restore has sent everything again.
    shared.conn.gate.begin_restore(Duration::from_secs(1));
    let old_me = shared.me();
    let max_payload = usize::try_from(welcome.max_payload).unwrap_or(usize::MAX);
    shared.set_identity(welcome.identity.clone(), max_payload);
    if let Some(b) = bells {
        shared.install_bells(b);
    }
    let new_peers = peers_of(welcome.peers);
    // The policy may have changed with the gateway.
    let my_rules = if shared.skip_own_policy.load(Ordering::Relaxed) {
        None
    } else {
        super::engine::restrictive(welcome.rules.clone())
    };
    *shared.my_rules.write().unwrap_or_else(|e| e.into_inner()) = my_rules.clone();
    // Relaxed: a flag read before the rules' lock, which orders the rules themselves.
    shared
        .my_rules_on
        .store(my_rules.is_some(), Ordering::Relaxed);
    shared.policy_on.store(
        new_peers.values().any(|p| p.rules.is_some()),
        Ordering::Relaxed,
    );
    let added: Vec<(Arc<frame::Instance>, Vec<Arc<frame::MethodDef>>)> = new_peers
        .values()
        .map(|p| (p.identity.clone(), p.methods.values().cloned().collect()))
        .collect();
    // From the swap of every peer until its events are queued, as every other change of
    // methods or peers does: an event subscription's replay and joining are then either
    // before both or after both (`Shared::events_gate`). Nothing in between runs user code or
    // takes the gate.
    let events = super::interop::events_gate(shared);
    let (old_peers, old_lanes) = {
        let mut st = shared.lock_state();
        let old_peers = std::mem::replace(&mut st.peers, new_peers);
        let old_lanes: Vec<_> = st.lanes.drain().map(|(_, l)| l).collect();
        for p in old_peers.values() {
            st.remember_departed(p.identity.clone());
        }
        st.remember_departed(old_me);
        st.generation += 1;
        (old_peers, old_lanes)
    };
    shared.retire_lanes(&old_lanes);
    shared.fail_all_calls(
        crate::model::FailureKind::Delivery(crate::Status::Disconnected),
        "gateway connection reset before the reply arrived",
    );
    super::streams::forget_servers(shared);
    super::contexts::connection_reset(shared, welcome.contexts);
    super::bus::connection_reset(shared, welcome.bus);
    shared.conn.install(sock.clone());
    // `close` shuts down the socket it finds installed; one installed after it looked is
    // ours to shut down (the socket's mutex orders the two).
    if shared.is_closed() {
        let _ = sock.shutdown(std::net::Shutdown::Both);
        shared.conn.gate.end_restore();
        return Err(ClientError::Closed);
    }
    let removed: Vec<(Arc<frame::Instance>, Vec<Arc<frame::MethodDef>>)> = old_peers
        .into_values()
        .map(|p| (p.identity, p.methods.into_values().collect()))
        .collect();
    super::interop::reset_events(shared, removed, added);
    drop(events);
    shared.state_changed.notify_all();
    shared.wake_all();
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("knit-restore".into())
        .spawn(move || restore(&s));
    if let Err(e) = spawned {
        crate::log::warn(format_args!("cannot restore registrations: {e}"));
        shared.conn.gate.end_restore();
    }
    Ok((sock, frames))
}

/// Ends the restore phase even if a step panics.
struct EndRestore<'a>(&'a Conn);

impl Drop for EndRestore<'_> {
    fn drop(&mut self) {
        self.0.gate.end_restore();
    }
}

/// Sends everything registered again (restore thread).
fn restore(shared: &Arc<Shared>) {
    let epoch = shared.conn.epoch();
    {
        let _end = EndRestore(&shared.conn);
        super::interop::restore(shared);
        super::bus::restore(shared);
        super::contexts::restore(shared);
    }
    super::streams::restore(shared, epoch);
}

/// Sends a request for the restore, logging a failure.
pub(crate) fn expect_ack(what: &str, r: Result<super::conn::Reply, ClientError>) -> bool {
    match r {
        Ok(super::conn::Reply::Ack) => true,
        Ok(super::conn::Reply::Fail(status, message)) => {
            crate::log::warn(format_args!(
                "after reconnecting, {what} was refused: {message} ({status:?})"
            ));
            false
        }
        Ok(_) => false,
        Err(e) => {
            crate::log::warn(format_args!("after reconnecting, {what} failed: {e}"));
            false
        }
    }
}
