//! Shared test harness: a private workspace per test, the real `latd` and
//! `latc` binaries, the stand-in SDK, and waiting on conditions with
//! deadlines instead of fixed sleeps.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const LATD: &str = env!("CARGO_BIN_EXE_latd");
pub const LATC: &str = env!("CARGO_BIN_EXE_latc");

pub fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary directory holding `ws/` (the workspace, with `ws/channel`).
/// Removed on drop.
pub struct TestEnv {
    pub root: PathBuf,
    pub ws: PathBuf,
    pub channel: PathBuf,
}

impl TestEnv {
    pub fn new(tag: &str) -> TestEnv {
        TestEnv::new_in(&std::env::temp_dir(), tag)
    }

    /// In memory (/dev/shm) where there is one: for tests that make many
    /// files, which some disks create slowly.
    pub fn new_in_memory(tag: &str) -> TestEnv {
        let shm = Path::new("/dev/shm");
        TestEnv::new_in(if shm.is_dir() { shm } else { Path::new("/tmp") }, tag)
    }

    pub fn new_in(base: &Path, tag: &str) -> TestEnv {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let root = base.join(format!("latd-test-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let ws = root.join("ws");
        fs::create_dir_all(&ws).unwrap();
        // Canonical, so paths compare equal to what latd reports.
        let ws = ws.canonicalize().unwrap();
        let root = root.canonicalize().unwrap();
        TestEnv {
            channel: ws.join("channel"),
            root,
            ws,
        }
    }

    /// Writes an image YAML for the stand-in SDK under the workspace.
    pub fn yaml(&self, name: &str, standin: &str) -> PathBuf {
        let p = self.ws.join(name);
        fs::write(
            &p,
            format!("name: test\nmachine: intel-x86-64\nimage_type: [iso]\n{standin}\n"),
        )
        .unwrap();
        p
    }

    /// Starts latd on this workspace with a short grace period.
    pub fn daemon(&self) -> Daemon {
        self.daemon_with(&["--grace", "2"])
    }

    pub fn daemon_with(&self, args: &[&str]) -> Daemon {
        self.start_daemon(&self.ws, args, true)
    }

    /// Starts latd on workspace `ws` (its channel inside), with `-d` if
    /// `debug`, and waits until it is up.
    pub fn start_daemon(&self, ws: &Path, args: &[&str], debug: bool) -> Daemon {
        let log = fs::File::create(self.root.join(format!(
            "latd-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )))
        .unwrap();
        let child = Command::new(LATD)
            .args(["--workspace", ws.to_str().unwrap()])
            .args(["--sdk", sdk_dir().to_str().unwrap()])
            .args(args)
            .args(if debug { &["-d"][..] } else { &[] })
            .env_remove("RUST_LOG")
            .env_remove("LAT_CHANNEL_DIR")
            .env_remove("LATD_POLL_MS")
            .env_remove("LATD_GRACE_SECS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start latd");
        let d = Daemon {
            child: Some(child),
            channel: ws.join("channel"),
        };
        d.wait_serving();
        d
    }

    /// A latc command preset for this workspace.
    pub fn latc_cmd(&self) -> Command {
        let mut c = Command::new(LATC);
        c.env("WORKSPACE_DIR", &self.ws)
            .env_remove("LAT_CHANNEL_DIR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    /// Runs latc with `args`.
    pub fn latc(&self, args: &[&str]) -> Output {
        self.latc_cmd().args(args).output().expect("run latc")
    }

    /// Processes whose working directory is inside this test's directory:
    /// what is left of builds. Zombies are not counted.
    pub fn leftover_processes(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(procs) = fs::read_dir("/proc") else {
            return out;
        };
        for p in procs.flatten() {
            let name = p.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cwd) = fs::read_link(p.path().join("cwd")) else {
                continue;
            };
            if !cwd.starts_with(&self.root) {
                continue;
            }
            let stat = fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("");
            if state == "Z" {
                continue;
            }
            let cmd = fs::read(p.path().join("cmdline")).unwrap_or_default();
            out.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
        out
    }

    /// Waits for every build process of this test to be gone.
    pub fn assert_no_leftovers(&self) {
        let mut last = Vec::new();
        let gone = poll_until(Duration::from_secs(5), || {
            last = self.leftover_processes();
            last.is_empty()
        });
        assert!(gone, "processes survived: {last:?}");
    }

    /// Writes `lat.yaml` with the `standin_*` settings, starts a build of it
    /// with latc, and waits until its workers run. Returns the YAML's path.
    pub fn start_build(&self, standin: &str) -> PathBuf {
        let yaml = self.yaml("lat.yaml", standin);
        let o = self.latc(&["build", "--file", yaml.to_str().unwrap()]);
        assert!(o.status.success(), "latc build: {}", stderr(&o));
        self.wait_workers();
        yaml
    }

    /// Waits until the stand-in build that runs now has started its workers
    /// (and set up its signal handling). Its log line names its pid: two
    /// builds in one second share one log file, as with the real SDK.
    pub fn wait_workers(&self) {
        let log = self.ws.join("log/log.appsdk");
        wait_until(Duration::from_secs(10), "the build's workers", || {
            let s = self.status_json();
            let pid = &s["build"]["process"]["pid"];
            s["build"]["outcome"] == "running"
                && pid.is_u64()
                && fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(&format!("(appsdk {pid})"))
        });
    }

    pub fn status_text(&self) -> String {
        let o = self.latc(&["status"]);
        assert!(o.status.success(), "latc status failed: {}", stderr(&o));
        stdout(&o)
    }

    /// `latc status --json` as a value.
    pub fn status_json(&self) -> serde_json::Value {
        let o = self.latc(&["status", "--json"]);
        assert!(o.status.success(), "latc status failed: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).expect("status --json is JSON")
    }

    pub fn wait_state(&self, state: &str) {
        wait_until(Duration::from_secs(20), &format!("state {state}"), || {
            self.status_json()["state"] == state
        });
    }
}

/// Lazily unmounts every mount below `dir`, deepest first: what a stand-in
/// build killed with its latd left (as root), so no test leaves mounts.
pub fn unmount_below(dir: &Path) {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: a NUL-terminated path; umount2 has no memory effects.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for p in self.leftover_processes() {
            if let Some(pid) = p.split(':').next().and_then(|s| s.parse::<i32>().ok()) {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // The cgroups of builds whose latd was killed while they ran (a
        // latd started on the channel again would have removed them).
        if let Ok(tag) = latd::effects::channel_mark(&self.channel) {
            latd::cgroup::kill_leftovers(&tag);
        }
        unmount_below(&self.root);
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.root);
        } else {
            eprintln!("test files kept in {}", self.root.display());
        }
    }
}

/// A running latd; killed (SIGKILL) on drop unless it already exited.
pub struct Daemon {
    pub child: Option<Child>,
    pub channel: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Waits until this latd serves its channel: its heartbeat names it
    /// (a heartbeat left by a previous latd, or a standby, does not count).
    pub fn wait_serving(&self) {
        let alive = self.channel.join("latd.alive");
        let me = format!("pid: {}\n", self.pid());
        wait_until(Duration::from_secs(10), "latd to come up", || {
            fs::read_to_string(&alive).is_ok_and(|t| t.contains(&me))
        });
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for latd to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let mut child = self.child.take().unwrap();
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
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `cond` every 10 ms until it holds or `within` passes.
pub fn poll_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn wait_until(within: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(within, cond),
        "timed out after {within:?} waiting for {what}"
    );
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Says plainly, past the test harness's output capture, that (part of) a
/// test was skipped and why.
pub fn skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}");
}

/// Says plainly that a root-only test was skipped.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    skipped(&format!(
        "{test}: needs root (run the suite as root, as CI does)"
    ));
    true
}

impl TestEnv {
    /// Starts latd with `ws` as its workspace (and `ws/channel`).
    pub fn daemon_on(&self, ws: &Path) -> Daemon {
        self.start_daemon(ws, &["--grace", "2"], true)
    }

    /// Runs latc against workspace `ws`.
    pub fn latc_on(&self, ws: &Path, args: &[&str]) -> Output {
        self.latc_cmd()
            .env("WORKSPACE_DIR", ws)
            .args(args)
            .output()
            .expect("run latc")
    }
}

impl TestEnv {
    /// Starts latd as the container does (default log level, no `-d`)
    /// with extra `args`: for measurements, where debug logging would
    /// weigh on what is measured.
    pub fn daemon_plain(&self, args: &[&str]) -> Daemon {
        self.start_daemon(&self.ws, args, false)
    }
}

// ---------------------------------------------------------------------
// Helpers of the fault-injection and soak suites.
// ---------------------------------------------------------------------

impl TestEnv {
    /// Everything the daemons of this test logged (all `latd-*.log`).
    pub fn daemon_log(&self) -> String {
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("latd-") && n.ends_with(".log"))
            })
            .collect();
        logs.sort();
        logs.iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// Starts latd as user (and group) `uid`, e.g. 65534, so that file
    /// permissions apply to it even when the tests run as root.
    pub fn daemon_as(&self, uid: u32, args: &[&str]) -> Daemon {
        use std::os::unix::process::CommandExt;
        let log = fs::File::create(self.root.join(format!(
            "latd-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )))
        .unwrap();
        let child = Command::new(LATD)
            .args(["--workspace", self.ws.to_str().unwrap()])
            .args(["--sdk", sdk_dir().to_str().unwrap()])
            .args(args)
            .arg("-d")
            .env_remove("RUST_LOG")
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start latd");
        let d = Daemon {
            child: Some(child),
            channel: self.channel.clone(),
        };
        d.wait_serving();
        d
    }

    /// Lines of the request history (the current file, not the rotated one).
    pub fn history_lines(&self) -> Vec<String> {
        fs::read_to_string(self.channel.join("client_message_history"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Daemon {
    /// Whether latd is still running (reaps it if it exited).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// How many file descriptors latd holds open.
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Live child processes of latd (zombies not counted).
    pub fn children(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return out;
        };
        for t in tasks.flatten() {
            let list = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for pid in list
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("");
                if !state.is_empty() && state != "Z" {
                    out.push(pid);
                }
            }
        }
        out
    }

    /// A field of /proc/<pid>/status in kB (e.g. "VmHWM").
    pub fn status_kb(&self, field: &str) -> Option<u64> {
        let text = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

/// A reply as the wire carries it (a YAML mapping).
pub type Wire = serde_yaml::Value;

/// A string field of a reply, if present.
pub fn field(reply: &Wire, key: &str) -> Option<String> {
    reply.get(key).and_then(|v| v.as_str()).map(str::to_string)
}

fn wait_fast(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > within {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// One exchange of the original single-slot protocol, as the original
/// client does it: write `c-2-s.msg` (unless `msg` is `None`), create
/// `c-2-s.done`, wait for `s-2-c.done`, read `s-2-c.msg`, delete
/// `s-2-c.done`. Callers must not run two at once on one channel.
pub fn legacy_exchange(
    channel: &Path,
    msg: Option<&[u8]>,
    within: Duration,
) -> Result<Wire, String> {
    let done = channel.join("s-2-c.done");
    if done.exists() {
        return Err("s-2-c.done exists before the request was sent (a duplicate reply?)".into());
    }
    if let Some(m) = msg {
        fs::write(channel.join("c-2-s.msg"), m).map_err(|e| format!("write c-2-s.msg: {e}"))?;
    }
    fs::write(channel.join("c-2-s.done"), b"").map_err(|e| format!("write c-2-s.done: {e}"))?;
    if !wait_fast(within, || done.exists()) {
        return Err(format!("no s-2-c.done within {within:?}"));
    }
    let text = fs::read(channel.join("s-2-c.msg")).map_err(|e| format!("read s-2-c.msg: {e}"))?;
    fs::remove_file(&done).map_err(|e| format!("remove s-2-c.done: {e}"))?;
    serde_yaml::from_slice(&text).map_err(|e| {
        format!(
            "s-2-c.msg is not YAML ({e}): {}",
            String::from_utf8_lossy(&text)
        )
    })
}

/// Sends `msg` as `req-<id>.yaml` (written under a temporary name, then
/// renamed), pokes the wake-up FIFO and waits for `rep-<id>.yaml`, which it
/// reads and removes.
pub fn named_exchange(
    channel: &Path,
    id: &str,
    msg: &[u8],
    within: Duration,
) -> Result<Wire, String> {
    named_send(channel, id, msg)?;
    named_wait(channel, id, within)
}

/// The sending half of [`named_exchange`].
pub fn named_send(channel: &Path, id: &str, msg: &[u8]) -> Result<(), String> {
    let tmp = channel.join(format!(".client-{id}.tmp"));
    fs::write(&tmp, msg).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, channel.join(format!("req-{id}.yaml")))
        .map_err(|e| format!("rename to req-{id}.yaml: {e}"))?;
    latd::fsutil::poke(&channel.join("latd.wake"));
    Ok(())
}

/// The waiting half of [`named_exchange`].
pub fn named_wait(channel: &Path, id: &str, within: Duration) -> Result<Wire, String> {
    let rep = channel.join(format!("rep-{id}.yaml"));
    let mut text = Vec::new();
    let got = wait_fast(within, || match fs::read(&rep) {
        Ok(t) => {
            text = t;
            true
        }
        Err(_) => false,
    });
    if !got {
        return Err(format!("no rep-{id}.yaml within {within:?}"));
    }
    fs::remove_file(&rep).map_err(|e| format!("remove rep-{id}.yaml: {e}"))?;
    serde_yaml::from_slice(&text).map_err(|e| {
        format!(
            "rep-{id}.yaml is not YAML ({e}): {}",
            String::from_utf8_lossy(&text)
        )
    })
}

/// Names in the channel that start with `prefix`.
pub fn channel_files(channel: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(channel)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// The client written only from the protocol document (Python), ready to
/// take `--action ...`.
pub fn protocol_client_cmd(channel: &Path) -> Command {
    let mut c = Command::new("python3");
    c.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/protocol_client.py"
    ))
    .args(["--channel", channel.to_str().unwrap(), "--timeout", "20"]);
    c
}

/// Runs the protocol-document client; its reply as JSON.
pub fn protocol_client(channel: &Path, args: &[&str]) -> serde_json::Value {
    let o = protocol_client_cmd(channel)
        .args(args)
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}
