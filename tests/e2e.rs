//! End to end: the real latd and latc binaries, the stand-in SDK, real
//! processes, signals and files, each test in its own directory.

mod common;
use common::*;
use std::fs;
use std::time::{Duration, Instant};

#[test]
fn deployed_caller_sequence_build_follow_stop_idle() {
    let env = TestEnv::new("deployed");
    let _d = env.daemon();
    // The deployed script copies its YAML to the workspace and calls latc
    // with --file=VALUE before the action.
    let yaml = env.yaml("lat.yaml", "standin_duration: 1\nstandin_log_lines: 5");
    let o = env.latc(&[&format!("--file={}", yaml.display()), "build"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(env.status_text().contains("lat_status: busy"));
    // It follows the log until the success line, then stops at once.
    let log = env.ws.join("log/log.appsdk");
    wait_until(Duration::from_secs(20), "the success line", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("DEBUG: Deploy ovmf.qcow2")
    });
    let o = env.latc(&["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Right after stop returns, status says idle, and the build that had
    // succeeded keeps its result.
    let text = env.status_text();
    assert!(text.contains("lat_status: idle"), "{text}");
    assert!(text.contains("build_status: succeed"), "{text}");
    env.assert_no_leftovers();
}

#[test]
fn stop_kills_every_process_of_the_build_and_answers_when_gone() {
    let env = TestEnv::new("stop");
    let _d = env.daemon();
    env.start_build("standin_duration: 60\nstandin_children: 3");
    let o = env.latc(&["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The reply came after the processes were gone.
    assert!(
        env.leftover_processes().is_empty(),
        "{:?}",
        env.leftover_processes()
    );
    let s = env.status_json();
    assert_eq!(s["lat_status"], "idle");
    assert_eq!(s["build_status"], "fail");
    assert_eq!(s["build"]["outcome"], "stopped");
}

#[test]
fn stop_escalates_to_sigkill_after_the_grace_period() {
    let env = TestEnv::new("kill");
    let _d = env.daemon_with(&["--grace", "1"]);
    env.start_build("standin_duration: 60\nstandin_ignore_term: true");
    let t = Instant::now();
    let o = env.latc(&["stop"]);
    let took = t.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        took >= Duration::from_millis(900),
        "SIGKILL came before the grace period: {took:?}"
    );
    assert!(
        env.leftover_processes().is_empty(),
        "{:?}",
        env.leftover_processes()
    );
    let s = env.status_json();
    assert_eq!(s["build"]["signal"], 9);
    assert!(s["build"]["fail_reason"]
        .as_str()
        .unwrap()
        .contains("killed after the grace period"));
}

#[test]
fn failed_build_reports_fail_and_wait_exits_1() {
    let env = TestEnv::new("fail");
    let _d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.3\nstandin_result: fail");
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("ERROR: "),
        "the log was streamed: {}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("failed after"), "{}", stderr(&o));
    let s = env.status_json();
    assert_eq!(s["build_status"], "fail");
    assert_eq!(s["build"]["exit_code"], 1);
    assert!(s["build"]["fail_reason"]
        .as_str()
        .unwrap()
        .contains("code 1: appsdk - ERROR: do_rootfs failed"));
}

#[test]
fn build_wait_exit_codes_succeeded_and_stopped() {
    let env = TestEnv::new("waitcodes");
    let _d = env.daemon();
    let ok = env.yaml("ok.yaml", "standin_duration: 0.3");
    let o = env.latc(&["build", "--file", ok.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("DEBUG: Deploy ovmf.qcow2"));
    assert!(stderr(&o).contains("succeeded in"), "{}", stderr(&o));

    let long = env.yaml("long.yaml", "standin_duration: 60");
    let waiter = env
        .latc_cmd()
        .args(["build", "--file", long.to_str().unwrap(), "--wait"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the build to run", || {
        env.status_json()["state"] == "building"
    });
    assert!(env.latc(&["stop"]).status.success());
    let o = waiter.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("stopped after"), "{}", stderr(&o));
}

#[test]
fn second_build_is_refused_and_keeps_the_running_log() {
    let env = TestEnv::new("refuse");
    let _d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 60");
    assert!(env
        .latc(&["build", "--file", yaml.to_str().unwrap()])
        .status
        .success());
    let log = env.ws.join("log/log.appsdk");
    wait_until(Duration::from_secs(10), "the log", || log.exists());
    let real = env.ws.join("log").join(fs::read_link(&log).unwrap());
    let before = fs::read_to_string(&real).unwrap();
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("a build is already running"),
        "{}",
        stderr(&o)
    );
    // The running build's log is whole, and still written to; only the name
    // build-image waits for is gone, so it is not taken for the refused
    // build's.
    assert!(!log.exists(), "log.appsdk left for the refused build");
    assert!(
        stderr(&o).contains("no build was started"),
        "{}",
        stderr(&o)
    );
    assert!(
        fs::read_to_string(&real).unwrap().starts_with(&before),
        "the refused build touched the log"
    );
    let o = env.latc(&["logs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(&before), "{}", stdout(&o));
    assert!(env.latc(&["stop"]).status.success());
}

#[test]
fn paths_never_pass_through_a_shell() {
    let env = TestEnv::new("shell");
    let _d = env.daemon();
    let marker = env.root.join("pwned");
    let name = format!(
        "a b;touch {};$(touch {}).yaml",
        marker.display(),
        marker.display()
    );
    let dir = env.ws.join("odd dir");
    fs::create_dir_all(&dir).unwrap();
    let yaml = dir.join(name.replace('/', "_"));
    fs::write(&yaml, "name: x\nstandin_duration: 0.2\n").unwrap();
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!marker.exists(), "a path was parsed by a shell");
}

#[test]
fn workdir_outside_the_workspace_is_refused() {
    let env = TestEnv::new("outside");
    let _d = env.daemon();
    let o = env
        .latc_cmd()
        .args(["--workspace", "/tmp", "clean"])
        .output()
        .unwrap();
    // latc with another workspace still finds the channel via --channel.
    let _ = o;
    let o = env
        .latc_cmd()
        .args([
            "--workspace",
            "/",
            "--channel",
            env.channel.to_str().unwrap(),
            "clean",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("outside the workspace"),
        "{}",
        stderr(&o)
    );
    assert!(env.channel.join("invalid_message").exists());
    assert!(env.latc(&["status"]).status.success());
    assert!(
        !env.channel.join("invalid_message").exists(),
        "a valid request removes the marker"
    );
}

#[test]
fn hack_command_runs_only_when_allowed() {
    let env = TestEnv::new("hack");
    fs::create_dir_all(env.ws.join("hack")).unwrap();
    let marker = env.ws.join("hack-ran");
    fs::write(
        env.ws.join("hack/lat-genimage-cmd"),
        format!("touch '{}'\n", marker.display()),
    )
    .unwrap();
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.2");
    {
        let _d = env.daemon();
        let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(
            !marker.exists(),
            "hack command ran without --allow-hack-cmd"
        );
    }
    let _d = env.daemon_with(&["--allow-hack-cmd"]);
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        marker.exists(),
        "hack command did not run with --allow-hack-cmd"
    );
}

#[test]
fn getyaml_logs_and_clean() {
    let env = TestEnv::new("misc");
    let _d = env.daemon();
    let o = env.latc(&["logs"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("No log file found"), "{}", stderr(&o));
    let o = env.latc(&["getyaml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("machine: intel-x86-64"));
    assert!(env
        .ws
        .join("exampleyamls/debian-image-base-intel-x86-64.yaml")
        .is_file());
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.2");
    assert!(env
        .latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"])
        .status
        .success());
    let o = env.latc(&["logs"]);
    assert!(stdout(&o).contains("DEBUG: Deploy ovmf.qcow2"));
    // clean follows no symlink out of the workspace
    let outside = env.root.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep"), "x").unwrap();
    std::os::unix::fs::symlink(&outside, env.ws.join("deploy/link")).unwrap();
    let o = env.latc(&["clean"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for d in ["deploy", "exampleyamls", "log"] {
        assert!(!env.ws.join(d).exists(), "{d} survived clean");
    }
    assert!(outside.join("keep").exists());
    assert!(yaml.exists(), "clean removed the YAML");
}

#[test]
fn sigterm_to_latd_stops_the_build_and_exits_0() {
    let env = TestEnv::new("sigterm");
    let mut d = env.daemon_with(&["--grace", "1"]);
    env.start_build("standin_duration: 60\nstandin_ignore_term: true");
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        env.leftover_processes().is_empty(),
        "{:?}",
        env.leftover_processes()
    );
    // The final state was recorded, and a client is told latd is gone.
    let state = fs::read_to_string(env.channel.join("latd.state.json")).unwrap();
    assert!(state.contains("\"stopped\""), "{state}");
    let o = env.latc(&["status"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("no latd is running"), "{}", stderr(&o));
}

#[test]
fn client_written_from_the_protocol_document_drives_every_action() {
    let env = TestEnv::new("proto");
    let _d = env.daemon();
    let client = |args: &[&str]| protocol_client(&env.channel, args);
    let ws = env.ws.to_str().unwrap();
    let r = client(&["--action", "status", "--workdir", ws]);
    assert_eq!(r["result"], "succeed");
    assert!(r["file_content"]
        .as_str()
        .unwrap()
        .contains("lat_status: idle"));
    let r = client(&["--action", "getyaml", "--workdir", ws]);
    assert_eq!(r["result"], "succeed");
    assert!(r["file_content"].as_str().unwrap().contains("machine:"));
    let yaml = env.yaml("lat.yaml", "standin_duration: 30");
    let r = client(&[
        "--action",
        "build",
        "--workdir",
        ws,
        "--yaml-file",
        yaml.to_str().unwrap(),
    ]);
    assert_eq!(r["result"], "succeed");
    let r = client(&["--action", "status", "--workdir", ws]);
    assert!(r["file_content"]
        .as_str()
        .unwrap()
        .contains("lat_status: busy"));
    let log = env.ws.join("log/log.appsdk");
    wait_until(Duration::from_secs(10), "the log", || log.exists());
    let r = client(&["--action", "logs", "--workdir", ws]);
    assert_eq!(r["result"], "succeed");
    assert_eq!(r["log_file_path"], log.to_str().unwrap());
    let r = client(&["--action", "clean", "--workdir", ws]);
    assert_eq!(r["result"], "fail", "clean must be refused during a build");
    let r = client(&["--action", "stop", "--workdir", ws]);
    assert_eq!(r["result"], "succeed");
    let r = client(&["--action", "status", "--workdir", ws]);
    assert!(r["file_content"]
        .as_str()
        .unwrap()
        .contains("lat_status: idle"));
    let r = client(&["--action", "clean", "--workdir", ws]);
    assert_eq!(r["result"], "succeed");
    // The original weaknesses: no workdir, unknown action, malformed YAML.
    let r = client(&["--action", "status", "--workdir", ""]);
    assert_eq!(r["result"], "succeed");
    let r = client(&["--action", "fly", "--workdir", ws]);
    assert_eq!(r["result"], "fail");
    assert!(r["fail_reason"]
        .as_str()
        .unwrap()
        .contains("unknown action"));
    env.assert_no_leftovers();
}

#[test]
fn help_explains_flags_and_environment() {
    for (bin, words) in [
        (
            LATD,
            &[
                "--workspace",
                "--channel",
                "--sdk",
                "--grace",
                "WORKSPACE_DIR",
                "LAT_CHANNEL_DIR",
                "LAT_SDK_DIR",
                "RUST_LOG",
                "--debug",
                "--quiet",
                "--allow-hack-cmd",
            ][..],
        ),
        (
            LATC,
            &[
                "build",
                "status",
                "stop",
                "logs",
                "clean",
                "getyaml",
                "wait",
                "history",
                "health",
                "--timeout",
                "WORKSPACE_DIR",
                "Exit codes",
                "--debug",
                "--quiet",
            ][..],
        ),
    ] {
        let o = std::process::Command::new(bin)
            .arg("--help")
            .output()
            .unwrap();
        assert!(o.status.success());
        let text = stdout(&o);
        for w in words {
            assert!(text.contains(w), "{bin} --help lacks {w}:\n{text}");
        }
    }
    let o = std::process::Command::new(LATC)
        .args(["build", "--help"])
        .output()
        .unwrap();
    assert!(stdout(&o).contains("--wait"));
}

#[test]
fn latc_without_daemon_fails_fast_naming_the_channel() {
    let env = TestEnv::new("nodaemon");
    let t = Instant::now();
    let o = env.latc(&["status"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        stderr(&o).contains(env.channel.to_str().unwrap()),
        "{}",
        stderr(&o)
    );
    assert_eq!(env.latc(&["health"]).status.code(), Some(3));
}

#[test]
fn wait_shows_progress_on_a_terminal_and_plain_lines_otherwise() {
    let env = TestEnv::new("progress");
    let _d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 1.5\nstandin_log_lines: 6");
    assert!(env
        .latc(&["build", "--file", yaml.to_str().unwrap()])
        .status
        .success());
    // On a terminal (script(1) gives latc a pty): elapsed time and the
    // latest log line, redrawn in place.
    let cmd = format!("{LATC} wait");
    let o = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("WORKSPACE_DIR", &env.ws)
        .stdin(std::process::Stdio::null())
        .output()
        .ok();
    let Some(o) = o else {
        skipped("the terminal half: script(1) is not available");
        return;
    };
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(
        text.contains("\r\x1b[K[build 1 running"),
        "no progress line: {text:?}"
    );
    assert!(text.contains("s] "), "no elapsed time: {text:?}");
    assert!(text.contains("build 1 succeeded"), "{text:?}");
    // Not on a terminal: no control characters at all.
    let o = env.latc(&["wait"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!stderr(&o).contains('\x1b'), "{:?}", stderr(&o));
    assert!(stderr(&o).contains("build 1 succeeded"));
}

#[test]
fn logs_follow_streams_until_the_build_ends_and_history_survives_restarts() {
    let env = TestEnv::new("follow");
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.8\nstandin_log_lines: 8");
    {
        let _d = env.daemon();
        // An older log is replaced by the new build's.
        fs::create_dir_all(env.ws.join("log")).unwrap();
        fs::write(env.ws.join("log/log.appsdk"), "OLD BUILD LINE\n").unwrap();
        assert!(env
            .latc(&["build", "--file", yaml.to_str().unwrap()])
            .status
            .success());
        let o = env.latc(&["logs", "--follow"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        assert!(!out.contains("OLD BUILD LINE"), "{out}");
        assert!(out.contains("appsdk - DEBUG: Deploy ovmf.qcow2"), "{out}");
        assert!(out.trim_end().ends_with("standin-report.txt"), "{out}");
        assert_eq!(
            out.matches("(8/8)").count(),
            1,
            "a line was repeated: {out}"
        );
    }
    let _d = env.daemon();
    let o = env.latc(&["history", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 1);
    assert_eq!(h[0]["outcome"], "succeeded");
    let o = env.latc(&["history"]);
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));
}

#[test]
fn status_json_tells_everything_about_the_build_and_daemon() {
    let env = TestEnv::new("json");
    let d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.3\nstandin_result: fail");
    assert_eq!(
        env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"])
            .status
            .code(),
        Some(1)
    );
    let s = env.status_json();
    assert_eq!(s["lat_status"], "idle");
    assert_eq!(s["build_status"], "fail");
    assert_eq!(s["state"], "idle");
    assert_eq!(s["daemon_pid"], d.pid());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_s"].is_u64());
    let b = &s["build"];
    assert_eq!(b["id"], 1);
    assert_eq!(b["yaml_file"], yaml.to_str().unwrap());
    assert_eq!(b["outcome"], "failed");
    assert_eq!(b["exit_code"], 1);
    assert!(b["fail_reason"]
        .as_str()
        .unwrap()
        .contains("exited with code 1: appsdk - ERROR: do_rootfs failed"));
    let (start, end) = (
        b["started_at"].as_u64().unwrap(),
        b["ended_at"].as_u64().unwrap(),
    );
    assert!(end >= start);
    assert_eq!(s["build_duration_ms"].as_u64().unwrap(), end - start);
}

#[test]
fn ctrl_c_detaches_or_stops_as_asked() {
    let env = TestEnv::new("ctrlc");
    let _d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 60");
    let start_waiting = |extra: &[&str]| {
        let child = env
            .latc_cmd()
            .args(["build", "--file", yaml.to_str().unwrap(), "--wait"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        env.wait_workers();
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait_with_output().unwrap()
    };
    let o = start_waiting(&[]);
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("latc stop"),
        "says how to stop: {}",
        stderr(&o)
    );
    assert_eq!(
        env.status_json()["state"],
        "building",
        "detaching left the build running"
    );
    assert!(env.latc(&["stop"]).status.success());
    fs::remove_file(env.ws.join("log/log.appsdk")).unwrap();
    let o = start_waiting(&["--stop-on-interrupt"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert_eq!(env.status_json()["build"]["outcome"], "stopped");
    env.assert_no_leftovers();
}

#[test]
fn wait_reports_an_unreachable_daemon_with_its_own_code() {
    let env = TestEnv::new("waitdead");
    let mut d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 60");
    assert!(env
        .latc(&["build", "--file", yaml.to_str().unwrap()])
        .status
        .success());
    let waiter = env
        .latc_cmd()
        .args(["wait", "--timeout", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    env.wait_workers();
    // latd dies without a word; its heartbeat file stays behind.
    d.kill9();
    let o = waiter.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    // Said by the lock at once, or by the timeout.
    assert!(
        stderr(&o).contains("no reply from latd") || stderr(&o).contains("no latd is running"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn stop_reaches_processes_that_left_the_group() {
    let env = TestEnv::new("escape");
    fs::create_dir_all(env.ws.join("hack")).unwrap();
    // A build step that daemonizes: a new session, out of the build's group.
    fs::write(
        env.ws.join("hack/lat-genimage-cmd"),
        "setsid sleep 300 < /dev/null > /dev/null 2>&1 &\nexec appsdk --log-dir log genimage \"$PWD/lat.yaml\"\n",
    )
    .unwrap();
    let yaml = env.yaml("lat.yaml", "standin_duration: 60");
    let _d = env.daemon_with(&["--grace", "1", "--allow-hack-cmd"]);
    assert!(env
        .latc(&["build", "--file", yaml.to_str().unwrap()])
        .status
        .success());
    env.wait_workers();
    assert!(
        env.leftover_processes()
            .iter()
            .any(|p| p.contains("sleep 300")),
        "the escapee did not start: {:?}",
        env.leftover_processes()
    );
    let o = env.latc(&["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        env.leftover_processes().is_empty(),
        "{:?}",
        env.leftover_processes()
    );
}

#[test]
fn a_stopped_build_is_stopped_even_if_its_command_exits_0_on_sigterm() {
    let env = TestEnv::new("term0");
    fs::create_dir_all(env.ws.join("hack")).unwrap();
    // A build command (the operator's hack) that takes SIGTERM for success.
    fs::write(
        env.ws.join("hack/lat-genimage-cmd"),
        "trap 'exit 0' TERM\necho \"worker (appsdk $$)\" >> log/log.appsdk\nsleep 60 & wait\n",
    )
    .unwrap();
    let _d = env.daemon_with(&["--grace", "2", "--allow-hack-cmd"]);
    env.start_build("standin_duration: 60");
    assert!(env.latc(&["stop"]).status.success());
    let s = env.status_json();
    assert_eq!(s["build_status"], "fail", "{s}");
    assert_eq!(s["build"]["outcome"], "stopped");
    assert_eq!(s["build"]["exit_code"], 0);
}

#[test]
fn status_is_answered_while_clean_and_getyaml_run() {
    let env = TestEnv::new_in_memory("background");
    let _d = env.daemon();
    // A tree big enough that removing it takes a while.
    for i in 0..100 {
        let d = env.ws.join(format!("workdir/d{i}"));
        fs::create_dir_all(&d).unwrap();
        for j in 0..1000 {
            fs::write(d.join(format!("f{j}")), "").unwrap();
        }
    }
    let mut clean = env
        .latc_cmd()
        .arg("clean")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen_cleaning = false;
    while clean.try_wait().unwrap().is_none() {
        let s = env.status_json();
        if s["state"] == "cleaning" {
            assert_eq!(s["lat_status"], "busy");
            seen_cleaning = true;
        }
    }
    assert!(clean.wait().unwrap().success());
    assert!(seen_cleaning, "status was never answered during the clean");
    assert!(!env.ws.join("workdir").exists());

    // getyaml runs the SDK for a while; status is answered meanwhile.
    let mut getyaml = env
        .latc_cmd()
        .arg("getyaml")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let s = env.status_json();
    let getyaml_still_running = getyaml.try_wait().unwrap().is_none();
    assert_eq!(s["lat_status"], "idle");
    assert!(getyaml.wait().unwrap().success());
    assert!(getyaml_still_running, "status waited for getyaml");
}

/// Waits for the success line in the SDK's log (a symlink to the file the
/// SDK writes).
fn wait_success_line(env: &TestEnv) {
    let log = env.ws.join("log/log.appsdk");
    wait_until(Duration::from_secs(20), "the success line", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("DEBUG: Deploy ovmf.qcow2")
    });
}

/// The SDK's deploy is complete: every QEMU file whole, and its report.
fn deploy_complete(env: &TestEnv) -> bool {
    let d = env.ws.join("deploy");
    ["ovmf.qcow2", "ovmf.secboot.qcow2", "ovmf.vars.qcow2"]
        .iter()
        .all(|f| fs::metadata(d.join(f)).is_ok_and(|m| m.len() == 65536))
        && d.join("standin-report.txt").exists()
}

#[test]
fn a_stop_after_the_success_line_lets_the_sdk_finish_its_deploy() {
    let env = TestEnv::new("lastmoments");
    let _d = env.daemon_with(&["--grace", "15"]);
    // As build-image does: stop as soon as the success line is read. The
    // SDK still copies its QEMU files and writes its report (3 s).
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.3\nstandin_post_success: 3");
    assert!(env
        .latc(&["build", "--file", yaml.to_str().unwrap()])
        .status
        .success());
    wait_success_line(&env);
    assert!(
        !deploy_complete(&env),
        "the deploy should still be under way"
    );
    let s = env.status_json();
    assert!(
        s["activity"]
            .as_str()
            .unwrap_or("")
            .contains("success line"),
        "{s}"
    );
    let o = env.latc(&["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("has finished"), "{}", stderr(&o));
    // The reply came once everything was done: the deploy is whole.
    assert!(
        deploy_complete(&env),
        "stop answered before the deploy was done"
    );
    let text = fs::read_to_string(env.ws.join("log/log.appsdk")).unwrap();
    assert!(
        !text.contains("Recieve signal"),
        "the SDK was signalled: {text}"
    );
    assert!(text.contains("Report:"), "{text}");
    let s = env.status_json();
    assert_eq!(
        (s["lat_status"].as_str(), s["build_status"].as_str()),
        (Some("idle"), Some("succeed")),
        "{s}"
    );
    assert_eq!(s["build"]["exit_code"], 0);
    env.assert_no_leftovers();
}

#[test]
fn a_finishing_sdk_that_overruns_the_grace_is_terminated_and_keeps_succeed() {
    let env = TestEnv::new("overrun");
    let _d = env.daemon_with(&["--grace", "1"]);
    let yaml = env.yaml(
        "lat.yaml",
        "standin_duration: 0.3\nstandin_post_success: 30",
    );
    assert!(env
        .latc(&["build", "--file", yaml.to_str().unwrap()])
        .status
        .success());
    wait_success_line(&env);
    let o = env.latc(&["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("may be incomplete"), "{}", stderr(&o));
    let text = fs::read_to_string(env.ws.join("log/log.appsdk")).unwrap();
    assert!(text.contains("Recieve signal 15"), "{text}");
    let s = env.status_json();
    assert_eq!(s["build_status"], "succeed", "{s}");
    assert_eq!(s["build"]["exit_code"], 1);
    env.assert_no_leftovers();
}
