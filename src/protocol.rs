//! The wire format: channel file names, requests, replies and the status
//! document. Pure data and parsing; no file is touched here.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The original single request slot (written by the client).
pub const LEGACY_REQUEST: &str = "c-2-s.msg";
/// Created by the client once `c-2-s.msg` is complete.
pub const LEGACY_REQUEST_DONE: &str = "c-2-s.done";
/// The original single reply slot (written by the daemon).
pub const LEGACY_REPLY: &str = "s-2-c.msg";
/// Created by the daemon once `s-2-c.msg` is complete.
pub const LEGACY_REPLY_DONE: &str = "s-2-c.done";
/// Exists while the last request was invalid.
pub const INVALID_MARKER: &str = "invalid_message";
/// The status document.
pub const STATUS_FILE: &str = "status.lat";
/// One line per request received.
pub const HISTORY_FILE: &str = "client_message_history";
/// Our addition: the daemon's heartbeat (pid, version; mtime refreshed).
pub const ALIVE_FILE: &str = "latd.alive";
/// Our addition: a named pipe a local client pokes to wake the daemon.
pub const WAKE_FIFO: &str = "latd.wake";
/// Our addition: the daemon's persisted state (current build, history).
pub const STATE_FILE: &str = "latd.state.json";
/// Our addition: held (flock) by the daemon serving the channel.
pub const LOCK_FILE: &str = "latd.lock";
/// Our addition: per-request files `req-<id>.yaml` → `rep-<id>.yaml`.
pub const REQUEST_PREFIX: &str = "req-";
pub const REPLY_PREFIX: &str = "rep-";
pub const MESSAGE_SUFFIX: &str = ".yaml";

/// Requests larger than this are refused unread.
pub const MAX_MESSAGE_BYTES: u64 = 1 << 20;
/// Longest request id a client may choose.
pub const MAX_REQUEST_ID: usize = 96;

/// What a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Build,
    Status,
    Stop,
    Logs,
    Clean,
    Getyaml,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Action::Build,
        Action::Status,
        Action::Stop,
        Action::Logs,
        Action::Clean,
        Action::Getyaml,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Build => "build",
            Action::Status => "status",
            Action::Stop => "stop",
            Action::Logs => "logs",
            Action::Clean => "clean",
            Action::Getyaml => "getyaml",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// A request as it was written, before its paths are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRequest {
    pub action: Action,
    pub workdir: Option<String>,
    pub yaml_file: Option<String>,
    /// When the client stops waiting for the reply (ms since the epoch, by
    /// its clock); latd does not act on a request after that.
    pub expires_at: Option<u64>,
}

/// Why a request could not be understood; `action` is echoed when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub action: Option<String>,
    pub reason: String,
}

impl Invalid {
    pub fn new(action: Option<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            action,
            reason: reason.into(),
        }
    }
}

/// Deeper YAML is refused before parsing: the parser's time grows with
/// the square of the depth, and no request or image YAML needs more.
pub const MAX_NESTING: usize = 64;

/// The deepest nesting of flow collections (`[`, `{`) in `bytes`, ignoring
/// quoting: a cheap upper bound, computed before the real parse.
pub fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for &b in bytes {
        match b {
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

const ACTIONS_HINT: &str = "one of: build, status, stop, logs, clean, getyaml";

/// Parses a request message. Never panics, whatever the bytes.
pub fn parse_request(bytes: &[u8]) -> Result<RawRequest, Invalid> {
    if bytes.len() as u64 > MAX_MESSAGE_BYTES {
        return Err(Invalid::new(
            None,
            format!(
                "request is larger than {} bytes; a request is a small YAML mapping",
                MAX_MESSAGE_BYTES
            ),
        ));
    }
    if nesting_depth(bytes) > MAX_NESTING {
        return Err(Invalid::new(
            None,
            format!(
                "request nests deeper than {MAX_NESTING} levels; a request is a flat YAML mapping"
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Invalid::new(
            None,
            format!("request is not valid UTF-8 text ({e}); write it as a YAML mapping"),
        )
    })?;
    if text.trim().is_empty() {
        return Err(Invalid::new(
            None,
            format!(
                "request is empty; expected a YAML mapping with 'action: ...' ({ACTIONS_HINT})"
            ),
        ));
    }
    if let Err(e) = crate::yaml_limits::check(bytes, &crate::yaml_limits::REQUEST) {
        return Err(Invalid::new(
            None,
            format!(
                "request refused: {e}; a request is a small YAML mapping like 'action: status'"
            ),
        ));
    }
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        Invalid::new(
            None,
            format!("request is not valid YAML ({e}); expected e.g. 'action: status'"),
        )
    })?;
    let map = match value {
        serde_yaml::Value::Mapping(m) => m,
        _ => {
            return Err(Invalid::new(
                None,
                "request is not a YAML mapping; expected e.g. 'action: status'",
            ))
        }
    };
    let get_str = |key: &str| -> Result<Option<String>, String> {
        match map.get(key) {
            None | Some(serde_yaml::Value::Null) => Ok(None),
            Some(serde_yaml::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("'{key}' must be a string")),
        }
    };
    let action_text = match get_str("action") {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Err(Invalid::new(
                None,
                format!("request has no 'action'; use {ACTIONS_HINT}"),
            ))
        }
        Err(e) => return Err(Invalid::new(None, format!("{e}; use {ACTIONS_HINT}"))),
    };
    let Some(action) = Action::parse(&action_text) else {
        return Err(Invalid::new(
            Some(action_text.clone()),
            format!("unknown action '{action_text}'; use {ACTIONS_HINT}"),
        ));
    };
    let workdir = get_str("workdir").map_err(|e| Invalid::new(Some(action_text.clone()), e))?;
    let yaml_file = get_str("yaml_file").map_err(|e| Invalid::new(Some(action_text.clone()), e))?;
    let expires_at = match map.get("expires_at") {
        None | Some(serde_yaml::Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            Invalid::new(
                Some(action_text.clone()),
                "'expires_at' must be a whole number of milliseconds since 1970",
            )
        })?),
    };
    Ok(RawRequest {
        action,
        workdir,
        yaml_file,
        expires_at,
    })
}

/// Serializes a request the way `latc` writes it.
pub fn render_request(
    action: Action,
    workdir: &str,
    yaml_file: Option<&str>,
    expires_at: Option<u64>,
) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        action: &'a str,
        workdir: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        yaml_file: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    }
    serde_yaml::to_string(&Wire {
        action: action.as_str(),
        workdir,
        yaml_file,
        expires_at,
    })
    .unwrap_or_default()
}

/// `result:` of a reply: whether the daemon handled the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyResult {
    Succeed,
    Fail,
}

/// The reply document (`s-2-c.msg` or `rep-<id>.yaml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Echo of the request's action (or what the client wrote, if unknown).
    pub action: String,
    pub result: ReplyResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yaml_file_path: Option<PathBuf>,
    /// Our addition: a human-readable note on a successful reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Our addition: the build a `build` or `stop` reply is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<u64>,
}

impl Reply {
    pub fn succeed(action: &str) -> Reply {
        Reply {
            action: action.to_string(),
            result: ReplyResult::Succeed,
            fail_reason: None,
            status_file: None,
            log_file_path: None,
            yaml_file_path: None,
            message: None,
            build_id: None,
        }
    }

    pub fn fail(action: &str, reason: impl Into<String>) -> Reply {
        Reply {
            result: ReplyResult::Fail,
            fail_reason: Some(reason.into()),
            ..Reply::succeed(action)
        }
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Reply {
        self.message = Some(message.into());
        self
    }

    pub fn render(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|_| {
            format!(
                "action: {}\nresult: fail\nfail_reason: reply could not be serialized\n",
                self.action
            )
        })
    }

    pub fn parse(bytes: &[u8]) -> Result<Reply, String> {
        crate::yaml_limits::check(bytes, &crate::yaml_limits::REQUEST)
            .map_err(|e| format!("unreadable reply: {e}"))?;
        serde_yaml::from_slice(bytes).map_err(|e| format!("unreadable reply: {e}"))
    }
}

// The wire types of builds: status documents and history carry them.

/// Milliseconds since the Unix epoch, as handed in by the driver.
pub type Millis = u64;

/// Which SDK command a build runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildKind {
    Genimage,
    Geninitramfs,
}

/// What survives a daemon restart: `latd.state.json` in the channel,
/// which latc reads too when no latd answers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Persisted {
    /// The next build id to hand out.
    pub next_build_id: u64,
    /// The running build, if any (its record says Running).
    pub current: Option<BuildRecord>,
    /// Finished builds, newest last.
    pub history: Vec<BuildRecord>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Identity of a started build process, kept so that a restarted daemon can
/// tell the old build's process group from an unrelated process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    /// Start time from /proc/<pid>/stat (clock ticks since boot).
    pub start_ticks: u64,
}

/// What became of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Running,
    Succeeded,
    Failed,
    Stopped,
}

/// One build, as status and history report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: u64,
    pub workdir: PathBuf,
    pub yaml_file: PathBuf,
    pub kind: BuildKind,
    pub log_file: PathBuf,
    pub started_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Millis>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessId>,
    /// The file the SDK logs to (`log.appsdk` is a symlink to it), once it
    /// has appeared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk_log: Option<PathBuf>,
    /// The SDK logged its success line: the image is built and it is
    /// finishing its deploy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub success_logged: bool,
    /// The first line of the SDK's log that reports an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_line: Option<String>,
    /// The mounts under the workdir before the build started (mount ids):
    /// the build's are the others. `None` until the build has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts_before: Option<Vec<u64>>,
    /// The mount namespace those ids belong to (see
    /// [`crate::mounts::namespace`]): ids mean nothing in another one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts_ns: Option<String>,
}

impl BuildRecord {
    /// `build_status:` of the original protocol.
    pub fn build_status(&self) -> &'static str {
        match self.outcome {
            Outcome::Running => "running",
            Outcome::Succeeded => "succeed",
            Outcome::Failed | Outcome::Stopped => "fail",
        }
    }

    pub fn duration_ms(&self, now: Millis) -> u64 {
        self.ended_at.unwrap_or(now).saturating_sub(self.started_at)
    }

    pub(crate) fn finish(
        &mut self,
        now: Millis,
        exit: Option<Exit>,
        outcome: Outcome,
        reason: Option<String>,
    ) {
        self.ended_at = Some(now);
        self.outcome = outcome;
        match exit {
            Some(Exit::Code(c)) => self.exit_code = Some(c),
            Some(Exit::Signal(s)) => self.signal = Some(s),
            None => {}
        }
        self.fail_reason = reason;
    }
}

/// The status document, `status.lat`. The first two keys are the original
/// protocol; the rest are our additions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// `idle` or `busy`.
    pub lat_status: String,
    /// `not-started`, `running`, `succeed` or `fail`.
    pub build_status: String,
    /// What the daemon is doing: `idle`, `building`, `stopping`, `cleaning`.
    pub state: String,
    /// What the daemon is doing, in words (a stop's progress, a build
    /// finishing after its success line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildRecord>,
    /// How long the build ran, or has run so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_duration_ms: Option<u64>,
    pub daemon_pid: u32,
    pub version: String,
    pub started_at: u64,
    pub uptime_s: u64,
    pub updated_at: u64,
}

/// Is `id` acceptable as the `<id>` of `req-<id>.yaml`?
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_request() {
        let r = parse_request(b"action: status\n").unwrap();
        assert_eq!(r.action, Action::Status);
        assert_eq!(r.workdir, None);
    }

    #[test]
    fn rejects_bad_requests_with_reasons() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"  \n", "empty"),
            (b"action: [", "not valid YAML"),
            (b"- a\n- b\n", "not a YAML mapping"),
            (b"\xff\xfe", "UTF-8"),
            (b"workdir: /x\n", "no 'action'"),
            (b"action: 3\n", "'action' must be a string"),
            (b"action: fly\n", "unknown action 'fly'"),
            (
                b"action: build\nyaml_file: [1]\n",
                "'yaml_file' must be a string",
            ),
            (
                b"action: build\nworkdir: {a: 1}\n",
                "'workdir' must be a string",
            ),
        ];
        for (bytes, want) in cases {
            let err = parse_request(bytes).unwrap_err();
            assert!(
                err.reason.contains(want),
                "{:?}: {} lacks {want}",
                String::from_utf8_lossy(bytes),
                err.reason
            );
        }
        let huge = vec![b'a'; MAX_MESSAGE_BYTES as usize + 1];
        assert!(parse_request(&huge).unwrap_err().reason.contains("larger"));
    }

    #[test]
    fn unknown_action_is_echoed() {
        let err = parse_request(b"action: fly\n").unwrap_err();
        assert_eq!(err.action.as_deref(), Some("fly"));
    }

    #[test]
    fn request_round_trips() {
        let text = render_request(Action::Build, "/w", Some("/w/a b.yaml"), Some(7));
        let r = parse_request(text.as_bytes()).unwrap();
        assert_eq!(r.action, Action::Build);
        assert_eq!(r.workdir.as_deref(), Some("/w"));
        assert_eq!(r.yaml_file.as_deref(), Some("/w/a b.yaml"));
    }

    #[test]
    fn reply_keeps_original_keys() {
        let mut r = Reply::succeed("status");
        r.status_file = Some("/c/status.lat".into());
        let text = r.render();
        assert!(text.contains("action: status\n"));
        assert!(text.contains("result: succeed\n"));
        assert!(text.contains("status_file: /c/status.lat\n"));
        assert_eq!(Reply::parse(text.as_bytes()).unwrap(), r);
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id("host-12-abc.1"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("../x"));
        assert!(!valid_request_id(&"a".repeat(MAX_REQUEST_ID + 1)));
    }
}
