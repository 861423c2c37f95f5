//! The one place the daemon reads the clock, and time formatting.

use crate::machine::Millis;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds that never go backwards: the wall time at start
/// plus monotonic time since, so a clock step cannot cut a grace period short.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_at_start: Millis,
    start: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            wall_at_start: wall_now(),
            start: Instant::now(),
        }
    }

    pub fn now(&self) -> Millis {
        self.wall_at_start + self.start.elapsed().as_millis() as Millis
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn wall_now() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// `2026-11-24T21:23:02.123Z`: the instant in UTC to the millisecond,
/// as jiff writes a timestamp given three fractional digits. jiff's
/// timestamps end in the year 9999; a later one (only a corrupt record has
/// one) is written as the instant a whole number of 400-year cycles earlier
/// with those years added back, the Gregorian calendar repeating every 400
/// years, so that every `Millis` has its date as before.
pub fn iso8601(ms: Millis) -> String {
    /// 400 Gregorian years, 146 097 days, in milliseconds.
    const CYCLE: Millis = 146_097 * 86_400_000;
    let last = jiff::Timestamp::MAX.as_second() as Millis * 1000;
    let cycles = ms.saturating_sub(last).div_ceil(CYCLE);
    let ts = jiff::Timestamp::from_millisecond((ms - cycles * CYCLE) as i64)
        .expect("within the range of jiff timestamps");
    let text = format!("{ts:.3}");
    if cycles == 0 {
        return text;
    }
    let year = jiff::tz::Offset::UTC.to_datetime(ts).year();
    let (_, rest) = text.split_at(text.find('-').unwrap_or(0));
    format!("{}{rest}", year as u64 + 400 * cycles)
}

/// `1h02m03s`, `4m05s`, `6.7s`
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, (s / 60) % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}.{}s", s, (ms % 1000) / 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (1, "1970-01-01T00:00:00.001Z"),
            (10, "1970-01-01T00:00:00.010Z"),
            (100, "1970-01-01T00:00:00.100Z"),
            (59_999, "1970-01-01T00:00:59.999Z"),
            // Leap days, and the instants around them.
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (951_868_799_999, "2000-02-29T23:59:59.999Z"),
            (951_868_800_000, "2000-03-01T00:00:00.000Z"),
            (1_709_210_096_789, "2024-02-29T12:34:56.789Z"),
            (1_709_164_799_999, "2024-02-28T23:59:59.999Z"),
            // 2100 is not a leap year.
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
            (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
            (1_795_555_382_123, "2026-11-24T21:23:02.123Z"),
            (1_795_555_382_000, "2026-11-24T21:23:02.000Z"),
            (1_795_555_382_050, "2026-11-24T21:23:02.050Z"),
            // jiff's last instant, and past it (400 years at a time).
            (253_402_207_200_000, "9999-12-30T22:00:00.000Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
            (253_402_300_800_000, "10000-01-01T00:00:00.000Z"),
            (u64::MAX, "584556019-04-03T14:25:51.615Z"),
        ] {
            assert_eq!(iso8601(ms), text, "{ms}");
            assert_eq!(iso8601(ms), reference(ms), "{ms}");
        }
    }

    /// The formatter jiff replaced: day counting by H. Hinnant's
    /// algorithm, proleptic Gregorian.
    fn reference(ms: Millis) -> String {
        let secs = ms / 1000;
        let (h, mi, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let z = (secs / 86_400) as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let mo = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(mo <= 2);
        format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
            ms % 1000
        )
    }

    proptest::proptest! {
        /// The same text as before, byte for byte, for any instant.
        #[test]
        fn writes_what_the_hand_written_formatter_wrote(
            ms in proptest::prop_oneof![
                0..4_102_444_800_000u64,
                0..300_000_000_000_000u64,
                proptest::num::u64::ANY,
            ]
        ) {
            proptest::prop_assert_eq!(iso8601(ms), reference(ms));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(6_700), "6.7s");
        assert_eq!(human_duration(245_000), "4m05s");
        assert_eq!(human_duration(3_723_000), "1h02m03s");
    }
}
