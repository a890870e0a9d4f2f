use super::*;

fn store() -> Store<HeapStore> {
    Store::new(HeapStore::new(256, 64)).unwrap()
}

#[test]
fn empty_store_reads_version_zero() {
    let s = store();
    let mut out = vec![1, 2, 3];
    assert_eq!(
        s.read(&mut out).unwrap(),
        SnapshotInfo {
            version: 0,
            updater: 0
        }
    );
    assert!(out.is_empty());
}

#[test]
fn commits_are_versioned_and_readable() {
    let s = store();
    let mut out = Vec::new();
    for i in 1..=5u64 {
        let g = s.lock(7, || false).unwrap();
        assert_eq!(g.version(), i - 1);
        let body = vec![i as u8; (i * 3) as usize];
        assert_eq!(g.commit(&body, 1, Some(b"delta")).unwrap(), i);
        drop(g);
        assert_eq!(
            s.read(&mut out).unwrap(),
            SnapshotInfo {
                version: i,
                updater: 7
            }
        );
        assert_eq!(out, body);
    }
}

#[test]
fn a_second_writer_waits_for_the_lock_and_can_give_up() {
    let s = store();
    let g = s.lock(1, || false).unwrap();
    assert_eq!(s.ctl().lock_holder(), 1);
    assert_eq!(s.lock(2, || true).unwrap_err(), StoreError::Busy);
    drop(g);
    assert_eq!(s.ctl().lock_holder(), 0);
    assert!(s.lock(2, || true).is_ok());
}

#[test]
fn a_dead_writers_lock_can_be_broken() {
    let s = store();
    let g = s.lock(9, || false).unwrap();
    std::mem::forget(g); // the writer "died" holding the lock
    assert!(!s.ctl().break_lock(8));
    assert!(s.ctl().break_lock(9));
    assert!(s.lock(3, || true).is_ok());
}

#[test]
fn a_writer_that_dies_before_commit_changes_nothing() {
    let s = store();
    s.lock(1, || false)
        .unwrap()
        .commit(b"one", 1, Some(b"d1"))
        .unwrap();
    let mut f = s.follower();
    f.resync(1);
    // Half a commit: the free buffer's sequence goes odd and stays so.
    let ctl = s.ctl();
    ctl.seq[0]
        .seq
        .store(ctl.seq[0].seq.load(Ordering::SeqCst) | 1, Ordering::SeqCst);
    let mut out = Vec::new();
    assert_eq!(s.read(&mut out).unwrap().version, 1);
    assert_eq!(out, b"one");
    assert_eq!(f.next(&s, &mut out).unwrap(), None);
    // The next writer completes normally over the odd sequence.
    s.lock(2, || false)
        .unwrap()
        .commit(b"two", 1, Some(b"d2"))
        .unwrap();
    assert_eq!(s.read(&mut out).unwrap().version, 2);
    assert_eq!(out, b"two");
}

#[test]
fn too_large_snapshots_are_refused() {
    let s = store();
    let g = s.lock(1, || false).unwrap();
    assert_eq!(
        g.commit(&[0; 257], 1, None),
        Err(StoreError::TooLarge {
            size: 257,
            max: 256
        })
    );
    assert_eq!(g.version(), 0);
}

#[test]
fn followers_see_every_record_in_order_across_wraps() {
    let s = store();
    let mut f = s.follower();
    let mut out = Vec::new();
    for i in 1..=200u64 {
        let payload = vec![i as u8; (i % 20) as usize];
        s.lock(5, || false)
            .unwrap()
            .commit(&[1], 3, Some(&payload))
            .unwrap();
        match f.next(&s, &mut out).unwrap() {
            Some(LogEvent::Record {
                kind: 3,
                version,
                updater: 5,
                payload_logged: true,
            }) => assert_eq!(version, i),
            other => panic!("{i}: {other:?}"),
        }
        assert_eq!(out, payload);
        assert_eq!(f.next(&s, &mut out).unwrap(), None);
    }
}

#[test]
fn a_lapped_follower_is_told_to_resync() {
    let s = store();
    let mut f = s.follower();
    let mut out = Vec::new();
    for _ in 0..40 {
        s.lock(5, || false)
            .unwrap()
            .commit(&[1], 3, Some(&[7; 16]))
            .unwrap();
    }
    assert_eq!(f.next(&s, &mut out).unwrap(), Some(LogEvent::Gap));
    let v = s.read(&mut out).unwrap().version;
    f.resync(v);
    assert_eq!(f.next(&s, &mut out).unwrap(), None);
    s.lock(5, || false)
        .unwrap()
        .commit(&[2], 3, Some(b"x"))
        .unwrap();
    assert!(
        matches!(f.next(&s, &mut out).unwrap(), Some(LogEvent::Record { version, .. }) if version == v + 1)
    );
}

#[test]
fn a_missing_record_is_a_gap() {
    let s = store();
    let mut f = s.follower();
    let mut out = Vec::new();
    s.lock(5, || false)
        .unwrap()
        .commit(&[1], 3, Some(b"a"))
        .unwrap();
    f.next(&s, &mut out).unwrap().unwrap();
    // A writer that died between publishing the version and the log tail.
    let ctl = s.ctl();
    ctl.version.store(2, Ordering::SeqCst);
    s.lock(5, || false)
        .unwrap()
        .commit(&[3], 3, Some(b"c"))
        .unwrap();
    assert_eq!(f.next(&s, &mut out).unwrap(), Some(LogEvent::Gap));
}

#[test]
fn oversized_deltas_are_logged_without_payload() {
    let s = store();
    let mut f = s.follower();
    let mut out = Vec::new();
    let big = vec![1u8; s.max_log_payload() + 1];
    s.lock(5, || false)
        .unwrap()
        .commit(&[1], 3, Some(&big))
        .unwrap();
    assert_eq!(
        f.next(&s, &mut out).unwrap(),
        Some(LogEvent::Record {
            kind: 3,
            version: 1,
            updater: 5,
            payload_logged: false
        })
    );
}

#[test]
fn corrupt_state_is_reported_not_trusted() {
    let s = store();
    s.lock(5, || false)
        .unwrap()
        .commit(b"abc", 3, Some(b"x"))
        .unwrap();
    // A snapshot claiming to be larger than its buffer.
    s.mem.buffer(1)[2].store(1 << 40, Ordering::SeqCst);
    let mut out = Vec::new();
    assert!(matches!(s.read(&mut out), Err(StoreError::Corrupt(_))));
    // A log record claiming a huge length.
    let mut f = Follower {
        pos: 0,
        next_version: 0,
    };
    s.mem.log()[0].store(pack_header(u32::MAX, 3, 0), Ordering::SeqCst);
    assert!(matches!(f.next(&s, &mut out), Err(StoreError::Corrupt(_))));
    // ... reported once: the follower moved past it (before, it stayed put and every call
    // returned the same error, so a pumping thread spun on it forever).
    assert!(!f.has_more(&s));
    assert_eq!(f.next(&s, &mut out), Ok(None));
    // Corrupt padding likewise.
    let mut f = Follower {
        pos: 0,
        next_version: 0,
    };
    s.mem.log()[0].store(pack_header(8, LOG_PAD, 0), Ordering::SeqCst);
    assert!(matches!(f.next(&s, &mut out), Err(StoreError::Corrupt(_))));
    assert_eq!(f.next(&s, &mut out), Ok(None));
    // Garbage everywhere never panics.
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..500 {
        for w in s
            .mem
            .log()
            .iter()
            .chain(s.mem.buffer(0))
            .chain(s.mem.buffer(1))
        {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.store(x, Ordering::Relaxed);
        }
        s.ctl().version.store(x % 5, Ordering::Relaxed);
        s.ctl().log_tail.store(x % 200, Ordering::Relaxed);
        let _ = s.read(&mut out);
        let mut f = Follower {
            pos: x % 97,
            next_version: x % 3,
        };
        // Whatever the log holds, following it ends (a log of 64 words has at most 64
        // records, paddings and errors before the follower is at the tail).
        let mut steps = 0;
        while f.next(&s, &mut out) != Ok(None) {
            steps += 1;
            assert!(steps <= 64, "the follower does not make progress");
        }
        // And a writer can still commit over any of it.
        if let Ok(g) = s.lock(9, || true) {
            let _ = g.commit(b"fresh", 1, Some(b"d"));
        }
        s.ctl().lock.store(0, Ordering::Relaxed);
    }
}

#[test]
fn readers_in_threads_never_see_torn_snapshots() {
    let s = std::sync::Arc::new(store());
    let w = s.clone();
    let writer = std::thread::spawn(move || {
        for i in 1..=20_000u64 {
            let len = 8 + (i % 200) as usize;
            let body = vec![(i % 251) as u8; len];
            w.lock(1, || false)
                .unwrap()
                .commit(&body, 1, Some(&body[..8]))
                .unwrap();
        }
    });
    let mut out = Vec::new();
    let mut last = 0;
    while last < 20_000 {
        let info = s.read(&mut out).unwrap();
        assert!(info.version >= last, "versions went back");
        last = info.version;
        if info.version > 0 {
            assert_eq!(out.len(), 8 + (info.version % 200) as usize);
            assert!(
                out.iter().all(|&b| b == (info.version % 251) as u8),
                "torn snapshot at {}",
                info.version
            );
        }
    }
    writer.join().unwrap();
}

#[test]
fn a_writer_that_died_before_logging_is_announced_by_reannounce() {
    let s = store();
    let mut out = Vec::new();
    let g = s.lock(7, || false).unwrap();
    g.commit(b"one", 1, Some(b"d1")).unwrap();
    drop(g);
    let mut f = s.follower();
    f.resync(1);
    // Writer 9 publishes version 2 and dies before its log tail moves.
    let tail = s.ctl().log_tail.load(Ordering::Relaxed);
    let g = s.lock(9, || false).unwrap();
    g.commit(b"two", 1, Some(b"d2")).unwrap();
    std::mem::forget(g);
    s.ctl().log_tail.store(tail, Ordering::Relaxed);
    assert_eq!(s.read(&mut out).unwrap().version, 2);
    assert_eq!(f.next(&s, &mut out).unwrap(), None, "nothing logged yet");
    // The gateway breaks the lock and logs the current version again.
    assert!(s.ctl().break_lock(9));
    let g = s.lock(u64::MAX, || true).unwrap();
    assert_eq!(g.reannounce(1), 2);
    drop(g);
    assert_eq!(
        f.next(&s, &mut out).unwrap(),
        Some(LogEvent::Record {
            kind: 1,
            version: 2,
            updater: 9,
            payload_logged: false
        })
    );
    // A follower that already had version 2 skips it.
    let mut g2 = s.follower();
    g2.resync(2);
    let g = s.lock(u64::MAX, || true).unwrap();
    g.reannounce(1);
    drop(g);
    assert_eq!(g2.next(&s, &mut out).unwrap(), None);
    // The next real write follows on.
    let g = s.lock(3, || true).unwrap();
    assert_eq!(g.commit(b"three", 1, Some(b"d3")).unwrap(), 3);
    drop(g);
    assert!(matches!(
        f.next(&s, &mut out).unwrap(),
        Some(LogEvent::Record { version: 3, .. })
    ));
}

#[test]
fn reannounce_of_a_never_written_store_logs_nothing() {
    let s = store();
    let g = s.lock(u64::MAX, || true).unwrap();
    assert_eq!(g.reannounce(1), 0);
    drop(g);
    assert_eq!(s.ctl().log_tail.load(Ordering::Relaxed), 0);
}

#[test]
fn a_retired_store_refuses_writes_and_frees_the_lock() {
    use crate::model::context::ContextOp;
    let s = store();
    let op = |n: i64| {
        let mut m = crate::wire::Map::new();
        m.insert("n".into(), crate::wire::Value::from(n));
        ContextOp::Set(m)
    };
    let write = |n| context::write(&s, 7, &op(n), None, 256, std::time::Duration::ZERO, None);
    assert_eq!(write(1).unwrap().0, 1);
    assert!(!s.ctl().is_retired());
    s.ctl().retire();
    assert!(s.ctl().is_retired());
    assert!(matches!(write(2), Err(context::WriteError::Retired)));
    // Nothing was written, and the lock is free again.
    assert_eq!(s.ctl().version(), 1);
    assert_eq!(s.ctl().lock_holder(), 0);
}
