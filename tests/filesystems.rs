//! The channel and workspace on the filesystems latd meets in production:
//! overlayfs, a FUSE mount that caches "no such file" like the NFS client
//! does, and a channel owned by the unprivileged build user. These need
//! root (mounts, a second user) and say so when skipped.

mod common;
use common::*;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Unmounts on drop, even when the test fails.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(args: &[&str], target: &Path) -> Option<Mount> {
    let st = Command::new("mount").args(args).arg(target).status().ok()?;
    st.success().then(|| Mount(target.to_path_buf()))
}

#[test]
fn works_on_an_overlay_mount() {
    if skip_unless_root("works_on_an_overlay_mount") {
        return;
    }
    let env = TestEnv::new("overlay");
    let (lower, upper, work, merged) = (
        env.root.join("lower"),
        env.root.join("upper"),
        env.root.join("work"),
        env.root.join("merged"),
    );
    for d in [&lower, &upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    // A YAML and a channel that come from the lower layer, as from an image.
    fs::create_dir_all(lower.join("channel")).unwrap();
    fs::write(lower.join("lat.yaml"), "name: x\nstandin_duration: 30\n").unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let Some(_m) = mount(&["-t", "overlay", "overlay", "-o", &opts], &merged) else {
        skipped("works_on_an_overlay_mount: this kernel refused an overlay mount");
        return;
    };
    let mut d = env.daemon_on(&merged);
    let latc = |args: &[&str]| env.latc_on(&merged, args);
    let o = latc(&["build", "--file", merged.join("lat.yaml").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = latc(&["status"]);
    assert!(stdout(&o).contains("lat_status: busy"), "{}", stdout(&o));
    // An original client, through the same overlay.
    let r = protocol_client(
        &merged.join("channel"),
        &["--action", "status", "--workdir", merged.to_str().unwrap()],
    );
    assert_eq!(r["result"], "succeed");
    let o = latc(&["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&latc(&["status"])).contains("lat_status: idle"));
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(5)), Some(0));
    env.assert_no_leftovers();
}

#[test]
fn sees_requests_through_a_negative_lookup_cache() {
    if skip_unless_root("sees_requests_through_a_negative_lookup_cache") {
        return;
    }
    if Command::new("bindfs").arg("--version").output().is_err() {
        skipped("sees_requests_through_a_negative_lookup_cache: bindfs is not installed");
        return;
    }
    let env = TestEnv::new("negcache");
    // `backing` is the server's view, written by the "other host" (the
    // client); `view` is latd's mount, which trusts "no such file" for 60 s.
    let backing = env.root.join("backing");
    let view = env.root.join("view");
    fs::create_dir_all(backing.join("channel")).unwrap();
    fs::create_dir_all(&view).unwrap();
    let st = Command::new("bindfs")
        .args(["-o", "negative_timeout=60,entry_timeout=60,attr_timeout=60"])
        .arg(&backing)
        .arg(&view)
        .status()
        .unwrap();
    if !st.success() {
        skipped("sees_requests_through_a_negative_lookup_cache: FUSE mount refused");
        return;
    }
    let _m = Mount(view.clone());
    let _d = env.daemon_on(&view);
    let done = view.join("channel/c-2-s.done");
    // Look the marker up while it is missing: the mount now caches that.
    assert!(!done.exists());
    fs::write(backing.join("channel/c-2-s.msg"), "action: status\n").unwrap();
    fs::write(backing.join("channel/c-2-s.done"), "").unwrap();
    // Through latd's mount the name still looks missing: the cache is real...
    assert!(
        !done.exists(),
        "the mount did not cache the negative lookup; the test proves nothing"
    );
    // ...yet latd, which lists the directory, answers.
    let reply = backing.join("channel/s-2-c.done");
    let t = Instant::now();
    wait_until(Duration::from_secs(10), "latd's reply", || reply.exists());
    eprintln!("answered through the negative cache in {:?}", t.elapsed());
    let text = fs::read_to_string(backing.join("channel/s-2-c.msg")).unwrap();
    assert!(text.contains("result: succeed"), "{text}");
}

#[test]
fn build_user_can_use_a_channel_served_by_root() {
    if skip_unless_root("build_user_can_use_a_channel_served_by_root") {
        return;
    }
    const USER: u32 = 65534; // nobody
    let env = TestEnv::new("perms");
    // As deployed: the workspace and channel belong to the build user.
    fs::create_dir_all(&env.channel).unwrap();
    for p in [&env.root, &env.ws, &env.channel] {
        std::os::unix::fs::chown(p, Some(USER), Some(USER)).unwrap();
    }
    let yaml = env.yaml("lat.yaml", "standin_duration: 0.3");
    std::os::unix::fs::chown(&yaml, Some(USER), Some(USER)).unwrap();
    let _d = env.daemon();
    let as_user = |args: &[&str]| {
        use std::os::unix::process::CommandExt;
        env.latc_cmd()
            .args(args)
            .uid(USER)
            .gid(USER)
            .output()
            .unwrap()
    };
    for _ in 0..2 {
        let o = as_user(&["status"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("lat_status"));
    }
    let o = as_user(&["build", "--file", yaml.to_str().unwrap(), "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = as_user(&["history"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Every file latd made in the channel is readable by the user, and
    // the user could remove what it consumes (the directory is its own).
    for e in fs::read_dir(&env.channel).unwrap().flatten() {
        let md = e.metadata().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = md.permissions().mode();
        let name = e.file_name();
        assert!(
            mode & 0o004 != 0 || name == "latd.wake",
            "{name:?} is not readable by others: {mode:o}"
        );
    }
    // An original client running as the user, too.
    use std::os::unix::process::CommandExt;
    let o = protocol_client_cmd(&env.channel)
        .args(["--action", "status"])
        .uid(USER)
        .gid(USER)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Through a FUSE attribute cache (as NFS has one), an original client's
/// request rewritten in place is read as it is: latd compares the
/// attributes of the descriptor it read through, never a path's cached
/// ones (which called every request after the first "changed while it was
/// being read").
#[test]
fn requests_rewritten_in_place_through_an_attribute_cache() {
    let name = "requests_rewritten_in_place_through_an_attribute_cache";
    if skip_unless_root(name) {
        return;
    }
    if Command::new("bindfs").arg("--version").output().is_err() {
        skipped(&format!("{name}: bindfs is not installed"));
        return;
    }
    let env = TestEnv::new("attrcache");
    let backing = env.root.join("backing");
    let view = env.root.join("view");
    fs::create_dir_all(backing.join("channel")).unwrap();
    fs::create_dir_all(&view).unwrap();
    let st = Command::new("bindfs")
        .args(["-o", "negative_timeout=20,entry_timeout=20,attr_timeout=20"])
        .arg(&backing)
        .arg(&view)
        .status()
        .unwrap();
    if !st.success() {
        skipped(&format!("{name}: FUSE mount refused"));
        return;
    }
    let _m = Mount(view.clone());
    let _d = env.daemon_on(&view);
    let ch = backing.join("channel");
    let msgs = [
        "action: status\n".to_string(),
        format!("action: logs\nworkdir: {}\n", view.display()),
        "action: status\nworkdir: /x/../\n".to_string(),
        "action: status\n".to_string(),
    ];
    for (i, msg) in msgs.iter().enumerate() {
        // The original client: the same file, truncated and rewritten.
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(ch.join("c-2-s.msg"))
            .unwrap()
            .write_all(msg.as_bytes())
            .unwrap();
        fs::write(ch.join("c-2-s.done"), "").unwrap();
        let reply = ch.join("s-2-c.done");
        wait_until(Duration::from_secs(10), "latd's reply", || reply.exists());
        let text = fs::read_to_string(ch.join("s-2-c.msg")).unwrap();
        fs::remove_file(&reply).unwrap();
        assert!(
            !text.contains("changed while it was being read"),
            "request {i} refused: {text}"
        );
        let action = msg.lines().next().unwrap().trim_start_matches("action: ");
        assert!(
            text.contains(&format!("action: {action}")),
            "request {i}: {text}"
        );
    }
}
