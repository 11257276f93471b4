//! `[state]`, `[health]` and `[snapshots]`: what the daemon keeps and reports about
//! itself besides the counts.

use std::path::PathBuf;

use serde::Deserialize;

use super::Problems;

/// Where the daemon keeps its state (stable counts, sequence number).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StateConfig {
    /// Relative to the config file. Holds `state.json` and a lock file.
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/shelfwatch")
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds between health records; 0 turns them off.
    #[serde(default = "default_health_interval")]
    pub interval_s: u64,
}

fn default_health_interval() -> u64 {
    60
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_s: default_health_interval(),
        }
    }
}

/// Annotated JPEG snapshots of the latest frame (zones, boxes, labels, counts).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Directory for `<camera>.jpg` (overwritten, atomically); relative to the config file.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Seconds between periodic snapshots; 0 or absent: only on request (SIGUSR1).
    #[serde(default)]
    pub interval_s: Option<u64>,
}

impl SnapshotConfig {
    pub(crate) fn validate(&self, key: &str, problems: &mut Problems) {
        if self.interval_s.is_some_and(|s| s > 0) && self.dir.is_none() {
            problems.push(
                format!("{key}.interval-s"),
                format!("periodic snapshots need {key}.dir"),
            );
        }
    }
}
