//! `knit __ws-relay`, the bridge benchmark's baseline relay: it copies text frames both ways,
//! in order, in both of its wait modes, one client after another.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use tokio_tungstenite::tungstenite::{self as ws, Message};

/// Kills the relay when the test ends, however it ends.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A WebSocket server that answers every text frame `x` with `up:x`, for `clients` clients one
/// after another, and counts the frames it saw.
fn upstream(clients: usize) -> (String, std::thread::JoinHandle<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let mut seen = 0;
        for _ in 0..clients {
            let (s, _) = l.accept().unwrap();
            let mut w = ws::accept(s).unwrap();
            loop {
                match w.read() {
                    Ok(Message::Text(t)) => {
                        seen += 1;
                        w.send(Message::text(format!("up:{}", t.as_str()))).unwrap();
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        seen
    });
    (addr, t)
}

fn relay(upstream: &str, wait: &str) -> (Relay, String) {
    relay_with(upstream, wait, &[])
}

fn relay_with(upstream: &str, wait: &str, more: &[&str]) -> (Relay, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_knit"))
        .args(["__ws-relay", "--upstream", upstream, "--wait", wait])
        .args(more)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Relay(child), line.trim().to_string())
}

fn frames_go_through_in_order(wait: &str) {
    let (up, server) = upstream(2);
    let (_relay, url) = relay(&up, wait);
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
    for client in 0..2 {
        let (mut c, _) = ws::connect(url.as_str()).unwrap();
        for i in 0..200 {
            let sent = format!("{client}-{i}-{}", "x".repeat(i * 7));
            c.send(Message::text(sent.clone())).unwrap();
            match c.read().unwrap() {
                Message::Text(t) => assert_eq!(t.as_str(), format!("up:{sent}")),
                other => panic!("{other:?}"),
            }
        }
        c.close(None).unwrap();
        // The close is answered (or the connection ends) before the next client.
        while c.read().is_ok() {}
        drop(c);
    }
    assert_eq!(server.join().unwrap(), 400);
}

#[test]
fn the_spinning_relay_copies_frames_both_ways_for_one_client_after_another() {
    frames_go_through_in_order("spin");
}

#[test]
fn the_blocking_relay_copies_frames_both_ways_for_one_client_after_another() {
    frames_go_through_in_order("block");
}

#[test]
fn an_unknown_wait_mode_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_knit"))
        .args(["__ws-relay", "--upstream", "127.0.0.1:9", "--wait", "nap"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spin or block"), "{err}");
}

#[test]
fn a_client_whose_upstream_is_gone_is_dropped_and_the_relay_goes_on() {
    // A port nothing listens on: bind, note it, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (mut relay, url) = relay(&dead, "spin");
    let (mut c, _) = ws::connect(url.as_str()).unwrap();
    assert!(c.read().is_err(), "the client's connection must end");
    // Still listening and accepting.
    assert!(TcpStream::connect(url.trim_start_matches("ws://")).is_ok());
    assert!(relay.0.try_wait().unwrap().is_none(), "the relay exited");
}

#[test]
fn a_client_that_never_finishes_its_handshake_does_not_hold_the_relay() {
    let (up, server) = upstream(1);
    let (_relay, url) = relay_with(&up, "spin", &["--handshake-ms", "1000"]);
    // Connects and says nothing: the relay, serving one client at a time, drops it after its
    // handshake time and takes the next.
    let addr = url.trim_start_matches("ws://");
    let _silent = TcpStream::connect(addr).unwrap();
    // Bounded, so that a relay still held by the silent client fails the test instead of
    // hanging it.
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let (mut c, _) = ws::client(url.as_str(), sock).unwrap();
    c.send(Message::text("after")).unwrap();
    match c.read().unwrap() {
        Message::Text(t) => assert_eq!(t.as_str(), "up:after"),
        other => panic!("{other:?}"),
    }
    c.close(None).unwrap();
    while c.read().is_ok() {}
    drop(c);
    assert_eq!(server.join().unwrap(), 1);
}
