//! `knit __ws-relay`: the cheapest possible WebSocket relay, a baseline for the bridge benchmark
//! (`tests/web/bench.js`, scenario `ws_relay`).
//!
//! It accepts one WebSocket client at a time, opens a WebSocket to `--upstream`, and copies text
//! frames both ways, untouched: no JSON, no routing, no queues, no runtime. What a gateway's
//! extra hop costs on top of this is the gateway's own work; what this costs on top of a direct
//! connection (`ws_direct`) is what the machine charges any relay for two more loopback hops
//! and, if it sleeps, two more wake-ups. `--wait spin` (default) polls both sockets on one thread
//! and never sleeps (offering its core with `sched_yield` while idle, as the bridge's spin
//! does); `--wait block` sleeps in `read` on one thread per direction.
//!
//! Prints `ws://ADDR` on stdout once listening. Not for production: one client at a time (a
//! client that does not finish its handshake within `--handshake-ms` is dropped).

use super::CliError;
use knit::Status;
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self as ws, Message, WebSocket};

#[derive(clap::Args, Debug)]
pub struct RelayArgs {
    /// The WebSocket server to relay to, `HOST:PORT`.
    #[arg(long)]
    upstream: String,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// spin (poll both sockets, never sleep) or block (sleep in read, a thread per direction).
    #[arg(long, default_value = "spin")]
    wait: String,
    /// How long each side has to complete its WebSocket handshake.
    #[arg(long, default_value_t = 5000)]
    handshake_ms: u64,
}

/// Turns an error of `what` into the command's error with `status`.
fn fail<E: std::fmt::Display>(status: Status, what: &str) -> impl Fn(E) -> CliError + '_ {
    move |e| CliError::new(status, format!("{what}: {e}"))
}

/// A socket or WebSocket error of `what`: the connection is gone.
fn lost<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> CliError + '_ {
    fail(Status::Disconnected, what)
}

pub fn run(a: RelayArgs) -> Result<(), CliError> {
    let spin = match a.wait.as_str() {
        "spin" => true,
        "block" => false,
        other => {
            return Err(CliError::new(
                Status::InvalidArgument,
                format!("--wait is spin or block, not {other:?}"),
            ))
        }
    };
    let listener = TcpListener::bind(&a.listen).map_err(lost("listening"))?;
    outln!("ws://{}", listener.local_addr().map_err(lost("listening"))?);
    let handshake = Duration::from_millis(a.handshake_ms.max(1));
    loop {
        let (sock, _) = listener.accept().map_err(lost("accepting"))?;
        // One client failing (a bad handshake, the upstream gone) ends that client only.
        if let Err(e) = serve(sock, &a.upstream, spin, handshake) {
            errln!("ws-relay: {}", e.message);
        }
    }
}

fn serve(sock: TcpStream, upstream: &str, spin: bool, handshake: Duration) -> Result<(), CliError> {
    // A client that connects and never finishes its handshake must not hold the relay (it
    // serves one client at a time): the handshakes have `handshake` to complete.
    sock.set_nodelay(true).map_err(lost("client socket"))?;
    sock.set_read_timeout(Some(handshake))
        .map_err(lost("client socket"))?;
    let down = ws::accept(sock).map_err(fail(Status::BadInput, "client handshake"))?;
    down.get_ref()
        .set_read_timeout(None)
        .map_err(lost("client socket"))?;
    let addr = upstream
        .to_socket_addrs()
        .map_err(fail(Status::GatewayUnreachable, "resolving upstream"))?
        .next()
        .ok_or("no address")
        .map_err(fail(Status::GatewayUnreachable, "resolving upstream"))?;
    let up_sock = TcpStream::connect_timeout(&addr, handshake)
        .map_err(fail(Status::GatewayUnreachable, "connecting upstream"))?;
    up_sock.set_nodelay(true).map_err(lost("upstream socket"))?;
    up_sock
        .set_read_timeout(Some(handshake))
        .map_err(lost("upstream socket"))?;
    let (up, _) = ws::client(format!("ws://{upstream}/"), up_sock)
        .map_err(fail(Status::GatewayUnreachable, "upstream handshake"))?;
    up.get_ref()
        .set_read_timeout(None)
        .map_err(lost("upstream socket"))?;
    if spin {
        spin_relay(down, up)
    } else {
        block_relay(down, up)
    }
}

/// What one round of a direction did.
enum Step {
    Moved,
    Idle,
    Closed,
}

/// One non-blocking read of `from`; a text frame read is queued on `to` and written as far as the
/// socket takes it now (the rest goes out on a later [`flush`]).
fn pass(
    from: &mut WebSocket<TcpStream>,
    to: &mut WebSocket<TcpStream>,
    what: &str,
) -> Result<Step, CliError> {
    match from.read() {
        Ok(Message::Close(_)) => Ok(Step::Closed),
        Ok(m @ Message::Text(_)) => {
            pending_ok(to.send(m), what)?;
            Ok(Step::Moved)
        }
        Ok(_) => Ok(Step::Idle), // ping/pong/binary: answered or ignored by tungstenite
        Err(ws::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => Ok(Step::Idle),
        Err(e) if ended(&e) => Ok(Step::Closed),
        Err(e) => Err(lost(what)(e)),
    }
}

/// Writes what is queued on `side` as far as the socket takes it now.
fn flush(side: &mut WebSocket<TcpStream>, what: &str) -> Result<(), CliError> {
    pending_ok(side.flush(), what)
}

/// A write that would block is not an error on a non-blocking socket: what was not written
/// stays queued.
fn pending_ok(r: Result<(), ws::Error>, what: &str) -> Result<(), CliError> {
    match r {
        Err(ws::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        r => r.map_err(lost(what)),
    }
}

fn spin_relay(
    mut down: WebSocket<TcpStream>,
    mut up: WebSocket<TcpStream>,
) -> Result<(), CliError> {
    down.get_mut()
        .set_nonblocking(true)
        .map_err(lost("client socket"))?;
    up.get_mut()
        .set_nonblocking(true)
        .map_err(lost("upstream socket"))?;
    loop {
        let a = pass(&mut down, &mut up, "client to upstream")?;
        let b = pass(&mut up, &mut down, "upstream to client")?;
        if matches!(a, Step::Closed) || matches!(b, Step::Closed) {
            return Ok(());
        }
        flush(&mut up, "client to upstream")?;
        flush(&mut down, "upstream to client")?;
        if matches!((a, b), (Step::Idle, Step::Idle)) {
            std::thread::yield_now();
        }
    }
}

fn block_relay(down: WebSocket<TcpStream>, up: WebSocket<TcpStream>) -> Result<(), CliError> {
    // Each direction reads one socket and writes the other through a second handle of it: a
    // reader thread per direction, no locks (a side's reader and writer never share state
    // beyond the socket; pings are not relayed, so the writer halves never answer them).
    let down_w = down.get_ref().try_clone().map_err(lost("client socket"))?;
    let up_w = up.get_ref().try_clone().map_err(lost("upstream socket"))?;
    let to_up = WebSocket::from_raw_socket(up_w, Role::Client, None);
    let to_down = WebSocket::from_raw_socket(down_w, Role::Server, None);
    let a = std::thread::spawn(move || copy(down, to_up, "client to upstream"));
    let b = copy(up, to_down, "upstream to client");
    // One direction ending (a close) leaves the other blocked in read until its peer closes
    // too, which the benchmark's client and server both do.
    let a = a
        .join()
        .unwrap_or_else(|_| Err(CliError::new(Status::Internal, "relay thread panicked")));
    a.and(b)
}

fn copy(
    mut from: WebSocket<TcpStream>,
    mut to: WebSocket<TcpStream>,
    what: &str,
) -> Result<(), CliError> {
    loop {
        match from.read() {
            Ok(m @ Message::Text(_)) => to.send(m).map_err(lost(what))?,
            Ok(Message::Close(_)) => break,
            Err(e) if ended(&e) => break,
            Ok(_) => {}
            Err(e) => return Err(lost(what)(e)),
        }
    }
    // Its peer went away: so does the other side, which ends the other direction's read.
    let _ = to.get_ref().shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// The other side went away (closed, or dropped the connection without a close frame).
fn ended(e: &ws::Error) -> bool {
    matches!(
        e,
        ws::Error::ConnectionClosed
            | ws::Error::AlreadyClosed
            | ws::Error::Protocol(ws::error::ProtocolError::ResetWithoutClosingHandshake)
    ) || matches!(e, ws::Error::Io(io) if io.kind() == ErrorKind::ConnectionReset)
}
