//! latc and latd as people meet them: pipes and signals, the arguments
//! people type, output for people, start-up mistakes, permissions, and the
//! README saying what `--help` says. The real binaries, real pipes, real
//! signals, a real pseudo-terminal (script(1)) where a terminal matters.

mod common;
use common::*;
use std::ffi::OsStr;
use std::fs;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A pipe whose reader is already gone, as stdout: the first write fails
/// with EPIPE (SIGPIPE).
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe() returns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: closing the read end we own; the write end becomes the
    // child's stdout (owned by the Stdio from here on).
    unsafe {
        libc::close(fds[0]);
        Stdio::from_raw_fd(fds[1])
    }
}

fn assert_ended_by_sigpipe(o: &Output, what: &str) {
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGPIPE),
        "{what}: {:?}, stderr: {}",
        o.status,
        stderr(o)
    );
    assert!(!stderr(o).contains("panicked"), "{what}: {}", stderr(o));
}

/// Runs `cmd` (a shell command line) on a pseudo-terminal; its output
/// (stdout and stderr both), or None when script(1) is missing.
fn on_terminal(env: &TestEnv, cmd: &str) -> Option<Output> {
    Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .env("WORKSPACE_DIR", &env.ws)
        .env_remove("LAT_CHANNEL_DIR")
        .stdin(Stdio::null())
        .output()
        .ok()
}

fn spawn_waiter(env: &TestEnv, args: &[&str]) -> Child {
    env.latc_cmd()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

// ---------------------------------------------------------------------
// 1. Pipes and signals
// ---------------------------------------------------------------------

#[test]
fn a_closed_stdout_ends_latc_by_sigpipe_never_a_panic() {
    let env = TestEnv::new("epipe");
    let _d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.2");
    assert!(env
        .latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"])
        .status
        .success());
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["history"],
        &["history", "--json"],
        &["logs"],
        &["logs", "--build", "1"],
        &["getyaml"],
        &["--help"],
        &["--version"],
    ] {
        let o = env
            .latc_cmd()
            .args(args)
            .stdout(closed_pipe())
            .output()
            .unwrap();
        assert_ended_by_sigpipe(&o, &format!("latc {args:?}"));
    }
    let o = Command::new(LATD)
        .arg("--help")
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert_ended_by_sigpipe(&o, "latd --help");
    // Through a shell, as people type it: the conventional 141.
    let o = Command::new("bash")
        .args([
            "-c",
            // The reader closes its end first, then says so; only then
            // does latc start writing.
            &format!(
                "set -o pipefail; g={}/closed
                 {{ while [ ! -e $g ]; do sleep 0.01; done; {LATC} history; }} | {{ exec 0<&-; touch $g; }}
                 echo $?",
                env.root.display()
            ),
        ])
        .env("WORKSPACE_DIR", &env.ws)
        .output()
        .unwrap();
    assert_eq!(stdout(&o).trim(), "141", "{}", stderr(&o));
}

#[test]
fn build_wait_into_a_closed_pipe_does_not_claim_the_builds_result() {
    let env = TestEnv::new("epipewait");
    let _d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 60");
    // The pipe is closed before the build writes its first line: latc
    // notices at once, says what goes on, and ends by SIGPIPE.
    let o = env
        .latc_cmd()
        .args(["build", "--file", yaml.to_str().unwrap(), "--wait"])
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert_ended_by_sigpipe(&o, "build --wait");
    assert!(
        stderr(&o).contains("stopped waiting for build 1, which goes on"),
        "{}",
        stderr(&o)
    );
    assert_eq!(env.status_json()["state"], "building");
    // Under pipefail the shell sees 141, not 0, while the build runs.
    let o = Command::new("bash")
        .args([
            "-c",
            &format!("set -o pipefail; {LATC} logs --follow | true; echo $?"),
        ])
        .env("WORKSPACE_DIR", &env.ws)
        .output()
        .unwrap();
    assert_eq!(stdout(&o).trim(), "141", "{}", stderr(&o));
    assert_eq!(env.status_json()["state"], "building");
    assert!(env.latc(&["stop"]).status.success());
}

#[test]
fn sigterm_of_latd_during_a_wait_reports_the_builds_real_outcome() {
    let env = TestEnv::new("termwait");
    let mut d = env.daemon_with(&["--grace", "1"]);
    let yaml = env.yaml("lat.yaml", "standin_duration: 60");
    let build_wait = spawn_waiter(&env, &["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    env.wait_workers();
    let wait = spawn_waiter(&env, &["wait"]);
    // Its requests carry its pid: two of them, and it is watching.
    let mark = format!("-{}-", wait.id());
    wait_until(Duration::from_secs(10), "latc wait to watch", || {
        env.history_lines()
            .iter()
            .filter(|l| l.contains(&mark))
            .count()
            >= 2
    });
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    for (what, child) in [("build --wait", build_wait), ("wait", wait)] {
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(4), "{what}: {err}");
        assert!(err.contains("build 1 stopped after"), "{what}: {err}");
        assert!(err.contains("latd's saved state"), "{what}: {err}");
        assert!(!err.contains("error:"), "{what}: {err}");
    }
}

// ---------------------------------------------------------------------
// 2. Arguments people type
// ---------------------------------------------------------------------

#[test]
fn help_short_flags_typos_and_one_error_format() {
    for args in [
        &["-h"][..],
        &["build", "-h"],
        &["help", "logs"],
        &["logs", "--help"],
    ] {
        let o = Command::new(LATC).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "latc {args:?}: {}", stderr(&o));
        assert!(
            stdout(&o).starts_with("Usage: latc"),
            "{args:?}: {}",
            stdout(&o)
        );
    }
    let o = Command::new(LATD).arg("-h").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).starts_with("Usage: latd"));
    for (args, says) in [
        (
            &["stauts"][..],
            "latc: error: unknown command 'stauts'; did you mean 'status'?",
        ),
        (&["hsitory"], "did you mean 'history'?"),
        (&["fly"], "the commands are build, status"),
        (
            &["--bogus", "status"],
            "latc: error: unrecognized argument: --bogus",
        ),
        (
            &["status", "--bogus"],
            "latc: error: unrecognized argument: --bogus",
        ),
        (&["--timeout", "soon", "status"], "latc: error: "),
        (&["build", "lat.yaml"], "latc build --file lat.yaml"),
        (
            &["status", "-w"],
            "latc: error: -w is --workspace and needs a directory",
        ),
        (
            &["logs", "--workspace"],
            "latc: error: --workspace needs a value",
        ),
        (&[], "latc: error: no command given"),
    ] {
        let o = Command::new(LATC).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "latc {args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "latc {args:?}: {}", stderr(&o));
        assert!(stderr(&o).starts_with("latc: error: "), "{}", stderr(&o));
    }
    let o = Command::new(LATD).arg("--bogus").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("latd: error: unrecognized argument: --bogus"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn arguments_that_are_not_utf8_are_refused_cleanly() {
    let bad = OsStr::from_bytes(b"/tmp/\xff.yaml");
    let mut glued = OsStr::new("--file=").to_os_string();
    glued.push(bad);
    for (bin, prog, args) in [
        (
            LATC,
            "latc",
            vec![OsStr::new("build"), OsStr::new("--file"), bad],
        ),
        (LATC, "latc", vec![glued.as_os_str(), OsStr::new("build")]),
        (LATC, "latc", vec![bad]),
        (LATD, "latd", vec![OsStr::new("--sdk"), bad]),
        (LATD, "latd", vec![bad]),
    ] {
        let o = Command::new(bin).args(&args).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{bin} {args:?}: {err}");
        assert!(err.starts_with(&format!("{prog}: error: ")), "{err}");
        assert!(err.contains("is not valid UTF-8"), "{err}");
        // The bad argument is named, in its lossy form.
        assert!(err.contains("/tmp/\u{FFFD}.yaml"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn file_options_wherever_callers_put_them_and_follow_as_f() {
    let env = TestEnv::new("argsplaces");
    let _d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 1\nstandin_log_lines: 4");
    let y = yaml.to_str().unwrap();
    // The 2022 callers: `latc --file=... -t std build` (-t was a kernel type).
    let o = env.latc(&[&format!("--file={y}"), "-t", "std", "build"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(env.status_text().starts_with("lat_status: busy\n"));
    // `logs -f` follows, as `tail -f` does, and exits with the result.
    let o = env.latc(&["logs", "-f"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("DEBUG: Deploy ovmf.qcow2"),
        "{}",
        stdout(&o)
    );
    for args in [
        vec!["build".to_string(), format!("--file={y}"), "--wait".into()],
        vec!["build".into(), "--wait".into(), "--file".into(), y.into()],
        vec!["build".into(), "-f".into(), y.into(), "--wait".into()],
        vec!["-f".into(), y.into(), "build".into(), "--wait".into()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = env.latc(&args);
        assert_eq!(o.status.code(), Some(0), "latc {args:?}: {}", stderr(&o));
        let o = env.latc(&["wait", "-f"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(stdout(&o).contains("DEBUG: Deploy ovmf.qcow2"));
    }
}

// ---------------------------------------------------------------------
// 3. Output for people
// ---------------------------------------------------------------------

#[test]
fn status_keeps_the_original_lines_first_then_speaks_plainly() {
    let env = TestEnv::new("humanstatus");
    let _d = env.daemon();
    // The YAML's name holds the word the deployed caller looks for.
    let yaml = env.yaml("idle.yaml", "standin_duration: 60\nstandin_log_lines: 30");
    assert!(env
        .latc(&["build", "--file", yaml.to_str().unwrap()])
        .status
        .success());
    env.wait_workers();
    let text = env.status_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..2],
        ["lat_status: busy", "build_status: running"],
        "{text}"
    );
    let doc = fs::read_to_string(env.channel.join("status.lat")).unwrap();
    assert!(
        text.starts_with(
            &doc.lines()
                .take(2)
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        ),
        "not byte for byte: {text}"
    );
    for w in [
        "state: building",
        "build: 1 (genimage)\n",
        "running for ",
        "last log line: ",
        "latd: pid ",
    ] {
        assert!(text.contains(w), "{w}: {text}");
    }
    assert!(
        !text.contains("idle"),
        "a busy status must not contain 'idle' anywhere: {text}"
    );
    assert!(env.latc(&["stop"]).status.success());
    let text = env.status_text();
    assert!(
        text.starts_with("lat_status: idle\nbuild_status: fail\n"),
        "{text}"
    );
    assert!(text.contains("stopped after "), "{text}");
    assert!(text.contains(" ago)"), "{text}");
    assert!(text.contains("\nyaml: "), "{text}");
    assert!(text.contains("idle.yaml"), "{text}");
    assert!(
        !text.contains("_at:"),
        "no epoch milliseconds for people: {text}"
    );
    // Exact values on request.
    let s = env.status_json();
    assert!(s["build"]["started_at"].as_u64().unwrap() > 1_600_000_000_000);
}

fn has_human_time(text: &str) -> bool {
    // 2026-12-01 21:10:03 (UTC)
    text.as_bytes().windows(19).any(|w| {
        w.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
    })
}

#[test]
fn history_shows_human_times_and_the_reason() {
    let env = TestEnv::new("humanhistory");
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.3\nstandin_result: fail");
    {
        let _d = env.daemon();
        let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
        assert_eq!(o.status.code(), Some(1));
    }
    // A build latd itself was lost under is "interrupted", not any failure.
    {
        let mut d = env.daemon();
        env.start_build("standin_duration: 60");
        d.kill9();
    }
    fs::remove_file(env.channel.join("latd.alive")).unwrap();
    let _d = env.daemon();
    wait_until(Duration::from_secs(10), "the lost build recorded", || {
        let o = env.latc(&["history", "--json"]);
        let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        h[1]["outcome"] == "failed"
    });
    let o = env.latc(&["history"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("   ID  STARTED"), "{text}");
    assert!(text.contains("REASON"), "{text}");
    assert!(text.contains("exited with code 1"), "{text}");
    assert!(text.contains("interrupted"), "{text}");
    assert!(has_human_time(&text), "{text}");
    let o = env.latc(&["history", "--json"]);
    let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(h[0]["started_at"].is_u64(), "{h}");
}

/// Waits until the wall clock's second changes: logs the SDK names by the
/// second it began must not share one.
fn next_second() {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let s = now();
    wait_until(Duration::from_secs(3), "the next second", || now() > s);
}

#[test]
fn logs_of_any_kept_build_and_following_one() {
    let env = TestEnv::new("logsbuild");
    let _d = env.daemon();
    // Each YAML names itself: the SDK logs what it read of it (latd hands
    // it a private copy, so the file's own name is not in the log).
    for name in ["first.yaml", "second.yaml"] {
        let y = env.yaml(name, &format!("standin_duration: 0.3\nlabel: {name}"));
        let o = env.latc(&["build", "--file", y.to_str().unwrap(), "--wait"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        next_second();
    }
    let o = env.latc(&["logs", "--build", "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("first.yaml"), "{}", stdout(&o));
    assert!(!stdout(&o).contains("second.yaml"), "{}", stdout(&o));
    let o = env.latc(&["logs", "--build", "2"]);
    assert!(stdout(&o).contains("second.yaml"), "{}", stdout(&o));
    let o = env.latc(&["logs", "--build", "9"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not in latd's history"),
        "{}",
        stderr(&o)
    );
    // A running build, followed by its id until it ends.
    let y = env.yaml(
        "third.yaml",
        "standin_duration: 1.5\nstandin_log_lines: 5\nlabel: third.yaml",
    );
    assert!(env
        .latc(&["build", "--file", y.to_str().unwrap()])
        .status
        .success());
    let o = env.latc(&["logs", "-b", "3", "-f"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("third.yaml"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("DEBUG: Deploy ovmf.qcow2"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("build 3 succeeded"), "{}", stderr(&o));
}

#[test]
fn stop_reports_its_progress_on_a_terminal() {
    let env = TestEnv::new("stopprogress");
    let _d = env.daemon_with(&["--grace", "3"]);
    env.start_build("standin_duration: 60\nstandin_ignore_term: true");
    let Some(o) = on_terminal(&env, &format!("{LATC} stop")) else {
        skipped("stop_reports_its_progress_on_a_terminal: script(1) is not available");
        assert!(env.latc(&["stop"]).status.success());
        return;
    };
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text:?}");
    assert!(
        text.contains("\r\x1b[Klatc: stopping build 1: "),
        "{text:?}"
    );
    assert!(text.contains("s since SIGTERM"), "{text:?}");
    assert_eq!(env.status_json()["state"], "idle");
}

// ---------------------------------------------------------------------
// 4. Start-up that cannot be misconfigured silently
// ---------------------------------------------------------------------

/// Starts latd in `cwd` with exactly `args`; its stderr goes to a file.
fn latd_in(env: &TestEnv, cwd: &Path, args: &[&str]) -> Child {
    let log = fs::File::create(env.root.join("latd-relative.log")).unwrap();
    Command::new(LATD)
        .args(args)
        .arg("-d")
        .current_dir(cwd)
        .env_remove("LAT_CHANNEL_DIR")
        .env_remove("LAT_SDK_DIR")
        .env_remove("WORKSPACE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[test]
fn relative_paths_work_and_an_sdk_without_its_script_is_refused() {
    let env = TestEnv::new("relative");
    std::os::unix::fs::symlink(sdk_dir(), env.root.join("sdk")).unwrap();
    let child = latd_in(
        &env,
        &env.root,
        &["--workspace", "ws", "--sdk", "./sdk", "--grace", "1"],
    );
    let mut d = Daemon {
        child: Some(child),
        channel: env.channel.clone(),
    };
    wait_until(Duration::from_secs(10), "latd to come up", || {
        env.channel.join("latd.alive").exists()
    });
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.3");
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // latc's side too: a relative workspace is sent absolute.
    let o = env
        .latc_cmd()
        .current_dir(&env.root)
        .env("WORKSPACE_DIR", "ws")
        .args(["build", "--file", "ws/lat.yaml", "--wait"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));

    // An SDK directory without its environment script: refused at start.
    let empty = env.root.join("not-an-sdk");
    fs::create_dir_all(&empty).unwrap();
    fs::remove_dir_all(&env.channel).unwrap();
    let o = Command::new(LATD)
        .args(["--workspace", "ws", "--sdk", "not-an-sdk"])
        .current_dir(&env.root)
        .env_remove("LAT_SDK_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with("latd: error: "), "{err}");
    assert!(
        err.contains(empty.to_str().unwrap()),
        "the absolute path: {err}"
    );
    assert!(
        err.contains("environment-setup-corei7-64-wrs-linux"),
        "{err}"
    );
    assert!(err.contains("--sdk"), "{err}");
    assert!(!env.channel.exists(), "latd served before refusing");
}

#[test]
fn a_build_that_fails_before_the_sdk_logs_quotes_its_console_output() {
    let env = TestEnv::new("earlyfail");
    // An SDK whose environment script fails before appsdk ever runs.
    let bad = env.root.join("broken-sdk");
    fs::create_dir_all(&bad).unwrap();
    fs::write(
        bad.join("environment-setup-corei7-64-wrs-linux"),
        "echo 'broken-sdk: the toolchain is not installed' >&2\nreturn 1\n",
    )
    .unwrap();
    let _d = Daemon {
        child: Some(latd_in(
            &env,
            &env.root,
            &[
                "--workspace",
                env.ws.to_str().unwrap(),
                "--sdk",
                bad.to_str().unwrap(),
            ],
        )),
        channel: env.channel.clone(),
    };
    wait_until(Duration::from_secs(10), "latd to come up", || {
        env.channel.join("latd.alive").exists()
    });
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.3");
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let missing = env.ws.join("log/log.appsdk");
    assert!(!missing.exists());
    assert!(
        err.contains(&format!("{} does not exist", missing.display())),
        "{err}"
    );
    assert!(
        !err.contains(&format!("see {}", missing.display())),
        "{err}"
    );
    assert!(err.contains("console.log begins:"), "{err}");
    assert!(
        err.contains("| broken-sdk: the toolchain is not installed"),
        "{err}"
    );
    let text = env.status_text();
    assert!(
        text.contains("broken-sdk: the toolchain is not installed"),
        "{text}"
    );
    let text = stdout(&env.latc(&["history"]));
    assert!(text.contains("console.log begins:"), "{text}");
    // latd's own record names the console output too.
    let s = env.status_json();
    let reason = s["build"]["fail_reason"].as_str().unwrap();
    assert!(
        reason.contains("log/console.log if the SDK made no log"),
        "{reason}"
    );
    let o = env.latc(&["logs"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("No log file found"), "{}", stderr(&o));
    assert!(stderr(&o).contains("log/console.log"), "{}", stderr(&o));
    assert!(
        !text.contains(&format!("see {}", missing.display())),
        "{text}"
    );
}

// ---------------------------------------------------------------------
// 5. Permissions: health, and a channel a non-root builder can use
// ---------------------------------------------------------------------

const NOBODY: u32 = 65534;

fn latc_as(env: &TestEnv, uid: u32, args: &[&str]) -> Output {
    env.latc_cmd()
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

#[test]
fn health_tells_dead_from_cannot_look_and_a_channel_group_lets_a_builder_in() {
    if skip_unless_root("health_tells_dead_from_cannot_look_and_a_channel_group_lets_a_builder_in")
    {
        return;
    }
    let env = TestEnv::new("perm");
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.3");
    {
        // The channel latd makes under a root-owned workspace is root's.
        let _d = env.daemon();
        assert_eq!(latc_as(&env, 0, &["health"]).status.code(), Some(0));
        let o = latc_as(&env, NOBODY, &["health"]);
        assert_eq!(
            o.status.code(),
            Some(5),
            "cannot look, not dead: {}",
            stderr(&o)
        );
        let o = latc_as(&env, NOBODY, &["-d", "health"]);
        assert!(
            stderr(&o).contains("cannot write the request"),
            "{}",
            stderr(&o)
        );
    }
    // Dead: no heartbeat.
    assert_eq!(latc_as(&env, 0, &["health"]).status.code(), Some(3));
    fs::remove_file(env.channel.join("latd.alive")).ok();
    // Given to the builder's group, the channel is the group's.
    let _d = env.daemon_with(&["--grace", "1", "--channel-group", &NOBODY.to_string()]);
    let md = fs::metadata(&env.channel).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md.gid(), NOBODY);
    assert_eq!(md.mode() & 0o7777, 0o2770);
    let o = latc_as(&env, NOBODY, &["health"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = latc_as(
        &env,
        NOBODY,
        &["build", "--file", yaml.to_str().unwrap(), "--wait"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = latc_as(&env, NOBODY, &["status"]);
    assert!(
        stdout(&o).starts_with("lat_status: idle\n"),
        "{}",
        stderr(&o)
    );
    // Others are kept out.
    let o = latc_as(&env, 12345, &["health"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
}

// ---------------------------------------------------------------------
// 6. The README says what --help says; CI counts what it skipped
// ---------------------------------------------------------------------

fn readme() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

#[test]
fn readme_and_help_agree_on_exit_codes_and_start_up() {
    let help = stdout(&Command::new(LATC).arg("--help").output().unwrap());
    let health = stdout(
        &Command::new(LATC)
            .args(["health", "--help"])
            .output()
            .unwrap(),
    );
    let latd_help = stdout(&Command::new(LATD).arg("--help").output().unwrap());
    let readme = readme();
    for code in ["0", "1", "2", "3", "4", "5", "130", "141"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))),
            "latc --help lacks exit code {code}"
        );
        assert!(
            readme.contains(&format!("| {code} |")),
            "the README's exit code table lacks {code}"
        );
    }
    assert!(health.contains("5 latc cannot look"), "{health}");
    assert!(
        readme.contains("## Run it by hand"),
        "no section to run latd by hand"
    );
    for w in [
        "--channel-group",
        "LAT_CHANNEL_GROUP",
        "2770",
        "environment-setup-corei7-64-wrs-linux",
    ] {
        assert!(latd_help.contains(w), "latd --help lacks {w}");
        assert!(readme.contains(w), "README lacks {w}");
    }
    for w in ["--build N", "-f", "-t std"] {
        assert!(readme.contains(w), "README lacks {w}");
    }
}

#[test]
fn ci_counts_skipped_tests_as_skipped() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ci/count");
    let sample = "\
running 3 tests
SKIPPED a_root_test: needs root (run the suite as root, as CI does)
test a_root_test ... ok
test b ... ok
test c ... ignored
test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out
running 2 tests
SKIPPED d: bindfs is not installed
test d ... ok
test e ... FAILED
test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out
";
    let log = std::env::temp_dir().join(format!("latd-ci-count-{}.log", std::process::id()));
    fs::write(&log, sample).unwrap();
    let o = Command::new("bash")
        .arg(&script)
        .arg(&log)
        .output()
        .unwrap();
    let _ = fs::remove_file(&log);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim(),
        "ci: 1 passed, 1 failed, 3 skipped (2 printed SKIPPED, 1 ignored)"
    );
}
