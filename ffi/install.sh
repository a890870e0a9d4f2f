#!/usr/bin/env bash
# Builds libknit (release) and installs what a C/C++ build needs:
#   $PREFIX/lib/libknit.so, $PREFIX/lib/libknit.a, $PREFIX/include/knit.h,
#   $PREFIX/include/knit/knit.hpp (C++ wrapper), $PREFIX/lib/pkgconfig/knit.pc
# Then: cc app.c $(pkg-config --cflags --libs knit)     (static: pkg-config --static, and
# link libknit.a explicitly or remove the .so).
#
#   PREFIX=/usr/local   where to install          DESTDIR=   staging root (packaging)
#   LIBDIR, INCLUDEDIR  override the two dirs     KNIT_NO_BUILD=1   install what is built
#   CARGO_TARGET_DIR    where cargo builds (default: <repo>/target)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX="${PREFIX:-/usr/local}"
LIBDIR="${LIBDIR:-$PREFIX/lib}"
INCLUDEDIR="${INCLUDEDIR:-$PREFIX/include}"
DESTDIR="${DESTDIR:-}"
target="${CARGO_TARGET_DIR:-$repo/target}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/ffi/Cargo.toml" | head -1)"

if [ -z "${KNIT_NO_BUILD:-}" ]; then
    cargo build --release -p knit-ffi --manifest-path "$repo/Cargo.toml"
fi
for f in libknit.so libknit.a; do
    [ -f "$target/release/$f" ] || { echo "install.sh: $target/release/$f is missing" >&2; exit 1; }
done

install -d "$DESTDIR$LIBDIR/pkgconfig" "$DESTDIR$INCLUDEDIR/knit"
install -m 0755 "$target/release/libknit.so" "$DESTDIR$LIBDIR/libknit.so"
install -m 0644 "$target/release/libknit.a" "$DESTDIR$LIBDIR/libknit.a"
install -m 0644 "$repo/bindings/c/include/knit.h" "$DESTDIR$INCLUDEDIR/knit.h"
install -m 0644 "$repo/bindings/cpp/include/knit/knit.hpp" "$DESTDIR$INCLUDEDIR/knit/knit.hpp"
sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@LIBDIR@|$LIBDIR|g" -e "s|@INCLUDEDIR@|$INCLUDEDIR|g" \
    -e "s|@VERSION@|$version|g" "$repo/ffi/knit.pc.in" >"$DESTDIR$LIBDIR/pkgconfig/knit.pc"
chmod 0644 "$DESTDIR$LIBDIR/pkgconfig/knit.pc"
echo "installed libknit $version under $DESTDIR$PREFIX"

# The dynamic loader finds a newly installed library only once its cache knows it (programs
# linked against it failed with "libknit.so: cannot open shared object file" until then).
if [ -z "$DESTDIR" ]; then
    ldconfig_bin="$(command -v ldconfig || { [ -x /sbin/ldconfig ] && echo /sbin/ldconfig; } || true)"
    if [ "$(id -u)" = 0 ] && [ -n "$ldconfig_bin" ]; then
        "$ldconfig_bin" || echo "install.sh: ldconfig failed" >&2
    fi
    if ! { [ -n "$ldconfig_bin" ] && "$ldconfig_bin" -p 2>/dev/null | grep -q "=> $LIBDIR/libknit.so\$"; }; then
        echo "note: the dynamic loader does not know $LIBDIR yet: run ldconfig as root (if $LIBDIR" \
             "is in /etc/ld.so.conf), or link with -Wl,-rpath,$LIBDIR, or set LD_LIBRARY_PATH=$LIBDIR" >&2
    fi
fi
