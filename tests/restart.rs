//! Gateway restart (docs/guarantees.md "Gateway restart"): a `knit gateway` process is
//! SIGKILLed and started again on the same socket; clients reconnect by themselves and restore
//! what they had; retained contexts lose nothing, even those whose writer has exited; lanes
//! between live peers keep working meanwhile; a clean stop leaves nothing running.
//! And the same with embedded gateways stopped cleanly, without a keeper.

mod common;

use common::{process_running, run_knit, spawn_gateway, GatewayProc, ServerProc, TempDir, STARTUP};
use knit::client::{
    ChannelUpdate, Client, ClientError, ContextUpdate, InteropEvent, InvokeError, InvokeOptions,
    StreamEvent, StreamParams,
};
use knit::gateway::GatewayConfig;
use knit::model::Target;
use knit::{Status, Value};
use serde_json::{json, Value as Json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// Hang guard for reconnection and restoration: only a client that never comes back fails
/// here. The requirement's budget (back within 1 s) is a speed target, measured and reported by
/// `knit bench restart` (docs/benchmarks.md), never asserted on a timer in a test.
const RECONNECT_HANG_GUARD: Duration = Duration::from_secs(10);
/// Hang guard for calls that must fail at once while the gateway is down (they must not wait
/// for it to come back).
const FAIL_FAST_HANG_GUARD: Duration = Duration::from_secs(10);

fn j(s: &str) -> Value {
    Value::from_json_str(s).unwrap()
}

/// Receives from `rx` until `pred` holds, or panics after `timeout` (what was seen is shown).
fn wait_for<T: std::fmt::Debug>(
    rx: &Receiver<T>,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if pred(&v) => return v,
            Ok(v) => {
                if seen.len() < 20 {
                    seen.push(format!("{v:?}"));
                }
            }
            Err(_) => panic!("{what}: not within {timeout:?}; saw {seen:#?}"),
        }
    }
}

fn sock(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ctx_get(socket: &Path, name: &str) -> Json {
    let out = run_knit(&["--gateway", sock(socket), "ctx", "get", name], STARTUP);
    assert_eq!(out.code, Some(0), "ctx get {name}: {}", out.stderr);
    out.json()
}

#[test]
fn clients_reconnect_and_restore_everything_after_the_gateway_is_killed_and_restarted() {
    let dir = TempDir::new("restart");
    let mut gw = GatewayProc::start(&dir, &[]);
    let socket = gw.socket.clone();
    let keeper = gw.keeper_pid().expect("knit gateway starts a keeper");
    assert!(process_running(keeper));

    // A server of a method, a server of a stream, a command-line bus subscriber.
    let mut echo = ServerProc::start(&socket, "restart-server", "Restart.Echo", &["--echo"]);
    let mut ticks = Command::new(common::knit_bin())
        .args(["--gateway", sock(&socket), "--app", "restart-ticks"])
        .args(["stream", "serve", "Restart.Ticks", "--rate", "50"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ticks_out = common::Lines::spawn(ticks.stdout.take().unwrap());
    let mut ticks = common::ChildGuard::new(ticks, "knit stream serve");
    ticks_out
        .wait_for(STARTUP, |l| l.contains("\"ready\""))
        .expect("knit stream serve is ready");
    let mut sub = Command::new(common::knit_bin())
        .args(["--gateway", sock(&socket), "sub", "restart.topic"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sub_out = common::Lines::spawn(sub.stdout.take().unwrap());
    let sub_err = common::Lines::spawn(sub.stderr.take().unwrap());
    let mut sub = common::ChildGuard::new(sub, "knit sub");
    sub_err
        .wait_for(STARTUP, |l| l.contains("\"ready\""))
        .expect("knit sub is ready");

    // A writer sets a retained context and exits.
    let out = run_knit(
        &[
            "--gateway",
            sock(&socket),
            "--app",
            "writer",
            "ctx",
            "set",
            "restart.retained",
            r#"{"v": 42, "who": "writer"}"#,
        ],
        STARTUP,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // Our client: events, a lane to the server, a context, a bus topic, a channel, a stream.
    let c = Client::builder("restart-client")
        .socket(&socket)
        .connect()
        .unwrap();
    let (etx, events) = channel::<InteropEvent>();
    let _ev = c.on_event(move |e| {
        let _ = etx.send(e.clone());
    });
    let opts = InvokeOptions {
        target: Target::Best,
        wait: STARTUP,
        timeout: STARTUP,
    };
    let r = c.invoke("Restart.Echo", j(r#"{"n": 1}"#), &opts).unwrap();
    assert_eq!(r.returned, j(r#"{"n": 1}"#));
    c.contexts()
        .set("restart.watched", j(r#"{"phase": "before"}"#))
        .unwrap();
    let (ctx_tx, ctx_rx) = channel::<ContextUpdate>();
    let _cs = c
        .contexts()
        .subscribe("restart.watched", move |u| {
            let _ = ctx_tx.send(u.clone());
        })
        .unwrap();
    wait_for(&ctx_rx, STARTUP, "first context callback", |u| u.first);
    let (bus_tx, bus_rx) = channel::<Value>();
    let _bs = c
        .subscribe("restart.topic", Default::default(), move |m| {
            let _ = bus_tx.send(m.data.clone());
        })
        .unwrap();
    c.channels().join("Red").unwrap();
    let (ch_tx, ch_rx) = channel::<ChannelUpdate>();
    let _chs = c
        .channels()
        .subscribe(move |u| {
            let _ = ch_tx.send(u.clone());
        })
        .unwrap();
    let (st_tx, st_rx) = channel::<StreamEvent>();
    let _ss = c
        .subscribe_stream(
            "Restart.Ticks",
            StreamParams {
                wait: STARTUP,
                timeout: STARTUP,
                ..Default::default()
            },
            move |e| {
                let _ = st_tx.send(e.clone());
            },
        )
        .unwrap();
    let StreamEvent::Data {
        server: ticks_before,
        ..
    } = wait_for(&st_rx, STARTUP, "a stream item", |e| {
        matches!(e, StreamEvent::Data { .. })
    })
    else {
        unreachable!()
    };

    // The gateway dies.
    gw.child.kill9();
    let ev = wait_for(&events, STARTUP, "Disconnected", |e| {
        matches!(e, InteropEvent::Disconnected { .. })
    });
    assert!(
        matches!(
            ev,
            InteropEvent::Disconnected {
                gateway_stopped: false,
                ..
            }
        ),
        "{ev:?}"
    );
    assert!(!c.is_connected());
    assert!(process_running(keeper), "the keeper outlives its gateway");

    // While it is down: the lane to the server still carries calls…
    let r = c
        .invoke("Restart.Echo", j(r#"{"n": 2}"#), &opts)
        .expect("an invocation over an existing lane works without the gateway");
    assert_eq!(r.returned, j(r#"{"n": 2}"#));
    // …shared memory still holds contexts (this write must survive the restart)…
    c.contexts()
        .update("restart.watched", j(r#"{"phase": "down"}"#))
        .unwrap();
    // …and what needs the gateway fails at once with a typed error.
    let t = Instant::now();
    let e = c.contexts().get("restart.never-opened").unwrap_err();
    assert_eq!(e.status(), Status::Disconnected, "{e}");
    let e = c.register("Restart.Late", |_| Ok(Value::Null)).unwrap_err();
    assert!(matches!(e, ClientError::Disconnected), "{e}");
    let e = c.invoke("Restart.Nobody", Value::Null, &opts).unwrap_err();
    assert_eq!(e.status(), Status::Disconnected, "{e}");
    let e = c
        .subscribe_stream("Restart.Ticks", StreamParams::default(), |_| {})
        .unwrap_err();
    assert_eq!(e.status(), Status::Disconnected, "{e}");
    let e = c
        .subscribe("restart.other", Default::default(), |_| {})
        .unwrap_err();
    assert_eq!(e.status(), Status::Disconnected, "{e}");
    let failing = t.elapsed();
    eprintln!("five calls needing the gateway failed in {failing:?}");
    assert!(
        failing < FAIL_FAST_HANG_GUARD,
        "failing took {failing:?}: a call waited for the gateway"
    );

    // The gateway comes back on the same socket and adopts the kept contexts.
    let started = Instant::now();
    let gw2 = GatewayProc::start(&dir, &[]);
    let listening = started.elapsed();
    let back = Instant::now();
    // Timings are printed, not asserted: `knit bench restart` measures them.
    let ev = wait_for(&events, RECONNECT_HANG_GUARD, "Reconnected", |e| {
        matches!(e, InteropEvent::Reconnected(_))
    });
    let reconnect = back.elapsed();
    eprintln!("gateway listening after {listening:?}; client reconnected {reconnect:?} later");
    // The server process came back too and registered its method again: our client sees it.
    let served = c
        .wait_for_method("Restart.Echo", RECONNECT_HANG_GUARD)
        .expect("the method is served again");
    let restored = back.elapsed();
    eprintln!(
        "method served again {restored:?} after the gateway listened (by {})",
        served.servers[0].peer_id
    );
    let InteropEvent::Reconnected(me) = ev else {
        unreachable!()
    };
    assert_eq!(
        me.instance,
        c.instance().instance,
        "the instance id is kept"
    );
    assert!(c.is_connected());
    assert_eq!(
        gw2.keeper_pid(),
        Some(keeper),
        "the same keeper serves the new gateway"
    );

    // Retained contexts are intact: the exited writer's, and the one written while down.
    assert_eq!(
        ctx_get(&socket, "restart.retained"),
        json!({"v": 42, "who": "writer"})
    );
    assert_eq!(
        ctx_get(&socket, "restart.watched"),
        json!({"phase": "down"})
    );

    // The server re-registered its method by itself.
    let out = run_knit(
        &[
            "--gateway",
            sock(&socket),
            "invoke",
            "Restart.Echo",
            r#"{"n": 3}"#,
        ],
        STARTUP,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.json()["returned"], json!({"n": 3}));
    assert_eq!(out.json()["executed_by"]["application"], "restart-server");
    // Our client calls it again (over a new lane).
    let r = c.invoke("Restart.Echo", j(r#"{"n": 4}"#), &opts).unwrap();
    assert_eq!(r.returned, j(r#"{"n": 4}"#));

    // Our context subscription follows new writes.
    let out = run_knit(
        &[
            "--gateway",
            sock(&socket),
            "ctx",
            "update",
            "restart.watched",
            r#"{"phase": "after"}"#,
        ],
        STARTUP,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_for(
        &ctx_rx,
        STARTUP,
        "the context update after the restart",
        |u| u.data.get("phase") == Some(&Value::from("after")),
    );

    // Our bus subscription and the command-line subscriber receive new publishes. Each
    // publisher connects anew and learns who subscribes from its welcome; publish until both
    // resubscriptions are visible to it.
    let deadline = Instant::now() + STARTUP;
    let (mut ours, mut cli) = (false, false);
    let mut n = 100;
    while !(ours && cli) {
        let out = run_knit(
            &[
                "--gateway",
                sock(&socket),
                "pub",
                "restart.topic",
                &format!(r#"{{"n": {n}}}"#),
            ],
            STARTUP,
        );
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        ours |= bus_rx
            .recv_timeout(Duration::from_millis(100))
            .is_ok_and(|v| v.get("n").is_some());
        // Nothing was published before the restart: any line is a message from after it.
        cli |= sub_out
            .wait_for(Duration::from_millis(100), |l| l.contains("restart.topic"))
            .is_some();
        assert!(
            Instant::now() < deadline,
            "no bus message after the restart (our client: {ours}, knit sub: {cli})"
        );
        n += 1;
    }

    // Channel membership is restored: a publish on Red reaches our channel subscription.
    assert_eq!(c.channels().my(), Some("Red".to_string()));
    let out = run_knit(
        &[
            "--gateway",
            sock(&socket),
            "ctx",
            "set-path",
            "___channel___Red",
            "data.restart",
            r#""after""#,
        ],
        STARTUP,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_for(&ch_rx, STARTUP, "a channel update after the restart", |u| {
        u.data.get("restart") == Some(&Value::from("after"))
    });

    // The stream subscription was made again: items flow from the server as it reconnected
    // (a new peer id).
    let e = wait_for(
        &st_rx,
        STARTUP,
        "a stream item after the restart",
        |e| match e {
            StreamEvent::Data { server, .. } => server.peer_id != ticks_before.peer_id,
            StreamEvent::Closed { .. } => true,
        },
    );
    assert!(matches!(e, StreamEvent::Data { .. }), "{e:?}");

    // Every long-running tool rode the restart out.
    assert!(echo.child.try_status().is_none(), "knit serve exited");
    assert!(ticks.try_status().is_none(), "knit stream serve exited");
    assert!(sub.try_status().is_none(), "knit sub exited");

    // A command-line subscriber of the stream: its server stops with the gateway, and may be
    // gone before the subscriber's own connection closes; still a clean stop (exit 6).
    let mut stream_sub = Command::new(common::knit_bin())
        .args(["--gateway", sock(&socket), "stream", "sub", "Restart.Ticks"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stream_sub_out = common::Lines::spawn(stream_sub.stdout.take().unwrap());
    let mut stream_sub = common::ChildGuard::new(stream_sub, "knit stream sub");
    stream_sub_out
        .wait_for(STARTUP, |l| l.contains("\"data\""))
        .expect("knit stream sub receives items");

    // A clean stop: the gateway exits 0, its keeper exits, the tools see it and exit 6, and
    // nothing is left running or in /dev/shm.
    let mut gw2 = gw2;
    let gw_pid = gw2.child.pid();
    gw2.child.signal(rustix::process::Signal::TERM);
    let status = gw2.child.wait_timeout(STARTUP).expect("the gateway stops");
    assert_eq!(status.code(), Some(0), "gateway log: {}", gw2.log());
    assert!(
        common::wait_until(STARTUP, || !process_running(keeper)),
        "the keeper outlived a clean stop: {} {}; gateway log: {}",
        std::fs::read_to_string(format!("/proc/{keeper}/stat")).unwrap_or_default(),
        std::fs::read_to_string(format!("/proc/{keeper}/wchan")).unwrap_or_default(),
        gw2.log()
    );
    for (what, child) in [
        ("knit serve", &mut echo.child),
        ("knit stream serve", &mut ticks),
        ("knit sub", &mut sub),
        ("knit stream sub", &mut stream_sub),
    ] {
        let status = child
            .wait_timeout(STARTUP)
            .unwrap_or_else(|| panic!("{what} did not exit after a clean stop"));
        assert_eq!(status.code(), Some(6), "{what}");
    }
    assert!(!process_running(gw_pid));
    assert!(!socket.exists(), "the socket file is removed");
    assert!(
        !knit::keeper::socket_path(&socket).exists(),
        "the keeper socket is removed"
    );
    let shm: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("knit"))
                .collect()
        })
        .unwrap_or_default();
    assert!(shm.is_empty(), "knit entries in /dev/shm: {shm:?}");
    c.close();
}

/// An embedded gateway (no keeper) stopped cleanly and started again: clients reconnect,
/// register again, keep their channel and resynchronise followers of contexts that came back
/// as new segments; calls in flight fail with a clear reason instead of hanging.
#[test]
fn an_embedded_gateway_restarted_without_a_keeper_gets_clients_back() {
    let dir = TempDir::new("restart-emb");
    let start = || spawn_gateway(GatewayConfig::new(dir.socket()));
    let gw = start();
    let server = Client::builder("emb-server")
        .socket(dir.socket())
        .connect()
        .unwrap();
    server
        .register("Emb.Echo", |call| Ok(call.args.clone()))
        .unwrap();
    // A slow method, relayed: its call is in flight when the gateway goes.
    let relayed = Client::builder("emb-relayed")
        .socket(dir.socket())
        .relay_only(true)
        .connect()
        .unwrap();
    let (running_tx, running) = channel::<()>();
    relayed
        .register("Emb.Slow", move |_| {
            let _ = running_tx.send(());
            std::thread::sleep(Duration::from_secs(3));
            Ok(Value::Null)
        })
        .unwrap();
    let c = Client::builder("emb-client")
        .socket(dir.socket())
        .connect()
        .unwrap();
    let (etx, events) = channel::<InteropEvent>();
    let _ev = c.on_event(move |e| {
        let _ = etx.send(e.clone());
    });
    let opts = InvokeOptions {
        target: Target::Best,
        wait: STARTUP,
        timeout: Duration::from_secs(30),
    };
    assert_eq!(
        c.invoke("Emb.Echo", Value::from(1), &opts)
            .unwrap()
            .returned,
        Value::from(1)
    );
    c.channels().join("Red").unwrap();
    c.channels()
        .publish(j(r#"{"k": "v"}"#), Some("Red"))
        .unwrap();
    let (ch_tx, ch_rx) = channel::<ChannelUpdate>();
    let _chs = c
        .channels()
        .subscribe(move |u| {
            let _ = ch_tx.send(u.clone());
        })
        .unwrap();
    wait_for(&ch_rx, STARTUP, "the channel's current data", |u| {
        u.data.get("k").is_some()
    });

    let slow = {
        let c = c.clone();
        let opts = opts.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            (c.invoke("Emb.Slow", Value::Null, &opts), t.elapsed())
        })
    };
    // The relayed call is in flight once its server runs it.
    running
        .recv_timeout(STARTUP)
        .expect("the relayed call reaches its server");
    gw.shutdown();
    let ev = wait_for(&events, STARTUP, "Disconnected", |e| {
        matches!(e, InteropEvent::Disconnected { .. })
    });
    assert!(
        matches!(
            ev,
            InteropEvent::Disconnected {
                gateway_stopped: true,
                ..
            }
        ),
        "{ev:?}"
    );
    let (r, took) = slow.join().unwrap();
    let e = r.expect_err("the relayed call cannot complete");
    assert_eq!(e.status(), Status::Disconnected, "{e}");
    assert!(took < Duration::from_secs(3), "the call hung for {took:?}");
    if let InvokeError::Failed(r) = &e {
        assert!(
            r.message.contains("gateway connection lost"),
            "{}",
            r.message
        );
    }

    let gw = start();
    let back = Instant::now();
    // Old peers are forgotten with reason "reset" before we hear we are back.
    let mut reset = false;
    wait_for(&events, RECONNECT_HANG_GUARD, "Reconnected", |e| {
        if let InteropEvent::ServerRemoved { reason, .. } = e {
            reset |= reason == "reset";
        }
        matches!(e, InteropEvent::Reconnected(_))
    });
    // Printed, not asserted (`knit bench restart` measures reconnection).
    eprintln!(
        "embedded gateway: reconnected {:?} after it listened",
        back.elapsed()
    );
    assert!(reset, "no ServerRemoved with reason \"reset\"");
    // The server registered again.
    assert_eq!(
        c.invoke("Emb.Echo", Value::from(2), &opts)
            .unwrap()
            .returned,
        Value::from(2)
    );
    // The new gateway's Red is a new, empty channel: our follower is told, conflated.
    let u = wait_for(&ch_rx, STARTUP, "the channel resynchronised", |u| {
        u.data.get("k").is_none()
    });
    assert!(u.version >= 1);
    assert_eq!(c.channels().my(), Some("Red".to_string()));
    c.channels().publish(j(r#"{"k": "again"}"#), None).unwrap();
    wait_for(&ch_rx, STARTUP, "a publish after the restart", |u| {
        u.data.get("k") == Some(&Value::from("again"))
    });
    drop((c, server, relayed));
    gw.shutdown();
}

/// A client built with `reconnect(false)` stays disconnected.
#[test]
fn a_client_without_reconnection_stays_disconnected() {
    let dir = TempDir::new("restart-off");
    let start = || spawn_gateway(GatewayConfig::new(dir.socket()));
    let gw = start();
    let on = Client::builder("on")
        .socket(dir.socket())
        .connect()
        .unwrap();
    let off = Client::builder("off")
        .socket(dir.socket())
        .reconnect(false)
        .connect()
        .unwrap();
    gw.shutdown();
    assert!(common::wait_until(STARTUP, || !off.is_connected() && !on.is_connected()));
    let gw = start();
    assert!(common::wait_until(STARTUP, || on.is_connected()));
    assert!(!off.is_connected());
    assert!(matches!(
        off.connection_state(),
        knit::client::ConnectionState::Disconnected {
            gateway_stopped: true,
            ..
        }
    ));
    drop((on, off));
    gw.shutdown();
}

/// The keeper is killed while its gateway runs: the gateway starts another and hands it every
/// context, so a crash afterwards still loses nothing.
#[test]
fn a_gateway_whose_keeper_dies_starts_another_and_hands_it_every_context() {
    let dir = TempDir::new("restart-keeper");
    let mut gw = GatewayProc::start(&dir, &[]);
    let socket = gw.socket.clone();
    let first = gw.keeper_pid().expect("a keeper");
    let set = |name: &str, json: &str| {
        let out = run_knit(
            &["--gateway", sock(&socket), "ctx", "set", name, json],
            STARTUP,
        );
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    };
    set("before", r#"{"x": 1}"#);
    common::stop_keeper(&socket);
    assert!(
        common::wait_until(STARTUP, || gw.keeper_pid().is_some_and(|p| p != first)),
        "no new keeper; gateway log: {}",
        gw.log()
    );
    set("after", r#"{"y": 2}"#);
    gw.child.kill9();
    let _gw2 = GatewayProc::start(&dir, &[]);
    assert_eq!(ctx_get(&socket, "before"), json!({"x": 1}));
    assert_eq!(ctx_get(&socket, "after"), json!({"y": 2}));
}

/// Only a socket is ever replaced: a file (or directory) at the gateway's path is left as it
/// is and the gateway refuses to start, with a usage error naming the path. (A mistyped
/// `--gateway` used to delete the file.)
#[test]
fn a_gateway_never_replaces_what_is_not_a_socket() {
    use knit::gateway::Gateway;
    let dir = TempDir::new("not-a-socket");
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let Err(e) = Gateway::bind(GatewayConfig::new(file.clone())) else {
        panic!("the gateway started on a regular file");
    };
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
    assert!(e.to_string().contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let sub = dir.path().join("adir");
    std::fs::create_dir(&sub).unwrap();
    let Err(e) = Gateway::bind(GatewayConfig::new(sub.clone())) else {
        panic!("the gateway started on a directory");
    };
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
    assert!(sub.is_dir());
    // Through the CLI: the usage exit code.
    let out = common::run_knit(
        &["gateway", "--gateway", file.to_str().unwrap(), "--no-ws"],
        STARTUP,
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

/// Sockets whose names differ only after a dot (`gw.one`, `gw.two`, and `gw` against
/// `gw.sock`) get gateways of their own: their lock and keeper files are not shared.
#[test]
fn gateways_on_sockets_differing_in_their_extension_both_start() {
    let dir = TempDir::new("two-ext");
    for (a, b) in [("gw.one", "gw.two"), ("gw", "gw.sock")] {
        let one = spawn_gateway(GatewayConfig::new(dir.path().join(a)));
        let two = spawn_gateway(GatewayConfig::new(dir.path().join(b)));
        assert_ne!(
            knit::control::own_file(one.socket_path(), "lock"),
            knit::control::own_file(two.socket_path(), "lock")
        );
        one.shutdown();
        two.shutdown();
    }
}

/// Opens (creating) a gateway's lock file, as another holder of it would.
fn open_lock_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

/// How many descriptors of this process are open on `path`.
fn descriptors_of(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p == path)
        .count()
}

/// A second gateway on a socket is refused; a lock on it held only for a moment (a process that
/// forked while the previous gateway ran keeps a copy until it execs) is waited out.
#[test]
fn a_second_gateway_is_refused_but_a_lock_held_for_a_moment_is_waited_out() {
    use knit::gateway::Gateway;
    let dir = TempDir::new("bind-twice");
    let gw = spawn_gateway(GatewayConfig::new(dir.socket()));
    let second = Gateway::bind(GatewayConfig::new(dir.socket()));
    assert!(
        matches!(&second, Err(e) if e.status() == Status::AlreadyRunning),
        "{:?}",
        second.err()
    );
    gw.shutdown();
    // Another holder of the lock file, as a forked child would be.
    let lock_path = knit::control::own_file(&dir.socket(), "lock");
    assert!(
        !lock_path.exists(),
        "a clean stop removes the lock file too"
    );
    let open_lock = || open_lock_file(&lock_path);
    let held = open_lock();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    // Held throughout: refused.
    let refused = Gateway::bind(GatewayConfig::new(dir.socket()));
    assert!(matches!(&refused, Err(e) if e.status() == Status::AlreadyRunning));
    // Let go while a bind is trying: it starts. The bind is seen trying once it has the lock
    // file open too (a second descriptor of it in this process).
    let socket = dir.socket();
    let binding = std::thread::spawn(move || Gateway::bind(GatewayConfig::new(socket)).map(|_| ()));
    let opened = || descriptors_of(&lock_path);
    assert!(common::wait_until(STARTUP, || opened() >= 2 || binding.is_finished()));
    drop(held);
    let r = binding.join().unwrap();
    assert!(r.is_ok(), "{r:?}");
}

/// A stopping gateway unlinks its lock file while it holds it. A bind that opened that file
/// before, and locks it after, must not take the unlinked file for the gateway's lock (a third
/// gateway starting meanwhile would find the path free and run beside it): it locks the file
/// at the path.
#[test]
fn a_bind_that_locked_an_unlinked_lock_file_takes_the_one_at_the_path() {
    use knit::gateway::Gateway;
    let dir = TempDir::new("bind-unlinked");
    let lock_path = knit::control::own_file(&dir.socket(), "lock");
    let open_lock = || open_lock_file(&lock_path);
    // The stopping gateway, as far as the lock goes.
    let held = open_lock();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let socket = dir.socket();
    let binding = std::thread::spawn(move || Gateway::bind(GatewayConfig::new(socket)));
    let opened = || descriptors_of(&lock_path);
    assert!(common::wait_until(STARTUP, || opened() >= 2 || binding.is_finished()));
    std::fs::remove_file(&lock_path).unwrap();
    drop(held);
    let gw = binding.join().unwrap().expect("the bind starts");
    // The lock at the path is the bound gateway's: nobody else can take it.
    let other = open_lock();
    let taken = rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive);
    assert!(
        taken.is_err(),
        "the file at the lock path is not locked: a second gateway would start"
    );
    drop(gw);
}

/// An event subscription made while its client reconnects sees each (server, method) pair
/// consistently: never added while it already has it, never removed before it was added. The
/// reconnection swaps every peer at once and queues its events under the same gate as a
/// subscription's replay and joining.
#[test]
fn event_subscriptions_made_during_reconnections_see_consistent_events() {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const RESTARTS: usize = 12;
    let dir = TempDir::new("events-reconnect");
    let start = || spawn_gateway(GatewayConfig::new(dir.socket()));
    let mut gw = start();
    let server = Client::builder("evr-server")
        .socket(dir.socket())
        .connect()
        .unwrap();
    for i in 0..3 {
        server
            .register(format!("Evr.{i}").as_str(), |_| Ok(Value::Null))
            .unwrap();
    }
    let observer = Arc::new(
        Client::builder("evr-observer")
            .socket(dir.socket())
            .connect()
            .unwrap(),
    );
    let sees_server = |c: &Client, peer| {
        c.methods()
            .iter()
            .filter(|m| m.def.name.starts_with("Evr."))
            .all(|m| m.servers.iter().any(|s| s.peer_id == peer))
            && c.methods()
                .iter()
                .filter(|m| m.def.name.starts_with("Evr."))
                .count()
                == 3
    };
    assert!(common::wait_until(STARTUP, || sees_server(
        &observer,
        server.instance().peer_id
    )));
    // What one subscription saw, in order: (added?, server, method).
    type Log = Arc<Mutex<Vec<(bool, u64, String)>>>;
    let done = Arc::new(AtomicBool::new(false));
    let subscribing = {
        let (o, d) = (observer.clone(), done.clone());
        std::thread::spawn(move || {
            let mut logs: Vec<Log> = Vec::new();
            let mut live = std::collections::VecDeque::new();
            while !d.load(Ordering::Acquire) {
                let log: Log = Arc::default();
                let l = log.clone();
                live.push_back(o.on_event(move |e| {
                    let entry = match e {
                        InteropEvent::ServerMethodAdded { server, method } => {
                            (true, server.peer_id.0, method.name.clone())
                        }
                        InteropEvent::ServerMethodRemoved { server, method } => {
                            (false, server.peer_id.0, method.name.clone())
                        }
                        _ => return,
                    };
                    l.lock().unwrap().push(entry);
                }));
                if live.len() > 16 {
                    live.pop_front();
                }
                logs.push(log);
                // Pacing only: a subscription every 100 µs or so across the restarts.
                std::thread::sleep(Duration::from_micros(100));
            }
            (logs, live)
        })
    };
    for _ in 0..RESTARTS {
        gw.shutdown();
        gw = start();
        let reconnected = common::wait_until(STARTUP, || {
            server.is_connected() && sees_server(&observer, server.instance().peer_id)
        });
        assert!(reconnected, "the observer did not see the server again");
    }
    done.store(true, Ordering::Release);
    let (logs, _live) = subscribing.join().unwrap();
    // Every callback queued so far has run once a call made now has its answer delivered: the
    // dispatch thread runs tasks in order.
    let (tx, rx) = channel();
    let _marker = observer.on_event(move |_| {
        let _ = tx.send(());
    });
    rx.recv_timeout(STARTUP).expect("the dispatch thread runs");
    let mut wrong = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let mut have = BTreeSet::new();
        for (added, peer, name) in log.lock().unwrap().iter() {
            let key = (*peer, name.clone());
            let ok = if *added {
                have.insert(key)
            } else {
                have.remove(&key)
            };
            if !ok {
                wrong.push(format!(
                    "subscription {i}: {} {name} of peer {peer}",
                    if *added {
                        "added twice"
                    } else {
                        "removed unseen"
                    }
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} subscriptions saw inconsistent events: {:?}",
        wrong.len(),
        logs.len(),
        &wrong[..wrong.len().min(10)]
    );
    drop(gw);
}

#[test]
fn a_context_subscription_waiting_when_its_context_appears_as_the_gateway_stops_is_kept() {
    // The subscription waiting for "k" was taken off the waiting list to attach when "k" was
    // announced; the gateway stopped just then, the attach failed ("the connection to the
    // gateway is closed", logged) and the subscription was in no list the reconnection
    // restores: it never heard of "k" again (5 of 5 runs with the stop right after the write).
    let dir = TempDir::new("restart-ctx-attach");
    let start = || spawn_gateway(GatewayConfig::new(dir.socket()));
    let mut gw = start();
    let connect = |app: &str| Client::builder(app).socket(dir.socket()).connect().unwrap();
    let b = connect("reader");
    let (tx, b_events) = channel::<InteropEvent>();
    let _eb = b.on_event(move |e| {
        let _ = tx.send(e.clone());
    });
    for round in 0..3 {
        let name = format!("k{round}");
        let (tx, rx) = channel::<ContextUpdate>();
        let _sub = b
            .contexts()
            .subscribe(&name, move |u| {
                let _ = tx.send(u.clone());
            })
            .unwrap();
        // Made by a client of this gateway (the reader waits for it), which then goes: the
        // gateway stops right after.
        let a = connect(&format!("maker-{round}"));
        a.contexts().set(&name, j(r#"{"n": 0}"#)).unwrap();
        gw.shutdown();
        gw = start();
        wait_for(&b_events, STARTUP, "the reader reconnected", |e| {
            matches!(e, InteropEvent::Reconnected { .. })
        });
        // Written by a client of the new gateway: the context (lost with the old gateway: no
        // keeper here) is made again, and the reader must hear of it. (The first writer's own
        // writes could land in the segment it still maps before its reconnection has found
        // that segment gone: lost by design without a keeper.)
        let w = connect(&format!("writer-{round}"));
        for n in 1..=3 {
            w.contexts()
                .set(&name, Value::object([("n", Value::from(n))]))
                .unwrap();
        }
        wait_for(
            &rx,
            STARTUP,
            &format!("round {round}: the last write"),
            |u| u.data.get("n") == Some(&Value::from(3)),
        );
    }
    gw.shutdown();
}

#[test]
fn a_gateway_refuses_a_configuration_it_cannot_run_with() {
    // Through the API nothing checked these: `queue_depth: 0` made the gateway panic at its
    // first connection; a lane capacity or context log the shared memory cannot have failed
    // every lane or context write later.
    let dir = TempDir::new("bad-config");
    type Tweak = fn(&mut GatewayConfig);
    let cases: [(&str, Tweak); 6] = [
        ("queue_depth", |c| c.queue_depth = 0),
        ("lane_capacity", |c| c.limits.lane_capacity = 1000),
        ("lane_capacity", |c| c.limits.lane_capacity = 0),
        ("context_log", |c| c.limits.context_log = 1000),
        ("context_log", |c| c.limits.context_log = 0),
        ("max_payload", |c| c.limits.max_payload = 0),
    ];
    for (what, tweak) in cases {
        let mut cfg = GatewayConfig::new(dir.socket());
        tweak(&mut cfg);
        let Err(e) = knit::gateway::Gateway::bind(cfg) else {
            panic!("a gateway bound with a bad {what}");
        };
        assert_eq!(e.status(), Status::InvalidArgument, "{e}");
        assert!(e.to_string().contains(what), "{e}");
        assert!(!dir.socket().exists(), "{what}: a socket was made");
    }
    // The same path takes a sound configuration.
    let gw = spawn_gateway(GatewayConfig::new(dir.socket()));
    gw.shutdown();
}
