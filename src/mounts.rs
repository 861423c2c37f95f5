//! Mounts a build leaves under its workdir.
//!
//! The real SDK bind-mounts `/dev`, `/dev/pts`, `/proc` and `/sys` into the
//! rootfs it builds under the workdir and unmounts them on its way out; a
//! build that is killed leaves them mounted, and a later `rm -rf` of the
//! workdir would reach the host's `/dev`. latd notes which mounts exist
//! under a workdir before a build starts and, once none of the build's
//! processes remain, unmounts (lazily, like the SDK's `umount -l`) every
//! mount under it that is new, deepest first. Mounts that were there
//! before the build are never touched.
//!
//! A mount point is reached from the workspace root one component at a
//! time without following symlinks, and unmounted through that descriptor
//! only if it is the very mount that was found, so a client who renames or
//! swaps directories meanwhile cannot make root unmount anything else.

use crate::fsutil;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A mount, as `/proc/self/mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub id: u64,
    pub point: PathBuf,
}

/// Every mount of this process's namespace.
pub fn all() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// Parses mountinfo(5) lines: the mount id is the first field, the mount
/// point the fifth (with spaces and the like octal-escaped).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let id = f.next()?.parse().ok()?;
            let point = unescape(f.nth(3)?);
            Some(Mount {
                id,
                point: PathBuf::from(point),
            })
        })
        .collect()
}

fn unescape(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Which mount namespace this process is in, as far as a latd started
/// later can tell: the boot, when pid 1 of this pid namespace started (a
/// restarted container has a new one), and the namespace's inode. Mount ids
/// are only compared within one (a new container's mounts get new ids,
/// and the numbers are reused).
pub fn namespace() -> String {
    use std::os::unix::fs::MetadataExt;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let init = crate::effects::process_start_ticks(1).unwrap_or(0);
    let ns = std::fs::metadata("/proc/self/ns/mnt").map_or(0, |m| m.ino());
    format!("{}:{init}:{ns}", boot.trim())
}

/// The mounts strictly below `dir`.
pub fn below(mounts: &[Mount], dir: &Path) -> Vec<Mount> {
    mounts
        .iter()
        .filter(|m| m.point != dir && m.point.starts_with(dir))
        .cloned()
        .collect()
}

/// What was mounted under a workdir when its build started.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub workdir: PathBuf,
    before: HashSet<u64>,
}

impl Snapshot {
    pub fn take(workdir: &Path) -> Snapshot {
        Snapshot {
            workdir: workdir.to_path_buf(),
            before: below(&all(), workdir).into_iter().map(|m| m.id).collect(),
        }
    }

    /// A snapshot kept (by a previous daemon) as its mount ids.
    pub fn from_ids(workdir: &Path, ids: &[u64]) -> Snapshot {
        Snapshot {
            workdir: workdir.to_path_buf(),
            before: ids.iter().copied().collect(),
        }
    }

    /// The ids of the mounts that were there, to be kept.
    pub fn ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.before.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Unmounts what is new under the workdir (beneath the workspace
    /// `root`); returns the mount points removed and those that could not
    /// be.
    pub fn release(&self, root: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
        let mut done = Vec::new();
        let mut failed: Vec<(u64, PathBuf, String)> = Vec::new();
        // Unmounting one can reveal one it covered: look again until
        // nothing new is left (bounded: each round removes at least one).
        for _ in 0..64 {
            let mut new: Vec<Mount> = below(&all(), &self.workdir)
                .into_iter()
                .filter(|m| !self.before.contains(&m.id))
                .filter(|m| !failed.iter().any(|(id, _, _)| *id == m.id))
                .collect();
            if new.is_empty() {
                break;
            }
            // Deepest first; of mounts stacked on one point (debootstrap's
            // proc under the SDK's bind mount of /proc), the one on top,
            // listed last, first: only it is reached by the path.
            new.reverse();
            new.sort_by_key(|m| std::cmp::Reverse(m.point.components().count()));
            for m in new {
                match unmount_exactly(root, &m) {
                    Ok(()) => done.push(m.point),
                    Err(e) => failed.push((m.id, m.point, e)),
                }
            }
        }
        let failed = failed.into_iter().map(|(_, p, e)| (p, e)).collect();
        (done, failed)
    }
}

/// Unmounts `m` if the directory reached at its path (from `root`, no
/// symlink followed) is that mount's root.
fn unmount_exactly(root: &Path, m: &Mount) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let dir = fsutil::open_dir_beneath(root, &m.point).map_err(|e| e.to_string())?;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", dir.as_raw_fd()))
        .map_err(|e| e.to_string())?;
    let mnt_id = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    if mnt_id != Some(m.id) {
        return Err("the path no longer leads to that mount".into());
    }
    let target = format!("/proc/self/fd/{}", dir.as_raw_fd());
    rustix::mount::unmount(target.as_str(), rustix::mount::UnmountFlags::DETACH)
        .map_err(|e| std::io::Error::from(e).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount_tmpfs(at: &Path) {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "test-stack"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount {}", at.display());
    }

    #[test]
    fn stacked_and_nested_mounts_are_all_released_but_not_those_from_before() {
        if fsutil::euid() != 0 {
            eprintln!("SKIPPED stacked_and_nested_mounts_are_all_released_but_not_those_from_before: needs root (to mount)");
            return;
        }
        let root = std::env::temp_dir()
            .join(format!("latd-mounts-stack-{}", std::process::id()))
            .join("a b");
        let _ = std::fs::create_dir_all(&root);
        let root = root.canonicalize().unwrap();
        let workdir = root.join("work");
        let keep = workdir.join("cache");
        std::fs::create_dir_all(&keep).unwrap();
        mount_tmpfs(&keep);
        let snapshot = Snapshot::take(&workdir);
        // What the real SDK leaves when killed: debootstrap's proc under
        // the bind mount of /proc at the same place (stacked), and /dev
        // with /dev/pts inside it (nested).
        let proc_ = workdir.join("rootfs/proc");
        let dev = workdir.join("rootfs/dev");
        std::fs::create_dir_all(&proc_).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        mount_tmpfs(&proc_);
        mount_tmpfs(&proc_);
        mount_tmpfs(&dev);
        std::fs::create_dir_all(dev.join("pts")).unwrap();
        mount_tmpfs(&dev.join("pts"));
        let (done, failed) = snapshot.release(&root);
        let left: Vec<PathBuf> = below(&all(), &workdir)
            .into_iter()
            .map(|m| m.point)
            .collect();
        let _ = std::process::Command::new("umount").arg(&keep).status();
        for m in below(&all(), &root) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&m.point)
                .status();
        }
        let _ = std::fs::remove_dir_all(root.parent().unwrap());
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(done.len(), 4, "{done:?}");
        assert_eq!(left, vec![keep], "left mounted");
    }

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    40 22 0:35 / /w/a\\040b/dev rw - tmpfs x rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(
            m[0],
            Mount {
                id: 22,
                point: "/proc".into()
            }
        );
        assert_eq!(m[1].point, PathBuf::from("/w/a b/dev"));
        assert_eq!(below(&m, Path::new("/w")).len(), 1);
        assert!(below(&m, Path::new("/w/a b/dev")).is_empty());
        assert!(below(&m, Path::new("/pro")).is_empty());
    }
}
