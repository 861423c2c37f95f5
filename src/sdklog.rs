//! What latd reads of the SDK's log: the file the SDK itself created, its
//! success line and its first error, the way StarlingX's build-image reads
//! them (a line that *contains* the marker).
//!
//! The real SDK logs to `log/log.appsdk_<unix seconds>` and makes
//! `log/log.appsdk` a relative symlink to it; every line reads
//! `appsdk - LEVEL: message`. The workspace belongs to the client, so the
//! name `log.appsdk` proves nothing: latd holds the file open from the
//! moment it appears, and takes it only if it is new since the build
//! started and owned by the user the SDK runs as (latd's own), so a file a
//! client puts there later cannot forge a result.

use crate::fsutil;
use crate::machine::LogNews;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The name the SDK's log has (a symlink, with the real SDK).
pub const LOG_NAME: &str = "log.appsdk";
/// A line containing this means the image is built (build-image's test).
pub const SUCCESS_MARKER: &str = "DEBUG: Deploy ovmf.qcow2";
/// A line containing this reports a failure (build-image's test).
pub const FAILURE_MARKER: &str = "ERROR: ";
/// How many old `log.appsdk_<secs>` files a workdir keeps.
pub const KEEP_LOGS: usize = 10;
/// Longest line kept whole; a longer one is looked at in pieces.
const MAX_LINE: usize = 64 * 1024;
/// What a piece of a long line shares with the next: more than a marker.
const OVERLAP: usize = 64;
/// Longest error line quoted in a reason.
const MAX_QUOTE: usize = 300;

/// Finds the markers in a stream of log bytes, line by line.
#[derive(Debug, Default)]
pub struct Scanner {
    partial: Vec<u8>,
}

impl Scanner {
    /// Looks at `bytes`, the next part of the log, and adds what it finds
    /// to `news`.
    pub fn feed(&mut self, bytes: &[u8], news: &mut LogNews) {
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..nl]);
            self.line(news);
            rest = &rest[nl + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE {
            // Looked at in pieces; the end of this one starts the next, so
            // a marker across the cut is still seen whole.
            let keep = self.partial.len().saturating_sub(OVERLAP);
            let tail = self.partial[keep..].to_vec();
            self.line(news);
            self.partial = tail;
        }
    }

    /// The last line, which has no newline yet.
    pub fn finish(&mut self, news: &mut LogNews) {
        if !self.partial.is_empty() {
            self.line(news);
        }
    }

    fn line(&mut self, news: &mut LogNews) {
        let line = String::from_utf8_lossy(&self.partial);
        if line.contains(SUCCESS_MARKER) {
            news.success = true;
        }
        if news.error.is_none() && line.contains(FAILURE_MARKER) {
            let quote: String = line.trim().chars().take(MAX_QUOTE).collect();
            news.error = Some(quote);
        }
        self.partial.clear();
    }
}

/// Watches a running build's log directory for the SDK's log and reads it
/// as it grows.
#[derive(Debug)]
pub struct LogWatch {
    dir: File,
    dir_path: PathBuf,
    /// Files that were in the log directory when the build started, and
    /// their sizes then: an SDK started within the same second as the last
    /// one appends to the same `log.appsdk_<secs>`, and only what it adds
    /// is this build's.
    before: HashMap<(u64, u64), u64>,
    owner: u32,
    file: Option<File>,
    scanner: Scanner,
    /// What was reported so far (success and error are reported once).
    seen: LogNews,
    refused: Option<(u64, u64)>,
    held: Option<(u64, u64)>,
    /// The file held was there before the build (the SDK may still make a
    /// new one: looked for again until it does).
    held_old: bool,
}

impl LogWatch {
    /// Starts watching `dir` (the build's `log/`, at `dir_path`), before the
    /// SDK starts.
    pub fn new(dir: File, dir_path: PathBuf) -> LogWatch {
        let before = fsutil::dir_entries(&dir)
            .into_iter()
            .filter_map(|name| fsutil::lstat_at(&dir, &name).ok())
            .map(|md| ((md.dev(), md.ino()), md.len()))
            .collect();
        LogWatch {
            dir,
            dir_path,
            before,
            owner: fsutil::euid(),
            file: None,
            scanner: Scanner::default(),
            seen: LogNews::default(),
            refused: None,
            held: None,
            held_old: false,
        }
    }

    /// What is new since the last call: the log's appearance, the success
    /// line, the first error. Reads at most `budget` bytes (the loop must
    /// not stall on a huge log); `None` for everything there is.
    pub fn poll(&mut self, budget: Option<u64>) -> LogNews {
        let mut news = LogNews::default();
        if self.file.is_none() || self.held_old {
            self.find(&mut news);
        }
        let Some(f) = self.file.as_mut() else {
            return news;
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = budget.unwrap_or(u64::MAX);
        let mut found = LogNews::default();
        while left > 0 {
            let want = buf.len().min(left.min(usize::MAX as u64) as usize);
            match f.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.scanner.feed(&buf[..n], &mut found);
                    left -= n as u64;
                }
            }
        }
        if budget.is_none() {
            self.scanner.finish(&mut found);
        }
        if found.success && !self.seen.success {
            self.seen.success = true;
            news.success = true;
        }
        if self.seen.error.is_none() && found.error.is_some() {
            self.seen.error = found.error.clone();
            news.error = found.error;
        }
        news
    }

    fn find(&mut self, news: &mut LogNews) {
        let Ok((f, name)) = fsutil::open_log_at(&self.dir, LOG_NAME) else {
            return;
        };
        let Ok(md) = f.metadata() else { return };
        let id = (md.dev(), md.ino());
        if self.held_old && self.held == Some(id) {
            return;
        }
        if md.uid() != self.owner {
            if self.refused != Some(id) {
                self.refused = Some(id);
                log::warn!(
                    "{} is not this build's log (it belongs to uid {}, not the SDK's); it is not read",
                    self.dir_path.join(LOG_NAME).display(),
                    md.uid()
                );
            }
            return;
        }
        // A file that was there before: only what is appended from now on.
        if let Some(&size) = self.before.get(&id) {
            use std::io::{Seek, SeekFrom};
            let mut f = &f;
            if f.seek(SeekFrom::Start(size)).is_err() {
                return;
            }
        }
        if self.file.is_some() {
            // Leaving an old file for the SDK's new one: start afresh.
            self.scanner = Scanner::default();
        }
        self.held_old = self.before.contains_key(&id);
        self.held = Some(id);
        let path = self.dir_path.join(&name);
        log::info!("the SDK logs to {}", path.display());
        news.file = Some(path.clone());
        self.seen.file = Some(path);
        self.file = Some(f);
    }
}

/// Reads a whole log for its markers: what a build that ran while latd was
/// down left. `log` is `<workdir>/log/log.appsdk` or the file it pointed to,
/// below the workspace `root` (the paths come from the state file, which
/// lies in the channel: a path elsewhere, or through a symlink, is refused).
pub fn scan_path(root: &Path, log: &Path) -> io::Result<LogNews> {
    let (Some(dir), Some(name)) = (log.parent(), log.file_name().and_then(|n| n.to_str())) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    let (mut f, opened) = fsutil::open_log_at(&fsutil::open_dir_beneath(root, dir)?, name)?;
    let opened = dir.join(opened);
    if f.metadata()?.uid() != fsutil::euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not written by the SDK (another owner)",
        ));
    }
    let mut news = LogNews {
        file: Some(opened),
        ..LogNews::default()
    };
    let mut scanner = Scanner::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => scanner.feed(&buf[..n], &mut news),
        }
    }
    scanner.finish(&mut news);
    Ok(news)
}

/// Appends `line` to the SDK's log `file` (below the workspace `root`,
/// reached without following a symlink but the one beside `log.appsdk`),
/// if it is the SDK's (owned by its user).
pub fn append(root: &Path, file: &Path, line: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (Some(dir), Some(name)) = (file.parent(), file.file_name().and_then(|n| n.to_str())) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    let dir = fsutil::open_dir_beneath(root, dir)?;
    let (f, _) = fsutil::open_log_at(&dir, name)?;
    if f.metadata()?.uid() != fsutil::euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not written by the SDK (another owner)",
        ));
    }
    // Reopened for appending through the descriptor: the very file checked.
    let mut w = std::fs::OpenOptions::new()
        .append(true)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    w.write_all(format!("{line}\n").as_bytes())
}

/// Removes the oldest `log.appsdk_<secs>` files of a log directory beyond
/// `keep` (the real SDK leaves one per build).
pub fn prune(dir: &File, keep: usize) {
    let mut logs: Vec<(u64, String)> = fsutil::dir_entries(dir)
        .into_iter()
        .filter_map(|name| {
            let secs = name.strip_prefix("log.appsdk_")?;
            secs.parse::<u64>().ok().map(|s| (s, name.clone()))
        })
        .collect();
    if logs.len() <= keep {
        return;
    }
    logs.sort();
    for (_, name) in &logs[..logs.len() - keep] {
        if let Err(e) = fsutil::unlink_at(dir, name) {
            log::warn!("cannot remove the old log {name}: {e}");
        }
    }
}

/// How long (ms) to wait, at `now_ms`, before starting an SDK in a log
/// directory holding the files `names`, so that it does not open (and
/// append to) the `log.appsdk_<secs>` of an earlier build: until the
/// newest one's second is past, and 20 ms more. At most 2 s: a name from
/// the future is a client's, or a clock that went back.
pub fn pause_before_sdk<'a>(names: impl Iterator<Item = &'a str>, now_ms: u64) -> u64 {
    let newest = names
        .filter_map(|n| n.strip_prefix("log.appsdk_")?.parse::<u64>().ok())
        .max();
    match newest {
        Some(secs) if secs.saturating_add(1).saturating_mul(1000) > now_ms => {
            let until = secs
                .saturating_add(1)
                .saturating_mul(1000)
                .saturating_add(20);
            until.saturating_sub(now_ms).min(2000)
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_waits_out_the_second_of_the_newest_log() {
        let pause = |names: &[&str], now| pause_before_sdk(names.iter().copied(), now);
        assert_eq!(pause(&[], 5_000_500), 0, "no log yet");
        assert_eq!(
            pause(&["log.appsdk_4999", "console.log"], 5_000_500),
            0,
            "an older second"
        );
        assert_eq!(
            pause(&["log.appsdk_5000"], 5_000_500),
            520,
            "to the next second, and 20 ms"
        );
        assert_eq!(pause(&["log.appsdk_5000"], 5_000_999), 21);
        assert_eq!(
            pause(&["log.appsdk_5000"], 5_001_000),
            0,
            "that second is past"
        );
        assert_eq!(
            pause(
                &["log.appsdk_4000", "log.appsdk_5000", "log.appsdk_x"],
                5_000_000
            ),
            1_020,
            "the newest counts; junk names do not"
        );
        assert_eq!(
            pause(&["log.appsdk_9999999"], 5_000_000),
            2_000,
            "at most 2 s"
        );
        assert_eq!(
            pause(&["log.appsdk_18446744073709551615"], 5_000_000),
            2_000
        );
    }

    fn scan(chunks: &[&str]) -> LogNews {
        let mut s = Scanner::default();
        let mut n = LogNews::default();
        for c in chunks {
            s.feed(c.as_bytes(), &mut n);
        }
        s.finish(&mut n);
        n
    }

    #[test]
    fn markers_are_found_inside_prefixed_lines_and_across_chunks() {
        let n = scan(&["appsdk - INFO: x\nappsdk - DEBUG: Dep", "loy ovmf.qcow2\n"]);
        assert!(n.success);
        assert_eq!(n.error, None);
        let n = scan(&["appsdk - ERROR: do_rootfs failed\nappsdk - ERROR: later\n"]);
        assert!(!n.success);
        assert_eq!(n.error.as_deref(), Some("appsdk - ERROR: do_rootfs failed"));
        // A line too long to keep whole is looked at in pieces: a marker
        // across the cut between two pieces is still found.
        for cut in [MAX_LINE - 10, MAX_LINE, MAX_LINE + 3] {
            let mut long = "x".repeat(cut);
            long.push_str("appsdk - DEBUG: Deploy ovmf.qcow2");
            long.push_str(&"y".repeat(2 * MAX_LINE));
            let split = cut + "appsdk - DEBUG: De".len();
            let pieces: Vec<&str> = vec![&long[..split], &long[split..], "\n"];
            assert!(scan(&pieces).success, "marker at {cut}");
            assert!(scan(&[long.as_str(), "\n"]).success, "marker at {cut}");
        }
        // A marker split over two lines is not a marker.
        assert!(!scan(&["DEBUG: Deploy\n ovmf.qcow2\n"]).success);
        // The last line counts without its newline.
        assert!(scan(&["DEBUG: Deploy ovmf.qcow2"]).success);
        assert!(scan(&["ERROR:no space\n"]).error.is_none());
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("latd-sdklog-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn watch(d: &Path) -> LogWatch {
        LogWatch::new(fsutil::open_dir_nofollow(d).unwrap(), d.to_path_buf())
    }

    #[test]
    fn watch_follows_the_sdks_symlink_and_reads_only_this_builds_lines() {
        use std::os::unix::fs::symlink;
        let d = tempdir("watch");
        // An earlier build's log, with its success line, and the symlink.
        std::fs::write(
            d.join("log.appsdk_100"),
            "appsdk - DEBUG: Deploy ovmf.qcow2\n",
        )
        .unwrap();
        symlink("log.appsdk_100", d.join(LOG_NAME)).unwrap();
        let mut w = watch(&d);
        // The old file is not this build's news.
        let n = w.poll(None);
        assert!(!n.success, "{n:?}");
        // Within the same second the SDK appends to the same file.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join("log.appsdk_100"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"appsdk - ERROR: new failure\n").unwrap();
        assert_eq!(
            w.poll(None).error.as_deref(),
            Some("appsdk - ERROR: new failure")
        );
        // Then a new file: the watch moves to it.
        std::fs::write(
            d.join("log.appsdk_200"),
            "appsdk - DEBUG: Deploy ovmf.qcow2\n",
        )
        .unwrap();
        std::fs::remove_file(d.join(LOG_NAME)).unwrap();
        symlink("log.appsdk_200", d.join(LOG_NAME)).unwrap();
        let n = w.poll(None);
        assert!(n.success);
        assert_eq!(n.file, Some(d.join("log.appsdk_200")));
        // Once on a new file, a later swap of the name is not followed.
        std::fs::remove_file(d.join(LOG_NAME)).unwrap();
        symlink("log.appsdk_100", d.join(LOG_NAME)).unwrap();
        assert_eq!(w.poll(None), LogNews::default());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_out_of_the_log_dir_is_refused() {
        use std::os::unix::fs::symlink;
        let d = tempdir("outside");
        std::fs::create_dir(d.join("log")).unwrap();
        std::fs::write(d.join("secret"), "appsdk - DEBUG: Deploy ovmf.qcow2\n").unwrap();
        symlink("../secret", d.join("log").join(LOG_NAME)).unwrap();
        let mut w = watch(&d.join("log"));
        assert_eq!(w.poll(None), LogNews::default());
        let e = fsutil::open_log(&d.join("log").join(LOG_NAME)).unwrap_err();
        assert!(e.to_string().contains("not to a file beside it"), "{e}");
        assert!(scan_path(&d, &d.join("log").join(LOG_NAME)).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_recovered_log_is_read_only_below_the_workspace() {
        use std::os::unix::fs::symlink;
        let d = tempdir("recover");
        let ws = d.join("ws");
        std::fs::create_dir_all(ws.join("log")).unwrap();
        std::fs::create_dir_all(d.join("elsewhere")).unwrap();
        for dir in [ws.join("log"), d.join("elsewhere")] {
            std::fs::write(dir.join(LOG_NAME), "appsdk - ERROR: secret line\n").unwrap();
        }
        symlink(d.join("elsewhere"), ws.join("linked")).unwrap();
        let n = scan_path(&ws, &ws.join("log").join(LOG_NAME)).unwrap();
        assert_eq!(n.error.as_deref(), Some("appsdk - ERROR: secret line"));
        assert_eq!(n.file, Some(ws.join("log").join(LOG_NAME)));
        assert!(scan_path(&ws, &d.join("elsewhere").join(LOG_NAME)).is_err());
        assert!(scan_path(&ws, &ws.join("linked").join(LOG_NAME)).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_log_of_another_owner_is_not_read() {
        if fsutil::euid() != 0 {
            eprintln!("SKIPPED a_log_of_another_owner_is_not_read: needs root (to chown)");
            return;
        }
        let d = tempdir("owner");
        let mut w = watch(&d);
        std::fs::write(d.join(LOG_NAME), "appsdk - DEBUG: Deploy ovmf.qcow2\n").unwrap();
        std::os::unix::fs::chown(d.join(LOG_NAME), Some(65534), Some(65534)).unwrap();
        assert_eq!(
            w.poll(None),
            LogNews::default(),
            "a client's file forged a result"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn old_logs_are_pruned_to_the_newest() {
        let d = tempdir("prune");
        for s in [5, 30, 100, 7, 2000] {
            std::fs::write(d.join(format!("log.appsdk_{s}")), "").unwrap();
        }
        std::fs::write(d.join("console.log"), "").unwrap();
        prune(&fsutil::open_dir_nofollow(&d).unwrap(), 3);
        let mut left = fsutil::dir_entries(&fsutil::open_dir_nofollow(&d).unwrap());
        left.sort();
        assert_eq!(
            left,
            [
                "console.log",
                "log.appsdk_100",
                "log.appsdk_2000",
                "log.appsdk_30"
            ]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
