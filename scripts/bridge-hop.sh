#!/usr/bin/env bash
# The bridge's own time per hop: from the recvfrom that reads a GW3 frame to the sendto that
# forwards it, traced inside a running gateway while two @interopio/core processes (the roles
# of tests/web/bench.js) call each other through it (docs/benchmarks.md §6.3, stop 15).
#
#   scripts/bridge-hop.sh [KNIT_BINARY] [WINDOWS] [invoke|ctx]
#
# `ctx` traces the context scenario instead (a writer's update-context to the subscriber's
# context-updated).
#
# Needs `perf` (Debian: linux-perf) with access to tracepoints (root, or
# kernel.perf_event_paranoid <= 1), and tests/web/node_modules (scripts/test-all.sh installs it).
# Prints one line: hops traced, the median and mean read -> forward time, and the median sendto.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
knit="$(realpath "${1:-$root/target/release/knit}")"
windows="${2:-3}"
scenario="${3:-invoke}"
command -v perf >/dev/null || { echo "bridge-hop: perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 2; }
[ -d "$root/tests/web/node_modules/@interopio/core" ] || { echo "bridge-hop: run scripts/test-all.sh (or npm ci in tests/web) first" >&2; exit 2; }
work="$(mktemp -d)"
driver=""
cleanup() {
  if [ -n "$driver" ]; then kill "$driver" 2>/dev/null || true; wait "$driver" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# A gateway, a server and a caller making calls until stopped (tests/web/bench.js --role drive).
node "$root/tests/web/bench.js" --role drive --knit "$knit" --scenario "$scenario" > "$work/pid" &
driver=$!
for _ in $(seq 100); do [ -s "$work/pid" ] && break; sleep 0.1; done
gw="$(head -1 "$work/pid" | cut -d" " -f1)"
[ -n "$gw" ] || { echo "bridge-hop: the gateway did not start" >&2; exit 1; }
sleep 5 # past the client library's warm-up (docs/benchmarks.md §4)
for i in $(seq "$windows"); do
  perf record -q -e 'raw_syscalls:sys_enter,raw_syscalls:sys_exit' -o "$work/w$i.data" -p "$gw" -- sleep 0.3 >/dev/null 2>&1
  perf script --ns -i "$work/w$i.data" -F time,event,trace 2>/dev/null > "$work/w$i.txt"
  sleep 1
done
python3 - "$work" "$windows" <<'EOF'
import statistics, sys
work, windows = sys.argv[1], int(sys.argv[2])
RECVFROM, SENDTO = 45, 44  # x86-64 syscall numbers
hops, sends = [], []
for i in range(1, windows + 1):
    events = []
    for line in open(f"{work}/w{i}.txt"):
        f = line.split()
        t = float(f[0].rstrip(":"))
        nr = int(line.split("NR ")[1].split()[0])
        if "sys_exit" in f[1]:
            ret = int(line.split("= ")[1].split()[0])
            events.append((t, "exit", nr, ret))
        else:
            events.append((t, "enter", nr, None))
    for a, (t, kind, nr, ret) in enumerate(events):
        if kind == "exit" and nr == RECVFROM and ret > 0:
            # the next syscall after a read that brought data: the forward, if it is a sendto
            if a + 1 < len(events) and events[a + 1][1:3] == ("enter", SENDTO):
                hops.append((events[a + 1][0] - t) * 1e6)
        if kind == "enter" and nr == SENDTO and a + 1 < len(events) and events[a + 1][1:3] == ("exit", SENDTO):
            sends.append((events[a + 1][0] - t) * 1e6)
if not hops:
    sys.exit("bridge-hop: no forwarded frames traced")
print(f"hops {len(hops)}  read->forward median {statistics.median(hops):.2f} us  mean {statistics.mean(hops):.2f} us"
      f"  |  sendto median {statistics.median(sends):.2f} us")
EOF
