//! Loom models of the context store. Run with
//! `RUSTFLAGS="--cfg knit_loom" cargo test --release --lib loom`.

use super::*;
use loom::sync::Arc;
use loom::thread;

fn store() -> Arc<Store<HeapStore>> {
    Arc::new(Store::new(HeapStore::new(16, 64)).unwrap())
}

/// A writer commits two versions while a reader reads. Allowed outcomes: the reader sees
/// version 0 (empty), 1 with [1; 16] or 2 with [2; 16] — never a mix of the two buffers' bytes,
/// never a version paired with the other version's data.
#[test]
fn loom_snapshot_reads_are_never_torn() {
    loom::model(|| {
        let s = store();
        let w = s.clone();
        let t = thread::spawn(move || {
            w.lock(1, || false)
                .unwrap()
                .commit(&[1; 16], 1, None)
                .unwrap();
            w.lock(1, || false)
                .unwrap()
                .commit(&[2; 16], 1, None)
                .unwrap();
        });
        let mut out = Vec::new();
        if let Ok(info) = s.read(&mut out) {
            match info.version {
                0 => assert!(out.is_empty()),
                v => assert_eq!(out, vec![v as u8; 16]),
            }
        }
        t.join().unwrap();
    });
}

/// Two writers race for the lock; each reads the current value and writes it plus one.
/// Allowed outcome: version 2 and value 2 — no lost update.
#[test]
fn loom_writers_serialise_through_the_lock() {
    loom::model(|| {
        let s = store();
        let ts: Vec<_> = (1..=2u64)
            .map(|tok| {
                let s = s.clone();
                thread::spawn(move || {
                    let g = s.lock(tok, || false).unwrap();
                    let mut cur = Vec::new();
                    g.read(&mut cur).unwrap();
                    let n = cur.first().copied().unwrap_or(0);
                    g.commit(&[n + 1], 1, None).unwrap();
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(s.read(&mut out).unwrap().version, 2);
        assert_eq!(out, vec![2]);
    });
}

/// A follower reads the log while a writer appends two records. Allowed outcomes: records
/// arrive in version order with their payloads, or the follower reports a gap; it never
/// returns a record whose payload belongs to another version.
#[test]
fn loom_followers_see_records_in_order() {
    loom::model(|| {
        let s = store();
        let mut f = s.follower();
        let w = s.clone();
        let t = thread::spawn(move || {
            w.lock(1, || false)
                .unwrap()
                .commit(&[1], 1, Some(&[1; 8]))
                .unwrap();
            w.lock(1, || false)
                .unwrap()
                .commit(&[2], 1, Some(&[2; 8]))
                .unwrap();
        });
        let mut out = Vec::new();
        let mut seen = 0;
        for _ in 0..3 {
            match f.next(&s, &mut out).unwrap() {
                Some(LogEvent::Record { version, .. }) => {
                    assert_eq!(version, seen + 1);
                    assert_eq!(out, vec![version as u8; 8]);
                    seen = version;
                }
                Some(LogEvent::Gap) => break,
                None => thread::yield_now(),
            }
        }
        t.join().unwrap();
    });
}
