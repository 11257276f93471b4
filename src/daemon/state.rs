//! The daemon's persistent state: stable zone counts and the message sequence number,
//! written atomically (temp file, fsync, rename, fsync of the directory) so a power cut
//! leaves either the old or the new file, never a torn one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::counting::ZoneState;

const STATE_SCHEMA: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a shelfwatch state file: {error}")]
    Corrupt { path: PathBuf, error: String },
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
        let path = self.path();
        let tmp = self.dir.join("state.json.tmp");
        let io = |p: &Path| {
            let p = p.to_owned();
            move |error| StateError::Io { path: p, error }
        };
        let mut s = state.clone();
        s.schema = STATE_SCHEMA;
        let bytes = serde_json::to_vec_pretty(&s).expect("state serialises");
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .map_err(io(&tmp));
        if let Err(e) = written {
            // A half-written copy would only take the space a full disk lacks.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // The rename itself is only durable once the directory entry is on disk.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
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
        // The copy is written aside first: on a full disk (/dev/full: ENOSPC) that fails.
        let tmp = dir.path().join("state.json.tmp");
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let later = SavedState { seq: 8, ..s };
        let err = store.save(&later).unwrap_err().to_string();
        assert!(err.contains("state.json.tmp"), "{err}");
        assert!(!tmp.exists() && !tmp.is_symlink(), "half copy left behind");
        assert_eq!(store.load().unwrap().seq, 7);
        // Room again: the next batch's save goes through.
        store.save(&later).unwrap();
        assert_eq!(store.load().unwrap().seq, 8);
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
