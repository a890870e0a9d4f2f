//! Shared contexts through the Rust API with an embedded gateway: io.Connect's rules
//! (features.md §5.3–5.4), versions and compare-and-set, subscriptions and their ordering.

mod common;

use common::Env;
use knit::client::{Client, ContextError, ContextUpdate};
use knit::Value;
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

fn j(s: &str) -> Value {
    Value::from_json_str(s).unwrap()
}

fn watch(c: &Client, name: &str) -> (knit::client::ContextSubscription, Receiver<ContextUpdate>) {
    let (tx, rx) = channel();
    let sub = c.contexts().subscribe(name, move |u| {
        let _ = tx.send(u.clone());
    });
    (sub.unwrap(), rx)
}

fn next(rx: &Receiver<ContextUpdate>) -> ContextUpdate {
    rx.recv_timeout(Duration::from_secs(5))
        .expect("no context update within 5 s")
}

#[test]
fn get_of_a_missing_context_is_empty_and_does_not_create_it() {
    let env = Env::new("missing");
    let c = env.client("a");
    let s = c.contexts().get("nope").unwrap();
    assert_eq!((s.version, &*s.data), (0, &Value::map()));
    assert!(!c.contexts().all().contains(&"nope".to_string()));
}

#[test]
fn update_set_and_paths_follow_io_connect_rules() {
    let env = Env::new("rules");
    let c = env.client("a");
    let ctx = c.contexts();
    let v1 = ctx
        .update("x", j(r#"{"a":{"y":2},"b":1,"n":null}"#))
        .unwrap();
    assert_eq!(
        *ctx.get("x").unwrap().data,
        j(r#"{"a":{"y":2},"b":1,"n":null}"#),
        "creation stores data as given"
    );
    let v2 = ctx.update("x", j(r#"{"a":{"x":1},"n":null}"#)).unwrap();
    assert_eq!(v2, v1 + 1);
    assert_eq!(
        *ctx.get("x").unwrap().data,
        j(r#"{"a":{"x":1},"b":1}"#),
        "top-level replace, null deletes"
    );
    assert_eq!(
        ctx.update("x", j(r#"{"b":1}"#)).unwrap(),
        v2,
        "no change, no new version"
    );
    let v3 = ctx.set_path("x", "a.deep.er", 5).unwrap();
    assert_eq!(
        *ctx.get("x").unwrap().data,
        j(r#"{"a":{"x":1,"deep":{"er":5}},"b":1}"#)
    );
    let v4 = ctx
        .set_paths(
            "x",
            vec![("a.x".into(), Value::Null), ("c".into(), Value::from(true))],
        )
        .unwrap();
    assert_eq!(v4, v3 + 1);
    assert_eq!(
        *ctx.get("x").unwrap().data,
        j(r#"{"a":{"deep":{"er":5}},"b":1,"c":true}"#)
    );
    ctx.set("x", j(r#"{"only":1}"#)).unwrap();
    assert_eq!(*ctx.get("x").unwrap().data, j(r#"{"only":1}"#));
    assert!(matches!(
        ctx.update("x", Value::from(3)),
        Err(ContextError::InvalidArgument(_))
    ));
    assert!(matches!(
        ctx.set_path("x", "a..b", 1),
        Err(ContextError::InvalidArgument(_))
    ));
    assert!(matches!(
        ctx.set_path("x", "__proto__.a", 1),
        Err(ContextError::InvalidArgument(_))
    ));
    assert!(ctx.all().contains(&"x".to_string()));
}

#[test]
fn update_if_fails_cleanly_on_a_stale_version() {
    let env = Env::new("cas");
    let c = env.client("a");
    let ctx = c.contexts();
    let v = ctx.set("cas", j(r#"{"n":1}"#)).unwrap();
    let v2 = ctx.update_if("cas", v, j(r#"{"n":2}"#)).unwrap();
    match ctx.update_if("cas", v, j(r#"{"n":3}"#)) {
        Err(ContextError::Stale {
            expected, current, ..
        }) => assert_eq!((expected, current), (v, v2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(*ctx.get("cas").unwrap().data, j(r#"{"n":2}"#));
}

#[test]
fn subscribers_get_the_current_value_first_then_every_change_with_delta_removed_and_updater() {
    let env = Env::new("sub");
    let (w, r) = (env.client("writer"), env.client("reader"));
    w.contexts().set("s", j(r#"{"a":1,"b":2}"#)).unwrap();
    let (_sub, rx) = watch(&r, "s");
    let first = next(&rx);
    assert!(first.first);
    assert_eq!(*first.data, j(r#"{"a":1,"b":2}"#));
    w.contexts().update("s", j(r#"{"a":5,"b":null}"#)).unwrap();
    let u = next(&rx);
    assert_eq!(*u.data, j(r#"{"a":5}"#));
    assert_eq!(u.delta, j(r#"{"a":5,"b":null}"#));
    assert_eq!(u.removed, vec!["b".to_string()]);
    assert_eq!(u.updater.as_ref().unwrap().application, "writer");
    assert_eq!(u.version, first.version + 1);
    // No change: no callback (the next thing the reader sees is the following real change).
    w.contexts().update("s", j(r#"{"a":5}"#)).unwrap();
    w.contexts().set_path("s", "p.q", 1).unwrap();
    let u = next(&rx);
    assert_eq!(u.delta, j(r#"{"p":{"q":1}}"#));
    assert!(!u.conflated);
}

#[test]
fn subscribing_before_creation_delivers_on_creation() {
    let env = Env::new("early");
    let (w, r) = (env.client("writer"), env.client("reader"));
    let (_sub, rx) = watch(&r, "later");
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "no callback before creation"
    );
    w.contexts().update("later", j(r#"{"k":"v"}"#)).unwrap();
    let u = next(&rx);
    assert_eq!(*u.data, j(r#"{"k":"v"}"#));
}

#[test]
fn racing_writers_produce_one_order_seen_identically_by_two_watchers() {
    let env = Env::new("race");
    let writers: Vec<Client> = (0..3).map(|i| env.client(&format!("w{i}"))).collect();
    writers[0].contexts().set("race", j(r#"{"n":0}"#)).unwrap();
    let (r1, r2) = (env.client("r1"), env.client("r2"));
    let (_s1, rx1) = watch(&r1, "race");
    let (_s2, rx2) = watch(&r2, "race");
    let start1 = next(&rx1).version;
    let start2 = next(&rx2).version;
    assert_eq!(start1, start2);
    let per = 200;
    let ts: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            std::thread::spawn(move || {
                for k in 0..per {
                    w.contexts()
                        .update("race", Value::object([(format!("w{i}"), Value::from(k))]))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    let total = 3 * per as u64;
    let collect = |rx: &Receiver<ContextUpdate>| {
        let mut hist = Vec::new();
        let mut last = start1;
        while last < start1 + total {
            let u = next(rx);
            assert!(u.version > last, "versions must increase");
            last = u.version;
            hist.push((u.version, u.conflated, (*u.data).clone()));
        }
        hist
    };
    let (h1, h2) = (collect(&rx1), collect(&rx2));
    // Without lapping (the log holds these), both see every version, identically.
    assert_eq!(h1.len() as u64, total);
    assert_eq!(h1, h2);
}

#[test]
fn a_slow_subscriber_is_brought_to_the_current_state_and_told_it_was_conflated() {
    let env = Env::new("slow");
    let (w, r) = (env.client("writer"), env.client("reader"));
    w.contexts().set("fast", j(r#"{"n":0}"#)).unwrap();
    let (tx, rx) = channel();
    let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
    let g2 = gate.clone();
    let (held_tx, held) = channel();
    let _sub = r
        .contexts()
        .subscribe("fast", move |u| {
            if u.first {
                let _ = held_tx.send(());
                g2.wait(); // hold the dispatcher until the writer is far ahead
            }
            let _ = tx.send(u.clone());
        })
        .unwrap();
    // The subscriber holds its first callback (n = 0) before the writer starts.
    held.recv_timeout(Duration::from_secs(10))
        .expect("no first callback");
    // 5000 updates with 1 KiB values lap a 64 KiB log many times.
    let big = "x".repeat(1024);
    for i in 1..=5000 {
        w.contexts()
            .update(
                "fast",
                Value::object([("n", Value::from(i)), ("pad", Value::from(big.as_str()))]),
            )
            .unwrap();
    }
    gate.wait();
    let mut last = next(&rx);
    let mut conflated = false;
    while last.data.get("n") != Some(&Value::from(5000)) {
        last = next(&rx);
        conflated |= last.conflated;
    }
    assert!(
        conflated,
        "the subscriber must be told it missed intermediate versions"
    );
    assert_eq!(
        *r.contexts().get("fast").unwrap().data.get("n").unwrap(),
        Value::from(5000)
    );
}

#[test]
fn destroy_removes_the_context_for_everyone() {
    let env = Env::new("destroy");
    let (a, b) = (env.client("a"), env.client("b"));
    a.contexts().set("d", j(r#"{"x":1}"#)).unwrap();
    assert_eq!(*b.contexts().get("d").unwrap().data, j(r#"{"x":1}"#));
    b.contexts().destroy("d").unwrap();
    assert!(matches!(
        b.contexts().destroy("d"),
        Err(ContextError::NotFound(_))
    ));
    // The announcement reaches the other client asynchronously.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.contexts().all().contains(&"d".to_string()) {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(a.contexts().get("d").unwrap().version, 0);
    a.contexts().set("d", j(r#"{"y":2}"#)).unwrap();
    assert_eq!(*b.contexts().get("d").unwrap().data, j(r#"{"y":2}"#));
    // The writer destroys the context it wrote last and writes it again at once: the write
    // goes to a new context (version 1), not to the destroyed one it remembered.
    a.contexts().destroy("d").unwrap();
    assert_eq!(a.contexts().set("d", j(r#"{"z":3}"#)).unwrap(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while *b.contexts().get("d").unwrap().data != j(r#"{"z":3}"#) {
        assert!(
            std::time::Instant::now() < deadline,
            "b never saw the new context"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_write_that_fails_on_a_missing_context_does_not_create_it() {
    let env = Env::new("nocreate");
    let c = env.client("w");
    // Compare-and-set against a version the (missing) context cannot have.
    let err = c
        .contexts()
        .update_if("ghost.cas", 3, j(r#"{"a":1}"#))
        .unwrap_err();
    assert!(
        matches!(err, ContextError::Stale { current: 0, .. }),
        "{err}"
    );
    // The empty path with a value that is not an object.
    let err = c.contexts().set_path("ghost.path", "", 5).unwrap_err();
    assert_eq!(err.status(), knit::Status::BadInput, "{err}");
    let other = env.client("r");
    let all = other.contexts().all();
    assert!(
        !all.iter().any(|n| n.starts_with("ghost.")),
        "a failed write left {all:?}"
    );
    // update_if(0, …) creates, as a compare-and-set on "does not exist yet".
    assert_eq!(
        c.contexts()
            .update_if("ghost.new", 0, j(r#"{"a":1}"#))
            .unwrap(),
        1
    );
    assert_eq!(
        *other.contexts().get("ghost.new").unwrap().data,
        j(r#"{"a":1}"#)
    );
}

#[test]
fn an_update_too_large_for_the_log_still_names_its_writer_and_is_not_conflated() {
    let env = Env::new("bigdelta");
    let (w, r) = (env.client("big-writer"), env.client("reader"));
    w.contexts().set("big", j(r#"{"n":0}"#)).unwrap();
    let (_s, rx) = watch(&r, "big");
    assert!(next(&rx).first);
    let big = "y".repeat(64 * 1024);
    w.contexts()
        .update("big", Value::object([("pad", Value::from(big.as_str()))]))
        .unwrap();
    let u = next(&rx);
    assert!(!u.conflated, "nothing was skipped");
    assert_eq!(
        u.updater.as_ref().map(|i| i.application.as_str()),
        Some("big-writer")
    );
    assert_eq!(u.delta, Value::object([("pad", Value::from(big.as_str()))]));
    assert_eq!(u.data.get("n"), Some(&Value::from(0)));
}

/// A value `n` maps deep.
fn deep_object(n: usize) -> Value {
    let mut v = Value::from(1);
    for _ in 0..n {
        v = Value::object([("d", v)]);
    }
    v
}

#[test]
fn a_value_too_deep_for_readers_is_refused_and_locks_nobody_out() {
    let env = Env::new("deep");
    let writer = env.client("writer");
    let reader = env.client("reader");
    writer.contexts().set("deep", j(r#"{"a":1}"#)).unwrap();
    let (_sub, rx) = watch(&reader, "deep");
    assert_eq!(next(&rx).data.get("a"), Some(&Value::from(1)));
    let max = knit::wire::value::MAX_DEPTH;

    // Every way to write: a whole value, an update, a path that builds the nesting itself.
    let too_deep = [
        writer
            .contexts()
            .set("deep", Value::object([("x", deep_object(max))])),
        writer
            .contexts()
            .update("deep", Value::object([("x", deep_object(max))])),
        writer
            .contexts()
            .set_path("deep", &vec!["p"; max + 1].join("."), Value::from(1)),
    ];
    for r in too_deep {
        match r {
            Err(e @ ContextError::InvalidArgument(_)) => {
                assert!(e.to_string().contains("nested deeper"), "{e}")
            }
            other => panic!("expected a typed refusal, got {other:?}"),
        }
    }
    // Nothing was written: every reader still reads the context.
    let got = reader.contexts().get("deep").unwrap();
    assert_eq!(got.version, 1);
    assert_eq!(got.data.get("a"), Some(&Value::from(1)));

    // The deepest value that decodes is stored and read back (its logged op is one level
    // deeper than the codec takes, so it travels through the snapshot).
    let v = writer
        .contexts()
        .set("deep", Value::object([("x", deep_object(max - 1))]))
        .unwrap();
    assert_eq!(v, 2);
    let u = next(&rx);
    assert_eq!(u.version, 2);
    assert_eq!(u.data.get("x"), Some(&deep_object(max - 1)));
    let got = reader.contexts().get("deep").unwrap();
    assert_eq!(got.data.get("x"), Some(&deep_object(max - 1)));
    writer.contexts().update("deep", j(r#"{"b":2}"#)).unwrap();
    assert_eq!(next(&rx).delta, j(r#"{"b":2}"#));
}

/// The next update of a polled client's subscription (polling for it).
fn poll_next(c: &Client, rx: &Receiver<ContextUpdate>) -> ContextUpdate {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(u) = rx.try_recv() {
            return u;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no context update within 5 s"
        );
        c.poll(Duration::from_millis(100));
    }
}

#[test]
fn a_context_subscribed_again_before_the_client_pumps_delivers_each_change_once() {
    // A polled client reads the context's log only inside `poll` (and while it waits): the
    // follow of its last subscription is still there when it subscribes again, and must go.
    let env = Env::new("resub");
    let w = env.client("writer");
    let r = env.builder("reader").poll_mode(true).connect().unwrap();
    w.contexts().set("re", j(r#"{"n":0}"#)).unwrap();
    let (sub, rx) = watch(&r, "re");
    assert!(poll_next(&r, &rx).first);
    drop(sub);
    let (_sub, rx) = watch(&r, "re");
    let first = poll_next(&r, &rx);
    assert!(first.first);
    assert_eq!(*first.data, j(r#"{"n":0}"#));
    let mut seen = Vec::new();
    for n in 1..=2 {
        let v = w
            .contexts()
            .update("re", j(&format!(r#"{{"n":{n}}}"#)))
            .unwrap();
        // Every callback for this change runs within the poll that delivers the first one
        // (both follows would read the record in the same round).
        loop {
            let u = poll_next(&r, &rx);
            seen.push(u.version);
            if u.version == v {
                break;
            }
        }
        while let Ok(u) = rx.try_recv() {
            seen.push(u.version);
        }
    }
    assert_eq!(
        seen,
        vec![first.version + 1, first.version + 2],
        "each change once"
    );
}

/// A name no context can have (empty, or longer than 1024 bytes) is refused by every context
/// operation with `INVALID_ARGUMENT` (CLI exit 2), the message naming the limit. (A 1025-byte
/// name got "Please provide the name as a non-empty string!", the client answered an empty
/// name `BAD_INPUT` (exit 8) where the gateway said `INVALID_ARGUMENT` (exit 2), `subscribe`
/// waited for a context that can never exist, `destroy` said `NOT_FOUND`, and `get` of a
/// 1 MiB name returned an empty context.)
#[test]
fn context_names_empty_or_longer_than_the_limit_are_refused_by_every_operation() {
    let env = Env::new("ctx-names");
    let c = env.client("a");
    let ctx = c.contexts();
    let (long, huge) = ("n".repeat(1025), "n".repeat(1 << 20));
    for name in [long.as_str(), huge.as_str(), ""] {
        let want = if name.is_empty() {
            "Please provide the name as a non-empty string!".to_string()
        } else {
            format!(
                "context name must be at most 1024 bytes, not {}",
                name.len()
            )
        };
        let errs: Vec<(&str, ContextError)> = vec![
            ("set", ctx.set(name, j("{}")).unwrap_err()),
            ("update", ctx.update(name, j(r#"{"a":1}"#)).unwrap_err()),
            ("set_path", ctx.set_path(name, "a", 1).unwrap_err()),
            ("get", ctx.get(name).unwrap_err()),
            ("subscribe", ctx.subscribe(name, |_| {}).err().unwrap()),
            ("destroy", ctx.destroy(name).unwrap_err()),
        ];
        for (op, e) in errs {
            assert_eq!(e.status(), knit::Status::BadInput, "{op}: {e}");
            assert_eq!(e.status().exit_code(), 8);
            assert_eq!(e.to_string(), want, "{op}");
        }
    }
    // The longest name there may be works.
    let fits = "n".repeat(1024);
    ctx.set(&fits, j(r#"{"a":1}"#)).unwrap();
    assert_eq!(*ctx.get(&fits).unwrap().data, j(r#"{"a":1}"#));
    ctx.destroy(&fits).unwrap();
}

#[test]
fn a_callback_that_panics_loses_its_own_updates_only() {
    // One `catch_unwind` around every subscription of a context: the first callback that
    // panicked took each update from the subscriptions after it (0 of 5 got through).
    let env = Env::new("ctx-panic");
    let (w, r) = (env.client("writer"), env.client("reader"));
    w.contexts().set("pc", j(r#"{"n":0}"#)).unwrap();
    let _panics = r
        .contexts()
        .subscribe("pc", |_| panic!("a callback that panics (on purpose)"))
        .unwrap();
    let (_sub, rx) = watch(&r, "pc");
    assert_eq!(*next(&rx).data, j(r#"{"n":0}"#));
    let mut last = 0;
    for n in 1..=5 {
        last = w
            .contexts()
            .update("pc", Value::object([("n", Value::from(n))]))
            .unwrap();
    }
    // Every update reaches the other subscription (a lagging one may get them conflated, but
    // it reaches the last).
    loop {
        let u = next(&rx);
        if u.version == last {
            assert_eq!(*u.data, j(r#"{"n":5}"#));
            break;
        }
    }
}
