#!/usr/bin/env bash
# The C ABI and its bindings: unit tests, the generated-header check, the C and C++ tests under
# ASan/UBSan (all in `cargo test -p knit-ffi`), the install step with pkg-config (an out-of-tree
# program linked dynamically and statically), the Python tests, the .NET tests under Mono, the
# cross-language examples run against each other (examples/run-matrix.sh), and the
# C-ABI-vs-Rust RPC bench run once (reported, not gated: this machine is shared).
# Installs what it needs: gcc/g++, pkg-config, mono (apt), cffi and pytest (pip).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
# KNIT_PROFILE=release|debug: which build to test (scripts/test-all.sh uses release throughout,
# so one build serves every step); KNIT_FFI_SKIP_CARGO_TEST=1 when `cargo test --workspace`
# already ran knit-ffi's tests.
profile="${KNIT_PROFILE:-debug}"
cargo_flag=()
[ "$profile" = release ] && cargo_flag=(--release)


need=()
command -v gcc >/dev/null || need+=(gcc)
command -v g++ >/dev/null || need+=(g++)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v mcs >/dev/null || need+=(mono-mcs)
command -v mono >/dev/null || need+=(mono-runtime)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -c 'import cffi' 2>/dev/null || python3 -m pip install -q 'cffi>=1.15'
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q 'pytest>=7'

echo "== ffi: unit tests, header check, C and C++ tests under ASan/UBSan"
[ "${KNIT_FFI_SKIP_CARGO_TEST:-0}" = 1 ] || cargo test "${cargo_flag[@]}" -p knit-ffi
cargo build "${cargo_flag[@]}" -p knit --bin knit
cargo build "${cargo_flag[@]}" -p knit-ffi
lib_dir="$CARGO_TARGET_DIR/$profile"
knit_bin="$CARGO_TARGET_DIR/$profile/knit"

work="$(mktemp -d)"
gw_pid=""
cleanup() {
    if [ -n "$gw_pid" ]; then
        kill "$gw_pid" 2>/dev/null || true
        wait "$gw_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== ffi: install into a temporary prefix; build an out-of-tree program with pkg-config"
PREFIX="$work/prefix" "$repo/ffi/install.sh"
export PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig"
pkg-config --exists knit
gcc -std=c11 -Wall -Wextra -Werror "$repo/bindings/c/examples/hello.c" \
    $(pkg-config --cflags --libs knit) -Wl,-rpath,"$work/prefix/lib" -o "$work/hello"
gcc -std=c11 -Wall -Wextra -Werror "$repo/bindings/c/examples/hello.c" $(pkg-config --cflags knit) \
    -L"$work/prefix/lib" -Wl,-Bstatic -lknit -Wl,-Bdynamic \
    $(pkg-config --static --libs-only-l knit | sed 's/-lknit//') -o "$work/hello-static"
g++ -std=c++17 -Wall -Wextra -Werror -x c++ - $(pkg-config --cflags --libs knit) \
    -Wl,-rpath,"$work/prefix/lib" -o "$work/hello-cpp" <<'CPP'
#include <knit/knit.hpp>
#include <iostream>
int main() {
    auto c = knit::Client::connect("hello-cpp");
    c.register_method("Hello", [](const knit::Call&) { return std::string("\"hi\""); });
    std::cout << c.invoke("Hello") << "\n";
}
CPP
if ldd "$work/hello-static" | grep -q libknit; then
    echo "hello-static still links libknit.so" >&2
    exit 1
fi
exec 3< <(KNIT_LOG=info exec "$knit_bin" gateway --no-ws --gateway "$work/gw.sock" 2>&1 >/dev/null)
gw_pid=$!
while IFS= read -r -t 30 -u 3 line; do [[ $line == *listening* ]] && break; done
cat <&3 >/dev/null &
export KNIT_GATEWAY="$work/gw.sock"
for prog in hello hello-static hello-cpp; do
    out="$("$work/$prog")"
    echo "$prog: $out"
    case "$out" in *'"returned":'*) ;; *) echo "$prog printed no result" >&2; exit 1 ;; esac
done
unset KNIT_GATEWAY

echo "== python binding (pip install -e, pytest)"
python3 -m pip install -q -e "$repo/bindings/python"
KNIT_LIB="$lib_dir/libknit.so" KNIT_BIN="$knit_bin" python3 -m pytest -q "$repo/bindings/python/tests"

echo "== .NET binding under Mono"
KNIT_LIB_DIR="$lib_dir" KNIT_BIN="$knit_bin" "$repo/bindings/dotnet/test.sh"

echo "== examples: every language against every other ($profile build, already made above)"
KNIT_PROFILE="$profile" "$repo/examples/run-matrix.sh"

if [ "${KNIT_FFI_SKIP_BENCH:-0}" != 1 ]; then
    echo "== C ABI vs Rust RPC round trip (run once, short)"
    cargo bench -p knit-ffi --bench rpc -- --iters 6000 --rounds 2
fi
