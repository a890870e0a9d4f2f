//! Rings, lanes and the client across two real processes.
//!
//! The test binary re-executes itself (`current_exe() --exact child_process_entry
//! --nocapture`) with `KNIT_TEST_ROLE` naming what the child does. A lane segment is handed to
//! the child by inheritance: the memfd's `FD_CLOEXEC` is cleared in the forked child only
//! (`pre_exec`), and its number travels in `KNIT_TEST_FD`. Under a normal test run (no role in
//! the environment) `child_process_entry` does nothing.

mod common;

use common::{
    await_line, child_command, say, spawn_child_command, ChildGuard, Env, Lines, CHILD_ROLE,
    STARTUP,
};
use knit::client::{Client, InvokeError, InvokeOptions};
use knit::model::{FailureKind, Target};
use knit::ring::{PushError, RingError};
use knit::shm::{create_lane, LaneSegment};
use knit::{Status, Value};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::time::{Duration, Instant};

const FD: &str = "KNIT_TEST_FD";
const SOCKET: &str = "KNIT_TEST_SOCKET";
const SEED: &str = "KNIT_TEST_SEED";

/// Ring capacity used by the lane tests: small, so a million records wrap many times.
const CAP: usize = 64 << 10;
/// Records in the cross-process stream.
const RECORDS: u64 = 1_000_000;

/// Byte offsets in a lane segment, as `src/shm` lays it out: header (128 B), ring 0's control
/// block (head at 128, tail at 256), ring 1's (384, 512), data areas from 4096, ring 0's first.
/// `ten_records` checks the ring 0 offsets against a live ring before anything is scribbled.
const RING0_HEAD: u64 = 128;
const RING0_TAIL: u64 = 256;
const RING0_DATA: u64 = 4096;
const RING1_TAIL: u64 = 512;

// ----- child side ------------------------------------------------------------------------------

/// The child processes' entry point; a no-op unless the environment names a role.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    match role.as_str() {
        "ring-producer" => child_ring_producer(),
        "ring-consumer" => child_ring_consumer(),
        "ring-scribbler" => child_ring_scribbler(),
        "api-server" => child_api_server(),
        "api-vandal" => child_api_vandal(),
        other => panic!("unknown child role {other}"),
    }
}

/// The inherited memfd.
fn inherited_fd() -> OwnedFd {
    let raw: RawFd = std::env::var(FD)
        .expect("KNIT_TEST_FD")
        .parse()
        .expect("fd number");
    // SAFETY: the parent passed this descriptor to us (and only us) open and without
    // FD_CLOEXEC; nothing else in this process owns it.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
}

/// The record number `i` of the stream: length, kind, flags and every byte follow from `i`.
fn record(i: u64, buf: &mut Vec<u8>) -> (u16, u16) {
    let len = ((i.wrapping_mul(7919)) % 301) as usize; // 0..=300, wraps at odd places
    buf.clear();
    buf.extend((0..len).map(|j| (i as u8).wrapping_mul(31).wrapping_add(j as u8)));
    if len >= 8 {
        buf[..8].copy_from_slice(&i.to_le_bytes());
    }
    (1 + (i % 1000) as u16, (i >> 3) as u16)
}

fn child_ring_producer() {
    let seg = LaneSegment::open(inherited_fd()).expect("mapping the inherited lane");
    let mut p = seg.producer(0).expect("producer");
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..RECORDS {
        let (kind, flags) = record(i, &mut buf);
        loop {
            match p.push(kind, flags, &buf) {
                Ok(()) => break,
                Err(PushError::Full) => {
                    assert!(Instant::now() < deadline, "consumer stalled at {i}");
                    std::thread::yield_now();
                }
                Err(e) => panic!("push {i}: {e}"),
            }
        }
    }
}

fn child_ring_consumer() {
    let seg = LaneSegment::open(inherited_fd()).expect("mapping the inherited lane");
    let mut c = seg.consumer(1).expect("consumer");
    let mut buf = Vec::new();
    let mut n = 0u64;
    // Consumes until killed (bounded, in case the parent died).
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match c.pop_into(&mut buf).expect("a sound ring") {
            Some(_) => {
                n += 1;
                if n == 1 {
                    say("consuming");
                }
            }
            None => std::thread::yield_now(),
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64).
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
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn child_ring_scribbler() {
    let fd = inherited_fd();
    // It is a real lane segment (validated the way a peer would).
    let seg = LaneSegment::open(&fd).expect("mapping the inherited lane");
    let cap = seg.ring_capacity() as u64;
    let seed: u64 = std::env::var(SEED).unwrap().parse().unwrap();
    let mut noise = Noise(seed | 1);
    let write = |bytes: &[u8], at: u64| {
        let n = rustix::io::pwrite(&fd, bytes, at).expect("pwrite into the segment");
        assert_eq!(n, bytes.len());
    };
    match std::env::var("KNIT_TEST_TARGET").unwrap().as_str() {
        "head" => write(&noise.bytes(8), RING0_HEAD),
        "tail" => write(&noise.bytes(8), RING0_TAIL),
        "data" => write(&noise.bytes(cap as usize), RING0_DATA),
        "everything" => {
            // Random bytes at random places in ring 0 (control block and data), until killed.
            say("scribbling");
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let r = noise.next();
                if r % 4 == 0 {
                    let at = [RING0_HEAD, RING0_TAIL][(r >> 8) as usize % 2];
                    write(&noise.bytes(8), at);
                } else {
                    let at = RING0_DATA + (r >> 16) % (cap - 64);
                    write(&noise.bytes(1 + (r >> 8) as usize % 64), at);
                }
            }
        }
        other => panic!("unknown scribble target {other}"),
    }
}

fn child_api_server() {
    let socket = std::env::var(SOCKET).expect("KNIT_TEST_SOCKET");
    let c = Client::builder("child-server")
        .socket(socket)
        .connect()
        .expect("connecting from the child");
    c.register("Ping", |call| {
        Ok(Value::object([
            ("args", call.args.clone()),
            ("pid", Value::from(std::process::id())),
        ]))
    })
    .unwrap();
    c.register_async("Slow", |call, responder| {
        say("slow-started");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(30));
            responder.ok(call.args);
        });
    })
    .unwrap();
    say(&format!("ready {}", c.instance().peer_id));
    // Serve until killed (bounded, in case the parent died).
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && c.is_connected() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Overwrites the 8 bytes at `offset` of this process's (only) lane segment with `value`, as
/// a buggy or hostile peer would. The client keeps no descriptor once it has mapped a segment,
/// so it is reopened through its mapping (`/proc/self/map_files`, which needs privileges), or,
/// failing that, written through the mapping itself.
fn scribble_own_lane(offset: u64, value: u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let line = maps
        .lines()
        .find(|l| l.contains("memfd:knit-lane") && l.split_whitespace().nth(2) == Some("00000000"))
        .expect("the lane the caller opened is mapped here");
    let range = line.split_whitespace().next().unwrap();
    let path = format!("/proc/self/map_files/{range}");
    match rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDWR,
        rustix::fs::Mode::empty(),
    ) {
        Ok(fd) => {
            let n = rustix::io::pwrite(&fd, &value.to_le_bytes(), offset).expect("pwrite");
            assert_eq!(n, 8);
        }
        Err(_) => {
            let start = usize::from_str_radix(range.split('-').next().unwrap(), 16).unwrap();
            // SAFETY: `start` is the page-aligned start of a live shared mapping of the lane
            // segment (the client that maps it is alive for this whole call), `offset` is an
            // 8-aligned position inside its control block, and every access knit makes to
            // that word is atomic, as this one is.
            let word =
                unsafe { &*((start + offset as usize) as *const std::sync::atomic::AtomicU64) };
            word.store(value, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// A peer that, when called, writes garbage over the ring it sends on (ring 1: the caller
/// opened the lane, so the caller writes ring 0 and reads ring 1).
fn child_api_vandal() {
    let socket = std::env::var(SOCKET).expect("KNIT_TEST_SOCKET");
    let c = Client::builder("vandal")
        .socket(socket)
        .connect()
        .expect("connecting from the child");
    c.register_async("Vandalize", |_call, responder| {
        // A misaligned, out-of-range producer position.
        scribble_own_lane(RING1_TAIL, 0xDEAD_BEEF_DEAD_BEE3);
        say("scribbled");
        // Never answer (an answer would commit a sound tail over the garbage).
        std::mem::forget(responder);
    })
    .unwrap();
    say("ready");
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && c.is_connected() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ----- parent side -----------------------------------------------------------------------------

/// Starts this test binary as a child in `role`, optionally inheriting `fd`.
fn spawn_child(
    role: &str,
    fd: Option<BorrowedFd<'_>>,
    env: &[(&str, String)],
) -> (ChildGuard, Lines) {
    let mut cmd = child_command(role, env);
    if let Some(fd) = fd {
        let raw = fd.as_raw_fd();
        cmd.env(FD, raw.to_string());
        // SAFETY: the closure runs in the forked child before exec and makes one fcntl system
        // call (async-signal-safe, no allocation, no locks), on a descriptor that stays open in
        // the parent for as long as this borrow lives.
        unsafe {
            cmd.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(raw);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())
                    .map_err(std::io::Error::from)
            });
        }
    }
    spawn_child_command(cmd, role)
}

#[test]
fn a_million_records_cross_processes_in_order_and_intact() {
    let fd = create_lane(CAP).expect("creating a lane");
    let seg = LaneSegment::open(&fd).unwrap();
    let mut consumer = seg.consumer(1).unwrap();
    let (mut child, _lines) = spawn_child("ring-producer", Some(fd.as_fd()), &[]);

    let mut got = Vec::new();
    let mut want = Vec::new();
    let mut i = 0u64;
    let mut bytes = 0u64;
    let mut empty_polls = 0u32;
    let mut producer_done = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while i < RECORDS {
        match consumer.pop_into(&mut got) {
            Ok(Some(h)) => {
                let (kind, flags) = record(i, &mut want);
                assert_eq!((h.kind, h.flags), (kind, flags), "record {i}: header");
                assert_eq!(h.len as usize, want.len(), "record {i}: length");
                assert!(got == want, "record {i}: bytes differ");
                bytes += want.len() as u64;
                i += 1;
                empty_polls = 0;
            }
            Ok(None) => {
                // The producer had exited before this empty poll: nothing more will come.
                assert!(
                    !producer_done,
                    "the ring ran dry at record {i} of {RECORDS}"
                );
                empty_polls += 1;
                if empty_polls % 4096 == 0 {
                    assert!(Instant::now() < deadline, "stalled at record {i}");
                    if let Some(s) = child.try_status() {
                        assert!(s.success(), "the producer failed: {s}");
                        producer_done = true;
                    }
                }
                std::thread::yield_now();
            }
            Err(e) => panic!("record {i}: {e}"),
        }
    }
    assert_eq!(
        consumer.pop_into(&mut got),
        Ok(None),
        "nothing after the last"
    );
    assert!(bytes > 100 * CAP as u64, "the ring wrapped many times");
    let status = child.wait_timeout(STARTUP).expect("the producer exits");
    assert!(status.success(), "producer: {status}");
}

#[test]
fn producer_sees_full_not_a_hang_when_the_consumer_is_killed() {
    let fd = create_lane(CAP).unwrap();
    let seg = LaneSegment::open(&fd).unwrap();
    let mut producer = seg.producer(0).unwrap();
    let (mut child, lines) = spawn_child("ring-consumer", Some(fd.as_fd()), &[]);
    let payload = [0x5Au8; 56]; // 64 bytes a record with its header

    // Stream until the consumer has provably drained several ring-fulls.
    let mut pushed = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while pushed < 8 * CAP / 64 {
        match producer.push(1, 0, &payload) {
            Ok(()) => pushed += 1,
            Err(PushError::Full) => {
                assert!(Instant::now() < deadline, "the consumer never drained");
                assert!(child.try_status().is_none(), "the consumer died early");
                std::thread::yield_now();
            }
            Err(e) => panic!("push: {e}"),
        }
    }
    await_line(&lines, "consuming", &mut child);

    // Kill it mid-stream.
    let status = child.kill9();
    assert_eq!(status.signal(), Some(9));

    // The producer fills what room is left, then gets Full — promptly, every time.
    let mut after = 0usize;
    let start = Instant::now();
    let full = loop {
        match producer.push(1, 0, &payload) {
            Ok(()) => after += 1,
            Err(e) => break e,
        }
        assert!(
            after <= CAP / 64,
            "pushed more than a ring-full into a dead consumer"
        );
    };
    assert_eq!(full, PushError::Full);
    for _ in 0..10_000 {
        assert_eq!(producer.push(1, 0, &payload), Err(PushError::Full));
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(producer.free_bytes().unwrap() < 64);
}

/// Fills ring 0 with ten 64-byte records (tail = 640) and checks that the offsets this file
/// scribbles at really are ring 0's head and tail.
fn ten_records(fd: &OwnedFd, producer: &mut knit::ring::Producer<knit::ring::shm_memory::ShmRing>) {
    for i in 0..10u8 {
        producer.push(1, 0, &[i; 56]).unwrap();
    }
    let mut word = [0u8; 8];
    rustix::io::pread(fd, &mut word, RING0_TAIL).unwrap();
    assert_eq!(
        u64::from_le_bytes(word),
        640,
        "ring 0's tail is where this test thinks"
    );
    rustix::io::pread(fd, &mut word, RING0_HEAD).unwrap();
    assert_eq!(
        u64::from_le_bytes(word),
        0,
        "ring 0's head is where this test thinks"
    );
}

fn scribble(target: &str, seed: u64, fd: &OwnedFd) {
    let (mut child, _lines) = spawn_child(
        "ring-scribbler",
        Some(fd.as_fd()),
        &[
            (SEED, seed.to_string()),
            ("KNIT_TEST_TARGET", target.into()),
        ],
    );
    let status = child.wait_timeout(STARTUP).expect("the scribbler finishes");
    assert!(status.success(), "scribbler: {status}");
}

/// Pops until the ring reports an error; `Ok(None)` (the ring looks empty) before that is a
/// failure: garbage must not pass for a sound ring that ran dry.
fn pop_until_error(c: &mut knit::ring::Consumer<knit::ring::shm_memory::ShmRing>) -> RingError {
    let mut buf = Vec::new();
    for _ in 0..1000 {
        match c.pop_into(&mut buf) {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the corrupt ring looked sound and empty"),
            Err(e) => return e,
        }
    }
    panic!("no error after 1000 records from a ring holding ten");
}

#[test]
fn consumer_reports_ring_error_when_a_peer_scribbles_the_tail_or_data() {
    for (target, seed) in [
        ("tail", 1u64),
        ("tail", 2),
        ("data", 3),
        ("data", 4),
        ("data", 5),
    ] {
        let fd = create_lane(CAP).unwrap();
        let seg = LaneSegment::open(&fd).unwrap();
        let mut producer = seg.producer(0).unwrap();
        let mut consumer = seg.consumer(1).unwrap();
        ten_records(&fd, &mut producer);
        scribble(target, seed, &fd);
        let e = pop_until_error(&mut consumer);
        assert!(!e.0.is_empty(), "{target}/{seed}: {e}");
    }
}

#[test]
fn producer_reports_corrupt_when_a_peer_scribbles_the_head() {
    for seed in [11u64, 12, 13] {
        let fd = create_lane(CAP).unwrap();
        let seg = LaneSegment::open(&fd).unwrap();
        let mut producer = seg.producer(0).unwrap();
        ten_records(&fd, &mut producer);
        scribble("head", seed, &fd);
        // The producer looks at the consumer's position when the ring seems full; by then it
        // must see the garbage for what it is, not wait forever on "full".
        let mut pushes = 0;
        let e = loop {
            match producer.push(1, 0, &[0u8; 56]) {
                Ok(()) => pushes += 1,
                Err(e) => break e,
            }
            assert!(pushes <= CAP / 64, "pushed past a ring-full");
        };
        assert!(matches!(e, PushError::Corrupt(_)), "seed {seed}: {e:?}");
        // A consumer attaching now refuses a misaligned position, or reports the garbage as
        // an error when it reads.
        match seg.consumer(1) {
            Err(e) => assert!(!e.0.is_empty()),
            Ok(mut c) => {
                pop_until_error(&mut c);
            }
        }
    }
}

#[test]
fn ring_survives_a_peer_scribbling_while_it_streams() {
    let fd = create_lane(CAP).unwrap();
    let seg = LaneSegment::open(&fd).unwrap();
    let mut producer = seg.producer(0).unwrap();
    let mut consumer = seg.consumer(1).unwrap();
    let (mut child, lines) = spawn_child(
        "ring-scribbler",
        Some(fd.as_fd()),
        &[
            (SEED, "77".into()),
            ("KNIT_TEST_TARGET", "everything".into()),
        ],
    );
    await_line(&lines, "scribbling", &mut child);
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let detected = 'stream: loop {
        assert!(Instant::now() < deadline, "corruption never detected");
        for i in 0..32u8 {
            match producer.push(1, 0, &[i; 120]) {
                Ok(()) | Err(PushError::Full) => {}
                Err(PushError::Corrupt(why)) => break 'stream format!("producer: {why}"),
                Err(e) => panic!("unexpected push error {e:?}"),
            }
        }
        loop {
            match consumer.pop_into(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => break 'stream format!("consumer: {e}"),
            }
        }
    };
    assert!(!detected.is_empty());
    child.kill9();
}

#[test]
fn pending_invoke_fails_with_peer_left_when_the_server_process_is_killed() {
    let env = Env::new("api");
    let (mut child, lines) = spawn_child(
        "api-server",
        None,
        &[(SOCKET, env.socket().display().to_string())],
    );
    let ready = await_line(&lines, "ready", &mut child);
    let child_peer = ready.rsplit(' ').next().unwrap().to_string();

    let client = env.client("parent");
    let opts = InvokeOptions {
        target: Target::Best,
        wait: Duration::from_secs(10),
        timeout: Duration::from_secs(60),
    };
    let r = client
        .invoke("Ping", Value::from("hello"), &opts)
        .expect("the child answers");
    assert_eq!(r.returned.get("args"), Some(&Value::from("hello")));
    assert_eq!(r.returned.get("pid"), Some(&Value::from(child.pid())));
    let by = r.executed_by.unwrap();
    assert_eq!(by.pid, child.pid(), "the gateway knows the child's pid");
    assert_eq!(by.peer_id.to_string(), child_peer);

    let (tx, rx) = std::sync::mpsc::channel();
    let caller = client.clone();
    std::thread::spawn(move || {
        let r = caller.invoke("Slow", Value::from(1), &opts);
        let _ = tx.send((r, Instant::now()));
    });
    await_line(&lines, "slow-started", &mut child);
    let killed = Instant::now();
    child.kill9();
    let (r, done) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the pending call ends when its server dies");
    let after = done.saturating_duration_since(killed);
    // The handler would have answered after 30 s: failing well before means the death was
    // noticed (how fast is the kill matrix's and the benchmarks' business).
    assert!(
        after < Duration::from_secs(10),
        "failed {after:?} after the kill"
    );
    let r = match r {
        Err(InvokeError::Failed(r)) => r,
        other => panic!("expected a failed call, got {other:?}"),
    };
    assert_eq!(r.failure_status(), Status::PeerLeft);
    assert_eq!(r.all_errors[0].kind, FailureKind::PeerLeft);
    assert!(r.message.contains("Peer has left"), "{}", r.message);
    assert_eq!(Status::PeerLeft.exit_code(), 5);

    // The server is gone from discovery too.
    assert!(common::wait_until(Duration::from_secs(1), || client
        .methods()
        .iter()
        .all(|m| m.def.name != "Slow")));
}

#[test]
fn a_peer_corrupting_its_lane_fails_the_call_with_protocol_not_a_hang() {
    let env = Env::new("vandal");
    let (mut child, lines) = spawn_child(
        "api-vandal",
        None,
        &[(SOCKET, env.socket().display().to_string())],
    );
    await_line(&lines, "ready", &mut child);
    let client = env.client("victim");
    let bystander = env.client("bystander");
    bystander.register("Still", |c| Ok(c.args.clone())).unwrap();
    let opts = InvokeOptions {
        target: Target::Best,
        wait: Duration::from_secs(10),
        timeout: Duration::from_secs(30),
    };

    let (tx, rx) = std::sync::mpsc::channel();
    let caller = client.clone();
    let o = opts.clone();
    std::thread::spawn(move || {
        let _ = tx.send((caller.invoke("Vandalize", Value::map(), &o), Instant::now()));
    });
    await_line(&lines, "scribbled", &mut child);
    let scribbled = Instant::now();
    let (r, done) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the call on the corrupt lane ends");
    let after = done.saturating_duration_since(scribbled);
    // A hang guard: the call must end, not hang (its reply never comes).
    assert!(
        after < Duration::from_secs(10),
        "failed {after:?} after the scribble"
    );
    let r = match r {
        Err(InvokeError::Failed(r)) => r,
        other => panic!("expected a failed call, got {other:?}"),
    };
    assert_eq!(r.failure_status(), Status::Protocol, "{}", r.message);
    assert!(r.message.contains("corrupt"), "{}", r.message);

    // The victim is unharmed and keeps working with everyone else.
    assert!(client.is_connected());
    let r = client
        .invoke("Still", Value::from("fine"), &opts)
        .expect("other peers still answer");
    assert_eq!(r.returned, Value::from("fine"));
}
