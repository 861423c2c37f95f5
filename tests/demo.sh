#!/usr/bin/env bash
# A demo build end to end: latd and latc (release builds) on the stand-in
# SDK, in a temporary workspace that is removed afterwards. Needs no root
# and touches nothing outside that directory.
#
#   bash tests/demo.sh            # keep the workspace with KEEP=1
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
echo "demo: compiling latd and latc in release mode (cargo build --release);"
echo "demo: the first time this takes a few minutes, with nothing else shown"
cargo build --release --quiet --bin latd --bin latc
echo "demo: compiled; starting latd on a temporary workspace"
bin="$repo/target/release"

demo=$(mktemp -d "${TMPDIR:-/tmp}/latd-demo.XXXXXX")
export WORKSPACE_DIR="$demo/workspace"   # both sides agree on it
export LAT_SDK_DIR="$repo/tests/sdk"     # the stand-in SDK
mkdir -p "$WORKSPACE_DIR"
cp tests/sdk/demo.yaml "$WORKSPACE_DIR/lat.yaml"

"$bin/latd" --grace 5 2> "$demo/latd.log" &
latd_pid=$!
cleanup() {
    kill -TERM "$latd_pid" 2>/dev/null && wait "$latd_pid" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $demo"; else rm -rf "$demo"; fi
}
trap cleanup EXIT
until "$bin/latc" health; do sleep 0.05; done

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
step latc status;                         "$bin/latc" status
step latc getyaml "| head -4";            "$bin/latc" getyaml > "$demo/example.yaml"; head -4 "$demo/example.yaml"
step latc build --file lat.yaml --wait;   "$bin/latc" build --file "$WORKSPACE_DIR/lat.yaml" --wait
step latc status --json;                  "$bin/latc" status --json
step ls deploy;                           ls -l "$WORKSPACE_DIR/deploy"
step "build-image's dialogue: latc --file=lat.yaml build, wait for the log, tail -f to the success line, latc stop"
LAT_ROOT="$WORKSPACE_DIR" BASE_YAML=tests/sdk/demo.yaml LATC="$bin/latc" \
    python3 tests/clients/build_image.py | grep -v '^appsdk - ' || true
step "ls deploy   # complete: the stop let the SDK finish after its success line"
ls -l "$WORKSPACE_DIR/deploy"
step "latc --file=lat.yaml build; sleep 1; latc stop   # a stop mid-build"
"$bin/latc" --file="$WORKSPACE_DIR/lat.yaml" build; sleep 1; "$bin/latc" stop
step latc history;                        "$bin/latc" history
step latc clean;                          "$bin/latc" clean
printf '\nlatd log:\n'; sed 's/^/  /' "$demo/latd.log"
