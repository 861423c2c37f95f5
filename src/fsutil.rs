//! Small file-system helpers shared by the daemon and the client.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags, CWD};
use rustix::io::Errno;

/// `flags` as [`OpenOptionsExt::custom_flags`] takes them (all `O_*` flags
/// are positive `c_int`s, so the cast keeps the bits).
fn custom(flags: OFlags) -> i32 {
    flags.bits() as i32
}

/// Who should own the files the daemon creates in the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The owner of `dir`, if we run as root and it is someone else; `None`
    /// means "leave ownership alone".
    pub fn of_dir_when_root(dir: &Path) -> Option<Owner> {
        if euid() != 0 {
            return None;
        }
        let md = fs::metadata(dir).ok()?;
        (md.uid() != 0 || md.gid() != 0).then_some(Owner {
            uid: md.uid(),
            gid: md.gid(),
        })
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary name in the same directory, hidden (leading dot) so that
/// directory scans skip it.
pub fn temp_name(name: &str) -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{name}.{}.{n}.tmp", std::process::id())
}

/// Writes `dir/name` so that no reader ever sees it half written: a
/// temporary file in the same directory, then rename.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    data: &[u8],
    mode: u32,
    owner: Option<Owner>,
    sync: bool,
) -> io::Result<()> {
    write_atomic_then(dir, name, data, mode, |f| {
        if let Some(o) = owner {
            give_away(std::os::unix::fs::fchown(f, Some(o.uid), Some(o.gid)));
        }
        if sync {
            f.sync_all()?;
        }
        Ok(())
    })
}

/// [`write_atomic`] for a client's request: returns the file's mtime as
/// the filesystem stamped it (on NFS the server's clock: reading the
/// attributes of a written file flushes it first), a time to compare with
/// other files' on the same filesystem.
pub fn write_atomic_stamped(
    dir: &Path,
    name: &str,
    data: &[u8],
    mode: u32,
) -> io::Result<std::time::SystemTime> {
    write_atomic_then(dir, name, data, mode, |f| f.metadata()?.modified())
}

/// The temporary file written with `data` and given `mode`, then `last`
/// run on it before it is closed and renamed into place; removed if any
/// step fails.
fn write_atomic_then<T>(
    dir: &Path,
    name: &str,
    data: &[u8],
    mode: u32,
    last: impl FnOnce(&File) -> io::Result<T>,
) -> io::Result<T> {
    let tmp = dir.join(temp_name(name));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        // The mode must not depend on the umask of whoever started us.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        let out = last(&f)?;
        drop(f);
        fs::rename(&tmp, dir.join(name))?;
        Ok(out)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Like [`write_atomic`], but returns a handle on the file it replaced.
/// While the handle lives, the old file's blocks are not freed: the caller
/// can drop it after its reply is out, since freeing them may wait on the
/// disk (a synchronous discard on some mounts).
pub fn replace_atomic(
    dir: &Path,
    name: &str,
    data: &[u8],
    mode: u32,
    owner: Option<Owner>,
) -> io::Result<Option<File>> {
    let old = OpenOptions::new()
        .read(true)
        .custom_flags(custom(OFlags::NOFOLLOW | OFlags::NONBLOCK))
        .open(dir.join(name))
        .ok();
    write_atomic(dir, name, data, mode, owner, false)?;
    Ok(old)
}

/// Reads at most `cap` bytes of a regular file, without following a
/// symlink at the last component and without blocking on a FIFO.
/// Returns the bytes and whether the file was longer than `cap`.
pub fn read_capped(path: &Path, cap: u64) -> io::Result<(Vec<u8>, bool, fs::Metadata)> {
    let f = open_regular_read(path)?;
    let md = f.metadata()?;
    let mut buf = Vec::new();
    f.take(cap + 1).read_to_end(&mut buf)?;
    let too_long = buf.len() as u64 > cap;
    buf.truncate(cap as usize);
    Ok((buf, too_long, md))
}

/// Creates `dir` (and parents) if missing; a newly created directory gets
/// the owner of its parent when we run as root, so that the other side can
/// use it.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        ensure_dir(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    // Owner and mode are set through a descriptor of the directory just
    // made: a symlink swapped in by path cannot redirect them.
    let fd = open_dir_nofollow(dir)?;
    if let Some(owner) = dir.parent().and_then(Owner::of_dir_when_root) {
        give_away(std::os::unix::fs::fchown(
            &fd,
            Some(owner.uid),
            Some(owner.gid),
        ));
    }
    fd.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o775))?;
    Ok(())
}

/// Opens a directory, refusing a symlink in its place.
pub fn open_dir_nofollow(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(custom(OFlags::DIRECTORY | OFlags::NOFOLLOW))
        .open(dir)
}

fn cstr(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name has a NUL byte"))
}

/// Whether `e` is the system error `errno`.
fn is_errno(e: &io::Error, errno: Errno) -> bool {
    Errno::from_io_error(e) == Some(errno)
}

/// Opens `name` in the directory `dir` with `flags` (plus O_NOFOLLOW and
/// O_CLOEXEC), relative to the descriptor: no path is resolved again.
fn open_at(dir: &File, name: &std::ffi::OsStr, flags: OFlags, mode: u32) -> io::Result<File> {
    let c = cstr(name)?;
    let fd = rustix::fs::openat(
        dir,
        &c,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    Ok(File::from(fd))
}

/// Opens the directory `path`, which must lie below `base` (a trusted,
/// canonical directory), one component at a time without following any
/// symlink: a workdir a client swapped for a symlink after it was checked
/// cannot take the daemon elsewhere.
pub fn open_dir_beneath(base: &Path, path: &Path) -> io::Result<File> {
    let rel = path.strip_prefix(base).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not under {}", path.display(), base.display()),
        )
    })?;
    let mut dir = open_dir_nofollow(base)?;
    for comp in rel.components() {
        match comp {
            std::path::Component::Normal(name) => {
                dir = open_at(&dir, name, OFlags::RDONLY | OFlags::DIRECTORY, 0)?;
            }
            std::path::Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is not a plain path under {}",
                        path.display(),
                        base.display()
                    ),
                ))
            }
        }
    }
    Ok(dir)
}

/// The subdirectory `name` of `dir`, made (mode 0775, owned like `dir`)
/// if missing; a symlink in its place is refused.
pub fn ensure_subdir_at(dir: &File, name: &str) -> io::Result<File> {
    let c = cstr(std::ffi::OsStr::new(name))?;
    let made = rustix::fs::mkdirat(dir, &c, Mode::from_raw_mode(0o775)).is_ok();
    let sub = open_at(
        dir,
        std::ffi::OsStr::new(name),
        OFlags::RDONLY | OFlags::DIRECTORY,
        0,
    )
    .map_err(|e| {
        if is_errno(&e, Errno::LOOP) || is_errno(&e, Errno::NOTDIR) {
            io::Error::new(
                e.kind(),
                format!("{name} is not a directory (a symlink?); remove it"),
            )
        } else {
            e
        }
    })?;
    if made {
        let md = dir.metadata()?;
        if euid() == 0 {
            give_away(std::os::unix::fs::fchown(
                &sub,
                Some(md.uid()),
                Some(md.gid()),
            ));
        }
        sub.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o775))?;
    }
    Ok(sub)
}

/// Creates `name` in `dir` afresh (whatever was there is unlinked first),
/// never through a symlink.
pub fn create_fresh_at(dir: &File, name: &str, mode: u32) -> io::Result<File> {
    unlink_at(dir, name)?;
    open_at(
        dir,
        std::ffi::OsStr::new(name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        mode,
    )
}

/// Unlinks `name` in `dir`; already gone counts as done.
pub fn unlink_at(dir: &File, name: &str) -> io::Result<()> {
    let c = cstr(std::ffi::OsStr::new(name))?;
    match rustix::fs::unlinkat(dir, &c, AtFlags::empty()) {
        Err(e) if e != Errno::NOENT => Err(e.into()),
        _ => Ok(()),
    }
}

/// Renames `from` to `to`, both in `dir`.
pub fn rename_at(dir: &File, from: &str, to: &str) -> io::Result<()> {
    let (f, t) = (
        cstr(std::ffi::OsStr::new(from))?,
        cstr(std::ffi::OsStr::new(to))?,
    );
    Ok(rustix::fs::renameat(dir, &f, dir, &t)?)
}

/// Creates the FIFO `path` unless a FIFO is already there; says whether
/// it made one.
pub fn ensure_fifo(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_fifo() => return Ok(false),
        Ok(_) => fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    match rustix::fs::mkfifoat(CWD, &c, Mode::from_raw_mode(0o600)) {
        Err(e) if e != Errno::EXIST => Err(e.into()),
        _ => Ok(true),
    }
}

/// Opens the daemon's end of the wake-up FIFO: read-write (so it never
/// sees end-of-file), non-blocking, never through a symlink, and only if
/// it is a FIFO. Mode and owner are set through the descriptor, so anyone
/// who may write requests may poke the daemon, and nothing else changes.
pub fn open_fifo(path: &Path, owner: Option<Owner>) -> io::Result<File> {
    use std::os::unix::fs::FileTypeExt;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(custom(OFlags::NONBLOCK | OFlags::NOFOLLOW))
        .open(path)?;
    if !f.metadata()?.file_type().is_fifo() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a FIFO"));
    }
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o622))?;
    if let Some(o) = owner {
        give_away(std::os::unix::fs::fchown(&f, Some(o.uid), Some(o.gid)));
    }
    Ok(f)
}

static CHOWN_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ownership is a courtesy to the other side (the files are readable by
/// all anyway): a daemon without CAP_CHOWN still works, and says so once.
fn give_away(result: io::Result<()>) {
    if let Err(e) = result {
        if !CHOWN_WARNED.swap(true, Ordering::Relaxed) {
            log::warn!("cannot hand channel files to the channel's owner ({e}); they stay root's, readable by all");
        }
    }
}

/// Writes one byte to the daemon's wake-up FIFO, if someone reads it.
/// Best effort: the directory scan is the source of truth.
pub fn poke(fifo: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(mut f) = OpenOptions::new()
        .write(true)
        .custom_flags(custom(OFlags::NONBLOCK | OFlags::NOFOLLOW))
        .open(fifo)
    {
        if f.metadata().is_ok_and(|m| m.file_type().is_fifo()) {
            let _ = f.write(b"!");
        }
    }
}

/// Opens a regular file for appending, creating it with `mode`. Never
/// follows a symlink nor blocks on a FIFO: something other than a regular
/// file in its place is an error.
pub fn open_append(path: &Path, mode: u32) -> io::Result<File> {
    regular(
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode)
            .custom_flags(custom(OFlags::NOFOLLOW | OFlags::NONBLOCK))
            .open(path)?,
    )
}

/// Opens an existing regular file for writing, the same careful way.
pub fn open_existing_for_write(path: &Path) -> io::Result<File> {
    regular(
        OpenOptions::new()
            .write(true)
            .custom_flags(custom(OFlags::NOFOLLOW | OFlags::NONBLOCK))
            .open(path)?,
    )
}

/// Opens a regular file for reading, without following a symlink or
/// blocking on a FIFO.
pub fn open_regular_read(path: &Path) -> io::Result<File> {
    regular(
        OpenOptions::new()
            .read(true)
            .custom_flags(custom(OFlags::NOFOLLOW | OFlags::NONBLOCK))
            .open(path)?,
    )
}

/// Reads a whole regular file, refusing a FIFO (which would block) or a
/// symlink in its place.
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular_read(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// [`read_regular`] for a file another host may just have made (a log or
/// status file a reply names): on "no such file" it lists each directory
/// on the way down to it and tries once more. An NFS client trusts a
/// cached "no such file" (for a name, or a directory on the way) until the
/// directory's cached attributes expire; a fresh listing revalidates it.
pub fn read_regular_fresh(path: &Path) -> io::Result<Vec<u8>> {
    match read_regular(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            revalidate_dirs(path);
            read_regular(path)
        }
        other => other,
    }
}

/// Lists each directory on the way down to `path` (not `/`): on NFS this
/// revalidates the client's cached names, "no such file" included.
pub fn revalidate_dirs(path: &Path) {
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for d in dirs.into_iter().filter(|d| d.parent().is_some()) {
        let _ = fs::read_dir(d).map(|entries| entries.count());
    }
}

fn regular(f: File) -> io::Result<File> {
    if f.metadata()?.is_file() {
        Ok(f)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    }
}

/// Removes a file; a file that is already gone counts as removed.
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The name a symlink `name` in `dir` points to, read through the
/// descriptor.
pub fn read_link_at(dir: &File, name: &str) -> io::Result<std::ffi::OsString> {
    use std::os::unix::ffi::OsStringExt;
    let c = cstr(std::ffi::OsStr::new(name))?;
    // Up to 4096 bytes, as a link's target can have (PATH_MAX).
    let target = rustix::fs::readlinkat(dir, &c, Vec::with_capacity(4096))?;
    Ok(std::ffi::OsString::from_vec(target.into_bytes()))
}

/// Opens the SDK's log `name` (`log.appsdk`) in the log directory `dir`.
/// The real SDK makes it a relative symlink to `log.appsdk_<secs>` in the
/// same directory; that one step is followed, and nothing else: a symlink
/// to any other place, a FIFO or a directory is refused, so a client who
/// owns the workspace cannot point root at another file. Returns the file
/// and the name of the file opened.
pub fn open_log_at(dir: &File, name: &str) -> io::Result<(File, String)> {
    let open = |n: &str| {
        open_at(
            dir,
            std::ffi::OsStr::new(n),
            OFlags::RDONLY | OFlags::NONBLOCK,
            0,
        )
        .and_then(regular)
    };
    match open(name) {
        Err(e) if is_errno(&e, Errno::LOOP) => {
            let target = read_link_at(dir, name)?;
            let target = target.to_str().filter(|t| plain_name(t)).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{name} is a symlink to {}, not to a file beside it; refused",
                        Path::new(&target).display()
                    ),
                )
            })?;
            Ok((open(target)?, target.to_string()))
        }
        other => other.map(|f| (f, name.to_string())),
    }
}

/// A file name with no directory part (and not `.` or `..`).
fn plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

/// [`open_log_at`] by path: `log` is `<workdir>/log/log.appsdk`. Returns
/// the file and the path of the file opened.
pub fn open_log(log: &Path) -> io::Result<(File, std::path::PathBuf)> {
    let (Some(dir), Some(name)) = (log.parent(), log.file_name().and_then(|n| n.to_str())) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(custom(OFlags::DIRECTORY))
        .open(dir)?;
    let (f, opened) = open_log_at(&d, name)?;
    Ok((f, dir.join(opened)))
}

/// Opens the regular file `name` in `dir` for reading, never through a
/// symlink and never blocking on a FIFO.
pub fn open_regular_at(dir: &File, name: &std::ffi::OsStr) -> io::Result<File> {
    open_at(dir, name, OFlags::RDONLY | OFlags::NONBLOCK, 0).and_then(regular)
}

/// Gives `sub` the owner of `dir` (through the descriptor), when we run as
/// root and they differ. Best effort, like every ownership here.
pub fn own_like(sub: &File, dir: &File) {
    let (Ok(s), Ok(d)) = (sub.metadata(), dir.metadata()) else {
        return;
    };
    if euid() == 0 && (s.uid(), s.gid()) != (d.uid(), d.gid()) {
        give_away(std::os::unix::fs::fchown(sub, Some(d.uid()), Some(d.gid())));
    }
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// A path that reaches `name` in the directory held open as `dir`, without
/// resolving the directory's own path again.
fn via_fd(dir: &File, name: &str) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

/// The names in the directory held open as `dir` (unreadable ones left
/// out; names that are not UTF-8 too: none of ours is).
pub fn dir_entries(dir: &File) -> Vec<String> {
    fs::read_dir(via_fd(dir, ""))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The attributes of `name` in `dir`, not following a symlink.
pub fn lstat_at(dir: &File, name: &str) -> io::Result<fs::Metadata> {
    fs::symlink_metadata(via_fd(dir, name))
}

/// Reads at most `cap` bytes of a regular file (true if it was longer),
/// with the descriptor's metadata as it was opened, and whether a second
/// read through the same descriptor gave the same bytes (false: the file
/// was being rewritten meanwhile). Content is compared, not attributes: on
/// NFS or FUSE attributes may come from a cache and change between two
/// looks though the file did not (FUSE refreshes a cached size once a read
/// reaches past it).
pub fn read_capped_checked(
    path: &Path,
    cap: u64,
) -> io::Result<(Vec<u8>, bool, fs::Metadata, bool)> {
    use std::os::unix::fs::FileExt;
    refresh_attributes(path);
    let mut f = open_regular_read(path)?;
    let md = f.metadata()?;
    let mut buf = Vec::new();
    (&mut f).take(cap + 1).read_to_end(&mut buf)?;
    let mut again = vec![0u8; buf.len() + 1];
    let mut n = 0;
    while n < again.len() {
        match f.read_at(&mut again[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    let stable = again[..n] == buf[..];
    let too_long = buf.len() as u64 > cap;
    buf.truncate(cap as usize);
    Ok((buf, too_long, md, stable))
}

/// Asks the filesystem for `path`'s attributes afresh (`statx` with
/// `AT_STATX_FORCE_SYNC`), so that a file another host rewrote in place is
/// read to its new end: a FUSE mount bounds reads by the size in its
/// attribute cache, and NFS's close-to-open does not apply to every FUSE
/// filesystem. Best effort (an older kernel just ignores the flag).
pub fn refresh_attributes(path: &Path) {
    // The system call itself (not the C library's wrapper, which an older
    // one lacks). A path with a NUL byte is not asked about at all.
    let _ = rustix::fs::statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::STATX_FORCE_SYNC,
        StatxFlags::BASIC_STATS,
    );
}

/// A file that is rewritten in place: one inode for as long as it stays
/// in its place, held open for writing.
///
/// For files that clients on other NFS hosts read by name (`status.lat`,
/// `s-2-c.msg`, `latd.alive`). A file replaced by a rename is a new inode:
/// a client that cached the old name's file handle, or holds a read
/// delegation on it (two mounts through one NFS client share delegations,
/// and the server does not recall a client's own), opens a file that no
/// longer exists and gets "Stale file handle". One inode, rewritten, stays
/// valid in every cache; and while latd holds it open for writing the
/// server grants no read delegation on it, so every reader's open
/// revalidates it (close-to-open) and reads what was last written.
///
/// A write never shrinks the file: shorter content is padded with spaces
/// on a last line, so a reader never sees the new beginning followed by
/// the end of the old content. The file is created (and re-created when
/// something else took its place) by writing a temporary file and renaming
/// it into place, so a symlink or hard link planted there is never written
/// through.
#[derive(Debug, Default)]
pub struct InPlace {
    held: Option<(File, u64, u64)>,
}

impl InPlace {
    /// Writes `data` as `dir/name`. `flush`: push it to the server before
    /// returning (a network filesystem: other hosts read it next).
    pub fn write(
        &mut self,
        dir: &Path,
        name: &str,
        data: &[u8],
        mode: u32,
        owner: Option<Owner>,
        flush: bool,
    ) -> io::Result<()> {
        if let Some((f, dev, ino)) = &self.held {
            let still = fs::symlink_metadata(dir.join(name))
                .is_ok_and(|m| m.dev() == *dev && m.ino() == *ino && m.is_file());
            if still {
                return write_over(f, data, flush);
            }
            self.held = None;
        }
        let tmp = dir.join(temp_name(name));
        let made = (|| {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(custom(OFlags::NOFOLLOW))
                .open(&tmp)?;
            f.write_all(data)?;
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            if let Some(o) = owner {
                give_away(std::os::unix::fs::fchown(&f, Some(o.uid), Some(o.gid)));
            }
            if flush {
                f.sync_data()?;
            }
            fs::rename(&tmp, dir.join(name))?;
            let md = f.metadata()?;
            Ok((f, md.dev(), md.ino()))
        })();
        match made {
            Ok(h) => {
                self.held = Some(h);
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Forgets the file (the directory it was in is no longer served).
    pub fn forget(&mut self) {
        self.held = None;
    }
}

/// Rewrites `f` from its start with `data`, padded to the file's length.
fn write_over(f: &File, data: &[u8], flush: bool) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata()?.len() as usize;
    let mut buf = data.to_vec();
    if buf.len() < len {
        buf.resize(len - 1, b' ');
        buf.push(b'\n');
    }
    f.write_all_at(&buf, 0)?;
    if flush {
        f.sync_data()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, FileTypeExt, PermissionsExt};
    use std::path::PathBuf;

    /// A fresh directory under the system's temporary directory, removed
    /// on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("latd-fsutil-{tag}-{}-{n}", std::process::id()));
            fs::create_dir_all(&p).unwrap();
            TempDir(p.canonicalize().unwrap())
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn os_error(e: &io::Error) -> Option<Errno> {
        Errno::from_io_error(e)
    }

    /// Each component is opened without following a symlink: a directory
    /// of the path swapped for a symlink to elsewhere is refused.
    #[test]
    fn open_dir_beneath_follows_no_symlink_on_the_way() {
        let d = TempDir::new("beneath");
        let base = d.path();
        fs::create_dir_all(base.join("outside/inner")).unwrap();
        fs::create_dir_all(base.join("ws/a/b")).unwrap();
        symlink(base.join("outside"), base.join("ws/link")).unwrap();

        let b = open_dir_beneath(base, &base.join("ws/a/./b")).unwrap();
        assert_eq!(
            b.metadata().unwrap().ino(),
            fs::metadata(base.join("ws/a/b")).unwrap().ino()
        );
        let e = open_dir_beneath(base, &base.join("ws/link/inner")).unwrap_err();
        assert!(
            matches!(os_error(&e), Some(Errno::LOOP | Errno::NOTDIR)),
            "{e}"
        );
        let e = open_dir_beneath(base, &base.join("ws/missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = open_dir_beneath(&base.join("ws"), &base.join("outside")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = open_dir_beneath(base, &base.join("ws/a/../../outside")).unwrap_err();
        assert!(e.to_string().contains("is not a plain path under"), "{e}");
        // The base itself may not be a symlink either.
        let e = open_dir_beneath(&base.join("ws/link"), &base.join("ws/link/inner")).unwrap_err();
        assert!(
            matches!(os_error(&e), Some(Errno::LOOP | Errno::NOTDIR)),
            "{e}"
        );
    }

    #[test]
    fn ensure_subdir_at_makes_it_0775_and_refuses_a_symlink() {
        let d = TempDir::new("subdir");
        let dir = open_dir_nofollow(d.path()).unwrap();
        let sub = ensure_subdir_at(&dir, "log").unwrap();
        let md = sub.metadata().unwrap();
        assert!(md.is_dir());
        assert_eq!(md.permissions().mode() & 0o7777, 0o775);
        // Already there: opened as it is.
        fs::set_permissions(d.path().join("log"), fs::Permissions::from_mode(0o700)).unwrap();
        let again = ensure_subdir_at(&dir, "log").unwrap();
        assert_eq!(again.metadata().unwrap().ino(), md.ino());
        assert_eq!(
            again.metadata().unwrap().permissions().mode() & 0o7777,
            0o700
        );

        fs::create_dir(d.path().join("elsewhere")).unwrap();
        symlink(d.path().join("elsewhere"), d.path().join("out")).unwrap();
        let e = ensure_subdir_at(&dir, "out").unwrap_err();
        assert_eq!(
            e.to_string(),
            "out is not a directory (a symlink?); remove it"
        );
        fs::write(d.path().join("file"), "x").unwrap();
        let e = ensure_subdir_at(&dir, "file").unwrap_err();
        assert_eq!(
            e.to_string(),
            "file is not a directory (a symlink?); remove it"
        );

        // As root, a new one gets the owner of the directory it is in.
        if euid() == 0 {
            let theirs = d.path().join("theirs");
            fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let parent = open_dir_nofollow(&theirs).unwrap();
            let sub = ensure_subdir_at(&parent, "log")
                .unwrap()
                .metadata()
                .unwrap();
            assert_eq!((sub.uid(), sub.gid()), (65534, 65534));
            assert_eq!(
                Owner::of_dir_when_root(&theirs),
                Some(Owner {
                    uid: 65534,
                    gid: 65534
                })
            );
        }
    }

    /// What was at the name is replaced, never written through: a symlink
    /// there is unlinked and its target keeps its content.
    #[test]
    fn create_fresh_at_never_writes_through_a_symlink() {
        let d = TempDir::new("fresh");
        let target = d.path().join("precious");
        fs::write(&target, "keep").unwrap();
        symlink(&target, d.path().join("out.msg")).unwrap();
        let dir = open_dir_nofollow(d.path()).unwrap();
        let mut f = create_fresh_at(&dir, "out.msg", 0o640).unwrap();
        f.write_all(b"new").unwrap();
        drop(f);
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        let md = fs::symlink_metadata(d.path().join("out.msg")).unwrap();
        assert!(md.is_file());
        assert_eq!(fs::read_to_string(d.path().join("out.msg")).unwrap(), "new");
        // The mode asked for, less the umask (never more).
        assert_eq!(md.permissions().mode() & !0o640 & 0o7777, 0);
        // And the descriptor is not inherited by programs we start.
        let f = create_fresh_at(&dir, "out.msg", 0o640).unwrap();
        let fl = rustix::io::fcntl_getfd(&f).unwrap();
        assert!(fl.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn unlink_rename_and_read_link_at_work_through_the_descriptor() {
        let d = TempDir::new("at");
        let dir = open_dir_nofollow(d.path()).unwrap();
        fs::write(d.path().join("a"), "x").unwrap();
        rename_at(&dir, "a", "b").unwrap();
        assert!(d.path().join("b").exists() && !d.path().join("a").exists());
        let e = rename_at(&dir, "a", "c").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);

        unlink_at(&dir, "b").unwrap();
        assert!(!d.path().join("b").exists());
        // Already gone is done; a directory is not unlinked.
        unlink_at(&dir, "b").unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        let e = unlink_at(&dir, "sub").unwrap_err();
        assert_eq!(os_error(&e), Some(Errno::ISDIR));

        symlink("log.appsdk_1700000000", d.path().join("log.appsdk")).unwrap();
        assert_eq!(
            read_link_at(&dir, "log.appsdk").unwrap(),
            "log.appsdk_1700000000"
        );
        let long = "x".repeat(4000);
        symlink(&long, d.path().join("long")).unwrap();
        assert_eq!(read_link_at(&dir, "long").unwrap(), long.as_str());
        let e = read_link_at(&dir, "sub").unwrap_err();
        assert_eq!(os_error(&e), Some(Errno::INVAL));

        // A NUL byte in a name is refused before any system call.
        for e in [
            unlink_at(&dir, "a\0b").unwrap_err(),
            rename_at(&dir, "b", "a\0b").unwrap_err(),
            read_link_at(&dir, "a\0b").unwrap_err(),
            ensure_subdir_at(&dir, "a\0b").unwrap_err(),
            create_fresh_at(&dir, "a\0b", 0o600).unwrap_err(),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(e.to_string(), "name has a NUL byte");
        }
    }

    /// The SDK's symlink to a file beside it is followed, that one step;
    /// a symlink elsewhere and a FIFO are refused (without blocking).
    #[test]
    fn open_log_at_follows_one_symlink_beside_it_only() {
        let d = TempDir::new("log");
        let dir = open_dir_nofollow(d.path()).unwrap();
        fs::write(d.path().join("log.appsdk_1"), "line\n").unwrap();
        symlink("log.appsdk_1", d.path().join("log.appsdk")).unwrap();
        let (mut f, name) = open_log_at(&dir, "log.appsdk").unwrap();
        assert_eq!(name, "log.appsdk_1");
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        assert_eq!(text, "line\n");
        let (_, path) = open_log(&d.path().join("log.appsdk")).unwrap();
        assert_eq!(path, d.path().join("log.appsdk_1"));

        fs::write(d.path().join("secret"), "x").unwrap();
        for (link, to) in [
            ("abs", d.path().join("secret")),
            ("up", PathBuf::from("../secret")),
            ("sub", PathBuf::from("sub/secret")),
        ] {
            symlink(&to, d.path().join(link)).unwrap();
            let e = open_log_at(&dir, link).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{link}");
            assert!(e.to_string().ends_with("not to a file beside it; refused"));
        }
        // Two steps: the second symlink is not followed.
        symlink("log.appsdk", d.path().join("twice")).unwrap();
        let e = open_log_at(&dir, "twice").unwrap_err();
        assert_eq!(os_error(&e), Some(Errno::LOOP));

        assert!(ensure_fifo(&d.path().join("fifo")).unwrap());
        let e = open_log_at(&dir, "fifo").unwrap_err();
        assert_eq!(e.to_string(), "not a regular file");
        let e = open_regular_at(&dir, std::ffi::OsStr::new("fifo")).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file");
    }

    #[test]
    fn ensure_fifo_makes_one_once_and_replaces_a_file() {
        let d = TempDir::new("fifo");
        let p = d.path().join("wake");
        fs::write(&p, "x").unwrap();
        assert!(ensure_fifo(&p).unwrap());
        let md = fs::symlink_metadata(&p).unwrap();
        assert!(md.file_type().is_fifo());
        assert_eq!(md.permissions().mode() & !0o600 & 0o7777, 0);
        assert!(!ensure_fifo(&p).unwrap());
        let f = open_fifo(&p, None).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o7777, 0o622);
        poke(&p);

        let e = ensure_fifo(&d.path().join("a\0b")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = ensure_fifo(&d.path().join("missing/wake")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn euid_and_attribute_refresh() {
        let d = TempDir::new("owner");
        // A file we make is owned by our effective user.
        assert_eq!(euid(), d.path().metadata().unwrap().uid());
        // Ours, whether root or not: nobody else to hand files to.
        assert_eq!(Owner::of_dir_when_root(d.path()), None);
        // Best effort, whatever the path.
        fs::write(d.path().join("f"), "x").unwrap();
        refresh_attributes(&d.path().join("f"));
        refresh_attributes(&d.path().join("missing"));
        refresh_attributes(Path::new("a\0b"));
    }
}
