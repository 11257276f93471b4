//! `[counting]`: how detections become stable counts; the defaults of every zone.

use std::path::PathBuf;

use serde::Deserialize;

use super::{LoadedConfig, Problems};
use crate::counting::{CountingParams, Membership};
use crate::vision::Manifest;

/// How detections become stable counts; defaults for every zone.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CountingConfig {
    /// Frames in the consensus window.
    #[serde(default = "default_window_frames")]
    pub window_frames: usize,
    /// Fraction of the window that must agree before a count changes.
    #[serde(default = "default_min_agreement")]
    pub min_agreement: f32,
    /// Also forget observations older than this many seconds.
    #[serde(default)]
    pub window_seconds: Option<f64>,
    /// A zone empty this long raises out-of-stock.
    #[serde(default = "default_out_of_stock_after_s")]
    pub out_of_stock_after_s: f64,
    /// Labels that hide a zone (its counts are held while they overlap it).
    #[serde(default = "default_occluders")]
    pub occluders: Vec<String>,
    /// A second model that finds the occluders, run after the counting model on the
    /// frames that could move a count (see `ZoneCounter::steady_on`), for counting models
    /// that know no people (the bundled shelf counter has one label, `product`). Only its
    /// `occluders` labels are used. Costs one more inference on those frames; without
    /// it, a person standing in front of a shelf hides its products and the count drops
    /// once the consensus window agrees.
    #[serde(default)]
    pub occluder_model: Option<PathBuf>,
    /// Minimum score of an occluder found by `occluder-model`.
    #[serde(default = "default_occluder_score_threshold")]
    pub occluder_score_threshold: f32,
    /// Default zone membership rule.
    #[serde(default = "default_membership")]
    pub membership: Membership,
    /// For the `overlap` rule: share of a box that must lie in the zone.
    #[serde(default = "default_overlap_fraction")]
    pub overlap_fraction: f32,
}

fn default_window_frames() -> usize {
    5
}
fn default_min_agreement() -> f32 {
    0.6
}
fn default_out_of_stock_after_s() -> f64 {
    30.0
}
fn default_occluders() -> Vec<String> {
    vec!["Person".into()]
}
fn default_occluder_score_threshold() -> f32 {
    0.5
}
fn default_membership() -> Membership {
    Membership::BottomCentre
}
fn default_overlap_fraction() -> f32 {
    0.5
}

impl Default for CountingConfig {
    fn default() -> Self {
        Self {
            window_frames: default_window_frames(),
            min_agreement: default_min_agreement(),
            window_seconds: None,
            out_of_stock_after_s: default_out_of_stock_after_s(),
            occluders: default_occluders(),
            occluder_model: None,
            occluder_score_threshold: default_occluder_score_threshold(),
            membership: default_membership(),
            overlap_fraction: default_overlap_fraction(),
        }
    }
}

impl CountingConfig {
    pub fn params(&self) -> CountingParams {
        CountingParams {
            window_frames: self.window_frames,
            min_agreement: self.min_agreement,
            window: self.window_seconds.map(std::time::Duration::from_secs_f64),
            out_of_stock_after: std::time::Duration::from_secs_f64(self.out_of_stock_after_s),
            occluders: self.occluders.iter().cloned().collect(),
        }
    }

    /// `loaded` locates the occluder model, whose labels must hold the occluders.
    pub(crate) fn validate(&self, key: &str, loaded: &LoadedConfig, problems: &mut Problems) {
        problems.at_least(format!("{key}.window-frames"), self.window_frames, 1, "");
        problems.unit(format!("{key}.min-agreement"), self.min_agreement);
        if let Some(s) = self.window_seconds {
            problems.seconds(format!("{key}.window-seconds"), s, false);
        }
        problems.seconds(
            format!("{key}.out-of-stock-after-s"),
            self.out_of_stock_after_s,
            true,
        );
        problems.unit(
            format!("{key}.occluder-score-threshold"),
            self.occluder_score_threshold,
        );
        if self.occluder_model.is_some() && self.occluders.is_empty() {
            problems.push(
                format!("{key}.occluders"),
                "occluder-model is set: list the labels it should find",
            );
        }
        problems.unit(format!("{key}.overlap-fraction"), self.overlap_fraction);
        if let Some((path, _)) = loaded.occluder_model() {
            match Manifest::load(&path) {
                Err(e) => problems.push(format!("{key}.occluder-model"), e.to_string()),
                Ok(manifest) => {
                    for label in &self.occluders {
                        if manifest.label_index(label).is_none() {
                            problems.push(
                                format!("{key}.occluders"),
                                format!(
                                    "occluder model {} has no label {label:?}",
                                    manifest.manifest.name
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}
