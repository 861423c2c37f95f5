//! The daemon's loop (`latd::driver`) on virtual time, in a simulated
//! world: clients that send requests at set times, and a build whose
//! processes answer signals as the scenario says. What is checked is the
//! loop's own job: every input is fed, every effect performed and its
//! outcome fed back, every timer fed at the moment it is due (never early,
//! never late, as the loop sleeps until it), and the loop ends once the
//! machine has exited.

use latd::driver::{self, World};
use latd::machine::*;
use latd::protocol::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const T0: Millis = 1_700_000_000_000;
const GRACE: Millis = 10_000;
/// The simulation ends a test that runs longer than this (virtual time).
const LIMIT: Millis = 600_000;

/// How the simulated build's processes take signals.
#[derive(Clone, Copy)]
struct Build {
    /// It runs this long by itself, then exits 0.
    runs_for: Millis,
    /// SIGTERM ends it this long after it arrives; `None`: ignored.
    term_takes: Option<Millis>,
    /// The number of SIGKILLs it takes to end it (a fork racing the first).
    kills_needed: usize,
}

struct Sim {
    now: Millis,
    /// What clients send, and when.
    script: BTreeMap<Millis, Vec<Request>>,
    /// Outcomes due later (a process's exit), by when.
    later: BTreeMap<Millis, Vec<Event>>,
    /// When latd is asked to exit (SIGTERM).
    shutdown_at: Millis,
    build: Build,
    live: Option<u64>,
    kills: usize,
    next_req: u64,
    /// What happened, when: (time since T0, what).
    log: Vec<(Millis, String)>,
    replies: BTreeMap<ReqId, (Millis, Reply)>,
    timeouts: Vec<(Millis, Timer)>,
    /// When the machine said it wanted to be woken, at each sleep.
    wake_ats: Vec<Option<Millis>>,
    passes: usize,
}

impl Sim {
    fn new(build: Build) -> Sim {
        Sim {
            now: T0,
            script: BTreeMap::new(),
            later: BTreeMap::new(),
            shutdown_at: T0 + LIMIT - 1_000,
            build,
            live: None,
            kills: 0,
            next_req: 0,
            log: Vec::new(),
            replies: BTreeMap::new(),
            timeouts: Vec::new(),
            wake_ats: Vec::new(),
            passes: 0,
        }
    }

    fn at(mut self, t: Millis, request: Request) -> Sim {
        self.script.entry(T0 + t).or_default().push(request);
        self
    }

    fn shutdown_at(mut self, t: Millis) -> Sim {
        self.shutdown_at = T0 + t;
        self
    }

    fn note(&mut self, what: String) {
        self.log.push((self.now - T0, what));
    }

    fn exit_later(&mut self, after: Millis, build_id: u64, exit: Exit) {
        self.later
            .entry(self.now + after)
            .or_default()
            .push(Event::BuildExited {
                build_id,
                exit,
                group_alive: false,
            });
    }

    fn reply(&self, id: u64) -> &(Millis, Reply) {
        &self.replies[&ReqId(id)]
    }
}

/// Takes out of `map` what is due at `now`.
fn due<T>(map: &mut BTreeMap<Millis, T>, now: Millis) -> Vec<T> {
    let later = map.split_off(&(now + 1));
    std::mem::replace(map, later).into_values().collect()
}

impl World for Sim {
    fn now(&self) -> Millis {
        self.now
    }

    fn look(&mut self, _machine: &Machine) -> Vec<Event> {
        self.passes += 1;
        let mut seen = Vec::new();
        if self.now >= self.shutdown_at {
            self.shutdown_at = Millis::MAX;
            seen.push(Event::Shutdown);
        }
        for events in due(&mut self.later, self.now) {
            seen.extend(events);
        }
        for requests in due(&mut self.script, self.now) {
            for request in requests {
                self.next_req += 1;
                seen.push(Event::Request {
                    id: ReqId(self.next_req),
                    request,
                });
            }
        }
        for e in &seen {
            if let Event::BuildExited { .. } = e {
                self.live = None;
            }
            self.note(format!("saw {:?}", e.kind()));
        }
        seen
    }

    fn perform(&mut self, effect: Effect) -> Option<Event> {
        match effect {
            Effect::Spawn { build_id, .. } => {
                self.note(format!("spawn {build_id}"));
                self.live = Some(build_id);
                self.kills = 0;
                let runs_for = self.build.runs_for;
                self.exit_later(runs_for, build_id, Exit::Code(0));
                Some(Event::Spawned {
                    build_id,
                    process: ProcessId {
                        pid: 100,
                        start_ticks: 1,
                    },
                    mounts_before: Vec::new(),
                    mounts_ns: String::new(),
                })
            }
            Effect::Signal { build_id, sig } => {
                self.note(format!("{sig:?}"));
                if self.live != Some(build_id) {
                    return None;
                }
                match sig {
                    Sig::Term => {
                        if let Some(after) = self.build.term_takes {
                            self.later.clear();
                            self.exit_later(after, build_id, Exit::Signal(15));
                        }
                        None
                    }
                    Sig::Kill => {
                        self.kills += 1;
                        if self.kills < self.build.kills_needed {
                            return None;
                        }
                        self.later.clear();
                        self.live = None;
                        Some(Event::BuildExited {
                            build_id,
                            exit: Exit::Signal(9),
                            group_alive: false,
                        })
                    }
                }
            }
            Effect::Reply { id, reply } => {
                self.note(format!("reply {} {}", id.0, reply.action));
                assert!(
                    self.replies.insert(id, (self.now - T0, reply)).is_none(),
                    "request {id:?} answered twice"
                );
                None
            }
            Effect::Persist(_)
            | Effect::WriteStatus(_)
            | Effect::ReleaseMounts { .. }
            | Effect::EndLog { .. } => None,
            Effect::Exit => {
                self.note("exit".into());
                None
            }
            Effect::ClearAdopted { build } => {
                self.note(format!("clear {}", build.id));
                Some(Event::AdoptedGone {
                    build_id: build.id,
                    killed: 0,
                    log: LogNews::default(),
                })
            }
            other => panic!("not simulated: {other:?}"),
        }
    }

    fn may_end(&mut self) -> bool {
        true
    }

    fn sleep(&mut self, _machine: &Machine, wake_at: Option<Millis>) {
        self.wake_ats.push(wake_at);
        let next_input = [
            Some(self.shutdown_at).filter(|&t| t != Millis::MAX),
            self.script.keys().next().copied(),
            self.later.keys().next().copied(),
            wake_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("the loop sleeps with nothing to wake it: it would sleep for ever");
        assert!(
            next_input >= self.now,
            "asked to wake in the past ({next_input} < {})",
            self.now
        );
        self.now = next_input;
        assert!(self.now - T0 < LIMIT, "ran past the limit: {:#?}", self.log);
    }
}

/// A machine started at T0 from `persisted`, having found `found`.
fn machine(persisted: Persisted, found: Recovered) -> Machine {
    Machine::new(
        Config {
            grace_ms: GRACE,
            status_file: PathBuf::from("/chan/status.lat"),
            history_cap: 5,
            pid: 1,
            version: "test".into(),
            started_at: T0,
        },
        persisted,
        T0,
        found,
    )
}

/// Runs the loop in `sim` until the machine has exited.
fn run(mut sim: Sim) -> Sim {
    let mut m = machine(Persisted::default(), Recovered::default());
    // As the daemon does: the loop, until the machine has exited. The
    // timers the machine armed are recorded as it reports them due.
    struct Recording<'a>(&'a mut Sim);
    impl World for Recording<'_> {
        fn now(&self) -> Millis {
            self.0.now()
        }
        fn look(&mut self, m: &Machine) -> Vec<Event> {
            self.0.look(m)
        }
        fn perform(&mut self, e: Effect) -> Option<Event> {
            self.0.perform(e)
        }
        fn may_end(&mut self) -> bool {
            self.0.may_end()
        }
        fn sleep(&mut self, m: &Machine, wake_at: Option<Millis>) {
            let due = m.due_timers(self.0.now);
            assert!(
                due.is_empty(),
                "slept with {due:?} due: the pass should have fed them"
            );
            if let Some((at, t)) = m.next_timer() {
                self.0.timeouts.push((at - T0, t));
            }
            self.0.sleep(m, wake_at)
        }
    }
    driver::run(&mut m, &mut Recording(&mut sim));
    assert!(m.has_exited());
    sim
}

fn build_request() -> Request {
    Request::Build(BuildRequest {
        workdir: "/w".into(),
        yaml_file: Path::new("/w").join("lat.yaml"),
        kind: BuildKind::Genimage,
    })
}

/// When each thing of `what` happened (time since the start).
fn times(sim: &Sim, what: &str) -> Vec<Millis> {
    sim.log
        .iter()
        .filter(|(_, w)| w == what)
        .map(|&(t, _)| t)
        .collect()
}

#[test]
fn a_build_runs_to_its_end_and_a_shutdown_then_ends_the_loop() {
    let sim = run(Sim::new(Build {
        runs_for: 30_000,
        term_takes: Some(100),
        kills_needed: 1,
    })
    .at(0, build_request())
    .at(40_000, Request::Status)
    .shutdown_at(50_000));
    assert_eq!(sim.reply(1).0, 0, "build answered at once");
    assert_eq!(sim.reply(1).1.result, ReplyResult::Succeed);
    assert_eq!(times(&sim, "saw BuildExited"), vec![30_000]);
    let (at, status) = sim.reply(2);
    assert_eq!(*at, 40_000);
    assert_eq!(status.result, ReplyResult::Succeed);
    assert_eq!(times(&sim, "exit"), vec![50_000], "exits on the shutdown");
    assert!(times(&sim, "Term").is_empty() && times(&sim, "Kill").is_empty());
}

#[test]
fn a_stop_that_sigterm_ends_is_answered_when_the_build_exits() {
    let sim = run(Sim::new(Build {
        runs_for: 300_000,
        term_takes: Some(700),
        kills_needed: 1,
    })
    .at(0, build_request())
    .at(5_000, Request::Stop)
    .at(20_000, Request::Status));
    assert_eq!(times(&sim, "Term"), vec![5_000]);
    assert!(times(&sim, "Kill").is_empty(), "{:#?}", sim.log);
    assert_eq!(
        sim.reply(2).0,
        5_700,
        "the stop is answered as the build ends"
    );
    assert_eq!(sim.reply(2).1.result, ReplyResult::Succeed);
}

#[test]
fn sigkill_comes_at_the_end_of_the_grace_and_again_until_the_build_is_gone() {
    // SIGTERM is ignored; the third SIGKILL ends it (forks raced the
    // first two).
    let sim = run(Sim::new(Build {
        runs_for: 300_000,
        term_takes: None,
        kills_needed: 3,
    })
    .at(0, build_request())
    .at(5_000, Request::Stop));
    assert_eq!(times(&sim, "Term"), vec![5_000]);
    let grace_end = 5_000 + GRACE;
    assert_eq!(
        times(&sim, "Kill"),
        vec![
            grace_end,
            grace_end + KILL_REPEAT_MS,
            grace_end + 2 * KILL_REPEAT_MS
        ],
        "exactly at the grace's end, then every {KILL_REPEAT_MS} ms: {:#?}",
        sim.log
    );
    assert_eq!(sim.reply(2).0, grace_end + 2 * KILL_REPEAT_MS);
    assert_eq!(sim.reply(2).1.result, ReplyResult::Succeed);
    // The loop slept until each of those moments, and no longer: every
    // wake-up it was asked for is a timer's.
    for (at, t) in [
        (grace_end, Timer::Grace),
        (grace_end + KILL_REPEAT_MS, Timer::KillRepeat),
    ] {
        assert!(sim.timeouts.contains(&(at, t)), "{:?}", sim.timeouts);
    }
}

#[test]
fn a_build_sigkill_cannot_end_is_given_up_after_the_kill_wait() {
    let sim = run(Sim::new(Build {
        runs_for: 300_000,
        term_takes: None,
        kills_needed: usize::MAX,
    })
    .at(0, build_request())
    .at(1_000, Request::Stop));
    let grace_end = 1_000 + GRACE;
    let kills = times(&sim, "Kill");
    assert_eq!(kills.first(), Some(&grace_end));
    // SIGKILL every 100 ms for the whole kill wait, then the stop ends.
    assert_eq!(kills.len() as u64, KILL_WAIT_MS / KILL_REPEAT_MS);
    assert!(kills.windows(2).all(|w| w[1] - w[0] == KILL_REPEAT_MS));
    assert_eq!(sim.reply(2).0, grace_end + KILL_WAIT_MS);
    assert!(
        sim.passes < 400,
        "the loop sleeps between timers rather than spinning: {} passes",
        sim.passes
    );
}

#[test]
fn effects_made_at_start_are_performed_in_order_and_their_outcomes_fed_back() {
    // A build the last latd left finishing is adopted; what the start-up
    // asks (here: clear it) is performed and its outcome reaches the
    // machine, which records the build.
    let record = BuildRecord {
        id: 7,
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
        process: None,
        sdk_log: None,
        success_logged: true,
        error_line: None,
        mounts_before: None,
        mounts_ns: None,
    };
    let mut m = machine(
        Persisted {
            next_build_id: 8,
            current: Some(record.clone()),
            history: Vec::new(),
        },
        Recovered {
            finishing: true,
            killed: 0,
            log: LogNews::default(),
        },
    );
    assert_eq!(m.state().kind(), StateKind::Adopted);
    let mut sim = Sim::new(Build {
        runs_for: 1,
        term_takes: None,
        kills_needed: 1,
    });
    let first = vec![
        Effect::Persist(m.persisted()),
        Effect::ClearAdopted { build: record },
    ];
    driver::perform_all(&mut m, &mut sim, first);
    assert_eq!(sim.log, vec![(0, "clear 7".to_string())]);
    assert_eq!(
        m.state().kind(),
        StateKind::Idle,
        "the outcome was fed back"
    );
    assert_eq!(
        m.history().last().map(|b| (b.id, b.outcome)),
        Some((7, Outcome::Succeeded))
    );
}
