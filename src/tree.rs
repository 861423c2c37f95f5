//! Removing a build output tree that an unprivileged user can write to,
//! from a daemon that runs as root.
//!
//! A path-based, recursive `rm -rf` has three problems there: a deep tree
//! overflows the stack, each level keeps a directory open (deep trees run
//! out of file descriptors), and between "this is a directory" and "open
//! it" the directory can be swapped for a symlink, so that root empties
//! whatever the symlink points to. Neither may it empty a file system
//! mounted below the tree (a mount left behind by a killed build).
//!
//! [`remove_tree`] therefore never resolves a path below `root` again once
//! it started: it holds one descriptor, for the directory it is emptying,
//! and works only relative to it.
//!
//! - Going down, it opens one name at a time relative to that descriptor,
//!   with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`
//!   where the kernel has it, and `openat(O_NOFOLLOW)` otherwise. Either
//!   way a symlink is never followed (it is unlinked instead), and the
//!   opened directory must have its parent's device and mount id: a mount
//!   point, including a bind mount of the same file system, is an error
//!   naming it, and nothing in it is touched.
//! - Going up, it opens `..` and checks that it is the very directory
//!   (device and inode) it came down from. If something moved the tree
//!   meanwhile, it starts over from the top, a bounded number of times.
//! - Each directory is listed once into memory; files, symlinks and other
//!   non-directories are unlinked right away, subdirectories are visited
//!   depth first from an explicit stack, and a directory is removed after
//!   its content. Memory grows with the depth of the tree and the number
//!   of entries in its directories, never the stack of the thread, and at
//!   most three descriptors are open at any time.
//!
//! Everything it unlinks or removes is a name inside a directory that it
//! reached from `root` without following a symlink or crossing a mount, so
//! no race can make it remove something outside the tree. (On kernels
//! without `statx` mount ids, i.e. before Linux 5.8, a bind mount of the
//! same file system can only be told apart by `openat2`, available since
//! Linux 5.6.)

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Stat, StatxFlags};
use rustix::io::Errno;

/// How many times a removal starts over or revisits a directory because
/// something else changed the tree meanwhile, before it gives up.
const RETRIES: u32 = 16;

/// Set once `openat2` turned out to be missing or forbidden (old kernel,
/// seccomp): from then on only the portable `openat` is used.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Set once `statx` turned out to be missing: mount ids are then unknown.
static NO_STATX: AtomicBool = AtomicBool::new(false);

/// Removes `root` and everything below it. Never follows a symlink (a
/// symlink is removed, not its target), never crosses into another file
/// system (a mount point below `root` is an error naming it: "<path> is a
/// mount point (left by a build?); unmount it, then clean again"), uses
/// O(1) file descriptors and no recursion (any depth). A missing `root` is
/// Ok. Errors name the path and what to do, e.g. "cannot remove <path>:
/// Permission denied (os error 13)".
///
/// The parent of `root` is trusted (resolved as a normal path); `root`
/// itself may be a symlink (then just that is removed) or a file.
pub fn remove_tree(root: &Path) -> Result<(), String> {
    remove_tree_with(root, Resolve::Auto, None)
}

/// [`remove_tree`] for a `root` below the trusted directory `base`: the
/// parent of `root` is reached from `base` without following a symlink, so
/// a client that swaps a directory of the path for a symlink after it was
/// checked cannot point the removal outside `base`.
pub fn remove_tree_beneath(base: &Path, root: &Path) -> Result<(), String> {
    remove_tree_with(root, Resolve::Auto, Some(base))
}

/// How to open a directory one level down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolve {
    /// `openat2` if the kernel allows it, else `openat`.
    Auto,
    /// `openat` only (what old kernels get; tested on its own).
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

fn remove_tree_with(root: &Path, resolve: Resolve, base: Option<&Path>) -> Result<(), String> {
    let Some(name) = root.file_name() else {
        return Err(format!(
            "cannot remove {}: it does not name a directory entry; give the path of the tree itself",
            root.display()
        ));
    };
    let name = c_name(name)
        .ok_or_else(|| format!("cannot remove {}: the name has a NUL byte", root.display()))?;
    let parent = match root.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let opened = match base {
        Some(b) => crate::fsutil::open_dir_beneath(b, parent).map(OwnedFd::from),
        None => open_path(parent).map_err(io::Error::from),
    };
    let base = match opened {
        Ok(fd) => fd,
        Err(e) if Errno::from_io_error(&e) == Some(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(format!("cannot open directory {}: {e}", parent.display())),
    };
    let base_id =
        identify(&base).map_err(|e| format!("cannot inspect {}: {e}", parent.display()))?;
    let mut walk = Walk {
        root,
        resolve,
        retries: 0,
    };
    loop {
        match walk.attempt(&base, &base_id, &name) {
            Ok(()) => return Ok(()),
            Err(Stop::Fail(msg)) => return Err(msg),
            Err(Stop::Again(msg)) => walk.retry(msg)?,
        }
    }
}

/// Why a walk stopped early.
#[derive(Debug)]
enum Stop {
    /// An error to report as is.
    Fail(String),
    /// The tree changed under us: start over (the message is the error if
    /// that happens too often).
    Again(String),
}

/// What opening a directory one level down found.
enum Open {
    Dir(OwnedFd, Id),
    /// The name is gone (someone else removed it).
    Gone,
    /// The name is not a directory (any more): unlink it instead.
    NotDir,
}

/// Identity of an open directory.
#[derive(Debug, Clone, Copy)]
struct Id {
    dev: u64,
    ino: u64,
    /// The mount id, where the kernel tells it (`statx`, Linux 5.8).
    mnt: Option<u64>,
}

impl Id {
    fn same_dir(&self, other: &Id) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }

    /// Whether `self`, found below `parent`, is on another mount.
    fn crosses_from(&self, parent: &Id) -> bool {
        self.dev != parent.dev || matches!((self.mnt, parent.mnt), (Some(a), Some(b)) if a != b)
    }
}

/// A directory on the way from `root` down to the one being emptied.
struct Frame {
    /// Its name in its parent (for `root`, in the base directory).
    name: CString,
    id: Id,
    /// Subdirectories still to visit.
    subdirs: Vec<CString>,
}

struct Walk<'a> {
    root: &'a Path,
    resolve: Resolve,
    retries: u32,
}

impl Walk<'_> {
    /// Counts one more start-over or revisit; `msg` is the error once there
    /// were too many.
    fn retry(&mut self, msg: String) -> Result<(), String> {
        self.retries += 1;
        if self.retries > RETRIES {
            Err(msg)
        } else {
            Ok(())
        }
    }

    /// The path of `stack`'s innermost directory (or of `extra` in it), for
    /// messages. `stack[0]` is `root`.
    fn path(&self, stack: &[Frame], extra: Option<&CStr>) -> PathBuf {
        let mut p = self.root.to_path_buf();
        for name in stack.iter().skip(1).map(|f| f.name.as_c_str()).chain(extra) {
            p.push(OsStr::from_bytes(name.to_bytes()));
        }
        p
    }

    /// One attempt at removing the tree, from the top.
    fn attempt(&mut self, base: &OwnedFd, base_id: &Id, name: &CStr) -> Result<(), Stop> {
        let root = self.root;
        let is_dir = match stat_at(base, name) {
            Ok(st) => is_directory(&st),
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => {
                return Err(Stop::Fail(format!(
                    "cannot inspect {}: {e}",
                    root.display()
                )))
            }
        };
        if !is_dir {
            return match unlink_at(base, name, AtFlags::empty()) {
                Ok(()) => Ok(()),
                Err(Errno::ISDIR) => Err(Stop::Again(format!(
                    "cannot remove {}: it keeps changing between file and directory; \
                     stop whatever changes it, then clean again",
                    root.display()
                ))),
                Err(e) => Err(Stop::Fail(cannot_unlink(root, e))),
            };
        }
        let (mut cur, id) = match self.open_dir(base, name, base_id, || root.to_path_buf())? {
            Open::Dir(fd, id) => (fd, id),
            Open::Gone => return Ok(()),
            Open::NotDir => {
                return Err(Stop::Again(format!(
                    "cannot remove {}: it keeps changing between file and directory; \
                     stop whatever changes it, then clean again",
                    root.display()
                )))
            }
        };
        let subdirs = self.empty_files(&cur, || root.to_path_buf())?;
        let mut stack = vec![Frame {
            name: name.to_owned(),
            id,
            subdirs,
        }];
        loop {
            let top = stack.len() - 1;
            if let Some(child) = stack[top].subdirs.pop() {
                // Down into `child`.
                let found = self.open_dir(&cur, &child, &stack[top].id, || {
                    self.path(&stack, Some(&child))
                })?;
                match found {
                    Open::Dir(fd, id) => {
                        // Close the parent first: `list` needs a descriptor.
                        cur = fd;
                        let subdirs = self.empty_files(&cur, || self.path(&stack, Some(&child)))?;
                        stack.push(Frame {
                            name: child,
                            id,
                            subdirs,
                        });
                    }
                    Open::Gone => {}
                    Open::NotDir => match unlink_at(&cur, &child, AtFlags::empty()) {
                        Ok(()) => {}
                        Err(Errno::ISDIR) => {
                            let msg = format!(
                                "cannot remove {}: it keeps changing between file and directory; \
                                 stop whatever changes it, then clean again",
                                self.path(&stack, Some(&child)).display()
                            );
                            self.retry(msg).map_err(Stop::Fail)?;
                            stack[top].subdirs.push(child);
                        }
                        Err(e) => {
                            return Err(Stop::Fail(cannot_unlink(
                                &self.path(&stack, Some(&child)),
                                e,
                            )))
                        }
                    },
                }
                continue;
            }
            // `cur` is empty: up to its parent, and remove it there.
            let Some(done) = stack.pop() else {
                unreachable!("the stack holds at least root here")
            };
            let Some(parent) = stack.last() else {
                drop(cur);
                return match unlink_at(base, &done.name, AtFlags::REMOVEDIR) {
                    Ok(()) => Ok(()),
                    Err(e) if is_not_empty(e) => Err(Stop::Again(not_empty(root, e))),
                    // Replaced by a non-directory: start over, that unlinks it.
                    Err(Errno::NOTDIR) => Err(Stop::Again(moved(root))),
                    Err(e) => Err(Stop::Fail(format!("cannot remove {}: {e}", root.display()))),
                };
            };
            let up = match open_at(&cur, c"..") {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    return Err(Stop::Again(moved(&self.path(&stack, Some(&done.name)))))
                }
                Err(e) => {
                    return Err(Stop::Fail(format!(
                        "cannot open directory {}: {e}",
                        self.path(&stack, None).display()
                    )))
                }
            };
            match identify(&up) {
                Ok(id) if id.same_dir(&parent.id) => {}
                Ok(_) => return Err(Stop::Again(moved(&self.path(&stack, Some(&done.name))))),
                Err(e) => {
                    return Err(Stop::Fail(format!(
                        "cannot inspect {}: {e}",
                        self.path(&stack, None).display()
                    )))
                }
            }
            cur = up;
            match unlink_at(&cur, &done.name, AtFlags::REMOVEDIR) {
                Ok(()) => {}
                Err(e) if is_not_empty(e) => {
                    // Something wrote into it meanwhile: empty it again.
                    let msg = not_empty(&self.path(&stack, Some(&done.name)), e);
                    self.retry(msg).map_err(Stop::Fail)?;
                    let top = stack.len() - 1;
                    stack[top].subdirs.push(done.name);
                }
                // The directory we emptied was moved away and something else
                // put in its place: start over, to find both.
                Err(Errno::NOTDIR) => {
                    return Err(Stop::Again(moved(&self.path(&stack, Some(&done.name)))))
                }
                Err(e) => {
                    return Err(Stop::Fail(format!(
                        "cannot remove {}: {e}",
                        self.path(&stack, Some(&done.name)).display()
                    )))
                }
            }
        }
    }

    /// Opens the directory `name` in `dir` (whose identity is `parent`)
    /// without following a symlink or crossing a mount. `path` names it in
    /// messages.
    fn open_dir(
        &self,
        dir: &OwnedFd,
        name: &CStr,
        parent: &Id,
        path: impl Fn() -> PathBuf,
    ) -> Result<Open, Stop> {
        let mount_point = || Stop::Fail(mount_point(&path()));
        let opened = match self.resolve {
            Resolve::Auto => open_beneath(dir, name),
            Resolve::Portable => open_at(dir, name),
        };
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) => {
                return match e {
                    Errno::NOENT => Ok(Open::Gone),
                    Errno::NOTDIR | Errno::LOOP => Ok(Open::NotDir),
                    Errno::XDEV => Err(mount_point()),
                    _ => Err(Stop::Fail(format!(
                        "cannot open directory {}: {e}",
                        path().display()
                    ))),
                }
            }
        };
        let id = identify(&fd)
            .map_err(|e| Stop::Fail(format!("cannot inspect {}: {e}", path().display())))?;
        if id.crosses_from(parent) {
            return Err(mount_point());
        }
        Ok(Open::Dir(fd, id))
    }

    /// Lists the directory `dir`, unlinks everything in it that is not a
    /// directory, and returns the names of its subdirectories. `path` names
    /// it in messages.
    fn empty_files(&self, dir: &OwnedFd, path: impl Fn() -> PathBuf) -> Result<Vec<CString>, Stop> {
        let entries = list(dir)
            .map_err(|e| Stop::Fail(format!("cannot read directory {}: {e}", path().display())))?;
        let mut subdirs = Vec::new();
        for (name, kind) in entries {
            let is_dir = match kind {
                Kind::Dir => true,
                Kind::Other => false,
                Kind::Unknown => match stat_at(dir, &name) {
                    Ok(st) => is_directory(&st),
                    Err(Errno::NOENT) => continue,
                    Err(e) => {
                        return Err(Stop::Fail(format!(
                            "cannot inspect {}: {e}",
                            path().join(OsStr::from_bytes(name.to_bytes())).display()
                        )))
                    }
                },
            };
            if is_dir {
                subdirs.push(name);
                continue;
            }
            match unlink_at(dir, &name, AtFlags::empty()) {
                Ok(()) => {}
                // It became a directory meanwhile: visit it as one.
                Err(Errno::ISDIR) => subdirs.push(name),
                Err(e) => {
                    return Err(Stop::Fail(cannot_unlink(
                        &path().join(OsStr::from_bytes(name.to_bytes())),
                        e,
                    )))
                }
            }
        }
        // Visit them in the order listed (the stack pops from the end).
        subdirs.reverse();
        Ok(subdirs)
    }
}

fn is_not_empty(e: Errno) -> bool {
    matches!(e, Errno::NOTEMPTY | Errno::EXIST)
}

// An `Errno` displays as the `io::Error` it converts to: "Permission
// denied (os error 13)".
fn not_empty(path: &Path, e: Errno) -> String {
    format!(
        "cannot remove {}: {e}; something keeps writing there: stop it, then clean again",
        path.display()
    )
}

fn mount_point(path: &Path) -> String {
    format!(
        "{} is a mount point (left by a build?); unmount it, then clean again",
        path.display()
    )
}

/// The error for a non-directory that cannot be unlinked (EBUSY: a file
/// bind-mounted there).
fn cannot_unlink(path: &Path, e: Errno) -> String {
    if e == Errno::BUSY {
        mount_point(path)
    } else {
        format!("cannot remove {}: {e}", path.display())
    }
}

fn moved(path: &Path) -> String {
    format!(
        "cannot remove {}: it was moved or replaced while being removed; \
         stop whatever changes it, then clean again",
        path.display()
    )
}

fn c_name(name: &OsStr) -> Option<CString> {
    CString::new(name.as_bytes()).ok()
}

/// Whether `st` is the status of a directory.
fn is_directory(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens a trusted directory by path (following symlinks as usual).
fn open_path(path: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the directory `name` in `dir`, not following a symlink.
fn open_at(dir: &OwnedFd, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())
}

/// Opens the directory `name` in `dir` with `openat2`, so that the kernel
/// refuses a symlink, `..` and a mount crossing (EXDEV); falls back to
/// [`open_at`] where `openat2` is missing or forbidden.
fn open_beneath(dir: &OwnedFd, name: &CStr) -> rustix::io::Result<OwnedFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV;
        for _ in 0..8 {
            match rustix::fs::openat2(dir, name, DIR_FLAGS, Mode::empty(), resolve) {
                Ok(fd) => return Ok(fd),
                // A rename somewhere raced the lookup: try again.
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS | Errno::PERM | Errno::INVAL | Errno::TOOBIG) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    open_at(dir, name)
}

/// Device, inode and (where known) mount id of an open file.
fn identify(fd: &OwnedFd) -> rustix::io::Result<Id> {
    let st = rustix::fs::fstat(fd)?;
    Ok(Id {
        dev: st.st_dev,
        ino: st.st_ino,
        mnt: mount_id_of(fd),
    })
}

/// The mount id of what `fd` refers to (statx, Linux 5.8+), if known.
pub fn mount_id_of(fd: impl AsFd) -> Option<u64> {
    if NO_STATX.load(Ordering::Relaxed) {
        return None;
    }
    // The empty path with AT_EMPTY_PATH: the file `fd` refers to.
    match rustix::fs::statx(
        fd,
        c"",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::MNT_ID,
    ) {
        Ok(stx) => (stx.stx_mask & StatxFlags::MNT_ID.bits() != 0).then_some(stx.stx_mnt_id),
        Err(e) => {
            if e == Errno::NOSYS {
                NO_STATX.store(true, Ordering::Relaxed);
            }
            None
        }
    }
}

/// `lstat` of `name` in `dir`.
fn stat_at(dir: &OwnedFd, name: &CStr) -> rustix::io::Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
}

/// `unlinkat`; a name that is already gone counts as removed.
fn unlink_at(dir: &OwnedFd, name: &CStr, flags: AtFlags) -> rustix::io::Result<()> {
    match rustix::fs::unlinkat(dir, name, flags) {
        Err(Errno::NOENT) => Ok(()),
        other => other,
    }
}

/// What `readdir` says an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Other,
    Unknown,
}

/// The entries of the directory `dir` refers to (without `.` and `..`),
/// read through a duplicate of `dir`, closed before returning.
fn list(dir: &OwnedFd) -> rustix::io::Result<Vec<(CString, Kind)>> {
    // A duplicate, not a new open of ".": that would need search permission
    // on the directory, where reading it needs only read permission.
    let mut stream = Dir::new(rustix::io::fcntl_dupfd_cloexec(dir, 0)?)?;
    // The duplicate shares its offset with `dir`: start from the beginning.
    stream.rewind();
    let mut entries = Vec::new();
    // The end of the directory is `None`; an error is `Some(Err(..))`.
    while let Some(entry) = stream.read() {
        let entry = entry?;
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let kind = match entry.file_type() {
            FileType::Directory => Kind::Dir,
            FileType::Unknown => Kind::Unknown,
            _ => Kind::Other,
        };
        entries.push((name.to_owned(), kind));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::mount::{unmount, UnmountFlags};
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    use std::fs;
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Says plainly, past the test harness's output capture, that (part
    /// of) a test was skipped and why.
    fn skipped(what: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED {what}");
    }

    static COUNTER: AtomicU64 = AtomicU64::new(0);

    /// A fresh directory under the system's temporary directory, removed
    /// on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            // In memory where possible: deep trees are slow to make on disk.
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            let p = base.join(format!("latd-tree-{tag}-{}-{n}", std::process::id()));
            fs::create_dir_all(&p).unwrap();
            TempDir(p.canonicalize().unwrap())
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            if remove_tree(&self.0).is_err() {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    const MODES: [Resolve; 2] = [Resolve::Auto, Resolve::Portable];

    const CHILD_ENV: &str = "LATD_TREE_TEST_CHILD";

    /// Runs this module's test `test` again in a process of its own (so it
    /// may lower its file limit, or run as another user, without disturbing
    /// the tests running beside it). Returns true in that process, where
    /// the caller then does the work, false in the parent once the child
    /// passed. `uid`: run the child as that user (we are root).
    fn in_child(test: &str, uid: Option<u32>) -> bool {
        if std::env::var_os(CHILD_ENV).is_some() {
            return true;
        }
        let module = module_path!().split_once("::").unwrap().1;
        let name = format!("{module}::{test}");
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1");
        if let Some(uid) = uid {
            // Set in the child before exec: the group, then the user, and
            // (as we are root) no supplementary groups are kept.
            cmd.gid(uid).uid(uid);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        print!("{stdout}");
        eprint!("{stderr}");
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{test} failed in its own process ({}):\n{stdout}\n{stderr}",
            out.status
        );
        false
    }

    fn open_fds() -> Vec<RawFd> {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Builds a chain of `depth` directories `d/d/d/...` below `top`
    /// (deeper than a path can name), with a file every 1000 levels.
    fn build_chain(top: &Path, depth: usize) {
        let mut cur = open_path(top).unwrap();
        for level in 0..depth {
            rustix::fs::mkdirat(&cur, c"d", Mode::from_raw_mode(0o755)).unwrap();
            if level % 1000 == 0 {
                rustix::fs::openat(
                    &cur,
                    c"f",
                    OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o644),
                )
                .unwrap();
            }
            cur = open_at(&cur, c"d").unwrap();
        }
    }

    #[test]
    fn removes_files_dirs_and_symlinks_without_following_them() {
        for mode in MODES {
            let d = TempDir::new("mixed");
            let outside = d.path().join("outside");
            fs::create_dir_all(outside.join("sub")).unwrap();
            fs::write(outside.join("keep"), "x").unwrap();
            fs::write(outside.join("sub/keep"), "x").unwrap();
            let tree = d.path().join("tree");
            fs::create_dir_all(tree.join("a/b/c")).unwrap();
            fs::create_dir_all(tree.join("empty")).unwrap();
            fs::write(tree.join("top"), "x").unwrap();
            fs::write(tree.join("a/b/c/f"), "x").unwrap();
            fs::write(tree.join("a/f"), "x").unwrap();
            symlink(&outside, tree.join("a/dirlink")).unwrap();
            symlink(&outside, tree.join("a/b/c/dirlink")).unwrap();
            symlink(outside.join("keep"), tree.join("a/filelink")).unwrap();
            symlink("/nonexistent/latd", tree.join("a/b/dangling")).unwrap();
            rustix::fs::mkfifoat(
                rustix::fs::CWD,
                tree.join("a/fifo"),
                Mode::from_raw_mode(0o644),
            )
            .unwrap();
            fs::set_permissions(tree.join("a/b"), fs::Permissions::from_mode(0o700)).unwrap();

            remove_tree_with(&tree, mode, None).unwrap();
            assert!(fs::symlink_metadata(&tree).is_err(), "{mode:?}: tree left");
            assert!(outside.join("keep").exists(), "{mode:?}");
            assert!(outside.join("sub/keep").exists(), "{mode:?}");
        }
    }

    #[test]
    fn a_symlink_as_root_is_unlinked_and_its_target_survives() {
        for mode in MODES {
            let d = TempDir::new("rootlink");
            let outside = d.path().join("outside");
            fs::create_dir_all(outside.join("sub")).unwrap();
            fs::write(outside.join("sub/keep"), "x").unwrap();
            let link = d.path().join("deploy");
            symlink(&outside, &link).unwrap();
            remove_tree_with(&link, mode, None).unwrap();
            assert!(fs::symlink_metadata(&link).is_err(), "{mode:?}");
            assert!(outside.join("sub/keep").exists(), "{mode:?}");
        }
    }

    #[test]
    fn a_file_as_root_is_removed_and_a_missing_root_is_ok() {
        let d = TempDir::new("rootfile");
        let f = d.path().join("log");
        fs::write(&f, "x").unwrap();
        remove_tree(&f).unwrap();
        assert!(fs::symlink_metadata(&f).is_err());
        remove_tree(&f).unwrap();
        remove_tree(&d.path().join("missing/parent/too")).unwrap();
        assert!(remove_tree(Path::new("/nonexistent/latd-test")).is_ok());
        let err = remove_tree(Path::new("/")).unwrap_err();
        assert!(err.starts_with("cannot remove /:"), "{err}");
    }

    /// 30,000 levels: no stack overflow, and a file limit just above what
    /// is open already is enough (a descriptor per level would hit it at
    /// once). Runs in a process of its own, as it lowers that limit. The
    /// openat-only mode walks the same way and differs only in how it opens
    /// one level, so it gets a shorter chain (still far beyond PATH_MAX):
    /// building a chain is what takes the time.
    #[test]
    fn a_very_deep_tree_is_removed_with_a_few_descriptors() {
        if !in_child("a_very_deep_tree_is_removed_with_a_few_descriptors", None) {
            return;
        }
        // What remove_tree needs: the base directory, the directory being
        // emptied, and one more while it opens the next one or lists it.
        const SPARE: RawFd = 3;
        for (mode, depth) in [(Resolve::Auto, 30_000), (Resolve::Portable, 5_000)] {
            let d = TempDir::new("deep");
            let tree = d.path().join("workdir");
            fs::create_dir(&tree).unwrap();
            build_chain(&tree, depth);

            let before = open_fds();
            let highest = *before.iter().max().unwrap();
            // Fill every free descriptor number below the highest open one,
            // so that exactly SPARE numbers are left under the lowered limit.
            let mut placeholders = Vec::new();
            loop {
                let f = fs::File::open("/dev/null").unwrap();
                if f.as_raw_fd() > highest {
                    break;
                }
                placeholders.push(f);
            }
            let saved = getrlimit(Resource::Nofile);
            let tight = Rlimit {
                current: Some((highest + 1 + SPARE) as u64),
                maximum: saved.maximum,
            };
            setrlimit(Resource::Nofile, tight).unwrap();
            let result = remove_tree_with(&tree, mode, None);
            setrlimit(Resource::Nofile, saved).unwrap();
            drop(placeholders);

            assert_eq!(result, Ok(()), "{mode:?}");
            assert!(fs::symlink_metadata(&tree).is_err(), "{mode:?}");
            assert_eq!(open_fds(), before, "{mode:?}: descriptors leaked");
            println!("{mode:?}: removed {depth} levels with {SPARE} descriptors to spare");
        }
    }

    #[test]
    fn a_directory_of_twenty_thousand_files_is_removed() {
        let d = TempDir::new("wide");
        let tree = d.path().join("deploy");
        fs::create_dir_all(tree.join("images")).unwrap();
        for i in 0..20_000 {
            fs::File::create(tree.join(format!("images/file-{i}"))).unwrap();
        }
        remove_tree(&tree).unwrap();
        assert!(fs::symlink_metadata(&tree).is_err());
    }

    /// Unmounts on drop, whatever the test did.
    struct Mount(PathBuf);

    impl Mount {
        /// Mounts over `at` (a directory, created if missing, or a file).
        fn new(args: &[&str], at: &Path) -> Option<Mount> {
            if !at.exists() {
                fs::create_dir_all(at).unwrap();
            }
            let ok = Command::new("mount")
                .args(args)
                .arg(at)
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| Mount(at.to_path_buf()))
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            if unmount(&self.0, UnmountFlags::empty()).is_err() {
                let _ = unmount(&self.0, UnmountFlags::DETACH);
            }
        }
    }

    fn mount_point_error(path: &Path) -> String {
        format!(
            "{} is a mount point (left by a build?); unmount it, then clean again",
            path.display()
        )
    }

    #[test]
    fn a_mount_point_below_root_is_reported_by_path_and_left_alone() {
        if !is_root() {
            skipped("a_mount_point_below_root_is_reported_by_path_and_left_alone: needs root");
            return;
        }
        for mode in MODES {
            let d = TempDir::new("mount");
            let tree = d.path().join("deploy");
            fs::create_dir_all(tree.join("a/before")).unwrap();
            fs::write(tree.join("a/file"), "x").unwrap();
            let mnt = tree.join("a/rootfs/proc");
            let Some(guard) = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "none"], &mnt) else {
                skipped("a_mount_point_below_root...: this kernel refused a tmpfs mount");
                return;
            };
            fs::create_dir(mnt.join("sub")).unwrap();
            fs::write(mnt.join("sub/precious"), "x").unwrap();

            let err = remove_tree_with(&tree, mode, None).unwrap_err();
            assert_eq!(err, mount_point_error(&mnt), "{mode:?}");
            assert!(
                mnt.join("sub/precious").exists(),
                "{mode:?}: emptied a mount"
            );

            // Once unmounted, the next clean works.
            drop(guard);
            remove_tree_with(&tree, mode, None).unwrap();
            assert!(fs::symlink_metadata(&tree).is_err(), "{mode:?}");

            // A root that is itself a mount point is not emptied either.
            let root = d.path().join("log");
            let guard = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "none"], &root).unwrap();
            fs::write(root.join("precious"), "x").unwrap();
            let err = remove_tree_with(&root, mode, None).unwrap_err();
            assert_eq!(err, mount_point_error(&root), "{mode:?}");
            assert!(root.join("precious").exists(), "{mode:?}");
            drop(guard);
        }
    }

    /// A bind mount of the same file system has the same device number;
    /// openat2 (RESOLVE_NO_XDEV) and the statx mount id still see it.
    #[test]
    fn a_bind_mount_of_the_same_file_system_is_reported_and_left_alone() {
        if !is_root() {
            skipped("a_bind_mount_of_the_same_file_system_is_reported_and_left_alone: needs root");
            return;
        }
        for mode in MODES {
            let d = TempDir::new("bind");
            let outside = d.path().join("outside");
            fs::create_dir_all(outside.join("sub")).unwrap();
            fs::write(outside.join("sub/precious"), "x").unwrap();
            let tree = d.path().join("workdir");
            let mnt = tree.join("x/bound");
            let Some(guard) = Mount::new(&["--bind", outside.to_str().unwrap()], &mnt) else {
                skipped("a_bind_mount...: this kernel refused a bind mount");
                return;
            };
            if mode == Resolve::Portable && mount_id_of(open_path(&mnt).unwrap()).is_none() {
                skipped("a_bind_mount... (openat only): no statx mount ids");
                continue;
            }
            let err = remove_tree_with(&tree, mode, None).unwrap_err();
            assert_eq!(err, mount_point_error(&mnt), "{mode:?}");
            assert!(outside.join("sub/precious").exists(), "{mode:?}");
            drop(guard);

            // A file bind-mounted over a file of the tree.
            let file = tree.join("etc/resolv.conf");
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(&file, "").unwrap();
            let source = outside.join("sub/precious");
            let guard = Mount::new(&["--bind", source.to_str().unwrap()], &file).unwrap();
            let err = remove_tree_with(&tree, mode, None).unwrap_err();
            assert_eq!(err, mount_point_error(&file), "{mode:?}");
            assert_eq!(fs::read_to_string(&source).unwrap(), "x", "{mode:?}");
            drop(guard);
            remove_tree_with(&tree, mode, None).unwrap();
        }
    }

    /// A file that cannot be removed: the error names it.
    #[test]
    fn a_permission_error_names_the_path() {
        if is_root() {
            immutable_file_error_names_the_path();
            // And what a user meets, as the user "nobody".
            let exe = std::env::current_exe().unwrap();
            let readable = exe
                .ancestors()
                .all(|p| fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005));
            if readable {
                in_child("read_only_directory_as_nobody", Some(65534));
            } else {
                skipped(
                    "a_permission_error_names_the_path (as nobody): \
                     the test binary is not readable by others",
                );
            }
        } else {
            read_only_directory_as_user();
        }
    }

    fn immutable_file_error_names_the_path() {
        struct Mutable(PathBuf);
        impl Drop for Mutable {
            fn drop(&mut self) {
                let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
            }
        }
        let d = TempDir::new("immutable");
        let tree = d.path().join("deploy");
        fs::create_dir_all(tree.join("a")).unwrap();
        let f = tree.join("a/image.iso");
        fs::write(&f, "x").unwrap();
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(&f)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skipped("a_permission_error_names_the_path (as root): chattr +i is not supported here");
            return;
        }
        let _guard = Mutable(f.clone());
        for mode in MODES {
            let err = remove_tree_with(&tree, mode, None).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "cannot remove {}: Operation not permitted (os error 1)",
                    f.display()
                ),
                "{mode:?}"
            );
            assert!(f.exists());
        }
    }

    /// Driven by `a_permission_error_names_the_path`, which runs it in a
    /// process of its own as the user "nobody" when the tests run as root.
    #[test]
    fn read_only_directory_as_nobody() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        if is_root() {
            skipped("read_only_directory_as_nobody: still root");
            return;
        }
        read_only_directory_as_user();
    }

    fn read_only_directory_as_user() {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let top = std::env::temp_dir().join(format!("latd-tree-ro-{}-{n}", std::process::id()));
        if fs::create_dir(&top).is_err() {
            skipped(&format!(
                "a_permission_error_names_the_path (as a user): {} is not writable",
                std::env::temp_dir().display()
            ));
            return;
        }
        let d = TempDir(top.canonicalize().unwrap());
        read_only_directory_case(d.path());
    }

    fn read_only_directory_case(top: &Path) {
        // A directory that may be read but not written (0555), and one
        // that may be read but not searched (0444): each is listed (the
        // listing needs only read permission), and what fails is removing
        // the file in it, which is what the error names.
        for (tree, name, mode) in [("log", "build.log", 0o555), ("deploy", "image.iso", 0o444)] {
            let tree = top.join(tree);
            let ro = tree.join("old");
            fs::create_dir_all(&ro).unwrap();
            let f = ro.join(name);
            fs::write(&f, "x").unwrap();
            fs::set_permissions(&ro, fs::Permissions::from_mode(mode)).unwrap();
            for resolve in MODES {
                let err = remove_tree_with(&tree, resolve, None).unwrap_err();
                assert_eq!(
                    err,
                    format!(
                        "cannot remove {}: Permission denied (os error 13)",
                        f.display()
                    ),
                    "{resolve:?}, mode {mode:o}"
                );
            }
            fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
            assert!(f.exists());
            remove_tree(&tree).unwrap();
        }
    }

    /// Another thread keeps swapping directories of the tree for symlinks to
    /// a directory outside it while the tree is removed: whatever the
    /// outcome, nothing outside is touched.
    #[test]
    fn swapping_a_directory_for_a_symlink_never_empties_its_target() {
        for mode in MODES {
            let d = TempDir::new("race");
            let outside = d.path().join("outside");
            fs::create_dir_all(outside.join("inner")).unwrap();
            for i in 0..20 {
                fs::write(outside.join(format!("keep-{i}")), "x").unwrap();
                fs::write(outside.join(format!("inner/keep-{i}")), "x").unwrap();
            }
            for round in 0..40 {
                let tree = d.path().join(format!("tree-{round}"));
                for sub in ["sub", "sub/inner", "sub/inner/deeper"] {
                    fs::create_dir_all(tree.join(sub)).unwrap();
                    for i in 0..20 {
                        fs::write(tree.join(sub).join(format!("f-{i}")), "x").unwrap();
                    }
                }
                let stop = Arc::new(AtomicBool::new(false));
                let attacker = {
                    let (stop, tree, outside) = (stop.clone(), tree.clone(), outside.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            for (dir, target) in [
                                (tree.join("sub"), outside.clone()),
                                (tree.join("sub/inner"), outside.join("inner")),
                            ] {
                                let aside = dir.with_extension("aside");
                                if fs::rename(&dir, &aside).is_ok() {
                                    let _ = symlink(&target, &dir);
                                    std::thread::yield_now();
                                    let _ = fs::remove_file(&dir);
                                    let _ = fs::rename(&aside, &dir);
                                }
                            }
                        }
                    })
                };
                let result = remove_tree_with(&tree, mode, None);
                stop.store(true, Ordering::Relaxed);
                attacker.join().unwrap();
                if let Err(e) = result {
                    assert!(e.contains(tree.to_str().unwrap()), "{e}");
                }
                for i in 0..20 {
                    assert!(outside.join(format!("keep-{i}")).exists(), "{mode:?}");
                    assert!(outside.join(format!("inner/keep-{i}")).exists(), "{mode:?}");
                }
                remove_tree_with(&tree, mode, None).unwrap();
                assert!(fs::symlink_metadata(&tree).is_err());
            }
        }
    }

    /// One level down, in either mode: a symlink is not a directory to
    /// enter, a missing name is gone, a directory opens with its identity.
    /// Where the kernel has openat2, `Auto` uses it: `..` is then refused
    /// (RESOLVE_BENEATH), which the portable openat would open.
    #[test]
    fn opening_one_level_follows_no_symlink_and_stays_beneath() {
        let d = TempDir::new("open");
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let tree = d.path().join("tree");
        fs::create_dir_all(tree.join("sub")).unwrap();
        fs::write(tree.join("file"), "x").unwrap();
        symlink(&outside, tree.join("link")).unwrap();
        let dir = open_path(&tree).unwrap();
        let id = identify(&dir).unwrap();
        for mode in MODES {
            let walk = Walk {
                root: &tree,
                resolve: mode,
                retries: 0,
            };
            let open = |name: &CStr| {
                walk.open_dir(&dir, name, &id, || {
                    tree.join(OsStr::from_bytes(name.to_bytes()))
                })
            };
            assert!(matches!(open(c"link"), Ok(Open::NotDir)), "{mode:?}");
            assert!(matches!(open(c"file"), Ok(Open::NotDir)), "{mode:?}");
            assert!(matches!(open(c"missing"), Ok(Open::Gone)), "{mode:?}");
            let Ok(Open::Dir(fd, sub)) = open(c"sub") else {
                panic!("{mode:?}: sub did not open as a directory");
            };
            let st = fs::metadata(tree.join("sub")).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!((sub.dev, sub.ino), (st.dev(), st.ino()), "{mode:?}");
            assert!(!sub.crosses_from(&id), "{mode:?}");
            assert!(identify(&fd).unwrap().same_dir(&sub), "{mode:?}");
        }
        assert!(open_at(&dir, c"..").is_ok());
        match open_beneath(&dir, c"..") {
            Err(Errno::XDEV) => {}
            Ok(_) if NO_OPENAT2.load(Ordering::Relaxed) => {
                skipped("opening_one_level... (openat2): not available here");
            }
            Ok(_) => panic!("openat2 opened .. though RESOLVE_BENEATH was asked"),
            Err(e) => panic!("openat2 of ..: {e}"),
        }
    }

    /// Every entry, with its kind (or Unknown, where the file system does
    /// not tell), and from the start each time: the listing reads through
    /// a duplicate, which shares its offset with the descriptor.
    #[test]
    fn a_listing_has_every_entry_with_its_kind_each_time() {
        let d = TempDir::new("list");
        fs::create_dir(d.path().join("dir")).unwrap();
        fs::write(d.path().join("file"), "").unwrap();
        symlink("dir", d.path().join("link")).unwrap();
        let fd = open_path(d.path()).unwrap();
        let mut first = list(&fd).unwrap();
        let mut again = list(&fd).unwrap();
        first.sort_by(|a, b| a.0.cmp(&b.0));
        again.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(first, again);
        let names: Vec<&[u8]> = first.iter().map(|(n, _)| n.to_bytes()).collect();
        assert_eq!(names, [&b"dir"[..], b"file", b"link"]);
        assert!(matches!(first[0].1, Kind::Dir | Kind::Unknown), "{first:?}");
        assert!(
            matches!(first[1].1, Kind::Other | Kind::Unknown),
            "{first:?}"
        );
        assert!(
            matches!(first[2].1, Kind::Other | Kind::Unknown),
            "{first:?}"
        );
        assert!(is_directory(&stat_at(&fd, c"dir").unwrap()));
        assert!(
            !is_directory(&stat_at(&fd, c"link").unwrap()),
            "lstat followed"
        );
        assert_eq!(stat_at(&fd, c"missing").unwrap_err(), Errno::NOENT);
        // Unlinking what is already gone is done.
        unlink_at(&fd, c"missing", AtFlags::empty()).unwrap();
        assert_eq!(
            unlink_at(&fd, c"dir", AtFlags::empty()).unwrap_err(),
            Errno::ISDIR
        );
    }

    /// Mount ids: one for the same mount, through either entry point;
    /// another for a mount below (as root).
    #[test]
    fn mount_ids_tell_mounts_apart() {
        let d = TempDir::new("mntid");
        fs::create_dir(d.path().join("sub")).unwrap();
        let fd = open_path(d.path()).unwrap();
        let Some(here) = mount_id_of(&fd) else {
            skipped("mount_ids_tell_mounts_apart: no statx mount ids");
            return;
        };
        assert_eq!(mount_id_of(open_at(&fd, c"sub").unwrap()), Some(here));
        if !is_root() {
            skipped("mount_ids_tell_mounts_apart (a mount below): needs root");
            return;
        }
        let mnt = d.path().join("mnt");
        let Some(_guard) = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "none"], &mnt) else {
            skipped("mount_ids_tell_mounts_apart: this kernel refused a tmpfs mount");
            return;
        };
        let below = mount_id_of(open_path(&mnt).unwrap());
        assert!(below.is_some_and(|m| m != here), "{below:?} vs {here}");
    }
}
