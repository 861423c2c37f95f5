#!/bin/sh
# Inside the VM (see vm.sh): what latd and its clients cost a real NFS
# server, as RPCs per second that the NFS client sends (the per-operation
# counts of /proc/<pid>/mountstats for the mount on /localdisk). Used by
# the benchmark (tests/bench.rs --full).
#
#   cost.sh REPO LATD LATC OUTDIR [SECONDS]
#
# Writes OUTDIR/cost.txt, one "name value top-operations" line each:
#   rest     latd idle (nothing asks it anything)
#   build    latd while a build runs
#   status   latd while host b runs `latc status` once a second
#   status_b host b's own cost for that
#   orig_daemon  the original daemon's loop: stat c-2-s.done every 100 ms (Python)
#   orig_client  the original latc's status, back to back, on host p
set -u
repo=$1 latd=$2 latc=$3 out=$4 secs=${5:-10}
sdk=$repo/tests/sdk
# The server's default lease (renewals are RPCs too); a short grace, which
# only delays the start.
sh "$repo/tests/nfs/nfs-up.sh" default 15 a:127.0.0.1:nosharecache \
    b:127.0.0.2:nosharecache p:127.0.0.3:lookupcache=positive >/dev/null || exit 1
# (Processes whose pid matters are started with nsenter itself, not through
# this function: $! of a backgrounded function is a subshell's.)
on() { h=$1; shift; nsenter --mount=/run/ns/mnt-$h --uts=/run/ns/uts-$h "$@"; }
as_user() { h=$1; shift; on "$h" setpriv --reuid=1000 --regid=1000 --clear-groups env WORKSPACE_DIR=/localdisk "$@"; }
mkdir -p /mnt/export/channel
chown 1000:1000 /mnt/export /mnt/export/channel
printf 'name: t\nimage_type: [iso]\nstandin_duration: 600\n' >/mnt/export/long.yaml

# Sum of the per-operation counts, and "OP count" lines, for /localdisk.
counts() {
    awk '/^device /{m = ($0 ~ / mounted on \/localdisk with fstype nfs/); o = 0; next}
         m && /per-op statistics/ {o = 1; next}
         m && o && NF > 1 {sub(":", "", $1); print $1, $2}' "/proc/$1/mountstats"
}
# rate NAME PID: RPCs/s of PID's mount over the seconds since `mark PID`.
mark() { counts "$1" >"$out/before.$1"; start=$(date +%s.%N); }
rate() {
    counts "$2" >"$out/after.$2"
    awk -v name="$1" -v t0="$start" -v t1="$(date +%s.%N)" '
        NR == FNR {b[$1] = $2; next}
        {d = $2 - b[$1]; if (d > 0) {tot += d; op[$1] = d}}
        END {
            s = t1 - t0; top = "";
            for (n = 0; n < 4; n++) {
                best = ""; for (k in op) if (best == "" || op[k] > op[best]) best = k;
                if (best == "") break;
                top = top (top == "" ? "" : ", ") best " " sprintf("%.1f", op[best] / s);
                delete op[best]
            }
            printf "%s %.2f %s\n", name, tot / s, top
        }' "$out/before.$2" "$out/after.$2" >>"$out/cost.txt"
}
wait_for() { # what command...
    what=$1; shift
    i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -le 300 ] || { echo "cost.sh: no $what" >&2; exit 1; }
        sleep 1
    done
}

: >"$out/cost.txt"
nsenter --mount=/run/ns/mnt-a sleep 3600 & wa=$!
nsenter --mount=/run/ns/mnt-b sleep 3600 & wb=$!
nsenter --mount=/run/ns/mnt-p sleep 3600 & wp=$!
nsenter --mount=/run/ns/mnt-a --uts=/run/ns/uts-a "$latd" --sdk "$sdk" --grace 3 -q >"$out/latd.log" 2>&1 & latd_pid=$!
wait_for "serving latd" as_user b "$latc" health
sleep 4
mark $wa; sleep "$secs"; rate rest $wa
as_user b "$latc" build --file /localdisk/long.yaml >/dev/null
sleep 2
mark $wa; sleep "$secs"; rate build $wa
as_user b "$latc" stop >/dev/null
sleep 3
counts $wb >"$out/before.$wb"
mark $wa
i=0
while [ $i -lt "$secs" ]; do
    as_user b "$latc" status >/dev/null
    sleep 1
    i=$((i + 1))
done
rate status $wa
rate status_b $wb
kill "$latd_pid"
wait "$latd_pid"
nsenter --mount=/run/ns/mnt-a python3 -c "import os,time
while True:
    os.path.exists('/localdisk/channel/c-2-s.done')
    time.sleep(0.1)" &
py=$!
sleep 2
mark $wa; sleep "$secs"; rate orig_daemon $wa
kill $py
nsenter --mount=/run/ns/mnt-a --uts=/run/ns/uts-a "$latd" --sdk "$sdk" --grace 3 -q >>"$out/latd.log" 2>&1 & latd_pid=$!
wait_for "serving latd" as_user b "$latc" health
sleep 3
mark $wp
end=$(($(date +%s) + secs))
while [ "$(date +%s)" -lt "$end" ]; do
    as_user p python3 "$repo/tests/clients/original_latc.py" --channel /localdisk/channel status >/dev/null 2>&1
done
rate orig_client $wp
kill "$latd_pid" $wa $wb $wp 2>/dev/null
wait 2>/dev/null
cat "$out/cost.txt"
