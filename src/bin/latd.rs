//! latd: the LAT container's entrypoint. Serves build requests that arrive
//! as files in the channel directory. See `latd --help`.

use argh::FromArgs;
use latd::cli;
use latd::daemon::{run, Settings};
use std::path::PathBuf;
use std::time::Duration;

/// latd: runs LAT SDK image builds for clients that talk to it through
/// files in a shared channel directory (no sockets, no inotify: it polls,
/// so the channel may be on NFS or overlayfs).
///
/// With no arguments it serves /localdisk/channel for the workspace
/// /localdisk with the SDK in /opt/LAT/SDK, as the LAT container expects.
/// Runs one build at a time; answers build, status, stop, logs, clean and
/// getyaml. SIGTERM or SIGINT stops a running build (SIGTERM, then SIGKILL
/// after the grace period) and exits 0.
#[derive(FromArgs)]
#[argh(
    example = "latd                                   # as the container's entrypoint\nlatd --workspace /tmp/ws --sdk ./tests/sdk -d  # by hand, from the source tree\nlatd --channel-group 1000              # builders of group 1000 use the channel",
    note = "Environment (a flag wins over its variable):\n  WORKSPACE_DIR     workspace root (default /localdisk)\n  LAT_CHANNEL_DIR   channel directory (default $WORKSPACE_DIR/channel)\n  LAT_SDK_DIR       LAT SDK directory (default /opt/LAT/SDK)\n  LAT_CHANNEL_GROUP group (name or number) given the channel, mode 2770\n  LAT_CHANNEL_FOLLOW_SYMLINK=1  as --follow-channel-symlink\n  LATD_GRACE_SECS   seconds between SIGTERM and SIGKILL on stop (default 20)\n  LATD_POLL_MS      poll interval at rest (default 100)\n  RUST_LOG          log filter, e.g. debug (overridden by -d / -q)\n\nRelative paths are made absolute (from the directory latd starts in) before\nlatd serves. latd refuses to start (exit 2) when the SDK directory has no\nenvironment-setup-corei7-64-wrs-linux.\n\nThe channel latd creates belongs to the owner of its parent directory, mode\n775: a builder running as that owner (or as root) can use it. With\n--channel-group G the channel (made or found) is given to group G with mode\n2770, so that every member of G, and no one else, can send requests: whoever\ncan write the channel can have latd run builds as root.\n\nlatd logs to stderr. Requests are logged one line each to\n$LAT_CHANNEL_DIR/client_message_history (rotated at 1 MiB).",
    help_triggers("-h", "--help", "help")
)]
struct Args {
    /// workspace root: every workdir and YAML must lie under it
    #[argh(option, short = 'w')]
    workspace: Option<PathBuf>,
    /// channel directory shared with latc
    #[argh(option, short = 'c')]
    channel: Option<PathBuf>,
    /// LAT SDK directory (holds environment-setup-corei7-64-wrs-linux)
    #[argh(option)]
    sdk: Option<PathBuf>,
    /// group (name or number) the channel is given, with mode 2770, so that
    /// its members can use it
    #[argh(option)]
    channel_group: Option<String>,
    /// seconds a stopped build gets between SIGTERM and SIGKILL (default 20)
    #[argh(option)]
    grace: Option<f64>,
    /// poll interval at rest, in milliseconds (default 100)
    #[argh(option)]
    poll_ms: Option<f64>,
    /// poll interval while a build runs or right after a request, in
    /// milliseconds (default 4)
    #[argh(option)]
    busy_poll_ms: Option<f64>,
    /// how many finished builds `latc history` keeps (default 50)
    #[argh(option, default = "50")]
    history: usize,
    /// serve the directory a symlink at the channel's path points to (by
    /// default such a symlink is moved aside: a client may have planted it)
    #[argh(switch)]
    follow_channel_symlink: bool,
    /// let <workspace>/hack/lat-genimage-cmd replace the build command (a
    /// debugging aid; logs a warning each time it is used)
    #[argh(switch)]
    allow_hack_cmd: bool,
    /// log debug messages
    #[argh(switch, short = 'd')]
    debug: bool,
    /// log only warnings and errors
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

fn main() {
    let args: Args = cli::parse_args("latd");
    if args.version {
        println!("latd {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    cli::init_logging(args.debug, args.quiet, log::LevelFilter::Info);
    let settings = match settings(args) {
        Ok(s) => s,
        Err(e) => {
            cli::err_line(&format!("latd: error: {e}"));
            std::process::exit(2);
        }
    };
    if let Err(e) = run(settings) {
        log::error!("{e}");
        std::process::exit(1);
    }
}

/// `path` made absolute from the current directory, so that what latd was
/// given still means the same in a build's working directory.
fn absolute(path: PathBuf, what: &str) -> Result<PathBuf, String> {
    std::path::absolute(&path)
        .map_err(|e| format!("{what} {}: cannot make it absolute: {e}", path.display()))
}

/// A group by number, or by name from the group database.
fn group_id(g: &str) -> Result<u32, String> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(g).map_err(|_| format!("bad group name {g:?}"))?;
    // The group database (NSS: files, LDAP, ...) has no safe wrapper in std
    // or rustix, so this is libc's getgrnam.
    // SAFETY: getgrnam takes a NUL-terminated name and returns null or a
    // valid entry, read here at once: latd has no other thread yet that
    // could reuse the static storage it points into.
    let gid = unsafe {
        let gr = libc::getgrnam(name.as_ptr());
        (!gr.is_null()).then(|| (*gr).gr_gid)
    };
    gid.ok_or_else(|| {
        format!(
            "--channel-group {g}: no such group here (give its number: the builder's group need not exist in this container)"
        )
    })
}

fn settings(args: Args) -> Result<Settings, String> {
    let workspace = absolute(cli::workspace(args.workspace), "workspace")?;
    let channel = absolute(cli::channel(args.channel, &workspace), "channel")?;
    let sdk_dir = absolute(
        cli::path_setting(args.sdk, "LAT_SDK_DIR", || PathBuf::from(cli::DEFAULT_SDK)),
        "SDK directory",
    )?;
    let script = sdk_dir.join(latd::daemon::ENV_SCRIPT);
    if !script.is_file() {
        return Err(format!(
            "{} is not a LAT SDK: it has no {} (give the SDK's directory with --sdk or LAT_SDK_DIR)",
            sdk_dir.display(),
            latd::daemon::ENV_SCRIPT
        ));
    }
    let channel_group = match args
        .channel_group
        .or_else(|| std::env::var("LAT_CHANNEL_GROUP").ok())
        .filter(|g| !g.is_empty())
    {
        Some(g) => Some(group_id(&g)?),
        None => None,
    };
    let secs = |v: f64, what: &str| {
        Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| *d <= Duration::from_secs(86_400 * 365))
            .ok_or_else(|| format!("{what} must be a number of seconds from 0 to a year"))
    };
    let grace = secs(
        cli::num_setting(args.grace, "LATD_GRACE_SECS", 20.0)?,
        "--grace",
    )?;
    let idle_poll = secs(
        cli::num_setting(args.poll_ms, "LATD_POLL_MS", 100.0)? / 1000.0,
        "--poll-ms",
    )?;
    let busy_poll = secs(args.busy_poll_ms.unwrap_or(4.0) / 1000.0, "--busy-poll-ms")?;
    Ok(Settings {
        workspace,
        channel,
        sdk_dir,
        grace,
        idle_poll: idle_poll.max(Duration::from_millis(1)),
        busy_poll: busy_poll.max(Duration::from_micros(500)),
        allow_hack_cmd: args.allow_hack_cmd,
        channel_group,
        follow_channel_symlink: args.follow_channel_symlink
            || std::env::var("LAT_CHANNEL_FOLLOW_SYMLINK")
                .is_ok_and(|v| v == "1" || v == "yes" || v == "true"),
        history_cap: args.history.max(1),
    })
}
