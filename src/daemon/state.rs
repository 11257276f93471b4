//! The daemon's persistent state: stable zone counts and the message sequence number,
//! written atomically (temp file, fsync, rename, fsync of the directory) so a power cut
//! leaves either the old or the new file, never a torn one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::counting::ZoneState;
use crate::fsutil::{self, Durability};

const STATE_SCHEMA: u32 = 1;

/// The largest sequence number handed out: 2^53 - 1, the largest integer a subscriber
/// that parses JSON numbers as doubles (JavaScript, jq, Node-RED) still tells apart from
/// its neighbour. At a million messages a second a daemon takes 285 years to get there,
/// so a state file beyond it is damaged or forged, and [`StateStore::load`] refuses it
/// rather than guess. Each way of carrying on would break the one promise subscribers
/// rely on, that `seq` only rises (they drop a `seq` they have already seen): wrapping
/// or resetting to 0 sends it backwards, and saturating repeats one number forever, so
/// every message after the first would be dropped as a duplicate. Refused, the daemon
/// stops with an error naming the file; the operator removes the file and resets the
/// subscribers' last-seen `seq`, which only they can do.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a shelfwatch state file: {error}")]
    Corrupt { path: PathBuf, error: String },
    #[error("{path}: refused: {message}")]
    Implausible { path: PathBuf, message: String },
    #[error("{dir}: another shelfwatch daemon uses this state directory")]
    Locked { dir: PathBuf },
}

/// What survives a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub schema: u32,
    /// The last sequence number handed out.
    pub seq: u64,
    /// Stable state per `camera/zone`.
    pub zones: BTreeMap<String, ZoneState>,
}

impl SavedState {
    /// Hands out the next sequence number, or `None` once [`MAX_SEQ`] is used up: the
    /// message must then not be published at all rather than with a number subscribers
    /// would take for one they have seen (see [`MAX_SEQ`]).
    pub fn next_seq(&mut self) -> Option<u64> {
        let next = self.seq.checked_add(1).filter(|&n| n <= MAX_SEQ)?;
        self.seq = next;
        Some(next)
    }

    /// Numbers no daemon could have written: a `seq` past [`MAX_SEQ`], zone counts
    /// whose sum overflows (the counters add them up), a total above the counts it is
    /// the sum of (a subset of: the planogram's labels).
    fn check(&self) -> Result<(), String> {
        if self.seq > MAX_SEQ {
            return Err(format!(
                "seq {} is beyond {MAX_SEQ}, which no daemon reaches; sequence numbers \
                 must never go back, so remove the file and reset the subscribers' \
                 last-seen seq",
                self.seq
            ));
        }
        for (key, z) in &self.zones {
            let sum = z
                .counts
                .values()
                .try_fold(0u32, |a, &c| a.checked_add(c))
                .ok_or_else(|| format!("zone {key:?}: counts add up beyond {}", u32::MAX))?;
            if z.total > sum {
                return Err(format!(
                    "zone {key:?}: total {} is more than its counts add up to ({sum})",
                    z.total
                ));
            }
        }
        Ok(())
    }
}

/// The state directory, locked for this process.
pub struct StateStore {
    dir: PathBuf,
    // Held for the lifetime of the store: the flock is released when it closes.
    _lock: nix::fcntl::Flock<File>,
}

impl StateStore {
    /// Creates the directory if needed and takes an exclusive lock on it, so two daemons
    /// never interleave sequence numbers or overwrite each other's counts.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let io = |error| StateError::Io {
            path: dir.to_owned(),
            error,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|error| StateError::Io {
                path: lock_path.clone(),
                error,
            })?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| StateError::Locked {
                dir: dir.to_owned(),
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The saved state; empty when there is none yet. A damaged file is an error rather
    /// than a silent reset, which would restart `seq` at zero.
    pub fn load(&self) -> Result<SavedState, StateError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let s: SavedState =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                        path: path.clone(),
                        error: e.to_string(),
                    })?;
                if s.schema != STATE_SCHEMA {
                    return Err(StateError::Corrupt {
                        path,
                        error: format!("schema {} (this build reads {STATE_SCHEMA})", s.schema),
                    });
                }
                s.check()
                    .map_err(|message| StateError::Implausible { path, message })?;
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SavedState {
                schema: STATE_SCHEMA,
                ..Default::default()
            }),
            Err(error) => Err(StateError::Io { path, error }),
        }
    }

    /// Replaces the state file atomically and durably.
    pub fn save(&self, state: &SavedState) -> Result<(), StateError> {
        self.save_with(state, |f, bytes| f.write_all(bytes))
    }

    /// [`StateStore::save`] with the write of the bytes supplied, so tests can make it
    /// fail as a full disk would.
    fn save_with(
        &self,
        state: &SavedState,
        write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), StateError> {
        let mut s = state.clone();
        s.schema = STATE_SCHEMA;
        let bytes = serde_json::to_vec_pretty(&s).expect("state serialises");
        fsutil::write_atomic(&self.path(), Durability::Synced, |f| write(f, &bytes)).map_err(|e| {
            StateError::Io {
                path: e.path,
                error: e.error,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counting::StockStatus;

    #[test]
    fn state_round_trips_and_a_second_daemon_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().seq, 0);
        let mut s = SavedState {
            seq: 42,
            ..Default::default()
        };
        s.zones.insert(
            "cam/top".into(),
            ZoneState {
                counts: [("Bottle".into(), 3)].into(),
                total: 3,
                status: StockStatus::Ok,
            },
        );
        store.save(&s).unwrap();
        assert!(matches!(
            StateStore::open(dir.path()),
            Err(StateError::Locked { .. })
        ));
        drop(store);
        let again = StateStore::open(dir.path()).unwrap();
        let loaded = again.load().unwrap();
        assert_eq!(loaded.seq, 42);
        assert_eq!(loaded.zones["cam/top"].total, 3);
    }

    #[test]
    fn a_save_on_a_full_disk_fails_naming_the_file_and_keeps_the_last_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let s = SavedState {
            seq: 7,
            ..Default::default()
        };
        store.save(&s).unwrap();
        // The copy is written aside first: on a full disk that write fails.
        let later = SavedState { seq: 8, ..s };
        let err = store
            .save_with(&later, |f, bytes| {
                f.write_all(&bytes[..bytes.len() / 2])?;
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("state.json.tmp"), "{err}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| !n.contains(".tmp")),
            "half copy left behind: {names:?}"
        );
        assert_eq!(store.load().unwrap().seq, 7);
        // Room again: the next batch's save goes through.
        store.save(&later).unwrap();
        assert_eq!(store.load().unwrap().seq, 8);
    }

    // Issue #19: the state was written through `state.json.tmp`, a fixed name a symlink
    // planted there redirected.
    #[test]
    fn a_symlink_at_the_old_temporary_name_does_not_redirect_the_save() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("state.json.tmp")).unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store
            .save(&SavedState {
                seq: 3,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(store.load().unwrap().seq, 3);
    }

    // Issue #19: a state file at u64::MAX made the next seq wrap to 0.
    #[test]
    fn a_state_file_with_an_absurd_seq_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        for seq in [u64::MAX, MAX_SEQ + 1] {
            std::fs::write(
                store.path(),
                format!("{{\"schema\": 1, \"seq\": {seq}, \"zones\": {{}}}}"),
            )
            .unwrap();
            let err = store.load().unwrap_err().to_string();
            assert!(err.contains("state.json") && err.contains("seq"), "{err}");
        }
        std::fs::write(
            store.path(),
            format!("{{\"schema\": 1, \"seq\": {MAX_SEQ}, \"zones\": {{}}}}"),
        )
        .unwrap();
        assert_eq!(store.load().unwrap().seq, MAX_SEQ);
    }

    // Issue #19: sequence numbers never go back, not even at the end of their range.
    #[test]
    fn sequence_numbers_stop_at_their_limit_instead_of_wrapping() {
        let mut s = SavedState {
            seq: MAX_SEQ - 1,
            ..Default::default()
        };
        assert_eq!(s.next_seq(), Some(MAX_SEQ));
        assert_eq!(s.next_seq(), None);
        assert_eq!(s.seq, MAX_SEQ);
        s.seq = u64::MAX;
        assert_eq!(s.next_seq(), None);
        assert_eq!(s.seq, u64::MAX);
    }

    // Issue #19: zone counts from the state file are summed by the counters; a sum
    // beyond u32 overflowed there.
    #[test]
    fn a_state_file_with_overflowing_zone_counts_is_refused_naming_the_zone() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let zone = |counts: &str, total: u64| {
            format!(
                "{{\"schema\": 1, \"seq\": 5, \"zones\": {{\"cam/top\": \
                 {{\"counts\": {{{counts}}}, \"total\": {total}, \"status\": \"ok\"}}}}}}"
            )
        };
        let max = u32::MAX;
        for (text, what) in [
            (zone(&format!("\"a\": {max}, \"b\": 1"), 0), "add up"),
            (zone("\"a\": 2", 3), "total 3"),
        ] {
            std::fs::write(store.path(), text).unwrap();
            let err = store.load().unwrap_err().to_string();
            assert!(
                err.contains("state.json") && err.contains("cam/top") && err.contains(what),
                "{err}"
            );
        }
        std::fs::write(store.path(), zone("\"a\": 2, \"b\": 1", 3)).unwrap();
        assert_eq!(store.load().unwrap().zones["cam/top"].total, 3);
    }

    #[test]
    fn a_damaged_state_file_is_an_error_not_a_silent_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{\"seq\": 1").unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
    }
}
