//! latc: asks latd for builds, status, logs and more, through files in the
//! shared channel directory. See `latc --help`.

use argh::FromArgs;
use latd::cli;
use latd::client::{
    self, Client, ClientError, LogFollower, EXIT_DETACHED, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE,
    EXIT_USAGE,
};
use latd::clock::{human_duration, iso8601, wall_now};
use latd::machine::{BuildRecord, Outcome};
use latd::protocol::{Action, Reply, ReplyResult};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// latc: the client of latd, the LAT image-build daemon. It drops a request
/// into the channel directory shared with latd and prints the answer.
///
/// Files a reply points to (status document, log, example YAML) are printed
/// on stdout; latc's own messages go to stderr.
#[derive(FromArgs)]
#[argh(
    example = "latc --file=/localdisk/lat.yaml build     # start a build\nlatc build --file lat.yaml --wait          # build, stream the log, exit with its result\nlatc status --json\nlatc logs --follow\nlatc stop",
    note = "Options --file, --channel, --workspace, --timeout, --json, -d and -q may come\nbefore or after the command; --name=value works as well as --name value.\n\nEnvironment:\n  WORKSPACE_DIR    workspace, sent as workdir (default /localdisk)\n  LAT_CHANNEL_DIR  channel directory (default $WORKSPACE_DIR/channel)\n  LATC_TIMEOUT     default for --timeout, in seconds\n  RUST_LOG         log filter for latc's own messages\n\nExit codes:\n  0    success (an answered status is always 0)\n  1    the request was refused, or the build failed\n  2    bad command line\n  3    latd unreachable: not running, not alive, or no reply in time\n  4    the build was stopped\n  130  interrupted (Ctrl-C): latc detached, the build goes on"
)]
struct Args {
    /// image YAML for `build`
    #[argh(option, short = 'f')]
    file: Option<PathBuf>,
    /// channel directory shared with latd (default $WORKSPACE_DIR/channel)
    #[argh(option, short = 'c')]
    channel: Option<PathBuf>,
    /// workspace sent as workdir (default $WORKSPACE_DIR or /localdisk)
    #[argh(option, short = 'w')]
    workspace: Option<PathBuf>,
    /// seconds to wait for latd's reply (default 60: longer than a stop's
    /// grace period)
    #[argh(option, short = 't')]
    timeout: Option<f64>,
    /// print machine-readable JSON (status, history)
    #[argh(switch)]
    json: bool,
    /// log debug messages
    #[argh(switch, short = 'd')]
    debug: bool,
    /// print nothing but errors and requested content
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Build(BuildCmd),
    Status(StatusCmd),
    Stop(StopCmd),
    Logs(LogsCmd),
    Clean(CleanCmd),
    Getyaml(GetyamlCmd),
    Wait(WaitCmd),
    History(HistoryCmd),
    Health(HealthCmd),
}

/// Start an image build from the YAML given with --file
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "build",
    note = "The YAML's absolute path is sent to latd (--file is required; --file=PATH\nworks, before or after the command). Exits 0 once latd has started the\nbuild, 1 if it refused (another build or a clean runs, the YAML is unusable;\nthe reason is printed).\n\nWith --wait, latc then streams the build log and exits with the build's\nresult (0 succeeded, 1 failed, 4 stopped), ending with one summary line:\nresult, duration, where the image and the log are. Ctrl-C detaches (the\nbuild goes on; exit 130) unless --stop-on-interrupt.",
    example = "latc build --file /localdisk/lat.yaml\nlatc --file=/localdisk/lat.yaml build\nlatc build --file lat.yaml --wait"
)]
struct BuildCmd {
    /// wait for the build to end, streaming its log
    #[argh(switch)]
    wait: bool,
    /// with --wait: Ctrl-C stops the build instead of detaching
    #[argh(switch)]
    stop_on_interrupt: bool,
}

/// Print latd's status document
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "status",
    note = "Prints status.lat: lat_status (idle|busy), build_status\n(not-started|running|succeed|fail), state (idle|building|stopping|cleaning),\nthe current or last build (id, YAML, times, exit code or signal, failure\nreason) and the daemon's pid, version and uptime. With --json, the same as\nJSON. Exits 0 whenever latd answered, 3 when it is unreachable.",
    example = "latc status | grep lat_status\nlatc status --json"
)]
struct StatusCmd {}

/// Stop the running build
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "stop",
    note = "Sends SIGTERM to every process of the build, SIGKILL after latd's grace\nperiod, and returns once they are gone, so a following `latc status` says\nidle. A build that already ended keeps its result; with nothing to stop it\nsucceeds and says so.",
    example = "latc stop"
)]
struct StopCmd {}

/// Print the build log
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "logs",
    note = "Prints <workspace>/log/log.appsdk; fails with 'No log file found' if there\nis none. With --follow, keeps printing new lines until the build ends (a new\nbuild's log is picked up), then exits with the build's result.",
    example = "latc logs | tail\nlatc logs --follow"
)]
struct LogsCmd {
    /// follow the log until the build ends
    #[argh(switch)]
    follow: bool,
}

/// Remove the build outputs under the workspace
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "clean",
    note = "Removes deploy, exampleyamls, workdir and log under the workspace. Refused\nwhile a build runs. Symlinks are not followed; a mount point (left by a\nkilled build) is reported by path, not emptied.",
    example = "latc clean"
)]
struct CleanCmd {}

/// Print an example image YAML from the SDK
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "getyaml",
    note = "Runs `appsdk exampleyamls` in the workspace and prints\nexampleyamls/debian-image-base-intel-x86-64.yaml.",
    example = "latc getyaml > lat.yaml"
)]
struct GetyamlCmd {}

/// Wait for the current build to end
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "wait",
    note = "Exits with the build's result: 0 succeeded, 1 failed, 4 stopped. On a\nterminal it shows the elapsed time and the latest log line; otherwise a plain\nline every 10 s. With --follow it streams the log instead. Ctrl-C detaches\n(exit 130) unless --stop-on-interrupt.",
    example = "latc wait && echo built"
)]
struct WaitCmd {
    /// stream the build log while waiting
    #[argh(switch)]
    follow: bool,
    /// stop the build on Ctrl-C instead of detaching
    #[argh(switch)]
    stop_on_interrupt: bool,
}

/// List the last builds and their results
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "history",
    note = "Reads the daemon's saved state, so it works even when latd is not running;\nbuilds are kept across restarts (latd --history N). --json prints a JSON\narray, oldest first.",
    example = "latc history -n 5\nlatc history --json"
)]
struct HistoryCmd {
    /// how many builds to show (default 20)
    #[argh(option, short = 'n', default = "20")]
    limit: usize,
}

/// Exit 0 if latd is alive and answering, 3 if not
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "health",
    note = "Prints nothing unless -d. Takes milliseconds and never more than a second:\nmeant for Kubernetes liveness and readiness probes (exec: [latc, health]).",
    example = "latc health || echo latd is down"
)]
struct HealthCmd {}

/// Options that may appear anywhere; they are moved before the command so
/// that argh, which wants them there, accepts them.
const GLOBAL_OPTIONS: [&str; 8] = [
    "--file",
    "-f",
    "--channel",
    "-c",
    "--workspace",
    "-w",
    "--timeout",
    "-t",
];
const GLOBAL_SWITCHES: [&str; 5] = ["--json", "--debug", "-d", "--quiet", "-q"];

fn hoist_globals(args: Vec<String>) -> Vec<String> {
    let mut front = Vec::new();
    let mut back = Vec::new();
    let mut it = args.into_iter();
    if let Some(cmd) = it.next() {
        front.push(cmd);
    }
    while let Some(a) = it.next() {
        if GLOBAL_OPTIONS.contains(&a.as_str()) {
            front.push(a);
            if let Some(v) = it.next() {
                front.push(v);
            }
        } else if GLOBAL_SWITCHES.contains(&a.as_str()) {
            front.push(a);
        } else {
            back.push(a);
        }
    }
    front.extend(back);
    front
}

fn parse() -> Args {
    cli::parse_args_from(hoist_globals(cli::split_equals(std::env::args())))
}

/// Where latc writes its own messages.
struct Out {
    quiet: bool,
    tty: bool,
}

impl Out {
    fn say(&self, msg: &str) {
        if !self.quiet {
            eprintln!("latc: {msg}");
        }
    }
    fn error(&self, msg: &str) {
        eprintln!("latc: error: {msg}");
    }
}

fn main() {
    let mut args = parse();
    if args.version {
        println!("latc {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    cli::init_logging(args.debug, false, log::LevelFilter::Warn);
    // SAFETY: isatty has no memory effects.
    let tty = unsafe { libc::isatty(2) } == 1;
    let out = Out {
        quiet: args.quiet,
        tty,
    };
    let Some(command) = args.command.take() else {
        out.error("no command given; one of: build, status, stop, logs, clean, getyaml, wait, history, health");
        std::process::exit(EXIT_USAGE);
    };
    let workspace = cli::workspace(args.workspace.clone());
    let timeout = match cli::num_setting(args.timeout, "LATC_TIMEOUT", 60.0) {
        Ok(t) if t > 0.0 && t <= 86_400.0 * 365.0 => Duration::from_secs_f64(t),
        _ => {
            out.error("--timeout must be a positive number of seconds, at most a year");
            std::process::exit(EXIT_USAGE);
        }
    };
    let client = Client {
        channel: cli::channel(args.channel.clone(), &workspace),
        workspace,
        timeout,
    };
    let code = match run(&client, &args, command, &out) {
        Ok(code) => code,
        Err(e) => {
            out.error(&e.to_string());
            e.exit_code()
        }
    };
    std::process::exit(code);
}

fn run(client: &Client, args: &Args, command: Command, out: &Out) -> Result<i32, ClientError> {
    match command {
        Command::Build(b) => build(client, args, &b, out),
        Command::Status(_) => {
            let (reply, doc) = client.status()?;
            if reply.result == ReplyResult::Fail {
                return Ok(refused(&reply, out));
            }
            match doc {
                Some((_, text)) if args.json => {
                    let v: serde_json::Value = serde_yaml::from_str(&text)
                        .map_err(|e| ClientError::Io(format!("status document unreadable: {e}")))?;
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                }
                Some((_, text)) => print!("{text}"),
                None => out.error("latd answered but its status file could not be read"),
            }
            Ok(EXIT_OK)
        }
        Command::Stop(_) => {
            let reply = client.request(Action::Stop, None)?;
            if reply.result == ReplyResult::Fail {
                return Ok(refused(&reply, out));
            }
            out.say(reply.message.as_deref().unwrap_or("stopped"));
            Ok(EXIT_OK)
        }
        Command::Logs(l) => {
            if l.follow {
                return follow_current(client, true, false, out);
            }
            let reply = client.request(Action::Logs, None)?;
            Ok(print_reply_file(
                &reply,
                reply.log_file_path.as_deref(),
                "log",
                out,
            ))
        }
        Command::Clean(_) => {
            let reply = client.request(Action::Clean, None)?;
            if reply.result == ReplyResult::Fail {
                return Ok(refused(&reply, out));
            }
            out.say(&format!("cleaned {}", client.workspace.display()));
            Ok(EXIT_OK)
        }
        Command::Getyaml(_) => {
            let reply = client.request(Action::Getyaml, None)?;
            Ok(print_reply_file(
                &reply,
                reply.yaml_file_path.as_deref(),
                "example YAML",
                out,
            ))
        }
        Command::Wait(w) => follow_current(client, w.follow, w.stop_on_interrupt, out),
        Command::History(h) => history(client, args.json, h.limit),
        Command::Health(_) => {
            let probe = Client {
                channel: client.channel.clone(),
                workspace: client.workspace.clone(),
                timeout: client.timeout.min(Duration::from_millis(900)),
            };
            match probe.request(Action::Status, None) {
                Ok(_) => {
                    log::debug!("latd is alive");
                    Ok(EXIT_OK)
                }
                Err(e) => {
                    log::debug!("{e}");
                    Ok(EXIT_UNREACHABLE)
                }
            }
        }
    }
}

fn refused(reply: &Reply, out: &Out) -> i32 {
    out.error(&format!(
        "{} refused: {}",
        if reply.action.is_empty() {
            "request"
        } else {
            &reply.action
        },
        reply.fail_reason.as_deref().unwrap_or("no reason given")
    ));
    EXIT_FAILED
}

/// Prints the file a successful reply points to (the log, the example
/// YAML) on stdout.
fn print_reply_file(reply: &Reply, path: Option<&Path>, what: &str, out: &Out) -> i32 {
    if reply.result == ReplyResult::Fail {
        return refused(reply, out);
    }
    let Some(path) = path else {
        out.error(&format!("latd's reply names no {what} file"));
        return EXIT_FAILED;
    };
    match latd::fsutil::read_regular(path) {
        Ok(bytes) => {
            let _ = std::io::stdout().write_all(&bytes);
            EXIT_OK
        }
        Err(e) => {
            out.error(&format!(
                "latd named the {what} {} but it cannot be read here: {e} (is the workspace mounted at the same path on both sides?)",
                path.display()
            ));
            EXIT_FAILED
        }
    }
}

fn build(client: &Client, args: &Args, b: &BuildCmd, out: &Out) -> Result<i32, ClientError> {
    let Some(file) = &args.file else {
        out.error("build needs the image YAML: latc build --file PATH");
        return Ok(EXIT_USAGE);
    };
    let abs = match std::path::absolute(file) {
        Ok(p) if p.is_file() => p,
        _ => {
            out.error(&format!(
                "{} does not exist or is not a file",
                file.display()
            ));
            return Ok(EXIT_FAILED);
        }
    };
    let reply = client.request(Action::Build, Some(&abs))?;
    if reply.result == ReplyResult::Fail {
        return Ok(refused(&reply, out));
    }
    out.say(&format!(
        "build {} started; log: {}",
        reply.build_id.map(|i| i.to_string()).unwrap_or_default(),
        reply
            .log_file_path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    ));
    if !b.wait {
        return Ok(EXIT_OK);
    }
    watch(client, reply.build_id, true, b.stop_on_interrupt, out)
}

/// Waits for the build that runs now (or the last one, if none runs).
fn follow_current(
    client: &Client,
    follow: bool,
    stop_on_interrupt: bool,
    out: &Out,
) -> Result<i32, ClientError> {
    let doc = client.status_doc()?;
    let Some(build) = doc.build else {
        out.say("no build has run yet");
        return Ok(EXIT_OK);
    };
    if follow && build.outcome != Outcome::Running {
        // Print the finished build's log once.
        print_lines(&LogFollower::new(build.log_file.clone()).poll(true));
        summary(&build, out);
        return Ok(client::exit_code_for(build.outcome));
    }
    watch(client, Some(build.id), follow, stop_on_interrupt, out)
}

/// Polls until build `id` ends; streams its log with `follow`; shows
/// progress on a terminal.
fn watch(
    client: &Client,
    id: Option<u64>,
    follow: bool,
    stop_on_interrupt: bool,
    out: &Out,
) -> Result<i32, ClientError> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(libc::SIGINT, Arc::clone(&interrupted));
    let mut follower: Option<LogFollower> = None;
    let mut stop_sent = false;
    let mut last_status = Instant::now() - Duration::from_secs(1);
    let mut current: Option<BuildRecord> = None;
    let mut last_line = String::new();
    let mut last_plain = Instant::now();
    loop {
        if last_status.elapsed() >= Duration::from_millis(250) {
            last_status = Instant::now();
            let doc = client.status_doc()?;
            current = match doc.build.filter(|b| id.is_none_or(|i| b.id == i)) {
                Some(b) => Some(b),
                // Another build is current now: ours ended; its record is
                // in the history.
                None => client
                    .history()
                    .ok()
                    .and_then(|h| h.into_iter().rev().find(|b| Some(b.id) == id)),
            };
        }
        let Some(build) = current.clone() else {
            out.error("the build is neither running nor in the history");
            return Ok(EXIT_FAILED);
        };
        let ended = build.outcome != Outcome::Running;
        if follow {
            let f = follower.get_or_insert_with(|| LogFollower::new(build.log_file.clone()));
            print_lines(&f.poll(ended));
        } else {
            let mut f = follower
                .take()
                .unwrap_or_else(|| LogFollower::new(build.log_file.clone()));
            if let Some(l) = f.poll(false).into_iter().last() {
                last_line = l;
            }
            follower = Some(f);
            let elapsed = human_duration(build.duration_ms(wall_now()));
            if out.tty && !out.quiet {
                let line: String = format!(
                    "[build {} {} {elapsed}] {last_line}",
                    build.id,
                    if stop_sent { "stopping" } else { "running" }
                )
                .chars()
                .filter(|c| !c.is_control())
                .take(terminal_width().saturating_sub(1))
                .collect();
                eprint!("\r\x1b[K{line}");
            } else if !out.quiet && last_plain.elapsed() >= Duration::from_secs(10) {
                last_plain = Instant::now();
                eprintln!("latc: build {} running {elapsed}", build.id);
            }
        }
        if ended {
            if out.tty && !follow && !out.quiet {
                eprint!("\r\x1b[K");
            }
            summary(&build, out);
            return Ok(client::exit_code_for(build.outcome));
        }
        if interrupted.swap(false, Ordering::Relaxed) {
            if stop_on_interrupt && !stop_sent {
                out.say(&format!("stopping build {}", build.id));
                stop_sent = true;
                let reply = client.request(Action::Stop, None)?;
                if reply.result == ReplyResult::Fail {
                    return Ok(refused(&reply, out));
                }
                last_status = Instant::now() - Duration::from_secs(1);
                continue;
            }
            if out.tty {
                eprintln!();
            }
            out.say(&format!(
                "detached; build {} goes on. Stop it with 'latc stop', watch it with 'latc wait'",
                build.id
            ));
            return Ok(EXIT_DETACHED);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes log lines in one go; a reader that went away (`| head`) ends
/// latc quietly.
fn print_lines(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = lines
        .iter()
        .try_for_each(|l| writeln!(out, "{l}"))
        .and_then(|()| out.flush());
    if written.is_err() {
        std::process::exit(EXIT_OK);
    }
}

fn terminal_width() -> usize {
    // SAFETY: ioctl TIOCGWINSZ fills a winsize struct.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            return ws.ws_col as usize;
        }
    }
    80
}

/// One clear line about how a build ended.
fn summary(b: &BuildRecord, out: &Out) {
    let took = human_duration(b.duration_ms(wall_now()));
    let line = match b.outcome {
        Outcome::Succeeded => format!(
            "build {} succeeded in {took}; image in {}; log {}",
            b.id,
            b.workdir.join("deploy").display(),
            b.log_file.display()
        ),
        Outcome::Failed => format!(
            "build {} failed after {took}: {}; log {}",
            b.id,
            b.fail_reason.as_deref().unwrap_or("no reason recorded"),
            b.log_file.display()
        ),
        Outcome::Stopped => format!(
            "build {} stopped after {took} ({}); log {}",
            b.id,
            b.fail_reason.as_deref().unwrap_or("stopped"),
            b.log_file.display()
        ),
        Outcome::Running => format!("build {} is running ({took})", b.id),
    };
    if !out.quiet || b.outcome != Outcome::Succeeded {
        eprintln!("latc: {line}");
    }
}

fn history(client: &Client, json: bool, limit: usize) -> Result<i32, ClientError> {
    let all = client.history()?;
    let shown: Vec<&BuildRecord> = all
        .iter()
        .rev()
        .take(limit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&shown).unwrap_or_default()
        );
        return Ok(EXIT_OK);
    }
    println!(
        "{:>5}  {:<24}  {:>9}  {:<9}  YAML",
        "ID", "STARTED", "DURATION", "RESULT"
    );
    for b in shown {
        let result = match b.outcome {
            Outcome::Running => "running",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Stopped => "stopped",
        };
        println!(
            "{:>5}  {:<24}  {:>9}  {:<9}  {}",
            b.id,
            iso8601(b.started_at),
            human_duration(b.duration_ms(wall_now())),
            result,
            b.yaml_file.display()
        );
    }
    Ok(EXIT_OK)
}
