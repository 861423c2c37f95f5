//! Performs what the machine asks: starts, signals and reaps processes,
//! removes trees, saves state. Outcomes come back as [`Event`]s. No
//! decisions are taken here beyond how to carry an effect out.

use crate::machine::{
    example_yaml, BuildKind, BuildRecord, BuildRequest, Event, Exit, JobId, LogNews, ProcessId,
    Sig, YamlOutcome,
};
use crate::mounts;
use crate::sdklog::{self, LogWatch};
use rustix::process::{Pid, Signal, WaitOptions, WaitStatus};
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
    /// identity, see [`channel_mark`]), so a restarted latd can find what a
    /// crashed one left.
    pub tag: String,
    /// The canonical workspace root: workdirs are opened beneath it
    /// without following symlinks.
    pub root: PathBuf,
    /// latd's own directory (mode 0700) for the private copies of image
    /// YAMLs the SDK is given; `None` if it could not be made.
    pub private_dir: Option<PathBuf>,
}

/// Makes (or takes up again) latd's private directory for the copies of
/// image YAMLs, `latd-<uid>-<channel mark>` in the temporary directory: a
/// directory of this user's, mode 0700, not a symlink. `None` if that
/// cannot be had (then the SDK gets the client's path, with a warning).
pub fn private_dir(tag: &str) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let name: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let dir = std::env::temp_dir().join(format!("latd-{}-{name}", crate::fsutil::euid()));
    let _ = fs::DirBuilder::new().mode(0o700).create(&dir);
    match fs::symlink_metadata(&dir) {
        Ok(md)
            if md.is_dir()
                && md.uid() == crate::fsutil::euid()
                && md.permissions().mode() & 0o077 == 0 =>
        {
            Some(dir)
        }
        _ => {
            log::warn!(
                "cannot use {} as latd's private directory (not a 0700 directory of ours): the SDK will read image YAMLs where clients put them",
                dir.display()
            );
            None
        }
    }
}

/// What the SDK is given as the image YAML: a private copy, made from the
/// file reached beneath the workspace root without following a symlink
/// (the path latd checked), so a client who swaps the file or a directory
/// on its path for a symlink after the check cannot make root read
/// another file. Without a private directory, the checked path itself.
fn yaml_for_sdk(sdk: &SdkConfig, build_id: u64, yaml: &Path) -> Result<PathBuf, String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let Some(private) = &sdk.private_dir else {
        return Ok(yaml.to_path_buf());
    };
    let swapped = |e: io::Error| {
        format!(
            "the image YAML {} cannot be read as it was checked ({e}); was it replaced by a symlink?",
            yaml.display()
        )
    };
    let (Some(parent), Some(name)) = (yaml.parent(), yaml.file_name()) else {
        return Err(format!("{} is not a file path", yaml.display()));
    };
    let dir = crate::fsutil::open_dir_beneath(&sdk.root, parent).map_err(swapped)?;
    let f = crate::fsutil::open_regular_at(&dir, name).map_err(swapped)?;
    let cap = crate::protocol::MAX_MESSAGE_BYTES;
    let mut bytes = Vec::new();
    f.take(cap + 1).read_to_end(&mut bytes).map_err(swapped)?;
    if bytes.len() as u64 > cap {
        return Err(format!(
            "the image YAML {} grew past 1 MiB after it was checked",
            yaml.display()
        ));
    }
    // One copy at a time: the last build's goes now.
    for e in fs::read_dir(private).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("build-") {
            let _ = fs::remove_file(e.path());
        }
    }
    let copy = private.join(format!("build-{build_id}.yaml"));
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&copy)
        .and_then(|mut out| out.write_all(&bytes))
        .map_err(|e| format!("cannot make the private copy {}: {e}", copy.display()))?;
    Ok(copy)
}

/// Environment variable that marks the processes latd starts.
pub const TAG_VAR: &str = "LATD_CHANNEL";

/// The channel's identity, for [`TAG_VAR`]: `<device>:<inode>` of the
/// channel directory. Unlike its path, it differs between two volumes
/// mounted at the same path (in two mount namespaces), and a client cannot
/// forge it; it stays the same while the directory lives on its mount.
pub fn channel_mark(dir: &Path) -> io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(dir)?;
    Ok(format!("dev{}:ino{}", md.dev(), md.ino()))
}
/// Environment variable that says which job a process belongs to:
/// `build-<id>` or `getyaml-<job>`.
pub const JOB_VAR: &str = "LATD_JOB";

/// Opens `workdir` beneath the workspace root and its `log/` directory,
/// and creates `log/<out>` afresh; no step follows a symlink, so a workdir
/// or log dir swapped for one after the request was checked is refused.
/// The directories the SDK will write into (`also`: `deploy/` for a build,
/// `exampleyamls/` for getyaml) are made the same way, so a symlink planted
/// there beforehand is refused instead of sending root's writes (and the
/// SDK's removals) out of the workspace.
/// With `rotate`, the previous `log.appsdk` is kept as `log.appsdk.previous`
/// and old `log.appsdk_<secs>` files beyond [`sdklog::KEEP_LOGS`] go.
/// Returns the workdir, the output file and the log directory.
fn prepare(
    sdk: &SdkConfig,
    workdir: &Path,
    out: &str,
    rotate: bool,
    also: &str,
) -> Result<(fs::File, fs::File, fs::File), String> {
    use crate::fsutil;
    let dir = fsutil::open_dir_beneath(&sdk.root, workdir)
        .map_err(|e| format!("cannot open {}: {e}", workdir.display()))?;
    let log = fsutil::ensure_subdir_at(&dir, "log")
        .map_err(|e| format!("cannot use {}: {e}", workdir.join("log").display()))?;
    // The log directory is the workspace owner's, even one an older SDK or
    // daemon made as root: latc, run as that owner, sets an earlier log
    // aside in it when a build could not be started.
    fsutil::own_like(&log, &dir);
    fsutil::ensure_subdir_at(&dir, also)
        .map_err(|e| format!("cannot use {}: {e}", workdir.join(also).display()))?;
    if rotate {
        match fsutil::rename_at(&log, sdklog::LOG_NAME, "log.appsdk.previous") {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                log::warn!("cannot keep the previous log: {e}")
            }
            _ => {}
        }
        sdklog::prune(&log, sdklog::KEEP_LOGS);
    }
    let file = fsutil::create_fresh_at(&log, out, 0o644).map_err(|e| {
        format!(
            "cannot create {}: {e}",
            workdir.join("log").join(out).display()
        )
    })?;
    Ok((dir, file, log))
}

/// Sets up `cmd` to run in the directory `dir` (entered by descriptor, not
/// by path), with output to `out`, marked as latd's and as `job`, in a
/// process group of its own, and in the build's `cgroup` if there is one.
fn configure(
    cmd: &mut Command,
    dir: &fs::File,
    out: fs::File,
    sdk: &SdkConfig,
    job: &str,
    cgroup: Option<&crate::cgroup::BuildCgroup>,
) -> io::Result<()> {
    let dir = dir.try_clone()?;
    let procs = cgroup.map(|cg| cg.procs_for_child()).transpose()?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env(TAG_VAR, &sdk.tag)
        .env(JOB_VAR, job)
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed: it makes two bare system
    // calls through rustix (write, fchdir), with no allocation and no
    // lock, on descriptors the closure owns (moved in).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                crate::cgroup::join(procs);
            }
            Ok(rustix::process::fchdir(&dir)?)
        });
    }
    Ok(())
}

/// Output directories `clean` removes under a workdir.
pub const CLEAN_DIRS: [&str; 4] = ["deploy", "exampleyamls", "workdir", "log"];

#[derive(Debug)]
struct RunningBuild {
    build_id: u64,
    pgid: i32,
    log: LogWatch,
    leader_exit: Option<Exit>,
    exit_reported: bool,
    /// The build's own cgroup, where there is cgroup v2: its processes
    /// whatever they did to their session or environment. Removed with
    /// the build.
    cgroup: Option<crate::cgroup::BuildCgroup>,
}

/// Every child process of the daemon: the build, getyaml jobs, and orphans
/// of the build that the kernel hands to us (we are a child subreaper).
#[derive(Debug, Default)]
pub struct Processes {
    /// Tracked from spawn until no process of its group remains.
    build: Option<RunningBuild>,
    /// What was mounted under the last build's workdir before it started;
    /// kept until the machine asks for the build's mounts to go.
    mounts: Option<(u64, mounts::Snapshot)>,
    yaml_jobs: HashMap<i32, (JobId, PathBuf)>,
}

impl Processes {
    /// Makes the daemon the reaper of its descendants' orphans, so that a
    /// build process whose parent died is still ours to reap and to kill.
    pub fn become_subreaper() {
        // Any pid turns the attribute on (None turns it off).
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            log::warn!("cannot become the reaper of orphaned build processes: {e}");
        }
    }

    /// Starts a build in its own process group, output kept in `log/`.
    pub fn spawn_build(&mut self, sdk: &SdkConfig, build_id: u64, req: &BuildRequest) -> Event {
        let snapshot = mounts::Snapshot::take(&req.workdir);
        let cgroup = crate::cgroup::BuildCgroup::create(&sdk.tag, build_id);
        match self.try_spawn_build(sdk, build_id, req, cgroup.as_ref()) {
            Ok((pid, process, log)) => {
                let mounts_before = snapshot.ids();
                let mounts_ns = mounts::namespace();
                self.mounts = Some((build_id, snapshot));
                self.build = Some(RunningBuild {
                    build_id,
                    pgid: pid,
                    log,
                    leader_exit: None,
                    exit_reported: false,
                    cgroup,
                });
                log::info!(
                    "build {build_id} started: pid {pid}, {} in {}",
                    req.yaml_file.display(),
                    req.workdir.display()
                );
                Event::Spawned {
                    build_id,
                    process,
                    mounts_before,
                    mounts_ns,
                }
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
        build_id: u64,
        req: &BuildRequest,
        cgroup: Option<&crate::cgroup::BuildCgroup>,
    ) -> Result<(i32, ProcessId, LogWatch), String> {
        let (dir, console, log_dir) = prepare(sdk, &req.workdir, "console.log", true, "deploy")?;
        // The SDK names its log for the second it opens it, and appends to
        // a file of that name: an SDK started in the second of the last
        // one's log would write into that build's file, whose last lines
        // (an error, latd's end line) build-image's `tail -f` shows first.
        // So appsdk starts once that second is past (at most 2 s: a name
        // from the future is a client's, or a clock that went back).
        let wait_ms = pause_before_sdk(&log_dir);
        let log = LogWatch::new(log_dir, req.workdir.join("log"));
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
                cmd.args([
                    "-c",
                    "if [ \"$3\" != 0 ]; then sleep \"$3\"; fi; . \"$0\" && exec appsdk --log-dir log \"$1\" \"$2\"",
                ])
                .arg(&sdk.env_script)
                .arg(sub)
                .arg(yaml_for_sdk(sdk, build_id, &req.yaml_file)?)
                .arg(if wait_ms == 0 {
                    "0".to_string()
                } else {
                    format!("{}.{:03}", wait_ms / 1000, wait_ms % 1000)
                });
            }
        }
        configure(
            &mut cmd,
            &dir,
            console,
            sdk,
            &format!("build-{build_id}"),
            cgroup,
        )
        .map_err(|e| format!("cannot set up the build: {e}"))?;
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
            log,
        ))
    }

    /// Starts `appsdk exampleyamls` in `workdir`.
    pub fn spawn_getyaml(&mut self, sdk: &SdkConfig, job: JobId, workdir: &Path) -> Option<Event> {
        let spawned = prepare(sdk, workdir, "getyaml.log", false, "exampleyamls").and_then(
            |(dir, out, _)| {
                let mut cmd = Command::new("bash");
                cmd.args([
                    "-c",
                    ". \"$0\" && exec appsdk exampleyamls --pkg-type external-debian",
                ])
                .arg(&sdk.env_script);
                configure(
                    &mut cmd,
                    &dir,
                    out,
                    sdk,
                    &format!("getyaml-{}", job.0),
                    None,
                )
                .and_then(|()| cmd.spawn())
                .map_err(|e| format!("cannot run appsdk exampleyamls: {e}"))
            },
        );
        match spawned {
            Ok(child) => {
                self.yaml_jobs
                    .insert(child.id() as i32, (job, workdir.to_path_buf()));
                None
            }
            Err(e) => Some(Event::YamlDone {
                job,
                outcome: YamlOutcome::NotStarted(e),
            }),
        }
    }

    /// Signals the whole process group of a build, and every process of it
    /// that left the group (`setsid`): as we are their subreaper, they are
    /// still our descendants.
    pub fn signal(&mut self, build_id: u64, sig: Sig) {
        let (signo, name) = match sig {
            Sig::Term => (Signal::TERM, "SIGTERM"),
            Sig::Kill => (Signal::KILL, "SIGKILL"),
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
        kill_group(pgid, signo);
        if sig == Sig::Kill {
            if let Some(cg) = self.build.as_ref().and_then(|b| b.cgroup.as_ref()) {
                cg.kill();
            }
        }
        for pid in self.build_processes(build_id) {
            if group_of(pid).is_some_and(|group| group != pgid) {
                log::info!("build {build_id}: sending {name} to pid {pid}, outside its group");
                kill_pid(pid, signo);
            }
        }
    }

    /// Build `build_id`'s processes among our descendants, wherever they
    /// moved: those marked as its job, and those whose mark is gone (a
    /// scrubbed environment), but never a getyaml's.
    fn build_processes(&self, build_id: u64) -> Vec<i32> {
        let mine = format!("build-{build_id}");
        // Everything in the build's cgroup is the build's, whatever its
        // session or environment says.
        let mut caged = self
            .build
            .as_ref()
            .filter(|b| b.build_id == build_id)
            .and_then(|b| b.cgroup.as_ref())
            .map(|cg| cg.pids())
            .unwrap_or_default();
        let mut found: Vec<i32> = descendants()
            .into_iter()
            .filter(|&pid| {
                // A getyaml's group is never the build's, whatever its
                // environment says (or cannot say, while it waits on disk).
                !group_of(pid).is_some_and(|group| self.yaml_jobs.contains_key(&group))
                    && match job_of(pid) {
                        Some(job) => job == mine,
                        None => true,
                    }
            })
            .collect();
        caged.retain(|pid| !found.contains(pid));
        found.append(&mut caged);
        found
    }

    /// Kills a getyaml job and everything it started.
    fn kill_job(&self, pid: i32, job: JobId) {
        // The job leads its group.
        kill_group(pid, Signal::KILL);
        let mark = format!("getyaml-{}", job.0);
        for p in descendants() {
            if job_of(p).as_deref() == Some(mark.as_str()) {
                kill_pid(p, Signal::KILL);
            }
        }
    }

    /// Kills a getyaml job that overran its time.
    pub fn cancel_job(&mut self, job: JobId) {
        for (&pid, (j, workdir)) in &self.yaml_jobs {
            if *j == job {
                log::warn!(
                    "killing appsdk exampleyamls in {} (pid {pid}): it overran",
                    workdir.display()
                );
                self.kill_job(pid, job);
            }
        }
    }

    /// Kills getyaml jobs (on exit: none outlives latd).
    pub fn kill_jobs(&mut self) {
        for (&pid, &(job, _)) in &self.yaml_jobs {
            self.kill_job(pid, job);
        }
    }

    /// Reaps every exited child and reports what ended.
    pub fn reap(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        // Any child (wait(2)'s -1; rustix's waitpid(None) is 0: our group).
        while let Ok(Some((pid, status))) = rustix::process::wait(WaitOptions::NOHANG) {
            let pid = pid.as_raw_nonzero().get();
            let exit = decode_status(status);
            if let Some(b) = self.build.as_mut().filter(|b| b.pgid == pid) {
                b.leader_exit = Some(exit);
            } else if let Some((job, workdir)) = self.yaml_jobs.remove(&pid) {
                let yaml_made = example_yaml(&workdir).is_file();
                events.push(Event::YamlDone {
                    job,
                    outcome: YamlOutcome::Exited { exit, yaml_made },
                });
            } else {
                log::debug!("reaped pid {pid} ({exit})");
            }
        }
        // Once the leader is gone, what is left of the build is looked for
        // among our descendants too (they may have left the group).
        let escapees = match &self.build {
            Some(b) if b.leader_exit.is_some() => !self.build_processes(b.build_id).is_empty(),
            _ => false,
        };
        if let Some(b) = self.build.as_mut() {
            if let Some(exit) = b.leader_exit {
                let alive = group_alive(b.pgid) || escapees;
                if !b.exit_reported {
                    b.exit_reported = true;
                    // Whatever the SDK logged last is known before its exit.
                    let news = b.log.poll(None);
                    if news != LogNews::default() {
                        events.push(Event::LogRead {
                            build_id: b.build_id,
                            news,
                        });
                    }
                    log::info!("build {}: appsdk ended ({})", b.build_id, exit);
                    events.push(Event::BuildExited {
                        build_id: b.build_id,
                        exit,
                        group_alive: alive,
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

    /// What the running build's SDK logged since the last look (at most a
    /// few MiB per call, so a huge log cannot stall the loop).
    pub fn watch_log(&mut self) -> Option<Event> {
        let b = self.build.as_mut().filter(|b| b.leader_exit.is_none())?;
        let news = b.log.poll(Some(4 << 20));
        (news != LogNews::default()).then_some(Event::LogRead {
            build_id: b.build_id,
            news,
        })
    }

    /// Unmounts what build `build_id` left under its workdir.
    pub fn release_mounts(&mut self, build_id: u64, root: &Path) {
        let Some((id, snapshot)) = self.mounts.take() else {
            return;
        };
        if id != build_id {
            self.mounts = Some((id, snapshot));
            return;
        }
        release_mounts(build_id, &snapshot, root);
    }
}

/// Unmounts what build `build_id` left under its workdir (what is not in
/// `snapshot`), below the workspace `root`, and says what it did.
pub fn release_mounts(build_id: u64, snapshot: &mounts::Snapshot, root: &Path) {
    let (done, failed) = snapshot.release(root);
    for p in done {
        log::info!(
            "build {build_id}: unmounted {} (left by the build)",
            p.display()
        );
    }
    for (p, e) in failed {
        log::error!("build {build_id}: cannot unmount {}: {e}", p.display());
    }
}

/// How long to wait before starting the SDK so that it does not open the
/// `log.appsdk_<secs>` of an earlier build in `log_dir` (see
/// [`sdklog::pause_before_sdk`]).
fn pause_before_sdk(log_dir: &fs::File) -> u64 {
    let names = crate::fsutil::dir_entries(log_dir);
    sdklog::pause_before_sdk(names.iter().map(String::as_str), crate::clock::wall_now())
}

/// Every descendant of this process, from /proc.
fn descendants() -> Vec<i32> {
    let mut out = Vec::new();
    let mut queue = vec![std::process::id() as i32];
    while let Some(parent) = queue.pop() {
        for pid in children_of(parent) {
            out.push(pid);
            queue.push(pid);
        }
    }
    out
}

/// Whether `pid` is in uninterruptible sleep: reading its environment could
/// then block us too (it may hold its memory lock).
fn in_kernel_wait(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('D'))
        })
        .unwrap_or(false)
}

/// The value of `name` in the environment of `pid`, if readable.
fn env_of(pid: i32, name: &str) -> Option<String> {
    if in_kernel_wait(pid) {
        return None;
    }
    let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Which job of ours `pid` belongs to (its [`JOB_VAR`]).
fn job_of(pid: i32) -> Option<String> {
    env_of(pid, JOB_VAR)
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

fn decode_status(status: WaitStatus) -> Exit {
    match status.terminating_signal() {
        Some(signo) => Exit::Signal(signo),
        None => Exit::Code(status.exit_status().unwrap_or(0)),
    }
}

/// Sends `sig` to process group `pgid`; one that is gone is no error.
fn kill_group(pgid: i32, sig: Signal) {
    if let Some(pgid) = Pid::from_raw(pgid) {
        let _ = rustix::process::kill_process_group(pgid, sig);
    }
}

/// Sends `sig` to process `pid`; one that is gone is no error.
fn kill_pid(pid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// The process group of `pid`, if it still lives.
fn group_of(pid: i32) -> Option<i32> {
    let group = rustix::process::getpgid(Some(Pid::from_raw(pid)?)).ok()?;
    Some(group.as_raw_nonzero().get())
}

/// Does any process remain in group `pgid`?
pub fn group_alive(pgid: i32) -> bool {
    let Some(pgid) = Pid::from_raw(pgid) else {
        return false;
    };
    // EPERM: a member lives, under another user.
    matches!(
        rustix::process::test_kill_process_group(pgid),
        Ok(()) | Err(rustix::io::Errno::PERM)
    )
}

/// Field 22 of /proc/<pid>/stat: when the process started.
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What the log of build `b` (one a previous latd ran) shows.
pub fn read_build_log(b: &BuildRecord, root: &Path) -> LogNews {
    b.sdk_log
        .iter()
        .chain(std::iter::once(&b.log_file))
        .find_map(|p| sdklog::scan_path(root, p).ok())
        .unwrap_or_default()
}

/// Whether anything is left of what a previous latd on this channel
/// started: a process with the channel's mark, or one in its builds'
/// cgroups.
pub fn anything_left(tag: &str) -> bool {
    crate::cgroup::leftover_count(tag) > 0 || !tagged(tag).is_empty()
}

/// Kills what a previous latd on this channel left: what is in its
/// builds' cgroups first (nothing escapes those), then whatever carries
/// the channel's mark; releases what its build `current` left mounted;
/// reads that build's log. Returns how many processes were killed, and
/// the log.
pub fn clear_build_left(tag: &str, current: Option<&BuildRecord>, root: &Path) -> (usize, LogNews) {
    let mut killed = crate::cgroup::kill_leftovers(tag) + kill_tagged(tag);
    let Some(b) = current else {
        if killed > 0 {
            log::warn!("killed {killed} processes a previous latd left behind");
        }
        return (killed, LogNews::default());
    };
    // A child forked just before the old latd died shows the mark only once
    // it has exec'd: look again after a moment.
    std::thread::sleep(std::time::Duration::from_millis(200));
    killed += kill_tagged(tag);
    log::warn!(
        "build {} was started by the latd before this one; {killed} of its processes were left and killed",
        b.id
    );
    // What it left mounted under its workdir goes too (known only once it
    // had started: the mounts that were there before are kept).
    // Only in the namespace they were noted in: a restarted container has
    // a new one, where the dead build's mounts are gone with the old, and
    // what is mounted was mounted before this latd started.
    match (&b.mounts_before, &b.mounts_ns) {
        (Some(before), Some(ns)) if *ns == mounts::namespace() => {
            let snapshot = mounts::Snapshot::from_ids(&b.workdir, before);
            release_mounts(b.id, &snapshot, root);
        }
        (Some(_), _) => log::info!(
            "build {}: its mounts were noted in another mount namespace (a new container): none of those here is its",
            b.id
        ),
        (None, _) => {}
    }
    (killed, read_build_log(b, root))
}

/// Kills every process that carries `TAG_VAR=tag` in its environment: what
/// a previous latd on this channel started and could not record (it was
/// killed between the fork and saving the pid) or that left the build's
/// process group. Returns how many were killed.
pub fn kill_tagged(tag: &str) -> usize {
    let pids = tagged(tag);
    for &pid in &pids {
        log::warn!("killing pid {pid}, left by a previous latd on this channel");
        kill_pid(pid, Signal::KILL);
    }
    pids.len()
}

/// The live processes (not zombies) that carry `TAG_VAR=tag`, but this one.
pub fn tagged(tag: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|&pid| pid != me && !is_zombie(pid))
        .filter(|&pid| env_of(pid, TAG_VAR).as_deref() == Some(tag))
        .collect()
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Removes `CLEAN_DIRS` under `workdir` (below the workspace `root`) in a
/// background thread; the outcome arrives on `done` and `wake` is poked.
pub fn start_clean(
    job: JobId,
    root: PathBuf,
    workdir: PathBuf,
    done: mpsc::Sender<Event>,
    wake: impl FnOnce() + Send + 'static,
) {
    std::thread::spawn(move || {
        // Whatever happens, the outcome is reported: a clean that never
        // reports would leave the daemon cleaning for ever.
        let result = std::panic::catch_unwind(|| {
            CLEAN_DIRS
                .iter()
                .try_for_each(|d| crate::tree::remove_tree_beneath(&root, &workdir.join(d)))
        })
        .unwrap_or_else(|_| {
            Err(format!(
                "internal error while cleaning {}",
                workdir.display()
            ))
        });
        match &result {
            Ok(()) => log::info!("clean of {} done", workdir.display()),
            Err(e) => log::error!("clean of {} failed: {e}", workdir.display()),
        }
        let _ = done.send(Event::CleanDone { job, result });
        wake();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_of_self() {
        assert!(process_start_ticks(std::process::id() as i32).unwrap() > 0);
    }
}
