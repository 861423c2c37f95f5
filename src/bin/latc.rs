//! latc: asks latd for builds, status, logs and more, through files in the
//! shared channel directory. See `latc --help`.

use argh::FromArgs;
use latd::cli;
use latd::client::{
    self, Client, ClientError, LogFollower, EXIT_CANNOT_LOOK, EXIT_DETACHED, EXIT_FAILED, EXIT_OK,
    EXIT_UNREACHABLE, EXIT_USAGE,
};
use latd::clock::{human_duration, iso8601, wall_now};
use latd::protocol::{Action, Reply, ReplyResult, StatusDoc};
use latd::protocol::{BuildKind, BuildRecord, Millis, Outcome};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// latc: the client of latd, the LAT image-build daemon. It drops a request
/// into the channel directory shared with latd and prints the answer.
///
/// Files a reply points to (status document, log, example YAML) are printed
/// on stdout; latc's own messages go to stderr.
#[derive(FromArgs)]
#[argh(
    example = "latc --file=/localdisk/lat.yaml build     # start a build\nlatc build --file lat.yaml --wait          # build, stream the log, exit with its result\nlatc status --json\nlatc logs -f                               # follow the log until the build ends\nlatc logs --build 12\nlatc stop",
    note = "Options --file, --channel, --workspace, --timeout, --json, -d and -q may come\nbefore or after the command; --name=value works as well as --name value.\n-f is --file, except after logs and wait, where it is --follow (as in tail -f).\n-t std and -t rt (a kernel type, in the latc of 2022) are accepted and ignored.\n\nEnvironment:\n  WORKSPACE_DIR    workspace, sent as workdir (default /localdisk)\n  LAT_CHANNEL_DIR  channel directory (default $WORKSPACE_DIR/channel)\n  LATC_TIMEOUT     default for --timeout, in seconds\n  RUST_LOG         log filter for latc's own messages\n\nExit codes:\n  0    success (an answered status is always 0)\n  1    the request was refused, or the build failed\n  2    bad command line\n  3    latd unreachable: not running, not alive, or no reply in time\n  4    the build was stopped\n  5    health only: latd's files cannot be looked at (permissions)\n  130  interrupted (Ctrl-C): latc detached, the build goes on\n  141  stdout was closed (SIGPIPE, e.g. | head): latc ended quietly;\n       a build it was waiting for goes on",
    help_triggers("-h", "--help", "help")
)]
struct Args {
    /// image YAML for `build` (-f before the command or after build)
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
    help_triggers("-h", "--help", "help"),
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

/// Print latd's status: the original two lines, then the build in words
#[derive(FromArgs)]
#[argh(
    subcommand,
    help_triggers("-h", "--help", "help"),
    name = "status",
    note = "Prints the two lines of the original status document first, byte for byte:\nlat_status: idle|busy and build_status: not-started|running|succeed|fail.\nThen, for people: the state (idle|building|stopping|cleaning), the current or\nlast build (id, YAML, how long it has run or ran, its result and reason, its\nlog and the log's last line) and latd's pid, version and uptime, times in\nUTC and as durations. While latd is busy no line but the first two contains\nthe word idle (callers look for it anywhere in the output).\n\nWith --json, the whole status document as JSON, times exact (milliseconds\nsince the Unix epoch). Exits 0 whenever latd answered, 3 when it is\nunreachable.",
    example = "latc status | grep lat_status\nlatc status --json"
)]
struct StatusCmd {}

/// Stop the running build
#[derive(FromArgs)]
#[argh(
    subcommand,
    help_triggers("-h", "--help", "help"),
    name = "stop",
    note = "Sends SIGTERM to every process of the build, SIGKILL after latd's grace\nperiod, and returns once they are gone, so a following `latc status` says\nidle. On a terminal it shows, meanwhile, how long it has waited for the\nbuild's processes to end. A build that already ended keeps its result; with\nnothing to stop it succeeds and says so.",
    example = "latc stop"
)]
struct StopCmd {}

/// Print the build log
#[derive(FromArgs)]
#[argh(
    subcommand,
    help_triggers("-h", "--help", "help"),
    name = "logs",
    note = "Prints <workspace>/log/log.appsdk; fails with 'No log file found' if there\nis none. With --follow (-f), keeps printing new lines until the build ends (a\nnew build's log is picked up), then exits with the build's result.\n\nWith --build N, prints the log of build N (see latc history) if it is still\nkept: the current log, or an older one the SDK or latd kept beside it\n(log.appsdk_<secs>, log.appsdk.previous); with --follow too, follows it\nuntil build N ends.",
    example = "latc logs | tail\nlatc logs -f\nlatc logs --build 12"
)]
struct LogsCmd {
    /// follow the log until the build ends (also -f)
    #[argh(switch)]
    follow: bool,
    /// the log of build N (an id from `latc history`)
    #[argh(option, short = 'b')]
    build: Option<u64>,
}

/// Remove the build outputs under the workspace
#[derive(FromArgs)]
#[argh(
    subcommand,
    help_triggers("-h", "--help", "help"),
    name = "clean",
    note = "Removes deploy, exampleyamls, workdir and log under the workspace. Refused\nwhile a build runs. Symlinks are not followed; a mount point (left by a\nkilled build) is reported by path, not emptied.",
    example = "latc clean"
)]
struct CleanCmd {}

/// Print an example image YAML from the SDK
#[derive(FromArgs)]
#[argh(
    subcommand,
    help_triggers("-h", "--help", "help"),
    name = "getyaml",
    note = "Runs `appsdk exampleyamls` in the workspace and prints\nexampleyamls/debian-image-base-intel-x86-64.yaml.",
    example = "latc getyaml > lat.yaml"
)]
struct GetyamlCmd {}

/// Wait for the current build to end
#[derive(FromArgs)]
#[argh(
    subcommand,
    help_triggers("-h", "--help", "help"),
    name = "wait",
    note = "Exits with the build's result: 0 succeeded, 1 failed, 4 stopped. On a\nterminal it shows the elapsed time and the latest log line; otherwise a plain\nline every 10 s. With --follow (-f) it streams the log instead. Ctrl-C\ndetaches (exit 130) unless --stop-on-interrupt. If latd exits meanwhile, the\nbuild's result is read from latd's saved state; only if that says nothing\nabout it does latc exit 3.",
    example = "latc wait && echo built"
)]
struct WaitCmd {
    /// stream the build log while waiting (also -f)
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
    help_triggers("-h", "--help", "help"),
    name = "history",
    note = "Reads the daemon's saved state, so it works even when latd is not running;\nbuilds are kept across restarts (latd --history N). One line per build,\noldest first: id, start (UTC), duration, result, YAML and the reason a build\nfailed or was stopped (\"interrupted\" when latd itself went away). --json\nprints a JSON array, oldest first, times exact (milliseconds since the Unix\nepoch).",
    example = "latc history -n 5\nlatc history --json"
)]
struct HistoryCmd {
    /// how many builds to show (default 20)
    #[argh(option, short = 'n', default = "20")]
    limit: usize,
}

/// Exit 0 if latd is alive and answering, 3 if it is not, 5 if latc cannot look
#[derive(FromArgs)]
#[argh(
    subcommand,
    help_triggers("-h", "--help", "help"),
    name = "health",
    note = "Exit codes: 0 latd is alive and answered; 3 latd is dead or absent (no\nheartbeat, a stale one, or no answer); 5 latc cannot look: the channel or\nlatd's files cannot be read or written by this user (a permission or I/O\nerror), which says nothing about latd, so a probe should not restart it.\nPrints nothing unless -d. Takes milliseconds and never more than a second:\nmeant for Kubernetes liveness and readiness probes (exec: [latc, health]).",
    example = "latc health || echo latd is down"
)]
struct HealthCmd {}

/// The commands, for "did you mean" and for telling a command from a value.
const COMMANDS: [&str; 10] = [
    "build", "status", "stop", "logs", "clean", "getyaml", "wait", "history", "health", "help",
];

/// Options that may appear anywhere; they are moved before the command so
/// that argh, which wants them there, accepts them. (`-f` is `--file`
/// except after `logs` and `wait`, where it is `--follow`.)
const GLOBAL_OPTIONS: [(&str, &str); 8] = [
    ("--file", "the image YAML"),
    ("-f", "the image YAML"),
    ("--channel", "a directory"),
    ("-c", "a directory"),
    ("--workspace", "a directory"),
    ("-w", "a directory"),
    ("--timeout", "a number of seconds"),
    ("-t", "a number of seconds"),
];
const GLOBAL_SWITCHES: [&str; 5] = ["--json", "--debug", "-d", "--quiet", "-q"];
/// Options of a command that take a value.
const COMMAND_OPTIONS: [&str; 4] = ["-n", "--limit", "--build", "-b"];

/// Rearranges the command line for argh: global options first (wherever
/// they were typed), then the command and its own options. Mistakes people
/// make are explained here, in words argh does not have.
fn prepare_args(args: Vec<String>) -> Result<Vec<String>, String> {
    let mut it = args.into_iter();
    let mut front: Vec<String> = it.next().into_iter().collect();
    let mut command: Option<String> = None;
    let mut back = Vec::new();
    while let Some(a) = it.next() {
        if a == "--" {
            back.push(a);
            back.extend(it.by_ref());
            break;
        }
        let cmd = command.as_deref();
        if a == "-f" && matches!(cmd, Some("logs" | "wait")) {
            back.push("--follow".into());
        } else if let Some((_, what)) = GLOBAL_OPTIONS.iter().find(|(o, _)| *o == a) {
            let Some(v) = it.next() else {
                return Err(match (a.as_str(), cmd) {
                    ("-w", Some("status")) => {
                        "-w is --workspace and needs a directory: latc status -w DIR (to wait for the build: latc wait)".to_string()
                    }
                    _ => format!("{a} needs a value: {what}"),
                });
            };
            if a == "-t" && (v == "std" || v == "rt") {
                // The kernel type of the 2022 latc (`latc --file=... -t std
                // build`): accepted, and meaningless now.
                log::debug!("ignoring -t {v} (a kernel type of an older latc)");
                continue;
            }
            front.push(if a == "-f" { "--file".into() } else { a });
            front.push(v);
        } else if GLOBAL_SWITCHES.contains(&a.as_str()) {
            front.push(a);
        } else if COMMAND_OPTIONS.contains(&a.as_str()) && cmd.is_some() {
            back.push(a);
            back.extend(it.next());
        } else if a.starts_with('-') {
            if cmd.is_some() {
                back.push(a);
            } else {
                front.push(a);
            }
        } else if cmd == Some("help") && COMMANDS.contains(&a.as_str()) {
            // `latc help build` is `latc build --help`.
            command = Some(a);
            back.push("--help".into());
        } else if let Some(c) = cmd {
            if c == "build" {
                return Err(format!(
                    "build takes the image YAML with --file: latc build --file {a}"
                ));
            }
            if COMMANDS.contains(&a.as_str()) {
                return Err(format!("one command at a time: {c} or {a}"));
            }
            back.push(a);
        } else if COMMANDS.contains(&a.as_str()) {
            command = Some(a);
        } else {
            return Err(match did_you_mean(&a) {
                Some(c) => format!("unknown command '{a}'; did you mean '{c}'?"),
                None => format!(
                    "unknown command '{a}'; the commands are {}",
                    COMMANDS[..9].join(", ")
                ),
            });
        }
    }
    front.extend(command);
    front.extend(back);
    Ok(front)
}

/// The command `word` was probably meant to be: one a typo or two away, or
/// one it begins.
fn did_you_mean(word: &str) -> Option<&'static str> {
    let w = word.to_ascii_lowercase();
    COMMANDS
        .iter()
        .map(|c| (edit_distance(&w, c), *c))
        .filter(|(d, c)| *d <= 2.min(c.len() / 2) || (w.len() >= 2 && c.starts_with(&w)))
        .min()
        .map(|(_, c)| c)
}

/// Levenshtein distance, with a swap of two neighbours counting as one.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

fn parse() -> Args {
    let args = cli::split_equals(cli::utf8_args("latc"));
    match prepare_args(args) {
        Ok(a) => cli::parse_args_from(a),
        Err(e) => cli::usage_error("latc", &e),
    }
}

/// Where latc writes its own messages.
struct Out {
    quiet: bool,
    tty: bool,
}

impl Out {
    fn say(&self, msg: &str) {
        if !self.quiet {
            cli::err_line(&format!("latc: {msg}"));
        }
    }
    fn error(&self, msg: &str) {
        cli::err_line(&format!("latc: error: {msg}"));
    }
}

/// The build latc is waiting for (0: none), for the note when stdout closes.
static WATCHING: AtomicU64 = AtomicU64::new(0);

/// Writes to stdout; a closed stdout ends latc as [`stdout_gone`] says.
fn emit(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            drop(out);
            stdout_gone();
        }
    }
}

/// stdout's reader went away (`| head`, `| true`): end as Unix tools do,
/// by SIGPIPE (141 in a shell), never with a build's result, and say so
/// when a build was being waited for.
fn stdout_gone() -> ! {
    let id = WATCHING.load(Ordering::Relaxed);
    if id != 0 {
        cli::err_line(&format!(
            "latc: stdout was closed: stopped waiting for build {id}, which goes on ('latc wait' waits for it, 'latc stop' stops it)"
        ));
    }
    cli::die_of_sigpipe()
}

/// Whether stdout is a pipe whose reader has gone (seen before anything is
/// written, so a quiet build is not waited for in vain).
fn stdout_closed() -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let stdout = std::io::stdout();
    let mut fds = [PollFd::new(&stdout, PollFlags::empty())];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)) == Ok(1) && fds[0].revents().contains(PollFlags::ERR)
}

fn main() {
    let mut args = parse();
    if args.version {
        emit(format!("latc {}\n", env!("CARGO_PKG_VERSION")).as_bytes());
        return;
    }
    cli::init_logging(args.debug, false, log::LevelFilter::Warn);
    let tty = std::io::stderr().is_terminal();
    let out = Out {
        quiet: args.quiet,
        tty,
    };
    let Some(command) = args.command.take() else {
        out.error("no command given; one of: build, status, stop, logs, clean, getyaml, wait, history, health (latc --help tells more)");
        std::process::exit(EXIT_USAGE);
    };
    // Sent as workdir, which latd wants absolute.
    let workspace = cli::workspace(args.workspace.clone());
    let workspace = std::path::absolute(&workspace).unwrap_or(workspace);
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
        Command::Status(_) => status(client, args.json, out),
        Command::Stop(_) => stop(client, out),
        Command::Logs(l) => {
            if let Some(n) = l.build {
                return logs_of_build(client, n, l.follow, out);
            }
            if l.follow {
                return follow_current(client, true, false, out);
            }
            let reply = client.request(Action::Logs, None)?;
            let code = print_reply_file(&reply, reply.log_file_path.as_deref(), "log", out);
            let console = client.workspace.join("log").join("console.log");
            if reply.result == ReplyResult::Fail && console.is_file() {
                // A build that failed before the SDK made its log left
                // its error in the build's console output.
                out.say(&format!(
                    "the SDK wrote no log; the last build's own output is in {}",
                    console.display()
                ));
            }
            Ok(code)
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
                Err(e @ ClientError::Unreachable(_)) => {
                    log::debug!("{e}");
                    Ok(EXIT_UNREACHABLE)
                }
                Err(e @ ClientError::Io(_)) => {
                    log::debug!("{e}");
                    Ok(EXIT_CANNOT_LOOK)
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
    // The SDK's log is a symlink to a file beside it; that step is followed.
    // Another host may just have made the file while this host's NFS
    // client still caches "no such file": a listing of the way down
    // revalidates that before each retry.
    let read = if reply.log_file_path.is_some() {
        let open = || {
            latd::fsutil::open_log(path).and_then(|(mut f, _)| {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut bytes).map(|_| bytes)
            })
        };
        match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                latd::fsutil::revalidate_dirs(path);
                open()
            }
            other => other,
        }
    } else {
        // The SDK's exampleyamls first deletes the example YAMLs: one run
        // for another client may be rewriting the file; it comes back.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match latd::fsutil::read_regular_fresh(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => break other,
            }
        }
    };
    match read {
        Ok(bytes) => {
            emit(&bytes);
            EXIT_OK
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && reply.message.is_some() => {
            // A build has started but its SDK has not created the log yet.
            out.say(&format!(
                "{}: {} (try again in a moment, or 'latc logs --follow')",
                reply.message.as_deref().unwrap_or_default(),
                path.display()
            ));
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

fn status(client: &Client, json: bool, out: &Out) -> Result<i32, ClientError> {
    let (reply, doc) = client.status()?;
    if reply.result == ReplyResult::Fail {
        return Ok(refused(&reply, out));
    }
    let Some((_, text)) = doc else {
        out.error("latd answered but its status file could not be read");
        return Ok(EXIT_OK);
    };
    if json {
        let v: serde_json::Value = serde_yaml::from_str(&text)
            .map_err(|e| ClientError::Io(format!("status document unreadable: {e}")))?;
        emit(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()).as_bytes());
        return Ok(EXIT_OK);
    }
    match serde_yaml::from_str::<StatusDoc>(&text) {
        Ok(doc) => emit(render_status(&text, &doc, wall_now()).as_bytes()),
        // A document of another version: as it is.
        Err(_) => emit(text.as_bytes()),
    }
    Ok(EXIT_OK)
}

/// The status for people: the original document's two lines first, byte
/// for byte (callers grep them), then lines in words. While latd is busy
/// no added line contains "idle": the deployed caller looks for the word
/// anywhere in the output to decide that a stop is complete.
fn render_status(text: &str, d: &StatusDoc, now: Millis) -> String {
    let head: Vec<&str> = text.lines().take(2).collect();
    let mut s = match head[..] {
        [a, b] if a.starts_with("lat_status:") && b.starts_with("build_status:") => {
            format!("{a}\n{b}\n")
        }
        _ => format!(
            "lat_status: {}\nbuild_status: {}\n",
            d.lat_status, d.build_status
        ),
    };
    let mut human = vec![format!("state: {}", d.state)];
    if let Some(a) = &d.activity {
        human.push(format!("activity: {}", tidy(a.as_bytes())));
    }
    if let Some(b) = &d.build {
        human.push(format!(
            "build: {} ({})",
            b.id,
            match b.kind {
                BuildKind::Genimage => "genimage",
                BuildKind::Geninitramfs => "geninitramfs",
            }
        ));
        human.push(format!("yaml: {}", b.yaml_file.display()));
        let took = human_duration(b.duration_ms(now));
        match b.ended_at {
            None => human.push(format!(
                "running for {took}, since {}",
                human_time(b.started_at)
            )),
            Some(end) => human.push(format!(
                "{} after {took}, at {} ({} ago)",
                result_word(b.outcome),
                human_time(end),
                human_duration(now.saturating_sub(end))
            )),
        }
        if let Some((reason, quote)) = reason_for_people(b) {
            human.push(format!("reason: {reason}"));
            human.extend(quote.into_iter().map(|l| format!("  | {l}")));
        }
        human.push(format!("log: {}", b.log_file.display()));
        if let Some(l) = last_log_line(&log_of(b)) {
            human.push(format!("last log line: {l}"));
        }
    }
    human.push(format!(
        "latd: pid {}, version {}, up {}",
        d.daemon_pid,
        d.version,
        human_duration(d.uptime_s.saturating_mul(1000))
    ));
    let idle = d.lat_status == "idle";
    for l in human.into_iter().filter(|l| idle || !l.contains("idle")) {
        s.push_str(&l);
        s.push('\n');
    }
    s
}

/// `2026-11-24 21:23:02 UTC`
fn human_time(ms: Millis) -> String {
    let iso = iso8601(ms);
    format!("{} {} UTC", &iso[..10], &iso[11..19])
}

fn result_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Running => "running",
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::Stopped => "stopped",
    }
}

/// Opens a log for reading: through the SDK's symlink to a file beside it
/// and no other (as latd: latc may read on the workspace owner's behalf as
/// another user), never blocking on a FIFO, only if it is a regular file.
fn open_log(path: &Path) -> Option<std::fs::File> {
    latd::fsutil::open_log(path).ok().map(|(f, _)| f)
}

/// A log line fit for one terminal line: no control characters, at most
/// 200 characters.
fn tidy(line: &[u8]) -> String {
    let l: String = String::from_utf8_lossy(line)
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    let l = l.trim_end();
    if l.chars().count() > 200 {
        format!("{}...", l.chars().take(200).collect::<String>())
    } else {
        l.to_string()
    }
}

/// Where to read build `b`'s log: the file latd saw its SDK create, while
/// it is there, else the log's name. A running build's `log.appsdk` may be
/// gone (a refused `latc build` removes it, lest its caller take that log
/// for its own), and a later build re-points it.
fn log_of(b: &BuildRecord) -> PathBuf {
    match &b.sdk_log {
        Some(p) if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()) => p.clone(),
        _ => b.log_file.clone(),
    }
}

/// The last non-empty line of a log (from its last 16 KiB).
fn last_log_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = open_log(path)?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))
        .ok()?;
    let mut buf = Vec::new();
    f.take(16 * 1024).read_to_end(&mut buf).ok()?;
    buf.split(|&b| b == b'\n')
        .rev()
        .map(tidy)
        .find(|l| !l.is_empty())
}

/// The first `n` non-empty lines of a file (from its first 16 KiB).
fn first_lines(path: &Path, n: usize) -> Vec<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    if let Some(f) = open_log(path) {
        let _ = f.take(16 * 1024).read_to_end(&mut buf);
    }
    buf.split(|&b| b == b'\n')
        .map(tidy)
        .filter(|l| !l.is_empty())
        .take(n)
        .collect()
}

/// A build's failure reason as people need it, and lines to quote. A build
/// that failed before the SDK made its log (a wrong SDK path, a broken
/// environment script) has its reason in `log/console.log` (the build's
/// stdout and stderr), not in the log.appsdk the reason names: say so, and
/// quote its first lines.
fn reason_for_people(b: &BuildRecord) -> Option<(String, Vec<String>)> {
    let reason = b.fail_reason.clone()?;
    let console = b.workdir.join("log").join("console.log");
    let console_of_this_build = std::fs::metadata(&console)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .is_some_and(|m| m.as_millis() as u64 + 1000 >= b.started_at);
    if b.outcome != Outcome::Failed || b.log_file.exists() || !console_of_this_build {
        return Some((reason, Vec::new()));
    }
    let cut = reason
        .split_once("; see ")
        .map_or(reason.as_str(), |(r, _)| r);
    let quote = first_lines(&console, 5);
    let tail = if quote.is_empty() {
        format!("{} is empty", console.display())
    } else {
        format!("{} begins:", console.display())
    };
    Some((
        format!(
            "{cut} before the SDK wrote its log ({} does not exist); {tail}",
            b.log_file.display()
        ),
        quote,
    ))
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
    let reply = match client.request(Action::Build, Some(&abs)) {
        Ok(reply) if reply.result == ReplyResult::Succeed => reply,
        Ok(reply) => {
            set_aside_earlier_log(client, out);
            return Ok(refused(&reply, out));
        }
        Err(e) => {
            set_aside_earlier_log(client, out);
            return Err(e);
        }
    };
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

/// `latc stop`: the stop request, and on a terminal a line that says how
/// long latc has waited for the build's processes to end.
fn stop(client: &Client, out: &Out) -> Result<i32, ClientError> {
    let done = Arc::new(AtomicBool::new(false));
    let progress = (out.tty && !out.quiet).then(|| {
        let done = Arc::clone(&done);
        let probe = Client {
            channel: client.channel.clone(),
            workspace: client.workspace.clone(),
            timeout: Duration::from_secs(2),
        };
        std::thread::spawn(move || stop_progress(&probe, &done))
    });
    let reply = client.request(Action::Stop, None);
    done.store(true, Ordering::Relaxed);
    if let Some(shown) = progress.and_then(|h| h.join().ok()) {
        if shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
    let reply = reply?;
    if reply.result == ReplyResult::Fail {
        return Ok(refused(&reply, out));
    }
    out.say(reply.message.as_deref().unwrap_or("stopped"));
    Ok(EXIT_OK)
}

/// Redraws the stop's progress once a second until `done`; returns whether
/// it drew anything.
fn stop_progress(probe: &Client, done: &AtomicBool) -> bool {
    let start = Instant::now();
    let mut shown = false;
    let mut next = Duration::from_secs(1);
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if start.elapsed() < next {
            continue;
        }
        next += Duration::from_secs(1);
        let Ok(doc) = probe.status_doc() else {
            continue;
        };
        if done.load(Ordering::Relaxed) || doc.state != "stopping" {
            continue;
        }
        let id = doc.build.map(|b| b.id.to_string()).unwrap_or_default();
        let line = format!(
            "latc: stopping build {id}: {}s since SIGTERM; processes still running get SIGKILL at the end of latd's grace period",
            start.elapsed().as_secs()
        );
        let line: String = line
            .chars()
            .take(terminal_width().saturating_sub(1))
            .collect();
        let _ = write!(std::io::stderr(), "\r\x1b[K{line}");
        shown = true;
    }
    shown
}

/// No build was started, so `<workspace>/log/log.appsdk` is an earlier
/// build's log: it is moved out of the way, so that nobody who waits for
/// that name to appear (StarlingX's build-image does) takes it, and its old
/// success line, for this build's. Nothing is lost: the real SDK's
/// `log.appsdk` is a symlink, which is removed (the file it names stays);
/// a plain file is renamed to `log.appsdk.previous`.
fn set_aside_earlier_log(client: &Client, out: &Out) {
    let log = client.workspace.join("log").join(latd::sdklog::LOG_NAME);
    let Ok(md) = std::fs::symlink_metadata(&log) else {
        return;
    };
    let done = if md.file_type().is_symlink() {
        let target = std::fs::read_link(&log).unwrap_or_default();
        std::fs::remove_file(&log).map(|()| {
            format!(
                "removed the symlink {} (the earlier build's log stays in {})",
                log.display(),
                target.display()
            )
        })
    } else {
        let aside = log.with_file_name("log.appsdk.previous");
        std::fs::rename(&log, &aside)
            .map(|()| format!("moved {} to {}", log.display(), aside.display()))
    };
    match done {
        Ok(what) => out.error(&format!(
            "no build was started, so the log there is an earlier build's: {what}"
        )),
        Err(e) => out.error(&format!(
            "no build was started, and the earlier build's log {} could not be moved aside ({e}): do not take it for this build's",
            log.display()
        )),
    }
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
        print_lines(&LogFollower::new(log_of(&build)).poll(true));
        summary(&build, out);
        return Ok(client::exit_code_for(build.outcome));
    }
    watch(client, Some(build.id), follow, stop_on_interrupt, out)
}

/// `latc logs --build N [--follow]`: the log of any build still kept.
fn logs_of_build(client: &Client, n: u64, follow: bool, out: &Out) -> Result<i32, ClientError> {
    let all = client.history()?;
    let Some(b) = all.iter().find(|b| b.id == n) else {
        out.error(&format!(
            "build {n} is not in latd's history ('latc history' lists the builds it keeps)"
        ));
        return Ok(EXIT_FAILED);
    };
    if follow && b.outcome == Outcome::Running {
        return watch(client, Some(n), true, false, out);
    }
    let path = match resolve_log(&all, b) {
        Ok(p) => p,
        Err(e) => {
            out.error(&e);
            return Ok(EXIT_FAILED);
        }
    };
    let mut f = LogFollower::new(path);
    print_lines(&f.poll(true));
    if follow {
        summary(b, out);
        return Ok(client::exit_code_for(b.outcome));
    }
    Ok(EXIT_OK)
}

/// Which file holds the log of build `b`: one the SDK kept beside its
/// symlink (`log.appsdk_<secs>`, named for when it began, within the
/// build's time), the current log if no later build used the workdir, or
/// latd's `log.appsdk.previous` if exactly one did.
fn resolve_log(all: &[BuildRecord], b: &BuildRecord) -> Result<PathBuf, String> {
    let dir = b.log_file.parent().unwrap_or(Path::new("/"));
    // latd recorded the file the SDK logged to, once it appeared.
    if let Some(p) = b.sdk_log.as_ref().filter(|p| open_log(p).is_some()) {
        return Ok(p.clone());
    }
    let (from, to) = (
        b.started_at / 1000,
        b.ended_at.map_or(u64::MAX, |e| e / 1000 + 1),
    );
    let kept = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let secs: u64 = name.to_str()?.strip_prefix("log.appsdk_")?.parse().ok()?;
            (secs >= from && secs <= to).then(|| (secs, e.path()))
        })
        .min();
    if let Some((_, p)) = kept {
        return Ok(p);
    }
    let later = all
        .iter()
        .filter(|o| o.workdir == b.workdir && o.id > b.id)
        .count();
    let candidate = match later {
        0 => Some(b.log_file.clone()),
        1 => Some(dir.join("log.appsdk.previous")),
        _ => None,
    };
    match candidate {
        Some(p) if open_log(&p).is_some() => Ok(p),
        _ => Err(format!(
            "the log of build {} is no longer kept in {} (a workdir keeps the log of its last build and the one before; clean removes them)",
            b.id,
            dir.display()
        )),
    }
}

/// Build `id` as latd's saved state recorded it, if it has ended.
fn ended_in_history(client: &Client, id: u64) -> Option<BuildRecord> {
    client
        .history()
        .ok()?
        .into_iter()
        .rev()
        .find(|b| b.id == id && b.outcome != Outcome::Running)
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
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupted));
    WATCHING.store(id.unwrap_or(0), Ordering::Relaxed);
    let mut follower: Option<LogFollower> = None;
    let mut stop_sent = false;
    let mut last_status = Instant::now() - Duration::from_secs(1);
    let mut current: Option<BuildRecord> = None;
    let mut last_line = String::new();
    let mut last_plain = Instant::now();
    let mut latd_gone: Option<String> = None;
    loop {
        if follow && stdout_closed() {
            stdout_gone();
        }
        if last_status.elapsed() >= Duration::from_millis(250) && latd_gone.is_none() {
            last_status = Instant::now();
            match client.status_doc() {
                Ok(doc) => {
                    current = match doc.build.filter(|b| id.is_none_or(|i| b.id == i)) {
                        Some(b) => Some(b),
                        // Another build is current now: ours ended; its
                        // record is in the history.
                        None => client
                            .history()
                            .ok()
                            .and_then(|h| h.into_iter().rev().find(|b| Some(b.id) == id)),
                    };
                }
                Err(ClientError::Unreachable(why)) => {
                    // latd went away (a SIGTERM ends it after it stopped
                    // the build): its saved state says how the build ended.
                    match id.and_then(|i| ended_in_history(client, i)) {
                        Some(b) => {
                            latd_gone = Some(why);
                            current = Some(b);
                        }
                        None => {
                            return Err(ClientError::Unreachable(format!(
                                "{why}; the result of build {} is not known: latd's saved state does not say it ended",
                                id.map(|i| i.to_string()).unwrap_or_default()
                            )))
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let Some(build) = current.clone() else {
            out.error("the build is neither running nor in the history");
            return Ok(EXIT_FAILED);
        };
        let ended = build.outcome != Outcome::Running;
        if follow {
            let f = follower.get_or_insert_with(|| LogFollower::new(log_of(&build)));
            f.retarget(&log_of(&build));
            print_lines(&f.poll(ended));
        } else {
            let mut f = follower
                .take()
                .unwrap_or_else(|| LogFollower::new(log_of(&build)));
            f.retarget(&log_of(&build));
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
                let _ = write!(std::io::stderr(), "\r\x1b[K{line}");
            } else if !out.quiet && last_plain.elapsed() >= Duration::from_secs(10) {
                last_plain = Instant::now();
                out.say(&format!("build {} running {elapsed}", build.id));
            }
        }
        if ended {
            if out.tty && !follow && !out.quiet {
                let _ = write!(std::io::stderr(), "\r\x1b[K");
            }
            if let Some(why) = &latd_gone {
                out.say(&format!(
                    "latd has gone away ({why}); build {}'s result is from latd's saved state",
                    build.id
                ));
            }
            summary(&build, out);
            WATCHING.store(0, Ordering::Relaxed);
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
                cli::err_line("");
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
/// latc as [`stdout_gone`] says.
fn print_lines(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        buf.extend_from_slice(l.as_bytes());
        buf.push(b'\n');
    }
    emit(&buf);
}

fn terminal_width() -> usize {
    match rustix::termios::tcgetwinsize(std::io::stderr()) {
        Ok(ws) if ws.ws_col > 0 => ws.ws_col.into(),
        _ => 80,
    }
}

/// One clear line about how a build ended (and, for a build that failed
/// before the SDK wrote its log, the first lines of its console output).
fn summary(b: &BuildRecord, out: &Out) {
    let took = human_duration(b.duration_ms(wall_now()));
    let (reason, quote) = reason_for_people(b).unwrap_or_default();
    let line = match b.outcome {
        Outcome::Succeeded => format!(
            "build {} succeeded in {took}; image in {}; log {}",
            b.id,
            b.workdir.join("deploy").display(),
            b.log_file.display()
        ),
        Outcome::Failed if !quote.is_empty() => {
            format!("build {} failed after {took}: {reason}", b.id)
        }
        Outcome::Failed => format!(
            "build {} failed after {took}: {}; log {}",
            b.id,
            if reason.is_empty() {
                "no reason recorded"
            } else {
                &reason
            },
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
        cli::err_line(&format!("latc: {line}"));
        for l in quote {
            cli::err_line(&format!("latc:   | {l}"));
        }
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
        emit(
            format!(
                "{}\n",
                serde_json::to_string_pretty(&shown).unwrap_or_default()
            )
            .as_bytes(),
        );
        return Ok(EXIT_OK);
    }
    let mut text = format!(
        "{:>5}  {:<23}  {:>9}  {:<9}  {:<30}  REASON\n",
        "ID", "STARTED", "DURATION", "RESULT", "YAML"
    );
    for b in shown {
        // The console's quote is for the last build of a workdir only: an
        // older build's console.log was replaced by a later one's.
        let last_of_workdir = !all.iter().any(|o| o.workdir == b.workdir && o.id > b.id);
        let reason = match reason_for_people(b) {
            Some((r, _)) if last_of_workdir => r,
            _ => b.fail_reason.clone().unwrap_or_else(|| "-".into()),
        };
        text.push_str(&format!(
            "{:>5}  {:<23}  {:>9}  {:<9}  {:<30}  {}\n",
            b.id,
            human_time(b.started_at),
            human_duration(b.duration_ms(wall_now())),
            result_word(b.outcome),
            b.yaml_file.display(),
            reason
        ));
    }
    emit(text.as_bytes());
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn arguments_are_rearranged_and_mistakes_explained() {
        let p = |s: &[&str]| prepare_args(v(s));
        assert_eq!(
            p(&["latc", "--file", "/l/lat.yaml", "build"]).unwrap(),
            v(&["latc", "--file", "/l/lat.yaml", "build"])
        );
        assert_eq!(
            p(&["latc", "--file", "/l/x", "-t", "std", "build"]).unwrap(),
            v(&["latc", "--file", "/l/x", "build"])
        );
        assert_eq!(
            p(&["latc", "build", "-f", "x", "--wait"]).unwrap(),
            v(&["latc", "--file", "x", "build", "--wait"])
        );
        assert_eq!(
            p(&["latc", "logs", "-f"]).unwrap(),
            v(&["latc", "logs", "--follow"])
        );
        assert_eq!(
            p(&["latc", "history", "-n", "3", "--json"]).unwrap(),
            v(&["latc", "--json", "history", "-n", "3"])
        );
        assert_eq!(
            p(&["latc", "help", "build"]).unwrap(),
            v(&["latc", "build", "--help"])
        );
        assert!(p(&["latc", "stauts"])
            .unwrap_err()
            .contains("did you mean 'status'"));
        assert!(p(&["latc", "biuld"])
            .unwrap_err()
            .contains("did you mean 'build'"));
        assert!(p(&["latc", "log"])
            .unwrap_err()
            .contains("did you mean 'logs'"));
        assert!(p(&["latc", "frobnicate"])
            .unwrap_err()
            .contains("the commands are"));
        assert!(p(&["latc", "build", "lat.yaml"])
            .unwrap_err()
            .contains("--file lat.yaml"));
        assert!(p(&["latc", "status", "-w"])
            .unwrap_err()
            .contains("latc wait"));
        assert!(p(&["latc", "status", "--timeout"])
            .unwrap_err()
            .contains("needs a value"));
    }
}
