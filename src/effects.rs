//! Performs what the machine asks: starts, signals and reaps processes,
//! removes trees, saves state. Outcomes come back as [`Event`]s. No
//! decisions are taken here beyond how to carry an effect out.

use crate::machine::{BuildKind, BuildRequest, Event, Exit, JobId, Persisted, ProcessId, Sig};
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// What the process layer needs to know about the SDK.
#[derive(Debug, Clone)]
pub struct SdkConfig {
    /// The script sourced before every SDK command.
    pub env_script: PathBuf,
    /// `Some(path)` when the operator allowed `hack/lat-genimage-cmd`.
    pub hack_cmd: Option<PathBuf>,
    /// Value of [`TAG_VAR`] in every process latd starts (the channel's
    /// path), so a restarted latd can find what a crashed one left.
    pub tag: String,
}

/// Environment variable that marks the processes latd starts.
pub const TAG_VAR: &str = "LATD_CHANNEL";

/// Output directories `clean` removes under a workdir.
pub const CLEAN_DIRS: [&str; 4] = ["deploy", "exampleyamls", "workdir", "log"];

/// Where `getyaml` leaves the example YAML.
pub fn example_yaml(workdir: &Path) -> PathBuf {
    workdir
        .join("exampleyamls")
        .join("debian-image-base-intel-x86-64.yaml")
}

#[derive(Debug)]
struct RunningBuild {
    build_id: u64,
    pgid: i32,
    log_file: PathBuf,
    leader_exit: Option<Exit>,
    exit_reported: bool,
}

/// Every child process of the daemon: the build, getyaml jobs, and orphans
/// of the build that the kernel hands to us (we are a child subreaper).
#[derive(Debug, Default)]
pub struct Processes {
    /// Tracked from spawn until no process of its group remains.
    build: Option<RunningBuild>,
    yaml_jobs: HashMap<i32, (JobId, PathBuf)>,
}

impl Processes {
    /// Makes the daemon the reaper of its descendants' orphans, so that a
    /// build process whose parent died is still ours to reap and to kill.
    pub fn become_subreaper() {
        // SAFETY: prctl with these arguments has no memory effects.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
    }

    /// Starts a build in its own process group, output kept in `log/`.
    pub fn spawn_build(&mut self, sdk: &SdkConfig, build_id: u64, req: &BuildRequest) -> Event {
        match self.try_spawn_build(sdk, req) {
            Ok((pid, process)) => {
                self.build = Some(RunningBuild {
                    build_id,
                    pgid: pid,
                    log_file: req.workdir.join("log").join("log.appsdk"),
                    leader_exit: None,
                    exit_reported: false,
                });
                log::info!(
                    "build {build_id} started: pid {pid}, {} in {}",
                    req.yaml_file.display(),
                    req.workdir.display()
                );
                Event::Spawned { build_id, process }
            }
            Err(reason) => {
                log::error!("build {build_id} could not be started: {reason}");
                Event::SpawnFailed { build_id, reason }
            }
        }
    }

    fn try_spawn_build(
        &self,
        sdk: &SdkConfig,
        req: &BuildRequest,
    ) -> Result<(i32, ProcessId), String> {
        let log_dir = req.workdir.join("log");
        crate::fsutil::ensure_real_dir(&log_dir)
            .map_err(|e| format!("cannot use {}: {e}", log_dir.display()))?;
        // Keep the previous build's log instead of deleting it.
        let log = log_dir.join("log.appsdk");
        if log.exists() {
            let _ = fs::rename(&log, log_dir.join("log.appsdk.previous"));
        }
        let console_path = log_dir.join("console.log");
        let console = crate::fsutil::create_fresh(&console_path, 0o644)
            .map_err(|e| format!("cannot create {}: {e}", console_path.display()))?;
        let console2 = console
            .try_clone()
            .map_err(|e| format!("cannot duplicate a file handle: {e}"))?;
        let sub = match req.kind {
            BuildKind::Genimage => "genimage",
            BuildKind::Geninitramfs => "geninitramfs",
        };
        let mut cmd = Command::new("bash");
        // Paths travel as positional parameters, never through the shell's
        // parser.
        match &sdk.hack_cmd {
            Some(hack) if hack.is_file() => {
                log::warn!(
                    "running {} instead of appsdk (allowed by --allow-hack-cmd)",
                    hack.display()
                );
                cmd.args(["-c", ". \"$0\" && . \"$1\""])
                    .arg(&sdk.env_script)
                    .arg(hack);
            }
            _ => {
                cmd.args(["-c", ". \"$0\" && exec appsdk --log-dir log \"$1\" \"$2\""])
                    .arg(&sdk.env_script)
                    .arg(sub)
                    .arg(&req.yaml_file);
            }
        }
        cmd.current_dir(&req.workdir)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console2)
            .env(TAG_VAR, &sdk.tag)
            .process_group(0);
        let child = cmd.spawn().map_err(|e| format!("cannot run bash: {e}"))?;
        let pid = child.id() as i32;
        // We reap with waitpid(-1); the Child handle is not needed.
        drop(child);
        let start_ticks = process_start_ticks(pid).unwrap_or(0);
        Ok((
            pid,
            ProcessId {
                pid: pid as u32,
                start_ticks,
            },
        ))
    }

    /// Starts `appsdk exampleyamls` in `workdir`.
    pub fn spawn_getyaml(&mut self, sdk: &SdkConfig, job: JobId, workdir: &Path) -> Option<Event> {
        let out_path = workdir.join("log").join("getyaml.log");
        let spawned = crate::fsutil::ensure_real_dir(&workdir.join("log"))
            .and_then(|_| crate::fsutil::create_fresh(&out_path, 0o644))
            .and_then(|out| {
                let err = out.try_clone()?;
                Command::new("bash")
                    .args([
                        "-c",
                        ". \"$0\" && exec appsdk exampleyamls --pkg-type external-debian",
                    ])
                    .arg(&sdk.env_script)
                    .current_dir(workdir)
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .env(TAG_VAR, &sdk.tag)
                    .process_group(0)
                    .spawn()
            });
        match spawned {
            Ok(child) => {
                self.yaml_jobs
                    .insert(child.id() as i32, (job, workdir.to_path_buf()));
                None
            }
            Err(e) => Some(Event::YamlDone {
                job,
                result: Err(format!("cannot run appsdk exampleyamls: {e}")),
            }),
        }
    }

    /// Signals the whole process group of a build, and every process of it
    /// that left the group (`setsid`): as we are their subreaper, they are
    /// still our descendants.
    pub fn signal(&mut self, build_id: u64, sig: Sig) {
        let (signo, name) = match sig {
            Sig::Term => (libc::SIGTERM, "SIGTERM"),
            Sig::Kill => (libc::SIGKILL, "SIGKILL"),
        };
        let Some(pgid) = self
            .build
            .as_ref()
            .filter(|b| b.build_id == build_id)
            .map(|b| b.pgid)
        else {
            return;
        };
        log::info!("build {build_id}: sending {name} to process group {pgid}");
        // SAFETY: killpg has no memory effects.
        unsafe {
            libc::killpg(pgid, signo);
        }
        for pid in self.build_processes() {
            // SAFETY: as above.
            if unsafe { libc::getpgid(pid) } != pgid {
                log::info!("build {build_id}: sending {name} to pid {pid}, outside its group");
                // SAFETY: as above.
                unsafe {
                    libc::kill(pid, signo);
                }
            }
        }
    }

    /// Our descendants except getyaml jobs and theirs: with one build at a
    /// time, these are the build's processes, wherever they moved.
    fn build_processes(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let mut queue = vec![std::process::id() as i32];
        while let Some(parent) = queue.pop() {
            for pid in children_of(parent) {
                if !self.yaml_jobs.contains_key(&pid) {
                    out.push(pid);
                    queue.push(pid);
                }
            }
        }
        out
    }

    /// Kills a getyaml job that overran its time.
    pub fn cancel_job(&mut self, job: JobId) {
        for (&pid, (j, workdir)) in &self.yaml_jobs {
            if *j == job {
                log::warn!(
                    "killing appsdk exampleyamls in {} (pid {pid}): it overran",
                    workdir.display()
                );
                // SAFETY: killpg has no memory effects; the job leads its group.
                unsafe {
                    libc::killpg(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// Kills getyaml jobs (on exit: nothing latd started outlives it).
    pub fn kill_jobs(&mut self) {
        for &pid in self.yaml_jobs.keys() {
            // SAFETY: killpg has no memory effects; each job leads its group.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
    }

    /// Reaps every exited child and reports what ended.
    pub fn reap(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let mut status = 0;
            // SAFETY: status is a valid pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let exit = decode_status(status);
            if let Some(b) = self.build.as_mut().filter(|b| b.pgid == pid) {
                b.leader_exit = Some(exit);
            } else if let Some((job, workdir)) = self.yaml_jobs.remove(&pid) {
                let yaml = example_yaml(&workdir);
                let result = match exit {
                    Exit::Code(0) if yaml.is_file() => Ok(yaml),
                    Exit::Code(0) => Err(format!(
                        "appsdk exampleyamls succeeded but {} is missing",
                        yaml.display()
                    )),
                    other => Err(format!(
                        "appsdk exampleyamls failed ({}); see {}",
                        describe_exit(other),
                        workdir.join("log").join("getyaml.log").display()
                    )),
                };
                events.push(Event::YamlDone { job, result });
            } else {
                log::debug!("reaped pid {pid} ({})", describe_exit(exit));
            }
        }
        let escapees = self.build.as_ref().is_some_and(|b| b.leader_exit.is_some())
            && !self.build_processes().is_empty();
        if let Some(b) = self.build.as_mut() {
            if let Some(exit) = b.leader_exit {
                let alive = group_alive(b.pgid) || escapees;
                if !b.exit_reported {
                    b.exit_reported = true;
                    log::info!(
                        "build {}: appsdk ended ({})",
                        b.build_id,
                        describe_exit(exit)
                    );
                    events.push(Event::BuildExited {
                        build_id: b.build_id,
                        exit,
                        group_alive: alive,
                        deployed: log_shows_success(&b.log_file),
                    });
                }
                if !alive {
                    events.push(Event::GroupGone {
                        build_id: b.build_id,
                    });
                    self.build = None;
                }
            }
        }
        events
    }

    /// Whether a build process is still being tracked.
    pub fn build_running(&self) -> bool {
        self.build.is_some()
    }
}

/// The SDK's last log line on success.
pub const SUCCESS_LINE: &str = "DEBUG: Deploy ovmf.qcow2";

/// Does the log end with the SDK's success line? (Reads only its tail.)
fn log_shows_success(log: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = crate::fsutil::open_regular_read(log) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(4096))).is_err()
        || f.read_to_end(&mut tail).is_err()
    {
        return false;
    }
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.contains(SUCCESS_LINE))
}

/// The children of `pid` (all its threads'), from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(list) = fs::read_to_string(t.path().join("children")) {
                out.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    out
}

fn decode_status(status: i32) -> Exit {
    if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Code(libc::WEXITSTATUS(status))
    }
}

pub fn describe_exit(exit: Exit) -> String {
    match exit {
        Exit::Code(c) => format!("exit code {c}"),
        Exit::Signal(s) => format!("killed by signal {s}"),
    }
}

/// Does any process remain in group `pgid`?
pub fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks.
    let r = unsafe { libc::kill(-pgid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Field 22 of /proc/<pid>/stat: when the process started.
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills every process that carries `TAG_VAR=tag` in its environment: what
/// a previous latd on this channel started and could not record (it was
/// killed between the fork and saving the pid) or that left the build's
/// process group. Returns how many were killed.
pub fn kill_tagged(tag: &str) -> usize {
    let needle = format!("{TAG_VAR}={tag}");
    let me = std::process::id();
    let mut killed = 0;
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = fs::read(p.path().join("environ")) else {
            continue;
        };
        if environ.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
            log::warn!("killing pid {pid}, left by a previous latd on this channel");
            // SAFETY: kill has no memory effects.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

/// Removes `CLEAN_DIRS` under `workdir` in a background thread; the
/// outcome arrives on `done` and `wake` is poked.
pub fn start_clean(
    job: JobId,
    workdir: PathBuf,
    done: mpsc::Sender<Event>,
    wake: impl FnOnce() + Send + 'static,
) {
    std::thread::spawn(move || {
        let mut result = Ok(());
        for d in CLEAN_DIRS {
            if let Err(e) = crate::tree::remove_tree(&workdir.join(d)) {
                result = Err(e);
                break;
            }
        }
        match &result {
            Ok(()) => log::info!("clean of {} done", workdir.display()),
            Err(e) => log::error!("clean of {} failed: {e}", workdir.display()),
        }
        let _ = done.send(Event::CleanDone { job, result });
        wake();
    });
}

/// Loads the persisted state; a missing file is a fresh start, a corrupt one
/// is kept aside (never silently overwritten) and a fresh start made.
pub fn load_state(path: &Path) -> Persisted {
    match crate::fsutil::read_capped(path, 16 << 20).map(|(bytes, _, _)| bytes) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                let aside = path.with_extension("json.corrupt");
                log::error!(
                    "{} is unreadable ({e}); moved to {} and starting afresh",
                    path.display(),
                    aside.display()
                );
                let _ = fs::rename(path, aside);
                Persisted::default()
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Persisted::default(),
        Err(e) => {
            log::error!("cannot read {}: {e}; starting afresh", path.display());
            Persisted::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_of_self() {
        assert!(process_start_ticks(std::process::id() as i32).unwrap() > 0);
    }
}
