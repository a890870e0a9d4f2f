#!/usr/bin/env bash
# Runs the cross-language examples against each other on a private gateway and prints a
# pass/fail matrix per scenario:
#   price-server      every client language × every server language
#   context-follower  every writer language × every follower language
# Exits non-zero if any cell failed (or a program could not be built or started).
#
# Needs what `cargo build --release` and `cargo build --release -p knit-ffi` leave in the target
# directory (the knit CLI, libknit.so); builds the Rust examples (cargo, package knit-examples),
# the C and C++ ones (gcc, g++), the C# ones (Mono's mcs) itself; Python needs cffi.
#   KNIT_PROFILE=release|debug   which build to use (default release)
#   KNIT_EXAMPLE_LANGS="c python" only these languages (default: rust c cpp csharp python)
#   CARGO_TARGET_DIR             as for cargo (default <repo>/target)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
profile="${KNIT_PROFILE:-release}"
target="${CARGO_TARGET_DIR:-$repo/target}"
bin_dir="$target/$profile"
read -r -a langs <<<"${KNIT_EXAMPLE_LANGS:-rust c cpp csharp python}"
TIMEOUT=30 # seconds, for every wait

die() { echo "run-matrix: $*" >&2; exit 2; }
cargo_flag=()
[ "$profile" = release ] && cargo_flag=(--release)
[ -x "$bin_dir/knit" ] || die "no knit CLI at $bin_dir/knit (cargo build ${cargo_flag[*]})"
[ -f "$bin_dir/libknit.so" ] || die "no libknit.so in $bin_dir (cargo build ${cargo_flag[*]} -p knit-ffi)"

work="$(mktemp -d)"
gw_pid=""
server_pid=""
cleanup() {
    for p in $server_pid $gw_pid; do kill "$p" 2>/dev/null || true; done
    for p in $server_pid $gw_pid; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/bin"

# ----- build -----------------------------------------------------------------------------

build_failed=()
has_lang() { [[ " ${langs[*]} " == *" $1 "* ]]; }

if has_lang rust; then
    echo "== building the Rust examples (cargo build ${cargo_flag[*]} -p knit-examples)"
    (cd "$repo" && cargo build -q "${cargo_flag[@]}" -p knit-examples) || build_failed+=(rust)
fi
c_flags=(-I"$repo/bindings/c/include" -I"$repo/bindings/cpp/include" -L"$bin_dir" -lknit
         -Wl,-rpath,"$bin_dir" -pthread)
for pair in price-server/server price-server/client context-follower/writer context-follower/follower; do
    s="${pair%/*}" r="${pair#*/}"
    if has_lang c; then
        gcc -std=c11 -Wall -Wextra -Werror "$here/$s/c/$r.c" "${c_flags[@]}" -o "$work/bin/$s-$r-c" \
            || build_failed+=("c:$s/$r")
    fi
    if has_lang cpp; then
        g++ -std=c++17 -Wall -Wextra -Werror "$here/$s/cpp/$r.cpp" "${c_flags[@]}" -o "$work/bin/$s-$r-cpp" \
            || build_failed+=("cpp:$s/$r")
    fi
    if has_lang csharp; then
        cs="$(ls "$here/$s/csharp/" | grep -i "^$r\.cs$")"
        mcs -langversion:7 -warnaserror -nologo -out:"$work/bin/$s-$r.exe" "$here/$s/csharp/$cs" \
            "$repo"/bindings/dotnet/Knit/*.cs >/dev/null || build_failed+=("csharp:$s/$r")
    fi
done
if has_lang python; then
    python3 -c 'import cffi' 2>/dev/null || build_failed+=("python (no cffi)")
fi
[ ${#build_failed[@]} -eq 0 ] || die "could not build: ${build_failed[*]}"

export KNIT_GATEWAY="$work/gw.sock"
export LD_LIBRARY_PATH="$bin_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KNIT_LIB="$bin_dir/libknit.so"
export PYTHONPATH="$repo/bindings/python${PYTHONPATH:+:$PYTHONPATH}"

# The command of one example program, in PROG: prog SCENARIO ROLE LANG.
prog() {
    local s=$1 r=$2 l=$3
    case $l in
        rust)
            case $s/$r in
                price-server/server) PROG=("$bin_dir/price-server") ;;
                price-server/client) PROG=("$bin_dir/price-client") ;;
                context-follower/writer) PROG=("$bin_dir/context-writer") ;;
                context-follower/follower) PROG=("$bin_dir/context-follower") ;;
            esac ;;
        c | cpp) PROG=("$work/bin/$s-$r-$l") ;;
        csharp) PROG=(mono "$work/bin/$s-$r.exe") ;;
        python) PROG=(python3 "$here/$s/python/$r.py") ;;
    esac
}

# Reads lines from fd $1 until one contains $2 ($TIMEOUT s per line); 1 if it never comes.
wait_line() {
    local fd=$1 want=$2 line
    while IFS= read -r -t "$TIMEOUT" -u "$fd" line; do
        [[ $line == *"$want"* ]] && return 0
    done
    return 1
}

# Waits up to $2 seconds for process $1 to end; kills it if it does not. Returns its status.
reap() {
    local pid=$1 secs=$2
    timeout "$secs" tail --pid="$pid" -f /dev/null 2>/dev/null || kill "$pid" 2>/dev/null
    wait "$pid"
}

echo "== gateway on $KNIT_GATEWAY"
exec 3< <(KNIT_LOG=info exec "$bin_dir/knit" gateway --no-ws --gateway "$KNIT_GATEWAY" 2>&1 >/dev/null)
gw_pid=$!
wait_line 3 listening || die "the gateway did not start"
cat <&3 >/dev/null &

declare -A result
passed=0
failed=0
record() { # record KEY ok|FAIL DETAIL
    result[$1]=$2
    if [ "$2" = pass ]; then passed=$((passed + 1)); else
        failed=$((failed + 1))
        echo "FAIL $1: $3" >&2
    fi
}

# ----- price-server: each server once, every client against it ---------------------------

echo "== price-server: ${#langs[@]} servers x ${#langs[@]} clients"
for srv in "${langs[@]}"; do
    prog price-server server "$srv"
    rm -f "$work/stdin"
    mkfifo "$work/stdin"
    exec 4< <(exec "${PROG[@]}" <"$work/stdin" 2>"$work/server.err")
    server_pid=$!
    exec 5>"$work/stdin" # the server's stdin: it serves until this closes
    if ! wait_line 4 "ready"; then
        for cli in "${langs[@]}"; do record "price:$cli:$srv" FAIL "server did not start: $(cat "$work/server.err")"; done
        exec 5>&-
        reap "$server_pid" 5 >/dev/null 2>&1
        server_pid=""
        continue
    fi
    # (fd 5 is not passed on: only this shell may hold the server's stdin open)
    cat <&4 >/dev/null 5>&- &
    for cli in "${langs[@]}"; do
        prog price-server client "$cli"
        out="$(timeout "$TIMEOUT" "${PROG[@]}" VOD.L 2>"$work/client.err" 5>&-)"
        st=$?
        if [ $st -ne 0 ]; then
            record "price:$cli:$srv" FAIL "exit $st: $(cat "$work/client.err")"
        elif [[ $out == *'"symbol":"VOD.L"'* && $out == *'"bid":100.25'* && $out == *"\"server\":\"$srv\""* \
                && $out == *"\"application\":\"price-server-$srv\""* ]]; then
            record "price:$cli:$srv" pass
        else
            record "price:$cli:$srv" FAIL "unexpected output: $out"
        fi
    done
    exec 5>&- # EOF on the server's stdin: it closes its client and exits
    if ! reap "$server_pid" 10; then echo "note: the $srv server did not exit cleanly: $(cat "$work/server.err")" >&2; fi
    server_pid=""
done

# ----- context-follower: a follower subscribes, a writer writes, the follower sees it all --

echo "== context-follower: ${#langs[@]} writers x ${#langs[@]} followers"
for w in "${langs[@]}"; do
    for f in "${langs[@]}"; do
        name="examples.ctx.$w.to.$f"
        prog context-follower follower "$f"
        exec 6< <(exec timeout $((TIMEOUT + 10)) "${PROG[@]}" "$name" 2>"$work/follower.err")
        fpid=$!
        if ! wait_line 6 "following"; then
            record "ctx:$w:$f" FAIL "follower did not start: $(cat "$work/follower.err")"
            reap "$fpid" 5 >/dev/null 2>&1
            continue
        fi
        prog context-follower writer "$w"
        wout="$(timeout "$TIMEOUT" "${PROG[@]}" "$name" 2>"$work/writer.err")"
        wst=$?
        last=""
        while IFS= read -r -t "$TIMEOUT" -u 6 line; do last="$line"; done
        reap "$fpid" 5
        fst=$?
        if [ $wst -ne 0 ]; then
            record "ctx:$w:$f" FAIL "writer exit $wst: $(cat "$work/writer.err")"
        elif [ $fst -ne 0 ]; then
            record "ctx:$w:$f" FAIL "follower exit $fst: $(cat "$work/follower.err")"
        elif [[ $last == followed* && $last == *"\"writer\":\"$w\""* && $last == *'"seq":5'* \
                && $last == *'"done":true'* && $last != *scratch* ]]; then
            record "ctx:$w:$f" pass
        else
            record "ctx:$w:$f" FAIL "writer said '$wout'; follower ended with '$last'"
        fi
    done
done

# ----- the matrices ----------------------------------------------------------------------

print_matrix() { # print_matrix TITLE PREFIX ROWNAME COLNAME
    local title=$1 prefix=$2 rows=$3 cols=$4
    echo
    echo "$title (rows: $rows, columns: $cols)"
    printf '%-20s' "$rows \\ $cols"
    for c in "${langs[@]}"; do printf '%-8s' "$c"; done
    echo
    for r in "${langs[@]}"; do
        printf '%-20s' "$r"
        for c in "${langs[@]}"; do printf '%-8s' "${result[$prefix:$r:$c]:-FAIL}"; done
        echo
    done
}
print_matrix "price-server" price client server
print_matrix "context-follower" ctx writer follower
echo
echo "examples: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
