#!/usr/bin/env bash
# The WebSocket bridge's end-to-end checks (called from .ci/run):
#   1. installs what they need: Debian's Chromium (headless browser test), Node if missing, and
#      the npm packages pinned in tests/web/package-lock.json (@interopio/core, @glue42/core,
#      ws, playwright-core, and @glue42/gateway-web for the benchmark's reference gateway);
#   2. runs tests/bridge.rs (raw GW3) and tests/web.rs (the published client libraries: GW3
#      conformance against the golden transcripts, native <-> web, headless Chromium) with the
#      web tests required, so a missing piece fails instead of skipping;
#   3. runs the invoke benchmark once against knit and the reference gateway (release build;
#      KNIT_BRIDGE_BENCH=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

apt_install() {
  if [ -z "${KNIT_APT_UPDATED:-}" ]; then apt-get update -qq; export KNIT_APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" > /dev/null
}
command -v node > /dev/null || apt_install nodejs npm
[ -x /usr/bin/chromium ] || apt_install chromium
(cd tests/web && npm ci --no-audit --no-fund --loglevel=error)

echo "== bridge tests"
KNIT_REQUIRE_WEB=1 cargo test --test bridge --test web

if [ "${KNIT_BRIDGE_BENCH:-1}" != 0 ]; then
  echo "== bridge benchmark (knit vs the reference Glue42 gateway, same client, same run)"
  cargo build --release --bin knit
  node tests/web/bench.js --knit "$CARGO_TARGET_DIR/release/knit" --n "${KNIT_BRIDGE_BENCH_N:-1200}" --rounds 2
fi
