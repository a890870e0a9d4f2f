//! `knit bench`: cross-process latency and throughput, always against baselines measured in the
//! same run on the same machine (the machines are shared and noisy; absolute numbers from another
//! day mean little, ratios do).
//!
//! `rpc` measures knit's method round trip between two processes pinned to different cores, and
//! in the same run:
//! * a raw shared-memory ping-pong through a bare SPSC ring written here without any knit code
//!   (`baseline_shm_*`), the floor for the spinning mode;
//! * a Unix-socket ping-pong (`baseline_uds_*`, blocking reads);
//! * a bare futex ping-pong (`baseline_futex_*`), the floor for the parked mode.
//!
//! Each scenario alternates baseline and knit in several rounds, so that a noisy neighbour hurts
//! both alike. Peers are child processes of this binary (`knit __bench-peer ROLE`).

use super::CliError;
use knit::client::{Client, InvokeOptions};
use knit::gateway::{Gateway, GatewayConfig};
use knit::model::Target;
use knit::wait::WaitStrategy;
use knit::{Status, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "bench_data.rs"]
mod data;
#[path = "bench_load.rs"]
mod load;
#[path = "bench_relay.rs"]
pub(crate) mod relay;
#[path = "bench_restart.rs"]
mod restart;
#[path = "bench_soak.rs"]
mod soak;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// rpc, ctx, bus, stream, all (those four); or the long runs, not part of all: restart
    /// (gateway SIGKILL and restart), load, scale, soak.
    scenario: String,
    /// One payload size in bytes (default: 8, 64, 1024 and 65536).
    #[arg(long)]
    size: Option<usize>,
    /// Measured round trips per size and mode (split over the rounds).
    #[arg(long, default_value_t = 20_000)]
    iters: usize,
    /// Only this mode: spin or park.
    #[arg(long)]
    mode: Option<String>,
    /// Rounds alternating baseline and knit (default 3; restart: 20 gateway restarts).
    #[arg(long)]
    rounds: Option<usize>,
    /// restart: client processes (default 8); load, scale: peers connected (default 256).
    #[arg(long)]
    peers: Option<usize>,
    /// One JSON object per scenario row instead of a table.
    #[arg(long)]
    json: bool,
    /// load, scale and soak (not part of `all`).
    #[command(flatten)]
    scale: load::ScaleArgs,
}

#[derive(clap::Args, Debug)]
pub struct PeerArgs {
    role: String,
    /// Subscriptions (ctx), or messages expected (throughput roles).
    #[arg(long, default_value_t = 1)]
    n: u64,
    /// Context name, topic or stream.
    #[arg(long, default_value = "bench")]
    name: String,
    #[arg(long)]
    fd: Option<i32>,
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long, default_value = "spin")]
    mode: String,
    #[arg(long)]
    cpu: Option<usize>,
    /// This peer's number among `n` (restart), or among the clients or servers (load).
    #[arg(long)]
    index: Option<usize>,
    #[command(flatten)]
    scale: load::ScalePeerArgs,
}

/// Latency percentiles of one series, in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    p50: u64,
    p99: u64,
    p999: u64,
    msgs_per_s: f64,
}

impl Stats {
    /// Percentiles of `samples` (ns) and their rate over `elapsed`; with `elapsed` zero, the
    /// rate of a loop that ran them one after another (samples over their sum).
    fn of(mut samples: Vec<u64>, elapsed: Duration) -> Stats {
        if samples.is_empty() {
            return Stats::default();
        }
        let secs = if elapsed.is_zero() {
            samples.iter().map(|&n| n as f64).sum::<f64>() / 1e9
        } else {
            elapsed.as_secs_f64()
        };
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        Stats {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            msgs_per_s: samples.len() as f64 / secs.max(1e-9),
        }
    }
}

struct Series {
    samples: Vec<u64>,
    elapsed: Duration,
}

impl Series {
    fn new() -> Self {
        Self {
            samples: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }
    fn stats(self) -> Stats {
        Stats::of(self.samples, self.elapsed)
    }
}

/// Times `n` calls of `f` (after `warm` unmeasured ones) into `s`. With a `gap`, the thread
/// sleeps that long before each call, outside the timed region (and outside `elapsed`).
fn measure(
    s: &mut Series,
    warm: usize,
    n: usize,
    gap: Duration,
    mut f: impl FnMut() -> Result<(), CliError>,
) -> Result<(), CliError> {
    for _ in 0..warm {
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
        f()?;
    }
    for _ in 0..n {
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
        let t = Instant::now();
        f()?;
        let d = t.elapsed();
        s.samples.push(d.as_nanos() as u64);
        s.elapsed += d;
    }
    Ok(())
}

fn bench_err(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::new(Status::Internal, format!("{what}: {e}"))
}

fn cpus() -> (Option<usize>, Option<usize>) {
    let c = knit::sys::affinity::available_cpus();
    match c.as_slice() {
        [a, b, ..] => (Some(*a), Some(*b)),
        _ => (None, None),
    }
}

fn pin(cpu: Option<usize>) {
    if let Some(c) = cpu {
        let _ = knit::sys::affinity::pin_current_thread(c);
    }
}

fn machine() -> String {
    static MACHINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MACHINE.get_or_init(machine_now).clone()
}

fn machine_now() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{model}, {} CPUs available",
        knit::sys::affinity::available_cpus().len()
    )
}

// ----- what an interrupted bench leaves behind ------------------------------------------------

/// The private directories (gateway socket, lock, logs) of the running bench, removed by
/// [`on_signal_clean_up`] when SIGINT or SIGTERM ends the bench before it removes them itself.
static RUN_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// `dir` is to be removed if the bench is interrupted (until [`forget_dir`]).
pub(super) fn track_dir(dir: &std::path::Path) {
    RUN_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.to_path_buf());
}

/// `dir` was removed (or handed on) by the bench itself.
pub(super) fn forget_dir(dir: &std::path::Path) {
    RUN_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|d| d != dir);
}

/// Makes SIGINT and SIGTERM end the bench the way a normal return does as far as files go: the
/// directories it made are removed, then it exits with 128 + the signal's number (130, 143).
/// Its child peers die with it (the terminal's SIGINT reaches them too; otherwise their
/// parent-death signal or their closed pipes end them).
fn on_signal_clean_up() -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| bench_err("signal handling", e))?;
    // Registered here, before the bench starts: from now on the signals are ours to act on.
    let (mut int, mut term) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .map_err(|e| bench_err("signal handling", e))?;
    std::thread::Builder::new()
        .name("knit-bench-signals".into())
        .spawn(move || {
            let code = rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => 130,
                    _ = term.recv() => 143,
                }
            });
            let dirs = std::mem::take(&mut *RUN_DIRS.lock().unwrap_or_else(|e| e.into_inner()));
            for d in dirs {
                let _ = std::fs::remove_dir_all(d);
            }
            errln!("knit: bench interrupted");
            std::process::exit(code);
        })
        .map_err(|e| bench_err("signal handling", e))?;
    Ok(())
}

/// The payload limit of the private gateways the bench starts (their default).
fn max_payload() -> u64 {
    knit::gateway::Limits::default().max_payload
}

/// Refuses what a scenario would not measure as asked: a mode it does not run in, a size its
/// baseline cannot carry or the gateway would refuse.
fn check_args(args: &BenchArgs) -> Result<(), CliError> {
    let usage = |m: String| Err(CliError::new(Status::InvalidArgument, m));
    let scenario = args.scenario.as_str();
    let data = matches!(scenario, "ctx" | "bus" | "stream" | "all");
    if let Some(m) = args.mode.as_deref() {
        match (scenario, m) {
            (_, m) if m != "spin" && m != "park" => {
                return usage(format!("unknown mode {m:?}: spin or park"))
            }
            ("rpc", _) | ("ctx" | "bus" | "stream" | "all", "spin") => {}
            ("ctx" | "bus" | "stream" | "all", _) => {
                return usage(format!(
                    "bench {scenario} measures spin mode only (ctx, bus and stream subscribers \
                     spin); --mode park applies to bench rpc"
                ))
            }
            _ => return usage(format!("bench {scenario} does not take --mode")),
        }
    }
    if let Some(size) = args.size {
        if data && size < 8 {
            return usage(format!(
                "--size {size}: bench {scenario} needs at least 8 bytes (each message carries \
                 an 8-byte timestamp)"
            ));
        }
        if size == 0 {
            return usage(
                "--size 0: a round trip needs at least 1 byte (the Unix-socket baseline sends \
                 the payload)"
                    .into(),
            );
        }
        let max = max_payload();
        if size as u64 > max {
            return Err(CliError::new(
                Status::PayloadTooLarge,
                format!(
                    "--size {size} is over the payload limit of the bench's gateway ({max} bytes)"
                ),
            ));
        }
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<(), CliError> {
    check_args(&args)?;
    on_signal_clean_up()?;
    match args.scenario.as_str() {
        "rpc" => rpc(&args),
        "ctx" => data::ctx(&args),
        "bus" => data::bus(&args),
        "stream" => data::stream(&args),
        "restart" => restart::restart(&args),
        "load" => load::run(&args),
        "soak" => soak::run(&args),
        "scale" => load::scale(&args),
        "all" => {
            // Each scenario pins this thread; threads started later (a client's dispatcher)
            // inherit that, so the next scenario starts from the process's own CPU set again
            // (else its dispatcher would share one core with the pinned sender).
            let cpus = knit::sys::affinity::available_cpus();
            let unpin = || {
                let _ = knit::sys::affinity::allow_current_thread(&cpus);
            };
            rpc(&args)?;
            unpin();
            data::ctx(&args)?;
            unpin();
            data::bus(&args)?;
            unpin();
            data::stream(&args)
        }
        other => Err(CliError::new(
            Status::InvalidArgument,
            format!("unknown bench scenario {other:?}"),
        )),
    }
}

/// Waits up to `timeout` for `child` to exit, then kills it; reaps it either way. Its exit
/// status when it exited by itself.
fn reap_within(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn exe() -> Result<PathBuf, CliError> {
    std::env::current_exe().map_err(|e| bench_err("locating knit", e))
}

/// A child peer; killed (and reaped) when dropped.
struct Peer {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Peer {
    /// The next line the peer prints.
    fn line(&mut self) -> Result<String, CliError> {
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .map_err(|e| bench_err("peer", e))?;
        if line.is_empty() {
            return Err(bench_err("peer", "exited early"));
        }
        Ok(line)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_peer(role: &str, extra: &[String], fd: Option<&OwnedFd>) -> Result<Peer, CliError> {
    let mut cmd = Command::new(exe()?);
    // An interrupted bench exits at once (`on_signal_clean_up`): its peers go with it.
    load::die_with_parent(&mut cmd, rustix::process::Signal::KILL);
    cmd.arg("__bench-peer")
        .arg(role)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(fd) = fd {
        // Let the child inherit this one descriptor.
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())
            .map_err(|e| bench_err("fcntl", e))?;
        cmd.arg("--fd").arg(fd.as_raw_fd().to_string());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| bench_err("spawning a bench peer", e))?;
    if let Some(fd) = fd {
        let _ = rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC);
    }
    // Wait for its "ready" line.
    let out = child
        .stdout
        .take()
        .ok_or_else(|| bench_err("peer", "no stdout"))?;
    let mut peer = Peer {
        child,
        out: BufReader::new(out),
    };
    let line = peer.line()?;
    if !line.contains("ready") {
        return Err(bench_err("bench peer did not start", line.trim()));
    }
    Ok(peer)
}

// ----- the bare ring (baseline; deliberately no knit code) ------------------------------------

/// Slots of the latency rings (few: always hot in cache, the tightest floor).
const SLOTS: u64 = 4;

/// Two directions of a fixed-slot SPSC ring in one memfd.
struct Bare {
    base: *mut u8,
    len: usize,
    slot: usize,
    slots: u64,
}

impl Bare {
    fn layout(size: usize, slots: u64) -> (usize, usize) {
        let slot = (8 + size).div_ceil(64) * 64;
        (slot, 4096 + 2 * slots as usize * slot)
    }

    fn create(size: usize) -> Result<(Bare, OwnedFd), CliError> {
        Self::create_with(size, SLOTS)
    }

    fn create_with(size: usize, slots: u64) -> Result<(Bare, OwnedFd), CliError> {
        let (_, len) = Self::layout(size, slots);
        let fd = rustix::fs::memfd_create("knit-bench", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| bench_err("memfd", e))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(|e| bench_err("ftruncate", e))?;
        Ok((Self::map_with(&fd, size, slots)?, fd))
    }

    fn map(fd: impl AsFd, size: usize) -> Result<Bare, CliError> {
        Self::map_with(fd, size, SLOTS)
    }

    fn map_with(fd: impl AsFd, size: usize, slots: u64) -> Result<Bare, CliError> {
        let (slot, len) = Self::layout(size, slots);
        // SAFETY: a fresh shared mapping of a memfd we sized to `len`.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| bench_err("mmap", e))?;
        Ok(Bare {
            base: base.cast(),
            len,
            slot,
            slots,
        })
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of the fixed 128-aligned control offsets inside the mapping.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn futex_word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as in `word`.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    fn send(&self, dir: usize, bytes: &[u8]) {
        let (head, tail) = (self.word(dir * 256), self.word(dir * 256 + 128));
        // Relaxed: the tail is ours; only this direction's one sender stores it.
        let t = tail.load(Ordering::Relaxed);
        // SYNC(head): pairs with `recv`'s Release store of `head`: the reader is done copying
        // a slot out before we see it free and overwrite it.
        while t - head.load(Ordering::Acquire) >= self.slots {
            std::hint::spin_loop();
        }
        let off = 4096 + (dir * self.slots as usize + (t % self.slots) as usize) * self.slot;
        // SAFETY: the slot is inside the mapping and free (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (bytes.len() as u64).to_le_bytes().as_ptr(),
                self.base.add(off),
                8,
            );
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(off + 8), bytes.len());
        }
        // SYNC(tail): the slot's length and bytes written above are visible to a reader that
        // sees the new tail.
        tail.store(t + 1, Ordering::Release);
    }

    fn recv(&self, dir: usize, out: &mut Vec<u8>) -> bool {
        let (head, tail) = (self.word(dir * 256), self.word(dir * 256 + 128));
        // Relaxed: the head is ours; only this direction's one reader stores it.
        let h = head.load(Ordering::Relaxed);
        // SYNC(tail): pairs with the Release store in `send`/`stop`: the slot's bytes are visible.
        while tail.load(Ordering::Acquire) == h {
            std::hint::spin_loop();
        }
        let off = 4096 + (dir * self.slots as usize + (h % self.slots) as usize) * self.slot;
        let mut n = [0u8; 8];
        // SAFETY: the slot is inside the mapping and published (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(off), n.as_mut_ptr(), 8) };
        let n = u64::from_le_bytes(n);
        let stop = n == u64::MAX;
        let n = (n as usize).min(self.slot - 8);
        out.resize(if stop { 0 } else { n }, 0);
        // SAFETY: as above; `n` is clamped to the slot.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(off + 8), out.as_mut_ptr(), out.len())
        };
        // SYNC(head): our copies out of the slot happen before the sender reuses it.
        head.store(h + 1, Ordering::Release);
        !stop
    }

    fn stop(&self, dir: usize) {
        let (head, tail) = (self.word(dir * 256), self.word(dir * 256 + 128));
        // Relaxed: the tail is ours; only this direction's one sender stores it.
        let t = tail.load(Ordering::Relaxed);
        // SYNC(head): pairs with `recv`'s Release store of `head`: the reader is done copying
        // a slot out before we see it free and overwrite it.
        while t - head.load(Ordering::Acquire) >= self.slots {
            std::hint::spin_loop();
        }
        let off = 4096 + (dir * self.slots as usize + (t % self.slots) as usize) * self.slot;
        // SAFETY: as in `send`.
        unsafe {
            std::ptr::copy_nonoverlapping(u64::MAX.to_le_bytes().as_ptr(), self.base.add(off), 8)
        };
        // SYNC(tail): the stop marker written above is visible to a reader that sees the tail.
        tail.store(t + 1, Ordering::Release);
    }
}

// SAFETY: `Bare` is a pointer into a shared mapping it owns; every access goes through atomics
// or copies of slots handed over by the ring's atomic indices, from any thread.
unsafe impl Send for Bare {}
// SAFETY: as above.
unsafe impl Sync for Bare {}

impl Drop for Bare {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`.
        unsafe {
            let _ = rustix::mm::munmap(self.base.cast(), self.len);
        }
    }
}

fn futex_wait(w: &AtomicU32, v: u32) {
    let _ = rustix::thread::futex::wait(w, rustix::thread::futex::Flags::empty(), v, None);
}

fn futex_wake(w: &AtomicU32) {
    let _ = rustix::thread::futex::wake(w, rustix::thread::futex::Flags::empty(), 1);
}

// ----- peers ----------------------------------------------------------------------------------

fn ready() {
    outln!("ready");
    let _ = std::io::stdout().flush();
}

fn inherited(fd: Option<i32>) -> Result<OwnedFd, CliError> {
    let fd = fd.ok_or_else(|| bench_err("peer", "--fd missing"))?;
    // SAFETY: the parent passed us this descriptor number, open and inherited, and nothing
    // else in this process owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

pub fn peer(a: PeerArgs) -> Result<(), CliError> {
    pin(a.cpu);
    match a.role.as_str() {
        "raw-shm" => {
            let fd = inherited(a.fd)?;
            let bare = Bare::map(&fd, a.size)?;
            ready();
            let mut buf = Vec::with_capacity(a.size);
            while bare.recv(0, &mut buf) {
                bare.send(1, &buf);
            }
        }
        "futex" => {
            let fd = inherited(a.fd)?;
            let bare = Bare::map(&fd, 8)?;
            let (ping, pong) = (bare.futex_word(1024), bare.futex_word(2048));
            ready();
            let mut seen = 0;
            loop {
                // SYNC(ping): both loads pair with the parent's Release stores in `futex_round`;
                // the word is the whole message, so nothing else needs to ride on the pairing.
                while ping.load(Ordering::Acquire) == seen {
                    futex_wait(ping, seen);
                }
                seen = ping.load(Ordering::Acquire);
                if seen == u32::MAX {
                    break;
                }
                // SYNC(pong): pairs with the parent's Acquire wait; again only the word itself.
                pong.store(seen, Ordering::Release);
                futex_wake(pong);
            }
        }
        "uds" => {
            let fd = inherited(a.fd)?;
            let mut s = std::os::unix::net::UnixStream::from(fd);
            ready();
            let mut buf = vec![0u8; a.size];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        }
        "rpc-server" => {
            let wait = WaitStrategy::parse(&a.mode).ok_or_else(|| bench_err("peer", "bad mode"))?;
            let socket = a
                .socket
                .ok_or_else(|| bench_err("peer", "--socket missing"))?;
            let client = Client::builder("bench-server")
                .socket(socket)
                .wait_strategy(wait)
                .connect()?;
            client.register_async("bench.echo", |call, r| r.ok(call.args))?;
            ready();
            // Serve until the parent closes our stdin (or kills us).
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            drop(client);
        }
        "restart-peer" => return restart::peer(&a),
        other if other.starts_with("load-") => return load::peer(other, &a),
        other if other.starts_with("soak-") => return soak::peer(other, &a),
        other => return data::peer(other, &a),
    }
    Ok(())
}

// ----- scenarios ------------------------------------------------------------------------------

fn raw_shm_round(
    size: usize,
    n: usize,
    warm: usize,
    cpu: Option<usize>,
    s: &mut Series,
) -> Result<(), CliError> {
    let (bare, fd) = Bare::create(size)?;
    let cpu_arg = cpu
        .map(|c| vec!["--cpu".into(), c.to_string()])
        .unwrap_or_default();
    let _peer = spawn_peer(
        "raw-shm",
        &[&["--size".to_string(), size.to_string()][..], &cpu_arg].concat(),
        Some(&fd),
    )?;
    let payload = vec![0xABu8; size];
    let mut buf = Vec::with_capacity(size);
    let r = measure(s, warm, n, Duration::ZERO, || {
        bare.send(0, &payload);
        bare.recv(1, &mut buf);
        if buf.len() != size {
            return Err(bench_err("raw-shm baseline", "short echo"));
        }
        Ok(())
    });
    bare.stop(0);
    r
}

fn uds_round(
    size: usize,
    n: usize,
    warm: usize,
    cpu: Option<usize>,
    s: &mut Series,
) -> Result<(), CliError> {
    let (mut a, b) =
        std::os::unix::net::UnixStream::pair().map_err(|e| bench_err("socketpair", e))?;
    let b: OwnedFd = b.into();
    let cpu_arg = cpu
        .map(|c| vec!["--cpu".into(), c.to_string()])
        .unwrap_or_default();
    let _peer = spawn_peer(
        "uds",
        &[&["--size".to_string(), size.to_string()][..], &cpu_arg].concat(),
        Some(&b),
    )?;
    drop(b);
    let payload = vec![0xABu8; size];
    let mut buf = vec![0u8; size];
    measure(s, warm, n, Duration::ZERO, || {
        a.write_all(&payload).map_err(|e| bench_err("uds", e))?;
        a.read_exact(&mut buf).map_err(|e| bench_err("uds", e))
    })
}

fn futex_round(
    n: usize,
    warm: usize,
    cpu: Option<usize>,
    gap: Duration,
    s: &mut Series,
) -> Result<(), CliError> {
    let (bare, fd) = Bare::create(8)?;
    let cpu_arg = cpu
        .map(|c| vec!["--cpu".into(), c.to_string()])
        .unwrap_or_default();
    let _peer = spawn_peer("futex", &cpu_arg, Some(&fd))?;
    let (ping, pong) = (bare.futex_word(1024), bare.futex_word(2048));
    let mut seq = 0u32;
    let r = measure(s, warm, n, gap, || {
        seq += 1;
        // SYNC(ping): pairs with the peer's Acquire wait; the word is the whole message.
        ping.store(seq, Ordering::Release);
        futex_wake(ping);
        // SYNC(pong): pairs with the peer's Release echo; only the word itself is read.
        while pong.load(Ordering::Acquire) != seq {
            futex_wait(pong, seq - 1);
        }
        Ok(())
    });
    // SYNC(ping): the stop value, same pairing as the rounds above.
    ping.store(u32::MAX, Ordering::Release);
    futex_wake(ping);
    r
}

fn rpc_round(
    socket: &std::path::Path,
    size: usize,
    mode: &str,
    n: usize,
    warm: usize,
    cpu: Option<usize>,
    s: &mut Series,
) -> Result<(), CliError> {
    let (server_wait, client_wait, gap) = match mode {
        "spin" => ("spin", WaitStrategy::BusySpin, Duration::ZERO),
        // Both sides on the default strategy; a pause longer than the spin budget between calls
        // lets the server fall asleep, so every call has to wake it.
        _ => (
            "spin-then-park",
            WaitStrategy::default(),
            Duration::from_micros(200),
        ),
    };
    let mut extra = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--mode".into(),
        server_wait.into(),
    ];
    if let Some(c) = cpu {
        extra.extend(["--cpu".into(), c.to_string()]);
    }
    let _peer = spawn_peer("rpc-server", &extra, None)?;
    let client = Client::builder("bench-client")
        .socket(socket)
        .poll_mode(true)
        .wait_strategy(client_wait)
        .connect()?;
    let opts = InvokeOptions {
        target: Target::Best,
        wait: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
    };
    let payload = Value::Bytes(vec![0xAB; size]);
    measure(s, warm, n, gap, || {
        // With its status: a payload over the gateway's limit is exit 8, not an internal error.
        let r = client
            .invoke("bench.echo", payload.clone(), &opts)
            .map_err(|e| CliError::new(e.status(), format!("invoke: {e}")))?;
        match r.returned {
            Value::Bytes(b) if b.len() == size => Ok(()),
            _ => Err(bench_err("rpc", "wrong echo")),
        }
    })
}

fn row(
    scenario: &str,
    mode: &str,
    size: usize,
    iters: usize,
    knit: Stats,
    baselines: &[(&str, Stats)],
) -> Value {
    let mut m = knit::wire::Map::new();
    m.insert("scenario".into(), Value::from(scenario));
    m.insert("mode".into(), Value::from(mode));
    m.insert("size".into(), Value::from(size));
    m.insert("iters".into(), Value::from(iters));
    m.insert("p50_ns".into(), Value::from(knit.p50));
    m.insert("p99_ns".into(), Value::from(knit.p99));
    m.insert("p999_ns".into(), Value::from(knit.p999));
    m.insert("msgs_per_s".into(), Value::from(knit.msgs_per_s.round()));
    for (name, b) in baselines {
        m.insert(format!("baseline_{name}_p50_ns"), Value::from(b.p50));
        m.insert(format!("baseline_{name}_p99_ns"), Value::from(b.p99));
        m.insert(format!("baseline_{name}_p999_ns"), Value::from(b.p999));
        m.insert(
            format!("ratio_p50_vs_{name}"),
            Value::from((knit.p50 as f64 / b.p50.max(1) as f64 * 100.0).round() / 100.0),
        );
    }
    m.insert("machine".into(), Value::from(machine()));
    Value::Map(m)
}

fn rpc(args: &BenchArgs) -> Result<(), CliError> {
    let sizes = match args.size {
        Some(s) => vec![s],
        None => vec![8, 64, 1024, 65536],
    };
    let modes: Vec<&str> = match args.mode.as_deref() {
        Some("spin") => vec!["spin"],
        Some("park") => vec!["park"],
        None => vec!["spin", "park"],
        Some(m) => {
            return Err(CliError::new(
                Status::InvalidArgument,
                format!("unknown mode {m}"),
            ))
        }
    };
    let rounds = args.rounds.unwrap_or(3).max(1);
    let per_round = (args.iters / rounds).max(1);
    let warm = (per_round / 10).clamp(10, 2000);
    let (cpu_client, cpu_server) = cpus();
    machine(); // read before pinning narrows what we see
    pin(cpu_client);
    // A private gateway, so the bench needs nothing running and disturbs nothing.
    let dir = std::env::temp_dir().join(format!("knit-bench-{}", std::process::id()));
    track_dir(&dir);
    let gw = Gateway::bind(GatewayConfig::new(dir.join("gw.sock")))
        .map_err(|e| bench_err("gateway", e))?
        .spawn()
        .map_err(|e| bench_err("gateway", e))?;
    let socket = gw.socket_path().to_path_buf();
    let mut rows = Vec::new();
    let result = (|| {
        for &mode in &modes {
            for &size in &sizes {
                let (mut k, mut shm, mut uds, mut fx) =
                    (Series::new(), Series::new(), Series::new(), Series::new());
                for _ in 0..rounds {
                    if mode == "spin" {
                        raw_shm_round(size, per_round, warm, cpu_server, &mut shm)?;
                        uds_round(size, per_round, warm, cpu_server, &mut uds)?;
                        rpc_round(&socket, size, mode, per_round, warm, cpu_server, &mut k)?;
                    } else {
                        let n = (per_round / 4).max(1);
                        futex_round(
                            n,
                            warm.min(200),
                            cpu_server,
                            Duration::from_micros(200),
                            &mut fx,
                        )?;
                        rpc_round(&socket, size, mode, n, warm.min(200), cpu_server, &mut k)?;
                    }
                }
                let n = k.samples.len();
                let r = if mode == "spin" {
                    row(
                        "rpc",
                        mode,
                        size,
                        n,
                        k.stats(),
                        &[("shm", shm.stats()), ("uds", uds.stats())],
                    )
                } else {
                    row("rpc", mode, size, n, k.stats(), &[("futex", fx.stats())])
                };
                if args.json {
                    outln!("{}", r.to_json_string());
                } else {
                    print_row(&r);
                }
                rows.push(r);
            }
        }
        Ok(())
    })();
    gw.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    forget_dir(&dir);
    result
}

fn print_row(r: &Value) {
    let g = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let us = |k: &str| format!("{:.2}", g(k) / 1000.0);
    let base = if r.get("baseline_shm_p50_ns").is_some() {
        "shm"
    } else {
        "futex"
    };
    outln!(
        "rpc {:<5} {:>6} B  knit p50 {:>8} µs p99 {:>8} µs p99.9 {:>8} µs | {base} p50 {:>7} µs | ratio {:.2}{}",
        r.get("mode").and_then(Value::as_str).unwrap_or(""),
        g("size"),
        us("p50_ns"),
        us("p99_ns"),
        us("p999_ns"),
        us(&format!("baseline_{base}_p50_ns")),
        g(&format!("ratio_p50_vs_{base}")),
        if base == "shm" { format!(" | uds p50 {} µs", us("baseline_uds_p50_ns")) } else { String::new() },
    );
}
