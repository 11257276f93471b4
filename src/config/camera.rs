//! `[[cameras]]` and their `[[cameras.zones]]`: the cameras, where their frames come
//! from, and the shelf zones counted in them.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::{CountingConfig, LoadedConfig, Problems};
use crate::capture::SourceSettings;
use crate::counting::{Membership, Polygon, ZoneSpec};

/// `[[cameras]]`: one camera and its shelf zones.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CameraConfig {
    /// Camera id in messages: letters, digits, `-` and `_`.
    pub id: String,
    pub source: SourceSettings,
    #[serde(default)]
    pub zones: Vec<ZoneConfig>,
}

/// Whether zone polygons are in 0..1 of the frame or in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Coordinates {
    Normalised,
    Pixels,
}

/// `[[cameras.zones]]`: a named shelf zone with an optional planogram.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ZoneConfig {
    pub name: String,
    /// Corner points [x, y], in order, at least three.
    pub polygon: Vec<[f32; 2]>,
    #[serde(default = "default_coordinates")]
    pub coordinates: Coordinates,
    /// Planogram: labels expected in this zone. Empty: anything may stand here.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Below this total the zone is low on stock.
    #[serde(default)]
    pub min: Option<u32>,
    /// Above this total the zone is over-stocked.
    #[serde(default)]
    pub max: Option<u32>,
    /// Overrides `counting.membership` for this zone.
    #[serde(default)]
    pub membership: Option<Membership>,
    #[serde(default)]
    pub overlap_fraction: Option<f32>,
}

fn default_coordinates() -> Coordinates {
    Coordinates::Normalised
}

impl ZoneConfig {
    /// The zone for frames of `size` (width, height).
    pub fn spec(&self, counting: &CountingConfig, size: (u32, u32)) -> ZoneSpec {
        let (sx, sy) = match self.coordinates {
            Coordinates::Normalised => (size.0 as f32, size.1 as f32),
            Coordinates::Pixels => (1.0, 1.0),
        };
        ZoneSpec {
            name: self.name.clone(),
            polygon: Polygon::new(
                self.polygon
                    .iter()
                    .map(|p| (p[0] * sx, p[1] * sy))
                    .collect(),
            ),
            membership: self.membership.unwrap_or(counting.membership),
            overlap_fraction: self.overlap_fraction.unwrap_or(counting.overlap_fraction),
            expected: self.labels.clone(),
            min: self.min,
            max: self.max,
        }
    }

    /// The zone's own checks; its name's uniqueness is the cameras' (see
    /// [`validate_cameras`]).
    pub(crate) fn validate(&self, key: &str, problems: &mut Problems) {
        if self.polygon.len() < 3 {
            problems.push(
                format!("{key}.polygon"),
                format!("needs at least 3 points, has {}", self.polygon.len()),
            );
        } else if Polygon::new(self.polygon.iter().map(|p| (p[0], p[1])).collect()).area() <= 0.0 {
            problems.push(format!("{key}.polygon"), "has no area");
        }
        if self.coordinates == Coordinates::Normalised
            && self
                .polygon
                .iter()
                .flatten()
                .any(|v| !(-0.01..=1.01).contains(v))
        {
            problems.push(
                format!("{key}.polygon"),
                "normalised coordinates must lie in 0..1 (set coordinates = \"pixels\" for pixel values)",
            );
        }
        if let (Some(min), Some(max)) = (self.min, self.max) {
            if min > max {
                problems.push(
                    format!("{key}.min"),
                    format!("min {min} is above max {max}"),
                );
            }
        }
        if let Some(f) = self.overlap_fraction {
            problems.unit(format!("{key}.overlap-fraction"), f);
        }
    }
}

impl CameraConfig {
    /// The camera's own checks; its id's uniqueness is the cameras' (see
    /// [`validate_cameras`]). `loaded` resolves the paths of a files source.
    pub(crate) fn validate(&self, key: &str, loaded: &LoadedConfig, problems: &mut Problems) {
        self.source
            .validate(&format!("{key}.source"), loaded, problems);
        let mut zone_names = BTreeSet::new();
        for (j, z) in self.zones.iter().enumerate() {
            let zkey = format!("{key}.zones[{j}]");
            if problems.name(format!("{zkey}.name"), &z.name) && !zone_names.insert(&z.name) {
                problems.push(
                    format!("{zkey}.name"),
                    format!("zone {:?} is used twice in this camera", z.name),
                );
            }
            z.validate(&zkey, problems);
        }
    }
}

impl SourceSettings {
    /// `loaded` resolves the path of a files source, which must match files now.
    pub(crate) fn validate(&self, key: &str, loaded: &LoadedConfig, problems: &mut Problems) {
        match self {
            SourceSettings::V4l2(v) => {
                if v.formats.is_empty() {
                    problems.push(format!("{key}.formats"), "list at least one pixel format");
                }
                if v.width == 0 || v.height == 0 {
                    problems.push(format!("{key}.width"), "width and height must be positive");
                }
                problems.at_least(format!("{key}.fps"), v.fps, 1, "");
                problems.between(format!("{key}.buffers"), v.buffers, 2, 32, "");
                problems.at_least(
                    format!("{key}.frame-timeout-ms"),
                    v.frame_timeout_ms,
                    100,
                    "",
                );
            }
            SourceSettings::Files(f) => {
                problems.up_to(format!("{key}.fps"), f.fps, 1000.0);
                if let Err(e) = crate::capture::files::expand(&loaded.resolve(&f.path)) {
                    problems.push(format!("{key}.path"), e.to_string());
                }
            }
        }
    }
}

/// Every camera under `key` (`cameras`): each one's checks, then the ids and zone names
/// that must be unique.
pub(crate) fn validate_cameras(
    cameras: &[CameraConfig],
    key: &str,
    loaded: &LoadedConfig,
    problems: &mut Problems,
) {
    let mut camera_ids = BTreeSet::new();
    for (i, cam) in cameras.iter().enumerate() {
        let ckey = format!("{key}[{i}]");
        if problems.name(format!("{ckey}.id"), &cam.id) && !camera_ids.insert(&cam.id) {
            problems.push(
                format!("{ckey}.id"),
                format!("camera id {:?} is used twice", cam.id),
            );
        }
        cam.validate(&ckey, loaded, problems);
    }
    // Zone names become MQTT topic levels of the device: unique across its cameras.
    let mut seen = BTreeMap::new();
    for (i, cam) in cameras.iter().enumerate() {
        for (j, z) in cam.zones.iter().enumerate() {
            if let Some(other) = seen.insert(&z.name, &cam.id) {
                if other != &cam.id {
                    problems.push(
                        format!("{key}[{i}].zones[{j}].name"),
                        format!(
                            "zone {:?} also exists in camera {other:?}; zone names are unique per device",
                            z.name
                        ),
                    );
                }
            }
        }
    }
}
