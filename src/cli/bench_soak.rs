//! `knit bench soak`: a steady mixed workload for minutes, with the memory of the gateway and of
//! every peer process sampled from `/proc`, to show whether anything grows.
//!
//! A `knit gateway` child process and three peer processes (`soak-peer`). Each peer serves
//! `Soak.Echo`, pushes on its own stream, writes its own context, publishes on one bus topic,
//! and follows the others: their streams, their contexts, the topic. Every tick (100 a second by
//! default) each peer invokes the next peer's `Soak.Echo`, publishes, and pushes; every fifth
//! tick it updates its context. Churn, because leaks live in set-up and tear-down: every second
//! a temporary context is created, read back and destroyed, and a bus subscription is made and
//! dropped; every five seconds a short-lived client connects, invokes and leaves.
//!
//! Everything is checked as it goes (echoes, sequence numbers per publisher and per stream, the
//! last value of each context), and the counts are reconciled at the end: a correctness failure
//! is a violation (non-zero exit). Memory is reported, not judged by the exit code.

use super::load::{
    int, loadavg, mem, mib, obj, read_line, say, wait_strategy, GatewayProc, Mem, Proc, RunDir,
};
use super::*;
use knit::client::{PublishOptions, StreamEvent, StreamOptions, StreamParams, SubscribeOptions};
use knit::model::InstanceFilter;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Peer processes of the soak.
const PEERS: usize = 3;
const ECHO: &str = "Soak.Echo";
const TOPIC: &str = "soak.bus";

/// The memory verdict's tolerance: growth up to the larger of these is "flat".
const FLAT_KB: u64 = 256;
const FLAT_FRACTION: f64 = 0.02;

fn stream_name(i: usize) -> String {
    format!("Soak.Stream.{i}")
}

fn ctx_name(i: usize) -> String {
    format!("soak.ctx.{i}")
}

fn instance(i: usize) -> String {
    format!("soak-{i}")
}

// ----- the parent -----------------------------------------------------------------------------

/// One process's memory over the run.
struct Track {
    name: String,
    samples: Vec<(f64, Mem)>,
}

/// First window vs last window, the slope over the second half, and the verdict. Flat: the
/// last window's mean is within the tolerance of the first window's maximum (warm-up included),
/// and the second half's slope, carried over the whole run, stays within it too (so a steady
/// leak that the noise hides in the end points still shows: 55 KiB a minute is "growing" over
/// ten minutes).
fn judge(t: &Track, window: f64, duration: f64) -> Value {
    let first: Vec<&Mem> = t
        .samples
        .iter()
        .filter(|(s, _)| *s <= window)
        .map(|(_, m)| m)
        .collect();
    let last: Vec<&Mem> = t
        .samples
        .iter()
        .filter(|(s, _)| *s >= duration - window)
        .map(|(_, m)| m)
        .collect();
    let baseline = first.iter().map(|m| m.rss).max().unwrap_or(0);
    let final_mean = if last.is_empty() {
        0
    } else {
        last.iter().map(|m| m.rss).sum::<u64>() / last.len() as u64
    };
    let per_min = |from: f64| -> f64 {
        let p: Vec<(f64, f64)> = t
            .samples
            .iter()
            .filter(|(s, _)| *s >= from)
            .map(|(s, m)| (*s / 60.0, m.rss as f64))
            .collect();
        slope(&p)
    };
    let slope_warm = per_min(window);
    let slope_half = per_min(duration / 2.0);
    let tolerance = FLAT_KB.max((baseline as f64 * FLAT_FRACTION) as u64);
    let growth = final_mean as i64 - baseline as i64;
    let projected = slope_half * (duration / 60.0);
    let flat = growth <= tolerance as i64 && projected <= tolerance as f64;
    let max = t.samples.iter().map(|(_, m)| m.rss).max().unwrap_or(0);
    let min = t.samples.iter().map(|(_, m)| m.rss).min().unwrap_or(0);
    let at = |f: f64| -> u64 {
        // The sample nearest to fraction `f` of the run.
        t.samples
            .iter()
            .min_by(|a, b| {
                (a.0 - f * duration)
                    .abs()
                    .total_cmp(&(b.0 - f * duration).abs())
            })
            .map_or(0, |(_, m)| m.rss)
    };
    let tenth = |x: f64| (x * 10.0).round() / 10.0;
    obj(vec![
        ("process", Value::from(t.name.as_str())),
        ("start_kb", Value::from(at(0.0))),
        ("middle_kb", Value::from(at(0.5))),
        ("end_kb", Value::from(at(1.0))),
        ("first_window_max_kb", Value::from(baseline)),
        ("last_window_mean_kb", Value::from(final_mean)),
        ("growth_kb", Value::from(growth)),
        ("slope_kb_per_min", Value::from(tenth(slope_warm))),
        (
            "slope_second_half_kb_per_min",
            Value::from(tenth(slope_half)),
        ),
        ("projected_growth_kb", Value::from(projected.round() as i64)),
        ("min_kb", Value::from(min)),
        ("max_kb", Value::from(max)),
        (
            "last_anon_kb",
            Value::from(t.samples.last().map_or(0, |(_, m)| m.anon)),
        ),
        (
            "last_shmem_kb",
            Value::from(t.samples.last().map_or(0, |(_, m)| m.shmem)),
        ),
        ("tolerance_kb", Value::from(tolerance)),
        (
            "verdict",
            Value::from(if flat { "flat" } else { "growing" }),
        ),
    ])
}

/// Least-squares slope of y over x (0 with fewer than two points).
fn slope(p: &[(f64, f64)]) -> f64 {
    if p.len() < 2 {
        return 0.0;
    }
    let n = p.len() as f64;
    let (sx, sy) = p.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = p.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

pub(super) fn run(args: &BenchArgs) -> Result<(), CliError> {
    let a = &args.scale;
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(a.minutes) || !positive(a.sample_secs) {
        return Err(CliError::new(
            Status::InvalidArgument,
            "--minutes and --sample-secs must be positive",
        ));
    }
    wait_strategy(&a.wait)?;
    machine();
    let load_start = loadavg();
    let dir = RunDir::new("soak")?;
    let mut gw = GatewayProc::start(&dir.0)?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = mem(gw.pid()).unwrap_or_default();
    errln!(
        "soak: gateway pid {} idle RSS {} (no peers; load average {load_start})",
        gw.pid(),
        mib(idle.rss)
    );
    let r = soak_with(args, &gw, idle);
    let clean = gw.stop();
    let (mut out, violations) = r?;
    if let Value::Map(m) = &mut out {
        m.insert("gateway_clean_exit".into(), Value::from(clean));
        m.insert("loadavg_start".into(), Value::from(load_start));
        m.insert("loadavg_end".into(), Value::from(loadavg()));
    }
    say(&out);
    if violations > 0 || !clean {
        return Err(CliError::new(
            Status::Internal,
            format!("soak: {violations} violations (see the JSON summary)"),
        ));
    }
    Ok(())
}

fn soak_with(args: &BenchArgs, gw: &GatewayProc, idle: Mem) -> Result<(Value, u64), CliError> {
    let a = &args.scale;
    let rate = 100.0;
    let mut peers = Vec::new();
    for i in 0..PEERS {
        let args = vec![
            "--socket".into(),
            gw.socket.display().to_string(),
            "--index".into(),
            i.to_string(),
            "--count".into(),
            PEERS.to_string(),
            "--rate".into(),
            rate.to_string(),
            "--wait".into(),
            a.wait.clone(),
        ];
        peers.push(Proc::spawn("soak-peer", &args, format!("soak peer {i}"))?);
    }
    for p in &peers {
        p.ready(Duration::from_secs(60))?;
    }
    for p in &mut peers {
        p.send("link")?;
    }
    for p in &peers {
        let v = p.line(Duration::from_secs(60))?;
        if v.get("linked").and_then(Value::as_bool) != Some(true) {
            return Err(bench_err(&p.what, v.to_json_string()));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let idle_linked = mem(gw.pid()).unwrap_or_default();
    errln!(
        "soak: {PEERS} peers linked; gateway RSS {} before the workload; running {} min, sampling every {} s",
        mib(idle_linked.rss),
        a.minutes,
        a.sample_secs
    );
    // The gateway, the peers, and the keeper holding the contexts' descriptors (if any).
    let mut tracks: Vec<Track> = std::iter::once("gateway".to_string())
        .chain((0..PEERS).map(|i| format!("peer {i}")))
        .chain(gw.keeper.map(|_| "keeper".to_string()))
        .map(|name| Track {
            name,
            samples: Vec::new(),
        })
        .collect();
    let pids: Vec<u32> = std::iter::once(gw.pid())
        .chain(peers.iter().map(|p| p.pid()))
        .chain(gw.keeper)
        .collect();
    let duration = a.minutes * 60.0;
    let t0 = Instant::now();
    for p in &mut peers {
        p.send("go")?;
    }
    let mut k = 0u64;
    let mut died = 0u64;
    loop {
        let t = t0.elapsed().as_secs_f64();
        let mut row = Vec::new();
        for (tr, &pid) in tracks.iter_mut().zip(&pids) {
            match mem(pid) {
                Some(m) => {
                    tr.samples.push((t, m));
                    row.push(m);
                }
                None => {
                    died += 1;
                    row.push(Mem::default());
                }
            }
        }
        say(&obj(vec![
            ("scenario", Value::from("soak_sample")),
            ("sample", Value::from(k)),
            ("t_s", Value::from((t * 10.0).round() / 10.0)),
            ("gateway", row[0].to_value()),
            (
                "peers_rss_kb",
                Value::Array(row[1..=PEERS].iter().map(|m| Value::from(m.rss)).collect()),
            ),
            (
                "keeper_rss_kb",
                row.get(PEERS + 1)
                    .map_or(Value::Null, |m| Value::from(m.rss)),
            ),
        ]));
        if died > 0 {
            break;
        }
        k += 1;
        let next = a.sample_secs * k as f64;
        if next > duration + 1e-9 {
            break;
        }
        let wait = next - t0.elapsed().as_secs_f64();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // Stop, learn what was sent, tell each peer what it should have received, collect.
    for p in &mut peers {
        p.send("stop")?;
    }
    let mut sent = Vec::new();
    for p in &peers {
        sent.push(p.line(Duration::from_secs(120))?);
    }
    let expect = obj(vec![
        (
            "bus",
            Value::Array(
                sent.iter()
                    .map(|s| Value::from(int(s, "published")))
                    .collect(),
            ),
        ),
        (
            "stream",
            Value::Array(sent.iter().map(|s| Value::from(int(s, "pushed"))).collect()),
        ),
        (
            "ctx",
            Value::Array(
                sent.iter()
                    .map(|s| Value::from(int(s, "ctx_seq")))
                    .collect(),
            ),
        ),
    ]);
    for p in &mut peers {
        p.send(&expect.to_json_string())?;
    }
    let mut reports = Vec::new();
    let mut violations = died;
    let mut ops = 0u64;
    let mut first_error = String::new();
    for p in &peers {
        match p.line(Duration::from_secs(120)) {
            Ok(v) => {
                violations += int(&v, "violations");
                ops += int(&v, "ops");
                if first_error.is_empty() {
                    if let Some(e) = v.get("first_error").and_then(Value::as_str) {
                        first_error = e.to_string();
                    }
                }
                reports.push(v);
            }
            Err(e) => {
                violations += 1;
                if first_error.is_empty() {
                    first_error = e.message;
                }
            }
        }
    }
    for p in &mut peers {
        if !p.finish(Duration::from_secs(30)) {
            violations += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = mem(gw.pid()).unwrap_or_default();
    let window = 60.0f64.min(elapsed / 4.0);
    let judged: Vec<Value> = tracks.iter().map(|t| judge(t, window, elapsed)).collect();
    let flat = judged
        .iter()
        .all(|j| j.get("verdict").and_then(Value::as_str) == Some("flat"));
    let out = obj(vec![
        ("scenario", Value::from("soak")),
        ("minutes", Value::from((elapsed / 60.0 * 100.0).round() / 100.0)),
        ("sample_secs", Value::from(a.sample_secs)),
        ("samples", Value::from(tracks[0].samples.len())),
        ("peers", Value::from(PEERS)),
        ("wait", Value::from(a.wait.as_str())),
        ("ops", Value::from(ops)),
        ("violations", Value::from(violations)),
        ("first_error", Value::from(first_error.as_str())),
        ("gateway_rss_idle_kb", Value::from(idle.rss)),
        ("gateway_idle", idle.to_value()),
        ("gateway_rss_linked_kb", Value::from(idle_linked.rss)),
        ("gateway_rss_after_kb", Value::from(after.rss)),
        ("window_s", Value::from(window.round())),
        (
            "rule",
            Value::from(format!(
                "flat: last-window mean - first-window max <= max({FLAT_KB} KiB, {}% of it), and so is the second half's slope times the whole run's length",
                FLAT_FRACTION * 100.0
            )),
        ),
        ("memory", Value::Array(judged.clone())),
        ("verdict", Value::from(if flat { "flat" } else { "growing" })),
        ("reports", Value::Array(reports)),
        ("machine", Value::from(machine())),
    ]);
    errln!("");
    errln!(
        "soak: {:.1} min, {} operations, {} violations; idle gateway {} (target < 20 MiB), with {PEERS} peers {}",
        elapsed / 60.0,
        ops,
        violations,
        mib(idle.rss),
        mib(idle_linked.rss)
    );
    errln!(
        "  process       start    middle       end | first-window max  last-window mean   growth | slope/min (2nd half)  verdict"
    );
    for j in &judged {
        let f = |k: &str| j.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        errln!(
            "  {:<9} {:>9} {:>9} {:>9} | {:>16} {:>17} {:>+6} KiB | {:>+8.1} KiB ({:>+8.1})  {}",
            j.get("process").and_then(Value::as_str).unwrap_or(""),
            mib(int(j, "start_kb")),
            mib(int(j, "middle_kb")),
            mib(int(j, "end_kb")),
            mib(int(j, "first_window_max_kb")),
            mib(int(j, "last_window_mean_kb")),
            j.get("growth_kb").and_then(Value::as_i64).unwrap_or(0),
            f("slope_kb_per_min"),
            f("slope_second_half_kb_per_min"),
            j.get("verdict").and_then(Value::as_str).unwrap_or(""),
        );
    }
    errln!("  overall: {}", if flat { "flat" } else { "growing" });
    Ok((out, violations))
}

// ----- a peer ---------------------------------------------------------------------------------

/// What a peer checks and counts as it goes.
#[derive(Default)]
struct Book {
    ops: u64,
    violations: u64,
    first_error: String,
    /// Next seq expected per publisher (bus) and per stream.
    bus_next: Vec<u64>,
    stream_next: Vec<u64>,
    /// Last seq seen per context, and whether a value went backwards.
    ctx_last: Vec<u64>,
}

impl Book {
    fn fail(&mut self, what: String) {
        self.violations += 1;
        if self.first_error.is_empty() {
            self.first_error = what;
        }
    }
}

type Shared = Arc<Mutex<Book>>;

fn lock(b: &Shared) -> std::sync::MutexGuard<'_, Book> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

fn seq_of(v: &Value) -> Option<(usize, u64)> {
    let from = v.get("from").and_then(Value::as_i64)?;
    let seq = v.get("seq").and_then(Value::as_i64)?;
    Some((usize::try_from(from).ok()?, u64::try_from(seq).ok()?))
}

/// In-order, exactly-once check of a (from, seq) against `next`.
fn check_seq(book: &Shared, what: &str, v: &Value, pick: fn(&mut Book) -> &mut Vec<u64>) {
    let mut b = lock(book);
    b.ops += 1;
    match seq_of(v) {
        Some((from, seq)) if from < pick(&mut b).len() => {
            let want = pick(&mut b)[from];
            if seq != want {
                b.fail(format!("{what} from {from}: seq {seq}, expected {want}"));
            }
            pick(&mut b)[from] = seq + 1;
        }
        _ => b.fail(format!("{what}: bad message {}", v.to_json_string())),
    }
}

fn soak_peer(a: &PeerArgs) -> Result<(), CliError> {
    let sc = &a.scale;
    let (me, n) = (a.index.unwrap_or(0), sc.count.max(1));
    let socket = a
        .socket
        .clone()
        .ok_or_else(|| bench_err("peer", "--socket missing"))?;
    let wait = wait_strategy(&sc.wait)?;
    let client = Client::builder("soak-peer")
        .socket(&socket)
        .instance(instance(me))
        .wait_strategy(wait)
        .connect()?;
    let book: Shared = Arc::new(Mutex::new(Book {
        bus_next: vec![0; n],
        stream_next: vec![0; n],
        ctx_last: vec![0; n],
        ..Default::default()
    }));
    client.register(ECHO, |call| Ok(call.args.clone()))?;
    let stream = client.create_stream(
        stream_name(me).as_str(),
        StreamOptions {
            policy: knit::client::SlowConsumerPolicy::Block(Duration::from_secs(30)),
            queue: 4096,
            ..Default::default()
        },
    )?;
    client
        .contexts()
        .set(&ctx_name(me), obj(vec![("seq", Value::from(0))]))?;
    let b = book.clone();
    let _bus = client.subscribe(TOPIC, SubscribeOptions::default(), move |m| {
        check_seq(&b, "bus", &m.data, |b| &mut b.bus_next)
    })?;
    say(&obj(vec![("ready", Value::from(true))]));
    if read_line() != "link" {
        return Ok(());
    }
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    for j in (0..n).filter(|&j| j != me) {
        let b = book.clone();
        let params = StreamParams {
            wait: Duration::from_secs(30),
            ..Default::default()
        };
        let sub = client
            .subscribe_stream(&stream_name(j), params, move |e| match e {
                StreamEvent::Data { data, gap, .. } => {
                    if *gap > 0 {
                        lock(&b).fail(format!("stream {j}: {gap} items dropped"));
                    }
                    check_seq(&b, "stream", data, |b| &mut b.stream_next)
                }
                StreamEvent::Closed { reason, .. } => {
                    lock(&b).fail(format!("stream {j} closed: {reason}"))
                }
            })
            .map_err(|e| CliError::new(e.status(), e.to_string()))?;
        keep.push(Box::new(sub));
        let b = book.clone();
        let sub = client.contexts().subscribe(&ctx_name(j), move |u| {
            let mut b = lock(&b);
            b.ops += 1;
            let seq = u.data.get("seq").and_then(Value::as_i64).unwrap_or(-1);
            match u64::try_from(seq) {
                Ok(s) if s >= b.ctx_last[j] => b.ctx_last[j] = s,
                _ => {
                    let last = b.ctx_last[j];
                    b.fail(format!("context {j} went from {last} to {seq}"))
                }
            }
        })?;
        keep.push(Box::new(sub));
    }
    say(&obj(vec![("linked", Value::from(true))]));
    if read_line() != "go" {
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (client, stream, stop, socket) = (client.clone(), stream, stop.clone(), socket.clone());
        let tick = Duration::from_secs_f64(1.0 / sc.rate.max(1.0));
        let per_second = sc.rate.max(1.0) as u64;
        std::thread::spawn(move || work(&client, &stream, &stop, &socket, me, n, tick, per_second))
    };
    let _ = read_line(); // "stop"
    stop.store(true, Ordering::Relaxed);
    let sent = worker
        .join()
        .map_err(|_| bench_err("soak peer", "the workload thread panicked"))?;
    say(&sent);
    // What the others sent; wait (bounded) until all of it has arrived, then report.
    let expect = Value::from_json_str(&read_line()).unwrap_or(Value::Null);
    let list = |k: &str| -> Vec<u64> {
        match expect.get(k) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_i64().unwrap_or(0).max(0) as u64)
                .collect(),
            _ => Vec::new(),
        }
    };
    let (bus, streams, ctxs) = (list("bus"), list("stream"), list("ctx"));
    let others: Vec<usize> = (0..n).filter(|&j| j != me).collect();
    let arrived = |b: &Book| {
        bus.iter()
            .enumerate()
            .all(|(j, &c)| b.bus_next.get(j) == Some(&c))
            && others.iter().all(|&j| {
                b.stream_next.get(j) == streams.get(j) && b.ctx_last.get(j) == ctxs.get(j)
            })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !arrived(&lock(&book)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut b = lock(&book);
    if !arrived(&b) {
        let msg = format!(
            "missing at the end: bus {:?}/{bus:?}, streams {:?}/{streams:?}, contexts {:?}/{ctxs:?}",
            b.bus_next, b.stream_next, b.ctx_last
        );
        b.fail(msg);
    }
    say(&obj(vec![
        ("peer", Value::from(me)),
        ("ops", Value::from(b.ops + int(&sent, "ops"))),
        (
            "violations",
            Value::from(b.violations + int(&sent, "violations")),
        ),
        (
            "first_error",
            Value::from(if b.first_error.is_empty() {
                sent.get("first_error")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            } else {
                b.first_error.clone()
            }),
        ),
    ]));
    drop(b);
    super::load::wait_eof();
    drop(keep);
    drop(client);
    Ok(())
}

/// The workload, until `stop`. Returns what was sent and the sender-side checks.
#[allow(clippy::too_many_arguments)]
fn work(
    client: &Client,
    stream: &knit::client::Stream,
    stop: &AtomicBool,
    socket: &std::path::Path,
    me: usize,
    n: usize,
    tick: Duration,
    per_second: u64,
) -> Value {
    let next = (me + 1) % n;
    let opts = InvokeOptions {
        target: Target::Instance(InstanceFilter {
            instance: Some(instance(next)),
            ..Default::default()
        }),
        wait: Duration::from_secs(10),
        timeout: Duration::from_secs(30),
    };
    let (mut published, mut pushed, mut ctx_seq, mut ops) = (0u64, 0u64, 0u64, 0u64);
    let mut errors = Book::default();
    let mut check = |ok: bool, what: &dyn Fn() -> String| {
        if !ok {
            errors.fail(what());
        }
    };
    let t0 = Instant::now();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Invoke the next peer and check the echo and who answered.
        let args = obj(vec![("from", Value::from(me)), ("k", Value::from(k))]);
        match client.invoke(ECHO, args.clone(), &opts) {
            Ok(r) => {
                let by = r.executed_by.as_ref().map(|i| i.instance.clone());
                check(
                    r.returned == args && by.as_deref() == Some(instance(next).as_str()),
                    &|| format!("invoke {k}: {} by {by:?}", r.returned.to_json_string()),
                );
            }
            Err(e) => check(false, &|| format!("invoke {k}: {e}")),
        }
        let msg = obj(vec![
            ("from", Value::from(me)),
            ("seq", Value::from(published)),
        ]);
        match client.publish(TOPIC, msg, &PublishOptions::default()) {
            Ok(()) => published += 1,
            Err(e) => check(false, &|| format!("publish: {e}")),
        }
        let item = obj(vec![
            ("from", Value::from(me)),
            ("seq", Value::from(pushed)),
        ]);
        match stream.push(item) {
            Ok(()) => pushed += 1,
            Err(e) => check(false, &|| format!("push: {e}")),
        }
        ops += 3;
        if k % 5 == 0 {
            let v = obj(vec![
                ("seq", Value::from(ctx_seq + 1)),
                ("pad", Value::Bytes(vec![me as u8; 200])),
            ]);
            match client.contexts().update(&ctx_name(me), v) {
                Ok(_) => ctx_seq += 1,
                Err(e) => check(false, &|| format!("context update: {e}")),
            }
            ops += 1;
        }
        if k % per_second == 0 {
            // Churn: a temporary context, a bus subscription.
            let name = format!("soak.tmp.{me}.{k}");
            let v = obj(vec![("k", Value::from(k))]);
            let r = client
                .contexts()
                .set(&name, v.clone())
                .map_err(|e| e.to_string())
                .and_then(|_| client.contexts().get(&name).map_err(|e| e.to_string()))
                .and_then(|s| {
                    if *s.data == v {
                        Ok(())
                    } else {
                        Err(format!("read back {}", s.data.to_json_string()))
                    }
                })
                .and_then(|_| client.contexts().destroy(&name).map_err(|e| e.to_string()));
            check(r.is_ok(), &|| format!("temporary context {name}: {r:?}"));
            let sub = client.subscribe(
                &format!("soak.churn.{me}"),
                SubscribeOptions::default(),
                |_| {},
            );
            check(sub.is_ok(), &|| "churn subscription failed".to_string());
            drop(sub);
            ops += 2;
        }
        if k % (5 * per_second) == 0 {
            // Churn: a visitor connects, invokes, leaves.
            let r = Client::builder("soak-visitor")
                .socket(socket)
                .wait_strategy(WaitStrategy::Park)
                .connect()
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    let args = obj(vec![("visitor", Value::from(k))]);
                    let r = c
                        .invoke(ECHO, args.clone(), &opts)
                        .map_err(|e| e.to_string())?;
                    if r.returned == args {
                        Ok(())
                    } else {
                        Err(format!("visitor got {}", r.returned.to_json_string()))
                    }
                });
            check(r.is_ok(), &|| format!("visitor: {r:?}"));
            ops += 1;
        }
        k += 1;
        // Paced by the clock, not by sleeps adding up.
        let due = t0 + tick * (k as u32);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
    obj(vec![
        ("stopped", Value::from(true)),
        ("published", Value::from(published)),
        ("pushed", Value::from(pushed)),
        ("ctx_seq", Value::from(ctx_seq)),
        ("ops", Value::from(ops)),
        ("violations", Value::from(errors.violations)),
        ("first_error", Value::from(errors.first_error.as_str())),
    ])
}

/// The soak roles of `knit __bench-peer`.
pub(super) fn peer(role: &str, a: &PeerArgs) -> Result<(), CliError> {
    match role {
        "soak-peer" => soak_peer(a),
        other => Err(CliError::new(
            Status::InvalidArgument,
            format!("unknown peer role {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 9.0)]), 0.0);
    }

    #[test]
    fn a_steady_climb_is_not_flat_and_noise_is() {
        let m = |kb| Mem {
            rss: kb,
            ..Default::default()
        };
        let flat = Track {
            name: "x".into(),
            samples: (0..120)
                .map(|i| (i as f64 * 5.0, m(10_000 + (i % 3) * 100)))
                .collect(),
        };
        let j = judge(&flat, 60.0, 600.0);
        assert_eq!(j.get("verdict").and_then(Value::as_str), Some("flat"));
        let leak = Track {
            name: "y".into(),
            samples: (0..120)
                .map(|i| (i as f64 * 5.0, m(10_000 + i * 40)))
                .collect(),
        };
        let j = judge(&leak, 60.0, 600.0);
        assert_eq!(j.get("verdict").and_then(Value::as_str), Some("growing"));
        // The gateway before its writer tasks were reaped: 55 KiB a minute, 470 KiB in all.
        let slow = Track {
            name: "z".into(),
            samples: (0..121)
                .map(|i| (i as f64 * 5.0, m(5_800 + i * 55 / 12)))
                .collect(),
        };
        let j = judge(&slow, 60.0, 600.0);
        assert_eq!(j.get("verdict").and_then(Value::as_str), Some("growing"));
    }
}
