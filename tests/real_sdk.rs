//! latd and latc meet the SDK as it really is (modelled by the stand-in in
//! tests/sdk): the log is a symlink to `log.appsdk_<secs>`, it appears only
//! after a slow start, a killed build leaves mounts under its workdir, and
//! builds finish on their own while latd is down.

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::time::Duration;

/// Mount points below `dir`, from this process's mountinfo.
fn mounts_below(dir: &Path) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| Path::new(p).starts_with(dir) && Path::new(p) != dir)
        .collect()
}

#[test]
fn a_killed_builds_mounts_are_released_and_clean_meets_plain_directories() {
    if skip_unless_root("a_killed_builds_mounts_are_released_and_clean_meets_plain_directories") {
        return;
    }
    let env = TestEnv::new("mounts");
    // A mount that was there before the build is the operator's: kept.
    let keep = env.ws.join("workdir/cache");
    fs::create_dir_all(&keep).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "operators-cache"])
        .arg(&keep)
        .status()
        .unwrap();
    assert!(st.success());
    let _d = env.daemon_with(&["--grace", "1"]);
    // A build that ignores SIGTERM is killed: the SDK's exit-time umount
    // never runs, its mounts stay behind.
    env.start_build("standin_duration: 60\nstandin_ignore_term: true");
    let rootfs = env.ws.join("workdir/rootfs");
    assert_eq!(
        mounts_below(&rootfs).len(),
        2,
        "the stand-in mounted nothing"
    );
    let o = env.latc(&["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        mounts_below(&rootfs).is_empty(),
        "left mounted after the stop: {:?}",
        mounts_below(&rootfs)
    );
    assert_eq!(
        mounts_below(&env.ws),
        vec![keep.to_string_lossy().into_owned()],
        "the operator's mount must stay"
    );
    // clean meets plain directories where the build mounted, and still
    // will not cross the mount it did not remove.
    let o = env.latc(&["clean"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("cache"), "{}", stderr(&o));
    assert!(!rootfs.exists(), "the build's rootfs was not removed");
    let _ = std::process::Command::new("umount").arg(&keep).status();
    let o = env.latc(&["clean"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn logs_right_after_build_answer_with_the_path_the_log_will_have() {
    let env = TestEnv::new("slowlog");
    let _d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_start: 3\nstandin_duration: 0.5");
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.latc(&["logs"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("has not created this log yet"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains(&format!("{}/log/log.appsdk", env.ws.display())),
        "{}",
        stderr(&o)
    );
    // `--follow` waits for it, follows the symlink, and ends with the build.
    let o = env.latc(&["logs", "--follow"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("appsdk - DEBUG: Deploy ovmf.qcow2"),
        "{}",
        stdout(&o)
    );
    // And plain `logs` reads the real layout (a symlink beside its file).
    assert!(fs::symlink_metadata(env.ws.join("log/log.appsdk"))
        .unwrap()
        .file_type()
        .is_symlink());
    let o = env.latc(&["logs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("appsdk - INFO: appsdk genimage"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_log_symlink_that_leads_out_of_the_log_directory_is_refused() {
    let env = TestEnv::new("logout");
    let _d = env.daemon();
    fs::create_dir_all(env.ws.join("log")).unwrap();
    fs::write(env.root.join("secret"), "not for the log\n").unwrap();
    std::os::unix::fs::symlink(env.root.join("secret"), env.ws.join("log/log.appsdk")).unwrap();
    let o = env.latc(&["logs"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(!stdout(&o).contains("not for the log"));
    assert!(
        stderr(&o).contains("not to a file beside it"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn old_sdk_logs_are_kept_to_a_bounded_number() {
    let env = TestEnv::new("prune");
    fs::create_dir_all(env.ws.join("log")).unwrap();
    for s in 0..15 {
        fs::write(
            env.ws.join(format!("log/log.appsdk_{}", 1_000_000 + s)),
            "old\n",
        )
        .unwrap();
    }
    let _d = env.daemon();
    let yaml = env.yaml(
        "lat.yaml",
        "standin_duration: 0.2\nstandin_post_success: 0.1",
    );
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let logs: Vec<String> = fs::read_dir(env.ws.join("log"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("log.appsdk_"))
        .collect();
    // The ten newest before the build, and the build's own.
    assert_eq!(logs.len(), 11, "{logs:?}");
    assert!(
        !logs.contains(&"log.appsdk_1000004".to_string()),
        "{logs:?}"
    );
    assert!(logs.contains(&"log.appsdk_1000005".to_string()), "{logs:?}");
}

#[test]
fn a_build_that_finished_while_latd_was_down_is_recorded_with_its_result() {
    let env = TestEnv::new("orphan");
    {
        let mut d = env.daemon();
        env.start_build("standin_duration: 1\nstandin_post_success: 0.3");
        d.kill9();
    }
    // The orphaned SDK goes on to its end; then latd comes back.
    wait_until(Duration::from_secs(20), "the orphaned build to end", || {
        fs::read_to_string(env.ws.join("log/log.appsdk"))
            .unwrap_or_default()
            .contains("Report:")
            && env.leftover_processes().is_empty()
    });
    fs::remove_file(env.channel.join("latd.alive")).unwrap();
    let _d = env.daemon();
    let s = env.status_json();
    assert_eq!(s["build"]["outcome"], "succeeded", "{s}");
    assert_eq!(s["build_status"], "succeed", "{s}");
}

/// A build whose SDK goes on for `post_success` seconds after its success
/// line, and latd SIGKILLed just after that line (its heartbeat file
/// removed, as a new container would not have it).
fn latd_killed_after_the_success_line(tag: &str, post_success: u32) -> TestEnv {
    let env = TestEnv::new(tag);
    let mut d = env.daemon();
    env.start_build(&format!(
        "standin_duration: 0.5\nstandin_post_success: {post_success}"
    ));
    wait_until(Duration::from_secs(20), "the success line", || {
        fs::read_to_string(env.ws.join("log/log.appsdk"))
            .unwrap_or_default()
            .contains("DEBUG: Deploy ovmf.qcow2")
    });
    d.kill9();
    drop(d);
    fs::remove_file(env.channel.join("latd.alive")).unwrap();
    env
}

#[test]
fn a_restart_while_the_sdk_finishes_its_deploy_lets_it_finish() {
    let env = latd_killed_after_the_success_line("orphan-finishing", 3);
    // The new latd waits (up to its grace) for the SDK to finish rather than
    // killing it mid-deploy, and answers meanwhile: the build is still
    // running, finishing its deploy.
    let started = std::time::Instant::now();
    let _d = env.daemon_with(&["--grace", "20"]);
    let s = env.status_json();
    if s["build"]["outcome"] == "running" {
        assert_eq!(s["state"], "building", "{s}");
        assert!(
            s["activity"]
                .as_str()
                .unwrap_or_default()
                .contains("finishing its deploy"),
            "{s}"
        );
    } else {
        // Only if the SDK was already done (a slow machine).
        assert_eq!(s["build"]["outcome"], "succeeded", "{s}");
    }
    wait_until(Duration::from_secs(25), "the adopted build to end", || {
        env.status_json()["build"]["outcome"] != "running"
    });
    let s = env.status_json();
    assert_eq!(s["build"]["outcome"], "succeeded", "{s}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it waited for the whole grace"
    );
    let report = env.ws.join("deploy/standin-report.txt");
    assert!(report.exists(), "the deploy was cut short");
    let log = fs::read_to_string(env.ws.join("log/log.appsdk")).unwrap();
    assert!(!log.contains("Recieve signal"), "{log}");
}

#[test]
fn an_adopted_sdk_still_deploying_at_the_grace_end_is_killed_and_recorded_interrupted() {
    let env = latd_killed_after_the_success_line("orphan-overrun", 60);
    let _d = env.daemon_with(&["--grace", "2"]);
    // Answered at once, while the SDK goes on.
    let s = env.status_json();
    assert_eq!(s["build"]["outcome"], "running", "{s}");
    // A build asked for meanwhile is refused, as beside any build.
    let o = env.latc(&[
        "build",
        "--file",
        env.yaml("b.yaml", "standin_duration: 0").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("a build is already running"),
        "{}",
        stderr(&o)
    );
    wait_until(Duration::from_secs(20), "the adopted build to end", || {
        env.status_json()["build"]["outcome"] != "running"
    });
    let s = env.status_json();
    assert_eq!(s["build"]["outcome"], "failed", "{s}");
    let why = s["build"]["fail_reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("interrupted: latd was restarted while this build finished its deploy")
            && why.contains("leftover processes were killed"),
        "{why}"
    );
    env.assert_no_leftovers();
}

#[test]
fn a_request_whose_client_gave_up_is_never_acted_on() {
    let env = TestEnv::new("expired");
    let d = env.daemon();
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.2");
    // latd stops answering; the client gives up and withdraws its request.
    d.signal(libc::SIGSTOP);
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--timeout", "1"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        channel_files(&env.channel, "req-").is_empty(),
        "request left behind"
    );
    // A client killed outright cannot withdraw: its request says when it
    // stopped waiting.
    let mut latc = env
        .latc_cmd()
        .args(["build", "--file", yaml.to_str().unwrap(), "--timeout", "1"])
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(5), "the request", || {
        !channel_files(&env.channel, "req-").is_empty()
    });
    latc.kill().unwrap();
    latc.wait().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    d.signal(libc::SIGCONT);
    wait_until(Duration::from_secs(10), "the request to be handled", || {
        channel_files(&env.channel, "req-").is_empty()
    });
    let s = env.status_json();
    assert!(
        s["build"].is_null(),
        "a build nobody waits for was started: {s}"
    );
    assert!(!env.ws.join("log/log.appsdk").exists());
    let history = fs::read_to_string(env.channel.join("client_message_history")).unwrap();
    assert!(history.contains("expires_at"), "{history}");
}

#[test]
fn a_restart_after_latd_was_killed_releases_what_its_build_left_mounted() {
    if skip_unless_root("a_restart_after_latd_was_killed_releases_what_its_build_left_mounted") {
        return;
    }
    let env = TestEnv::new("restart-mounts");
    let keep = env.ws.join("workdir/cache");
    fs::create_dir_all(&keep).unwrap();
    assert!(std::process::Command::new("mount")
        .args(["-t", "tmpfs", "operators-cache"])
        .arg(&keep)
        .status()
        .unwrap()
        .success());
    let rootfs = env.ws.join("workdir/rootfs");
    {
        let mut d = env.daemon();
        env.start_build("standin_duration: 60");
        assert_eq!(mounts_below(&rootfs).len(), 2);
        d.kill9();
    }
    // The orphaned build is killed by the next latd, which then unmounts
    // what it left (its SDK never ran its exit-time umount).
    fs::remove_file(env.channel.join("latd.alive")).unwrap();
    let _d = env.daemon();
    assert!(
        mounts_below(&rootfs).is_empty(),
        "left mounted: {:?}",
        mounts_below(&rootfs)
    );
    assert_eq!(
        mounts_below(&env.ws),
        vec![keep.to_string_lossy().into_owned()]
    );
    let s = env.status_json();
    assert_eq!(s["build"]["outcome"], "failed", "{s}");
    let _ = std::process::Command::new("umount").arg(&keep).status();
}

/// latc run with its clock shifted by `shift` (faketime's `-f` offset).
fn latc_with_clock(env: &TestEnv, shift: &str, args: &[&str]) -> Option<std::process::Output> {
    let mut c = std::process::Command::new("faketime");
    c.args(["-f", shift, LATC])
        .args(args)
        .env("WORKSPACE_DIR", &env.ws)
        .env_remove("LAT_CHANNEL_DIR")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null());
    c.output().ok()
}

#[test]
fn a_client_whose_clock_is_behind_latds_is_served() {
    let env = TestEnv::new("skew");
    let _d = env.daemon();
    // Another host (NFS) whose clock is five minutes behind latd's: its
    // requests' expiry is in latd's past the moment they are written.
    let Some(o) = latc_with_clock(&env, "-300s", &["status"]) else {
        skipped("a_client_whose_clock_is_behind_latds_is_served: needs faketime");
        return;
    };
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("lat_status: idle"), "{}", stdout(&o));
    let yaml = env.yaml(
        "lat.yaml",
        "standin_duration: 0.2\nstandin_post_success: 0.1",
    );
    let o = latc_with_clock(&env, "-300s", &["build", "--file", yaml.to_str().unwrap()]).unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    wait_until(Duration::from_secs(20), "the build to end", || {
        env.status_json()["build"]["outcome"] == "succeeded"
    });
}

#[test]
fn a_refused_build_beside_a_running_one_does_not_blind_its_followers() {
    let env = TestEnv::new("refused-beside");
    let _d = env.daemon();
    env.start_build("standin_duration: 4\nstandin_log_lines: 8\nstandin_post_success: 0.2");
    // A second build is refused; its latc removes the log's name, so that
    // its own build-image does not take the running build's log for its own.
    let yaml = env.yaml("second.yaml", "");
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(fs::symlink_metadata(env.ws.join("log/log.appsdk")).is_err());
    // The running build's own users still see its log.
    let s = env.status_text();
    assert!(s.contains("last log line: appsdk - "), "{s}");
    let o = env.latc(&["logs", "--follow"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("appsdk - DEBUG: Deploy ovmf.qcow2"),
        "logs --follow showed: {}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("appsdk - INFO: appsdk genimage"),
        "logs --follow showed: {}",
        stdout(&o)
    );
}

/// Starts a build that works 3 s after its success line and waits until
/// latd has seen that line.
fn build_past_its_success_line(env: &TestEnv) {
    env.start_build("standin_duration: 0.5\nstandin_post_success: 3");
    wait_until(
        Duration::from_secs(20),
        "latd to see the success line",
        || env.status_json()["build"]["success_logged"] == true,
    );
}

fn assert_deploy_complete(env: &TestEnv) {
    assert!(
        env.ws.join("deploy/standin-report.txt").exists(),
        "the deploy was cut short"
    );
    let log = fs::read_to_string(env.ws.join("log/log.appsdk")).unwrap();
    assert!(!log.contains("Recieve signal"), "{log}");
    assert!(!log.contains("latd - ERROR"), "{log}");
}

#[test]
fn a_second_stop_while_the_sdk_finishes_waits_with_the_first() {
    let env = TestEnv::new("second-stop");
    let _d = env.daemon_with(&["--grace", "20"]);
    build_past_its_success_line(&env);
    let first = env
        .latc_cmd()
        .arg("stop")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    env.wait_state("stopping");
    // People are told what the stop waits for.
    let s = env.status_text();
    assert!(
        s.contains("activity: the SDK logged its success line and is finishing its deploy"),
        "{s}"
    );
    let second = env.latc(&["stop"]);
    let first = first.wait_with_output().unwrap();
    for o in [&first, &second] {
        assert!(o.status.success(), "{}", stderr(o));
        assert!(stderr(o).contains("had already succeeded"), "{}", stderr(o));
    }
    let s = env.status_json();
    assert_eq!(s["lat_status"], "idle", "{s}");
    assert_eq!(s["build_status"], "succeed", "{s}");
    assert_deploy_complete(&env);
}

#[test]
fn latd_asked_to_exit_while_the_sdk_finishes_lets_it_finish() {
    let env = TestEnv::new("term-finishing");
    let mut d = env.daemon_with(&["--grace", "20"]);
    build_past_its_success_line(&env);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(60)), Some(0));
    let o = env.latc(&["history", "--json"]);
    assert!(stdout(&o).contains("\"succeeded\""), "{}", stdout(&o));
    assert_deploy_complete(&env);
    env.assert_no_leftovers();
}

#[test]
fn a_build_stopped_before_its_success_line_and_killed_mid_deploy_is_not_a_success() {
    let env = TestEnv::new("stop-then-success");
    let _d = env.daemon_with(&["--grace", "3"]);
    // A stubborn SDK: it ignores the SIGTERM, logs its success line after
    // the stop, and is killed in the middle of its deploy.
    env.start_build("standin_duration: 1.5\nstandin_ignore_term: true\nstandin_post_success: 20");
    assert_ne!(env.status_json()["build"]["success_logged"], true);
    let o = env.latc(&["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = fs::read_to_string(env.ws.join("log/log.appsdk")).unwrap();
    assert!(log.contains("DEBUG: Deploy ovmf.qcow2"), "{log}");
    assert!(!env.ws.join("deploy/standin-report.txt").exists());
    let s = env.status_json();
    assert_eq!(s["build_status"], "fail", "{s}");
    assert_eq!(s["build"]["outcome"], "stopped", "{s}");
}

/// latd in namespaces of its own (mount and pid), as in a container: it is
/// pid 1 there, and everything it started dies with it.
struct Contained {
    unshare: std::process::Child,
}

impl Contained {
    fn start(env: &TestEnv, tag: &str) -> Contained {
        let _ = fs::remove_file(env.channel.join("latd.alive"));
        let log = fs::File::create(env.root.join(format!("latd-{tag}.log"))).unwrap();
        let unshare = std::process::Command::new("unshare")
            .args([
                "-m",
                "-p",
                "--fork",
                "--mount-proc",
                "--propagation",
                "private",
            ])
            .arg(LATD)
            .args(["--workspace", env.ws.to_str().unwrap()])
            .args(["--sdk", sdk_dir().to_str().unwrap(), "--grace", "2", "-d"])
            .env_remove("RUST_LOG")
            .env_remove("LAT_CHANNEL_DIR")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Contained { unshare };
        wait_until(Duration::from_secs(10), "latd to come up", || {
            fs::read_to_string(env.channel.join("latd.alive")).is_ok_and(|t| t.contains("pid: 1\n"))
        });
        c
    }

    /// latd, as this (the outer) pid namespace sees it.
    fn latd_pid(&self) -> i32 {
        let me = self.unshare.id();
        fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        let pid = self.latd_pid();
        if pid > 0 {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.unshare.wait();
    }
}

#[test]
fn a_restart_in_a_new_container_unmounts_nothing_it_started_with() {
    let test = "a_restart_in_a_new_container_unmounts_nothing_it_started_with";
    if skip_unless_root(test) {
        return;
    }
    if std::process::Command::new("unshare")
        .args(["-m", "-p", "--fork", "--mount-proc", "true"])
        .status()
        .map_or(true, |s| !s.success())
    {
        skipped(&format!("{test}: unshare cannot make namespaces here"));
        return;
    }
    let env = TestEnv::new("restart-newns");
    {
        let _c = Contained::start(&env, "first");
        env.start_build("standin_duration: 60\nstandin_agent: false");
        // latd dies, and its container with everything in it.
    }
    env.assert_no_leftovers();
    // The new container starts with the workspace's mounts as they are
    // now, among them one under the workdir the dead build never saw.
    let cache = env.ws.join("workdir/cache");
    fs::create_dir_all(&cache).unwrap();
    assert!(std::process::Command::new("mount")
        .args(["-t", "tmpfs", "operators-cache"])
        .arg(&cache)
        .status()
        .unwrap()
        .success());
    let c = Contained::start(&env, "second");
    let s = env.status_json();
    assert_eq!(s["build"]["outcome"], "failed", "{s}");
    let seen = fs::read_to_string(format!("/proc/{}/mountinfo", c.latd_pid())).unwrap();
    drop(c);
    let _ = std::process::Command::new("umount").arg(&cache).status();
    assert!(
        seen.contains(&format!(" {} ", cache.display())),
        "the restarted latd unmounted a mount its container started with:\n{seen}"
    );
}

#[test]
fn a_build_right_after_another_does_not_log_into_its_file() {
    let env = TestEnv::new("same-second");
    let _d = env.daemon();
    // Both SDKs would open their log within one second: the real SDK
    // would append to the earlier build's log.appsdk_<secs>, and
    // build-image's `tail -f`, which starts with the file's last lines,
    // would read that build's error as this one's.
    let first = env.yaml(
        "first.yaml",
        "standin_start: 0\nstandin_duration: 0\nstandin_result: fail\nstandin_children: 0\nstandin_mounts: false\nstandin_agent: false",
    );
    let second = env.yaml("second.yaml", "standin_start: 0\nstandin_duration: 0.5");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1050 - u64::from(now.subsec_millis())));
    let o = env.latc(&["build", "--file", first.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = env.latc(&["build", "--file", second.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = env.latc(&["history", "--json"]);
    let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let logs: Vec<String> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["sdk_log"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(logs.len(), 2, "{h}");
    assert_ne!(logs[0], logs[1], "both builds logged to one file");
    let text = fs::read_to_string(&logs[1]).unwrap();
    assert!(!text.contains("ERROR: "), "{text}");
}

#[test]
fn the_sdk_reads_the_image_yaml_latd_checked_not_what_a_client_swaps_in() {
    let env = TestEnv::new("yamlswap");
    let _d = env.daemon();
    // A file the client may not read (root's, mode 0600, outside the
    // workspace), and the image YAML the client sends.
    let secret = env.root.join("secret");
    fs::write(&secret, "TOPSECRET: root's own\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let yaml = env.yaml("lat.yaml", "standin_start: 1\nstandin_duration: 0.3");
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Checked and started: now the client swaps the YAML for a symlink to
    // the secret, before the SDK (still starting) reads it.
    fs::remove_file(&yaml).unwrap();
    std::os::unix::fs::symlink(&secret, &yaml).unwrap();
    let o = env.latc(&["wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let log = fs::read_to_string(env.ws.join("log/log.appsdk")).unwrap();
    assert!(
        !log.contains("TOPSECRET"),
        "root read the swapped-in file: {log}"
    );
    assert!(log.contains("yaml: machine: intel-x86-64"), "{log}");
}

#[test]
fn latc_reads_no_log_through_a_symlink_out_of_the_log_directory() {
    let env = TestEnv::new("latc-logout");
    let _d = env.daemon();
    let yaml = env.yaml(
        "lat.yaml",
        "standin_duration: 0.2\nstandin_post_success: 0.1",
    );
    let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The workspace's owner points the log somewhere else (latc may run as
    // root, or as another user, on its behalf).
    fs::write(env.root.join("secret"), "not for the log\n").unwrap();
    for e in fs::read_dir(env.ws.join("log")).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("log.appsdk") {
            fs::remove_file(e.path()).unwrap();
        }
    }
    std::os::unix::fs::symlink(env.root.join("secret"), env.ws.join("log/log.appsdk")).unwrap();
    for args in [
        &["status"][..],
        &["logs", "--follow"],
        &["wait", "--follow"],
    ] {
        let o = env.latc(args);
        assert!(
            !stdout(&o).contains("not for the log") && !stderr(&o).contains("not for the log"),
            "latc {args:?} read through the symlink: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
}

#[test]
fn a_root_owned_log_directory_from_before_is_given_to_the_workspace_owner() {
    if skip_unless_root("a_root_owned_log_directory_from_before_is_given_to_the_workspace_owner") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    const USER: u32 = 65534;
    let env = TestEnv::new("oldlogdir");
    fs::create_dir_all(&env.channel).unwrap();
    for p in [&env.root, &env.ws, &env.channel] {
        std::os::unix::fs::chown(p, Some(USER), Some(USER)).unwrap();
    }
    // The layout an older daemon or SDK left: log/ made by root.
    fs::create_dir(env.ws.join("log")).unwrap();
    let yaml = env.yaml(
        "lat.yaml",
        "standin_duration: 0.2\nstandin_post_success: 0.1",
    );
    std::os::unix::fs::chown(&yaml, Some(USER), Some(USER)).unwrap();
    {
        let d = env.daemon();
        let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let mut d = d;
        d.signal(libc::SIGTERM);
        d.wait_exit(Duration::from_secs(10));
    }
    assert_eq!(fs::metadata(env.ws.join("log")).unwrap().uid(), USER);
    // With latd down, the build user's latc can set the earlier log aside.
    let o = env
        .latc_cmd()
        .args(["build", "--file", yaml.to_str().unwrap()])
        .uid(USER)
        .gid(USER)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("removed the symlink"), "{}", stderr(&o));
    assert!(!env.ws.join("log/log.appsdk").exists());
}
