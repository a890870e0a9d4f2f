//! `knit bench ctx|bus|stream`: one-way latency (context update → subscriber callback, bus
//! publish → subscriber callback, stream push → subscriber callback) and throughput, each with
//! a baseline from the same run: a bare shared-memory ring between the same two processes.
//!
//! One-way times use CLOCK_MONOTONIC, which is one clock for every process of the machine: the
//! sender stamps each message, the receiver subtracts. Latency runs are paced: the sender waits
//! for the receiver's acknowledgement (a counter in shared memory) before the next message, so
//! nothing queues. Throughput runs send as fast as the rings allow and time the whole batch.

use super::*;
use knit::client::{PublishOptions, StreamEvent, StreamOptions, StreamParams, SubscribeOptions};
use std::sync::{Arc, Mutex};

/// Nanoseconds on the machine-wide monotonic clock.
pub(super) fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Offsets of the acknowledgement counter and the stop flag in a board (a `Bare` mapping's
/// header page, which the rings do not use above 512).
const ACK: usize = 2048;
const DONE: usize = 2176;

/// Slots of the throughput baseline ring.
const TPUT_SLOTS: u64 = 1024;

fn stamped(size: usize) -> Vec<u8> {
    let mut v = vec![0xAB; size.max(8)];
    v[..8].copy_from_slice(&mono_ns().to_le_bytes());
    v
}

fn stamp_of(b: &[u8]) -> Option<u64> {
    b.get(..8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
}

fn print_samples(samples: &[u64]) {
    let v = Value::Array(samples.iter().map(|&s| Value::from(s)).collect());
    outln!("{}", Value::object([("samples", v)]).to_json_string());
}

fn read_samples(p: &mut Peer) -> Result<Vec<u64>, CliError> {
    let line = p.line()?;
    let v = Value::from_json_str(&line).map_err(|e| bench_err("peer output", e))?;
    let a = v.get("samples").and_then(|a| match a {
        Value::Array(a) => Some(
            a.iter()
                .filter_map(Value::as_i64)
                .map(|x| x.max(0) as u64)
                .collect(),
        ),
        _ => None,
    });
    a.ok_or_else(|| bench_err("peer output", "no samples"))
}

fn wait_ack(board: &Bare, want: u64) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut spins = 0u32;
    // SYNC(ack): pairs with the receivers' Release bumps: their sample pushes happen before
    // this, and so before any later `signal_done` (which `wait_done` acquires).
    while board.word(ACK).load(Ordering::Acquire) < want {
        spins = spins.wrapping_add(1);
        if spins % 1024 == 0 && Instant::now() > deadline {
            return Err(bench_err("bench", "the receiver stopped acknowledging"));
        }
        std::hint::spin_loop();
    }
    Ok(())
}

/// Tells a receiver the run is over. A futex, not a poll: a receiver's main thread waking up
/// every millisecond on the measured core would itself show up in the tail.
fn signal_done(board: &Bare) {
    // SYNC(done): pairs with `wait_done`; passes on what `wait_ack` acquired (the receivers'
    // sample pushes), so the receiver prints every sample.
    board.futex_word(DONE).store(1, Ordering::Release);
    futex_wake(board.futex_word(DONE));
}

fn wait_done(board: &Bare) {
    let w = board.futex_word(DONE);
    // SYNC(done): pairs with the Release store in `signal_done`.
    while w.load(Ordering::Acquire) == 0 {
        futex_wait(w, 0);
    }
}

fn with_gateway<T>(f: impl FnOnce(&std::path::Path) -> Result<T, CliError>) -> Result<T, CliError> {
    let dir = std::env::temp_dir().join(format!("knit-bench-{}-{}", std::process::id(), mono_ns()));
    track_dir(&dir);
    let r = Gateway::bind(GatewayConfig::new(dir.join("gw.sock")))
        .map_err(|e| bench_err("gateway", e))
        .and_then(|g| g.spawn().map_err(|e| bench_err("gateway", e)))
        .and_then(|gw| {
            let r = f(gw.socket_path());
            gw.shutdown();
            r
        });
    let _ = std::fs::remove_dir_all(&dir);
    forget_dir(&dir);
    r
}

fn cpu_args(cpu: Option<usize>) -> Vec<String> {
    cpu.map(|c| vec!["--cpu".into(), c.to_string()])
        .unwrap_or_default()
}

/// The baseline one-way latency: stamped messages through a bare ring, acknowledged.
fn oneway_shm(size: usize, n: usize, cpu: Option<usize>) -> Result<Stats, CliError> {
    let (bare, fd) = Bare::create(size.max(8))?;
    let mut peer = spawn_peer(
        "oneway-shm",
        &[
            &["--size".to_string(), size.max(8).to_string()][..],
            &cpu_args(cpu),
        ]
        .concat(),
        Some(&fd),
    )?;
    let warm = (n / 10).clamp(10, 1000);
    for i in 0..(warm + n) as u64 {
        bare.send(0, &stamped(size));
        wait_ack(&bare, i + 1)?;
    }
    bare.stop(0);
    let samples = read_samples(&mut peer)?;
    let samples = samples[warm.min(samples.len())..].to_vec();
    Ok(Stats::of(samples, Duration::ZERO))
}

/// The baseline throughput: `n` records of `size` bytes through a bare ring, as fast as it goes.
fn tput_shm(size: usize, n: u64, cpu: Option<usize>) -> Result<f64, CliError> {
    let (bare, fd) = Bare::create_with(size.max(8), TPUT_SLOTS)?;
    let extra = [
        &[
            "--size".to_string(),
            size.max(8).to_string(),
            "--n".into(),
            n.to_string(),
        ][..],
        &cpu_args(cpu),
    ]
    .concat();
    let mut peer = spawn_peer("tput-shm", &extra, Some(&fd))?;
    let payload = vec![0xABu8; size.max(8)];
    let start = mono_ns();
    for _ in 0..n {
        bare.send(0, &payload);
    }
    let end = parse_end(&peer.line()?)?;
    Ok(n as f64 / ((end.saturating_sub(start)) as f64 / 1e9).max(1e-9))
}

fn parse_end(line: &str) -> Result<u64, CliError> {
    Value::from_json_str(line)
        .ok()
        .and_then(|v| v.get("end").and_then(Value::as_i64))
        .map(|x| x as u64)
        .ok_or_else(|| bench_err("peer output", line.trim()))
}

fn data_row(
    scenario: &str,
    subscribers: Option<usize>,
    size: usize,
    iters: usize,
    k: Stats,
    base: Stats,
    tput: Option<(f64, f64)>,
) -> Value {
    let mut m = knit::wire::Map::new();
    m.insert("scenario".into(), Value::from(scenario));
    m.insert("mode".into(), Value::from("spin"));
    if let Some(s) = subscribers {
        m.insert("subscribers".into(), Value::from(s));
    }
    m.insert("size".into(), Value::from(size));
    m.insert("iters".into(), Value::from(iters));
    m.insert("p50_ns".into(), Value::from(k.p50));
    m.insert("p99_ns".into(), Value::from(k.p99));
    m.insert("p999_ns".into(), Value::from(k.p999));
    m.insert(
        "msgs_per_s".into(),
        // Without a throughput run (contexts): the rate of the latency loop, one update after
        // another.
        Value::from(tput.map_or(k.msgs_per_s, |t| t.0).round()),
    );
    m.insert("baseline_shm_oneway_p50_ns".into(), Value::from(base.p50));
    m.insert("baseline_shm_oneway_p99_ns".into(), Value::from(base.p99));
    m.insert("baseline_shm_oneway_p999_ns".into(), Value::from(base.p999));
    m.insert(
        "ratio_p50_vs_shm_oneway".into(),
        Value::from((k.p50 as f64 / base.p50.max(1) as f64 * 100.0).round() / 100.0),
    );
    if let Some((t, b)) = tput {
        m.insert("baseline_shm_msgs_per_s".into(), Value::from(b.round()));
        m.insert(
            "ratio_msgs_per_s_vs_shm".into(),
            Value::from((t / b.max(1.0) * 100.0).round() / 100.0),
        );
    }
    m.insert("machine".into(), Value::from(machine()));
    Value::Map(m)
}

fn emit(args: &BenchArgs, r: &Value) {
    if args.json {
        outln!("{}", r.to_json_string());
    } else {
        let g = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let us = |k: &str| format!("{:.2}", g(k) / 1000.0);
        let subs = r
            .get("subscribers")
            .and_then(Value::as_i64)
            .map(|s| format!(" {s} sub"))
            .unwrap_or_default();
        let tput = if g("msgs_per_s") > 0.0 {
            format!(
                " | {:.2} M msg/s (bare ring {:.2} M, ratio {:.2})",
                g("msgs_per_s") / 1e6,
                g("baseline_shm_msgs_per_s") / 1e6,
                g("ratio_msgs_per_s_vs_shm")
            )
        } else {
            String::new()
        };
        let tput = if g("batch_msgs_per_s") > 0.0 {
            format!(
                "{tput} | batches of 64: {:.2} M msg/s (ratio {:.2})",
                g("batch_msgs_per_s") / 1e6,
                g("ratio_batch_msgs_per_s_vs_shm")
            )
        } else {
            tput
        };
        outln!(
            "{:<6}{subs} {:>6} B  one-way p50 {:>7} µs p99 {:>7} µs p99.9 {:>7} µs | bare ring p50 {:>6} µs | ratio {:.2}{tput}",
            r.get("scenario").and_then(Value::as_str).unwrap_or(""),
            g("size"),
            us("p50_ns"),
            us("p99_ns"),
            us("p999_ns"),
            us("baseline_shm_oneway_p50_ns"),
            g("ratio_p50_vs_shm_oneway"),
        );
    }
}

fn setup() -> (Option<usize>, Option<usize>) {
    let (c, s) = cpus();
    machine();
    pin(c);
    (c, s)
}

pub(super) fn ctx(args: &BenchArgs) -> Result<(), CliError> {
    let (_, cpu_server) = setup();
    let size = args.size.unwrap_or(64);
    let n = args.iters.clamp(100, 200_000);
    with_gateway(|socket| {
        let writer = Client::builder("bench-writer")
            .socket(socket)
            .poll_mode(true)
            .wait_strategy(WaitStrategy::BusySpin)
            .connect()?;
        let ctx = writer.contexts();
        for subs in [1usize, 16] {
            let name = format!("bench.ctx.{subs}");
            ctx.set(
                &name,
                Value::object([("t", Value::from(0)), ("pad", Value::Bytes(vec![0; size]))]),
            )?;
            let base = oneway_shm(size, n, cpu_server)?;
            let (board, fd) = Bare::create(8)?;
            let mut extra = vec![
                "--socket".into(),
                socket.display().to_string(),
                "--name".into(),
                name.clone(),
                "--n".into(),
                subs.to_string(),
            ];
            extra.extend(cpu_args(cpu_server));
            let mut peer = spawn_peer("ctx-sub", &extra, Some(&fd))?;
            let warm = (n / 10).clamp(10, 1000);
            for i in 0..(warm + n) as u64 {
                ctx.update(&name, Value::object([("t", Value::from(mono_ns()))]))?;
                wait_ack(&board, (i + 1) * subs as u64)?;
            }
            signal_done(&board);
            let samples = read_samples(&mut peer)?;
            let skip = (warm * subs).min(samples.len());
            let k = Stats::of(samples[skip..].to_vec(), Duration::ZERO);
            emit(args, &data_row("ctx", Some(subs), size, n, k, base, None));
        }
        // get() of a 1 KiB context: wait-free read of the shared snapshot (cached decode).
        let big = Value::object([("pad", Value::Bytes(vec![7; 1000]))]);
        ctx.set("bench.get", big)?;
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let s = ctx.get("bench.get")?;
            times.push(t.elapsed().as_nanos() as u64);
            if s.version == 0 {
                return Err(bench_err("ctx get", "empty"));
            }
        }
        let k = Stats::of(times, Duration::ZERO);
        // Baseline: the clock read itself plus copying 1 KiB.
        let mut base = Vec::with_capacity(n);
        let src = vec![1u8; 1024];
        let mut dst = vec![0u8; 1024];
        for _ in 0..n {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            base.push(t.elapsed().as_nanos() as u64);
        }
        let b = Stats::of(base, Duration::ZERO);
        let mut m = knit::wire::Map::new();
        m.insert("scenario".into(), Value::from("ctx_get"));
        m.insert("mode".into(), Value::from("spin"));
        m.insert("size".into(), Value::from(1024));
        m.insert("iters".into(), Value::from(n));
        m.insert("p50_ns".into(), Value::from(k.p50));
        m.insert("p99_ns".into(), Value::from(k.p99));
        m.insert("p999_ns".into(), Value::from(k.p999));
        m.insert("msgs_per_s".into(), Value::from(k.msgs_per_s.round()));
        m.insert("baseline_memcpy_1k_p50_ns".into(), Value::from(b.p50));
        m.insert("machine".into(), Value::from(machine()));
        let r = Value::Map(m);
        if args.json {
            outln!("{}", r.to_json_string());
        } else {
            outln!(
                "ctx_get  1024 B  p50 {} ns p99 {} ns p99.9 {} ns | memcpy 1 KiB + clock p50 {} ns",
                k.p50,
                k.p99,
                k.p999,
                b.p50
            );
        }
        Ok(())
    })
}

/// Shared by bus and stream: latency (paced) and throughput against the bare ring.
fn data_plane(args: &BenchArgs, scenario: &str) -> Result<(), CliError> {
    let (_, cpu_server) = setup();
    let size = args.size.unwrap_or(64).max(8);
    let n = args.iters.clamp(100, 200_000);
    let tput_n = (n as u64 * 50).clamp(100_000, 2_000_000);
    with_gateway(|socket| {
        // A stream server answers subscription requests on its dispatcher thread (parked when idle,
        // so it does not compete with the pushing thread); a bus publisher needs none.
        let client = if scenario == "stream" {
            Client::builder("bench-pub").socket(socket).connect()?
        } else {
            Client::builder("bench-pub")
                .socket(socket)
                .poll_mode(true)
                .wait_strategy(WaitStrategy::BusySpin)
                .connect()?
        };
        let stream = if scenario == "stream" {
            let opts = StreamOptions {
                policy: knit::client::SlowConsumerPolicy::Block(Duration::from_secs(30)),
                queue: 65536,
                ..Default::default()
            };
            Some(client.create_stream("bench.stream", opts)?)
        } else {
            None
        };
        let send = |v: Value| -> Result<(), CliError> {
            match &stream {
                Some(s) => s.push(v).map_err(Into::into),
                None => client
                    .publish("bench.bus", v, &PublishOptions::default())
                    .map_err(Into::into),
            }
        };
        let role = format!("{scenario}-sub");
        let name = if scenario == "stream" {
            "bench.stream"
        } else {
            "bench.bus"
        };
        // Latency.
        let base = oneway_shm(size, n, cpu_server)?;
        let (board, fd) = Bare::create(8)?;
        let mut extra = vec![
            "--socket".into(),
            socket.display().to_string(),
            "--name".into(),
            name.into(),
            "--n".into(),
            "0".into(),
        ];
        extra.extend(cpu_args(cpu_server));
        let mut peer = spawn_peer(&role, &extra, Some(&fd))?;
        let warm = (n / 10).clamp(10, 1000);
        let wrap = |b: Vec<u8>| {
            if scenario == "stream" {
                Value::object([("b", Value::Bytes(b))])
            } else {
                Value::Bytes(b)
            }
        };
        for i in 0..(warm + n) as u64 {
            send(wrap(stamped(size)))?;
            wait_ack(&board, i + 1)?;
        }
        signal_done(&board);
        let samples = read_samples(&mut peer)?;
        drop(peer);
        let k = Stats::of(samples[warm.min(samples.len())..].to_vec(), Duration::ZERO);
        // Throughput.
        let base_tput = tput_shm(size, tput_n, cpu_server)?;
        let (_board, fd) = Bare::create(8)?;
        let mut extra = vec![
            "--socket".into(),
            socket.display().to_string(),
            "--name".into(),
            name.into(),
            "--n".into(),
            tput_n.to_string(),
        ];
        extra.extend(cpu_args(cpu_server));
        let mut peer = spawn_peer(&role, &extra, Some(&fd))?;
        let payload = wrap(vec![0xAB; size]);
        let start = mono_ns();
        for _ in 0..tput_n {
            send(payload.clone())?;
        }
        let end = parse_end(&peer.line()?)?;
        let tput = tput_n as f64 / ((end.saturating_sub(start)) as f64 / 1e9).max(1e-9);
        let mut row = data_row(scenario, Some(1), size, n, k, base, Some((tput, base_tput)));
        {
            // The same through `publish_batch` / `push_batch`, 64 messages a call.
            drop(peer);
            let (_board, fd) = Bare::create(8)?;
            let mut peer = spawn_peer(&role, &extra, Some(&fd))?;
            let batch: Vec<Value> = (0..64).map(|_| payload.clone()).collect();
            let start = mono_ns();
            let mut sent = 0;
            while sent < tput_n {
                let k = (tput_n - sent).min(64) as usize;
                match &stream {
                    Some(s) => s.push_batch(&batch[..k])?,
                    None => client.publish_batch(
                        "bench.bus",
                        &batch[..k],
                        &PublishOptions::default(),
                    )?,
                }
                sent += k as u64;
            }
            let end = parse_end(&peer.line()?)?;
            let t = tput_n as f64 / ((end.saturating_sub(start)) as f64 / 1e9).max(1e-9);
            if let Value::Map(m) = &mut row {
                m.insert("batch_msgs_per_s".into(), Value::from(t.round()));
                m.insert(
                    "ratio_batch_msgs_per_s_vs_shm".into(),
                    Value::from((t / base_tput.max(1.0) * 100.0).round() / 100.0),
                );
            }
        }
        emit(args, &row);
        Ok(())
    })
}

pub(super) fn bus(args: &BenchArgs) -> Result<(), CliError> {
    data_plane(args, "bus")
}

pub(super) fn stream(args: &BenchArgs) -> Result<(), CliError> {
    data_plane(args, "stream")
}

/// Child roles for these benches.
pub(super) fn peer(role: &str, a: &PeerArgs) -> Result<(), CliError> {
    match role {
        "oneway-shm" => {
            let fd = inherited(a.fd)?;
            let bare = Bare::map(&fd, a.size)?;
            ready();
            let mut buf = Vec::with_capacity(a.size);
            let mut samples = Vec::new();
            while bare.recv(0, &mut buf) {
                let now = mono_ns();
                samples.push(now.saturating_sub(stamp_of(&buf).unwrap_or(now)));
                // SYNC(ack): the Release side of `wait_ack`; here the samples stay in this thread
                // and the ring orders the slot, so only the count matters: a margin, not a need.
                bare.word(ACK).fetch_add(1, Ordering::Release);
            }
            print_samples(&samples);
        }
        "tput-shm" => {
            let fd = inherited(a.fd)?;
            let bare = Bare::map_with(&fd, a.size, TPUT_SLOTS)?;
            ready();
            let mut buf = Vec::with_capacity(a.size);
            for _ in 0..a.n {
                bare.recv(0, &mut buf);
            }
            outln!(
                "{}",
                Value::object([("end", Value::from(mono_ns()))]).to_json_string()
            );
        }
        "ctx-sub" | "bus-sub" | "stream-sub" => {
            let fd = inherited(a.fd)?;
            let board = Arc::new(Bare::map(&fd, 8)?);
            let socket = a
                .socket
                .clone()
                .ok_or_else(|| bench_err("peer", "--socket missing"))?;
            let client = Client::builder("bench-sub")
                .socket(socket)
                .wait_strategy(WaitStrategy::BusySpin)
                .connect()?;
            let samples = Arc::new(Mutex::new(Vec::<u64>::with_capacity(1 << 16)));
            // Throughput mode (`--n` > 0): count to n, then report the time.
            let expected = if role == "ctx-sub" { 0 } else { a.n };
            let count = Arc::new(AtomicU64::new(0));
            let finished = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let end = Arc::new(AtomicU64::new(0));
            let on_item = {
                let (samples, board, count, end, finished) = (
                    samples.clone(),
                    board.clone(),
                    count.clone(),
                    end.clone(),
                    finished.clone(),
                );
                move |stamp: Option<u64>| {
                    if expected > 0 {
                        // Relaxed: a counter; the read-modify-write alone makes exactly one
                        // caller see `expected`.
                        let c = count.fetch_add(1, Ordering::Relaxed) + 1;
                        if c == expected {
                            // Relaxed: published by the Release store of `finished` below.
                            end.store(mono_ns(), Ordering::Relaxed);
                            // SYNC(finished): `end` is visible to the main thread that sees 1.
                            finished.store(1, Ordering::Release);
                            futex_wake(&finished);
                        }
                        return;
                    }
                    let now = mono_ns();
                    if let Some(t) = stamp {
                        samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(now.saturating_sub(t));
                    }
                    // SYNC(ack): the sample pushed above happens before the sender's `wait_ack`
                    // returns, and so (through SYNC(done)) before the main thread prints it.
                    board.word(ACK).fetch_add(1, Ordering::Release);
                }
            };
            let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
            match role {
                "ctx-sub" => {
                    let firsts = Arc::new(AtomicU64::new(0));
                    for _ in 0..a.n.max(1) {
                        let (f, firsts) = (on_item.clone(), firsts.clone());
                        let sub = client.contexts().subscribe(&a.name, move |u| {
                            if u.first {
                                // SYNC(firsts): pairs with the Acquire poll below; only the
                                // count is read there, so the pairing is a margin, not a need.
                                firsts.fetch_add(1, Ordering::Release);
                                return;
                            }
                            f(u.data.get("t").and_then(Value::as_i64).map(|t| t as u64));
                        })?;
                        keep.push(Box::new(sub));
                    }
                    // Ready once every subscription has had its first callback.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    // SYNC(firsts): pairs with the Release bumps in the first callbacks.
                    while firsts.load(Ordering::Acquire) < a.n.max(1) {
                        if Instant::now() > deadline {
                            return Err(bench_err("ctx-sub", "no first callbacks"));
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                "bus-sub" => {
                    let f = on_item.clone();
                    let sub = client.subscribe(&a.name, SubscribeOptions::default(), move |m| {
                        f(m.data.as_bytes().and_then(stamp_of))
                    })?;
                    keep.push(Box::new(sub));
                }
                _ => {
                    let f = on_item.clone();
                    let params = StreamParams {
                        wait: Duration::from_secs(5),
                        timeout: Duration::from_secs(5),
                        ..Default::default()
                    };
                    let sub = client
                        .subscribe_stream(&a.name, params, move |e| {
                            if let StreamEvent::Data { data, .. } = e {
                                f(data.get("b").and_then(Value::as_bytes).and_then(stamp_of));
                            }
                        })
                        .map_err(|e| CliError::new(e.status(), e.to_string()))?;
                    keep.push(Box::new(sub));
                }
            }
            ready();
            if expected > 0 {
                // SYNC(finished): pairs with the callback's Release store; `end` is visible.
                while finished.load(Ordering::Acquire) == 0 {
                    futex_wait(&finished, 0);
                }
                // Relaxed: ordered by the SYNC(finished) Acquire above.
                outln!(
                    "{}",
                    Value::object([("end", Value::from(end.load(Ordering::Relaxed)))])
                        .to_json_string()
                );
            } else {
                wait_done(&board);
                print_samples(&samples.lock().unwrap_or_else(|e| e.into_inner()));
            }
            drop(keep);
        }
        other => {
            return Err(CliError::new(
                Status::InvalidArgument,
                format!("unknown peer role {other}"),
            ))
        }
    }
    Ok(())
}
