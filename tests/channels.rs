//! Colour channels: the default set, membership, publishing, following, FDC3 payloads, and
//! restrictions enforced by the runtime.

mod common;

use common::Env;
use knit::client::{ChannelMode, ChannelUpdate, ContextError};
use knit::gateway::channels::{ChannelConfig, ChannelRestriction};
use knit::{Status, Value};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

fn j(s: &str) -> Value {
    Value::from_json_str(s).unwrap()
}

fn next(rx: &Receiver<ChannelUpdate>) -> ChannelUpdate {
    rx.recv_timeout(Duration::from_secs(5))
        .expect("no channel update within 5 s")
}

#[test]
fn the_default_channels_exist_with_colours() {
    let env = Env::new("default");
    let c = env.client("a");
    let mut names = c.channels().all();
    names.sort();
    assert_eq!(
        names,
        ["Blue", "Cyan", "Green", "Magenta", "Orange", "Purple", "Red", "Yellow"]
    );
    let red = c.channels().get("Red").unwrap();
    assert_eq!(red.name, "Red");
    assert!(red.meta.get("color").and_then(Value::as_str).is_some());
    assert_eq!(red.data, Value::map());
    // Stored as the context io.Connect uses.
    let raw = c.contexts().get("___channel___Red").unwrap();
    assert_eq!(raw.data.get("name"), Some(&Value::from("Red")));
    let e = c.channels().join("Nope").unwrap_err();
    assert!(matches!(e, ContextError::NotFound(_)), "{e:?}");
    assert_eq!(e.to_string(), "context with channel Nope does not exist");
}

#[test]
fn publishing_replaces_top_level_keys_of_data_and_followers_track_membership() {
    let env = Env::new("follow");
    let (writer, reader) = (env.client("writer"), env.client("reader"));
    writer
        .channels()
        .publish(j(r#"{"instrument":"VOD.L","px":1}"#), Some("Red"))
        .unwrap();
    writer
        .channels()
        .publish(j(r#"{"instrument":"BP.L"}"#), Some("Blue"))
        .unwrap();
    let (tx, rx) = channel();
    let _sub = reader
        .channels()
        .subscribe(move |u| {
            let _ = tx.send(u.clone());
        })
        .unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "not on a channel yet"
    );
    reader.channels().join("Red").unwrap();
    let u = next(&rx);
    assert_eq!(
        (u.channel.as_str(), &u.data),
        ("Red", &j(r#"{"instrument":"VOD.L","px":1}"#))
    );
    writer
        .channels()
        .publish(j(r#"{"px":2}"#), Some("Red"))
        .unwrap();
    let u = next(&rx);
    assert_eq!(
        u.data,
        j(r#"{"instrument":"VOD.L","px":2}"#),
        "other keys kept"
    );
    assert_eq!(u.updater.unwrap().application, "writer");
    // Single mode: joining Blue leaves Red.
    reader.channels().join("Blue").unwrap();
    assert_eq!(reader.channels().my_channels(), ["Blue"]);
    let u = next(&rx);
    assert_eq!(
        (u.channel.as_str(), &u.data),
        ("Blue", &j(r#"{"instrument":"BP.L"}"#))
    );
    writer
        .channels()
        .publish(j(r#"{"px":3}"#), Some("Red"))
        .unwrap();
    writer
        .channels()
        .publish(j(r#"{"px":9}"#), Some("Blue"))
        .unwrap();
    let u = next(&rx);
    assert_eq!(u.channel, "Blue", "Red updates no longer reach us");
    reader.channels().leave(None);
    writer
        .channels()
        .publish(j(r#"{"px":10}"#), Some("Blue"))
        .unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "left: nothing more"
    );
}

#[test]
fn multi_mode_joins_several_and_publish_without_a_name_writes_to_all_joined() {
    let env = Env::new("multi");
    let c = env.client("a");
    c.channels().set_mode(ChannelMode::Multi);
    c.channels().join("Red").unwrap();
    c.channels().join("Green").unwrap();
    assert_eq!(c.channels().my_channels(), ["Red", "Green"]);
    c.channels().publish(j(r#"{"x":1}"#), None).unwrap();
    assert_eq!(c.channels().get("Red").unwrap().data, j(r#"{"x":1}"#));
    assert_eq!(c.channels().get("Green").unwrap().data, j(r#"{"x":1}"#));
    c.channels().leave(Some("Red"));
    assert_eq!(c.channels().my_channels(), ["Green"]);
    let other = env.client("b");
    assert!(matches!(
        other.channels().publish(j(r#"{"x":1}"#), None),
        Err(ContextError::InvalidArgument(_))
    ));
}

#[test]
fn fdc3_contexts_are_stored_one_per_type_and_decoded_as_data_fdc3() {
    let env = Env::new("fdc3");
    let c = env.client("a");
    c.channels()
        .publish_fdc3(
            j(r#"{"type":"fdc3.instrument","id":{"ticker":"AAPL"}}"#),
            Some("Red"),
        )
        .unwrap();
    c.channels()
        .publish_fdc3(j(r#"{"type":"fdc3.contact","name":"Jane"}"#), Some("Red"))
        .unwrap();
    let red = c.channels().get("Red").unwrap();
    assert_eq!(
        red.data.get("fdc3_fdc3&instrument"),
        Some(&j(r#"{"id":{"ticker":"AAPL"}}"#))
    );
    assert_eq!(
        red.data.get("fdc3_fdc3&contact"),
        Some(&j(r#"{"name":"Jane"}"#))
    );
    assert_eq!(
        red.data.get("fdc3"),
        Some(&j(r#"{"type":"fdc3.contact","name":"Jane"}"#)),
        "the latest type decoded"
    );
    let raw = c.contexts().get("___channel___Red").unwrap();
    assert_eq!(
        raw.data.get("latest_fdc3_type"),
        Some(&Value::from("fdc3&contact"))
    );
    assert!(matches!(
        c.channels().publish_fdc3(j(r#"{"id":1}"#), Some("Red")),
        Err(ContextError::InvalidArgument(_))
    ));
}

#[test]
fn subscribe_for_follows_one_channel_without_joining() {
    let env = Env::new("for");
    let (w, r) = (env.client("w"), env.client("r"));
    let (tx, rx) = channel();
    let _s = r
        .channels()
        .subscribe_for("Cyan", move |u| {
            let _ = tx.send(u.clone());
        })
        .unwrap();
    // The current value comes first, then the change.
    assert_eq!(next(&rx).data, Value::map());
    w.channels().publish(j(r#"{"k":1}"#), Some("Cyan")).unwrap();
    assert_eq!(next(&rx).data, j(r#"{"k":1}"#));
    assert!(r.channels().my_channels().is_empty());
}

fn is_mapped_read_only(needle: &str) -> Option<bool> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lines: Vec<&str> = maps.lines().filter(|l| l.contains(needle)).collect();
    if lines.is_empty() {
        return None;
    }
    Some(lines.iter().any(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|p| p.starts_with("r-"))
    }))
}

#[test]
fn restrictions_are_enforced_by_the_runtime() {
    let cfg = ChannelConfig {
        restrictions: vec![
            ChannelRestriction {
                application: Some("viewer".into()),
                user: None,
                channel: "*".into(),
                read: true,
                write: false,
            },
            ChannelRestriction {
                application: Some("outsider".into()),
                user: None,
                channel: "Red".into(),
                read: false,
                write: false,
            },
        ],
        ..ChannelConfig::default()
    };
    let env = Env::with("restrict", |c| c.channels = cfg);
    let (editor, viewer, outsider) = (
        env.client("editor"),
        env.client("viewer"),
        env.client("outsider"),
    );
    editor
        .channels()
        .publish(j(r#"{"k":1}"#), Some("Red"))
        .unwrap();
    // The viewer reads, but may not write: refused with a typed error...
    assert_eq!(viewer.channels().get("Red").unwrap().data, j(r#"{"k":1}"#));
    let err = viewer
        .channels()
        .publish(j(r#"{"k":2}"#), Some("Red"))
        .unwrap_err();
    assert_eq!(err.status(), Status::PermissionDenied);
    let err = viewer
        .contexts()
        .update("___channel___Red", j(r#"{"data":{}}"#))
        .unwrap_err();
    assert_eq!(err.status(), Status::PermissionDenied);
    // ...and not by politeness: the segment it was given is mapped read-only in this process.
    assert_eq!(is_mapped_read_only("knit-context"), Some(true));
    // The outsider may not even read Red (but may use Blue).
    assert_eq!(
        outsider.channels().get("Red").unwrap_err().status(),
        Status::PermissionDenied
    );
    assert!(outsider.channels().join("Red").is_err());
    let Err(e) = outsider.channels().subscribe_for("Red", |_| {}) else {
        panic!("subscribed to a channel it may not read");
    };
    assert_eq!(e.status(), Status::PermissionDenied);
    let Err(e) = outsider.channels().subscribe_for("Nowhere", |_| {}) else {
        panic!("subscribed to a channel that does not exist");
    };
    assert_eq!(e.status(), Status::NotFound);
    // Listing leaves out what it may not read (and does not fail for it); `all` names it.
    let listed: Vec<String> = outsider
        .channels()
        .list()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    let mut readable = outsider.channels().all();
    assert!(readable.contains(&"Red".to_string()));
    readable.retain(|c| c != "Red");
    assert_eq!(listed, readable);
    outsider
        .channels()
        .publish(j(r#"{"ok":true}"#), Some("Blue"))
        .unwrap();
    assert_eq!(
        editor.channels().get("Red").unwrap().data,
        j(r#"{"k":1}"#),
        "nothing changed"
    );
}
