//! RPC round trip through the C ABI vs the Rust API, in the same run (DESIGN §6: the C ABI's
//! p50 must be ≤ 1.15× the Rust figure).
//!
//! `cargo bench -p knit-ffi --bench rpc [-- --iters N --rounds R --size BYTES --json]`
//!
//! Both sides spin (`BusySpin` / `KNIT_CONNECT_SPIN`), the caller is a poll-mode client, and the
//! two ends are separate processes pinned to different cores (the server is this binary
//! re-executed as `__peer rust|ffi|ffi-json`), as `knit bench rpc` does. Scenarios:
//!
//! * `rust`  — Rust client → Rust server (`register_async`), raw-bytes payload;
//! * `ffi`   — C-ABI client (`knit_invoke_bytes`) → C-ABI server (`knit_register_bytes` +
//!   `knit_reply_bytes`), the same payload: the figure the target is about;
//! * `rust-value` / `ffi-json` — the same with a JSON-shaped value (`{"s": "…"}` of about
//!   `size` bytes): Rust `Value` vs JSON text through `knit_invoke` and `knit_reply_ok`, which
//!   adds JSON parsing and printing on both sides and the io.Connect result document.
//!
//! Rounds alternate the scenarios so that a noisy neighbour hurts all alike; each measured call
//! checks its echo first.

use knit::*;
use knit_core::client::{Client, InvokeOptions};
use knit_core::gateway::{Gateway, GatewayConfig};
use knit_core::model::Target;
use knit_core::wait::WaitStrategy;
use knit_core::Value;
use std::ffi::{c_char, c_void, CStr, CString};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type BenchResult<T = ()> = Result<T, String>;

struct Args {
    iters: usize,
    rounds: usize,
    size: usize,
    json: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> BenchResult<Args> {
    let mut a = Args {
        iters: 20_000,
        rounds: 3,
        size: 64,
        json: false,
    };
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> BenchResult<usize> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--iters" => a.iters = num("--iters")?,
            "--rounds" => a.rounds = num("--rounds")?.max(1),
            "--size" => a.size = num("--size")?,
            "--json" => a.json = true,
            // cargo bench passes --bench; test harness flags are ignored too.
            _ => {}
        }
    }
    Ok(a)
}

fn cpus() -> (Option<usize>, Option<usize>) {
    match knit_core::sys::affinity::available_cpus().as_slice() {
        [a, b, ..] => (Some(*a), Some(*b)),
        _ => (None, None),
    }
}

fn pin(cpu: Option<usize>) {
    if let Some(c) = cpu {
        let _ = knit_core::sys::affinity::pin_current_thread(c);
    }
}

fn json_payload(size: usize) -> String {
    // {"s":"xxx…"}: 8 bytes of framing.
    format!("{{\"s\":\"{}\"}}", "x".repeat(size.saturating_sub(8)))
}

// ----- the server peer -----------------------------------------------------------------------

unsafe extern "C" fn ffi_bytes_echo(
    _ud: *mut c_void,
    args: *const u8,
    len: usize,
    _caller: *const c_char,
    reply: *mut knit_reply_t,
) {
    // SAFETY: knit passes `len` readable bytes at `args` and a live reply handle.
    unsafe { knit_reply_bytes(reply, args, len) };
}

unsafe extern "C" fn ffi_json_echo(
    _ud: *mut c_void,
    args: *const c_char,
    _caller: *const c_char,
    reply: *mut knit_reply_t,
) {
    // SAFETY: knit passes NUL-terminated JSON and a live reply handle.
    unsafe { knit_reply_ok(reply, args) };
}

fn peer(role: &str, socket: &str, cpu: Option<usize>) -> BenchResult {
    pin(cpu);
    let mut keep: Option<Client> = None;
    let mut ffi_client: *mut knit_client_t = std::ptr::null_mut();
    match role {
        "rust" => {
            let c = Client::builder("bench-rust-server")
                .socket(socket)
                .wait_strategy(WaitStrategy::BusySpin)
                .connect()
                .map_err(|e| e.to_string())?;
            c.register_async("bench.echo", |call, r| r.ok(call.args))
                .map_err(|e| e.to_string())?;
            keep = Some(c);
        }
        "ffi" | "ffi-json" => {
            let sock = CString::new(socket).map_err(|e| e.to_string())?;
            // SAFETY: valid NUL-terminated strings and out-pointer.
            let st = unsafe {
                knit_client_connect(
                    sock.as_ptr(),
                    c"bench-ffi-server".as_ptr(),
                    KNIT_CONNECT_SPIN,
                    &mut ffi_client,
                )
            };
            if st != KNIT_OK {
                return Err(format!("connect: {st}"));
            }
            // SAFETY: a live handle, a static name, a handler of the right signature.
            let st = unsafe {
                if role == "ffi" {
                    knit_register_bytes(
                        ffi_client,
                        c"bench.echo".as_ptr(),
                        Some(ffi_bytes_echo),
                        std::ptr::null_mut(),
                    )
                } else {
                    knit_register(
                        ffi_client,
                        c"bench.echo".as_ptr(),
                        Some(ffi_json_echo),
                        std::ptr::null_mut(),
                    )
                }
            };
            if st != KNIT_OK {
                return Err(format!("register: {st}"));
            }
        }
        other => return Err(format!("unknown peer role {other}")),
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(keep);
    if !ffi_client.is_null() {
        knit_client_close(ffi_client);
    }
    Ok(())
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

fn spawn_peer(role: &str, socket: &str, cpu: Option<usize>) -> BenchResult<Peer> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("__peer")
        .arg(role)
        .arg(socket)
        .arg(cpu.map(|c| c.to_string()).unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if !line.contains("ready") {
        let _ = child.kill();
        return Err(format!("peer {role} did not start: {line}"));
    }
    Ok(Peer(child))
}

// ----- measuring -----------------------------------------------------------------------------

#[derive(Default)]
struct Series(Vec<u64>);

impl Series {
    fn measure(
        &mut self,
        warm: usize,
        n: usize,
        mut f: impl FnMut() -> BenchResult,
    ) -> BenchResult {
        for _ in 0..warm {
            f()?;
        }
        for _ in 0..n {
            let t = Instant::now();
            f()?;
            self.0.push(t.elapsed().as_nanos() as u64);
        }
        Ok(())
    }

    fn pct(&mut self) -> (u64, u64, u64) {
        self.0.sort_unstable();
        let s = &self.0;
        if s.is_empty() {
            return (0, 0, 0);
        }
        let at = |q: f64| s[((s.len() as f64 * q) as usize).min(s.len() - 1)];
        (at(0.5), at(0.99), at(0.999))
    }
}

fn rust_round(
    socket: &str,
    cpu: Option<usize>,
    a: &Args,
    json: bool,
    s: &mut Series,
) -> BenchResult {
    let _peer = spawn_peer("rust", socket, cpu)?;
    let client = Client::builder("bench-rust-client")
        .socket(socket)
        .poll_mode(true)
        .wait_strategy(WaitStrategy::BusySpin)
        .connect()
        .map_err(|e| e.to_string())?;
    let opts = InvokeOptions {
        target: Target::Best,
        wait: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
    };
    let payload = if json {
        Value::from_json_str(&json_payload(a.size)).map_err(|e| e.to_string())?
    } else {
        Value::Bytes(vec![0xAB; a.size])
    };
    let n = a.iters / a.rounds;
    s.measure((n / 10).clamp(10, 2000), n, || {
        let r = client
            .invoke("bench.echo", payload.clone(), &opts)
            .map_err(|e| e.to_string())?;
        if r.returned != payload {
            return Err("wrong echo (rust)".into());
        }
        Ok(())
    })
}

fn ffi_round(
    socket: &str,
    cpu: Option<usize>,
    a: &Args,
    json: bool,
    s: &mut Series,
) -> BenchResult {
    let _peer = spawn_peer(if json { "ffi-json" } else { "ffi" }, socket, cpu)?;
    let sock = CString::new(socket).map_err(|e| e.to_string())?;
    let mut c: *mut knit_client_t = std::ptr::null_mut();
    // SAFETY: valid strings and out-pointer.
    let st = unsafe {
        knit_client_connect(
            sock.as_ptr(),
            c"bench-ffi-client".as_ptr(),
            KNIT_CONNECT_POLL | KNIT_CONNECT_SPIN,
            &mut c,
        )
    };
    if st != KNIT_OK {
        return Err(format!("connect: {st}"));
    }
    let payload = vec![0xABu8; a.size];
    let args = CString::new(json_payload(a.size)).map_err(|e| e.to_string())?;
    let want = format!("\"returned\":{}", args.to_str().unwrap_or_default());
    let n = a.iters / a.rounds;
    let r = s.measure((n / 10).clamp(10, 2000), n, || {
        if json {
            let mut out: *mut c_char = std::ptr::null_mut();
            // SAFETY: live handle, NUL-terminated strings, valid out-pointer.
            let st = unsafe {
                knit_invoke_ex(
                    c,
                    c"bench.echo".as_ptr(),
                    args.as_ptr(),
                    std::ptr::null(),
                    5000,
                    5000,
                    &mut out,
                )
            };
            if st != KNIT_OK {
                return Err(format!("invoke: {st}"));
            }
            // SAFETY: knit returned a NUL-terminated string, freed right after.
            let ok = unsafe { CStr::from_ptr(out) }
                .to_str()
                .is_ok_and(|t| t.contains(&want));
            // SAFETY: returned by knit, freed once.
            unsafe { knit_string_free(out) };
            if !ok {
                return Err("wrong echo (ffi-json)".into());
            }
        } else {
            let mut out: *mut u8 = std::ptr::null_mut();
            let mut len = 0usize;
            // SAFETY: live handle, payload of `len` bytes, valid out-pointers.
            let st = unsafe {
                knit_invoke_bytes(
                    c,
                    c"bench.echo".as_ptr(),
                    payload.as_ptr(),
                    payload.len(),
                    std::ptr::null(),
                    5000,
                    5000,
                    &mut out,
                    &mut len,
                )
            };
            if st != KNIT_OK {
                return Err(format!("invoke: {st}"));
            }
            // SAFETY: knit returned `len` bytes at `out`; freed right after.
            let ok = len == payload.len()
                && unsafe { std::slice::from_raw_parts(out, len) } == payload.as_slice();
            // SAFETY: returned by knit, freed once.
            unsafe { knit_bytes_free(out) };
            if !ok {
                return Err("wrong echo (ffi)".into());
            }
        }
        Ok(())
    });
    knit_client_close(c);
    r
}

fn main() {
    let mut argv = std::env::args().skip(1);
    if let Some(first) = argv.next() {
        if first == "__peer" {
            let role = argv.next().unwrap_or_default();
            let socket = argv.next().unwrap_or_default();
            let cpu = argv.next().and_then(|c| c.parse().ok());
            if let Err(e) = peer(&role, &socket, cpu) {
                eprintln!("bench peer: {e}");
                std::process::exit(1);
            }
            return;
        }
    }
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rpc bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("rpc bench: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> BenchResult {
    let (cpu_client, cpu_server) = cpus();
    pin(cpu_client);
    let dir = std::env::temp_dir().join(format!("knit-ffi-bench-{}", std::process::id()));
    let gw = Gateway::bind(GatewayConfig::new(dir.join("gw.sock")))
        .map_err(|e| e.to_string())?
        .spawn()
        .map_err(|e| e.to_string())?;
    let socket = gw.socket_path().display().to_string();
    let mut rust = Series::default();
    let mut ffi = Series::default();
    let mut rust_v = Series::default();
    let mut ffi_j = Series::default();
    let result = (|| {
        for _ in 0..a.rounds {
            rust_round(&socket, cpu_server, a, false, &mut rust)?;
            ffi_round(&socket, cpu_server, a, false, &mut ffi)?;
            rust_round(&socket, cpu_server, a, true, &mut rust_v)?;
            ffi_round(&socket, cpu_server, a, true, &mut ffi_j)?;
        }
        Ok::<(), String>(())
    })();
    gw.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let report = |name: &str, s: &mut Series, base: Option<(&str, (u64, u64, u64))>| {
        let (p50, p99, p999) = s.pct();
        let n = s.0.len();
        match (a.json, base) {
            (true, Some((bn, b))) => println!(
                "{{\"scenario\":\"{name}\",\"size\":{},\"iters\":{n},\"p50_ns\":{p50},\"p99_ns\":{p99},\"p999_ns\":{p999},\"baseline\":\"{bn}\",\"baseline_p50_ns\":{},\"ratio_p50\":{:.3}}}",
                a.size, b.0, p50 as f64 / b.0.max(1) as f64
            ),
            (true, None) => println!(
                "{{\"scenario\":\"{name}\",\"size\":{},\"iters\":{n},\"p50_ns\":{p50},\"p99_ns\":{p99},\"p999_ns\":{p999}}}",
                a.size
            ),
            (false, base) => println!(
                "{name:<11} {:>6} B  p50 {:>7.2} µs  p99 {:>7.2} µs  p99.9 {:>7.2} µs{}",
                a.size,
                p50 as f64 / 1e3,
                p99 as f64 / 1e3,
                p999 as f64 / 1e3,
                base.map(|(bn, b)| format!("  | ratio p50 vs {bn}: {:.3}", p50 as f64 / b.0.max(1) as f64))
                    .unwrap_or_default()
            ),
        }
        (p50, p99, p999)
    };
    let r = report("rust", &mut rust, None);
    report("ffi", &mut ffi, Some(("rust", r)));
    let rv = report("rust-value", &mut rust_v, None);
    report("ffi-json", &mut ffi_j, Some(("rust-value", rv)));
    Ok(())
}
