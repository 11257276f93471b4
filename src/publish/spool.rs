//! The durable MQTT spool: every message is appended here before the client sees it and
//! leaves only when the broker acknowledged it (PUBACK). On reconnect and on restart the
//! backlog is replayed in order.
//!
//! On disk: `spool.log` holds one JSON record a line: messages (id, topic, retain,
//! payload), drop records (`{"drop":id}`, a message dropped to keep the bound) and, as
//! the first line of a compacted log, the totals of drops and damaged records it no
//! longer holds a trace of; `spool.acked` holds the highest acknowledged id. Appends are
//! synced at the end of each publisher batch (one fsync per batch, not per message): a
//! killed process loses no append that returned (the kernel has it), a power cut none
//! before the last sync. The acked mark is written lazily, so after a crash a few
//! acknowledged messages may be sent again (at least once: subscribers drop duplicates by
//! `seq`).
//!
//! The log is read back as bytes, a line at a time: a damaged line (torn, invalid UTF-8
//! or JSON) is skipped and counted (health: `spool_damaged`), the rest replayed; a torn
//! last line is cut off at open so the next append starts on a fresh line.
//!
//! Bounded, in memory and on disk: when the pending lines exceed `max_bytes`, messages
//! are dropped: first states that a newer state of the same topic supersedes, then the
//! oldest other messages (events, health). A topic's newest state is never dropped, so the
//! broker's retained state of every zone survives any outage. Each drop is counted once
//! (health: `dropped`, kept across restarts). The log is compacted (rewritten with only
//! the queue, through a temp file renamed over it) when its acknowledged head is more
//! than half of it, or when what it holds beyond the queue passes the slack (a quarter of
//! the bound, at least 4 KiB), so it stays within the bound plus the slack even while the
//! broker is down; a compaction needs room for the new copy beside the old one.
//!
//! A full or failing disk (an SD card that filled up) does not lose messages either: the
//! queue lives in memory as well, so delivery goes on; the spool says once that it is
//! off disk (health: `spool_on_disk: false`), retries at most every
//! [`REWRITE_RETRY`], and when the disk takes writes again it rewrites the whole queue,
//! so a restart from then on replays everything again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
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

/// A queued entry and the length of its line in the log (what the bound counts).
#[derive(Debug)]
struct Queued {
    entry: Entry,
    bytes: usize,
}

/// The log's record that message `drop` was dropped to keep the bound: `{"drop":17}`.
/// Replayed, it keeps the message dropped and counted once.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Dropped {
    drop: u64,
}

/// Drops and damaged records the log no longer holds a trace of, written as the first line
/// of a compacted log: `{"dropped":3,"damaged":1}`. The counts so survive restarts, and
/// each drop or damaged record is counted once: either here, or by its trace in the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Totals {
    dropped: u64,
    damaged: u64,
}

/// A line of the log. Earlier versions wrote only entries (and skip the other records as
/// damaged: a downgrade delivers what was dropped rather than losing anything).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Record {
    Entry(Entry),
    Dropped(Dropped),
    Totals(Totals),
}

pub struct Spool {
    dir: PathBuf,
    log: File,
    pending: VecDeque<Queued>,
    /// Pending retained entries per topic.
    retained: HashMap<String, usize>,
    /// Pending retained entries that a newer one for their topic supersedes.
    superseded: usize,
    next_id: u64,
    acked: u64,
    acked_written: u64,
    /// Entries in the log file (acknowledged head included).
    log_records: usize,
    /// The log file's length (while on disk).
    log_bytes: usize,
    /// Lines of the pending entries.
    pending_bytes: usize,
    max_bytes: usize,
    /// Since the spool was created (persisted in the log).
    totals: Totals,
    /// Messages dropped since the last write to the log, whose drop records are due.
    unwritten_drops: Vec<u64>,
    /// Set when a write failed: the log on disk misses messages (or ends in a torn
    /// record) and must be rewritten whole; `None` while the disk keeps up.
    off_disk_since: Option<Instant>,
    last_rewrite_attempt: Option<Instant>,
}

/// How often a spool that could not write tries again (a whole rewrite of the queue).
pub const REWRITE_RETRY: Duration = Duration::from_secs(10);

/// How far the log may grow past its live records (acknowledged, dropped, drop records)
/// before it is compacted: a quarter of the bound, so a full spool rewrites its bound
/// once per quarter of it appended; at least 4 KiB, so a small bound is not rewritten at
/// every message.
fn slack(max_bytes: usize) -> usize {
    (max_bytes / 4).max(4 << 10)
}

fn err(path: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |error| SpoolError {
        path: path.to_owned(),
        error,
    }
}

/// What the first pass over the log learns, for the second to apply.
#[derive(Default)]
struct Survey {
    /// Ids with a drop record.
    dropped: HashSet<u64>,
    /// The id of the newest retained entry of each topic.
    newest_state: HashMap<String, u64>,
    totals: Totals,
    damaged: u64,
    max_id: u64,
    log_records: usize,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, loading what was not yet acknowledged.
    ///
    /// The log is read as bytes: a damaged line (invalid UTF-8, a half-written record, a
    /// record out of order) is skipped and counted, and the rest is replayed. A torn last
    /// line (a power cut mid-append) is cut off, so the next append starts a fresh line.
    /// The bound is enforced here too, and a log that needs it is compacted.
    // Recovery reads as one sequence (temp files, acked mark, log replay, torn tail,
    // bound): the kill -9 and power-cut tests hold it to that order.
    #[allow(clippy::too_many_lines)]
    pub fn open(dir: &Path, max_bytes: usize) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        remove_stale_temp_files(dir);
        let log_path = dir.join("spool.log");
        let acked_path = dir.join("spool.acked");
        let acked: u64 = std::fs::read_to_string(&acked_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let cap = line_cap(max_bytes);

        // Two passes: a drop record follows its entry, and the bound is enforced while
        // loading (a log an earlier version let grow must not all sit in memory), so the
        // drops are known before the entries are loaded.
        let mut survey = Survey::default();
        let scanned = scan(&log_path, cap, u64::MAX, |line| match line {
            Scanned::Entry(e, _) => {
                survey.log_records += 1;
                survey.max_id = survey.max_id.max(e.id);
                if e.retain {
                    survey.newest_state.insert(e.topic, e.id);
                }
            }
            Scanned::Dropped(id) => {
                survey.max_id = survey.max_id.max(id);
                survey.dropped.insert(id);
            }
            // Only a compaction writes totals, as the first line of the new log.
            Scanned::Totals(t) => survey.totals = t,
            Scanned::Damaged => survey.damaged += 1,
        })
        .map_err(err(&log_path))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(err(&log_path))?;
        let mut spool = Self {
            dir: dir.to_owned(),
            log,
            pending: VecDeque::new(),
            retained: HashMap::new(),
            superseded: 0,
            next_id: survey.max_id.max(acked) + 1,
            acked,
            acked_written: acked,
            log_records: survey.log_records,
            log_bytes: scanned.end as usize,
            pending_bytes: 0,
            max_bytes,
            totals: Totals {
                // Each drop record stands for one message dropped since the last
                // compaction; the totals line for those before it.
                dropped: survey.totals.dropped + survey.dropped.len() as u64,
                damaged: survey.totals.damaged + survey.damaged,
            },
            unwritten_drops: Vec::new(),
            off_disk_since: None,
            last_rewrite_attempt: None,
        };
        let loaded = scan(&log_path, cap, scanned.end, |line| {
            let Scanned::Entry(e, bytes) = line else {
                return;
            };
            if e.id <= acked {
                return;
            }
            if survey.dropped.contains(&e.id) {
                // A topic's newest state is never dropped (see `victim`); a drop record
                // for it means the newer state it was dropped for did not reach the disk
                // (torn or damaged). Kept, so the broker's retained state stays whole.
                if !(e.retain && survey.newest_state.get(&e.topic) == Some(&e.id)) {
                    return;
                }
                spool.totals.dropped -= 1;
            }
            spool.push(Queued { entry: e, bytes });
            if spool.pending_bytes > max_bytes + slack(max_bytes) {
                spool.enforce_bound(false);
            }
        });
        // The second pass reads what the first read; failing where the first did not,
        // it would leave messages out of the queue that a rewrite would then lose.
        if let Some(e) = loaded.map_or_else(Some, |l| l.error) {
            return Err(err(&log_path)(e));
        }
        let read_error = scanned.error;
        if let Some(e) = &read_error {
            // Unreadable from some point on (a failing card): what was read is replayed,
            // and the log is rewritten without the rest.
            tracing::error!(error = %e, path = %log_path.display(), "cannot read the whole spool log");
        }
        spool.enforce_bound(false);
        if survey.damaged > 0 {
            tracing::warn!(
                damaged = survey.damaged,
                path = %log_path.display(),
                "the spool log held damaged records (torn by a power cut or corrupted); they are skipped, the rest is replayed"
            );
        }
        if !spool.unwritten_drops.is_empty() {
            tracing::warn!(
                dropped = spool.unwritten_drops.len(),
                max_bytes,
                "the spool log was over its bound: its oldest messages are dropped"
            );
        }
        if !spool.pending.is_empty() {
            tracing::info!(
                pending = spool.pending.len(),
                "spooled messages from the last run will be replayed"
            );
        }
        let must_rewrite = read_error.is_some()
            || scanned.tail.is_some()
            || survey.damaged > 0
            || !spool.unwritten_drops.is_empty();
        if must_rewrite || spool.compaction_due() {
            if let Err(e) = spool.rewrite_log() {
                tracing::warn!(error = %e, "cannot compact the spool yet");
                // Appending after a torn line would glue the next record onto it, after
                // an unreadable stretch would hide it: the log must at least end clean
                // and record the drops, or the spool goes off disk (memory only) until it
                // can rewrite the whole queue.
                let fixed = match read_error {
                    Some(e) => Err(err(&log_path)(e)),
                    None => spool
                        .repair_tail(scanned.tail)
                        .and_then(|()| spool.write_drops()),
                };
                if let Err(e) = fixed {
                    spool.went_off_disk(e);
                }
            }
        }
        Ok(spool)
    }

    /// Makes the log end with a complete line: a torn fragment is cut off (it was
    /// counted as damaged), a whole record that only lacks its newline gets one.
    fn repair_tail(&mut self, tail: Option<Tail>) -> Result<(), SpoolError> {
        let path = self.dir.join("spool.log");
        match tail {
            None => return Ok(()),
            Some(Tail::Torn { whole_end }) => {
                self.log.set_len(whole_end).map_err(err(&path))?;
                self.log_bytes = whole_end as usize;
            }
            Some(Tail::Unterminated) => {
                self.log.write_all(b"\n").map_err(err(&path))?;
                self.log_bytes += 1;
            }
        }
        self.log.sync_data().map_err(err(&path))
    }

    /// Appends the drop records that are due.
    fn write_drops(&mut self) -> Result<(), SpoolError> {
        let mut buf = Vec::new();
        self.drop_lines(&mut buf);
        self.write_log(&buf)
    }

    fn drop_lines(&mut self, buf: &mut Vec<u8>) {
        for drop in self.unwritten_drops.drain(..) {
            serde_json::to_writer(&mut *buf, &Dropped { drop }).expect("serialises");
            buf.push(b'\n');
        }
    }

    fn write_log(&mut self, buf: &[u8]) -> Result<(), SpoolError> {
        self.log
            .write_all(buf)
            .map_err(err(&self.dir.join("spool.log")))?;
        self.log_bytes += buf.len();
        Ok(())
    }

    /// Queues a message and appends it to the log (not yet synced: see [`Spool::sync`]).
    /// The message is queued even when the disk refuses it; see the module docs.
    pub fn append(&mut self, topic: &str, retain: bool, payload: &str) -> u64 {
        let entry = Entry {
            id: self.next_id,
            topic: topic.to_owned(),
            retain,
            payload: payload.to_owned(),
        };
        self.next_id += 1;
        let id = entry.id;
        let mut buf = entry.line().into_bytes();
        self.push(Queued {
            entry,
            bytes: buf.len(),
        });
        self.enforce_bound(true);
        if !self.on_disk() {
            // Off disk there is nothing to append to: the retry rewrites the whole queue.
            self.retry_rewrite();
            return id;
        }
        // The entry before the drop records it caused: a drop record for a superseded
        // state is never on disk without the newer state.
        self.drop_lines(&mut buf);
        match self.write_log(&buf) {
            Ok(()) => {
                self.log_records += 1;
                // The bound on disk: while nothing is acknowledged (the broker is down)
                // only drops shrink the queue, and only a compaction the log.
                if self.log_bytes.saturating_sub(self.pending_bytes) > slack(self.max_bytes) {
                    if let Err(e) = self.rewrite_log() {
                        self.went_off_disk(e);
                    }
                }
            }
            Err(e) => self.went_off_disk(e),
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
        // The rewrite that ends this records the queue as it is then.
        self.unwritten_drops.clear();
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
        self.pending.iter().map(|q| &q.entry)
    }

    /// The first pending entry with an id of at least `from`.
    pub fn next_from(&self, from: u64) -> Option<&Entry> {
        // Ids are increasing: binary search on the deque.
        let i = self.pending.partition_point(|q| q.entry.id < from);
        self.pending.get(i).map(|q| &q.entry)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Bytes of the pending entries' log lines: what `spool-max-bytes` bounds.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Messages dropped because the spool was full, since the spool was created (the
    /// count is kept in the log across restarts; each drop is counted once).
    pub fn dropped(&self) -> u64 {
        self.totals.dropped
    }

    /// Damaged records found in the log (torn, corrupted) and skipped, since the spool
    /// was created; every other record was replayed.
    pub fn damaged(&self) -> u64 {
        self.totals.damaged
    }

    /// The broker acknowledged `id` (PUBACKs come in publish order, so everything before
    /// it that is still pending was acknowledged as well or dropped).
    pub fn ack(&mut self, id: u64) {
        while self.pending.front().is_some_and(|q| q.entry.id <= id) {
            self.remove_at(0);
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

    /// Whether the log is worth rewriting: its acknowledged head dominates, or what it
    /// holds beyond the queue passed the slack.
    fn compaction_due(&self) -> bool {
        (self.log_records >= 256 && self.pending.len() * 2 <= self.log_records)
            || self.log_bytes.saturating_sub(self.pending_bytes) > slack(self.max_bytes)
    }

    fn compact_if_worth_it(&mut self) -> Result<(), SpoolError> {
        if !self.compaction_due() {
            return Ok(());
        }
        self.rewrite_log()
    }

    /// Replaces the log with the totals and the pending queue (written aside, synced,
    /// renamed over). What was dropped or damaged is then counted by the totals line.
    fn rewrite_log(&mut self) -> Result<(), SpoolError> {
        let (pending, totals) = (&self.pending, self.totals);
        let mut written = 0;
        // The copy's handle, positioned at its end, is the log's from now on.
        self.log = replace_file(&self.dir, "spool.log", true, |f| {
            let mut w = std::io::BufWriter::new(f);
            if totals != Totals::default() {
                let mut line = serde_json::to_vec(&totals).expect("serialises");
                line.push(b'\n');
                w.write_all(&line)?;
                written += line.len();
            }
            for q in pending {
                let line = q.entry.line();
                w.write_all(line.as_bytes())?;
                written += line.len();
            }
            w.flush()
        })?;
        self.log_records = self.pending.len();
        self.log_bytes = written;
        self.unwritten_drops.clear();
        Ok(())
    }

    fn push(&mut self, q: Queued) {
        self.pending_bytes += q.bytes;
        if q.entry.retain {
            let n = self.retained.entry(q.entry.topic.clone()).or_default();
            if *n > 0 {
                self.superseded += 1;
            }
            *n += 1;
        }
        self.pending.push_back(q);
    }

    fn remove_at(&mut self, i: usize) -> Queued {
        let q = self.pending.remove(i).expect("index in range");
        self.pending_bytes -= q.bytes;
        if q.entry.retain {
            let n = self.retained.get_mut(&q.entry.topic).expect("counted");
            *n -= 1;
            if *n == 0 {
                self.retained.remove(&q.entry.topic);
            } else {
                self.superseded -= 1;
            }
        }
        q
    }

    /// The message to drop when the spool is full, if any may go.
    fn victim(&self) -> Option<usize> {
        if self.superseded > 0 {
            // The oldest state that a newer one of its topic supersedes: the broker gets
            // the newer one, so nothing a subscriber sees is lost.
            return self
                .pending
                .iter()
                .position(|q| q.entry.retain && self.retained[&q.entry.topic] > 1);
        }
        // Then the oldest message that is not a state (events, health). A topic's newest
        // state is never dropped: the bound may be passed by one state per topic (a zone)
        // rather than lose what a subscriber would see as the zone's count.
        self.pending.iter().position(|q| !q.entry.retain)
    }

    /// Drops messages until the queue is within the bound; each drop is counted and
    /// leaves a drop record to append while the log is on disk.
    fn enforce_bound(&mut self, log_each: bool) {
        while self.pending_bytes > self.max_bytes {
            let Some(i) = self.victim() else { break };
            let superseded = self.superseded > 0;
            let q = self.remove_at(i);
            self.totals.dropped += 1;
            if self.on_disk() {
                self.unwritten_drops.push(q.entry.id);
            }
            if log_each {
                tracing::warn!(topic = %q.entry.topic, id = q.entry.id, superseded, "spool full: message dropped");
            }
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
        // The rename is durable only once the directory entry is on disk. It is done,
        // though: the new file is the one to write to from now on, whatever this says.
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(error = %e, path = %dir.display(), "cannot sync the spool directory");
        }
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
    /// An entry and the length of its line.
    Entry(Entry, usize),
    /// A drop record's id.
    Dropped(u64),
    Totals(Totals),
    /// Not a record: torn, invalid UTF-8 or JSON, too long, or an entry out of order.
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

#[derive(Default)]
struct ScanEnd {
    tail: Option<Tail>,
    /// How far the lines were read (all of them, unless reading failed).
    end: u64,
    /// Why reading stopped before the end of the file.
    error: Option<std::io::Error>,
}

/// Reads the first `limit` bytes of the log at `path` line by line, as bytes: invalid
/// UTF-8 or a half-written record costs its own line, never the rest of the replay. No log
/// is an empty one; only a log that cannot be opened is an error.
fn scan(
    path: &Path,
    cap: usize,
    limit: u64,
    mut each: impl FnMut(Scanned),
) -> std::io::Result<ScanEnd> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ScanEnd::default()),
        Err(e) => return Err(e),
    };
    let mut lines = LineReader {
        inner: BufReader::new(f.take(limit)),
        cap,
        offset: 0,
    };
    let mut buf = Vec::new();
    let mut last_id = 0;
    let mut whole_end = 0;
    let mut tail = None;
    loop {
        let line = match lines.next(&mut buf) {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                return Ok(ScanEnd {
                    tail: None,
                    end: whole_end,
                    error: Some(e),
                })
            }
        };
        // An empty line is no record and no damage either.
        if line.complete && buf.is_empty() && !line.too_long {
            whole_end = line.end;
            continue;
        }
        let record = (!line.too_long)
            .then(|| serde_json::from_slice::<Record>(&buf).ok())
            .flatten()
            // Ids only rise in a log this spool wrote; an entry out of order is a line
            // the file system duplicated or misplaced, and would break the replay's
            // order.
            .filter(|r| !matches!(r, Record::Entry(e) if e.id <= last_id));
        if line.complete {
            whole_end = line.end;
        } else {
            tail = Some(match record {
                Some(_) => Tail::Unterminated,
                None => Tail::Torn { whole_end },
            });
        }
        // A record only lacking its newline counts one more byte: the one it gets.
        let bytes = buf.len() + 1;
        each(match record {
            Some(Record::Entry(e)) => {
                last_id = e.id;
                Scanned::Entry(e, bytes)
            }
            Some(Record::Dropped(d)) => Scanned::Dropped(d.drop),
            Some(Record::Totals(t)) => Scanned::Totals(t),
            None => Scanned::Damaged,
        });
    }
    Ok(ScanEnd {
        tail,
        end: lines.offset,
        error: None,
    })
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
            1,
            "the fragment was cut, not left to count again"
        );
        assert!(!String::from_utf8_lossy(&log_bytes(dir.path())).contains("torn"));
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
        drop(s);
        // Counted once: the damaged line is gone and its count kept.
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
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
        let left = payloads(&s);
        // state-1 went first (state-2 supersedes it), then the oldest events; state-2,
        // the zone's newest, stays although it is older than every event left.
        assert_eq!(left[0], "state-2", "{left:?}");
        let events = &left[1..];
        let first: usize = events[0].strip_prefix("event-").unwrap().parse().unwrap();
        let expected: Vec<String> = (first..8).map(|i| format!("event-{i}")).collect();
        assert_eq!(events, expected, "the newest events, in order");
        assert!(first > 1, "{left:?}");
        assert_eq!(s.dropped(), 9 - left.len() as u64);
    }

    // Issue #19: the bound dropped the oldest message of any kind, so a zone whose state
    // had not changed for a while lost its retained state to a stream of events.
    #[test]
    fn the_newest_state_of_each_topic_survives_any_number_of_events() {
        let dir = tempfile::tempdir().unwrap();
        let max = 4 << 10;
        let mut s = Spool::open(dir.path(), max).unwrap();
        s.append("d/zones/a/state", true, "a-1");
        s.append("d/zones/b/state", true, "b-1");
        for i in 0..2000 {
            if i == 1000 {
                s.append("d/zones/a/state", true, "a-2");
            }
            s.append("d/events", false, &format!("event-{i}"));
        }
        let states = |s: &Spool| -> Vec<String> {
            s.pending()
                .filter(|e| e.retain)
                .map(|e| e.payload.clone())
                .collect()
        };
        assert_eq!(states(&s), ["b-1", "a-2"]);
        assert_eq!(s.dropped(), 2003 - s.len() as u64);
        drop(s);
        let s = Spool::open(dir.path(), max).unwrap();
        assert_eq!(states(&s), ["b-1", "a-2"]);
    }

    /// The largest the log may be right after an append: the bound, the slack, and the
    /// append itself (an entry and its drop records).
    fn disk_bound(max: usize) -> u64 {
        (max + slack(max) + 1024) as u64
    }

    fn log_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("spool.log")).unwrap().len()
    }

    // Issue #19: spool-max-bytes bounded memory only; the log grew on disk for the whole
    // broker outage.
    #[test]
    fn a_spool_filled_during_an_outage_stays_within_its_bound_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let max = 64 << 10;
        let mut s = Spool::open(dir.path(), max).unwrap();
        let mut largest = 0;
        // Nothing is acknowledged: the broker is down. About 8 times the bound appended.
        for i in 0..10_000 {
            if i % 50 == 0 {
                s.append("d/zones/a/state", true, &format!("{{\"count\":{i}}}"));
            }
            let event = format!("{{\"event\":\"count-changed\",\"n\":{i}}}");
            s.append("d/events", false, &event);
            if i % 100 == 0 {
                s.sync();
            }
            largest = largest.max(log_len(dir.path()));
        }
        assert!(s.on_disk());
        assert!(largest <= disk_bound(max), "{largest} bytes on disk");
        assert!(s.pending_bytes <= max);
        assert!(s.dropped() > 5_000);
        assert_eq!(temp_files(dir.path()), Vec::<String>::new());
        // What is on disk is what is queued.
        let queued: Vec<Entry> = s.pending().cloned().collect();
        drop(s);
        let s = Spool::open(dir.path(), max).unwrap();
        assert_eq!(s.pending().cloned().collect::<Vec<_>>(), queued);
    }

    // Issue #19: dropped messages stayed in the log, came back at the next start and were
    // dropped (and counted) again.
    #[test]
    fn drops_are_counted_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let max = 8 << 10;
        let mut s = Spool::open(dir.path(), max).unwrap();
        for i in 0..530 {
            s.append("d/events", false, &format!("event-{i:04}"));
        }
        s.sync();
        let dropped = s.dropped();
        assert_eq!(dropped, 530 - s.len() as u64);
        let queued: Vec<Entry> = s.pending().cloned().collect();
        drop(s);
        // Both traces of drops are there: the totals of a compaction, and the drop
        // records written since.
        let log = String::from_utf8(log_bytes(dir.path())).unwrap();
        assert!(log.starts_with("{\"dropped\":"), "{log}");
        assert!(log.contains("{\"drop\":"), "{log}");

        for _ in 0..2 {
            let s = Spool::open(dir.path(), max).unwrap();
            assert_eq!(s.dropped(), dropped);
            assert_eq!(s.pending().cloned().collect::<Vec<_>>(), queued);
        }
        let mut s = Spool::open(dir.path(), max).unwrap();
        s.append("d/events", false, "event-0530");
        assert_eq!(s.dropped(), 531 - s.len() as u64);
    }

    #[test]
    fn a_log_over_its_bound_at_open_is_cut_to_it_and_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append("d/zones/a/state", true, "a-1");
        for i in 0..2000 {
            s.append("d/events", false, &format!("event-{i:04}"));
        }
        drop(s);
        // Restarted with a smaller bound (or upgraded from a version that let the log
        // grow on disk).
        let max = 16 << 10;
        let s = Spool::open(dir.path(), max).unwrap();
        assert!(s.pending_bytes <= max);
        assert_eq!(s.dropped(), 2001 - s.len() as u64);
        assert_eq!(s.pending().next().unwrap().payload, "a-1");
        assert_eq!(s.pending().last().unwrap().payload, "event-1999");
        assert!(log_len(dir.path()) <= disk_bound(max));
        let (dropped, len) = (s.dropped(), s.len());
        drop(s);
        let s = Spool::open(dir.path(), max).unwrap();
        assert_eq!((s.dropped(), s.len()), (dropped, len));
    }

    #[test]
    fn a_drop_record_never_removes_the_newest_state_of_its_topic() {
        let dir = tempfile::tempdir().unwrap();
        // The newer state a drop record was written for did not reach the disk (torn).
        std::fs::write(
            dir.path().join("spool.log"),
            concat!(
                r#"{"id":1,"topic":"d/zones/a/state","retain":true,"payload":"a-1"}"#,
                "\n",
                r#"{"id":2,"topic":"d/events","retain":false,"payload":"e-1"}"#,
                "\n",
                r#"{"drop":2}"#,
                "\n",
                r#"{"drop":1}"#,
                "\n",
            ),
        )
        .unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(payloads(&s), ["a-1"]);
        assert_eq!(s.dropped(), 1);
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

    /// Set in a re-executed test binary: the spool directory and bound the power-cut
    /// writer works on (see `write_until_killed`).
    const WRITER_DIR: &str = "SHELFWATCH_SPOOL_WRITER_DIR";
    const WRITER_MAX: &str = "SHELFWATCH_SPOOL_WRITER_MAX";

    fn log_inode(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.join("spool.log")).unwrap().ino()
    }

    /// The writer of the power-cut tests, in a child process: appends states of two zones
    /// and events, every 13th of them a 12 KB one that spans pages, and syncs every 16
    /// like a publisher batch. It prints `appended <id> <topic> <retain>` once an append
    /// returned, and `synced <inode> <length>` whenever the log is durable up to `length`
    /// (after a sync, and after a compaction, which writes a synced copy). It runs until
    /// it is killed.
    fn write_until_killed(dir: &Path, max: usize) -> ! {
        let mut s = Spool::open(dir, max).unwrap();
        let mut out = std::io::stdout().lock();
        // What open left is on disk: a power cut before it would have left the same.
        s.sync();
        let mut inode = log_inode(dir);
        writeln!(out, "synced {inode} {}", s.log_bytes).unwrap();
        let big = "x".repeat(12_000);
        for i in 0u64.. {
            let (topic, retain) = match i % 7 {
                0 => ("d/zones/a/state", true),
                3 => ("d/zones/b/state", true),
                _ => ("d/events", false),
            };
            let payload = if i % 13 == 0 {
                big.clone()
            } else {
                format!("{{\"n\":{i}}}")
            };
            let id = s.append(topic, retain, &payload);
            writeln!(out, "appended {id} {topic} {retain}").unwrap();
            out.flush().unwrap();
            let compacted = log_inode(dir) != inode;
            if i % 16 == 15 || compacted {
                s.sync();
                inode = log_inode(dir);
                writeln!(out, "synced {inode} {}", s.log_bytes).unwrap();
                out.flush().unwrap();
            }
        }
        unreachable!("the writer runs until it is killed")
    }

    /// If this process is a writer (`WRITER_DIR` set), write until killed.
    fn act_as_writer_if_asked() {
        if let Some(dir) = std::env::var_os(WRITER_DIR) {
            let max = std::env::var(WRITER_MAX).unwrap().parse().unwrap();
            write_until_killed(Path::new(&dir), max);
        }
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Appended {
        id: u64,
        topic: String,
        retain: bool,
    }

    /// What a killed writer left.
    struct Killed {
        /// Every append that returned before the kill.
        returned: Vec<Appended>,
        /// Those a power cut at the kill would keep: appended before the last sync.
        durable: usize,
    }

    /// Runs `test` (this binary, re-executed) as the writer on `dir` and kills it with
    /// SIGKILL once it reported `after` appends. With `power_cut`, the log then loses a
    /// random part of what was not synced, as a power cut at that moment could (the
    /// unsynced tail, cut anywhere, mid-record included).
    fn kill_writer_after(
        test: &str,
        dir: &Path,
        max: usize,
        after: usize,
        power_cut: Option<u64>,
    ) -> Killed {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        use std::process::{Command, Stdio};
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(WRITER_DIR, dir)
            .env(WRITER_MAX, max.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut killed = Killed {
            returned: Vec::new(),
            durable: 0,
        };
        let mut synced = None;
        let mut read = |line: String, killed: &mut Killed| {
            // libtest's "test <name> ... " precedes the first line, unterminated.
            let words: Vec<&str> = line.split(' ').collect();
            let at = words
                .iter()
                .position(|w| *w == "appended" || *w == "synced");
            match at.map(|at| &words[at..]) {
                Some(["appended", id, topic, retain]) => killed.returned.push(Appended {
                    id: id.parse().unwrap(),
                    topic: topic.to_string(),
                    retain: *retain == "true",
                }),
                Some(["synced", inode, len]) => {
                    synced = Some((inode.parse::<u64>().unwrap(), len.parse::<u64>().unwrap()));
                    killed.durable = killed.returned.len();
                }
                // The kill interrupted a line.
                _ => {}
            }
        };
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while killed.returned.len() < after {
            let line = lines.next().expect("the writer stopped by itself").unwrap();
            read(line, &mut killed);
        }
        // SIGKILL: no destructor, no flush; the writer is mid-loop, wherever that is.
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        // Lines it printed before it died are appends that returned as well.
        for line in lines.map_while(Result::ok) {
            read(line, &mut killed);
        }
        child.wait().unwrap();
        let (inode, durable_len) = synced.expect("the writer syncs after open");
        let len = log_len(dir);
        match power_cut {
            // A compaction the writer could not report replaced the log: what is durable
            // of it is unknown, so nothing is cut.
            Some(r) if log_inode(dir) == inode && len > durable_len => {
                let cut = durable_len + r % (len - durable_len + 1);
                let f = OpenOptions::new()
                    .write(true)
                    .open(dir.join("spool.log"))
                    .unwrap();
                f.set_len(cut).unwrap();
            }
            _ => killed.durable = killed.returned.len(),
        }
        killed
    }

    /// Random numbers for the kill points, from a seed that is printed so a failure can
    /// be replayed.
    struct Rounds(u64);

    impl Rounds {
        fn new() -> Self {
            use std::hash::{BuildHasher, Hasher};
            let seed = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            println!("seed {seed}");
            Rounds(seed | 1)
        }

        /// xorshift64
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// How many appends to wait for, and where a power cut lands (none every
        /// third round: a plain kill).
        fn round(&mut self) -> (usize, Option<u64>) {
            let after = 20 + (self.next() % 600) as usize;
            let cut = (!self.next().is_multiple_of(3)).then(|| self.next());
            (after, cut)
        }
    }

    fn queued(s: &Spool) -> Vec<Appended> {
        s.pending()
            .map(|e| Appended {
                id: e.id,
                topic: e.topic.clone(),
                retain: e.retain,
            })
            .collect()
    }

    // Issue #19: a power cut mid-append tore the last line, and what came after it was
    // lost. The spool syncs once per batch: a killed process keeps every append that
    // returned (the kernel holds the written bytes), a power cut every append before the
    // last sync. The writer is killed with SIGKILL at random points, and in two rounds of
    // three a power cut is simulated on top (the unsynced tail of the log cut at a random
    // byte).
    #[test]
    fn a_writer_killed_at_random_points_loses_no_append_that_returned_or_was_synced() {
        act_as_writer_if_asked();
        let test = "publish::spool::tests::a_writer_killed_at_random_points_loses_no_append_that_returned_or_was_synced";
        let dir = tempfile::tempdir().unwrap();
        let max = 64 << 20;
        let mut rounds = Rounds::new();
        let mut known: Vec<Appended> = Vec::new();
        let mut damaged = 0;
        for round in 0..8 {
            let (after, cut) = rounds.round();
            let killed = kill_writer_after(test, dir.path(), max, after, cut);
            let s = Spool::open(dir.path(), max).unwrap();
            let at = format!("round {round}: kill after {after}, cut {cut:?}");
            let present = queued(&s);
            // Nothing acknowledged, nothing dropped: ids 1, 2, 3... in order.
            let ids: Vec<u64> = present.iter().map(|a| a.id).collect();
            assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "{at}");
            for a in known.iter().chain(&killed.returned[..killed.durable]) {
                assert_eq!(present.get(a.id as usize - 1), Some(a), "{at}");
            }
            // Beyond those, at most what returned, and the append the kill interrupted.
            assert!(
                present.len() <= known.len() + killed.returned.len() + 1,
                "{at}: {} present",
                present.len()
            );
            assert_eq!(s.dropped(), 0);
            // At most one torn record per kill.
            assert!(s.damaged() <= damaged + 1, "{at}");
            damaged = s.damaged();
            assert_eq!(temp_files(dir.path()), Vec::<String>::new());
            known = present;
        }
        // And the next append after all that starts clean.
        let mut s = Spool::open(dir.path(), max).unwrap();
        let id = s.append("d/zones/a/state", true, "last");
        drop(s);
        let s = Spool::open(dir.path(), max).unwrap();
        assert_eq!(s.len(), known.len() + 1);
        assert_eq!(s.pending().last().map(|e| e.id), Some(id));
        assert_eq!(s.damaged(), damaged);
    }

    // Issue #19: the same on a spool that is full, so the writer drops messages, writes
    // drop records and compacts when it is killed: each zone's newest durable state
    // survives, each drop is counted once, the log stays within its bound on disk, and no
    // temp file is left behind.
    #[test]
    fn a_full_spool_killed_at_random_points_keeps_each_zones_newest_state_and_counts_drops_once() {
        act_as_writer_if_asked();
        let test = "publish::spool::tests::a_full_spool_killed_at_random_points_keeps_each_zones_newest_state_and_counts_drops_once";
        let dir = tempfile::tempdir().unwrap();
        let max = 64 << 10;
        let mut rounds = Rounds::new();
        let mut newest: HashMap<String, u64> = HashMap::new();
        let mut returned: HashMap<u64, Appended> = HashMap::new();
        let mut damaged = 0;
        for round in 0..8 {
            let (after, cut) = rounds.round();
            let killed = kill_writer_after(test, dir.path(), max, after, cut);
            for a in &killed.returned[..killed.durable] {
                if a.retain {
                    newest.insert(a.topic.clone(), a.id);
                }
            }
            let s = Spool::open(dir.path(), max).unwrap();
            let at = format!("round {round}: kill after {after}, cut {cut:?}");
            for (topic, id) in &newest {
                assert!(
                    s.pending()
                        .any(|e| e.retain && &e.topic == topic && e.id >= *id),
                    "{at}: {topic}'s newest state {id} is gone"
                );
            }
            // An id is never given to two messages.
            returned.extend(killed.returned.into_iter().map(|a| (a.id, a)));
            for a in queued(&s) {
                if let Some(r) = returned.get(&a.id) {
                    assert_eq!(r, &a, "{at}");
                }
            }
            // Except the id of an append a power cut took: it is given again.
            returned.retain(|id, _| *id < s.next_id);
            // Nothing acknowledged: every id up to the newest is either queued or
            // dropped, and counted as dropped exactly once.
            let last = s.pending().last().unwrap().id;
            assert_eq!(s.dropped(), last - s.len() as u64, "{at}");
            assert!(s.pending_bytes <= max);
            let largest_append = 12_100 + 64 * 200;
            assert!(
                log_len(dir.path()) <= (max + slack(max) + largest_append) as u64,
                "{at}: {} bytes on disk",
                log_len(dir.path())
            );
            assert!(s.damaged() <= damaged + 1, "{at}");
            damaged = s.damaged();
            assert_eq!(temp_files(dir.path()), Vec::<String>::new());
        }
    }
}
