//! The poll loop: looks at signals, child processes and the channel
//! directory, turns what it sees into [`Event`]s, feeds the [`Machine`] and
//! performs the [`Effect`]s it returns. No inotify: the channel may be on
//! NFS or overlayfs. A named pipe in the channel lets a local client wake
//! the loop at once; the directory listing stays the source of truth.

use crate::channel::{Channel, Slot};
use crate::clock::{iso8601, Clock};
use crate::driver;
use crate::effects::{self, Processes, SdkConfig};
use crate::lock;
use crate::machine::{self, BuildRecord, Effect, Event, Machine, Recovered, ReqId, StateKind};
use crate::protocol;
use crate::sdklog;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How the daemon is set up (flags and environment, see `latd --help`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub workspace: PathBuf,
    pub channel: PathBuf,
    pub sdk_dir: PathBuf,
    /// Between SIGTERM and SIGKILL when stopping a build.
    pub grace: Duration,
    /// Poll interval at rest.
    pub idle_poll: Duration,
    /// Poll interval while something runs, or just after a request.
    pub busy_poll: Duration,
    pub allow_hack_cmd: bool,
    pub history_cap: usize,
    /// `--channel-group`: the group the channel is given (mode 2770).
    pub channel_group: Option<u32>,
    /// Follow a symlink found at the channel's path at start.
    pub follow_channel_symlink: bool,
}

/// The SDK's environment script, in the SDK directory.
pub const ENV_SCRIPT: &str = "environment-setup-corei7-64-wrs-linux";

/// How often the heartbeat file's mtime is refreshed.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// The fastest poll while busy on a network filesystem (NFS, CIFS, FUSE).
const NETWORK_BUSY_POLL: Duration = Duration::from_millis(50);
/// After a request, poll fast for this long (the next one often follows).
const BUSY_AFTER_ACTIVITY: Duration = Duration::from_secs(2);
/// How often the processes of an adopted build are looked for.
const ADOPTED_LOOK_EVERY: Duration = Duration::from_millis(100);
/// How often children are reaped when nothing says there is any to reap.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// On exit, how long replies and state that could not be written are retried.
const EXIT_REPLY_RETRY: Duration = Duration::from_secs(1);
/// How often stale files are swept from the channel.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// A tick stops reading requests after this long; the rest wait for the
/// next tick, which comes at once.
const BATCH_TIME: Duration = Duration::from_millis(100);

impl Settings {
    pub fn env_script(&self) -> PathBuf {
        self.sdk_dir.join(ENV_SCRIPT)
    }
}

/// The daemon's wake-up sources: signals (via a self-pipe) and the FIFO.
struct Wakeup {
    signal_rx: UnixStream,
    signal_tx: UnixStream,
    fifo: Option<fs::File>,
    fifo_failed: bool,
    shutdown: Arc<AtomicBool>,
}

impl Wakeup {
    fn new() -> io::Result<Wakeup> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        let shutdown = Arc::new(AtomicBool::new(false));
        use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
        for sig in [SIGTERM, SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&shutdown))?;
        }
        for sig in [SIGTERM, SIGINT, SIGCHLD] {
            signal_hook::low_level::pipe::register(sig, tx.try_clone()?)?;
        }
        Ok(Wakeup {
            signal_rx: rx,
            signal_tx: tx,
            fifo: None,
            fifo_failed: false,
            shutdown,
        })
    }

    /// (Re)opens the wake-up FIFO; without it latd only polls.
    fn open_fifo(&mut self, channel: &Channel) {
        match channel.open_fifo() {
            Ok(f) => {
                self.fifo = Some(f);
                self.fifo_failed = false;
            }
            Err(e) => {
                if !self.fifo_failed {
                    log::warn!(
                        "cannot open {}: {e}; polling only until it can be",
                        channel.path(protocol::WAKE_FIFO).display()
                    );
                }
                self.fifo = None;
                self.fifo_failed = true;
            }
        }
    }

    /// Sleeps until a wake-up or `timeout`, then drains what woke us.
    /// Returns whether a signal (or a background job) woke us.
    fn wait(&mut self, timeout: Duration) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let mut fds = vec![PollFd::new(&self.signal_rx, PollFlags::IN)];
        if let Some(f) = &self.fifo {
            fds.push(PollFd::new(f, PollFlags::IN));
        }
        let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        // EINTR (a signal) is a wake-up like any other.
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
        // Drain what woke us (only that: a quiet tick costs no read), and
        // boundedly: a client that writes without end must not keep the
        // loop here.
        let signalled = !fds[0].revents().is_empty();
        let fifo_woke = fds.get(1).is_some_and(|p| !p.revents().is_empty());
        drop(fds);
        if signalled {
            drain(&mut &self.signal_rx);
        }
        if let (Some(f), true) = (self.fifo.as_ref(), fifo_woke) {
            drain(&mut &*f);
        }
        signalled
    }

    /// A handle background threads use to wake the loop.
    fn waker(&self) -> Arc<dyn Fn() + Send + Sync> {
        let tx = self.signal_tx.try_clone().ok();
        Arc::new(move || {
            if let Some(tx) = &tx {
                use std::io::Write;
                let _ = (&*tx).write(b"w");
            }
        })
    }
}

/// Reads what is waiting in `r`, at most 64 KiB.
fn drain(r: &mut impl Read) {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(r.read(&mut buf), Ok(n) if n > 0) {
            break;
        }
    }
}

/// How often a waiting latd tries the channel's lock again.
const LOCK_RETRY: Duration = Duration::from_millis(200);
/// A lock attempt still unanswered after this is reported as a wait (an
/// NFS server holds locks back for its grace period after it starts).
const LOCK_SLOW: Duration = Duration::from_secs(2);

/// Who holds the lock, from the heartbeat the serving latd writes.
fn holder(channel: &Channel) -> String {
    let text = channel.read_alive();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    };
    match (field("pid"), field("started_at")) {
        (Some(pid), Some(at)) => format!(
            "the lock held by another latd ({} says pid {pid}, started at {at})",
            protocol::ALIVE_FILE
        ),
        (Some(pid), None) => format!(
            "the lock held by another latd ({} says pid {pid})",
            protocol::ALIVE_FILE
        ),
        _ => "the lock held by another latd".to_string(),
    }
}

/// Takes the channel's lock. While another latd holds it, waits as a
/// standby and takes over when it goes; while the filesystem does not
/// answer (an NFS server's grace period), waits too. Either wait is said in
/// the log and in `latd.standby`, which clients show. Planted files never
/// stop it (see [`crate::lock`]). `None`: asked to exit while waiting.
fn wait_for_lock(channel: &Channel, shutdown: &AtomicBool) -> Option<lock::ChannelLock> {
    enum Msg {
        Taken(lock::ChannelLock),
        Held,
        Failed(String),
    }
    let dir = channel.io_dir().to_path_buf();
    let uid = lock::own_uid(&dir);
    let (tx, rx) = mpsc::channel();
    // A lock call on NFS can block in the kernel for the whole grace
    // period: it runs aside, so that latd can say it waits, and can exit.
    std::thread::spawn(move || loop {
        let msg = match lock::try_take(&dir, uid) {
            Ok(lock::Attempt::Taken(l)) => {
                let _ = tx.send(Msg::Taken(l));
                return;
            }
            Ok(lock::Attempt::HeldByDaemon) => Msg::Held,
            Err(e) => Msg::Failed(e.to_string()),
        };
        if tx.send(msg).is_err() {
            return;
        }
        std::thread::sleep(LOCK_RETRY);
    });
    let since = iso8601(Clock::new().now());
    let start = Instant::now();
    let mut answered = Instant::now();
    // What latd waits for (for the standby file), and when it last said so
    // in the log: once per change, and the filesystem's silence every 10 s.
    let mut waiting: Option<String> = None;
    let mut logged: Option<(&'static str, String, Instant)> = None;
    let mut written: Option<Instant> = None;
    let result = loop {
        if shutdown.load(Ordering::Relaxed) {
            log::info!("asked to exit while waiting for the channel's lock");
            break None;
        }
        let lock_path = channel.path(protocol::LOCK_FILE);
        let now_waiting = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Msg::Taken(l)) => {
                if waiting.is_some() {
                    log::info!(
                        "took the channel's lock after waiting {:.1} s",
                        start.elapsed().as_secs_f64()
                    );
                }
                break Some(l);
            }
            Ok(Msg::Held) => {
                answered = Instant::now();
                Some(("held", holder(channel)))
            }
            Ok(Msg::Failed(e)) => {
                answered = Instant::now();
                Some(("failed", format!("the lock {}: {e}", lock_path.display())))
            }
            Err(mpsc::RecvTimeoutError::Timeout) if answered.elapsed() >= LOCK_SLOW => Some((
                "slow",
                format!(
                    "the lock {}: the filesystem has not answered for {} s (on NFS a freshly started server holds locks back for its grace period, up to 90 s)",
                    lock_path.display(),
                    answered.elapsed().as_secs()
                ),
            )),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                log::error!("the lock's thread ended; exiting");
                break None;
            }
        };
        if let Some((kind, what)) = now_waiting {
            let again = match &logged {
                Some((k, w, at)) => {
                    *k != kind
                        || (kind != "slow" && *w != what)
                        || (kind == "slow" && at.elapsed() >= Duration::from_secs(10))
                }
                None => true,
            };
            if again {
                match kind {
                    "held" => log::warn!(
                        "latd is waiting for {what}: on standby, it takes over when that latd goes"
                    ),
                    "failed" => log::error!("latd is waiting for {what}; trying again"),
                    _ => log::warn!("latd is waiting for {what}"),
                }
                logged = Some((kind, what.clone(), Instant::now()));
                written = None;
            }
            waiting = Some(what);
        }
        if let Some(what) = &waiting {
            if written.is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY) {
                let text = format!(
                    "pid: {}\nsince: {since}\nwaiting_for: {what}\n",
                    std::process::id()
                );
                let _ = channel.write_standby(&text);
                written = Some(Instant::now());
            }
        }
    };
    if written.is_some() {
        channel.remove_standby();
    }
    result
}

/// The daemon's world, as the [`driver`] sees it: the channel, the
/// processes, the clock and the wake-ups; it performs the machine's effects.
struct Daemon {
    settings: Settings,
    /// The canonical workspace root that requests' paths must lie in.
    root: PathBuf,
    clock: Clock,
    /// When this latd started (for the heartbeat).
    started_at: machine::Millis,
    wakeup: Wakeup,
    /// Shutdown has been fed to the machine.
    shutdown_sent: bool,
    /// When the machine exited (replies not yet written get a last chance).
    exited_at: Option<Instant>,
    channel: Channel,
    /// The channel's lock, held while latd serves.
    lock: lock::ChannelLock,
    lock_lost: bool,
    procs: Processes,
    sdk: SdkConfig,
    /// Where each request's reply goes, and whether the request was
    /// invalid (its reply is junk, see [`Channel::reply`]).
    slots: HashMap<ReqId, (Slot, bool)>,
    next_req: u64,
    jobs_tx: mpsc::Sender<Event>,
    jobs_rx: mpsc::Receiver<Event>,
    /// Wakes the loop from a background thread.
    waker: Arc<dyn Fn() + Send + Sync>,
    last_activity: Instant,
    /// The last wait ended on a signal (or a background job's wake-up).
    signalled: bool,
    last_reap: Instant,
    /// When the processes of an adopted build were last looked for.
    last_adopted_look: Instant,
    /// The latest persisted state, until it is written.
    unsaved_state: Option<Vec<u8>>,
    state_save_failed: bool,
    last_heartbeat: Option<Instant>,
    /// Heartbeats written: the counter in `latd.alive`.
    beats: u64,
    last_sweep: Instant,
}

/// Runs the daemon until SIGTERM/SIGINT. Returns an error only when it
/// cannot start at all.
pub fn run(settings: Settings) -> Result<(), String> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    crate::fsutil::ensure_dir(&settings.workspace).map_err(|e| {
        format!(
            "cannot create workspace {}: {e}",
            settings.workspace.display()
        )
    })?;
    let root = settings
        .workspace
        .canonicalize()
        .map_err(|e| format!("workspace {}: {e}", settings.workspace.display()))?;
    let mut channel = Channel::new(settings.channel.clone());
    if settings.follow_channel_symlink {
        channel.follow_symlink();
    }
    if let Some(gid) = settings.channel_group {
        channel.set_group(gid);
    }
    channel
        .ensure()
        .map_err(|e| format!("cannot set up channel {}: {e}", settings.channel.display()))?;
    let mut wakeup = Wakeup::new().map_err(|e| format!("cannot set up signal handling: {e}"))?;
    let Some(lock) = wait_for_lock(&channel, &wakeup.shutdown) else {
        return Ok(());
    };
    Processes::become_subreaper();
    wakeup.open_fifo(&channel);
    if !settings.env_script().is_file() {
        log::warn!(
            "SDK environment script {} not found: builds and getyaml will fail until it exists",
            settings.env_script().display()
        );
    }
    if settings.allow_hack_cmd {
        log::warn!(
            "--allow-hack-cmd: {} will replace the build command when present",
            settings.workspace.join("hack/lat-genimage-cmd").display()
        );
    }

    let clock = Clock::new();
    let now = clock.now();
    let persisted = channel.load_state();
    // The mark is the channel's identity (its directory's device and
    // inode), not its path: two daemons in one pid namespace, each on its
    // own volume mounted at the same path, never take each other's
    // processes for their own.
    let tag = effects::channel_mark(channel.io_dir()).map_err(|e| {
        format!(
            "cannot identify channel {}: {e}",
            settings.channel.display()
        )
    })?;
    // Whatever a previous latd on this channel started and left running
    // (it was killed, or crashed) carries the channel's mark: kill it. The
    // state file names pids too, but it lies in the shared channel, and a
    // pid in it is not proof enough to kill.
    let recovered = recover(&tag, persisted.current.as_ref(), &root);
    channel.clear_stale();
    let config = machine::Config {
        grace_ms: settings.grace.as_millis() as u64,
        status_file: channel.path(protocol::STATUS_FILE),
        history_cap: settings.history_cap,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: now,
    };
    let mut machine = Machine::new(config, persisted, now, recovered);
    let (jobs_tx, jobs_rx) = mpsc::channel();
    let waker = wakeup.waker();
    let mut d = Daemon {
        sdk: SdkConfig {
            env_script: settings.env_script(),
            hack_cmd: settings
                .allow_hack_cmd
                .then(|| settings.workspace.join("hack/lat-genimage-cmd")),
            private_dir: effects::private_dir(&tag),
            tag,
            root: root.clone(),
        },
        settings,
        root,
        clock,
        started_at: now,
        wakeup,
        shutdown_sent: false,
        exited_at: None,
        channel,
        lock,
        lock_lost: false,
        procs: Processes::default(),
        slots: HashMap::new(),
        next_req: 1,
        jobs_tx,
        jobs_rx,
        waker,
        last_activity: Instant::now(),
        signalled: true,
        last_reap: Instant::now(),
        last_adopted_look: Instant::now(),
        unsaved_state: None,
        state_save_failed: false,
        last_heartbeat: None,
        beats: 0,
        last_sweep: Instant::now(),
    };
    // Record the recovered state before answering anything.
    let mut first = vec![
        Effect::Persist(machine.persisted()),
        Effect::WriteStatus(machine.status(now)),
    ];
    first.extend(machine.startup_effects());
    driver::perform_all(&mut machine, &mut d, first);
    // The heartbeat before anything is said or answered: a client that
    // finds the lock held finds the heartbeat too (a standby taking over
    // finds none: the latd before it removed its own on exit).
    d.heartbeat();
    d.last_heartbeat = Some(Instant::now());
    log::info!(
        "latd {} serving channel {} (workspace {}, SDK {})",
        env!("CARGO_PKG_VERSION"),
        d.settings.channel.display(),
        d.settings.workspace.display(),
        d.settings.sdk_dir.display()
    );
    driver::run(&mut machine, &mut d);
    d.procs.kill_jobs();
    d.channel.remove_alive();
    log::info!("latd exiting");
    Ok(())
}

/// Deals with what a previous latd on this channel left running (it was
/// killed, or crashed), and reads what the build it ran logged. A build
/// whose SDK had logged its success line and still runs is left to finish
/// its deploy (the machine adopts it); everything else that carries the
/// channel's mark is killed.
fn recover(tag: &str, current: Option<&BuildRecord>, root: &std::path::Path) -> Recovered {
    if let Some(b) = current {
        let log = effects::read_build_log(b, root);
        if (b.success_logged || log.success) && !effects::tagged(tag).is_empty() {
            log::warn!(
                "build {} had logged its success when latd stopped and its SDK still runs: it is left to finish its deploy",
                b.id
            );
            return Recovered {
                finishing: true,
                killed: 0,
                log,
            };
        }
    }
    let (killed, log) = effects::clear_build_left(tag, current, root);
    Recovered {
        finishing: false,
        killed,
        log,
    }
}

impl driver::World for Daemon {
    fn now(&self) -> machine::Millis {
        self.clock.now()
    }

    fn look(&mut self, machine: &Machine) -> Vec<Event> {
        let mut seen = Vec::new();
        let made = self.channel.ensure().unwrap_or(false);
        if made || self.wakeup.fifo.is_none() {
            self.wakeup.open_fifo(&self.channel);
        }
        if self.wakeup.shutdown.load(Ordering::Relaxed) && !self.shutdown_sent {
            self.shutdown_sent = true;
            log::info!("asked to exit: stopping what runs, then exiting");
            seen.extend(self.procs.watch_log());
            seen.push(Event::Shutdown);
        }
        // Children are reaped when SIGCHLD says so, every pass while a
        // build is tracked (its group is watched), and once a second anyway.
        seen.extend(self.procs.watch_log());
        if self.signalled || self.procs.build_running() || self.last_reap.elapsed() >= REAP_EVERY {
            self.last_reap = Instant::now();
            seen.extend(self.procs.reap());
        }
        seen.extend(self.jobs_rx.try_iter());
        if let machine::State::Adopted { build, .. } = machine.state() {
            // Not our children: looked for, a few times a second.
            if self.last_adopted_look.elapsed() >= ADOPTED_LOOK_EVERY {
                self.last_adopted_look = Instant::now();
                if !effects::anything_left(&self.sdk.tag) {
                    log::info!("build {}: its SDK has finished", build.id);
                    let (killed, log) =
                        effects::clear_build_left(&self.sdk.tag, Some(build), &self.root);
                    seen.push(Event::AdoptedGone {
                        build_id: build.id,
                        killed,
                        log,
                    });
                }
            }
        }
        if let Ok(picks) = self.channel.scan() {
            // Requests are read one at a time; a batch that runs long is
            // cut, and the rest waits for the next pass.
            let start = Instant::now();
            let mut picks = picks.into_iter();
            while let Some(pick) = picks.next() {
                if start.elapsed() >= BATCH_TIME {
                    let mut rest = vec![pick];
                    rest.extend(picks);
                    self.channel.give_back(rest);
                    break;
                }
                if let Some(inc) = self.channel.read(pick) {
                    self.last_activity = Instant::now();
                    let request = self.incoming(inc);
                    if let Event::Request {
                        request: crate::machine::Request::Stop,
                        ..
                    } = &request
                    {
                        // What its sender read in the log latd knows too:
                        // a success line logged since this pass's look
                        // decides how the stop goes (the deployed caller
                        // stops the moment it reads that line).
                        seen.extend(self.procs.watch_log());
                    }
                    seen.push(request);
                }
            }
        }
        seen
    }

    fn perform(&mut self, effect: Effect) -> Option<Event> {
        Daemon::perform(self, effect)
    }

    fn may_end(&mut self) -> bool {
        // Replies and state that could not be written yet get a last chance.
        let since = *self.exited_at.get_or_insert_with(Instant::now);
        if !self.channel.has_pending() && self.unsaved_state.is_none() {
            return true;
        }
        if since.elapsed() > EXIT_REPLY_RETRY {
            log::error!("exiting with replies or state that could not be written");
            return true;
        }
        false
    }

    fn sleep(&mut self, machine: &Machine, wake_at: Option<machine::Millis>) {
        self.channel.retry_pending();
        self.channel.release_replaced();
        self.housekeeping();
        let timeout = self.next_timeout(machine, wake_at);
        self.signalled = self.wakeup.wait(timeout);
    }
}

impl Daemon {
    /// A request read from the channel, as the machine's event: recorded
    /// in the history, given an id, checked.
    fn incoming(&mut self, inc: crate::channel::Incoming) -> Event {
        // Recorded before the reply, so a client that has its reply finds
        // its line in the history.
        self.channel
            .record_history(&iso8601(self.clock.now()), &inc.slot, &inc.text);
        let id = ReqId(self.next_req);
        self.next_req += 1;
        let checked = inc
            .parsed
            .and_then(|raw| crate::validate::check(raw, &self.root, self.clock.now()));
        self.slots.insert(id, (inc.slot.clone(), checked.is_err()));
        // The marker says whether the last request read was invalid.
        self.channel.mark_invalid(checked.is_err());
        match checked {
            Ok(request) => {
                log::debug!("request from {}: {request:?}", inc.slot);
                Event::Request { id, request }
            }
            Err(inv) => {
                log::warn!("invalid request in {}: {}", inc.slot, inv.reason);
                Event::Invalid {
                    id,
                    action: inv.action,
                    reason: inv.reason,
                }
            }
        }
    }

    fn perform(&mut self, effect: Effect) -> Option<Event> {
        match effect {
            Effect::Reply { id, reply } => {
                let Some((slot, junk)) = self.slots.remove(&id) else {
                    // Never to another client's slot; this is a bug.
                    log::error!("dropping a reply to unknown request {id:?}: {reply:?}");
                    return None;
                };
                let level = if reply.action == "status" && reply.fail_reason.is_none() {
                    log::Level::Debug
                } else {
                    log::Level::Info
                };
                log::log!(
                    level,
                    "{} {} -> {:?}{}",
                    slot,
                    reply.action,
                    reply.result,
                    reply
                        .fail_reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                self.channel.reply(slot, &reply, junk);
                None
            }
            Effect::Spawn { build_id, request } => {
                Some(self.procs.spawn_build(&self.sdk, build_id, &request))
            }
            Effect::Signal { build_id, sig } => {
                self.procs.signal(build_id, sig);
                None
            }
            Effect::StartClean { job, workdir } => {
                log::info!("cleaning {}", workdir.display());
                let w = Arc::clone(&self.waker);
                effects::start_clean(
                    job,
                    self.root.clone(),
                    workdir,
                    self.jobs_tx.clone(),
                    move || w(),
                );
                None
            }
            Effect::StartGetYaml { job, workdir } => {
                log::info!("running appsdk exampleyamls in {}", workdir.display());
                self.procs.spawn_getyaml(&self.sdk, job, &workdir)
            }
            Effect::EndLog {
                build_id,
                file,
                line,
            } => {
                match sdklog::append(&self.root, &file, &line) {
                    Ok(()) => log::info!("build {build_id}: noted its end in {}", file.display()),
                    Err(e) => log::warn!(
                        "build {build_id}: cannot note its end in {}: {e}",
                        file.display()
                    ),
                }
                None
            }
            Effect::ReleaseMounts { build_id } => {
                self.procs.release_mounts(build_id, &self.root);
                None
            }
            Effect::ClearAdopted { build } => {
                let (killed, log) =
                    effects::clear_build_left(&self.sdk.tag, Some(&build), &self.root);
                Some(Event::AdoptedGone {
                    build_id: build.id,
                    killed,
                    log,
                })
            }
            Effect::CancelJob { job } => {
                self.procs.cancel_job(job);
                None
            }
            Effect::WriteStatus(doc) => {
                self.channel.write_status(&doc);
                None
            }
            Effect::Persist(p) => {
                self.unsaved_state = Some(serde_json::to_vec_pretty(&p).unwrap_or_default());
                self.save_state();
                None
            }
            Effect::Exit => None,
        }
    }

    /// Writes the latest state not yet saved; kept for a retry on failure
    /// (a full disk), so what is on disk always catches up.
    fn save_state(&mut self) {
        let Some(text) = &self.unsaved_state else {
            return;
        };
        match self.channel.write_state(text) {
            Ok(()) => {
                if self.state_save_failed {
                    log::info!("state saved after a retry");
                }
                self.state_save_failed = false;
                self.unsaved_state = None;
            }
            Err(e) => {
                if !self.state_save_failed {
                    log::error!(
                        "cannot save state in {}: {e}; will retry",
                        self.channel.dir().display()
                    );
                }
                self.state_save_failed = true;
            }
        }
    }

    fn housekeeping(&mut self) {
        self.save_state();
        let due = self
            .last_heartbeat
            .is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY);
        if due {
            match self.lock.keep(self.channel.io_dir()) {
                Ok(()) => self.lock_lost = false,
                Err(e) => {
                    if !self.lock_lost {
                        log::error!("{e}");
                    }
                    self.lock_lost = true;
                }
            }
            self.heartbeat();
            self.last_heartbeat = Some(Instant::now());
        }
        if self.channel.sweeping() {
            self.channel.sweep_step();
        } else if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.channel.start_sweep(false);
            self.last_sweep = Instant::now();
        }
    }

    /// Advertises that the daemon is alive: the file's content says who,
    /// and its `beat` counter, rewritten every [`HEARTBEAT_EVERY`], says
    /// that it still runs. A client judges the counter's moving, never the
    /// file's time against its own clock (another host's clock may differ,
    /// and NFS caches attributes); the write itself stamps the mtime with
    /// the filesystem's clock (no explicit time is set).
    fn heartbeat(&mut self) {
        self.beats += 1;
        let text = crate::heartbeat::render(
            std::process::id(),
            env!("CARGO_PKG_VERSION"),
            &iso8601(self.started_at),
            &self.settings.channel.display().to_string(),
            &self.settings.workspace.display().to_string(),
            self.beats,
            crate::clock::wall_now(),
        );
        if let Err(e) = self.channel.write_alive(&text) {
            log::warn!(
                "cannot write {}: {e}",
                self.channel.path(protocol::ALIVE_FILE).display()
            );
        }
    }

    /// How long to sleep: the poll interval (short while busy), until
    /// the machine's next timer or the next heartbeat at the latest.
    fn next_timeout(&self, machine: &Machine, wake_at: Option<machine::Millis>) -> Duration {
        if self.channel.has_backlog() || self.channel.sweeping() {
            return Duration::ZERO;
        }
        let busy = machine.state().kind() != StateKind::Idle
            || self.last_activity.elapsed() < BUSY_AFTER_ACTIVITY
            || self.channel.has_pending()
            || self.unsaved_state.is_some()
            || self.procs.build_running();
        let mut t = if busy && self.channel.is_network() {
            // Each poll of an NFS channel is a request to the server (the
            // listing revalidates the directory), and clients on other
            // hosts poll on their own schedule: a few milliseconds buy
            // them nothing. Same-kernel clients wake latd through the FIFO.
            self.settings
                .busy_poll
                .max(NETWORK_BUSY_POLL)
                .min(self.settings.idle_poll)
        } else if busy {
            self.settings.busy_poll
        } else {
            self.settings.idle_poll
        };
        if let Some(deadline) = wake_at {
            let now = self.clock.now();
            t = t.min(Duration::from_millis(deadline.saturating_sub(now)));
        }
        let hb = self.last_heartbeat.map_or(Duration::ZERO, |h| {
            HEARTBEAT_EVERY.saturating_sub(h.elapsed())
        });
        t.min(hb)
    }
}
