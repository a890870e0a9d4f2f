#!/usr/bin/env bash
# Builds the .NET binding and its tests with Mono's mcs and runs them with mono against a
# private gateway and a Rust peer (`knit serve`) in other processes.
#   KNIT_LIB_DIR  directory holding libknit.so   (default: $CARGO_TARGET_DIR or target, /debug)
#   KNIT_BIN      the knit CLI                   (default: next to the library's profile dir)
# Needs: apt-get install -y mono-mcs mono-runtime.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
lib_dir="${KNIT_LIB_DIR:-$target/debug}"
knit_bin="${KNIT_BIN:-$target/debug/knit}"
[ -f "$lib_dir/libknit.so" ] || { echo "no libknit.so in $lib_dir (cargo build -p knit-ffi)" >&2; exit 1; }
[ -x "$knit_bin" ] || { echo "no knit CLI at $knit_bin (cargo build --bin knit)" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

mcs -langversion:7 -warnaserror -out:"$work/Tests.exe" "$here"/Knit/*.cs "$here"/tests/Tests.cs

# Reads lines from fd $1 until one contains $2 (30 s per line at most), then keeps draining
# the fd in the background so the writer never blocks.
wait_line() {
    local fd=$1 want=$2 line
    while IFS= read -r -t 30 -u "$fd" line; do
        if [[ $line == *"$want"* ]]; then
            cat <&"$fd" >/dev/null &
            return 0
        fi
    done
    echo "timed out waiting for '$want'" >&2
    exit 1
}

sock="$work/gw.sock"
exec 3< <(KNIT_LOG=info exec "$knit_bin" gateway --no-ws --gateway "$sock" 2>&1 >/dev/null)
pids+=($!)
wait_line 3 listening
exec 4< <(exec "$knit_bin" --gateway "$sock" --app rust-echo serve Rust.Echo --echo)
pids+=($!)
wait_line 4 '"ready":true'

LD_LIBRARY_PATH="$lib_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 120 mono --debug "$work/Tests.exe" "$sock" Rust.Echo
