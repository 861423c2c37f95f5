//! Tests of the daemon's state machine, through its public API only.
//!
//! 1. The transition table, row by row, written out by hand as a spec: every
//!    state × every event kind, each run on a real machine.
//! 2. Scripted scenarios, one behaviour each.
//! 3. Properties over random runs against a small simulated world that keeps
//!    the driver's calling rule.
//! 4. The request parser never panics.
//!
//! Nothing here does I/O or reads a clock: time is a number handed to `step`.

use latd::machine::*;
use latd::protocol::*;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

// ===========================================================================
// A small test driver
// ===========================================================================

/// Time of the first step (any value works; a realistic one reads better).
const T0: Millis = 1_700_000_000_000;
/// The stop grace period of every test machine.
const GRACE: u64 = 10_000;
/// A build id or job id the machine never hands out in these tests.
const STALE: u64 = 999_999;
const PROC: ProcessId = ProcessId {
    pid: 4242,
    start_ticks: 99,
};
const STATUS_FILE_PATH: &str = "/chan/status.lat";

fn config(history_cap: usize) -> Config {
    Config {
        grace_ms: GRACE,
        status_file: PathBuf::from(STATUS_FILE_PATH),
        history_cap,
        pid: 7,
        version: "0.0.0-test".into(),
        started_at: T0,
    }
}

fn build_req(workdir: &str) -> BuildRequest {
    BuildRequest {
        workdir: workdir.into(),
        yaml_file: Path::new(workdir).join("lat.yaml"),
        kind: BuildKind::Genimage,
    }
}

/// Feeds events at `now`, learns the ids the machine hands out from its
/// effects, and checks that every reply answers a request still waiting, so
/// no test can pass with a request answered twice.
struct Rig {
    m: Machine,
    now: Millis,
    next_req: u64,
    /// Requests issued and not answered yet.
    open: BTreeSet<ReqId>,
    /// The last build the machine spawned.
    build_id: Option<u64>,
    clean_job: Option<JobId>,
    yaml_job: Option<JobId>,
}

impl Rig {
    fn new() -> Rig {
        Rig::with_machine(Machine::new(
            config(5),
            Persisted::default(),
            T0,
            Recovered::default(),
        ))
    }

    fn with_machine(m: Machine) -> Rig {
        Rig {
            m,
            now: T0,
            next_req: 0,
            open: BTreeSet::new(),
            build_id: None,
            clean_job: None,
            yaml_job: None,
        }
    }

    fn kind(&self) -> StateKind {
        self.m.state().kind()
    }

    /// The live build's id, or one the machine never issued.
    fn bid(&self) -> u64 {
        self.build_id.unwrap_or(STALE)
    }

    fn new_id(&mut self) -> ReqId {
        self.next_req += 1;
        let id = ReqId(self.next_req);
        self.open.insert(id);
        id
    }

    fn req(&mut self, request: Request) -> Event {
        Event::Request {
            id: self.new_id(),
            request,
        }
    }

    fn step(&mut self, ev: Event) -> Vec<Effect> {
        let fx = self.m.step(self.now, ev);
        for e in &fx {
            match e {
                Effect::Reply { id, .. } => {
                    assert!(
                        self.open.remove(id),
                        "reply to {id:?}, which is not waiting: {fx:#?}"
                    )
                }
                Effect::Spawn { build_id, .. } => self.build_id = Some(*build_id),
                Effect::StartClean { job, .. } => self.clean_job = Some(*job),
                Effect::StartGetYaml { job, .. } => self.yaml_job = Some(*job),
                _ => {}
            }
        }
        fx
    }

    /// Makes an event with `make` (one of the event makers below) and feeds it.
    fn go(&mut self, make: MakeEvent) -> Vec<Effect> {
        let ev = make(self);
        self.step(ev)
    }

    /// The driver read `news` in the running build's SDK log.
    fn log(&mut self, news: LogNews) -> Vec<Effect> {
        let build_id = self.bid();
        self.step(Event::LogRead { build_id, news })
    }

    fn ask(&mut self, request: Request) -> (ReqId, Vec<Effect>) {
        let id = self.new_id();
        (id, self.step(Event::Request { id, request }))
    }

    fn last_build(&self) -> BuildRecord {
        self.m.history().last().expect("a finished build").clone()
    }
}

/// The reply to `id` among `fx`; panics unless there is exactly one.
fn reply_to(fx: &[Effect], id: ReqId) -> Reply {
    let found: Vec<&Reply> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Reply { id: i, reply } if *i == id => Some(reply),
            _ => None,
        })
        .collect();
    assert_eq!(found.len(), 1, "want one reply to {id:?} in {fx:#?}");
    found[0].clone()
}

fn has_reply(fx: &[Effect]) -> bool {
    fx.iter().any(|e| matches!(e, Effect::Reply { .. }))
}

fn signals(fx: &[Effect]) -> Vec<(u64, Sig)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Signal { build_id, sig } => Some((*build_id, *sig)),
            _ => None,
        })
        .collect()
}

/// Builds a machine in some state.
type Given = fn() -> Rig;
/// Makes one event for a machine (request ids come from the rig).
type MakeEvent = fn(&mut Rig) -> Event;

// Event makers: one concrete event of each kind, aimed at the live build or
// job when there is one (so the row does something), else stale.

fn build(r: &mut Rig) -> Event {
    r.req(Request::Build(build_req("/w")))
}
fn status(r: &mut Rig) -> Event {
    r.req(Request::Status)
}
fn stop(r: &mut Rig) -> Event {
    r.req(Request::Stop)
}
fn logs(r: &mut Rig) -> Event {
    r.req(Request::Logs {
        path: "/w/log/log.appsdk".into(),
        missing: None,
    })
}
fn clean(r: &mut Rig) -> Event {
    r.req(Request::Clean {
        workdir: "/w".into(),
    })
}
fn getyaml(r: &mut Rig) -> Event {
    r.req(Request::GetYaml {
        workdir: "/w".into(),
    })
}
fn invalid(r: &mut Rig) -> Event {
    Event::Invalid {
        id: r.new_id(),
        action: Some("fly".into()),
        reason: "unknown action 'fly'".into(),
    }
}
fn spawned(r: &mut Rig) -> Event {
    Event::Spawned {
        build_id: r.bid(),
        process: PROC,
        mounts_before: Vec::new(),
        mounts_ns: String::new(),
    }
}
fn spawn_failed(r: &mut Rig) -> Event {
    Event::SpawnFailed {
        build_id: r.bid(),
        reason: "appsdk: not found".into(),
    }
}
/// appsdk failed by itself (exit 1), taking its group with it.
fn exit1(r: &mut Rig) -> Event {
    Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Code(1),
        group_alive: false,
    }
}
/// The SDK logged its success line.
fn log_success(r: &mut Rig) -> Event {
    Event::LogRead {
        build_id: r.bid(),
        news: LogNews {
            success: true,
            ..LogNews::default()
        },
    }
}
fn exit0(r: &mut Rig) -> Event {
    Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Code(0),
        group_alive: false,
    }
}
/// The leader died of the SIGTERM and took its whole group with it.
fn term_exit(r: &mut Rig) -> Event {
    Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Signal(15),
        group_alive: false,
    }
}
fn group_gone(r: &mut Rig) -> Event {
    Event::GroupGone { build_id: r.bid() }
}
fn clean_ok(r: &mut Rig) -> Event {
    Event::CleanDone {
        job: r.clean_job.unwrap_or(JobId(STALE)),
        result: Ok(()),
    }
}
fn yaml_ok(r: &mut Rig) -> Event {
    Event::YamlDone {
        job: r.yaml_job.unwrap_or(JobId(STALE)),
        outcome: YamlOutcome::Exited {
            exit: Exit::Code(0),
            yaml_made: true,
        },
    }
}
/// The timer due next, as the driver feeds it (Grace if none is armed:
/// then it is stale).
fn tick(r: &mut Rig) -> Event {
    Event::Timeout(r.m.next_timer().map_or(Timer::Grace, |(_, t)| t))
}
/// The grace period is over.
fn grace_over(r: &mut Rig) -> Event {
    r.now += GRACE;
    Event::Timeout(Timer::Grace)
}
/// The wait after SIGKILL is over.
fn kill_wait_over(r: &mut Rig) -> Event {
    r.now += KILL_WAIT_MS;
    Event::Timeout(Timer::KillWait)
}
/// Nothing is left of the adopted build; its log shows its success.
fn adopted_gone(r: &mut Rig) -> Event {
    Event::AdoptedGone {
        build_id: r.bid(),
        killed: 0,
        log: LogNews {
            file: Some("/w/log/log.appsdk_1700000000".into()),
            success: true,
            error: None,
        },
    }
}
/// The time to send SIGKILL again has come.
fn kill_repeat_due(r: &mut Rig) -> Event {
    r.now += KILL_REPEAT_MS;
    Event::Timeout(Timer::KillRepeat)
}
/// getyaml overran its time.
fn getyaml_overdue(r: &mut Rig) -> Event {
    r.now += GETYAML_TIMEOUT_MS;
    Event::Timeout(Timer::Getyaml)
}
fn shutdown(_: &mut Rig) -> Event {
    Event::Shutdown
}
/// The SDK's log showed its file (no success line).
fn log_read(r: &mut Rig) -> Event {
    Event::LogRead {
        build_id: r.bid(),
        news: LogNews {
            file: Some("/w/log/log.appsdk_1700000000".into()),
            ..LogNews::default()
        },
    }
}
/// The leader exited; others of its group are left.
fn leader_exit(r: &mut Rig) -> Event {
    Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Signal(15),
        group_alive: true,
    }
}
fn getyaml_other(r: &mut Rig) -> Event {
    r.req(Request::GetYaml {
        workdir: "/v".into(),
    })
}

// Machines in each state, driven there by events from a fresh machine.

fn idle() -> Rig {
    Rig::new()
}
/// Spawning: the spawn not yet reported (the build request waits).
fn starting() -> Rig {
    let mut r = idle();
    r.go(build);
    assert_eq!(r.kind(), S::Spawning);
    r
}
/// Running, spawned, the build request answered.
fn building() -> Rig {
    let mut r = starting();
    r.go(spawned);
    assert!(r.open.is_empty());
    assert_eq!(r.kind(), S::Running);
    r
}
/// Deploying: the SDK logged its success line.
fn deploying() -> Rig {
    let mut r = building();
    r.go(log_success);
    assert_eq!(r.kind(), S::Deploying);
    r
}
/// Finishing: stopped after its success line, one stop waiting.
fn finishing() -> Rig {
    let mut r = deploying();
    r.go(stop);
    assert_eq!(r.kind(), S::Finishing);
    r
}
/// Terminating: SIGTERM sent, one stop request waiting.
fn stopping() -> Rig {
    let mut r = building();
    r.go(stop);
    assert_eq!(r.kind(), S::Terminating);
    r
}
/// Killing: the grace period ran out, SIGKILL sent.
fn killing() -> Rig {
    let mut r = stopping();
    r.go(grace_over);
    assert_eq!(r.kind(), S::Killing);
    r
}
/// Reaping: the leader ended by itself, the rest of its group is killed.
fn reaping() -> Rig {
    let mut r = building();
    r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Code(1),
        group_alive: true,
    });
    assert_eq!(r.kind(), S::Reaping);
    r
}
/// Reaping after a stop: the leader died of the SIGTERM, the rest of its
/// group is killed; the stop waits.
fn stopping_reaped() -> Rig {
    let mut r = stopping();
    r.go(leader_exit);
    assert_eq!(r.kind(), S::Reaping);
    r
}
fn cleaning() -> Rig {
    let mut r = idle();
    r.go(clean);
    assert_eq!(r.kind(), S::Cleaning);
    r
}
fn with_getyaml(mut r: Rig) -> Rig {
    r.go(getyaml);
    assert!(r.yaml_job.is_some());
    assert_eq!(r.m.yaml_kind(), YamlKind::Running);
    r
}
/// Adopted: latd started and found the build the last one ran after its
/// success line, its SDK still running.
fn adopted() -> Rig {
    let mut r = Rig::with_machine(Machine::new(
        config(5),
        Persisted {
            next_build_id: 8,
            current: Some(BuildRecord {
                success_logged: true,
                ..running_record(7)
            }),
            history: Vec::new(),
        },
        T0,
        Recovered {
            finishing: true,
            killed: 0,
            log: LogNews::default(),
        },
    ));
    r.build_id = Some(7);
    assert_eq!(r.kind(), S::Adopted);
    r
}
fn idle_yaml() -> Rig {
    with_getyaml(idle())
}
fn building_yaml() -> Rig {
    with_getyaml(building())
}
fn stopping_yaml() -> Rig {
    with_getyaml(stopping())
}
/// Draining: asked to exit while a build ran; SIGTERM sent.
fn draining() -> Rig {
    let mut r = building();
    r.go(shutdown);
    assert_eq!(r.m.life(), Life::Draining);
    r
}
/// Exited.
fn exited() -> Rig {
    let mut r = idle();
    r.go(shutdown);
    assert_eq!(r.m.life(), Life::Exited);
    r
}

/// Every setup, by name: the per-cell tests run from each one.
const GIVENS: &[(&str, Given)] = &[
    ("idle", idle),
    ("starting", starting),
    ("building", building),
    ("deploying", deploying),
    ("finishing", finishing),
    ("stopping", stopping),
    ("killing", killing),
    ("reaping", reaping),
    ("stopping_reaped", stopping_reaped),
    ("cleaning", cleaning),
    ("adopted", adopted),
    ("idle_yaml", idle_yaml),
    ("building_yaml", building_yaml),
    ("stopping_yaml", stopping_yaml),
    ("draining", draining),
    ("exited", exited),
];

/// One event maker of every kind the driver can feed.
const MAKERS: &[MakeEvent] = &[
    build,
    status,
    stop,
    logs,
    clean,
    getyaml,
    getyaml_other,
    invalid,
    spawned,
    spawn_failed,
    log_read,
    log_success,
    exit0,
    exit1,
    leader_exit,
    group_gone,
    clean_ok,
    yaml_ok,
    adopted_gone,
    grace_over,
    kill_wait_over,
    kill_repeat_due,
    getyaml_overdue,
    shutdown,
];

// ===========================================================================
// 1. The transition tables
// ===========================================================================

/// An expected effect, by kind and key fields.
#[derive(Debug, Clone, Copy)]
enum W {
    Persist,
    Status,
    Spawn,
    /// A signal to the build that was live before the step.
    Signal(Sig),
    Clean,
    GetYaml,
    Cancel,
    /// `ReleaseMounts` of the build that was live before the step.
    Unmount,
    /// A `succeed` reply echoing this action.
    Ok(&'static str),
    /// A `fail` reply echoing this action, its reason containing this text.
    Fail(&'static str, &'static str),
    /// `ClearAdopted` of the live (adopted) build.
    ClearAdopted,
    Exit,
}

// Short names so that each row fits on one line.
const PERSIST: W = W::Persist;
/// `WriteStatus`.
const STATUS: W = W::Status;
const SPAWN: W = W::Spawn;
const TERM: W = W::Signal(Sig::Term);
const KILL: W = W::Signal(Sig::Kill);
const CLEAN: W = W::Clean;
const GETYAML: W = W::GetYaml;
const CANCEL: W = W::Cancel;
const UNMOUNT: W = W::Unmount;
const EXIT: W = W::Exit;
const CLEAR: W = W::ClearAdopted;
const fn ok(action: &'static str) -> W {
    W::Ok(action)
}
const fn fail(action: &'static str, why: &'static str) -> W {
    W::Fail(action, why)
}
/// A change of region build's state always saves, then writes the status, first.
const CHANGED: [W; 2] = [PERSIST, STATUS];

fn check(fx: &[Effect], want: &[W], live_build: Option<u64>, ctx: &str) {
    assert_eq!(fx.len(), want.len(), "{ctx}: got {fx:#?}\nwant {want:?}");
    for (e, w) in fx.iter().zip(want) {
        let good = match (w, e) {
            (W::Persist, Effect::Persist(_)) => true,
            (W::Status, Effect::WriteStatus(_)) => true,
            (W::Spawn, Effect::Spawn { .. }) => true,
            (W::Signal(s), Effect::Signal { build_id, sig }) => {
                s == sig && Some(*build_id) == live_build
            }
            (W::Clean, Effect::StartClean { .. }) => true,
            (W::GetYaml, Effect::StartGetYaml { .. }) => true,
            (W::Cancel, Effect::CancelJob { .. }) => true,
            (W::Unmount, Effect::ReleaseMounts { build_id }) => Some(*build_id) == live_build,
            (W::Ok(a), Effect::Reply { reply, .. }) => {
                reply.action == *a
                    && reply.result == ReplyResult::Succeed
                    && reply.fail_reason.is_none()
            }
            (W::Fail(a, why), Effect::Reply { reply, .. }) => {
                reply.action == *a
                    && reply.result == ReplyResult::Fail
                    && reply
                        .fail_reason
                        .as_deref()
                        .is_some_and(|r| r.contains(why))
            }
            (W::Exit, Effect::Exit) => true,
            (W::ClearAdopted, Effect::ClearAdopted { build }) => Some(build.id) == live_build,
            _ => false,
        };
        assert!(good, "{ctx}: got {e:#?}, want {w:?}\nall effects: {fx:#?}");
    }
}

/// A state of one of the three regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cell {
    B(StateKind),
    Y(YamlKind),
    L(Life),
}

impl Cell {
    fn name(self) -> &'static str {
        match self {
            Cell::B(s) => s.name(),
            Cell::Y(s) => s.name(),
            Cell::L(s) => s.name(),
        }
    }

    /// The region's state in `m`.
    fn of(self, m: &Machine) -> Cell {
        match self {
            Cell::B(_) => Cell::B(m.state().kind()),
            Cell::Y(_) => Cell::Y(m.yaml_kind()),
            Cell::L(_) => Cell::L(m.life()),
        }
    }

    /// What the code's table says for this cell, given `guards`: the
    /// target and whether the row does anything.
    fn rule(self, on: EventKind, guards: &Guards) -> (Cell, bool) {
        match self {
            Cell::B(s) => {
                let r = build_rule(s, on, guards);
                (Cell::B(r.target(s)), r.does != BuildDoes::Ignore)
            }
            Cell::Y(s) => {
                let r = yaml_rule(s, on, guards);
                (Cell::Y(r.target(s)), r.does != YamlDoes::Ignore)
            }
            Cell::L(s) => {
                let r = life_rule(s, on, guards);
                (Cell::L(r.target(s)), r.does != LifeDoes::Ignore)
            }
        }
    }
}

/// Every cell of every region whose row does something: (state, event,
/// guard), from the code's tables.
fn acting_cells() -> BTreeSet<(Cell, EventKind, Option<Guard>)> {
    fn add<S: Copy, D: Copy + PartialEq>(
        out: &mut BTreeSet<(Cell, EventKind, Option<Guard>)>,
        table: &[Row<S, D>],
        ignore: D,
        cell: fn(S) -> Cell,
    ) {
        for r in table.iter().filter(|r| r.does != ignore) {
            for &s in r.from {
                for &e in r.on {
                    out.insert((cell(s), e, r.guard));
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    add(&mut out, BUILD_TABLE, BuildDoes::Ignore, Cell::B);
    add(&mut out, YAML_TABLE, YamlDoes::Ignore, Cell::Y);
    add(&mut out, LIFE_TABLE, LifeDoes::Ignore, Cell::L);
    out
}

struct Spec {
    from: Cell,
    on: EventKind,
    guard: Option<Guard>,
    /// Builds a machine with its region in `from`.
    given: Given,
    /// Makes the event (of kind `on`).
    event: MakeEvent,
    to: Cell,
    want: &'static [W],
}

const fn row(
    from: Cell,
    on: EventKind,
    guard: Option<Guard>,
    given: Given,
    event: MakeEvent,
    to: Cell,
    want: &'static [W],
) -> Spec {
    Spec {
        from,
        on,
        guard,
        given,
        event,
        to,
        want,
    }
}

use Cell::{B, L, Y};
use EventKind as E;
use StateKind as S;
const NO: Option<Guard> = None;
const YAML_RUNS: Option<Guard> = Some(Guard::YamlRunning);
const CLEANS: Option<Guard> = Some(Guard::Cleaning);
const SAME: Option<Guard> = Some(Guard::SameWorkdir);
const NOYAML: YamlKind = YamlKind::Idle;
const YAML: YamlKind = YamlKind::Running;

const RUNNING: &str = "a build is already running";
const STOPPING: &str = "a build is being stopped";
const CLEANING: &str = "a clean is running";

/// The spec: every cell that does something, written out by hand. `&[]`:
/// nothing happens yet (the reply waits).
#[rustfmt::skip]
const SPEC: &[Spec] = &[
    // from             on                guard      given            event            to                 effects
    row(B(S::Idle),     E::Build,         NO,        idle,            build,           B(S::Spawning),    &[PERSIST, STATUS, SPAWN]),
    row(B(S::Idle),     E::Clean,         YAML_RUNS, idle_yaml,       clean,           B(S::Idle),        &[fail("clean", "getyaml is running")]),
    row(B(S::Idle),     E::Clean,         NO,        idle,            clean,           B(S::Cleaning),    &[PERSIST, STATUS, CLEAN]),
    row(B(S::Idle),     E::Stop,          NO,        idle,            stop,            B(S::Idle),        &[ok("stop")]),

    row(B(S::Spawning), E::Build,         NO,        starting,        build,           B(S::Spawning),    &[fail("build", RUNNING)]),
    row(B(S::Spawning), E::Clean,         NO,        starting,        clean,           B(S::Spawning),    &[fail("clean", RUNNING)]),
    row(B(S::Spawning), E::Spawned,       NO,        starting,        spawned,         B(S::Running),     &[PERSIST, STATUS, ok("build")]),
    row(B(S::Spawning), E::SpawnFailed,   NO,        starting,        spawn_failed,    B(S::Idle),        &[PERSIST, STATUS, fail("build", "appsdk: not found")]),
    row(B(S::Spawning), E::LogRead,       NO,        starting,        log_read,        B(S::Spawning),    &[PERSIST, STATUS]),
    row(B(S::Spawning), E::SuccessLine,   NO,        starting,        log_success,     B(S::Spawning),    &[PERSIST, STATUS]),
    row(B(S::Spawning), E::BuildExited,   NO,        starting,        exit1,           B(S::Idle),        &[PERSIST, STATUS, fail("build", "exited before"), UNMOUNT]),
    row(B(S::Spawning), E::LeaderExited,  NO,        starting,        leader_exit,     B(S::Reaping),     &[PERSIST, STATUS, fail("build", "exited before"), KILL]),
    row(B(S::Spawning), E::Stop,          NO,        starting,        stop,            B(S::Terminating), &[PERSIST, STATUS, fail("build", "stopped before it started"), TERM]),
    row(B(S::Spawning), E::Shutdown,      NO,        starting,        shutdown,        B(S::Terminating), &[PERSIST, STATUS, fail("build", "stopped before it started"), TERM]),

    row(B(S::Running),  E::Build,         NO,        building,        build,           B(S::Running),     &[fail("build", RUNNING)]),
    row(B(S::Running),  E::Clean,         NO,        building,        clean,           B(S::Running),     &[fail("clean", RUNNING)]),
    row(B(S::Running),  E::LogRead,       NO,        building,        log_read,        B(S::Running),     &[PERSIST, STATUS]),
    row(B(S::Running),  E::SuccessLine,   NO,        building,        log_success,     B(S::Deploying),   &[PERSIST, STATUS]),
    row(B(S::Running),  E::BuildExited,   NO,        building,        exit0,           B(S::Idle),        &[PERSIST, STATUS, UNMOUNT]),
    row(B(S::Running),  E::LeaderExited,  NO,        building,        leader_exit,     B(S::Reaping),     &[PERSIST, STATUS, KILL]),
    row(B(S::Running),  E::Stop,          NO,        building,        stop,            B(S::Terminating), &[PERSIST, STATUS, TERM]),
    row(B(S::Running),  E::Shutdown,      NO,        building,        shutdown,        B(S::Terminating), &[PERSIST, STATUS, TERM]),

    row(B(S::Deploying), E::Build,        NO,        deploying,       build,           B(S::Deploying),   &[fail("build", RUNNING)]),
    row(B(S::Deploying), E::Clean,        NO,        deploying,       clean,           B(S::Deploying),   &[fail("clean", RUNNING)]),
    row(B(S::Deploying), E::LogRead,      NO,        deploying,       log_read,        B(S::Deploying),   &[PERSIST, STATUS]),
    row(B(S::Deploying), E::SuccessLine,  NO,        deploying,       log_success,     B(S::Deploying),   &[PERSIST, STATUS]),
    row(B(S::Deploying), E::BuildExited,  NO,        deploying,       exit0,           B(S::Idle),        &[PERSIST, STATUS, UNMOUNT]),
    row(B(S::Deploying), E::LeaderExited, NO,        deploying,       leader_exit,     B(S::Reaping),     &[PERSIST, STATUS, KILL]),
    row(B(S::Deploying), E::Stop,         NO,        deploying,       stop,            B(S::Finishing),   &[PERSIST, STATUS]),
    row(B(S::Deploying), E::Shutdown,     NO,        deploying,       shutdown,        B(S::Finishing),   &[PERSIST, STATUS]),

    row(B(S::Finishing), E::Build,        NO,        finishing,       build,           B(S::Finishing),   &[fail("build", STOPPING)]),
    row(B(S::Finishing), E::Clean,        NO,        finishing,       clean,           B(S::Finishing),   &[fail("clean", STOPPING)]),
    row(B(S::Finishing), E::LogRead,      NO,        finishing,       log_read,        B(S::Finishing),   &[PERSIST, STATUS]),
    row(B(S::Finishing), E::SuccessLine,  NO,        finishing,       log_success,     B(S::Finishing),   &[PERSIST, STATUS]),
    row(B(S::Finishing), E::GraceOver,    NO,        finishing,       grace_over,      B(S::Terminating), &[PERSIST, STATUS, TERM]),
    row(B(S::Finishing), E::BuildExited,  NO,        finishing,       exit0,           B(S::Idle),        &[PERSIST, STATUS, UNMOUNT, ok("stop")]),
    row(B(S::Finishing), E::LeaderExited, NO,        finishing,       leader_exit,     B(S::Reaping),     &[PERSIST, STATUS, KILL]),
    row(B(S::Finishing), E::Stop,         NO,        finishing,       stop,            B(S::Finishing),   &[]),
    row(B(S::Finishing), E::Shutdown,     NO,        finishing,       shutdown,        B(S::Finishing),   &[]),

    row(B(S::Terminating), E::Build,        NO,      stopping,        build,           B(S::Terminating), &[fail("build", STOPPING)]),
    row(B(S::Terminating), E::Clean,        NO,      stopping,        clean,           B(S::Terminating), &[fail("clean", STOPPING)]),
    row(B(S::Terminating), E::LogRead,      NO,      stopping,        log_read,        B(S::Terminating), &[PERSIST, STATUS]),
    row(B(S::Terminating), E::SuccessLine,  NO,      stopping,        log_success,     B(S::Terminating), &[PERSIST, STATUS]),
    row(B(S::Terminating), E::GraceOver,    NO,      stopping,        grace_over,      B(S::Killing),     &[PERSIST, STATUS, KILL]),
    row(B(S::Terminating), E::BuildExited,  NO,      stopping,        term_exit,       B(S::Idle),        &[PERSIST, STATUS, UNMOUNT, ok("stop")]),
    row(B(S::Terminating), E::LeaderExited, NO,      stopping,        leader_exit,     B(S::Reaping),     &[PERSIST, STATUS, KILL]),
    row(B(S::Terminating), E::Stop,         NO,      stopping,        stop,            B(S::Terminating), &[]),
    row(B(S::Terminating), E::Shutdown,     NO,      stopping,        shutdown,        B(S::Terminating), &[]),

    row(B(S::Killing),  E::Build,         NO,        killing,         build,           B(S::Killing),     &[fail("build", STOPPING)]),
    row(B(S::Killing),  E::Clean,         NO,        killing,         clean,           B(S::Killing),     &[fail("clean", STOPPING)]),
    row(B(S::Killing),  E::LogRead,       NO,        killing,         log_read,        B(S::Killing),     &[PERSIST, STATUS]),
    row(B(S::Killing),  E::SuccessLine,   NO,        killing,         log_success,     B(S::Killing),     &[PERSIST, STATUS]),
    row(B(S::Killing),  E::LeaderExited,  NO,        killing,         leader_exit,     B(S::Reaping),     &[PERSIST, STATUS]),
    row(B(S::Killing),  E::BuildExited,   NO,        killing,         term_exit,       B(S::Idle),        &[PERSIST, STATUS, UNMOUNT, ok("stop")]),
    row(B(S::Killing),  E::KillWaitOver,  NO,        killing,         kill_wait_over,  B(S::Idle),        &[PERSIST, STATUS, UNMOUNT, ok("stop")]),
    row(B(S::Killing),  E::KillRepeatDue, NO,        killing,         kill_repeat_due, B(S::Killing),     &[KILL]),
    row(B(S::Killing),  E::Stop,          NO,        killing,         stop,            B(S::Killing),     &[]),
    row(B(S::Killing),  E::Shutdown,      NO,        killing,         shutdown,        B(S::Killing),     &[]),

    row(B(S::Reaping),  E::Build,         NO,        reaping,         build,           B(S::Reaping),     &[fail("build", STOPPING)]),
    row(B(S::Reaping),  E::Clean,         NO,        reaping,         clean,           B(S::Reaping),     &[fail("clean", STOPPING)]),
    row(B(S::Reaping),  E::LogRead,       NO,        reaping,         log_read,        B(S::Reaping),     &[PERSIST, STATUS]),
    row(B(S::Reaping),  E::SuccessLine,   NO,        reaping,         log_success,     B(S::Reaping),     &[PERSIST, STATUS]),
    row(B(S::Reaping),  E::GroupGone,     NO,        stopping_reaped, group_gone,      B(S::Idle),        &[PERSIST, STATUS, UNMOUNT, ok("stop")]),
    row(B(S::Reaping),  E::KillWaitOver,  NO,        reaping,         kill_wait_over,  B(S::Idle),        &[PERSIST, STATUS, UNMOUNT]),
    row(B(S::Reaping),  E::KillRepeatDue, NO,        reaping,         kill_repeat_due, B(S::Reaping),     &[KILL]),
    row(B(S::Reaping),  E::Stop,          NO,        reaping,         stop,            B(S::Reaping),     &[]),
    row(B(S::Reaping),  E::Shutdown,      NO,        reaping,         shutdown,        B(S::Reaping),     &[]),

    row(B(S::Cleaning), E::Build,         NO,        cleaning,        build,           B(S::Cleaning),    &[fail("build", CLEANING)]),
    row(B(S::Cleaning), E::Clean,         NO,        cleaning,        clean,           B(S::Cleaning),    &[fail("clean", CLEANING)]),
    row(B(S::Cleaning), E::Stop,          NO,        cleaning,        stop,            B(S::Cleaning),    &[ok("stop")]),
    row(B(S::Cleaning), E::CleanDone,     NO,        cleaning,        clean_ok,        B(S::Idle),        &[PERSIST, STATUS, ok("clean")]),
    row(B(S::Cleaning), E::Shutdown,      NO,        cleaning,        shutdown,        B(S::Idle),        &[PERSIST, STATUS, fail("clean", "interrupted"), EXIT]),

    row(B(S::Adopted),  E::Build,         NO,        adopted,         build,           B(S::Adopted),     &[fail("build", RUNNING)]),
    row(B(S::Adopted),  E::Clean,         NO,        adopted,         clean,           B(S::Adopted),     &[fail("clean", RUNNING)]),
    row(B(S::Adopted),  E::Stop,          NO,        adopted,         stop,            B(S::Adopted),     &[]),
    row(B(S::Adopted),  E::GraceOver,     NO,        adopted,         grace_over,      B(S::Adopted),     &[CLEAR]),
    row(B(S::Adopted),  E::Shutdown,      NO,        adopted,         shutdown,        B(S::Adopted),     &[CLEAR]),
    row(B(S::Adopted),  E::AdoptedGone,   NO,        adopted,         adopted_gone,    B(S::Idle),        &[PERSIST, STATUS]),

    row(Y(NOYAML),      E::GetYaml,       CLEANS,    cleaning,        getyaml,         Y(NOYAML),         &[fail("getyaml", CLEANING)]),
    row(Y(NOYAML),      E::GetYaml,       NO,        idle,            getyaml,         Y(YAML),           &[GETYAML]),
    row(Y(YAML),        E::GetYaml,       SAME,      idle_yaml,       getyaml,         Y(YAML),           &[]),
    row(Y(YAML),        E::GetYaml,       NO,        idle_yaml,       getyaml_other,   Y(YAML),           &[fail("getyaml", "running for /w")]),
    row(Y(YAML),        E::YamlDone,      NO,        building_yaml,   yaml_ok,         Y(NOYAML),         &[ok("getyaml")]),
    row(Y(YAML),        E::GetyamlOverdue, NO,       stopping_yaml,   getyaml_overdue, Y(NOYAML),         &[CANCEL, fail("getyaml", "did not finish within")]),
    row(Y(YAML),        E::Exiting,       NO,        idle_yaml,       shutdown,        Y(NOYAML),         &[fail("getyaml", "shutting down"), EXIT]),

    row(L(Life::Serving),  E::Status,     NO,        building,        status,          L(Life::Serving),  &[STATUS, ok("status")]),
    row(L(Life::Serving),  E::Logs,       NO,        idle,            logs,            L(Life::Serving),  &[ok("logs")]),
    row(L(Life::Serving),  E::Invalid,    NO,        stopping,        invalid,         L(Life::Serving),  &[fail("fly", "unknown action")]),
    row(L(Life::Serving),  E::Shutdown,   NO,        building,        shutdown,        L(Life::Draining), &[PERSIST, STATUS, TERM]),
    row(L(Life::Draining), E::Status,     NO,        draining,        status,          L(Life::Draining), &[STATUS, ok("status")]),
    row(L(Life::Draining), E::Logs,       NO,        draining,        logs,            L(Life::Draining), &[ok("logs")]),
    row(L(Life::Draining), E::Invalid,    NO,        draining,        invalid,         L(Life::Draining), &[fail("fly", "unknown action")]),
    row(L(Life::Draining), E::Drained,    NO,        draining,        term_exit,       L(Life::Exited),   &[PERSIST, STATUS, UNMOUNT, EXIT]),
    row(L(Life::Exited),   E::Build,      NO,        exited,          build,           L(Life::Exited),   &[fail("build", "shutting down")]),
    row(L(Life::Exited),   E::Status,     NO,        exited,          status,          L(Life::Exited),   &[fail("status", "shutting down")]),
    row(L(Life::Exited),   E::Stop,       NO,        exited,          stop,            L(Life::Exited),   &[fail("stop", "shutting down")]),
    row(L(Life::Exited),   E::Logs,       NO,        exited,          logs,            L(Life::Exited),   &[fail("logs", "shutting down")]),
    row(L(Life::Exited),   E::Clean,      NO,        exited,          clean,           L(Life::Exited),   &[fail("clean", "shutting down")]),
    row(L(Life::Exited),   E::GetYaml,    NO,        exited,          getyaml,         L(Life::Exited),   &[fail("getyaml", "shutting down")]),
    row(L(Life::Exited),   E::Invalid,    NO,        exited,          invalid,         L(Life::Exited),   &[fail("fly", "shutting down")]),
];

/// The hand-written spec and the code's tables name the same acting cells.
#[test]
fn the_spec_has_a_row_for_every_acting_cell_and_no_other() {
    let mut spec = BTreeSet::new();
    for r in SPEC {
        assert!(
            spec.insert((r.from, r.on, r.guard)),
            "two rows for {:?} × {:?} [{:?}]",
            r.from,
            r.on,
            r.guard
        );
    }
    let code = acting_cells();
    let missing: Vec<_> = code.difference(&spec).collect();
    let extra: Vec<_> = spec.difference(&code).collect();
    assert!(missing.is_empty(), "no spec row for {missing:?}");
    assert!(
        extra.is_empty(),
        "spec rows the tables do not act on: {extra:?}"
    );
}

#[test]
fn every_row_of_the_spec_holds() {
    for r in SPEC {
        let ctx = format!("{} --{}-->", r.from.name(), r.on.name());
        let mut rig = (r.given)();
        assert_eq!(
            r.from.of(&rig.m),
            r.from,
            "{ctx}: the setup reached the wrong state"
        );
        let ev = (r.event)(&mut rig);
        // Drained and Exiting are raised by the machine itself, on the way.
        if !matches!(r.on, E::Drained | E::Exiting) {
            assert_eq!(
                ev.kind(),
                r.on,
                "{ctx}: the event maker made the wrong kind"
            );
            let guards = rig.m.guards(&ev);
            let (to, acts) = r.from.rule(r.on, &guards);
            assert!(acts, "{ctx}: the code's row does nothing");
            assert_eq!(to, r.to, "{ctx}: the code's table says {}", to.name());
            if let Some(g) = r.guard {
                assert!(
                    guards.holds(g),
                    "{ctx}: the setup does not make [{}] hold",
                    g.name()
                );
            }
        }
        let before = rig.m.state().kind();
        let live = rig.build_id.filter(|_| rig.m.state().build().is_some());
        let fx = rig.step(ev);
        assert_eq!(r.to.of(&rig.m), r.to, "{ctx}: effects {fx:#?}");
        check(&fx, r.want, live, &ctx);
        // Whatever changed region build's state saved first.
        if rig.m.state().kind() != before {
            check(&fx[..2], &CHANGED, live, &ctx);
        }
    }
}

/// From every setup, every event that every region ignores in the states
/// the setup is in changes nothing at all.
#[test]
fn ignored_cells_change_nothing_from_every_setup() {
    let mut checked = 0;
    for &(name, given) in GIVENS {
        for make in MAKERS {
            let mut rig = given();
            let ev = make(&mut rig);
            let guards = rig.m.guards(&ev);
            let kind = ev.kind();
            let m = &rig.m;
            let cells = [
                Cell::B(m.state().kind()),
                Cell::Y(m.yaml_kind()),
                Cell::L(m.life()),
            ];
            let exited = m.has_exited();
            let acts = if exited {
                Cell::L(m.life()).rule(kind, &guards).1
            } else {
                m.is_current(rig.now, &ev) && cells.iter().any(|c| c.rule(kind, &guards).1)
            };
            if acts {
                continue;
            }
            let before = (
                rig.m.state().clone(),
                rig.m.yaml_kind(),
                rig.m.life(),
                rig.m.persisted(),
                rig.m.next_timer(),
            );
            let fx = rig.step(ev.clone());
            assert!(fx.is_empty(), "{name}: {ev:?} did {fx:#?}");
            let after = (
                rig.m.state().clone(),
                rig.m.yaml_kind(),
                rig.m.life(),
                rig.m.persisted(),
                rig.m.next_timer(),
            );
            assert_eq!(after, before, "{name}: {ev:?} changed the machine");
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} ignored cells were tried");
}

/// Every acting cell of the spec is reached from at least one setup of
/// GIVENS (so the ignore test above covers the right states).
#[test]
fn the_setups_reach_every_state_of_every_region() {
    let mut seen = BTreeSet::new();
    for &(_, given) in GIVENS {
        let r = given();
        seen.insert(Cell::B(r.m.state().kind()));
        seen.insert(Cell::Y(r.m.yaml_kind()));
        seen.insert(Cell::L(r.m.life()));
    }
    let all: BTreeSet<Cell> = StateKind::ALL
        .iter()
        .map(|&s| Cell::B(s))
        .chain(YamlKind::ALL.iter().map(|&s| Cell::Y(s)))
        .chain(Life::ALL.iter().map(|&s| Cell::L(s)))
        .collect();
    assert_eq!(seen, all);
}

// ===========================================================================
// 2. Scenarios
// ===========================================================================

#[test]
fn build_that_exits_0_succeeds_and_status_says_idle() {
    let mut r = Rig::new();
    let (id, fx) = r.ask(Request::Build(build_req("/w")));
    assert!(!has_reply(&fx), "the reply waits for the spawn");
    match &fx[2] {
        Effect::Spawn { build_id, request } => {
            assert_eq!(*build_id, 1);
            assert_eq!(request, &build_req("/w"));
        }
        other => panic!("want Spawn, got {other:?}"),
    }
    assert_eq!(r.m.status(r.now).build_status, "running");

    let rep = reply_to(&r.go(spawned), id);
    assert_eq!(rep.result, ReplyResult::Succeed);
    assert_eq!(rep.build_id, Some(1));
    assert_eq!(rep.log_file_path, Some(PathBuf::from("/w/log/log.appsdk")));
    assert_eq!(r.m.current_build().unwrap().process, Some(PROC));

    r.now += 5_000;
    r.go(exit0);
    let st = r.m.status(r.now);
    assert_eq!(
        (
            st.lat_status.as_str(),
            st.build_status.as_str(),
            st.state.as_str()
        ),
        ("idle", "succeed", "idle")
    );
    let b = st.build.unwrap();
    assert_eq!(
        (b.outcome, b.exit_code, b.fail_reason),
        (Outcome::Succeeded, Some(0), None)
    );
    assert_eq!(b.ended_at, Some(T0 + 5_000));
}

#[test]
fn build_exiting_nonzero_fails_with_the_code_in_the_reason() {
    let mut r = building();
    r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Code(3),
        group_alive: false,
    });
    let st = r.m.status(r.now);
    assert_eq!(
        (st.lat_status.as_str(), st.build_status.as_str()),
        ("idle", "fail")
    );
    let b = r.last_build();
    assert_eq!((b.outcome, b.exit_code), (Outcome::Failed, Some(3)));
    let reason = b.fail_reason.unwrap();
    assert!(
        reason.contains("code 3") && reason.contains("/w/log/log.appsdk"),
        "{reason}"
    );
}

#[test]
fn build_killed_by_a_signal_fails_naming_the_signal() {
    let mut r = building();
    r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Signal(11),
        group_alive: false,
    });
    let b = r.last_build();
    assert_eq!((b.outcome, b.signal), (Outcome::Failed, Some(11)));
    assert!(b.fail_reason.unwrap().contains("signal 11"));
}

#[test]
fn stop_during_build_terms_and_answers_once_the_group_is_gone() {
    let mut r = building();
    let (id, fx) = r.ask(Request::Stop);
    assert_eq!(signals(&fx), vec![(1, Sig::Term)]);
    assert!(!has_reply(&fx), "the stop waits for the build to end");
    assert_eq!(r.m.status(r.now).lat_status, "busy");

    // The leader dies of the TERM; a child lingers: the SDK has done its
    // cleanup, so what it left is killed at once.
    let fx = r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Signal(15),
        group_alive: true,
    });
    check(&fx, &[PERSIST, STATUS, KILL], Some(1), "leader exit");
    assert_eq!(r.kind(), StateKind::Reaping);

    let fx = r.go(group_gone);
    check(
        &fx,
        &[PERSIST, STATUS, UNMOUNT, ok("stop")],
        Some(1),
        "group gone",
    );
    let rep = reply_to(&fx, id);
    assert_eq!(rep.build_id, Some(1));
    assert!(rep.message.is_some_and(|m| m.contains("build 1")));
    let st = r.m.status(r.now);
    assert_eq!(
        (st.lat_status.as_str(), st.build_status.as_str()),
        ("idle", "fail")
    );
    let b = r.last_build();
    assert_eq!((b.outcome, b.signal), (Outcome::Stopped, Some(15)));
    assert_eq!(b.fail_reason.as_deref(), Some("stopped by request"));
}

#[test]
fn group_gone_before_the_leader_is_reaped_does_not_end_the_stop() {
    let mut r = stopping();
    assert!(r.go(group_gone).is_empty());
    assert_eq!(r.kind(), StateKind::Terminating);
    r.go(term_exit);
    assert_eq!(r.kind(), StateKind::Idle);
    assert!(r.open.is_empty());
}

#[test]
fn stop_grace_expiry_kills_only_after_the_deadline() {
    let mut r = building();
    let stop_at = r.now;
    r.go(stop);
    let deadline = stop_at + GRACE;
    assert_eq!(r.m.next_timer().map(|(at, _)| at), Some(deadline));

    r.now = deadline - 1;
    assert!(r.go(tick).is_empty(), "no kill before the deadline");
    assert_eq!(r.m.next_timer().map(|(at, _)| at), Some(deadline));

    r.now = deadline;
    assert_eq!(signals(&r.go(tick)), vec![(1, Sig::Kill)]);
    assert_eq!(
        r.m.timer(Timer::KillWait),
        Some(deadline + KILL_WAIT_MS),
        "then a wait for the kill to work"
    );
    assert_eq!(
        r.m.next_timer().map(|(at, _)| at),
        Some(deadline + KILL_REPEAT_MS),
        "and SIGKILL again soon, for what it missed"
    );
    r.now = deadline + KILL_REPEAT_MS - 1;
    assert!(r.go(tick).is_empty(), "not again before its time");
    r.now = deadline + KILL_REPEAT_MS;
    assert_eq!(signals(&r.go(tick)), vec![(1, Sig::Kill)], "again");
    assert_eq!(
        r.m.next_timer().map(|(at, _)| at),
        Some(deadline + 2 * KILL_REPEAT_MS),
        "and again while the build lasts"
    );
    assert_eq!(r.kind(), S::Killing);

    r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Signal(9),
        group_alive: false,
    });
    assert!(r.open.is_empty());
    let b = r.last_build();
    assert_eq!(b.outcome, Outcome::Stopped);
    assert!(b
        .fail_reason
        .unwrap()
        .contains("killed after the grace period"));
}

#[test]
fn stop_after_the_build_exited_0_keeps_succeed() {
    let mut r = building();
    r.go(exit0);
    let (id, fx) = r.ask(Request::Stop);
    let rep = reply_to(&fx, id);
    assert_eq!(rep.result, ReplyResult::Succeed);
    assert!(rep.message.is_some(), "says why nothing was stopped");
    assert!(signals(&fx).is_empty());
    assert_eq!(r.m.status(r.now).build_status, "succeed");
}

#[test]
fn a_success_line_read_after_the_stops_sigterm_does_not_make_it_a_success() {
    let mut r = stopping();
    let waiter = *r.open.iter().next().unwrap();
    // The SDK wrote its success line as the SIGTERM came: its deploy, which
    // comes after that line, was cut short.
    r.log(LogNews {
        success: true,
        ..LogNews::default()
    });
    let fx = r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Signal(15),
        group_alive: false,
    });
    let rep = reply_to(&fx, waiter);
    assert_eq!((rep.result, rep.build_id), (ReplyResult::Succeed, Some(1)));
    let b = r.last_build();
    assert_eq!(b.outcome, Outcome::Stopped);
    assert_eq!(r.m.status(r.now).build_status, "fail");
}

#[test]
fn an_sdk_that_went_on_despite_the_stop_and_finished_keeps_its_success() {
    let mut r = stopping();
    r.go(log_success);
    r.go(exit0);
    assert_eq!(r.last_build().outcome, Outcome::Succeeded);
}

#[test]
fn stopped_build_that_exits_0_without_deploying_is_stopped() {
    let mut r = stopping();
    r.go(exit0);
    let b = r.last_build();
    assert_eq!(b.outcome, Outcome::Stopped);
    assert_eq!(r.m.status(r.now).build_status, "fail");
}

#[test]
fn stop_gives_up_on_processes_sigkill_cannot_end() {
    let mut r = stopping();
    let waiter = *r.open.iter().next().unwrap();
    r.now += GRACE;
    assert_eq!(signals(&r.go(tick)), vec![(1, Sig::Kill)]);
    r.now += KILL_WAIT_MS;
    let fx = r.go(|_| Event::Timeout(Timer::KillWait));
    assert_eq!(reply_to(&fx, waiter).result, ReplyResult::Succeed);
    assert_eq!(r.m.next_timer(), None, "the repeat goes with the state");
    assert_eq!(r.kind(), S::Idle);
    let b = r.last_build();
    assert_eq!(b.outcome, Outcome::Stopped);
    assert!(b.fail_reason.unwrap().contains("did not end after SIGKILL"));
}

#[test]
fn leader_exit_with_group_alive_kills_the_stragglers() {
    let mut r = building();
    let fx = r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Code(0),
        group_alive: true,
    });
    check(&fx, &[PERSIST, STATUS, KILL], Some(1), "leader exit");
    // It waits in Reaping until the group is gone, then keeps its result.
    assert_eq!(r.kind(), S::Reaping);
    assert_eq!(
        r.m.timer(Timer::KillWait),
        Some(r.now + KILL_WAIT_MS),
        "SIGKILL is already sent"
    );
    assert_eq!(r.m.timer(Timer::KillRepeat), Some(r.now + KILL_REPEAT_MS));
    r.go(|r| Event::GroupGone { build_id: r.bid() });
    assert_eq!(r.kind(), S::Idle);
    assert_eq!(r.last_build().outcome, Outcome::Succeeded);
}

#[test]
fn failed_build_with_stragglers_keeps_its_failure_not_stopped() {
    let mut r = building();
    r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Code(2),
        group_alive: true,
    });
    r.go(|r| Event::GroupGone { build_id: r.bid() });
    let b = r.last_build();
    assert_eq!(b.outcome, Outcome::Failed);
    assert!(b.fail_reason.unwrap().contains("code 2"));
}

#[test]
fn two_stops_while_stopping_are_both_answered() {
    let mut r = stopping();
    let (second, fx) = r.ask(Request::Stop);
    assert!(fx.is_empty());
    let first = *r.open.iter().find(|id| **id != second).unwrap();
    let fx = r.go(term_exit);
    assert_eq!(reply_to(&fx, first).result, ReplyResult::Succeed);
    assert_eq!(reply_to(&fx, second).result, ReplyResult::Succeed);
    assert!(r.open.is_empty());
}

#[test]
fn spawn_failure_answers_fail_and_records_the_build_failed() {
    let mut r = Rig::new();
    let (id, _) = r.ask(Request::Build(build_req("/w")));
    let fx = r.go(spawn_failed);
    let rep = reply_to(&fx, id);
    assert_eq!((rep.result, rep.build_id), (ReplyResult::Fail, Some(1)));
    assert!(rep
        .fail_reason
        .unwrap()
        .contains("could not be started: appsdk: not found"));
    assert_eq!(r.kind(), StateKind::Idle);
    let b = r.last_build();
    assert_eq!(b.outcome, Outcome::Failed);
    assert!(b.fail_reason.unwrap().contains("appsdk: not found"));
    assert_eq!(r.m.status(r.now).build_status, "fail");
}

#[test]
fn clean_failure_names_the_path_and_returns_to_idle() {
    let mut r = Rig::new();
    let (id, fx) = r.ask(Request::Clean {
        workdir: "/w".into(),
    });
    assert!(matches!(&fx[2], Effect::StartClean { workdir, .. } if workdir == Path::new("/w")));
    assert_eq!(r.m.status(r.now).lat_status, "busy");
    let fx = r.go(|r| Event::CleanDone {
        job: r.clean_job.unwrap(),
        result: Err("cannot remove /w/deploy/x.img: Permission denied".into()),
    });
    let rep = reply_to(&fx, id);
    assert_eq!(rep.result, ReplyResult::Fail);
    assert!(rep.fail_reason.unwrap().contains("/w/deploy/x.img"));
    assert_eq!(r.kind(), StateKind::Idle);
}

#[test]
fn clean_is_refused_while_getyaml_runs() {
    let mut r = idle_yaml();
    let (id, fx) = r.ask(Request::Clean {
        workdir: "/w".into(),
    });
    assert!(reply_to(&fx, id)
        .fail_reason
        .unwrap()
        .contains("getyaml is running"));
    assert_eq!(r.kind(), StateKind::Idle);
}

#[test]
fn getyaml_joins_the_same_workdir_and_refuses_another() {
    let mut r = Rig::new();
    let (a, fx) = r.ask(Request::GetYaml {
        workdir: "/w".into(),
    });
    assert!(
        matches!(&fx[..], [Effect::StartGetYaml { workdir, .. }] if workdir == Path::new("/w"))
    );
    let (b, fx) = r.ask(Request::GetYaml {
        workdir: "/w".into(),
    });
    assert!(fx.is_empty(), "joins the running job: {fx:#?}");
    let (c, fx) = r.ask(Request::GetYaml {
        workdir: "/v".into(),
    });
    let refused = reply_to(&fx, c);
    assert_eq!(refused.result, ReplyResult::Fail);
    assert!(refused.fail_reason.unwrap().contains("running for /w"));

    let path = PathBuf::from("/w/exampleyamls/debian-image-base-intel-x86-64.yaml");
    let fx = r.go(yaml_ok);
    for id in [a, b] {
        let rep = reply_to(&fx, id);
        assert_eq!(
            (rep.result, rep.yaml_file_path),
            (ReplyResult::Succeed, Some(path.clone()))
        );
    }
    assert!(r.open.is_empty());
}

#[test]
fn getyaml_failure_is_reported() {
    let mut r = idle_yaml();
    let fx = r.go(|r| Event::YamlDone {
        job: r.yaml_job.unwrap(),
        outcome: YamlOutcome::Exited {
            exit: Exit::Code(2),
            yaml_made: true,
        },
    });
    check(
        &fx,
        &[fail(
            "getyaml",
            "appsdk exampleyamls failed (exit code 2); see /w/log/getyaml.log",
        )],
        None,
        "yaml done",
    );
}

#[test]
fn getyaml_that_exits_0_without_its_yaml_failed() {
    let mut r = idle_yaml();
    let fx = r.go(|r| Event::YamlDone {
        job: r.yaml_job.unwrap(),
        outcome: YamlOutcome::Exited {
            exit: Exit::Code(0),
            yaml_made: false,
        },
    });
    check(
        &fx,
        &[fail(
            "getyaml",
            "succeeded but /w/exampleyamls/debian-image-base-intel-x86-64.yaml is missing",
        )],
        None,
        "yaml done",
    );
}

#[test]
fn getyaml_killed_or_not_started_says_why() {
    let mut r = idle_yaml();
    let fx = r.go(|r| Event::YamlDone {
        job: r.yaml_job.unwrap(),
        outcome: YamlOutcome::Exited {
            exit: Exit::Signal(9),
            yaml_made: true,
        },
    });
    check(
        &fx,
        &[fail("getyaml", "failed (killed by signal 9)")],
        None,
        "killed",
    );
    let mut r = idle_yaml();
    let fx = r.go(|r| Event::YamlDone {
        job: r.yaml_job.unwrap(),
        outcome: YamlOutcome::NotStarted("cannot run appsdk exampleyamls: no bash".into()),
    });
    check(
        &fx,
        &[fail("getyaml", "cannot run appsdk exampleyamls: no bash")],
        None,
        "not started",
    );
}

#[test]
fn getyaml_success_answers_every_waiter_with_the_yaml_path() {
    let mut r = idle_yaml();
    let first = *r.open.iter().next().unwrap();
    let (second, _) = r.ask(Request::GetYaml {
        workdir: "/w".into(),
    });
    let fx = r.go(yaml_ok);
    for id in [first, second] {
        let reply = reply_to(&fx, id);
        assert_eq!(reply.result, ReplyResult::Succeed);
        assert_eq!(
            reply.yaml_file_path.as_deref(),
            Some(Path::new(
                "/w/exampleyamls/debian-image-base-intel-x86-64.yaml"
            ))
        );
    }
    assert_eq!(fx.len(), 2, "both waiters answered: {fx:?}");
}

#[test]
fn status_writes_the_document_then_answers_with_its_path() {
    let mut r = building();
    let (id, fx) = r.ask(Request::Status);
    match &fx[0] {
        Effect::WriteStatus(doc) => assert_eq!(doc, &r.m.status(r.now)),
        other => panic!("want WriteStatus first, got {other:?}"),
    }
    let rep = reply_to(&fx, id);
    assert_eq!(rep.status_file, Some(PathBuf::from(STATUS_FILE_PATH)));
    assert_eq!(rep.build_id, Some(1));
}

#[test]
fn logs_without_a_log_fails_with_the_drivers_reason() {
    let mut r = Rig::new();
    let (id, fx) = r.ask(Request::Logs {
        path: "/w/log/log.appsdk".into(),
        missing: Some("No log file found".into()),
    });
    check(&fx, &[fail("logs", "No log file found")], None, "logs");
    let (id2, fx) = r.ask(Request::Logs {
        path: "/w/log/log.appsdk".into(),
        missing: None,
    });
    assert_eq!(
        reply_to(&fx, id2).log_file_path,
        Some(PathBuf::from("/w/log/log.appsdk"))
    );
    assert_ne!(id, id2);
}

#[test]
fn invalid_request_without_an_action_is_answered() {
    let mut r = Rig::new();
    let id = r.new_id();
    let fx = r.step(Event::Invalid {
        id,
        action: None,
        reason: "request is not valid YAML".into(),
    });
    let rep = reply_to(&fx, id);
    assert_eq!((rep.action.as_str(), rep.result), ("", ReplyResult::Fail));
}

#[test]
fn shutdown_while_building_stops_then_exits_once_the_group_is_gone() {
    let mut r = building();
    let fx = r.go(shutdown);
    check(&fx, &[PERSIST, STATUS, TERM], Some(1), "shutdown");
    assert!(!r.m.has_exited());
    // A stop arriving meanwhile waits with the shutdown.
    let (id, fx) = r.ask(Request::Stop);
    assert!(fx.is_empty());
    let fx = r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Signal(15),
        group_alive: true,
    });
    check(&fx, &[PERSIST, STATUS, KILL], Some(1), "leader exit");
    let fx = r.go(group_gone);
    check(
        &fx,
        &[PERSIST, STATUS, UNMOUNT, ok("stop"), EXIT],
        Some(1),
        "group gone",
    );
    assert_eq!(reply_to(&fx, id).build_id, Some(1));
    assert!(r.m.has_exited());
    assert!(r.last_build().fail_reason.unwrap().contains("shut down"));
}

#[test]
fn shutdown_while_idle_exits_at_once_answering_getyaml_waiters() {
    let mut r = Rig::new();
    check(&r.go(shutdown), &[EXIT], None, "idle");
    assert!(r.m.has_exited());

    let mut r = idle_yaml();
    check(
        &r.go(shutdown),
        &[fail("getyaml", "shutting down"), EXIT],
        None,
        "idle with getyaml",
    );
    assert!(r.open.is_empty());
}

#[test]
fn shutdown_while_cleaning_answers_the_clean_then_exits() {
    let mut r = cleaning();
    let fx = r.go(shutdown);
    check(
        &fx,
        &[PERSIST, STATUS, fail("clean", "interrupted"), EXIT],
        None,
        "cleaning",
    );
    assert!(r.open.is_empty());
    assert_eq!(r.kind(), StateKind::Idle);
}

#[test]
fn after_exit_requests_get_a_fail_reply_and_nothing_else_happens() {
    let mut r = Rig::new();
    r.go(shutdown);
    let requests: [(MakeEvent, &'static str); 7] = [
        (build, "build"),
        (status, "status"),
        (stop, "stop"),
        (logs, "logs"),
        (clean, "clean"),
        (getyaml, "getyaml"),
        (invalid, "fly"),
    ];
    for (make, action) in requests {
        let fx = r.go(make);
        check(&fx, &[fail(action, "shutting down")], None, action);
    }
    for make in [
        spawned,
        spawn_failed,
        exit0,
        group_gone,
        clean_ok,
        yaml_ok,
        tick,
        shutdown,
    ] {
        assert!(r.go(make).is_empty());
    }
    assert!(r.open.is_empty());
}

/// The record of build `id`, running since a minute before T0 in /w (what
/// a daemon that died left in its state file); tests change what differs.
fn running_record(id: u64) -> BuildRecord {
    BuildRecord {
        id,
        workdir: "/w".into(),
        yaml_file: "/w/lat.yaml".into(),
        kind: BuildKind::Genimage,
        log_file: "/w/log/log.appsdk".into(),
        started_at: T0 - 60_000,
        ended_at: None,
        outcome: Outcome::Running,
        exit_code: None,
        signal: None,
        fail_reason: None,
        process: Some(PROC),
        sdk_log: None,
        success_logged: false,
        error_line: None,
        mounts_before: None,
        mounts_ns: None,
    }
}

#[test]
fn restart_records_the_interrupted_build_failed() {
    let running = BuildRecord {
        kind: BuildKind::Geninitramfs,
        ..running_record(7)
    };
    let persisted = Persisted {
        next_build_id: 8,
        current: Some(running),
        history: Vec::new(),
    };
    let m = Machine::new(
        config(5),
        persisted,
        T0,
        Recovered {
            finishing: false,
            killed: 2,
            log: LogNews::default(),
        },
    );
    assert_eq!(m.state(), &State::Idle);
    let st = m.status(T0);
    assert_eq!(
        (st.lat_status.as_str(), st.build_status.as_str()),
        ("idle", "fail")
    );
    let b = st.build.unwrap();
    assert_eq!(
        (b.id, b.outcome, b.ended_at),
        (7, Outcome::Failed, Some(T0))
    );
    assert_eq!(
        b.fail_reason.as_deref(),
        Some("interrupted: latd was restarted while this build ran; its 2 leftover processes were killed")
    );
    assert_eq!(m.persisted().current, None);

    // The next build gets a new id.
    let mut r = Rig::with_machine(m);
    r.go(build);
    assert_eq!(r.build_id, Some(8));
}

#[test]
fn restart_never_reuses_a_build_id_from_history() {
    let old = BuildRecord {
        started_at: T0,
        ended_at: Some(T0),
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        process: None,
        ..running_record(41)
    };
    let persisted = Persisted {
        next_build_id: 0,
        current: None,
        history: vec![old],
    };
    let mut r = Rig::with_machine(Machine::new(config(5), persisted, T0, Recovered::default()));
    assert_eq!(r.m.status(T0).build_status, "succeed");
    r.go(build);
    assert_eq!(r.build_id, Some(42));
}

#[test]
fn history_is_capped_newest_last() {
    let mut r = Rig::with_machine(Machine::new(
        config(3),
        Persisted::default(),
        T0,
        Recovered::default(),
    ));
    for _ in 0..5 {
        r.go(build);
        r.go(spawned);
        r.go(exit0);
    }
    let ids: Vec<u64> = r.m.history().map(|b| b.id).collect();
    assert_eq!(ids, vec![3, 4, 5]);
    assert_eq!(r.m.persisted().history.len(), 3);
}

#[test]
fn persist_and_status_come_before_the_reply_when_the_state_changes() {
    let mut r = starting();
    let fx = r.go(spawned);
    match &fx[..] {
        [Effect::Persist(p), Effect::WriteStatus(_), Effect::Reply { .. }] => {
            assert_eq!(p, &r.m.persisted());
            assert_eq!(p.current.as_ref().unwrap().process, Some(PROC));
        }
        other => panic!("want Persist, WriteStatus, Reply; got {other:#?}"),
    }
    let mut r = stopping();
    let fx = r.go(term_exit);
    assert!(
        matches!(
            &fx[..],
            [
                Effect::Persist(_),
                Effect::WriteStatus(_),
                Effect::ReleaseMounts { .. },
                Effect::Reply { .. }
            ]
        ),
        "{fx:#?}"
    );
}

#[test]
fn stale_events_change_nothing() {
    let stale_events = [
        Event::Spawned {
            build_id: STALE,
            process: PROC,
            mounts_before: Vec::new(),
            mounts_ns: String::new(),
        },
        Event::SpawnFailed {
            build_id: STALE,
            reason: "x".into(),
        },
        Event::BuildExited {
            build_id: STALE,
            exit: Exit::Code(1),
            group_alive: true,
        },
        Event::GroupGone { build_id: STALE },
        Event::CleanDone {
            job: JobId(STALE),
            result: Err("x".into()),
        },
        Event::YamlDone {
            job: JobId(STALE),
            outcome: YamlOutcome::NotStarted("x".into()),
        },
        // Timers not armed, or not yet due.
        Event::Timeout(Timer::Grace),
        Event::Timeout(Timer::KillWait),
        Event::Timeout(Timer::Getyaml),
    ];
    for given in [
        idle,
        starting,
        building,
        stopping,
        stopping_reaped,
        cleaning,
        idle_yaml,
        building_yaml,
    ] {
        for ev in &stale_events {
            let mut r = given();
            let before = (
                r.m.state().clone(),
                r.m.persisted(),
                r.m.next_timer().map(|(at, _)| at),
            );
            let fx = r.step(ev.clone());
            assert!(fx.is_empty(), "{ev:?} in {:?}: {fx:#?}", before.0);
            assert_eq!(
                (
                    r.m.state().clone(),
                    r.m.persisted(),
                    r.m.next_timer().map(|(at, _)| at)
                ),
                before,
                "{ev:?}"
            );
        }
    }
}

#[test]
fn an_old_builds_events_do_not_touch_the_new_one() {
    let mut r = building();
    r.go(exit0);
    r.go(build);
    r.go(spawned);
    assert_eq!(r.build_id, Some(2));
    for ev in [
        Event::GroupGone { build_id: 1 },
        Event::Spawned {
            build_id: 1,
            process: PROC,
            mounts_before: Vec::new(),
            mounts_ns: String::new(),
        },
    ] {
        assert!(r.step(ev).is_empty());
    }
    assert_eq!(r.m.current_build().unwrap().id, 2);
    assert_eq!(r.m.status(r.now).build_status, "running");
}

/// When the leader exits while its group lives, the machine SIGKILLs the
/// group and waits for it to be gone before anything new starts.
#[test]
fn no_new_build_while_the_last_builds_group_is_alive() {
    let mut r = building();
    r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Code(0),
        group_alive: true,
    });
    // SIGKILL is on its way; nothing has reported build 1's group gone.
    let fx = r.go(build);
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Spawn { .. })),
        "build 2 spawned while build 1's group is alive: {fx:#?}"
    );
}

/// Outcomes about an old build or job are ignored, in the table too.
#[test]
fn stale_outcomes_in_building_and_cleaning_are_ignored() {
    let old_spawn = |r: &mut Rig| Event::SpawnFailed {
        build_id: r.bid() - 1,
        reason: "x".into(),
    };
    let old_exit = |r: &mut Rig| Event::BuildExited {
        build_id: r.bid() - 1,
        exit: Exit::Code(0),
        group_alive: false,
    };
    let old_clean = |r: &mut Rig| Event::CleanDone {
        job: JobId(r.clean_job.unwrap().0 - 1),
        result: Ok(()),
    };
    // A second build and a second clean, so the events name a real old one.
    let second_build = || {
        let mut r = building();
        r.go(exit0);
        r.go(build);
        r.go(spawned);
        r
    };
    let second_clean = || {
        let mut r = cleaning();
        r.go(clean_ok);
        r.go(clean);
        r
    };
    let cases: [(Given, MakeEvent); 3] = [
        (second_build, old_spawn),
        (second_build, old_exit),
        (second_clean, old_clean),
    ];
    for (given, make) in cases {
        let mut r = given();
        let before = r.m.state().clone();
        let fx = r.go(make);
        assert!(fx.is_empty());
        assert_eq!(r.m.state(), &before);
    }
}

// ===========================================================================
// 3. Properties over random runs against a simulated world
// ===========================================================================
//
// The world keeps the driver's calling rule: a Spawn is answered by Spawned
// (or SpawnFailed) as the very next event; everything else (a build's exit,
// its group going, a clean or getyaml finishing) happens later, when the
// random run says so. Randomness the world needs inside one step comes from
// a per-action seed, so that a failing run shrinks and replays.

/// A client request.
#[derive(Debug, Clone)]
enum Ask {
    Build(u8, bool),
    Status,
    Stop,
    Logs(bool),
    Clean(u8),
    GetYaml(u8),
    Invalid(bool),
}

/// One thing that happens in the world.
#[derive(Debug, Clone)]
enum Act {
    Ask(Ask),
    /// Deliver one outcome that is due (process events in order; jobs in any order).
    Deliver(Index),
    /// The running build's leader exits by itself, maybe leaving children.
    LeaderExits {
        code: i32,
        leave_group: bool,
    },
    /// Children left by an exited leader die by themselves.
    GroupDies,
    /// The running build's SDK logs its success line.
    LogsSuccess,
    /// The running build's SDK logs a line the driver reports (its file).
    LogsLine,
    /// Time passes, then a Tick.
    Wait(u64),
    /// An event about an old build or an unknown job.
    Stale(u8),
    Shutdown,
}

/// A spawned build as the world sees it.
#[derive(Debug)]
struct SimBuild {
    id: u64,
    /// Truth: the leader process is running.
    leader: bool,
    /// Truth: other processes of its group are running.
    others: bool,
    leader_ignores_term: bool,
    others_ignore_term: bool,
    /// The machine was told the leader exited.
    exit_told: bool,
    /// The machine was told nothing of its group remains.
    gone_told: bool,
    kill_sent: bool,
    /// When SIGKILL may follow the SIGTERM.
    deadline: Option<Millis>,
    /// Its SDK logged the success line (and the machine was told).
    success: bool,
}

impl SimBuild {
    /// Still running as far as anyone knows, and not yet sent SIGKILL. (A
    /// killed group is let through; the strict rule is the finding in
    /// `no_new_build_while_the_last_builds_group_is_alive`.)
    fn blocks_new_work(&self) -> bool {
        !self.gone_told && !self.kill_sent
    }
}

struct World {
    m: Machine,
    now: Millis,
    rng: u64,
    builds: Vec<SimBuild>,
    /// Process outcomes, in the order they happened.
    procq: VecDeque<Event>,
    /// Finished background jobs, deliverable in any order.
    jobs: Vec<Event>,
    /// Clean / getyaml jobs started and not yet reported done.
    cleans: BTreeSet<u64>,
    yamls: BTreeSet<u64>,
    /// When the running getyaml would be cancelled.
    yaml_deadline: Option<Millis>,
    next_req: u64,
    open: BTreeSet<ReqId>,
    exited: bool,
    /// Every (from, event, to) stepped through, to check the runs' reach.
    visited: BTreeSet<(StateKind, EventKind, StateKind)>,
    /// Notable moments (a grace-period kill, a straggler kill, an Exit).
    seen: BTreeSet<&'static str>,
}

fn current_build_id(s: &State) -> Option<u64> {
    s.build().map(|b| b.id)
}

fn request_id(ev: &Event) -> Option<ReqId> {
    match ev {
        Event::Request { id, .. } | Event::Invalid { id, .. } => Some(*id),
        _ => None,
    }
}

/// What status reports matches the state.
fn check_status(m: &Machine, now: Millis) {
    let kind = m.state().kind();
    let st = m.status(now);
    assert_eq!(st.state, kind.status_name());
    assert_eq!(st.lat_status == "idle", kind == StateKind::Idle, "{st:?}");
    assert!(["idle", "busy"].contains(&st.lat_status.as_str()), "{st:?}");
    assert_eq!(
        st.build_status == "running",
        m.state().build().is_some(),
        "{st:?}"
    );
    assert!(["not-started", "running", "succeed", "fail"].contains(&st.build_status.as_str()));
    assert_eq!(
        st.build.as_ref().map(|b| b.id),
        m.current_build().map(|b| b.id)
    );
}

impl World {
    fn new() -> World {
        World {
            m: Machine::new(config(4), Persisted::default(), T0, Recovered::default()),
            now: T0,
            rng: 1,
            builds: Vec::new(),
            procq: VecDeque::new(),
            jobs: Vec::new(),
            cleans: BTreeSet::new(),
            yamls: BTreeSet::new(),
            yaml_deadline: None,
            next_req: 0,
            open: BTreeSet::new(),
            exited: false,
            visited: BTreeSet::new(),
            seen: BTreeSet::new(),
        }
    }

    /// xorshift: a number below `n`.
    fn roll(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n
    }

    fn sim(&mut self, id: u64) -> &mut SimBuild {
        self.builds
            .iter_mut()
            .find(|b| b.id == id)
            .unwrap_or_else(|| panic!("build {id} was never spawned"))
    }

    fn act(&mut self, act: Act) {
        match act {
            Act::Ask(ask) => {
                let ev = self.request(ask);
                self.step(ev);
            }
            Act::Deliver(pick) => {
                self.deliver(Some(pick));
            }
            Act::LeaderExits { code, leave_group } => {
                if let Some(b) = self.builds.iter_mut().find(|b| b.leader) {
                    b.leader = false;
                    b.others &= leave_group;
                    let ev = Event::BuildExited {
                        build_id: b.id,
                        exit: Exit::Code(code),
                        group_alive: b.others,
                    };
                    self.procq.push_back(ev);
                }
            }
            Act::LogsLine => {
                // The driver reads the log until the leader is reaped.
                if let Some(b) = self.builds.iter().find(|b| !b.exit_told) {
                    let build_id = b.id;
                    self.step(Event::LogRead {
                        build_id,
                        news: LogNews {
                            file: Some("/w0/log/log.appsdk_1".into()),
                            ..LogNews::default()
                        },
                    });
                }
            }
            Act::LogsSuccess => {
                if let Some(b) = self.builds.iter_mut().find(|b| !b.exit_told) {
                    b.success = true;
                    let build_id = b.id;
                    self.step(Event::LogRead {
                        build_id,
                        news: LogNews {
                            file: Some("/w0/log/log.appsdk_1".into()),
                            success: true,
                            ..LogNews::default()
                        },
                    });
                }
            }
            Act::GroupDies => {
                if let Some(b) = self.builds.iter_mut().find(|b| !b.leader && b.others) {
                    b.others = false;
                    let ev = Event::GroupGone { build_id: b.id };
                    self.procq.push_back(ev);
                }
            }
            Act::Wait(ms) => {
                self.now += ms;
                for t in self.m.due_timers(self.now) {
                    self.step(Event::Timeout(t));
                }
            }
            Act::Stale(k) => self.stale(k),
            Act::Shutdown => self.step(Event::Shutdown),
        }
    }

    fn request(&mut self, ask: Ask) -> Event {
        self.next_req += 1;
        let id = ReqId(self.next_req);
        self.open.insert(id);
        let wd = |n: u8| PathBuf::from(format!("/w{n}"));
        let request = match ask {
            Ask::Build(n, initramfs) => Request::Build(BuildRequest {
                workdir: wd(n),
                yaml_file: wd(n).join("lat.yaml"),
                kind: if initramfs {
                    BuildKind::Geninitramfs
                } else {
                    BuildKind::Genimage
                },
            }),
            Ask::Status => Request::Status,
            Ask::Stop => Request::Stop,
            Ask::Logs(found) => Request::Logs {
                path: "/w0/log/log.appsdk".into(),
                missing: (!found).then(|| "No log file found".to_string()),
            },
            Ask::Clean(n) => Request::Clean { workdir: wd(n) },
            Ask::GetYaml(n) => Request::GetYaml { workdir: wd(n) },
            Ask::Invalid(known) => {
                return Event::Invalid {
                    id,
                    action: known.then(|| "fly".to_string()),
                    reason: "unknown action 'fly'".into(),
                }
            }
        };
        Event::Request { id, request }
    }

    /// Delivers one due outcome; false if none is due.
    fn deliver(&mut self, pick: Option<Index>) -> bool {
        let n = self.jobs.len() + usize::from(!self.procq.is_empty());
        if n == 0 {
            return false;
        }
        // Without a pick: process outcomes first, then jobs in start order.
        let first = if self.procq.is_empty() {
            0
        } else {
            self.jobs.len()
        };
        let i = pick.map_or(first, |p| p.index(n));
        let ev = if i < self.jobs.len() {
            self.jobs.remove(i)
        } else {
            self.procq.pop_front().unwrap()
        };
        match &ev {
            Event::BuildExited {
                build_id,
                group_alive,
                ..
            } => {
                let alive = *group_alive;
                let b = self.sim(*build_id);
                b.exit_told = true;
                b.gone_told |= !alive;
            }
            Event::GroupGone { build_id } => self.sim(*build_id).gone_told = true,
            Event::CleanDone { job, .. } => {
                self.cleans.remove(&job.0);
            }
            Event::YamlDone { job, .. } => {
                self.yamls.remove(&job.0);
            }
            _ => unreachable!(),
        }
        self.step(ev);
        true
    }

    /// Feeds an event about an old build or an unknown job: nothing may change.
    fn stale(&mut self, k: u8) {
        let current = current_build_id(self.m.state());
        let old = self
            .builds
            .iter()
            .map(|b| b.id)
            .rfind(|id| Some(*id) != current)
            .unwrap_or(STALE);
        let job = JobId(STALE);
        let ev = match k % 6 {
            0 => Event::Spawned {
                build_id: old,
                process: PROC,
                mounts_before: Vec::new(),
                mounts_ns: String::new(),
            },
            1 => Event::SpawnFailed {
                build_id: old,
                reason: "stale".into(),
            },
            2 => Event::BuildExited {
                build_id: old,
                exit: Exit::Code(1),
                group_alive: false,
            },
            3 => Event::GroupGone { build_id: old },
            4 => Event::CleanDone {
                job,
                result: Ok(()),
            },
            _ => Event::YamlDone {
                job,
                outcome: YamlOutcome::NotStarted("stale".into()),
            },
        };
        let before = (
            self.m.state().clone(),
            self.m.persisted(),
            self.m.next_timer().map(|(at, _)| at),
        );
        let fx = self.m.step(self.now, ev.clone());
        assert!(fx.is_empty(), "stale {ev:?} did {fx:#?}");
        let after = (
            self.m.state().clone(),
            self.m.persisted(),
            self.m.next_timer().map(|(at, _)| at),
        );
        assert_eq!(after, before, "stale {ev:?} changed the machine");
    }

    /// One step, every invariant checked, then the effects performed.
    fn step(&mut self, ev: Event) {
        let from = self.m.state().kind();
        let live = current_build_id(self.m.state());
        let kind = ev.kind();
        let asked = request_id(&ev);
        let was_exited = self.exited;
        let guards = self.m.guards(&ev);
        let current = self.m.is_current(self.now, &ev);
        let ctx = format!("{ev:?} in {} at +{}ms", from.name(), self.now - T0);
        let fx = self.m.step(self.now, ev.clone());
        let to = self.m.state().kind();
        let ctx = format!("{ctx} -> {}: {fx:#?}", to.name());
        if !was_exited && current {
            self.visited.insert((from, kind, to));
        }
        if !current && !was_exited {
            assert!(fx.is_empty(), "{ctx}: a stale event did something");
        }

        // After Exit: only fail replies, one per request.
        if was_exited {
            assert_eq!(fx.len(), usize::from(asked.is_some()), "{ctx}");
            assert!(
                fx.iter()
                    .all(|e| matches!(e, Effect::Reply { reply, .. } if reply.result == ReplyResult::Fail)),
                "{ctx}"
            );
        }

        // The table governs until Exit; after it every request is refused.
        if !was_exited && current {
            assert_eq!(
                build_rule(from, kind, &guards).target(from),
                to,
                "{ctx}: not what build_rule() says"
            );
        }
        check_status(&self.m, self.now);

        // A change of state saves first, then writes the status.
        if to != from {
            assert!(
                matches!(&fx[..], [Effect::Persist(_), Effect::WriteStatus(_), ..]),
                "{ctx}: state changed without Persist, WriteStatus first"
            );
        }

        let mut next = None;
        for (i, e) in fx.iter().enumerate() {
            match e {
                Effect::Persist(p) => {
                    assert_eq!(i, 0, "{ctx}: Persist must come first");
                    assert_eq!(p, &self.m.persisted(), "{ctx}");
                }
                Effect::WriteStatus(doc) => {
                    assert_eq!(doc, &self.m.status(self.now), "{ctx}");
                }
                Effect::Reply { id, reply } => {
                    assert!(
                        self.open.remove(id),
                        "{ctx}: {id:?} answered twice or never asked"
                    );
                    assert!(
                        (reply.result == ReplyResult::Fail) == reply.fail_reason.is_some(),
                        "{ctx}: fail iff a reason"
                    );
                }
                Effect::EndLog { build_id, line, .. } => {
                    let b = self.m.history().find(|b| b.id == *build_id).cloned();
                    let b = b.unwrap_or_else(|| panic!("{ctx}: EndLog for a build not ended"));
                    assert_ne!(b.outcome, Outcome::Succeeded, "{ctx}");
                    assert!(line.contains("ERROR: "), "{ctx}");
                }
                Effect::ClearAdopted { .. } => {
                    panic!("{ctx}: these runs start afresh: no build is adopted")
                }
                Effect::ReleaseMounts { build_id } => {
                    // Only once nothing of the build runs (or SIGKILL could
                    // not end it), and before anyone is told it ended.
                    let b = self.sim(*build_id);
                    assert!(
                        !(b.leader || b.others) || b.kill_sent,
                        "{ctx}: mounts released under live processes"
                    );
                    assert!(
                        !fx[..i].iter().any(|e| matches!(e, Effect::Reply { .. })),
                        "{ctx}: a reply before the mounts were released"
                    );
                    assert!(self.m.state().build().is_none(), "{ctx}");
                }
                Effect::Spawn { build_id, .. } => {
                    assert!(from == StateKind::Idle && kind == EventKind::Build, "{ctx}");
                    assert_eq!(Some(*build_id), current_build_id(self.m.state()), "{ctx}");
                    assert!(
                        !self.builds.iter().any(SimBuild::blocks_new_work),
                        "{ctx}: a second build while {:?} is alive",
                        self.builds
                    );
                    assert!(
                        self.builds.iter().all(|b| b.id != *build_id),
                        "{ctx}: build id reused"
                    );
                    let ok = self.roll(8) != 0;
                    let (leader_ignores_term, others_ignore_term) =
                        (self.roll(4) == 0, self.roll(3) == 0);
                    self.builds.push(SimBuild {
                        id: *build_id,
                        leader: ok,
                        others: ok,
                        leader_ignores_term,
                        others_ignore_term,
                        exit_told: !ok,
                        gone_told: !ok,
                        kill_sent: false,
                        deadline: None,
                        success: false,
                    });
                    // The calling rule: the spawn's outcome is the next event.
                    next = Some(if ok {
                        Event::Spawned {
                            build_id: *build_id,
                            process: PROC,
                            mounts_before: Vec::new(),
                            mounts_ns: String::new(),
                        }
                    } else {
                        Event::SpawnFailed {
                            build_id: *build_id,
                            reason: "fork failed".into(),
                        }
                    });
                }
                Effect::Signal { build_id, sig } => {
                    // The leader ended by itself, others of its group are left.
                    let straggler_kill = matches!(from, S::Spawning | S::Running | S::Deploying)
                        && kind == EventKind::LeaderExited
                        && *sig == Sig::Kill;
                    assert!(
                        self.m.state().build().is_some(),
                        "{ctx}: signal on the way to {to:?}"
                    );
                    assert_eq!(
                        Some(*build_id),
                        live,
                        "{ctx}: signal to a build that is not live"
                    );
                    let now = self.now;
                    let b = self.sim(*build_id);
                    assert!(
                        !b.gone_told,
                        "{ctx}: signal to a group known gone (its pgid may be reused)"
                    );
                    if *sig == Sig::Term && b.success {
                        // After its success line the SDK is left to finish:
                        // SIGTERM only once the grace period is over.
                        assert!(
                            kind == EventKind::GraceOver && b.deadline.is_some_and(|d| now >= d),
                            "{ctx}: SIGTERM to a build finishing after its success line"
                        );
                    }
                    if *sig == Sig::Term && kind == EventKind::GraceOver {
                        b.deadline = Some(now + GRACE);
                    }
                    if *sig == Sig::Kill {
                        let due =
                            kind == EventKind::GraceOver && b.deadline.is_some_and(|d| now >= d);
                        let again = kind == EventKind::KillRepeatDue;
                        assert!(
                            !again || b.kill_sent,
                            "{ctx}: SIGKILL repeated that was never sent"
                        );
                        assert!(
                            b.exit_told || due || again,
                            "{ctx}: SIGKILL before the deadline"
                        );
                        self.seen.insert(if straggler_kill {
                            "straggler kill"
                        } else if again {
                            "kill repeated"
                        } else if due {
                            "grace kill"
                        } else {
                            "kill after the leader exited"
                        });
                    }
                    self.signal(*build_id, *sig);
                }
                Effect::StartClean { job, workdir } => {
                    assert!(
                        from == StateKind::Idle && to == StateKind::Cleaning,
                        "{ctx}"
                    );
                    assert!(
                        self.cleans.is_empty() && self.yamls.is_empty(),
                        "{ctx}: clean beside a job"
                    );
                    assert!(
                        !self.builds.iter().any(SimBuild::blocks_new_work),
                        "{ctx}: clean beside a build"
                    );
                    self.cleans.insert(job.0);
                    let result = if self.roll(4) == 0 {
                        Err(format!(
                            "cannot remove {}/deploy: Permission denied",
                            workdir.display()
                        ))
                    } else {
                        Ok(())
                    };
                    self.jobs.push(Event::CleanDone { job: *job, result });
                }
                Effect::StartGetYaml { job, workdir } => {
                    assert_eq!(kind, EventKind::GetYaml, "{ctx}");
                    assert!(
                        self.cleans.is_empty() && self.yamls.is_empty(),
                        "{ctx}: getyaml beside a job"
                    );
                    self.yamls.insert(job.0);
                    self.yaml_deadline = Some(self.now + GETYAML_TIMEOUT_MS);
                    let _ = workdir;
                    let outcome = match self.roll(4) {
                        0 => YamlOutcome::Exited {
                            exit: Exit::Code(1),
                            yaml_made: false,
                        },
                        1 => YamlOutcome::Exited {
                            exit: Exit::Code(0),
                            yaml_made: false,
                        },
                        _ => YamlOutcome::Exited {
                            exit: Exit::Code(0),
                            yaml_made: true,
                        },
                    };
                    self.jobs.push(Event::YamlDone { job: *job, outcome });
                }
                Effect::CancelJob { job } => {
                    // Killed: its late YamlDone is stale from now on.
                    assert!(self.yamls.remove(&job.0), "{ctx}: cancels an unknown job");
                    assert_eq!(kind, EventKind::GetyamlOverdue, "{ctx}");
                }
                Effect::Exit => {
                    assert_eq!(i, fx.len() - 1, "{ctx}: Exit must come last");
                    assert!(!was_exited, "{ctx}: Exit twice");
                    self.exited = true;
                    self.seen
                        .insert(if from == S::Idle && kind == EventKind::Shutdown {
                            "exit at once"
                        } else {
                            "exit after a stop or clean"
                        });
                }
            }
        }
        assert_eq!(self.m.has_exited(), self.exited, "{ctx}");

        // The deadline: set when the stop begins, announced by next_timer
        // until the kill is sent.
        // (A build whose leader ended by itself gets SIGKILL at once and no
        // grace deadline: it is only waited for.)
        if matches!(from, S::Spawning | S::Running | S::Deploying)
            && matches!(to, S::Terminating | S::Finishing)
        {
            let d = self.now + GRACE;
            self.sim(live.unwrap()).deadline = Some(d);
        }
        // The grace deadline while finishing or terminating, the wait after
        // SIGKILL while killing or reaping, getyaml's, and no other.
        let want_grace = matches!(to, S::Finishing | S::Terminating);
        let want_kill = matches!(to, S::Killing | S::Reaping);
        if !self.exited {
            let armed = |t| self.m.timer(t).is_some();
            assert_eq!(armed(Timer::Grace), want_grace, "{ctx}: the grace timer");
            assert_eq!(
                armed(Timer::KillWait),
                want_kill,
                "{ctx}: the kill-wait timer"
            );
            assert_eq!(
                self.m.timer(Timer::Getyaml),
                self.yaml_deadline
                    .filter(|_| self.m.yaml_kind() == YamlKind::Running),
                "{ctx}: getyaml's timer"
            );
        }
        if want_grace {
            // The grace deadline is the one the world noted when the stop
            // began (or when a finishing build got its SIGTERM).
            let id = current_build_id(self.m.state()).unwrap();
            let d = self.sim(id).deadline;
            assert_eq!(self.m.timer(Timer::Grace), d, "{ctx}");
        }

        if let Some(ev) = next {
            self.step(ev);
        }
    }

    /// What a signal does to a simulated build.
    fn signal(&mut self, id: u64, sig: Sig) {
        let term_exit = match self.roll(6) {
            0 => Exit::Code(0), // appsdk was finishing anyway
            1 => Exit::Code(1),
            _ => Exit::Signal(15),
        };
        let stuck = self.roll(5) == 0;
        let b = self.sim(id);
        let mut out = None;
        match sig {
            Sig::Term => {
                let leader_dies = b.leader && !b.leader_ignores_term;
                let others_die = b.others && !b.others_ignore_term;
                b.others &= !others_die;
                if leader_dies {
                    b.leader = false;
                    out = Some(Event::BuildExited {
                        build_id: id,
                        exit: term_exit,
                        group_alive: b.others,
                    });
                } else if others_die && !b.leader {
                    out = Some(Event::GroupGone { build_id: id });
                }
            }
            // Now and then a process is stuck in the kernel (a hung
            // mount): SIGKILL does not end it.
            Sig::Kill if stuck => b.kill_sent = true,
            Sig::Kill => {
                b.kill_sent = true;
                if b.leader {
                    out = Some(Event::BuildExited {
                        build_id: id,
                        exit: Exit::Signal(9),
                        group_alive: false,
                    });
                } else if b.others {
                    out = Some(Event::GroupGone { build_id: id });
                }
                b.leader = false;
                b.others = false;
            }
        }
        self.procq.extend(out);
    }

    /// Lets everything finish: deliver all outcomes, pass every deadline, let
    /// running builds end. Then every request must have had its answer.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.deliver(None) {
                continue;
            }
            if let Some((at, t)) = self.m.next_timer() {
                self.now = self.now.max(at);
                self.step(Event::Timeout(t));
                continue;
            }
            if let Some(b) = self.builds.iter_mut().find(|b| b.leader) {
                b.leader = false;
                b.others = false;
                let ev = Event::BuildExited {
                    build_id: b.id,
                    exit: Exit::Code(0),
                    group_alive: false,
                };
                self.procq.push_back(ev);
                continue;
            }
            if let Some(b) = self.builds.iter_mut().find(|b| b.others) {
                b.others = false;
                let ev = Event::GroupGone { build_id: b.id };
                self.procq.push_back(ev);
                continue;
            }
            assert!(self.open.is_empty(), "never answered: {:?}", self.open);
            assert!(self.builds.iter().all(|b| b.gone_told), "{:?}", self.builds);
            assert!(
                self.exited || self.m.state() == &State::Idle,
                "{:?}",
                self.m.state()
            );
            return;
        }
        panic!("the run did not settle");
    }
}

fn ask_strategy() -> impl Strategy<Value = Ask> {
    prop_oneof![
        3 => (0u8..2, any::<bool>()).prop_map(|(w, i)| Ask::Build(w, i)),
        2 => Just(Ask::Status),
        3 => Just(Ask::Stop),
        1 => any::<bool>().prop_map(Ask::Logs),
        2 => (0u8..2).prop_map(Ask::Clean),
        2 => (0u8..2).prop_map(Ask::GetYaml),
        1 => any::<bool>().prop_map(Ask::Invalid),
    ]
}

fn act_strategy() -> impl Strategy<Value = Act> {
    prop_oneof![
        50 => ask_strategy().prop_map(Act::Ask),
        50 => any::<Index>().prop_map(Act::Deliver),
        15 => (prop_oneof![Just(0), Just(1), 2..256i32], any::<bool>())
            .prop_map(|(code, leave_group)| Act::LeaderExits { code, leave_group }),
        8 => Just(Act::GroupDies),
        6 => Just(Act::LogsSuccess),
        4 => Just(Act::LogsLine),
        20 => prop_oneof![3 => 1..2_000u64, 1 => 2_000..3 * GRACE].prop_map(Act::Wait),
        8 => any::<u8>().prop_map(Act::Stale),
        // Rare: most runs shut down somewhere, late or early.
        3 => Just(Act::Shutdown),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random runs keep every invariant, step by step and once drained.
    #[test]
    fn random_runs_keep_the_invariants(acts in runs()) {
        run_world(acts);
    }
}

/// Up to 60 world actions, each with the seed for the world's own choices.
fn runs() -> impl Strategy<Value = Vec<(Act, u64)>> {
    prop::collection::vec((act_strategy(), any::<u64>()), 0..60)
}

fn run_world(acts: Vec<(Act, u64)>) -> World {
    let mut w = World::new();
    check_status(&w.m, w.now);
    for (act, seed) in acts {
        w.rng = seed | 1;
        w.act(act);
    }
    w.drain();
    w
}

/// Guards the property's worth: the same kind of runs, from a fixed seed,
/// must reach every cell of the table that does something, and the rare
/// moments the invariants are about.
#[test]
fn random_runs_reach_every_acting_cell() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut visited = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for _ in 0..1024 {
        let acts = runs().new_tree(&mut runner).unwrap().current();
        let w = run_world(acts);
        visited.extend(w.visited.iter().map(|&(from, on, _)| (from, on)));
        seen.extend(w.seen);
    }
    let missed: Vec<_> = acting_cells()
        .into_iter()
        .filter_map(|(cell, on, _)| match cell {
            Cell::B(s) => Some((s, on)),
            _ => None,
        })
        // The world keeps the calling rule: a spawn's outcome is the very
        // next event, so nothing else reaches spawning.
        .filter(|&(s, on)| s != S::Spawning || matches!(on, E::Spawned | E::SpawnFailed))
        // SIGKILL ends every process of a simulated build at once: its
        // leader never exits leaving others behind after it.
        .filter(|&cell| cell != (S::Killing, E::LeaderExited))
        // The driver reports what the SDK logged last before its leader's
        // exit: nothing is read in reaping.
        .filter(|&(s, on)| s != S::Reaping || !matches!(on, E::LogRead | E::SuccessLine))
        // These runs start afresh; only a start after a crash adopts a
        // build (its cells are the spec's and the scenarios' below).
        .filter(|&(s, _)| s != S::Adopted)
        .filter(|cell| !visited.contains(cell))
        .map(|(s, on)| format!("{} × {}", s.name(), on.name()))
        .collect();
    assert!(missed.is_empty(), "never reached: {missed:?}");
    for moment in [
        "straggler kill",
        "grace kill",
        "kill repeated",
        "exit at once",
        "exit after a stop or clean",
    ] {
        assert!(seen.contains(moment), "never saw a {moment}: {seen:?}");
    }
}

// ===========================================================================
// 4. The request parser never panics
// ===========================================================================

/// Pieces that make YAML-ish text, near and far from a valid request.
const FRAGMENTS: &[&str] = &[
    "action",
    "workdir",
    "yaml_file",
    ": ",
    ":",
    " ",
    "\n",
    "\t",
    "build",
    "status",
    "stop",
    "logs",
    "clean",
    "getyaml",
    "fly",
    "/localdisk",
    "/localdisk/lat.yaml",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "&a ",
    "*a",
    "!!binary ",
    "!tag ",
    "'",
    "\"",
    "# c",
    "---\n",
    "...\n",
    "~",
    "null",
    "3",
    "-1.5e9",
    "? ",
    "| \n",
    "> \n",
    "%YAML 1.2\n",
    "<<: ",
    "\u{feff}",
    "é",
    "\u{0}",
    "\\",
    "true",
    "\r\n",
];

fn yamlish() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40).prop_map(|v| v.concat())
}

fn check_parse(bytes: &[u8]) -> Result<(), TestCaseError> {
    match parse_request(bytes) {
        Ok(r) => {
            prop_assert!(Action::ALL.contains(&r.action));
            prop_assert_eq!(Action::parse(r.action.as_str()), Some(r.action));
            // What parses, re-renders to the same request (as latc writes it).
            if let Some(wd) = &r.workdir {
                let text = render_request(r.action, wd, r.yaml_file.as_deref(), r.expires_at);
                prop_assert_eq!(parse_request(text.as_bytes()).ok(), Some(r.clone()));
            }
        }
        Err(e) => prop_assert!(!e.reason.is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn parse_request_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_parse(&bytes)?;
    }

    #[test]
    fn parse_request_never_panics_on_yamlish_text(text in yamlish()) {
        check_parse(text.as_bytes())?;
    }

    #[test]
    fn parse_request_never_panics_after_a_valid_start(text in yamlish(), action in prop::sample::select(&Action::ALL[..])) {
        let msg = format!("action: {}\n{text}", action.as_str());
        check_parse(msg.as_bytes())?;
    }
}

#[test]
fn parse_request_refuses_deep_nesting_and_alias_bombs() {
    // Each level doubles the one before: 2^30 nodes if expanded naively.
    let bomb = (0..30).fold(String::from("a0: &a0 [x, x]\n"), |mut s, i| {
        s.push_str(&format!("a{}: &a{} [*a{i}, *a{i}]\n", i + 1, i + 1));
        s
    }) + "action: status\n";
    for text in [
        "[".repeat(20_000),
        "{a: ".repeat(2_000),
        "- ".repeat(50_000),
        bomb,
    ] {
        let err = parse_request(text.as_bytes()).unwrap_err();
        assert!(
            err.reason.contains("not valid YAML")
                || err.reason.contains("nests deeper")
                || err.reason.contains("YAML alias"),
            "{}",
            err.reason
        );
    }
}

/// Deep nesting is refused before the YAML parser sees it (the parser's
/// time grows with the square of the depth).
#[test]
fn deeply_nested_requests_are_refused_unparsed() {
    for text in ["{a: ".repeat(50_000), "[".repeat(250_000)] {
        let err = parse_request(text.as_bytes()).unwrap_err();
        assert!(err.reason.contains("nests deeper"), "{}", err.reason);
    }
    let ok = format!("action: status\nx: {}1{}\n", "[".repeat(10), "]".repeat(10));
    assert!(parse_request(ok.as_bytes()).is_ok());
}

#[test]
fn a_getyaml_that_overruns_is_killed_and_answered() {
    let mut r = Rig::new();
    let (id, fx) = r.ask(Request::GetYaml {
        workdir: "/w".into(),
    });
    let job = match fx.as_slice() {
        [Effect::StartGetYaml { job, .. }] => *job,
        other => panic!("{other:#?}"),
    };
    assert_eq!(
        r.m.next_timer().map(|(at, _)| at),
        Some(r.now + GETYAML_TIMEOUT_MS)
    );
    r.now += GETYAML_TIMEOUT_MS - 1;
    assert!(r.go(tick).is_empty(), "not before its time");
    r.now += 1;
    let fx = r.go(tick);
    assert!(fx.contains(&Effect::CancelJob { job }), "{fx:#?}");
    let rep = reply_to(&fx, id);
    assert_eq!(rep.result, ReplyResult::Fail);
    assert!(rep.fail_reason.unwrap().contains("did not finish"));
    assert_eq!(r.m.next_timer().map(|(at, _)| at), None);
    // Its late outcome is stale; a clean may run now.
    assert!(r
        .step(Event::YamlDone {
            job,
            outcome: YamlOutcome::Exited {
                exit: Exit::Signal(9),
                yaml_made: false
            }
        })
        .is_empty());
    let (_, fx) = r.ask(Request::Clean {
        workdir: "/w".into(),
    });
    assert!(fx.iter().any(|e| matches!(e, Effect::StartClean { .. })));
}

// ===========================================================================
// The real SDK: a stop after its success line lets it finish
// ===========================================================================

/// Building, the SDK having logged its success line.
fn deployed() -> Rig {
    let mut r = building();
    r.go(log_success);
    assert!(r.m.current_build().unwrap().success_logged);
    r
}

#[test]
fn stop_after_the_success_line_waits_for_the_sdk_to_finish_by_itself() {
    let mut r = deployed();
    let fx = r.go(stop);
    assert!(signals(&fx).is_empty(), "no SIGTERM mid-deploy: {fx:#?}");
    let waiter = *r.open.iter().next().unwrap();
    let st = r.m.status(r.now);
    assert_eq!(
        (st.lat_status.as_str(), st.state.as_str()),
        ("busy", "stopping")
    );
    assert!(st.activity.unwrap().contains("finishing its deploy"));
    // The SDK copies its last files, cleans up and exits 0 on its own.
    r.now += GRACE / 2;
    assert!(r.go(tick).is_empty());
    let fx = r.go(exit0);
    check(
        &fx,
        &[PERSIST, STATUS, UNMOUNT, ok("stop")],
        Some(1),
        "finished",
    );
    assert!(reply_to(&fx, waiter)
        .message
        .unwrap()
        .contains("already succeeded and has finished"));
    let b = r.last_build();
    assert_eq!((b.outcome, b.exit_code), (Outcome::Succeeded, Some(0)));
    assert_eq!(r.m.status(r.now).lat_status, "idle");
}

#[test]
fn a_finishing_sdk_that_overruns_gets_term_then_kill_and_keeps_succeed() {
    let mut r = deployed();
    r.go(stop);
    let waiter = *r.open.iter().next().unwrap();
    r.now += GRACE - 1;
    assert!(
        signals(&r.go(tick)).is_empty(),
        "not before the grace is over"
    );
    r.now += 1;
    assert_eq!(signals(&r.go(tick)), vec![(1, Sig::Term)]);
    assert!(r.m.status(r.now).activity.unwrap().contains("SIGTERM"));
    r.now += GRACE - 1;
    assert!(signals(&r.go(tick)).is_empty());
    r.now += 1;
    assert_eq!(signals(&r.go(tick)), vec![(1, Sig::Kill)]);
    let fx = r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Signal(9),
        group_alive: false,
    });
    let rep = reply_to(&fx, waiter);
    let msg = rep.message.unwrap();
    assert!(
        msg.contains("may be incomplete") && msg.contains("was killed"),
        "{msg}"
    );
    assert_eq!(r.last_build().outcome, Outcome::Succeeded);
}

#[test]
fn a_finishing_sdk_that_ends_leaving_helpers_has_them_killed_at_once() {
    let mut r = deployed();
    r.go(stop);
    let fx = r.go(|r| Event::BuildExited {
        build_id: r.bid(),
        exit: Exit::Code(0),
        group_alive: true,
    });
    assert_eq!(signals(&fx), vec![(1, Sig::Kill)]);
    let fx = r.go(group_gone);
    check(
        &fx,
        &[PERSIST, STATUS, UNMOUNT, ok("stop")],
        Some(1),
        "helpers gone",
    );
    assert_eq!(r.last_build().outcome, Outcome::Succeeded);
    // Its deploy is complete: the stopper is not told otherwise.
    let msg = fx
        .iter()
        .find_map(|e| match e {
            Effect::Reply { reply, .. } => reply.message.clone(),
            _ => None,
        })
        .unwrap_or_default();
    assert!(msg.contains("has finished"), "{msg}");
    assert!(!msg.contains("incomplete"), "{msg}");
}

#[test]
fn a_stop_before_the_success_line_terms_at_once() {
    let mut r = building();
    assert_eq!(signals(&r.go(stop)), vec![(1, Sig::Term)]);
    // The success line logged while it exits does not undo the stop's
    // SIGTERM, nor make the cut-short build a success.
    r.go(log_success);
    r.go(term_exit);
    assert_eq!(r.last_build().outcome, Outcome::Stopped);
}

#[test]
fn an_exit_1_after_the_success_line_fails_saying_so() {
    let mut r = deployed();
    r.log(LogNews {
        error: Some("appsdk - ERROR: copy failed".into()),
        ..LogNews::default()
    });
    r.go(exit1);
    let b = r.last_build();
    assert_eq!(b.outcome, Outcome::Failed);
    let reason = b.fail_reason.unwrap();
    assert!(
        reason.contains("logged its success line, then exited with code 1"),
        "{reason}"
    );
    assert!(reason.contains("appsdk - ERROR: copy failed"), "{reason}");
}

#[test]
fn a_failure_quotes_the_first_error_line() {
    let mut r = building();
    for line in ["appsdk - ERROR: first", "appsdk - ERROR: second"] {
        r.log(LogNews {
            error: Some(line.into()),
            ..LogNews::default()
        });
    }
    r.go(exit1);
    let reason = r.last_build().fail_reason.unwrap();
    assert!(
        reason.contains("code 1: appsdk - ERROR: first; see /w/log/log.appsdk"),
        "{reason}"
    );
}

#[test]
fn log_news_of_another_build_changes_nothing() {
    let mut r = building();
    let fx = r.go(|_| Event::LogRead {
        build_id: STALE,
        news: LogNews {
            success: true,
            ..LogNews::default()
        },
    });
    assert!(fx.is_empty());
    assert!(!r.m.current_build().unwrap().success_logged);
    assert_eq!(signals(&r.go(stop)), vec![(1, Sig::Term)]);
}

#[test]
fn logs_of_a_started_build_answer_with_the_path_its_log_will_have() {
    let mut r = building();
    let (id, fx) = r.ask(Request::Logs {
        path: "/w/log/log.appsdk".into(),
        missing: Some("No log file found".into()),
    });
    let rep = reply_to(&fx, id);
    assert_eq!(rep.result, ReplyResult::Succeed);
    assert_eq!(rep.log_file_path, Some(PathBuf::from("/w/log/log.appsdk")));
    assert!(rep.message.unwrap().contains("not created"));
    // Another workdir's missing log is still missing.
    let (id, fx) = r.ask(Request::Logs {
        path: "/other/log/log.appsdk".into(),
        missing: Some("No log file found".into()),
    });
    assert_eq!(reply_to(&fx, id).result, ReplyResult::Fail);
}

fn recovered_build(found: Recovered) -> BuildRecord {
    let running = running_record(3);
    let persisted = Persisted {
        next_build_id: 4,
        current: Some(running),
        history: Vec::new(),
    };
    let m = Machine::new(config(5), persisted, T0, found);
    m.history().last().unwrap().clone()
}

#[test]
fn an_adopted_build_that_finishes_succeeds_and_answers_the_stops_that_waited() {
    let mut r = adopted();
    assert_eq!(
        r.m.timer(Timer::Grace),
        Some(T0 + GRACE),
        "waited for, the grace at most"
    );
    let st = r.m.status(r.now);
    assert_eq!(
        (
            st.lat_status.as_str(),
            st.state.as_str(),
            st.build_status.as_str()
        ),
        ("busy", "building", "running"),
        "clients see the build still running"
    );
    assert!(st
        .activity
        .unwrap()
        .starts_with("started by the latd before this one, the SDK logged its success line"));
    let (stop, fx) = r.ask(Request::Stop);
    assert!(fx.is_empty(), "the stop waits: {fx:?}");
    assert_eq!(
        r.m.timer(Timer::Grace),
        Some(T0 + GRACE),
        "the state keeps its timer"
    );
    let (_, fx) = r.ask(Request::Build(build_req("/w")));
    check(&fx, &[fail("build", RUNNING)], Some(7), "build");
    r.now += 3_000;
    let fx = r.go(adopted_gone);
    check(&fx, &[PERSIST, STATUS, ok("stop")], Some(7), "gone");
    assert_eq!(reply_to(&fx, stop).result, ReplyResult::Succeed);
    assert_eq!(r.kind(), S::Idle);
    assert_eq!(r.m.next_timer(), None);
    let b = r.last_build();
    assert_eq!(
        (b.id, b.outcome, b.ended_at),
        (7, Outcome::Succeeded, Some(T0 + 3_000))
    );
    assert_eq!(b.sdk_log, Some("/w/log/log.appsdk_1700000000".into()));
    // And the next build gets the next id.
    r.go(build);
    assert_eq!(r.m.state().build().unwrap().id, 8);
}

#[test]
fn an_adopted_build_still_running_at_the_grace_end_is_killed_and_interrupted() {
    let mut r = adopted();
    r.now += GRACE;
    let fx = r.go(|_| Event::Timeout(Timer::Grace));
    check(&fx, &[CLEAR], Some(7), "grace over");
    assert_eq!(r.m.next_timer(), None, "the grace is spent");
    let fx = r.go(|r| Event::AdoptedGone {
        build_id: r.bid(),
        killed: 2,
        log: LogNews::default(),
    });
    check(&fx, &[PERSIST, STATUS], Some(7), "killed");
    let b = r.last_build();
    assert_eq!(b.outcome, Outcome::Failed);
    assert!(b.fail_reason.unwrap().contains(
        "interrupted: latd was restarted while this build finished its deploy after its success line; its 2 leftover processes were killed, so deploy/ may be incomplete"
    ));
}

#[test]
fn an_adopted_build_whose_log_shows_an_error_failed_and_says_so_in_its_log() {
    let mut r = adopted();
    let fx = r.go(|r| Event::AdoptedGone {
        build_id: r.bid(),
        killed: 0,
        log: LogNews {
            file: Some("/w/log/log.appsdk_1700000000".into()),
            success: true,
            error: Some("appsdk - ERROR: deploy failed".into()),
        },
    });
    // An error line is in the log already: no end line is added.
    check(&fx, &[PERSIST, STATUS], Some(7), "gone");
    let b = r.last_build();
    assert_eq!(b.outcome, Outcome::Failed);
    assert!(b
        .fail_reason
        .unwrap()
        .contains("appsdk - ERROR: deploy failed"));
}

#[test]
fn a_shutdown_while_a_build_is_adopted_kills_what_is_left_then_exits() {
    let mut r = adopted();
    let fx = r.go(shutdown);
    check(&fx, &[CLEAR], Some(7), "shutdown");
    assert_eq!(r.m.life(), Life::Draining);
    let fx = r.go(|r| Event::AdoptedGone {
        build_id: r.bid(),
        killed: 1,
        log: LogNews::default(),
    });
    assert!(matches!(fx.last(), Some(Effect::Exit)), "{fx:#?}");
    assert!(r.m.has_exited());
    assert_eq!(r.last_build().outcome, Outcome::Failed);
}

#[test]
fn a_stale_adopted_gone_changes_nothing() {
    let mut r = adopted();
    let fx = r.go(|_| Event::AdoptedGone {
        build_id: 6,
        killed: 0,
        log: LogNews::default(),
    });
    assert!(fx.is_empty());
    assert_eq!(r.kind(), S::Adopted);
}

#[test]
fn a_build_that_finished_while_latd_was_down_gets_the_result_its_log_shows() {
    let log = |success: bool, error: Option<&str>| LogNews {
        file: Some("/w/log/log.appsdk_1700000000".into()),
        success,
        error: error.map(String::from),
    };
    let b = recovered_build(Recovered {
        finishing: false,
        killed: 0,
        log: log(true, None),
    });
    assert_eq!((b.outcome, b.fail_reason), (Outcome::Succeeded, None));
    assert_eq!(b.sdk_log, Some("/w/log/log.appsdk_1700000000".into()));

    let b = recovered_build(Recovered {
        finishing: false,
        killed: 0,
        log: log(false, Some("appsdk - ERROR: boom")),
    });
    assert_eq!(b.outcome, Outcome::Failed);
    assert!(b
        .fail_reason
        .unwrap()
        .contains("failed while latd was down: appsdk - ERROR: boom"));

    // Its processes were still running (killed): the deploy was cut short.
    let b = recovered_build(Recovered {
        finishing: false,
        killed: 3,
        log: log(true, None),
    });
    assert_eq!(b.outcome, Outcome::Failed);
    let reason = b.fail_reason.unwrap();
    assert!(
        reason.contains("after its success line") && reason.contains("3 leftover"),
        "{reason}"
    );

    let b = recovered_build(Recovered::default());
    assert!(b
        .fail_reason
        .unwrap()
        .contains("none of its processes were left"));
}

#[test]
fn a_build_that_ends_without_a_marker_gets_one_in_its_log() {
    let mut r = building();
    r.log(LogNews {
        file: Some("/w/log/log.appsdk_9".into()),
        ..LogNews::default()
    });
    r.go(stop);
    let fx = r.go(term_exit);
    let lines: Vec<_> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::EndLog { file, line, .. } => Some((file.clone(), line.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(lines.len(), 1, "{fx:#?}");
    assert_eq!(lines[0].0, PathBuf::from("/w/log/log.appsdk_9"));
    assert!(
        lines[0]
            .1
            .starts_with("latd - ERROR: build 1 was stopped: stopped by request"),
        "{lines:?}"
    );
    // Before the stop's reply, so a follower knows first.
    let end = fx
        .iter()
        .position(|e| matches!(e, Effect::EndLog { .. }))
        .unwrap();
    let reply = fx
        .iter()
        .position(|e| matches!(e, Effect::Reply { .. }))
        .unwrap();
    assert!(end < reply);

    // A success, or a failure the SDK logged itself, needs nothing added.
    let mut r = deployed();
    r.log(LogNews {
        file: Some("/w/log/log.appsdk_9".into()),
        ..LogNews::default()
    });
    assert!(!r
        .go(exit0)
        .iter()
        .any(|e| matches!(e, Effect::EndLog { .. })));
    let mut r = building();
    r.log(LogNews {
        file: Some("/w/log/log.appsdk_9".into()),
        error: Some("appsdk - ERROR: x".into()),
        ..LogNews::default()
    });
    let fx = r.go(exit1);
    assert!(!fx.iter().any(|e| matches!(e, Effect::EndLog { .. })));
}

#[test]
fn a_build_interrupted_by_a_restart_gets_its_end_in_its_log_at_start() {
    let running = BuildRecord {
        sdk_log: Some("/w/log/log.appsdk_5".into()),
        ..running_record(3)
    };
    let persisted = Persisted {
        next_build_id: 4,
        current: Some(running),
        history: Vec::new(),
    };
    let mut m = Machine::new(config(5), persisted, T0, Recovered::default());
    let fx = m.startup_effects();
    assert!(
        matches!(&fx[..], [Effect::EndLog { build_id: 3, line, .. }] if line.contains("ERROR: ") && line.contains("interrupted")),
        "{fx:#?}"
    );
    assert!(m.startup_effects().is_empty(), "once");
}

#[test]
fn status_says_what_a_build_is_doing_in_words() {
    let mut r = building();
    let says = |r: &Rig| r.m.status(r.now).activity.unwrap_or_default();
    assert!(
        says(&r).contains("has not created its log yet"),
        "{}",
        says(&r)
    );
    r.log(LogNews {
        file: Some("/w/log/log.appsdk_9".into()),
        ..LogNews::default()
    });
    assert_eq!(r.m.status(r.now).activity, None, "a build simply running");
    r.go(log_success);
    assert!(says(&r).contains("finishing its deploy"), "{}", says(&r));
    let r = idle();
    assert_eq!(r.m.status(r.now).activity, None);
}

#[test]
fn a_refused_build_says_what_to_do_and_names_the_build_in_the_way() {
    let hint = |mut r: Rig| {
        let (id, fx) = r.ask(Request::Build(build_req("/w")));
        let reply = reply_to(&fx, id);
        (reply.fail_reason.unwrap(), reply.build_id)
    };
    for (name, rig) in [
        ("building", building()),
        ("deploying", deploying()),
        ("adopted", adopted()),
    ] {
        let (why, id) = hint(rig);
        assert!(
            why.ends_with("; wait for it to end ('latc wait') or stop it ('latc stop')"),
            "{name}: {why}"
        );
        assert!(id.is_some(), "{name}");
    }
    for (name, rig) in [("stopping", stopping()), ("cleaning", cleaning())] {
        let (why, _) = hint(rig);
        assert!(
            why.ends_with("; try again when it has ended ('latc status' shows progress)"),
            "{name}: {why}"
        );
    }
    // A clean refused while a build runs gets the second hint too.
    let mut r = building();
    let (id, fx) = r.ask(Request::Clean {
        workdir: "/w".into(),
    });
    assert!(reply_to(&fx, id)
        .fail_reason
        .unwrap()
        .ends_with("('latc status' shows progress)"));
}

#[test]
fn a_job_killed_for_overrunning_never_answers_for_the_next_one() {
    let mut r = idle_yaml();
    let first = r.yaml_job.unwrap();
    r.go(getyaml_overdue);
    assert_eq!(r.m.yaml_kind(), YamlKind::Idle);
    r.go(getyaml);
    let second = r.yaml_job.unwrap();
    assert_ne!(first, second, "every job gets its own id");
    // The killed job's late outcome is stale: the new one still runs.
    let fx = r.step(Event::YamlDone {
        job: first,
        outcome: YamlOutcome::Exited {
            exit: Exit::Signal(9),
            yaml_made: false,
        },
    });
    assert!(fx.is_empty(), "{fx:#?}");
    assert_eq!(r.m.yaml_kind(), YamlKind::Running);
    // Cleans too: each its own job, ids never reused.
    let mut r = idle();
    let mut jobs = BTreeSet::new();
    for _ in 0..3 {
        r.go(clean);
        jobs.insert(r.clean_job.unwrap().0);
        r.go(clean_ok);
    }
    assert_eq!(jobs.len(), 3);
}

#[test]
fn status_names_the_daemon_and_counts_its_uptime_in_whole_seconds() {
    let r = idle();
    let s = r.m.status(T0 + 12_345);
    assert_eq!(s.uptime_s, 12);
    assert_eq!(s.started_at, T0);
    assert_eq!(s.updated_at, T0 + 12_345);
    assert_eq!(s.daemon_pid, 7);
    assert_eq!(s.version, "0.0.0-test");
    assert_eq!(r.m.status(T0 - 5).uptime_s, 0, "a clock that went back");
}

#[test]
fn status_says_what_a_stop_waits_for_and_when_its_next_step_comes() {
    let says = |r: &Rig| r.m.status(r.now).activity.unwrap_or_default();
    let grace_s = GRACE / 1000;
    let kill_s = KILL_WAIT_MS / 1000;
    let r = finishing();
    assert_eq!(
        says(&r),
        format!("the SDK logged its success line and is finishing its deploy; waiting for it to exit by itself (next step in {grace_s} s)")
    );
    let r = stopping();
    assert_eq!(
        says(&r),
        format!(
            "SIGTERM sent; waiting for the build's processes to exit (next step in {grace_s} s)"
        )
    );
    let mut r = killing();
    assert_eq!(
        says(&r),
        format!("SIGKILL sent; waiting for the build's processes to go (next step in {kill_s} s)")
    );
    // The next step is the kill wait's end, not SIGKILL's repeat.
    r.now += 1000;
    assert!(says(&r).ends_with(&format!("(next step in {} s)", kill_s - 1)));
    let r = reaping();
    assert_eq!(
        says(&r),
        format!("the SDK has exited; SIGKILL sent to the processes it left; waiting for them to go (next step in {kill_s} s)")
    );
    let mut r = finishing();
    r.now += GRACE - 1500;
    assert!(says(&r).ends_with("(next step in 2 s)"), "rounded up");
}

#[test]
fn logs_of_a_running_build_whose_name_was_set_aside_name_the_sdks_file() {
    let mut r = building();
    r.log(LogNews {
        file: Some("/w/log/log.appsdk_9".into()),
        ..LogNews::default()
    });
    let (id, fx) = r.ask(Request::Logs {
        path: "/w/log/log.appsdk".into(),
        missing: Some("No log file found".into()),
    });
    let rep = reply_to(&fx, id);
    assert_eq!(rep.result, ReplyResult::Succeed);
    assert_eq!(
        rep.log_file_path,
        Some(PathBuf::from("/w/log/log.appsdk_9"))
    );
}

#[test]
fn the_build_reply_names_the_build_and_its_log() {
    let mut r = starting();
    let id = *r.open.iter().next().unwrap();
    let fx = r.go(spawned);
    let rep = reply_to(&fx, id);
    assert_eq!(rep.build_id, Some(1));
    assert_eq!(rep.log_file_path, Some(PathBuf::from("/w/log/log.appsdk")));
    assert_eq!(rep.message.as_deref(), Some("build 1 started"));
}

#[test]
fn a_finishing_sdk_cut_short_by_sigterm_keeps_succeed_and_says_so() {
    let mut r = deployed();
    r.go(stop);
    let waiter = *r.open.iter().next().unwrap();
    r.now += GRACE;
    assert_eq!(signals(&r.go(tick)), vec![(1, Sig::Term)]);
    let fx = r.go(exit1);
    let msg = reply_to(&fx, waiter).message.unwrap();
    assert!(
        msg.contains("stopped before it finished its deploy"),
        "{msg}"
    );
    assert_eq!(r.last_build().outcome, Outcome::Succeeded);
}

#[test]
fn a_failure_points_at_console_log_only_while_the_sdk_has_made_no_log() {
    let fail = |file: Option<&str>| {
        let mut r = building();
        if let Some(f) = file {
            r.log(LogNews {
                file: Some(f.into()),
                ..LogNews::default()
            });
        }
        r.go(exit1);
        r.last_build().fail_reason.unwrap()
    };
    let none = fail(None);
    assert!(
        none.contains("/w/log/console.log if the SDK made no log"),
        "{none}"
    );
    let some = fail(Some("/w/log/log.appsdk_3"));
    assert!(!some.contains("console.log"), "{some}");
    assert!(some.ends_with("see /w/log/log.appsdk"), "{some}");
}
