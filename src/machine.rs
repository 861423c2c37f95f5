//! The daemon's logic as a pure state machine.
//!
//! **Architecture invariant:** nothing in this module performs I/O or reads a
//! clock. Time arrives inside [`Machine::step`]; what must happen comes back
//! as [`Effect`]s for the driver to perform. Outcomes of effects (a process
//! started, exited, a clean finished) come back in as [`Event`]s.
//!
//! Every transition lives in one place, [`rule`]: a match over
//! (state kind, event kind) with no wildcard arm. [`Machine::step`] looks the
//! rule up and runs its handler; the state diagram and the exhaustive table
//! test walk the same function, so code, diagram and tests cannot drift.
//!
//! Calling rule for the driver: after every `step`, perform all returned
//! effects in order before the next `step`; feed the outcome of each effect
//! (e.g. [`Event::Spawned`]) back as the next event.
//!
//! ```
//! use latd::machine::*;
//! use latd::protocol::ReplyResult;
//! use std::path::PathBuf;
//!
//! let config = Config {
//!     grace_ms: 20_000,
//!     status_file: "/c/status.lat".into(),
//!     history_cap: 50,
//!     pid: 1,
//!     version: "test".into(),
//!     started_at: 0,
//! };
//! let mut m = Machine::new(config, Persisted::default(), 0, Recovered::default());
//! let build = BuildRequest {
//!     workdir: "/w".into(),
//!     yaml_file: "/w/lat.yaml".into(),
//!     kind: BuildKind::Genimage,
//! };
//! // A build request asks for a spawn; the reply waits for its outcome.
//! let fx = m.step(10, Event::Request { id: ReqId(1), request: Request::Build(build) });
//! assert!(fx.iter().any(|e| matches!(e, Effect::Spawn { build_id: 1, .. })));
//! let process = ProcessId { pid: 42, start_ticks: 7 };
//! let fx = m.step(11, Event::Spawned { build_id: 1, process, mounts_before: vec![], mounts_ns: String::new() });
//! assert!(matches!(fx.last(), Some(Effect::Reply { id: ReqId(1), reply })
//!     if reply.result == ReplyResult::Succeed));
//! assert_eq!(m.status(12).lat_status, "busy");
//! ```

// The architecture invariant, as a lint: clippy.toml lists the clocks,
// file and process APIs this module may not use.
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

use crate::protocol::{Action, Reply, StatusDoc};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::PathBuf;

/// Milliseconds since the Unix epoch, as handed in by the driver.
pub type Millis = u64;

/// Opaque handle of a request; the driver knows where to send its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);

/// Opaque handle of a background job (clean, getyaml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobId(pub u64);

/// Fixed facts the machine reports but never changes.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a build gets between SIGTERM and SIGKILL.
    pub grace_ms: u64,
    /// Path reported in `status_file:` replies.
    pub status_file: PathBuf,
    /// How many finished builds the history keeps.
    pub history_cap: usize,
    pub pid: u32,
    pub version: String,
    pub started_at: Millis,
}

/// Which SDK command a build runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildKind {
    Genimage,
    Geninitramfs,
}

/// A build request whose paths the driver has already checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    pub workdir: PathBuf,
    pub yaml_file: PathBuf,
    pub kind: BuildKind,
}

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Build(BuildRequest),
    Status,
    Stop,
    /// The log of a workdir: `<workdir>/log/log.appsdk`, and why it cannot
    /// be opened, if it cannot (the driver looked).
    Logs {
        path: PathBuf,
        missing: Option<String>,
    },
    Clean {
        workdir: PathBuf,
    },
    GetYaml {
        workdir: PathBuf,
    },
}

impl Request {
    pub fn action(&self) -> Action {
        match self {
            Request::Build(_) => Action::Build,
            Request::Status => Action::Status,
            Request::Stop => Action::Stop,
            Request::Logs { .. } => Action::Logs,
            Request::Clean { .. } => Action::Clean,
            Request::GetYaml { .. } => Action::Getyaml,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// What the driver read in the SDK's log since it last looked (only from
/// the file the SDK itself created, held open from when it appeared).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogNews {
    /// The SDK's log file appeared (the target of `log.appsdk`).
    pub file: Option<PathBuf>,
    /// A line containing the success marker was logged.
    pub success: bool,
    /// The first line containing the failure marker.
    pub error: Option<String>,
}

/// What the next daemon found of a build that was running when the last
/// one died.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Its processes that were still running and were killed.
    pub killed: usize,
    /// What its log shows, if it could be read.
    pub log: LogNews,
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

    fn finish(
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

/// What survives a daemon restart.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Persisted {
    /// The next build id to hand out.
    pub next_build_id: u64,
    /// The running build, if any (its record says Running).
    pub current: Option<BuildRecord>,
    /// Finished builds, newest last.
    pub history: Vec<BuildRecord>,
}

/// Signals the machine asks the driver to send to a build's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Term,
    Kill,
}

/// What the driver must do. Plain data.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Answer request `id` (exactly once per request).
    Reply { id: ReqId, reply: Reply },
    /// Start build `build_id` in its own process group; report
    /// [`Event::Spawned`] or [`Event::SpawnFailed`].
    Spawn {
        build_id: u64,
        request: BuildRequest,
    },
    /// Signal the process group of build `build_id`.
    Signal { build_id: u64, sig: Sig },
    /// Remove the build outputs under `workdir`; report [`Event::CleanDone`].
    StartClean { job: JobId, workdir: PathBuf },
    /// Run `appsdk exampleyamls` in `workdir`; report [`Event::YamlDone`].
    StartGetYaml { job: JobId, workdir: PathBuf },
    /// Unmount what build `build_id` left mounted under its workdir (none
    /// of its processes remain); mounts that were there before it stay.
    ReleaseMounts { build_id: u64 },
    /// Append `line` to the SDK's log `file` of a build that ended without
    /// success and without an error line of the SDK's: whoever follows the
    /// log for its markers (build-image's `tail -f`) learns it ended.
    EndLog {
        build_id: u64,
        file: PathBuf,
        line: String,
    },
    /// Kill a background job that overran its time (no outcome expected).
    CancelJob { job: JobId },
    /// Write `status.lat`.
    WriteStatus(StatusDoc),
    /// Save what must survive a restart.
    Persist(Persisted),
    /// Everything is wound down: exit the process.
    Exit,
}

/// What the driver saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Request {
        id: ReqId,
        request: Request,
    },
    /// A request that could not be understood or whose paths were refused.
    Invalid {
        id: ReqId,
        action: Option<String>,
        reason: String,
    },
    Spawned {
        build_id: u64,
        process: ProcessId,
        /// The mounts under the workdir when the build started (their ids):
        /// kept, so that a later daemon too knows which ones are the build's.
        mounts_before: Vec<u64>,
        /// The mount namespace they are in.
        mounts_ns: String,
    },
    SpawnFailed {
        build_id: u64,
        reason: String,
    },
    /// What the build's SDK log showed since the last look (reported
    /// before the build's exit, and once more with what it logged last).
    LogRead {
        build_id: u64,
        news: LogNews,
    },
    /// The build's leader was reaped; `group_alive` if others remain.
    BuildExited {
        build_id: u64,
        exit: Exit,
        group_alive: bool,
    },
    /// No process of the build's group remains.
    GroupGone {
        build_id: u64,
    },
    CleanDone {
        job: JobId,
        result: Result<(), String>,
    },
    YamlDone {
        job: JobId,
        result: Result<PathBuf, String>,
    },
    /// Time passed; deadlines are checked.
    Tick,
    /// The daemon was asked to exit (SIGTERM, SIGINT).
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKind {
    Idle,
    Building,
    Stopping,
    Cleaning,
}

impl StateKind {
    pub const ALL: [StateKind; 4] = [
        StateKind::Idle,
        StateKind::Building,
        StateKind::Stopping,
        StateKind::Cleaning,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StateKind::Idle => "idle",
            StateKind::Building => "building",
            StateKind::Stopping => "stopping",
            StateKind::Cleaning => "cleaning",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Build,
    Status,
    Stop,
    Logs,
    Clean,
    GetYaml,
    Invalid,
    Spawned,
    SpawnFailed,
    LogRead,
    BuildExited,
    GroupGone,
    CleanDone,
    YamlDone,
    Tick,
    Shutdown,
}

impl EventKind {
    pub const ALL: [EventKind; 16] = [
        EventKind::Build,
        EventKind::Status,
        EventKind::Stop,
        EventKind::Logs,
        EventKind::Clean,
        EventKind::GetYaml,
        EventKind::Invalid,
        EventKind::Spawned,
        EventKind::SpawnFailed,
        EventKind::LogRead,
        EventKind::BuildExited,
        EventKind::GroupGone,
        EventKind::CleanDone,
        EventKind::YamlDone,
        EventKind::Tick,
        EventKind::Shutdown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Build => "build",
            EventKind::Status => "status",
            EventKind::Stop => "stop",
            EventKind::Logs => "logs",
            EventKind::Clean => "clean",
            EventKind::GetYaml => "getyaml",
            EventKind::Invalid => "invalid",
            EventKind::Spawned => "spawned",
            EventKind::SpawnFailed => "spawn-failed",
            EventKind::LogRead => "log-read",
            EventKind::BuildExited => "build-exited",
            EventKind::GroupGone => "group-gone",
            EventKind::CleanDone => "clean-done",
            EventKind::YamlDone => "yaml-done",
            EventKind::Tick => "tick",
            EventKind::Shutdown => "shutdown",
        }
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Request { request, .. } => match request {
                Request::Build(_) => EventKind::Build,
                Request::Status => EventKind::Status,
                Request::Stop => EventKind::Stop,
                Request::Logs { .. } => EventKind::Logs,
                Request::Clean { .. } => EventKind::Clean,
                Request::GetYaml { .. } => EventKind::GetYaml,
            },
            Event::Invalid { .. } => EventKind::Invalid,
            Event::Spawned { .. } => EventKind::Spawned,
            Event::SpawnFailed { .. } => EventKind::SpawnFailed,
            Event::LogRead { .. } => EventKind::LogRead,
            Event::BuildExited { .. } => EventKind::BuildExited,
            Event::GroupGone { .. } => EventKind::GroupGone,
            Event::CleanDone { .. } => EventKind::CleanDone,
            Event::YamlDone { .. } => EventKind::YamlDone,
            Event::Tick => EventKind::Tick,
            Event::Shutdown => EventKind::Shutdown,
        }
    }
}

/// What a rule does, by name. [`Machine::step`] runs the handler of that
/// name; the diagram prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Does {
    /// Write status.lat and answer with its path.
    ReplyStatus,
    /// Answer with the log's path, or why there is none.
    ReplyLogs,
    /// Answer `fail` with the reason the request was refused.
    ReplyInvalid,
    /// Spawn the build; the reply waits for the spawn's outcome.
    StartBuild,
    /// Refuse a request because of what the daemon is doing.
    Refuse(&'static str),
    /// Answer a stop that has nothing to stop; the last result stays.
    NothingToStop,
    /// SIGTERM the build's group, or, once the SDK has logged its success
    /// line, let it finish by itself first; the reply waits until every
    /// process is gone.
    BeginStop,
    /// Another stop while stopping: wait with the first.
    JoinStop,
    StartClean,
    StartGetYaml,
    /// Record what the SDK's log showed (its file, its success line, its
    /// first error).
    NoteLog,
    /// The spawn succeeded: answer the build request.
    BuildStarted,
    /// The spawn failed: answer and record the failure.
    BuildNotStarted,
    /// The build ended by itself: record its result, or, if processes of
    /// its group remain, SIGKILL them and wait (in Stopping) until they
    /// are gone, so no new build or clean starts beside them.
    BuildEnded,
    /// The stopped build's leader ended: wait for its group.
    StoppedLeaderExited,
    /// The stopped build's group is gone: answer the stops.
    StopFinished,
    /// At the deadline, the next step of the stop: a build finishing after
    /// its success line gets SIGTERM, a terminated one SIGKILL; after the
    /// wait that follows SIGKILL the stop ends even if processes remain.
    /// (Checks the getyaml deadline too.)
    StopDeadline,
    /// A getyaml that overran its time is cancelled and answered.
    JobDeadline,
    CleanFinished,
    YamlFinished,
    /// Stop the build, then exit.
    ShutdownAfterStop,
    /// Remember to exit once the stop completes.
    ShutdownWhenStopped,
    /// Exit now.
    ShutdownNow,
    /// Nothing to do (stale or irrelevant event).
    Ignore,
}

/// One cell of the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The states this rule may lead to (the first is the usual one).
    pub to: &'static [StateKind],
    pub does: Does,
}

const fn rule_to(to: &'static [StateKind], does: Does) -> Rule {
    Rule { to, does }
}

const IDLE: &[StateKind] = &[StateKind::Idle];
const BUILDING: &[StateKind] = &[StateKind::Building];
const STOPPING: &[StateKind] = &[StateKind::Stopping];
const CLEANING: &[StateKind] = &[StateKind::Cleaning];

/// How long `appsdk exampleyamls` may take before it is killed.
pub const GETYAML_TIMEOUT_MS: Millis = 120_000;

/// After SIGKILL, how long to wait for the build's processes to go
/// before the stop is finished anyway.
pub const KILL_WAIT_MS: Millis = 10_000;

const BUILD_RUNNING: &str = "a build is already running";
const STOP_RUNNING: &str = "a build is being stopped";
const CLEAN_RUNNING: &str = "a clean is running";

/// The transition table: every (state, event) pair, no wildcard.
pub fn rule(state: StateKind, event: EventKind) -> Rule {
    use Does::*;
    use EventKind as E;
    use StateKind as S;
    match (state, event) {
        // Requests answered the same way in every state.
        (S::Idle, E::Status) => rule_to(IDLE, ReplyStatus),
        (S::Building, E::Status) => rule_to(BUILDING, ReplyStatus),
        (S::Stopping, E::Status) => rule_to(STOPPING, ReplyStatus),
        (S::Cleaning, E::Status) => rule_to(CLEANING, ReplyStatus),
        (S::Idle, E::Logs) => rule_to(IDLE, ReplyLogs),
        (S::Building, E::Logs) => rule_to(BUILDING, ReplyLogs),
        (S::Stopping, E::Logs) => rule_to(STOPPING, ReplyLogs),
        (S::Cleaning, E::Logs) => rule_to(CLEANING, ReplyLogs),
        (S::Idle, E::Invalid) => rule_to(IDLE, ReplyInvalid),
        (S::Building, E::Invalid) => rule_to(BUILDING, ReplyInvalid),
        (S::Stopping, E::Invalid) => rule_to(STOPPING, ReplyInvalid),
        (S::Cleaning, E::Invalid) => rule_to(CLEANING, ReplyInvalid),

        // build
        (S::Idle, E::Build) => rule_to(BUILDING, StartBuild),
        (S::Building, E::Build) => rule_to(BUILDING, Refuse(BUILD_RUNNING)),
        (S::Stopping, E::Build) => rule_to(STOPPING, Refuse(STOP_RUNNING)),
        (S::Cleaning, E::Build) => rule_to(CLEANING, Refuse(CLEAN_RUNNING)),
        (S::Building, E::Spawned) => rule_to(BUILDING, BuildStarted),
        // (The current state is listed too: an outcome about another
        // build id is stale and changes nothing.)
        (S::Building, E::SpawnFailed) => {
            rule_to(&[StateKind::Idle, StateKind::Building], BuildNotStarted)
        }
        (S::Building, E::BuildExited) => rule_to(
            &[StateKind::Idle, StateKind::Stopping, StateKind::Building],
            BuildEnded,
        ),
        (S::Idle | S::Cleaning | S::Stopping, E::Spawned | E::SpawnFailed) => {
            rule_to(state_slice(state), Ignore)
        }
        (S::Idle | S::Cleaning, E::BuildExited) => rule_to(state_slice(state), Ignore),
        (S::Building, E::LogRead) => rule_to(BUILDING, NoteLog),
        (S::Stopping, E::LogRead) => rule_to(STOPPING, NoteLog),
        (S::Idle | S::Cleaning, E::LogRead) => rule_to(state_slice(state), Ignore),

        // stop
        (S::Idle, E::Stop) => rule_to(IDLE, NothingToStop),
        (S::Cleaning, E::Stop) => rule_to(CLEANING, NothingToStop),
        (S::Building, E::Stop) => rule_to(STOPPING, BeginStop),
        (S::Stopping, E::Stop) => rule_to(STOPPING, JoinStop),
        (S::Stopping, E::BuildExited) => {
            rule_to(&[StateKind::Stopping, StateKind::Idle], StoppedLeaderExited)
        }
        (S::Stopping, E::GroupGone) => {
            rule_to(&[StateKind::Idle, StateKind::Stopping], StopFinished)
        }
        (S::Stopping, E::Tick) => rule_to(&[StateKind::Stopping, StateKind::Idle], StopDeadline),
        (S::Idle | S::Building | S::Cleaning, E::GroupGone) => rule_to(state_slice(state), Ignore),
        (S::Idle | S::Building | S::Cleaning, E::Tick) => rule_to(state_slice(state), JobDeadline),

        // clean
        (S::Idle, E::Clean) => rule_to(&[StateKind::Cleaning, StateKind::Idle], StartClean),
        (S::Building, E::Clean) => rule_to(BUILDING, Refuse(BUILD_RUNNING)),
        (S::Stopping, E::Clean) => rule_to(STOPPING, Refuse(STOP_RUNNING)),
        (S::Cleaning, E::Clean) => rule_to(CLEANING, Refuse(CLEAN_RUNNING)),
        (S::Cleaning, E::CleanDone) => {
            rule_to(&[StateKind::Idle, StateKind::Cleaning], CleanFinished)
        }
        (S::Idle | S::Building | S::Stopping, E::CleanDone) => rule_to(state_slice(state), Ignore),

        // getyaml runs beside a build, but not while a clean removes its output
        (S::Idle, E::GetYaml) => rule_to(IDLE, StartGetYaml),
        (S::Building, E::GetYaml) => rule_to(BUILDING, StartGetYaml),
        (S::Stopping, E::GetYaml) => rule_to(STOPPING, StartGetYaml),
        (S::Cleaning, E::GetYaml) => rule_to(CLEANING, Refuse(CLEAN_RUNNING)),
        (S::Idle, E::YamlDone) => rule_to(IDLE, YamlFinished),
        (S::Building, E::YamlDone) => rule_to(BUILDING, YamlFinished),
        (S::Stopping, E::YamlDone) => rule_to(STOPPING, YamlFinished),
        (S::Cleaning, E::YamlDone) => rule_to(CLEANING, YamlFinished),

        // shutdown
        (S::Idle, E::Shutdown) => rule_to(IDLE, ShutdownNow),
        (S::Cleaning, E::Shutdown) => rule_to(IDLE, ShutdownNow),
        (S::Building, E::Shutdown) => rule_to(STOPPING, ShutdownAfterStop),
        (S::Stopping, E::Shutdown) => rule_to(STOPPING, ShutdownWhenStopped),
    }
}

fn state_slice(s: StateKind) -> &'static [StateKind] {
    match s {
        StateKind::Idle => IDLE,
        StateKind::Building => BUILDING,
        StateKind::Stopping => STOPPING,
        StateKind::Cleaning => CLEANING,
    }
}

/// The machine's state, with the data each state needs.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Idle,
    Building {
        build: BuildRecord,
        /// The build request whose reply waits for the spawn's outcome.
        starting: Option<ReqId>,
    },
    Stopping {
        build: BuildRecord,
        /// When the next step of the stop is due.
        deadline: Millis,
        phase: StopPhase,
        /// The leader's exit, once reaped.
        exit: Option<Exit>,
        /// Stop requests answered when the group is gone.
        waiters: Vec<ReqId>,
        /// Whether the daemon exits afterwards.
        then_exit: bool,
        /// Whether a stop was asked for (by a client or a shutdown); if
        /// not, the build ended by itself and only its leftovers are killed.
        requested: bool,
        /// The SDK had logged its success line when the stop began (it was
        /// let finish rather than terminated).
        after_success: bool,
    },
    Cleaning {
        job: JobId,
        requester: ReqId,
    },
}

/// Where a stop stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopPhase {
    /// The SDK logged its success line: it is copying its last files and
    /// cleaning up; it gets the grace period to end by itself.
    Finishing,
    /// SIGTERM was sent; SIGKILL follows after the grace period.
    Terminating,
    /// SIGKILL was sent (repeated while anything of the build is left).
    Killing,
}

impl StopPhase {
    /// What status says the daemon is doing.
    pub fn describe(self) -> &'static str {
        match self {
            StopPhase::Finishing => "the SDK logged its success line and is finishing its deploy; waiting for it to exit by itself",
            StopPhase::Terminating => "SIGTERM sent; waiting for the build's processes to exit",
            StopPhase::Killing => "SIGKILL sent; waiting for the build's processes to go",
        }
    }
}

impl State {
    pub fn kind(&self) -> StateKind {
        match self {
            State::Idle => StateKind::Idle,
            State::Building { .. } => StateKind::Building,
            State::Stopping { .. } => StateKind::Stopping,
            State::Cleaning { .. } => StateKind::Cleaning,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct YamlJob {
    job: JobId,
    workdir: PathBuf,
    waiters: Vec<ReqId>,
    /// When it is cancelled if still running.
    deadline: Millis,
}

/// The daemon's logic. See the module docs.
#[derive(Debug, Clone)]
pub struct Machine {
    config: Config,
    state: State,
    next_build_id: u64,
    next_job: u64,
    /// Finished builds, newest last; the last one is what status reports
    /// when no build runs.
    history: VecDeque<BuildRecord>,
    getyaml: Option<YamlJob>,
    exited: bool,
    /// Set by a handler that changed what [`Machine::persisted`] returns
    /// without changing the state kind (a state change always persists).
    dirty: bool,
    /// See [`Machine::startup_effects`].
    startup: Vec<Effect>,
}

impl Machine {
    /// A machine starting idle from what a previous daemon persisted. A build
    /// that was running then is recorded with the result its log shows if it
    /// ended by itself meanwhile, else as failed, interrupted (the driver has
    /// already made sure none of its processes survive).
    pub fn new(config: Config, persisted: Persisted, now: Millis, found: Recovered) -> Machine {
        let mut history: VecDeque<BuildRecord> = persisted.history.into();
        let mut next_build_id = persisted.next_build_id.max(1);
        let mut recovered_end_log = Vec::new();
        if let Some(mut b) = persisted.current {
            if let Some(file) = found.log.file {
                b.sdk_log = Some(file);
            }
            b.success_logged |= found.log.success;
            if b.error_line.is_none() {
                b.error_line = found.log.error;
            }
            let (outcome, reason) = recovered_outcome(&b, found.killed);
            b.finish(now, None, outcome, reason);
            recovered_end_log.extend(end_log(&b));
            next_build_id = next_build_id.max(b.id + 1);
            history.push_back(b);
        }
        for b in &history {
            next_build_id = next_build_id.max(b.id + 1);
        }
        let mut m = Machine {
            config,
            state: State::Idle,
            next_build_id,
            next_job: 1,
            history,
            getyaml: None,
            exited: false,
            dirty: false,
            startup: recovered_end_log,
        };
        m.trim_history();
        m
    }

    /// What the driver must do before it serves (for a build that was
    /// running when the last daemon died). Returns it once.
    pub fn startup_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.startup)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn has_exited(&self) -> bool {
        self.exited
    }

    /// When the machine next needs a [`Event::Tick`], if ever.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let stop = match &self.state {
            State::Stopping { deadline, .. } => Some(*deadline),
            _ => None,
        };
        let job = self.getyaml.as_ref().map(|j| j.deadline);
        stop.into_iter().chain(job).min()
    }

    /// The build status reports: the running one, else the last finished.
    pub fn current_build(&self) -> Option<&BuildRecord> {
        match &self.state {
            State::Building { build, .. } | State::Stopping { build, .. } => Some(build),
            State::Idle | State::Cleaning { .. } => self.history.back(),
        }
    }

    pub fn history(&self) -> impl Iterator<Item = &BuildRecord> {
        self.history.iter()
    }

    /// The status document as of `now`.
    pub fn status(&self, now: Millis) -> StatusDoc {
        let kind = self.state.kind();
        let build = self.current_build().cloned();
        StatusDoc {
            lat_status: if kind == StateKind::Idle {
                "idle"
            } else {
                "busy"
            }
            .into(),
            build_status: build
                .as_ref()
                .map_or("not-started", |b| b.build_status())
                .into(),
            state: kind.name().into(),
            activity: self.activity(now),
            build_duration_ms: build.as_ref().map(|b| b.duration_ms(now)),
            build,
            daemon_pid: self.config.pid,
            version: self.config.version.clone(),
            started_at: self.config.started_at,
            uptime_s: now.saturating_sub(self.config.started_at) / 1000,
            updated_at: now,
        }
    }

    /// What the daemon is doing, in words, where the state name says too
    /// little.
    fn activity(&self, now: Millis) -> Option<String> {
        match &self.state {
            State::Stopping {
                phase, deadline, ..
            } => Some(format!(
                "{} (next step in {} s)",
                phase.describe(),
                deadline.saturating_sub(now).div_ceil(1000)
            )),
            State::Building { build, .. } if build.success_logged => {
                Some("the SDK logged its success line and is finishing its deploy".to_string())
            }
            State::Building { build, .. } if build.sdk_log.is_none() => {
                Some("starting: the SDK has not created its log yet".to_string())
            }
            _ => None,
        }
    }

    /// What must survive a restart.
    pub fn persisted(&self) -> Persisted {
        let current = match &self.state {
            State::Building { build, .. } | State::Stopping { build, .. } => Some(build.clone()),
            _ => None,
        };
        Persisted {
            next_build_id: self.next_build_id,
            current,
            history: self.history.iter().cloned().collect(),
        }
    }

    /// Feeds one event; returns what the driver must do, in order.
    pub fn step(&mut self, now: Millis, event: Event) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.exited {
            // After Exit nothing more happens, but requests still get an answer.
            if let Some((id, action)) = request_of(&event) {
                fx.push(Effect::Reply {
                    id,
                    reply: Reply::fail(&action, "latd is shutting down"),
                });
            }
            return fx;
        }
        let from = self.state.kind();
        let rule = rule(from, event.kind());
        self.dirty = false;
        self.run(rule.does, now, event, &mut fx);
        let to = self.state.kind();
        debug_assert!(
            rule.to.contains(&to),
            "{from:?} --{:?}--> {to:?} is not in the table",
            rule.does
        );
        if to != from || self.dirty {
            let persisted = self.persisted();
            // Persist before anything the other side may act on.
            fx.insert(0, Effect::WriteStatus(self.status(now)));
            fx.insert(0, Effect::Persist(persisted));
        }
        if self.exited {
            fx.push(Effect::Exit);
        }
        fx
    }

    fn run(&mut self, does: Does, now: Millis, event: Event, fx: &mut Vec<Effect>) {
        match (does, event) {
            (Does::ReplyStatus, Event::Request { id, .. }) => {
                fx.push(Effect::WriteStatus(self.status(now)));
                let mut reply = Reply::succeed("status");
                reply.status_file = Some(self.config.status_file.clone());
                reply.build_id = self.current_build().map(|b| b.id);
                fx.push(Effect::Reply { id, reply });
            }
            (
                Does::ReplyLogs,
                Event::Request {
                    id,
                    request: Request::Logs { path, missing },
                },
            ) => {
                // A build that runs there has that log, or will have it
                // once its SDK has started (seconds, or minutes).
                let running_here = match &self.state {
                    State::Building { build, .. } | State::Stopping { build, .. }
                        if build.log_file == path =>
                    {
                        Some(build.sdk_log.clone())
                    }
                    _ => None,
                };
                let reply = match (missing, running_here) {
                    (None, _) => Reply {
                        log_file_path: Some(path),
                        ..Reply::succeed("logs")
                    },
                    // The name is gone (a refused build's latc set it
                    // aside), the file the SDK writes is known.
                    (Some(_), Some(Some(file))) => Reply {
                        log_file_path: Some(file),
                        ..Reply::succeed("logs")
                    },
                    (Some(_), Some(None)) => Reply {
                        log_file_path: Some(path),
                        message: Some(
                            "the build has started; its SDK has not created this log yet".into(),
                        ),
                        ..Reply::succeed("logs")
                    },
                    (Some(reason), None) => Reply::fail("logs", reason),
                };
                fx.push(Effect::Reply { id, reply });
            }
            (Does::ReplyInvalid, Event::Invalid { id, action, reason }) => {
                let action = action.unwrap_or_default();
                fx.push(Effect::Reply {
                    id,
                    reply: Reply::fail(&action, reason),
                });
            }
            (Does::Refuse(why), Event::Request { id, request }) => {
                let action = request.action();
                let hint = match (action, self.state.kind()) {
                    (Action::Build, StateKind::Building) => {
                        "; wait for it to end ('latc wait') or stop it ('latc stop')"
                    }
                    _ => "; try again when it has ended ('latc status' shows progress)",
                };
                let mut reply = Reply::fail(action.as_str(), format!("{why}{hint}"));
                reply.build_id = self.current_build().map(|b| b.id);
                fx.push(Effect::Reply { id, reply });
            }
            (
                Does::StartBuild,
                Event::Request {
                    id,
                    request: Request::Build(request),
                },
            ) => {
                let build_id = self.next_build_id;
                self.next_build_id += 1;
                let build = BuildRecord {
                    id: build_id,
                    log_file: request.workdir.join("log").join("log.appsdk"),
                    workdir: request.workdir.clone(),
                    yaml_file: request.yaml_file.clone(),
                    kind: request.kind,
                    started_at: now,
                    ended_at: None,
                    outcome: Outcome::Running,
                    exit_code: None,
                    signal: None,
                    fail_reason: None,
                    process: None,
                    sdk_log: None,
                    success_logged: false,
                    error_line: None,
                    mounts_before: None,
                    mounts_ns: None,
                };
                self.state = State::Building {
                    build,
                    starting: Some(id),
                };
                fx.push(Effect::Spawn { build_id, request });
            }
            (
                Does::BuildStarted,
                Event::Spawned {
                    build_id,
                    process,
                    mounts_before,
                    mounts_ns,
                },
            ) => {
                if let State::Building { build, starting } = &mut self.state {
                    if build.id == build_id {
                        build.process = Some(process);
                        build.mounts_before = Some(mounts_before);
                        build.mounts_ns = Some(mounts_ns);
                        self.dirty = true;
                        if let Some(id) = starting.take() {
                            let reply = Reply {
                                log_file_path: Some(build.log_file.clone()),
                                build_id: Some(build_id),
                                message: Some(format!("build {build_id} started")),
                                ..Reply::succeed("build")
                            };
                            fx.push(Effect::Reply { id, reply });
                        }
                    }
                }
            }
            (Does::BuildNotStarted, Event::SpawnFailed { build_id, reason }) => {
                if let State::Building { build, starting } = &mut self.state {
                    if build.id != build_id {
                        return;
                    }
                    let reason = format!("the build could not be started: {reason}");
                    let mut build = build.clone();
                    let starting = starting.take();
                    build.finish(now, None, Outcome::Failed, Some(reason.clone()));
                    if let Some(id) = starting {
                        let mut reply = Reply::fail("build", reason);
                        reply.build_id = Some(build_id);
                        fx.push(Effect::Reply { id, reply });
                    }
                    self.finish_build(build);
                }
            }
            (
                Does::BuildEnded,
                Event::BuildExited {
                    build_id,
                    exit,
                    group_alive,
                },
            ) => {
                if let State::Building { build, starting } = &mut self.state {
                    if build.id != build_id {
                        return;
                    }
                    if let Some(id) = starting.take() {
                        // Only with a driver that breaks the calling rule.
                        fx.push(Effect::Reply {
                            id,
                            reply: Reply::fail(
                                "build",
                                "the build exited before it was reported started",
                            ),
                        });
                    }
                    if group_alive {
                        // The leader is done; nothing of its group may
                        // outlive it, nor run beside the next build.
                        fx.push(Effect::Signal {
                            build_id,
                            sig: Sig::Kill,
                        });
                        let build = build.clone();
                        let after_success = build.success_logged;
                        self.state = State::Stopping {
                            build,
                            deadline: now.saturating_add(KILL_WAIT_MS),
                            phase: StopPhase::Killing,
                            exit: Some(exit),
                            waiters: Vec::new(),
                            then_exit: false,
                            requested: false,
                            after_success,
                        };
                        return;
                    }
                    let mut build = build.clone();
                    let (outcome, reason) = natural_outcome(exit, &build);
                    build.finish(now, Some(exit), outcome, reason);
                    fx.push(Effect::ReleaseMounts { build_id });
                    fx.extend(end_log(&build));
                    self.finish_build(build);
                }
            }
            (Does::NothingToStop, Event::Request { id, .. }) => {
                let msg = match self.history.back() {
                    Some(b) => format!(
                        "no build is running; build {} already ended ({})",
                        b.id,
                        b.build_status()
                    ),
                    None => "no build is running".to_string(),
                };
                fx.push(Effect::Reply {
                    id,
                    reply: Reply::succeed("stop").with_message(msg),
                });
            }
            (Does::BeginStop, Event::Request { id, .. }) => {
                self.begin_stop(now, vec![id], false, fx);
            }
            (Does::ShutdownAfterStop, Event::Shutdown) => {
                self.begin_stop(now, Vec::new(), true, fx);
            }
            (Does::JoinStop, Event::Request { id, .. }) => {
                if let State::Stopping { waiters, .. } = &mut self.state {
                    waiters.push(id);
                }
            }
            (Does::ShutdownWhenStopped, Event::Shutdown) => {
                if let State::Stopping {
                    then_exit,
                    requested,
                    exit,
                    ..
                } = &mut self.state
                {
                    *then_exit = true;
                    // A build that already ended by itself keeps its result.
                    *requested |= exit.is_none();
                }
            }
            (
                Does::StoppedLeaderExited,
                Event::BuildExited {
                    build_id,
                    exit: leader_exit,
                    group_alive,
                },
            ) => {
                if let State::Stopping {
                    build,
                    exit,
                    phase,
                    deadline,
                    ..
                } = &mut self.state
                {
                    if build.id != build_id {
                        return;
                    }
                    *exit = Some(leader_exit);
                    if !group_alive {
                        self.end_stop(now, fx);
                    } else if *phase == StopPhase::Finishing {
                        // The SDK ended by itself; what it left goes now.
                        *phase = StopPhase::Killing;
                        *deadline = now.saturating_add(KILL_WAIT_MS);
                        fx.push(Effect::Signal {
                            build_id,
                            sig: Sig::Kill,
                        });
                    }
                }
            }
            (Does::NoteLog, Event::LogRead { build_id, news }) => {
                if let State::Building { build, .. } | State::Stopping { build, .. } =
                    &mut self.state
                {
                    if build.id != build_id {
                        return;
                    }
                    if let Some(file) = news.file {
                        build.sdk_log = Some(file);
                    }
                    build.success_logged |= news.success;
                    if build.error_line.is_none() {
                        build.error_line = news.error;
                    }
                    self.dirty = true;
                }
            }
            (Does::StopFinished, Event::GroupGone { build_id }) => {
                if let State::Stopping { build, exit, .. } = &self.state {
                    if build.id == build_id && exit.is_some() {
                        self.end_stop(now, fx);
                    }
                }
            }
            (Does::JobDeadline, Event::Tick) => self.check_job_deadline(now, fx),
            (Does::StopDeadline, Event::Tick) => {
                self.check_job_deadline(now, fx);
                let grace = self.config.grace_ms;
                if let State::Stopping {
                    build,
                    deadline,
                    phase,
                    ..
                } = &mut self.state
                {
                    if now < *deadline {
                        return;
                    }
                    let build_id = build.id;
                    match *phase {
                        StopPhase::Finishing => {
                            *phase = StopPhase::Terminating;
                            *deadline = now.saturating_add(grace);
                            fx.push(Effect::Signal {
                                build_id,
                                sig: Sig::Term,
                            });
                        }
                        StopPhase::Terminating => {
                            *phase = StopPhase::Killing;
                            *deadline = now.saturating_add(KILL_WAIT_MS);
                            fx.push(Effect::Signal {
                                build_id,
                                sig: Sig::Kill,
                            });
                        }
                        // SIGKILL cannot end a process stuck in the kernel
                        // (a hung mount): stop waiting, say so, go on.
                        StopPhase::Killing => self.end_stop(now, fx),
                    }
                }
            }
            (
                Does::StartClean,
                Event::Request {
                    id,
                    request: Request::Clean { workdir },
                },
            ) => {
                if self.getyaml.is_some() {
                    fx.push(Effect::Reply {
                        id,
                        reply: Reply::fail(
                            "clean",
                            "getyaml is running; try again when it has ended",
                        ),
                    });
                    return;
                }
                let job = self.new_job();
                self.state = State::Cleaning { job, requester: id };
                fx.push(Effect::StartClean { job, workdir });
            }
            (Does::CleanFinished, Event::CleanDone { job: done, result }) => {
                if let State::Cleaning { job, requester } = self.state {
                    if job != done {
                        return;
                    }
                    let reply = match result {
                        Ok(()) => Reply::succeed("clean"),
                        Err(reason) => Reply::fail("clean", reason),
                    };
                    self.state = State::Idle;
                    fx.push(Effect::Reply {
                        id: requester,
                        reply,
                    });
                }
            }
            (
                Does::StartGetYaml,
                Event::Request {
                    id,
                    request: Request::GetYaml { workdir },
                },
            ) => match &mut self.getyaml {
                Some(j) if j.workdir == workdir => j.waiters.push(id),
                Some(j) => {
                    let reason = format!(
                        "getyaml is running for {}; try again when it has ended",
                        j.workdir.display()
                    );
                    fx.push(Effect::Reply {
                        id,
                        reply: Reply::fail("getyaml", reason),
                    });
                }
                None => {
                    let job = self.new_job();
                    self.getyaml = Some(YamlJob {
                        job,
                        workdir: workdir.clone(),
                        waiters: vec![id],
                        deadline: now.saturating_add(GETYAML_TIMEOUT_MS),
                    });
                    fx.push(Effect::StartGetYaml { job, workdir });
                }
            },
            (Does::YamlFinished, Event::YamlDone { job, result }) => {
                if self.getyaml.as_ref().map(|j| j.job) != Some(job) {
                    return;
                }
                let Some(j) = self.getyaml.take() else { return };
                for id in j.waiters {
                    let reply = match &result {
                        Ok(path) => Reply {
                            yaml_file_path: Some(path.clone()),
                            ..Reply::succeed("getyaml")
                        },
                        Err(reason) => Reply::fail("getyaml", reason.clone()),
                    };
                    fx.push(Effect::Reply { id, reply });
                }
            }
            (Does::ShutdownNow, Event::Shutdown) => {
                if let State::Cleaning { requester, .. } = self.state {
                    fx.push(Effect::Reply {
                        id: requester,
                        reply: Reply::fail(
                            "clean",
                            "latd is shutting down; the clean was interrupted, run it again",
                        ),
                    });
                }
                self.state = State::Idle;
                self.answer_getyaml_waiters("latd is shutting down", fx);
                self.exited = true;
            }
            (Does::Ignore, _) => {}
            (does, event) => {
                // The table paired a handler with an event it does not take:
                // a bug in `rule`. Answer any request so no client hangs.
                debug_assert!(false, "{does:?} cannot handle {event:?}");
                if let Some((id, action)) = request_of(&event) {
                    fx.push(Effect::Reply {
                        id,
                        reply: Reply::fail(&action, "internal error: request not handled"),
                    });
                }
            }
        }
    }

    fn new_job(&mut self) -> JobId {
        let job = JobId(self.next_job);
        self.next_job += 1;
        job
    }

    fn begin_stop(
        &mut self,
        now: Millis,
        waiters: Vec<ReqId>,
        then_exit: bool,
        fx: &mut Vec<Effect>,
    ) {
        if let State::Building { build, starting } = &mut self.state {
            let starting = starting.take();
            let build = build.clone();
            if let Some(id) = starting {
                // Cannot happen with a driver that follows the calling rule,
                // but the build request must still be answered.
                fx.push(Effect::Reply {
                    id,
                    reply: Reply::fail("build", "the build was stopped before it started"),
                });
            }
            // After its success line the SDK is deploying and cleaning
            // up: a SIGTERM now would cut that short, so it gets the grace
            // period to end by itself first.
            let after_success = build.success_logged;
            let phase = if after_success {
                StopPhase::Finishing
            } else {
                fx.push(Effect::Signal {
                    build_id: build.id,
                    sig: Sig::Term,
                });
                StopPhase::Terminating
            };
            self.state = State::Stopping {
                build,
                deadline: now.saturating_add(self.config.grace_ms),
                phase,
                exit: None,
                waiters,
                then_exit,
                requested: true,
                after_success,
            };
        }
    }

    fn end_stop(&mut self, now: Millis, fx: &mut Vec<Effect>) {
        let State::Stopping {
            build,
            exit,
            waiters,
            then_exit,
            phase,
            requested,
            after_success,
            ..
        } = std::mem::replace(&mut self.state, State::Idle)
        else {
            return;
        };
        let mut build = build;
        let stuck = if exit.is_none() {
            " (its processes did not end after SIGKILL: stuck in the kernel, e.g. on a hung mount?)"
        } else {
            ""
        };
        // A build that had logged its success keeps it: the deployed
        // caller stops right after the success line. One that logged it
        // only after the stop began (an SDK that went on despite the
        // SIGTERM) keeps it only if it then finished by itself.
        let killed = phase == StopPhase::Killing;
        let kept = after_success || exit == Some(Exit::Code(0));
        let (outcome, reason) = match exit {
            _ if requested && build.success_logged && kept => (Outcome::Succeeded, None),
            Some(e) if !requested => natural_outcome(e, &build),
            _ => (
                Outcome::Stopped,
                Some(if then_exit {
                    format!("stopped because latd was shut down{stuck}")
                } else if killed {
                    format!("stopped by request (killed after the grace period){stuck}")
                } else {
                    "stopped by request".to_string()
                }),
            ),
        };
        build.finish(now, exit, outcome, reason);
        let build_id = build.id;
        let msg = match build.outcome {
            // Its SDK ended by itself; what was killed, if anything, was a
            // helper it left behind.
            Outcome::Succeeded if exit == Some(Exit::Code(0)) => {
                format!("build {build_id} had already succeeded and has finished; its result is kept")
            }
            Outcome::Succeeded if killed => format!(
                "build {build_id} had logged its success; it did not finish its deploy within the grace period and was killed, so deploy/ may be incomplete"
            ),
            Outcome::Succeeded if exit.is_some_and(|e| e != Exit::Code(0)) => format!(
                "build {build_id} had logged its success; it was stopped before it finished its deploy, so deploy/ may be incomplete"
            ),
            Outcome::Succeeded => {
                format!("build {build_id} had already succeeded and has finished; its result is kept")
            }
            _ => format!("build {build_id} stopped"),
        };
        // Nothing of the build runs any more: what it mounted goes before
        // anyone is told (the deployed caller's chown and rm come next).
        fx.push(Effect::ReleaseMounts { build_id });
        fx.extend(end_log(&build));
        for id in waiters {
            let mut reply = Reply::succeed("stop").with_message(msg.clone());
            reply.build_id = Some(build_id);
            fx.push(Effect::Reply { id, reply });
        }
        self.finish_build(build);
        if then_exit {
            self.answer_getyaml_waiters("latd is shutting down", fx);
            self.exited = true;
        }
    }

    /// Cancels a getyaml that overran its time, answering its waiters.
    fn check_job_deadline(&mut self, now: Millis, fx: &mut Vec<Effect>) {
        if self.getyaml.as_ref().is_some_and(|j| now >= j.deadline) {
            let job = self.getyaml.as_ref().map(|j| j.job);
            if let Some(job) = job {
                fx.push(Effect::CancelJob { job });
            }
            self.answer_getyaml_waiters(
                &format!(
                    "appsdk exampleyamls did not finish within {} s and was killed; check the SDK",
                    GETYAML_TIMEOUT_MS / 1000
                ),
                fx,
            );
        }
    }

    fn answer_getyaml_waiters(&mut self, reason: &str, fx: &mut Vec<Effect>) {
        if let Some(j) = self.getyaml.take() {
            for id in j.waiters {
                fx.push(Effect::Reply {
                    id,
                    reply: Reply::fail("getyaml", reason),
                });
            }
        }
    }

    fn finish_build(&mut self, build: BuildRecord) {
        self.history.push_back(build);
        self.trim_history();
        self.state = State::Idle;
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.config.history_cap.max(1) {
            self.history.pop_front();
        }
    }
}

/// The line latd adds to the SDK's log of a build that ended without its
/// success line and without an error line of its own (stopped, killed,
/// interrupted): it contains the failure marker, so a caller that follows
/// the log for the markers, as build-image does, stops waiting.
fn end_log(b: &BuildRecord) -> Option<Effect> {
    let file = b.sdk_log.clone()?;
    if b.outcome == Outcome::Succeeded || b.error_line.is_some() {
        return None;
    }
    let why = b
        .fail_reason
        .as_deref()
        .unwrap_or("it did not finish")
        .replace(['\n', '\r'], " ");
    Some(Effect::EndLog {
        build_id: b.id,
        file,
        line: format!(
            "latd - ERROR: build {} {}: {why}",
            b.id,
            match b.outcome {
                Outcome::Stopped => "was stopped",
                _ => "failed",
            }
        ),
    })
}

/// The outcome of a build that was running when the daemon died, from its
/// log and from whether its processes were still running (`killed`).
fn recovered_outcome(b: &BuildRecord, killed: usize) -> (Outcome, Option<String>) {
    let leftovers = match killed {
        0 => "none of its processes were left".to_string(),
        n => format!("its {n} leftover processes were killed"),
    };
    match (&b.error_line, b.success_logged) {
        (Some(line), _) => (
            Outcome::Failed,
            Some(format!(
                "failed while latd was down: {line}; see {}",
                b.log_file.display()
            )),
        ),
        (None, true) if killed == 0 => (Outcome::Succeeded, None),
        (None, true) => (
            Outcome::Failed,
            Some(format!(
                "interrupted: latd was restarted while this build finished its deploy after its success line; {leftovers}, so deploy/ may be incomplete"
            )),
        ),
        (None, false) => (
            Outcome::Failed,
            Some(format!(
                "interrupted: latd was restarted while this build ran; {leftovers}"
            )),
        ),
    }
}

/// The outcome of a build that ended by itself. The reason quotes the
/// SDK's first error line, and names the SDK's log and, for a build that
/// failed before the SDK made one, the build's console output beside it: it
/// never sends people to a log alone that may not exist.
fn natural_outcome(exit: Exit, build: &BuildRecord) -> (Outcome, Option<String>) {
    let log = &build.log_file;
    let see = match (log.parent(), &build.sdk_log) {
        (Some(dir), None) => format!(
            "see {} ({} if the SDK made no log)",
            log.display(),
            dir.join("console.log").display()
        ),
        _ => format!("see {}", log.display()),
    };
    let how = match exit {
        Exit::Code(0) => return (Outcome::Succeeded, None),
        Exit::Code(c) if build.success_logged => {
            format!("appsdk logged its success line, then exited with code {c} (its deploy may be incomplete)")
        }
        Exit::Code(c) => format!("appsdk exited with code {c}"),
        Exit::Signal(sig) => format!("appsdk was killed by signal {sig}"),
    };
    let error = build
        .error_line
        .as_deref()
        .map(|l| format!(": {l}"))
        .unwrap_or_default();
    (Outcome::Failed, Some(format!("{how}{error}; {see}")))
}

fn request_of(event: &Event) -> Option<(ReqId, String)> {
    match event {
        Event::Request { id, request } => Some((*id, request.action().as_str().to_string())),
        Event::Invalid { id, action, .. } => Some((*id, action.clone().unwrap_or_default())),
        _ => None,
    }
}
