//! Soak: several clients at once, for thousands of mixed requests (status,
//! logs, getyaml, build, stop, and unknown actions with unique names),
//! with builds started, stopped, succeeding and failing meanwhile:
//!
//! - `latc` processes (the real binary), several threads of them;
//! - in-process writers of per-request files (`req-<id>.yaml`);
//! - one writer of the original single-slot protocol (`c-2-s.msg`): that
//!   slot is one-client-at-a-time by design, so its requests are
//!   serialised in one thread.
//!
//! Every request must get exactly one reply, the reply to *its* request
//! (same action; unknown actions carry a unique name that must come back),
//! within the timeout; at the end nothing is left: no request or reply
//! file, no build process, no child of latd, no leaked descriptor, and the
//! history holds one line per request.
//!
//! A reduced soak runs by default (well under a minute). The full one:
//!
//!     LATD_SOAK_FULL=1 cargo test --release --test soak -- --nocapture

mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A reply later than this is a lost reply.
const REPLY_WITHIN: Duration = Duration::from_secs(60);
/// How often latd sweeps uncollected replies older than 10 minutes.
const SWEEP_PERIOD: Duration = Duration::from_secs(60);

struct Plan {
    latc_threads: usize,
    latc_per_thread: usize,
    file_threads: usize,
    file_per_thread: usize,
    legacy_requests: usize,
}

fn plan() -> Plan {
    if std::env::var("LATD_SOAK_FULL").as_deref() == Ok("1") {
        Plan {
            latc_threads: 4,
            latc_per_thread: 750,
            file_threads: 4,
            file_per_thread: 3000,
            legacy_requests: 5000,
        }
    } else {
        Plan {
            latc_threads: 3,
            latc_per_thread: 80,
            file_threads: 3,
            file_per_thread: 500,
            legacy_requests: 700,
        }
    }
}

/// A small deterministic generator (xorshift64*), seeded per thread.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Act {
    Status,
    Logs,
    Getyaml,
    Build,
    Stop,
    /// An unknown action with a unique name (raw writers only).
    Probe,
}

impl Act {
    fn name(self) -> &'static str {
        match self {
            Act::Status => "status",
            Act::Logs => "logs",
            Act::Getyaml => "getyaml",
            Act::Build => "build",
            Act::Stop => "stop",
            Act::Probe => "probe",
        }
    }
}

fn pick(rng: &mut Rng, probes: bool) -> Act {
    let r = rng.below(100);
    match r {
        0..=34 => Act::Status,
        35..=52 => Act::Logs,
        53..=60 => Act::Getyaml,
        61..=77 => Act::Build,
        78..=92 => Act::Stop,
        _ if probes => Act::Probe,
        _ => Act::Status,
    }
}

/// What the clients saw, for the summary and the final checks.
#[derive(Default)]
struct Tally {
    sent: usize,
    by_action: BTreeMap<(&'static str, &'static str), usize>,
    builds_started: usize,
    builds_refused: usize,
    stops_that_stopped: usize,
    slowest: Duration,
}

impl Tally {
    fn add(&mut self, client: &'static str, act: Act, took: Duration) {
        self.sent += 1;
        *self.by_action.entry((client, act.name())).or_default() += 1;
        self.slowest = self.slowest.max(took);
    }
}

struct World {
    channel: PathBuf,
    ws: PathBuf,
    yamls: Vec<PathBuf>,
    example: PathBuf,
    log: PathBuf,
    tally: Mutex<Tally>,
}

impl World {
    fn request_text(&self, act: Act, probe: &str, rng: &mut Rng) -> String {
        let ws = self.ws.display();
        match act {
            Act::Build => format!(
                "action: build\nworkdir: {ws}\nyaml_file: {}\n",
                self.yamls[rng.below(self.yamls.len() as u64) as usize].display()
            ),
            Act::Probe => format!("action: {probe}\nworkdir: {ws}\n"),
            _ => format!("action: {}\nworkdir: {ws}\n", act.name()),
        }
    }

    /// Checks a raw reply against its request; returns a description of
    /// what is wrong.
    fn check_reply(&self, act: Act, probe: &str, r: &Wire) -> Result<(), String> {
        let action = field(r, "action").unwrap_or_default();
        let result = field(r, "result").unwrap_or_default();
        let reason = field(r, "fail_reason").unwrap_or_default();
        let want_action = if act == Act::Probe { probe } else { act.name() };
        if action != want_action {
            return Err(format!("crossed reply: asked {want_action}, got {r:?}"));
        }
        let ok = match act {
            Act::Status => {
                result == "succeed"
                    && field(r, "status_file").is_some_and(|p| p.ends_with("status.lat"))
            }
            Act::Logs => {
                (result == "succeed" && field(r, "log_file_path").as_deref() == self.log.to_str())
                    || (result == "fail" && reason.contains("No log file found"))
            }
            Act::Getyaml => {
                result == "succeed"
                    && field(r, "yaml_file_path").as_deref() == self.example.to_str()
            }
            Act::Build => {
                if result == "succeed" && r.get("build_id").is_some() {
                    self.tally.lock().unwrap().builds_started += 1;
                    true
                } else if result == "fail"
                    && (reason.contains("a build is already running")
                        || reason.contains("a build is being stopped"))
                {
                    self.tally.lock().unwrap().builds_refused += 1;
                    true
                } else {
                    false
                }
            }
            Act::Stop => {
                if field(r, "message").is_some_and(|m| m.contains("stopped")) {
                    self.tally.lock().unwrap().stops_that_stopped += 1;
                }
                result == "succeed"
            }
            Act::Probe => result == "fail" && reason.contains(&format!("unknown action '{probe}'")),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("wrong reply to {want_action}: {r:?}"))
        }
    }
}

/// A client of per-request files, in process.
fn file_client(w: Arc<World>, thread: usize, count: usize) {
    let mut rng = Rng::new(1000 + thread as u64);
    for n in 0..count {
        let act = pick(&mut rng, true);
        let probe = format!("probe-f{thread}-{n}");
        let text = w.request_text(act, &probe, &mut rng);
        let id = format!("soak-f{thread}-{n}");
        let t = Instant::now();
        let r = named_exchange(&w.channel, &id, text.as_bytes(), REPLY_WITHIN)
            .unwrap_or_else(|e| panic!("file client {thread}, request {n} ({}): {e}", act.name()));
        let took = t.elapsed();
        if let Err(e) = w.check_reply(act, &probe, &r) {
            panic!("file client {thread}, request {n}: {e}");
        }
        w.tally.lock().unwrap().add("file", act, took);
    }
}

/// The one client of the original single slot.
fn legacy_client(w: Arc<World>, count: usize) {
    let mut rng = Rng::new(7);
    for n in 0..count {
        let act = pick(&mut rng, true);
        let probe = format!("probe-legacy-{n}");
        let text = w.request_text(act, &probe, &mut rng);
        let t = Instant::now();
        let r = legacy_exchange(&w.channel, Some(text.as_bytes()), REPLY_WITHIN)
            .unwrap_or_else(|e| panic!("original-protocol request {n} ({}): {e}", act.name()));
        let took = t.elapsed();
        if let Err(e) = w.check_reply(act, &probe, &r) {
            panic!("original-protocol request {n}: {e}");
        }
        w.tally.lock().unwrap().add("legacy", act, took);
    }
}

/// A thread running `latc`, checking its exit code and what it printed.
fn latc_client(
    w: Arc<World>,
    env_ws: PathBuf,
    thread: usize,
    count: usize,
    example_text: Arc<String>,
) {
    let mut rng = Rng::new(500 + thread as u64);
    for n in 0..count {
        let act = pick(&mut rng, false);
        let mut cmd = std::process::Command::new(LATC);
        cmd.env("WORKSPACE_DIR", &env_ws)
            .env_remove("LAT_CHANNEL_DIR")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .args(["--timeout", "60", act.name()]);
        if act == Act::Build {
            let y = &w.yamls[rng.below(w.yamls.len() as u64) as usize];
            cmd.arg("--file").arg(y);
        }
        let t = Instant::now();
        let o = cmd.output().expect("run latc");
        let took = t.elapsed();
        let (out, err, code) = (stdout(&o), stderr(&o), o.status.code());
        let what = format!(
            "latc thread {thread}, run {n}: latc {} -> {code:?}\nstdout: {out}\nstderr: {err}",
            act.name()
        );
        assert_ne!(code, Some(3), "lost reply: {what}");
        let ok = match (act, code) {
            (Act::Status, Some(0)) => {
                out.contains("lat_status: ") && out.contains("build_status: ")
            }
            (Act::Logs, Some(0)) => {
                out.contains("INFO: appsdk ")
                    || (out.is_empty() && err.contains("its SDK has not created this log yet"))
            }
            // The log named in the reply can be moved aside by a new build
            // before latc reads it.
            (Act::Logs, Some(1)) => {
                err.contains("logs refused: No log file found")
                    || err.contains("latd named the log")
            }
            (Act::Getyaml, Some(0)) => example_text.starts_with(&out),
            (Act::Build, Some(0)) => {
                w.tally.lock().unwrap().builds_started += 1;
                err.contains(" started; log: ")
            }
            (Act::Build, Some(1)) => {
                w.tally.lock().unwrap().builds_refused += 1;
                err.contains("build refused: a build is already running")
                    || err.contains("build refused: a build is being stopped")
            }
            (Act::Stop, Some(0)) => {
                if err.contains(" stopped") {
                    w.tally.lock().unwrap().stops_that_stopped += 1;
                }
                err.contains("build")
            }
            _ => false,
        };
        assert!(ok, "wrong answer: {what}");
        w.tally.lock().unwrap().add("latc", act, took);
    }
}

fn history_count(channel: &Path) -> (usize, bool) {
    let lines = |name: &str| {
        fs::read_to_string(channel.join(name))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let rotated = channel.join("client_message_history.1").exists();
    (
        lines("client_message_history") + lines("client_message_history.1"),
        rotated,
    )
}

#[test]
fn soak_many_clients_mixed_requests() {
    let plan = plan();
    let env = TestEnv::new("soak");
    let daemon_started = Instant::now();
    let mut d = env.daemon_with(&["--grace", "1", "--history", "20"]);
    // A reply whose client went away an hour ago: the periodic sweep
    // (every 60 s) must remove it while latd runs.
    let abandoned = env.channel.join("rep-abandoned-by-its-client.yaml");
    fs::write(&abandoned, "action: status\nresult: succeed\n").unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&abandoned)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    let yamls = vec![
        env.yaml("fast.yaml", "standin_duration: 0.3\nstandin_log_lines: 3"),
        env.yaml("mid.yaml", "standin_duration: 1\nstandin_children: 3"),
        env.yaml("slow.yaml", "standin_duration: 3\nstandin_log_lines: 6"),
        env.yaml(
            "failing.yaml",
            "standin_duration: 0.4\nstandin_result: fail",
        ),
        env.yaml(
            "stubborn.yaml",
            "standin_duration: 3\nstandin_ignore_term: true",
        ),
    ];
    // The example YAML, to check what `latc getyaml` prints.
    let o = env.latc(&["getyaml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let example_text = Arc::new(stdout(&o));
    let example = env
        .ws
        .join("exampleyamls/debian-image-base-intel-x86-64.yaml");
    let fds_before = d.fd_count();
    let (history_before, _) = history_count(&env.channel);

    let w = Arc::new(World {
        channel: env.channel.clone(),
        ws: env.ws.clone(),
        yamls,
        example,
        log: env.ws.join("log/log.appsdk"),
        tally: Mutex::new(Tally::default()),
    });
    let start = Instant::now();
    let mut threads = Vec::new();
    for t in 0..plan.file_threads {
        let w = Arc::clone(&w);
        let n = plan.file_per_thread;
        threads.push(std::thread::spawn(move || file_client(w, t, n)));
    }
    for t in 0..plan.latc_threads {
        let (w, ws, ex) = (Arc::clone(&w), env.ws.clone(), Arc::clone(&example_text));
        let n = plan.latc_per_thread;
        threads.push(std::thread::spawn(move || latc_client(w, ws, t, n, ex)));
    }
    {
        let w = Arc::clone(&w);
        let n = plan.legacy_requests;
        threads.push(std::thread::spawn(move || legacy_client(w, n)));
    }
    let mut failed = Vec::new();
    for t in threads {
        if let Err(e) = t.join() {
            failed.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            );
        }
    }
    let took = start.elapsed();
    assert!(failed.is_empty(), "clients failed: {failed:#?}");
    assert!(d.running(), "latd died during the soak");

    let tally = w.tally.lock().unwrap();
    let expected = plan.file_threads * plan.file_per_thread
        + plan.latc_threads * plan.latc_per_thread
        + plan.legacy_requests;
    assert_eq!(tally.sent, expected);
    eprintln!(
        "soak: {} requests in {took:?} ({:.0}/s); {} builds started, {} refused, \
         {} stopped by a stop; slowest reply {:?}",
        tally.sent,
        tally.sent as f64 / took.as_secs_f64(),
        tally.builds_started,
        tally.builds_refused,
        tally.stops_that_stopped,
        tally.slowest
    );
    for ((client, action), n) in &tally.by_action {
        eprintln!("  {client:>6} {action:<8} {n}");
    }
    assert!(tally.builds_started >= 3, "too few builds to mean anything");

    // One history line per request: each was received exactly once.
    let (history_after, rotated) = history_count(&env.channel);
    if rotated {
        eprintln!("soak: the history was rotated; line count not compared");
    } else {
        assert_eq!(
            history_after - history_before,
            tally.sent,
            "history lines do not match the requests sent"
        );
    }
    drop(tally);

    if daemon_started.elapsed() > SWEEP_PERIOD + Duration::from_secs(5) {
        wait_until(
            Duration::from_secs(30),
            "the periodic sweep of an abandoned reply",
            || !abandoned.exists(),
        );
    } else {
        eprintln!("soak: shorter than latd's sweep period; the periodic sweep is not checked");
        let _ = fs::remove_file(&abandoned);
    }

    // Wind down; then nothing may be left.
    let o = env.latc(&["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    env.wait_state("idle");
    env.assert_no_leftovers();
    let mut kids = Vec::new();
    assert!(
        poll_until(Duration::from_secs(5), || {
            kids = d.children();
            kids.is_empty()
        }),
        "latd still has children: {kids:?}"
    );
    for prefix in ["req-", "rep-", "c-2-s.done", "s-2-c.done", "."] {
        assert_eq!(
            channel_files(&env.channel, prefix),
            Vec::<String>::new(),
            "left in the channel"
        );
    }
    let fds_after = d.fd_count();
    assert!(
        fds_after <= fds_before,
        "latd holds {fds_after} descriptors, {fds_before} before the soak"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(env.channel.join("latd.state.json")).unwrap()).unwrap();
    assert!(state["current"].is_null(), "{state}");
    assert!(state["history"].as_array().unwrap().len() <= 20);
    assert!(d.running());
}
