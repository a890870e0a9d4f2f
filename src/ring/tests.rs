use super::heap_memory::HeapRing;
use super::*;

fn pair(cap: usize) -> (Producer<HeapRing>, Consumer<HeapRing>, HeapRing) {
    let mem = HeapRing::new(cap);
    (
        Producer::new(mem.clone()).unwrap(),
        Consumer::new(mem.clone()).unwrap(),
        mem,
    )
}

#[test]
fn empty_ring_pops_nothing() {
    let (_p, mut c, _) = pair(64);
    let mut buf = Vec::new();
    assert_eq!(c.pop_into(&mut buf).unwrap(), None);
    assert!(!c.has_data());
}

#[test]
fn records_come_out_in_order_with_their_headers() {
    let (mut p, mut c, _) = pair(256);
    p.push(1, 7, b"hello").unwrap();
    p.push(2, 0, b"").unwrap();
    p.push(3, 1, &[9u8; 20]).unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        c.pop_into(&mut buf).unwrap(),
        Some(RecordHeader {
            len: 5,
            kind: 1,
            flags: 7
        })
    );
    assert_eq!(buf, b"hello");
    assert_eq!(
        c.pop_into(&mut buf).unwrap(),
        Some(RecordHeader {
            len: 0,
            kind: 2,
            flags: 0
        })
    );
    assert!(buf.is_empty());
    assert_eq!(
        c.pop_into(&mut buf).unwrap(),
        Some(RecordHeader {
            len: 20,
            kind: 3,
            flags: 1
        })
    );
    assert_eq!(buf, [9u8; 20]);
    assert_eq!(c.pop_into(&mut buf).unwrap(), None);
}

#[test]
fn claim_is_invisible_until_commit() {
    let (mut p, mut c, _) = pair(64);
    let mut buf = Vec::new();
    {
        let mut claim = p.claim(1, 0, 4).unwrap();
        claim.write_at(0, b"abcd");
        assert!(!c.has_data());
        assert_eq!(c.pop_into(&mut buf).unwrap(), None);
        claim.commit();
    }
    assert_eq!(c.pop_into(&mut buf).unwrap().map(|h| h.len), Some(4));
    assert_eq!(buf, b"abcd");
}

#[test]
fn dropped_claim_is_abandoned() {
    let (mut p, mut c, _) = pair(64);
    let abandoned = p.claim(1, 0, 8).unwrap();
    let _ = abandoned;
    let mut buf = Vec::new();
    assert_eq!(c.pop_into(&mut buf).unwrap(), None);
    p.push(2, 0, b"x").unwrap();
    assert_eq!(c.pop_into(&mut buf).unwrap().map(|h| h.kind), Some(2));
}

#[test]
fn full_ring_refuses_then_accepts_after_consumption() {
    let (mut p, mut c, _) = pair(64);
    // 24-byte payload -> 32-byte record: two fill the ring.
    p.push(1, 0, &[1; 24]).unwrap();
    p.push(1, 0, &[2; 24]).unwrap();
    assert_eq!(p.push(1, 0, &[3; 24]), Err(PushError::Full));
    assert_eq!(p.push(1, 0, &[]), Err(PushError::Full));
    let mut buf = Vec::new();
    c.pop_into(&mut buf).unwrap().unwrap();
    assert_eq!(buf, [1; 24]);
    p.push(1, 0, &[3; 24]).unwrap();
    c.pop_into(&mut buf).unwrap().unwrap();
    assert_eq!(buf, [2; 24]);
    c.pop_into(&mut buf).unwrap().unwrap();
    assert_eq!(buf, [3; 24]);
}

#[test]
fn record_larger_than_half_the_ring_is_too_large() {
    let (mut p, _, _) = pair(64);
    assert_eq!(max_payload(64), 24);
    assert_eq!(
        p.push(1, 0, &[0; 25]),
        Err(PushError::TooLarge { len: 25, max: 24 })
    );
    assert!(p.push(1, 0, &[0; 24]).is_ok());
}

#[test]
fn pad_kind_is_reserved() {
    let (mut p, _, _) = pair(64);
    assert_eq!(p.push(PAD, 0, b""), Err(PushError::ReservedKind(PAD)));
}

#[test]
fn wrap_inserts_padding_and_keeps_records_whole() {
    let (mut p, mut c, _) = pair(64);
    let mut buf = Vec::new();
    // Advance to position 40: a 32-byte record then an 8-byte one.
    p.push(1, 0, &[1; 24]).unwrap();
    p.push(2, 0, &[]).unwrap();
    c.pop_into(&mut buf).unwrap().unwrap();
    c.pop_into(&mut buf).unwrap().unwrap();
    // 24 bytes remain before the end; a 32-byte record must wrap behind a 24-byte pad.
    p.push(3, 0, &[7; 20]).unwrap();
    assert_eq!(
        c.pop_into(&mut buf).unwrap(),
        Some(RecordHeader {
            len: 20,
            kind: 3,
            flags: 0
        })
    );
    assert_eq!(buf, [7; 20]);
    assert_eq!(c.pop_into(&mut buf).unwrap(), None);
}

#[test]
fn many_wraps_preserve_every_byte() {
    let (mut p, mut c, _) = pair(128);
    let mut buf = Vec::new();
    for i in 0..10_000u32 {
        let len = (i as usize * 7) % (max_payload(128) + 1);
        let payload: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
        p.push(1 + (i % 100) as u16, i as u16, &payload).unwrap();
        let h = c.pop_into(&mut buf).unwrap().unwrap();
        assert_eq!(h.len as usize, len);
        assert_eq!(h.kind, 1 + (i % 100) as u16);
        assert_eq!(buf, payload);
    }
}

#[test]
fn corrupt_tail_is_an_error_not_a_panic() {
    let (_p, mut c, mem) = pair(64);
    let mut buf = Vec::new();
    mem.ctl_for_test().set_for_test(0, 1000);
    assert!(c.pop_into(&mut buf).is_err());
    mem.ctl_for_test().set_for_test(0, 12);
    let mut c2 = Consumer::new(mem.clone()).unwrap();
    assert!(c2.pop_into(&mut buf).is_err());
}

#[test]
fn a_corrupt_tail_stays_an_error_until_the_producer_is_sane_again() {
    let (mut p, mut c, mem) = pair(64);
    p.push(1, 0, &[1; 24]).unwrap();
    mem.ctl_for_test().set_for_test(0, 1 << 40);
    let mut buf = Vec::new();
    for _ in 0..3 {
        assert!(c.pop_into(&mut buf).is_err());
    }
    mem.ctl_for_test().set_for_test(0, 32);
    c.pop_into(&mut buf).unwrap().unwrap();
    assert_eq!(buf, [1; 24]);
    assert_eq!(c.pop_into(&mut buf).unwrap(), None);
}

#[test]
fn corrupt_record_length_is_an_error() {
    let (mut p, mut c, mem) = pair(64);
    p.push(1, 0, b"abc").unwrap();
    // Claim the record is 1000 bytes long.
    mem.scribble_for_test(0, &1000u32.to_le_bytes());
    let mut buf = Vec::new();
    assert!(c.pop_into(&mut buf).is_err());
}

#[test]
fn padding_that_does_not_reach_the_end_is_an_error() {
    let (mut p, mut c, mem) = pair(64);
    p.push(1, 0, b"abc").unwrap();
    mem.scribble_for_test(
        0,
        &RecordHeader {
            len: 0,
            kind: PAD,
            flags: 0,
        }
        .encode(),
    );
    let mut buf = Vec::new();
    assert!(c.pop_into(&mut buf).is_err());
}

#[test]
fn corrupt_head_is_reported_to_the_producer() {
    let (mut p, _c, mem) = pair(64);
    p.push(1, 0, &[0; 24]).unwrap();
    p.push(1, 0, &[0; 24]).unwrap();
    // The consumer claims to be ahead of the producer.
    mem.ctl_for_test().set_for_test(5000, 64);
    assert!(matches!(p.push(1, 0, &[0; 8]), Err(PushError::Corrupt(_))));
}

#[test]
fn a_producer_does_not_attach_to_a_misaligned_consumer_position() {
    let mem = HeapRing::new(64);
    mem.ctl_for_test().set_for_test(4, 16);
    assert!(Producer::new(mem.clone()).is_err());
    mem.ctl_for_test().set_for_test(8, 16);
    assert!(Producer::new(mem).is_ok());
}

#[test]
fn a_corrupt_head_once_seen_never_lets_the_producer_overwrite_unread_records() {
    // Found by the ring_reader fuzzer: the producer kept the impossible position it had read
    // and refused; the next claim then took the ring for empty (and overflowed in debug).
    let (mut p, mut c, mem) = pair(64);
    p.push(1, 0, &[1; 24]).unwrap();
    p.push(1, 0, &[2; 24]).unwrap();
    mem.ctl_for_test().set_for_test(5000, 64);
    for _ in 0..3 {
        assert!(matches!(p.push(1, 0, &[9; 24]), Err(PushError::Corrupt(_))));
    }
    assert!(matches!(p.free_bytes(), Err(RingError(_))));
    // The consumer's real position back: the ring is full, then drains as it was written.
    mem.ctl_for_test().set_for_test(0, 64);
    assert_eq!(p.push(1, 0, &[9; 24]), Err(PushError::Full));
    let mut buf = Vec::new();
    c.pop_into(&mut buf).unwrap().unwrap();
    assert_eq!(buf, [1; 24]);
    c.pop_into(&mut buf).unwrap().unwrap();
    assert_eq!(buf, [2; 24]);
    assert_eq!(c.pop_into(&mut buf).unwrap(), None);
}

#[test]
fn arbitrary_garbage_never_panics() {
    // A deterministic xorshift stream of garbage headers and positions.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = Vec::new();
    for _ in 0..2000 {
        let mem = HeapRing::new(64);
        let bytes: Vec<u8> = (0..64).map(|_| next() as u8).collect();
        mem.scribble_for_test(0, &bytes);
        let head = next() % 256;
        let tail = head + (next() % 80);
        mem.ctl_for_test().set_for_test(head & !7, tail);
        if let Ok(mut c) = Consumer::new(mem.clone()) {
            for _ in 0..4 {
                match c.pop_into(&mut buf) {
                    Ok(Some(h)) => assert!(h.len as usize <= max_payload(64)),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}

#[test]
fn threads_exchange_a_million_records() {
    let (mut p, mut c, _) = pair(4096);
    let n = 200_000u64;
    let t = std::thread::spawn(move || {
        for i in 0..n {
            let payload = i.to_le_bytes();
            let len = (i % 40) as usize;
            let mut rec = payload.to_vec();
            rec.resize(8 + len, (i & 0xff) as u8);
            loop {
                match p.push(1, 0, &rec) {
                    Ok(()) => break,
                    Err(PushError::Full) => std::hint::spin_loop(),
                    Err(e) => panic!("{e}"),
                }
            }
        }
    });
    let mut buf = Vec::new();
    let mut expect = 0u64;
    while expect < n {
        if let Some(h) = c.pop_into(&mut buf).unwrap() {
            assert_eq!(h.len as u64, 8 + expect % 40);
            assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), expect);
            assert!(buf[8..].iter().all(|&b| b == (expect & 0xff) as u8));
            expect += 1;
        } else {
            std::hint::spin_loop();
        }
    }
    t.join().unwrap();
}

#[test]
fn positions_wrap_around_u64_without_overflow() {
    // A peer may leave the positions anywhere; near the top of u64 they must wrap, not
    // overflow (a panic with debug assertions, as the fuzz targets build).
    let mem = HeapRing::new(64);
    let start = u64::MAX - 15; // 8-aligned, two records before the wrap
    mem.ctl_for_test().set_for_test(start, start);
    let mut p = Producer::new(mem.clone()).unwrap();
    let mut c = Consumer::new(mem).unwrap();
    let mut buf = Vec::new();
    for i in 0..20u8 {
        p.push(1, 0, &[i; 5]).unwrap();
        assert_eq!(c.pop_into(&mut buf).unwrap().unwrap().len, 5);
        assert_eq!(buf, [i; 5]);
    }
    assert_eq!(c.pop_into(&mut buf), Ok(None));
}
