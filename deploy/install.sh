#!/bin/sh
# Builds latd and latc and installs them where the LAT container and the
# builder expect them: $DESTDIR$PREFIX/latd and $DESTDIR$PREFIX/latc, PREFIX
# being /opt/LAT/lat unless told otherwise.
#
# The build is static (x86_64-unknown-linux-musl, release): the same two
# files run on every base StarlingX uses (Debian bullseye, glibc 2.31, and
# trixie), and need nothing from the image. Every binary installed is
# checked first: static, or needing no glibc symbol newer than 2.31.
#
#   deploy/install.sh [--prefix DIR] [--destdir DIR] [--target TRIPLE]
#                     [--from DIR [--no-check]] [--check FILE...]
#   PREFIX=/opt/LAT/lat DESTDIR=/tmp/image deploy/install.sh   # make-style
#
#   --prefix DIR     where the binaries go (default /opt/LAT/lat)
#   --destdir DIR    staging root prepended to the prefix (default none)
#   --target TRIPLE  cargo target (default x86_64-unknown-linux-musl; on a
#                    bullseye build host x86_64-unknown-linux-gnu passes
#                    the glibc check too)
#   --from DIR       install latd and latc from DIR instead of building
#   --no-check       with --from: install without the glibc check (binaries
#                    built for this host only, e.g. for a test)
#   --check FILE...  only check that each FILE runs on glibc 2.31 or later
#                    (exit 1 if not), install nothing
set -eu

MAX_GLIBC=2.31
prefix=${PREFIX:-/opt/LAT/lat}
destdir=${DESTDIR:-}
target=x86_64-unknown-linux-musl
from=
no_check=

die() { echo "install.sh: $*" >&2; exit 1; }

# Prints why FILE would not run on glibc $MAX_GLIBC, or nothing if it would.
portability_problem() {
    file=$1
    command -v readelf >/dev/null || { echo "readelf (binutils) is needed to check $file"; return; }
    [ -f "$file" ] || { echo "$file does not exist"; return; }
    if ! readelf -lW "$file" | grep -q 'Requesting program interpreter' \
        && ! readelf -dW "$file" | grep -q '(NEEDED)'; then
        return  # static: no loader, no shared library
    fi
    newest=$(readelf -VW "$file" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' \
        | sort -t. -k1,1n -k2,2n -k3,3n -u | tail -n 1)
    [ -n "$newest" ] || return
    highest=$(printf '%s\n%s\n' "$newest" "$MAX_GLIBC" | sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1)
    if [ "$highest" != "$MAX_GLIBC" ]; then
        echo "$file needs glibc $newest, newer than bullseye's $MAX_GLIBC (build it static: --target x86_64-unknown-linux-musl)"
    fi
}

check() {
    status=0
    for f in "$@"; do
        problem=$(portability_problem "$f")
        if [ -n "$problem" ]; then
            echo "install.sh: $problem" >&2
            status=1
        else
            echo "ok: $f runs on glibc $MAX_GLIBC and later (or needs no glibc)"
        fi
    done
    return $status
}

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --destdir) destdir=$2; shift 2 ;;
        --destdir=*) destdir=${1#*=}; shift ;;
        --target) target=$2; shift 2 ;;
        --target=*) target=${1#*=}; shift ;;
        --from) from=$2; shift 2 ;;
        --from=*) from=${1#*=}; shift ;;
        --no-check) no_check=1; shift ;;
        --check) shift; check "$@"; exit $? ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

case $prefix in /*) ;; *) die "--prefix must be absolute: $prefix" ;; esac

[ -z "$no_check" ] || [ -n "$from" ] || die "--no-check goes with --from"
if [ -z "$from" ]; then
    cd "$(dirname "$0")/.."
    if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$target"; then
        rustup target add "$target" \
            || die "cannot add the Rust target $target (rustup target add $target)"
    fi
    cargo build --release --locked --target "$target" --bin latd --bin latc
    from=${CARGO_TARGET_DIR:-$(pwd)/target}/$target/release
fi

if [ -z "$no_check" ]; then
    check "$from/latd" "$from/latc" || die "not installing binaries that would not run on bullseye"
fi
install -d "$destdir$prefix"
for b in latd latc; do
    install -m 0755 "$from/$b" "$destdir$prefix/$b"
    echo "installed $destdir$prefix/$b"
done
