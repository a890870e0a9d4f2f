//! The data-sharing commands as a user runs them: `knit ctx …`, `knit pub`/`sub`,
//! `knit stream serve`/`sub` against a real `knit gateway` process; two `ctx watch` processes
//! seeing one history while writers race; a context writer killed in the middle of its updates.
//!
//! The killed writer is this test binary re-executed with `KNIT_TEST_ROLE=ctx-writer` (see
//! `child_process_entry`); under a normal run that entry does nothing.

mod common;

use common::{run_knit, spawn_knit, wait_until, ChildGuard, GatewayProc, Lines, TempDir, STARTUP};
use knit::client::Client;
use knit::Value;
use serde_json::{json, Value as Json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const QUICK: Duration = Duration::from_secs(20);
const ROLE: &str = "KNIT_TEST_ROLE";
const SOCKET: &str = "KNIT_TEST_SOCKET";

fn gw(dir: &TempDir) -> GatewayProc {
    GatewayProc::start(dir, &[])
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn knit_ok(sock: &Path, args: &[&str]) -> Json {
    let mut all = vec!["--gateway", s(sock)];
    all.extend_from_slice(args);
    let out = run_knit(&all, QUICK);
    assert_eq!(
        out.code,
        Some(0),
        "knit {args:?}: stdout {} stderr {}",
        out.stdout,
        out.stderr
    );
    if out.stdout.trim().is_empty() {
        Json::Null
    } else {
        out.json()
    }
}

fn knit_code(sock: &Path, args: &[&str]) -> Option<i32> {
    let mut all = vec!["--gateway", s(sock)];
    all.extend_from_slice(args);
    run_knit(&all, QUICK).code
}

/// A long-running `knit` command whose stdout and stderr lines can be awaited.
struct Follower {
    child: ChildGuard,
    out: Lines,
    err: Lines,
}

impl Follower {
    /// Starts `knit --gateway SOCK ARGS…` and waits for `{"ready":true}` on stderr.
    fn start(sock: &Path, args: &[&str]) -> Follower {
        let mut child = common::spawn_piped(sock, args);
        let out = Lines::spawn(child.stdout.take().expect("stdout"));
        let err = Lines::spawn(child.stderr.take().expect("stderr"));
        let f = Follower {
            child: ChildGuard::new(child, format!("knit {args:?}")),
            out,
            err,
        };
        f.err
            .wait_for(STARTUP, |l| l.contains("\"ready\""))
            .unwrap_or_else(|| panic!("knit {args:?} never said ready"));
        f
    }

    fn next(&self) -> Json {
        let line = self
            .out
            .wait_for(QUICK, |_| true)
            .expect("no line within the deadline");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Every line until the process exits (it was started with `--count`).
    fn finish(mut self, lines: usize) -> Vec<Json> {
        let mut v = Vec::new();
        for k in 0..lines {
            match self.out.wait_for(QUICK, |_| true) {
                Some(l) => v.push(serde_json::from_str(&l).unwrap_or(Json::Null)),
                None => panic!(
                    "line {k} of {lines} never came; the last ones: {:?}",
                    &v[v.len().saturating_sub(3)..]
                ),
            }
        }
        let status = self.child.wait_timeout(QUICK).expect("did not exit");
        assert!(status.success(), "exit {status}");
        v
    }
}

#[test]
fn ctx_commands_print_versions_and_data_with_the_documented_exit_codes() {
    let dir = TempDir::new("ctxcli");
    let g = gw(&dir);
    let sock = &g.socket;
    assert_eq!(knit_ok(sock, &["ctx", "get", "nothing"]), json!({}));
    assert_eq!(
        knit_ok(sock, &["ctx", "set", "inst", r#"{"ric":"VOD.L","qty":5}"#]),
        json!({"version": 1})
    );
    assert_eq!(
        knit_ok(sock, &["ctx", "update", "inst", r#"{"qty":null,"px":1.5}"#]),
        json!({"version": 2})
    );
    // Nothing changes: no new version.
    assert_eq!(
        knit_ok(sock, &["ctx", "update", "inst", r#"{"px":1.5}"#]),
        json!({"version": 2})
    );
    assert_eq!(
        knit_ok(sock, &["ctx", "set-path", "inst", "book.side", r#""buy""#]),
        json!({"version": 3})
    );
    assert_eq!(
        knit_ok(sock, &["ctx", "get", "inst"]),
        json!({"ric": "VOD.L", "px": 1.5, "book": {"side": "buy"}})
    );
    let list = knit_ok(sock, &["ctx", "list"]);
    assert!(list.as_array().unwrap().contains(&json!("inst")), "{list}");
    assert_eq!(
        knit_code(sock, &["ctx", "set", "inst", "{not json"]),
        Some(8)
    );
    assert_eq!(knit_code(sock, &["ctx", "set", "inst", "[1,2]"]), Some(8));
    knit_ok(sock, &["ctx", "destroy", "inst"]);
    assert_eq!(knit_ok(sock, &["ctx", "get", "inst"]), json!({}));
    let list = knit_ok(sock, &["ctx", "list"]);
    assert!(!list.as_array().unwrap().contains(&json!("inst")), "{list}");
}

/// A watch started before its context exists prints nothing until the context is created,
/// then the creation as a change by its writer (DESIGN §5: `updater` is the writer's
/// identity), and the same when the context is destroyed and created again.
#[test]
fn a_watch_waiting_for_its_context_shows_who_created_it() {
    let dir = TempDir::new("ctxcreated");
    let g = gw(&dir);
    let sock = &g.socket;
    let watch = Follower::start(sock, &["ctx", "watch", "fresh", "--count", "3"]);
    let write = |app: &str, args: &[&str]| {
        let mut all = vec!["--app", app, "ctx"];
        all.extend_from_slice(args);
        knit_ok(sock, &all);
    };
    // Each line awaited before the next write, so none is folded into a later one.
    write("maker", &["update", "fresh", r#"{"a":1}"#]);
    let mut lines = vec![watch.next()];
    write("maker", &["update", "fresh", r#"{"b":2}"#]);
    lines.push(watch.next());
    write("breaker", &["destroy", "fresh"]);
    write("remaker", &["set", "fresh", r#"{"c":3}"#]);
    lines.push(watch.next());
    watch.finish(0);
    let seen: Vec<(Json, Json, Json)> = lines
        .iter()
        .map(|l| {
            (
                l["version"].clone(),
                l["data"].clone(),
                l["updater"]["application"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (json!(1), json!({"a": 1}), json!("maker")),
            (json!(2), json!({"a": 1, "b": 2}), json!("maker")),
            (json!(1), json!({"c": 3}), json!("remaker")),
        ],
        "{lines:?}"
    );
    assert_eq!(lines[0]["delta"], json!({"a": 1}));
    assert_eq!(lines[2]["delta"], json!({"c": 3}));
}

#[test]
fn two_watchers_see_one_identical_history_while_writers_race() {
    let dir = TempDir::new("ctxrace");
    let g = gw(&dir);
    let sock = g.socket.clone();
    knit_ok(&sock, &["ctx", "set", "race", r#"{"w":"init"}"#]);
    const WRITERS: usize = 3;
    const EACH: usize = 100;
    let total = 1 + WRITERS * EACH;
    let count = total.to_string();
    let a = Follower::start(&sock, &["ctx", "watch", "race", "--count", &count]);
    let b = Follower::start(&sock, &["ctx", "watch", "race", "--count", &count]);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let c = Client::builder(format!("writer-{w}"))
                    .socket(&sock)
                    .connect()
                    .unwrap();
                for i in 0..EACH {
                    let v =
                        Value::object([("w", Value::from(w as i64)), ("i", Value::from(i as i64))]);
                    c.contexts().update("race", v).unwrap();
                }
            })
        })
        .collect();
    for t in writers {
        t.join().unwrap();
    }
    let ha = a.finish(total);
    let hb = b.finish(total);
    assert_eq!(ha, hb, "the watchers saw different histories");
    // One version per write, none skipped, first the value that was there.
    assert_eq!(ha[0]["data"], json!({"w": "init"}));
    let mut last_i = [-1i64; WRITERS];
    for (k, line) in ha.iter().enumerate() {
        assert_eq!(line["version"], json!(k as u64 + 1), "line {k}: {line}");
        assert_eq!(line["name"], json!("race"));
        if k == 0 {
            continue;
        }
        let w = line["data"]["w"].as_u64().expect("w") as usize;
        let i = line["data"]["i"].as_i64().expect("i");
        // Each writer's updates in its own order.
        assert_eq!(i, last_i[w] + 1, "writer {w} out of order at line {k}");
        last_i[w] = i;
        assert_eq!(
            line["updater"]["application"],
            json!(format!("writer-{w}")),
            "line {k}"
        );
        // The delta holds the keys whose values changed since the previous version.
        let prev = &ha[k - 1]["data"];
        let mut delta = serde_json::Map::new();
        for (key, val) in line["data"].as_object().unwrap() {
            if prev.get(key) != Some(val) {
                delta.insert(key.clone(), val.clone());
            }
        }
        assert_eq!(line["delta"], Json::Object(delta), "line {k}");
    }
    assert_eq!(last_i, [EACH as i64 - 1; WRITERS]);
}

#[test]
fn pub_and_sub_route_by_topic_and_routing_key() {
    let dir = TempDir::new("pubsub");
    let g = gw(&dir);
    let sock = &g.socket;
    let all = Follower::start(sock, &["sub", "prices", "--count", "2"]);
    let keyed = Follower::start(
        sock,
        &["sub", "prices", "--routing-key", "eu", "--count", "1"],
    );
    knit_ok(
        sock,
        &[
            "--app",
            "feed",
            "pub",
            "prices",
            r#"{"VOD.L":101.5}"#,
            "--routing-key",
            "eu",
        ],
    );
    knit_ok(
        sock,
        &["pub", "prices", r#"{"IBM":140}"#, "--routing-key", "us"],
    );
    let got = all.finish(2);
    assert_eq!(got[0]["topic"], json!("prices"));
    assert_eq!(got[0]["data"], json!({"VOD.L": 101.5}));
    assert_eq!(got[0]["source"]["application"], json!("feed"));
    assert_eq!(got[1]["data"], json!({"IBM": 140}));
    assert_eq!(keyed.finish(1)[0]["data"], json!({"VOD.L": 101.5}));
    assert_eq!(knit_code(sock, &["pub", "prices", "{oops"]), Some(8));
    assert_eq!(knit_code(sock, &["pub", "", "{}"]), Some(2));
}

#[test]
fn stream_serve_pushes_to_stream_sub_and_a_missing_stream_exits_3() {
    let dir = TempDir::new("streamcli");
    let g = gw(&dir);
    let sock = &g.socket;
    let mut server = spawn_knit(
        &[
            "--gateway",
            s(sock),
            "--app",
            "ticker",
            "stream",
            "serve",
            "ticks",
            "--rate",
            "500",
        ],
        None,
    );
    // The stream exists once `knit methods` lists it.
    assert!(wait_until(STARTUP, || {
        knit_ok(sock, &["methods", "--json"])
            .to_string()
            .contains("\"ticks\"")
    }));
    let sub = Follower::start(sock, &["stream", "sub", "ticks", "--count", "5"]);
    let got = sub.finish(5);
    let seqs: Vec<i64> = got
        .iter()
        .map(|l| {
            assert_eq!(l["stream"], json!("ticks"), "{l}");
            assert_eq!(l["source"]["application"], json!("ticker"), "{l}");
            l["data"]["seq"].as_i64().expect("seq")
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(
        knit_code(
            sock,
            &["stream", "sub", "nope", "--wait-ms", "200", "--count", "1"]
        ),
        Some(3)
    );
    server.child.kill9();
}

// ----- a context writer killed mid-update ------------------------------------------------------

/// The child processes' entry point; a no-op unless the environment names a role.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    assert_eq!(role, "ctx-writer", "unknown child role");
    let sock = std::env::var(SOCKET).expect("socket");
    let c = Client::builder("doomed-writer")
        .socket(&sock)
        .connect()
        .expect("connect");
    // Updates as fast as possible until killed; every value is self-checking, and sizes vary
    // so the snapshot and the log records change shape.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut i: i64 = 0;
    while std::time::Instant::now() < deadline {
        i += 1;
        let pad = "p".repeat((i % 700) as usize);
        let v = Value::object([
            ("i", Value::from(i)),
            ("check", Value::from(i * 7)),
            ("pad", Value::from(pad.as_str())),
        ]);
        c.contexts().update("victim", v).expect("update");
    }
}

#[test]
fn a_writer_killed_mid_update_leaves_the_context_consistent_and_writable() {
    let dir = TempDir::new("ctxkill");
    let g = gw(&dir);
    let sock = g.socket.clone();
    let watch = Follower::start(&sock, &["ctx", "watch", "victim"]);
    for round in 1..=3i64 {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, "ctx-writer")
            .env(SOCKET, &sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the writer");
        let mut writer = ChildGuard::new(child, "ctx writer");
        // Let it get well into its updates (the watcher sees them), then kill it.
        let want = 300 * round;
        let mut seen = 0;
        while seen < want {
            let line = watch.next();
            if let Some(i) = line["data"]["i"].as_i64() {
                seen = i;
            }
        }
        writer.kill9();
        let killed = std::time::Instant::now();
        // Whatever it was doing, the context holds one whole value it wrote…
        let data = knit_ok(&sock, &["ctx", "get", "victim"]);
        let i = data["i"].as_i64().expect("i");
        assert_eq!(data["check"], json!(i * 7), "torn value {data}");
        assert_eq!(data["pad"].as_str().map(str::len), Some((i % 700) as usize));
        // …and stays writable by others (the gateway broke a lock the writer may have held).
        let v = knit_ok(
            &sock,
            &[
                "ctx",
                "update",
                "victim",
                &format!(r#"{{"round":{round}}}"#),
            ],
        );
        assert!(v["version"].as_u64().unwrap() > 0);
        eprintln!(
            "kill matrix: context writer killed mid-update → another writer's update done: {:?}",
            killed.elapsed()
        );
        let after = knit_ok(&sock, &["ctx", "get", "victim"]);
        assert_eq!(after["round"], json!(round));
        assert_eq!(after["check"], json!(after["i"].as_i64().unwrap() * 7));
        // The watcher hears of that update too.
        loop {
            let line = watch.next();
            if line["data"]["round"] == json!(round) {
                assert_eq!(line["delta"], json!({"round": round}), "{line}");
                break;
            }
        }
    }
}

#[test]
fn sub_whose_reader_goes_away_exits_0_without_a_panic() {
    // `knit sub prices | head -1`: the reader closes the pipe after the first line.
    let dir = TempDir::new("subpipe");
    let g = gw(&dir);
    let sock = &g.socket;
    let mut child = common::spawn_piped(sock, &["sub", "prices"]);
    let err = Lines::spawn(child.stderr.take().expect("stderr"));
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut sub = ChildGuard::new(child, "knit sub prices");
    err.wait_for(STARTUP, |l| l.contains("\"ready\""))
        .expect("knit sub never said ready");
    knit_ok(sock, &["pub", "prices", r#"{"n":1}"#]);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).expect("a first line");
    assert!(first.contains(r#""n":1"#), "{first}");
    drop(out);
    // The next message is written to a closed pipe: that ends the command.
    let exited = wait_until(QUICK, || {
        knit_ok(sock, &["pub", "prices", r#"{"n":2}"#]);
        sub.try_status().is_some()
    });
    assert!(exited, "knit sub kept running with nobody reading");
    assert_eq!(sub.try_status().and_then(|s| s.code()), Some(0));
    assert_eq!(err.wait_for(QUICK, |l| l.contains("panicked")), None);
}

// ----- readers that do not keep up -------------------------------------------------------------

/// The resident memory of process `pid`, in KiB (`VmRSS` in /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS")
}

#[test]
fn sub_whose_reader_stops_reading_holds_back_the_publisher_instead_of_growing() {
    // `knit sub flood | sleep 40`: nobody reads the pipe. The command's queue fills, its
    // callback waits, the lane from the publisher fills, and the publisher gets BUSY (after the
    // library's own wait for room): the memory the command holds stays bounded. Without a bound
    // the command took every message into its own memory and the publisher never waited.
    let dir = TempDir::new("subslow");
    let g = gw(&dir);
    let sock = &g.socket;
    let mut child = common::spawn_piped(sock, &["sub", "cli-flood"]);
    let err = Lines::spawn(child.stderr.take().expect("stderr"));
    // Held, never read.
    let _stdout = child.stdout.take().expect("stdout");
    let sub = ChildGuard::new(child, "knit sub cli-flood");
    err.wait_for(STARTUP, |l| l.contains("\"ready\""))
        .expect("knit sub never said ready");
    let publisher = Client::builder("flood-pub")
        .socket(sock)
        .connect()
        .expect("connect");
    // 64 KiB messages, up to 256 MiB in all: far more than the command may hold.
    let payload = Value::from("x".repeat(64 << 10).as_str());
    let mut busy = None;
    for i in 0..4096u32 {
        match publisher.publish(
            "cli-flood",
            payload.clone(),
            &knit::client::PublishOptions::default(),
        ) {
            Ok(()) => {}
            Err(e) => {
                busy = Some((i, e));
                break;
            }
        }
    }
    let rss = rss_kib(sub.pid());
    let (sent, e) = busy.expect("every message was taken: the slow reader held nobody back");
    assert_eq!(e.status(), knit::Status::Busy, "{e}");
    // Its queue (4 MiB), the pipe, the lane and the process itself: well under 128 MiB.
    assert!(
        rss < 128 << 10,
        "knit sub holds {rss} KiB after {sent} messages of 64 KiB"
    );
}

#[test]
fn stream_sub_closed_as_a_slow_consumer_says_so() {
    // A stream that blocks a full subscriber briefly, then closes it as a slow consumer.
    let dir = TempDir::new("streamslow");
    let g = gw(&dir);
    let sock = &g.socket;
    let server = Client::builder("slow-stream-server")
        .socket(sock)
        .connect()
        .expect("connect");
    let (removed_tx, removed_rx) = std::sync::mpsc::channel();
    let removed_tx = std::sync::Mutex::new(removed_tx);
    let opts = knit::client::StreamOptions {
        policy: knit::client::SlowConsumerPolicy::Block(Duration::from_millis(100)),
        queue: 16,
        on_removed: Some(Box::new(move |_| {
            let _ = removed_tx.lock().unwrap().send(());
        })),
        ..Default::default()
    };
    let stream = server
        .create_stream("cli-slow-stream", opts)
        .expect("create_stream");
    let mut child = common::spawn_piped(sock, &["stream", "sub", "cli-slow-stream"]);
    let err = Lines::spawn(child.stderr.take().expect("stderr"));
    // Not read until the server has dropped the subscription.
    let stdout = child.stdout.take().expect("stdout");
    let mut sub = ChildGuard::new(child, "knit stream sub cli-slow-stream");
    err.wait_for(STARTUP, |l| l.contains("\"ready\""))
        .expect("knit stream sub never said ready");
    let item = Value::object([("pad", Value::from("z".repeat(16 << 10).as_str()))]);
    let mut dropped = false;
    for _ in 0..20_000 {
        stream.push(item.clone()).expect("push");
        if removed_rx.try_recv().is_ok() {
            dropped = true;
            break;
        }
    }
    assert!(
        dropped,
        "the subscriber kept up with 20 000 items nobody read"
    );
    // Now read: the command prints what it had, then ends saying why.
    let drain = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { stdout }, &mut s);
        s.lines().count()
    });
    let status = sub
        .wait_timeout(QUICK)
        .expect("knit stream sub did not end");
    let lines = drain.join().unwrap();
    let why = err
        .wait_for(QUICK, |l| l.starts_with("knit:"))
        .unwrap_or_default();
    assert!(why.contains("slow consumer"), "{why}");
    // Closed by its server: exit 5, as for any such close.
    assert_eq!(
        status.code(),
        Some(5),
        "{status} after {lines} lines: {why}"
    );
}

#[test]
fn whatever_ctx_get_prints_ctx_set_takes_back() {
    let dir = TempDir::new("ctxdeep");
    let g = gw(&dir);
    let sock = &g.socket;
    // The deepest value the store takes: 128 levels of objects.
    let path = vec!["k"; 128].join(".");
    knit_ok(sock, &["ctx", "set-path", "cli-deep", &path, "1"]);
    let mut all = vec!["--gateway", s(sock), "ctx", "get", "cli-deep"];
    let got = run_knit(&all, QUICK);
    assert_eq!(got.code, Some(0), "{}", got.stderr);
    all.truncate(2);
    all.extend(["ctx", "set", "cli-deep-copy", "-"]);
    let set = common::run_knit_stdin(&all, got.stdout.as_bytes(), QUICK);
    assert_eq!(set.code, Some(0), "{}", set.stderr);
    // Compared as text: the test's own JSON parser stops at 127 levels.
    let copy = run_knit(
        &["--gateway", s(sock), "ctx", "get", "cli-deep-copy"],
        QUICK,
    );
    assert_eq!(copy.code, Some(0), "{}", copy.stderr);
    assert_eq!(copy.stdout, got.stdout);
    assert_eq!(got.stdout.matches("{\"k\":").count(), 128, "{}", got.stdout);
    // One level more is bad input, as the store would refuse it (and no stack overflow for a
    // lot more).
    for n in [129, 100_000] {
        let deep = "{\"k\":".repeat(n) + "1" + &"}".repeat(n);
        let out = common::run_knit_stdin(&all, deep.as_bytes(), QUICK);
        assert_eq!(out.code, Some(8), "{n} levels: {}", out.stderr);
    }
}
