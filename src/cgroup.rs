//! Each build in a cgroup (v2) of its own, where the kernel offers one (a
//! privileged container does). A process cannot leave a cgroup by `setsid`,
//! by double-forking or by rewriting its environment, so the cgroup is the
//! build's processes, whatever they did: a stop signals every process in
//! it, SIGKILL goes through `cgroup.kill`, the build is over only once the
//! cgroup is empty, and a latd that starts after a crash kills what is left
//! in its builds' cgroups. Without cgroup v2 (or without the right to make
//! one), builds run as before and the environment mark
//! ([`crate::effects::JOB_VAR`]) is all there is.
//!
//! The cgroups are made beside latd in its own cgroup, named after the
//! channel's identity, so two daemons in one container never touch each
//! other's.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rustix::io::Errno;
use rustix::process::{Pid, Signal};

/// Where latd's own cgroup lies in the cgroup2 hierarchy, if it has one.
fn base() -> Option<&'static Path> {
    static BASE: OnceLock<Option<PathBuf>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mount = fs::read_to_string("/proc/self/mountinfo")
            .ok()?
            .lines()
            .find_map(|l| {
                // "... <mount point> <options> - <fstype> <source> ..."
                let (left, right) = l.split_once(" - ")?;
                (right.split_whitespace().next()? == "cgroup2")
                    .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
            })?;
        let own = fs::read_to_string("/proc/self/cgroup")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))?;
        let dir = mount.join(own.trim_start_matches('/'));
        dir.join("cgroup.procs").exists().then_some(dir)
    })
    .as_deref()
}

/// The prefix of the cgroups of the builds of the channel marked `tag`.
fn prefix(tag: &str) -> String {
    let safe: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("latd-{safe}-build-")
}

/// A build's cgroup; removed (once empty) when dropped.
#[derive(Debug)]
pub struct BuildCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, open for the child to move itself in before exec.
    procs: fs::File,
}

impl BuildCgroup {
    /// Makes the cgroup of build `id` of the channel marked `tag`; `None`
    /// where cgroup v2 is not available to latd.
    pub fn create(tag: &str, id: u64) -> Option<BuildCgroup> {
        let dir = base()?.join(format!("{}{id}", prefix(tag)));
        if dir.exists() {
            // Left by a latd that died: nothing of it may live on.
            kill_dir(&dir);
            let _ = fs::remove_dir(&dir);
        }
        if let Err(e) = fs::create_dir(&dir) {
            log::debug!("no cgroup for build {id} ({}): {e}", dir.display());
            return None;
        }
        // std opens every file close-on-exec: the build does not inherit it.
        match fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
        {
            Ok(procs) => Some(BuildCgroup { dir, procs }),
            Err(e) => {
                log::debug!("no cgroup for build {id}: {e}");
                let _ = fs::remove_dir(&dir);
                None
            }
        }
    }

    /// A descriptor through which a child moves itself in (see [`join`]),
    /// its own, to move into a `pre_exec` closure.
    pub fn procs_for_child(&self) -> io::Result<std::os::fd::OwnedFd> {
        Ok(self.procs.try_clone()?.into())
    }

    /// The processes in the cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.dir)
    }

    /// SIGKILLs everything in the cgroup (`cgroup.kill`, or one by one on a
    /// kernel without it).
    pub fn kill(&self) {
        kill_dir(&self.dir);
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.dir) {
            log::warn!("cannot remove the cgroup {}: {e}", self.dir.display());
        }
    }
}

fn pids_in(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn kill_dir(dir: &Path) {
    let killed = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"));
    if killed.is_err() {
        // Only positive pids: kill(0) or kill(-1) would reach far beyond.
        let pids = pids_in(dir).into_iter().filter(|&p| p > 0);
        for pid in pids.filter_map(Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
}

/// How many processes are in the cgroups of the builds of the channel
/// marked `tag`.
pub fn leftover_count(tag: &str) -> usize {
    let Some(base) = base() else { return 0 };
    let prefix = prefix(tag);
    fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| pids_in(&e.path()).len())
        .sum()
}

/// At start-up: kills whatever is left in the cgroups of the builds of
/// the channel marked `tag` (a previous latd died), removes them, and
/// returns how many processes there were.
pub fn kill_leftovers(tag: &str) -> usize {
    let Some(base) = base() else { return 0 };
    let prefix = prefix(tag);
    let mut killed = 0;
    for e in fs::read_dir(base).into_iter().flatten().flatten() {
        if !e.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let dir = e.path();
        let n = pids_in(&dir).len();
        if n > 0 {
            log::warn!("killing {n} processes left in {}", dir.display());
            kill_dir(&dir);
            killed += n;
        }
        // The kernel empties it at once, but the removal may race that.
        for _ in 0..50 {
            match fs::remove_dir(&dir) {
                Err(e) if Errno::from_io_error(&e) == Some(Errno::BUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                _ => break,
            }
        }
    }
    killed
}

/// Whether builds get a cgroup here (for tests and the log).
pub fn available() -> bool {
    base().is_some_and(|b| {
        let probe = b.join(format!("latd-probe-{}", std::process::id()));
        let ok = fs::create_dir(&probe).is_ok();
        let _ = fs::remove_dir(&probe);
        ok
    })
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is
/// `procs` (see [`BuildCgroup::procs_for_child`]). For `pre_exec`: one
/// `write(2)`, async-signal-safe. A child that cannot move in runs outside
/// the cgroup (its group and mark still find it), as where there is none.
pub fn join(procs: &impl std::os::fd::AsFd) {
    let _ = rustix::io::write(procs, b"0");
}
