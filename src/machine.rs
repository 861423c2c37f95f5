//! The daemon's logic as a pure state machine.
//!
//! **Architecture invariant:** nothing in this module performs I/O or reads a
//! clock. Time arrives inside [`Machine::step`]; what must happen comes back
//! as [`Effect`]s for the driver to perform. Outcomes of effects (a process
//! started, exited, a clean finished) come back in as [`Event`]s, and so do
//! the timers the machine asks for ([`Machine::next_timer`]).
//!
//! The machine is three regions, each in one state at a time:
//!
//! - **build** ([`State`], kinds [`StateKind`]): idle, spawning, running,
//!   deploying (the SDK logged its success line and finishes its deploy),
//!   finishing (a stop lets such a build end by itself first), terminating,
//!   killing, reaping (the SDK has exited and what it left is killed),
//!   cleaning;
//! - **getyaml** ([`YamlKind`]): none, or one `appsdk exampleyamls` running;
//! - **life** ([`Life`]): serving, draining (asked to exit: the build region
//!   winds down), exited.
//!
//! Every transition is declared once, in the three tables below
//! ([`BUILD_TABLE`], [`YAML_TABLE`], [`LIFE_TABLE`]), by the `transitions!`
//! macro, which also writes each region's rule function: a match over
//! (state, event kind) with no wildcard arm, so the compiler proves every
//! cell is covered exactly once. A row names one target state; where data
//! decides, the row has a named guard, drawn in the diagram. Events about
//! a build, job or timer that is no longer current are dropped once,
//! before any table ([`Machine::is_current`]). The handler a row names
//! builds the next state's data; `step` checks, in release builds too, that
//! it is the state the row names.
//!
//! Calling rule for the driver: after every `step`, perform all returned
//! effects in order before the next `step`; feed the outcome of each effect
//! (e.g. [`Event::Spawned`]) back as the next event; feed
//! [`Event::Timeout`] when the timer [`Machine::next_timer`] names is due.
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
//! assert_eq!(m.state().kind(), StateKind::Running);
//! ```

// The architecture invariant, as a lint: clippy.toml lists the clocks,
// file and process APIs this module may not use.
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

use crate::protocol::{Action, Reply, StatusDoc};
pub use crate::protocol::{BuildKind, BuildRecord, Exit, Millis, Outcome, Persisted, ProcessId};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

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
    /// Its SDK had logged its success line and its processes still run:
    /// they are left to finish the deploy (state adopted), the grace
    /// period at most. Nothing was killed yet.
    pub finishing: bool,
    /// Its processes that were still running and were killed.
    pub killed: usize,
    /// What its log shows, if it could be read.
    pub log: LogNews,
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
    /// Kill what is left of the adopted build `build` (its cgroup, the
    /// processes with the channel's mark), release what it left mounted,
    /// read its log; report [`Event::AdoptedGone`].
    ClearAdopted { build: BuildRecord },
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

/// How an `appsdk exampleyamls` job ended, as the effects layer saw it;
/// what that means for its requesters is the machine's to say.
#[derive(Debug, Clone, PartialEq)]
pub enum YamlOutcome {
    /// It could not be started (why).
    NotStarted(String),
    /// It exited; `yaml_made`: the example YAML is where it should be
    /// ([`example_yaml`]).
    Exited { exit: Exit, yaml_made: bool },
}

/// Where `appsdk exampleyamls` leaves the example YAML in `workdir`.
pub fn example_yaml(workdir: &Path) -> PathBuf {
    workdir
        .join("exampleyamls")
        .join("debian-image-base-intel-x86-64.yaml")
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
    /// News with the success line is the event [`EventKind::SuccessLine`].
    LogRead {
        build_id: u64,
        news: LogNews,
    },
    /// The build's leader was reaped; `group_alive` if others of its group
    /// remain. The machine sees two events: [`EventKind::LeaderExited`]
    /// (others remain) and [`EventKind::BuildExited`] (nothing remains).
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
        outcome: YamlOutcome,
    },
    /// Nothing is left of the adopted build (it finished, or what was left
    /// was killed: `killed` processes); `log` is what its log shows now.
    AdoptedGone {
        build_id: u64,
        killed: usize,
        log: LogNews,
    },
    /// A timer the machine asked for is due (see [`Machine::next_timer`]).
    Timeout(Timer),
    /// The daemon was asked to exit (SIGTERM, SIGINT).
    Shutdown,
}

// ===========================================================================
// Timers
// ===========================================================================

/// The machine's timers. A state arms the ones it needs; leaving it
/// disarms them. [`Machine::next_timer`] says which is due next; the driver
/// feeds [`Event::Timeout`] when it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    /// The grace period of a stop: a finishing build gets SIGTERM at its
    /// end, a terminating one SIGKILL (states finishing, terminating).
    Grace,
    /// After SIGKILL, how long to wait for the build's processes before
    /// the stop ends anyway (states killing, reaping).
    KillWait,
    /// After SIGKILL, when to send it again to whatever of the build still
    /// lives or was started since (a fork racing the first one), until
    /// nothing is left (states killing, reaping).
    KillRepeat,
    /// How long `appsdk exampleyamls` may run (region getyaml).
    Getyaml,
}

impl Timer {
    pub const ALL: [Timer; 4] = [
        Timer::Grace,
        Timer::KillWait,
        Timer::KillRepeat,
        Timer::Getyaml,
    ];
}

/// The armed timers: when each is due.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Timers {
    grace: Option<Millis>,
    kill_wait: Option<Millis>,
    kill_repeat: Option<Millis>,
    getyaml: Option<Millis>,
}

impl Timers {
    fn slot(&mut self, t: Timer) -> &mut Option<Millis> {
        match t {
            Timer::Grace => &mut self.grace,
            Timer::KillWait => &mut self.kill_wait,
            Timer::KillRepeat => &mut self.kill_repeat,
            Timer::Getyaml => &mut self.getyaml,
        }
    }

    fn get(&self, t: Timer) -> Option<Millis> {
        match t {
            Timer::Grace => self.grace,
            Timer::KillWait => self.kill_wait,
            Timer::KillRepeat => self.kill_repeat,
            Timer::Getyaml => self.getyaml,
        }
    }

    fn arm(&mut self, t: Timer, at: Millis) {
        *self.slot(t) = Some(at);
    }
}

/// How long `appsdk exampleyamls` may take before it is killed.
pub const GETYAML_TIMEOUT_MS: Millis = 120_000;

/// After SIGKILL, how long to wait for the build's processes to go
/// before the stop is finished anyway.
pub const KILL_WAIT_MS: Millis = 10_000;

/// After SIGKILL, how often it is sent again while the build lasts.
pub const KILL_REPEAT_MS: Millis = 100;

// ===========================================================================
// Event kinds, guards and the tables
// ===========================================================================

/// What the tables are keyed on: an event's kind, where data that decides
/// a transition makes a kind of its own (a log read with the success line,
/// a leader that exits with or without others of its group left, which
/// timer is due), and the two events the machine raises itself.
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
    /// The SDK's log showed its file or an error line, not the success line.
    LogRead,
    /// The SDK's log showed the success line.
    SuccessLine,
    /// The build's leader exited; others of its group are left.
    LeaderExited,
    /// The build's leader exited and nothing of its group is left.
    BuildExited,
    /// What the leader left is gone too.
    GroupGone,
    CleanDone,
    YamlDone,
    AdoptedGone,
    /// [`Timer::Grace`] is due.
    GraceOver,
    /// [`Timer::KillWait`] is due.
    KillWaitOver,
    /// [`Timer::KillRepeat`] is due.
    KillRepeatDue,
    /// [`Timer::Getyaml`] is due.
    GetyamlOverdue,
    Shutdown,
    /// Raised by the machine: draining, the build region has come to rest.
    Drained,
    /// Raised by the machine: the daemon exits now.
    Exiting,
}

impl EventKind {
    pub const ALL: [EventKind; 24] = [
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
        EventKind::SuccessLine,
        EventKind::LeaderExited,
        EventKind::BuildExited,
        EventKind::GroupGone,
        EventKind::CleanDone,
        EventKind::YamlDone,
        EventKind::AdoptedGone,
        EventKind::GraceOver,
        EventKind::KillWaitOver,
        EventKind::KillRepeatDue,
        EventKind::GetyamlOverdue,
        EventKind::Shutdown,
        EventKind::Drained,
        EventKind::Exiting,
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
            EventKind::SuccessLine => "success-line",
            EventKind::LeaderExited => "leader-exited",
            EventKind::BuildExited => "build-exited",
            EventKind::GroupGone => "group-gone",
            EventKind::CleanDone => "clean-done",
            EventKind::YamlDone => "yaml-done",
            EventKind::AdoptedGone => "adopted-gone",
            EventKind::GraceOver => "grace-over",
            EventKind::KillWaitOver => "kill-wait-over",
            EventKind::KillRepeatDue => "kill-repeat-due",
            EventKind::GetyamlOverdue => "getyaml-overdue",
            EventKind::Shutdown => "shutdown",
            EventKind::Drained => "drained",
            EventKind::Exiting => "exiting",
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
            Event::LogRead { news, .. } if news.success => EventKind::SuccessLine,
            Event::LogRead { .. } => EventKind::LogRead,
            Event::BuildExited {
                group_alive: true, ..
            } => EventKind::LeaderExited,
            Event::BuildExited { .. } => EventKind::BuildExited,
            Event::GroupGone { .. } => EventKind::GroupGone,
            Event::CleanDone { .. } => EventKind::CleanDone,
            Event::YamlDone { .. } => EventKind::YamlDone,
            Event::AdoptedGone { .. } => EventKind::AdoptedGone,
            Event::Timeout(Timer::Grace) => EventKind::GraceOver,
            Event::Timeout(Timer::KillWait) => EventKind::KillWaitOver,
            Event::Timeout(Timer::KillRepeat) => EventKind::KillRepeatDue,
            Event::Timeout(Timer::Getyaml) => EventKind::GetyamlOverdue,
            Event::Shutdown => EventKind::Shutdown,
        }
    }
}

/// A named condition a row may depend on, drawn in the diagram as
/// `[name]`. Two are about the other region, one about the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Guard {
    /// Region getyaml is running `appsdk exampleyamls`.
    YamlRunning,
    /// Region build is cleaning.
    Cleaning,
    /// The getyaml request is for the workdir getyaml runs in.
    SameWorkdir,
}

impl Guard {
    pub const ALL: [Guard; 3] = [Guard::YamlRunning, Guard::Cleaning, Guard::SameWorkdir];

    pub fn name(self) -> &'static str {
        match self {
            Guard::YamlRunning => "getyaml running",
            Guard::Cleaning => "cleaning",
            Guard::SameWorkdir => "same workdir",
        }
    }
}

/// The guards' values for one event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Guards {
    pub yaml_running: bool,
    pub cleaning: bool,
    pub same_workdir: bool,
}

impl Guards {
    pub fn holds(&self, g: Guard) -> bool {
        match g {
            Guard::YamlRunning => self.yaml_running,
            Guard::Cleaning => self.cleaning,
            Guard::SameWorkdir => self.same_workdir,
        }
    }
}

/// One row of a region's table: in any of `from`, on any of `on`, if
/// `guard` holds (or there is none), go to `to` (`None`: stay) doing `does`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row<S: 'static, D> {
    pub from: &'static [S],
    pub on: &'static [EventKind],
    pub guard: Option<Guard>,
    pub to: Option<S>,
    pub does: D,
}

impl<S: Copy + PartialEq, D: Copy> Row<S, D> {
    /// The state this row leads to from `from`.
    pub fn target(&self, from: S) -> S {
        self.to.unwrap_or(from)
    }
}

macro_rules! guard_of {
    () => {
        None
    };
    ($g:ident) => {
        Some(Guard::$g)
    };
}

macro_rules! target_of {
    ($S:ident, stay) => {
        None
    };
    ($S:ident, $to:ident) => {
        Some($S::$to)
    };
}

/// One row of a table, as `transitions!` declares it (for the table and
/// for the rule function alike).
macro_rules! row_of {
    ($S:ident, $D:ident, [$($from:ident),+] [$($on:ident),+] [$($guard:ident)?] $to:ident, $does:expr) => {
        Row {
            from: &[$($S::$from),+],
            on: &[$(EventKind::$on),+],
            guard: guard_of!($($guard)?),
            to: target_of!($S, $to),
            does: { use $D::*; $does },
        }
    };
}

/// Declares a region's table once: the const table (for the diagrams and
/// the tests) and the rule function (a match with no wildcard arm: the
/// compiler checks that every (state, event) cell is covered and, with
/// `unreachable_patterns` denied, covered once). A guarded row is tried
/// before the unguarded row of the same cell that follows it.
macro_rules! transitions {
    (
        $(#[$doc:meta])*
        $table:ident, $rule:ident: $S:ident, $D:ident {
            $( [$($from:ident),+] [$($on:ident),+] $([$guard:ident])? => $to:ident : $does:expr ; )*
        }
    ) => {
        $(#[$doc])*
        pub const $table: &[Row<$S, $D>] = &[
            $( row_of!($S, $D, [$($from),+] [$($on),+] [$($guard)?] $to, $does), )*
        ];

        /// The row that takes an event of kind `on` in `state`, given the
        /// guards' values.
        pub fn $rule(state: $S, on: EventKind, guards: &Guards) -> Row<$S, $D> {
            let _ = guards;
            #[deny(unreachable_patterns)]
            match (state, on) {
                $(
                    ($($S::$from)|+, $(EventKind::$on)|+) $(if guards.holds(Guard::$guard))? =>
                        row_of!($S, $D, [$($from),+] [$($on),+] [$($guard)?] $to, $does),
                )*
            }
        }
    };
}

// ---------------------------------------------------------------------------
// Region build
// ---------------------------------------------------------------------------

/// The states of region build (see [`State`] for their data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKind {
    Idle,
    Spawning,
    Running,
    Deploying,
    Finishing,
    Terminating,
    Killing,
    Reaping,
    Cleaning,
    Adopted,
}

impl StateKind {
    pub const ALL: [StateKind; 10] = [
        StateKind::Idle,
        StateKind::Spawning,
        StateKind::Running,
        StateKind::Deploying,
        StateKind::Finishing,
        StateKind::Terminating,
        StateKind::Killing,
        StateKind::Reaping,
        StateKind::Cleaning,
        StateKind::Adopted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StateKind::Idle => "idle",
            StateKind::Spawning => "spawning",
            StateKind::Running => "running",
            StateKind::Deploying => "deploying",
            StateKind::Finishing => "finishing",
            StateKind::Terminating => "terminating",
            StateKind::Killing => "killing",
            StateKind::Reaping => "reaping",
            StateKind::Adopted => "adopted",
            StateKind::Cleaning => "cleaning",
        }
    }

    /// The `state:` of the status document, in the four words clients
    /// have always been shown.
    pub fn status_name(self) -> &'static str {
        match self {
            StateKind::Idle => "idle",
            StateKind::Spawning
            | StateKind::Running
            | StateKind::Deploying
            | StateKind::Adopted => "building",
            StateKind::Finishing
            | StateKind::Terminating
            | StateKind::Killing
            | StateKind::Reaping => "stopping",
            StateKind::Cleaning => "cleaning",
        }
    }
}

/// What a row of region build does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildDoes {
    /// Nothing: the event is not this region's, or cannot matter here.
    Ignore,
    /// Refuse the request because of what the region is doing.
    Refuse(&'static str),
    /// Refuse a clean while getyaml writes into the workdir.
    RefuseWhileYaml,
    /// Spawn the build; the reply waits for the spawn's outcome.
    StartBuild,
    /// The spawn succeeded: answer the build request.
    BuildStarted,
    /// The spawn failed: answer and record the failure.
    BuildNotStarted,
    /// Record what the SDK's log showed (its file, its first error line).
    NoteLog,
    /// Record the success line: the SDK is deploying.
    NoteSuccess,
    /// Answer a stop that has nothing to stop; the last result stays.
    NothingToStop,
    /// SIGTERM the build and arm the grace timer; the stop's reply waits
    /// until every process is gone.
    Terminate,
    /// After its success line the SDK is deploying and cleaning up: a
    /// SIGTERM would cut that short, so it gets the grace period to end by
    /// itself first.
    LetFinish,
    /// The grace period is over: SIGKILL, and arm the kill wait.
    Kill,
    /// Another stop while stopping: answered with the first.
    JoinStop,
    /// A shutdown while stopping: the daemon exits once the stop ends.
    ShutdownJoins,
    /// The build ended by itself: record its result.
    BuildEnded,
    /// The leader exited with others of its group left: nothing of the
    /// build may outlive it, nor run beside the next build. SIGKILL them
    /// and arm the kill wait.
    KillLeftovers,
    /// SIGKILL again, to what of the build still lives or was started
    /// since; the repeat is armed again.
    KillAgain,
    /// The leader exited after SIGKILL; its group is still going.
    NoteExit,
    /// Nothing of the build is left (or SIGKILL could not end it): record
    /// the result and answer the stops.
    EndStop,
    StartClean,
    CleanFinished,
    /// A shutdown interrupts the clean; its requester is told.
    InterruptClean,
    /// A stop waits for the adopted build to be gone.
    JoinAdopted,
    /// The adopted build's grace is over (or latd must exit): kill what
    /// is left of it.
    ClearAdopted,
    /// Nothing is left of the adopted build: record its result, answer
    /// the stops.
    AdoptedEnded,
}

const BUILD_RUNNING: &str = "a build is already running";
const STOP_RUNNING: &str = "a build is being stopped";
const CLEAN_RUNNING: &str = "a clean is running";

transitions! {
    /// Region build: at most one build or clean at a time.
    BUILD_TABLE, build_rule: StateKind, BuildDoes {
        // build and clean requests
        [Idle] [Build] => Spawning: StartBuild;
        [Idle] [Clean] [YamlRunning] => stay: RefuseWhileYaml;
        [Idle] [Clean] => Cleaning: StartClean;
        [Spawning, Running, Deploying] [Build, Clean] => stay: Refuse(BUILD_RUNNING);
        [Finishing, Terminating, Killing, Reaping] [Build, Clean] => stay: Refuse(STOP_RUNNING);
        [Cleaning] [Build, Clean] => stay: Refuse(CLEAN_RUNNING);
        [Adopted] [Build, Clean] => stay: Refuse(BUILD_RUNNING);

        // a build's life
        [Spawning] [Spawned] => Running: BuildStarted;
        [Spawning] [SpawnFailed] => Idle: BuildNotStarted;
        [Running] [SuccessLine] => Deploying: NoteSuccess;
        [Spawning, Running, Deploying, Finishing, Terminating, Killing, Reaping] [LogRead] => stay: NoteLog;
        [Spawning, Deploying, Finishing, Terminating, Killing, Reaping] [SuccessLine] => stay: NoteLog;
        [Spawning, Running, Deploying] [BuildExited] => Idle: BuildEnded;
        [Spawning, Running, Deploying, Finishing, Terminating] [LeaderExited] => Reaping: KillLeftovers;

        // stop (and shutdown, which stops what runs)
        [Idle, Cleaning] [Stop] => stay: NothingToStop;
        [Spawning, Running] [Stop, Shutdown] => Terminating: Terminate;
        [Deploying] [Stop, Shutdown] => Finishing: LetFinish;
        [Finishing] [GraceOver] => Terminating: Terminate;
        [Terminating] [GraceOver] => Killing: Kill;
        [Killing] [LeaderExited] => Reaping: NoteExit;
        [Finishing, Terminating, Killing] [BuildExited] => Idle: EndStop;
        [Reaping] [GroupGone] => Idle: EndStop;
        [Killing, Reaping] [KillWaitOver] => Idle: EndStop;
        [Killing, Reaping] [KillRepeatDue] => stay: KillAgain;
        [Finishing, Terminating, Killing, Reaping] [Stop] => stay: JoinStop;
        [Finishing, Terminating, Killing, Reaping] [Shutdown] => stay: ShutdownJoins;

        // a build the last latd started, finishing its deploy
        [Adopted] [Stop] => stay: JoinAdopted;
        [Adopted] [GraceOver, Shutdown] => stay: ClearAdopted;
        [Adopted] [AdoptedGone] => Idle: AdoptedEnded;

        // clean
        [Cleaning] [CleanDone] => Idle: CleanFinished;
        [Cleaning] [Shutdown] => Idle: InterruptClean;
        [Idle] [Shutdown] => stay: Ignore;

        // Events about a build, job or timer this state does not have are
        // stale (dropped before the table); the rest are other regions'.
        [Idle, Cleaning] [Spawned, SpawnFailed, LogRead, SuccessLine, LeaderExited, BuildExited] => stay: Ignore;
        [Running, Deploying, Finishing, Terminating, Killing, Reaping] [Spawned, SpawnFailed] => stay: Ignore;
        [Reaping] [LeaderExited, BuildExited] => stay: Ignore;
        [Idle, Spawning, Running, Deploying, Finishing, Terminating, Killing, Cleaning] [GroupGone] => stay: Ignore;
        [Idle, Spawning, Running, Deploying, Finishing, Terminating, Killing, Reaping, Adopted] [CleanDone] => stay: Ignore;
        [Adopted] [Spawned, SpawnFailed, LogRead, SuccessLine, LeaderExited, BuildExited, GroupGone, KillWaitOver, KillRepeatDue] => stay: Ignore;
        [Idle, Spawning, Running, Deploying, Finishing, Terminating, Killing, Reaping, Cleaning] [AdoptedGone] => stay: Ignore;
        [Idle, Spawning, Running, Deploying, Killing, Reaping, Cleaning] [GraceOver] => stay: Ignore;
        [Idle, Spawning, Running, Deploying, Finishing, Terminating, Cleaning] [KillWaitOver, KillRepeatDue] => stay: Ignore;
        [Idle, Spawning, Running, Deploying, Finishing, Terminating, Killing, Reaping, Cleaning, Adopted]
            [Status, Logs, Invalid, GetYaml, YamlDone, GetyamlOverdue, Drained, Exiting] => stay: Ignore;
    }
}

// ---------------------------------------------------------------------------
// Region getyaml
// ---------------------------------------------------------------------------

/// The states of region getyaml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum YamlKind {
    /// No `appsdk exampleyamls` runs.
    Idle,
    /// One runs; requests for its workdir wait for it.
    Running,
}

impl YamlKind {
    pub const ALL: [YamlKind; 2] = [YamlKind::Idle, YamlKind::Running];

    pub fn name(self) -> &'static str {
        match self {
            YamlKind::Idle => "no-getyaml",
            YamlKind::Running => "getyaml-running",
        }
    }
}

/// What a row of region getyaml does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YamlDoes {
    Ignore,
    /// getyaml writes into the workdir a clean is removing: refused.
    Refuse(&'static str),
    StartGetYaml,
    /// The same workdir: wait with the running one.
    JoinGetYaml,
    /// Another workdir: refused until the running one ends.
    RefuseOtherWorkdir,
    /// Answer every waiter with the result.
    YamlFinished,
    /// It overran its time: cancel it, answer every waiter.
    CancelGetYaml,
    /// The daemon exits: answer every waiter.
    AbandonGetYaml,
}

transitions! {
    /// Region getyaml: `appsdk exampleyamls`, beside a build but never
    /// beside a clean.
    YAML_TABLE, yaml_rule: YamlKind, YamlDoes {
        [Idle] [GetYaml] [Cleaning] => stay: Refuse(CLEAN_RUNNING);
        [Idle] [GetYaml] => Running: StartGetYaml;
        [Running] [GetYaml] [SameWorkdir] => stay: JoinGetYaml;
        [Running] [GetYaml] => stay: RefuseOtherWorkdir;
        [Running] [YamlDone] => Idle: YamlFinished;
        [Running] [GetyamlOverdue] => Idle: CancelGetYaml;
        [Running] [Exiting] => Idle: AbandonGetYaml;
        [Idle] [YamlDone, GetyamlOverdue, Exiting] => stay: Ignore;
        [Idle, Running] [Build, Status, Stop, Logs, Clean, Invalid, Spawned, SpawnFailed, LogRead,
            SuccessLine, LeaderExited, BuildExited, GroupGone, CleanDone, AdoptedGone, GraceOver, KillWaitOver,
            KillRepeatDue, Shutdown, Drained] => stay: Ignore;
    }
}

// ---------------------------------------------------------------------------
// Region life
// ---------------------------------------------------------------------------

/// The states of region life: whether the daemon serves, winds down, or
/// has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Life {
    Serving,
    /// Asked to exit: what runs is stopped first.
    Draining,
    /// Every request gets "shutting down"; nothing else happens.
    Exited,
}

impl Life {
    pub const ALL: [Life; 3] = [Life::Serving, Life::Draining, Life::Exited];

    pub fn name(self) -> &'static str {
        match self {
            Life::Serving => "serving",
            Life::Draining => "draining",
            Life::Exited => "exited",
        }
    }
}

/// What a row of region life does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifeDoes {
    Ignore,
    /// Write status.lat and answer with its path.
    ReplyStatus,
    /// Answer with the log's path, or why there is none.
    ReplyLogs,
    /// Answer `fail` with the reason the request was refused.
    ReplyInvalid,
    /// Nothing yet: region build stops what runs.
    Drain,
    /// Everything has wound down: exit.
    ExitNow,
    /// After exit, a request is answered "shutting down".
    RefuseExiting,
}

transitions! {
    /// Region life: requests answered in every state, and the way out.
    LIFE_TABLE, life_rule: Life, LifeDoes {
        [Serving, Draining] [Status] => stay: ReplyStatus;
        [Serving, Draining] [Logs] => stay: ReplyLogs;
        [Serving, Draining] [Invalid] => stay: ReplyInvalid;
        [Serving] [Shutdown] => Draining: Drain;
        [Draining] [Drained] => Exited: ExitNow;
        [Exited] [Build, Status, Stop, Logs, Clean, GetYaml, Invalid] => stay: RefuseExiting;
        [Serving, Draining] [Build, Stop, Clean, GetYaml] => stay: Ignore;
        [Draining, Exited] [Shutdown] => stay: Ignore;
        [Serving, Exited] [Drained] => stay: Ignore;
        [Serving, Draining, Exited] [Spawned, SpawnFailed, LogRead, SuccessLine, LeaderExited,
            BuildExited, GroupGone, CleanDone, YamlDone, AdoptedGone, GraceOver, KillWaitOver, KillRepeatDue,
            GetyamlOverdue, Exiting] => stay: Ignore;
    }
}

// ===========================================================================
// State
// ===========================================================================

/// Why a stop was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// A client's `stop`.
    Request,
    /// latd was asked to exit.
    Shutdown,
}

/// What a build being stopped (or wound down) carries to its end.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stop {
    /// Stop requests, answered when nothing of the build is left.
    pub waiters: Vec<ReqId>,
    /// `None`: the build ended by itself and only what it left is killed.
    pub cause: Option<StopCause>,
    /// The SDK had logged its success line when the stop began (it was let
    /// finish rather than terminated).
    pub after_success: bool,
    /// The grace period ran out: SIGKILL was sent.
    pub escalated: bool,
}

/// Region build's state, with the data each state needs.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Idle,
    /// The spawn was asked for; the build request waits for its outcome.
    Spawning {
        build: BuildRecord,
        requester: ReqId,
    },
    /// The SDK runs; it has not logged its success line.
    Running {
        build: BuildRecord,
    },
    /// The SDK logged its success line: it is copying its last files and
    /// cleaning up.
    Deploying {
        build: BuildRecord,
    },
    /// A stop after the success line: the SDK gets the grace period to end
    /// by itself.
    Finishing {
        build: BuildRecord,
        stop: Stop,
    },
    /// SIGTERM was sent; SIGKILL follows after the grace period.
    Terminating {
        build: BuildRecord,
        stop: Stop,
    },
    /// SIGKILL was sent (repeated while anything of the build is left).
    Killing {
        build: BuildRecord,
        stop: Stop,
    },
    /// The SDK's leader exited; SIGKILL was sent to what it left.
    Reaping {
        build: BuildRecord,
        stop: Stop,
        exit: Exit,
    },
    Cleaning {
        job: JobId,
        requester: ReqId,
    },
    /// A build the last latd started, found at start-up after its success
    /// line with its processes still running: they are left to finish the
    /// deploy, for the grace period at most. Not our children: the driver
    /// looks for them, and reports when none is left.
    Adopted {
        build: BuildRecord,
        /// Stop requests, answered when it is gone.
        waiters: Vec<ReqId>,
    },
}

/// The build a state holds, by reference or mutably (one match for both:
/// the binding mode follows the reference).
macro_rules! build_of {
    ($state:expr) => {
        match $state {
            State::Spawning { build, .. }
            | State::Running { build }
            | State::Deploying { build }
            | State::Finishing { build, .. }
            | State::Terminating { build, .. }
            | State::Killing { build, .. }
            | State::Reaping { build, .. }
            | State::Adopted { build, .. } => Some(build),
            State::Idle | State::Cleaning { .. } => None,
        }
    };
}

impl State {
    pub fn kind(&self) -> StateKind {
        match self {
            State::Idle => StateKind::Idle,
            State::Spawning { .. } => StateKind::Spawning,
            State::Running { .. } => StateKind::Running,
            State::Deploying { .. } => StateKind::Deploying,
            State::Finishing { .. } => StateKind::Finishing,
            State::Terminating { .. } => StateKind::Terminating,
            State::Killing { .. } => StateKind::Killing,
            State::Reaping { .. } => StateKind::Reaping,
            State::Adopted { .. } => StateKind::Adopted,
            State::Cleaning { .. } => StateKind::Cleaning,
        }
    }

    /// The build this state is about, if any.
    pub fn build(&self) -> Option<&BuildRecord> {
        build_of!(self)
    }

    fn build_mut(&mut self) -> Option<&mut BuildRecord> {
        build_of!(self)
    }

    /// What status says the daemon is doing, where the state's name says
    /// too little, and which timer says when the next step comes.
    fn describe(&self) -> Option<(&'static str, Option<Timer>)> {
        Some(match self {
            State::Finishing { .. } => ("the SDK logged its success line and is finishing its deploy; waiting for it to exit by itself", Some(Timer::Grace)),
            State::Terminating { .. } => ("SIGTERM sent; waiting for the build's processes to exit", Some(Timer::Grace)),
            State::Killing { .. } => ("SIGKILL sent; waiting for the build's processes to go", Some(Timer::KillWait)),
            State::Reaping { .. } => ("the SDK has exited; SIGKILL sent to the processes it left; waiting for them to go", Some(Timer::KillWait)),
            State::Deploying { .. } => ("the SDK logged its success line and is finishing its deploy", None),
            State::Adopted { .. } => ("started by the latd before this one, the SDK logged its success line and is finishing its deploy; waiting for it to exit by itself", Some(Timer::Grace)),
            State::Spawning { build, .. } | State::Running { build } if build.sdk_log.is_none() => {
                ("starting: the SDK has not created its log yet", None)
            }
            _ => return None,
        })
    }
}

/// Region getyaml's running job.
#[derive(Debug, Clone, PartialEq)]
struct YamlJob {
    job: JobId,
    workdir: PathBuf,
    waiters: Vec<ReqId>,
}

/// The daemon's logic. See the module docs.
#[derive(Debug, Clone)]
pub struct Machine {
    config: Config,
    /// Region build.
    state: State,
    /// Region getyaml.
    getyaml: Option<YamlJob>,
    /// Region life.
    life: Life,
    timers: Timers,
    next_build_id: u64,
    next_job: u64,
    /// Finished builds, newest last; the last one is what status reports
    /// when no build runs.
    history: VecDeque<BuildRecord>,
    /// Set by a handler that changed what [`Machine::persisted`] returns
    /// without changing region build's state (a change of state always
    /// persists).
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
        let mut state = State::Idle;
        let mut timers = Timers::default();
        if let Some(mut b) = persisted.current {
            note_recovered_log(&mut b, &found.log);
            next_build_id = next_build_id.max(b.id + 1);
            if found.finishing {
                timers.arm(Timer::Grace, now.saturating_add(config.grace_ms));
                state = State::Adopted {
                    build: b,
                    waiters: Vec::new(),
                };
            } else {
                let (outcome, reason) = recovered_outcome(&b, found.killed);
                b.finish(now, None, outcome, reason);
                recovered_end_log.extend(end_log(&b));
                history.push_back(b);
            }
        }
        for b in &history {
            next_build_id = next_build_id.max(b.id + 1);
        }
        let mut m = Machine {
            config,
            state,
            getyaml: None,
            life: Life::Serving,
            timers,
            next_build_id,
            next_job: 1,
            history,
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

    /// Region build's state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Region getyaml's state.
    pub fn yaml_kind(&self) -> YamlKind {
        if self.getyaml.is_some() {
            YamlKind::Running
        } else {
            YamlKind::Idle
        }
    }

    /// Region life's state.
    pub fn life(&self) -> Life {
        self.life
    }

    pub fn has_exited(&self) -> bool {
        self.life == Life::Exited
    }

    /// The timer due first, and when, if any is armed.
    pub fn next_timer(&self) -> Option<(Millis, Timer)> {
        Timer::ALL
            .iter()
            .filter_map(|&t| Some((self.timers.get(t)?, t)))
            .min()
    }

    /// When timer `t` is due, if it is armed.
    pub fn timer(&self, t: Timer) -> Option<Millis> {
        self.timers.get(t)
    }

    /// The timers due at `now`, to be fed as [`Event::Timeout`].
    pub fn due_timers(&self, now: Millis) -> Vec<Timer> {
        Timer::ALL
            .into_iter()
            .filter(|&t| self.timers.get(t).is_some_and(|at| now >= at))
            .collect()
    }

    /// The build status reports: the running one, else the last finished.
    pub fn current_build(&self) -> Option<&BuildRecord> {
        self.state.build().or(self.history.back())
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
            state: kind.status_name().into(),
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
        let (what, timer) = self.state.describe()?;
        Some(match timer.and_then(|t| self.timers.get(t)) {
            Some(at) => format!(
                "{what} (next step in {} s)",
                at.saturating_sub(now).div_ceil(1000)
            ),
            None => what.to_string(),
        })
    }

    /// What must survive a restart.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            next_build_id: self.next_build_id,
            current: self.state.build().cloned(),
            history: self.history.iter().cloned().collect(),
        }
    }

    /// The guards' values for `event`.
    pub fn guards(&self, event: &Event) -> Guards {
        Guards {
            yaml_running: self.getyaml.is_some(),
            cleaning: self.state.kind() == StateKind::Cleaning,
            same_workdir: match (event, &self.getyaml) {
                (
                    Event::Request {
                        request: Request::GetYaml { workdir },
                        ..
                    },
                    Some(j),
                ) => j.workdir == *workdir,
                _ => false,
            },
        }
    }

    /// Whether `event` is about what the machine has now: the live build,
    /// the running clean or getyaml, an armed timer that is due. Anything
    /// else is stale (an outcome of something that has ended) and is
    /// dropped before the tables.
    pub fn is_current(&self, now: Millis, event: &Event) -> bool {
        let live = self.state.build().map(|b| b.id);
        match event {
            Event::Request { .. } | Event::Invalid { .. } | Event::Shutdown => true,
            Event::Spawned { build_id, .. }
            | Event::SpawnFailed { build_id, .. }
            | Event::LogRead { build_id, .. }
            | Event::BuildExited { build_id, .. }
            | Event::GroupGone { build_id } => live == Some(*build_id),
            Event::AdoptedGone { build_id, .. } => {
                matches!(&self.state, State::Adopted { build, .. } if build.id == *build_id)
            }
            Event::CleanDone { job, .. } => {
                matches!(self.state, State::Cleaning { job: j, .. } if j == *job)
            }
            Event::YamlDone { job, .. } => self.getyaml.as_ref().is_some_and(|j| j.job == *job),
            Event::Timeout(t) => self.timers.get(*t).is_some_and(|at| now >= at),
        }
    }

    /// Feeds one event; returns what the driver must do, in order.
    pub fn step(&mut self, now: Millis, event: Event) -> Vec<Effect> {
        let mut fx = Vec::new();
        let kind = event.kind();
        if self.life == Life::Exited {
            // The other regions have stopped: only life answers.
            let row = life_rule(self.life, kind, &Guards::default());
            self.run_life(row.does, now, &event, &mut fx);
            return fx;
        }
        if !self.is_current(now, &event) {
            return fx;
        }
        let before = self.state.kind();
        self.dirty = false;
        let guards = self.guards(&event);

        let row = life_rule(self.life, kind, &guards);
        self.run_life(row.does, now, &event, &mut fx);
        self.life = row.target(self.life);

        let row = build_rule(before, kind, &guards);
        let old = std::mem::replace(&mut self.state, State::Idle);
        self.state = self.run_build(row.does, now, old, &event, &mut fx);
        let to = row.target(before);
        assert_eq!(
            self.state.kind(),
            to,
            "{before:?} --{kind:?}--> {:?}: the table says {to:?}",
            self.state.kind()
        );
        self.disarm_unowned();

        self.step_yaml(kind, now, &event, &guards, &mut fx);

        // Draining and region build has come to rest: exit.
        if self.life == Life::Draining && self.state.kind() == StateKind::Idle {
            let row = life_rule(self.life, EventKind::Drained, &guards);
            self.run_life(row.does, now, &event, &mut fx);
            self.life = row.target(self.life);
            if self.life == Life::Exited {
                self.step_yaml(EventKind::Exiting, now, &event, &guards, &mut fx);
            }
        }

        if self.state.kind() != before || self.dirty {
            let persisted = self.persisted();
            // Persist before anything the other side may act on.
            fx.insert(0, Effect::WriteStatus(self.status(now)));
            fx.insert(0, Effect::Persist(persisted));
        }
        if self.life == Life::Exited {
            fx.push(Effect::Exit);
        }
        fx
    }

    fn step_yaml(
        &mut self,
        kind: EventKind,
        now: Millis,
        event: &Event,
        guards: &Guards,
        fx: &mut Vec<Effect>,
    ) {
        let from = self.yaml_kind();
        let row = yaml_rule(from, kind, guards);
        self.run_yaml(row.does, now, event, fx);
        let to = row.target(from);
        assert_eq!(
            self.yaml_kind(),
            to,
            "{from:?} --{kind:?}--> {:?}: the table says {to:?}",
            self.yaml_kind()
        );
        if self.getyaml.is_none() {
            self.timers.getyaml = None;
        }
    }

    /// A state's timers go with it.
    fn disarm_unowned(&mut self) {
        let kind = self.state.kind();
        if !matches!(
            kind,
            StateKind::Finishing | StateKind::Terminating | StateKind::Adopted
        ) {
            self.timers.grace = None;
        }
        if !matches!(kind, StateKind::Killing | StateKind::Reaping) {
            self.timers.kill_wait = None;
            self.timers.kill_repeat = None;
        }
    }

    // -----------------------------------------------------------------------
    // Region life's handlers
    // -----------------------------------------------------------------------

    fn run_life(&mut self, does: LifeDoes, now: Millis, event: &Event, fx: &mut Vec<Effect>) {
        match does {
            LifeDoes::Ignore | LifeDoes::Drain | LifeDoes::ExitNow => {}
            LifeDoes::ReplyStatus => {
                let id = request_id(event);
                fx.push(Effect::WriteStatus(self.status(now)));
                let mut reply = Reply::succeed("status");
                reply.status_file = Some(self.config.status_file.clone());
                reply.build_id = self.current_build().map(|b| b.id);
                fx.push(Effect::Reply { id, reply });
            }
            LifeDoes::ReplyLogs => {
                let Event::Request {
                    id,
                    request: Request::Logs { path, missing },
                } = event
                else {
                    table_bug("reply-logs", event)
                };
                fx.push(Effect::Reply {
                    id: *id,
                    reply: self.logs_reply(path, missing.as_deref()),
                });
            }
            LifeDoes::ReplyInvalid => {
                let Event::Invalid { id, action, reason } = event else {
                    table_bug("reply-invalid", event)
                };
                fx.push(Effect::Reply {
                    id: *id,
                    reply: Reply::fail(action.as_deref().unwrap_or_default(), reason.clone()),
                });
            }
            LifeDoes::RefuseExiting => {
                let (id, action) = request_of(event).unwrap_or_else(|| table_bug("refuse", event));
                fx.push(Effect::Reply {
                    id,
                    reply: Reply::fail(&action, "latd is shutting down"),
                });
            }
        }
    }

    fn logs_reply(&self, path: &std::path::Path, missing: Option<&str>) -> Reply {
        // A build that runs there has that log, or will have it once its
        // SDK has started (seconds, or minutes).
        let running_here = self
            .state
            .build()
            .filter(|b| b.log_file == path)
            .map(|b| b.sdk_log.clone());
        match (missing, running_here) {
            (None, _) => Reply {
                log_file_path: Some(path.to_path_buf()),
                ..Reply::succeed("logs")
            },
            // The name is gone (a refused build's latc set it aside), the
            // file the SDK writes is known.
            (Some(_), Some(Some(file))) => Reply {
                log_file_path: Some(file),
                ..Reply::succeed("logs")
            },
            (Some(_), Some(None)) => Reply {
                log_file_path: Some(path.to_path_buf()),
                message: Some("the build has started; its SDK has not created this log yet".into()),
                ..Reply::succeed("logs")
            },
            (Some(reason), None) => Reply::fail("logs", reason),
        }
    }

    // -----------------------------------------------------------------------
    // Region build's handlers: each returns the next state
    // -----------------------------------------------------------------------

    fn run_build(
        &mut self,
        does: BuildDoes,
        now: Millis,
        old: State,
        event: &Event,
        fx: &mut Vec<Effect>,
    ) -> State {
        match does {
            BuildDoes::Ignore => old,
            BuildDoes::Refuse(why) => {
                let (id, action) = request_of(event).unwrap_or_else(|| table_bug("refuse", event));
                let hint = match (action.as_str(), old.kind()) {
                    (
                        "build",
                        StateKind::Spawning
                        | StateKind::Running
                        | StateKind::Deploying
                        | StateKind::Adopted,
                    ) => "; wait for it to end ('latc wait') or stop it ('latc stop')",
                    _ => "; try again when it has ended ('latc status' shows progress)",
                };
                let mut reply = Reply::fail(&action, format!("{why}{hint}"));
                reply.build_id = old.build().or(self.history.back()).map(|b| b.id);
                fx.push(Effect::Reply { id, reply });
                old
            }
            BuildDoes::RefuseWhileYaml => {
                let id = request_id(event);
                fx.push(Effect::Reply {
                    id,
                    reply: Reply::fail("clean", "getyaml is running; try again when it has ended"),
                });
                old
            }
            BuildDoes::StartBuild => {
                let Event::Request {
                    id,
                    request: Request::Build(request),
                } = event
                else {
                    table_bug("start-build", event)
                };
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
                fx.push(Effect::Spawn {
                    build_id,
                    request: request.clone(),
                });
                State::Spawning {
                    build,
                    requester: *id,
                }
            }
            BuildDoes::BuildStarted => {
                let (
                    State::Spawning {
                        mut build,
                        requester,
                    },
                    Event::Spawned {
                        process,
                        mounts_before,
                        mounts_ns,
                        ..
                    },
                ) = (old, event)
                else {
                    table_bug("build-started", event)
                };
                build.process = Some(*process);
                build.mounts_before = Some(mounts_before.clone());
                build.mounts_ns = Some(mounts_ns.clone());
                let reply = Reply {
                    log_file_path: Some(build.log_file.clone()),
                    build_id: Some(build.id),
                    message: Some(format!("build {} started", build.id)),
                    ..Reply::succeed("build")
                };
                fx.push(Effect::Reply {
                    id: requester,
                    reply,
                });
                State::Running { build }
            }
            BuildDoes::BuildNotStarted => {
                let (
                    State::Spawning {
                        mut build,
                        requester,
                    },
                    Event::SpawnFailed { reason, .. },
                ) = (old, event)
                else {
                    table_bug("build-not-started", event)
                };
                let reason = format!("the build could not be started: {reason}");
                build.finish(now, None, Outcome::Failed, Some(reason.clone()));
                let mut reply = Reply::fail("build", reason);
                reply.build_id = Some(build.id);
                fx.push(Effect::Reply {
                    id: requester,
                    reply,
                });
                self.finish_build(build)
            }
            BuildDoes::NoteLog | BuildDoes::NoteSuccess => {
                let Event::LogRead { news, .. } = event else {
                    table_bug("note-log", event)
                };
                let mut state = old;
                if let Some(build) = state.build_mut() {
                    if let Some(file) = &news.file {
                        build.sdk_log = Some(file.clone());
                    }
                    build.success_logged |= news.success;
                    if build.error_line.is_none() {
                        build.error_line = news.error.clone();
                    }
                }
                self.dirty = true;
                match (does, state) {
                    (BuildDoes::NoteSuccess, State::Running { build }) => {
                        State::Deploying { build }
                    }
                    (_, state) => state,
                }
            }
            BuildDoes::NothingToStop => {
                let id = request_id(event);
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
                old
            }
            BuildDoes::Terminate | BuildDoes::LetFinish => {
                let (build, stop) = match old {
                    // Finishing's grace is over: SIGTERM now.
                    State::Finishing { build, stop } => (build, stop),
                    other => self.begin_stop(other, event, fx),
                };
                self.timers
                    .arm(Timer::Grace, now.saturating_add(self.config.grace_ms));
                if does == BuildDoes::LetFinish {
                    return State::Finishing { build, stop };
                }
                fx.push(Effect::Signal {
                    build_id: build.id,
                    sig: Sig::Term,
                });
                State::Terminating { build, stop }
            }
            BuildDoes::Kill => {
                let State::Terminating { build, mut stop } = old else {
                    table_bug("kill", event)
                };
                stop.escalated = true;
                self.kill(now, build.id, fx);
                self.timers
                    .arm(Timer::KillWait, now.saturating_add(KILL_WAIT_MS));
                State::Killing { build, stop }
            }
            BuildDoes::JoinStop => {
                let id = request_id(event);
                let mut state = old;
                if let Some(stop) = stop_of(&mut state) {
                    stop.waiters.push(id);
                }
                state
            }
            BuildDoes::ShutdownJoins => {
                let mut state = old;
                if let Some(stop) = stop_of(&mut state) {
                    // A build that ended by itself keeps its result.
                    if stop.cause.is_some() {
                        stop.cause = Some(StopCause::Shutdown);
                    }
                }
                state
            }
            BuildDoes::BuildEnded => {
                let Event::BuildExited { exit, .. } = event else {
                    table_bug("build-ended", event)
                };
                let mut build = self.take_build(old, fx);
                let (outcome, reason) = natural_outcome(*exit, &build);
                build.finish(now, Some(*exit), outcome, reason);
                fx.push(Effect::ReleaseMounts { build_id: build.id });
                fx.extend(end_log(&build));
                self.finish_build(build)
            }
            BuildDoes::KillLeftovers => {
                let Event::BuildExited { exit, .. } = event else {
                    table_bug("kill-leftovers", event)
                };
                // A build that ended by itself has no stop (cause None): it
                // keeps the result its exit gives, whatever comes later.
                let stop = match &old {
                    State::Finishing { stop, .. } | State::Terminating { stop, .. } => stop.clone(),
                    _ => Stop::default(),
                };
                let build = self.take_build(old, fx);
                self.kill(now, build.id, fx);
                self.timers
                    .arm(Timer::KillWait, now.saturating_add(KILL_WAIT_MS));
                State::Reaping {
                    build,
                    stop,
                    exit: *exit,
                }
            }
            BuildDoes::KillAgain => {
                let build_id = old
                    .build()
                    .map_or_else(|| table_bug("kill-again", event), |b| b.id);
                self.kill(now, build_id, fx);
                old
            }
            BuildDoes::NoteExit => {
                let (State::Killing { build, stop }, Event::BuildExited { exit, .. }) =
                    (old, event)
                else {
                    table_bug("note-exit", event)
                };
                State::Reaping {
                    build,
                    stop,
                    exit: *exit,
                }
            }
            BuildDoes::EndStop => {
                let (build, stop, exit) = match (old, event) {
                    (
                        State::Finishing { build, stop }
                        | State::Terminating { build, stop }
                        | State::Killing { build, stop },
                        Event::BuildExited { exit, .. },
                    ) => (build, stop, Some(*exit)),
                    (State::Reaping { build, stop, exit }, _) => (build, stop, Some(exit)),
                    // SIGKILL could not end it: stuck in the kernel.
                    (State::Killing { build, stop }, Event::Timeout(_)) => (build, stop, None),
                    (_, event) => table_bug("end-stop", event),
                };
                self.end_stop(now, build, stop, exit, fx)
            }
            BuildDoes::JoinAdopted => {
                let (State::Adopted { build, mut waiters }, Event::Request { id, .. }) =
                    (old, event)
                else {
                    table_bug("join-adopted", event)
                };
                waiters.push(*id);
                State::Adopted { build, waiters }
            }
            BuildDoes::ClearAdopted => {
                let State::Adopted { build, waiters } = old else {
                    table_bug("clear-adopted", event)
                };
                self.timers.grace = None;
                fx.push(Effect::ClearAdopted {
                    build: build.clone(),
                });
                State::Adopted { build, waiters }
            }
            BuildDoes::AdoptedEnded => {
                let (State::Adopted { mut build, waiters }, Event::AdoptedGone { killed, log, .. }) =
                    (old, event)
                else {
                    table_bug("adopted-ended", event)
                };
                note_recovered_log(&mut build, log);
                let (outcome, reason) = recovered_outcome(&build, *killed);
                build.finish(now, None, outcome, reason);
                fx.extend(end_log(&build));
                for id in waiters {
                    fx.push(Effect::Reply {
                        id,
                        reply: Reply::succeed("stop"),
                    });
                }
                self.finish_build(build)
            }
            BuildDoes::StartClean => {
                let Event::Request {
                    id,
                    request: Request::Clean { workdir },
                } = event
                else {
                    table_bug("start-clean", event)
                };
                let job = self.new_job();
                fx.push(Effect::StartClean {
                    job,
                    workdir: workdir.clone(),
                });
                State::Cleaning {
                    job,
                    requester: *id,
                }
            }
            BuildDoes::CleanFinished => {
                let (State::Cleaning { requester, .. }, Event::CleanDone { result, .. }) =
                    (old, event)
                else {
                    table_bug("clean-finished", event)
                };
                let reply = match result {
                    Ok(()) => Reply::succeed("clean"),
                    Err(reason) => Reply::fail("clean", reason.clone()),
                };
                fx.push(Effect::Reply {
                    id: requester,
                    reply,
                });
                State::Idle
            }
            BuildDoes::InterruptClean => {
                let State::Cleaning { requester, .. } = old else {
                    table_bug("interrupt-clean", event)
                };
                fx.push(Effect::Reply {
                    id: requester,
                    reply: Reply::fail(
                        "clean",
                        "latd is shutting down; the clean was interrupted, run it again",
                    ),
                });
                State::Idle
            }
        }
    }

    /// SIGKILL to the build, and again every [`KILL_REPEAT_MS`] while it
    /// lasts (the state that kills owns the repeat).
    fn kill(&mut self, now: Millis, build_id: u64, fx: &mut Vec<Effect>) {
        fx.push(Effect::Signal {
            build_id,
            sig: Sig::Kill,
        });
        self.timers
            .arm(Timer::KillRepeat, now.saturating_add(KILL_REPEAT_MS));
    }

    /// The build of a live state; a build request still waiting for the
    /// spawn's outcome (only with a driver that breaks the calling rule)
    /// is answered.
    fn take_build(&mut self, old: State, fx: &mut Vec<Effect>) -> BuildRecord {
        match old {
            State::Spawning { build, requester } => {
                fx.push(Effect::Reply {
                    id: requester,
                    reply: Reply::fail("build", "the build exited before it was reported started"),
                });
                build
            }
            State::Running { build }
            | State::Deploying { build }
            | State::Finishing { build, .. }
            | State::Terminating { build, .. }
            | State::Killing { build, .. }
            | State::Reaping { build, .. } => build,
            State::Idle | State::Cleaning { .. } | State::Adopted { .. } => {
                unreachable!("no build of ours in {old:?}")
            }
        }
    }

    /// A stop or shutdown begins: who asked, and whether the SDK had
    /// logged its success line.
    fn begin_stop(
        &mut self,
        old: State,
        event: &Event,
        fx: &mut Vec<Effect>,
    ) -> (BuildRecord, Stop) {
        let (cause, waiters) = match event {
            Event::Request { id, .. } => (StopCause::Request, vec![*id]),
            _ => (StopCause::Shutdown, Vec::new()),
        };
        let build = match old {
            State::Spawning { build, requester } => {
                fx.push(Effect::Reply {
                    id: requester,
                    reply: Reply::fail("build", "the build was stopped before it started"),
                });
                build
            }
            other => self.take_build(other, fx),
        };
        let stop = Stop {
            waiters,
            cause: Some(cause),
            after_success: build.success_logged,
            escalated: false,
        };
        (build, stop)
    }

    fn end_stop(
        &mut self,
        now: Millis,
        mut build: BuildRecord,
        stop: Stop,
        exit: Option<Exit>,
        fx: &mut Vec<Effect>,
    ) -> State {
        let stuck = if exit.is_none() {
            " (its processes did not end after SIGKILL: stuck in the kernel, e.g. on a hung mount?)"
        } else {
            ""
        };
        // A build that had logged its success keeps it: the deployed
        // caller stops right after the success line. One that logged it
        // only after the stop began (an SDK that went on despite the
        // SIGTERM) keeps it only if it then finished by itself.
        let kept = stop.after_success || exit == Some(Exit::Code(0));
        let (outcome, reason) = match (stop.cause, exit) {
            (Some(_), _) if build.success_logged && kept => (Outcome::Succeeded, None),
            (None, Some(e)) => natural_outcome(e, &build),
            (cause, _) => (
                Outcome::Stopped,
                Some(if cause == Some(StopCause::Shutdown) {
                    format!("stopped because latd was shut down{stuck}")
                } else if stop.escalated {
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
            Outcome::Succeeded if stop.escalated => format!(
                "build {build_id} had logged its success; it did not finish its deploy within the grace period and was killed, so deploy/ may be incomplete"
            ),
            Outcome::Succeeded => format!(
                "build {build_id} had logged its success; it was stopped before it finished its deploy, so deploy/ may be incomplete"
            ),
            _ => format!("build {build_id} stopped"),
        };
        // Nothing of the build runs any more: what it mounted goes before
        // anyone is told (the deployed caller's chown and rm come next).
        fx.push(Effect::ReleaseMounts { build_id });
        fx.extend(end_log(&build));
        for id in stop.waiters {
            let mut reply = Reply::succeed("stop").with_message(msg.clone());
            reply.build_id = Some(build_id);
            fx.push(Effect::Reply { id, reply });
        }
        self.finish_build(build)
    }

    // -----------------------------------------------------------------------
    // Region getyaml's handlers
    // -----------------------------------------------------------------------

    fn run_yaml(&mut self, does: YamlDoes, now: Millis, event: &Event, fx: &mut Vec<Effect>) {
        match does {
            YamlDoes::Ignore => {}
            YamlDoes::Refuse(why) => {
                let id = request_id(event);
                fx.push(Effect::Reply {
                    id,
                    reply: Reply::fail(
                        "getyaml",
                        format!(
                            "{why}; try again when it has ended ('latc status' shows progress)"
                        ),
                    ),
                });
            }
            YamlDoes::StartGetYaml => {
                let Event::Request {
                    id,
                    request: Request::GetYaml { workdir },
                } = event
                else {
                    table_bug("start-getyaml", event)
                };
                let job = self.new_job();
                self.getyaml = Some(YamlJob {
                    job,
                    workdir: workdir.clone(),
                    waiters: vec![*id],
                });
                self.timers
                    .arm(Timer::Getyaml, now.saturating_add(GETYAML_TIMEOUT_MS));
                fx.push(Effect::StartGetYaml {
                    job,
                    workdir: workdir.clone(),
                });
            }
            YamlDoes::JoinGetYaml => {
                let id = request_id(event);
                if let Some(j) = &mut self.getyaml {
                    j.waiters.push(id);
                }
            }
            YamlDoes::RefuseOtherWorkdir => {
                let id = request_id(event);
                let running = self
                    .getyaml
                    .as_ref()
                    .map(|j| j.workdir.display().to_string())
                    .unwrap_or_default();
                fx.push(Effect::Reply {
                    id,
                    reply: Reply::fail(
                        "getyaml",
                        format!("getyaml is running for {running}; try again when it has ended"),
                    ),
                });
            }
            YamlDoes::YamlFinished => {
                let (Event::YamlDone { outcome, .. }, Some(job)) = (event, self.getyaml.take())
                else {
                    table_bug("yaml-finished", event)
                };
                let yaml = example_yaml(&job.workdir);
                let reply = match outcome {
                    YamlOutcome::Exited {
                        exit: Exit::Code(0),
                        yaml_made: true,
                    } => Reply {
                        yaml_file_path: Some(yaml),
                        ..Reply::succeed("getyaml")
                    },
                    YamlOutcome::Exited {
                        exit: Exit::Code(0),
                        yaml_made: false,
                    } => Reply::fail(
                        "getyaml",
                        format!(
                            "appsdk exampleyamls succeeded but {} is missing",
                            yaml.display()
                        ),
                    ),
                    YamlOutcome::Exited { exit, .. } => Reply::fail(
                        "getyaml",
                        format!(
                            "appsdk exampleyamls failed ({exit}); see {}",
                            job.workdir.join("log").join("getyaml.log").display()
                        ),
                    ),
                    YamlOutcome::NotStarted(reason) => Reply::fail("getyaml", reason.clone()),
                };
                for id in job.waiters {
                    fx.push(Effect::Reply {
                        id,
                        reply: reply.clone(),
                    });
                }
            }
            YamlDoes::CancelGetYaml => {
                if let Some(j) = &self.getyaml {
                    fx.push(Effect::CancelJob { job: j.job });
                }
                self.answer_getyaml_waiters(
                    &format!(
                        "appsdk exampleyamls did not finish within {} s and was killed; check the SDK",
                        GETYAML_TIMEOUT_MS / 1000
                    ),
                    fx,
                );
            }
            YamlDoes::AbandonGetYaml => self.answer_getyaml_waiters("latd is shutting down", fx),
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

    fn new_job(&mut self) -> JobId {
        let job = JobId(self.next_job);
        self.next_job += 1;
        job
    }

    fn finish_build(&mut self, build: BuildRecord) -> State {
        self.history.push_back(build);
        self.trim_history();
        State::Idle
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.config.history_cap.max(1) {
            self.history.pop_front();
        }
    }
}

fn stop_of(state: &mut State) -> Option<&mut Stop> {
    match state {
        State::Finishing { stop, .. }
        | State::Terminating { stop, .. }
        | State::Killing { stop, .. }
        | State::Reaping { stop, .. } => Some(stop),
        _ => None,
    }
}

/// A row named a handler for an event it cannot take: the tables and the
/// handlers disagree. Every cell runs in the tests, so this is caught
/// there; in a release build too it fails loudly rather than guess.
fn table_bug(handler: &str, event: &Event) -> ! {
    panic!("the transition table gave {handler} an event it does not take: {event:?}")
}

fn request_id(event: &Event) -> ReqId {
    request_of(event)
        .map(|(id, _)| id)
        .unwrap_or_else(|| table_bug("a request handler", event))
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
/// What the log of a build the last latd ran shows, noted in its record.
fn note_recovered_log(b: &mut BuildRecord, log: &LogNews) {
    if let Some(file) = &log.file {
        b.sdk_log = Some(file.clone());
    }
    b.success_logged |= log.success;
    if b.error_line.is_none() {
        b.error_line = log.error.clone();
    }
}

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
