//! Entry points for the fuzz targets (`fuzz/fuzz_targets/`) and for their regression replay
//! (`tests/fuzz_regressions.rs`), which feeds every saved input through the same functions.
//! **Not API**: hidden from the docs, free to change with the fuzz targets.
//!
//! Each function takes bytes a hostile peer fully controls — a control frame, an encoded
//! value, a GW3 text frame, the memory of a ring or of a context segment — and returns the
//! typed result knit gives for them. What must hold whatever the input is asserted here, so a
//! violation is a crash the fuzzer reports: no panic, no out-of-bounds access, no loop that
//! does not end, and the properties named in each function (a decoded value re-encodes to
//! bytes that decode to the same value, a decoded frame re-encodes to the same frame, a ring
//! drains in at most as many steps as it has bytes).

use crate::bridge::{auth, gw3};
use crate::client::lane::Reassembly;
use crate::model::context::{apply_mut, ContextOp};
use crate::ring::heap_memory::HeapRing;
use crate::ring::{Consumer, Producer, RingError, RECORD_ALIGN};
use crate::store::{HeapStore, LogEvent, Store, StoreError};
use crate::wire::codec::{self, DecodeError};
use crate::wire::frame::{
    decode_body, encode_frame, FrameError, FrameReader, FromGateway, ToGateway, FRAME_HEADER,
};
use crate::wire::{record, Map, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as J;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::time::Duration;

/// Takes bytes off the front of the input; runs dry with zeroes.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(std::array::from_fn(|_| self.byte()))
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

// ----- control frames ---------------------------------------------------------------------------

/// A descriptor to attach to frames (`/dev/null`, duplicated per use).
fn some_fd() -> Option<OwnedFd> {
    static NULL: OnceLock<Option<OwnedFd>> = OnceLock::new();
    NULL.get_or_init(|| std::fs::File::open("/dev/null").ok().map(OwnedFd::from))
        .as_ref()
        .and_then(|fd| fd.try_clone().ok())
}

/// A decoded message encodes again, and that encoding decodes to a message that encodes to the
/// same bytes (postcard and the value codec agree on everything the decoder accepts).
fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) {
    let frame = encode_frame(msg, 0).expect("a decoded message encodes again");
    let again: T = decode_body(&frame[FRAME_HEADER..]).expect("a re-encoded message decodes");
    let frame2 = encode_frame(&again, 0).expect("and encodes again");
    assert_eq!(frame, frame2, "encoding is stable");
}

/// Decodes `body` as a message to the gateway and as one from it.
fn check_body(body: &[u8]) -> usize {
    let mut n = 0;
    if let Ok(m) = decode_body::<ToGateway>(body) {
        round_trip(&m);
        n += 1;
    }
    if let Ok(m) = decode_body::<FromGateway>(body) {
        round_trip(&m);
        n += 1;
    }
    n
}

/// The control-frame decoder: the first byte picks how many descriptors arrive (0–7, more than
/// a frame may declare) and how the rest of the input is cut into reads; the rest is the byte
/// stream (8-byte headers: length, descriptor count, reserved; postcard bodies). Every complete
/// frame's body is decoded both ways. The whole input is also tried as one body. Returns the
/// frames read, or the error that ends the stream (a connection would be closed).
pub fn frame_decode(data: &[u8]) -> Result<usize, FrameError> {
    check_body(data);
    let mut input = Input(data);
    let ctl = input.byte();
    let mut reader = FrameReader::default();
    reader.push_fds((0..ctl & 7).filter_map(|_| some_fd()));
    let chunk = 1 + (ctl >> 3) as usize * 3;
    let mut frames = 0;
    while !input.is_empty() {
        reader.push_bytes(input.take(chunk));
        while let Some((body, fds)) = reader.next_frame()? {
            assert!(fds.len() <= crate::sys::fdpass::MAX_FDS);
            assert!(body.len() <= data.len());
            check_body(&body);
            frames += 1;
        }
    }
    Ok(frames)
}

// ----- values ------------------------------------------------------------------------------------

/// The value codec. What decodes re-encodes (to exactly `encoded_len` bytes), and those bytes
/// decode to a value that encodes identically; its JSON form parses back unless it is deeper
/// than JSON parsing takes. Decoding into a used value (the previous input's, and the value
/// itself) gives the same result and the same key order. The same bytes are also read as each
/// lane record body.
pub fn value_decode(data: &[u8]) -> Result<Value, DecodeError> {
    lane_message(data);
    let r = codec::decode(data);
    thread_local! {
        static LAST: std::cell::RefCell<Value> = const { std::cell::RefCell::new(Value::Null) };
    }
    LAST.with(|last| {
        let mut slot = last.take();
        let into = codec::decode_into(data, &mut slot);
        match (&r, &into) {
            (Ok(v), Ok(())) => {
                assert_eq!(
                    slot.to_json_string(),
                    v.to_json_string(),
                    "decode_into agrees"
                );
                let mut again = v.clone();
                codec::decode_into(data, &mut again).expect("decodes into itself");
                assert_eq!(again.to_json_string(), v.to_json_string());
                *last.borrow_mut() = slot;
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "decode_into fails the same way"),
            _ => panic!("decode gave {r:?}, decode_into {into:?}"),
        }
    });
    if let Ok(v) = &r {
        let bytes = codec::encode(v).expect("a decoded value encodes again");
        assert_eq!(bytes.len(), codec::encoded_len(v), "encoded_len is exact");
        // (Re-encoding may grow the input: a small integer sent with the `u64` tag comes back
        // with the `i64` tag, whose zig-zag varint can be a byte longer.)
        let again = codec::decode(&bytes).expect("a re-encoded value decodes");
        assert_eq!(codec::encode(&again).unwrap(), bytes, "encoding is stable");
        let json = v.to_json_string();
        match Value::from_json_str(&json) {
            Ok(back) => {
                codec::encode(&back).expect("a value parsed from JSON encodes");
            }
            // serde_json stops at 127 levels; the codec takes 128.
            Err(e) => assert!(containers_deeper_than(v, 120), "{e}: {json}"),
        }
    }
    r
}

/// Whether `v` has arrays or maps nested more than `n` deep.
fn containers_deeper_than(v: &Value, n: usize) -> bool {
    match v {
        Value::Array(_) | Value::Map(_) if n == 0 => true,
        Value::Array(a) => a.iter().any(|x| containers_deeper_than(x, n - 1)),
        Value::Map(m) => m.values().any(|x| containers_deeper_than(x, n - 1)),
        _ => false,
    }
}

/// Reads `body` as every kind of lane record (`wire::record`, `client::bus`, the stream
/// records' fixed headers), as the client's receiver does. Returns how many kinds parsed.
pub fn lane_message(body: &[u8]) -> usize {
    let mut ok = 0;
    if let Ok(h) = record::parse_invoke(body) {
        let _ = record::decode_payload(h.flags, &body[record::INVOKE_HEADER..]);
        ok += 1;
    }
    if let Ok(h) = record::parse_result(body) {
        let payload = &body[record::RESULT_HEADER..];
        if h.ok {
            let _ = record::decode_payload(h.flags, payload);
        } else {
            let _ = record::decode_error(payload);
        }
        ok += 1;
    }
    if record::parse_cancel(body).is_ok() {
        ok += 1;
    }
    if let Some((topic, key, data)) =
        crate::client::bus::parse(body).and_then(|p| crate::client::bus::decode(&p))
    {
        assert!(topic.len() + key.map_or(0, |k| k.len()) <= body.len());
        let _ = data;
        ok += 1;
    }
    // Stream records: subscription id, then kind-specific words, then a payload.
    if body.len() >= 16 {
        let flags = u32::from_le_bytes([body[12], body[13], body[14], body[15]]);
        let _ = record::decode_payload(flags, &body[16..]);
    }
    if body.len() >= 12 {
        let _ = codec::decode(&body[12..]);
    }
    if body.len() >= 20 {
        let flags = u32::from_le_bytes([body[16], body[17], body[18], body[19]]);
        let _ = record::decode_payload(flags, &body[20..]);
    }
    ok
}

// ----- GW3 ---------------------------------------------------------------------------------------

/// A GW3 message's envelope, as [`gw3_json`] read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gw3Message {
    pub domain: String,
    pub ty: String,
}

/// Why [`gw3_json`] refused a frame: the text the client would be told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Gw3Rejected(pub String);

/// The bridge's GW3 handling without a socket: the envelope of one text frame, then the pure
/// readers the session applies to its fields (method definitions, peer ids, arguments,
/// authentication). A method definition that is accepted is announced to web peers and read
/// back to the same definition; arguments a web client sends can always travel through knit
/// (their value encodes).
pub fn gw3_json(data: &[u8]) -> Result<Gw3Message, Gw3Rejected> {
    // The WebSocket layer refuses text frames that are not UTF-8.
    let text = std::str::from_utf8(data).map_err(|e| Gw3Rejected(e.to_string()))?;
    let fast = gw3::hot(text);
    let env = match gw3::parse_envelope(text) {
        Ok(env) => env,
        Err(e) if fast.is_none() => return Err(Gw3Rejected(e.to_string())),
        Err(e) => panic!("read fast, refused by the general reading: {e}"),
    };
    let msg = &env.msg;
    if let Some(h) = fast {
        // The fast reading of `call` and `yield` gives the session what the general one gives
        // it: the same peer, and the same request to act on.
        assert_eq!((env.domain.as_str(), env.ty.as_str()), ("agm", h.ty));
        assert_eq!(
            h.peer_id.as_ref(),
            msg.get("peer_id").filter(|v| !v.is_null())
        );
        if h.ty == "call" {
            assert_eq!(gw3::CallReq::of_hot(h), gw3::CallReq::of(msg));
        } else {
            assert_eq!(h.invocation_id, gw3::yield_invocation(msg));
            assert_eq!(h.result.unwrap_or(Value::Null), gw3::yield_result(msg));
        }
    }
    if let Some(J::Array(methods)) = msg.get("methods") {
        for m in methods {
            if let Ok(def) = gw3::method_def_from_gw3(m) {
                let announced = gw3::method_to_gw3(7, &def);
                let back = gw3::method_def_from_gw3(&announced).expect("announced methods parse");
                assert_eq!(back.name, def.name);
                assert_eq!(back.accepts, def.accepts);
                assert_eq!(back.streaming, def.streaming);
                codec::encode(&def.flags).expect("method metadata encodes");
            }
        }
    }
    for key in [
        "arguments",
        "arguments_kv",
        "result",
        "data",
        "context",
        "delta",
    ] {
        if let Some(j) = msg.get(key) {
            let v = Value::from(j.clone());
            codec::encode(&v).expect("anything a web client sends encodes");
            let _ = gw3::to_kv(&v);
        }
    }
    for key in ["peer_id", "server_id", "owner_id"] {
        if let Some(J::String(s)) = msg.get(key) {
            let ids = gw3_ids();
            if let Some(p) = ids.parse_peer(s) {
                assert_eq!(&ids.peer(p), s, "peer ids round-trip");
            }
        }
    }
    if env.ty == "hello" {
        let _ = gw3_auth().authenticate(msg.get("authentication"));
    }
    Ok(Gw3Message {
        domain: env.domain,
        ty: env.ty,
    })
}

fn gw3_ids() -> &'static gw3::Ids {
    static IDS: OnceLock<gw3::Ids> = OnceLock::new();
    IDS.get_or_init(|| gw3::Ids::new("0123456789abcdef0123456789abcdef".into()))
}

fn gw3_auth() -> &'static auth::Authenticator {
    static AUTH: OnceLock<auth::Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        auth::Authenticator::new(
            auth::AuthMode::Token,
            "me".into(),
            "fuzz-token".into(),
            Vec::new(),
        )
    })
}

// ----- rings -------------------------------------------------------------------------------------

/// A ring whose memory a hostile peer controls. Input: one byte for the capacity (64 B–4 KiB),
/// the consumer's and producer's positions, the data area's bytes, then a script of steps the
/// peer and we take in turn: we read a record (as the client's receiver does, reassembling
/// fragments and parsing bodies), the peer pushes a well-formed record, scribbles bytes into
/// the data area, or moves a position. Then we read until the ring is empty or reports
/// corruption. Reading must end within as many steps as the ring has bytes; the result is the
/// records read or the typed error that would fault the lane.
pub fn ring_reader(data: &[u8]) -> Result<usize, RingError> {
    let mut input = Input(data);
    let cap = 64usize << (input.byte() % 7);
    let ring = HeapRing::new(cap);
    let head = input.u64();
    let tail = input.u64();
    ring.ctl_for_test().set_for_test(head, tail);
    let image = input.take(cap);
    ring.scribble_for_test(0, image);
    let mut consumer = Consumer::new(ring.clone())?;
    let mut producer = Producer::new(ring.clone()).ok();
    let mut assembly = Reassembly::default();
    let mut buf = Vec::new();
    let mut records = 0usize;
    let mut read = |c: &mut Consumer<HeapRing>, records: &mut usize| -> Result<bool, RingError> {
        match c.pop_into(&mut buf)? {
            None => Ok(false),
            Some(h) => {
                assert!(h.len as usize <= crate::ring::max_payload(cap));
                assert_eq!(buf.len(), h.len as usize);
                if let Ok(Some(msg)) = assembly.push(h.kind, h.flags, &buf, 1 << 16) {
                    lane_message(&msg);
                }
                *records += 1;
                Ok(true)
            }
        }
    };
    while !input.is_empty() {
        match input.byte() % 4 {
            0 => {
                read(&mut consumer, &mut records)?;
            }
            1 => {
                if let Some(p) = producer.as_mut() {
                    let kind = u16::from_le_bytes([input.byte(), input.byte()]);
                    let flags = input.byte() as u16 & 3;
                    let len = input.byte() as usize;
                    let payload = input.take(len).to_vec();
                    let _ = p.push(kind, flags, &payload);
                }
            }
            2 => {
                let at = input.u64() as usize % cap;
                let n = 1 + input.byte() as usize % 32;
                let bytes = input.take(n.min(cap - at));
                ring.scribble_for_test(at, bytes);
            }
            _ => {
                let (h, t) = (input.u64(), input.u64());
                ring.ctl_for_test().set_for_test(h, t);
                // The peer's own end re-attaches to whatever it wrote (ours keeps its state).
                producer = Producer::new(ring.clone()).ok();
            }
        }
    }
    // Drain: each record or padding takes at least 8 of the at most `cap` committed bytes.
    let mut steps = 0;
    while read(&mut consumer, &mut records)? {
        steps += 1;
        assert!(steps <= cap / RECORD_ALIGN, "reading a ring never ends");
    }
    consumer.flush();
    Ok(records)
}

// ----- contexts ----------------------------------------------------------------------------------

/// A context store whose memory a hostile writer controls. Input: one byte for the sizes
/// (bits 0–4 the snapshot capacity, 5–6 the log's, 7 see below), the
/// words to scribble over the control block, both snapshot buffers and the log (as
/// [`HeapStore::scribble_for_test`] lays them out), a position to start following from,
/// whether to skip what the snapshot holds (bit 0 of a byte), then an operation for a writer. We read the snapshot, follow the log to its end (which must come
/// within as many steps as the log has words), decode and apply what we read, and write.
pub fn context_follower(data: &[u8]) -> Result<usize, StoreError> {
    let mut input = Input(data);
    let sizes = input.byte();
    let snapshot = 8 * (1 + (sizes & 0x1f) as usize);
    let log_words = 64usize << ((sizes >> 5) & 3);
    let heap = HeapStore::new(snapshot, log_words);
    let store = Store::new(heap.clone())?;
    let words = 6 + 2 * (4 + snapshot / 8) + log_words;
    let mut image: Vec<u64> = (0..words).map(|_| input.u64()).collect();
    // Static memory with an odd sequence word, or a buffer whose version is not the current
    // one, only makes `read` retry 10 000 times before `Busy` (a reader cannot tell a writer
    // at work from a dead one); the unit tests cover that. Here the sequences are even, and
    // (bit 7 of the sizes byte clear) the current buffer claims the current version, so the
    // input reaches the length checks and the decoders.
    image[3] &= !1;
    image[4] &= !1;
    if sizes & 0x80 == 0 {
        let b = 6 + (image[1] as usize & 1) * (4 + snapshot / 8);
        image[b] = image[1];
    }
    heap.scribble_for_test(image.iter().copied());
    // Where the follower starts: the tail as it was when it subscribed.
    let start = input.u64();
    heap.set_log_tail_for_test(start);
    let mut follower = store.follower();
    heap.set_log_tail_for_test(image[2]);

    let mut buf = Vec::new();
    let resync = input.byte() & 1 == 1;
    let mut data_now = match store.read(&mut buf) {
        Ok(info) => {
            if resync {
                follower.resync(info.version);
            }
            crate::store::context::decode_snapshot(&buf).ok()
        }
        Err(_) => None,
    };
    let mut events = 0usize;
    let mut steps = 0usize;
    loop {
        steps += 1;
        assert!(steps <= log_words + 2, "following the log never ends");
        match follower.next(&store, &mut buf) {
            Ok(None) => break,
            Ok(Some(LogEvent::Gap)) => events += 1,
            Ok(Some(LogEvent::Record {
                kind,
                payload_logged,
                ..
            })) => {
                events += 1;
                let op = codec::decode(&buf)
                    .ok()
                    .and_then(ContextOp::from_value_owned);
                if let (true, 1, Some(op), Some(d)) = (payload_logged, kind, op, data_now.as_mut())
                {
                    let _ = apply_mut(d, true, &op);
                }
            }
            // Reported once: the follower moved past it.
            Err(StoreError::Corrupt(_)) => events += 1,
            Err(e) => return Err(e),
        }
    }
    assert!(!follower.has_more(&store), "the follower is at the tail");

    // A writer on the same memory: never panics, never waits past its deadline.
    let op = match input.byte() % 3 {
        0 => ContextOp::Set(Map::from_iter([("a".to_string(), Value::from(1))])),
        1 => ContextOp::Update(Map::from_iter([("b".to_string(), Value::from("x"))])),
        _ => ContextOp::Paths(vec![("c.d".into(), Value::from(true))]),
    };
    let _ = crate::store::context::write(&store, 7, &op, None, snapshot, Duration::ZERO, None);
    Ok(events)
}
