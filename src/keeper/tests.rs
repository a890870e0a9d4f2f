use super::*;
use crate::shm::{self, ContextSegment};
use crate::store::Store;
use std::time::{Duration, Instant};

fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "knit-keeper-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    crate::control::ensure_private_dir(&d).unwrap();
    d
}

/// A keeper on a thread; returns its gateway socket path and the thread.
fn start(
    tag: &str,
    linger: Duration,
) -> (PathBuf, std::thread::JoinHandle<Result<(), KeeperError>>) {
    let gw = temp_dir(tag).join("gw.sock");
    let path = socket_path(&gw);
    let t = std::thread::spawn(move || run(&path, linger));
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket_path(&gw)).is_err() {
        assert!(Instant::now() < deadline, "the keeper never listened");
        std::thread::sleep(Duration::from_millis(2));
    }
    (gw, t)
}

fn join_within(t: std::thread::JoinHandle<Result<(), KeeperError>>, d: Duration) {
    let deadline = Instant::now() + d;
    while !t.is_finished() {
        assert!(Instant::now() < deadline, "the keeper did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.join().unwrap().unwrap();
}

fn write_value(fd: &OwnedFd, key: &str, v: i64) {
    let store = Store::new(ContextSegment::open(fd).unwrap()).unwrap();
    let mut m = crate::wire::Map::new();
    m.insert(key.into(), crate::wire::Value::from(v));
    crate::store::context::write(
        &store,
        7,
        &crate::model::context::ContextOp::Set(m),
        None,
        1 << 20,
        Duration::from_secs(1),
        None,
    )
    .unwrap();
}

fn read_value(fd: &OwnedFd) -> crate::wire::Value {
    let store = Store::new(ContextSegment::open(fd).unwrap()).unwrap();
    let mut buf = Vec::new();
    store.read(&mut buf).unwrap();
    crate::wire::Value::Map(crate::store::context::decode_snapshot(&buf).unwrap())
}

#[test]
fn a_new_gateway_gets_back_every_segment_with_the_memory_the_last_writer_left() {
    let (gw, t) = start("back", Duration::from_secs(30));
    let path = socket_path(&gw);
    let (mut link, state) = Link::connect(&path).unwrap();
    assert!(state.contexts.is_empty() && state.peers.is_empty());
    let a = shm::create_context(4096, 4096).unwrap();
    let b = shm::create_context(4096, 4096).unwrap();
    let rec = |id: u64, name: &str| KeptContext {
        id,
        user: "u".into(),
        name: name.into(),
    };
    link.put(&rec(1, "a"), a.as_fd()).unwrap();
    link.put(&rec(2, "b"), b.as_fd()).unwrap();
    link.drop_context(2).unwrap();
    link.counters(Counters {
        next_peer: 100,
        next_context: 50,
    })
    .unwrap();
    link.peer_up(5, 4242).unwrap();
    // A writer keeps writing after the gateway handed the segment over.
    write_value(&a, "x", 1);
    // The gateway dies without a word; our own descriptor goes too.
    drop(link);
    drop(a);

    let (link, state) = Link::connect(&path).unwrap();
    assert_eq!(state.counters.next_peer, 100);
    assert_eq!(state.counters.next_context, 50);
    assert_eq!(state.peers, vec![(5, 4242)]);
    assert_eq!(state.contexts.len(), 1, "the dropped segment is gone");
    let r = &state.contexts[0];
    assert_eq!(r.record.as_ref().unwrap(), &rec(1, "a"));
    let fd = r.fd.as_ref().expect("a descriptor");
    assert_eq!(
        read_value(fd),
        crate::wire::Value::object([("x", crate::wire::Value::from(1))])
    );
    drop(link);

    // The previous run's peers are handed over once.
    let (link, state) = Link::connect(&path).unwrap();
    assert!(state.peers.is_empty());
    assert_eq!(state.contexts.len(), 1);
    link.exit();
    join_within(t, Duration::from_secs(10));
    assert!(
        !path.exists(),
        "the keeper removes its socket when it exits"
    );
    let _ = std::fs::remove_dir_all(gw.parent().unwrap());
}

#[test]
fn a_keeper_whose_gateway_vanished_exits_after_lingering() {
    let (gw, t) = start("linger", Duration::from_millis(300));
    let (link, _) = Link::connect(&socket_path(&gw)).unwrap();
    let started = Instant::now();
    drop(link);
    join_within(t, Duration::from_secs(10));
    assert!(started.elapsed() >= Duration::from_millis(250));
    let _ = std::fs::remove_dir_all(gw.parent().unwrap());
}

#[test]
fn a_keeper_exits_when_its_socket_file_is_removed() {
    let (gw, t) = start("gone", Duration::from_secs(600));
    let (_link, _) = Link::connect(&socket_path(&gw)).unwrap();
    std::fs::remove_dir_all(gw.parent().unwrap()).unwrap();
    join_within(t, Duration::from_secs(10));
}

#[test]
fn a_second_keeper_on_a_live_socket_steps_aside() {
    let (gw, t) = start("twice", Duration::from_secs(30));
    // Returns at once: the first one serves.
    run(&socket_path(&gw), Duration::from_secs(30)).unwrap();
    let (link, _) = Link::connect(&socket_path(&gw)).unwrap();
    link.exit();
    join_within(t, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(gw.parent().unwrap());
}

#[test]
fn spawning_a_missing_program_is_a_typed_error() {
    let gw = temp_dir("nospawn").join("gw.sock");
    let cfg = KeeperConfig::new("/nonexistent/knit");
    assert!(matches!(
        Link::attach(&gw, &cfg),
        Err(KeeperError::Spawn { .. })
    ));
    let _ = std::fs::remove_dir_all(gw.parent().unwrap());
}
