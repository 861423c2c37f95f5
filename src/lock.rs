//! Who serves a channel: `latd.lock`.
//!
//! The serving latd holds an open-file-description (OFD) **write** lock on
//! `latd.lock` in the channel, a regular file owned by latd and writable
//! only by it. Clients may read it (and latc does, to learn at once whether
//! a daemon holds the channel), so anyone may open it read-only; but a
//! read-only descriptor can only take a *read* lock (or a `flock`, which
//! does not meet OFD locks on Linux; on NFS it becomes a read lock). So:
//!
//! - a write lock on our own file is held by someone who can open it for
//!   writing, i.e. another latd: this one waits as a standby;
//! - a read lock, or a file that is not latd's own (a symlink, a FIFO, a
//!   directory, a client's file), was planted: it is set aside and a fresh
//!   file takes its place, so a client cannot stop the daemon from starting;
//! - after taking the lock, the name must still be the file locked (else
//!   another latd replaced it meanwhile, and the attempt starts again), so
//!   two latds never both hold the channel.
//!
//! [`probe`] is the client's side: a lock test that takes nothing.

use crate::protocol;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustix::fs::OFlags;
use rustix::io::Errno;

/// Our addition: written by a latd that waits for the lock (a standby, or
/// one whose filesystem does not grant it yet), so clients can say why no
/// daemon answers. Removed when it takes the lock.
pub const STANDBY_FILE: &str = "latd.standby";

/// A lock held on the channel: the descriptor, and what the name named.
#[derive(Debug)]
pub struct ChannelLock {
    /// Holds the lock while it is open.
    _file: File,
    dev: u64,
    ino: u64,
    uid: u32,
}

/// The outcome of one attempt to take the lock.
#[derive(Debug)]
pub enum Attempt {
    Taken(ChannelLock),
    /// Another latd holds it.
    HeldByDaemon,
}

/// What a lock test says about the channel (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A daemon holds the channel's lock.
    Held,
    /// Nobody holds it: no daemon serves the channel.
    Free,
    /// The test cannot tell (no lock file, a planted read lock, or a
    /// filesystem whose locks are not known to be reliable, e.g. NFS).
    Unknown,
}

/// How a lock test finds the file (what `F_OFD_GETLK` leaves in `l_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// A write lock would be stopped by a write lock: another latd's.
    Writer,
    /// ... by a read lock: planted by a client.
    Reader,
    /// Nothing would stop it.
    Nobody,
}

/// `fcntl(f, cmd, whole file of kind)` for an open-file-description lock
/// command (`F_OFD_GETLK`, `F_OFD_SETLK`); returns the `l_type` the kernel
/// leaves in the struct.
///
/// The one system call here without a safe wrapper: std's
/// `File::try_lock` is `flock(2)`, which on a local Linux filesystem does
/// not meet `fcntl` locks at all (so the latc probes already deployed,
/// which test with `F_OFD_GETLK`, would find a daemon's lock free) and
/// cannot say whether a conflicting lock is a read or a write lock (which
/// is how a planted lock is told from another latd). rustix's
/// `fcntl_lock`/`fcntl_getlk` are `F_SETLK`/`F_GETLK`: locks owned by the
/// process, not the descriptor, so closing any descriptor of the file in
/// latd drops them, and a process never conflicts with itself; and its
/// `fcntl_getlk` debug-asserts on the `l_pid` of -1 that Linux reports for
/// an OFD lock. rustix 1.x has no OFD lock call.
fn ofd_fcntl(f: &File, cmd: libc::c_int, kind: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: flock is plain data, for which all-zero is a valid value;
    // `f` keeps the descriptor open for the call, and these two commands
    // only read and write the one struct they are given.
    let (r, fl) = unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        (libc::fcntl(f.as_raw_fd(), cmd, &mut fl), fl)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type.into())
}

/// Which kind of lock would stop a write lock on `f`, if any. Takes
/// nothing.
fn conflicting(f: &File) -> io::Result<Holder> {
    match ofd_fcntl(f, libc::F_OFD_GETLK, libc::F_WRLCK)? {
        libc::F_WRLCK => Ok(Holder::Writer),
        libc::F_RDLCK => Ok(Holder::Reader),
        libc::F_UNLCK => Ok(Holder::Nobody),
        other => Err(io::Error::other(format!(
            "F_OFD_GETLK reported lock type {other}"
        ))),
    }
}

/// Takes a write lock on `f` without waiting; `Ok(false)` if another holds
/// a conflicting one.
fn try_write_lock(f: &File) -> io::Result<bool> {
    match ofd_fcntl(f, libc::F_OFD_SETLK, libc::F_WRLCK) {
        Ok(_) => Ok(true),
        Err(e) => match Errno::from_io_error(&e) {
            Some(Errno::AGAIN | Errno::ACCESS) => Ok(false),
            _ => Err(e),
        },
    }
}

/// How the lock file is opened: never through a symlink, and never
/// waiting on a FIFO planted at its name.
const OPEN_FLAGS: i32 = (OFlags::NOFOLLOW.bits() | OFlags::NONBLOCK.bits()) as i32;

/// The uid that files latd creates in `dir` get (root squashed to nobody on
/// some NFS exports): a file with another owner is not latd's own.
pub fn own_uid(dir: &Path) -> u32 {
    let tmp = dir.join(crate::fsutil::temp_name(protocol::LOCK_FILE));
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|f| f.metadata());
    let _ = fs::remove_file(&tmp);
    match made {
        Ok(md) => md.uid(),
        Err(_) => rustix::process::geteuid().as_raw(),
    }
}

/// Why the file at the lock's name is not latd's own, if it is not.
fn not_own(md: &fs::Metadata, uid: u32) -> Option<String> {
    let ft = md.file_type();
    if !ft.is_file() {
        return Some(describe(&ft).to_string());
    }
    if md.uid() != uid {
        return Some(format!("a file owned by uid {}, not latd's", md.uid()));
    }
    if md.mode() & 0o022 != 0 {
        return Some(format!(
            "a file others may write (mode {:o})",
            md.mode() & 0o7777
        ));
    }
    if md.nlink() != 1 {
        return Some(format!("a file with {} links", md.nlink()));
    }
    None
}

fn describe(ft: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        "a symlink"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}

/// Moves whatever is at the lock's name out of the way: a directory to a
/// hidden name (removed if empty), anything else unlinked.
fn set_aside(dir: &Path, why: &str) -> io::Result<()> {
    let path = dir.join(protocol::LOCK_FILE);
    let md = match fs::symlink_metadata(&path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if md.is_dir() {
        let aside = format!(
            ".{}.{}.{}.planted",
            protocol::LOCK_FILE,
            std::process::id(),
            md.ino()
        );
        fs::rename(&path, dir.join(&aside))?;
        let _ = fs::remove_dir(dir.join(&aside));
        log::warn!(
            "{} was not latd's lock ({why}); moved it to {aside} and made a fresh one",
            protocol::LOCK_FILE
        );
    } else {
        crate::fsutil::remove_if_present(&path)?;
        log::warn!(
            "{} was not latd's lock ({why}); replaced it with a fresh one",
            protocol::LOCK_FILE
        );
    }
    Ok(())
}

fn same_file(dir: &Path, lock: &ChannelLock) -> bool {
    fs::symlink_metadata(dir.join(protocol::LOCK_FILE))
        .is_ok_and(|md| md.dev() == lock.dev && md.ino() == lock.ino)
}

/// One attempt to take the lock of the channel held at `dir` (a path that
/// reaches the held channel directory). Planted files and read locks are
/// set aside on the way; only another latd's write lock makes it wait.
/// `uid`: what [`own_uid`] says.
pub fn try_take(dir: &Path, uid: u32) -> io::Result<Attempt> {
    let path = dir.join(protocol::LOCK_FILE);
    let mut last_err = None;
    for _ in 0..20 {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(OPEN_FLAGS)
            .open(&path);
        let f = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .custom_flags(OPEN_FLAGS)
                    .open(&path)
                {
                    Ok(f) => {
                        // Readable by all (for latc's test), whatever the umask.
                        f.set_permissions(fs::Permissions::from_mode(0o644))?;
                        f
                    }
                    // Made by another latd just now: look at it again.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => {
                // A symlink (ELOOP), a directory (EISDIR), a socket, or a
                // file we may not open: not ours.
                let why = fs::symlink_metadata(&path)
                    .map(|md| not_own(&md, uid).unwrap_or_else(|| e.to_string()))
                    .unwrap_or_else(|_| e.to_string());
                set_aside(dir, &why)?;
                last_err = Some(e);
                continue;
            }
        };
        let md = f.metadata()?;
        if let Some(why) = not_own(&md, uid) {
            drop(f);
            set_aside(dir, &why)?;
            continue;
        }
        if !try_write_lock(&f)? {
            match conflicting(&f)? {
                Holder::Writer => return Ok(Attempt::HeldByDaemon),
                Holder::Reader => {
                    drop(f);
                    set_aside(dir, "a client holds a lock on it")?;
                }
                // Released meanwhile: try again.
                Holder::Nobody => {}
            }
            continue;
        }
        let lock = ChannelLock {
            dev: md.dev(),
            ino: md.ino(),
            uid,
            _file: f,
        };
        // Another latd may have replaced the file between our open and our
        // lock (it found a planted lock on it): then ours is not the lock.
        if same_file(dir, &lock) {
            return Ok(Attempt::Taken(lock));
        }
    }
    Err(last_err.unwrap_or_else(|| {
        io::Error::other(format!("{} keeps changing under latd", path.display()))
    }))
}

impl ChannelLock {
    /// Checks that the lock's name in `dir` still names the file held (a
    /// client may remove or replace it, and latc would then think no
    /// daemon serves); if not, takes a fresh one. Returns an error only
    /// when another latd holds the channel's lock now.
    pub fn keep(&mut self, dir: &Path) -> Result<(), String> {
        if same_file(dir, self) {
            return Ok(());
        }
        log::warn!(
            "{} was removed or replaced; taking a fresh one",
            protocol::LOCK_FILE
        );
        match try_take(dir, self.uid) {
            Ok(Attempt::Taken(fresh)) => {
                *self = fresh;
                Ok(())
            }
            Ok(Attempt::HeldByDaemon) => Err(format!(
                "another latd holds {} now: two daemons may be serving this channel",
                protocol::LOCK_FILE
            )),
            Err(e) => Err(format!("cannot take {}: {e}", protocol::LOCK_FILE)),
        }
    }
}

/// Is the channel's directory on a filesystem whose locks one kernel keeps
/// (so that "nobody holds it" is the truth)? NFS and FUSE are not trusted.
fn locks_reliable(f: &File) -> bool {
    crate::channel::is_local_fs(f)
}

/// A lock test that takes nothing: does a daemon hold `channel`'s lock?
/// Only a local filesystem's answer "nobody" is believed; elsewhere, and
/// whenever in doubt, the answer is [`Probe::Unknown`] (then the heartbeat
/// decides).
pub fn probe(channel: &Path) -> Probe {
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(OPEN_FLAGS)
        .open(channel.join(protocol::LOCK_FILE))
    else {
        return Probe::Unknown;
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) || !locks_reliable(&f) {
        return Probe::Unknown;
    }
    match conflicting(&f) {
        Ok(Holder::Writer) => Probe::Held,
        Ok(Holder::Nobody) => Probe::Free,
        Ok(Holder::Reader) | Err(_) => Probe::Unknown,
    }
}

/// What a waiting latd wrote in [`STANDBY_FILE`], as one sentence, if it
/// is there and was refreshed lately.
pub fn standby_note(channel: &Path) -> Option<String> {
    let path = channel.join(STANDBY_FILE);
    let f = crate::fsutil::open_regular_read(&path).ok()?;
    let age = f
        .metadata()
        .ok()?
        .modified()
        .ok()
        .and_then(|m| std::time::SystemTime::now().duration_since(m).ok())
        .unwrap_or_default();
    if age > STANDBY_STALE {
        return None;
    }
    let mut text = String::new();
    use std::io::Read;
    f.take(4096).read_to_string(&mut text).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    };
    let waiting = field("waiting_for")?;
    Some(match field("pid") {
        Some(pid) => format!("latd (pid {pid}) is waiting for {waiting}"),
        None => format!("latd is waiting for {waiting}"),
    })
}

/// A standby file not refreshed for this long was left by a latd that died.
pub const STANDBY_STALE: std::time::Duration = std::time::Duration::from_secs(10);
