//! The heartbeat file `latd.alive`: what latd writes into it and how a
//! client judges it.
//!
//! latd rewrites the file every two seconds with a counter (`beat: N`) that
//! grows by one each time. A client on any host judges liveness without
//! comparing two hosts' clocks:
//!
//! - once, right after it wrote its request: the heartbeat's mtime against
//!   its request file's mtime. On NFS both are stamped by the server's
//!   clock (latd sets no time, the writes do); on one machine both by that
//!   machine's. Both are read through freshly opened files, whose
//!   attributes NFS revalidates on open (close-to-open), so no attribute
//!   cache can make the heartbeat look old.
//! - while it waits for its reply: the counter, read again every two
//!   seconds (a fresh open each time, so again not from a cache). A
//!   counter that has not moved for [`STALE`] by the client's own
//!   monotonic clock means latd is gone or hung.
//!
//! The bound: with `nocto` mounts (never recommended) an open does not
//! revalidate, and the file may look unchanged for up to the attribute
//! cache time (`acregmax`, 60 s by default) on top of [`STALE`].

use std::time::{Duration, Instant, SystemTime};

/// A heartbeat that has not moved for this long means the daemon is gone.
pub const STALE: Duration = Duration::from_secs(10);

/// The file's text. `clock_ms`: latd's wall clock at this beat (ms since
/// the Unix epoch), for a client that must write a time in latd's clock.
pub fn render(
    pid: u32,
    version: &str,
    started_at: &str,
    channel: &str,
    workspace: &str,
    beat: u64,
    clock_ms: u64,
) -> String {
    format!(
        "pid: {pid}\nversion: {version}\nstarted_at: {started_at}\nchannel: {channel}\nworkspace: {workspace}\nbeat: {beat}\nclock_ms: {clock_ms}\n"
    )
}

/// What a client reads in the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Beat {
    pub pid: Option<String>,
    pub started_at: Option<String>,
    /// `None`: an older latd that only refreshed the file's mtime.
    pub beat: Option<u64>,
    /// latd's wall clock at that beat.
    pub clock_ms: Option<u64>,
}

pub fn parse(text: &str) -> Beat {
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    };
    Beat {
        pid: field("pid"),
        started_at: field("started_at"),
        beat: field("beat").and_then(|b| b.parse().ok()),
        clock_ms: field("clock_ms").and_then(|b| b.parse().ok()),
    }
}

/// How long before `reference` (both on the filesystem's clock) the
/// heartbeat was last written; zero if not before.
pub fn age_at(written: SystemTime, reference: SystemTime) -> Duration {
    reference.duration_since(written).unwrap_or(Duration::ZERO)
}

/// A client's view of the heartbeat over time: alive while it moves.
#[derive(Debug)]
pub struct Watch {
    last: Option<Beat>,
    moved_at: Instant,
}

impl Watch {
    pub fn new(now: Instant) -> Watch {
        Watch {
            last: None,
            moved_at: now,
        }
    }

    /// Takes a fresh reading. A new daemon (another pid or start) or a
    /// changed counter counts as movement.
    pub fn see(&mut self, beat: Beat, now: Instant) {
        if self.last.as_ref() != Some(&beat) {
            if self.last.is_some() {
                self.moved_at = now;
            }
            self.last = Some(beat);
        }
    }

    /// How long the heartbeat has stood still, if it carries a counter.
    pub fn still_for(&self, now: Instant) -> Option<Duration> {
        self.last
            .as_ref()
            .and_then(|b| b.beat)
            .map(|_| now.saturating_duration_since(self.moved_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_parses() {
        let t = render(7, "1.0", "2026-01-01T00:00:00Z", "/c", "/w", 42, 1234);
        let b = parse(&t);
        assert_eq!(b.pid.as_deref(), Some("7"));
        assert_eq!(b.beat, Some(42));
        assert_eq!(b.clock_ms, Some(1234));
        assert_eq!(parse("pid: 3\n").beat, None);
        // Padding left by a shorter rewrite is harmless.
        assert_eq!(parse(&format!("{t}      \n")).beat, Some(42));
    }

    #[test]
    fn a_counter_that_stands_still_is_seen() {
        let t0 = Instant::now();
        let mut w = Watch::new(t0);
        let beat = |n| Beat {
            pid: Some("1".into()),
            beat: Some(n),
            ..Beat::default()
        };
        w.see(beat(1), t0);
        assert_eq!(w.still_for(t0 + STALE), Some(STALE));
        w.see(beat(2), t0 + Duration::from_secs(3));
        assert_eq!(
            w.still_for(t0 + Duration::from_secs(5)),
            Some(Duration::from_secs(2))
        );
        w.see(beat(2), t0 + Duration::from_secs(20));
        assert_eq!(
            w.still_for(t0 + Duration::from_secs(20)),
            Some(Duration::from_secs(17))
        );
        let mut old = Watch::new(t0);
        old.see(Beat::default(), t0);
        assert_eq!(old.still_for(t0 + STALE * 3), None);
    }
}
