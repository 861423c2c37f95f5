//! `latd.lock`: who serves a channel. Planted locks do not stop latd, a
//! second latd waits as a standby and takes over, two never both serve,
//! and latc knows at once when no daemon holds the channel. The real
//! binaries, real locks held by real processes.

mod common;
use common::*;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

/// Takes an OFD lock of `kind` on the whole of `f` (as a client could).
fn ofd_lock(f: &fs::File, kind: i32) {
    // SAFETY: flock is plain data; all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: valid fd and flock struct.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(r, 0, "lock: {}", std::io::Error::last_os_error());
}

fn flock_ex(f: &fs::File) {
    // SAFETY: valid fd.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
}

fn daemon_pid_in_status(env: &TestEnv) -> Option<u64> {
    let o = env.latc(&["status", "--json"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .ok()?
        .get("daemon_pid")?
        .as_u64()
}

/// Starts latd on the test's workspace without waiting for it.
fn spawn_latd(env: &TestEnv, name: &str) -> Daemon {
    let log = fs::File::create(env.root.join(format!("latd-{name}.log"))).unwrap();
    let child = std::process::Command::new(LATD)
        .args(["--workspace", env.ws.to_str().unwrap()])
        .args(["--sdk", sdk_dir().to_str().unwrap(), "--grace", "2", "-d"])
        .env_remove("RUST_LOG")
        .env_remove("LAT_CHANNEL_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Daemon {
        child: Some(child),
        channel: env.channel.clone(),
    }
}

/// Runs a latd once and stops it, so its own `latd.lock` is left behind.
fn leave_latds_lock(env: &TestEnv) {
    let mut d = env.daemon();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(env.channel.join("latd.lock").is_file());
}

fn assert_serves(env: &TestEnv, d: &Daemon) {
    wait_until(Duration::from_secs(10), "latd to answer", || {
        daemon_pid_in_status(env) == Some(d.pid() as u64)
    });
    let md = fs::symlink_metadata(env.channel.join("latd.lock")).unwrap();
    assert!(md.is_file(), "latd.lock is not a regular file");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(md.uid(), unsafe { libc::geteuid() });
    assert_eq!(md.mode() & 0o022, 0, "latd.lock writable by others");
}

#[test]
fn a_planted_symlink_fifo_or_directory_does_not_stop_latd() {
    let env = TestEnv::new("plantlock");
    fs::create_dir_all(&env.channel).unwrap();
    let lock = env.channel.join("latd.lock");
    let outside = env.root.join("outside");
    fs::write(&outside, "keep").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o666)).unwrap();
    // A symlink to a file elsewhere.
    std::os::unix::fs::symlink(&outside, &lock).unwrap();
    let mut d = env.daemon();
    assert_serves(&env, &d);
    assert_eq!(fs::read_to_string(&outside).unwrap(), "keep");
    assert_eq!(fs::metadata(&outside).unwrap().mode() & 0o7777, 0o666);
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    // A FIFO (opening it must not block latd).
    fs::remove_file(&lock).unwrap();
    let c = std::ffi::CString::new(lock.to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    let mut d = env.daemon();
    assert_serves(&env, &d);
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    // A directory, not empty.
    fs::remove_file(&lock).unwrap();
    fs::create_dir(&lock).unwrap();
    fs::write(lock.join("x"), "x").unwrap();
    let d = env.daemon();
    assert_serves(&env, &d);
    let log = env.daemon_log();
    assert!(log.contains("a symlink"), "{log}");
    assert!(log.contains("a FIFO"), "{log}");
    assert!(log.contains("a directory"), "{log}");
}

#[test]
fn a_lock_a_client_holds_does_not_stop_latd() {
    let env = TestEnv::new("clientlock");
    leave_latds_lock(&env);
    let lock = env.channel.join("latd.lock");
    // What a client can do with latd's own file (readable by all): open it
    // read-only, flock it, and take a read lock on it.
    let held = fs::File::open(&lock).unwrap();
    flock_ex(&held);
    ofd_lock(&held, libc::F_RDLCK);
    let planted_ino = held.metadata().unwrap().ino();
    let d = env.daemon();
    assert_serves(&env, &d);
    assert_ne!(
        fs::metadata(&lock).unwrap().ino(),
        planted_ino,
        "the read-locked file was not replaced"
    );
    assert!(env.daemon_log().contains("a client holds a lock on it"));
    drop(d);
    drop(held);

    // A client's own file in its place, locked for writing by the client.
    fs::remove_file(&lock).unwrap();
    let theirs = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .unwrap();
    fs::set_permissions(&lock, fs::Permissions::from_mode(0o666)).unwrap();
    if is_root() {
        std::os::unix::fs::chown(&lock, Some(65534), Some(65534)).unwrap();
    }
    ofd_lock(&theirs, libc::F_WRLCK);
    flock_ex(&theirs);
    let d = env.daemon();
    assert_serves(&env, &d);
}

#[test]
fn a_second_latd_waits_as_a_standby_and_takes_over_when_the_first_goes() {
    let env = TestEnv::new("standby");
    let mut first = env.daemon();
    let second = spawn_latd(&env, "second");
    wait_until(
        Duration::from_secs(10),
        "the second to say it waits",
        || {
            env.daemon_log()
                .contains("latd is waiting for the lock held by another latd")
        },
    );
    wait_until(Duration::from_secs(10), "latd.standby", || {
        env.channel.join("latd.standby").is_file()
    });
    // Only the first serves: it answers, the heartbeat is its own.
    for _ in 0..5 {
        assert_eq!(daemon_pid_in_status(&env), Some(first.pid() as u64));
        let alive = fs::read_to_string(env.channel.join("latd.alive")).unwrap();
        assert!(
            alive.contains(&format!("pid: {}\n", first.pid())),
            "{alive}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(env.daemon_log().matches("serving channel").count(), 1);
    // A rolling update: the first is asked to go; the second takes over.
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(10)), Some(0));
    wait_until(Duration::from_secs(10), "the standby to serve", || {
        daemon_pid_in_status(&env) == Some(second.pid() as u64)
    });
    assert!(!env.channel.join("latd.standby").exists());
    assert!(env.daemon_log().contains("took the channel's lock"));
}

#[test]
fn a_standby_exits_0_on_sigterm() {
    let env = TestEnv::new("standbyterm");
    let _first = env.daemon();
    let mut second = spawn_latd(&env, "second");
    wait_until(Duration::from_secs(10), "latd.standby", || {
        env.channel.join("latd.standby").is_file()
    });
    second.signal(libc::SIGTERM);
    assert_eq!(second.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!env.channel.join("latd.standby").exists());
}

#[test]
fn two_latds_started_together_over_a_planted_lock_never_both_serve() {
    let env = TestEnv::new("race");
    leave_latds_lock(&env);
    for round in 0..5 {
        // A client's read lock makes both replace the file at once.
        let held = fs::File::open(env.channel.join("latd.lock")).unwrap();
        ofd_lock(&held, libc::F_RDLCK);
        let before = env.daemon_log().matches("serving channel").count();
        let a = spawn_latd(&env, &format!("race-a-{round}"));
        // (started together: neither waits for the other)
        let b = spawn_latd(&env, &format!("race-b-{round}"));
        wait_until(Duration::from_secs(10), "one of them to serve", || {
            env.daemon_log().matches("serving channel").count() > before
        });
        wait_until(Duration::from_secs(10), "the other to wait", || {
            env.channel.join("latd.standby").is_file()
        });
        std::thread::sleep(Duration::from_millis(500));
        let serving = env.daemon_log().matches("serving channel").count() - before;
        assert_eq!(serving, 1, "round {round}: {}", env.daemon_log());
        drop(held);
        drop((a, b));
    }
}

/// Whether someone holds a write lock on the file at `path`.
fn write_locked(path: &std::path::Path) -> bool {
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock is plain data; all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    // SAFETY: valid fd and flock struct.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    r == 0 && fl.l_type as i32 == libc::F_WRLCK
}

#[test]
fn a_removed_or_replaced_lock_file_is_put_back() {
    let env = TestEnv::new("lockback");
    let d = env.daemon();
    let lock = env.channel.join("latd.lock");
    assert!(write_locked(&lock));
    fs::remove_file(&lock).unwrap();
    wait_until(Duration::from_secs(10), "latd.lock back, locked", || {
        write_locked(&lock)
    });
    // A client's unlocked file renamed over it.
    let tmp = env.channel.join("fake");
    fs::write(&tmp, "").unwrap();
    if is_root() {
        std::os::unix::fs::chown(&tmp, Some(65534), Some(65534)).unwrap();
    }
    fs::rename(&tmp, &lock).unwrap();
    assert!(!write_locked(&lock));
    wait_until(Duration::from_secs(10), "latd's own latd.lock back", || {
        write_locked(&lock)
    });
    assert_serves(&env, &d);
}

/// latc with latd dead: the answer comes from the lock at once, not after
/// the heartbeat's 10 s.
#[test]
fn latc_knows_at_once_that_no_daemon_holds_the_channel() {
    let env = TestEnv::new("deadfast");
    let mut d = env.daemon();
    assert_eq!(daemon_pid_in_status(&env), Some(d.pid() as u64));
    d.kill9();
    // The heartbeat is still fresh: only the lock can tell.
    let start = Instant::now();
    let o = env.latc(&["status"]);
    let took = start.elapsed();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("nothing holds the channel's lock"),
        "{}",
        stderr(&o)
    );
    let o = env.latc(&["health"]);
    assert_eq!(o.status.code(), Some(3));
    eprintln!("latc status with latd dead answered in {took:?}");
}

/// What a waiting latd says reaches latc: here a standby whose active latd
/// was SIGKILLed while the standby was stopped (SIGSTOP), so it has not
/// taken over yet.
#[test]
fn latc_says_that_a_latd_is_waiting_for_the_lock() {
    let env = TestEnv::new("waitnote");
    let mut first = env.daemon();
    let second = spawn_latd(&env, "second");
    wait_until(Duration::from_secs(10), "latd.standby", || {
        env.channel.join("latd.standby").is_file()
    });
    second.signal(libc::SIGSTOP);
    first.kill9();
    let o = env.latc(&["status"]);
    second.signal(libc::SIGCONT);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let msg = stderr(&o);
    assert!(
        msg.contains(&format!(
            "latd (pid {}) is waiting for the lock held by another latd",
            second.pid()
        )),
        "{msg}"
    );
    wait_until(Duration::from_secs(10), "the standby to serve", || {
        daemon_pid_in_status(&env) == Some(second.pid() as u64)
    });
}

/// A symlink at the channel's path before latd starts (a client's, before
/// a restart) is not followed: it is moved aside and latd serves a real
/// directory there; nothing of latd's appears where the symlink pointed.
/// With `--follow-channel-symlink` the operator's symlink is followed.
#[test]
fn a_symlinked_channel_is_followed_only_when_the_operator_says_so() {
    let env = TestEnv::new("chanlink");
    let elsewhere = env.root.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &env.channel).unwrap();
    let d = env.daemon();
    assert_serves(&env, &d);
    assert!(fs::symlink_metadata(&env.channel).unwrap().is_dir());
    assert_eq!(
        fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "latd wrote where the planted symlink pointed"
    );
    let aside: Vec<_> = fs::read_dir(&env.ws)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("channel.symlink-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the symlink was not kept aside");
    assert_eq!(fs::read_link(aside[0].path()).unwrap(), elsewhere);
    assert!(env.daemon_log().contains("not followed"));
    drop(d);

    // The operator's choice.
    fs::remove_dir_all(&env.channel).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &env.channel).unwrap();
    let mut d = env.daemon_with(&["--grace", "2", "--follow-channel-symlink"]);
    assert_serves(&env, &d);
    assert!(elsewhere.join("latd.alive").is_file());
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    // (and by the environment)
    fs::remove_file(&env.channel).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &env.channel).unwrap();
    let log = fs::File::create(env.root.join("latd-env.log")).unwrap();
    let child = std::process::Command::new(LATD)
        .args(["--workspace", env.ws.to_str().unwrap()])
        .args(["--sdk", sdk_dir().to_str().unwrap()])
        .env("LAT_CHANNEL_FOLLOW_SYMLINK", "1")
        .env_remove("LAT_CHANNEL_DIR")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Daemon {
        child: Some(child),
        channel: elsewhere.clone(),
    };
    d.wait_serving();
    assert!(fs::symlink_metadata(&env.channel)
        .unwrap()
        .file_type()
        .is_symlink());
}

/// Neither can a file or a FIFO at the channel's path stop latd from
/// starting: it is moved aside and a directory made.
#[test]
fn a_file_or_fifo_at_the_channels_path_does_not_stop_latd() {
    let env = TestEnv::new("chanfile");
    fs::write(&env.channel, "not a directory").unwrap();
    let mut d = env.daemon();
    assert_serves(&env, &d);
    assert!(fs::symlink_metadata(&env.channel).unwrap().is_dir());
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    fs::remove_dir_all(&env.channel).unwrap();
    let c = std::ffi::CString::new(env.channel.to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    let d = env.daemon();
    assert_serves(&env, &d);
    let aside = fs::read_dir(&env.ws)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("channel.planted-")
        })
        .count();
    assert!(aside >= 1, "nothing kept aside");
}
