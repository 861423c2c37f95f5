//! Fault injection: bad input, many clients at once, a client that must
//! never hang, signals, crashes and restarts, and a hostile file system.
//! Real latd and latc processes, real signals and real files, each test in
//! its own directory.
//!
//! Tests that need root (mounts, `chattr`, a second user) print plainly
//! that they were skipped when the suite does not run as root.

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long a single request may take before we call its reply lost. Far
/// above what it needs: the machine may be loaded by other test binaries.
const REPLY_WITHIN: Duration = Duration::from_secs(20);

static IDS: AtomicU64 = AtomicU64::new(0);

fn unique_id(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        IDS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and insists that it succeeds (test set-up).
fn sh(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().expect(cmd);
    assert!(o.status.success(), "{cmd} {args:?} failed: {}", stderr(&o));
}

/// A mount made by a test; lazily unmounted on drop, even when the test
/// fails, so that nothing is left mounted.
struct MountGuard(Option<PathBuf>);

impl MountGuard {
    fn tmpfs(at: &Path, options: &str) -> MountGuard {
        fs::create_dir_all(at).unwrap();
        sh(
            "mount",
            &["-t", "tmpfs", "-o", options, "tmpfs", at.to_str().unwrap()],
        );
        MountGuard(Some(at.to_path_buf()))
    }

    fn bind(from: &Path, at: &Path) -> MountGuard {
        fs::create_dir_all(at).unwrap();
        sh(
            "mount",
            &["--bind", from.to_str().unwrap(), at.to_str().unwrap()],
        );
        MountGuard(Some(at.to_path_buf()))
    }

    fn remount_read_only(&self) {
        let at = self.0.as_ref().unwrap();
        sh("mount", &["-o", "remount,bind,ro", at.to_str().unwrap()]);
    }

    fn unmount(&mut self) {
        if let Some(at) = self.0.take() {
            let _ = Command::new("umount").arg("-l").arg(&at).status();
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// `chattr +i` on a file (root only); undone on drop.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        sh("chattr", &["+i", path.to_str().unwrap()]);
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A directory made read-only by mode (for a non-root run); restored on drop.
struct ReadOnlyDir(PathBuf);

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o755));
    }
}

/// Makes sure a stopped (SIGSTOP) daemon is continued again.
struct Continue(i32);

impl Drop for Continue {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

fn set_mtime(path: &Path, ago: Duration) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

fn result_of(reply: &Wire) -> String {
    field(reply, "result").unwrap_or_default()
}

fn reason_of(reply: &Wire) -> String {
    field(reply, "fail_reason").unwrap_or_default()
}

/// A valid status request through the original slot: it must succeed and
/// clear the `invalid_message` marker.
fn assert_serves_next_request(env: &TestEnv, d: &mut Daemon, after: &str) {
    assert!(d.running(), "latd died after {after}");
    let r = legacy_exchange(
        &env.channel,
        Some(format!("action: status\nworkdir: {}\n", env.ws.display()).as_bytes()),
        REPLY_WITHIN,
    )
    .unwrap_or_else(|e| panic!("after {after}: {e}"));
    assert_eq!(field(&r, "action").as_deref(), Some("status"), "{r:?}");
    assert_eq!(result_of(&r), "succeed", "after {after}: {r:?}");
    assert!(
        !env.channel.join("invalid_message").exists(),
        "a valid request after {after} left invalid_message"
    );
}

/// Sends `msg` through the original slot and through a per-request file;
/// each must get a `fail` reply whose reason contains every string of
/// `want`, the `invalid_message` marker and one history line, and latd must
/// serve the next request normally.
fn assert_refused(
    env: &TestEnv,
    d: &mut Daemon,
    case: &str,
    msg: &[u8],
    action: &str,
    want: &[&str],
) {
    for legacy in [true, false] {
        let lines_before = env.history_lines().len();
        let (reply, slot) = if legacy {
            let r = legacy_exchange(&env.channel, Some(msg), REPLY_WITHIN);
            (r, "c-2-s.msg".to_string())
        } else {
            let id = unique_id("bad");
            let r = named_exchange(&env.channel, &id, msg, REPLY_WITHIN);
            (r, format!("req-{id}.yaml"))
        };
        let reply = reply.unwrap_or_else(|e| panic!("{case} via {slot}: {e}"));
        assert_eq!(result_of(&reply), "fail", "{case} via {slot}: {reply:?}");
        assert_eq!(
            field(&reply, "action").as_deref().unwrap_or(""),
            action,
            "{case} via {slot}: the reply's action: {reply:?}"
        );
        let reason = reason_of(&reply);
        for w in want {
            assert!(
                reason.contains(w),
                "{case} via {slot}: fail_reason lacks {w:?}: {reason}"
            );
        }
        assert!(
            env.channel.join("invalid_message").exists(),
            "{case} via {slot}: no invalid_message marker"
        );
        let lines = env.history_lines();
        assert_eq!(
            lines.len(),
            lines_before + 1,
            "{case} via {slot}: one history line per request"
        );
        assert!(
            lines.last().unwrap().contains(&slot),
            "{case} via {slot}: history line {:?}",
            lines.last()
        );
        assert_serves_next_request(env, d, &format!("{case} via {slot}"));
    }
}

// ---------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------

/// Every malformed request gets a clear `fail` reply (what was wrong and
/// what to do), the marker and a history line; latd serves the next one.
#[test]
fn bad_requests_get_a_clear_fail_reply_and_latd_serves_the_next() {
    let env = TestEnv::new("badreq");
    let mut d = env.daemon_with(&["--grace", "1"]);
    let ws = env.ws.display().to_string();
    let outside = env.root.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("lat.yaml"), "name: outside\n").unwrap();
    std::os::unix::fs::symlink(&outside, env.ws.join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.join("lat.yaml"), env.ws.join("link.yaml")).unwrap();
    fs::create_dir_all(env.ws.join("adir.yaml")).unwrap();
    fs::write(env.ws.join("bad.yaml"), "name: [unclosed\n  - x: {\n").unwrap();
    fs::write(env.ws.join("list.yaml"), "- a\n- b\n").unwrap();
    let good = env.yaml("good.yaml", "standin_duration: 0.1");
    let hint = "one of: build, status, stop, logs, clean, getyaml";

    // The message itself.
    let cases: Vec<(&str, Vec<u8>, &str, Vec<String>)> = vec![
        (
            "malformed YAML",
            b"action: [status\nworkdir: {\n".to_vec(),
            "",
            vec![
                "not valid YAML".into(),
                "expected e.g. 'action: status'".into(),
            ],
        ),
        (
            "a YAML list",
            b"- action\n- status\n".to_vec(),
            "",
            vec!["not a YAML mapping".into(), "expected e.g.".into()],
        ),
        (
            "a YAML scalar",
            b"status\n".to_vec(),
            "",
            vec!["not a YAML mapping".into(), "expected e.g.".into()],
        ),
        (
            "an empty file",
            Vec::new(),
            "",
            vec!["empty".into(), "action: ...".into(), hint.into()],
        ),
        (
            "blank lines",
            b"  \n\n\t\n".to_vec(),
            "",
            vec!["empty".into(), hint.into()],
        ),
        (
            "binary bytes",
            vec![0, 1, 2, 3, 0x7f, 0x10, 0, 0x1b, b'[', b'm'],
            "",
            vec!["not valid YAML".into(), "expected e.g.".into()],
        ),
        (
            "invalid UTF-8",
            b"action: status\nworkdir: /\xff\xfe\xc3\x28\n".to_vec(),
            "",
            vec![
                "not valid UTF-8".into(),
                "write it as a YAML mapping".into(),
            ],
        ),
        (
            "no action",
            format!("workdir: {ws}\n").into_bytes(),
            "",
            vec!["no 'action'".into(), hint.into()],
        ),
        (
            "an unknown action",
            format!("action: fly\nworkdir: {ws}\n").into_bytes(),
            "fly",
            vec!["unknown action 'fly'".into(), hint.into()],
        ),
        (
            "an action of the wrong type",
            b"action: [status]\n".to_vec(),
            "",
            vec!["'action' must be a string".into(), hint.into()],
        ),
        (
            "a numeric action",
            b"action: 3\n".to_vec(),
            "",
            vec!["'action' must be a string".into(), hint.into()],
        ),
        (
            "a workdir of the wrong type",
            b"action: logs\nworkdir: {a: 1}\n".to_vec(),
            "logs",
            vec!["'workdir' must be a string".into()],
        ),
        (
            "a yaml_file of the wrong type",
            format!("action: build\nworkdir: {ws}\nyaml_file: [1, 2]\n").into_bytes(),
            "build",
            vec!["'yaml_file' must be a string".into()],
        ),
        // workdir
        (
            "a relative workdir",
            b"action: logs\nworkdir: ws/sub\n".to_vec(),
            "logs",
            vec![
                "'ws/sub' is not an absolute path".into(),
                format!("send the full path of a directory under {ws}"),
            ],
        ),
        (
            "a workdir outside the workspace",
            format!("action: getyaml\nworkdir: {}\n", outside.display()).into_bytes(),
            "getyaml",
            vec![
                format!("{} is outside the workspace {ws}", outside.display()),
                "set WORKSPACE_DIR".into(),
            ],
        ),
        (
            "a workdir that escapes through a symlink",
            format!("action: clean\nworkdir: {ws}/escape\n").into_bytes(),
            "clean",
            vec![
                format!("resolves to {}", outside.display()),
                "outside the workspace".into(),
            ],
        ),
        (
            "a workdir that does not exist",
            format!("action: clean\nworkdir: {ws}/nope\n").into_bytes(),
            "clean",
            vec![
                format!("{ws}/nope"),
                "No such file or directory".into(),
                format!("an existing directory under {ws}"),
            ],
        ),
        (
            "a workdir that is a file",
            format!("action: clean\nworkdir: {}\n", good.display()).into_bytes(),
            "clean",
            vec![
                format!("{} is not a directory", good.display()),
                format!("an existing directory under {ws}"),
            ],
        ),
        // yaml_file
        (
            "a build without yaml_file",
            format!("action: build\nworkdir: {ws}\n").into_bytes(),
            "build",
            vec!["needs 'yaml_file'".into(), "latc build --file PATH".into()],
        ),
        (
            "a relative yaml_file",
            format!("action: build\nworkdir: {ws}\nyaml_file: good.yaml\n").into_bytes(),
            "build",
            vec![
                "'good.yaml' is not an absolute path".into(),
                "latc build --file PATH".into(),
            ],
        ),
        (
            "a yaml_file that does not exist",
            format!("action: build\nworkdir: {ws}\nyaml_file: {ws}/none.yaml\n").into_bytes(),
            "build",
            vec![
                format!("{ws}/none.yaml"),
                "No such file or directory".into(),
                "latc build --file PATH".into(),
            ],
        ),
        (
            "a yaml_file that is a directory",
            format!("action: build\nworkdir: {ws}\nyaml_file: {ws}/adir.yaml\n").into_bytes(),
            "build",
            vec![
                format!("{ws}/adir.yaml is not a regular file"),
                "latc build --file PATH".into(),
            ],
        ),
        (
            "a yaml_file that is not valid YAML",
            format!("action: build\nworkdir: {ws}\nyaml_file: {ws}/bad.yaml\n").into_bytes(),
            "build",
            vec![
                format!("{ws}/bad.yaml is not valid YAML"),
                "latc getyaml".into(),
            ],
        ),
        (
            "a yaml_file that is not a mapping",
            format!("action: build\nworkdir: {ws}\nyaml_file: {ws}/list.yaml\n").into_bytes(),
            "build",
            vec![
                format!("{ws}/list.yaml is not a YAML mapping"),
                "latc getyaml".into(),
            ],
        ),
        (
            "a yaml_file symlinked outside the workspace",
            format!("action: build\nworkdir: {ws}\nyaml_file: {ws}/link.yaml\n").into_bytes(),
            "build",
            vec![
                format!("resolves to {}/lat.yaml", outside.display()),
                "outside the workspace".into(),
                "set WORKSPACE_DIR".into(),
            ],
        ),
    ];
    for (case, msg, action, want) in &cases {
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_refused(&env, &mut d, case, msg, action, &want);
    }
    // None of them started anything, and latd still answers latc.
    let s = env.status_json();
    assert_eq!(s["build_status"], "not-started", "{s}");
    assert!(
        !env.ws.join("exampleyamls").exists() && !outside.join("exampleyamls").exists(),
        "a refused getyaml ran"
    );
    assert!(d.running());
}

/// A request without `workdir` works in the workspace root.
#[test]
fn missing_workdir_means_the_workspace_root() {
    let env = TestEnv::new("noworkdir");
    let _d = env.daemon();
    let r = legacy_exchange(&env.channel, Some(b"action: logs\n"), REPLY_WITHIN).unwrap();
    assert_eq!(result_of(&r), "fail", "{r:?}");
    assert!(
        reason_of(&r).contains(&format!("{}/log/log.appsdk", env.ws.display())),
        "{r:?}"
    );
    let r = legacy_exchange(&env.channel, Some(b"action: getyaml\n"), REPLY_WITHIN).unwrap();
    assert_eq!(result_of(&r), "succeed", "{r:?}");
    let example = env
        .ws
        .join("exampleyamls/debian-image-base-intel-x86-64.yaml");
    assert_eq!(
        field(&r, "yaml_file_path").as_deref(),
        example.to_str(),
        "{r:?}"
    );
    assert!(example.is_file());
    assert!(
        !env.channel.join("invalid_message").exists(),
        "a valid request without workdir was marked invalid"
    );
}

/// A huge request (an 8 GiB sparse file) is refused after reading no more
/// than the 1 MiB cap; the history line stays short; a request just under
/// the cap is still served.
#[test]
fn huge_request_is_refused_after_reading_at_most_the_cap() {
    let env = TestEnv::new("huge");
    let mut d = env.daemon();
    let msg = env.channel.join("c-2-s.msg");
    let f = fs::File::create(&msg).unwrap();
    f.set_len(8 << 30).unwrap();
    drop(f);
    let t = Instant::now();
    let r = legacy_exchange(&env.channel, None, REPLY_WITHIN).unwrap();
    let took = t.elapsed();
    assert_eq!(result_of(&r), "fail", "{r:?}");
    assert!(
        reason_of(&r).contains("larger than 1048576 bytes")
            && reason_of(&r).contains("a request is a small YAML mapping"),
        "{r:?}"
    );
    assert!(env.channel.join("invalid_message").exists());
    // Had latd read the 8 GiB it would hold gigabytes (or have died).
    let hwm = d.status_kb("VmHWM").expect("VmHWM of latd");
    assert!(hwm < 64 * 1024, "latd's peak memory is {hwm} kB");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let last = env.history_lines().pop().unwrap();
    assert!(
        last.len() < 64 * 1024,
        "history line of {} bytes",
        last.len()
    );
    // Just under the cap is a request like any other.
    let mut big = format!("action: status\nworkdir: {}\n# ", env.ws.display()).into_bytes();
    big.resize((1 << 20) - 2, b'x');
    big.push(b'\n');
    let r = named_exchange(&env.channel, &unique_id("big"), &big, REPLY_WITHIN).unwrap();
    assert_eq!(result_of(&r), "succeed", "{r:?}");
    fs::remove_file(&msg).unwrap();
    assert_serves_next_request(&env, &mut d, "a huge request");
}

/// `c-2-s.done` without `c-2-s.msg`, or with a request that is a
/// directory, a symlink or a FIFO: a clear reply, no hang, no crash.
#[test]
fn done_marker_without_a_readable_request() {
    let env = TestEnv::new("nomsg");
    let mut d = env.daemon();
    let msg = env.channel.join("c-2-s.msg");
    let r = legacy_exchange(&env.channel, None, REPLY_WITHIN).unwrap();
    assert_eq!(result_of(&r), "fail", "{r:?}");
    assert!(
        reason_of(&r).contains("c-2-s.done exists but c-2-s.msg does not")
            && reason_of(&r).contains("write the request to c-2-s.msg before creating c-2-s.done"),
        "{r:?}"
    );
    assert!(env.channel.join("invalid_message").exists());
    assert!(
        !env.channel.join("c-2-s.done").exists(),
        "marker not consumed"
    );
    assert_serves_next_request(&env, &mut d, "a done marker alone");

    let target = env.ws.join("real-request.yaml");
    fs::write(&target, "action: status\n").unwrap();
    type Make = Box<dyn Fn(&Path)>;
    let odd: Vec<(&str, Make)> = vec![
        (
            "a directory",
            Box::new(|p: &Path| fs::create_dir(p).unwrap()),
        ),
        (
            "a symlink",
            Box::new(move |p: &Path| std::os::unix::fs::symlink(&target, p).unwrap()),
        ),
        (
            "a FIFO",
            Box::new(|p: &Path| sh("mkfifo", &[p.to_str().unwrap()])),
        ),
    ];
    for (what, make) in odd {
        let _ = fs::remove_file(&msg);
        make(&msg);
        let lines = env.history_lines().len();
        let r = legacy_exchange(&env.channel, None, REPLY_WITHIN)
            .unwrap_or_else(|e| panic!("c-2-s.msg as {what}: {e}"));
        assert_eq!(result_of(&r), "fail", "{what}: {r:?}");
        assert!(
            reason_of(&r).contains("cannot read c-2-s.msg")
                && reason_of(&r).contains("it must be a regular, readable file"),
            "{what}: {r:?}"
        );
        assert!(env.channel.join("invalid_message").exists(), "{what}");
        assert_eq!(env.history_lines().len(), lines + 1, "{what}");
        if msg.is_dir() {
            fs::remove_dir(&msg).unwrap();
        } else {
            fs::remove_file(&msg).unwrap();
        }
        assert_serves_next_request(&env, &mut d, what);
    }
}

/// `c-2-s.msg` replaced (renamed over) again and again while latd reads
/// it: latd notices and says so, or reads one whole version; never a
/// crash, a hang or a mixture.
#[test]
fn request_replaced_while_being_read_is_detected() {
    let env = TestEnv::new("replaced");
    let mut d = env.daemon();
    // Two versions, big enough that reading one takes a while; both valid.
    let pad = |head: &str| {
        let mut v = format!("{head}# ").into_bytes();
        v.resize(768 * 1024, b'y');
        v.push(b'\n');
        v
    };
    let a = env.channel.join("version-a");
    let b = env.channel.join("version-b");
    fs::write(&a, pad("action: status\n")).unwrap();
    fs::write(&b, pad("action: logs\n")).unwrap();
    let msg = env.channel.join("c-2-s.msg");
    let tmp = env.channel.join("version.partial");
    let mut detected = 0;
    let mut whole = 0;
    for round in 0..40 {
        // (Removed first: it may be a hard link of one of the versions.)
        let _ = fs::remove_file(&msg);
        fs::copy(&a, &msg).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let replacer = {
            let (stop, a, b, msg, tmp) = (
                Arc::clone(&stop),
                a.clone(),
                b.clone(),
                msg.clone(),
                tmp.clone(),
            );
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let from = if n % 2 == 0 { &b } else { &a };
                    let _ = fs::remove_file(&tmp);
                    if fs::hard_link(from, &tmp).is_ok() {
                        let _ = fs::rename(&tmp, &msg);
                    }
                    n += 1;
                }
                n
            })
        };
        let r = legacy_exchange(&env.channel, None, REPLY_WITHIN);
        stop.store(true, Ordering::Relaxed);
        let renames = replacer.join().unwrap();
        let r = r.unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(renames > 0);
        let reason = reason_of(&r);
        if result_of(&r) == "fail" && reason.contains("changed while it was being read") {
            assert!(
                reason.contains("write it completely"),
                "no advice on what to do: {reason}"
            );
            assert!(env.channel.join("invalid_message").exists());
            detected += 1;
        } else {
            // One whole version was read: a status or a logs reply.
            let action = field(&r, "action").unwrap_or_default();
            assert!(
                (action == "status" && result_of(&r) == "succeed")
                    || (action == "logs" && reason.contains("No log file found")),
                "round {round}: neither detected nor one whole version: {r:?}"
            );
            whole += 1;
        }
        if detected >= 3 {
            break;
        }
    }
    eprintln!("replaced while read: {detected} detected, {whole} read whole");
    assert!(
        detected >= 1,
        "latd never noticed a request replaced while it read it ({whole} whole reads)"
    );
    assert_serves_next_request(&env, &mut d, "replaced requests");
}

/// A YAML file latd may not read is refused with a reason naming it. As
/// root, latd runs as uid 65534 so that the file mode applies.
#[test]
fn unreadable_yaml_file_is_refused() {
    let env = TestEnv::new("unreadable");
    let mut d = if is_root() {
        std::os::unix::fs::chown(&env.ws, Some(65534), Some(65534)).unwrap();
        env.daemon_as(65534, &["--grace", "1"])
    } else {
        env.daemon()
    };
    let yaml = env.yaml("secret.yaml", "standin_duration: 0.1");
    fs::set_permissions(&yaml, fs::Permissions::from_mode(0o000)).unwrap();
    let msg = format!(
        "action: build\nworkdir: {}\nyaml_file: {}\n",
        env.ws.display(),
        yaml.display()
    );
    let r = named_exchange(
        &env.channel,
        &unique_id("secret"),
        msg.as_bytes(),
        REPLY_WITHIN,
    )
    .unwrap();
    assert_eq!(result_of(&r), "fail", "{r:?}");
    let reason = reason_of(&r);
    assert!(
        reason.contains(&format!("{} cannot be read", yaml.display()))
            && reason.contains("Permission denied")
            && reason.contains("readable by latd"),
        "{reason}"
    );
    assert!(env.channel.join("invalid_message").exists());
    assert!(!env.ws.join("log/log.appsdk").exists(), "a build ran");
    assert_serves_next_request(&env, &mut d, "an unreadable yaml_file");
}

// ---------------------------------------------------------------------
// Many clients at once
// ---------------------------------------------------------------------

/// 50 `latc status` (and 10 `latc logs`, and a client of the original
/// protocol all along) while a build runs and is stopped: 25 with the stop,
/// 25 more while the stop waits out the grace period. Each gets its own
/// correct answer, none hangs, none waits for the stop, nothing is left.
#[test]
fn fifty_concurrent_latc_status_while_a_build_runs_and_is_stopped() {
    let env = TestEnv::new("fifty");
    let mut d = env.daemon_with(&["--grace", "1"]);
    // It ignores SIGTERM: the stop lasts the whole grace period.
    env.start_build("standin_duration: 60\nstandin_children: 3\nstandin_ignore_term: true");

    let legacy_stop = Arc::new(AtomicBool::new(false));
    let legacy = {
        let (ch, ws, stop) = (
            env.channel.clone(),
            env.ws.clone(),
            Arc::clone(&legacy_stop),
        );
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) || n < 5 {
                let r = legacy_exchange(
                    &ch,
                    Some(format!("action: status\nworkdir: {}\n", ws.display()).as_bytes()),
                    REPLY_WITHIN,
                )
                .unwrap_or_else(|e| panic!("original-protocol client: {e}"));
                assert_eq!(field(&r, "action").as_deref(), Some("status"), "{r:?}");
                assert_eq!(field(&r, "result").as_deref(), Some("succeed"), "{r:?}");
                n += 1;
            }
            n
        })
    };

    let spawn = |args: &[&str]| -> Child {
        env.latc_cmd()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let t = Instant::now();
    let mut statuses = Vec::new();
    let mut logs = Vec::new();
    let mut wave = |statuses: &mut Vec<(usize, Child)>, n: usize| {
        for i in 0..25 {
            statuses.push((n, spawn(&["status", "--json", "--timeout", "30"])));
            if i % 5 == 0 {
                logs.push(spawn(&["logs", "--timeout", "30"]));
            }
        }
    };
    wave(&mut statuses, 1);
    let stop = spawn(&["stop", "--timeout", "30"]);
    let status_file = env.channel.join("status.lat");
    wait_until(Duration::from_secs(10), "state stopping", || {
        fs::read_to_string(&status_file)
            .unwrap_or_default()
            .contains("state: stopping")
    });
    wave(&mut statuses, 2);
    assert_eq!(statuses.len(), 50);

    let mut seen = std::collections::BTreeMap::new();
    for (i, (wave, c)) in statuses.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "status #{i}: {}", stderr(&o));
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "status #{i} printed no status document ({e}): {}",
                stdout(&o)
            )
        });
        let state = doc["state"].as_str().unwrap_or("").to_string();
        let lat = doc["lat_status"].as_str().unwrap_or("");
        match state.as_str() {
            "building" | "stopping" => assert_eq!(lat, "busy", "status #{i}: {doc:?}"),
            "idle" => assert_eq!(lat, "idle", "status #{i}: {doc:?}"),
            _ => panic!("status #{i}: {doc:?}"),
        }
        assert!(
            wave == 1 || state != "building",
            "status #{i} went back in time: {doc:?}"
        );
        assert_eq!(doc["build"]["id"], 1, "status #{i}: {doc:?}");
        *seen.entry((wave, state)).or_insert(0) += 1;
    }
    assert!(
        seen.contains_key(&(2, "stopping".to_string())),
        "no status was answered while the stop was pending: {seen:?}"
    );
    for (i, c) in logs.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "logs #{i}: {}", stderr(&o));
        assert!(
            stdout(&o).contains("INFO: appsdk genimage"),
            "logs #{i} printed no log: {}",
            stdout(&o)
        );
    }
    let o = stop.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "stop: {}", stderr(&o));
    assert!(stderr(&o).contains("build 1 stopped"), "{}", stderr(&o));
    let took = t.elapsed();
    legacy_stop.store(true, Ordering::Relaxed);
    let legacy_count = legacy.join().unwrap();
    eprintln!(
        "50 latc status {seen:?}, 10 latc logs, 1 stop and \
         {legacy_count} original-protocol requests in {took:?}"
    );
    // Nothing left behind: no request, no reply, no process.
    assert_eq!(channel_files(&env.channel, "req-"), Vec::<String>::new());
    assert_eq!(channel_files(&env.channel, "rep-"), Vec::<String>::new());
    env.assert_no_leftovers();
    let s = env.status_json();
    assert_eq!(s["lat_status"], "idle");
    assert_eq!(s["build_status"], "fail");
    assert_eq!(s["build"]["outcome"], "stopped");
    assert!(d.running());
}

// ---------------------------------------------------------------------
// latc never hangs
// ---------------------------------------------------------------------

/// latd frozen (SIGSTOP): `latc --timeout 1` gives up after about a
/// second, says why, withdraws its request; `latc health` says 3 at once.
#[test]
fn latc_timeout_when_latd_does_not_answer() {
    let env = TestEnv::new("timeout");
    let d = env.daemon();
    d.signal(libc::SIGSTOP);
    let _cont = Continue(d.pid());
    let t = Instant::now();
    let o = env.latc(&["status", "--timeout", "1"]);
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        took >= Duration::from_millis(950),
        "gave up early: {took:?}"
    );
    // A second of slack for a loaded machine.
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let err = stderr(&o);
    assert!(
        err.contains("no reply from latd within 1.0s")
            && err.contains("--timeout")
            && err.contains(env.channel.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(
        channel_files(&env.channel, "req-"),
        Vec::<String>::new(),
        "the unanswered request was not withdrawn"
    );
    let t = Instant::now();
    let o = env.latc(&["health"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "health printed something"
    );
    d.signal(libc::SIGCONT);
    assert!(env.status_text().contains("lat_status: idle"));
}

/// No live daemon: latc says so at once, naming the channel, whether the
/// channel is missing, latd exited, or latd died (stale heartbeat), and
/// also when latd dies while latc waits for its reply.
#[test]
fn latc_says_fast_when_no_daemon_is_alive() {
    let env = TestEnv::new("nodaemon2");
    let ch = env.channel.display().to_string();
    let check = |case: &str, want: &str, within: Duration| {
        let t = Instant::now();
        let o = env.latc(&["status"]);
        let took = t.elapsed();
        assert_eq!(o.status.code(), Some(3), "{case}: {}", stderr(&o));
        assert!(took < within, "{case}: took {took:?}");
        let err = stderr(&o);
        assert!(err.contains(want) && err.contains(&ch), "{case}: {err}");
        let t = Instant::now();
        let o = env.latc(&["health"]);
        assert_eq!(o.status.code(), Some(3), "{case}: health");
        assert!(
            t.elapsed() < within,
            "{case}: health took {:?}",
            t.elapsed()
        );
        assert!(
            o.stdout.is_empty() && o.stderr.is_empty(),
            "{case}: health printed"
        );
    };
    // Bounds are a second or two of slack above "instant" for a loaded
    // machine; the point is that latc does not wait for its 60 s timeout.
    check(
        "no channel",
        "the channel directory",
        Duration::from_secs(2),
    );
    let mut d = env.daemon();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    check("latd exited", "no latd is running", Duration::from_secs(2));

    let mut d = env.daemon();
    d.kill9();
    let alive = env.channel.join("latd.alive");
    set_mtime(&alive, Duration::from_secs(60));
    // (On one kernel the lock says so before the heartbeat is looked at.)
    check(
        "latd died long ago",
        "no latd is running",
        Duration::from_secs(2),
    );

    // latd dies while latc waits for its reply: latc notices the dead
    // heartbeat (here: as if latd had died a minute ago) at its next
    // check, long before its 60 s timeout.
    let mut d = env.daemon();
    // (The dead daemon's heartbeat file is still there: wait for an answer.)
    wait_until(Duration::from_secs(10), "the new latd to answer", || {
        env.latc(&["health"]).status.success()
    });
    d.signal(libc::SIGSTOP);
    let t = Instant::now();
    let waiting = env
        .latc_cmd()
        .arg("status")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "latc's request", || {
        !channel_files(&env.channel, "req-").is_empty()
    });
    d.kill9();
    set_mtime(&alive, Duration::from_secs(60));
    let o = waiting.wait_with_output().unwrap();
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let err = stderr(&o);
    assert!(
        (err.contains("not responding") || err.contains("no latd is running")) && err.contains(&ch),
        "{err}"
    );
}

/// `latc health`: exit code only, well under a second, idle or busy.
#[test]
fn health_is_an_exit_code_well_under_a_second() {
    let env = TestEnv::new("health");
    let _d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 60");
    for phase in ["idle", "busy"] {
        if phase == "busy" {
            assert!(env
                .latc(&["build", "--file", yaml.to_str().unwrap()])
                .status
                .success());
        }
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let o = env.latc(&["health"]);
            times.push(t.elapsed());
            assert_eq!(o.status.code(), Some(0), "{phase}: {}", stderr(&o));
            assert!(
                o.stdout.is_empty() && o.stderr.is_empty(),
                "{phase}: health printed {:?} {:?}",
                stdout(&o),
                stderr(&o)
            );
        }
        times.sort();
        assert!(
            times[2] < Duration::from_millis(500) && times[4] < Duration::from_secs(1),
            "{phase}: {times:?}"
        );
    }
    assert!(env.latc(&["stop"]).status.success());
}

// ---------------------------------------------------------------------
// Signals, crashes and restarts
// ---------------------------------------------------------------------

/// SIGTERM and SIGINT: the build's whole group is stopped (SIGKILL after
/// the grace period if it ignores SIGTERM), a waiting `latc stop` is
/// answered, the final state is recorded, latd exits 0 within grace + 1 s.
#[test]
fn sigterm_and_sigint_stop_the_build_record_it_and_exit_0() {
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        for ignore_term in [false, true] {
            let case = format!("{name}, build ignoring SIGTERM: {ignore_term}");
            let env = TestEnv::new("shutdown");
            let mut d = env.daemon_with(&["--grace", "1"]);
            let yaml = env.yaml(
                "lat.yaml",
                &format!(
                    "standin_duration: 60\nstandin_children: 3\nstandin_ignore_term: {ignore_term}"
                ),
            );
            assert!(env
                .latc(&["build", "--file", yaml.to_str().unwrap()])
                .status
                .success());
            env.wait_workers();
            // With a build that ignores SIGTERM, a `latc stop` is still
            // waiting when the signal comes: it must get its answer.
            let stop = ignore_term.then(|| {
                let c = env
                    .latc_cmd()
                    .args(["stop", "--timeout", "30"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                let status = env.channel.join("status.lat");
                wait_until(Duration::from_secs(10), "state stopping", || {
                    fs::read_to_string(&status)
                        .unwrap_or_default()
                        .contains("state: stopping")
                });
                c
            });
            let t = Instant::now();
            d.signal(sig);
            assert_eq!(
                d.wait_exit(Duration::from_secs(10)),
                Some(0),
                "{case}: exit code"
            );
            let took = t.elapsed();
            // grace (1 s) + 1 s, plus half a second for a loaded machine.
            assert!(took < Duration::from_millis(2500), "{case}: took {took:?}");
            assert!(
                env.leftover_processes().is_empty(),
                "{case}: {:?}",
                env.leftover_processes()
            );
            if let Some(c) = stop {
                let o = c.wait_with_output().unwrap();
                assert_eq!(o.status.code(), Some(0), "{case}: stop: {}", stderr(&o));
            }
            let state: serde_json::Value =
                serde_json::from_slice(&fs::read(env.channel.join("latd.state.json")).unwrap())
                    .unwrap_or_else(|e| panic!("{case}: state unreadable: {e}"));
            assert!(state["current"].is_null(), "{case}: {state}");
            let last = &state["history"][0];
            assert_eq!(last["outcome"], "stopped", "{case}: {state}");
            assert!(
                last["fail_reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("latd was shut down"),
                "{case}: {state}"
            );
            if ignore_term {
                assert_eq!(last["signal"], 9, "{case}: {state}");
            }
            let status = fs::read_to_string(env.channel.join("status.lat")).unwrap();
            assert!(
                status.contains("lat_status: idle") && status.contains("build_status: fail"),
                "{case}: {status}"
            );
            assert!(
                !env.channel.join("latd.alive").exists(),
                "{case}: heartbeat left"
            );
        }
    }
}

/// An idle latd exits 0 at once on SIGTERM and SIGINT.
#[test]
fn idle_latd_exits_0_at_once_on_sigterm_and_sigint() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let env = TestEnv::new("idleexit");
        let mut d = env.daemon();
        let t = Instant::now();
        d.signal(sig);
        assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
}

fn read_state(env: &TestEnv) -> serde_json::Value {
    let bytes = fs::read(env.channel.join("latd.state.json")).expect("latd.state.json");
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "latd.state.json is corrupt ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// latd SIGKILLed during a build, then started again: the old build's
/// processes (which did survive latd) are killed, status says the build
/// failed because it was interrupted, and the next build works.
#[test]
fn sigkill_during_a_build_then_restart() {
    let env = TestEnv::new("sigkill");
    let mut d = env.daemon_with(&["--grace", "1"]);
    env.start_build("standin_duration: 60\nstandin_children: 3\nstandin_ignore_term: true");
    d.kill9();
    // The build outlived latd: this is what the restart must clean up.
    let orphans = env.leftover_processes();
    assert!(
        orphans.len() >= 4,
        "the build did not outlive latd: {orphans:?}"
    );
    let state = read_state(&env);
    assert_eq!(state["current"]["outcome"], "running", "{state}");

    let _d = env.daemon_with(&["--grace", "1"]);
    env.assert_no_leftovers();
    let s = env.status_json();
    assert_eq!(s["lat_status"], "idle", "{s}");
    assert_eq!(s["build_status"], "fail", "{s}");
    assert_eq!(s["build"]["id"], 1);
    assert_eq!(s["build"]["outcome"], "failed");
    let reason = s["build"]["fail_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("interrupted") && reason.contains("latd was restarted"),
        "{reason}"
    );
    assert!(reason.contains("were killed"), "{reason}");
    let state = read_state(&env);
    assert!(state["current"].is_null(), "{state}");
    assert!(!env.channel.join("latd.state.json.corrupt").exists());
    // The next build gets a new id and runs.
    let quick = env.yaml("quick.yaml", "standin_duration: 0.2");
    let o = env.latc(&["build", "--file", quick.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(env.status_json()["build"]["id"], 2);
}

/// SIGKILL at awkward moments (while stopping a build that ignores
/// SIGTERM, while getyaml runs, right as a build is requested): the state
/// on disk is always readable and the restarted latd leaves nothing behind.
#[test]
fn sigkill_at_awkward_moments_never_corrupts_state() {
    let env = TestEnv::new("sigkill2");
    let stubborn = env.yaml(
        "stubborn.yaml",
        "standin_duration: 60\nstandin_ignore_term: true",
    );
    let status = env.channel.join("status.lat");
    let ws = env.ws.display().to_string();
    for moment in ["stopping", "getyaml", "build requested"] {
        let mut d = env.daemon_with(&["--grace", "5"]);
        match moment {
            "stopping" => {
                assert!(env
                    .latc(&["build", "--file", stubborn.to_str().unwrap()])
                    .status
                    .success());
                env.wait_workers();
                named_send(&env.channel, &unique_id("stop"), b"action: stop\n").unwrap();
                wait_until(Duration::from_secs(10), "state stopping", || {
                    fs::read_to_string(&status)
                        .unwrap_or_default()
                        .contains("state: stopping")
                });
            }
            "getyaml" => {
                named_send(
                    &env.channel,
                    &unique_id("yaml"),
                    format!("action: getyaml\nworkdir: {ws}\n").as_bytes(),
                )
                .unwrap();
                wait_until(Duration::from_secs(10), "appsdk exampleyamls", || {
                    env.leftover_processes()
                        .iter()
                        .any(|p| p.contains("exampleyamls"))
                });
            }
            _ => {
                let msg = format!(
                    "action: build\nworkdir: {ws}\nyaml_file: {}\n",
                    stubborn.display()
                );
                named_send(&env.channel, &unique_id("build"), msg.as_bytes()).unwrap();
                wait_until(Duration::from_secs(10), "the build's process", || {
                    env.leftover_processes()
                        .iter()
                        .any(|p| p.contains("genimage"))
                });
            }
        }
        d.kill9();
        let state = read_state(&env);
        assert!(state["history"].is_array(), "{moment}: {state}");
        let d = env.daemon_with(&["--grace", "1"]);
        env.assert_no_leftovers();
        let s = env.status_json();
        assert_eq!(s["lat_status"], "idle", "{moment}: {s}");
        read_state(&env);
        assert!(!env.channel.join("latd.state.json.corrupt").exists());
        drop(d);
    }
    // Every build is in the history once, ids increasing.
    let state = read_state(&env);
    let ids: Vec<u64> = state["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2], "{state}");
    for b in state["history"].as_array().unwrap() {
        assert_eq!(b["outcome"], "failed", "{b}");
    }
}

/// Files a previous run left: stale replies, temporary files and old
/// uncollected replies are removed at start-up; requests that were
/// complete before latd started are answered.
#[test]
fn stale_channel_files_are_handled_at_start_up() {
    let env = TestEnv::new("stale");
    fs::create_dir_all(&env.channel).unwrap();
    let ch = &env.channel;
    fs::write(
        ch.join("s-2-c.msg"),
        "action: stale-from-before\nresult: succeed\n",
    )
    .unwrap();
    fs::write(ch.join("s-2-c.done"), "").unwrap();
    fs::write(ch.join(".s-2-c.msg.999.0.tmp"), "half a reply").unwrap();
    fs::write(
        ch.join("rep-gone-client.yaml"),
        "action: status\nresult: succeed\n",
    )
    .unwrap();
    set_mtime(&ch.join("rep-gone-client.yaml"), Duration::from_secs(3600));
    fs::write(
        ch.join("rep-recent.yaml"),
        "action: status\nresult: succeed\n",
    )
    .unwrap();
    // Complete requests, waiting for a daemon.
    fs::write(ch.join("c-2-s.msg"), "action: status\n").unwrap();
    fs::write(ch.join("c-2-s.done"), "").unwrap();
    fs::write(ch.join("req-early.yaml"), "action: logs\n").unwrap();
    fs::write(ch.join("invalid_message"), "").unwrap();

    let _d = env.daemon();
    let done = ch.join("s-2-c.done");
    wait_until(REPLY_WITHIN, "the reply to the early request", || {
        done.exists()
    });
    let r: Wire = serde_yaml::from_slice(&fs::read(ch.join("s-2-c.msg")).unwrap()).unwrap();
    assert_eq!(field(&r, "action").as_deref(), Some("status"), "{r:?}");
    assert_eq!(result_of(&r), "succeed");
    fs::remove_file(&done).unwrap();
    let r = named_wait(ch, "early", REPLY_WITHIN).unwrap();
    assert_eq!(field(&r, "action").as_deref(), Some("logs"), "{r:?}");
    assert!(reason_of(&r).contains("No log file found"), "{r:?}");
    // The start-up sweep goes in slices beside the serving (a huge
    // channel must not keep latd blind): it ends soon, not before the
    // first replies.
    wait_until(REPLY_WITHIN, "the start-up sweep", || {
        !ch.join(".s-2-c.msg.999.0.tmp").exists() && !ch.join("rep-gone-client.yaml").exists()
    });
    assert!(
        ch.join("rep-recent.yaml").exists(),
        "a recent reply may still be collected"
    );
    assert!(!ch.join("c-2-s.done").exists());
    assert!(!ch.join("req-early.yaml").exists());
    assert!(!ch.join("invalid_message").exists());
    let lines = env.history_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
}

// ---------------------------------------------------------------------
// Nothing grows without bound
// ---------------------------------------------------------------------

/// 600 requests of ~4 KiB each (~2.5 MB of history): the history is
/// rotated at 1 MiB to `.1`, so the two files never hold more than 2 MiB.
#[test]
fn request_history_is_rotated_and_bounded() {
    let env = TestEnv::new("history");
    let _d = env.daemon();
    let mut msg = b"action: status\n# ".to_vec();
    msg.resize(4200, b'h');
    msg.push(b'\n');
    let n = 600;
    for i in 0..n {
        let r = named_exchange(&env.channel, &format!("h{i}"), &msg, REPLY_WITHIN).unwrap();
        assert_eq!(result_of(&r), "succeed");
    }
    let size = |name: &str| {
        fs::metadata(env.channel.join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let (cur, old) = (
        size("client_message_history"),
        size("client_message_history.1"),
    );
    let line = env.history_lines().pop().unwrap();
    let written = n as u64 * (line.len() as u64 + 1);
    assert!(written > 2 << 20, "the test wrote too little: {written}");
    assert!(cur <= 1 << 20 && old <= 1 << 20, "{cur} + {old}");
    assert!(old > 0, "never rotated");
    assert!(!env.channel.join("client_message_history.2").exists());
    assert_eq!(
        channel_files(&env.channel, "client_message_history").len(),
        2
    );
    // Lines are cut, not the whole message copied.
    assert!(line.len() < 4096 + 200, "{}", line.len());
}

/// `--history 2`: the stored state keeps the last two builds only.
#[test]
fn stored_build_history_is_capped() {
    let env = TestEnv::new("statecap");
    let _d = env.daemon_with(&["--history", "2"]);
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.1\nstandin_log_lines: 1");
    for _ in 0..4 {
        let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    let state = read_state(&env);
    let ids: Vec<u64> = state["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![3, 4], "{state}");
    let o = env.latc(&["history", "--json"]);
    let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 2, "{h}");
}

// ---------------------------------------------------------------------
// A hostile file system
// ---------------------------------------------------------------------

/// The channel directory deleted during a build: latd says so, recreates
/// it, keeps the build, and answers again.
#[test]
fn channel_deleted_while_running_is_recreated() {
    let env = TestEnv::new("chdel");
    let mut d = env.daemon_with(&["--grace", "1"]);
    env.start_build("standin_duration: 60");
    // latd may write into it meanwhile: delete until it is gone once.
    wait_until(Duration::from_secs(10), "the channel to be deleted", || {
        let _ = fs::remove_dir_all(&env.channel);
        !env.channel.exists()
    });
    wait_until(Duration::from_secs(15), "latc status to work again", || {
        env.latc(&["status", "--timeout", "5"]).status.success()
    });
    assert!(d.running());
    assert!(
        env.daemon_log().contains("is missing; recreating it"),
        "no clear log line"
    );
    let s = env.status_json();
    assert_eq!(s["state"], "building", "the build was forgotten: {s}");
    // The legacy slot works too, and the stop is recorded on disk again.
    let r = legacy_exchange(&env.channel, Some(b"action: stop\n"), REPLY_WITHIN).unwrap();
    assert_eq!(result_of(&r), "succeed", "{r:?}");
    env.assert_no_leftovers();
    let state = read_state(&env);
    assert!(state["current"].is_null(), "{state}");
    assert_eq!(state["history"][0]["outcome"], "stopped");
}

/// The channel made read-only (a read-only bind mount) while requests
/// wait: latd logs it, keeps running, and writes the replies as soon as the
/// channel is writable again; each request is answered exactly once.
#[test]
fn read_only_channel_replies_are_retried_when_writable_again() {
    if skip_unless_root("read_only_channel_replies_are_retried_when_writable_again") {
        return;
    }
    let env = TestEnv::new("rochan");
    let mut d = env.daemon();
    // A writable view of the same directory, for the clients.
    let rw = env.root.join("channel-rw");
    let _rw = MountGuard::bind(&env.channel, &rw);
    let mut ro = MountGuard::bind(&env.channel, &env.channel);
    ro.remount_read_only();
    assert!(
        fs::write(env.channel.join("probe"), "x").is_err(),
        "not read-only"
    );
    // latd holds the channel open; it takes up what is mounted over it.
    wait_until(Duration::from_secs(5), "latd to take up the mount", || {
        env.daemon_log().contains("is another directory now")
    });

    let latc = env
        .latc_cmd()
        .args([
            "status",
            "--timeout",
            "30",
            "--channel",
            rw.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let legacy = {
        let rw = rw.clone();
        std::thread::spawn(move || legacy_exchange(&rw, Some(b"action: status\n"), REPLY_WITHIN))
    };
    wait_until(
        Duration::from_secs(5),
        "latd to report the failed replies",
        || {
            let log = env.daemon_log();
            log.contains("cannot write the reply to req-")
                && log.contains("cannot write the reply to c-2-s.msg")
        },
    );
    assert!(d.running());
    assert!(!rw.join("s-2-c.done").exists());
    assert!(channel_files(&rw, "rep-").is_empty());

    ro.unmount();
    let o = latc.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("lat_status: idle"), "{}", stdout(&o));
    let r = legacy.join().unwrap().unwrap();
    assert_eq!(field(&r, "action").as_deref(), Some("status"));
    assert_eq!(result_of(&r), "succeed");
    assert!(env.daemon_log().contains("written after a retry"));
    // The requests latd could not remove are gone now, and not answered
    // twice.
    wait_until(
        Duration::from_secs(5),
        "the handled requests to be removed",
        || {
            channel_files(&env.channel, "req-").is_empty()
                && !env.channel.join("c-2-s.done").exists()
        },
    );
    assert!(channel_files(&env.channel, "rep-").is_empty());
    assert!(!env.channel.join("s-2-c.done").exists(), "answered twice");
    assert_serves_next_request(&env, &mut d, "a read-only channel");
}

/// The disk holding the channel fills up while a stop waits for its
/// build: latd logs the failures, keeps running, and delivers the reply
/// and records the final state once space is freed.
#[test]
fn full_disk_reply_is_retried_when_space_returns() {
    if skip_unless_root("full_disk_reply_is_retried_when_space_returns") {
        return;
    }
    let env = TestEnv::new("diskfull");
    let _mnt = MountGuard::tmpfs(&env.channel, "size=1m,mode=755");
    let mut d = env.daemon_with(&["--grace", "1"]);
    env.start_build("standin_duration: 60\nstandin_ignore_term: true");
    let stop = env
        .latc_cmd()
        .args(["stop", "--timeout", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = env.channel.join("status.lat");
    wait_until(Duration::from_secs(10), "state stopping", || {
        fs::read_to_string(&status)
            .unwrap_or_default()
            .contains("state: stopping")
    });
    // Freeze latd while the disk is filled, so that the reply (due after
    // the 1 s grace period) is written to a full disk.
    d.signal(libc::SIGSTOP);
    let cont = Continue(d.pid());
    let filler = env.channel.join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = f.write_all(&block) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
        // Also the last partial block.
        while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
    }
    drop(cont);
    wait_until(
        Duration::from_secs(10),
        "latd to report the failed reply",
        || env.daemon_log().contains("cannot write the reply to req-"),
    );
    assert!(d.running());
    let log = env.daemon_log();
    assert!(log.contains("No space left on device"), "no clear error");
    assert!(
        env.leftover_processes().is_empty(),
        "the stop did not happen"
    );

    fs::remove_file(&filler).unwrap();
    let o = stop.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("build 1 stopped"), "{}", stderr(&o));
    // status.lat catches up by itself, before anyone asks for status.
    wait_until(Duration::from_secs(5), "status.lat to say idle", || {
        let text = fs::read_to_string(&status).unwrap_or_default();
        text.contains("lat_status: idle") && text.contains("build_status: fail")
    });
    let s = env.status_json();
    assert_eq!(s["lat_status"], "idle", "{s}");
    assert_eq!(s["build"]["outcome"], "stopped", "{s}");
    // The state that could not be saved is saved once space returns, so a
    // restart does not report the stopped build as "interrupted".
    wait_until(Duration::from_secs(5), "the final state on disk", || {
        read_state(&env)["current"].is_null()
    });
}

/// `clean` meets a mount point inside the workspace (left by a killed
/// build): it refuses with a reason naming the path, empties nothing of the
/// mounted file system, latd keeps serving, and once the mount is gone the
/// next `clean` works.
#[test]
fn clean_reports_a_mount_point_by_name_and_recovers() {
    if skip_unless_root("clean_reports_a_mount_point_by_name_and_recovers") {
        return;
    }
    let env = TestEnv::new("cleanmnt");
    let mut d = env.daemon();
    let mnt = env.ws.join("deploy/rootfs/proc");
    let mut guard = MountGuard::tmpfs(&mnt, "size=64k");
    fs::write(mnt.join("precious"), "x").unwrap();
    fs::create_dir_all(env.ws.join("log")).unwrap();
    fs::write(env.ws.join("log/old.log"), "x").unwrap();
    let o = env.latc(&["clean"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{} is a mount point", mnt.display())) && err.contains("unmount it"),
        "{err}"
    );
    assert!(
        mnt.join("precious").exists(),
        "clean emptied a mounted file system"
    );
    assert!(
        env.daemon_log()
            .contains(&format!("{} is a mount point", mnt.display())),
        "no clear log line"
    );
    assert!(d.running());
    assert!(env.status_text().contains("lat_status: idle"));
    guard.unmount();
    let o = env.latc(&["clean"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!env.ws.join("deploy").exists() && !env.ws.join("log").exists());
}

/// `clean` meets a file it may not remove (immutable as root, a read-only
/// directory otherwise): a reason naming the path, latd keeps serving, and
/// the next `clean` works once the condition clears.
#[test]
fn clean_reports_a_path_it_cannot_remove_and_recovers() {
    let env = TestEnv::new("cleanperm");
    let mut d = env.daemon();
    let dir = env.ws.join("workdir/tmp");
    fs::create_dir_all(&dir).unwrap();
    let stuck = dir.join("stuck");
    fs::write(&stuck, "x").unwrap();
    let (imm, ro) = if is_root() {
        (Some(Immutable::set(&stuck)), None)
    } else {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();
        (None, Some(ReadOnlyDir(dir.clone())))
    };
    let o = env.latc(&["clean"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("cannot remove {}", stuck.display())),
        "{err}"
    );
    assert!(
        err.contains("Operation not permitted") || err.contains("Permission denied"),
        "{err}"
    );
    assert!(
        env.daemon_log()
            .contains(&format!("cannot remove {}", stuck.display())),
        "no clear log line"
    );
    assert!(d.running());
    assert!(env.status_text().contains("lat_status: idle"));
    drop(imm);
    drop(ro);
    let o = env.latc(&["clean"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!env.ws.join("workdir").exists());
}

/// latd SIGKILLed right after it forked a build, before it saved the
/// build's process id: the restarted latd must still leave no process of
/// that build alive, and must not claim that the build never started.
// (latd marks every process it starts with LATD_CHANNEL=<channel> in the
// environment, and a restarted latd kills what carries its channel's mark.)
#[test]
fn sigkill_right_after_the_build_is_forked() {
    let env = TestEnv::new("sigkillfork");
    let yaml = env.yaml("lat.yaml", "standin_duration: 60\nstandin_children: 2");
    let msg = format!(
        "action: build\nworkdir: {}\nyaml_file: {}\n",
        env.ws.display(),
        yaml.display()
    );
    // The window is a few milliseconds wide: try until latd is caught in
    // it (almost always the first time).
    for attempt in 0..20 {
        let mut d = env.daemon_with(&["--grace", "1"]);
        let children = format!("/proc/{}/task/{}/children", d.pid(), d.pid());
        named_send(&env.channel, &unique_id("fork"), msg.as_bytes()).unwrap();
        // Kill latd the moment its first child exists.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_to_string(&children)
            .unwrap_or_default()
            .trim()
            .is_empty()
        {
            assert!(Instant::now() < deadline, "no build was forked");
        }
        d.kill9();
        let state = read_state(&env);
        let caught = state["current"]["process"].is_null();
        let _d = env.daemon_with(&["--grace", "1"]);
        env.assert_no_leftovers();
        if caught {
            let s = env.status_json();
            let reason = s["build"]["fail_reason"].as_str().unwrap_or("");
            assert!(
                reason.contains("interrupted") && !reason.contains("had not started"),
                "{reason}"
            );
            return;
        }
        eprintln!("attempt {attempt}: latd had saved the process id; again");
    }
    panic!("latd was never killed between the fork and saving the process id");
}

/// FIFOs (and symlinks) planted where latd writes its own files must not
/// hang it or steer its writes: it keeps answering.
#[test]
fn fifos_in_place_of_latds_files_do_not_hang_it() {
    let env = TestEnv::new("fifos");
    let _d = env.daemon();
    let mkfifo = |p: &std::path::Path| {
        let _ = fs::remove_file(p);
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: c is a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    };
    mkfifo(&env.channel.join("latd.alive"));
    mkfifo(&env.channel.join("client_message_history"));
    fs::create_dir_all(env.ws.join("log")).unwrap();
    mkfifo(&env.ws.join("log/console.log"));
    let outside = env.root.join("outside-target");
    fs::write(&outside, "keep").unwrap();
    std::os::unix::fs::symlink(&outside, env.ws.join("log/getyaml.log")).unwrap();
    // latd rewrites its heartbeat within a couple of seconds.
    wait_until(
        Duration::from_secs(10),
        "latd.alive to be a file again",
        || fs::symlink_metadata(env.channel.join("latd.alive")).is_ok_and(|m| m.is_file()),
    );
    let o = env.latc(&["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.latc(&["getyaml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fs::read_to_string(&outside).unwrap(),
        "keep",
        "a write followed a symlink"
    );
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.2");
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(fs::symlink_metadata(env.ws.join("log/console.log"))
        .unwrap()
        .is_file());
    assert!(
        fs::symlink_metadata(env.channel.join("client_message_history"))
            .unwrap()
            .is_file()
    );
}

/// The channel's path swapped for a symlink to another directory while
/// latd runs: latd does not follow it (no file of its appears there) and
/// keeps serving the directory it had.
#[test]
fn a_channel_swapped_for_a_symlink_is_not_followed() {
    let env = TestEnv::new("chanlink");
    let _d = env.daemon();
    let elsewhere = env.root.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let moved = env.root.join("channel-moved");
    fs::rename(&env.channel, &moved).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &env.channel).unwrap();
    wait_until(Duration::from_secs(10), "latd to notice", || {
        env.daemon_log().contains("was replaced by a symlink")
    });
    // The heartbeat goes on in the directory latd holds, not elsewhere.
    let alive = moved.join("latd.alive");
    let before = fs::metadata(&alive).unwrap().modified().unwrap();
    wait_until(Duration::from_secs(10), "a heartbeat", || {
        fs::metadata(&alive).unwrap().modified().unwrap() > before
    });
    let names: Vec<_> = fs::read_dir(&elsewhere)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        names.is_empty(),
        "latd wrote through the symlink: {names:?}"
    );
    // A client of the directory latd holds is still answered.
    let o = env
        .latc_cmd()
        .args(["status", "--channel", moved.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}
