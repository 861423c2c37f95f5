//! The client side of the channel: sends a request as `req-<id>.yaml`
//! (atomically, by rename), pokes the daemon's FIFO, and waits for
//! `rep-<id>.yaml`. Each request has its own files, so any number of
//! clients can talk to the daemon at once.

use crate::fsutil;
use crate::protocol::{self, Action, Reply, StatusDoc};
use crate::protocol::{BuildRecord, Outcome, Persisted};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// latc's exit codes (see the README's table).
pub const EXIT_OK: i32 = 0;
/// The daemon refused the request, or the build failed.
pub const EXIT_FAILED: i32 = 1;
/// The command line was wrong.
pub const EXIT_USAGE: i32 = 2;
/// No daemon answered: not running, not alive, or the timeout passed.
pub const EXIT_UNREACHABLE: i32 = 3;
/// The build was stopped before it ended on its own.
pub const EXIT_STOPPED: i32 = 4;
/// `latc health` only: latd's files cannot be looked at (a permission or
/// I/O error), which says nothing about whether latd lives.
pub const EXIT_CANNOT_LOOK: i32 = 5;
/// Ctrl-C: latc detached; the build goes on.
pub const EXIT_DETACHED: i32 = 130;
/// stdout was closed (SIGPIPE): latc ended quietly.
pub const EXIT_PIPE: i32 = 141;

/// A heartbeat older than this means the daemon is gone.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(10);

/// Why a request got no reply.
#[derive(Debug)]
pub enum ClientError {
    /// No live daemon, or no reply in time.
    Unreachable(String),
    /// We could not write or read the channel.
    Io(String),
}

impl ClientError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unreachable(_) => EXIT_UNREACHABLE,
            ClientError::Io(_) => EXIT_FAILED,
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable(m) | ClientError::Io(m) => f.write_str(m),
        }
    }
}

pub struct Client {
    pub channel: PathBuf,
    pub workspace: PathBuf,
    pub timeout: Duration,
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

fn request_id() -> String {
    let host: String = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{host}-{}-{nanos:x}-{n}", std::process::id())
}

impl Client {
    fn hint(&self) -> String {
        format!(
            "check that the LAT container (latd) is running and that latd and latc use the same channel directory (latc uses {}; set it with --channel, LAT_CHANNEL_DIR or WORKSPACE_DIR)",
            self.channel.display()
        )
    }

    /// Is a daemon alive on this channel? Fast: a lock test and one stat.
    /// When none is, says so, and what a waiting latd says it waits for.
    pub fn check_alive(&self) -> Result<(), ClientError> {
        let held = self.check_lock().map_err(|e| self.with_standby_note(e))?;
        match self.check_heartbeat() {
            // A latd holds the lock and has not written its first heartbeat
            // yet: it is starting (it does so before it answers anything).
            Err(_) if held && !self.channel.join(protocol::ALIVE_FILE).exists() => Ok(()),
            r => r.map_err(|e| self.with_standby_note(e)),
        }
    }

    /// On one kernel, knows at once that no daemon holds the channel's
    /// lock (see [`crate::lock::probe`]); elsewhere leaves it to the
    /// heartbeat. `Ok(true)`: a daemon holds it.
    fn check_lock(&self) -> Result<bool, ClientError> {
        match crate::lock::probe(&self.channel) {
            crate::lock::Probe::Free => Err(ClientError::Unreachable(format!(
                "no latd is running: nothing holds the channel's lock {}; {}",
                self.channel.join(protocol::LOCK_FILE).display(),
                self.hint()
            ))),
            crate::lock::Probe::Held => Ok(true),
            crate::lock::Probe::Unknown => Ok(false),
        }
    }

    /// Adds what a latd waiting for the lock says (a standby, or one whose
    /// NFS server is in its grace period) to "no daemon" errors.
    fn with_standby_note(&self, e: ClientError) -> ClientError {
        match (e, crate::lock::standby_note(&self.channel)) {
            (ClientError::Unreachable(m), Some(note)) => {
                ClientError::Unreachable(format!("{note}. {m}"))
            }
            (e, _) => e,
        }
    }

    /// The heartbeat file, read through a fresh descriptor (on NFS an
    /// open revalidates: no cached attributes or content).
    fn read_alive(&self) -> io::Result<(crate::heartbeat::Beat, SystemTime)> {
        let alive = self.channel.join(protocol::ALIVE_FILE);
        let (bytes, _, md, _) = match fsutil::read_capped_checked(&alive, 4096) {
            // On NFS "no such file" may be this host's cache speaking (the
            // file was remade on another host): a listing revalidates it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _ = fs::read_dir(&self.channel).map(|d| d.count());
                fsutil::read_capped_checked(&alive, 4096)?
            }
            r => r?,
        };
        let beat = crate::heartbeat::parse(&String::from_utf8_lossy(&bytes));
        Ok((beat, md.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
    }

    /// Before a request: is there a heartbeat at all? Its age is judged
    /// after the request is written, against the request's own time on
    /// the channel's filesystem ([`Client::check_heartbeat_against`]), and
    /// while latc waits, by its counter: never against this host's clock.
    /// (Only a heartbeat without a counter, from an older latd, is judged
    /// by its mtime against this host's clock.)
    fn check_heartbeat(&self) -> Result<(), ClientError> {
        let alive = self.channel.join(protocol::ALIVE_FILE);
        match self.read_alive() {
            Ok((beat, mtime)) => {
                if beat.beat.is_some() {
                    return Ok(());
                }
                let age = crate::heartbeat::age_at(mtime, SystemTime::now());
                if age > HEARTBEAT_STALE {
                    Err(ClientError::Unreachable(format!(
                        "latd is not responding: its heartbeat {} is {}s old; it has probably died. {}",
                        alive.display(),
                        age.as_secs(),
                        self.hint()
                    )))
                } else {
                    Ok(())
                }
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ClientError::Io(format!(
                "cannot look at {}: {e}; latc may lack the permission to use the channel",
                alive.display()
            ))),
            Err(_) if !self.channel.is_dir() => Err(ClientError::Unreachable(format!(
                "no latd is running: the channel directory {} does not exist; {}",
                self.channel.display(),
                self.hint()
            ))),
            Err(_) => Err(ClientError::Unreachable(format!(
                "no latd is running: {} does not exist; {}",
                alive.display(),
                self.hint()
            ))),
        }
    }

    /// When a request sent now stops being waited for, in latd's clock as
    /// far as latc can tell: latd compares it with its own. latd refreshes
    /// its heartbeat's mtime every 2 s by its clock, so a clock of ours
    /// that is behind latd's (another host) does not make every request
    /// look expired on arrival; where the clocks agree ours is the later,
    /// and one that is ahead only makes the expiry later.
    fn expiry(&self, timeout: Duration) -> u64 {
        let own = crate::clock::wall_now();
        // latd's clock as its heartbeat (read afresh) states it; from an
        // older latd, the file's mtime.
        let latd = match self.read_alive() {
            Ok((beat, _)) if beat.clock_ms.is_some() => beat.clock_ms.unwrap_or(0),
            _ => fs::metadata(self.channel.join(protocol::ALIVE_FILE))
                .and_then(|md| md.modified())
                .ok()
                .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64),
        };
        own.max(latd).saturating_add(timeout.as_millis() as u64)
    }

    /// Right after the request was written at `stamp` (the request file's
    /// mtime, on the channel filesystem's clock): a heartbeat written more
    /// than [`HEARTBEAT_STALE`] before it means latd is gone. Both times
    /// come from one clock (the NFS server's, or this machine's).
    fn check_heartbeat_against(&self, stamp: SystemTime) -> Result<(), ClientError> {
        let Ok((beat, mtime)) = self.read_alive() else {
            return self.check_heartbeat();
        };
        if beat.beat.is_none() {
            return Ok(());
        }
        let age = crate::heartbeat::age_at(mtime, stamp);
        if age > HEARTBEAT_STALE {
            return Err(ClientError::Unreachable(format!(
                "latd is not responding: its heartbeat {} was last written {}s before this request (both times from the channel's filesystem); it has probably died or hangs. {}",
                self.channel.join(protocol::ALIVE_FILE).display(),
                age.as_secs(),
                self.hint()
            )));
        }
        Ok(())
    }

    /// While waiting: a heartbeat whose counter has not moved for
    /// [`HEARTBEAT_STALE`] (by this process's monotonic clock) means latd
    /// is gone or hangs.
    fn check_heartbeat_moving(
        &self,
        watch: &mut crate::heartbeat::Watch,
    ) -> Result<(), ClientError> {
        match self.read_alive() {
            Ok((beat, _)) => watch.see(beat, Instant::now()),
            Err(_) => return self.check_heartbeat(),
        }
        match watch.still_for(Instant::now()) {
            Some(still) if still > HEARTBEAT_STALE => Err(ClientError::Unreachable(format!(
                "latd is not responding: its heartbeat {} has not moved for {}s; it has probably died or hangs. {}",
                self.channel.join(protocol::ALIVE_FILE).display(),
                still.as_secs(),
                self.hint()
            ))),
            _ => Ok(()),
        }
    }

    /// Sends a request and waits for its reply.
    pub fn request(&self, action: Action, yaml_file: Option<&Path>) -> Result<Reply, ClientError> {
        self.request_with(action, yaml_file, self.timeout)
    }

    pub fn request_with(
        &self,
        action: Action,
        yaml_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        self.check_alive()?;
        let id = request_id();
        // latd will not act on the request once we have stopped waiting (a
        // latd started later must not run a build nobody waits for).
        let expires_at = self.expiry(timeout);
        let text = protocol::render_request(
            action,
            &self.workspace.to_string_lossy(),
            yaml_file.map(|y| y.to_string_lossy()).as_deref(),
            Some(expires_at),
        );
        let req_name = format!(
            "{}{id}{}",
            protocol::REQUEST_PREFIX,
            protocol::MESSAGE_SUFFIX
        );
        let rep_name = format!("{}{id}{}", protocol::REPLY_PREFIX, protocol::MESSAGE_SUFFIX);
        let stamp = fsutil::write_atomic_stamped(&self.channel, &req_name, text.as_bytes(), 0o644)
            .map_err(|e| {
                ClientError::Io(format!(
                    "cannot write the request into {}: {e}; the channel must be writable by you",
                    self.channel.display()
                ))
            })?;
        log::debug!("sent {req_name}");
        // Withdrawn on every way out of here, unless latd took it already.
        let _pending = Withdraw(self.channel.join(&req_name));
        self.check_heartbeat_against(stamp)?;
        let mut watch = crate::heartbeat::Watch::new(Instant::now());
        fsutil::poke(&self.channel.join(protocol::WAKE_FIFO));
        let rep_path = self.channel.join(&rep_name);
        let start = Instant::now();
        let mut last_listing = start;
        let mut last_alive = start;
        let mut pause = Duration::from_micros(100);
        loop {
            match fsutil::read_regular(&rep_path) {
                Ok(bytes) => {
                    let _ = fs::remove_file(&rep_path);
                    return Reply::parse(&bytes).map_err(ClientError::Io);
                }
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(ClientError::Io(format!(
                        "cannot read {}: {e}",
                        rep_path.display()
                    )))
                }
                Err(_) => {}
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(ClientError::Unreachable(format!(
                    "no reply from latd within {:.1}s (raise it with --timeout); {}",
                    timeout.as_secs_f64(),
                    self.hint()
                )));
            }
            // On NFS a name looked up while missing can stay "missing" in
            // the client's cache; a fresh directory listing revalidates it.
            if last_listing.elapsed() >= Duration::from_millis(200) {
                last_listing = Instant::now();
                let _ = fs::read_dir(&self.channel).map(|d| d.count());
            }
            if last_alive.elapsed() >= Duration::from_secs(2) {
                last_alive = Instant::now();
                self.check_alive()?;
                self.check_heartbeat_moving(&mut watch)?;
            }
            std::thread::sleep(pause);
            // Fast at first (the daemon usually answers within a ms), then
            // gentler so a long wait costs little.
            if waited > Duration::from_millis(20) {
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }

    /// Asks for status and reads the status document the reply names.
    pub fn status(&self) -> Result<(Reply, Option<(PathBuf, String)>), ClientError> {
        let reply = self.request(Action::Status, None)?;
        let doc = self.read_reply_file(reply.status_file.as_deref(), protocol::STATUS_FILE);
        Ok((reply, doc))
    }

    /// Reads a file a reply points to; the daemon's path first, then the
    /// same name in our channel (the volume may be mounted elsewhere here).
    pub fn read_reply_file(
        &self,
        path: Option<&Path>,
        fallback: &str,
    ) -> Option<(PathBuf, String)> {
        let candidates = path
            .into_iter()
            .map(Path::to_path_buf)
            .chain(std::iter::once(self.channel.join(fallback)));
        for p in candidates {
            if let Ok(bytes) = fsutil::read_regular_fresh(&p) {
                return Some((p, String::from_utf8_lossy(&bytes).into_owned()));
            }
        }
        None
    }

    /// The status document as data.
    pub fn status_doc(&self) -> Result<StatusDoc, ClientError> {
        let (_, doc) = self.status()?;
        let (path, text) = doc.ok_or_else(|| {
            ClientError::Io(format!(
                "latd answered but its status file is unreadable in {}",
                self.channel.display()
            ))
        })?;
        serde_yaml::from_str(&text).map_err(|e| {
            ClientError::Io(format!("{} is not a status document: {e}", path.display()))
        })
    }

    /// Finished builds, oldest first, from the daemon's persisted state.
    /// Works without a running daemon.
    pub fn history(&self) -> Result<Vec<BuildRecord>, ClientError> {
        let path = self.channel.join(protocol::STATE_FILE);
        let bytes = fs::read(&path).map_err(|e| {
            ClientError::Io(format!(
                "cannot read {}: {e}; has latd ever run on this channel?",
                path.display()
            ))
        })?;
        let p: Persisted = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Io(format!("{} is unreadable: {e}", path.display())))?;
        let mut all = p.history;
        all.extend(p.current);
        Ok(all)
    }
}

/// Removes a request file when dropped: a request its client no longer
/// waits for is withdrawn (if latd took it already, nothing is left to do).
struct Withdraw(PathBuf);

impl Drop for Withdraw {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// latc's exit code for a build that ended.
pub fn exit_code_for(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Succeeded => EXIT_OK,
        Outcome::Failed => EXIT_FAILED,
        Outcome::Stopped => EXIT_STOPPED,
        Outcome::Running => EXIT_FAILED,
    }
}

/// Follows a log file like `tail -f`, coping with it being replaced (a new
/// build renames the old log away and starts a fresh one, or, with the
/// real SDK, points the `log.appsdk` symlink at a new file).
pub struct LogFollower {
    path: PathBuf,
    file: Option<fs::File>,
    ino: u64,
    pos: u64,
    partial: Vec<u8>,
}

impl LogFollower {
    pub fn new(path: PathBuf) -> LogFollower {
        LogFollower {
            path,
            file: None,
            ino: 0,
            pos: 0,
            partial: Vec::new(),
        }
    }

    /// Reads from `path` from now on: the same file under another name
    /// (the SDK's own file, once latd knows it) goes on where it was.
    pub fn retarget(&mut self, path: &Path) {
        if self.path != path {
            self.path = path.to_path_buf();
        }
    }

    /// Returns the complete lines written since the last call. With
    /// `flush`, also a last line that has no newline yet.
    pub fn poll(&mut self, flush: bool) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::unix::fs::MetadataExt;
        // Opened afresh each time (cheap), by the same rule as latd's: the
        // log or the file beside it that its symlink names.
        let now = fsutil::open_log(&self.path).ok().map(|(f, _)| f);
        let md = now.as_ref().and_then(|f| f.metadata().ok());
        let replaced = match (&md, &self.file) {
            (Some(md), Some(_)) => md.ino() != self.ino || md.len() < self.pos,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if replaced {
            if let (Some(f), Some(md)) = (now, md) {
                self.ino = md.ino();
                self.file = Some(f);
                self.pos = 0;
                self.partial.clear();
            }
        }
        let mut lines = Vec::new();
        if let Some(f) = self.file.as_mut() {
            if f.seek(SeekFrom::Start(self.pos)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    self.pos += n as u64;
                    self.partial.extend_from_slice(&buf);
                }
            }
        }
        // Split off the unfinished tail once, then cut the rest into lines
        // (linear in what was read, however many lines it holds).
        if let Some(last_nl) = self.partial.iter().rposition(|&b| b == b'\n') {
            let tail = self.partial.split_off(last_nl + 1);
            let complete = std::mem::replace(&mut self.partial, tail);
            lines.extend(
                complete[..complete.len() - 1]
                    .split(|&b| b == b'\n')
                    .map(|l| String::from_utf8_lossy(l).into_owned()),
            );
        }
        if flush && !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follower_splits_lines_keeps_the_tail_and_sees_a_new_file() {
        let dir = std::env::temp_dir().join(format!("latc-follow-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        fs::write(&log, "a\nb\npart").unwrap();
        let mut f = LogFollower::new(log.clone());
        assert_eq!(f.poll(false), ["a", "b"]);
        let mut file = fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut file, b"ial\nc\n").unwrap();
        assert_eq!(f.poll(false), ["partial", "c"]);
        assert!(f.poll(false).is_empty());
        // Replaced by a new build's log: read from its start.
        fs::rename(&log, dir.join("old")).unwrap();
        fs::write(&log, "new\nend").unwrap();
        assert_eq!(f.poll(true), ["new", "end"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
