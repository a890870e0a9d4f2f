//! Calls relayed through the gateway: the path web peers use, exercised with native clients in
//! relay-only mode, in both directions and across a peer's death.

mod common;

use common::Env;
use knit::client::{InvokeError, InvokeOptions};
use knit::{Status, Value};
use std::time::{Duration, Instant};

fn opts(timeout_ms: u64) -> InvokeOptions {
    InvokeOptions {
        wait: Duration::from_secs(5),
        timeout: Duration::from_millis(timeout_ms),
        ..Default::default()
    }
}

#[test]
fn lane_client_invokes_a_relay_only_server() {
    let env = Env::new("a");
    let server = env.relay_client("relayed-server");
    server
        .register("Double", |c| {
            Ok(Value::from(c.args.as_i64().unwrap_or(0) * 2))
        })
        .unwrap();
    let client = env.client("lane-client");
    for i in 0..200 {
        let r = client
            .invoke("Double", Value::from(i), &opts(5000))
            .unwrap();
        assert_eq!(r.returned, Value::from(i * 2));
        assert_eq!(r.executed_by.unwrap().application, "relayed-server");
    }
    drop((client, server));
}

#[test]
fn relay_only_client_invokes_a_lane_server_and_sees_errors_with_context() {
    let env = Env::new("b");
    let server = env.client("lane-server");
    server
        .register("Check", |c| {
            if c.args.get("ok").and_then(Value::as_bool) == Some(true) {
                Ok(Value::from(c.caller.application.as_str()))
            } else {
                Err(knit::client::MethodError::new("not ok").with_context(Value::from(7)))
            }
        })
        .unwrap();
    let client = env.relay_client("relay-client");
    let ok = client
        .invoke(
            "check",
            Value::object([("ok", Value::from(true))]),
            &opts(5000),
        )
        .unwrap();
    assert_eq!(
        ok.returned,
        Value::from("relay-client"),
        "the handler sees the relayed caller"
    );
    match client.invoke(
        "Check",
        Value::object([("ok", Value::from(false))]),
        &opts(5000),
    ) {
        Err(InvokeError::Failed(r)) => {
            assert_eq!(r.message, "not ok");
            assert_eq!(r.returned, Value::from(7));
            assert_eq!(r.failure_status(), Status::MethodFailed);
        }
        other => panic!("{other:?}"),
    }
    drop((client, server));
}

#[test]
fn relayed_call_fails_when_the_server_leaves_and_times_out_when_it_is_slow() {
    let env = Env::new("c");
    let server = env.relay_client("slow");
    let (tx, rx) = std::sync::mpsc::channel();
    server
        .register_async("Hang", move |_c, r| {
            // Keep the responder alive without answering; the test decides what happens next.
            let _ = tx.send(r);
        })
        .unwrap();
    let client = env.client("caller");

    let err = client.invoke("Hang", Value::Null, &opts(300)).unwrap_err();
    assert_eq!(err.status(), Status::Timeout);
    let _late = rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let c2 = client.clone();
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        (
            c2.invoke("Hang", Value::Null, &opts(30_000)),
            start.elapsed(),
        )
    });
    let _pending = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    server.close();
    let (r, took) = t.join().unwrap();
    assert_eq!(r.unwrap_err().status(), Status::PeerLeft);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    drop(client);
}
