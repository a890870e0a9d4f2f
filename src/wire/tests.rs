use super::codec::{self, DecodeError, EncodeError};
use super::frame::*;
use super::record;
use super::value::{Value, MAX_DEPTH};

fn sample() -> Value {
    Value::from_json_str(
        r#"{"s":"héllo","i":-42,"big":18446744073709551615,"f":1.5,"t":true,"n":null,
            "a":[1,[2,[3]],{"k":"v"}],"o":{"z":1,"a":2}}"#,
    )
    .unwrap()
}

#[test]
fn binary_round_trip_keeps_every_kind() {
    let mut v = sample();
    v.as_map_mut()
        .unwrap()
        .insert("b".into(), Value::Bytes(vec![0, 1, 255]));
    let bytes = codec::encode(&v).unwrap();
    assert_eq!(bytes.len(), codec::encoded_len(&v));
    let back = codec::decode(&bytes).unwrap();
    assert_eq!(back, v);
    // Order of keys survives too.
    let keys: Vec<_> = back.as_map().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["s", "i", "big", "f", "t", "n", "a", "o", "b"]);
}

/// Equal and with the same key order everywhere (`==` on maps ignores order).
fn same(a: &Value, b: &Value) -> bool {
    a == b && a.to_json_string() == b.to_json_string()
}

#[test]
fn decoding_into_a_used_value_gives_what_decoding_gives() {
    let j = |s: &str| Value::from_json_str(s).unwrap();
    let mut with_bytes = sample();
    with_bytes
        .as_map_mut()
        .unwrap()
        .insert("b".into(), Value::Bytes(vec![9; 40]));
    let shapes = [
        Value::Null,
        j("1"),
        j(r#""text""#),
        Value::Bytes(vec![1, 2, 3]),
        j("[1,2,3,4]"),
        j("[[1],{\"a\":[]}]"),
        j(r#"{"n":1,"b":"x"}"#),
        j(r#"{"b":"x","n":1}"#),
        j(r#"{"n":1}"#),
        j(r#"{"n":1,"b":"x","extra":[1,2]}"#),
        j(r#"{"n":{"deep":{"er":[1,{"x":null}]}}}"#),
        sample(),
        with_bytes,
    ];
    for want in &shapes {
        let bytes = codec::encode(want).unwrap();
        for prior in &shapes {
            let mut slot = prior.clone();
            codec::decode_into(&bytes, &mut slot).unwrap();
            assert!(same(&slot, want), "{prior:?} then {want:?} gave {slot:?}");
            // Every cut is refused, whatever the slot held.
            for cut in 0..bytes.len() {
                let mut slot = prior.clone();
                assert!(codec::decode_into(&bytes[..cut], &mut slot).is_err());
            }
        }
    }
    // A repeated key keeps its first place and takes the last value, as `decode` does,
    // whichever entries the slot held.
    let dup = [9, 3, 1, b'a', 3, 2, 1, b'b', 3, 4, 1, b'a', 3, 6];
    let want = codec::decode(&dup).unwrap();
    assert!(same(&want, &j(r#"{"a":3,"b":2}"#)));
    for prior in [
        j(r#"{"a":0,"b":0}"#),
        j(r#"{"a":0}"#),
        j(r#"{"b":0,"a":0}"#),
        j(r#"{"a":0,"b":0,"c":0}"#),
        Value::Null,
    ] {
        let mut slot = prior.clone();
        codec::decode_into(&dup, &mut slot).unwrap();
        assert!(same(&slot, &want), "{prior:?} gave {slot:?}");
    }
    // Trailing bytes are refused too.
    let mut long = codec::encode(&j(r#"{"n":1}"#)).unwrap();
    long.push(0);
    let mut slot = j(r#"{"n":0}"#);
    assert_eq!(
        codec::decode_into(&long, &mut slot),
        Err(DecodeError::Trailing(1))
    );
}

#[test]
fn json_round_trip_keeps_integers_integral() {
    let v = sample();
    let text = v.to_json_string();
    assert!(text.contains("\"i\":-42"));
    assert!(text.contains("18446744073709551615"));
    assert_eq!(Value::from_json_str(&text).unwrap(), v);
    assert_eq!(v.get("big"), Some(&Value::U64(u64::MAX)));
    assert_eq!(Value::from(5u64), Value::I64(5));
}

#[test]
fn map_equality_ignores_key_order() {
    let a = Value::from_json_str(r#"{"x":1,"y":2}"#).unwrap();
    let b = Value::from_json_str(r#"{"y":2,"x":1}"#).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, Value::from_json_str(r#"{"x":1,"y":3}"#).unwrap());
}

#[test]
fn serde_types_convert_both_ways() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Quote {
        symbol: String,
        bid: f64,
        size: u32,
    }
    let q = Quote {
        symbol: "VOD.L".into(),
        bid: 71.25,
        size: 300,
    };
    let v = Value::from_serialize(&q).unwrap();
    assert_eq!(v.get("size"), Some(&Value::I64(300)));
    assert_eq!(v.deserialize_into::<Quote>().unwrap(), q);
}

#[test]
fn truncated_input_is_an_error_at_every_cut() {
    let bytes = codec::encode(&sample()).unwrap();
    for cut in 0..bytes.len() {
        assert!(
            codec::decode(&bytes[..cut]).is_err(),
            "cut at {cut} decoded"
        );
    }
}

#[test]
fn hostile_encodings_are_rejected() {
    assert_eq!(codec::decode(&[42]), Err(DecodeError::BadTag(42)));
    assert_eq!(codec::decode(&[0, 0]), Err(DecodeError::Trailing(1)));
    // A string claiming 2^60 bytes.
    assert_eq!(
        codec::decode(&[6, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]),
        Err(DecodeError::Truncated)
    );
    // An array claiming a billion elements in 6 bytes must not allocate for them.
    assert_eq!(
        codec::decode(&[8, 0x80, 0x94, 0xeb, 0xdc, 0x03]),
        Err(DecodeError::Truncated)
    );
    // Invalid UTF-8.
    assert_eq!(
        codec::decode(&[6, 2, 0xff, 0xfe]),
        Err(DecodeError::BadUtf8)
    );
    // An 11-byte varint.
    assert_eq!(
        codec::decode(&[3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
        Err(DecodeError::BadVarint)
    );
}

#[test]
fn nesting_beyond_the_limit_is_refused_not_a_stack_overflow() {
    let mut deep = [8u8, 1].repeat(100_000);
    deep.push(0);
    assert_eq!(codec::decode(&deep), Err(DecodeError::TooDeep(MAX_DEPTH)));
    let json = "[".repeat(10_000) + &"]".repeat(10_000);
    assert!(Value::from_json_str(&json).is_err());
    let ok = "[".repeat(MAX_DEPTH - 1) + &"]".repeat(MAX_DEPTH - 1);
    assert!(Value::from_json_str(&ok).is_ok());
}

/// Arrays and maps nested `n` deep around a null.
fn nested(n: usize, map: bool) -> Value {
    let mut v = Value::Null;
    for _ in 0..n {
        v = if map {
            Value::object([("k", v)])
        } else {
            Value::Array(vec![v])
        };
    }
    v
}

#[test]
fn encoding_refuses_exactly_what_decoding_refuses() {
    for map in [false, true] {
        // The deepest value the decoder takes encodes, and decodes back.
        let ok = nested(MAX_DEPTH, map);
        let bytes = codec::encode(&ok).expect("MAX_DEPTH levels encode");
        assert_eq!(codec::decode(&bytes).unwrap(), ok);
        assert_eq!(codec::check(&ok), Ok(()));
        // One more level: refused with a typed error, nothing written.
        let deep = nested(MAX_DEPTH + 1, map);
        assert_eq!(codec::encode(&deep), Err(EncodeError::TooDeep(MAX_DEPTH)));
        assert_eq!(codec::check(&deep), Err(EncodeError::TooDeep(MAX_DEPTH)));
        let mut out = vec![1, 2, 3];
        assert!(codec::encode_into(&deep, &mut out).is_err());
        assert_eq!(
            out,
            [1, 2, 3],
            "a refused value leaves the buffer as it was"
        );
        // What sits around a value counts.
        let mut out = Vec::new();
        assert!(codec::encode_nested_into(&ok, &mut out, 1).is_err());
        assert!(out.is_empty());
        // Very deep values are refused without recursing through them.
        let abyss = nested(200_000, map);
        assert!(codec::encode(&abyss).is_err());
        assert!(codec::encoded_len(&abyss) > 0);
        // Frames carrying values refuse them too, as a typed error.
        let frame = ToGateway::BusPublish {
            topic: "t".into(),
            routing_key: None,
            target: Value::Null,
            data: deep,
        };
        assert!(matches!(encode_frame(&frame, 0), Err(FrameError::Body(_))));
        // Iterative drop: a 200 000-deep value would overflow the stack when dropped.
        let mut v = abyss;
        loop {
            v = match v {
                Value::Array(mut a) => a.pop().unwrap_or_default(),
                Value::Map(mut m) => m.pop().map(|(_, x)| x).unwrap_or_default(),
                _ => break,
            };
        }
    }
}

#[test]
fn frames_round_trip_and_split_anywhere() {
    let msg = ToGateway::Register {
        req: 7,
        methods: vec![MethodSpec {
            id: 1,
            def: MethodDef {
                flags: sample(),
                ..MethodDef::new("Sum")
            },
        }],
    };
    let frame = encode_frame(&msg, 0).unwrap();
    for split in 0..frame.len() {
        let mut r = FrameReader::default();
        r.push_bytes(&frame[..split]);
        assert!(r.next_frame().unwrap().is_none());
        r.push_bytes(&frame[split..]);
        let (body, fds) = r.next_frame().unwrap().unwrap();
        assert!(fds.is_empty());
        match decode_body::<ToGateway>(&body).unwrap() {
            ToGateway::Register { req, methods } => {
                assert_eq!(req, 7);
                assert_eq!(methods[0].def.name, "Sum");
                assert_eq!(methods[0].def.flags, sample());
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn oversized_or_fd_hungry_frames_are_refused() {
    let mut r = FrameReader::default();
    r.push_bytes(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]);
    assert!(matches!(r.next_frame(), Err(FrameError::TooLarge(_))));
    let mut r = FrameReader::default();
    r.push_bytes(&[0, 0, 0, 0, 200, 0, 0, 0]);
    assert!(matches!(r.next_frame(), Err(FrameError::TooManyFds(200))));
    let mut r = FrameReader::default();
    r.push_bytes(&[1, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert!(matches!(
        r.next_frame(),
        Err(FrameError::MissingFds {
            declared: 1,
            received: 0
        })
    ));
}

#[test]
fn garbage_bodies_do_not_decode() {
    for b in [
        &[][..],
        &[200, 1, 2],
        &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    ] {
        assert!(decode_body::<ToGateway>(b).is_err());
    }
}

#[test]
fn records_round_trip() {
    let mut buf = Vec::new();
    record::invoke(&mut buf, 9, 3, 500, &Value::from("x")).unwrap();
    let h = record::parse_invoke(&buf).unwrap();
    assert_eq!((h.call_id, h.method_id, h.timeout_ms), (9, 3, 500));
    assert_eq!(
        record::decode_payload(h.flags, &buf[record::INVOKE_HEADER..]).unwrap(),
        Value::from("x")
    );

    record::invoke(&mut buf, 1, 1, 0, &Value::Bytes(vec![1, 2, 3])).unwrap();
    let h = record::parse_invoke(&buf).unwrap();
    assert_eq!(h.flags & record::PAYLOAD_RAW, record::PAYLOAD_RAW);
    assert_eq!(&buf[record::INVOKE_HEADER..], &[1, 2, 3]);

    record::result(&mut buf, 5, &Err(("boom".into(), Some(Value::from(1))))).unwrap();
    let h = record::parse_result(&buf).unwrap();
    assert!(!h.ok);
    let (m, c) = record::decode_error(&buf[record::RESULT_HEADER..]).unwrap();
    assert_eq!((m.as_str(), c), ("boom", Some(Value::from(1))));
    assert!(record::parse_result(&buf[..3]).is_err());
    buf[8] = 7;
    assert!(record::parse_result(&buf).is_err());
}
