#!/usr/bin/env bash
# Every test knit has, in one command (the README's test command; .ci/run calls it after the
# format and lint checks). On Debian it installs what the tests need when it is missing:
#   apt: gcc g++ pkg-config mono-mcs mono-runtime chromium nodejs npm
#   pip: cffi pytest          npm: the packages pinned in tests/web/package-lock.json
# Steps: the Rust workspace (unit, integration, multi-process, the C and C++ tests under
# ASan/UBSan, the web-client tests with @interopio/core, @glue42/core and headless Chromium),
# the loom models, the fuzz corpora replayed as regression tests, the bindings (install,
# Python, .NET, the cross-language example matrix), and each benchmark run once, briefly, so
# none of them rots (figures are reported, never asserted).
#
#   KNIT_SKIP_BENCH=1   skip the benchmark smoke run; KNIT_FULL_BENCH=1 adds criterion and the
#                       bridge benchmark
#   LOOM_MAX_PREEMPTIONS (default 3) bounds the loom models' search
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
start=$SECONDS
step() { echo; echo "== [$((SECONDS - start))s] $*"; }

step "installing what the tests need (only what is missing)"
need=()
for c in gcc g++ pkg-config; do command -v "$c" >/dev/null || need+=("$c"); done
command -v mcs >/dev/null || need+=(mono-mcs)
command -v mono >/dev/null || need+=(mono-runtime)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    echo "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
python3 -c 'import cffi' 2>/dev/null || python3 -m pip install -q --break-system-packages 'cffi>=1.15' 2>/dev/null \
    || python3 -m pip install -q 'cffi>=1.15'
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q --break-system-packages 'pytest>=7' 2>/dev/null \
    || python3 -m pip install -q 'pytest>=7'
(cd tests/web && npm ci --no-audit --no-fund --loglevel=error)

step "cargo test --workspace --release (web tests required)"
KNIT_REQUIRE_WEB=1 cargo test --workspace --release

step "loom models (LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:-3})"
RUSTFLAGS="--cfg knit_loom" CARGO_TARGET_DIR="$CARGO_TARGET_DIR/loom" \
    LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}" cargo test --release --lib loom

step "bindings: install, C/C++ out of tree, Python, .NET, example matrix"
KNIT_PROFILE=release KNIT_FFI_SKIP_CARGO_TEST=1 KNIT_FFI_SKIP_BENCH="$([ "${KNIT_FULL_BENCH:-0}" = 1 ] && echo 0 || echo 1)" .ci/ffi.sh

if [ "${KNIT_SKIP_BENCH:-0}" != 1 ]; then
    # A smoke run: every scenario runs end to end (figures reported, never asserted). The full
    # runs are `knit bench all`, `cargo bench`, `node tests/web/bench.js` and `scripts/load.sh`
    # (see the README).
    step "benchmarks, once and briefly (reported, not asserted)"
    "$CARGO_TARGET_DIR/release/knit" bench all --iters 300 --rounds 1
    scripts/load.sh --quick        # load, scale and soak at small sizes (counts checked)
    if [ "${KNIT_FULL_BENCH:-0}" = 1 ]; then
        cargo bench --bench ring --bench codec -- --warm-up-time 0.2 --measurement-time 0.5 --noplot
        node tests/web/bench.js --knit "$CARGO_TARGET_DIR/release/knit" --n 600 --rounds 1
    fi
fi
step "all tests passed"
