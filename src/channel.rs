//! The daemon's side of the channel directory: finds requests by listing
//! the directory (never by stat-ing a fixed name, which NFS's negative
//! lookup cache can hide for a minute), reads them safely, writes replies
//! atomically and retries those that could not be written.

use crate::fsutil::{self, Owner};
use crate::machine::Persisted;
use crate::protocol::{self, Invalid, RawRequest, Reply, StatusDoc};
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::fs;
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rustix::io::Errno;

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The original single slot: `s-2-c.msg` + `s-2-c.done`.
    Legacy,
    /// `rep-<id>.yaml` for a request `req-<id>.yaml`.
    Named(String),
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slot::Legacy => write!(f, "{}", protocol::LEGACY_REQUEST),
            Slot::Named(id) => write!(
                f,
                "{}{id}{}",
                protocol::REQUEST_PREFIX,
                protocol::MESSAGE_SUFFIX
            ),
        }
    }
}

/// A request found in the channel.
#[derive(Debug)]
pub struct Incoming {
    pub slot: Slot,
    /// The start of the bytes as read, for the history file (at most
    /// [`HISTORY_EXCERPT`] characters: a request's bytes are never kept).
    pub text: String,
    pub parsed: Result<RawRequest, Invalid>,
}

/// A request the listing found, to be read with [`Channel::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// `c-2-s.done`, with the marker's inode from the listing.
    Legacy(u64),
    /// `req-<id>.yaml`; `fresh` if the previous listing did not show it.
    Named { id: String, fresh: bool },
}

/// Requests read per tick at most: the rest wait for the next tick, so
/// the heartbeat, reaping and status never wait for a long backlog.
pub const BATCH: usize = 256;
/// Names one listing queues at most, served a batch per tick until the
/// next listing; half of them go first to requests that were not there at
/// the previous listing, so a new client is answered at once however long
/// the backlog; the rest go round the backlog.
const QUEUE: usize = 4 * BATCH;
const FRESH_SHARE: usize = QUEUE / 2;
/// While a backlog is served from the queue, the channel is listed again
/// this often (a listing of a directory of 100k names is costly), or four
/// times as long as the last listing took, so the original slot and new
/// clients wait at most that long behind it.
const RELIST_EVERY: Duration = Duration::from_millis(250);
/// How many names of a listing are remembered to tell fresh requests
/// from the backlog (as 8-byte hashes).
const SEEN_CAP: usize = 1 << 17;
/// Characters of a request kept for the history line.
pub const HISTORY_EXCERPT: usize = 4096;
/// Replies to invalid requests are written while fewer replies than this
/// wait uncollected in the channel; past it, an invalid request is only
/// logged: a client that floods the channel with junk cannot fill the
/// disk with answers nobody reads.
pub const JUNK_REPLY_CAP: usize = 256;
/// Replies to invalid requests kept for a retry when they cannot be
/// written (a full disk); replies to valid requests go first.
const PENDING_JUNK_CAP: usize = 16;
/// Replies kept for a retry at most.
const PENDING_CAP: usize = 4096;
/// Requests that could not be removed, remembered so they are not served
/// twice; past this many, the oldest are forgotten.
const HANDLED_CAP: usize = 1 << 16;
/// How often removing them is tried again, and how many at most a time.
const REMOVE_HANDLED_EVERY: Duration = Duration::from_secs(1);
const REMOVE_HANDLED_BATCH: usize = 256;
/// Files replaced this tick held open at most (their blocks are freed
/// when they are let go; see [`fsutil::replace_atomic`]).
const RETIRED_CAP: usize = 32;
/// How long the sweep works per tick at most (or as long as the last
/// listing took, if longer).
const SWEEP_TIME: Duration = Duration::from_millis(50);
/// Prefix of the hidden name an unusable entry is moved aside to.
pub const ASIDE_PREFIX: &str = ".latd-aside-";

/// How often [`Channel::ensure`] looks at the channel's path.
const ENSURE_EVERY: Duration = Duration::from_secs(1);
/// Replies older than this that nobody collected are removed.
const STALE_AFTER: Duration = Duration::from_secs(600);
/// A temporary file this old was left by a writer that died.
const TEMP_STALE_AFTER: Duration = Duration::from_secs(60);
/// The history file is rotated (one old copy kept) past this size.
pub const HISTORY_CAP: u64 = 1 << 20;
/// A reply that cannot be written is retried for this long.
const REPLY_RETRY_FOR: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct PendingReply {
    slot: Slot,
    text: String,
    since: Instant,
    /// A reply to an invalid request.
    junk: bool,
}

/// Inode, size and mtime: enough to notice a file that was replaced.
type FileIdentity = (u64, u64, i64, i64);

/// Device, inode and mount id of an open directory.
fn dir_identity(f: &fs::File) -> io::Result<(u64, u64, Option<u64>)> {
    let md = f.metadata()?;
    Ok((md.dev(), md.ino(), crate::tree::mount_id_of(f)))
}

/// The mode of a channel given to a group: setgid, rwx for owner and group,
/// nothing for others.
pub const CHANNEL_GROUP_MODE: u32 = 0o2770;

/// Identity of a file, to notice one that was replaced.
fn identity(md: &fs::Metadata) -> FileIdentity {
    (md.ino(), md.size(), md.mtime(), md.mtime_nsec())
}

pub struct Channel {
    dir: PathBuf,
    owner: Option<Owner>,
    /// `--channel-group`: the group the channel is given (mode 2770).
    group: Option<u32>,
    /// Requests we handled but could not remove (read-only channel): their
    /// identity, so they are not handled twice. Bounded ([`HANDLED_CAP`]),
    /// oldest first.
    handled: HashSet<(String, u64, i64, i64)>,
    handled_order: VecDeque<(String, u64, i64, i64)>,
    last_remove_handled: Option<Instant>,
    /// Entries that cannot be used, removed or moved aside (a directory
    /// named like a request in a channel latd cannot write): device,
    /// inode and mtime, so they are answered once and then ignored.
    ignored: HashSet<(u64, u64, i64, i64)>,
    pending: Vec<PendingReply>,
    /// Hashes of the request names of the previous listing, to tell fresh
    /// requests from the backlog.
    seen: HashSet<u64>,
    /// The last backlog request served: the next tick goes on after it.
    cursor: Option<String>,
    /// The last listing showed more requests than one batch takes.
    backlog: bool,
    /// Requests the last listing picked that no tick has served yet, and
    /// when that listing was.
    queue: VecDeque<Pick>,
    listed_at: Option<Instant>,
    /// How long the last listing took: the sweep gets at least as long
    /// per tick, so in a huge channel it is not starved by the listings.
    listing_took: Duration,
    /// Keys the hashes of request names (see [`Channel::scan`]).
    salt: std::collections::hash_map::RandomState,
    /// Replies (`rep-*`) waiting uncollected at the last listing, plus
    /// the junk replies written since.
    uncollected: usize,
    junk_dropped: u64,
    /// The sweep under way: the listing it walks, and whether it is the
    /// one at start-up.
    sweeping: Option<(fs::ReadDir, bool)>,
    /// The original slot's last request: (marker inode, request identity).
    /// Kept while its marker is still listed, so it is answered once.
    legacy_answered: Option<(u64, Option<FileIdentity>)>,
    /// A status document that could not be written; retried with the
    /// replies so that `status.lat` does not stay stale.
    pending_status: Option<String>,
    history_size: Option<u64>,
    broken: bool,
    /// The channel existed (or was made) once: its loss is worth a warning.
    set_up: bool,
    /// Files replaced this tick, held open until the replies are out.
    retired: VecDeque<fs::File>,
    /// `status.lat`, `s-2-c.msg` and `latd.alive`, rewritten in place on
    /// a network filesystem (see [`fsutil::InPlace`]).
    status_file: fsutil::InPlace,
    reply_file: fsutil::InPlace,
    alive_file: fsutil::InPlace,
    fifo_warned: bool,
    /// The channel directory, held open: every file operation goes through
    /// it (`via`), so a client that swaps the channel's path for a symlink
    /// cannot make root write or unlink elsewhere.
    held: Option<fs::File>,
    /// `/proc/self/fd/<held>`, or the path itself where /proc is missing.
    via: PathBuf,
    /// The configured path was a symlink when latd started: the operator's
    /// choice, followed.
    symlink_at_start: bool,
    symlink_warned: bool,
    /// `--follow-channel-symlink`: a symlink at the channel's path at start
    /// is the operator's choice and is followed; without it, it is set
    /// aside (a client may have planted it) and a real directory made.
    follow_symlink: bool,
    last_ensured: Option<Instant>,
    /// The channel is on a local filesystem, whose directory mtime can be
    /// trusted to tell that nothing changed (see [`Channel::unchanged`]).
    local: bool,
    /// The directory's stamp before the last listing, when it was taken,
    /// and whether that mtime was settled (old enough to be exact).
    last_listing: Option<(DirStamp, Instant, bool)>,
}

/// What a directory's change shows in its metadata.
type DirStamp = (u64, u64, i64, i64, i64, i64);

/// Filesystems whose directory mtime is exact and immediate for every
/// writer (not NFS, CIFS or FUSE, which cache attributes).
pub(crate) fn is_local_fs(f: &fs::File) -> bool {
    let Ok(st) = rustix::fs::fstatfs(f) else {
        return false;
    };
    let kind = st.f_type as u64;
    const LOCAL: [u64; 5] = [
        0xEF53,      // ext2/3/4
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x0102_1994, // tmpfs
        0x794C_7630, // overlayfs
    ];
    LOCAL.contains(&kind)
}

impl Channel {
    pub fn new(dir: PathBuf) -> Channel {
        Channel {
            owner: Owner::of_dir_when_root(&dir),
            group: None,
            dir: dir.clone(),
            handled: HashSet::new(),
            handled_order: VecDeque::new(),
            last_remove_handled: None,
            ignored: HashSet::new(),
            pending: Vec::new(),
            seen: HashSet::new(),
            cursor: None,
            backlog: false,
            queue: VecDeque::new(),
            listed_at: None,
            listing_took: Duration::ZERO,
            salt: Default::default(),
            uncollected: 0,
            junk_dropped: 0,
            sweeping: None,
            legacy_answered: None,
            pending_status: None,
            history_size: None,
            broken: false,
            set_up: false,
            retired: VecDeque::new(),
            status_file: fsutil::InPlace::default(),
            reply_file: fsutil::InPlace::default(),
            alive_file: fsutil::InPlace::default(),
            fifo_warned: false,
            held: None,
            via: dir.clone(),
            symlink_at_start: false,
            follow_symlink: false,
            symlink_warned: false,
            last_ensured: None,
            local: false,
            last_listing: None,
        }
    }

    /// Gives the channel to group `gid` (mode 2770: the group's members, and
    /// only they, can use it; files made in it inherit the group).
    pub fn follow_symlink(&mut self) {
        self.follow_symlink = true;
    }

    /// At start: what is at the channel's path and is not a directory (a
    /// file, a FIFO; a symlink unless `--follow-channel-symlink`) is renamed
    /// aside, never followed or used, so a client cannot send root's files
    /// elsewhere, nor stop latd from starting.
    fn set_aside_if_not_dir(&mut self) -> io::Result<()> {
        let Ok(md) = fs::symlink_metadata(&self.dir) else {
            return Ok(());
        };
        let ft = md.file_type();
        let (what, suffix) = if ft.is_symlink() {
            if self.follow_symlink {
                return Ok(());
            }
            let target = fs::read_link(&self.dir).unwrap_or_default();
            (
                format!(
                    "a symlink to {}: not followed (start latd with --follow-channel-symlink to serve where it points)",
                    target.display()
                ),
                "symlink",
            )
        } else if ft.is_dir() {
            return Ok(());
        } else {
            ("not a directory".to_string(), "planted")
        };
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut aside = self.dir.clone().into_os_string();
        aside.push(format!(".{suffix}-{secs}"));
        fs::rename(&self.dir, &aside)?;
        log::error!(
            "{} was {what}; moved it to {} and serving a new directory at {}",
            self.dir.display(),
            Path::new(&aside).display(),
            self.dir.display()
        );
        Ok(())
    }

    pub fn set_group(&mut self, gid: u32) {
        self.group = Some(gid);
    }

    /// Applies `--channel-group` to the held directory (through its
    /// descriptor) when its group or mode differ.
    fn apply_group(&mut self) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let (Some(gid), Some(f)) = (self.group, self.held.as_ref()) else {
            return Ok(());
        };
        let md = f.metadata()?;
        if md.gid() == gid && md.mode() & 0o7777 == CHANNEL_GROUP_MODE {
            return Ok(());
        }
        std::os::unix::fs::fchown(f, None, Some(gid)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot give {} to group {gid}: {e}", self.dir.display()),
            )
        })?;
        f.set_permissions(fs::Permissions::from_mode(CHANNEL_GROUP_MODE))?;
        log::info!(
            "channel {} belongs to group {gid}, mode {CHANNEL_GROUP_MODE:o}",
            self.dir.display()
        );
        self.owner = Owner::of_dir_when_root(&self.dir);
        Ok(())
    }

    /// Opens the daemon's end of the wake-up FIFO.
    pub fn open_fifo(&self) -> io::Result<fs::File> {
        fsutil::open_fifo(&self.at(protocol::WAKE_FIFO), self.owner)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `name` in the channel as clients see it (for messages and replies).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The directory to do file operations in: the held channel directory.
    pub fn io_dir(&self) -> &Path {
        &self.via
    }

    /// `name` in the held channel directory, for file operations.
    pub fn at(&self, name: &str) -> PathBuf {
        self.via.join(name)
    }

    /// Holds the channel directory open, again if its path now names
    /// another real directory (recreated, or a mount put over it). A
    /// symlink put in its place is not followed: latd keeps serving the
    /// directory it had, and says so.
    fn hold(&mut self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let md = fs::symlink_metadata(&self.dir)?;
        let at_start = self.held.is_none() && !self.set_up;
        if md.file_type().is_symlink() && at_start && !self.follow_symlink {
            // Put there between our setting it aside and now: refused.
            return Err(io::Error::other(
                "the channel's path is a symlink (not followed without --follow-channel-symlink)",
            ));
        }
        if md.file_type().is_symlink() && !at_start && !self.symlink_at_start {
            if !self.symlink_warned {
                self.symlink_warned = true;
                log::error!(
                    "{} was replaced by a symlink; still serving the directory it was",
                    self.dir.display()
                );
            }
            return Ok(());
        }
        self.symlink_warned = false;
        // Device, inode and mount: a mount put over the path (even a bind
        // mount of the same directory, read-only) is another directory.
        let same = match &self.held {
            Some(f) => dir_identity(f)? == dir_identity(&fs::File::open(&self.dir)?)?,
            None => false,
        };
        if same {
            return Ok(());
        }
        let f = if md.file_type().is_symlink() {
            // Only at start: the operator configured a symlinked channel.
            self.symlink_at_start = true;
            fs::File::open(&self.dir)?
        } else {
            fsutil::open_dir_nofollow(&self.dir)?
        };
        if self.held.is_some() {
            log::info!(
                "{} is another directory now (recreated, or mounted over); serving it",
                self.dir.display()
            );
        }
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        self.via = if proc_path.is_dir() {
            proc_path
        } else {
            self.dir.clone()
        };
        self.local = is_local_fs(&f);
        self.status_file.forget();
        self.reply_file.forget();
        self.alive_file.forget();
        self.last_listing = None;
        // What was listed is of the directory let go: a sweep under way
        // must not go on by a descriptor number that may name something
        // else once closed.
        self.sweeping = None;
        self.queue.clear();
        self.held = Some(f);
        self.owner = Owner::of_dir_when_root(&self.dir);
        self.history_size = None;
        Ok(())
    }

    /// Creates the channel (and the wake-up FIFO) if missing, and takes up
    /// a directory that replaced it. Called every tick; it looks at most
    /// once a second (or at once while the channel is broken), so the idle
    /// loop stays cheap. Returns whether the FIFO was (re)made, so the
    /// daemon reopens it.
    pub fn ensure(&mut self) -> io::Result<bool> {
        let due = self.held.is_none()
            || self.broken
            || self
                .last_ensured
                .is_none_or(|t| t.elapsed() >= ENSURE_EVERY);
        if !due {
            return Ok(false);
        }
        self.last_ensured = Some(Instant::now());
        if !self.set_up && self.held.is_none() {
            self.set_aside_if_not_dir()?;
        }
        if fs::symlink_metadata(&self.dir).is_err() {
            if !self.set_up {
                log::info!("creating channel {}", self.dir.display());
            } else if !self.broken {
                log::warn!("channel {} is missing; recreating it", self.dir.display());
            }
            fsutil::ensure_dir(&self.dir)?;
        }
        self.hold()?;
        self.apply_group()?;
        self.set_up = true;
        // The FIFO is only a wake-up hint: without it (a filesystem with
        // no FIFOs) latd still serves every request by polling.
        match fsutil::ensure_fifo(&self.at(protocol::WAKE_FIFO)) {
            Ok(made) => Ok(made),
            Err(e) => {
                if !self.fifo_warned {
                    self.fifo_warned = true;
                    log::warn!(
                        "cannot make the wake-up pipe {}: {e}; serving by polling only",
                        self.path(protocol::WAKE_FIFO).display()
                    );
                }
                Ok(false)
            }
        }
    }

    /// Start-up: remove what a previous daemon left that would mislead a
    /// client. A complete request (`c-2-s.done`, `req-*`) is kept: it will
    /// be answered. The sweep of old files starts, and goes on a slice per
    /// tick while requests are served.
    pub fn clear_stale(&mut self) {
        for name in [protocol::LEGACY_REPLY_DONE, protocol::LEGACY_REPLY] {
            if let Err(e) = fsutil::remove_if_present(&self.at(name)) {
                log::warn!("cannot remove stale {name}: {e}");
            }
        }
        self.start_sweep(true);
    }

    /// Starts a sweep of temporary files left by a writer that died, and
    /// of replies nobody collected, unless one is under way. `at_start`:
    /// the previous daemon is gone, so its temporaries go at once; a
    /// client's only once old (it may be writing).
    pub fn start_sweep(&mut self, at_start: bool) {
        if self.sweeping.is_none() {
            self.sweeping = fs::read_dir(&self.via).ok().map(|r| (r, at_start));
        }
    }

    /// Whether a sweep is under way.
    pub fn sweeping(&self) -> bool {
        self.sweeping.is_some()
    }

    /// Sweeps the next slice (about [`SWEEP_TIME`] of work): a channel
    /// holding a million stale replies is cleared over many ticks, each
    /// short, instead of one tick that blinds latd for a minute.
    pub fn sweep_step(&mut self) {
        let Some((mut entries, at_start)) = self.sweeping.take() else {
            return;
        };
        let now = SystemTime::now();
        let start = Instant::now();
        let budget = SWEEP_TIME.max(self.listing_took);
        for n in 0.. {
            if n % 256 == 255 && start.elapsed() >= budget {
                break;
            }
            let Some(e) = entries.next() else {
                return;
            };
            let Ok(e) = e else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            let temporary = name.starts_with('.') && name.ends_with(".tmp");
            let reply = name.starts_with(protocol::REPLY_PREFIX)
                && name.ends_with(protocol::MESSAGE_SUFFIX);
            let clients = name.starts_with(&format!(".{}", protocol::REQUEST_PREFIX));
            let keep_for = match (temporary, reply) {
                (true, _) if at_start && !clients => Duration::ZERO,
                (true, _) => TEMP_STALE_AFTER,
                (false, true) => STALE_AFTER,
                (false, false) => continue,
            };
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|a| a >= keep_for);
            if old {
                log::debug!("removing stale {name}");
                let _ = fs::remove_file(e.path());
            }
        }
        self.sweeping = Some((entries, at_start));
    }

    /// Removes the requests that were handled while the channel could not
    /// be written (read-only, full): once it can, they must not stay
    /// behind, to be answered a second time by the next daemon. A file
    /// that was replaced since is a new request and is left alone.
    /// Tried once a second, a slice at a time, and only until one still
    /// cannot be removed (the channel is still read-only): never a cost
    /// that grows with their number on every tick.
    fn remove_handled(&mut self) {
        if self.handled_order.is_empty()
            || self
                .last_remove_handled
                .is_some_and(|t| t.elapsed() < REMOVE_HANDLED_EVERY)
        {
            return;
        }
        self.last_remove_handled = Some(Instant::now());
        for _ in 0..REMOVE_HANDLED_BATCH.min(self.handled_order.len()) {
            let Some(key) = self.handled_order.pop_front() else {
                break;
            };
            let path = self.via.join(&key.0);
            let keep = match fs::symlink_metadata(&path) {
                Ok(md) if (md.ino(), md.mtime(), md.mtime_nsec()) == (key.1, key.2, key.3) => {
                    match fsutil::remove_if_present(&path) {
                        Ok(()) => {
                            log::info!("removed {}, handled earlier", key.0);
                            false
                        }
                        Err(_) => true,
                    }
                }
                // Replaced by a new request.
                Ok(_) => false,
                Err(e) => e.kind() != io::ErrorKind::NotFound,
            };
            if keep {
                self.handled_order.push_front(key);
                break;
            }
            self.handled.remove(&key);
        }
    }

    /// Remembers a request that was served but could not be removed.
    fn remember_handled(&mut self, key: (String, u64, i64, i64)) {
        if self.handled.insert(key.clone()) {
            self.handled_order.push_back(key);
            if self.handled_order.len() > HANDLED_CAP {
                if let Some(old) = self.handled_order.pop_front() {
                    self.handled.remove(&old);
                }
            }
        }
    }

    /// Gets an entry latd cannot use (a directory named like a request)
    /// out of the way: removed if it can be, else moved aside to a hidden
    /// name (which no scan looks at), else ignored by its identity from
    /// now on. Never retried every tick.
    fn put_aside(&mut self, name: &str, md: &fs::Metadata) {
        let path = self.at(name);
        if fs::remove_file(&path).is_ok() || fs::remove_dir(&path).is_ok() {
            return;
        }
        let aside = format!("{ASIDE_PREFIX}{name}.{}", md.ino());
        match fs::rename(&path, self.at(&aside)) {
            Ok(()) => log::warn!("moved {name} aside to {aside}: latd cannot use it"),
            Err(e) => {
                log::warn!("ignoring {name} from now on: latd cannot use, remove or move it ({e})");
                if self.ignored.len() < HANDLED_CAP {
                    self.ignored
                        .insert((md.dev(), md.ino(), md.mtime(), md.mtime_nsec()));
                }
            }
        }
    }

    /// On a local filesystem, whether the directory is as it was at the
    /// last listing, so this poll can skip listing it (the idle loop's
    /// main cost). Only a settled mtime is trusted (timestamps are coarse:
    /// two changes within a few ms can share one), and a listing is made
    /// at least once a second anyway. Elsewhere (NFS: cached attributes)
    /// every poll lists the directory.
    fn unchanged(&mut self) -> bool {
        if !self.local {
            return false;
        }
        let Ok(md) = fs::metadata(&self.via) else {
            return false;
        };
        let stamp = (
            md.dev(),
            md.ino(),
            md.mtime(),
            md.mtime_nsec(),
            md.ctime(),
            md.ctime_nsec(),
        );
        let same = self.last_listing.as_ref().is_some_and(|(s, at, settled)| {
            *s == stamp && *settled && at.elapsed() < Duration::from_secs(1)
        });
        if !same {
            let settled = md
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age >= Duration::from_millis(50));
            self.last_listing = Some((stamp, Instant::now(), settled));
        }
        same
    }

    /// The requests to serve this tick: the original slot, then at most
    /// [`BATCH`] others. A listing queues at most [`QUEUE`] names, fresh
    /// ones first (up to [`FRESH_SHARE`]), then the backlog in turn after
    /// the last one served; while the queue lasts, the channel is listed
    /// again only every [`RELIST_EVERY`]. Only names are held; each request
    /// is read, served and dropped before the next one ([`Channel::read`]).
    pub fn scan(&mut self) -> io::Result<Vec<Pick>> {
        self.remove_handled();
        // A listing that is itself costly (a directory of 100k names) is
        // repeated less often: listing takes at most a fifth of the time.
        let every = RELIST_EVERY.max(self.listing_took * 4);
        let relist = self.queue.is_empty() || self.listed_at.is_none_or(|t| t.elapsed() >= every);
        if !relist {
            let n = self.queue.len().min(BATCH);
            return Ok(self.queue.drain(..n).collect());
        }
        if self.queue.is_empty() && !self.backlog && self.unchanged() {
            return Ok(Vec::new());
        }
        let listing_started = Instant::now();
        self.listed_at = Some(listing_started);
        let entries = match fs::read_dir(&self.via) {
            Ok(e) => {
                if self.broken {
                    log::info!("channel {} is readable again", self.dir.display());
                    self.broken = false;
                }
                e
            }
            Err(e) => {
                if !self.broken {
                    log::error!("cannot list channel {}: {e}", self.dir.display());
                    self.broken = true;
                }
                return Err(e);
            }
        };
        let mut legacy: Option<u64> = None;
        // The smallest names of each kind, a queue's worth (max-heaps).
        // Fresh ones go by their hash, keyed afresh by each latd: a client
        // cannot choose names that always come first.
        let mut fresh: BinaryHeap<(u64, String)> = BinaryHeap::new();
        let mut after: BinaryHeap<String> = BinaryHeap::new();
        let mut before: BinaryHeap<String> = BinaryHeap::new();
        let keep = |heap: &mut BinaryHeap<String>, name: &str| {
            if heap.len() < QUEUE {
                heap.push(name.to_string());
            } else if heap.peek().is_some_and(|top| name < top.as_str()) {
                heap.pop();
                heap.push(name.to_string());
            }
        };
        let mut seen = HashSet::new();
        let salt = self.salt.clone();
        let mut listed = 0usize;
        let mut replies = 0usize;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == protocol::LEGACY_REQUEST_DONE {
                use std::os::unix::fs::DirEntryExt;
                legacy = Some(e.ino());
            } else if let Some(id) = name
                .strip_prefix(protocol::REQUEST_PREFIX)
                .and_then(|r| r.strip_suffix(protocol::MESSAGE_SUFFIX))
            {
                listed += 1;
                let h = salt.hash_one(id);
                if seen.len() < SEEN_CAP {
                    seen.insert(h);
                }
                if !self.seen.contains(&h) {
                    if fresh.len() < QUEUE {
                        fresh.push((h, id.to_string()));
                    } else if fresh.peek().is_some_and(|top| h < top.0) {
                        fresh.pop();
                        fresh.push((h, id.to_string()));
                    }
                } else if self.cursor.as_deref().is_some_and(|c| id <= c) {
                    keep(&mut before, id);
                } else {
                    keep(&mut after, id);
                }
            } else if name.starts_with(protocol::REPLY_PREFIX) {
                replies += 1;
            }
        }
        self.seen = seen;
        self.uncollected = replies;
        self.listing_took = listing_started.elapsed();
        let fresh: Vec<String> = fresh
            .into_sorted_vec()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let old: Vec<String> = after
            .into_sorted_vec()
            .into_iter()
            .chain(before.into_sorted_vec())
            .collect();
        let fresh_n = fresh
            .len()
            .min(FRESH_SHARE.max(QUEUE.saturating_sub(old.len())));
        let old_n = old.len().min(QUEUE - fresh_n);
        self.queue.clear();
        self.queue.extend(
            fresh
                .into_iter()
                .take(fresh_n)
                .map(|id| Pick::Named { id, fresh: true }),
        );
        self.queue.extend(
            old.into_iter()
                .take(old_n)
                .map(|id| Pick::Named { id, fresh: false }),
        );
        self.backlog = listed > fresh_n + old_n;
        if listed > BATCH {
            log::debug!("{listed} requests waiting; serving them {BATCH} a tick");
        }
        let n = self.queue.len().min(BATCH);
        let mut picks: Vec<Pick> = legacy.into_iter().map(Pick::Legacy).collect();
        picks.extend(self.queue.drain(..n));
        Ok(picks)
    }

    /// Puts back what a tick picked but had no time to read: first in
    /// line for the next tick.
    pub fn give_back(&mut self, picks: Vec<Pick>) {
        for p in picks.into_iter().rev() {
            if matches!(p, Pick::Named { .. }) {
                self.queue.push_front(p);
            }
        }
    }

    /// Whether requests wait for later ticks.
    pub fn has_backlog(&self) -> bool {
        self.backlog || !self.queue.is_empty()
    }

    /// Reads one request the listing picked; `None` if there is nothing
    /// to answer (gone, answered already, or not answerable).
    pub fn read(&mut self, pick: Pick) -> Option<Incoming> {
        match pick {
            Pick::Legacy(ino) => self.read_legacy(ino),
            Pick::Named { id, fresh } => {
                if !fresh {
                    self.cursor = Some(id.clone());
                }
                self.read_named(id)
            }
        }
    }

    /// Reads the original slot. `done_ino` comes from the listing: the
    /// marker is never looked up by name first, because a cache of "no
    /// such file" (NFS, FUSE) may deny what the listing shows.
    fn read_legacy(&mut self, done_ino: u64) -> Option<Incoming> {
        let done = self.at(protocol::LEGACY_REQUEST_DONE);
        let msg = self.at(protocol::LEGACY_REQUEST);
        let msg_id = fs::symlink_metadata(&msg).map(|m| identity(&m)).ok();
        let key = (done_ino, msg_id);
        if self.legacy_answered == Some(key) {
            // Answered, but the marker could not be removed yet (read-only
            // channel, stale cache): try again, answer nothing twice.
            if fs::remove_file(&done).is_ok() {
                log::info!("removed {}, handled earlier", protocol::LEGACY_REQUEST_DONE);
                self.legacy_answered = None;
            }
            return None;
        }
        let (text, parsed) = read_request(
            &msg,
            protocol::LEGACY_REQUEST,
            protocol::LEGACY_REQUEST_DONE,
        );
        // Remembered only while the marker stays; once it is removed, the
        // next marker (whatever its inode) is a new request.
        self.legacy_answered = match fs::remove_file(&done) {
            Ok(()) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(key),
            Err(_) if fs::symlink_metadata(&done).is_ok_and(|m| m.is_dir()) => {
                // A directory as the marker: answered once, then put aside.
                if let Ok(md) = fs::symlink_metadata(&done) {
                    self.put_aside(protocol::LEGACY_REQUEST_DONE, &md);
                }
                None
            }
            Err(e) => {
                log::error!(
                    "cannot remove {}: {e}; the channel must be writable",
                    done.display()
                );
                Some(key)
            }
        };
        Some(Incoming {
            slot: Slot::Legacy,
            text,
            parsed,
        })
    }

    fn read_named(&mut self, id: String) -> Option<Incoming> {
        let name = format!(
            "{}{id}{}",
            protocol::REQUEST_PREFIX,
            protocol::MESSAGE_SUFFIX
        );
        let path = self.at(&name);
        let md = fs::symlink_metadata(&path).ok()?;
        let key = (name.clone(), md.ino(), md.mtime(), md.mtime_nsec());
        if self.handled.contains(&key)
            || self
                .ignored
                .contains(&(md.dev(), md.ino(), md.mtime(), md.mtime_nsec()))
        {
            return None;
        }
        if !protocol::valid_request_id(&id) {
            // Cannot be answered (no safe reply name): remove it and say why.
            log::error!(
                "ignoring {name}: request ids are 1-{} characters of A-Z a-z 0-9 . _ -",
                protocol::MAX_REQUEST_ID
            );
            if fs::remove_file(&path).is_err() {
                self.put_aside(&name, &md);
            }
            return None;
        }
        let (text, parsed) = read_request(&path, &name, &name);
        if md.is_dir() {
            // Answered once (it is not a request), then out of the way.
            self.put_aside(&name, &md);
        } else if let Err(e) = fsutil::remove_if_present(&path) {
            log::error!(
                "cannot remove {}: {e}; the channel must be writable",
                path.display()
            );
            self.remember_handled(key);
        }
        Some(Incoming {
            slot: Slot::Named(id),
            text,
            parsed,
        })
    }

    /// Writes a reply; one that cannot be written now is retried later.
    /// `junk`: the reply to an invalid request, written only while few
    /// replies wait uncollected ([`JUNK_REPLY_CAP`]), and kept for a retry
    /// only a few at a time: junk never fills the disk or crowds out the
    /// replies to real requests.
    pub fn reply(&mut self, slot: Slot, reply: &Reply, junk: bool) {
        let named = matches!(slot, Slot::Named(_));
        if junk && named && self.uncollected >= JUNK_REPLY_CAP {
            self.junk_dropped += 1;
            if self.junk_dropped.is_power_of_two() {
                log::warn!(
                    "not answering the invalid request {slot}: {} replies wait uncollected ({} invalid requests unanswered so far)",
                    self.uncollected,
                    self.junk_dropped
                );
            }
            return;
        }
        let text = reply.render();
        match self.write_reply(&slot, &text) {
            Ok(()) => {
                if named {
                    self.uncollected += 1;
                }
            }
            Err(e) => {
                log::error!(
                    "cannot write the reply to {slot} in {}: {e}; will retry",
                    self.dir.display()
                );
                self.keep_pending(PendingReply {
                    slot,
                    text,
                    since: Instant::now(),
                    junk,
                });
            }
        }
    }

    /// Keeps a reply for a retry, within [`PENDING_CAP`] and
    /// [`PENDING_JUNK_CAP`]; past them the oldest junk goes first.
    fn keep_pending(&mut self, p: PendingReply) {
        if p.junk && self.pending.iter().filter(|q| q.junk).count() >= PENDING_JUNK_CAP {
            log::warn!(
                "dropping the reply to the invalid request {}: too many replies wait for a retry",
                p.slot
            );
            return;
        }
        if self.pending.len() >= PENDING_CAP {
            let victim = self.pending.iter().position(|q| q.junk).unwrap_or(0);
            let old = self.pending.remove(victim);
            log::error!(
                "giving up on the reply to {}: too many replies wait for a retry",
                old.slot
            );
        }
        self.pending.push(p);
    }

    fn write_reply(&mut self, slot: &Slot, text: &str) -> io::Result<()> {
        match slot {
            Slot::Legacy => {
                if self.local {
                    let old = fsutil::replace_atomic(
                        &self.via,
                        protocol::LEGACY_REPLY,
                        text.as_bytes(),
                        0o644,
                        self.owner,
                    )?;
                    self.retire(old);
                } else {
                    // Read by name by clients on other hosts: one inode,
                    // rewritten (see `InPlace`), on the server before the
                    // marker says it is there.
                    self.reply_file.write(
                        &self.via,
                        protocol::LEGACY_REPLY,
                        text.as_bytes(),
                        0o644,
                        self.owner,
                        true,
                    )?;
                }
                fsutil::write_atomic(
                    &self.via,
                    protocol::LEGACY_REPLY_DONE,
                    b"",
                    0o644,
                    self.owner,
                    false,
                )
            }
            Slot::Named(id) => {
                let name = format!("{}{id}{}", protocol::REPLY_PREFIX, protocol::MESSAGE_SUFFIX);
                fsutil::write_atomic(&self.via, &name, text.as_bytes(), 0o644, self.owner, false)
            }
        }
    }

    /// Retries replies that could not be written; gives up on one only
    /// after a long time, loudly.
    pub fn retry_pending(&mut self) {
        if let Some(text) = self.pending_status.take() {
            match self.write_status_text(&text) {
                Ok(()) => log::info!("{} written after a retry", protocol::STATUS_FILE),
                Err(_) => self.pending_status = Some(text),
            }
        }
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        // Replies to real requests first, while space is scarce.
        pending.sort_by_key(|p| p.junk);
        // Once the channel as a whole refuses (full, read-only), the rest
        // wait for the next tick: a retry round costs one failed write.
        let mut refused = false;
        for p in pending {
            let result = if refused {
                Err(io::Error::from(Errno::NOSPC))
            } else {
                self.write_reply(&p.slot, &p.text)
            };
            match result {
                Ok(()) => {
                    log::info!("reply to {} written after a retry", p.slot);
                    if matches!(p.slot, Slot::Named(_)) {
                        self.uncollected += 1;
                    }
                }
                Err(e) if p.since.elapsed() > REPLY_RETRY_FOR => {
                    log::error!(
                        "giving up on the reply to {} after {:?}: {e}",
                        p.slot,
                        REPLY_RETRY_FOR
                    )
                }
                Err(e) => {
                    refused |= matches!(
                        Errno::from_io_error(&e),
                        Some(Errno::NOSPC | Errno::ROFS | Errno::DQUOT | Errno::ACCESS)
                    );
                    self.pending.push(p);
                }
            }
        }
    }

    /// The channel is on a network (or FUSE) filesystem: every poll is a
    /// request to the server, and other hosts read what latd writes.
    pub fn is_network(&self) -> bool {
        self.held.is_some() && !self.local
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Creates or removes the `invalid_message` marker.
    pub fn mark_invalid(&self, invalid: bool) {
        let path = self.at(protocol::INVALID_MARKER);
        let r = if invalid {
            fsutil::write_atomic(
                &self.via,
                protocol::INVALID_MARKER,
                b"",
                0o644,
                self.owner,
                false,
            )
        } else {
            fsutil::remove_if_present(&path)
        };
        if let Err(e) = r {
            log::warn!("cannot update {}: {e}", path.display());
        }
    }

    /// Writes the heartbeat file `latd.alive`: always in place, one inode
    /// held open for writing, so a client on another host that reads it
    /// by name reads the last beat (see [`fsutil::InPlace`]); pushed to
    /// the server at once on a network filesystem.
    pub fn write_alive(&mut self, text: &str) -> io::Result<()> {
        self.alive_file.write(
            &self.via,
            protocol::ALIVE_FILE,
            text.as_bytes(),
            0o644,
            None,
            !self.local,
        )
    }

    pub fn write_status(&mut self, doc: &StatusDoc) {
        let text = serde_yaml::to_string(doc).unwrap_or_default();
        match self.write_status_text(&text) {
            Ok(()) => self.pending_status = None,
            Err(e) => {
                log::error!(
                    "cannot write {}: {e}; will retry",
                    self.path(protocol::STATUS_FILE).display()
                );
                self.pending_status = Some(text);
            }
        }
    }

    fn write_status_text(&mut self, text: &str) -> io::Result<()> {
        if !self.local {
            // Read by name by clients on other hosts (the original latc
            // runs `cat status.lat`): one inode, rewritten (see `InPlace`).
            return self.status_file.write(
                &self.via,
                protocol::STATUS_FILE,
                text.as_bytes(),
                0o644,
                self.owner,
                true,
            );
        }
        let old = fsutil::replace_atomic(
            &self.via,
            protocol::STATUS_FILE,
            text.as_bytes(),
            0o644,
            self.owner,
        )?;
        self.retire(old);
        Ok(())
    }

    /// Holds a replaced file until the replies are out, at most
    /// [`RETIRED_CAP`] of them: a tick that rewrites `status.lat` for many
    /// requests lets the oldest go at once, and never runs out of
    /// descriptors.
    fn retire(&mut self, old: Option<fs::File>) {
        self.retired.extend(old);
        while self.retired.len() > RETIRED_CAP {
            self.retired.pop_front();
        }
    }

    /// Saves latd's state ([`protocol::STATE_FILE`]): written aside,
    /// renamed in place. No fsync: the rename is atomic, and a power loss
    /// ends the builds too; a sync here could stall the loop for seconds.
    pub fn write_state(&self, text: &[u8]) -> io::Result<()> {
        fsutil::write_atomic(&self.via, protocol::STATE_FILE, text, 0o644, None, false)
    }

    /// Loads the state a latd before this one saved; a missing file is a
    /// fresh start, a corrupt one is kept aside (never silently
    /// overwritten) and a fresh start made.
    pub fn load_state(&self) -> Persisted {
        let path = self.at(protocol::STATE_FILE);
        match fsutil::read_capped(&path, 16 << 20).map(|(bytes, _, _)| bytes) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    let aside = path.with_extension("json.corrupt");
                    log::error!(
                        "{} is unreadable ({e}); moved to {} and starting afresh",
                        self.path(protocol::STATE_FILE).display(),
                        aside.display()
                    );
                    let _ = fs::rename(&path, aside);
                    Persisted::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => {
                log::error!(
                    "cannot read {}: {e}; starting afresh",
                    self.path(protocol::STATE_FILE).display()
                );
                Persisted::default()
            }
        }
    }

    /// What the serving latd's heartbeat file says (empty if unreadable).
    pub fn read_alive(&self) -> String {
        fsutil::read_capped(&self.at(protocol::ALIVE_FILE), 4096)
            .map(|(b, _, _)| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Removes the heartbeat file, as latd exits.
    pub fn remove_alive(&self) {
        let _ = fsutil::remove_if_present(&self.at(protocol::ALIVE_FILE));
    }

    /// Says, in [`lock::STANDBY_FILE`], what a latd that does not serve yet
    /// waits for; clients show it.
    pub fn write_standby(&self, text: &str) -> io::Result<()> {
        fsutil::write_atomic(
            &self.via,
            crate::lock::STANDBY_FILE,
            text.as_bytes(),
            0o644,
            None,
            false,
        )
    }

    /// Removes the standby file once latd serves (or gives up waiting).
    pub fn remove_standby(&self) {
        let _ = fsutil::remove_if_present(&self.at(crate::lock::STANDBY_FILE));
    }

    /// Lets go of the files replaced this tick; call after the replies.
    pub fn release_replaced(&mut self) {
        self.retired.clear();
    }

    /// Appends one line per request to the history, rotating it past
    /// [`HISTORY_CAP`] so it never grows without bound.
    pub fn record_history(&mut self, now_iso: &str, slot: &Slot, text: &str) {
        let path = self.at(protocol::HISTORY_FILE);
        let mut shown: String = text.chars().take(4096).collect();
        if shown.len() < text.len() {
            shown.push_str("...");
        }
        let line = format!("{now_iso} {slot} {}\n", serde_json::Value::String(shown));
        let size = *self
            .history_size
            .get_or_insert_with(|| fs::metadata(&path).map(|m| m.len()).unwrap_or(0));
        if size + line.len() as u64 > HISTORY_CAP {
            let _ = fs::rename(&path, self.at(&format!("{}.1", protocol::HISTORY_FILE)));
            self.history_size = Some(0);
        }
        let append =
            || fsutil::open_append(&path, 0o644).and_then(|mut f| f.write_all(line.as_bytes()));
        let appended = append().or_else(|e| {
            let regular = fs::symlink_metadata(&path).map_or(true, |m| m.is_file());
            if regular {
                return Err(e);
            }
            // Something other than a regular file took its place: replace it.
            log::warn!("{} was not a regular file; replacing it", path.display());
            fsutil::remove_if_present(&path)?;
            append()
        });
        match appended {
            Ok(()) => *self.history_size.get_or_insert(0) += line.len() as u64,
            Err(e) => {
                self.history_size = None;
                log::warn!("cannot append to {}: {e}", path.display());
            }
        }
    }
}

/// The start of a request as text, for the history line.
fn excerpt(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(HISTORY_EXCERPT * 4)];
    let text = String::from_utf8_lossy(head);
    let mut shown: String = text.chars().take(HISTORY_EXCERPT).collect();
    if shown.len() < bytes.len() {
        shown.push_str("...");
    }
    shown
}

/// Reads one request file. `done_name` is the marker that announced it.
fn read_request(path: &Path, name: &str, done_name: &str) -> (String, Result<RawRequest, Invalid>) {
    let path_before = fs::symlink_metadata(path).map(|m| m.ino());
    let read = fsutil::read_capped_checked(path, protocol::MAX_MESSAGE_BYTES);
    let (bytes, too_long, opened, stable) = match read {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return (
                String::new(),
                Err(Invalid::new(
                    None,
                    format!("{done_name} exists but {name} does not; write the request to {name} before creating {done_name}"),
                )),
            )
        }
        Err(e) => {
            return (
                String::new(),
                Err(Invalid::new(None, format!("cannot read {name}: {e}; it must be a regular, readable file"))),
            )
        }
    };
    let text = excerpt(&bytes);
    if too_long {
        return (
            text,
            Err(Invalid::new(
                None,
                format!(
                    "{name} is larger than {} bytes; a request is a small YAML mapping",
                    protocol::MAX_MESSAGE_BYTES
                ),
            )),
        );
    }
    // Rewritten while read: a second read through the descriptor gives
    // other bytes. Replaced (renamed over) while read: the name names
    // another inode before or after. Never a path's size or time: on NFS
    // or FUSE those may come from an attribute cache that contradicts the
    // file though nothing changed; an inode number is not cached apart.
    let path_after = fs::symlink_metadata(path).map(|m| m.ino());
    let same = stable
        && matches!((&path_before, &path_after), (Ok(b), Ok(a)) if *b == opened.ino() && *a == opened.ino());
    if !same {
        return (
            text,
            Err(Invalid::new(
                None,
                format!("{name} changed while it was being read; write it completely (ideally to a temporary name, then rename) before creating {done_name}"),
            )),
        );
    }
    let parsed = protocol::parse_request(&bytes);
    (text, parsed)
}
