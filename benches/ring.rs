//! Ring benchmarks: push + pop in one thread for 8, 64 and 1024-byte records, and a two-thread
//! ping-pong through a lane's two rings, each beside a baseline measured in the same run (plain
//! copies for the single-thread case, a bare atomic mailbox for the ping-pong: the floor any
//! shared-memory round trip pays).
//!
//! Run: `cargo bench --bench ring` (add `-- --quick` for a short run).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_utils::CachePadded;
use knit::ring::shm_memory::ShmRing;
use knit::ring::{Consumer, Producer, PushError};
use knit::shm::{create_lane, LaneSegment};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SIZES: [usize; 3] = [8, 64, 1024];
const CAP: usize = 64 << 10;

fn lane() -> LaneSegment {
    LaneSegment::open(create_lane(CAP).expect("creating a lane")).expect("mapping the lane")
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Several ring-fulls through the ring, every record checked, before anything is timed.
fn check_push_pop(p: &mut Producer<ShmRing>, c: &mut Consumer<ShmRing>, size: usize) {
    let mut buf = Vec::new();
    for i in 0..(4 * CAP / (size + 8)) {
        let want = payload(size, i as u8);
        p.push(7, i as u16, &want).expect("push");
        let h = c.pop_into(&mut buf).expect("pop").expect("a record");
        assert_eq!((h.kind, h.flags, h.len as usize), (7, i as u16, size));
        assert_eq!(buf, want, "record {i} of {size} bytes changed");
    }
    assert_eq!(c.pop_into(&mut buf), Ok(None));
}

fn push_pop(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("ring_push_pop");
    for size in SIZES {
        let seg = lane();
        let mut p = seg.producer(0).unwrap();
        let mut c = seg.consumer(1).unwrap();
        check_push_pop(&mut p, &mut c, size);
        let msg = payload(size, 1);
        let mut buf = Vec::with_capacity(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("ring", size), &size, |b, _| {
            b.iter(|| {
                p.push(1, 0, black_box(&msg)).unwrap();
                black_box(c.pop_into(&mut buf).unwrap());
            })
        });
        // Baseline: the two copies a push + pop makes, with nothing else.
        let mut slot = vec![0u8; size];
        g.bench_with_input(
            BenchmarkId::new("copy_in_out_baseline", size),
            &size,
            |b, _| {
                b.iter(|| {
                    slot.copy_from_slice(black_box(&msg));
                    buf.clear();
                    buf.extend_from_slice(black_box(&slot));
                    black_box(&buf);
                })
            },
        );
    }
    g.finish();
}

/// Spins this long before yielding the core: with both cores busy (a shared machine) a pure
/// spin would wait out a whole scheduler slice for a peer that is not running.
const SPIN_BUDGET: u32 = 256;

fn relax(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if *spins < SPIN_BUDGET {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Spins until `f` yields, failing (instead of hanging) if the peer thread is gone.
fn spin_until<T>(peer: &JoinHandle<()>, mut f: impl FnMut() -> Option<T>) -> T {
    let mut spins = 0u32;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if spins % (1 << 16) == (1 << 16) - 1 {
            assert!(!peer.is_finished(), "the echo thread stopped");
        }
        relax(&mut spins);
    }
}

/// The echo side of the ping-pong: reads ring 0, writes every record back on ring 1.
fn spawn_echo(seg: &LaneSegment, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let mut rx = seg.consumer(1).unwrap();
    let mut tx = seg.producer(1).unwrap();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut spins = 0;
        // Relaxed: a stop flag; the records travel through the ring, which orders itself.
        while !stop.load(Ordering::Relaxed) {
            match rx.pop_into(&mut buf).expect("sound ring") {
                Some(h) => {
                    spins = 0;
                    loop {
                        match tx.push(h.kind, h.flags, &buf) {
                            Ok(()) => break,
                            Err(PushError::Full) => std::hint::spin_loop(),
                            Err(e) => panic!("echo push: {e}"),
                        }
                    }
                }
                None => relax(&mut spins),
            }
        }
    })
}

fn ping_pong(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("ring_ping_pong");
    for size in [8usize, 64] {
        let seg = lane();
        let stop = Arc::new(AtomicBool::new(false));
        let echo = spawn_echo(&seg, stop.clone());
        let mut tx = seg.producer(0).unwrap();
        let mut rx = seg.consumer(0).unwrap();
        let mut buf = Vec::new();
        // Correctness first: distinct messages come back intact and in order.
        for i in 0..1000u32 {
            let want = payload(size, i as u8);
            tx.push(3, i as u16, &want).unwrap();
            let h = spin_until(&echo, || rx.pop_into(&mut buf).unwrap());
            assert_eq!((h.kind, h.flags), (3, i as u16));
            assert_eq!(buf, want);
        }
        let msg = payload(size, 9);
        g.bench_with_input(BenchmarkId::new("ring_round_trip", size), &size, |b, _| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    tx.push(1, 0, &msg).unwrap();
                    spin_until(&echo, || rx.pop_into(&mut buf).unwrap());
                }
                start.elapsed()
            })
        });
        // Relaxed: a stop flag; the thread's end comes back through join().
        stop.store(true, Ordering::Relaxed);
        echo.join().expect("echo thread");
    }

    // Baseline: a bare mailbox (two atomics on their own lines), the shared-memory floor.
    let ping = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let pong = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (ping, pong, stop) = (ping.clone(), pong.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut seen, mut spins) = (0, 0);
            // Relaxed: a stop flag; the thread's end comes back through join().
            while !stop.load(Ordering::Relaxed) {
                // SYNC(ping): pairs with the Release store in `round_trip`; the word is the whole
                // message, but the pairing is what a real publish pays, so the floor includes it.
                let v = ping.load(Ordering::Acquire);
                if v != seen {
                    seen = v;
                    spins = 0;
                    // SYNC(pong): pairs with the Acquire poll in `round_trip`; as for `ping`.
                    pong.store(v, Ordering::Release);
                } else {
                    relax(&mut spins);
                }
            }
        })
    };
    let mut seq = 0u64;
    let round_trip = |seq: &mut u64| {
        *seq += 1;
        // SYNC(ping): pairs with the echo's Acquire load; the word is the whole message.
        ping.store(*seq, Ordering::Release);
        // SYNC(pong): pairs with the echo's Release store.
        spin_until(&echo, || {
            (pong.load(Ordering::Acquire) == *seq).then_some(())
        });
    };
    for _ in 0..1000 {
        round_trip(&mut seq);
    }
    // SYNC(pong): as in `round_trip`, which already saw 1000 here; coherence alone would do.
    assert_eq!(pong.load(Ordering::Acquire), 1000);
    g.bench_function("atomic_mailbox_baseline", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                round_trip(&mut seq);
            }
            start.elapsed()
        })
    });
    // Relaxed: a stop flag; the thread's end comes back through join().
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("mailbox echo thread");
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = push_pop, ping_pong
}
criterion_main!(benches);
