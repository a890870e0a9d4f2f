//! End-to-end tests of the `knit` command line (DESIGN §5), through the real binary: a real
//! `knit gateway` per test on its own socket, real `knit serve` processes, and `knit invoke` /
//! `knit methods` checked for their JSON output and exit codes.

mod common;

use common::{
    maps_contain, run_knit, run_knit_stdin, spawn_knit, wait_until, GatewayProc, Output,
    ServerProc, TempDir, STARTUP,
};
use serde_json::{json, Value as Json};
use std::path::Path;
use std::time::{Duration, Instant};

/// Upper bound for a command that should finish promptly.
const QUICK: Duration = Duration::from_secs(20);

fn sock_arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 socket path")
}

/// `knit --gateway SOCK invoke METHOD [ARGS] EXTRA…`
fn invoke(sock: &Path, method: &str, args: Option<&str>, extra: &[&str]) -> Output {
    let mut v = vec!["--gateway", sock_arg(sock), "invoke", method];
    v.extend(args);
    v.extend_from_slice(extra);
    run_knit(&v, QUICK)
}

/// `knit --gateway SOCK methods --json`, parsed.
fn methods_json(sock: &Path) -> Json {
    let out = run_knit(&["--gateway", sock_arg(sock), "methods", "--json"], QUICK);
    assert_eq!(out.code, Some(0), "methods failed: {}", out.stderr);
    out.json()
}

/// The servers listed for `method` in `knit methods --json` output, as (application, peerId).
fn servers_of(methods: &Json, method: &str) -> Vec<(String, String)> {
    methods
        .as_array()
        .expect("methods --json prints an array")
        .iter()
        .filter(|m| m["name"] == method)
        .flat_map(|m| m["servers"].as_array().cloned().unwrap_or_default())
        .map(|s| {
            (
                s["application"].as_str().unwrap_or_default().to_string(),
                s["peerId"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.code,
        Some(code),
        "expected exit {code}; stdout: {} stderr: {}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn invoke_best_goes_to_the_earliest_joined_server() {
    let dir = TempDir::new("cli-best");
    let gw = GatewayProc::start(&dir, &[]);
    let first = ServerProc::start(&gw.socket, "first", "Echo", &["--echo"]);
    let second = ServerProc::start(&gw.socket, "second", "Echo", &["--echo"]);

    let out = invoke(
        &gw.socket,
        "Echo",
        Some(r#"{"x":1}"#),
        &["--target", "best"],
    );
    assert_exit(&out, 0);
    let r = out.json();
    assert_eq!(r["executed_by"]["application"], "first");
    assert_eq!(r["executed_by"]["peerId"], first.peer_id());
    assert_eq!(r["executed_by"]["pid"], first.child.pid());
    assert_eq!(r["returned"], json!({"x": 1}));
    assert_eq!(r["status"], 0);
    // One server called: no aggregate lists.
    assert!(r.get("all_return_values").is_none(), "{r}");

    // Best is the default target too.
    let out = invoke(&gw.socket, "Echo", Some("{}"), &[]);
    assert_exit(&out, 0);
    assert_eq!(out.json()["executed_by"]["peerId"], first.peer_id());
    assert_ne!(first.peer_id(), second.peer_id());
}

#[test]
fn invoke_all_collects_a_result_from_every_server() {
    let dir = TempDir::new("cli-all");
    let gw = GatewayProc::start(&dir, &[]);
    let a = ServerProc::start(&gw.socket, "a", "Who", &["--reply", r#"{"me":"a"}"#]);
    let b = ServerProc::start(&gw.socket, "b", "Who", &["--reply", r#"{"me":"b"}"#]);

    let out = invoke(&gw.socket, "Who", None, &["--target", "all"]);
    assert_exit(&out, 0);
    let r = out.json();
    let all = r["all_return_values"]
        .as_array()
        .expect("all_return_values");
    assert_eq!(all.len(), 2, "{r}");
    // Target order is join order; the top level comes from the first.
    assert_eq!(all[0]["executed_by"]["peerId"], a.peer_id());
    assert_eq!(all[0]["returned"], json!({"me": "a"}));
    assert_eq!(all[1]["executed_by"]["peerId"], b.peer_id());
    assert_eq!(all[1]["returned"], json!({"me": "b"}));
    assert_eq!(r["returned"], json!({"me": "a"}));
    assert_eq!(r["all_errors"], json!([]));
    // No arguments given: `{}` is sent.
    assert_eq!(r["called_with"], json!({}));
}

#[test]
fn invoke_skip_mine_calls_every_other_server() {
    let dir = TempDir::new("cli-skip");
    let gw = GatewayProc::start(&dir, &[]);
    let a = ServerProc::start(&gw.socket, "a", "Who", &["--reply", r#""a""#]);
    let b = ServerProc::start(&gw.socket, "b", "Who", &["--reply", r#""b""#]);

    // The CLI serves nothing itself, so skip-mine reaches both servers.
    let out = invoke(&gw.socket, "Who", None, &["--target", "skip-mine"]);
    assert_exit(&out, 0);
    let r = out.json();
    let peers: Vec<&str> = r["all_return_values"]
        .as_array()
        .expect("all_return_values")
        .iter()
        .map(|v| v["executed_by"]["peerId"].as_str().unwrap())
        .collect();
    assert_eq!(peers, vec![a.peer_id(), b.peer_id()]);
    let returned: Vec<&Json> = r["all_return_values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["returned"])
        .collect();
    assert_eq!(returned, vec![&json!("a"), &json!("b")]);
}

#[test]
fn invoke_target_application_matches_case_insensitively() {
    let dir = TempDir::new("cli-app");
    let gw = GatewayProc::start(&dir, &[]);
    let _a = ServerProc::start(&gw.socket, "Alpha", "Who", &["--reply", r#""alpha""#]);
    let b = ServerProc::start(&gw.socket, "Beta", "Who", &["--reply", r#""beta""#]);

    let out = invoke(&gw.socket, "Who", None, &["--target", "BETA"]);
    assert_exit(&out, 0);
    let r = out.json();
    assert_eq!(r["executed_by"]["application"], "Beta");
    assert_eq!(r["executed_by"]["peerId"], b.peer_id());
    assert_eq!(r["returned"], "beta");

    // An application nobody runs is "no server" after the wait.
    let out = invoke(
        &gw.socket,
        "Who",
        None,
        &["--target", "gamma", "--wait-ms", "200"],
    );
    assert_exit(&out, 3);
}

#[test]
fn invoke_echo_returns_the_arguments_exactly() {
    let dir = TempDir::new("cli-echo");
    let gw = GatewayProc::start(&dir, &[]);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    let args = json!({
        "s": "héllo \"wörld\" \n\t✓",
        "i": -42,
        "big": 18446744073709551615u64,
        "f": 1.5,
        "tiny": 1e-300,
        "b": true,
        "n": null,
        "arr": [1, "two", [3.25], {"four": 4}],
        "empty_obj": {},
        "empty_arr": [],
        "z_then_a": {"z": 1, "a": 2}
    });
    let text = args.to_string();
    let out = invoke(&gw.socket, "Echo", Some(&text), &[]);
    assert_exit(&out, 0);
    let r = out.json();
    assert_eq!(r["returned"], args);
    assert_eq!(r["called_with"], args);
    // Key order survives the trip (the map keeps insertion order).
    let keys: Vec<&String> = r["returned"]["z_then_a"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(keys, ["z", "a"]);
}

#[test]
fn invoke_reply_returns_the_configured_json() {
    let dir = TempDir::new("cli-reply");
    let gw = GatewayProc::start(&dir, &[]);
    let reply = json!({"price": 101.25, "symbol": "VOD.L", "levels": [1, 2, 3]});
    let _s = ServerProc::start(
        &gw.socket,
        "pricer",
        "Price",
        &["--reply", &reply.to_string()],
    );
    let out = invoke(&gw.socket, "price", Some(r#"{"ignored":true}"#), &[]);
    assert_exit(&out, 0);
    let r = out.json();
    assert_eq!(r["returned"], reply);
    assert_eq!(r["called_with"], json!({"ignored": true}));
    assert_eq!(r["message"], "");
}

#[test]
fn methods_json_lists_the_method_with_both_servers() {
    let dir = TempDir::new("cli-methods");
    let gw = GatewayProc::start(&dir, &[]);
    let a = ServerProc::start(&gw.socket, "a", "Shared.Method", &["--echo"]);
    let b = ServerProc::start(&gw.socket, "b", "Shared.Method", &["--echo"]);
    let _c = ServerProc::start(&gw.socket, "c", "Other", &["--echo"]);

    let ms = methods_json(&gw.socket);
    let names: Vec<&str> = ms
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Other", "Shared.Method"], "sorted by name: {ms}");
    let m = ms
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "Shared.Method")
        .unwrap();
    let servers = m["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{m}");
    assert_eq!(servers[0]["application"], "a");
    assert_eq!(servers[0]["peerId"], a.peer_id());
    assert_eq!(servers[0]["pid"], a.child.pid());
    assert_eq!(servers[1]["application"], "b");
    assert_eq!(servers[1]["peerId"], b.peer_id());
    assert_eq!(servers[1]["pid"], b.child.pid());
    assert_eq!(servers[0]["instance"], a.ready["instance"]);
    assert_eq!(m["supportsStreaming"], false);

    // Without --json: a header, then one row per (method, server).
    let out = run_knit(&["--gateway", sock_arg(&gw.socket), "methods"], QUICK);
    assert_exit(&out, 0);
    let rows: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(rows.len(), 4, "{}", out.stdout);
    assert!(rows[0].starts_with("METHOD"), "{}", out.stdout);
    assert!(rows
        .iter()
        .any(|r| r.contains("Shared.Method") && r.contains(b.peer_id())));
}

#[test]
fn clients_refuse_a_socket_directory_others_can_enter() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("cli-perms");
    let gw = GatewayProc::start(&dir, &[]);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    let set = |mode| std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode));
    set(0o755).unwrap();
    let out = invoke(&gw.socket, "Echo", Some("{}"), &[]);
    set(0o700).unwrap();
    assert_exit(&out, 6);
    assert!(out.stderr.contains("0700"), "says why: {}", out.stderr);
    let out = invoke(&gw.socket, "Echo", Some("{}"), &[]);
    assert_exit(&out, 0);
}

#[test]
fn killed_server_disappears_from_methods() {
    let dir = TempDir::new("cli-kill");
    let gw = GatewayProc::start(&dir, &[]);
    let a = ServerProc::start(&gw.socket, "a", "M", &["--echo"]);
    let mut b = ServerProc::start(&gw.socket, "b", "M", &["--echo"]);
    assert_eq!(servers_of(&methods_json(&gw.socket), "M").len(), 2);

    b.child.kill9();
    let killed = Instant::now();
    let mut last = Json::Null;
    // A hang guard, not a speed check (the kill matrix prints how long it takes).
    let gone = wait_until(STARTUP, || {
        last = methods_json(&gw.socket);
        servers_of(&last, "M") == vec![("a".to_string(), a.peer_id().to_string())]
    });
    assert!(
        gone,
        "server b still listed {:?} after SIGKILL: {last}",
        killed.elapsed()
    );
}

#[test]
fn invoke_fails_with_exit_5_when_server_dies() {
    let dir = TempDir::new("cli-dies");
    let gw = GatewayProc::start(&dir, &[]);
    let mut slow = ServerProc::start(
        &gw.socket,
        "slow",
        "Slow",
        &["--echo", "--delay-ms", "5000"],
    );
    let pending = spawn_knit(
        &["--gateway", sock_arg(&gw.socket), "invoke", "Slow", "{}"],
        None,
    );
    // The invoker has chosen the server once the server maps the lane it opened to it.
    assert!(
        wait_until(STARTUP, || maps_contain(slow.child.pid(), "knit-lane")),
        "the invoker never opened a lane to the server"
    );
    slow.child.kill9();
    let killed = Instant::now();
    let out = pending.finish(QUICK);
    let after_kill = killed.elapsed();
    assert_exit(&out, 5);
    // The server would have answered after 5 s: failing before means its death was noticed
    // (how fast is the kill matrix's business).
    assert!(
        after_kill < Duration::from_millis(4500),
        "the pending call failed only {after_kill:?} after the server died"
    );
    let r = out.json();
    assert_eq!(r["status"], 1);
    assert!(
        r["message"].as_str().unwrap().contains("Peer has left"),
        "{r}"
    );
    assert!(!out.stderr.is_empty(), "an error line on stderr");
}

#[test]
fn missing_method_fails_with_exit_3_after_the_wait() {
    let dir = TempDir::new("cli-missing");
    let gw = GatewayProc::start(&dir, &[]);
    let out = invoke(
        &gw.socket,
        "Nobody.Serves.This",
        None,
        &["--wait-ms", "600"],
    );
    assert_exit(&out, 3);
    assert!(
        out.elapsed >= Duration::from_millis(600),
        "gave up after {:?}, before the 600 ms wait",
        out.elapsed
    );
    assert!(
        out.elapsed < Duration::from_millis(600 + 5000),
        "took {:?}",
        out.elapsed
    );
    assert!(out.stderr.contains("Nobody.Serves.This"), "{}", out.stderr);
}

/// The "no server" error names the method and the target as io.Connect's clients do
/// (`JSON.stringify` of each), not in Rust's debug notation.
#[test]
fn no_server_error_names_the_target_as_io_connect_does() {
    let dir = TempDir::new("cli-no-server-msg");
    let gw = GatewayProc::start(&dir, &[]);
    let out = invoke(&gw.socket, "Nobody.Home", None, &["--wait-ms", "0"]);
    assert_exit(&out, 3);
    assert_eq!(
        out.stderr.trim(),
        r#"knit: Can not find a method matching {"name":"Nobody.Home"} with server filter "best""#
    );
    let out = invoke(
        &gw.socket,
        "Nobody.Home",
        None,
        &["--wait-ms", "0", "--target", "Pricer"],
    );
    assert_exit(&out, 3);
    assert_eq!(
        out.stderr.trim(),
        r#"knit: Can not find a method matching {"name":"Nobody.Home"} with server filter {"application":"Pricer"}"#
    );
}

/// `knit token` against a gateway that runs without its WebSocket bridge (`--no-ws`, or its
/// default address was taken) says so, instead of telling the user to start a gateway.
#[test]
fn token_of_a_gateway_without_its_bridge_says_so() {
    let dir = TempDir::new("cli-token-no-ws");
    let gw = GatewayProc::start(&dir, &[]);
    let out = run_knit(&["--gateway", sock_arg(&gw.socket), "token"], QUICK);
    assert_exit(&out, 6);
    assert!(
        out.stderr.contains("runs without its WebSocket bridge"),
        "{}",
        out.stderr
    );
    drop(gw);
    let out = run_knit(&["--gateway", sock_arg(&dir.socket()), "token"], QUICK);
    assert_exit(&out, 6);
    assert!(
        out.stderr.contains("start `knit gateway` first"),
        "{}",
        out.stderr
    );
}

#[test]
fn slow_method_fails_with_exit_4_after_the_timeout() {
    let dir = TempDir::new("cli-slow");
    let gw = GatewayProc::start(&dir, &[]);
    let _s = ServerProc::start(
        &gw.socket,
        "slow",
        "Slow",
        &["--echo", "--delay-ms", "2000"],
    );
    let out = invoke(&gw.socket, "Slow", None, &["--timeout-ms", "300"]);
    assert_exit(&out, 4);
    assert!(
        out.elapsed >= Duration::from_millis(300) && out.elapsed < Duration::from_millis(2000),
        "took {:?}",
        out.elapsed
    );
    let r = out.json();
    assert_eq!(r["status"], 1);
    assert!(r["message"].as_str().unwrap().contains("timeout"), "{r}");
}

#[test]
fn bad_json_arguments_exit_8() {
    let dir = TempDir::new("cli-badjson");
    let gw = GatewayProc::start(&dir, &[]);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    for bad in ["{not json", "[1,2", "{\"a\":}", ""] {
        let out = invoke(&gw.socket, "Echo", Some(bad), &[]);
        assert_exit(&out, 8);
        assert!(out.stdout.is_empty(), "nothing on stdout: {}", out.stdout);
        assert_eq!(
            out.stderr.lines().count(),
            1,
            "one error line: {}",
            out.stderr
        );
    }
    // Bad input is reported even when no gateway runs.
    let nowhere = dir.path().join("nobody.sock");
    let out = invoke(&nowhere, "Echo", Some("{oops"), &[]);
    assert_exit(&out, 8);
    // A file that does not exist is bad input too.
    let missing = format!("@{}", dir.path().join("missing.json").display());
    let out = invoke(&gw.socket, "Echo", Some(&missing), &[]);
    assert_exit(&out, 8);
}

#[test]
fn payload_over_the_gateway_limit_exits_8() {
    let dir = TempDir::new("cli-big");
    let gw = GatewayProc::start(&dir, &["--max-payload", "1000"]);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    let small = Json::String("x".repeat(500)).to_string();
    let out = invoke(&gw.socket, "Echo", Some(&small), &[]);
    assert_exit(&out, 0);
    assert_eq!(out.json()["returned"].as_str().map(str::len), Some(500));

    let big = Json::String("x".repeat(2000)).to_string();
    let out = invoke(&gw.socket, "Echo", Some(&big), &[]);
    assert_exit(&out, 8);
    assert!(
        out.stderr.contains("1000"),
        "names the limit: {}",
        out.stderr
    );
}

#[test]
fn no_gateway_exits_6() {
    let dir = TempDir::new("cli-nogw");
    let sock = dir.socket();
    let out = invoke(&sock, "Echo", Some("{}"), &["--wait-ms", "100"]);
    assert_exit(&out, 6);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    let out = run_knit(&["--gateway", sock_arg(&sock), "methods", "--json"], QUICK);
    assert_exit(&out, 6);
}

#[test]
fn second_gateway_on_the_same_socket_exits_6() {
    let dir = TempDir::new("cli-twogw");
    let gw = GatewayProc::start(&dir, &[]);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    let out = run_knit(
        &["gateway", "--no-ws", "--gateway", sock_arg(&gw.socket)],
        QUICK,
    );
    assert_exit(&out, 6);
    assert!(!out.stderr.is_empty(), "a message says why");
    // The first gateway is untouched and still serves.
    let out = invoke(&gw.socket, "Echo", Some(r#"{"still":"here"}"#), &[]);
    assert_exit(&out, 0);
    assert_eq!(out.json()["returned"], json!({"still": "here"}));
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = TempDir::new("cli-stale");
    let sock = dir.socket();
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("binding a socket to leave stale"));
    assert!(sock.exists(), "the stale socket file is there");
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());

    let gw = GatewayProc::start(&dir, &[]);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    let out = invoke(&gw.socket, "Echo", Some("[1]"), &[]);
    assert_exit(&out, 0);
    assert_eq!(out.json()["returned"], json!([1]));
}

#[test]
fn arguments_come_from_a_file_or_standard_input() {
    let dir = TempDir::new("cli-argsrc");
    let gw = GatewayProc::start(&dir, &[]);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);

    let file = dir.path().join("args.json");
    std::fs::write(&file, r#"{"from":"file","n":[1,2]}"#).unwrap();
    let at = format!("@{}", file.display());
    let out = invoke(&gw.socket, "Echo", Some(&at), &[]);
    assert_exit(&out, 0);
    assert_eq!(out.json()["returned"], json!({"from": "file", "n": [1, 2]}));

    let out = run_knit_stdin(
        &["--gateway", sock_arg(&gw.socket), "invoke", "Echo", "-"],
        br#"{"from":"stdin","ok":true}"#,
        QUICK,
    );
    assert_exit(&out, 0);
    assert_eq!(out.json()["returned"], json!({"from": "stdin", "ok": true}));

    // Bad JSON on standard input is bad input.
    let out = run_knit_stdin(
        &["--gateway", sock_arg(&gw.socket), "invoke", "Echo", "-"],
        b"{nope",
        QUICK,
    );
    assert_exit(&out, 8);
}

#[test]
fn invoke_all_succeeds_when_one_server_times_out_and_one_answers() {
    let dir = TempDir::new("cli-mixed");
    let gw = GatewayProc::start(&dir, &[]);
    let slow = ServerProc::start(
        &gw.socket,
        "slow",
        "Mixed",
        &["--echo", "--delay-ms", "2000"],
    );
    let fast = ServerProc::start(
        &gw.socket,
        "fast",
        "Mixed",
        &["--reply", r#"{"fast":true}"#],
    );

    let out = invoke(
        &gw.socket,
        "Mixed",
        Some(r#"{"q":1}"#),
        &["--target", "all", "--timeout-ms", "300"],
    );
    assert_exit(&out, 0);
    let r = out.json();
    let ok = r["all_return_values"].as_array().unwrap();
    let errs = r["all_errors"].as_array().unwrap();
    assert_eq!(ok.len(), 1, "{r}");
    assert_eq!(errs.len(), 1, "{r}");
    assert_eq!(ok[0]["executed_by"]["peerId"], fast.peer_id());
    assert_eq!(ok[0]["returned"], json!({"fast": true}));
    assert_eq!(errs[0]["executed_by"]["peerId"], slow.peer_id());
    assert!(
        errs[0]["message"].as_str().unwrap().contains("timeout"),
        "{r}"
    );
    // The first outcome in target order (the slow server, which joined first) sets the top
    // level, even though it failed.
    assert_eq!(r["status"], 1);
    assert_eq!(r["executed_by"]["peerId"], slow.peer_id());
}

#[test]
fn invoke_all_exits_4_when_every_server_times_out() {
    let dir = TempDir::new("cli-alltimeout");
    let gw = GatewayProc::start(&dir, &[]);
    let _a = ServerProc::start(&gw.socket, "a", "Slow", &["--echo", "--delay-ms", "2000"]);
    let _b = ServerProc::start(&gw.socket, "b", "Slow", &["--echo", "--delay-ms", "2000"]);
    let out = invoke(
        &gw.socket,
        "Slow",
        None,
        &["--target", "all", "--timeout-ms", "300"],
    );
    assert_exit(&out, 4);
    let r = out.json();
    assert_eq!(r["all_errors"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(r["all_return_values"], json!([]));
}

#[test]
fn gateway_exits_0_and_removes_its_socket_on_sigterm() {
    let dir = TempDir::new("cli-term");
    let mut gw = GatewayProc::start(&dir, &[]);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    assert!(gw.socket.exists());
    gw.child.signal(rustix::process::Signal::TERM);
    let status = gw
        .child
        .wait_timeout(QUICK)
        .expect("the gateway stops after SIGTERM");
    assert_eq!(status.code(), Some(0), "gateway log: {}", gw.log());
    assert!(!gw.socket.exists(), "the socket file is removed");
    assert!(
        !knit::control::own_file(&gw.socket, "lock").exists(),
        "the lock file is removed"
    );
}

/// Out of descriptors, the gateway backs off and says so once, instead of retrying `accept` at
/// once forever (a core spinning, nothing logged); it takes the connections that waited once
/// others close.
#[test]
fn a_gateway_out_of_descriptors_backs_off_says_so_once_and_recovers() {
    let dir = TempDir::new("cli-emfile");
    let gw = GatewayProc::start_limited(&dir, &[], 64);
    // Connections that never say hello: each one the gateway takes costs it a descriptor, and
    // the rest wait in the backlog.
    let held: Vec<std::os::unix::net::UnixStream> = (0..100)
        .map(|_| std::os::unix::net::UnixStream::connect(&gw.socket).unwrap())
        .collect();
    const WARNING: &str = "gateway: accepting connections fails";
    assert!(
        common::wait_until(QUICK, || gw.log().contains(WARNING)),
        "no warning: {}",
        gw.log()
    );
    drop(held);
    // Served again: a tool connects, says hello and gets its answer.
    let out = run_knit(&["--gateway", sock_arg(&gw.socket), "methods"], QUICK);
    assert_eq!(
        out.code,
        Some(0),
        "{} / gateway log: {}",
        out.stderr,
        gw.log()
    );
    assert_eq!(
        gw.log().matches(WARNING).count(),
        1,
        "one warning per episode: {}",
        gw.log()
    );
}

#[test]
fn serve_exits_6_when_its_gateway_stops() {
    let dir = TempDir::new("cli-gwgone");
    let mut gw = GatewayProc::start(&dir, &[]);
    let mut s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    // SIGINT stops a gateway as SIGTERM does.
    gw.child.signal(rustix::process::Signal::INT);
    let status = gw.child.wait_timeout(QUICK).expect("the gateway stops");
    assert_eq!(status.code(), Some(0), "gateway log: {}", gw.log());
    let status = s
        .child
        .wait_timeout(QUICK)
        .expect("knit serve notices the gateway is gone");
    assert_eq!(status.code(), Some(6));
}

#[test]
fn gateway_creates_a_private_socket_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("cli-private");
    let socket = dir.path().join("a").join("b").join("gw.sock");
    let gw = GatewayProc::start_at(&dir, &socket, &[]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&socket), 0o600);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    let out = invoke(&gw.socket, "Echo", Some("1"), &[]);
    assert_exit(&out, 0);
    assert_eq!(out.json()["returned"], 1);
}

#[test]
fn gateway_refuses_a_socket_directory_open_to_others_and_leaves_its_mode_alone() {
    // `--gateway /tmp/gw.sock` (or `~/gw.sock`) used to chmod that directory to 0700: run as
    // root, the gateway closed /tmp to every other user.
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("cli-open-dir");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for open in [0o1777, 0o755] {
        let shared = dir.path().join(format!("shared-{open:o}"));
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(open)).unwrap();
        let socket = shared.join("gw.sock");
        let out = run_knit(
            &["gateway", "--no-ws", "--gateway", sock_arg(&socket)],
            QUICK,
        );
        assert_exit(&out, 6);
        assert!(
            out.stderr.contains("open to other users") && out.stderr.contains("mkdir -m 700"),
            "{}",
            out.stderr
        );
        assert_eq!(mode(&shared), open, "the directory's mode was changed");
        assert_eq!(
            std::fs::read_dir(&shared).unwrap().count(),
            0,
            "the gateway left files in a directory it refused"
        );
    }
}

#[test]
fn a_socket_named_without_a_directory_is_in_the_current_one() {
    // `--gateway gw.sock`: the path's parent is empty, which named no directory ("socket
    // directory : No such file or directory" from the gateway, exit 6 from every client).
    let dir = TempDir::new("cli-bare-name");
    let mut gateway = common::ChildGuard::new(
        std::process::Command::new(common::knit_bin())
            .args(["gateway", "--no-ws", "--no-keeper", "--gateway", "gw.sock"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawning knit gateway"),
        "knit gateway",
    );
    let socket = dir.path().join("gw.sock");
    assert!(
        wait_until(STARTUP, || std::os::unix::net::UnixStream::connect(&socket)
            .is_ok()),
        "the gateway did not listen on gw.sock in its directory: {:?}",
        gateway.try_status()
    );
    for name in ["gw.sock", "./gw.sock"] {
        let out = std::process::Command::new(common::knit_bin())
            .args(["--gateway", name, "methods", "--json"])
            .current_dir(dir.path())
            .output()
            .expect("running knit methods");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    gateway.signal(rustix::process::Signal::TERM);
    assert_eq!(gateway.wait_timeout(QUICK).and_then(|s| s.code()), Some(0));
}

#[test]
fn gateway_path_comes_from_knit_gateway_when_not_given() {
    let dir = TempDir::new("cli-env");
    let gw = GatewayProc::start(&dir, &[]);
    let _s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo"]);
    let out = common::spawn_knit_env(
        &["invoke", "Echo", r#"{"via":"env"}"#],
        &[("KNIT_GATEWAY", &gw.socket)],
        None,
    )
    .finish(QUICK);
    assert_exit(&out, 0);
    assert_eq!(out.json()["returned"], json!({"via": "env"}));
    // An explicit --gateway wins over the variable.
    let nowhere = dir.path().join("nobody.sock");
    let out = common::spawn_knit_env(
        &["--gateway", sock_arg(&nowhere), "invoke", "Echo", "{}"],
        &[("KNIT_GATEWAY", &gw.socket)],
        None,
    )
    .finish(QUICK);
    assert_exit(&out, 6);
}

/// Entries of /dev/shm whose name starts with `knit`.
fn knit_names_in_dev_shm() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("knit"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn shared_memory_is_memfd_with_nothing_in_dev_shm() {
    let before = knit_names_in_dev_shm();
    let dir = TempDir::new("cli-shm");
    let gw = GatewayProc::start(&dir, &[]);
    let s = ServerProc::start(&gw.socket, "echo", "Echo", &["--echo", "--delay-ms", "500"]);
    let pending = spawn_knit(
        &[
            "--gateway",
            sock_arg(&gw.socket),
            "invoke",
            "Echo",
            r#"{"a":1}"#,
        ],
        None,
    );
    // While the call is pending both ends map the lane: a memfd, not a /dev/shm file.
    assert!(
        wait_until(STARTUP, || maps_contain(s.child.pid(), "knit-lane")
            && maps_contain(pending.child.pid(), "knit-lane")),
        "the server or the caller never mapped a lane"
    );
    for pid in [s.child.pid(), pending.child.pid()] {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        assert!(maps.contains("/memfd:knit-lane"), "pid {pid}: {maps}");
        assert!(maps.contains("/memfd:knit-doorbell"), "pid {pid}: {maps}");
        assert!(!maps.contains("/dev/shm/"), "pid {pid}: {maps}");
    }
    let out = pending.finish(QUICK);
    assert_exit(&out, 0);
    assert_eq!(out.json()["returned"], json!({"a": 1}));
    let new: Vec<String> = knit_names_in_dev_shm()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert!(new.is_empty(), "knit created /dev/shm entries: {new:?}");
    assert!(before.is_empty(), "knit* entries in /dev/shm: {before:?}");
}

#[test]
fn app_option_works_before_or_after_the_subcommand() {
    let dir = TempDir::new("cli-appopt");
    let gw = GatewayProc::start(&dir, &[]);
    // `--app` after the subcommand (ServerProc puts it before).
    let mut child = std::process::Command::new(common::knit_bin())
        .args(["serve", "Echo", "--echo", "--app", "late-app", "--gateway"])
        .arg(&gw.socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = common::Lines::spawn(child.stdout.take().unwrap());
    let _guard = common::ChildGuard::new(child, "knit serve --app after");
    let ready = lines
        .wait_for(STARTUP, |l| l.contains("\"ready\""))
        .expect("ready line");
    let ready: Json = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["application"], "late-app");

    let out = invoke(&gw.socket, "Echo", Some("{}"), &["--target", "LATE-APP"]);
    assert_exit(&out, 0);
    assert_eq!(out.json()["executed_by"]["application"], "late-app");
    assert_eq!(out.json()["executed_by"]["peerId"], ready["peerId"]);
}

/// `stream serve` says ready with its whole identity, `instance` included, as `serve` does.
#[test]
fn stream_serve_says_ready_with_its_instance() {
    let dir = TempDir::new("cli-stream-ready");
    let gw = GatewayProc::start(&dir, &[]);
    let mut child = common::spawn_piped(
        &gw.socket,
        &["--app", "ticker", "stream", "serve", "ReadyTicks"],
    );
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let _guard = common::ChildGuard::new(child, "knit stream serve");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("a ready line");
    let ready: Json = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(ready["ready"], json!(true), "{ready}");
    assert_eq!(ready["stream"], json!("ReadyTicks"), "{ready}");
    assert_eq!(ready["application"], json!("ticker"), "{ready}");
    assert!(
        ready["instance"].as_str().is_some_and(|i| !i.is_empty()),
        "{ready}"
    );
}

/// A gateway that takes connections but never answers (stopped with SIGSTOP, or stuck) is as
/// unreachable as none: exit 6, not the reply timeout's 4.
#[test]
fn a_gateway_that_never_answers_the_hello_is_unreachable() {
    let dir = TempDir::new("cli-mute");
    // A listener nobody accepts on: connecting succeeds (the backlog), the hello is never read.
    let _mute = std::os::unix::net::UnixListener::bind(dir.socket()).unwrap();
    let out = run_knit(&["--gateway", sock_arg(&dir.socket()), "methods"], QUICK);
    assert_exit(&out, 6);
    assert!(out.stderr.contains("did not answer"), "{}", out.stderr);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["invoke"][..],                                // no method
        &["serve", "M"][..],                            // neither --echo nor --reply
        &["serve", "M", "--echo", "--reply", "{}"][..], // both
        &["invoke", "M", "--timeout-ms", "soon"][..],
        &["no-such-command"][..],
        &[][..],      // no command
        &["ctx"][..], // no subcommand
        // Found by knit's own checks, past the parser: the same shape.
        &["serve", "M", "--echo", "--wait", "bogus"][..],
        &["--app", "x", "stream", "serve", "S", "--rate", "0"][..],
        &["bench", "ctx", "--mode", "park"][..],
    ] {
        let out = run_knit(args, QUICK);
        assert_exit(&out, 2);
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
        // One line, as every error: what is wrong and the usage.
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("knit: ") && out.stderr.contains("see --help)"),
            "{args:?}: {}",
            out.stderr
        );
        // The usage is the subcommand's, named in full.
        let usage = match args.first() {
            Some(&"--app") => "(usage: knit stream serve ",
            Some(&"ctx") => "(usage: knit ctx ",
            Some(&"no-such-command") | None => "(usage: knit ",
            Some(sub) => &format!("(usage: knit {sub} "),
        };
        assert!(out.stderr.contains(usage), "{args:?}: {}", out.stderr);
    }
    // Neither --echo nor --reply: both are named as the alternatives they are.
    let out = run_knit(&["serve", "M"], QUICK);
    assert!(
        out.stderr.contains("--echo") && out.stderr.contains("--reply"),
        "{}",
        out.stderr
    );
    // A bad --wait says what is accepted.
    let out = run_knit(&["serve", "M", "--echo", "--wait", "bogus"], QUICK);
    assert!(out.stderr.contains("spin-then-park"), "{}", out.stderr);
}

#[test]
fn invoke_all_exits_5_when_one_server_dies_and_the_other_times_out() {
    let dir = TempDir::new("cli-mixedfail");
    let gw = GatewayProc::start(&dir, &[]);
    let mut dying = ServerProc::start(
        &gw.socket,
        "dying",
        "Slow",
        &["--echo", "--delay-ms", "5000"],
    );
    let slow = ServerProc::start(
        &gw.socket,
        "slow",
        "Slow",
        &["--echo", "--delay-ms", "5000"],
    );
    let pending = spawn_knit(
        &[
            "--gateway",
            sock_arg(&gw.socket),
            "invoke",
            "Slow",
            "--target",
            "all",
            "--timeout-ms",
            "1000",
        ],
        None,
    );
    assert!(
        wait_until(STARTUP, || maps_contain(dying.child.pid(), "knit-lane")
            && maps_contain(slow.child.pid(), "knit-lane")),
        "the invoker never opened lanes to both servers"
    );
    dying.child.kill9();
    let out = pending.finish(QUICK);
    // Every server failed, not all by timing out: 5.
    assert_exit(&out, 5);
    let r = out.json();
    let errs = r["all_errors"].as_array().unwrap();
    assert_eq!(errs.len(), 2, "{r}");
    assert_eq!(errs[0]["executed_by"]["peerId"], dying.peer_id());
    assert!(
        errs[0]["message"]
            .as_str()
            .unwrap()
            .contains("Peer has left"),
        "{r}"
    );
    assert_eq!(errs[1]["executed_by"]["peerId"], slow.peer_id());
    assert!(
        errs[1]["message"].as_str().unwrap().contains("timeout"),
        "{r}"
    );
}

#[test]
fn gateway_starts_on_the_socket_of_a_killed_gateway() {
    let dir = TempDir::new("cli-crash");
    let mut old = GatewayProc::start(&dir, &[]);
    let mut orphan = ServerProc::start(&old.socket, "orphan", "Echo", &["--echo"]);
    old.child.kill9();
    assert!(old.socket.exists(), "SIGKILL leaves the socket file behind");

    let gw = GatewayProc::start(&dir, &[]);
    // The server of the killed gateway reconnects by itself and registers its method again.
    assert!(
        wait_until(STARTUP, || servers_of(&methods_json(&gw.socket), "Echo")
            .iter()
            .any(|(app, _)| app == "orphan")),
        "the orphaned server did not come back"
    );
    let _s = ServerProc::start(&gw.socket, "new", "Echo", &["--echo"]);
    let out = invoke(&gw.socket, "Echo", Some(r#""again""#), &["--target", "new"]);
    assert_exit(&out, 0);
    assert_eq!(out.json()["executed_by"]["application"], "new");
    let out = invoke(
        &gw.socket,
        "Echo",
        Some(r#""orphan""#),
        &["--target", "orphan"],
    );
    assert_exit(&out, 0);
    assert_eq!(out.json()["returned"], "orphan");
    assert!(
        orphan.child.try_status().is_none(),
        "knit serve rode the restart out"
    );
}

#[test]
fn a_gateway_whose_stderr_was_closed_keeps_serving_and_stops_cleanly() {
    // `knit gateway 2>&1 | head -1`: the reader of its log is gone after the first line.
    let dir = TempDir::new("closed-stderr");
    let sock = dir.socket();
    let mut child = std::process::Command::new(common::knit_bin())
        .args(["gateway", "--no-ws", "--gateway", sock_arg(&sock)])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning knit gateway");
    let stderr = child.stderr.take().expect("stderr");
    let mut gw = common::ChildGuard::new(child, "knit gateway");
    let up = wait_until(STARTUP, || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    assert!(up, "the gateway never accepted");
    drop(stderr);
    let out = run_knit(&["--gateway", sock_arg(&sock), "methods", "--json"], QUICK);
    assert_exit(&out, 0);
    // Stopping logs a line: it must not turn into a crash.
    gw.signal(rustix::process::Signal::TERM);
    let status = gw.wait_timeout(QUICK).expect("the gateway did not stop");
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn help_and_version_that_cannot_be_written_exit_1() {
    // `/dev/full` takes no byte: a failed write of the output is exit 1, as for any command.
    for arg in ["--help", "--version"] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("opening /dev/full");
        let out = std::process::Command::new(common::knit_bin())
            .arg(arg)
            .stdout(full)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("running knit");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "knit {arg}: {stderr}");
        assert!(stderr.contains("cannot write"), "knit {arg}: {stderr}");
        // Written somewhere that takes it, the same is exit 0.
        assert_exit(&run_knit(&[arg], QUICK), 0);
    }
}

#[test]
fn stream_serve_refuses_a_rate_whose_period_is_not_a_duration() {
    for rate in ["1e-300", "0", "nan", "-1", "inf"] {
        let arg = format!("--rate={rate}");
        let out = run_knit(&["stream", "serve", "cli-rate-x", &arg], QUICK);
        assert_exit(&out, 2);
        assert!(
            out.stderr.contains("--rate"),
            "--rate {rate}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        assert!(out.stdout.is_empty(), "--rate {rate}: {}", out.stdout);
    }
}

/// Every `bench --json` row of the contract's scenarios carries the contract's fields, with
/// figures that mean something (contexts included: their rate is that of one update after
/// another, not 0).
#[test]
fn bench_rows_carry_the_contract_fields() {
    let out = run_knit(
        &["bench", "ctx", "--iters", "200", "--json"],
        Duration::from_secs(120),
    );
    assert_exit(&out, 0);
    let rows: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!rows.is_empty(), "{}", out.stderr);
    for r in &rows {
        for field in [
            "scenario",
            "size",
            "iters",
            "p50_ns",
            "p99_ns",
            "p999_ns",
            "msgs_per_s",
        ] {
            assert!(r.get(field).is_some(), "{field} missing: {r}");
        }
        let rate = r["msgs_per_s"].as_f64().unwrap_or(0.0);
        assert!(rate > 0.0, "msgs_per_s {rate}: {r}");
        assert!(r["p50_ns"].as_u64() <= r["p99_ns"].as_u64(), "{r}");
    }
}

#[test]
fn bench_refuses_modes_and_sizes_it_would_not_measure() {
    // Checked before anything runs: no gateway, no peers.
    for (args, code, says) in [
        (
            &["bench", "stream", "--mode", "bogus"][..],
            2,
            "unknown mode",
        ),
        (&["bench", "rpc", "--mode", "bogus"][..], 2, "unknown mode"),
        (&["bench", "ctx", "--mode", "park"][..], 2, "spin mode only"),
        (&["bench", "bus", "--mode", "park"][..], 2, "spin mode only"),
        (
            &["bench", "stream", "--mode", "park"][..],
            2,
            "spin mode only",
        ),
        (&["bench", "all", "--mode", "park"][..], 2, "spin mode only"),
        (
            &["bench", "restart", "--mode", "spin"][..],
            2,
            "does not take --mode",
        ),
        (&["bench", "rpc", "--size", "0"][..], 2, "at least 1 byte"),
        (&["bench", "bus", "--size", "0"][..], 2, "at least 8 bytes"),
        (
            &["bench", "stream", "--size", "7"][..],
            2,
            "at least 8 bytes",
        ),
        (
            &["bench", "rpc", "--size", "16777300"][..],
            8,
            "payload limit",
        ),
        (
            &["bench", "bus", "--size", "16777300"][..],
            8,
            "payload limit",
        ),
    ] {
        let out = run_knit(args, QUICK);
        assert_exit(&out, code);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
    }
}

/// Pids of the running processes whose command line mentions `needle` (not zombies).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && common::process_running(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

#[test]
fn a_restart_bench_ended_by_sigterm_stops_the_gateways_it_started() {
    // `bench restart` runs `knit gateway` processes of its own under $TMPDIR; a gateway outlives
    // its parent by design, so a bench killed by a lone SIGTERM (no terminal SIGINT reaching the
    // whole group) used to leave one serving.
    let tmp = TempDir::new("cli-bench-restart-term");
    let child = std::process::Command::new(common::knit_bin())
        .args(["bench", "restart", "--json"])
        .env("TMPDIR", tmp.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawning knit bench restart");
    let mut bench = common::ChildGuard::new(child, "knit bench restart");
    let needle = tmp.path().to_string_lossy().into_owned();
    // A gateway of the bench is serving (its socket accepts).
    let serving = || {
        processes_mentioning(&needle).iter().any(|(_, cmd)| {
            cmd.contains(" gateway ")
                && cmd.split_whitespace().any(|a| {
                    a.ends_with("gw.sock") && std::os::unix::net::UnixStream::connect(a).is_ok()
                })
        })
    };
    assert!(
        wait_until(STARTUP, serving),
        "the bench never had a gateway serving"
    );
    bench.signal(rustix::process::Signal::TERM);
    let status = bench
        .wait_timeout(STARTUP)
        .expect("the bench did not exit on SIGTERM");
    assert_eq!(status.code(), Some(143), "{status}");
    // Its gateways stop (each stops its keeper; a keeper left by a killed gateway lingers
    // 30 s by the bench's own safety net, so only gateways are awaited here).
    let gateways = || {
        processes_mentioning(&needle)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(" gateway "))
            .collect::<Vec<_>>()
    };
    let stopped = wait_until(STARTUP, || gateways().is_empty());
    let left = gateways();
    for (pid, _) in &left {
        if let Some(p) = rustix::process::Pid::from_raw(*pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
    assert!(stopped, "left serving: {left:?}");
}

#[test]
fn an_interrupted_bench_removes_its_gateway_directory() {
    // The bench makes its private gateway under $TMPDIR: a directory of this test's own.
    let tmp = TempDir::new("cli-bench-sigint");
    let child = std::process::Command::new(common::knit_bin())
        .args([
            "bench",
            "rpc",
            "--mode",
            "park",
            "--iters",
            "100000000",
            "--json",
        ])
        .env("TMPDIR", tmp.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawning knit bench");
    let mut bench = common::ChildGuard::new(child, "knit bench rpc");
    let dir = tmp.path().join(format!("knit-bench-{}", bench.pid()));
    // Its gateway is up once the lock and the socket exist (the bench runs far longer).
    assert!(
        wait_until(STARTUP, || dir.join("gw.sock").exists()
            && dir.join("gw.sock.lock").exists()),
        "the bench never made {}",
        dir.display()
    );
    bench.signal(rustix::process::Signal::INT);
    let status = bench
        .wait_timeout(QUICK)
        .expect("the bench did not exit on SIGINT");
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(
        !dir.exists(),
        "left behind: {:?}",
        std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
}
