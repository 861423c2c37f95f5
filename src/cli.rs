//! What both binaries share on the command line: `--flag=value` splitting
//! (argh only takes `--flag value`), logging set-up, environment defaults.

use std::path::PathBuf;

/// Default workspace (`WORKSPACE_DIR` overrides).
pub const DEFAULT_WORKSPACE: &str = "/localdisk";
/// Default SDK location (`LAT_SDK_DIR` overrides).
pub const DEFAULT_SDK: &str = "/opt/LAT/SDK";

/// Turns `--file=/x` into `--file /x` so that the deployed caller's
/// `latc --file=/localdisk/lat.yaml build` parses.
pub fn split_equals(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest_literal = false;
    for a in args {
        if rest_literal {
            out.push(a);
            continue;
        }
        if a == "--" {
            rest_literal = true;
            out.push(a);
            continue;
        }
        match a.strip_prefix("--").and_then(|r| r.split_once('=')) {
            Some((name, value)) if !name.is_empty() => {
                out.push(format!("--{name}"));
                out.push(value.to_string());
            }
            _ => out.push(a),
        }
    }
    out
}

/// The program's arguments as UTF-8 strings. An argument that is not
/// UTF-8 is refused with a message (exit 2), never a panic: requests are
/// YAML documents, which cannot carry such a path.
pub fn utf8_args(prog: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in std::env::args_os().enumerate() {
        match a.into_string() {
            Ok(s) => out.push(s),
            Err(raw) => usage_error(
                prog,
                &format!(
                    "argument {i} ({}) is not valid UTF-8; paths must be UTF-8 (they travel in YAML)",
                    raw.to_string_lossy()
                ),
            ),
        }
    }
    out
}

/// Prints `<prog>: error: <msg>` and the pointer to `--help`, exits 2.
pub fn usage_error(prog: &str, msg: &str) -> ! {
    err_line(&format!(
        "{prog}: error: {msg}\nRun {prog} --help for more information."
    ));
    std::process::exit(crate::client::EXIT_USAGE);
}

/// Writes a line to stderr; a closed stderr is not worth a panic.
pub fn err_line(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Writes to stdout; a reader that went away (`| head`) ends the process
/// as Unix tools end: by SIGPIPE (status 141 in a shell).
pub fn out_bytes(bytes: &[u8]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            die_of_sigpipe();
        }
    }
}

/// Ends the process by SIGPIPE, the conventional end of a writer whose
/// reader left (Rust ignores SIGPIPE, so its default action is restored,
/// and it is unblocked, before it is raised).
pub fn die_of_sigpipe() -> ! {
    use signal_hook::consts::SIGPIPE;
    let _ = signal_hook::low_level::emulate_default_handler(SIGPIPE);
    std::process::exit(128 + SIGPIPE);
}

/// Parses `T` from the process's arguments, with `--x=y` support; prints
/// help or the error (in the `<prog>: error:` format) and exits.
pub fn parse_args<T: argh::FromArgs>(prog: &str) -> T {
    parse_args_from(split_equals(utf8_args(prog)))
}

/// [`parse_args`] on arguments the caller has already rearranged.
pub fn parse_args_from<T: argh::FromArgs>(args: Vec<String>) -> T {
    let cmd = args
        .first()
        .map(|c| {
            std::path::Path::new(c)
                .file_name()
                .map_or(c.clone(), |f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match T::from_args(&[&cmd], &rest) {
        Ok(t) => t,
        Err(early) => match early.status {
            Ok(()) => {
                out_bytes(format!("{}\n", early.output).as_bytes());
                std::process::exit(0);
            }
            Err(()) => {
                let text = early.output.trim_end();
                let mut chars = text.chars();
                let text = match chars.next() {
                    Some(c) => c.to_lowercase().chain(chars).collect::<String>(),
                    None => "bad command line".to_string(),
                };
                usage_error(&cmd, &text)
            }
        },
    }
}

/// Logging to stderr: info by default, `RUST_LOG` if set, `-d`/`-q` win.
pub fn init_logging(debug: bool, quiet: bool, default: log::LevelFilter) {
    let mut b = env_logger::Builder::new();
    b.filter_level(default);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    if debug {
        b.filter_level(log::LevelFilter::Debug);
    } else if quiet {
        b.filter_level(log::LevelFilter::Warn);
    }
    b.format_target(false).init();
}

/// `flag`, else the environment variable `var`, else `default`.
pub fn path_setting(
    flag: Option<PathBuf>,
    var: &str,
    default: impl FnOnce() -> PathBuf,
) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(default)
}

/// `flag`, else a number in `var`, else `default`.
pub fn num_setting(flag: Option<f64>, var: &str, default: f64) -> Result<f64, String> {
    if let Some(v) = flag {
        return Ok(v);
    }
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v.parse().map_err(|_| format!("{var}={v} is not a number")),
        _ => Ok(default),
    }
}

/// The workspace both sides agree on.
pub fn workspace(flag: Option<PathBuf>) -> PathBuf {
    path_setting(flag, "WORKSPACE_DIR", || PathBuf::from(DEFAULT_WORKSPACE))
}

/// The channel: `--channel`, `LAT_CHANNEL_DIR`, or `<workspace>/channel`.
pub fn channel(flag: Option<PathBuf>, workspace: &std::path::Path) -> PathBuf {
    path_setting(flag, "LAT_CHANNEL_DIR", || workspace.join("channel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_equals() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            split_equals(v(&["latc", "--file=/localdisk/lat.yaml", "build"])),
            v(&["latc", "--file", "/localdisk/lat.yaml", "build"])
        );
        assert_eq!(
            split_equals(v(&["latc", "--file=a=b"])),
            v(&["latc", "--file", "a=b"])
        );
        assert_eq!(
            split_equals(v(&["x", "--", "--a=b"])),
            v(&["x", "--", "--a=b"])
        );
        assert_eq!(
            split_equals(v(&["x", "-d", "status"])),
            v(&["x", "-d", "status"])
        );
    }
}
