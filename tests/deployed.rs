//! The deployed caller's whole dialogue, against latd on the stand-in SDK
//! that behaves like the real one (symlinked, prefixed log; a slow start;
//! work after the success line; workers in their own sessions).
//!
//! `tests/clients/build_image.py` is written from the protocol document's
//! description of StarlingX's build-image: `latc --file=... build` with its
//! exit code ignored, the wait for `log/log.appsdk` with `latc status` once
//! a second, `tail -f` until a line contains `ERROR: ` or the success line,
//! then `latc stop`, two seconds, `latc status`, and `chown -R deploy`.

mod common;

use common::*;
use std::fs;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A running build-image.
struct Driver {
    child: Child,
}

impl Driver {
    fn start(env: &TestEnv, standin: &str) -> Driver {
        Driver::start_as(env, standin, None)
    }

    /// Started as `uid` (the build user), when given.
    fn start_as(env: &TestEnv, standin: &str, uid: Option<u32>) -> Driver {
        let base = env.root.join("base.yaml");
        fs::write(
            &base,
            format!("name: test\nmachine: intel-x86-64\nimage_type: [iso]\n{standin}\n"),
        )
        .unwrap();
        let mut cmd = Command::new("python3");
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid).env("NO_CHOWN", "1");
        }
        let child = cmd
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/clients/build_image.py"
            ))
            .env("LAT_ROOT", &env.ws)
            .env("BASE_YAML", &base)
            .env("LATC", LATC)
            .env("DEPLOY_MANIFEST", env.root.join("manifest"))
            .env_remove("LAT_CHANNEL_DIR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the build-image driver");
        Driver { child }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the driver to end (a driver that hangs, as build-image's
    /// `tail -f` would on a log that never ends, fails the test).
    fn finish(mut self) -> (Option<i32>, String) {
        let done = poll_until(Duration::from_secs(120), || {
            self.child.try_wait().unwrap().is_some()
        });
        if !done {
            let _ = self.child.kill();
        }
        let o: Output = self.child.wait_with_output().unwrap();
        assert!(done, "build-image hung:\n{}", stdout(&o));
        let text = format!("{}\n--- stderr\n{}", stdout(&o), stderr(&o));
        (o.status.code(), text)
    }
}

/// What deploy/ held when the driver ran its `chown -R` (after the stop).
fn manifest(env: &TestEnv) -> String {
    fs::read_to_string(env.root.join("manifest")).unwrap_or_default()
}

fn deploy_was_complete(env: &TestEnv) -> bool {
    let m = manifest(env);
    [
        "ovmf.qcow2 65536",
        "ovmf.secboot.qcow2 65536",
        "ovmf.vars.qcow2 65536",
    ]
    .iter()
    .all(|l| m.lines().any(|x| x == *l))
        && m.contains("standin-report.txt ")
}

fn sdk_log_has(env: &TestEnv, what: &str) -> bool {
    fs::read_to_string(env.ws.join("log/log.appsdk"))
        .unwrap_or_default()
        .contains(what)
}

#[test]
fn success_the_deploy_is_complete_when_build_image_takes_it() {
    let env = TestEnv::new("dlg-ok");
    let _d = env.daemon_with(&["--grace", "20"]);
    // The SDK takes a while to create its log, and works on after its
    // success line: build-image stops it at once, then chowns deploy/.
    let drv = Driver::start(
        &env,
        "standin_start: 3\nstandin_duration: 1\nstandin_post_success: 3",
    );
    let (code, out) = drv.finish();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("build-image successfully done"), "{out}");
    assert!(out.contains("Successfully stopped latd"), "{out}");
    assert!(
        deploy_was_complete(&env),
        "deploy/ was incomplete when build-image took it:\n{}",
        manifest(&env)
    );
    assert!(
        !sdk_log_has(&env, "Recieve signal"),
        "the SDK was signalled"
    );
    let s = env.status_json();
    assert_eq!(s["build"]["outcome"], "succeeded", "{s}");
    env.assert_no_leftovers();
}

#[test]
fn failure_is_reported_as_failure() {
    let env = TestEnv::new("dlg-fail");
    let _d = env.daemon();
    let drv = Driver::start(&env, "standin_duration: 1\nstandin_result: fail");
    let (code, out) = drv.finish();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("Failed to build image"), "{out}");
    assert!(!out.contains("successfully done"), "{out}");
    assert!(out.contains("Successfully stopped latd"), "{out}");
    assert_eq!(env.status_json()["build"]["outcome"], "failed");
}

#[test]
fn a_signal_mid_build_stops_it_and_latd_is_idle() {
    let env = TestEnv::new("dlg-sig");
    let _d = env.daemon();
    let drv = Driver::start(&env, "standin_duration: 60");
    wait_until(
        Duration::from_secs(20),
        "the driver to follow the log",
        || sdk_log_has(&env, "worker(s)"),
    );
    drv.signal(libc::SIGTERM);
    let (code, out) = drv.finish();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("Successfully stopped latd"), "{out}");
    let s = env.status_json();
    assert_eq!(
        (s["lat_status"].as_str(), s["build"]["outcome"].as_str()),
        (Some("idle"), Some("stopped")),
        "{s}"
    );
    env.assert_no_leftovers();
}

#[test]
fn a_stubborn_sdk_is_killed_and_latd_is_idle_when_build_image_looks() {
    let env = TestEnv::new("dlg-stubborn");
    let _d = env.daemon_with(&["--grace", "2"]);
    let drv = Driver::start(&env, "standin_duration: 60\nstandin_ignore_term: true");
    wait_until(
        Duration::from_secs(20),
        "the driver to follow the log",
        || sdk_log_has(&env, "worker(s)"),
    );
    drv.signal(libc::SIGINT);
    let (code, out) = drv.finish();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("Successfully stopped latd"), "{out}");
    let s = env.status_json();
    assert!(
        s["build"]["fail_reason"]
            .as_str()
            .unwrap_or("")
            .contains("killed after the grace period"),
        "{s}"
    );
    env.assert_no_leftovers();
}

#[test]
fn latd_down_with_an_earlier_builds_log_is_not_taken_for_success() {
    let env = TestEnv::new("dlg-down");
    {
        let d = env.daemon();
        let yaml = env.yaml(
            "lat.yaml",
            "standin_duration: 0.3\nstandin_post_success: 0.2",
        );
        let o = env.latc(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        d.signal(libc::SIGTERM);
        let mut d = d;
        d.wait_exit(Duration::from_secs(10));
    }
    assert!(
        sdk_log_has(&env, "DEBUG: Deploy ovmf.qcow2"),
        "the earlier success line"
    );
    let drv = Driver::start(&env, "standin_duration: 1");
    let (code, out) = drv.finish();
    assert_eq!(code, Some(1), "{out}");
    assert!(!out.contains("successfully done"), "a false success: {out}");
    assert!(out.contains("latd is not running"), "{out}");
    // The earlier build's log is still there, under its own name.
    let kept: Vec<_> = fs::read_dir(env.ws.join("log"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("log.appsdk_"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert!(fs::read_to_string(kept[0].path())
        .unwrap()
        .contains("DEBUG: Deploy ovmf.qcow2"));
}

#[test]
fn latd_killed_mid_build_and_restarted_ends_build_images_wait_with_a_failure() {
    let env = TestEnv::new("dlg-killed");
    let mut d = env.daemon();
    let drv = Driver::start(&env, "standin_duration: 60");
    wait_until(
        Duration::from_secs(20),
        "the driver to follow the log",
        || sdk_log_has(&env, "worker(s)"),
    );
    d.kill9();
    // The container restarts latd: it kills the orphaned build and says so
    // in the build's log, where build-image's `tail -f` reads it.
    fs::remove_file(env.channel.join("latd.alive")).unwrap();
    let _d = env.daemon();
    let (code, out) = drv.finish();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("latd - ERROR: build 1 failed: interrupted"),
        "{out}"
    );
    assert!(out.contains("Failed to build image"), "{out}");
    assert!(!out.contains("successfully done"), "{out}");
    assert!(out.contains("Successfully stopped latd"), "{out}");
    env.assert_no_leftovers();
}

#[test]
fn as_deployed_a_root_latd_and_a_build_user_who_is_not_root() {
    if skip_unless_root("as_deployed_a_root_latd_and_a_build_user_who_is_not_root") {
        return;
    }
    const USER: u32 = 65534;
    let env = TestEnv::new("dlg-user");
    // As deployed: the workspace is the build user's; latd is root.
    fs::create_dir_all(&env.channel).unwrap();
    for p in [&env.root, &env.ws, &env.channel] {
        std::os::unix::fs::chown(p, Some(USER), Some(USER)).unwrap();
    }
    {
        let d = env.daemon_with(&["--grace", "20"]);
        let drv = Driver::start_as(
            &env,
            "standin_duration: 1\nstandin_post_success: 2",
            Some(USER),
        );
        let (code, out) = drv.finish();
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("build-image successfully done"), "{out}");
        assert!(deploy_was_complete(&env), "{}", manifest(&env));
        d.signal(libc::SIGTERM);
        let mut d = d;
        d.wait_exit(Duration::from_secs(10));
    }
    // latd is down; the build user's latc sets the earlier log aside (the
    // log directory is the build user's), so no false success.
    let drv = Driver::start_as(&env, "standin_duration: 1", Some(USER));
    let (code, out) = drv.finish();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("latd is not running"), "{out}");
    assert!(!out.contains("successfully done"), "{out}");
}
