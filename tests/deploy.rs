//! The deployment as deployed: StarlingX's LAT container and builder,
//! without an image. latd runs as the image's CMD runs it (tini as pid 1 of
//! its own pid namespace, `ionice -c 3 nice -n 15 /opt/LAT/lat/latd`, no
//! arguments, root, /localdisk, /opt/LAT/SDK and /opt/LAT/lat bind-mounted
//! in its own mount namespace, its own hostname); latc runs in another set
//! of namespaces as the build user (uid 1000), sharing only the workspace
//! at /localdisk. Also: the static release and its install layout, the
//! chart values, and two daemons whose volumes are mounted at one path.
//! Needs root (namespaces, mounts, chroot); says SKIPPED otherwise.

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BUILD_UID: u32 = 1000;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Skips (saying why) unless root with every tool the deployment needs.
fn skip_deployment(test: &str) -> bool {
    if skip_unless_root(test) {
        return true;
    }
    for tool in [
        "unshare", "nsenter", "chroot", "ionice", "nice", "tini", "mount",
    ] {
        if !have(tool) {
            skipped(&format!(
                "{test}: needs {tool} (CI installs tini; unshare, nsenter and chroot are util-linux/coreutils)"
            ));
            return true;
        }
    }
    false
}

/// The children of `pid`, from /proc.
fn children(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn cmdline(pid: i32) -> String {
    String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
        .trim_end()
        .to_string()
}

/// Live processes (host pids) whose environment carries `LATD_CHANNEL=mark`.
fn marked(mark: &str) -> Vec<i32> {
    let want = format!("LATD_CHANNEL={mark}");
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
                && fs::read(format!("/proc/{pid}/environ"))
                    .unwrap_or_default()
                    .split(|&b| b == 0)
                    .any(|v| v == want.as_bytes())
        })
        .collect()
}

/// What latd marks its processes with for the channel directory `dir`.
fn mark_of(dir: &Path) -> String {
    let md = fs::metadata(dir).unwrap();
    format!("dev{}:ino{}", md.dev(), md.ino())
}

/// One side of the deployment: `unshare` and, under it, pid 1 of the new
/// pid namespace (tini). Killed with its whole namespace on drop.
struct Side {
    unshare: Child,
    init: i32,
    log: PathBuf,
}

/// The image's file system: the host's /usr and /etc read-only, /dev, a
/// fresh /proc and /tmp, and what the pod mounts.
const SETUP: &str = r#"
set -eu
r=$1; ws=$2; bin=$3; sdk=$4; name=$5; shift 5
hostname "$name"
mount -o bind,ro /usr "$r/usr"
mount -o bind,ro /etc "$r/etc"
mount --rbind /dev "$r/dev"
mount -t proc proc "$r/proc"
mount -t tmpfs tmpfs "$r/tmp"
mount --bind "$ws" "$r/localdisk"
mount -o bind,ro "$bin" "$r/opt/LAT/lat"
if [ -n "$sdk" ]; then mount -o bind,ro "$sdk" "$r/opt/LAT/SDK"; fi
exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin chroot "$r" "$@"
"#;

impl Side {
    /// Starts one side in new pid, mount and uts namespaces; `cmd` runs as
    /// pid 1 in the image's root.
    fn start(env: &TestEnv, name: &str, sdk: bool, cmd: &[&str]) -> Side {
        let root = env.root.join(format!("root-{name}"));
        for d in [
            "usr",
            "etc",
            "dev",
            "proc",
            "tmp",
            "localdisk",
            "opt/LAT/lat",
            "opt/LAT/SDK",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for l in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
            let host = Path::new("/").join(l);
            if let Ok(target) = fs::read_link(&host) {
                let _ = std::os::unix::fs::symlink(target, root.join(l));
            } else if host.is_dir() {
                panic!("/{l} is a directory, not a link into /usr: extend the test's image");
            }
        }
        let log = env.root.join(format!("latd-side-{name}.log"));
        let out = fs::File::create(&log).unwrap();
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                SETUP,
                "sh",
            ])
            .arg(&root)
            .arg(env.root.join("localdisk"))
            .arg(image_bin())
            .arg(if sdk { sdk_dir() } else { PathBuf::new() })
            .arg(name)
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("unshare");
        let upid = unshare.id() as i32;
        let mut init = 0;
        // Set up once pid 1 has left the set-up script for the image's
        // command (entering its namespaces before would miss the root).
        let want = cmd.join(" ");
        wait_until(Duration::from_secs(10), "the namespace's pid 1", || {
            init = children(upid).first().copied().unwrap_or(0);
            init != 0 && cmdline(init) == want
        });
        Side { unshare, init, log }
    }

    /// The LAT container: `tini -- ionice -c 3 nice -n 15 /opt/LAT/lat/latd`.
    fn lat(env: &TestEnv, name: &str) -> Side {
        Side::start(
            env,
            name,
            true,
            &[
                "/usr/bin/tini",
                "--",
                "ionice",
                "-c",
                "3",
                "nice",
                "-n",
                "15",
                "/opt/LAT/lat/latd",
            ],
        )
    }

    /// The builder: only holds its namespaces; latc runs in them.
    fn builder(env: &TestEnv) -> Side {
        Side::start(env, "builder", false, &["/usr/bin/sleep", "infinity"])
    }

    /// latd's host pid, once tini has started it and it has exec'd.
    fn latd(&self) -> i32 {
        let mut pid = 0;
        wait_until(Duration::from_secs(10), "latd under tini", || {
            pid = children(self.init)
                .into_iter()
                .find(|&p| cmdline(p) == "/opt/LAT/lat/latd")
                .unwrap_or(0);
            pid != 0
        });
        pid
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, what: &str) {
        wait_until(Duration::from_secs(20), what, || self.log().contains(what));
    }

    /// Runs `args` in this side's namespaces and root as the build user,
    /// with the builder's environment.
    fn run_as_user(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["--target", &self.init.to_string()])
            .args(["--mount", "--uts", "--pid", "--root", "--wd"])
            .args(["--setuid", &BUILD_UID.to_string()])
            .args(["--setgid", &BUILD_UID.to_string()])
            .args(["--", "/usr/bin/env", "-i"])
            .args([
                "PATH=/opt/LAT/lat:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/tmp",
                "WORKSPACE_DIR=/localdisk",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    fn latc(&self, args: &[&str]) -> Output {
        let mut all = vec!["latc"];
        all.extend_from_slice(args);
        self.run_as_user(&all)
    }

    /// Waits until the whole side is gone (its pid 1 died).
    fn wait_gone(&mut self, within: Duration) {
        let start = Instant::now();
        while self.unshare.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < within, "the side did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the whole pid namespace (SIGKILL to its pid 1).
    fn kill_namespace(&mut self) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(self.init, libc::SIGKILL) };
        self.wait_gone(Duration::from_secs(10));
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if self.unshare.try_wait().ok().flatten().is_none() {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(self.init, libc::SIGKILL) };
            let _ = self.unshare.wait();
        }
    }
}

fn musl_installed() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| stdout(&o).lines().any(|l| l == "x86_64-unknown-linux-musl"))
        .unwrap_or(false)
}

/// The image's /opt/LAT/lat, made once by the install script: the static
/// release where the musl target is installed (as in CI), else this test
/// build (saying so).
fn image_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let dest = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy-image");
        let _ = fs::remove_dir_all(&dest);
        let mut cmd = Command::new(repo().join("deploy/install.sh"));
        cmd.arg("--destdir").arg(&dest);
        if !musl_installed() {
            skipped(
                "the static release in the deployment tests: no x86_64-unknown-linux-musl target; they run this host's test build instead",
            );
            let built = Path::new(LATD).parent().unwrap();
            // Built for this host, not for bullseye: no glibc check.
            cmd.arg("--from").arg(built).arg("--no-check");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "install.sh: {}{}", stdout(&o), stderr(&o));
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).unwrap();
        dest.join("opt/LAT/lat")
    })
}

/// The workspace (the pod's hostPath /localdisk, owned by the build user);
/// the image's /opt/LAT/lat is [`image_bin`].
fn deployment(tag: &str) -> TestEnv {
    let env = TestEnv::new(tag);
    let ws = env.root.join("localdisk");
    fs::create_dir_all(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(BUILD_UID), Some(BUILD_UID)).unwrap();
    image_bin();
    // Readable by all, as in the image; the SDK's YAML as the caller has it.
    fs::set_permissions(&env.root, fs::Permissions::from_mode(0o755)).unwrap();
    env
}

/// Writes the image YAML the deployed caller builds, as the build user.
fn caller_yaml(env: &TestEnv, standin: &str) {
    let p = env.root.join("localdisk/lat.yaml");
    fs::write(
        &p,
        format!("name: test\nmachine: intel-x86-64\nimage_type: [iso]\n{standin}\n"),
    )
    .unwrap();
    std::os::unix::fs::chown(&p, Some(BUILD_UID), Some(BUILD_UID)).unwrap();
}

/// StarlingX's build-image, steps 2 to 5 (PROTOCOL.md, "The deployed
/// caller"), in the builder's shell: build (exit code ignored), wait for
/// the log with `latc status` once a second, follow the log to the first
/// line containing `ERROR: ` or `DEBUG: Deploy ovmf.qcow2`, then
/// `latc stop`, 2 s, `latc status` and look for `idle`.
const CALLER: &str = r#"
echo "CALLER uid $(id -u) on $(hostname)"
latc --file=/localdisk/lat.yaml build
sleep 2
n=0
while [ ! -e /localdisk/log/log.appsdk ]; do
    out=$(latc status) || { echo "CALLER: latd is not running (latc status failed)"; exit 1; }
    case $out in
        *"lat_status: idle"*) break ;;
        *"lat_status: busy"*) ;;
        *) echo "CALLER: latd is not running ($out)"; exit 1 ;;
    esac
    n=$((n + 1)); [ $n -lt 300 ] || break
    sleep 1
done
[ -e /localdisk/log/log.appsdk ] || { echo "CALLER: latd is not running, please check"; exit 1; }
line=
for i in $(seq 1 1200); do
    line=$(grep -m 1 -e 'ERROR: ' -e 'DEBUG: Deploy ovmf.qcow2' /localdisk/log/log.appsdk)
    [ -z "$line" ] || break
    sleep 0.1
done
case $line in
    *"DEBUG: Deploy ovmf.qcow2"*) echo "CALLER: build succeeded" ;;
    *"ERROR: "*) echo "CALLER: build failed: $line" ;;
    *) echo "CALLER: no end in the log"; exit 1 ;;
esac
latc stop
sleep 2
if latc status | grep -q idle; then echo "CALLER: stopped"; else echo "CALLER: Failed to stop latd"; fi
"#;

fn run_caller(builder: &Side) -> String {
    let o = builder.run_as_user(&["bash", "-c", CALLER]);
    let out = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "the deployed caller failed:\n{out}");
    out
}

fn status_of(builder: &Side) -> serde_json::Value {
    let o = builder.latc(&["status", "--json"]);
    assert!(o.status.success(), "latc status: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn the_deployed_caller_drives_latd_started_as_the_image_starts_it() {
    if skip_deployment("the_deployed_caller_drives_latd_started_as_the_image_starts_it") {
        return;
    }
    let env = deployment("deployed");
    let lat = Side::lat(&env, "lat-tool");
    let latd = lat.latd();
    lat.wait_log("serving channel /localdisk/channel (workspace /localdisk, SDK /opt/LAT/SDK)");
    // As the CMD starts it: no arguments, niced, idle I/O class, root,
    // under tini as pid 1 of its namespace.
    assert_eq!(cmdline(latd), "/opt/LAT/lat/latd");
    let stat = fs::read_to_string(format!("/proc/{latd}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(fields[16], "15", "nice");
    let io = Command::new("ionice")
        .args(["-p", &latd.to_string()])
        .output()
        .unwrap();
    assert!(stdout(&io).contains("idle"), "ionice: {}", stdout(&io));
    assert_eq!(fs::metadata(format!("/proc/{latd}")).unwrap().uid(), 0);
    let status = fs::read_to_string(format!("/proc/{latd}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(
        nspid.split_whitespace().count() == 3,
        "not in a pid namespace of its own: {nspid}"
    );
    assert_eq!(
        cmdline(lat.init),
        "/usr/bin/tini -- ionice -c 3 nice -n 15 /opt/LAT/lat/latd"
    );

    let builder = Side::builder(&env);
    caller_yaml(&env, "standin_duration: 1\nstandin_log_lines: 5");
    let out = run_caller(&builder);
    assert!(out.contains("CALLER uid 1000 on builder"), "{out}");
    assert!(out.contains("CALLER: build succeeded"), "{out}");
    assert!(out.contains("CALLER: stopped"), "{out}");
    let s = status_of(&builder);
    assert_eq!(s["build_status"], "succeed", "{s}");
    // The request was the build user's, through the shared workspace only.
    let history = fs::read_to_string(env.root.join("localdisk/channel/client_message_history"))
        .unwrap_or_default();
    assert!(history.contains("/localdisk/lat.yaml"), "{history}");
}

#[test]
fn a_restart_of_the_lat_side_kills_its_build_and_the_next_latd_says_so() {
    if skip_deployment("a_restart_of_the_lat_side_kills_its_build_and_the_next_latd_says_so") {
        return;
    }
    let env = deployment("restart");
    let builder = Side::builder(&env);
    let channel = env.root.join("localdisk/channel");
    for (round, how) in ["latd killed", "pid namespace killed"].iter().enumerate() {
        let mut lat = Side::lat(&env, &format!("lat-{round}"));
        let latd = lat.latd();
        lat.wait_log("serving channel");
        caller_yaml(&env, "standin_duration: 60\nstandin_children: 2");
        let o = builder.latc(&["--file=/localdisk/lat.yaml", "build"]);
        assert!(o.status.success(), "{how}: {}", stderr(&o));
        let mark = mark_of(&channel);
        wait_workers(env.root.join("localdisk/log/log.appsdk"), &mark);
        if round == 0 {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(latd, libc::SIGKILL) };
            // tini's child died: tini exits, and the namespace with it.
            lat.wait_gone(Duration::from_secs(10));
        } else {
            lat.kill_namespace();
        }
        wait_until(Duration::from_secs(10), "the build to be gone", || {
            marked(&mark).is_empty()
        });
        // latc knows at once that nobody serves.
        let t = Instant::now();
        let o = builder.latc(&["status"]);
        let took = t.elapsed();
        assert_eq!(o.status.code(), Some(3), "{how}: {}", stderr(&o));
        assert!(stderr(&o).contains("no latd is running"), "{}", stderr(&o));
        eprintln!("{how}: latc status answered 'no latd' in {took:?}");
        // The restarted side serves, and says what became of the build.
        let next = Side::lat(&env, &format!("lat-{round}-again"));
        next.wait_log("serving channel");
        let s = status_of(&builder);
        assert_eq!(s["lat_status"], "idle", "{how}: {s}");
        assert_eq!(s["build_status"], "fail", "{how}: {s}");
        let reason = s["build"]["fail_reason"].as_str().unwrap_or("");
        assert!(reason.contains("interrupted"), "{how}: {reason}");
        drop(next);
    }
}

#[test]
fn a_rolling_update_hands_the_channel_from_the_old_lat_side_to_the_new() {
    if skip_deployment("a_rolling_update_hands_the_channel_from_the_old_lat_side_to_the_new") {
        return;
    }
    let env = deployment("rolling");
    let builder = Side::builder(&env);
    let mut old = Side::lat(&env, "old");
    old.latd();
    old.wait_log("serving channel");
    caller_yaml(&env, "standin_duration: 60");
    let o = builder.latc(&["--file=/localdisk/lat.yaml", "build"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let started = status_of(&builder)["started_at"].clone();
    // The new pod starts beside the old one: its latd waits.
    let new = Side::lat(&env, "new");
    new.latd();
    new.wait_log("latd is waiting for the lock held by another latd");
    assert!(env.root.join("localdisk/channel/latd.standby").is_file());
    for _ in 0..3 {
        let s = status_of(&builder);
        assert_eq!(s["started_at"], started, "the standby answered: {s}");
        assert_eq!(s["lat_status"], "busy");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!new.log().contains("serving channel"), "{}", new.log());
    // The old pod is terminated (SIGTERM to its pid 1, tini, which passes
    // it on): latd stops the build, records it, exits; the new one serves.
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(old.init, libc::SIGTERM) };
    old.wait_gone(Duration::from_secs(40));
    assert!(old.log().contains("latd exiting"), "{}", old.log());
    new.wait_log("serving channel");
    let s = status_of(&builder);
    assert_ne!(s["started_at"], started, "{s}");
    assert_eq!(s["lat_status"], "idle", "{s}");
    assert_eq!(s["build_status"], "fail", "the stopped build: {s}");
    assert!(!env.root.join("localdisk/channel/latd.standby").exists());
    // And the deployed caller works through the new one.
    caller_yaml(&env, "standin_duration: 1");
    let out = run_caller(&builder);
    let why = || {
        format!(
            "{out}\n--- the SDK's log:\n{}\n--- the new latd:\n{}",
            fs::read_to_string(env.root.join("localdisk/log/log.appsdk")).unwrap_or_default(),
            new.log()
        )
    };
    assert!(out.contains("CALLER: build succeeded"), "{}", why());
    assert!(out.contains("CALLER: stopped"), "{}", why());
}

/// Waits until the build whose log is `log` has its workers (the log says
/// so, and the leader and two workers carry `mark`).
fn wait_workers(log: PathBuf, mark: &str) {
    wait_until(Duration::from_secs(20), "the build's workers", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("worker")
            && marked(mark).len() >= 3
    });
}

/// Two latds in one pid namespace, each on its own volume mounted at the
/// same path (each in a mount namespace of its own): starting or restarting
/// one never kills the other's build, and a restart still kills what its
/// own predecessor left.
#[test]
fn two_daemons_on_volumes_mounted_at_one_path_keep_their_own_processes() {
    let test = "two_daemons_on_volumes_mounted_at_one_path_keep_their_own_processes";
    if skip_unless_root(test) {
        return;
    }
    if !have("unshare") || !have("nsenter") {
        skipped(&format!("{test}: needs unshare and nsenter"));
        return;
    }
    let env = TestEnv::new("samepath");
    let at = env.root.join("mnt");
    fs::create_dir_all(&at).unwrap();
    let vol = |n: &str| {
        let v = env.root.join(n);
        fs::create_dir_all(&v).unwrap();
        v
    };
    let (va, vb) = (vol("vol-a"), vol("vol-b"));
    let start = |v: &Path, n: &str| -> Daemon {
        let log = fs::File::create(env.root.join(format!("latd-{n}.log"))).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$1" "$2" && exec "$3" --workspace "$2" --sdk "$4" --grace 1 -d"#)
            .arg("sh")
            .arg(v)
            .arg(&at)
            .arg(LATD)
            .arg(sdk_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon {
            child: Some(child),
            channel: v.join("channel"),
        };
        d.wait_serving();
        d
    };
    let latc_in = |d: &Daemon, args: &[&str]| -> Output {
        Command::new("nsenter")
            .args(["--target", &d.pid().to_string(), "--mount", "--"])
            .arg(LATC)
            .args(args)
            .env("WORKSPACE_DIR", &at)
            .env_remove("LAT_CHANNEL_DIR")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let build = |d: &Daemon, v: &Path| {
        fs::write(
            v.join("lat.yaml"),
            "name: t\nmachine: intel-x86-64\nimage_type: [iso]\nstandin_duration: 60\nstandin_children: 2\n",
        )
        .unwrap();
        let yaml = at.join("lat.yaml");
        let o = latc_in(d, &["build", "--file", yaml.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let mut a = start(&va, "a");
    let mark_a = mark_of(&va.join("channel"));
    build(&a, &va);
    wait_workers(va.join("log/log.appsdk"), &mark_a);
    let status_a = |a: &Daemon| -> serde_json::Value {
        let o = latc_in(a, &["status", "--json"]);
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // (latd runs in this pid namespace: its pids are ours.)
    let leader = status_a(&a)["build"]["process"]["pid"].as_i64().unwrap() as i32;
    let leader_alive = || {
        fs::read_to_string(format!("/proc/{leader}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    assert!(leader_alive());
    // b starts on its own volume at the same path, is killed, restarts.
    let mut b = start(&vb, "b");
    let mark_b = mark_of(&vb.join("channel"));
    assert_ne!(mark_a, mark_b);
    build(&b, &vb);
    wait_workers(vb.join("log/log.appsdk"), &mark_b);
    b.kill9();
    let b_left = marked(&mark_b);
    assert!(!b_left.is_empty());
    let _b2 = start(&vb, "b-again");
    wait_until(
        Duration::from_secs(10),
        "b's leftovers to be killed",
        || marked(&mark_b).is_empty(),
    );
    // a's build never noticed.
    assert!(leader_alive(), "a's build was killed");
    assert!(marked(&mark_a).len() >= 3, "a's workers were killed");
    let s = status_a(&a);
    assert_eq!(s["state"], "building", "{s}");
    // And a's own restart still finds a's leftovers.
    a.kill9();
    let _a2 = start(&va, "a-again");
    wait_until(
        Duration::from_secs(10),
        "a's leftovers to be killed",
        || marked(&mark_a).is_empty(),
    );
}

/// The release build: static, installed as /opt/LAT/lat/{latd,latc}
/// under DESTDIR, and running where there is no libc at all (an empty
/// root), so on bullseye's glibc 2.31 and trixie's alike.
#[test]
fn the_release_build_is_static_and_installs_into_the_image_layout() {
    let test = "the_release_build_is_static_and_installs_into_the_image_layout";
    if !musl_installed() {
        skipped(&format!(
            "{test}: the Rust target x86_64-unknown-linux-musl is not installed (rustup target add x86_64-unknown-linux-musl; CI does)"
        ));
        return;
    }
    if !have("readelf") {
        skipped(&format!("{test}: needs readelf (binutils)"));
        return;
    }
    let env = TestEnv::new("release");
    let dest = env.root.join("image");
    let o = Command::new(repo().join("deploy/install.sh"))
        .env("DESTDIR", &dest)
        .env_remove("PREFIX")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "install.sh: {}{}",
        stdout(&o),
        stderr(&o)
    );
    for b in ["latd", "latc"] {
        let p = dest.join("opt/LAT/lat").join(b);
        let md = fs::metadata(&p).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o755, "{b}");
        let elf = Command::new("readelf")
            .args(["-lW"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            !stdout(&elf).contains("program interpreter"),
            "{b} is not static"
        );
        let dynamic = Command::new("readelf")
            .args(["-dW"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            !stdout(&dynamic).contains("(NEEDED)"),
            "{b} needs a shared library"
        );
        let o = Command::new(repo().join("deploy/install.sh"))
            .arg("--check")
            .arg(&p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // The check refuses what would not run on glibc 2.31 (this test's own
    // binaries, when built against a newer glibc).
    let newest = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "readelf -VW {LATD} | grep -o 'GLIBC_2\\.[0-9]*' | sort -t. -k2,2n | tail -n 1"
        ))
        .output()
        .unwrap();
    let minor: u32 = stdout(&newest)
        .trim()
        .strip_prefix("GLIBC_2.")
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let o = Command::new(repo().join("deploy/install.sh"))
        .args(["--check", LATD])
        .output()
        .unwrap();
    assert_eq!(o.status.success(), minor <= 31, "{}", stderr(&o));
    // Nothing but the binaries in an empty root: they run.
    if skip_unless_root(&format!("{test} (the run in an empty root)")) {
        return;
    }
    let empty = env.root.join("empty");
    fs::create_dir_all(&empty).unwrap();
    fs::copy(dest.join("opt/LAT/lat/latd"), empty.join("latd")).unwrap();
    fs::copy(dest.join("opt/LAT/lat/latc"), empty.join("latc")).unwrap();
    let o = Command::new("chroot")
        .arg(&empty)
        .args(["/latd", "--version"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("latd "), "{}", stdout(&o));
    // latc too: it says no latd serves that empty root's workspace.
    let o = Command::new("chroot")
        .arg(&empty)
        .args(["/latc", "status"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("/localdisk/channel"), "{}", stderr(&o));
}

/// The chart values and the recipe say what the migration guide says.
#[test]
fn the_chart_values_and_the_recipe_are_as_documented() {
    let text = fs::read_to_string(repo().join("deploy/helm/stx-lat-tool-values.yaml")).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).expect("the values are YAML");
    assert_eq!(v["replicaCount"].as_u64(), Some(1));
    assert_eq!(v["strategy"]["type"].as_str(), Some("Recreate"));
    let grace = v["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("LATD_GRACE_SECS"))
        .and_then(|e| e["value"].as_str()?.parse::<u64>().ok())
        .unwrap();
    let term = v["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        term >= grace + 10,
        "{term} s leaves latd's {grace} s grace too little room"
    );
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let cmd: Vec<&str> = v[probe]["exec"]["command"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{probe}: no exec command"))
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert_eq!(cmd, ["/opt/LAT/lat/latc", "health"], "{probe}");
        assert!(v[probe]["timeoutSeconds"].as_u64().unwrap() >= 1, "{probe}");
    }
    // The startup probe outlasts an NFS server's grace period (90 s).
    let s = &v["startupProbe"];
    assert!(s["periodSeconds"].as_u64().unwrap() * s["failureThreshold"].as_u64().unwrap() > 90);

    let recipe = fs::read_to_string(repo().join("deploy/Containerfile")).unwrap();
    assert!(recipe.contains(r#"ENTRYPOINT ["/usr/bin/tini", "--"]"#));
    assert!(
        recipe.contains(r#"CMD ["ionice", "-c", "3", "nice", "-n", "15", "/opt/LAT/lat/latd"]"#)
    );
    assert_eq!(
        recipe
            .matches(
                "COPY --from=latd-build /out/opt/LAT/lat/latd /out/opt/LAT/lat/latc /opt/LAT/lat/"
            )
            .count(),
        2,
        "both images get the pair"
    );
    assert!(recipe.contains("RUN deploy/install.sh --destdir /out --prefix /opt/LAT/lat"));
    let guide = fs::read_to_string(repo().join("deploy/MIGRATION.md")).unwrap();
    for must in [
        "byte for byte",
        "Rolling back",
        "strategy: Recreate",
        "terminationGracePeriodSeconds",
    ] {
        assert!(guide.contains(must), "MIGRATION.md lacks {must}");
    }
}
