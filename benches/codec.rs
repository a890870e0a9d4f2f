//! `Value` binary codec versus `serde_json` text, measured in the same run: a typical
//! invoke-arguments map, and a 1 KiB bytes value (raw bytes in knit, an array of numbers in
//! JSON, which is how `Value::Bytes` converts).
//!
//! Run: `cargo bench --bench codec` (add `-- --quick` for a short run).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use knit::wire::codec;
use knit::Value;
use std::hint::black_box;
use std::time::Duration;

/// What a trading app might pass to `Price` or `PlaceOrder`.
fn invoke_args() -> Value {
    Value::object([
        ("symbol", Value::from("VOD.L")),
        ("side", Value::from("buy")),
        ("qty", Value::from(25_000)),
        ("limit", Value::from(101.25)),
        (
            "account",
            Value::object([
                ("id", Value::from("ACC-1029384")),
                ("desk", Value::from("EQ-LDN")),
            ]),
        ),
        (
            "tags",
            Value::from(vec![Value::from("algo"), Value::from("vwap")]),
        ),
        ("ts", Value::from(1_732_780_800_123u64)),
        ("urgent", Value::from(false)),
        ("note", Value::Null),
    ])
}

fn bytes_1k() -> Value {
    Value::Bytes((0..1024u32).map(|i| (i * 7 + 3) as u8).collect())
}

fn bench_value(cr: &mut Criterion, name: &str, v: Value) {
    let json = v.to_json();
    // Correctness before timing: both round trips give back what went in.
    let bytes = codec::encode(&v).unwrap();
    assert_eq!(bytes.len(), codec::encoded_len(&v));
    assert_eq!(codec::decode(&bytes).expect("decodes"), v);
    let text = serde_json::to_string(&json).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        json
    );
    if !matches!(v, Value::Bytes(_)) {
        assert_eq!(
            Value::from(json.clone()),
            v,
            "the JSON baseline carries the same data"
        );
    }

    let mut g = cr.benchmark_group(format!("codec_{name}"));
    g.bench_function(BenchmarkId::new("encode", "knit"), |b| {
        b.iter(|| codec::encode(black_box(&v)).unwrap())
    });
    g.bench_function(BenchmarkId::new("encode", "serde_json_baseline"), |b| {
        b.iter(|| serde_json::to_string(black_box(&json)).unwrap())
    });
    g.bench_function(BenchmarkId::new("decode", "knit"), |b| {
        b.iter(|| codec::decode(black_box(&bytes)).unwrap())
    });
    g.bench_function(BenchmarkId::new("decode", "serde_json_baseline"), |b| {
        b.iter(|| serde_json::from_str::<serde_json::Value>(black_box(&text)).unwrap())
    });
    g.finish();
}

fn codec_benches(cr: &mut Criterion) {
    bench_value(cr, "invoke_args", invoke_args());
    bench_value(cr, "bytes_1k", bytes_1k());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = codec_benches
}
criterion_main!(benches);
