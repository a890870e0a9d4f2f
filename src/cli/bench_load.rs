//! `knit bench load`: many processes and many calls through a real `knit gateway` process, every
//! reply checked, plus the shared machinery of `knit bench soak` (child processes, memory
//! figures read from `/proc`, latency histograms).
//!
//! The load: S server processes serve `Load.Echo`, each under its own instance id; C client
//! processes each make N calls with arguments `{c, seq}`, call `seq` going to server
//! `(c + seq) mod S` by an instance target. Each client checks every reply (the echo equals what
//! it sent; `executed_by` is the server it targeted). Each server checks, per client, that the
//! sequence numbers it receives are exactly those routed to it, in order, each once (they step by
//! exactly S). At the end the parent reconciles: every (client, server) pair received exactly its
//! share, and the servers' totals add up to C × N. Idle peers (many per process) keep the
//! gateway at `--peers` connected peers and fill its registry with `--methods` methods and
//! `--contexts` contexts while the load runs.
//!
//! Before the load, a probe measures invocation latency (and context creation and connection
//! time) at three sizes of the registry, to show whether latency depends on it.

use super::*;
use knit::model::InstanceFilter;
use std::process::ChildStdin;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};

// Options of `load` and `soak` (part of `knit bench`).
#[derive(clap::Args, Debug, Clone)]
pub struct ScaleArgs {
    /// load: client processes.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// load: invocations per client.
    #[arg(long, default_value_t = 100_000)]
    pub calls: u64,
    /// load: server processes.
    #[arg(long, default_value_t = 4)]
    pub servers: usize,
    /// load: methods registered during the run (at least).
    #[arg(long, default_value_t = 10_000)]
    pub methods: usize,
    /// load: contexts existing during the run (at least).
    #[arg(long, default_value_t = 10_000)]
    pub contexts: usize,
    /// load: probe invocations per registry size.
    #[arg(long, default_value_t = 20_000)]
    pub probe_iters: usize,
    /// soak: how long the workload runs, in minutes.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// soak: seconds between memory samples.
    #[arg(long, default_value_t = 5.0)]
    pub sample_secs: f64,
    /// load and soak: how the peers wait: park, spin-then-park or spin.
    #[arg(long, default_value = "park")]
    pub wait: String,
}

// Options of the load and soak roles of `knit __bench-peer`.
#[derive(clap::Args, Debug, Clone)]
pub struct ScalePeerArgs {
    /// Client processes in the run.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Calls per client.
    #[arg(long, default_value_t = 0)]
    pub calls: u64,
    /// Server processes in the run.
    #[arg(long, default_value_t = 1)]
    pub servers: usize,
    /// Peers (clients) in this process.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Methods per peer.
    #[arg(long, default_value_t = 0)]
    pub methods: usize,
    /// Contexts per peer.
    #[arg(long, default_value_t = 0)]
    pub contexts: usize,
    /// Distinguishes the names this process creates.
    #[arg(long, default_value = "")]
    pub tag: String,
    /// Wait strategy: park, spin-then-park or spin.
    #[arg(long, default_value = "park")]
    pub wait: String,
    /// soak: operations per second of each kind.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
}

/// Peers per idle process (each a client with its control and dispatch threads).
const IDLE_PER_PROCESS: usize = 32;
/// The method every load server serves.
const ECHO: &str = "Load.Echo";
/// The method the probe server serves.
const PROBE: &str = "Load.Probe";
/// The probe server's instance id.
const PROBE_INSTANCE: &str = "load-probe-server";

/// `--peers` (shared with `restart`, whose default is different): 256 unless given.
fn peers_of(args: &BenchArgs) -> usize {
    args.peers.unwrap_or(256)
}

pub(super) fn wait_strategy(s: &str) -> Result<WaitStrategy, CliError> {
    WaitStrategy::parse(s).ok_or_else(|| {
        CliError::new(
            Status::InvalidArgument,
            format!("unknown wait strategy {s:?} (park, spin-then-park, spin)"),
        )
    })
}

pub(super) fn obj(pairs: Vec<(&str, Value)>) -> Value {
    let mut m = knit::wire::Map::new();
    for (k, v) in pairs {
        m.insert(k.to_string(), v);
    }
    Value::Map(m)
}

pub(super) fn say(v: &Value) {
    outln!("{}", v.to_json_string());
    let _ = std::io::stdout().flush();
}

pub(super) fn int(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_i64).unwrap_or(0).max(0) as u64
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ----- child processes ------------------------------------------------------------------------

/// Children die with the bench: the kernel sends `sig` when the thread that spawned them (the
/// bench's main thread) ends, however it ends.
pub(super) fn die_with_parent(cmd: &mut Command, sig: rustix::process::Signal) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure makes one system call (prctl), which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(sig)).map_err(Into::into)
        });
    }
}

/// A bench child (`knit __bench-peer ROLE …`): its stdout lines are read on a thread so they can
/// be awaited with a deadline; killed and reaped when dropped.
pub(super) struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub what: String,
}

impl Proc {
    /// Spawns a child. Call from the main thread only (see [`die_with_parent`]).
    pub(super) fn spawn(role: &str, args: &[String], what: String) -> Result<Proc, CliError> {
        let mut cmd = Command::new(exe()?);
        cmd.arg("__bench-peer")
            .arg(role)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd, rustix::process::Signal::KILL);
        let mut child = cmd
            .spawn()
            .map_err(|e| bench_err(&format!("spawning {what}"), e))?;
        let out = child.stdout.take();
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        if let Some(out) = out {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Proc {
            child,
            stdin,
            lines,
            what,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line it prints, as JSON.
    pub(super) fn line(&self, timeout: Duration) -> Result<Value, CliError> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Value::from_json_str(&l)
                .map_err(|e| bench_err(&self.what, format!("bad output ({e}): {l}"))),
            Err(RecvTimeoutError::Timeout) => Err(bench_err(
                &self.what,
                format!("no output within {} s", timeout.as_secs()),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(bench_err(&self.what, "exited")),
        }
    }

    /// Its first line, which must be `{"ready": true, …}`.
    pub(super) fn ready(&self, timeout: Duration) -> Result<Value, CliError> {
        let v = self.line(timeout)?;
        if v.get("ready").and_then(Value::as_bool) != Some(true) {
            return Err(bench_err(
                &self.what,
                format!("not ready: {}", v.to_json_string()),
            ));
        }
        Ok(v)
    }

    pub(super) fn send(&mut self, line: &str) -> Result<(), CliError> {
        let what = self.what.clone();
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| bench_err(&what, "stdin closed"))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|e| bench_err(&what, e))
    }

    /// Closes its stdin: the roles take that as "finish and exit".
    pub(super) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `timeout` for it to exit; kills it then. Whether it exited by itself with 0.
    pub(super) fn finish(&mut self, timeout: Duration) -> bool {
        self.close_stdin();
        reap_within(&mut self.child, timeout).is_some_and(|s| s.success())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `knit gateway` child process (its memory is its own), stderr in a log file; stopped with
/// SIGTERM, killed if it does not stop.
pub(super) struct GatewayProc {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
    stopped: bool,
    /// The keeper the gateway started (it holds every context's descriptor), if any.
    pub keeper: Option<u32>,
}

impl GatewayProc {
    /// Starts `knit gateway --no-ws` on `dir/gw.sock` and waits until it accepts.
    pub(super) fn start(dir: &std::path::Path) -> Result<GatewayProc, CliError> {
        let socket = dir.join("gw.sock");
        let log = dir.join("gateway.log");
        let err_file = std::fs::File::create(&log).map_err(|e| bench_err("gateway log", e))?;
        let mut cmd = Command::new(exe()?);
        cmd.arg("gateway")
            .arg("--no-ws")
            .arg("--gateway")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file);
        die_with_parent(&mut cmd, rustix::process::Signal::TERM);
        let child = cmd
            .spawn()
            .map_err(|e| bench_err("spawning knit gateway", e))?;
        let mut gw = GatewayProc {
            child,
            socket,
            log,
            stopped: false,
            keeper: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::os::unix::net::UnixStream::connect(&gw.socket).is_ok() {
                // Started before the gateway listens.
                gw.keeper = knit::keeper::keeper_pid(&gw.socket);
                return Ok(gw);
            }
            if let Ok(Some(s)) = gw.child.try_wait() {
                gw.stopped = true;
                return Err(bench_err(
                    "knit gateway",
                    format!("exited at start ({s}): {}", gw.log_text()),
                ));
            }
            if Instant::now() > deadline {
                return Err(bench_err("knit gateway", "did not accept within 15 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then up to 10 s to exit (SIGKILL after that). Whether it exited cleanly.
    pub(super) fn stop(&mut self) -> bool {
        if self.stopped {
            return false;
        }
        self.stopped = true;
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        reap_within(&mut self.child, Duration::from_secs(10)).is_some_and(|s| s.success())
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private directory (0700) for one run's socket and logs, removed when dropped.
pub(super) struct RunDir(pub PathBuf);

impl RunDir {
    pub(super) fn new(tag: &str) -> Result<RunDir, CliError> {
        use std::os::unix::fs::DirBuilderExt;
        let p = std::env::temp_dir().join(format!(
            "knit-{tag}-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&p)
            .map_err(|e| bench_err("run directory", e))?;
        track_dir(&p);
        Ok(RunDir(p))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        forget_dir(&self.0);
    }
}

// ----- memory and machine figures from /proc ---------------------------------------------------

/// A process's memory, in KiB (`/proc/PID/status`).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Mem {
    /// Resident set: anonymous + file-backed + shared memory pages mapped.
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    /// Shared memory (memfd segments: lanes, contexts, doorbells) this process has mapped in.
    pub shmem: u64,
    /// Peak resident set over the process's life.
    pub hwm: u64,
}

pub(super) fn mem(pid: u32) -> Option<Mem> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut m = Mem::default();
    for line in s.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "VmRSS:" => m.rss = v,
            "RssAnon:" => m.anon = v,
            "RssFile:" => m.file = v,
            "RssShmem:" => m.shmem = v,
            "VmHWM:" => m.hwm = v,
            _ => {}
        }
    }
    Some(m)
}

impl Mem {
    pub(super) fn to_value(self) -> Value {
        obj(vec![
            ("rss_kb", Value::from(self.rss)),
            ("anon_kb", Value::from(self.anon)),
            ("file_kb", Value::from(self.file)),
            ("shmem_kb", Value::from(self.shmem)),
        ])
    }
}

/// Open descriptors of a process.
pub(super) fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One field of `/proc/meminfo`, in KiB.
pub(super) fn meminfo_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The 1, 5 and 15-minute load averages.
pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub(super) fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

// ----- latency histogram ----------------------------------------------------------------------

/// A log-linear histogram of nanoseconds: exact below 256, then 128 buckets per power of two
/// (relative error below 0.8 %). Cheap to record and to merge across processes.
#[derive(Debug, Clone)]
pub(super) struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
}

const SUB: u64 = 128;
const BUCKETS: usize = (SUB * 58) as usize;

impl Hist {
    pub(super) fn new() -> Hist {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let shift = 63 - v.leading_zeros() as u64 - 7;
        (SUB * shift + (v >> shift)) as usize
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let lower = (i - SUB * shift) << shift;
        lower + (1u64 << shift) / 2
    }

    pub(super) fn record(&mut self, ns: u64) {
        if let Some(c) = self.counts.get_mut(Self::index(ns)) {
            *c += 1;
        }
        self.n += 1;
        self.max = self.max.max(ns);
    }

    pub(super) fn count(&self) -> u64 {
        self.n
    }

    pub(super) fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
        self.max = self.max.max(o.max);
    }

    /// The value at quantile `q` (0 when empty).
    pub(super) fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((self.n as f64 * q) as u64).min(self.n - 1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }

    pub(super) fn max(&self) -> u64 {
        self.max
    }

    /// `[[bucket, count], …]` for the non-empty buckets, plus the maximum.
    pub(super) fn to_value(&self) -> Value {
        let b = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| Value::Array(vec![Value::from(i), Value::from(*c)]))
            .collect();
        obj(vec![
            ("buckets", Value::Array(b)),
            ("max", Value::from(self.max)),
        ])
    }

    pub(super) fn from_value(v: &Value) -> Hist {
        let mut h = Hist::new();
        if let Some(Value::Array(b)) = v.get("buckets") {
            for pair in b {
                if let Value::Array(p) = pair {
                    let i = p.first().and_then(Value::as_i64).unwrap_or(-1);
                    let c = p.get(1).and_then(Value::as_i64).unwrap_or(0).max(0) as u64;
                    if let Some(slot) = usize::try_from(i).ok().and_then(|i| h.counts.get_mut(i)) {
                        *slot += c;
                        h.n += c;
                    }
                }
            }
        }
        h.max = int(v, "max");
        h
    }
}

// ----- the parent -----------------------------------------------------------------------------

/// What the probe client sees: connected peers (itself included), (method, server) pairs and
/// contexts (the eight channel contexts included).
#[derive(Debug, Clone, Copy, Default)]
struct Census {
    peers: usize,
    methods: usize,
    contexts: usize,
}

/// The application name of the peers `probe_stage` connects to time connecting.
const CONNECT_APP: &str = "load-connect";

fn census(c: &Client) -> Census {
    Census {
        // Not the probe's short-lived connection-time peers: one still listed when a stage
        // starts would make it add one idle peer too few and wait for a size never reached.
        peers: c
            .servers()
            .iter()
            .filter(|s| s.application != CONNECT_APP)
            .count(),
        methods: c.methods_for(&InstanceFilter::default()).len(),
        contexts: c.contexts().all().len(),
    }
}

/// Waits until the probe client sees at least `want` (announcements are asynchronous).
fn wait_census(c: &Client, want: Census, timeout: Duration) -> Result<Census, CliError> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = census(c);
        if now.peers >= want.peers && now.methods >= want.methods && now.contexts >= want.contexts {
            return Ok(now);
        }
        if Instant::now() > deadline {
            return Err(bench_err(
                "load",
                format!("the registry did not reach {want:?} (sees {now:?})"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One registry size's probe figures.
struct ProbeRow {
    stage: &'static str,
    census: Census,
    invoke: Stats,
    invoke_targeted: Stats,
    ctx_create: Stats,
    connect: Stats,
}

/// Latency at the current registry size: `iters` invocations of the probe server (both pinned,
/// one per core), 100 context creations, 10 connections of a new peer.
fn probe_stage(
    probe: &Client,
    socket: &std::path::Path,
    stage: &'static str,
    iters: usize,
    census: Census,
) -> Result<ProbeRow, CliError> {
    let (cpu, _) = cpus();
    std::thread::scope(|s| {
        s.spawn(|| {
            pin(cpu);
            let opts = InvokeOptions {
                target: Target::Best,
                wait: Duration::from_secs(10),
                timeout: Duration::from_secs(10),
            };
            let payload = Value::Bytes(vec![0xAB; 64]);
            let mut k = Series::new();
            let warm = (iters / 10).clamp(10, 2000);
            measure(&mut k, warm, iters.max(1), Duration::ZERO, || {
                let r = probe
                    .invoke(PROBE, payload.clone(), &opts)
                    .map_err(|e| bench_err("probe invoke", e))?;
                match r.returned {
                    Value::Bytes(b) if b.len() == 64 => Ok(()),
                    _ => Err(bench_err("probe", "wrong echo")),
                }
            })?;
            // The same through an instance target: every server of the method is considered
            // (Best stops at the first), as the load's clients do.
            let targeted = InvokeOptions {
                target: Target::Instance(InstanceFilter {
                    instance: Some(PROBE_INSTANCE.into()),
                    ..Default::default()
                }),
                ..opts.clone()
            };
            let mut kt = Series::new();
            measure(&mut kt, warm, iters.max(1), Duration::ZERO, || {
                let r = probe
                    .invoke(PROBE, payload.clone(), &targeted)
                    .map_err(|e| bench_err("probe invoke", e))?;
                match r.returned {
                    Value::Bytes(b) if b.len() == 64 => Ok(()),
                    _ => Err(bench_err("probe", "wrong echo")),
                }
            })?;
            let mut cc = Series::new();
            let mut i = 0;
            measure(&mut cc, 0, 100, Duration::ZERO, || {
                i += 1;
                probe
                    .contexts()
                    .set(
                        &format!("load.probe.{stage}.{i}"),
                        obj(vec![("i", Value::from(i))]),
                    )
                    .map(|_| ())
                    .map_err(Into::into)
            })?;
            // Connecting a new peer (its welcome carries the whole registry); the departure of
            // the previous one is left 50 ms to settle, outside the timing.
            let mut conn = Series::new();
            let mut last = None;
            measure(&mut conn, 1, 10, Duration::from_millis(50), || {
                last = None;
                last = Some(
                    Client::builder(CONNECT_APP)
                        .socket(socket)
                        .wait_strategy(WaitStrategy::Park)
                        .connect()?,
                );
                Ok(())
            })?;
            drop(last);
            Ok(ProbeRow {
                stage,
                census,
                invoke: k.stats(),
                invoke_targeted: kt.stats(),
                ctx_create: cc.stats(),
                connect: conn.stats(),
            })
        })
        .join()
        .map_err(|_| bench_err("probe", "the probe thread panicked"))?
    })
}

/// Idle peers: `peers` clients over processes of up to [`IDLE_PER_PROCESS`], registering
/// `methods` methods and creating `contexts` contexts between them (at least; rounded up per
/// peer).
fn add_idle(
    socket: &std::path::Path,
    wait: &str,
    stage: &str,
    peers: usize,
    methods: usize,
    contexts: usize,
    procs: &mut Vec<Proc>,
) -> Result<(), CliError> {
    let peers = if methods + contexts > 0 {
        peers.max(1)
    } else {
        peers
    };
    if peers == 0 {
        return Ok(());
    }
    let (m, x) = (methods.div_ceil(peers), contexts.div_ceil(peers));
    let first = procs.len();
    let mut left = peers;
    let mut n = 0;
    while left > 0 {
        let k = left.min(IDLE_PER_PROCESS);
        left -= k;
        let args = vec![
            "--socket".into(),
            socket.display().to_string(),
            "--count".into(),
            k.to_string(),
            "--methods".into(),
            m.to_string(),
            "--contexts".into(),
            x.to_string(),
            "--tag".into(),
            format!("{stage}{n}"),
            "--wait".into(),
            wait.into(),
        ];
        procs.push(Proc::spawn(
            "load-idle",
            &args,
            format!("idle peers {stage}{n}"),
        )?);
        n += 1;
    }
    for p in &procs[first..] {
        p.ready(Duration::from_secs(1800))?;
    }
    Ok(())
}

fn stats_value(s: &Stats) -> Value {
    obj(vec![
        ("p50_ns", Value::from(s.p50)),
        ("p99_ns", Value::from(s.p99)),
        ("p999_ns", Value::from(s.p999)),
    ])
}

fn probe_value(r: &ProbeRow, base: &ProbeRow) -> Value {
    let ratio = |a: u64, b: u64| Value::from(round2(a as f64 / b.max(1) as f64));
    obj(vec![
        ("scenario", Value::from("load_probe")),
        ("stage", Value::from(r.stage)),
        ("peers", Value::from(r.census.peers)),
        ("methods", Value::from(r.census.methods)),
        ("contexts", Value::from(r.census.contexts)),
        ("invoke_p50_ns", Value::from(r.invoke.p50)),
        ("invoke_p99_ns", Value::from(r.invoke.p99)),
        ("invoke_p999_ns", Value::from(r.invoke.p999)),
        ("invoke_ratio_p50", ratio(r.invoke.p50, base.invoke.p50)),
        ("invoke_ratio_p99", ratio(r.invoke.p99, base.invoke.p99)),
        ("invoke_targeted", stats_value(&r.invoke_targeted)),
        (
            "invoke_targeted_ratio_p50",
            ratio(r.invoke_targeted.p50, base.invoke_targeted.p50),
        ),
        (
            "invoke_targeted_ratio_p99",
            ratio(r.invoke_targeted.p99, base.invoke_targeted.p99),
        ),
        ("ctx_create", stats_value(&r.ctx_create)),
        (
            "ctx_create_ratio_p50",
            ratio(r.ctx_create.p50, base.ctx_create.p50),
        ),
        ("connect", stats_value(&r.connect)),
        ("connect_ratio_p50", ratio(r.connect.p50, base.connect.p50)),
        ("machine", Value::from(machine())),
    ])
}

/// Expected calls from client `c` at server `s`: the seqs in 0..n with (c + seq) mod S == s.
fn share(c: usize, s: usize, servers: usize, n: u64) -> u64 {
    let first = ((s + servers - c % servers) % servers) as u64;
    if first >= n {
        0
    } else {
        (n - first).div_ceil(servers as u64)
    }
}

/// Samples the gateway's memory every 250 ms on a thread until told to stop; keeps the largest.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Mem>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = Mem::default();
            // Relaxed: a stop flag; the peak comes back through join(), which orders it.
            while !s.load(Ordering::Relaxed) {
                if let Some(m) = mem(pid) {
                    if m.rss > peak.rss {
                        peak = m;
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            peak
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Mem {
        // Relaxed: a stop flag; the thread's result comes back through join() below.
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // Relaxed: a stop flag; nothing is read back from the (detached) thread.
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sum_rss(procs: &[Proc]) -> u64 {
    procs
        .iter()
        .filter_map(|p| mem(p.pid()))
        .map(|m| m.rss)
        .sum()
}

pub(super) fn run(args: &BenchArgs) -> Result<(), CliError> {
    let a = &args.scale;
    if a.clients == 0 || a.servers == 0 || a.calls == 0 {
        return Err(CliError::new(
            Status::InvalidArgument,
            "--clients, --servers and --calls must be at least 1",
        ));
    }
    wait_strategy(&a.wait)?;
    machine();
    let load_start = loadavg();
    // Inherited by every child, the gateway included (which raises its own anyway).
    let (nofile_before, nofile) = knit::sys::limits::raise_nofile()
        .map_err(|e| bench_err("raising the open-file limit", e))?;
    let dir = RunDir::new("load")?;
    let mut gw = GatewayProc::start(&dir.0)?;
    let socket = gw.socket.clone();
    std::thread::sleep(Duration::from_millis(500));
    let gw_idle = mem(gw.pid()).unwrap_or_default();
    let shmem_start = meminfo_kb("Shmem");
    errln!(
        "load: gateway pid {} idle RSS {} (load average {load_start})",
        gw.pid(),
        mib(gw_idle.rss)
    );
    let result = load_with(args, &mut gw, &socket, gw_idle, shmem_start);
    let clean = gw.stop();
    if !clean {
        errln!("load: the gateway did not stop cleanly: {}", gw.log_text());
    }
    let (out, violations) = result?;
    let mut out = out;
    if let Value::Map(m) = &mut out {
        m.insert("gateway_clean_exit".into(), Value::from(clean));
        m.insert(
            "nofile_soft_limit_before".into(),
            nofile_before.map_or(Value::Null, Value::from),
        );
        m.insert(
            "nofile_soft_limit".into(),
            nofile.map_or(Value::Null, Value::from),
        );
        m.insert("loadavg_start".into(), Value::from(load_start));
        m.insert("loadavg_end".into(), Value::from(loadavg()));
    }
    say(&out);
    if violations > 0 {
        return Err(CliError::new(
            Status::Internal,
            format!("load: {violations} violations (see the JSON summary)"),
        ));
    }
    Ok(())
}

/// Everything between starting and stopping the gateway. Returns the summary and the number of
/// violations.
fn load_with(
    args: &BenchArgs,
    gw: &mut GatewayProc,
    socket: &std::path::Path,
    gw_idle: Mem,
    shmem_start: u64,
) -> Result<(Value, u64), CliError> {
    let a = &args.scale;
    let (c_n, s_n, n) = (a.clients, a.servers, a.calls);
    let wait = a.wait.as_str();
    let (_, cpu_server) = cpus();
    let t_setup = Instant::now();

    // The probe: this process (poll mode, spinning while it waits for a reply) and a server.
    let probe = Client::builder("load-probe")
        .socket(socket)
        .poll_mode(true)
        .wait_strategy(WaitStrategy::BusySpin)
        .connect()?;
    let low = Census {
        peers: 2,
        methods: a.methods.min(10),
        contexts: a.contexts.min(10),
    };
    let mid = Census {
        peers: (peers_of(args) / 4).max(low.peers),
        methods: (a.methods / 10).max(low.methods),
        contexts: (a.contexts / 10).max(low.contexts),
    };
    let high = Census {
        peers: peers_of(args).max(mid.peers),
        methods: a.methods.max(mid.methods),
        contexts: a.contexts.max(mid.contexts),
    };
    let mut extra = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--methods".into(),
        low.methods.saturating_sub(1).to_string(),
    ];
    if let Some(c) = cpu_server {
        extra.extend(["--cpu".to_string(), c.to_string()]);
    }
    let probe_server = Proc::spawn("load-probe-server", &extra, "probe server".into())?;
    probe_server.ready(Duration::from_secs(60))?;
    let have = census(&probe).contexts;
    for i in 0..low.contexts.saturating_sub(have) {
        probe
            .contexts()
            .set(&format!("load.pad.{i}"), obj(vec![("i", Value::from(i))]))?;
    }
    let mut rows = Vec::new();
    let c = wait_census(&probe, low, Duration::from_secs(60))?;
    errln!("load: probe at {c:?}");
    rows.push(probe_stage(&probe, socket, "low", a.probe_iters, c)?);

    let mut idle: Vec<Proc> = Vec::new();
    let now = census(&probe);
    add_idle(
        socket,
        wait,
        "mid",
        mid.peers.saturating_sub(now.peers),
        mid.methods.saturating_sub(now.methods),
        mid.contexts.saturating_sub(now.contexts),
        &mut idle,
    )?;
    let c = wait_census(&probe, mid, Duration::from_secs(600))?;
    errln!("load: probe at {c:?}");
    rows.push(probe_stage(&probe, socket, "mid", a.probe_iters, c)?);

    // The load's own peers, then idle ones up to the high mark.
    let mut servers = Vec::new();
    for s in 0..s_n {
        let args = vec![
            "--socket".into(),
            socket.display().to_string(),
            "--index".into(),
            s.to_string(),
            "--clients".into(),
            c_n.to_string(),
            "--servers".into(),
            s_n.to_string(),
            "--wait".into(),
            wait.into(),
        ];
        servers.push(Proc::spawn("load-server", &args, format!("server {s}"))?);
    }
    for p in &servers {
        p.ready(Duration::from_secs(60))?;
    }
    let mut clients = Vec::new();
    for c in 0..c_n {
        let args = vec![
            "--socket".into(),
            socket.display().to_string(),
            "--index".into(),
            c.to_string(),
            "--calls".into(),
            n.to_string(),
            "--servers".into(),
            s_n.to_string(),
            "--wait".into(),
            wait.into(),
        ];
        clients.push(Proc::spawn("load-client", &args, format!("client {c}"))?);
    }
    for p in &clients {
        p.ready(Duration::from_secs(120))?;
    }
    let before_idle = census(&probe);
    let want_now = Census {
        peers: before_idle.peers.max(now.peers + s_n + c_n),
        ..before_idle
    };
    let now = wait_census(&probe, want_now, Duration::from_secs(60))?;
    add_idle(
        socket,
        wait,
        "high",
        high.peers.saturating_sub(now.peers),
        high.methods.saturating_sub(now.methods),
        high.contexts.saturating_sub(now.contexts),
        &mut idle,
    )?;
    let full = wait_census(&probe, high, Duration::from_secs(1800))?;
    let setup_s = t_setup.elapsed().as_secs_f64();
    errln!("load: probe at {full:?} (set-up took {setup_s:.0} s)");
    rows.push(probe_stage(&probe, socket, "high", a.probe_iters, full)?);
    for r in &rows {
        say(&probe_value(r, &rows[0]));
    }

    // The run.
    let full = census(&probe);
    let gw_before = mem(gw.pid()).unwrap_or_default();
    let gw_fds = fd_count(gw.pid());
    let keeper_mem = gw.keeper.and_then(mem).unwrap_or_default();
    let keeper_fds = gw.keeper.map_or(0, fd_count);
    let shmem_full = meminfo_kb("Shmem");
    let idle_rss = sum_rss(&idle);
    let client_rss = sum_rss(&clients);
    let server_rss = sum_rss(&servers);
    let idle_peers = full.peers.saturating_sub(2 + s_n + c_n);
    errln!(
        "load: {} peers, {} methods, {} contexts; gateway RSS {} ({} open descriptors); go: {c_n} clients × {n} calls → {s_n} servers",
        full.peers,
        full.methods,
        full.contexts,
        mib(gw_before.rss),
        gw_fds
    );
    let sampler = Sampler::start(gw.pid());
    let t0 = Instant::now();
    for p in &mut clients {
        p.send("go")?;
    }
    let deadline = t0
        + Duration::from_secs(600).max(
            Duration::from_micros(500) * (c_n as u32).saturating_mul(n.min(u32::MAX as u64) as u32),
        );
    let mut hist = Hist::new();
    let (mut ok, mut errors, mut wrong, mut misrouted, mut lost_clients) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut first_error = String::new();
    for p in &clients {
        let left = deadline.saturating_duration_since(Instant::now());
        match p.line(left) {
            Ok(v) => {
                ok += int(&v, "ok");
                errors += int(&v, "errors");
                wrong += int(&v, "wrong_reply");
                misrouted += int(&v, "misrouted");
                if first_error.is_empty() {
                    if let Some(e) = v.get("first_error").and_then(Value::as_str) {
                        first_error = e.to_string();
                    }
                }
                if let Some(h) = v.get("latency") {
                    hist.merge(&Hist::from_value(h));
                }
            }
            Err(e) => {
                lost_clients += 1;
                if first_error.is_empty() {
                    first_error = e.message.clone();
                }
            }
        }
    }
    let elapsed = t0.elapsed();
    let gw_peak = sampler.finish();
    let during = census(&probe);
    // The servers' account.
    let (mut received, mut dup, mut gap, mut srv_misrouted, mut bad, mut lost_servers) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut pair_mismatches = 0u64;
    for p in &mut servers {
        p.close_stdin();
    }
    for (s, p) in servers.iter().enumerate() {
        match p.line(Duration::from_secs(60)) {
            Ok(v) => {
                received += int(&v, "received");
                dup += int(&v, "duplicates");
                gap += int(&v, "gaps");
                srv_misrouted += int(&v, "misrouted");
                bad += int(&v, "bad_args");
                let counts = match v.get("per_client") {
                    Some(Value::Array(a)) => a.iter().map(|x| x.as_i64().unwrap_or(-1)).collect(),
                    _ => Vec::new(),
                };
                for c in 0..c_n {
                    let want = share(c, s, s_n, n) as i64;
                    if counts.get(c).copied() != Some(want) {
                        pair_mismatches += 1;
                    }
                }
            }
            Err(e) => {
                lost_servers += 1;
                if first_error.is_empty() {
                    first_error = e.message.clone();
                }
            }
        }
    }
    let expected = c_n as u64 * n;
    let reconciled = received == expected && ok == expected && pair_mismatches == 0;
    let violations = errors
        + wrong
        + misrouted
        + dup
        + gap
        + srv_misrouted
        + bad
        + pair_mismatches
        + lost_clients
        + lost_servers
        + u64::from(!reconciled);

    // Tear down: every peer leaves, then the contexts go, measuring the gateway at each step.
    for p in clients
        .iter_mut()
        .chain(servers.iter_mut())
        .chain(idle.iter_mut())
    {
        p.close_stdin();
    }
    let mut unclean = 0;
    for p in clients
        .iter_mut()
        .chain(servers.iter_mut())
        .chain(idle.iter_mut())
    {
        if !p.finish(Duration::from_secs(60)) {
            unclean += 1;
        }
    }
    drop(probe_server);
    let _ = wait_until_peers(&probe, 1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let gw_peers_left = mem(gw.pid()).unwrap_or_default();
    let names = probe.contexts().all();
    for name in names.iter().filter(|n| !n.starts_with("___channel___")) {
        let _ = probe.contexts().destroy(name);
    }
    drop(probe);
    std::thread::sleep(Duration::from_millis(1000));
    let gw_after = mem(gw.pid()).unwrap_or_default();
    let gw_hwm = gw_after.hwm;

    let calls_per_s = expected as f64 / elapsed.as_secs_f64().max(1e-9);
    let high_row = rows.last().map(|r| probe_value(r, &rows[0]));
    let per_idle = if idle_peers > 0 {
        idle_rss / idle_peers as u64
    } else {
        0
    };
    let out = obj(vec![
        ("scenario", Value::from("load")),
        ("clients", Value::from(c_n)),
        ("servers", Value::from(s_n)),
        ("calls_per_client", Value::from(n)),
        ("wait", Value::from(wait)),
        ("expected_calls", Value::from(expected)),
        ("replies_ok", Value::from(ok)),
        ("server_received", Value::from(received)),
        ("reconciled", Value::from(reconciled)),
        ("violations", Value::from(violations)),
        ("call_errors", Value::from(errors)),
        ("wrong_replies", Value::from(wrong)),
        ("misrouted_replies", Value::from(misrouted)),
        ("server_duplicates", Value::from(dup)),
        ("server_gaps", Value::from(gap)),
        ("server_misrouted", Value::from(srv_misrouted)),
        ("server_bad_args", Value::from(bad)),
        ("pair_mismatches", Value::from(pair_mismatches)),
        ("lost_clients", Value::from(lost_clients)),
        ("lost_servers", Value::from(lost_servers)),
        ("first_error", Value::from(first_error.as_str())),
        ("elapsed_s", Value::from(round2(elapsed.as_secs_f64()))),
        ("calls_per_s", Value::from(calls_per_s.round() as u64)),
        // The contract's fields of every row: the calls' arguments are a small object (no
        // payload size is set), every call is an iteration, the rate is the calls'.
        ("size", Value::from(0)),
        ("iters", Value::from(expected)),
        ("msgs_per_s", Value::from(calls_per_s.round())),
        ("p50_ns", Value::from(hist.quantile(0.50))),
        ("p99_ns", Value::from(hist.quantile(0.99))),
        ("p999_ns", Value::from(hist.quantile(0.999))),
        ("max_ns", Value::from(hist.max())),
        ("latency_samples", Value::from(hist.count())),
        ("peers", Value::from(full.peers)),
        ("peers_at_end_of_run", Value::from(during.peers)),
        ("methods", Value::from(full.methods)),
        ("contexts", Value::from(full.contexts)),
        ("setup_s", Value::from(round2(setup_s))),
        ("gateway_rss_idle_kb", Value::from(gw_idle.rss)),
        ("gateway_rss_before_kb", Value::from(gw_before.rss)),
        ("gateway_before", gw_before.to_value()),
        (
            "gateway_rss_peak_run_kb",
            Value::from(gw_peak.rss.max(gw_before.rss)),
        ),
        ("gateway_rss_hwm_kb", Value::from(gw_hwm.max(gw_peak.hwm))),
        (
            "gateway_rss_after_peers_left_kb",
            Value::from(gw_peers_left.rss),
        ),
        ("gateway_rss_after_kb", Value::from(gw_after.rss)),
        ("gateway_after", gw_after.to_value()),
        ("gateway_fds", Value::from(gw_fds)),
        ("keeper", Value::from(gw.keeper.is_some())),
        ("keeper_rss_kb", Value::from(keeper_mem.rss)),
        ("keeper_fds", Value::from(keeper_fds)),
        (
            "system_shmem_delta_kb",
            Value::from(shmem_full.saturating_sub(shmem_start)),
        ),
        ("idle_peers", Value::from(idle_peers)),
        ("idle_processes_rss_kb", Value::from(idle_rss)),
        ("idle_rss_per_peer_kb", Value::from(per_idle)),
        ("client_rss_avg_kb", Value::from(client_rss / c_n as u64)),
        ("server_rss_avg_kb", Value::from(server_rss / s_n as u64)),
        ("unclean_exits", Value::from(unclean)),
        ("probe_high", high_row.unwrap_or(Value::Null)),
        ("machine", Value::from(machine())),
    ]);
    print_table(&out, &rows);
    Ok((out, violations))
}

// ----- scale: what each context, method and peer costs ------------------------------------------

/// The gateway's memory and descriptors, and the system's shared memory, at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct Snap {
    gw: Mem,
    fds: usize,
    /// The keeper's memory and descriptors (zero without a keeper).
    keeper: Mem,
    keeper_fds: usize,
    shmem: u64,
}

/// Waits `SETTLE` (announcements are asynchronous and memory figures lag), then measures.
fn snap(gw_pid: u32, keeper: Option<u32>) -> Snap {
    std::thread::sleep(SETTLE);
    Snap {
        gw: mem(gw_pid).unwrap_or_default(),
        fds: fd_count(gw_pid),
        keeper: keeper.and_then(mem).unwrap_or_default(),
        keeper_fds: keeper.map_or(0, fd_count),
        shmem: meminfo_kb("Shmem"),
    }
}

const SETTLE: Duration = Duration::from_millis(500);

/// Per-item figures between two snapshots, in bytes per item (integer).
fn per_item(what: &str, n: usize, before: Snap, after: Snap, maker: Option<(Mem, usize)>) -> Value {
    let n = n.max(1) as i64;
    let b = |kb_after: u64, kb_before: u64| (kb_after as i64 - kb_before as i64) * 1024 / n;
    let mut pairs = vec![
        ("items", Value::from(what)),
        ("count", Value::from(n)),
        ("gateway_rss_b", Value::from(b(after.gw.rss, before.gw.rss))),
        (
            "gateway_anon_b",
            Value::from(b(after.gw.anon, before.gw.anon)),
        ),
        (
            "gateway_shmem_b",
            Value::from(b(after.gw.shmem, before.gw.shmem)),
        ),
        (
            "gateway_fds",
            Value::from(round2((after.fds as f64 - before.fds as f64) / n as f64)),
        ),
        (
            "keeper_rss_b",
            Value::from(b(after.keeper.rss, before.keeper.rss)),
        ),
        (
            "keeper_fds",
            Value::from(round2(
                (after.keeper_fds as f64 - before.keeper_fds as f64) / n as f64,
            )),
        ),
        ("system_shmem_b", Value::from(b(after.shmem, before.shmem))),
        ("gateway_rss_after_kb", Value::from(after.gw.rss)),
        ("gateway_fds_after", Value::from(after.fds)),
    ];
    if let Some((m, fds)) = maker {
        pairs.push(("maker_rss_kb", Value::from(m.rss)));
        pairs.push(("maker_rss_b", Value::from(m.rss as i64 * 1024 / n)));
        pairs.push(("maker_fds", Value::from(fds)));
    }
    obj(pairs)
}

/// `knit bench scale`: a fresh gateway, then `--contexts` contexts made by one process,
/// `--methods` methods registered by another, `--peers` idle peers; the gateway measured after
/// each step and after each is taken away again. Reports memory and descriptors per item.
pub(super) fn scale(args: &BenchArgs) -> Result<(), CliError> {
    let a = &args.scale;
    wait_strategy(&a.wait)?;
    machine();
    let (nofile_before, nofile) = knit::sys::limits::raise_nofile()
        .map_err(|e| bench_err("raising the open-file limit", e))?;
    let (_, hard) = knit::sys::limits::nofile();
    let dir = RunDir::new("scale")?;
    let mut gw = GatewayProc::start(&dir.0)?;
    let r = scale_with(a, peers_of(args), &gw);
    let clean = gw.stop();
    let mut out = r?;
    if let Value::Map(m) = &mut out {
        m.insert("gateway_clean_exit".into(), Value::from(clean));
        let lim = |x: Option<u64>| x.map_or(Value::Null, Value::from);
        m.insert("nofile_soft_limit_before".into(), lim(nofile_before));
        m.insert("nofile_soft_limit".into(), lim(nofile));
        m.insert("nofile_hard_limit".into(), lim(hard));
    }
    say(&out);
    if !clean {
        return Err(bench_err("scale", "the gateway did not stop cleanly"));
    }
    Ok(())
}

fn scale_with(a: &ScaleArgs, peers: usize, gw: &GatewayProc) -> Result<Value, CliError> {
    let socket = gw.socket.display().to_string();
    let pid = gw.pid();
    let keeper = gw.keeper;
    let idle = snap(pid, keeper);
    errln!(
        "scale: gateway idle RSS {} ({} descriptors)",
        mib(idle.gw.rss),
        idle.fds
    );
    let spawn_maker = |tag: &str, methods: usize, contexts: usize| {
        let args = vec![
            "--socket".into(),
            socket.clone(),
            "--count".into(),
            "1".into(),
            "--methods".into(),
            methods.to_string(),
            "--contexts".into(),
            contexts.to_string(),
            "--tag".into(),
            tag.into(),
            "--wait".into(),
            a.wait.clone(),
        ];
        let t = Instant::now();
        let p = Proc::spawn("load-idle", &args, format!("scale {tag}"))?;
        p.ready(Duration::from_secs(1800))?;
        Ok::<_, CliError>((p, t.elapsed().as_secs_f64()))
    };
    // Contexts.
    let (ctx_maker, ctx_s) = spawn_maker("c", 0, a.contexts)?;
    let with_ctx = snap(pid, keeper);
    let ctx_row = per_item(
        "contexts",
        a.contexts,
        idle,
        with_ctx,
        mem(ctx_maker.pid()).map(|m| (m, fd_count(ctx_maker.pid()))),
    );
    errln!(
        "scale: {} contexts in {ctx_s:.1} s: gateway RSS {}, {} descriptors",
        a.contexts,
        mib(with_ctx.gw.rss),
        with_ctx.fds
    );
    // Methods.
    let (m_maker, m_s) = spawn_maker("m", a.methods, 0)?;
    let with_m = snap(pid, keeper);
    let m_row = per_item(
        "methods",
        a.methods,
        with_ctx,
        with_m,
        mem(m_maker.pid()).map(|m| (m, fd_count(m_maker.pid()))),
    );
    errln!(
        "scale: {} methods in {m_s:.1} s: gateway RSS {}",
        a.methods,
        mib(with_m.gw.rss)
    );
    // Idle peers (nothing registered, nothing created).
    let mut idle_procs = Vec::new();
    let t = Instant::now();
    add_idle(&gw.socket, &a.wait, "p", peers, 0, 0, &mut idle_procs)?;
    let p_s = t.elapsed().as_secs_f64();
    let with_p = snap(pid, keeper);
    let peers_rss = sum_rss(&idle_procs);
    let mut p_row = per_item("peers", peers, with_m, with_p, None);
    if let Value::Map(m) = &mut p_row {
        m.insert("peer_process_rss_kb".into(), Value::from(peers_rss));
        m.insert(
            "peer_process_rss_per_peer_kb".into(),
            Value::from(peers_rss / peers.max(1) as u64),
        );
    }
    errln!(
        "scale: {} idle peers in {p_s:.1} s: gateway RSS {}, {} descriptors",
        peers,
        mib(with_p.gw.rss),
        with_p.fds
    );
    // Taken away again: the peers leave (then come and leave a second time: memory the first
    // round left behind is either reused, or a leak), the method server leaves, the contexts
    // are destroyed.
    let leave = |mut procs: Vec<Proc>| {
        for p in &mut procs {
            p.close_stdin();
        }
        for p in &mut procs {
            p.finish(Duration::from_secs(60));
        }
    };
    leave(idle_procs);
    let peers_gone = snap(pid, keeper);
    let mut again = Vec::new();
    add_idle(&gw.socket, &a.wait, "q", peers, 0, 0, &mut again)?;
    let peers_again = snap(pid, keeper);
    leave(again);
    let peers_gone_again = snap(pid, keeper);
    drop(m_maker);
    let methods_gone = snap(pid, keeper);
    let cleaner = Client::builder("scale-cleaner")
        .socket(&gw.socket)
        .wait_strategy(WaitStrategy::Park)
        .connect()?;
    let mut destroyed = 0usize;
    for name in cleaner.contexts().all() {
        if !name.starts_with("___channel___") && cleaner.contexts().destroy(&name).is_ok() {
            destroyed += 1;
        }
    }
    drop(cleaner);
    drop(ctx_maker);
    let all_gone = snap(pid, keeper);
    let s = |x: Snap| {
        obj(vec![
            ("rss_kb", Value::from(x.gw.rss)),
            ("anon_kb", Value::from(x.gw.anon)),
            ("shmem_kb", Value::from(x.gw.shmem)),
            ("fds", Value::from(x.fds)),
            ("keeper_rss_kb", Value::from(x.keeper.rss)),
            ("keeper_fds", Value::from(x.keeper_fds)),
        ])
    };
    let out = obj(vec![
        ("scenario", Value::from("scale")),
        ("keeper", Value::from(keeper.is_some())),
        ("gateway_rss_idle_kb", Value::from(idle.gw.rss)),
        ("gateway_idle", s(idle)),
        ("contexts", ctx_row),
        ("contexts_create_s", Value::from(round2(ctx_s))),
        ("methods", m_row),
        ("methods_register_s", Value::from(round2(m_s))),
        ("peers", p_row),
        ("peers_connect_s", Value::from(round2(p_s))),
        ("gateway_full", s(with_p)),
        ("gateway_after_peers_left", s(peers_gone)),
        ("gateway_peers_again", s(peers_again)),
        ("gateway_after_peers_left_again", s(peers_gone_again)),
        ("gateway_after_methods_left", s(methods_gone)),
        ("gateway_after_contexts_destroyed", s(all_gone)),
        ("contexts_destroyed", Value::from(destroyed)),
        ("machine", Value::from(machine())),
    ]);
    let row = |v: &Value| {
        let g = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        errln!(
            "  {:>6} {:<9} gateway {:>7.0} B each ({:>6.0} B heap, {:>6.0} B shared), {:>4.2} descriptors; keeper {:>5.0} B, {:>4.2} descriptors; system shared memory {:>7.0} B each",
            g("count"),
            v.get("items").and_then(Value::as_str).unwrap_or(""),
            g("gateway_rss_b"),
            g("gateway_anon_b"),
            g("gateway_shmem_b"),
            g("gateway_fds"),
            g("keeper_rss_b"),
            g("keeper_fds"),
            g("system_shmem_b"),
        );
    };
    errln!("");
    errln!(
        "scale: idle gateway {}, keeper {}",
        mib(idle.gw.rss),
        mib(idle.keeper.rss)
    );
    for k in ["contexts", "methods", "peers"] {
        if let Some(v) = out.get(k) {
            row(v);
        }
    }
    errln!(
        "  gateway RSS: full {}, peers left {}, back {}, left again {}, methods left {}, contexts destroyed {} ({} descriptors)",
        mib(with_p.gw.rss),
        mib(peers_gone.gw.rss),
        mib(peers_again.gw.rss),
        mib(peers_gone_again.gw.rss),
        mib(methods_gone.gw.rss),
        mib(all_gone.gw.rss),
        all_gone.fds
    );
    Ok(out)
}

fn wait_until_peers(c: &Client, n: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while c.servers().len() > n {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn print_table(v: &Value, rows: &[ProbeRow]) {
    let g = |k: &str| int(v, k);
    let us = |ns: u64| format!("{:.1} µs", ns as f64 / 1000.0);
    errln!("");
    errln!(
        "load: {} clients × {} calls → {} servers ({} wait)",
        g("clients"),
        g("calls_per_client"),
        g("servers"),
        v.get("wait").and_then(Value::as_str).unwrap_or("")
    );
    errln!(
        "  calls expected / replied ok / received by servers  {} / {} / {}",
        g("expected_calls"),
        g("replies_ok"),
        g("server_received")
    );
    errln!(
        "  violations {}  (errors {}, wrong replies {}, misrouted {}/{}, duplicates {}, gaps {}, pair mismatches {}, lost processes {})",
        g("violations"),
        g("call_errors"),
        g("wrong_replies"),
        g("misrouted_replies"),
        g("server_misrouted"),
        g("server_duplicates"),
        g("server_gaps"),
        g("pair_mismatches"),
        g("lost_clients") + g("lost_servers"),
    );
    errln!(
        "  {:.1} s, {} calls/s; latency p50 {} p99 {} p99.9 {} max {}",
        v.get("elapsed_s").and_then(Value::as_f64).unwrap_or(0.0),
        g("calls_per_s"),
        us(g("p50_ns")),
        us(g("p99_ns")),
        us(g("p999_ns")),
        us(g("max_ns")),
    );
    errln!(
        "  registry: {} peers, {} methods, {} contexts; gateway {} open descriptors",
        g("peers"),
        g("methods"),
        g("contexts"),
        g("gateway_fds")
    );
    errln!(
        "  gateway RSS: idle {}, full registry {}, peak during run {}, after peers left {}, after contexts destroyed {}",
        mib(g("gateway_rss_idle_kb")),
        mib(g("gateway_rss_before_kb")),
        mib(g("gateway_rss_peak_run_kb")),
        mib(g("gateway_rss_after_peers_left_kb")),
        mib(g("gateway_rss_after_kb")),
    );
    errln!(
        "  idle peers {}: {} RSS in all ({} per peer); system shared memory +{}",
        g("idle_peers"),
        mib(g("idle_processes_rss_kb")),
        mib(g("idle_rss_per_peer_kb")),
        mib(g("system_shmem_delta_kb")),
    );
    errln!("  scale probe (ratios against the smallest registry):");
    errln!("    stage  peers methods contexts | invoke p50    p99      ratio p50/p99 | targeted p50    p99  ratio p50/p99 | ctx create p50 ratio | connect p50 ratio");
    let base = &rows[0];
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    for r in rows {
        errln!(
            "    {:<5} {:>6} {:>7} {:>8} | {:>10} {:>10} {:>5.2}/{:<5.2} | {:>10} {:>10} {:>5.2}/{:<5.2} | {:>10} {:>5.2} | {:>10} {:>5.2}",
            r.stage,
            r.census.peers,
            r.census.methods,
            r.census.contexts,
            us(r.invoke.p50),
            us(r.invoke.p99),
            ratio(r.invoke.p50, base.invoke.p50),
            ratio(r.invoke.p99, base.invoke.p99),
            us(r.invoke_targeted.p50),
            us(r.invoke_targeted.p99),
            ratio(r.invoke_targeted.p50, base.invoke_targeted.p50),
            ratio(r.invoke_targeted.p99, base.invoke_targeted.p99),
            us(r.ctx_create.p50),
            r.ctx_create.p50 as f64 / base.ctx_create.p50.max(1) as f64,
            us(r.connect.p50),
            r.connect.p50 as f64 / base.connect.p50.max(1) as f64,
        );
    }
}

// ----- the children ---------------------------------------------------------------------------

fn socket_of(a: &PeerArgs) -> Result<PathBuf, CliError> {
    a.socket
        .clone()
        .ok_or_else(|| bench_err("peer", "--socket missing"))
}

/// Blocks until stdin reaches end of file (the parent closed it or died).
pub(super) fn wait_eof() {
    let mut sink = [0u8; 256];
    let mut stdin = std::io::stdin();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
}

/// The next line on stdin (empty at end of file).
pub(super) fn read_line() -> String {
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
    s.trim().to_string()
}

/// A server's bookkeeping: for each client, the next seq it must send here.
struct ServerBook {
    next: Vec<u64>,
    count: Vec<u64>,
    received: u64,
    duplicates: u64,
    gaps: u64,
    misrouted: u64,
    bad_args: u64,
}

fn load_server(a: &PeerArgs) -> Result<(), CliError> {
    let sc = &a.scale;
    let me = a.index.unwrap_or(0);
    let (n_clients, n_servers) = (sc.clients.max(1), sc.servers.max(1));
    let client = Client::builder("load-server")
        .socket(socket_of(a)?)
        .instance(format!("load-server-{me}"))
        .wait_strategy(wait_strategy(&sc.wait)?)
        .connect()?;
    let book = Arc::new(Mutex::new(ServerBook {
        next: (0..n_clients)
            .map(|c| ((me + n_servers - c % n_servers) % n_servers) as u64)
            .collect(),
        count: vec![0; n_clients],
        received: 0,
        duplicates: 0,
        gaps: 0,
        misrouted: 0,
        bad_args: 0,
    }));
    let b = book.clone();
    let step = n_servers as u64;
    client.register(ECHO, move |call| {
        let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
        b.received += 1;
        let c = call.args.get("c").and_then(Value::as_i64);
        let seq = call.args.get("seq").and_then(Value::as_i64);
        match (c, seq) {
            (Some(c), Some(seq)) if c >= 0 && (c as usize) < n_clients && seq >= 0 => {
                let (c, seq) = (c as usize, seq as u64);
                if (c as u64 + seq) % step != me as u64 {
                    b.misrouted += 1;
                } else if seq == b.next[c] {
                    b.next[c] += step;
                    b.count[c] += 1;
                } else if seq < b.next[c] {
                    b.duplicates += 1;
                } else {
                    b.gaps += (seq - b.next[c]) / step;
                    b.next[c] = seq + step;
                    b.count[c] += 1;
                }
            }
            _ => b.bad_args += 1,
        }
        Ok(call.args.clone())
    })?;
    say(&obj(vec![
        ("ready", Value::from(true)),
        ("instance", Value::from(client.instance().instance.as_str())),
    ]));
    wait_eof();
    let b = book.lock().unwrap_or_else(|e| e.into_inner());
    say(&obj(vec![
        ("server", Value::from(me)),
        ("received", Value::from(b.received)),
        (
            "per_client",
            Value::Array(b.count.iter().map(|&c| Value::from(c)).collect()),
        ),
        ("duplicates", Value::from(b.duplicates)),
        ("gaps", Value::from(b.gaps)),
        ("misrouted", Value::from(b.misrouted)),
        ("bad_args", Value::from(b.bad_args)),
    ]));
    drop(b);
    drop(client);
    Ok(())
}

fn load_client(a: &PeerArgs) -> Result<(), CliError> {
    let sc = &a.scale;
    let me = a.index.unwrap_or(0);
    let (n, n_servers) = (sc.calls, sc.servers.max(1));
    let client = Client::builder("load-client")
        .socket(socket_of(a)?)
        .instance(format!("load-client-{me}"))
        .poll_mode(true)
        .wait_strategy(wait_strategy(&sc.wait)?)
        .connect()?;
    let names: Vec<String> = (0..n_servers).map(|s| format!("load-server-{s}")).collect();
    // Every server must be known before the run.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = client
            .methods_for(&InstanceFilter {
                application: Some("load-server".into()),
                ..Default::default()
            })
            .iter()
            .filter(|d| d.name == ECHO)
            .count();
        if have >= n_servers {
            break;
        }
        if Instant::now() > deadline {
            return Err(bench_err("load client", "the servers did not appear"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let opts: Vec<InvokeOptions> = names
        .iter()
        .map(|name| InvokeOptions {
            target: Target::Instance(InstanceFilter {
                instance: Some(name.clone()),
                ..Default::default()
            }),
            wait: Duration::from_secs(10),
            timeout: Duration::from_secs(60),
        })
        .collect();
    say(&obj(vec![("ready", Value::from(true))]));
    if read_line() != "go" {
        return Ok(());
    }
    let mut hist = Hist::new();
    let (mut ok, mut errors, mut wrong, mut misrouted) = (0u64, 0u64, 0u64, 0u64);
    let mut first_error = String::new();
    let t0 = Instant::now();
    for seq in 0..n {
        let s = ((me as u64 + seq) % n_servers as u64) as usize;
        let args = obj(vec![("c", Value::from(me)), ("seq", Value::from(seq))]);
        let t = Instant::now();
        let r = client.invoke(ECHO, args.clone(), &opts[s]);
        hist.record(t.elapsed().as_nanos() as u64);
        match r {
            Ok(r) => {
                let by = r.executed_by.as_ref().map(|i| i.instance.as_str());
                if by != Some(names[s].as_str()) {
                    misrouted += 1;
                    if first_error.is_empty() {
                        first_error =
                            format!("call {seq} executed by {by:?}, sent to {}", names[s]);
                    }
                } else if r.returned != args {
                    wrong += 1;
                    if first_error.is_empty() {
                        first_error =
                            format!("call {seq} returned {}", r.returned.to_json_string());
                    }
                } else {
                    ok += 1;
                }
            }
            Err(e) => {
                errors += 1;
                if first_error.is_empty() {
                    first_error = format!("call {seq}: {e}");
                }
            }
        }
    }
    say(&obj(vec![
        ("client", Value::from(me)),
        ("ok", Value::from(ok)),
        ("errors", Value::from(errors)),
        ("wrong_reply", Value::from(wrong)),
        ("misrouted", Value::from(misrouted)),
        ("first_error", Value::from(first_error.as_str())),
        ("elapsed_ns", Value::from(t0.elapsed().as_nanos() as u64)),
        ("latency", hist.to_value()),
    ]));
    // Stay connected until the parent says the run is over, so the peer count holds.
    wait_eof();
    drop(client);
    Ok(())
}

fn load_idle(a: &PeerArgs) -> Result<(), CliError> {
    let sc = &a.scale;
    let socket = socket_of(a)?;
    let wait = wait_strategy(&sc.wait)?;
    let mut clients = Vec::with_capacity(sc.count);
    for k in 0..sc.count {
        let c = Client::builder("load-idle")
            .socket(&socket)
            .instance(format!("idle-{}-{k}", sc.tag))
            .wait_strategy(wait)
            .connect()?;
        for i in 0..sc.methods {
            c.register(format!("Load.Idle.{}.{k}.{i}", sc.tag), |_| Ok(Value::Null))?;
        }
        for i in 0..sc.contexts {
            c.contexts().set(
                &format!("load.idle.{}.{k}.{i}", sc.tag),
                obj(vec![("k", Value::from(k)), ("i", Value::from(i))]),
            )?;
        }
        clients.push(c);
    }
    say(&obj(vec![
        ("ready", Value::from(true)),
        ("peers", Value::from(sc.count)),
        ("methods", Value::from(sc.count * sc.methods)),
        ("contexts", Value::from(sc.count * sc.contexts)),
    ]));
    wait_eof();
    drop(clients);
    Ok(())
}

fn load_probe_server(a: &PeerArgs) -> Result<(), CliError> {
    pin(a.cpu);
    let client = Client::builder("load-probe-server")
        .socket(socket_of(a)?)
        .instance(PROBE_INSTANCE)
        .connect()?;
    client.register_async(PROBE, |call, r| r.ok(call.args))?;
    for i in 0..a.scale.methods {
        client.register(format!("Load.Pad.{i}"), |_| Ok(Value::Null))?;
    }
    say(&obj(vec![("ready", Value::from(true))]));
    wait_eof();
    drop(client);
    Ok(())
}

/// The load roles of `knit __bench-peer`.
pub(super) fn peer(role: &str, a: &PeerArgs) -> Result<(), CliError> {
    match role {
        "load-server" => load_server(a),
        "load-client" => load_client(a),
        "load-idle" => load_idle(a),
        "load-probe-server" => load_probe_server(a),
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
    fn histogram_buckets_are_tight_and_ordered() {
        let mut prev = 0;
        for i in 0..BUCKETS {
            let v = Hist::value(i);
            assert!(v >= prev, "bucket {i}");
            prev = v;
        }
        for v in [
            0u64,
            1,
            255,
            256,
            257,
            1000,
            12_345,
            1 << 20,
            987_654_321,
            u64::MAX / 2,
        ] {
            let m = Hist::value(Hist::index(v));
            let err = (m as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.008, "{v} -> {m}");
        }
        let mut h = Hist::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let h2 = Hist::from_value(&h.to_value());
        assert_eq!(h2.count(), 1000);
        let p50 = h2.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.01, "{p50}");
        assert_eq!(h2.max(), 1_000_000);
    }

    #[test]
    fn shares_add_up() {
        for servers in 1..6 {
            for clients in 1..9 {
                for n in [0u64, 1, 2, 7, 100, 1001] {
                    for c in 0..clients {
                        let total: u64 = (0..servers).map(|s| share(c, s, servers, n)).sum();
                        assert_eq!(total, n);
                        for s in 0..servers {
                            let direct = (0..n)
                                .filter(|seq| (c as u64 + seq) % servers as u64 == s as u64)
                                .count() as u64;
                            assert_eq!(share(c, s, servers, n), direct);
                        }
                    }
                }
            }
        }
    }
}
