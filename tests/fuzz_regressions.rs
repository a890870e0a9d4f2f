//! Every input the fuzzers were seeded with (`fuzz/seeds/<target>/`) and every input that ever
//! crashed or hung one (`tests/fuzz_regressions/<target>/`, copied there by `scripts/fuzz.sh`),
//! replayed through the same entry points (`knit::fuzzing`) under a plain `cargo test`: CI runs
//! no fuzzer, but keeps every crash found fixed.
//!
//! The seeds are written by `cargo test --release --test fuzz_regressions -- --ignored
//! write_seeds` (valid frames, values, ring and store images made by knit itself, and the
//! client messages of the GW3 transcripts in `tests/fixtures/gw3/`).

use knit::fuzzing;
use std::path::{Path, PathBuf};
use std::time::Duration;

const TARGETS: [&str; 5] = [
    "frame_decode",
    "value_decode",
    "gw3_json",
    "ring_reader",
    "context_follower",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The saved inputs of `target`: its seeds and its regressions.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [
        root().join("fuzz/seeds").join(target),
        root().join("tests/fuzz_regressions").join(target),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    out.push(e.path());
                }
            }
        }
    }
    out.sort();
    out
}

/// Runs `target`'s entry point on `data`; what it returns is a typed result (checked by the
/// types below), what it asserts must hold.
fn run(target: &str, data: &[u8]) -> String {
    match target {
        "frame_decode" => {
            let r: Result<usize, knit::wire::frame::FrameError> = fuzzing::frame_decode(data);
            format!("{r:?}")
        }
        "value_decode" => {
            let r: Result<knit::Value, knit::wire::codec::DecodeError> =
                fuzzing::value_decode(data);
            format!("{:?}", r.map(|_| ()))
        }
        "gw3_json" => {
            let r: Result<fuzzing::Gw3Message, fuzzing::Gw3Rejected> = fuzzing::gw3_json(data);
            format!("{r:?}")
        }
        "ring_reader" => {
            let r: Result<usize, knit::ring::RingError> = fuzzing::ring_reader(data);
            format!("{r:?}")
        }
        "context_follower" => {
            let r: Result<usize, knit::store::StoreError> = fuzzing::context_follower(data);
            format!("{r:?}")
        }
        other => panic!("unknown target {other}"),
    }
}

/// Replays every saved input of `target` on another thread, so that a hang fails the test
/// (after `limit`) instead of hanging CI. A panic names the input.
fn replay(target: &'static str, limit: Duration) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no seeds for {target}: run the ignored test write_seeds"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for f in &files {
            let data = std::fs::read(f).expect("reading a saved input");
            let r = std::panic::catch_unwind(|| run(target, &data));
            if r.is_err() {
                let _ = tx.send(Err(f.display().to_string()));
                return;
            }
        }
        let _ = tx.send(Ok(files.len()));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(n)) => eprintln!("{target}: {n} inputs replayed"),
        Ok(Err(file)) => panic!("{target} panics on {file}"),
        Err(_) => panic!("{target} did not finish its saved inputs in {limit:?}: a hang"),
    }
}

#[test]
fn frame_decode_inputs_replay() {
    replay("frame_decode", Duration::from_secs(120));
}

#[test]
fn value_decode_inputs_replay() {
    replay("value_decode", Duration::from_secs(120));
}

#[test]
fn gw3_json_inputs_replay() {
    replay("gw3_json", Duration::from_secs(120));
}

#[test]
fn ring_reader_inputs_replay() {
    replay("ring_reader", Duration::from_secs(120));
}

#[test]
fn context_follower_inputs_replay() {
    replay("context_follower", Duration::from_secs(120));
}

/// The seeds are what they claim: valid input is accepted (so the fuzzers start from inputs
/// that reach deep into each decoder).
#[test]
fn seeds_are_accepted_by_their_targets() {
    for target in TARGETS {
        let dir = root().join("fuzz/seeds").join(target);
        let mut accepted = 0;
        let mut total = 0;
        for f in inputs(target).iter().filter(|f| f.starts_with(&dir)) {
            total += 1;
            let data = std::fs::read(f).unwrap();
            let ok = match target {
                "frame_decode" => fuzzing::frame_decode(&data).is_ok_and(|n| n > 0),
                "value_decode" => fuzzing::value_decode(&data).is_ok(),
                "gw3_json" => fuzzing::gw3_json(&data).is_ok(),
                "ring_reader" => fuzzing::ring_reader(&data).is_ok_and(|n| n > 0),
                _ => fuzzing::context_follower(&data).is_ok_and(|n| n > 0),
            };
            accepted += ok as usize;
        }
        assert!(total > 0, "no seeds for {target}");
        assert_eq!(accepted, total, "{target}: seeds that are not valid input");
    }
}

// ----- seeds ------------------------------------------------------------------------------------

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = root().join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn sample_values() -> Vec<knit::Value> {
    use knit::Value;
    let j = |s: &str| Value::from_json_str(s).unwrap();
    vec![
        Value::Null,
        j(r#"{"a":1,"b":[true,false,null],"c":{"d":"héllo"}}"#),
        j(r#"[-1, 18446744073709551615, 1.5, -9223372036854775808]"#),
        Value::Bytes(vec![0, 1, 2, 255]),
        j(r#"{"nested":[[[[{"x":[1,{"y":{}}]}]]]]}"#),
        j(r#""just a string""#),
        j(r#"{"set":{"k":"v"}}"#),
        j(r#"{"update":{"k":null,"j":2}}"#),
        j(r#"{"paths":[["a.b",1],["c",null]]}"#),
    ]
}

fn frame_seeds() {
    use knit::wire::frame::*;
    use knit::Value;
    let def = MethodDef {
        description: Some("adds".into()),
        flags: Value::object([("meta", Value::from(1))]),
        ..MethodDef::new("Sum")
    };
    let to: Vec<(ToGateway, usize)> = vec![
        (
            ToGateway::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                application: "app".into(),
                instance: Some("i-1".into()),
                api: "knit".into(),
                transport: Transport::Shm,
            }),
            0,
        ),
        (
            ToGateway::Register {
                req: 1,
                methods: vec![MethodSpec { id: 3, def }],
            },
            0,
        ),
        (
            ToGateway::OpenLane {
                req: 2,
                peer: PeerId(5),
            },
            0,
        ),
        (
            ToGateway::LaneFault {
                peer: PeerId(5),
                reason: "ring corrupt".into(),
            },
            0,
        ),
        (
            ToGateway::Call {
                call: 9,
                peer: PeerId(2),
                method_id: 3,
                args: sample_values()[1].clone(),
                timeout_ms: 1000,
            },
            0,
        ),
        (
            ToGateway::BusPublish {
                topic: "t".into(),
                routing_key: Some("k".into()),
                target: Value::Null,
                data: sample_values()[4].clone(),
            },
            0,
        ),
        (
            ToGateway::Record {
                to: PeerId(3),
                kind: 4,
                body: vec![1, 2, 3],
            },
            0,
        ),
    ];
    let from: Vec<(FromGateway, usize)> = vec![
        (
            FromGateway::LaneOpened {
                req: 2,
                peer: PeerId(5),
                lane: 1,
                side: 0,
                peer_doorbell: 3,
            },
            1,
        ),
        (
            FromGateway::PeerRemoved {
                peer: PeerId(5),
                reason: "peer has left".into(),
            },
            0,
        ),
        (
            FromGateway::CallResult {
                call: 9,
                outcome: RelayOutcome::Err {
                    status: knit::Status::MethodFailed,
                    message: "boom".into(),
                    context: Value::object([("x", Value::from(1))]),
                },
            },
            0,
        ),
        (
            FromGateway::ContextOpened {
                req: 4,
                id: 1,
                name: "ctx".into(),
                writable: true,
            },
            1,
        ),
    ];
    // Byte 0: descriptors that arrive (low 3 bits) and how reads are cut (the rest).
    let mut all = vec![0x0a];
    for (i, (m, fds)) in to.iter().enumerate() {
        let f = encode_frame(m, *fds).unwrap();
        let mut b = vec![(*fds as u8) | 0x10];
        b.extend_from_slice(&f);
        write("frame_decode", &format!("to_{i}"), &b);
        all.extend_from_slice(&f);
    }
    for (i, (m, fds)) in from.iter().enumerate() {
        let f = encode_frame(m, *fds).unwrap();
        let mut b = vec![(*fds as u8) | 0x08];
        b.extend_from_slice(&f);
        write("frame_decode", &format!("from_{i}"), &b);
    }
    write("frame_decode", "stream_of_to", &all);
}

fn ring_seeds() {
    use knit::ring::heap_memory::HeapRing;
    use knit::ring::{Consumer, Producer};
    use knit::wire::record;
    // Byte 0 picks the capacity: 64 << (b % 7).
    for (name, cap_sel, pops_first, msgs) in [
        ("small", 0u8, 0usize, 3usize),
        ("wrapped", 2, 5, 9),
        ("fragments", 3, 0, 2),
    ] {
        let cap = 64usize << cap_sel;
        let ring = HeapRing::new(cap);
        let mut p = Producer::new(ring.clone()).unwrap();
        let mut c = Consumer::new(ring.clone()).unwrap();
        let mut body = Vec::new();
        let mut buf = Vec::new();
        for i in 0..pops_first {
            p.push(1, 0, &[i as u8; 20]).unwrap();
            c.pop_into(&mut buf).unwrap();
        }
        c.flush();
        for i in 0..msgs {
            record::invoke(&mut body, i as u64, 1, 100, &sample_values()[i % 4]).unwrap();
            if name == "fragments" {
                // One message in three fragments, as `Lane::send` cuts it.
                let n = body.len().div_ceil(3);
                let chunks: Vec<&[u8]> = body.chunks(n).collect();
                for (j, ch) in chunks.iter().enumerate() {
                    let more = if j + 1 < chunks.len() { 1 } else { 0 };
                    let cont = if j > 0 { 2 } else { 0 };
                    p.push(record::KIND_INVOKE, more | cont, ch).unwrap();
                }
            } else if p.push(record::KIND_INVOKE, 0, &body).is_err() {
                break;
            }
        }
        let (head, tail) = ring.ctl_for_test().positions_for_test();
        let mut b = vec![cap_sel];
        b.extend_from_slice(&head.to_le_bytes());
        b.extend_from_slice(&tail.to_le_bytes());
        b.extend_from_slice(&ring.image_for_test());
        // Script: read two records, then let the peer push one.
        b.extend_from_slice(&[0, 0, 1, 2, 0, 0, 4, b'a', b'b', b'c', b'd']);
        write("ring_reader", name, &b);
    }
}

fn store_seeds() {
    use knit::model::context::ContextOp;
    use knit::store::{HeapStore, Store};
    use knit::Value;
    // Byte 0: snapshot = 8 * (1 + (b & 0x1f)) bytes, log = 64 << ((b >> 5) % 4) words.
    for (name, sizes, writes) in [("few", 0x1fu8, 3usize), ("lapped", 0x3f, 40)] {
        let snapshot = 8 * (1 + (sizes & 0x1f) as usize);
        let log_words = 64usize << ((sizes >> 5) % 4);
        let heap = HeapStore::new(snapshot, log_words);
        let store = Store::new(heap.clone()).unwrap();
        let mut follow_from = 0u64;
        for i in 0..writes {
            let op = match i % 3 {
                0 => ContextOp::Update([("k".to_string(), Value::from(i))].into_iter().collect()),
                1 => ContextOp::Paths(vec![("a.b".into(), Value::from("x"))]),
                _ => ContextOp::Set([("s".to_string(), Value::from(true))].into_iter().collect()),
            };
            knit::store::context::write(
                &store,
                1 + i as u64,
                &op,
                None,
                snapshot,
                Duration::from_secs(1),
                None,
            )
            .unwrap();
            if i + 3 == writes {
                follow_from = heap.image_for_test()[2];
            }
        }
        let mut b = vec![sizes];
        for w in heap.image_for_test() {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&follow_from.to_le_bytes());
        b.extend_from_slice(&[0, 1]);
        write("context_follower", name, &b);
    }
}

fn gw3_seeds() {
    let mut seen = std::collections::BTreeSet::new();
    let dir = root().join("tests/fixtures/gw3");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let Ok(rec) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if rec.get("dir").and_then(|d| d.as_str()) != Some("c2g") {
                continue;
            }
            let Some(msg) = rec.get("msg").filter(|m| m.is_object()) else {
                continue;
            };
            let ty = msg.get("type").and_then(|t| t.as_str()).unwrap_or("");
            // One seed per message shape (domain, type, keys).
            let mut keys: Vec<&String> = msg.as_object().unwrap().keys().collect();
            keys.sort();
            let shape = format!("{:?}{ty}{keys:?}", msg.get("domain"));
            if seen.insert(shape) {
                let stem = Path::new(&f).file_stem().unwrap().to_string_lossy();
                let name = format!("{stem}_{:03}_{ty}", seen.len());
                write("gw3_json", &name, msg.to_string().as_bytes());
            }
        }
    }
}

/// Writes the seed corpora (`fuzz/seeds/<target>/`). Ignored: run it when the formats change.
#[test]
#[ignore]
fn write_seeds() {
    let _ = std::fs::remove_dir_all(root().join("fuzz/seeds"));
    frame_seeds();
    for (i, v) in sample_values().iter().enumerate() {
        write(
            "value_decode",
            &format!("value_{i}"),
            &knit::wire::codec::encode(v).unwrap(),
        );
    }
    ring_seeds();
    store_seeds();
    gw3_seeds();
}
