//! The channel's lock on real NFS (a kernel NFS server in a virtual
//! machine, two NFSv4 clients on two addresses, as two hosts; see
//! `tests/nfs/vm.sh`): latd started as the server starts says that it waits
//! for the lock through the server's grace period, and latc on the other
//! host says so too, instead of "not running"; then latd serves. A second
//! latd on the other host waits as a standby for the first one's lock and
//! takes over when the first is asked to exit. Skipped, saying so, where
//! this machine cannot boot a VM.

mod common;
use common::*;
use std::fs;
use std::process::Command;

/// Inside the VM: the server with a 15 s grace period, hosts a and b.
const GUEST: &str = r#"
set -u
here=$1 latd=$2 latc=$3 sdk=$4 out=$5
sh "$here/tests/nfs/nfs-up.sh" 10 15 a:127.0.0.1:vers=4.2,hard b:127.0.0.2:vers=4.2,hard || exit 1
on() { h=$1; shift; nsenter --mount=/run/ns/mnt-$h --uts=/run/ns/uts-$h "$@"; }
waitlog() { # FILE TEXT SECONDS
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ $i -le $(($3 * 10)) ] || return 1
        sleep 0.1
    done
}
t0=$(date +%s)
on a sh -c "exec '$latd' --sdk '$sdk' >'$out/latd-a.log' 2>&1" &
waitlog "$out/latd-a.log" "latd is waiting for the lock" 30 || echo "RESULT no-wait-said"
on b "$latc" status >"$out/latc-b-waiting.out" 2>&1
echo "RESULT latc-during-grace=$?"
waitlog "$out/latd-a.log" "serving channel" 150 || echo "RESULT a-never-served"
echo "RESULT a-served-after=$(( $(date +%s) - t0 ))"
on b "$latc" status >"$out/latc-b-served.out" 2>&1
echo "RESULT latc-after-grace=$?"
on b sh -c "exec '$latd' --sdk '$sdk' >'$out/latd-b.log' 2>&1" &
waitlog "$out/latd-b.log" "waiting for the lock held by another latd" 30 || echo "RESULT b-no-standby"
on b cat /localdisk/channel/latd.standby >"$out/standby.out" 2>&1
t1=$(date +%s)
pkill -TERM -o -f "$latd --sdk"
waitlog "$out/latd-b.log" "serving channel" 60 || echo "RESULT b-never-served"
echo "RESULT b-served-after=$(( $(date +%s) - t1 ))"
pkill -KILL -f "$latd --sdk"
exit 0
"#;

#[test]
fn on_nfs_latd_says_it_waits_for_the_lock_and_a_standby_takes_over() {
    let test = "on_nfs_latd_says_it_waits_for_the_lock_and_a_standby_takes_over";
    if skip_unless_root(test) {
        return;
    }
    let env = TestEnv::new("nfslock");
    // vm.sh wants a plain path for the directory it shares with the guest.
    let out = env.root.join("vm");
    fs::create_dir_all(&out).unwrap();
    let script = out.join("guest.sh");
    fs::write(&script, GUEST).unwrap();
    let here = env!("CARGO_MANIFEST_DIR");
    let o = Command::new("sh")
        .arg(format!("{here}/tests/nfs/vm.sh"))
        .arg(&out)
        .args(["sh", script.to_str().unwrap(), here, LATD, LATC])
        .arg(sdk_dir())
        .arg(&out)
        .env("VM_TIMEOUT", "400")
        .output()
        .unwrap();
    if o.status.code() == Some(77) {
        skipped(&format!("{test}: {}", stderr(&o).trim()));
        return;
    }
    let guest = fs::read_to_string(out.join("guest.log")).unwrap_or_default();
    let read = |n: &str| fs::read_to_string(out.join(n)).unwrap_or_default();
    let all = format!(
        "{guest}\n--- latd a:\n{}\n--- latd b:\n{}",
        read("latd-a.log"),
        read("latd-b.log")
    );
    assert!(o.status.success(), "vm.sh: {}\n{all}", stderr(&o));
    assert!(!guest.contains("RESULT no-wait-said"), "{all}");
    assert!(!guest.contains("RESULT a-never-served"), "{all}");
    assert!(!guest.contains("RESULT b-no-standby"), "{all}");
    assert!(!guest.contains("RESULT b-never-served"), "{all}");
    // During the grace period latd says what it waits for, in its log and
    // to a client on the other host.
    let a = read("latd-a.log");
    assert!(a.contains("the filesystem has not answered"), "{all}");
    assert!(guest.contains("RESULT latc-during-grace=3"), "{all}");
    let waiting = read("latc-b-waiting.out");
    assert!(
        waiting.contains("is waiting for the lock"),
        "{waiting}\n{all}"
    );
    assert!(guest.contains("RESULT latc-after-grace=0"), "{all}");
    // The standby on host b names the latd it waits for.
    let standby = read("standby.out");
    assert!(
        standby.contains("waiting_for: the lock held by another latd"),
        "{standby}"
    );
    for line in guest.lines().filter(|l| l.contains("served-after")) {
        eprintln!("{line}");
    }
}
