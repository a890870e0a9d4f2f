//! Access control: a policy that denies each operation, enforced where the operation happens —
//! by the gateway for what passes through it, by the receiving peer for what travels over a
//! lane — so a client library that skips its own check (`skip_own_policy_checks`, standing in
//! for a modified library) is refused all the same. Denials are `PermissionDenied` (CLI exit 7)
//! and the gateway logs them.

mod common;

use common::{run_knit, Env, GatewayProc, ServerProc, TempDir};
use knit::client::{
    Client, InvokeOptions, PublishOptions, StreamOptions, StreamParams, SubscribeOptions,
};
use knit::model::policy::Policy;
use knit::{Status, Value};
use serde_json::json;
use std::sync::mpsc::channel;
use std::time::Duration;

/// Who may do what in these tests:
/// * `viewer` may not register anything, may not invoke `Admin*`, may not publish on
///   `orders.new*`, may not subscribe to `secret.*`, may not write context `ref.*` nor read
///   `hr.*`, and may not write the Red channel;
/// * everybody else may do everything.
fn policy() -> Policy {
    Policy::from_json(&json!({
        "default": "allow",
        "rules": [
            {"effect": "deny", "actions": "register", "app": "viewer"},
            {"effect": "deny", "actions": "invoke", "resource": "Admin*", "app": "viewer"},
            {"effect": "deny", "actions": "publish", "resource": "orders.new*", "app": "viewer"},
            {"effect": "deny", "actions": "subscribe", "resource": "secret.*", "app": "viewer"},
            {"effect": "deny", "actions": "context.write", "resource": "ref.*", "app": "viewer"},
            {"effect": "deny", "actions": "context.read", "resource": "hr.*", "app": "viewer"},
            {"effect": "deny", "actions": "channel.write", "resource": "Red", "app": "viewer"}
        ]
    }))
    .unwrap()
}

/// A gateway enforcing [`policy`].
fn policy_env(tag: &str) -> Env {
    Env::with(tag, |cfg| cfg.policy = policy())
}

/// A client of `app` whose library does not check its own rules.
fn rogue(env: &Env, app: &str) -> Client {
    env.builder(app).skip_own_policy_checks().connect().unwrap()
}

fn denied(status: Status) {
    assert_eq!(status, Status::PermissionDenied);
}

#[test]
fn registration_is_refused_by_the_gateway() {
    let env = policy_env("register");
    for c in [env.client("viewer"), rogue(&env, "viewer")] {
        let e = c.register("Anything", |_| Ok(Value::Null)).unwrap_err();
        denied(e.status());
        let e = c
            .create_stream("AStream", StreamOptions::default())
            .unwrap_err();
        denied(e.status());
    }
    // Others may.
    env.client("pricer")
        .register("Anything", |_| Ok(Value::Null))
        .unwrap();
}

#[test]
fn invocation_is_refused_by_the_server_even_when_the_caller_skips_its_check() {
    let env = policy_env("invoke");
    let server = env.client("admin-tool");
    server
        .register("AdminReset", |_| Ok(Value::from("reset")))
        .unwrap();
    server.register("Price", |_| Ok(Value::from(1.5))).unwrap();
    let o = InvokeOptions::default();
    // The viewer's own library refuses before sending…
    let polite = env.client("viewer");
    let e = polite.invoke("AdminReset", Value::map(), &o).unwrap_err();
    denied(e.status());
    // …and a library that does not is refused by the server's, over the lane.
    let rogue = rogue(&env, "viewer");
    let e = rogue.invoke("adminreset", Value::map(), &o).unwrap_err();
    denied(e.status());
    // What is allowed still works, for both.
    assert_eq!(
        rogue.invoke("Price", Value::map(), &o).unwrap().returned,
        Value::from(1.5)
    );
    assert_eq!(
        polite.invoke("Price", Value::map(), &o).unwrap().returned,
        Value::from(1.5)
    );
    // Others may call the admin method.
    let admin = env.client("ops");
    assert_eq!(
        admin
            .invoke("AdminReset", Value::map(), &o)
            .unwrap()
            .returned,
        Value::from("reset")
    );
}

#[test]
fn relayed_invocation_is_refused_by_the_gateway() {
    let env = policy_env("relay");
    let server = env.client("admin-tool");
    server
        .register("AdminReset", |_| Ok(Value::from("reset")))
        .unwrap();
    let rogue = env
        .builder("viewer")
        .relay_only(true)
        .skip_own_policy_checks()
        .connect()
        .unwrap();
    let e = rogue
        .invoke("AdminReset", Value::map(), &InvokeOptions::default())
        .unwrap_err();
    denied(e.status());
}

#[test]
fn publishing_is_refused_by_the_subscribers_and_subscribing_by_the_gateway() {
    let env = policy_env("bus");
    let sub = env.client("blotter");
    let (tx, rx) = channel();
    let _s = sub
        .subscribe("orders.>", SubscribeOptions::default(), move |m| {
            let _ = tx.send((m.source.application.clone(), m.data.clone()));
        })
        .unwrap();
    let o = PublishOptions::default();
    let polite = env.client("viewer");
    denied(
        polite
            .publish("orders.new", Value::from(1), &o)
            .unwrap_err()
            .status(),
    );
    // The rogue's message reaches the subscriber's lane and is dropped there; the allowed
    // message published after it arrives, and is the only one.
    let rogue = rogue(&env, "viewer");
    rogue.publish("orders.new", Value::from(2), &o).unwrap();
    rogue.publish("orders.cancel", Value::from(3), &o).unwrap();
    env.client("oms")
        .publish("orders.new", Value::from(4), &o)
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(
            rx.recv_timeout(Duration::from_secs(10))
                .expect("no message"),
        );
    }
    got.sort_by_key(|(app, _)| app.clone());
    // orders.cancel is outside "orders.new*", so the viewer may publish it.
    assert_eq!(
        got,
        vec![
            ("oms".to_string(), Value::from(4)),
            ("viewer".to_string(), Value::from(3))
        ]
    );
    assert!(rx.try_recv().is_err(), "a refused message got through");
    // Subscribing: the gateway refuses.
    for c in [&polite, &rogue] {
        let e = c
            .subscribe("secret.plans", SubscribeOptions::default(), |_| {})
            .unwrap_err();
        denied(e.status());
    }
}

/// What a bus subscriber saw: (the pattern it subscribed with, the publisher's peer id, the
/// topic).
type Seen = (String, u64, String);

#[test]
fn wildcard_subscriptions_get_nothing_on_a_topic_the_subscriber_may_not_subscribe_to() {
    let env = policy_env("wildcard");
    // Subscribers: the viewer (may not subscribe to secret.*) over lanes, with a library that
    // skips its own checks, and behind the gateway; and the blotter, which may.
    let subscribers = [
        env.client("viewer"),
        rogue(&env, "viewer"),
        env.relay_client("viewer"),
        env.client("blotter"),
    ];
    let patterns = [">", "*.x", "secre*.x"];
    let mut inboxes = Vec::new();
    let mut subs = Vec::new();
    for c in &subscribers {
        let (tx, rx) = channel::<Seen>();
        for p in patterns {
            let tx = tx.clone();
            // Accepted: the pattern's text is not `secret.*`.
            let s = c
                .subscribe(p, SubscribeOptions::default(), move |m| {
                    let _ = tx.send((p.to_string(), m.source.peer_id.0, m.topic.to_string()));
                })
                .unwrap();
            subs.push(s);
        }
        inboxes.push(rx);
    }
    // Publishers over lanes and through the gateway, the polite subscribers among them (their
    // own subscriptions must not get their own secret either). Each publishes the secret, then
    // a public topic: once the public one arrived, so had the secret, had it been sent.
    let ops = env.client("ops");
    let ops_relay = env.relay_client("ops");
    let publishers = [
        &ops,
        &ops_relay,
        &subscribers[0],
        &subscribers[2],
        &subscribers[3],
    ];
    let o = PublishOptions::default();
    for p in publishers {
        p.publish("secret.x", Value::from("hunter2"), &o).unwrap();
        p.publish("public.x", Value::from("hello"), &o).unwrap();
    }
    for (i, rx) in inboxes.iter().enumerate() {
        // `>` and `*.x` match public.x: two per publisher.
        let mut seen = Vec::new();
        while seen.iter().filter(|s: &&Seen| s.2 == "public.x").count() < 2 * publishers.len() {
            seen.push(
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("no message"),
            );
        }
        let secrets = seen.iter().filter(|s| s.2 == "secret.x").count();
        if i == 3 {
            // The blotter may: all three patterns match secret.x.
            assert_eq!(secrets, 3 * publishers.len(), "{seen:?}");
        } else {
            assert_eq!(secrets, 0, "subscriber {i} got a secret: {seen:?}");
        }
    }
}

#[test]
fn contexts_and_channels_are_read_only_or_hidden_as_the_policy_says() {
    let env = policy_env("ctx");
    let owner = env.client("refdata");
    owner
        .contexts()
        .set("ref.ccy", Value::object([("EUR", Value::from(1.08))]))
        .unwrap();
    owner
        .contexts()
        .set("hr.salaries", Value::object([("x", Value::from(1))]))
        .unwrap();
    for viewer in [env.client("viewer"), rogue(&env, "viewer")] {
        let ctx = viewer.contexts();
        // Readable, not writable: the mapping it gets is read-only.
        assert_eq!(
            ctx.get("ref.ccy").unwrap().data.get("EUR"),
            Some(&Value::from(1.08))
        );
        let e = ctx
            .update("ref.ccy", Value::object([("EUR", Value::from(2))]))
            .unwrap_err();
        denied(e.status());
        // Nor may it create one under ref.*.
        let e = ctx
            .set("ref.new", Value::object([("a", Value::from(1))]))
            .unwrap_err();
        denied(e.status());
        let e = ctx.destroy("ref.ccy").unwrap_err();
        denied(e.status());
        // hr.* is not readable at all.
        match ctx.get("hr.salaries") {
            Err(e) => denied(e.status()),
            Ok(s) => panic!("read {:?}", s.data),
        }
        let Err(e) = ctx.subscribe("hr.salaries", |_| {}) else {
            panic!("subscribed");
        };
        denied(e.status());
        // Nor destroyed: destroying takes what writing takes (read and write).
        denied(ctx.destroy("hr.salaries").unwrap_err().status());
        // Channels: may join Red and read it, not publish on it; Green is fine.
        let ch = viewer.channels();
        ch.join("Red").unwrap();
        let e = ch
            .publish(Value::object([("ric", Value::from("VOD.L"))]), None)
            .unwrap_err();
        denied(e.status());
        ch.join("Green").unwrap();
        ch.publish(Value::object([("ric", Value::from("VOD.L"))]), None)
            .unwrap();
    }
    assert_eq!(
        owner.contexts().get("ref.ccy").unwrap().data.get("EUR"),
        Some(&Value::from(1.08)),
        "a denied write changed the context"
    );
    assert!(!owner.contexts().all().contains(&"ref.new".to_string()));
    assert_eq!(
        owner.contexts().get("hr.salaries").unwrap().data.get("x"),
        Some(&Value::from(1)),
        "a denied destroy removed the context"
    );
}

#[test]
fn stream_subscriptions_are_refused_by_the_server() {
    let env = policy_env("stream");
    let server = env.client("admin-tool");
    let _stream = server
        .create_stream("AdminFeed", StreamOptions::default())
        .unwrap();
    let params = StreamParams {
        wait: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let polite = env.client("viewer");
    let Err(e) = polite.subscribe_stream("AdminFeed", params.clone(), |_| {}) else {
        panic!("subscribed");
    };
    denied(e.status());
    let rogue = rogue(&env, "viewer");
    let Err(e) = rogue.subscribe_stream("AdminFeed", params.clone(), |_| {}) else {
        panic!("subscribed");
    };
    assert!(e.to_string().contains("policy"), "{e}");
    // Refused by the server's library: a denial, not a rejection by the server.
    denied(e.status());
    // Others may.
    let ok = env.client("ops");
    ok.subscribe_stream("AdminFeed", params, |_| {}).unwrap();
}

#[test]
fn the_cli_exits_7_and_the_gateway_logs_the_denial() {
    let dir = TempDir::new("policycli");
    let file = dir.path().join("policy.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&json!({
            "rules": [{"effect": "deny", "actions": ["invoke"], "resource": "Admin*", "app": "viewer"},
                      {"effect": "deny", "actions": ["register"], "app": "viewer"},
                      {"effect": "deny", "actions": ["publish"], "app": "viewer"}]
        }))
        .unwrap(),
    )
    .unwrap();
    let gw = GatewayProc::start(&dir, &["--policy", file.to_str().unwrap()]);
    let sock = gw.socket.to_str().unwrap();
    let _server = ServerProc::start(&gw.socket, "admin-tool", "AdminReset", &["--reply", "1"]);
    let out = run_knit(
        &["--gateway", sock, "--app", "viewer", "invoke", "AdminReset"],
        Duration::from_secs(20),
    );
    assert_eq!(out.code, Some(7), "{}", out.stderr);
    let out = run_knit(
        &["--gateway", sock, "--app", "viewer", "pub", "t", "{}"],
        Duration::from_secs(20),
    );
    assert_eq!(out.code, Some(7), "{}", out.stderr);
    let out = run_knit(
        &["--gateway", sock, "--app", "ops", "invoke", "AdminReset"],
        Duration::from_secs(20),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let file2 = dir.path().join("bad.json");
    std::fs::write(
        &file2,
        br#"{"rules":[{"effect":"deny","actions":["fly"]}]}"#,
    )
    .unwrap();
    let bad = run_knit(
        &[
            "gateway",
            "--no-ws",
            "--gateway",
            &format!("{sock}.2"),
            "--policy",
            file2.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(bad.code, Some(8), "{}", bad.stderr);
    assert!(bad.stderr.contains("unknown action"), "{}", bad.stderr);
    // A refusal by the gateway itself (a registration) is logged.
    assert!(!gw.log().contains("denied by policy"));
    let out = run_knit(
        &[
            "--gateway",
            sock,
            "--app",
            "viewer",
            "serve",
            "Nope",
            "--echo",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.code, Some(7), "{}", out.stderr);
    assert!(
        gw.log().contains("denied by policy"),
        "gateway log: {}",
        gw.log()
    );
}

/// A `knit gateway` process enforcing [`policy`] (for what it logs).
fn policy_gateway(dir: &TempDir) -> GatewayProc {
    let file = dir.path().join("policy.json");
    let rules = json!({
        "rules": [
            {"effect": "deny", "actions": "context.write", "resource": "ref.*", "app": "viewer"},
            {"effect": "deny", "actions": "context.read", "resource": "hr.*", "app": "viewer"},
            {"effect": "deny", "actions": "channel.write", "resource": "Red", "app": "viewer"}
        ]
    });
    std::fs::write(&file, serde_json::to_vec(&rules).unwrap()).unwrap();
    GatewayProc::start(dir, &["--no-keeper", "--policy", file.to_str().unwrap()])
}

/// How many of the gateway's log lines deny `app` `what`.
fn denials(gw: &GatewayProc, app: &str, what: &str) -> usize {
    gw.log()
        .lines()
        .filter(|l| l.contains("denied by policy") && l.contains(app) && l.contains(what))
        .count()
}

#[test]
fn refused_writes_to_a_context_mapped_read_only_are_logged() {
    let dir = TempDir::new("policywrite");
    let gw = policy_gateway(&dir);
    let connect = |app: &str| Client::builder(app).socket(&gw.socket).connect().unwrap();
    let owner = connect("refdata");
    owner
        .contexts()
        .set("ref.ccy", Value::object([("EUR", Value::from(1.08))]))
        .unwrap();
    let viewer = connect("viewer");
    let ctx = viewer.contexts();
    // Mapped read-only for reading first, then written; and written without reading first.
    ctx.get("ref.ccy").unwrap();
    let e = ctx
        .update("ref.ccy", Value::object([("EUR", Value::from(2))]))
        .unwrap_err();
    denied(e.status());
    let fresh = connect("viewer");
    let e = fresh
        .contexts()
        .set_path("ref.ccy", "EUR", Value::from(3))
        .unwrap_err();
    denied(e.status());
    // A channel it may read but not write.
    let ch = viewer.channels();
    ch.join("Red").unwrap();
    let e = ch
        .publish(Value::object([("ric", Value::from("VOD.L"))]), None)
        .unwrap_err();
    denied(e.status());
    // A round trip through the gateway after the reports: they have been handled (a
    // connection's messages are handled in order) and logged.
    for c in [&viewer, &fresh] {
        assert!(c.contexts().get("hr.salaries").is_err());
    }
    assert_eq!(
        denials(&gw, "\"viewer\"", "context.write \"ref.ccy\""),
        2,
        "{}",
        gw.log()
    );
    assert_eq!(
        denials(&gw, "\"viewer\"", "context.write \"___channel___Red\""),
        1,
        "{}",
        gw.log()
    );
}

#[test]
fn malformed_policy_files_stop_the_gateway_with_exit_8_naming_the_problem() {
    let dir = TempDir::new("policyfiles");
    let cases = [
        ("[]", "expected a policy object"),
        (r#"["deny"]"#, "expected a policy object"),
        (
            r#"[{"effect": "deny", "actions": "*"}]"#,
            "expected a policy object",
        ),
        (
            r#"{"default": "deny", "default": "allow"}"#,
            "duplicate field `default`",
        ),
        (
            r#"{"rules": [{"effect": "deny", "actions": "*", "app": ""}]}"#,
            "policy rule 0: empty app",
        ),
    ];
    for (i, (text, why)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("p{i}.json"));
        std::fs::write(&file, text).unwrap();
        let config = dir.path().join(format!("c{i}.json"));
        std::fs::write(&config, format!(r#"{{"policy": {text}}}"#)).unwrap();
        let sock = dir.path().join(format!("g{i}.sock"));
        let sock = sock.to_str().unwrap();
        for how in ["--policy", "--config"] {
            let path = if how == "--policy" { &file } else { &config };
            let out = run_knit(
                &[
                    "gateway",
                    "--no-ws",
                    "--no-keeper",
                    "--gateway",
                    sock,
                    how,
                    path.to_str().unwrap(),
                ],
                Duration::from_secs(20),
            );
            assert_eq!(out.code, Some(8), "{how} {text}: {}", out.stderr);
            assert!(out.stderr.contains(why), "{how} {text}: {}", out.stderr);
        }
    }
}
