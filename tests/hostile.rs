//! Hostile and malformed input from peers: a peer scribbling over its lanes (a real second
//! process), a writer scribbling over a context segment, garbage and over-deep control frames,
//! and floods of registrations and peers. Every case ends in a typed error for the offender,
//! and everyone else carries on: no panic, no hang, nothing lost for the others.
//!
//! The child process is this test binary re-executed (`current_exe() --exact
//! child_process_entry`), with `KNIT_TEST_ROLE` naming what it does, as in `processes.rs`.

mod common;

use common::{await_line, say, spawn_child, Env, CHILD_ROLE, STARTUP};
use knit::client::{Client, ClientError, ContextError, InteropEvent, InvokeOptions};
use knit::gateway::Limits;
use knit::model::Target;
use knit::wire::frame::{
    encode_frame, FromGateway, Hello, MethodDef, MethodSpec, ToGateway, Transport,
};
use knit::{Status, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

const SOCKET: &str = "KNIT_TEST_SOCKET";

/// Lane segment offsets (`docs/shm-format.md` §3): ring 0's tail, ring 1's head, the data
/// areas. The side that opened the lane (0) writes ring 0 and reads ring 1, so these and the
/// 128-byte header are the words that side owns.
const RING0_TAIL: usize = 256;
const RING1_HEAD: usize = 384;
const DATA: usize = 4096;

fn opts() -> InvokeOptions {
    InvokeOptions {
        target: Target::Best,
        wait: Duration::from_secs(10),
        timeout: Duration::from_secs(20),
    }
}

/// Aborts the whole test process, naming `what`, unless dropped within `limit`: a regression
/// that makes a client hang (a dispatcher spinning forever cannot be joined) then fails the run
/// with a message instead of stalling it.
struct Watchdog(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

fn watchdog(what: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("{what} did not finish within {limit:?}: aborting");
            std::process::abort();
        }
    });
    Watchdog(tx)
}

// ----- child side ------------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    match role.as_str() {
        "lane-vandal" => child_lane_vandal(),
        other => panic!("unknown child role {other}"),
    }
}

/// Deterministic pseudo-random numbers (xorshift64).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// This process's mappings of segments named `memfd:<name>`: (start address, length).
fn mappings(name: &str) -> Vec<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter(|l| l.contains(&format!("memfd:{name}")))
        .filter(|l| l.split_whitespace().nth(2) == Some("00000000"))
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("rw"))
        })
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let a = usize::from_str_radix(a, 16).unwrap();
            let b = usize::from_str_radix(b, 16).unwrap();
            (a, b - a)
        })
        .collect()
}

/// The word at `base + off` of a live shared mapping.
///
/// # Safety
/// `base..base + len` must be a live read-write mapping for the rest of the process's life,
/// `off + 8 <= len` and `off` 8-aligned.
unsafe fn word<'a>(base: usize, off: usize) -> &'a AtomicU64 {
    // SAFETY: per the contract; knit accesses shared words only atomically, as we do.
    unsafe { &*((base + off) as *const AtomicU64) }
}

/// A peer that opens a lane to the victim with one honest call, then scribbles random bytes,
/// over and over, over everything of that lane it owns: the segment header, the tail and data
/// of the ring it writes, the head of the ring it reads. It never sends again and never reports
/// anything itself (its own reading position is private, so its client sees nothing wrong).
fn child_lane_vandal() {
    let socket = std::env::var(SOCKET).expect("KNIT_TEST_SOCKET");
    // No reconnection: a reconnecting client retires (unmaps) its old lanes, and this loop
    // writes through raw addresses of one of them.
    let c = Client::builder("vandal")
        .socket(socket)
        .reconnect(false)
        .connect()
        .expect("connecting from the child");
    c.register("Vandal.Marker", |_| Ok(Value::Null)).unwrap();
    let r = c
        .invoke("Victim.Echo", Value::from("hello"), &opts())
        .expect("the victim answers an honest call");
    assert_eq!(r.returned, Value::from("hello"));
    let lanes = mappings("knit-lane");
    assert_eq!(lanes.len(), 1, "one lane, to the victim");
    let (base, len) = lanes[0];
    let cap = (len - DATA) / 2;
    say(&format!("ready {}", c.instance().peer_id));
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rounds = 0u64;
    while c.is_connected() && Instant::now() < deadline {
        // SAFETY: `base..base + len` is the lane segment this client mapped; it stays mapped
        // while the client lives (`c` outlives the loop) and does not reconnect (which would
        // retire the lane); every offset is 8-aligned and inside.
        unsafe {
            word(base, (noise.next() as usize % 16) * 8).store(noise.next(), Ordering::Relaxed);
            word(base, RING0_TAIL).store(noise.next(), Ordering::Relaxed);
            word(base, RING1_HEAD).store(noise.next(), Ordering::Relaxed);
            for _ in 0..64 {
                let at = DATA + noise.next() as usize % cap;
                (*((base + at) as *const AtomicU8)).store(noise.next() as u8, Ordering::Relaxed);
            }
        }
        rounds += 1;
        if rounds == 1 {
            say("scribbling");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    say(if c.is_connected() {
        "still connected"
    } else {
        "disconnected"
    });
}

// ----- parent side -----------------------------------------------------------------------------

#[test]
fn a_peer_scribbling_over_its_lane_is_disconnected_and_the_victim_carries_on() {
    let _watchdog = watchdog("the lane scribbler test", Duration::from_secs(120));
    let env = Env::new("lane");
    let victim = env.client("victim");
    victim
        .register("Victim.Echo", |call| Ok(call.args.clone()))
        .unwrap();
    let witness = env.client("witness");
    let (tx, removed) = std::sync::mpsc::channel();
    let _events = witness.on_event(move |e| {
        if let InteropEvent::ServerRemoved { server, reason } = e {
            let _ = tx.send((server.peer_id, reason.clone()));
        }
    });

    let (mut child, lines) = spawn_child(
        "lane-vandal",
        &[(SOCKET, env.socket().display().to_string())],
    );
    let ready = await_line(&lines, "ready", &mut child);
    let vandal = ready.rsplit(' ').next().unwrap().to_string();
    await_line(&lines, "scribbling", &mut child);

    // The victim finds the corruption, drops the lane, reports it; the gateway disconnects the
    // vandal, and everyone sees it leave.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (peer, _reason) = removed
            .recv_timeout(left)
            .expect("the vandal is disconnected");
        if peer.to_string() == vandal {
            break;
        }
    }
    await_line(&lines, "disconnected", &mut child);
    let status = child
        .wait_timeout(STARTUP)
        .expect("the vandal exits once disconnected");
    assert!(status.success(), "vandal: {status}");

    // The victim is still connected, still registered, and serves a third client.
    assert!(victim.is_connected());
    let r = witness
        .invoke("Victim.Echo", Value::from("still here"), &opts())
        .expect("the victim still answers");
    assert_eq!(r.returned, Value::from("still here"));
    assert_eq!(r.executed_by.unwrap().peer_id, victim.instance().peer_id);
    // And it can call others over fresh lanes.
    witness
        .register("Witness.Ping", |_| Ok(Value::from("pong")))
        .unwrap();
    let r = victim
        .invoke("Witness.Ping", Value::Null, &opts())
        .expect("the victim calls out");
    assert_eq!(r.returned, Value::from("pong"));
}

// ----- contexts ----------------------------------------------------------------------------------

/// This process's mapping of the context segment whose current snapshot holds `marker`.
fn context_mapping(marker: &str) -> (usize, usize) {
    for (base, len) in mappings("knit-context") {
        // SAFETY: a live context mapping of `len` bytes (the clients that map it outlive this
        // test's use of it); the header and store control words are 8-aligned and inside.
        unsafe {
            let snapshot = (word(base, 24).load(Ordering::Relaxed) >> 32) as usize;
            let version = word(base, 128 + 128).load(Ordering::Relaxed);
            let buf = DATA + (version as usize & 1) * (32 + snapshot).div_ceil(4096) * 4096;
            let n = (word(base, buf + 16).load(Ordering::Relaxed) as usize).min(4096);
            let bytes: Vec<u8> = (0..n)
                .map(|i| (*((base + buf + 32 + i) as *const AtomicU8)).load(Ordering::Relaxed))
                .collect();
            if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                return (base, len);
            }
        }
    }
    panic!("no mapped context holds {marker}");
}

/// CPU time this process has used (user + system), from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 (utime, stime) in USER_HZ ticks, which Linux fixes at 100 for what it
    // reports in /proc; `after` starts at field 3.
    let ticks = f[11] + f[12];
    Duration::from_millis(ticks * 10)
}

#[test]
fn a_writer_scribbling_over_a_context_gives_readers_typed_errors_and_they_carry_on() {
    let _watchdog = watchdog("the context scribbler test", Duration::from_secs(120));
    let env = Env::new("ctx");
    let writer = env.client("writer");
    let reader = env.client("reader");
    let marker = "knit-scribble-marker-7d1f";
    writer
        .contexts()
        .set(
            "scribbled",
            Value::object([("marker", Value::from(marker))]),
        )
        .unwrap();
    let (tx, updates) = std::sync::mpsc::channel();
    let _sub = reader
        .contexts()
        .subscribe("scribbled", move |u| {
            let _ = tx.send(u.data.clone());
        })
        .unwrap();
    let first = updates.recv_timeout(STARTUP).expect("the first callback");
    assert_eq!(first.get("marker"), Some(&Value::from(marker)));
    let (base, len) = context_mapping(marker);
    let log = len - 65536; // the gateway's default log size (Limits::context_log)
    let log_tail = 128 + 136;

    // 1. Garbage over the log, and a tail that says there is more to read: the subscriber's
    //    follower finds it corrupt once, moves past it and resynchronises from the (sound)
    //    snapshot. Before, it stayed put and the pumping thread spun on it forever.
    let mut noise = Noise(12345);
    // SAFETY: the mapping stays live (both clients hold it); offsets are 8-aligned, inside.
    unsafe {
        for off in (log..len).step_by(8) {
            word(base, off).store(noise.next(), Ordering::Relaxed);
        }
        let t = word(base, log_tail).load(Ordering::Relaxed);
        word(base, log_tail).store(t + 40, Ordering::Release);
    }
    // Wake the reader as a writer would (through any write), then measure: no hot loop.
    let cpu0 = cpu_time();
    let wall0 = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    let busy = cpu_time().saturating_sub(cpu0);
    let wall = wall0.elapsed();
    assert!(
        busy < wall / 2,
        "a corrupt log keeps the process busy: {busy:?} of CPU in {wall:?}"
    );
    writer
        .contexts()
        .update("scribbled", Value::object([("after", Value::from(1))]))
        .unwrap();
    let got = updates
        .recv_timeout(STARTUP)
        .expect("the subscriber carries on");
    assert_eq!(got.get("after"), Some(&Value::from(1)));
    assert_eq!(got.get("marker"), Some(&Value::from(marker)));

    // 2. A snapshot that does not decode, published as a new version: readers and writers that
    //    need it get a typed `Corrupt`; a `set` (which needs nothing of the old value) repairs
    //    the context, and the subscriber gets the repaired value.
    // SAFETY: as above.
    unsafe {
        let snapshot = (word(base, 24).load(Ordering::Relaxed) >> 32) as usize;
        let v = word(base, 256).load(Ordering::Relaxed) + 1;
        let buf = DATA + (v as usize & 1) * (32 + snapshot).div_ceil(4096) * 4096;
        word(base, buf).store(v, Ordering::Relaxed);
        word(base, buf + 8).store(0, Ordering::Relaxed);
        word(base, buf + 16).store(16, Ordering::Relaxed);
        word(base, buf + 32).store(u64::MAX, Ordering::Relaxed);
        word(base, buf + 40).store(u64::MAX, Ordering::Relaxed);
        word(base, 256).store(v, Ordering::Release);
    }
    match reader.contexts().get("scribbled") {
        Err(ContextError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    match writer
        .contexts()
        .update("scribbled", Value::object([("x", Value::from(2))]))
    {
        Err(e @ ContextError::Corrupt(_)) => assert_eq!(e.status(), Status::Protocol),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    writer
        .contexts()
        .set(
            "scribbled",
            Value::object([("repaired", Value::from(true))]),
        )
        .expect("a set repairs a corrupt context");
    let got = reader.contexts().get("scribbled").unwrap();
    assert_eq!(got.data.get("repaired"), Some(&Value::from(true)));
    let deadline = Instant::now() + STARTUP;
    loop {
        let u = updates
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the subscriber sees the repaired value");
        if u.get("repaired").is_some() {
            assert!(u.get("after").is_none(), "{u}");
            break;
        }
    }
    assert!(reader.is_connected() && writer.is_connected());
}

// ----- control frames ------------------------------------------------------------------------------

/// A raw control connection: sends a hello, reads what comes back (descriptors are dropped).
fn raw_peer(env: &Env) -> UnixStream {
    let mut s = UnixStream::connect(env.socket()).unwrap();
    s.set_read_timeout(Some(STARTUP)).unwrap();
    let hello = ToGateway::Hello(Hello {
        protocol: knit::wire::frame::PROTOCOL_VERSION,
        application: "raw".into(),
        instance: None,
        api: "test".into(),
        transport: Transport::Relay,
    });
    s.write_all(&encode_frame(&hello, 0).unwrap()).unwrap();
    s
}

#[test]
fn a_client_of_another_protocol_version_is_refused_with_both_versions_named() {
    let env = Env::new("hostile-protover");
    let mut s = UnixStream::connect(env.socket()).unwrap();
    s.set_read_timeout(Some(STARTUP)).unwrap();
    let old = knit::wire::frame::PROTOCOL_VERSION - 1;
    let hello = ToGateway::Hello(Hello {
        protocol: old,
        application: "old".into(),
        instance: None,
        api: "test".into(),
        transport: Transport::Relay,
    });
    s.write_all(&encode_frame(&hello, 0).unwrap()).unwrap();
    let mut frames = knit::wire::frame::FrameReader::default();
    let mut buf = [0u8; 4096];
    let body = loop {
        if let Some((body, _)) = frames.next_frame().unwrap() {
            break body;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed without an answer");
        frames.push_bytes(&buf[..n]);
    };
    match knit::wire::frame::decode_body::<FromGateway>(&body).unwrap() {
        FromGateway::Refused { status, message } => {
            assert_eq!(status, knit::Status::Protocol);
            let want = format!(
                "protocol version {old} not supported (gateway speaks {})",
                knit::wire::frame::PROTOCOL_VERSION
            );
            assert_eq!(message, want);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    until_closed(&mut s);
}

/// Reads until the gateway closes the connection. Panics on a timeout.
fn until_closed(s: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the gateway did not close the connection: {e}"),
        }
    }
}

#[test]
fn malformed_and_over_deep_control_frames_disconnect_only_their_sender() {
    let env = Env::new("frames");
    let good = env.client("good");
    good.register("Good.Echo", |c| Ok(c.args.clone())).unwrap();

    // A body that is not a message.
    let mut s = raw_peer(&env);
    s.write_all(&[8, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    s.write_all(&[0xff; 8]).unwrap();
    until_closed(&mut s);

    // A frame declaring more than the limit, and one declaring too many descriptors.
    for header in [
        [0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0],
        [0, 0, 0, 0, 99, 0, 0, 0],
    ] {
        let mut s = raw_peer(&env);
        s.write_all(&header).unwrap();
        until_closed(&mut s);
    }

    // A registration whose metadata value nests 100 000 levels deep (the encoder refuses to
    // write one, so it is made by hand): refused by the decoder, not a stack overflow.
    let mut s = raw_peer(&env);
    let reg = ToGateway::Register {
        req: 1,
        methods: vec![MethodSpec {
            id: 1,
            def: MethodDef::new("Deep"),
        }],
    };
    let mut frame = encode_frame(&reg, 0).unwrap();
    // The body ends with the metadata (varint length 1, the null tag) and `streaming: false`.
    assert_eq!(&frame[frame.len() - 3..], &[1, 0, 0]);
    frame.truncate(frame.len() - 3);
    let mut deep = [8u8, 1].repeat(100_000);
    deep.push(0);
    let mut n = deep.len();
    while n >= 0x80 {
        frame.push(n as u8 | 0x80);
        n >>= 7;
    }
    frame.push(n as u8);
    frame.extend_from_slice(&deep);
    frame.push(0);
    let body = (frame.len() - 8) as u32;
    frame[0..4].copy_from_slice(&body.to_le_bytes());
    s.write_all(&frame).unwrap();
    until_closed(&mut s);

    // Everyone else carries on.
    let other = env.client("other");
    let r = other
        .invoke("Good.Echo", Value::from(1), &opts())
        .expect("the gateway still serves");
    assert_eq!(r.returned, Value::from(1));
    assert!(good.is_connected());
    assert!(!other.methods().iter().any(|m| m.def.name == "Deep"));
}

// ----- floods and fan-out ------------------------------------------------------------------------

#[test]
fn floods_of_registrations_and_peers_get_typed_refusals() {
    let env = Env::with("flood", |cfg| {
        cfg.limits = Limits {
            max_methods_per_peer: 300,
            max_peers: 12,
            max_name_len: 100,
            ..Limits::default()
        }
    });
    let flooder = env.client("flooder");
    for i in 0..300 {
        flooder
            .register(format!("Flood.{i}").as_str(), |_| Ok(Value::Null))
            .unwrap();
    }
    for i in 300..310 {
        match flooder.register(format!("Flood.{i}").as_str(), |_| Ok(Value::Null)) {
            Err(e @ ClientError::Gateway { .. }) => assert_eq!(e.status(), Status::Busy),
            other => panic!("registration {i} beyond the limit: {other:?}"),
        }
    }
    match flooder.register("N".repeat(101).as_str(), |_| Ok(Value::Null)) {
        Err(e) => assert_eq!(e.status(), Status::InvalidArgument, "{e}"),
        Ok(()) => panic!("an over-long name was registered"),
    }
    // The registrations that were refused are not half there.
    let watcher = env.client("watcher");
    let flood: Vec<_> = watcher
        .methods()
        .into_iter()
        .filter(|m| m.def.name.starts_with("Flood."))
        .collect();
    assert_eq!(flood.len(), 300);
    // The flooder still works.
    let r = watcher
        .invoke("Flood.299", Value::Null, &opts())
        .expect("a registered method answers");
    assert_eq!(r.returned, Value::Null);

    // Peers up to the limit (flooder and watcher are two of the twelve), then refusals.
    let mut peers = Vec::new();
    for i in 0..10 {
        peers.push(env.client(&format!("peer{i}")));
    }
    for _ in 0..5 {
        match env.builder("one-too-many").connect() {
            Err(e @ ClientError::Refused { .. }) => assert_eq!(e.status(), Status::Busy),
            Err(e) => panic!("a peer beyond the limit: {e}"),
            Ok(_) => panic!("a peer beyond the limit was admitted"),
        }
    }
    // A place frees up when one leaves.
    drop(peers.pop());
    assert!(common::wait_until(STARTUP, || env
        .builder("late")
        .connect()
        .map(|c| peers.push(c))
        .is_ok()));
}

#[test]
fn fan_out_to_many_servers_and_subscribers_delivers_to_each_once() {
    let env = Env::new("fanout");
    const N: usize = 24;
    let servers: Vec<Client> = (0..N).map(|i| env.client(&format!("s{i}"))).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut subs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        s.register("Fan.Out", move |_| Ok(Value::from(i))).unwrap();
        let tx = tx.clone();
        subs.push(
            s.subscribe("fan.topic", Default::default(), move |m| {
                let _ = tx.send((i, m.data.clone()));
            })
            .unwrap(),
        );
    }
    let caller = env.client("caller");
    assert!(common::wait_until(STARTUP, || caller
        .methods()
        .iter()
        .find(|m| m.def.name == "Fan.Out")
        .is_some_and(|m| m.servers.len() == N)));
    let all = InvokeOptions {
        target: Target::All,
        ..opts()
    };
    let r = caller
        .invoke("Fan.Out", Value::Null, &all)
        .expect("every server answers");
    let mut got: Vec<i64> = r
        .all_return_values
        .iter()
        .map(|v| v.returned.as_i64().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, (0..N as i64).collect::<Vec<_>>());

    // A big payload to every subscriber, once each.
    let big = Value::from("x".repeat(200_000));
    caller
        .publish("fan.topic", big.clone(), &Default::default())
        .unwrap();
    let mut seen = vec![0; N];
    for _ in 0..N {
        let (i, data) = rx.recv_timeout(STARTUP).expect("every subscriber hears");
        assert_eq!(data, big);
        seen[i] += 1;
    }
    assert!(seen.iter().all(|n| *n == 1), "{seen:?}");
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());

    // Oversized: a typed error, and nothing delivered.
    let max = caller.max_payload();
    let huge = Value::Bytes(vec![0; max + 1]);
    match caller.invoke("Fan.Out", huge.clone(), &all) {
        Err(e) => assert_eq!(e.status(), Status::PayloadTooLarge, "{e}"),
        Ok(_) => panic!("an oversized call went out"),
    }
    match caller.publish("fan.topic", huge, &Default::default()) {
        Err(e) => assert!(
            matches!(
                e.status(),
                Status::PayloadTooLarge | Status::InvalidArgument
            ),
            "{e}"
        ),
        Ok(()) => panic!("an oversized message went out"),
    }
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
}
