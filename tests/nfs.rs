//! The real-NFS suite: latd and its clients on a real kernel NFS server,
//! as separate NFS client hosts, in a virtual machine.
//!
//! `real_nfs` boots a kernel in qemu (`tests/nfs/vm.sh`: plain emulation,
//! no KVM needed) and runs `guest_suite` of this same test binary inside
//! it. There `tests/nfs/nfs-up.sh` starts the kernel NFS server (its
//! default lease and grace times, 90 s, as deployed) and mounts the export
//! as several NFSv4 client hosts, each with `/localdisk` in its own mount
//! and UTS namespaces:
//!
//! | host | address | options | plays |
//! |---|---|---|---|
//! | a | 127.0.0.1 | nosharecache | the LAT container: latd, as root |
//! | b | 127.0.0.2 | nosharecache (defaults) | the builder: latc and original clients, as uid 1000 |
//! | s | 127.0.0.1 | nosharecache,lookupcache=positive | a second mount through host a's NFS client (one lease, shared delegations), as two containers on one node |
//! | p | 127.0.0.3 | lookupcache=positive | a builder mounted as recommended for original clients |
//! | c | 127.0.0.4 | actimeo=30 | a builder with a long attribute cache |
//!
//! Everything in the VM is many times slower than here: the scenarios judge
//! behaviour, never speed. Prints `SKIPPED real_nfs: <why>` where no VM can
//! boot. Figures (round trips, RPC counts) go to stderr and to
//! `target/tmp/nfs-vm-*/figures.txt`.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const GUEST: &str = "LATD_NFS_GUEST";
/// The build user on the client side.
const UID: &str = "1000";
/// The export, seen by the server alone (no client cache in between).
const EXPORT: &str = "/mnt/export";
const CHANNEL: &str = "/localdisk/channel";

fn manifest(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn real_nfs() {
    if std::env::var_os(GUEST).is_some() {
        return; // inside the VM: guest_suite is the one that runs
    }
    let out =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("nfs-vm-{}", std::process::id()));
    let _ = fs::remove_dir_all(&out);
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let o = Command::new(manifest("tests/nfs/vm.sh"))
        .arg(&out)
        .arg("env")
        .arg(format!("{GUEST}={}", out.display()))
        .arg("RUST_BACKTRACE=1")
        .arg(&exe)
        .args([
            "--ignored",
            "--exact",
            "guest_suite",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VM_TIMEOUT", "1200")
        .env("VM_MEM", "1536")
        .stdin(Stdio::null())
        .output()
        .expect("run tests/nfs/vm.sh");
    let err = stderr(&o);
    if o.status.code() == Some(77) {
        let why = err
            .lines()
            .find_map(|l| l.strip_prefix("cannot boot: "))
            .unwrap_or("the VM cannot boot here");
        skipped(&format!("real_nfs: {why}"));
        return;
    }
    let log = fs::read_to_string(out.join("guest.log")).unwrap_or_default();
    eprintln!(
        "---- guest (VM run took {:.0} s) ----\n{log}\n---- end of guest ----",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "the real-NFS suite failed in the VM: {err}; console: {}",
        fs::read_to_string(out.join("console.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let _ = fs::remove_dir_all(&out);
}

/// Everything the scenarios share inside the VM.
struct Guest {
    out: PathBuf,
    latd: Mutex<Option<Child>>,
    figures: Mutex<Vec<String>>,
    started: Instant,
}

fn ns(host: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--mount=/run/ns/mnt-{host}"))
        .arg(format!("--uts=/run/ns/uts-{host}"))
        .arg("--")
        .env_remove("RUST_LOG")
        .env_remove("LAT_CHANNEL_DIR")
        .env("WORKSPACE_DIR", "/localdisk")
        .stdin(Stdio::null());
    c
}

/// A command run on `host` as the build user.
fn user(host: &str, program: &str) -> Command {
    let mut c = ns(host);
    c.args([
        "setpriv",
        &format!("--reuid={UID}"),
        &format!("--regid={UID}"),
        "--clear-groups",
        "--",
        program,
    ]);
    c
}

fn latc(host: &str, args: &[&str]) -> Output {
    user(host, LATC).args(args).output().expect("latc")
}

fn must(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// The original latc's way: fixed names, stat once a second, `cat`.
fn original(host: &str, args: &[&str]) -> (Output, f64) {
    let o = user(host, "python3")
        .arg(manifest("tests/clients/original_latc.py"))
        .args(["--channel", CHANNEL, "--timeout", "120"])
        .args(args)
        .output()
        .expect("python3");
    let rt = stderr(&o)
        .lines()
        .find_map(|l| l.strip_prefix("original_latc: round trip "))
        .and_then(|l| l.trim_end_matches(" s").parse().ok())
        .unwrap_or(f64::NAN);
    (o, rt)
}

fn server(rel: &str) -> PathBuf {
    Path::new(EXPORT).join(rel)
}

fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

impl Guest {
    fn note(&self, line: String) {
        eprintln!("[{:6.1} s] {line}", self.started.elapsed().as_secs_f64());
        self.figures.lock().unwrap().push(line);
    }

    fn start_latd(&self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.out.join("latd.log"))
            .unwrap();
        let child = ns("a")
            .arg(LATD)
            .args([
                "--sdk",
                &sdk_dir().display().to_string(),
                "--grace",
                "3",
                "-d",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start latd");
        *self.latd.lock().unwrap() = Some(child);
    }

    fn latd_pid(&self) -> i32 {
        self.latd.lock().unwrap().as_ref().expect("latd runs").id() as i32
    }

    fn signal_latd(&self, sig: i32) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(self.latd_pid(), sig) };
    }

    /// Waits for latd to exit; its exit code.
    fn wait_latd(&self, within: Duration) -> Option<i32> {
        let mut child = self.latd.lock().unwrap().take().expect("latd runs");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!("latd did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Until `latc health` on host b says latd serves; seconds taken.
    fn wait_serving(&self, within: Duration) -> f64 {
        let t = Instant::now();
        wait_until(within, "latd to serve (latc health on host b)", || {
            let ok = latc("b", &["health"]).status.success();
            if !ok {
                std::thread::sleep(Duration::from_millis(500));
            }
            ok
        });
        t.elapsed().as_secs_f64()
    }

    fn wait_state(&self, host: &str, state: &str, within: Duration) {
        wait_until(within, &format!("state {state}"), || {
            let o = latc(host, &["status", "--json"]);
            o.status.success()
                && serde_json::from_slice::<serde_json::Value>(&o.stdout)
                    .is_ok_and(|v| v["state"] == state)
        });
    }
}

/// The client's RPC counts by operation, for the mount on /localdisk seen
/// by process `pid` (`/proc/<pid>/mountstats`).
fn rpc_counts(pid: i32) -> BTreeMap<String, u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/mountstats")).unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut in_mount = false;
    let mut in_ops = false;
    for line in text.lines() {
        if line.starts_with("device ") {
            in_mount = line.contains(" mounted on /localdisk with fstype nfs");
            in_ops = false;
            continue;
        }
        if !in_mount {
            continue;
        }
        if line.trim() == "per-op statistics" {
            in_ops = true;
            continue;
        }
        if in_ops {
            if let Some((op, rest)) = line.trim().split_once(':') {
                if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                    out.insert(op.to_string(), n);
                }
            }
        }
    }
    out
}

/// A long-lived process on `host` whose mountstats show that host's
/// client (the counts are per mount, whoever causes them).
fn watcher(host: &str) -> Child {
    ns(host).args(["sleep", "3600"]).spawn().expect("sleep")
}

/// RPCs per second over `secs` on the watched host, while `during` runs;
/// with the three busiest operations.
fn rpc_rate(pid: i32, secs: f64, during: impl FnOnce()) -> (f64, String) {
    let before = rpc_counts(pid);
    let t = Instant::now();
    during();
    let left = Duration::from_secs_f64(secs).saturating_sub(t.elapsed());
    std::thread::sleep(left);
    let took = t.elapsed().as_secs_f64();
    let after = rpc_counts(pid);
    let mut diff: Vec<(String, u64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect();
    let total: u64 = diff.iter().map(|(_, d)| d).sum();
    diff.sort_by_key(|d| std::cmp::Reverse(d.1));
    let top = diff
        .iter()
        .take(4)
        .map(|(k, d)| format!("{k} {:.1}", *d as f64 / took))
        .collect::<Vec<_>>()
        .join(", ");
    (total as f64 / took, top)
}

// ---------------------------------------------------------------------
// The scenarios, in order (one VM, one NFS server, one latd at a time).
// ---------------------------------------------------------------------

type Scenario = fn(&Guest);

const SCENARIOS: &[(&str, Scenario)] = &[
    (
        "every latc command, from another host, as the build user",
        latc_commands,
    ),
    ("the protocol-document client", protocol_client_on_nfs),
    (
        "original latc: idle, during a build, after its own build",
        original_clients,
    ),
    (
        "heartbeat through a 30 s attribute cache; a hung latd",
        heartbeat,
    ),
    (
        "latd restarted: SIGTERM, then SIGKILL during a build",
        restarts,
    ),
    ("what latd costs the NFS server", nfs_cost),
];

fn latc_commands(g: &Guest) {
    let status = must(latc("b", &["status"]), "latc status");
    assert!(status.contains("lat_status: idle"), "{status}");
    must(latc("b", &["health"]), "latc health");
    let y = must(latc("b", &["getyaml"]), "latc getyaml");
    assert!(!y.trim().is_empty(), "getyaml printed nothing");
    fs::write(
        server("quick.yaml"),
        "name: t\nimage_type: [iso]\nstandin_duration: 3\nstandin_log_lines: 3\n",
    )
    .unwrap();
    fs::write(
        server("long.yaml"),
        "name: t\nimage_type: [iso]\nstandin_duration: 600\n",
    )
    .unwrap();
    let t = Instant::now();
    let o = latc("b", &["build", "--file", "/localdisk/quick.yaml", "--wait"]);
    must(o, "latc build --wait");
    g.note(format!(
        "latc build --wait of a 3 s build: {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let h = must(latc("b", &["history"]), "latc history");
    assert!(h.contains("succeed"), "history: {h}");
    let l = must(latc("b", &["logs"]), "latc logs");
    assert!(l.contains("Deploy ovmf.qcow2"), "logs: {l}");
    must(
        latc("b", &["build", "--file", "/localdisk/long.yaml"]),
        "latc build",
    );
    let s = must(latc("b", &["status"]), "latc status (busy)");
    assert!(s.contains("lat_status: busy"), "{s}");
    let t = Instant::now();
    must(latc("b", &["stop"]), "latc stop");
    g.note(format!("latc stop: {:.1} s", t.elapsed().as_secs_f64()));
    let s = must(latc("b", &["status"]), "latc status after stop");
    assert!(s.contains("lat_status: idle"), "{s}");
    let w = latc("b", &["wait"]);
    assert!(w.status.code().is_some(), "latc wait: {}", stderr(&w));
    must(latc("b", &["clean"]), "latc clean");
    assert!(!server("log").exists(), "clean left log/ behind");
    let j = must(latc("b", &["status", "--json"]), "latc status --json");
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(v["state"], "idle");
}

fn protocol_client_on_nfs(g: &Guest) {
    let run = |host: &str, args: &[&str]| -> serde_json::Value {
        let t = Instant::now();
        let o = user(host, "python3")
            .arg(manifest("tests/clients/protocol_client.py"))
            .args(["--channel", CHANNEL, "--timeout", "120"])
            .args(args)
            .output()
            .expect("python3");
        let v = must(o, &format!("protocol client {args:?} on {host}"));
        g.note(format!(
            "protocol client {} on host {host}: {:.1} s",
            args[1],
            t.elapsed().as_secs_f64()
        ));
        serde_json::from_str(&v).unwrap()
    };
    let r = run("p", &["--action", "status"]);
    assert_eq!(r["result"], "succeed");
    assert!(r["file_content"]
        .as_str()
        .unwrap_or("")
        .contains("lat_status: idle"));
    let r = run("p", &["--action", "getyaml"]);
    assert_eq!(r["result"], "succeed", "{r}");
    let r = run(
        "p",
        &["--action", "build", "--yaml-file", "/localdisk/quick.yaml"],
    );
    assert_eq!(r["result"], "succeed", "{r}");
    g.wait_state("p", "idle", Duration::from_secs(120));
    let r = run("p", &["--action", "logs"]);
    assert_eq!(r["result"], "succeed", "{r}");
    let r = run("p", &["--action", "clean"]);
    assert_eq!(r["result"], "succeed", "{r}");
}

fn original_clients(g: &Guest) {
    let mut trips: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut stale_on_s = 0;
    let mut status = |host: &str, phase: &str, want: &str| {
        let (o, rt) = original(host, &["status"]);
        let out = stdout(&o);
        // Host s is a second mount through host a's own NFS client: the
        // server lets that client keep a read delegation on status.lat
        // while the same client writes it through the other mount, so s
        // may read an older status from its cache (a Linux NFS client
        // limitation, see the README). It must never fail to read it.
        let stale_ok = host == "s" && out.contains("lat_status: ");
        if !o.status.success() || !(out.contains(want) || stale_ok) {
            failures.push(format!(
                "host {host}, {phase}: exit {:?}, {}{}",
                o.status.code(),
                out.lines().next().unwrap_or(""),
                stderr(&o)
                    .lines()
                    .filter(|l| !l.starts_with("reply: "))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        } else if !out.contains(want) {
            stale_on_s += 1;
        }
        trips.entry(format!("host {host}")).or_default().push(rt);
    };
    for host in ["p", "s", "p", "s"] {
        status(host, "idle", "lat_status: idle");
    }
    must(
        latc("b", &["build", "--file", "/localdisk/long.yaml"]),
        "latc build",
    );
    for host in ["s", "p", "s"] {
        status(host, "while a build runs", "lat_status: busy");
    }
    must(latc("b", &["stop"]), "latc stop");
    for host in ["s", "p"] {
        status(host, "idle after a build", "lat_status: idle");
    }
    // A build it asked for itself, then its statuses.
    let (o, _) = original("s", &["build", "--yaml-file", "/localdisk/long.yaml"]);
    assert!(
        stderr(&o).contains("result: succeed"),
        "original build: {}",
        stderr(&o)
    );
    for host in ["s", "p", "s"] {
        status(host, "after its own build", "lat_status: busy");
    }
    let (o, _) = original("p", &["stop"]);
    assert!(stderr(&o).contains("result: succeed"), "{}", stderr(&o));
    status("s", "after its own stop", "lat_status: idle");
    // One with the default mount options (round trip up to acdirmin).
    status("b", "idle, default mount options", "lat_status: idle");
    g.note(format!(
        "original latc on host s (a second mount through latd's own NFS client): {stale_on_s} of {} statuses read an older status.lat",
        trips.get("host s").map_or(0, Vec::len)
    ));
    for (host, v) in &trips {
        let mut s = v.clone();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        g.note(format!(
            "original latc status round trip, {host}: {} requests, median {:.1} s, max {:.1} s",
            s.len(),
            s[s.len() / 2],
            s[s.len() - 1]
        ));
    }
    assert!(
        failures.is_empty(),
        "original latc failed:\n{}",
        failures.join("\n")
    );
}

fn heartbeat(g: &Guest) {
    // Host c caches attributes for 30 s: the heartbeat's mtime as seen by
    // a stat there is up to 30 s old, though latd beats every 2 s.
    for i in 0..4 {
        let o = latc("c", &["status"]);
        assert!(
            o.status.success(),
            "latc status on host c ({i}): {}",
            stderr(&o)
        );
        std::thread::sleep(Duration::from_secs(6));
    }
    g.note("latc status through actimeo=30: 4 of 4 answered over 24 s".into());
    // A hung latd (stopped: it still holds its lock) is noticed by the
    // heartbeat alone, long before latc's 60 s timeout.
    g.signal_latd(libc::SIGSTOP);
    let t = Instant::now();
    let o = latc("c", &["status"]);
    let took = t.elapsed().as_secs_f64();
    g.signal_latd(libc::SIGCONT);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("not responding"), "{}", stderr(&o));
    assert!(took < 50.0, "took {took:.0} s");
    g.note(format!(
        "a stopped latd: latc status on host c says so in {took:.1} s"
    ));
    wait_until(Duration::from_secs(60), "latd to answer again", || {
        latc("c", &["health"]).status.success()
    });
}

fn restarts(g: &Guest) {
    g.signal_latd(libc::SIGTERM);
    assert_eq!(g.wait_latd(Duration::from_secs(60)), Some(0));
    let t = Instant::now();
    let o = latc("b", &["status"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    g.note(format!(
        "latd stopped: latc status on host b says so in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        stderr(&o).lines().next().unwrap_or("")
    ));
    g.start_latd();
    let s = g.wait_serving(Duration::from_secs(150));
    g.note(format!("latd restarted: serving after {s:.1} s"));
    must(
        latc("b", &["build", "--file", "/localdisk/long.yaml"]),
        "latc build",
    );
    wait_until(Duration::from_secs(60), "the build's workers", || {
        fs::read_to_string(server("log/log.appsdk"))
            .unwrap_or_default()
            .contains("worker")
    });
    g.signal_latd(libc::SIGKILL);
    let _ = g.wait_latd(Duration::from_secs(30));
    g.start_latd();
    let s = g.wait_serving(Duration::from_secs(150));
    g.note(format!(
        "latd restarted after SIGKILL: serving after {s:.1} s"
    ));
    let h = must(latc("b", &["history"]), "latc history");
    assert!(h.contains("interrupted"), "history: {h}");
    let st = must(latc("b", &["status"]), "latc status");
    assert!(st.contains("lat_status: idle"), "{st}");
    let left: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("appsdk"))
        .collect();
    assert!(left.is_empty(), "build processes left: {left:?}");
}

fn nfs_cost(g: &Guest) {
    let secs = 10.0;
    let mut wa = watcher("a");
    let mut wb = watcher("b");
    let (a_pid, b_pid) = (wa.id() as i32, wb.id() as i32);
    std::thread::sleep(Duration::from_secs(3));
    let (rest, top) = rpc_rate(a_pid, secs, || {});
    g.note(format!("NFS cost, latd at rest: {rest:.1} RPC/s ({top})"));
    must(
        latc("b", &["build", "--file", "/localdisk/long.yaml"]),
        "latc build",
    );
    std::thread::sleep(Duration::from_secs(2));
    let (build, top) = rpc_rate(a_pid, secs, || {});
    g.note(format!(
        "NFS cost, latd during a build: {build:.1} RPC/s ({top})"
    ));
    must(latc("b", &["stop"]), "latc stop");
    std::thread::sleep(Duration::from_secs(3));
    // The deployed caller: latc status once a second, from host b.
    let b_before = rpc_counts(b_pid);
    let (under, top) = rpc_rate(a_pid, secs, || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs_f64(secs - 1.0) {
            let s = Instant::now();
            let _ = latc("b", &["status"]);
            std::thread::sleep(Duration::from_secs(1).saturating_sub(s.elapsed()));
        }
    });
    let b_after = rpc_counts(b_pid);
    let b_total: u64 = b_after
        .iter()
        .map(|(k, v)| v - b_before.get(k).copied().unwrap_or(0))
        .sum();
    g.note(format!(
        "NFS cost, latd under latc status once a second: {under:.1} RPC/s ({top}); latc on host b: {:.1} RPC/s",
        b_total as f64 / secs
    ));
    // The original daemon's loop: stat c-2-s.done every 100 ms (Python),
    // on host a with latd stopped.
    g.signal_latd(libc::SIGTERM);
    assert_eq!(g.wait_latd(Duration::from_secs(60)), Some(0));
    let mut py = ns("a")
        .args([
            "python3",
            "-c",
            "import os,time\nwhile True:\n    os.path.exists('/localdisk/channel/c-2-s.done')\n    time.sleep(0.1)\n",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (orig, top) = rpc_rate(a_pid, secs, || {});
    let _ = py.kill();
    let _ = py.wait();
    g.note(format!(
        "NFS cost, the original daemon's loop (Python, stat every 100 ms): {orig:.1} RPC/s ({top})"
    ));
    g.start_latd();
    g.wait_serving(Duration::from_secs(150));
    // The original client's status once a second (each waits for its
    // reply, a second at least), from host p (lookupcache=positive),
    // beside latc's from host b above.
    let mut wp = watcher("p");
    let p_pid = wp.id() as i32;
    std::thread::sleep(Duration::from_secs(1));
    let (orig_client, top) = rpc_rate(p_pid, secs, || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs_f64(secs - 2.0) {
            let (o, _) = original("p", &["status"]);
            assert!(o.status.success(), "{}", stderr(&o));
        }
    });
    g.note(format!(
        "NFS cost, original latc status back to back from host p: {orig_client:.1} RPC/s on host p ({top})"
    ));
    for w in [&mut wa, &mut wb, &mut wp] {
        let _ = w.kill();
        let _ = w.wait();
    }
}

#[test]
#[ignore = "runs inside the VM that real_nfs boots"]
fn guest_suite() {
    let Some(out) = std::env::var_os(GUEST) else {
        skipped("guest_suite: runs only inside the VM that real_nfs boots");
        return;
    };
    let g = Guest {
        out: PathBuf::from(out),
        latd: Mutex::new(None),
        figures: Mutex::new(Vec::new()),
        started: Instant::now(),
    };
    let up = Command::new("sh")
        .arg(manifest("tests/nfs/nfs-up.sh"))
        .args([
            "default",
            "default",
            "a:127.0.0.1:nosharecache",
            "b:127.0.0.2:nosharecache",
            "s:127.0.0.1:nosharecache,lookupcache=positive",
            "p:127.0.0.3:lookupcache=positive",
            "c:127.0.0.4:actimeo=30",
        ])
        .output()
        .unwrap();
    eprint!("{}{}", stdout(&up), stderr(&up));
    assert!(up.status.success(), "nfs-up.sh failed");
    let server_up = uptime();
    // The workspace belongs to the build user, as on the build machine.
    fs::create_dir_all(server("channel")).unwrap();
    for p in [server(""), server("channel")] {
        std::os::unix::fs::chown(&p, Some(1000), Some(1000)).unwrap();
    }
    // latd starts while the server is in its grace period (it holds locks
    // back for up to 90 s after it starts, as after a server reboot).
    g.start_latd();
    std::thread::sleep(Duration::from_secs(3));
    let early = latc("b", &["status"]);
    g.note(format!(
        "latc status while latd waits for its lock: exit {:?}: {}",
        early.status.code(),
        stderr(&early).lines().next().unwrap_or("")
    ));
    let s = g.wait_serving(Duration::from_secs(240));
    g.note(format!(
        "latd started {:.0} s after the NFS server: serving after {s:.1} s",
        uptime() - server_up - s
    ));

    let mut failed = Vec::new();
    for (name, f) in SCENARIOS {
        let t = Instant::now();
        eprintln!("==== {name}");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&g)));
        let took = t.elapsed().as_secs_f64();
        match r {
            Ok(()) => eprintln!("==== ok ({took:.0} s): {name}"),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("==== FAILED ({took:.0} s): {name}: {msg}");
                failed.push(format!("{name}: {msg}"));
            }
        }
        // Whatever a scenario left, the next one gets a serving latd.
        let running = g
            .latd
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none());
        if !running {
            g.latd.lock().unwrap().take();
            g.start_latd();
            g.wait_serving(Duration::from_secs(150));
        }
    }
    let figures = g.figures.lock().unwrap().join("\n");
    eprintln!("==== figures\n{figures}");
    let _ = fs::write(g.out.join("figures.txt"), format!("{figures}\n"));
    let delegations = fs::read_dir("/proc/fs/nfsd/clients")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|c| fs::read_to_string(c.path().join("states")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("type: deleg"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    eprintln!(
        "==== delegations held at the end\n{}",
        delegations.join("\n")
    );
    if let Some(mut c) = g.latd.lock().unwrap().take() {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
    }
    if !failed.is_empty() {
        let log = fs::read_to_string(g.out.join("latd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!(
            "==== latd's log (last lines)\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    assert!(failed.is_empty(), "failed:\n{}", failed.join("\n"));
}
