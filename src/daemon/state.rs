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

    #[test]
    fn a_damaged_state_file_is_an_error_not_a_silent_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{\"seq\": 1").unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
    }
}
