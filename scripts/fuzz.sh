#!/usr/bin/env bash
# Fuzzes knit's decoders of untrusted input for a fixed budget, on stable Rust.
#
#   scripts/fuzz.sh [TARGET...]        all targets when none is named
#   FUZZ_SECONDS=60                    budget per target (default 60)
#   FUZZ_JOBS=1                        libFuzzer processes per target (default 1)
#
# Targets (fuzz/fuzz_targets/, entry points in src/fuzzing.rs): frame_decode, value_decode,
# gw3_json, ring_reader, context_follower. Each run starts from the committed seeds
# (fuzz/seeds/<target>/) plus the working corpus of earlier runs (fuzz/corpus/<target>/, not
# committed). Built with `-s none` (no sanitizer: ASan needs nightly) and `-a` (debug
# assertions and overflow checks on). Any crash, hang (an input running over 10 s) or
# out-of-memory input is copied to tests/fuzz_regressions/<target>/, which
# tests/fuzz_regressions.rs replays under `cargo test`; the script then fails. A summary line
# per target gives executions, coverage and features.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
seconds="${FUZZ_SECONDS:-60}"
jobs="${FUZZ_JOBS:-1}"
all=(frame_decode value_decode gw3_json ring_reader context_follower)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

if ! cargo fuzz --version 2>/dev/null | grep -q '0.13.2'; then
    echo "== installing cargo-fuzz 0.13.2"
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

cd "$repo/fuzz"
echo "== building the fuzz targets (-s none -a)"
cargo fuzz build -s none -a

failed=0
summary=()
for t in "${targets[@]}"; do
    corpus="$repo/fuzz/corpus/$t"
    seeds="$repo/fuzz/seeds/$t"
    artifacts="$repo/fuzz/artifacts/$t"
    log="$repo/fuzz/artifacts/$t.log"
    mkdir -p "$corpus" "$artifacts"
    find "$artifacts" -type f -delete
    echo "== $t: ${seconds}s"
    set +e
    parallel=()
    [ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
    cargo fuzz run -s none -a "$t" "$corpus" "$seeds" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 "${parallel[@]}" \
        -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1
    status=$?
    set -e
    # With -jobs, libFuzzer writes each worker's output to fuzz-N.log in the current directory.
    cat fuzz-*.log >>"$log" 2>/dev/null || true
    rm -f fuzz-*.log
    execs=$(grep -h 'stat::number_of_executed_units' "$log" | awk '{s += $2} END {print s + 0}')
    last=$(grep -hE '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    units=$(find "$corpus" -type f | wc -l)
    found=$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    if [ "$found" -gt 0 ] || [ "$status" -ne 0 ]; then
        failed=1
        mkdir -p "$repo/tests/fuzz_regressions/$t"
        find "$artifacts" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) \
            -exec cp {} "$repo/tests/fuzz_regressions/$t/" \;
        echo "!! $t: exit $status, $found failing input(s) copied to tests/fuzz_regressions/$t/ (log: $log)"
        grep -hE 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | head -5 || true
    fi
    summary+=("$(printf '%-17s %4ss  execs %10s  cov %5s  ft %6s  corpus %5s  failures %s' \
        "$t" "$seconds" "$execs" "${cov:-?}" "${ft:-?}" "$units" "$found")")
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "fuzzing found failures: fix them; their inputs are now regression tests (cargo test --test fuzz_regressions)"
    exit 1
fi
echo "no crashes, hangs or out-of-memory inputs"
