//! The durable MQTT spool: every message is appended here before the client sees it and
//! leaves only when the broker acknowledged it (PUBACK). On reconnect and on restart the
//! backlog is replayed in order.
//!
//! On disk: `spool.log` holds one JSON record a line (id, topic, retain, payload);
//! `spool.acked` holds the highest acknowledged id. Appends are synced at the end of each
//! publisher batch (one fsync per batch, not per message); the acked mark is written
//! lazily, so after a crash a few acknowledged messages may be sent again (at least once:
//! subscribers drop duplicates by `seq`). The log is rewritten without its acknowledged
//! head once that head is more than half of it.
//!
//! Bounded: when the pending bytes exceed the limit, the oldest messages are dropped,
//! superseded state messages (a newer one for the same retained topic is queued) first,
//! then the oldest of anything; drops are counted and reported in health.
//!
//! A full or failing disk (an SD card that filled up) does not lose messages either: the
//! queue lives in memory as well, so delivery goes on; the spool says once that it is
//! off disk (health: `spool_on_disk: false`), retries at most every
//! [`REWRITE_RETRY`], and when the disk takes writes again it rewrites the whole queue,
//! so a restart from then on replays everything again.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {error}")]
pub struct SpoolError {
    pub path: PathBuf,
    pub error: std::io::Error,
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: u64,
    pub topic: String,
    pub retain: bool,
    pub payload: String,
}

pub struct Spool {
    dir: PathBuf,
    log: File,
    pending: VecDeque<Entry>,
    next_id: u64,
    acked: u64,
    acked_written: u64,
    /// Records in the log file (acknowledged head included).
    log_records: usize,
    pending_bytes: usize,
    max_bytes: usize,
    dropped: u64,
    /// Damaged records found in the log at open (skipped, not replayed).
    damaged: u64,
    /// Set when a write failed: the log on disk misses messages (or ends in a torn
    /// record) and must be rewritten whole; `None` while the disk keeps up.
    off_disk_since: Option<Instant>,
    last_rewrite_attempt: Option<Instant>,
}

/// How often a spool that could not write tries again (a whole rewrite of the queue).
pub const REWRITE_RETRY: Duration = Duration::from_secs(10);

fn err(path: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |error| SpoolError {
        path: path.to_owned(),
        error,
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, loading what was not yet acknowledged.
    ///
    /// The log is read as bytes: a damaged line (invalid UTF-8, a half-written record, a
    /// record out of order) is skipped and counted, and the rest is replayed. A torn last
    /// line (a power cut mid-append) is cut off, so the next append starts a fresh line.
    pub fn open(dir: &Path, max_bytes: usize) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        remove_stale_temp_files(dir);
        let log_path = dir.join("spool.log");
        let acked_path = dir.join("spool.acked");
        let acked: u64 = std::fs::read_to_string(&acked_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mut pending = VecDeque::new();
        let mut log_records = 0;
        let mut max_id = acked;
        let mut damaged = 0;
        let scanned = scan(&log_path, line_cap(max_bytes), |line| match line {
            Scanned::Entry(e) => {
                log_records += 1;
                max_id = max_id.max(e.id);
                if e.id > acked {
                    pending.push_back(e);
                }
            }
            Scanned::Damaged => damaged += 1,
        });
        let scanned = match scanned {
            Ok(s) => s,
            Err(e) => {
                // Unreadable from some point on (a failing card): what was read is
                // replayed; the log is left as it is for the rewrite below.
                tracing::error!(error = %e, "cannot read the whole spool log");
                None
            }
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(err(&log_path))?;
        let pending_bytes = pending.iter().map(Entry::size).sum();
        let mut spool = Self {
            dir: dir.to_owned(),
            log,
            pending,
            next_id: max_id + 1,
            acked,
            acked_written: acked,
            log_records,
            pending_bytes,
            max_bytes,
            dropped: 0,
            damaged,
            off_disk_since: None,
            last_rewrite_attempt: None,
        };
        if damaged > 0 {
            tracing::warn!(
                damaged,
                path = %log_path.display(),
                "the spool log held damaged records (torn by a power cut or corrupted); they are skipped, the rest is replayed"
            );
        }
        if let Some(tail) = scanned.and_then(|s| s.tail) {
            if let Err(e) = spool.repair_tail(tail) {
                // Appending after a torn line would glue the next record onto it: go
                // off disk (memory only) until the whole queue can be rewritten.
                spool.went_off_disk(e);
            }
        }
        if !spool.pending.is_empty() {
            tracing::info!(
                pending = spool.pending.len(),
                "spooled messages from the last run will be replayed"
            );
        }
        if spool.on_disk() {
            if let Err(e) = spool.compact_if_worth_it() {
                // The log is whole as it is, only longer than it needs to be; acks retry.
                tracing::warn!(error = %e, "cannot compact the spool yet");
            }
        }
        Ok(spool)
    }

    /// Makes the log end with a complete line: a torn fragment is cut off (it was
    /// counted as damaged), a whole record that only lacks its newline gets one.
    fn repair_tail(&mut self, tail: Tail) -> Result<(), SpoolError> {
        let path = self.dir.join("spool.log");
        match tail {
            Tail::Torn { whole_end } => {
                self.log.set_len(whole_end).map_err(err(&path))?;
            }
            Tail::Unterminated => {
                self.log.write_all(b"\n").map_err(err(&path))?;
            }
        }
        self.log.sync_data().map_err(err(&path))
    }

    /// Queues a message and appends it to the log (not yet synced: see [`Spool::sync`]).
    /// The message is queued even when the disk refuses it; see the module docs.
    pub fn append(&mut self, topic: &str, retain: bool, payload: &str) -> u64 {
        let e = Entry {
            id: self.next_id,
            topic: topic.to_owned(),
            retain,
            payload: payload.to_owned(),
        };
        self.next_id += 1;
        // Off disk there is nothing to append to: the retry rewrites the whole queue.
        let line = self.on_disk().then(|| e.line());
        self.pending_bytes += e.size();
        let id = e.id;
        self.pending.push_back(e);
        self.enforce_bound();
        match line {
            None => self.retry_rewrite(),
            Some(line) => match self.log.write_all(line.as_bytes()) {
                Ok(()) => self.log_records += 1,
                Err(e) => self.went_off_disk(err(&self.dir.join("spool.log"))(e)),
            },
        }
        id
    }

    /// Makes appended messages durable. Off disk, this is when the rewrite is retried.
    pub fn sync(&mut self) {
        if self.off_disk_since.is_some() {
            self.retry_rewrite();
            return;
        }
        let path = self.dir.join("spool.log");
        if let Err(e) = self.log.sync_data() {
            self.went_off_disk(err(&path)(e));
        }
    }

    /// Whether every queued message is also in the log on disk.
    pub fn on_disk(&self) -> bool {
        self.off_disk_since.is_none()
    }

    fn went_off_disk(&mut self, e: SpoolError) {
        tracing::error!(error = %e, queued = self.pending.len(),
            "cannot write the spool (disk full?): messages are kept in memory and still delivered, but a restart now would lose them; retrying");
        let now = Instant::now();
        self.off_disk_since = Some(now);
        self.last_rewrite_attempt = Some(now);
    }

    fn retry_rewrite(&mut self) {
        if self
            .last_rewrite_attempt
            .is_some_and(|t| t.elapsed() < REWRITE_RETRY)
        {
            return;
        }
        self.last_rewrite_attempt = Some(Instant::now());
        // The mark too: acks went unrecorded while off disk.
        match self.rewrite_log().and_then(|()| self.write_acked()) {
            Ok(()) => {
                let since = self.off_disk_since.take().map(|t| t.elapsed());
                tracing::info!(
                    queued = self.pending.len(),
                    off_disk_s = since.map_or(0.0, |d| d.as_secs_f64()),
                    "the spool is on disk again"
                );
            }
            Err(e) => tracing::debug!(error = %e, "spool still cannot be written"),
        }
    }

    /// Pending entries from the oldest.
    pub fn pending(&self) -> impl Iterator<Item = &Entry> {
        self.pending.iter()
    }

    /// The first pending entry with an id of at least `from`.
    pub fn next_from(&self, from: u64) -> Option<&Entry> {
        // Ids are increasing: binary search on the deque.
        let i = self.pending.partition_point(|e| e.id < from);
        self.pending.get(i)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Messages dropped because the spool was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Damaged records found in the log at open: skipped, the rest was replayed.
    pub fn damaged(&self) -> u64 {
        self.damaged
    }

    /// The broker acknowledged `id` (PUBACKs come in publish order, so everything before
    /// it that is still pending was acknowledged as well or dropped).
    pub fn ack(&mut self, id: u64) {
        while self.pending.front().is_some_and(|e| e.id <= id) {
            let e = self.pending.pop_front().expect("checked");
            self.pending_bytes -= e.size();
        }
        self.acked = self.acked.max(id);
        // The mark is cheap to lose (duplicates, not loss): write it every 64 acks and
        // when the queue drains. Off disk, the rewrite (which drops the acknowledged
        // head) takes its place.
        if self.off_disk_since.is_some() {
            self.retry_rewrite();
        } else if self.pending.is_empty() || self.acked - self.acked_written >= 64 {
            if let Err(e) = self.write_acked().and_then(|()| self.compact_if_worth_it()) {
                self.went_off_disk(e);
            }
        }
    }

    fn write_acked(&mut self) -> Result<(), SpoolError> {
        let acked = self.acked.to_string();
        // Not synced: a mark lost to a power cut means duplicates, not loss.
        replace_file(&self.dir, "spool.acked", false, |f| {
            f.write_all(acked.as_bytes())
        })?;
        self.acked_written = self.acked;
        Ok(())
    }

    fn compact_if_worth_it(&mut self) -> Result<(), SpoolError> {
        if self.log_records < 256 || self.pending.len() * 2 > self.log_records {
            return Ok(());
        }
        self.rewrite_log()
    }

    /// Replaces the log with the pending queue (written aside, synced, renamed over).
    fn rewrite_log(&mut self) -> Result<(), SpoolError> {
        let pending = &self.pending;
        // The copy's handle, positioned at its end, is the log's from now on.
        self.log = replace_file(&self.dir, "spool.log", true, |f| {
            let mut w = std::io::BufWriter::new(f);
            for e in pending {
                w.write_all(e.line().as_bytes())?;
            }
            w.flush()
        })?;
        self.log_records = self.pending.len();
        Ok(())
    }

    fn enforce_bound(&mut self) {
        while self.pending_bytes > self.max_bytes && self.pending.len() > 1 {
            // A retained state superseded by a newer one for the same topic goes first.
            let superseded = (0..self.pending.len()).find(|&i| {
                let e = &self.pending[i];
                e.retain && self.pending.iter().skip(i + 1).any(|n| n.topic == e.topic)
            });
            let i = superseded.unwrap_or(0);
            let e = self.pending.remove(i).expect("index in range");
            self.pending_bytes -= e.size();
            self.dropped += 1;
            tracing::warn!(topic = %e.topic, id = e.id, superseded = superseded.is_some(), "spool full: message dropped");
        }
    }
}

impl Entry {
    /// The entry's record in the log: one JSON line.
    fn line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("entries serialise");
        line.push('\n');
        line
    }

    fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + 32
    }
}

/// The prefix and suffix of the spool's temp files: `spool.<random>.tmp`. The fixed names
/// of earlier versions (`spool.log.tmp`, `spool.acked.tmp`) match as well.
const TEMP_PREFIX: &str = "spool.";
const TEMP_SUFFIX: &str = ".tmp";

/// Replaces `dir/name` whole: written to a temp file beside it (an unguessable name
/// created with O_EXCL, so a symlink planted at a predictable name cannot redirect the
/// write), synced when `durable`, then renamed over it. On failure the temp file is
/// removed: a half-written copy would only take the space a full disk lacks. Returns the
/// new file's handle, positioned at its end.
fn replace_file(
    dir: &Path,
    name: &str,
    durable: bool,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<File, SpoolError> {
    let path = dir.join(name);
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(err(dir))?;
    #[cfg(test)]
    tests::fill_disk_if_asked(&mut tmp);
    let tmp_path = tmp.path().to_owned();
    write(tmp.as_file_mut())
        .and_then(|()| {
            if durable {
                tmp.as_file().sync_all()
            } else {
                Ok(())
            }
        })
        .map_err(err(&tmp_path))?;
    let file = tmp.persist(&path).map_err(|e| err(&path)(e.error))?;
    if durable {
        // The rename is durable only once the directory entry is on disk.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err(dir))?;
    }
    Ok(file)
}

/// Removes temp files a crash left behind (a kill during a compaction leaves a copy of up
/// to the whole queue). Only this spool writes in its directory (the daemon holds a lock
/// on its state), so any `spool.*.tmp` is stale. Symlinks are removed, never followed.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::debug!(file = %name, "removed a stale spool temp file"),
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "cannot remove a stale spool temp file")
                }
            }
        }
    }
}

/// The longest line the log is read with: a record is far smaller than the bound (a state,
/// an event, a health record), so a longer "line" is damage (a run of zeros a power cut
/// left, a missing newline) and is skipped without holding it in memory.
fn line_cap(max_bytes: usize) -> usize {
    max_bytes.max(1 << 20)
}

/// One line of the log, as read.
enum Scanned {
    Entry(Entry),
    /// Not a record: torn, invalid UTF-8 or JSON, too long, or out of order.
    Damaged,
}

/// How the log ends when its last line has no newline.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tail {
    /// A fragment (counted as damaged); the complete lines end at `whole_end`.
    Torn { whole_end: u64 },
    /// A whole record without its newline.
    Unterminated,
}

struct ScanEnd {
    tail: Option<Tail>,
}

/// Reads the log at `path` line by line, as bytes: invalid UTF-8 or a half-written record
/// costs its own line, never the rest of the replay. `None` when there is no log.
fn scan(
    path: &Path,
    cap: usize,
    mut each: impl FnMut(Scanned),
) -> std::io::Result<Option<ScanEnd>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut lines = LineReader {
        inner: BufReader::new(f),
        cap,
        offset: 0,
    };
    let mut buf = Vec::new();
    let mut last_id = 0;
    let mut whole_end = 0;
    let mut tail = None;
    while let Some(line) = lines.next(&mut buf)? {
        // An empty line is no record and no damage either.
        if line.complete && buf.is_empty() && !line.too_long {
            whole_end = line.end;
            continue;
        }
        let entry = (!line.too_long)
            .then(|| serde_json::from_slice::<Entry>(&buf).ok())
            .flatten()
            // Ids only rise in a log this spool wrote; a record out of order is a
            // line the file system duplicated or misplaced, and would break the
            // replay's order.
            .filter(|e| e.id > last_id);
        if line.complete {
            whole_end = line.end;
        } else {
            tail = Some(match entry {
                Some(_) => Tail::Unterminated,
                None => Tail::Torn { whole_end },
            });
        }
        match entry {
            Some(e) => {
                last_id = e.id;
                each(Scanned::Entry(e));
            }
            None => each(Scanned::Damaged),
        }
    }
    Ok(Some(ScanEnd { tail }))
}

/// Splits a byte stream into lines without holding more than `cap` bytes of one.
struct LineReader<R> {
    inner: R,
    cap: usize,
    offset: u64,
}

struct RawLine {
    /// Offset just past the line (its newline included).
    end: u64,
    /// Ended by a newline; otherwise it is the stream's last, unterminated line.
    complete: bool,
    /// Longer than the cap: its bytes were skipped, not kept.
    too_long: bool,
}

impl<R: BufRead> LineReader<R> {
    /// The next line's bytes (without the newline) into `buf`.
    fn next(&mut self, buf: &mut Vec<u8>) -> std::io::Result<Option<RawLine>> {
        buf.clear();
        let mut too_long = false;
        let mut any = false;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                return Ok(any.then_some(RawLine {
                    end: self.offset,
                    complete: false,
                    too_long,
                }));
            }
            any = true;
            let newline = avail.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(avail.len());
            if !too_long {
                if buf.len() + take > self.cap {
                    too_long = true;
                    buf.clear();
                } else {
                    buf.extend_from_slice(&avail[..take]);
                }
            }
            let used = take + usize::from(newline.is_some());
            self.inner.consume(used);
            self.offset += used as u64;
            if newline.is_some() {
                return Ok(Some(RawLine {
                    end: self.offset,
                    complete: true,
                    too_long,
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Set by a test to make the disk "full" for the spool's temp files (each test
        /// runs on its own thread).
        static DISK_FULL: Cell<bool> = const { Cell::new(false) };
        /// Temp files the spool tried to write while the disk was full.
        static FULL_WRITES: Cell<u32> = const { Cell::new(0) };
    }

    /// Called by [`replace_file`] for every temp file: on a "full" disk its writes go to
    /// /dev/full, which fails every write with ENOSPC as a full disk does.
    pub(super) fn fill_disk_if_asked(tmp: &mut tempfile::NamedTempFile) {
        if DISK_FULL.with(Cell::get) {
            FULL_WRITES.with(|n| n.set(n.get() + 1));
            *tmp.as_file_mut() = OpenOptions::new().write(true).open("/dev/full").unwrap();
        }
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn unacknowledged_messages_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5 {
            s.append("t/events", false, &format!("{{\"n\":{i}}}"));
        }
        s.sync();
        s.ack(2);
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        let left: Vec<_> = s.pending().map(|e| e.payload.clone()).collect();
        // The ack mark is written lazily: 1 and 2 may come again, 3 and 4 must.
        assert!(
            left.ends_with(&["{\"n\":3}".to_string(), "{\"n\":4}".to_string()]),
            "{left:?}"
        );
        let ids: Vec<_> = s.pending().map(|e| e.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_drained_spool_reopens_empty_and_ids_keep_rising() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let a = s.append("t", false, "x");
        s.ack(a);
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(s.is_empty());
        assert!(s.append("t", false, "y") > a);
    }

    #[test]
    fn a_full_disk_loses_no_message_and_the_log_is_rewritten_once_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let first = s.append("t", false, "before");
        s.sync();
        assert!(s.on_disk());
        // The disk fills up: /dev/full fails every write with ENOSPC, the log's appends
        // and the rewrite's copy alike.
        s.log = OpenOptions::new().append(true).open("/dev/full").unwrap();
        DISK_FULL.with(|f| f.set(true));
        s.append("t", false, "during");
        s.sync();
        assert!(!s.on_disk());
        s.append("t", false, "still full");
        s.sync();
        // Delivery goes on from memory, in order; no retry within REWRITE_RETRY.
        let queued: Vec<&str> = s.pending().map(|e| e.payload.as_str()).collect();
        assert_eq!(queued, ["before", "during", "still full"]);
        assert_eq!(FULL_WRITES.with(Cell::get), 0, "retried too soon");

        // A retry while the disk is still full fails and cleans up its half copy.
        s.last_rewrite_attempt = Some(Instant::now() - REWRITE_RETRY);
        s.sync();
        assert!(!s.on_disk());
        assert_eq!(FULL_WRITES.with(Cell::get), 1);
        assert_eq!(temp_files(dir.path()), Vec::<String>::new());
        s.ack(first);

        // Room again: the next retry rewrites the queue, and appends go to disk again.
        DISK_FULL.with(|f| f.set(false));
        s.last_rewrite_attempt = Some(Instant::now() - REWRITE_RETRY);
        s.sync();
        assert!(s.on_disk());
        s.append("t", false, "after");
        s.sync();
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        let replayed: Vec<&str> = s.pending().map(|e| e.payload.as_str()).collect();
        assert_eq!(replayed, ["during", "still full", "after"]);
    }

    // Issue #19: the temp files had fixed names (spool.log.tmp, spool.acked.tmp) and were
    // opened by path, so a symlink planted there redirected the write to its target.
    #[test]
    fn a_symlink_planted_at_a_temp_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let plant = || {
            for name in ["spool.log.tmp", "spool.acked.tmp"] {
                let link = dir.path().join(name);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&victim, &link).unwrap();
            }
        };
        // Planted before a start: removed there, not followed.
        plant();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(temp_files(dir.path()), Vec::<String>::new());
        // Planted while it runs: the acked mark and a compaction write elsewhere.
        plant();
        let mut last = 0;
        for i in 0..300 {
            last = s.append("t", false, &format!("m{i}"));
        }
        s.ack(last);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("spool.acked")).unwrap(),
            last.to_string()
        );
        assert!(log_bytes(dir.path()).is_empty(), "compacted");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        for name in ["spool.log.tmp", "spool.acked.tmp"] {
            assert!(dir.path().join(name).is_symlink());
        }
        assert!(!std::fs::symlink_metadata(dir.path().join("spool.log"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn temp_files_a_crash_left_behind_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append("t", false, "kept");
        drop(s);
        std::fs::write(dir.path().join("spool.a1B2c3.tmp"), "half a copy").unwrap();
        std::fs::write(dir.path().join("unrelated.tmp"), "not ours").unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(payloads(&s), ["kept"]);
        assert_eq!(temp_files(dir.path()), ["unrelated.tmp"]);
    }

    fn log_bytes(dir: &Path) -> Vec<u8> {
        std::fs::read(dir.join("spool.log")).unwrap()
    }

    fn payloads(s: &Spool) -> Vec<&str> {
        s.pending().map(|e| e.payload.as_str()).collect()
    }

    // Issue #19: a torn last line got the next record glued onto it, and that record (a
    // retained state) was lost at the next restart.
    #[test]
    fn a_torn_tail_is_cut_at_open_and_the_next_record_starts_clean() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append("d/events", false, "whole");
        s.append("d/zones/a/state", true, "torn");
        s.sync();
        drop(s);
        // A power cut in the middle of the second record.
        let path = dir.path().join("spool.log");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 20).unwrap();
        drop(f);

        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(payloads(&s), ["whole"]);
        assert_eq!(s.damaged(), 1, "the torn fragment is counted");
        assert!(log_bytes(dir.path()).ends_with(b"\n"));
        s.append("d/zones/a/state", true, "after the cut");
        s.sync();
        drop(s);

        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(payloads(&s), ["whole", "after the cut"]);
        assert!(s.pending().last().unwrap().retain);
        assert_eq!(
            s.damaged(),
            0,
            "the fragment was cut, not left to count again"
        );
    }

    #[test]
    fn a_last_record_that_only_lacks_its_newline_is_kept_and_the_next_starts_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append("t", false, "one");
        s.append("t", false, "two");
        drop(s);
        let path = dir.path().join("spool.log");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 1).unwrap();
        drop(f);

        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((payloads(&s), s.damaged()), (vec!["one", "two"], 0));
        s.append("t", false, "three");
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            (payloads(&s), s.damaged()),
            (vec!["one", "two", "three"], 0)
        );
    }

    // Issue #19: one line of invalid UTF-8 silently ended the replay (10 of 180 replayed).
    #[test]
    fn invalid_bytes_in_the_middle_of_the_log_cost_their_record_and_the_rest_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..180 {
            s.append("d/events", false, &format!("event-{i:03}"));
        }
        s.sync();
        drop(s);
        // Bad bytes over the payload of the 11th record, its length unchanged.
        let path = dir.path().join("spool.log");
        let mut bytes = log_bytes(dir.path());
        let at = bytes.windows(9).position(|w| w == b"event-010").unwrap();
        bytes[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
        std::fs::write(&path, &bytes).unwrap();

        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        let expected: Vec<String> = (0..180)
            .filter(|&i| i != 10)
            .map(|i| format!("event-{i:03}"))
            .collect();
        assert_eq!(payloads(&s), expected);
        assert_eq!(s.damaged(), 1);
    }

    #[test]
    fn a_long_run_of_zeros_with_no_newline_is_one_damaged_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 10).unwrap();
        s.append("t", false, "kept");
        drop(s);
        // A file system that extended the file but never wrote its data.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("spool.log"))
            .unwrap();
        f.write_all(&vec![0u8; 3 << 20]).unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 1 << 10).unwrap();
        assert_eq!((payloads(&s), s.damaged()), (vec!["kept"], 1));
        s.append("t", false, "next");
        drop(s);
        let s = Spool::open(dir.path(), 1 << 10).unwrap();
        assert_eq!(payloads(&s), ["kept", "next"]);
    }

    #[test]
    fn when_full_superseded_states_go_first_then_the_oldest_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 400).unwrap();
        s.append("d/zones/a/state", true, "state-1");
        s.append("d/events", false, "event-1");
        s.append("d/zones/a/state", true, "state-2");
        for i in 2..8 {
            s.append("d/events", false, &format!("event-{i}"));
        }
        let left: Vec<_> = s.pending().map(|e| e.payload.clone()).collect();
        assert!(!left.contains(&"state-1".to_string()), "{left:?}");
        assert!(
            left.contains(&"state-2".to_string()) || s.dropped() > 1,
            "{left:?}"
        );
        assert!(left.last().unwrap() == "event-7");
        assert!(s.dropped() >= 1);
    }

    #[test]
    fn the_log_is_compacted_once_its_acknowledged_head_dominates() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut last = 0;
        for i in 0..600 {
            last = s.append("t", false, &format!("m{i}"));
        }
        s.ack(last - 10);
        let lines = std::fs::read_to_string(dir.path().join("spool.log"))
            .unwrap()
            .lines()
            .count();
        assert!(lines < 100, "{lines} lines after compaction");
        assert_eq!(s.len(), 10);
    }
}
