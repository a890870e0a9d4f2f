//! The load and soak benches (`knit bench load`, `knit bench soak`) at small sizes, through the
//! real binary: they must run end to end and their own accounting must come out exact — every
//! call answered once by the server it was sent to, every message, item and context update
//! received once and in order. The full sizes are `scripts/load.sh` (not a test: minutes long).
//!
//! Each bench starts its own `knit gateway` on a socket in a fresh directory under `TMPDIR`,
//! which each test points at a directory of its own. Nothing here is timed: the deadlines only
//! turn a hang into a failure.

mod common;

use common::{spawn_knit_env, GatewayProc, Output, TempDir};
use serde_json::Value as Json;
use std::path::Path;
use std::time::Duration;

/// Generous: two benches may share two cores with other tests.
const DEADLINE: Duration = Duration::from_secs(240);

/// The stdout line whose `scenario` is `name`, parsed.
fn summary(out: &Output, name: &str) -> Json {
    out.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .find(|v| v["scenario"] == name)
        .unwrap_or_else(|| {
            panic!(
                "no {name:?} line (exit {:?}); stdout: {} stderr: {}",
                out.code, out.stdout, out.stderr
            )
        })
}

fn u(v: &Json, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a count in {v}"))
}

fn run_bench(tmp: &TempDir, args: &[&str]) -> Output {
    let env: [(&str, &Path); 1] = [("TMPDIR", tmp.path())];
    spawn_knit_env(args, &env, None).finish(DEADLINE)
}

#[test]
fn load_every_call_is_answered_once_by_its_server() {
    let tmp = TempDir::new("ld");
    let (clients, calls, servers) = (4u64, 2_000u64, 2u64);
    let out = run_bench(
        &tmp,
        &[
            "bench",
            "load",
            "--clients",
            &clients.to_string(),
            "--calls",
            &calls.to_string(),
            "--servers",
            &servers.to_string(),
            "--peers",
            "16",
            "--methods",
            "200",
            "--contexts",
            "200",
            "--probe-iters",
            "500",
        ],
    );
    let v = summary(&out, "load");
    let expected = clients * calls;
    assert_eq!(u(&v, "expected_calls"), expected, "{v}");
    // The contract's fields of every bench row.
    assert_eq!(u(&v, "iters"), expected, "{v}");
    assert!(
        v["size"].is_u64() && v["msgs_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{v}"
    );
    assert_eq!(u(&v, "replies_ok"), expected, "lost or failed calls: {v}");
    assert_eq!(u(&v, "server_received"), expected, "{v}");
    assert_eq!(v["reconciled"], true, "{v}");
    for k in [
        "violations",
        "call_errors",
        "wrong_replies",
        "misrouted_replies",
        "server_duplicates",
        "server_gaps",
        "server_misrouted",
        "server_bad_args",
        "pair_mismatches",
        "lost_clients",
        "lost_servers",
        "unclean_exits",
    ] {
        assert_eq!(u(&v, k), 0, "{k}: {v}");
    }
    assert_eq!(u(&v, "latency_samples"), expected, "{v}");
    // The registry was at the size asked for while the calls ran.
    assert!(u(&v, "peers") >= 16, "{v}");
    assert!(u(&v, "methods") >= 200, "{v}");
    assert!(u(&v, "contexts") >= 200, "{v}");
    assert_eq!(v["gateway_clean_exit"], true, "{v}");
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    // Three probe rows, one per registry size.
    let probes = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|v| v["scenario"] == "load_probe")
        .count();
    assert_eq!(probes, 3, "stdout: {}", out.stdout);
}

#[test]
fn soak_delivers_everything_and_samples_memory() {
    let tmp = TempDir::new("sk");
    let out = run_bench(
        &tmp,
        &["bench", "soak", "--minutes", "0.25", "--sample-secs", "1"],
    );
    let v = summary(&out, "soak");
    assert_eq!(u(&v, "violations"), 0, "first error: {}", v["first_error"]);
    assert_eq!(v["gateway_clean_exit"], true, "{v}");
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    // Every peer reported, and the operations add up.
    let reports = v["reports"].as_array().expect("reports");
    assert_eq!(reports.len(), 3, "{v}");
    let mut ops = 0;
    for r in reports {
        assert_eq!(u(r, "violations"), 0, "{r}");
        assert!(u(r, "ops") > 0, "{r}");
        ops += u(r, "ops");
    }
    assert_eq!(u(&v, "ops"), ops, "{v}");
    // Memory: one sample line per tick, with the gateway and the three peers, and a judgement
    // per process (reported, not asserted: 15 s is too short to call memory flat).
    let samples: Vec<Json> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|v| v["scenario"] == "soak_sample")
        .collect();
    assert_eq!(samples.len() as u64, u(&v, "samples"), "{v}");
    assert!(samples.len() >= 10, "{} samples", samples.len());
    for s in &samples {
        assert!(u(&s["gateway"], "rss_kb") > 0, "{s}");
        let peers = s["peers_rss_kb"].as_array().expect("peers_rss_kb");
        assert_eq!(peers.len(), 3, "{s}");
        assert!(peers.iter().all(|p| p.as_u64().unwrap_or(0) > 0), "{s}");
        assert!(s["keeper_rss_kb"].as_u64().unwrap_or(0) > 0, "{s}");
    }
    // The gateway, the three peers, and the gateway's keeper.
    let memory = v["memory"].as_array().expect("memory");
    assert_eq!(memory.len(), 5, "{v}");
    assert_eq!(memory[4]["process"], "keeper", "{v}");
    for m in memory {
        assert!(m["verdict"] == "flat" || m["verdict"] == "growing", "{m}");
    }
    assert!(u(&v, "gateway_rss_idle_kb") > 0, "{v}");
}

/// Resident and anonymous memory of a process, in KiB.
fn rss_kb(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |k: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// Peers that connect and leave cost the gateway nothing once gone. (The soak showed the
/// gateway growing ~55 KiB a minute: each connection's finished writer task stayed in the
/// gateway's task set, ~1.4 KiB per peer that ever connected, 4 MiB per 3 000.)
#[test]
fn peers_that_come_and_go_leave_nothing_in_the_gateway() {
    use knit::client::Client;
    let dir = TempDir::new("visit");
    let gw = GatewayProc::start(&dir, &[]);
    let pid = gw.child.pid();
    // Watches the peers come and go (its own view of the registry).
    let watcher = Client::builder("watcher")
        .socket(&gw.socket)
        .connect()
        .expect("connect");
    let visit = |n: usize| {
        for _ in 0..n {
            let c = Client::builder("visitor")
                .socket(&gw.socket)
                .connect()
                .expect("connect");
            drop(c);
        }
        // The gateway has handled every departure once the watcher has heard of it.
        assert!(
            common::wait_until(Duration::from_secs(60), || watcher.servers().len() == 1),
            "visitors still listed: {:?}",
            watcher.servers().len()
        );
    };
    visit(500); // warm-up: allocator arenas, tables at their working size
    let before = rss_kb(pid);
    visit(3_000);
    let after = rss_kb(pid);
    let growth = after.1 as i64 - before.1 as i64;
    assert!(
        growth < 1024,
        "the gateway's heap grew {growth} KiB over 3 000 visits (RSS {before:?} -> {after:?} KiB)"
    );
}
