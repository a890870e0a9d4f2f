//! The published JavaScript client libraries against knit's bridge, unchanged: GW3 conformance
//! with the golden transcripts, mixed worlds (a Node web app and a native app calling each other),
//! and a real headless Chromium page.
//!
//! Needs Node and `npm ci` in `tests/web` (and `/usr/bin/chromium` for the browser test);
//! `.ci/bridge.sh` installs them. Without them these tests are skipped with a message, unless
//! `KNIT_REQUIRE_WEB=1` (set by CI) makes a missing piece a failure.

mod common;

use common::{Env, Lcg};
use knit::bridge::{AuthMode, BridgeConfig};
use knit::client::{
    Client, ContextUpdate, InvokeError, InvokeOptions, MethodError, StreamEvent, StreamOptions,
    StreamParams,
};
use knit::gateway::channels::ChannelConfig;
use knit::gateway::GatewayConfig;
use knit::{Status, Value};
use serde_json::Value as J;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web")
}

/// Whether the Node side can run; if not, explains (and fails under `KNIT_REQUIRE_WEB`).
fn have_node(extra: Option<&Path>) -> bool {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let modules = web_dir().join("node_modules/@interopio/core").exists()
        && web_dir().join("node_modules/@glue42/core").exists();
    let extra_ok = extra.is_none_or(|p| p.exists());
    if node && modules && extra_ok {
        return true;
    }
    let what = format!(
        "node: {node}, tests/web/node_modules: {modules}{}",
        extra
            .map(|p| format!(", {}: {extra_ok}", p.display()))
            .unwrap_or_default()
    );
    if std::env::var_os("KNIT_REQUIRE_WEB").is_some() {
        panic!("the web tests cannot run ({what}); run .ci/bridge.sh");
    }
    eprintln!("skipping: the web tests need Node and `npm ci` in tests/web ({what})");
    false
}

/// A gateway whose WebSocket bridge (on an ephemeral loopback port) authenticates with `auth`.
fn gateway(tag: &str, auth: AuthMode) -> Env {
    gateway_with(tag, auth, |_| {})
}

/// [`gateway`], its configuration first adjusted by `tune`.
fn gateway_with(tag: &str, auth: AuthMode, tune: impl FnOnce(&mut GatewayConfig)) -> Env {
    Env::with(tag, |cfg| {
        tune(cfg);
        let mut b = BridgeConfig::loopback_ephemeral();
        b.auth = auth;
        cfg.bridge = Some(b);
    })
}

fn url(gw: &Env) -> String {
    format!("ws://{}", gw.ws())
}

fn os_user() -> String {
    knit::sys::identity::user_name(knit::sys::identity::euid())
}

/// A Node script with JSON lines on stdout and commands on stdin; killed if dropped.
struct Script {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Script {
    fn start(script: &str, args: &[&str]) -> Script {
        let mut child = Command::new("node")
            .arg(script)
            .args(args)
            .current_dir(web_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Script {
            child,
            stdin,
            lines,
        }
    }

    /// The next line (parsed when it is JSON); fails the test after `within`.
    fn line(&self, within: Duration) -> Option<String> {
        self.lines.recv_timeout(within).ok()
    }

    fn json(&self) -> J {
        let l = self
            .line(Duration::from_secs(60))
            .expect("the script printed nothing within a minute");
        serde_json::from_str(&l).unwrap_or_else(|_| panic!("not JSON: {l}"))
    }

    fn tell(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}");
        }
    }

    /// Waits for the exit (with a deadline); the script's own exit status.
    fn finish(mut self, within: Duration) -> bool {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + within;
        // Show (and drain) what the script still prints; its stdout closes when it exits.
        while let Some(l) = self.line(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            println!("{l}");
        }
        let pid = self.child.id();
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait().map(|s| s.success()).unwrap_or(false));
        });
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(ok) => ok,
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("script {pid} did not finish within {within:?}");
            }
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn conformance(lib: &str) {
    if !have_node(None) {
        return;
    }
    // The reference gateway has no colour channels: without them, a login announces the same
    // contexts on both (knit's default channels would add eight `context-added` frames).
    let gw = gateway_with(&format!("conf-{lib}"), AuthMode::Open, |cfg| {
        cfg.channels = ChannelConfig {
            channels: Vec::new(),
            restrictions: Vec::new(),
        }
    });
    let url = url(&gw);
    let script = Script::start("conformance.js", &["--url", &url, "--lib", lib]);
    assert!(
        script.finish(Duration::from_secs(180)),
        "GW3 transcripts differ from the golden ones (see the output above)"
    );
}

#[test]
fn gw3_transcripts_with_interopio_core_match_the_reference_gateway() {
    conformance("io");
}

#[test]
fn gw3_transcripts_with_glue42_core_match_the_reference_gateway() {
    conformance("glue");
}

/// Runs one check of `tests/web/semantics.js` with `lib` against a fresh gateway.
fn semantics(lib: &str, check: &str) {
    if !have_node(None) {
        return;
    }
    let gw = gateway(&format!("sem-{check}-{lib}"), AuthMode::Open);
    let url = url(&gw);
    let script = Script::start(
        "semantics.js",
        &["--url", &url, "--lib", lib, "--check", check],
    );
    assert!(
        script.finish(Duration::from_secs(60)),
        "{check} with {lib} failed (see the output above)"
    );
}

#[test]
fn a_web_callers_array_arguments_reach_web_methods_and_streams_as_arrays() {
    semantics("io", "array-arguments");
    semantics("glue", "array-arguments");
}

#[test]
fn a_callee_leaving_is_reported_before_the_call_waiting_on_it_fails() {
    semantics("io", "callee-gone-order");
    semantics("glue", "callee-gone-order");
}

#[test]
fn a_bus_subscription_to_the_empty_topic_is_accepted_and_served() {
    semantics("io", "bus-empty-topic");
    semantics("glue", "bus-empty-topic");
}

#[test]
fn a_bus_subscription_unsubscribed_twice_is_no_error() {
    semantics("io", "bus-unsubscribe-twice");
    semantics("glue", "bus-unsubscribe-twice");
}

/// A hundred web apps on one `knit gateway` process (`tests/web/scale.js`): every context
/// update reaches every app, every app calls its neighbour, a call to all servers reaches all
/// hundred, and the crowd leaving at once makes the gateway log no warning or error.
#[test]
fn a_hundred_web_apps_see_every_update_call_each_other_and_leave_quietly() {
    if !have_node(None) {
        return;
    }
    let script = Script::start(
        "scale.js",
        &["--knit", env!("CARGO_BIN_EXE_knit"), "--n", "100"],
    );
    let figures = script.json();
    assert_eq!(figures["n"], 100, "{figures}");
    assert!(
        script.finish(Duration::from_secs(180)),
        "the crowd missed something or the gateway complained (see the output above): {figures}"
    );
}

/// Runs `tests/web/differential.js`: the same seeded sequences of operations by apps using `lib`,
/// against knit and against the reference gateway, compared step by step.
fn differential(scenario: &str, lib: &str, seeds: &str) {
    if !have_node(None) {
        return;
    }
    let gw = gateway(&format!("diff-{scenario}-{lib}"), AuthMode::Open);
    let url = url(&gw);
    let script = Script::start(
        "differential.js",
        &[
            "--url",
            &url,
            "--scenario",
            scenario,
            "--lib",
            lib,
            "--seeds",
            seeds,
            "--ops",
            "150",
        ],
    );
    assert!(
        script.finish(Duration::from_secs(180)),
        "{scenario} with {lib} differs from the reference gateway (see the output above)"
    );
}

#[test]
fn random_context_writes_are_seen_as_on_the_reference_gateway() {
    differential("ctx", "io", "1,2,3,4");
    differential("ctx", "glue", "5,6");
}

#[test]
fn random_interop_sequences_give_the_results_of_the_reference_gateway() {
    differential("interop", "io", "1,2,3");
    differential("interop", "glue", "4");
}

#[test]
fn random_stream_sequences_deliver_and_end_as_on_the_reference_gateway() {
    differential("streams", "io", "1,2,3");
    differential("streams", "glue", "4");
}

#[test]
fn random_bus_sequences_reach_whom_the_reference_gateway_reaches() {
    differential("bus", "io", "1,2,3");
    differential("bus", "glue", "4");
}

fn native_side(gw: &Env) -> Client {
    let native = gw.client("rust-native");
    native
        .register("Native.Sum", |c| {
            let a = c.args.get("a").and_then(Value::as_i64).unwrap_or(0);
            let b = c.args.get("b").and_then(Value::as_i64).unwrap_or(0);
            Ok(Value::from(a + b))
        })
        .unwrap();
    native
        .register("Native.Fail", |_| {
            Err(MethodError::new("native says no")
                .with_context(Value::object([("why", Value::from("test"))])))
        })
        .unwrap();
    native
}

fn opts() -> InvokeOptions {
    InvokeOptions {
        wait: Duration::from_secs(10),
        timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn mixed(lib: &str) {
    if !have_node(None) {
        return;
    }
    let gw = gateway(&format!("mixed-{lib}"), AuthMode::Token);
    let native = native_side(&gw);
    let (url, user, token) = (url(&gw), os_user(), gw.token());
    let mut web = Script::start(
        "mixed.js",
        &[
            "--url", &url, "--user", &user, "--secret", &token, "--lib", lib,
        ],
    );
    let connected = web.json();
    assert_eq!(connected["user"], user.as_str(), "{connected}");
    let server = web.json();
    assert_eq!(server["server"]["pid"], std::process::id(), "{server}");
    assert_eq!(server["server"]["isLocal"], true);
    let sum = web.json();
    assert_eq!(sum["returned"], serde_json::json!({"_value": 42}), "{sum}");
    assert_eq!(sum["executed_by"], "rust-native");
    let fail = web.json();
    assert_eq!(fail["error"], "native says no", "{fail}");
    assert_eq!(
        fail["returned"],
        serde_json::json!({"why": "test"}),
        "{fail}"
    );
    assert_eq!(web.json(), serde_json::json!({"ready": true}));

    // The native app calls the web app's methods.
    let r = native
        .invoke(
            "Web.Upper",
            Value::object([("s", Value::from("abc"))]),
            &opts(),
        )
        .unwrap();
    assert_eq!(
        r.returned,
        Value::object([
            ("upper", Value::from("ABC")),
            ("caller", Value::from("rust-native"))
        ])
    );
    assert_eq!(r.executed_by.unwrap().application, "web-mixed");
    match native.invoke("Web.Fail", Value::map(), &opts()) {
        Err(InvokeError::Failed(r)) => {
            assert_eq!(r.message, "web says no");
            assert_eq!(r.failure_status(), Status::MethodFailed);
        }
        other => panic!("{other:?}"),
    }
    shared_contexts_bus_and_streams(&native, &mut web);
    web.tell("done");
    assert!(web.finish(Duration::from_secs(30)));
    // The web app is gone: so are its methods.
    let gone = native.invoke(
        "Web.Upper",
        Value::map(),
        &InvokeOptions {
            wait: Duration::from_millis(300),
            ..Default::default()
        },
    );
    assert_eq!(gone.unwrap_err().status(), Status::NoServer);
}

/// What a context subscriber saw: (data, delta, removed) as JSON.
fn seen(u: &ContextUpdate) -> (J, J, Vec<String>) {
    (u.data.to_json(), u.delta.to_json(), u.removed.clone())
}

fn web_seen(line: &J) -> (J, J, Vec<String>) {
    let removed = line["removed"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|k| k.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    (line["data"].clone(), line["delta"].clone(), removed)
}

/// The rest of a mixed world: contexts written on one side and observed on the other with the
/// same (data, delta, removed), bus messages both ways, a stream served on each side.
fn shared_contexts_bus_and_streams(native: &Client, web: &mut Script) {
    let wait = Duration::from_secs(10);
    let expect = |web: &mut Script, step: &str| -> J {
        let j = web.json();
        assert_eq!(j["step"], step, "{j}");
        j
    };
    // Native writes, observed by a native and a web subscriber alike.
    let (tx, rx) = mpsc::channel::<ContextUpdate>();
    let _mine = native
        .contexts()
        .subscribe("mixed.ctx", move |u| {
            let _ = tx.send(u.clone());
        })
        .unwrap();
    let c = native.contexts();
    let writes: Vec<Box<dyn Fn()>> = vec![
        Box::new(|| {
            c.set(
                "mixed.ctx",
                Value::from(serde_json::json!({"a": 1, "b": {"c": 2}})),
            )
            .map(|_| ())
            .unwrap()
        }),
        Box::new(|| {
            c.update(
                "mixed.ctx",
                Value::from(serde_json::json!({"a": null, "d": 3})),
            )
            .map(|_| ())
            .unwrap()
        }),
        Box::new(|| {
            c.set_path("mixed.ctx", "b.e", Value::from(5))
                .map(|_| ())
                .unwrap()
        }),
        Box::new(|| {
            c.set("mixed.ctx", Value::from(serde_json::json!({"x": [1]})))
                .map(|_| ())
                .unwrap()
        }),
    ];
    let empty = serde_json::json!({});
    for (i, write) in writes.iter().enumerate() {
        write();
        let mut n = rx
            .recv_timeout(wait)
            .expect("the native subscriber saw nothing");
        let mut w = expect(web, "ctx");
        if i == 0 {
            // The web library's `subscribe` creates a context it does not know yet, empty,
            // racing the native `set`: either side may start from that `{}` state and get the
            // value as the next change. The first callback is the value or `{}` (the libraries
            // report its delta as `{}` or as the value, depending on how they got it:
            // features.md §5.4), and both sides end up at the same value.
            while seen(&n).0 == empty {
                n = rx
                    .recv_timeout(wait)
                    .expect("the native subscriber saw nothing after `{}`");
            }
            while web_seen(&w).0 == empty {
                w = expect(web, "ctx");
            }
            assert_eq!(web_seen(&w).0, seen(&n).0);
        } else {
            assert_eq!(web_seen(&w), seen(&n), "web vs native for {n:?}");
        }
    }
    // Web writes, observed by the native side and by the web writer's own subscription.
    let (tx, rx) = mpsc::channel::<ContextUpdate>();
    let _theirs = native
        .contexts()
        .subscribe("web.ctx", move |u| {
            let _ = tx.send(u.clone());
        })
        .unwrap();
    for cmd in [
        r#"ctx update {"k":1}"#,
        r#"ctx update {"k":null,"m":{"n":1}}"#,
        r#"ctx setPath m.o 2"#,
        r#"ctx set {"z":true}"#,
    ] {
        web.tell(cmd);
        // The writer's own callback and its "written" come in either order.
        let (a, b) = (web.json(), web.json());
        let own = if a["step"] == "own-ctx" { a } else { b };
        assert_eq!(own["step"], "own-ctx", "{own}");
        let n = rx
            .recv_timeout(wait)
            .expect("the native subscriber saw nothing");
        if n.first || n.version == 1 {
            // The native side's first callback, or the creation it waited for (a change by the
            // web writer, whose delta is the whole value; the writer's own callback shows its
            // creation with an empty delta, as the GW3 libraries do): the data.
            assert_eq!(seen(&n).0, web_seen(&own).0, "{cmd}");
        } else {
            assert_eq!(seen(&n), web_seen(&own), "{cmd}");
        }
        if !n.first {
            assert_eq!(n.updater.as_ref().unwrap().application, "web-mixed");
        }
    }
    // The bus, both ways.
    let (tx, rx) = mpsc::channel::<knit::client::BusMessage>();
    let _sub = native
        .subscribe("web.topic", Default::default(), move |m| {
            let _ = tx.send(m.clone());
        })
        .unwrap();
    web.tell("publish");
    expect(web, "published");
    let m = rx
        .recv_timeout(wait)
        .expect("no bus message from the web app");
    assert_eq!(m.data, Value::object([("n", Value::from(1))]));
    assert_eq!(m.source.application, "web-mixed");
    native
        .publish(
            "mixed.topic",
            Value::object([("n", Value::from(2))]),
            &Default::default(),
        )
        .unwrap();
    let b = expect(web, "bus");
    assert_eq!(b["data"], serde_json::json!({"n": 2}));
    assert_eq!(b["from"], "rust-native");
    // A native stream with a web subscriber...
    let ticks = native
        .create_stream("Native.Ticks", StreamOptions::default())
        .unwrap();
    web.tell("subscribe-native-stream");
    expect(web, "subscribed");
    ticks.push(Value::object([("t", Value::from(1))])).unwrap();
    ticks.subscriptions()[0]
        .push(Value::object([("p", Value::from(1))]))
        .unwrap();
    let d = expect(web, "stream");
    assert_eq!(
        (d["data"].clone(), d["private"].clone(), d["server"].clone()),
        (
            serde_json::json!({"t": 1}),
            J::Bool(false),
            J::from("rust-native")
        )
    );
    let d = expect(web, "stream");
    assert_eq!(
        (d["data"].clone(), d["private"].clone()),
        (serde_json::json!({"p": 1}), J::Bool(true))
    );
    // ... and a web stream with a native subscriber.
    let (tx, rx) = mpsc::channel::<StreamEvent>();
    let sub = native
        .subscribe_stream(
            "Web.Ticks",
            StreamParams {
                wait,
                timeout: wait,
                ..Default::default()
            },
            move |e| {
                let _ = tx.send(e.clone());
            },
        )
        .unwrap();
    web.tell("push");
    expect(web, "pushed");
    match rx
        .recv_timeout(wait)
        .expect("no stream data from the web app")
    {
        StreamEvent::Data { data, server, .. } => {
            assert_eq!(data, Value::object([("w", Value::from(1))]));
            assert_eq!(server.application, "web-mixed");
        }
        other => panic!("{other:?}"),
    }
    drop(sub);
    ticks.close().unwrap();
    let closed = expect(web, "stream-closed");
    assert_eq!(closed["message"], "ServerInitiated");
}

/// Web apps subscribed to contexts that do not exist yet; native writes create them (`update`,
/// `set`, `set_path`): each web subscription's first callback shows the write's data. (The
/// gateway used to announce a context a native write created before the write landed, and a
/// web subscription joining in between began with `{}`: 30-50 % of the time per context.)
fn contexts_native_writes_create(lib: &str) {
    if !have_node(None) {
        return;
    }
    let gw = gateway(&format!("created-{lib}"), AuthMode::Token);
    let (prefix, n) = ("made.", 24);
    let mut web = mixed_script(
        &gw,
        "mixed-created.js",
        lib,
        &["--prefix", prefix, "--n", &n.to_string()],
    );
    let native = gw.client("rust-creator");
    let ctx = native.contexts();
    for i in 0..n {
        let name = format!("{prefix}{i}");
        let x = Value::from(i);
        match i % 3 {
            0 => ctx.update(&name, Value::object([("x", x)])),
            1 => ctx.set(&name, Value::object([("x", x)])),
            _ => ctx.set_path(&name, "x", x),
        }
        .unwrap();
    }
    web.tell(r#"{"first": true}"#);
    let first = web.json();
    for i in 0..n {
        let name = format!("{prefix}{i}");
        assert_eq!(
            first["first"][&name],
            serde_json::json!({"x": i}),
            "{name}'s first callback (every first callback: {first})"
        );
    }
}

#[test]
fn contexts_native_writes_create_reach_interopio_core_subscribers_with_their_data_first() {
    contexts_native_writes_create("io");
}

#[test]
fn contexts_native_writes_create_reach_glue42_core_subscribers_with_their_data_first() {
    contexts_native_writes_create("glue");
}

#[test]
fn interopio_core_web_app_and_native_app_call_each_other() {
    mixed("io");
}

#[test]
fn glue42_core_web_app_and_native_app_call_each_other() {
    mixed("glue");
}

#[test]
fn headless_chromium_page_and_native_app_call_each_other() {
    let chromium = std::env::var_os("KNIT_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !have_node(Some(&chromium)) || !web_dir().join("node_modules/playwright-core").exists() {
        return;
    }
    let gw = gateway("browser", AuthMode::Token);
    let native = native_side(&gw);
    // A context and a stream for the page to follow.
    native
        .contexts()
        .set("browser.ctx", Value::object([("v", Value::from(1))]))
        .unwrap();
    let feed = native
        .create_stream("Native.Feed", StreamOptions::default())
        .unwrap();
    let (url, user, token) = (url(&gw), os_user(), gw.token());
    let shot = gw.dir().path().join("page.png");
    let shot_s = shot.to_string_lossy().to_string();
    let mut page = Script::start(
        "browser.js",
        &[
            "--url",
            &url,
            "--user",
            &user,
            "--secret",
            &token,
            "--screenshot",
            &shot_s,
        ],
    );
    let r = page.json();
    assert_eq!(r["step"], "browser", "{r}");
    assert_eq!(r["sum"], serde_json::json!({"_value": 3}), "{r}");
    assert_eq!(r["by"], "rust-native");
    assert_eq!(r["user"], user.as_str());
    assert_eq!(page.json(), serde_json::json!({"ready": true}));
    assert!(shot.exists(), "no screenshot");
    let hello = native
        .invoke(
            "Browser.Hello",
            Value::object([("name", Value::from("knit"))]),
            &opts(),
        )
        .unwrap();
    assert_eq!(
        hello.returned,
        Value::object([
            ("hello", Value::from("knit")),
            ("from", Value::from("chromium")),
            ("caller", Value::from("rust-native"))
        ])
    );
    assert_eq!(hello.executed_by.unwrap().application, "browser-app");
    // The page subscribed to Native.Feed before it said it was ready.
    feed.push(Value::object([("tick", Value::from(1))]))
        .unwrap();
    page.tell("check");
    let seen = page.json();
    assert_eq!(seen["step"], "seen", "{seen}");
    assert_eq!(seen["ctx"], serde_json::json!({"v": 1}));
    assert_eq!(seen["feed"], serde_json::json!({"tick": 1}));
    // The page writes a context and serves a stream; the native app follows both.
    let (tx, rx) = mpsc::channel::<ContextUpdate>();
    let _out = native
        .contexts()
        .subscribe("browser.out", move |u| {
            let _ = tx.send(u.clone());
        })
        .unwrap();
    page.tell("write");
    assert_eq!(page.json()["step"], "written");
    let u = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(*u.data, Value::object([("from", Value::from("chromium"))]));
    let (tx, rx) = mpsc::channel::<StreamEvent>();
    let _sub = native
        .subscribe_stream("Browser.Ticks", StreamParams::default(), move |e| {
            let _ = tx.send(e.clone());
        })
        .unwrap();
    page.tell("push");
    assert_eq!(page.json()["step"], "pushed");
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        StreamEvent::Data { data, server, .. } => {
            assert_eq!(data, Value::object([("b", Value::from(1))]));
            assert_eq!(server.application, "browser-app");
        }
        other => panic!("{other:?}"),
    }
    page.tell("done");
    assert!(page.finish(Duration::from_secs(30)));
}

/// Starts `script`, a web side of the mixed-world tests, against `gw`'s bridge as the OS user
/// with `lib` (and `extra` arguments); returns once it says it is ready.
fn mixed_script(gw: &Env, script: &str, lib: &str, extra: &[&str]) -> Script {
    let (url, user, token) = (url(gw), os_user(), gw.token());
    let mut args = vec![
        "--url", &url, "--user", &user, "--secret", &token, "--lib", lib,
    ];
    args.extend_from_slice(extra);
    let web = Script::start(script, &args);
    assert_eq!(web.json(), serde_json::json!({"ready": true}), "{script}");
    web
}

/// Native and web apps write one context in a random interleaving (update, set, paths with
/// removals); after every write the stored value, a native subscriber's, a web subscriber's
/// and (every 10 writes) a newly joined web app's agree, and both subscribers are told the same
/// removed keys.
fn mixed_random_ctx(lib: &str, seed: u64, steps: u64) {
    if !have_node(None) {
        return;
    }
    let gw = gateway(&format!("mixed-rand-{lib}"), AuthMode::Token);
    let name = "mixed.random";
    let native = gw.client("rust-writer");
    let ctx = native.contexts();
    ctx.set(name, Value::from(serde_json::json!({"seq": 0})))
        .unwrap();
    let (tx, rx) = mpsc::channel::<(J, Vec<String>)>();
    let _sub = ctx
        .subscribe(name, move |u| {
            let _ = tx.send((u.data.to_json(), u.removed.clone()));
        })
        .unwrap();
    let mut web = mixed_script(&gw, "mixed-ctx.js", lib, &["--name", name]);
    let mut r = Lcg(seed);
    let mut stored = serde_json::json!({"seq": 0});
    for i in 1..=steps {
        let from_web = r.unit() < 0.5;
        let (cmd, op) = match r.below(3) {
            0 | 1 => {
                let mut o = r.object(1, 1);
                o.insert("seq".into(), J::from(i));
                let key = if r.unit() < 0.5 { "update" } else { "set" };
                (serde_json::json!({ key: o }), key)
            }
            _ => {
                let mut paths = Vec::new();
                for _ in 0..=r.below(2) {
                    let p = r.path(&stored);
                    let v = if r.unit() < 0.3 { J::Null } else { r.value(1) };
                    paths.push(serde_json::json!({"path": p, "value": v}));
                }
                paths.push(serde_json::json!({"path": "seq", "value": i}));
                (serde_json::json!({ "paths": paths }), "paths")
            }
        };
        let what = format!(
            "step {i}: {} {cmd} on {stored}",
            if from_web { "web" } else { "native" }
        );
        if from_web {
            web.tell(&cmd.to_string());
            assert_eq!(web.json(), serde_json::json!({"ok": true}), "{what}");
        } else {
            let arg = |k: &str| Value::from(cmd[k].clone());
            match op {
                "update" => ctx.update(name, arg("update")),
                "set" => ctx.set(name, arg("set")),
                _ => ctx.set_paths(
                    name,
                    cmd["paths"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| {
                            let path = p["path"].as_str().unwrap().to_string();
                            (path, Value::from(p["value"].clone()))
                        })
                        .collect(),
                ),
            }
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        let before = std::mem::replace(&mut stored, ctx.get(name).unwrap().data.to_json());
        assert_eq!(stored["seq"], i, "{what}: stored {stored}");
        let (native_saw, native_removed) = loop {
            let (data, removed) = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{what}: the native subscriber saw nothing"));
            if data["seq"] == i {
                break (data, removed);
            }
        };
        let joiner = i % 10 == 0;
        web.tell(&serde_json::json!({"view": i, "joiner": joiner}).to_string());
        let web_saw = web.json();
        assert_eq!(native_saw, stored, "{what}: the native subscriber");
        assert_eq!(web_saw["data"], stored, "{what}: the web subscriber");
        let mut web_removed: Vec<String> = web_saw["removed"]
            .as_array()
            .map(|a| a.iter().map(|k| k.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        // The web libraries list a top-level `remove` command's key as removed even when the key
        // was not there (on the reference gateway too); the native client lists what went.
        web_removed.retain(|k| before.get(k).is_some());
        let mut native_removed = native_removed;
        web_removed.sort();
        native_removed.sort();
        assert_eq!(web_removed, native_removed, "{what}: removed keys");
        if joiner {
            assert_eq!(web_saw["joined"], stored, "{what}: a web app joining now");
        }
    }
    web.tell(r#"{"done": true}"#);
    assert!(web.finish(Duration::from_secs(30)));
}

#[test]
fn random_context_writes_from_both_worlds_leave_every_view_equal() {
    mixed_random_ctx("io", 1, 120);
    mixed_random_ctx("glue", 2, 60);
}

/// Native and web apps register and unregister methods in a random order while a native and a
/// web caller invoke them with every target form; each invocation reaches exactly the servers
/// the registrations say, whichever world each is in.
fn mixed_random_interop(lib: &str, seed: u64, steps: u64) {
    use knit::model::{InstanceFilter, Target};
    use std::collections::{BTreeMap, BTreeSet};
    if !have_node(None) {
        return;
    }
    const APPS: [&str; 4] = ["rust-a", "rust-b", "web-a", "web-b"];
    const METHODS: [&str; 3] = ["Mix.M1", "Mix.M2", "Mix.M3"];
    let gw = gateway(&format!("mixed-interop-{lib}"), AuthMode::Token);
    let natives: BTreeMap<&str, Client> = [
        ("rust-a", gw.client("rust-a")),
        ("rust-b", gw.client("rust-b")),
    ]
    .into_iter()
    .collect();
    let mut web = mixed_script(&gw, "mixed-interop.js", lib, &[]);
    let mut serving: BTreeMap<&str, BTreeSet<&str>> =
        APPS.iter().map(|a| (*a, BTreeSet::new())).collect();
    let mut r = Lcg(seed);
    for i in 1..=steps {
        let m = METHODS[r.below(3)];
        if r.unit() < 0.3 {
            let app = APPS[r.below(4)];
            let now = !serving[app].contains(m);
            if let Some(c) = natives.get(app) {
                if now {
                    let by = Value::from(serde_json::json!({"by": app}));
                    c.register(m, move |_| Ok(by.clone())).unwrap();
                } else {
                    c.unregister(m).unwrap();
                }
            } else {
                web.tell(&serde_json::json!({"toggle": app, "method": m}).to_string());
                assert_eq!(
                    web.json(),
                    serde_json::json!({"registered": now}),
                    "step {i}"
                );
            }
            let s = serving.get_mut(app).unwrap();
            if now {
                s.insert(m);
            } else {
                s.remove(m);
            }
            // Both callers see the new set of servers before anyone calls.
            let want: Vec<&str> = APPS
                .iter()
                .copied()
                .filter(|a| serving[a].contains(m))
                .collect();
            web.tell(&serde_json::json!({"await": m, "servers": want}).to_string());
            assert_eq!(
                web.json()["seen"],
                serde_json::json!(want),
                "step {i}: web-a's view of {m}"
            );
            let native_view = || {
                let mut v: Vec<String> = natives["rust-a"]
                    .methods()
                    .iter()
                    .filter(|x| x.def.name == m)
                    .flat_map(|x| x.servers.iter().map(|s| s.application.clone()))
                    .collect();
                v.sort();
                v.dedup();
                v
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while native_view() != want && std::time::Instant::now() < deadline {
                std::thread::yield_now();
            }
            assert_eq!(native_view(), want, "step {i}: rust-a's view of {m}");
            continue;
        }
        let from_web = r.unit() < 0.5;
        let caller = if from_web { "web-a" } else { "rust-a" };
        let (x, y) = (APPS[r.below(4)], APPS[r.below(4)]);
        let form = r.below(6);
        let (js_target, target) = match form {
            0 => (serde_json::json!("best"), Target::Best),
            1 => (serde_json::json!("all"), Target::All),
            2 => (serde_json::json!("skipMine"), Target::SkipMine),
            3 => (
                serde_json::json!({"application": x}),
                Target::Instance(InstanceFilter::application(x)),
            ),
            4 => (
                serde_json::json!([{"application": x}, {"application": y}]),
                Target::List(vec![
                    InstanceFilter::application(x),
                    InstanceFilter::application(y),
                ]),
            ),
            _ => (
                serde_json::json!({"application": "nobody"}),
                Target::Instance(InstanceFilter::application("nobody")),
            ),
        };
        let servers: Vec<&str> = APPS
            .iter()
            .copied()
            .filter(|a| serving[a].contains(m))
            .collect();
        let mut expect: Vec<&str> = match form {
            0 => servers.first().into_iter().copied().collect(), // one of them (checked below)
            1 => servers.clone(),
            2 => servers.iter().copied().filter(|a| *a != caller).collect(),
            3 => servers.iter().copied().filter(|a| *a == x).collect(),
            4 => [x, y].into_iter().filter(|a| servers.contains(a)).collect(),
            _ => Vec::new(),
        };
        expect.sort();
        let what = format!("step {i}: {caller} invokes {m} on {js_target}, served by {servers:?}");
        let got: Result<(Vec<String>, Vec<String>), String> = if from_web {
            web.tell(&serde_json::json!({"invoke": m, "target": js_target}).to_string());
            let a = web.json();
            match a.get("error") {
                Some(e) => Err(e.to_string()),
                None => {
                    let list = |k: &str| -> Vec<String> {
                        a[k].as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_str().unwrap().to_string())
                            .collect()
                    };
                    Ok((list("executors"), list("returned")))
                }
            }
        } else {
            let opts = InvokeOptions {
                target,
                wait: Duration::ZERO,
                ..InvokeOptions::default()
            };
            match natives["rust-a"].invoke(m, Value::object([] as [(&str, Value); 0]), &opts) {
                Err(e) => Err(e.to_string()),
                Ok(res) => {
                    let mut pairs: Vec<(String, String)> = if res.multi {
                        res.all_return_values
                            .iter()
                            .map(|v| {
                                (
                                    v.executed_by.application.clone(),
                                    v.returned.to_json()["by"]
                                        .as_str()
                                        .unwrap_or("")
                                        .to_string(),
                                )
                            })
                            .collect()
                    } else {
                        let by = res
                            .executed_by
                            .as_ref()
                            .map(|e| e.application.clone())
                            .unwrap_or_default();
                        vec![(
                            by,
                            res.returned.to_json()["by"]
                                .as_str()
                                .unwrap_or("")
                                .to_string(),
                        )]
                    };
                    pairs.sort();
                    Ok(pairs.into_iter().unzip())
                }
            }
        };
        match got {
            Err(e) => assert!(
                expect.is_empty(),
                "{what}: failed ({e}), expected {expect:?}"
            ),
            Ok((executors, returned)) => {
                let mut returned = returned;
                returned.sort();
                assert_eq!(
                    executors, returned,
                    "{what}: each result comes from its executor"
                );
                if form == 0 {
                    assert!(
                        executors.len() == 1 && servers.contains(&executors[0].as_str()),
                        "{what}: {executors:?}"
                    );
                } else {
                    assert_eq!(executors, expect, "{what}");
                }
            }
        }
    }
    web.tell(r#"{"done": true}"#);
    assert!(web.finish(Duration::from_secs(30)));
}

#[test]
fn random_registrations_and_targets_reach_the_same_servers_from_both_worlds() {
    mixed_random_interop("io", 1, 150);
    mixed_random_interop("glue", 2, 60);
}

/// A native and a web app hold twin bus subscriptions (the same topic pattern, routing key and
/// source filter), made and ended at random, while a native and a web app publish with random
/// topics, routing keys and targets: after each publish both twins received the same, or, when
/// the publish targets one of the two apps, the other received nothing.
fn mixed_random_bus(lib: &str, seed: u64, steps: u64) {
    use knit::client::{BusSubscription, PublishOptions, SubscribeOptions};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::{Arc, Mutex};
    if !have_node(None) {
        return;
    }
    let gw = gateway(&format!("mixed-bus-{lib}"), AuthMode::Token);
    let native_sub = gw.client("rust-sub");
    let native_pub = gw.client("rust-pub");
    let got = Arc::new(Mutex::new(Vec::<String>::new()));
    let mark = Arc::new(AtomicI64::new(0));
    let m2 = mark.clone();
    let _marks = native_sub
        .subscribe("mix.mark", SubscribeOptions::default(), move |m| {
            let n = m.data.get("mark").and_then(Value::as_i64).unwrap_or(-1);
            m2.store(n, Ordering::SeqCst);
        })
        .unwrap();
    let mut web = mixed_script(&gw, "mixed-bus.js", lib, &[]);
    let ok = serde_json::json!({"ok": true});
    let mut twins: BTreeMap<u64, BusSubscription> = BTreeMap::new();
    let mut r = Lcg(seed);
    let mut delivered = 0;
    for i in 1..=steps {
        let k = r.unit();
        if k < 0.25 {
            let topic = ["t.a", "t.b", "t.*", "t.>", "u", "t.a.b"][r.below(6)];
            let key = [None, Some("rk"), Some("other")][r.below(3)];
            let source = [None, Some("rust-pub"), Some("web-pub")][r.below(3)];
            let mut options = serde_json::Map::new();
            if let Some(key) = key {
                options.insert("routingKey".into(), J::from(key));
            }
            if let Some(app) = source {
                options.insert("target".into(), serde_json::json!({"application": app}));
            }
            let tag = i;
            let g = got.clone();
            let opts = SubscribeOptions {
                routing_key: key.map(String::from),
                source: source.map(|a| {
                    knit::wire::Map::from_iter([("application".to_string(), Value::from(a))])
                }),
            };
            twins.insert(
                i,
                native_sub
                    .subscribe(topic, opts, move |m| {
                        g.lock()
                            .unwrap()
                            .push(format!("{tag}:{}", m.data.to_json()));
                    })
                    .unwrap(),
            );
            web.tell(
                &serde_json::json!({"subscribe": i, "topic": topic, "options": options})
                    .to_string(),
            );
            assert_eq!(web.json(), ok, "step {i}");
            continue;
        }
        if k < 0.35 && !twins.is_empty() {
            let key = *twins.keys().nth(r.below(twins.len())).unwrap();
            twins.remove(&key).unwrap().unsubscribe();
            web.tell(&serde_json::json!({"unsubscribe": key}).to_string());
            assert_eq!(web.json(), ok, "step {i}");
            continue;
        }
        let from_web = r.unit() < 0.5;
        let topic = ["t.a", "t.b", "u", "t.a.b", "t.c"][r.below(5)];
        let key = [None, Some("rk"), Some("other")][r.below(3)];
        let target = [None, Some("rust-sub"), Some("web-sub")][r.below(3)];
        let data = serde_json::json!({"i": i});
        let what = format!(
            "step {i}: {} publishes on {topic} (key {key:?}, target {target:?}) to {:?}",
            if from_web { "web-pub" } else { "rust-pub" },
            twins.keys().collect::<Vec<_>>()
        );
        if from_web {
            let mut options = serde_json::Map::new();
            if let Some(key) = key {
                options.insert("routingKey".into(), J::from(key));
            }
            if let Some(app) = target {
                options.insert("target".into(), serde_json::json!({"application": app}));
            }
            web.tell(
                &serde_json::json!({"publish": topic, "data": data, "options": options})
                    .to_string(),
            );
            assert_eq!(web.json(), ok, "{what}");
            web.tell(&serde_json::json!({"mark": i, "publish": true}).to_string());
        } else {
            let opts = PublishOptions {
                routing_key: key.map(String::from),
                target: target.map(|a| {
                    knit::wire::Map::from_iter([("application".to_string(), Value::from(a))])
                }),
            };
            native_pub.publish(topic, Value::from(data), &opts).unwrap();
            native_pub
                .publish(
                    "mix.mark",
                    Value::from(serde_json::json!({"mark": i})),
                    &PublishOptions::default(),
                )
                .unwrap();
            web.tell(&serde_json::json!({"mark": i, "publish": false}).to_string());
        }
        let web_got: Vec<String> = match web.json()["got"].clone() {
            J::Array(a) => a
                .into_iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect(),
            other => panic!("{what}: web-sub {other}"),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while mark.load(Ordering::SeqCst) != i as i64 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(
            mark.load(Ordering::SeqCst),
            i as i64,
            "{what}: rust-sub's marker"
        );
        let mut native_got = std::mem::take(&mut *got.lock().unwrap());
        native_got.sort();
        delivered += native_got.len() + web_got.len();
        match target {
            None => assert_eq!(native_got, web_got, "{what}: rust-sub and web-sub"),
            Some("rust-sub") => assert!(web_got.is_empty(), "{what}: web-sub got {web_got:?}"),
            _ => assert!(native_got.is_empty(), "{what}: rust-sub got {native_got:?}"),
        }
    }
    assert!(delivered > 0, "nothing was ever delivered");
    web.tell(r#"{"done": true}"#);
    assert!(web.finish(Duration::from_secs(30)));
}

#[test]
fn random_bus_traffic_reaches_twin_subscriptions_in_both_worlds_alike() {
    mixed_random_bus("io", 1, 200);
    mixed_random_bus("glue", 2, 80);
}

/// What one native twin of a stream subscription received.
#[derive(Default)]
struct TwinLog {
    events: std::sync::Mutex<Vec<String>>,
    mark: std::sync::atomic::AtomicI64,
    ended: std::sync::atomic::AtomicBool,
}

/// A native and a web app hold twin subscriptions (the same arguments) to a native stream and
/// to a web stream, made and ended at random, while each server pushes to all or to a branch,
/// closes branches and drops single subscriptions: after each step both twins received the
/// same items and ended alike.
fn mixed_random_stream(lib: &str, seed: u64, steps: u64) {
    use knit::client::ClientSubscription;
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    if !have_node(None) {
        return;
    }
    let gw = gateway(&format!("mixed-stream-{lib}"), AuthMode::Token);
    let server = gw.client("rust-srv");
    let subscriber = gw.client("rust-sub");
    let stream = server
        .create_stream(
            "Mix.S.native",
            StreamOptions {
                on_request: Some(Box::new(|req| {
                    let mode = req
                        .arguments
                        .get("mode")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    match mode.as_str() {
                        "rej" => req.reject("no"),
                        "b1" | "b2" => req.accept_on_branch(&mode),
                        _ => req.accept(),
                    }
                })),
                ..Default::default()
            },
        )
        .unwrap();
    let mut web = mixed_script(&gw, "mixed-stream.js", lib, &[]);
    assert!(subscriber
        .wait_for_method("Mix.S.web", Duration::from_secs(10))
        .is_some());
    let ok = serde_json::json!({"ok": true});
    let mut twins: BTreeMap<u64, (&str, ClientSubscription, Arc<TwinLog>)> = BTreeMap::new();
    let mut r = Lcg(seed);
    let mut items = 0;
    for i in 1..=steps {
        let on = ["native", "web"][r.below(2)];
        let k = r.unit();
        let what = format!("step {i} on the {on} stream");
        if k < 0.3 {
            let mode = ["all", "b1", "b2", "rej"][r.below(4)];
            let log = Arc::new(TwinLog::default());
            let l = log.clone();
            let native = subscriber.subscribe_stream(
                if on == "native" {
                    "Mix.S.native"
                } else {
                    "Mix.S.web"
                },
                StreamParams {
                    arguments: Value::from(serde_json::json!({"mode": mode, "k": i})),
                    wait: Duration::ZERO,
                    ..StreamParams::default()
                },
                move |e| match e {
                    StreamEvent::Data { data, private, .. } => {
                        match data.get("mark").and_then(Value::as_i64) {
                            Some(n) => l.mark.store(n, Ordering::SeqCst),
                            None => l.events.lock().unwrap().push(format!(
                                "{} {}",
                                if *private { "private" } else { "data" },
                                data.to_json()
                            )),
                        }
                    }
                    StreamEvent::Closed { .. } => {
                        l.events.lock().unwrap().push("closed".into());
                        l.ended.store(true, Ordering::SeqCst);
                    }
                },
            );
            web.tell(&serde_json::json!({"subscribe": i, "server": on, "mode": mode}).to_string());
            let w = web.json();
            match native {
                Ok(s) => {
                    assert_eq!(w, ok, "{what}: subscribing {mode}: native accepted, web");
                    twins.insert(i, (on, s, log));
                }
                Err(e) => assert!(
                    w.get("error").is_some(),
                    "{what}: subscribing {mode}: native {e}, web {w}"
                ),
            }
            continue;
        }
        let mine: Vec<u64> = twins
            .iter()
            .filter(|(_, t)| t.0 == on)
            .map(|(k, _)| *k)
            .collect();
        if k < 0.35 && !mine.is_empty() {
            let key = mine[r.below(mine.len())];
            let (_, s, _) = twins.remove(&key).unwrap();
            s.close();
            web.tell(&serde_json::json!({"close": key}).to_string());
            assert_eq!(web.json(), ok, "{what}");
            continue;
        }
        if k < 0.88 {
            let branch = [None, Some("b1"), Some("b2"), Some("b3")][r.below(4)];
            let data = serde_json::json!({"i": i});
            if on == "native" {
                match branch {
                    None => stream.push(Value::from(data)),
                    Some(b) => stream.push_to_branches(&[b], Value::from(data)),
                }
                .unwrap();
            } else {
                web.tell(&serde_json::json!({"push": data, "branch": branch}).to_string());
                assert_eq!(web.json(), ok, "{what}");
            }
        } else if k < 0.94 {
            let b = ["b1", "b2"][r.below(2)];
            if on == "native" {
                stream.close_branch(b);
            } else {
                web.tell(&serde_json::json!({"closeBranch": b}).to_string());
                assert_eq!(web.json(), ok, "{what}");
            }
        } else if !mine.is_empty() {
            let key = mine[r.below(mine.len())];
            if on == "native" {
                for s in stream.subscriptions() {
                    if s.arguments().get("k").and_then(Value::as_i64) == Some(key as i64) {
                        s.close();
                    }
                }
            } else {
                web.tell(&serde_json::json!({"drop": key}).to_string());
                assert_eq!(web.json(), ok, "{what}");
            }
        }
        // A marker behind the step, from the same server: each twin has it, or has ended.
        if on == "native" {
            stream
                .push(Value::from(serde_json::json!({"mark": i})))
                .unwrap();
        }
        web.tell(&serde_json::json!({"mark": i, "push": on == "web", "keys": mine}).to_string());
        let got = web.json();
        for key in &mine {
            let (_, _, log) = &twins[key];
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while log.mark.load(Ordering::SeqCst) != i as i64
                && !log.ended.load(Ordering::SeqCst)
                && std::time::Instant::now() < deadline
            {
                std::thread::yield_now();
            }
            let mut native: Vec<String> = std::mem::take(&mut *log.events.lock().unwrap());
            if log.mark.load(Ordering::SeqCst) != i as i64 && !log.ended.load(Ordering::SeqCst) {
                native.push(format!("no marker {i}"));
            }
            items += native.len();
            assert_eq!(
                serde_json::json!(native),
                got["got"][key.to_string()],
                "{what}: twin {key} ({got})"
            );
            if log.ended.load(Ordering::SeqCst) {
                twins.remove(key);
            }
        }
    }
    assert!(items > 0, "nothing was ever delivered");
    web.tell(r#"{"done": true}"#);
    assert!(web.finish(Duration::from_secs(30)));
}

#[test]
fn random_stream_traffic_reaches_twin_subscriptions_in_both_worlds_alike() {
    mixed_random_stream("io", 1, 300);
    mixed_random_stream("glue", 2, 100);
}
