#!/usr/bin/env bash
# Load, scale and soak (not a timed test: nothing here asserts a speed).
#
#   scripts/load.sh                  the full runs: load, scale, then a 10-minute soak
#   scripts/load.sh --soak 30        ... with a 30-minute soak
#   scripts/load.sh --no-soak        load and scale only
#   scripts/load.sh --quick          small sizes and a 15 s soak (CI; what tests/load.rs runs)
#   scripts/load.sh --out DIR        keep the JSON output in DIR (default: a temporary directory)
#
# 1. load: a real `knit gateway` process; 64 client processes × 100 000 invocations each,
#    spread over 4 server processes by instance target, while idle peers keep 256 peers
#    connected and the registry holds 10 000 methods and 10 000 contexts. Every reply is checked
#    by its client (echo, executed_by), every server checks each client's sequence (no gap, no
#    duplicate, nothing meant for another server), and the counts are reconciled below.
# 2. scale: a fresh gateway; 10 000 contexts, 10 000 methods, 256 idle peers added one kind at
#    a time; memory and descriptors per item, the idle gateway's RSS, the descriptor limits.
# 3. soak: a gateway and 3 peers invoking, publishing, pushing stream items and updating
#    contexts at 100 ticks a second with churn (temporary contexts, subscriptions, short-lived
#    clients), every delivery checked; RSS of every process sampled every 5 s and judged flat
#    or growing.
#
# Exits non-zero on any lost, duplicated, misrouted or wrong delivery, on a failed run, and (full
# soak only) on a memory verdict other than flat.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
soak_min=10
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --soak) soak_min="${2:?--soak MINUTES}"; shift ;;
        --no-soak) soak_min=0 ;;
        --out) out="${2:?--out DIR}"; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "load.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
command -v python3 >/dev/null || { echo "load.sh: python3 is needed to check the results" >&2; exit 2; }
if [ -z "$out" ]; then
    out="$(mktemp -d "${TMPDIR:-/tmp}/knit-load.XXXXXX")"
fi
mkdir -p "$out"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --quiet
knit="$CARGO_TARGET_DIR/release/knit"

if [ "$quick" = 1 ]; then
    load_args=(--clients 4 --calls 2000 --servers 2 --peers 16 --methods 200 --contexts 200 --probe-iters 500)
    scale_args=(--contexts 1000 --methods 1000 --peers 32)
    soak_args=(--minutes 0.25 --sample-secs 1)
    [ "$soak_min" = 0 ] && soak_args=()
else
    load_args=(--clients 64 --calls 100000 --servers 4 --peers 256 --methods 10000 --contexts 10000)
    scale_args=(--contexts 10000 --methods 10000 --peers 256)
    soak_args=()
    [ "$soak_min" != 0 ] && soak_args=(--minutes "$soak_min" --sample-secs 5)
fi

echo "== $(date -u +%FT%TZ) on $(nproc) CPUs; results in $out"
echo "== knit bench load ${load_args[*]}"
start=$SECONDS
set +e
"$knit" bench load "${load_args[@]}" >"$out/load.jsonl"
load_rc=$?
set -e
echo "   (exit $load_rc, $((SECONDS - start)) s)"
python3 - "$out/load.jsonl" "$load_rc" "${load_args[@]}" <<'EOF'
import json, sys
path, rc, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
opt = {args[i].lstrip('-'): args[i + 1] for i in range(0, len(args) - 1, 2)}
rows = [json.loads(l) for l in open(path) if l.startswith('{')]
s = next((r for r in rows if r.get('scenario') == 'load'), None)
if s is None:
    sys.exit(f"load: no summary (exit {rc})")
clients, calls, servers = int(opt['clients']), int(opt['calls']), int(opt['servers'])
expected = clients * calls
bad = []
def want(k, v):
    if s.get(k) != v:
        bad.append(f"{k} = {s.get(k)}, want {v}")
want('expected_calls', expected)
want('replies_ok', expected)           # no loss, no error, no wrong or misrouted reply
want('server_received', expected)      # no duplicate, no extra
want('latency_samples', expected)
want('reconciled', True)               # every (client, server) pair got exactly its share
for k in ['violations', 'call_errors', 'wrong_replies', 'misrouted_replies', 'server_duplicates',
          'server_gaps', 'server_misrouted', 'server_bad_args', 'pair_mismatches',
          'lost_clients', 'lost_servers']:
    want(k, 0)
for k, o in [('peers', 'peers'), ('methods', 'methods'), ('contexts', 'contexts')]:
    if s.get(k, 0) < int(opt[o]):
        bad.append(f"{k} = {s.get(k)}, want at least {opt[o]}")
if rc != 0:
    bad.append(f"exit {rc}")
mib = lambda kb: f"{kb / 1024:.1f} MiB"
print(f"   calls: {expected} expected, {s['replies_ok']} replied ok, {s['server_received']} received "
      f"by servers; duplicates {s['server_duplicates']}, gaps {s['server_gaps']}, misrouted "
      f"{s['misrouted_replies']}/{s['server_misrouted']}, errors {s['call_errors']}")
print(f"   {s['elapsed_s']} s, {s['calls_per_s']} calls/s; latency p50 {s['p50_ns']/1e3:.1f} µs "
      f"p99 {s['p99_ns']/1e3:.1f} µs max {s['max_ns']/1e3:.1f} µs (set-up {s['setup_s']} s)")
print(f"   registry: {s['peers']} peers, {s['methods']} methods, {s['contexts']} contexts; "
      f"gateway {s['gateway_fds']} descriptors, RSS idle {mib(s['gateway_rss_idle_kb'])}, "
      f"full {mib(s['gateway_rss_before_kb'])}, peak {mib(s['gateway_rss_peak_run_kb'])}; "
      f"keeper {s['keeper_fds']} descriptors, {mib(s['keeper_rss_kb'])}")
for r in rows:
    if r.get('scenario') == 'load_probe':
        print(f"   probe {r['stage']:<4} {r['peers']:>4} peers {r['methods']:>6} methods "
              f"{r['contexts']:>6} contexts: invoke p50 {r['invoke_p50_ns']/1e3:.2f} µs "
              f"p99 {r['invoke_p99_ns']/1e3:.2f} µs, context create p50 "
              f"{r['ctx_create']['p50_ns']/1e3:.0f} µs, connect p50 {r['connect']['p50_ns']/1e3:.0f} µs")
if bad:
    print("load: FAILED: " + "; ".join(bad))
    sys.exit(1)
print("   load: OK (no loss, duplication or misrouting)")
EOF

echo "== knit bench scale ${scale_args[*]}"
"$knit" bench scale "${scale_args[@]}" >"$out/scale.jsonl"
python3 - "$out/scale.jsonl" <<'EOF'
import json, sys
s = next(r for r in map(json.loads, open(sys.argv[1])) if r.get('scenario') == 'scale')
print(f"   idle gateway RSS {s['gateway_rss_idle_kb'] / 1024:.1f} MiB (its keeper "
      f"{s['gateway_idle']['keeper_rss_kb'] / 1024:.1f} MiB); open-file limit "
      f"{s['nofile_soft_limit']} (hard {s['nofile_hard_limit']}, was {s['nofile_soft_limit_before']})")
for k in ['contexts', 'methods', 'peers']:
    r = s[k]
    extra = ''
    if 'maker_rss_b' in r:
        extra = f"; the process that made them {r['maker_rss_b']} B each, {r['maker_fds']} descriptors"
    if 'peer_process_rss_per_peer_kb' in r:
        extra = f"; client process {r['peer_process_rss_per_peer_kb']} KiB per peer"
    print(f"   {r['count']:>6} {k:<8}: gateway {r['gateway_rss_b']} B each (heap {r['gateway_anon_b']}, "
          f"shared {r['gateway_shmem_b']}), {r['gateway_fds']} descriptors each; keeper "
          f"{r['keeper_rss_b']} B, {r['keeper_fds']} descriptors each; system shared "
          f"memory {r['system_shmem_b']} B each{extra}")
g = lambda k: f"{s[k]['rss_kb'] / 1024:.1f} MiB"
print(f"   gateway RSS: everything {g('gateway_full')}; the peers left {g('gateway_after_peers_left')}, "
      f"came back {g('gateway_peers_again')}, left again {g('gateway_after_peers_left_again')}; "
      f"methods gone {g('gateway_after_methods_left')}; contexts destroyed "
      f"{g('gateway_after_contexts_destroyed')} ({s['gateway_after_contexts_destroyed']['fds']} descriptors)")
if s.get('gateway_clean_exit') is not True:
    sys.exit("scale: the gateway did not stop cleanly")
EOF

if [ ${#soak_args[@]} -gt 0 ]; then
    echo "== knit bench soak ${soak_args[*]}"
    set +e
    "$knit" bench soak "${soak_args[@]}" >"$out/soak.jsonl"
    soak_rc=$?
    set -e
    python3 - "$out/soak.jsonl" "$soak_rc" "$quick" <<'EOF'
import json, sys
path, rc, quick = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1'
rows = [json.loads(l) for l in open(path) if l.startswith('{')]
samples = [r for r in rows if r.get('scenario') == 'soak_sample']
s = next((r for r in rows if r.get('scenario') == 'soak'), None)
if s is None:
    sys.exit(f"soak: no summary (exit {rc})")
# RSS samples, about ten of them spread over the run (all are in the JSON).
step = max(1, len(samples) // 10)
print("   t (s)   gateway RSS   peer RSS (KiB)          keeper RSS")
for r in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
    print(f"   {r['t_s']:>6}  {r['gateway']['rss_kb']:>8} KiB   {r['peers_rss_kb']}   {r.get('keeper_rss_kb')} KiB")
print("   process   start → middle → end (KiB)     growth   slope 2nd half   verdict")
for m in s['memory']:
    print(f"   {m['process']:<9} {m['start_kb']} → {m['middle_kb']} → {m['end_kb']}   "
          f"{m['growth_kb']:+} KiB   {m['slope_second_half_kb_per_min']:+.1f} KiB/min   {m['verdict']}")
print(f"   {s['minutes']} min, {s['ops']} operations, {s['violations']} violations; rule: {s['rule']}")
bad = []
if s['violations'] != 0 or rc != 0:
    bad.append(f"{s['violations']} violations, exit {rc} (first: {s['first_error']})")
if s['verdict'] != 'flat':
    if quick:
        print("   (memory verdict not judged in --quick: too short)")
    else:
        bad.append("memory " + s['verdict'])
if bad:
    print("soak: FAILED: " + "; ".join(bad))
    sys.exit(1)
print(f"   soak: OK (memory {s['verdict']})")
EOF
fi
echo "== all passed; JSON in $out"
