//! A hostile or careless client: what it can put in the channel must never
//! kill latd, blind it, or make it run out of memory or descriptors. Each
//! test runs the real latd under a memory limit (its address space, set
//! with setrlimit before exec) and, where it matters, the common limit of
//! 1024 descriptors, so a defect shows as a dead or silent daemon, not as
//! a machine that swaps.
//!
//! Floods are scaled down so the suite stays quick; `LATD_HOSTILE_FULL=1`
//! runs them at the sizes that broke latd before (100k requests, 1M stale
//! replies, 6000 sparse 2 GB requests, 100k unusable directories):
//! `LATD_HOSTILE_FULL=1 cargo test --release --test hostile -- --nocapture`.
//! Each test prints the peak memory latd reached (`hostile: ...`).
//!
//! `LATD_HOSTILE_BIN=/path/to/latd` runs the tests against another latd
//! binary (an older build, to see them fail).

mod common;
use common::*;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// latd's address space in these tests. Idle, latd uses about 6 MB; the
/// bound it keeps under every flood here is far lower than this.
const MEMORY_LIMIT: u64 = 256 << 20;
/// Descriptors latd may hold, as in many containers.
const NOFILE_LIMIT: u64 = 1024;
/// Far above what any of these needs: the machine may be loaded.
const WITHIN: Duration = Duration::from_secs(30);

/// The floods would measure each other: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn full() -> bool {
    std::env::var_os("LATD_HOSTILE_FULL").is_some_and(|v| v == "1")
}

/// `small` normally, `full` with `LATD_HOSTILE_FULL=1`.
fn scale(small: usize, full_size: usize) -> usize {
    if full() {
        full_size
    } else {
        small
    }
}

fn latd_bin() -> String {
    std::env::var("LATD_HOSTILE_BIN").unwrap_or_else(|_| LATD.to_string())
}

/// Starts latd on `ws` under [`MEMORY_LIMIT`] and [`NOFILE_LIMIT`], with
/// debug logging, and waits for its heartbeat.
fn start_limited(env: &TestEnv, ws: &Path) -> Daemon {
    start_limited_with(env, ws, &[])
}

/// [`start_limited`] with more arguments for latd.
fn start_limited_with(env: &TestEnv, ws: &Path, extra: &[&str]) -> Daemon {
    let log = fs::File::create(env.root.join(format!(
        "latd-{}.log",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )))
    .unwrap();
    let mut cmd = Command::new(latd_bin());
    cmd.args(["--workspace", ws.to_str().unwrap()])
        .args(["--sdk", sdk_dir().to_str().unwrap()])
        .args(["--grace", "2", "-d"])
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("LAT_CHANNEL_DIR")
        .env_remove("LATD_POLL_MS")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            for (res, lim) in [
                (libc::RLIMIT_AS, MEMORY_LIMIT),
                (libc::RLIMIT_NOFILE, NOFILE_LIMIT),
            ] {
                let r = libc::rlimit {
                    rlim_cur: lim,
                    rlim_max: lim,
                };
                if libc::setrlimit(res, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start latd");
    let channel = ws.join("channel");
    let alive = channel.join("latd.alive");
    let d = Daemon {
        child: Some(child),
        channel,
    };
    let me = format!("pid: {}\n", d.pid());
    wait_until(WITHIN, "latd to come up", || {
        fs::read_to_string(&alive).is_ok_and(|t| t.starts_with(&me))
    });
    d
}

/// Peak resident memory of latd, in kB.
fn peak_kb(d: &Daemon) -> u64 {
    d.status_kb("VmHWM").expect("VmHWM of latd")
}

/// latd is alive, and answers `latc health` and `latc status`.
fn assert_answers(env: &TestEnv, ws: &Path, d: &mut Daemon, after: &str) {
    assert!(
        d.running(),
        "latd died after {after}:\n{}",
        tail(&env.daemon_log())
    );
    let o = env.latc_on(ws, &["health"]);
    assert!(
        o.status.success(),
        "latc health failed after {after}: {}",
        stderr(&o)
    );
    let o = env.latc_on(ws, &["--timeout", "10", "status"]);
    assert!(
        o.status.success() && stdout(&o).contains("lat_status: "),
        "latc status failed after {after}: {}",
        stderr(&o)
    );
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Stops latd (SIGSTOP) until dropped, so that a flood lands in one listing.
struct Paused(i32);

impl Paused {
    fn new(d: &Daemon) -> Paused {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(d.pid(), libc::SIGSTOP) };
        Paused(d.pid())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Puts `req-<id>.yaml` in place the way latc does (temporary name, rename).
fn plant_request(channel: &Path, id: &str, body: &[u8]) {
    let tmp = channel.join(format!(".plant-{id}.tmp"));
    fs::write(&tmp, body).unwrap();
    fs::rename(&tmp, channel.join(format!("req-{id}.yaml"))).unwrap();
}

fn count_prefix(channel: &Path, prefix: &str) -> usize {
    fs::read_dir(channel)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .count()
}

/// Anchors nested `depth` deep, each naming `width` copies of the one
/// below, after `pad` padding entries that lift serde_yaml's own guard (a
/// hundred replays per event of the document).
fn alias_bomb(depth: usize, width: usize, pad: usize) -> String {
    let mut s = String::with_capacity(pad * 2 + 1024);
    s.push_str("pad: [");
    for i in 0..pad {
        s.push_str(if i == 0 { "p" } else { ",p" });
    }
    s.push_str("]\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for d in 1..=depth {
        s.push_str(&format!("l{d}: &l{d} ["));
        for w in 0..width {
            s.push_str(&format!("{}*l{}", if w == 0 { "" } else { ", " }, d - 1));
        }
        s.push_str("]\n");
    }
    s
}

/// A request of a few hundred kilobytes that serde_yaml alone would expand
/// into 10^8 nodes (gigabytes), sent through both request slots.
#[test]
fn an_alias_bomb_request_is_refused_within_a_memory_limit() {
    let _serial = serial();
    let env = TestEnv::new_in_memory("bomb-request");
    let mut d = start_limited(&env, &env.ws);
    let bomb = alias_bomb(7, 10, 120_000) + "action: status\n";
    assert!(bomb.len() < 1 << 20);
    let r = named_exchange(&env.channel, "bomb-1", bomb.as_bytes(), WITHIN).unwrap_or_else(|e| {
        panic!(
            "{e}; latd running: {}\n{}",
            d.running(),
            tail(&env.daemon_log())
        )
    });
    assert_eq!(field(&r, "result").as_deref(), Some("fail"), "{r:?}");
    assert!(
        field(&r, "fail_reason")
            .unwrap_or_default()
            .contains("alias"),
        "{r:?}"
    );
    let r = legacy_exchange(&env.channel, Some(bomb.as_bytes()), WITHIN).unwrap_or_else(|e| {
        panic!(
            "{e}; latd running: {}\n{}",
            d.running(),
            tail(&env.daemon_log())
        )
    });
    assert_eq!(field(&r, "result").as_deref(), Some("fail"), "{r:?}");
    assert_answers(&env, &env.ws, &mut d, "alias bombs");
    let peak = peak_kb(&d);
    eprintln!("hostile: peak RSS after two alias-bomb requests: {peak} kB");
    assert!(peak < 64 << 10, "latd's peak memory is {peak} kB");
}

/// The case: a 0.9 MB image YAML of nested anchors. latd reads it
/// to choose genimage or geninitramfs; it must refuse it, not expand it.
#[test]
fn an_alias_bomb_image_yaml_is_refused_within_a_memory_limit() {
    let _serial = serial();
    let env = TestEnv::new_in_memory("bomb-image");
    let mut d = start_limited(&env, &env.ws);
    let yaml = env.ws.join("bomb.yaml");
    fs::write(&yaml, alias_bomb(7, 10, 400_000) + "image_type: [iso]\n").unwrap();
    assert!(fs::metadata(&yaml).unwrap().len() < 1 << 20);
    let o = env.latc(&["--timeout", "30", "build", "--file", yaml.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "latc build: {}; latd running: {}\n{}",
        stderr(&o),
        d.running(),
        tail(&env.daemon_log())
    );
    assert!(
        stderr(&o).contains("expand into more than"),
        "{}",
        stderr(&o)
    );
    assert_answers(&env, &env.ws, &mut d, "an alias-bomb image YAML");
    let peak = peak_kb(&d);
    eprintln!("hostile: peak RSS after an alias-bomb image YAML: {peak} kB");
    assert!(peak < 64 << 10, "latd's peak memory is {peak} kB");
    // A good YAML builds as before.
    let good = env.yaml("good.yaml", "standin_duration: 0");
    let o = env.latc(&["build", "--wait", "--file", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Sparse 2 GB requests, all in one listing: each is read (at most 1 MiB),
/// answered and dropped before the next, so latd never holds more than one.
#[test]
fn sparse_huge_requests_are_never_held_in_bulk() {
    let _serial = serial();
    let env = TestEnv::new_in_memory("sparse");
    let mut d = start_limited(&env, &env.ws);
    let n = scale(1500, 6000);
    {
        let _p = Paused::new(&d);
        for i in 0..n {
            let tmp = env.channel.join(format!(".sparse-{i}.tmp"));
            fs::File::create(&tmp).unwrap().set_len(2 << 30).unwrap();
            fs::rename(&tmp, env.channel.join(format!("req-sparse-{i}.yaml"))).unwrap();
        }
    }
    let consumed = poll_until(Duration::from_secs(300), || {
        !d.running() || count_prefix(&env.channel, "req-sparse-") == 0
    });
    assert!(
        consumed && d.running(),
        "latd running: {}; {} of {n} sparse requests left\n{}",
        d.running(),
        count_prefix(&env.channel, "req-sparse-"),
        tail(&env.daemon_log())
    );
    assert_answers(&env, &env.ws, &mut d, "sparse requests");
    let peak = peak_kb(&d);
    eprintln!("hostile: peak RSS after {n} sparse 2 GB requests: {peak} kB");
    assert!(peak < 64 << 10, "latd's peak memory is {peak} kB");
}

/// Many small requests at once: latd serves them a batch per tick, so the
/// heartbeat goes on, a new client (`latc health`, `latc status`) is
/// answered at once, no descriptor runs out, and every request is answered.
#[test]
fn a_request_flood_leaves_health_and_status_answered() {
    let _serial = serial();
    let env = TestEnv::new_in_memory("flood");
    let mut d = start_limited(&env, &env.ws);
    let n = scale(20_000, 100_000);
    {
        let _p = Paused::new(&d);
        for i in 0..n {
            plant_request(&env.channel, &format!("flood-{i:06}"), b"action: status\n");
        }
    }
    latd::fsutil::poke(&env.channel.join("latd.wake"));
    // A client that comes once latd has seen the flood (one that comes in
    // the same instant is one of the flood, served in turn).
    wait_until(WITHIN, "latd to start on the flood", || {
        !d.running() || count_prefix(&env.channel, "rep-flood-") > 0
    });
    assert_answers(&env, &env.ws, &mut d, "a flood of requests arrived");
    eprintln!(
        "hostile: health and status answered with {} of {n} flood requests still waiting",
        count_prefix(&env.channel, "req-flood-")
    );
    let done = poll_until(Duration::from_secs(600), || {
        !d.running() || count_prefix(&env.channel, "rep-flood-") == n
    });
    let log = env.daemon_log();
    assert!(
        done && d.running(),
        "{} of {n} answered; latd running: {}\n{}",
        count_prefix(&env.channel, "rep-flood-"),
        d.running(),
        tail(&log)
    );
    assert!(!log.contains("Too many open files"), "{}", tail(&log));
    assert_eq!(count_prefix(&env.channel, "req-flood-"), 0);
    assert_answers(&env, &env.ws, &mut d, "a flood of requests");
    assert!(d.fd_count() < 64, "latd holds {} descriptors", d.fd_count());
    let peak = peak_kb(&d);
    eprintln!("hostile: peak RSS after {n} requests at once: {peak} kB");
    assert!(peak < 64 << 10, "latd's peak memory is {peak} kB");
}

/// Stale replies by the thousand: the sweep goes a slice per tick, so a
/// request waiting at start-up is answered before the sweep is through.
#[test]
fn stale_replies_by_the_thousand_do_not_hold_up_requests() {
    let _serial = serial();
    let env = TestEnv::new_in_memory("stale");
    fs::create_dir_all(&env.channel).unwrap();
    let n = scale(20_000, 1_000_000);
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for i in 0..n {
        let p = env.channel.join(format!("rep-stale-{i}.yaml"));
        let f = fs::File::create(&p).unwrap();
        f.set_modified(hour_ago).unwrap();
    }
    plant_request(&env.channel, "probe", b"action: status\n");
    let mut d = start_limited(&env, &env.ws);
    named_wait(&env.channel, "probe", WITHIN).unwrap_or_else(|e| {
        panic!(
            "{e}; latd running: {}\n{}",
            d.running(),
            tail(&env.daemon_log())
        )
    });
    let swept = poll_until(Duration::from_secs(scale(300, 3600) as u64), || {
        count_prefix(&env.channel, "rep-stale-") == 0
    });
    assert!(
        swept,
        "{} stale replies left",
        count_prefix(&env.channel, "rep-stale-")
    );
    let log = env.daemon_log();
    let answered = log
        .find("req-probe.yaml status -> Succeed")
        .expect("the probe's reply in the log");
    let last_removal = log.rfind("removing stale rep-stale-").expect("sweep lines");
    assert!(
        answered < last_removal,
        "the request waited for the whole sweep of {n} stale replies"
    );
    assert_answers(&env, &env.ws, &mut d, "a sweep of stale replies");
    let peak = peak_kb(&d);
    eprintln!("hostile: peak RSS after sweeping {n} stale replies: {peak} kB");
    assert!(peak < 64 << 10, "latd's peak memory is {peak} kB");
}

/// Directories named like requests (not empty, so they cannot simply be
/// removed): each is answered at most once and then moved out of the way,
/// never retried every tick. Replies to such junk are bounded in number.
#[test]
fn unusable_entries_are_answered_once_and_put_aside() {
    let _serial = serial();
    let env = TestEnv::new_in_memory("poison");
    let mut d = start_limited(&env, &env.ws);
    // One, watched closely: one reply that says why, and no other.
    let one = env.channel.join("req-poison-one.yaml");
    fs::create_dir(&one).unwrap();
    fs::write(one.join("x"), b"x").unwrap();
    latd::fsutil::poke(&env.channel.join("latd.wake"));
    let r = named_wait(&env.channel, "poison-one", WITHIN).unwrap();
    assert!(
        field(&r, "fail_reason")
            .unwrap_or_default()
            .contains("regular"),
        "{r:?}"
    );
    wait_until(WITHIN, "the directory to be put aside", || !one.exists());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !env.channel.join("rep-poison-one.yaml").exists(),
        "answered twice"
    );
    // Then many.
    let n = scale(20_000, 100_000);
    {
        let _p = Paused::new(&d);
        for i in 0..n {
            let p = env.channel.join(format!("req-poison-{i:06}.yaml"));
            fs::create_dir(&p).unwrap();
            fs::write(p.join("x"), b"x").unwrap();
        }
    }
    latd::fsutil::poke(&env.channel.join("latd.wake"));
    let cleared = poll_until(Duration::from_secs(scale(120, 1200) as u64), || {
        !d.running() || count_prefix(&env.channel, "req-poison-") == 0
    });
    assert!(
        cleared && d.running(),
        "latd running: {}; {} of {n} unusable entries still named like requests\n{}",
        d.running(),
        count_prefix(&env.channel, "req-poison-"),
        tail(&env.daemon_log())
    );
    assert_eq!(count_prefix(&env.channel, ".latd-aside-req-poison-"), n + 1);
    let replies = count_prefix(&env.channel, "rep-poison-");
    assert!(
        replies <= latd::channel::JUNK_REPLY_CAP + 16,
        "{replies} replies to junk"
    );
    // Nothing is retried: latd is quiet again.
    let cpu = |d: &Daemon| -> u64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", d.pid())).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = cpu(&d);
    std::thread::sleep(Duration::from_secs(2));
    eprintln!(
        "hostile: after {n} unusable entries, latd used {} ticks of CPU in 2 s",
        cpu(&d) - before
    );
    assert_answers(&env, &env.ws, &mut d, "unusable entries");
    let peak = peak_kb(&d);
    eprintln!("hostile: peak RSS after {n} unusable entries: {peak} kB");
    assert!(peak < 64 << 10, "latd's peak memory is {peak} kB");
}

/// A directory planted as the original slot's marker: answered once, then
/// moved aside, so the original slot serves the next client.
#[test]
fn a_directory_as_the_original_marker_does_not_block_the_slot() {
    let _serial = serial();
    let env = TestEnv::new("legacy-dir");
    let mut d = start_limited(&env, &env.ws);
    fs::write(env.channel.join("c-2-s.msg"), b"action: status\n").unwrap();
    let done = env.channel.join("c-2-s.done");
    fs::create_dir(&done).unwrap();
    fs::write(done.join("x"), b"x").unwrap();
    latd::fsutil::poke(&env.channel.join("latd.wake"));
    let reply = env.channel.join("s-2-c.done");
    wait_until(WITHIN, "the reply to the planted marker", || reply.exists());
    fs::remove_file(&reply).unwrap();
    wait_until(WITHIN, "the planted marker to be put aside", || {
        !done.exists()
    });
    let r = legacy_exchange(&env.channel, Some(b"action: status\n"), WITHIN).unwrap();
    assert_eq!(field(&r, "result").as_deref(), Some("succeed"), "{r:?}");
    assert_answers(&env, &env.ws, &mut d, "a directory as c-2-s.done");
}

/// A mount made by a test, lazily unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The disk fills, junk requests (empty files need no space) pile up,
/// then space returns: the junk's replies must not fill it again, and a
/// real client is answered.
#[test]
fn junk_replies_cannot_refill_a_freed_disk() {
    if skip_unless_root("junk_replies_cannot_refill_a_freed_disk") {
        return;
    }
    let _serial = serial();
    let env = TestEnv::new_in_memory("junk");
    let disk = env.root.join("disk");
    fs::create_dir_all(&disk).unwrap();
    let o = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,nr_inodes=200000", "tmpfs"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(o.status.success(), "mount: {}", stderr(&o));
    let _m = Mounted(disk.clone());
    let ws = disk.join("ws");
    fs::create_dir_all(&ws).unwrap();
    let mut d = start_limited(&env, &ws);
    let channel = ws.join("channel");
    // Fill the disk.
    let filler = disk.join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
    }
    let n = scale(20_000, 20_000);
    for i in 0..n {
        if fs::File::create(channel.join(format!("req-junk-{i:06}.yaml"))).is_err() {
            break;
        }
    }
    latd::fsutil::poke(&channel.join("latd.wake"));
    let consumed = poll_until(Duration::from_secs(300), || {
        !d.running() || count_prefix(&channel, "req-junk-") == 0
    });
    assert!(consumed && d.running(), "{}", tail(&env.daemon_log()));
    fs::remove_file(&filler).unwrap();
    // Let the retries run, then a real client asks.
    std::thread::sleep(Duration::from_millis(500));
    assert_answers(&env, &ws, &mut d, "junk requests on a full disk");
    let replies = count_prefix(&channel, "rep-junk-");
    eprintln!("hostile: {replies} replies to {n} junk requests after the disk was freed");
    assert!(
        replies <= latd::channel::JUNK_REPLY_CAP + 16,
        "{replies} replies to junk"
    );
}

/// Symlinks a workspace writer planted where the SDK will write as root
/// (`deploy/` for a build, `exampleyamls/` for getyaml, whose first step
/// deletes YAMLs there): refused, and nothing outside the workspace is
/// touched.
#[test]
fn symlinks_planted_where_the_sdk_writes_are_refused() {
    let env = TestEnv::new("planted");
    let outside = env.root.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep.yaml"), b"precious: true\n").unwrap();
    std::os::unix::fs::symlink(&outside, env.ws.join("deploy")).unwrap();
    std::os::unix::fs::symlink(&outside, env.ws.join("exampleyamls")).unwrap();
    let mut d = start_limited(&env, &env.ws);
    let yaml = env.yaml("lat.yaml", "standin_duration: 0");
    let o = env.latc(&["build", "--wait", "--file", yaml.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "the build ran through deploy -> outside"
    );
    assert!(stderr(&o).contains("deploy"), "{}", stderr(&o));
    let o = env.latc(&["getyaml"]);
    assert!(
        !o.status.success(),
        "getyaml ran through exampleyamls -> outside"
    );
    assert!(stderr(&o).contains("exampleyamls"), "{}", stderr(&o));
    let mut left: Vec<String> = fs::read_dir(&outside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["keep.yaml"],
        "root wrote or removed outside the workspace"
    );
    assert_answers(&env, &env.ws, &mut d, "planted symlinks");
    // Once they are real directories, both work.
    fs::remove_file(env.ws.join("deploy")).unwrap();
    fs::remove_file(env.ws.join("exampleyamls")).unwrap();
    let o = env.latc(&["build", "--wait", "--file", yaml.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.latc(&["getyaml"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Pids of live processes whose command line is exactly `args`.
fn processes_running(args: &[&str]) -> Vec<i32> {
    let want = args.join("\0") + "\0";
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| {
            let pid: i32 = p.file_name().to_str()?.parse().ok()?;
            let cmd = fs::read(p.path().join("cmdline")).ok()?;
            let stat = fs::read_to_string(p.path().join("stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.split_whitespace().next()? == "Z";
            (cmd == want.as_bytes() && !zombie).then_some(pid)
        })
        .collect()
}

/// A build helper that leaves its session (`setsid`), drops the channel's
/// mark and rewrites its job: it stays in the build's cgroup, so a stop
/// ends it, and so does a latd restarted after a crash.
#[test]
fn a_helper_that_leaves_its_session_and_mark_is_stopped_with_the_build() {
    let test = "a_helper_that_leaves_its_session_and_mark_is_stopped_with_the_build";
    if skip_unless_root(test) {
        return;
    }
    if !latd::cgroup::available() {
        skipped(&format!("{test}: no cgroup v2 that latd may use here"));
        return;
    }
    let _serial = serial();
    let env = TestEnv::new("escape");
    fs::create_dir_all(env.ws.join("hack")).unwrap();
    let tag = format!("{}", std::process::id());
    let (helper, main) = (format!("31{tag}"), format!("32{tag}"));
    fs::write(
        env.ws.join("hack/lat-genimage-cmd"),
        format!(
            "setsid env -u LATD_CHANNEL LATD_JOB=escaped sleep {helper} </dev/null >/dev/null 2>&1 &\nexec sleep {main}\n"
        ),
    )
    .unwrap();
    let args = ["--allow-hack-cmd"];
    let mut d = start_limited_with(&env, &env.ws, &args);
    let yaml = env.yaml("lat.yaml", "");
    for round in ["stop", "restart"] {
        let o = env.latc(&["build", "--file", yaml.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        wait_until(WITHIN, "the escaping helper", || {
            !processes_running(&["sleep", &helper]).is_empty()
        });
        if round == "stop" {
            let o = env.latc(&["stop"]);
            assert!(o.status.success(), "{}", stderr(&o));
        } else {
            d.kill9();
            d = start_limited_with(&env, &env.ws, &args);
        }
        let gone = poll_until(Duration::from_secs(10), || {
            processes_running(&["sleep", &helper]).is_empty()
        });
        let left = processes_running(&["sleep", &helper]);
        for &pid in &left {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        assert!(gone, "after a {round}, the helper survived: {left:?}");
        env.wait_state("idle");
    }
    assert!(processes_running(&["sleep", &main]).is_empty());
}

mod parser {
    use latd::protocol::parse_request;
    use proptest::prelude::*;

    /// Requests with anchors, aliases, tags and flow collections.
    fn request() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            Just("/w".to_string()),
            Just("status".to_string()),
            "[a-z/]{0,8}".prop_map(|s| format!("'{s}'")),
            (0..3u8).prop_map(|i| format!("&a{i} status")),
            (0..3u8).prop_map(|i| format!("*a{i}")),
            Just("[*a0, *a0]".to_string()),
            Just("!!str build".to_string()),
            Just("{x: [1, 2]}".to_string()),
        ];
        let key = prop::sample::select(vec!["action", "workdir", "yaml_file", "other", "*a1"]);
        prop::collection::vec((key, value), 0..6).prop_map(|kv| {
            kv.iter()
                .map(|(k, v)| format!("{k}: {v}\n"))
                .collect::<String>()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The parser never panics, and never accepts a request that uses
        /// an alias: a request is a flat mapping and needs none.
        #[test]
        fn requests_with_aliases_are_refused_and_nothing_panics(text in request()) {
            let parsed = parse_request(text.as_bytes());
            let has_alias = text.contains('*');
            if has_alias {
                prop_assert!(parsed.is_err(), "{text}");
            }
            if let Err(e) = &parsed {
                prop_assert!(!e.reason.is_empty());
            }
        }
    }
}
