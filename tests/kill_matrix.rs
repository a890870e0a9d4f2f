//! The kill matrix: one process of a working set killed with SIGKILL at the worst moment, and
//! what everyone else observes — a server mid-invocation, a stream publisher mid-push, a bus
//! publisher mid-burst, a subscriber mid-read, the gateway mid-handshake. (A context writer
//! killed mid-update: `tests/cli_data.rs`.) For each: the survivors' view, how long it took
//! (printed, not asserted: timing is the benchmarks' business), and that nothing leaks — the
//! gateway's descriptors return to what they were, survivors unmap the dead peer's lanes,
//! nothing appears in /dev/shm, no process is left.
//!
//! Child roles are this test binary re-executed with `KNIT_TEST_ROLE` (see
//! `child_process_entry`).

mod common;

use common::{run_knit, spawn_knit, wait_until, ChildGuard, GatewayProc, Lines, TempDir, STARTUP};
use knit::client::{Client, PublishOptions};
use knit::Value;
use serde_json::Value as Json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const QUICK: Duration = Duration::from_secs(20);
const ROLE: &str = "KNIT_TEST_ROLE";
const SOCKET: &str = "KNIT_TEST_SOCKET";

// ----- child roles -----------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let sock = std::env::var(SOCKET).expect("socket");
    match role.as_str() {
        // Publishes {"seq": n} on "burst" as fast as it can until killed.
        "bus-publisher" => {
            let c = Client::builder("burster").socket(&sock).connect().unwrap();
            let o = PublishOptions::default();
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut n: i64 = 0;
            while Instant::now() < deadline {
                // A subscriber that is gone makes no difference to the publisher.
                let _ = c.publish("burst", Value::object([("seq", Value::from(n))]), &o);
                n += 1;
            }
        }
        // Publishes `KNIT_TEST_N` messages on "flood", then prints how long it took.
        "bus-flooder" => {
            let n: i64 = std::env::var("KNIT_TEST_N").unwrap().parse().unwrap();
            let c = Client::builder("flooder").socket(&sock).connect().unwrap();
            let o = PublishOptions::default();
            println!("@@knit ready");
            // Wait for the go signal (a line on stdin).
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
            let t = Instant::now();
            for i in 0..n {
                c.publish("flood", Value::object([("seq", Value::from(i))]), &o)
                    .expect("publish");
            }
            println!("@@knit done {}", t.elapsed().as_micros());
        }
        other => panic!("unknown role {other}"),
    }
}

fn child(role: &str, sock: &Path, env: &[(&str, String)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "child_process_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, role)
    .env(SOCKET, sock)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

// ----- what leaks ------------------------------------------------------------------------------

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn lane_maps(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().filter(|l| l.contains("memfd:knit-lane")).count())
        .unwrap_or(0)
}

fn knit_in_dev_shm() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("knit"))
                .collect()
        })
        .unwrap_or_default()
}

/// The gateway's descriptors once a first peer of the user has come and gone (the gateway
/// creates the user's channel contexts when the first one joins; they stay).
fn settled_fds(gw: &GatewayProc) -> usize {
    let pid = gw.child.pid();
    let sockets = socket_count(pid);
    let out = run_knit(
        &["--gateway", gw.socket.to_str().unwrap(), "ctx", "list"],
        QUICK,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // Its connection closes asynchronously: wait until the gateway has let go of it.
    assert!(wait_until(STARTUP, || socket_count(pid) <= sockets));
    fd_count(pid)
}

fn socket_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|t| t.to_string_lossy().starts_with("socket:"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

/// The gateway's descriptors come back to `baseline` once it has cleaned up after the dead.
fn assert_gateway_fds_return(gw: &GatewayProc, baseline: usize, what: &str) {
    let pid = gw.child.pid();
    let ok = wait_until(STARTUP, || fd_count(pid) <= baseline);
    assert!(
        ok,
        "{what}: the gateway holds {} descriptors, {baseline} before",
        fd_count(pid)
    );
}

fn report(what: &str, took: Duration) {
    eprintln!("kill matrix: {what}: {took:?}");
}

/// A long-running `knit` command with its stdout lines (and ready line on stderr awaited).
struct Follower {
    child: ChildGuard,
    out: Lines,
}

fn follow(sock: &Path, args: &[&str]) -> Follower {
    let mut child = common::spawn_piped(sock, args);
    let out = Lines::spawn(child.stdout.take().unwrap());
    let err = Lines::spawn(child.stderr.take().unwrap());
    err.wait_for(STARTUP, |l| l.contains("\"ready\""))
        .unwrap_or_else(|| panic!("knit {args:?} never said ready"));
    Follower {
        child: ChildGuard::new(child, format!("knit {args:?}")),
        out,
    }
}

// ----- the matrix ------------------------------------------------------------------------------

#[test]
fn a_server_killed_mid_invocation() {
    let dir = TempDir::new("km-server");
    let gw = GatewayProc::start(&dir, &[]);
    let sock = gw.socket.to_str().unwrap();
    let baseline = settled_fds(&gw);
    let mut server = common::ServerProc::start(
        &gw.socket,
        "slow",
        "Slow",
        &["--echo", "--delay-ms", "60000"],
    );
    let pending = spawn_knit(&["--gateway", sock, "invoke", "Slow", "{}"], None);
    let caller = pending.child.pid();
    assert!(
        wait_until(STARTUP, || lane_maps(caller) > 0),
        "the call never started"
    );
    let killed = Instant::now();
    server.child.kill9();
    let out = pending.finish(QUICK);
    report(
        "server killed mid-invocation → caller fails (exit 5)",
        killed.elapsed(),
    );
    assert_eq!(out.code, Some(5), "{}", out.stderr);
    assert!(
        out.stderr.to_lowercase().contains("peer has left"),
        "{}",
        out.stderr
    );
    let methods = run_knit(&["--gateway", sock, "methods", "--json"], QUICK);
    assert!(!methods.stdout.contains("\"Slow\""), "{}", methods.stdout);
    assert_gateway_fds_return(&gw, baseline, "server killed");
    assert!(knit_in_dev_shm().is_empty());
}

#[test]
fn a_stream_publisher_killed_mid_push() {
    let dir = TempDir::new("km-stream");
    let gw = GatewayProc::start(&dir, &[]);
    let sock = gw.socket.to_str().unwrap();
    let baseline = settled_fds(&gw);
    let mut server = spawn_knit(
        &[
            "--gateway",
            sock,
            "--app",
            "ticker",
            "stream",
            "serve",
            "ticks",
            "--rate",
            "20000",
        ],
        None,
    );
    assert!(wait_until(STARTUP, || {
        run_knit(&["--gateway", sock, "methods", "--json"], QUICK)
            .stdout
            .contains("\"ticks\"")
    }));
    let sub = follow(&gw.socket, &["stream", "sub", "ticks"]);
    // Items flow; then the publisher dies in the middle of pushing them.
    let mut last = -1i64;
    for _ in 0..200 {
        let l = sub.out.wait_for(QUICK, |_| true).expect("no item");
        let j: Json = serde_json::from_str(&l).unwrap();
        let seq = j["data"]["seq"].as_i64().unwrap();
        assert!(seq > last, "out of order: {seq} after {last}");
        last = seq;
    }
    let killed = Instant::now();
    server.child.kill9();
    let mut sub = sub;
    let status = sub
        .child
        .wait_timeout(QUICK)
        .expect("the subscriber did not notice");
    report(
        "stream publisher killed → subscriber told (exit 5)",
        killed.elapsed(),
    );
    assert_eq!(status.code(), Some(5));
    assert_gateway_fds_return(&gw, baseline, "stream publisher killed");
}

#[test]
fn a_bus_publisher_killed_mid_burst_leaves_a_gapless_prefix() {
    let dir = TempDir::new("km-bus");
    let gw = GatewayProc::start(&dir, &[]);
    let sub = follow(&gw.socket, &["sub", "burst"]);
    let baseline = settled_fds(&gw);
    let pubr = child("bus-publisher", &gw.socket, &[]).spawn().unwrap();
    let mut pubr = ChildGuard::new(pubr, "bus publisher");
    // Read a while, then kill the publisher while it is publishing.
    let mut seen: Vec<i64> = Vec::new();
    while seen.len() < 5000 {
        let l = sub.out.wait_for(QUICK, |_| true).expect("no message");
        let j: Json = serde_json::from_str(&l).unwrap();
        seen.push(j["data"]["seq"].as_i64().unwrap());
    }
    let killed = Instant::now();
    pubr.kill9();
    // Whatever was committed before the kill still arrives; then nothing more.
    while let Some(l) = sub.out.wait_for(Duration::from_millis(500), |_| true) {
        let j: Json = serde_json::from_str(&l).unwrap();
        seen.push(j["data"]["seq"].as_i64().unwrap());
    }
    report(
        "bus publisher killed → subscriber drained",
        killed.elapsed(),
    );
    // No loss, no duplication, no reordering: exactly 0, 1, 2, … up to the last one sent.
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(*s, i as i64, "message {i} was {s}");
    }
    assert_gateway_fds_return(&gw, baseline, "bus publisher killed");
    assert_eq!(
        lane_maps(sub.child.pid()),
        0,
        "the subscriber kept the dead publisher's lane"
    );
}

#[test]
fn a_subscriber_killed_mid_read_does_not_stop_the_publisher() {
    let dir = TempDir::new("km-sub");
    let gw = GatewayProc::start(&dir, &[]);
    let baseline = settled_fds(&gw);
    let victim = follow(&gw.socket, &["sub", "flood"]);
    let survivor = follow(&gw.socket, &["sub", "flood", "--count", "200000"]);
    const N: i64 = 200_000;
    let mut flooder = child("bus-flooder", &gw.socket, &[("KNIT_TEST_N", N.to_string())]);
    flooder.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut f = flooder.spawn().unwrap();
    let mut go = f.stdin.take().unwrap();
    let lines = Lines::spawn(f.stdout.take().unwrap());
    let mut f = ChildGuard::new(f, "flooder");
    lines
        .wait_for(STARTUP, |l| l.contains("@@knit ready"))
        .expect("flooder not ready");
    use std::io::Write;
    go.write_all(b"go\n").unwrap();
    // Kill one subscriber while it reads the flood.
    victim
        .out
        .wait_for(QUICK, |l| l.contains("\"seq\":1000"))
        .expect("the victim read nothing");
    let mut victim = victim;
    let killed = Instant::now();
    victim.child.kill9();
    let done = lines
        .wait_for(Duration::from_secs(60), |l| l.contains("@@knit done"))
        .expect("the publisher stalled after a subscriber died");
    report(
        "subscriber killed → publisher finished its flood",
        killed.elapsed(),
    );
    eprintln!("kill matrix: flood of {N} took {done}");
    assert!(f.wait_timeout(QUICK).expect("flooder exit").success());
    // The other subscriber got every message, in order.
    let mut survivor = survivor;
    let mut n = 0i64;
    while n < N {
        let l = survivor
            .out
            .wait_for(QUICK, |_| true)
            .expect("survivor starved");
        assert!(l.contains(&format!("\"seq\":{n}}}")), "expected {n}: {l}");
        n += 1;
    }
    assert!(survivor
        .child
        .wait_timeout(QUICK)
        .expect("survivor exit")
        .success());
    assert_gateway_fds_return(&gw, baseline, "subscriber killed");
}

#[test]
fn the_gateway_killed_mid_handshake_leaves_no_client_hanging() {
    let dir = TempDir::new("km-gw");
    let mut gw = GatewayProc::start(&dir, &[]);
    let sock = gw.socket.clone();
    // Twenty clients connecting at once; the gateway dies among their handshakes.
    let clients: Vec<_> = (0..20)
        .map(|i| {
            spawn_knit(
                &[
                    "--gateway",
                    sock.to_str().unwrap(),
                    "--app",
                    &format!("c{i}"),
                    "invoke",
                    "Nothing",
                    "--wait-ms",
                    "10000",
                ],
                None,
            )
        })
        .collect();
    let killed = Instant::now();
    gw.child.kill9();
    for c in clients {
        let out = c.finish(QUICK);
        // Refused before the hello, or lost the gateway mid-way (6), or connected and then
        // waited in vain for the method (3); never a hang, never a crash.
        assert!(
            matches!(out.code, Some(6) | Some(3)),
            "{:?}: {}",
            out.code,
            out.stderr
        );
    }
    report(
        "gateway killed mid-handshake → 20 clients exited 6",
        killed.elapsed(),
    );
    assert!(knit_in_dev_shm().is_empty());
    // A new gateway takes over the socket.
    let gw2 = GatewayProc::start_at(&dir, &sock, &[]);
    let out = run_knit(
        &["--gateway", sock.to_str().unwrap(), "methods", "--json"],
        QUICK,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    drop(gw2);
}
