//! Loom models of the ring and the doorbell.
//!
//! Run with `RUSTFLAGS="--cfg knit_loom" cargo test --release --lib loom`.

use super::Doorbell;
use crate::ring::heap_memory::HeapRing;
use crate::ring::{Consumer, Producer, PushError};
use loom::sync::Arc;
use loom::thread;

/// A producer pushes three records of different sizes through a 64-byte ring (forcing a wrap);
/// the consumer pops them. Allowed outcome: exactly the three records, in order, with their
/// bytes intact; loom additionally fails the test on any unsynchronised access to a data byte
/// (which would mean the consumer read bytes the producer had not published, or the producer
/// overwrote bytes the consumer had not released).
#[test]
fn loom_ring_delivers_records_in_order() {
    loom::model(|| {
        let mem = HeapRing::new(64);
        let mut p = Producer::new(mem.clone()).unwrap();
        let mut c = Consumer::new(mem).unwrap();
        let records: [&[u8]; 3] = [&[1; 20], &[2; 12], &[3; 20]];
        let t = thread::spawn(move || {
            for r in records {
                loop {
                    match p.push(1, 0, r) {
                        Ok(()) => break,
                        Err(PushError::Full) => thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        let mut buf = Vec::new();
        let mut got = 0;
        while got < 3 {
            match c.pop_into(&mut buf).unwrap() {
                Some(_) => {
                    assert_eq!(buf.as_slice(), records[got]);
                    got += 1;
                }
                None => thread::yield_now(),
            }
        }
        t.join().unwrap();
    });
}

/// The consumer sleeps on the doorbell (no timeout) until a record is there; the producer pushes
/// one record and notifies. Allowed outcome: the consumer always gets the record. A lost wake-up
/// would leave the consumer asleep forever, which loom reports as a deadlock.
#[test]
fn loom_doorbell_never_loses_a_wakeup() {
    loom::model(|| {
        let mem = HeapRing::new(64);
        let mut p = Producer::new(mem.clone()).unwrap();
        let c = Arc::new(loom::sync::Mutex::new(Consumer::new(mem).unwrap()));
        let bell = Arc::new(Doorbell::new());
        let b2 = bell.clone();
        let t = thread::spawn(move || {
            p.push(1, 0, b"x").unwrap();
            b2.notify();
        });
        let mut buf = Vec::new();
        loop {
            if let Some(_) = c.lock().unwrap().pop_into(&mut buf).unwrap() {
                break;
            }
            bell.sleep_until(|| c.lock().unwrap().has_data(), None);
        }
        assert_eq!(buf, b"x");
        t.join().unwrap();
    });
}

/// Two sleepers on one doorbell, each waiting for its own flag; one notifier sets both and
/// rings once. Allowed outcome: both sleepers wake.
#[test]
fn loom_doorbell_wakes_every_sleeper() {
    use loom::sync::atomic::{AtomicBool, Ordering};
    loom::model(|| {
        let bell = Arc::new(Doorbell::new());
        let flags = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let sleepers: Vec<_> = (0..2)
            .map(|i| {
                let (b, f) = (bell.clone(), flags.clone());
                thread::spawn(
                    move || while !b.sleep_until(|| f[i].load(Ordering::Acquire), None) {},
                )
            })
            .collect();
        flags[0].store(true, Ordering::Release);
        flags[1].store(true, Ordering::Release);
        bell.notify();
        for s in sleepers {
            s.join().unwrap();
        }
    });
}
