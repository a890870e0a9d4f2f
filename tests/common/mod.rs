//! Helpers shared by the integration tests: unique temporary directories, a gateway embedded in
//! the test process, child processes that are killed and reaped when their guard drops (even
//! when a test fails), the real `knit` binary started as a gateway or a server, the test binary
//! re-executed as a child process in a role, and commands run under a deadline.
//!
//! Every wait here is bounded: a test that would hang fails with a message instead.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use knit::client::{Client, ClientBuilder};
use knit::gateway::{Gateway, GatewayConfig, GatewayHandle};
use serde_json::Value as Json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long anything that should be quick (a process starting, a socket appearing) may take
/// before the test gives up. Generous: the machine is shared.
pub const STARTUP: Duration = Duration::from_secs(15);

/// The `knit` binary under test.
pub fn knit_bin() -> &'static str {
    env!("CARGO_BIN_EXE_knit")
}

/// A directory of its own for one test, removed on drop. Short, so socket paths stay well
/// under the 108-byte limit of `sun_path`.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("knit-{tag}-{}-{n}-{nanos:x}", std::process::id()));
        // Private (0700), as the gateway wants its socket directory.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .expect("creating a temporary directory");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket path tests use inside this directory.
    pub fn socket(&self) -> PathBuf {
        self.path.join("gw.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A gateway running inside the test process on a socket of its own (in a [`TempDir`] named
/// after the test crate and `tag`, so tests running side by side never share one), stopped and
/// then its directory removed when dropped.
#[derive(Debug)]
pub struct Env {
    // Declared before `dir`: the gateway stops before its directory goes.
    gw: GatewayHandle,
    dir: TempDir,
}

impl Env {
    /// A gateway with the default configuration.
    pub fn new(tag: &str) -> Env {
        Env::with(tag, |_| {})
    }

    /// A gateway whose configuration `configure` adjusts first (limits, a policy, channels…).
    pub fn with(tag: &str, configure: impl FnOnce(&mut GatewayConfig)) -> Env {
        let dir = TempDir::new(&format!("{}-{tag}", env!("CARGO_CRATE_NAME")));
        let mut cfg = GatewayConfig::new(dir.socket());
        configure(&mut cfg);
        Env {
            gw: spawn_gateway(cfg),
            dir,
        }
    }

    /// Where the gateway listens.
    pub fn socket(&self) -> &Path {
        self.gw.socket_path()
    }

    /// Where the gateway's WebSocket bridge listens (its configuration must have one).
    pub fn ws(&self) -> SocketAddr {
        self.gw
            .ws_addr()
            .expect("the gateway runs a WebSocket bridge")
    }

    /// The bridge token of this user, which the gateway wrote next to its socket.
    pub fn token(&self) -> String {
        knit::bridge::read_token(self.socket()).expect("reading the bridge token")
    }

    /// The test's own directory (the socket lives in it).
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// A client builder for `app` aimed at this gateway, for options beyond [`Env::client`]'s.
    pub fn builder(&self, app: &str) -> ClientBuilder {
        Client::builder(app).socket(self.socket())
    }

    /// A client of `app`, connected.
    pub fn client(&self, app: &str) -> Client {
        self.builder(app).connect().expect("connecting")
    }

    /// A client of `app` that reaches other peers only through the gateway (no lanes).
    pub fn relay_client(&self, app: &str) -> Client {
        self.builder(app)
            .relay_only(true)
            .connect()
            .expect("connecting")
    }
}

/// A gateway inside the test process, configured by `cfg`; stopped when the handle drops. For
/// tests that stop and start one on the same socket themselves; others use [`Env`].
pub fn spawn_gateway(cfg: GatewayConfig) -> GatewayHandle {
    Gateway::bind(cfg)
        .expect("binding the gateway")
        .spawn()
        .expect("starting the gateway")
}

/// Polls `cond` until it holds or `timeout` passes. Returns whether it held. For conditions of
/// another process (a socket accepting, a peer disappearing) that have no event to wait on.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child process that is SIGKILLed and reaped when dropped, unless it was already reaped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    status: Option<ExitStatus>,
    what: String,
}

impl ChildGuard {
    pub fn new(child: Child, what: impl Into<String>) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            status: None,
            what: what.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already taken")
    }

    /// The exit status if it has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                self.status = c.try_wait().expect("try_wait");
            }
        }
        self.status
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends `sig` (the process may be gone already; that is not an error here).
    pub fn signal(&self, sig: rustix::process::Signal) {
        if self.status.is_some() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid() as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// SIGKILL, then reap. Returns once the process is gone.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::KILL);
        self.wait_timeout(STARTUP)
            .unwrap_or_else(|| panic!("{} did not die after SIGKILL", self.what))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.status.is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The lines a child writes on one of its pipes, read on a thread so they can be awaited with
/// a deadline.
#[derive(Debug)]
pub struct Lines {
    rx: mpsc::Receiver<String>,
}

impl Lines {
    pub fn spawn(r: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx }
    }

    /// The next line matching `pred` within `timeout` (earlier lines are skipped).
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

/// The environment variable naming what a re-executed test binary does (its role). The test
/// crate's `child_process_entry` test reads it, and does nothing without it.
pub const CHILD_ROLE: &str = "KNIT_TEST_ROLE";

/// Lines a child prints for its parent carry this tag (libtest's own output may precede it on
/// the same line).
pub const CHILD_TAG: &str = "@@knit ";

/// In a child: tells the parent `line` (see [`await_line`]).
pub fn say(line: &str) {
    println!("{CHILD_TAG}{line}");
}

/// This test binary, set up to run as a child in `role` with `env` added: only its
/// `child_process_entry` test runs, on one thread, its output shown; stdout is piped to the
/// parent, stderr inherited. Callers may adjust it before [`spawn_child_command`].
pub fn child_command(role: &str, env: &[(&str, String)]) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "child_process_entry",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(CHILD_ROLE, role)
    .envs(env.iter().map(|(k, v)| (k, v)))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    cmd
}

/// Starts `cmd` (from [`child_command`] for `role`), its stdout read as lines.
pub fn spawn_child_command(mut cmd: Command, role: &str) -> (ChildGuard, Lines) {
    let mut child = cmd.spawn().expect("spawning the child process");
    let lines = Lines::spawn(child.stdout.take().expect("stdout"));
    (ChildGuard::new(child, format!("child {role}")), lines)
}

/// Starts this test binary as a child in `role`, with `env` added.
pub fn spawn_child(role: &str, env: &[(&str, String)]) -> (ChildGuard, Lines) {
    spawn_child_command(child_command(role, env), role)
}

/// Waits for the child to say `what`; returns what it said (without the tag). The tag may be
/// preceded by libtest's "test child_process_entry ... " on the same line.
pub fn await_line(lines: &Lines, what: &str, child: &mut ChildGuard) -> String {
    let said = |l: &str| l.split_once(CHILD_TAG).map(|(_, s)| s.to_string());
    lines
        .wait_for(STARTUP, |l| said(l).is_some_and(|s| s.starts_with(what)))
        .and_then(|l| said(&l))
        .unwrap_or_else(|| {
            panic!(
                "the child never said {what:?} (status {:?})",
                child.try_status()
            )
        })
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A `knit gateway` process, with its stderr in a file.
#[derive(Debug)]
pub struct GatewayProc {
    pub child: ChildGuard,
    pub socket: PathBuf,
    log: PathBuf,
}

impl GatewayProc {
    /// Starts `knit gateway --no-ws --gateway SOCKET EXTRA…` and waits until the socket
    /// accepts connections.
    pub fn start(dir: &TempDir, extra: &[&str]) -> GatewayProc {
        Self::start_at(dir, &dir.socket(), extra)
    }

    pub fn start_at(dir: &TempDir, socket: &Path, extra: &[&str]) -> GatewayProc {
        Self::start_with(dir, socket, extra, None)
    }

    /// As [`GatewayProc::start`], with at most `nofile` open descriptors (`ulimit -n`).
    pub fn start_limited(dir: &TempDir, extra: &[&str], nofile: u32) -> GatewayProc {
        Self::start_with(dir, &dir.socket(), extra, Some(nofile))
    }

    fn start_with(
        dir: &TempDir,
        socket: &Path,
        extra: &[&str],
        nofile: Option<u32>,
    ) -> GatewayProc {
        static N: AtomicU64 = AtomicU64::new(0);
        let log = dir
            .path()
            .join(format!("gateway-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let mut cmd = match nofile {
            // The shell sets the limit and becomes the gateway (same pid).
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(knit_bin());
                c
            }
            None => Command::new(knit_bin()),
        };
        let child = cmd
            .arg("gateway")
            .arg("--no-ws")
            .arg("--gateway")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("gateway log"))
            .spawn()
            .expect("spawning knit gateway");
        let mut gw = GatewayProc {
            child: ChildGuard::new(child, "knit gateway"),
            socket: socket.to_path_buf(),
            log,
        };
        let up = wait_until(STARTUP, || {
            if let Some(s) = gw.child.try_status() {
                panic!(
                    "knit gateway exited during start-up ({s}): {}",
                    read_log(&gw.log)
                );
            }
            std::os::unix::net::UnixStream::connect(&gw.socket).is_ok()
        });
        assert!(
            up,
            "knit gateway did not accept within {STARTUP:?}: {}",
            gw.log()
        );
        gw
    }

    /// What it wrote on stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// The pid of the keeper serving this gateway's socket, if one answers.
    pub fn keeper_pid(&self) -> Option<u32> {
        knit::keeper::keeper_pid(&self.socket)
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        // A clean stop ends the keeper too; a gateway killed earlier (on purpose) left it
        // lingering for a successor, so stop whatever still answers on the keeper socket.
        if self.child.try_status().is_none() {
            self.child.signal(rustix::process::Signal::TERM);
            if self.child.wait_timeout(STARTUP).is_none() {
                self.child.kill9();
            }
        }
        stop_keeper(&self.socket);
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Kills the keeper of the gateway socket `socket` (if one answers and it is a keeper) and
/// waits until it is gone.
pub fn stop_keeper(socket: &Path) {
    let Some(pid) = knit::keeper::keeper_pid(socket) else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("__keeper") {
        return;
    }
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
    assert!(
        wait_until(STARTUP, || !process_running(pid)),
        "keeper {pid} still runs after SIGKILL"
    );
}

/// A `knit serve` process that has printed its ready line.
#[derive(Debug)]
pub struct ServerProc {
    pub child: ChildGuard,
    /// The `{"ready": true, …}` line, parsed.
    pub ready: Json,
    _stdout: Lines,
}

impl ServerProc {
    /// `knit --gateway SOCKET --app APP serve METHOD ARGS…`, waiting for `{"ready":true…}`.
    pub fn start(socket: &Path, app: &str, method: &str, args: &[&str]) -> ServerProc {
        let mut child = Command::new(knit_bin())
            .arg("--gateway")
            .arg(socket)
            .arg("--app")
            .arg(app)
            .arg("serve")
            .arg(method)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning knit serve");
        let stdout = Lines::spawn(child.stdout.take().expect("stdout"));
        let mut guard = ChildGuard::new(child, format!("knit serve {method} ({app})"));
        let line = stdout
            .wait_for(STARTUP, |l| l.contains("\"ready\""))
            .unwrap_or_else(|| {
                panic!(
                    "knit serve {method} ({app}) printed no ready line (exit: {:?})",
                    guard.try_status()
                )
            });
        let ready: Json = serde_json::from_str(&line).expect("ready line is JSON");
        assert_eq!(ready["ready"], Json::Bool(true), "ready line: {line}");
        assert_eq!(ready["method"], Json::from(method), "ready line: {line}");
        assert_eq!(ready["application"], Json::from(app), "ready line: {line}");
        ServerProc {
            child: guard,
            ready,
            _stdout: stdout,
        }
    }

    /// The server's peer id, as its ready line says.
    pub fn peer_id(&self) -> &str {
        self.ready["peerId"].as_str().expect("peerId")
    }
}

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    /// The first stdout line as JSON.
    pub fn json(&self) -> Json {
        let line = self.stdout.lines().next().unwrap_or_else(|| {
            panic!("no output on stdout (stderr: {})", self.stderr);
        });
        serde_json::from_str(line).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {line:?}"))
    }
}

/// A running `knit …` command whose output is collected on threads.
#[derive(Debug)]
pub struct Running {
    pub child: ChildGuard,
    started: Instant,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

impl Running {
    /// Waits up to `timeout` for it to finish; panics (after killing it) if it does not.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let status = self.child.wait_timeout(timeout);
        let elapsed = self.started.elapsed();
        let Some(status) = status else {
            self.child.kill9();
            let err = self.err.join().unwrap_or_default();
            panic!("command did not finish within {timeout:?}; stderr: {err}");
        };
        Output {
            code: status.code(),
            stdout: self.out.join().unwrap_or_default(),
            stderr: self.err.join().unwrap_or_default(),
            elapsed,
        }
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Starts `knit ARGS…` with `stdin` fed to it (or nothing).
pub fn spawn_knit(args: &[&str], stdin: Option<&[u8]>) -> Running {
    spawn_knit_env(args, &[], stdin)
}

/// Starts `knit ARGS…` with extra environment variables and `stdin` fed to it (or nothing).
pub fn spawn_knit_env(args: &[&str], env: &[(&str, &Path)], stdin: Option<&[u8]>) -> Running {
    let mut child = Command::new(knit_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning knit");
    let started = Instant::now();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        // On a thread: a large input must not block us if the child reads it late.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    Running {
        child: ChildGuard::new(child, format!("knit {}", args.join(" "))),
        started,
        out,
        err,
    }
}

/// `knit --gateway SOCK ARGS…` with its stdout and stderr piped to the caller.
pub fn spawn_piped(sock: &Path, args: &[&str]) -> Child {
    Command::new(knit_bin())
        .arg("--gateway")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning knit")
}

/// Runs `knit ARGS…` to completion (at most `timeout`).
pub fn run_knit(args: &[&str], timeout: Duration) -> Output {
    spawn_knit(args, None).finish(timeout)
}

/// Runs `knit ARGS…` with `stdin`, to completion (at most `timeout`).
pub fn run_knit_stdin(args: &[&str], stdin: &[u8], timeout: Duration) -> Output {
    spawn_knit(args, Some(stdin)).finish(timeout)
}

/// Whether `pid` has a mapping whose path contains `needle` (from `/proc/PID/maps`).
pub fn maps_contain(pid: u32, needle: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.contains(needle))
        .unwrap_or(false)
}

/// A small deterministic generator (the runs are reproducible from their seed).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n - 1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u32) -> bool {
        self.unit() * 100.0 < f64::from(percent)
    }

    /// One of `xs`.
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// A random JSON value: scalars (null included), arrays and objects, at most 3 deep.
    pub fn value(&mut self, depth: u32) -> Json {
        let k = self.unit();
        if depth > 2 || k < 0.35 {
            return [
                Json::from(1),
                Json::from(0),
                Json::from(-2.5),
                Json::from("s"),
                Json::from(""),
                Json::from(true),
                Json::Null,
            ][self.below(7)]
            .clone();
        }
        if k < 0.5 {
            return Json::Array((0..self.below(3)).map(|_| self.value(depth + 1)).collect());
        }
        Json::Object(self.object(depth + 1, 0))
    }

    /// An object of up to `extra + 2` keys from a, b, c, d.
    pub fn object(&mut self, depth: u32, extra: usize) -> serde_json::Map<String, Json> {
        let mut o = serde_json::Map::new();
        for _ in 0..self.below(3) + extra {
            let k = ["a", "b", "c", "d"][self.below(4)];
            o.insert(k.to_string(), self.value(depth));
        }
        o
    }

    /// A dotted path through objects of `data` only (writing through an array or a scalar is
    /// one of the places where a web subscriber's library and the stored value part ways, on
    /// the reference gateway as on knit; docs/gw3-conformance.md).
    pub fn path(&mut self, data: &Json) -> String {
        let mut segs = Vec::new();
        let mut node = Some(data);
        for _ in 0..=self.below(3) {
            let k = ["a", "b", "c", "d"][self.below(4)];
            segs.push(k);
            match node.and_then(|n| n.get(k)) {
                Some(v @ Json::Object(_)) => node = Some(v),
                Some(_) => break,
                None => node = None,
            }
        }
        segs.join(".")
    }
}
