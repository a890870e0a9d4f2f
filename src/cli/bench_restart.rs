//! `knit bench restart`: how long clients take to come back after the gateway is SIGKILLed and
//! started again on the same socket (docs/guarantees.md "Gateway restart": every client
//! reconnects by itself within a second and restores what it had).
//!
//! Each round starts a `knit gateway` process (keeper on, no WebSocket bridge) in a fresh temp
//! dir and `--peers` client processes (`knit __bench-peer restart-peer`). Each peer registers a
//! method, subscribes to a bus topic, writes and follows its own context, and calls its
//! neighbour's method once (so a lane exists, as in a running application). The gateway is
//! SIGKILLed; once every peer has seen `Disconnected`, a new gateway is started on the same
//! socket. From the moment it accepts connections (the bench polls the socket), on the
//! machine-wide monotonic clock, each peer reports:
//! * `reconnect`: its `InteropEvent::Reconnected`;
//! * `method_back`: an invoke of its neighbour's method succeeded, served by the neighbour's new
//!   connection (the neighbour re-registered it and this client rediscovered it);
//! * `contexts_back`: its own context and its neighbour's (never opened by this client before
//!   the kill, so opened through the new gateway) read back exactly as written before the kill.
//!
//! Any wrong value, missing method or event is an error (non-zero exit), not a slow sample.
//! Baseline, same round, same gateway binary: the time each peer takes for a fresh
//! `Client::connect` + `register` against a running gateway, all peers at once.

use super::*;
use data::mono_ns;
use knit::client::InteropEvent;
use std::sync::mpsc::channel;

/// Hang guard for every wait (a broken reconnection fails the run instead of stalling it). Not
/// a speed target: the target (1 s) is judged from the figures.
const HANG_GUARD: Duration = Duration::from_secs(10);
/// The requirement: every client back within a second.
const TARGET: Duration = Duration::from_secs(1);
const TOPIC: &str = "bench.restart";

fn method(i: usize) -> String {
    format!("bench.restart.m{i}")
}

fn context(i: usize) -> String {
    format!("bench.restart.c{i}")
}

/// What peer `i` writes into its context in the round named `token`.
fn context_value(i: usize, token: &str) -> Value {
    Value::object([
        ("peer", Value::from(i as u64)),
        ("token", Value::from(token)),
        (
            "nested",
            Value::object([
                ("list", Value::Array((0..16u64).map(Value::from).collect())),
                ("text", Value::from("x".repeat(64))),
            ]),
        ),
    ])
}

fn peer_err(e: impl std::fmt::Display) -> CliError {
    bench_err("restart peer", e)
}

fn emit(v: Value) {
    outln!("{}", v.to_json_string());
    let _ = std::io::stdout().flush();
}

/// `knit __bench-peer restart-peer --socket S --index I --n N --name TOKEN`.
pub(super) fn peer(a: &PeerArgs) -> Result<(), CliError> {
    let r = peer_run(a);
    if let Err(e) = &r {
        emit(Value::object([("error", Value::from(e.message.as_str()))]));
    }
    r
}

fn peer_run(a: &PeerArgs) -> Result<(), CliError> {
    let socket = a
        .socket
        .clone()
        .ok_or_else(|| peer_err("--socket missing"))?;
    let me = a.index.ok_or_else(|| peer_err("--index missing"))?;
    let n = (a.n as usize).max(1);
    let next = (me + 1) % n;
    let token = a.name.as_str();
    ready();
    // Every peer connects when the bench says so, all at once.
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| peer_err(format!("stdin: {e}")))?;

    // Baseline: a fresh connection and a registration.
    let t = Instant::now();
    let client = Client::builder(format!("bench-restart-{me}"))
        .socket(&socket)
        .connect()?;
    client.register(method(me).as_str(), |call| Ok(call.args.clone()))?;
    let connect_ns = t.elapsed().as_nanos() as u64;

    let (tx, events) = channel::<(u64, bool)>();
    let _ev = client.on_event(move |e| match e {
        InteropEvent::Disconnected { .. } => {
            let _ = tx.send((mono_ns(), false));
        }
        InteropEvent::Reconnected(_) => {
            let _ = tx.send((mono_ns(), true));
        }
        _ => {}
    });
    let _bus = client.subscribe(TOPIC, Default::default(), |_| {})?;
    client
        .contexts()
        .set(&context(me), context_value(me, token))?;
    let _ctx = client.contexts().subscribe(&context(me), |_| {})?;
    let opts = InvokeOptions {
        target: Target::Best,
        wait: HANG_GUARD,
        timeout: HANG_GUARD,
    };
    let call = |n: u64| -> Result<u64, CliError> {
        let args = Value::object([("n", Value::from(n))]);
        let r = client
            .invoke(&method(next), args.clone(), &opts)
            .map_err(|e| peer_err(format!("invoking {}: {e}", method(next))))?;
        if r.returned != args {
            return Err(peer_err(format!(
                "{} returned {} instead of {}",
                method(next),
                r.returned,
                args
            )));
        }
        Ok(r.executed_by.map(|i| i.peer_id.0).unwrap_or(0))
    };
    let server_before = call(1)?;
    emit(Value::object([("connect_ns", Value::from(connect_ns))]));

    // The bench kills the gateway.
    // Each event must come next, in this order: Disconnected, then Reconnected.
    let wait_event = |want: bool, what: &str| -> Result<u64, CliError> {
        match events.recv_timeout(HANG_GUARD) {
            Ok((t, up)) if up == want => Ok(t),
            Ok((_, up)) => Err(peer_err(format!(
                "{} while waiting for {what}",
                if up { "Reconnected" } else { "Disconnected" }
            ))),
            Err(_) => Err(peer_err(format!("no {what} within {HANG_GUARD:?}"))),
        }
    };
    wait_event(false, "Disconnected")?;
    emit(Value::object([("down", Value::from(true))]));

    // The bench starts a new gateway.
    let reconnected = wait_event(true, "Reconnected")?;
    if client.wait_for_method(&method(next), HANG_GUARD).is_none() {
        return Err(peer_err(format!(
            "{} not back within {HANG_GUARD:?}",
            method(next)
        )));
    }
    let server_after = call(2)?;
    if server_after == server_before {
        return Err(peer_err(format!(
            "{} still served by the old connection (peer {server_after})",
            method(next)
        )));
    }
    let method_back = mono_ns();
    for (i, what) in [(me, "own"), (next, "neighbour's")] {
        let got = client.contexts().get(&context(i))?;
        let want = context_value(i, token);
        if *got.data != want {
            return Err(peer_err(format!(
                "{what} context {} changed across the restart: {} (version {}) instead of {}",
                context(i),
                got.data,
                got.version,
                want
            )));
        }
    }
    let contexts_back = mono_ns();
    emit(Value::object([
        ("reconnected", Value::from(reconnected)),
        ("method_back", Value::from(method_back)),
        ("contexts_back", Value::from(contexts_back)),
    ]));
    // Stay until the bench is done with the round.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    client.close();
    Ok(())
}

// ----- the bench side -------------------------------------------------------------------------

/// Whether process `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// One round's temp dir, gateway processes and keeper; all stopped and removed when dropped,
/// on success and on error alike.
struct Round {
    dir: PathBuf,
    socket: PathBuf,
    gateways: Vec<Child>,
}

impl Round {
    fn new(n: usize) -> Result<Round, CliError> {
        let dir =
            std::env::temp_dir().join(format!("knit-bench-restart-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Private: the gateway refuses a socket directory open to others.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .recursive(true)
            .create(&dir)
            .map_err(|e| bench_err("temp dir", e))?;
        track_dir(&dir);
        Ok(Round {
            socket: dir.join("gw.sock"),
            dir,
            gateways: Vec::new(),
        })
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("gateway-{i}.log"))
    }

    /// Starts `knit gateway` on the round's socket and waits until the socket accepts a
    /// connection. Returns the monotonic time (ns) of the first successful connect and how long
    /// the gateway took from spawn to then.
    fn start_gateway(&mut self) -> Result<(u64, Duration), CliError> {
        let i = self.gateways.len();
        let log = std::fs::File::create(self.log(i)).map_err(|e| bench_err("gateway log", e))?;
        let spawned = Instant::now();
        let mut cmd = Command::new(exe()?);
        cmd.arg("gateway")
            .arg("--no-ws")
            .arg("--gateway")
            .arg(&self.socket)
            // A safety net: a keeper left behind by a crashed bench exits by itself.
            .args(["--keeper-linger", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // A bench ended by a signal (or a crash) stops its gateway as a normal end does: a
        // gateway outlives its parent otherwise.
        load::die_with_parent(&mut cmd, rustix::process::Signal::TERM);
        let child = cmd
            .spawn()
            .map_err(|e| bench_err("spawning knit gateway", e))?;
        self.gateways.push(child);
        loop {
            let at = mono_ns();
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok((at, spawned.elapsed()));
            }
            if let Ok(Some(s)) = self.gateways[i].try_wait() {
                return Err(bench_err(
                    "knit gateway exited during start-up",
                    format!("{s}: {}", self.log_text(i)),
                ));
            }
            if spawned.elapsed() > HANG_GUARD {
                return Err(bench_err(
                    "knit gateway",
                    format!("not listening within {HANG_GUARD:?}: {}", self.log_text(i)),
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(self.log(i)).unwrap_or_default()
    }

    /// SIGKILLs the running gateway (the keeper lives on, as after a crash).
    fn kill_gateway(&mut self) -> Result<(), CliError> {
        let gw = self
            .gateways
            .last_mut()
            .ok_or_else(|| bench_err("bench", "no gateway"))?;
        gw.kill().map_err(|e| bench_err("SIGKILL gateway", e))?;
        gw.wait().map_err(|e| bench_err("reaping gateway", e))?;
        Ok(())
    }

    /// Stops the running gateway cleanly (SIGTERM), which stops its keeper too.
    fn stop_gateway(&mut self) -> Result<(), CliError> {
        let i = self.gateways.len().saturating_sub(1);
        let Some(gw) = self.gateways.get_mut(i) else {
            return Ok(());
        };
        let status = stop(gw);
        match status {
            Some(s) if s.success() => Ok(()),
            other => Err(bench_err(
                "knit gateway did not stop cleanly",
                format!("{other:?}: {}", self.log_text(i)),
            )),
        }
    }
}

/// SIGTERM, then SIGKILL after the hang guard; reaps the child.
fn stop(child: &mut Child) -> Option<std::process::ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    reap_within(child, HANG_GUARD)
}

impl Drop for Round {
    fn drop(&mut self) {
        for gw in &mut self.gateways {
            stop(gw);
        }
        // A keeper still answering (its gateway was killed and none stopped it cleanly) was
        // started by one of our gateways: end it, by its pid.
        if let Some(pid) = knit::keeper::keeper_pid(&self.socket) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("__keeper") {
                if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
                let deadline = Instant::now() + HANG_GUARD;
                while running(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        forget_dir(&self.dir);
    }
}

/// One JSON line of a peer, or its error.
fn peer_line(p: &mut Peer, i: usize, what: &str) -> Result<Value, CliError> {
    let line = p
        .line()
        .map_err(|e| bench_err(&format!("restart peer {i} ({what})"), e.message))?;
    let v = Value::from_json_str(&line)
        .map_err(|e| bench_err(&format!("restart peer {i} output {line:?}"), e))?;
    if let Some(e) = v.get("error") {
        return Err(bench_err(
            &format!("restart peer {i} ({what})"),
            e.as_str().unwrap_or("?"),
        ));
    }
    Ok(v)
}

fn field(v: &Value, k: &str, i: usize) -> Result<u64, CliError> {
    v.get(k)
        .and_then(Value::as_i64)
        .map(|x| x.max(0) as u64)
        .ok_or_else(|| bench_err(&format!("restart peer {i}"), format!("no {k} in {v}")))
}

/// The samples of one run: nanoseconds, one per peer and round.
#[derive(Default)]
struct Samples {
    baseline: Vec<u64>,
    reconnect: Vec<u64>,
    method_back: Vec<u64>,
    contexts_back: Vec<u64>,
    /// Gateway restart: spawn to listening (one per round).
    listen: Vec<u64>,
}

fn round(n: usize, peers: usize, s: &mut Samples) -> Result<(), CliError> {
    let mut r = Round::new(n)?;
    r.start_gateway()?;
    let token = format!("{}-{n}", std::process::id());
    // Declared after `r`: the peers are killed before the gateways are stopped.
    let mut ps = Vec::with_capacity(peers);
    for i in 0..peers {
        let extra = [
            "--socket".to_string(),
            r.socket.display().to_string(),
            "--index".into(),
            i.to_string(),
            "--n".into(),
            peers.to_string(),
            "--name".into(),
            token.clone(),
        ];
        ps.push(spawn_peer("restart-peer", &extra, None)?);
    }
    // All connect at once.
    for p in &mut ps {
        let stdin = p
            .child
            .stdin
            .as_mut()
            .ok_or_else(|| bench_err("restart peer", "no stdin"))?;
        stdin
            .write_all(b"go\n")
            .and_then(|_| stdin.flush())
            .map_err(|e| bench_err("restart peer", e))?;
    }
    for (i, p) in ps.iter_mut().enumerate() {
        let v = peer_line(p, i, "connecting")?;
        s.baseline.push(field(&v, "connect_ns", i)?);
    }

    r.kill_gateway()?;
    for (i, p) in ps.iter_mut().enumerate() {
        peer_line(p, i, "waiting for Disconnected")?;
    }
    let (listening, took) = r.start_gateway()?;
    s.listen.push(took.as_nanos() as u64);
    for (i, p) in ps.iter_mut().enumerate() {
        let v = peer_line(p, i, "reconnecting")?;
        for (k, out) in [
            ("reconnected", &mut s.reconnect),
            ("method_back", &mut s.method_back),
            ("contexts_back", &mut s.contexts_back),
        ] {
            out.push(field(&v, k, i)?.saturating_sub(listening));
        }
    }
    // Done: the peers leave, the gateway stops cleanly (and its keeper with it).
    for p in &mut ps {
        drop(p.child.stdin.take());
    }
    for p in &mut ps {
        let _ = p.child.wait();
    }
    drop(ps);
    r.stop_gateway()
}

fn restart_row(name: &str, peers: usize, rounds: usize, v: &[u64], s: &Samples) -> Value {
    let k = Stats::of(v.to_vec(), Duration::ZERO);
    let b = Stats::of(s.baseline.clone(), Duration::ZERO);
    let l = Stats::of(s.listen.clone(), Duration::ZERO);
    let max = v.iter().copied().max().unwrap_or(0);
    let ratio = |a: u64, b: u64| (a as f64 / b.max(1) as f64 * 100.0).round() / 100.0;
    let mut m = knit::wire::Map::new();
    m.insert("scenario".into(), Value::from("restart"));
    m.insert("figure".into(), Value::from(name));
    m.insert("peers".into(), Value::from(peers));
    m.insert("rounds".into(), Value::from(rounds));
    m.insert("samples".into(), Value::from(v.len()));
    // The contract's fields of every row: no payload is measured here (size 0), each sample
    // is one reconnection, and the rate is that of one after another.
    m.insert("size".into(), Value::from(0));
    m.insert("iters".into(), Value::from(v.len()));
    m.insert("msgs_per_s".into(), Value::from(k.msgs_per_s.round()));
    m.insert("p50_ns".into(), Value::from(k.p50));
    m.insert("p99_ns".into(), Value::from(k.p99));
    m.insert("p999_ns".into(), Value::from(k.p999));
    m.insert("max_ns".into(), Value::from(max));
    m.insert("baseline_connect_p50_ns".into(), Value::from(b.p50));
    m.insert("baseline_connect_p99_ns".into(), Value::from(b.p99));
    m.insert("baseline_connect_p999_ns".into(), Value::from(b.p999));
    m.insert(
        "ratio_p50_vs_connect".into(),
        Value::from(ratio(k.p50, b.p50)),
    );
    m.insert(
        "ratio_p99_vs_connect".into(),
        Value::from(ratio(k.p99, b.p99)),
    );
    m.insert("gateway_listen_p50_ns".into(), Value::from(l.p50));
    m.insert("target_ns".into(), Value::from(TARGET.as_nanos() as u64));
    m.insert(
        "target_met".into(),
        Value::from(max < TARGET.as_nanos() as u64),
    );
    m.insert("machine".into(), Value::from(machine()));
    Value::Map(m)
}

fn print_restart_row(r: &Value) {
    let g = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let ms = |k: &str| format!("{:.2}", g(k) / 1e6);
    outln!(
        "restart {:<13} {:>2} peers × {:>3} rounds  p50 {:>7} ms p99 {:>7} ms p99.9 {:>7} ms | connect+register p50 {:>6} ms p99 {:>6} ms | ratio p50 {:.1} p99 {:.1} | ≤ 1 s {}",
        r.get("figure").and_then(Value::as_str).unwrap_or(""),
        g("peers"),
        g("rounds"),
        ms("p50_ns"),
        ms("p99_ns"),
        ms("p999_ns"),
        ms("baseline_connect_p50_ns"),
        ms("baseline_connect_p99_ns"),
        g("ratio_p50_vs_connect"),
        g("ratio_p99_vs_connect"),
        if r.get("target_met") == Some(&Value::from(true)) { "✓" } else { "✗" },
    );
}

pub(super) fn restart(args: &BenchArgs) -> Result<(), CliError> {
    let rounds = args.rounds.unwrap_or(20).max(1);
    let peers = args.peers.unwrap_or(8).max(1);
    machine();
    let mut s = Samples::default();
    for n in 0..rounds {
        round(n, peers, &mut s).map_err(|e| {
            CliError::new(e.status, format!("bench restart, round {n}: {}", e.message))
        })?;
    }
    for (name, v) in [
        ("reconnect", &s.reconnect),
        ("method_back", &s.method_back),
        ("contexts_back", &s.contexts_back),
    ] {
        let r = restart_row(name, peers, rounds, v, &s);
        if args.json {
            outln!("{}", r.to_json_string());
        } else {
            print_restart_row(&r);
        }
    }
    if !args.json {
        let l = Stats::of(s.listen.clone(), Duration::ZERO);
        outln!(
            "restart: a new gateway listened {:.2} ms (p50) after it was spawned; times above are from then",
            l.p50 as f64 / 1e6
        );
    }
    Ok(())
}
