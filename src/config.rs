//! Configuration: strict TOML, named defaults, then a validation pass that names the key
//! path and the line of anything wrong. `check-config` and every command that reads a
//! config go through [`Config::load`], so they can never disagree.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::capture::SourceSettings;
use crate::counting::{CountingParams, Membership, Polygon, ZoneSpec};
use crate::identify::IdentifyConfig;
use crate::publish::{SinkSettings, StdoutSettings};
use crate::vision::{DetectorOptions, Manifest};

/// The commented default configuration, as shipped in `examples/shelfwatch.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../examples/shelfwatch.toml");

/// An MQTT topic filter a request may reply on: valid syntax, not a `$` topic.
fn check_topic_filter(f: &str) -> Result<(), String> {
    let max = crate::identify::requests::MAX_REPLY_TOPIC_BYTES;
    if f.is_empty() || f.len() > max || f.contains('\0') {
        return Err(format!("must be a topic filter of 1 to {max} bytes"));
    }
    if f.starts_with('$') || f.starts_with('+') || f.starts_with('#') {
        return Err(format!(
            "{f:?} would match broker ($) topics or every topic; name a first level"
        ));
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (n, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        if wild && *level != "+" && *level != "#" || *level == "#" && n + 1 != levels.len() {
            return Err(format!(
                "{f:?}: + and # stand for whole levels, and # only at the end"
            ));
        }
    }
    Ok(())
}

/// Exit status for a configuration error (sysexits.h EX_CONFIG).
pub const EX_CONFIG: u8 = 78;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub device: DeviceConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub counting: CountingConfig,
    #[serde(default)]
    pub cameras: Vec<CameraConfig>,
    #[serde(default = "default_sinks")]
    pub sinks: Vec<SinkSettings>,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub snapshots: SnapshotConfig,
    /// Product identification against a gallery of enrolled SKUs; absent: counts are
    /// per detector label.
    #[serde(default)]
    pub identify: Option<IdentifyConfig>,
    /// Bounds on every image decoded: files cameras' images and MJPEG frames.
    #[serde(default)]
    pub decode: crate::capture::DecodeLimits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device: DeviceConfig::default(),
            model: ModelConfig::default(),
            counting: CountingConfig::default(),
            cameras: Vec::new(),
            sinks: default_sinks(),
            state: StateConfig::default(),
            health: HealthConfig::default(),
            snapshots: SnapshotConfig::default(),
            identify: None,
            decode: crate::capture::DecodeLimits::default(),
        }
    }
}

fn default_sinks() -> Vec<SinkSettings> {
    vec![SinkSettings::Stdout(StdoutSettings::default())]
}

/// This device, as subscribers know it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device id in every message (and MQTT topic): letters, digits, `-` and `_`.
    /// Default: the host name.
    #[serde(default = "default_device_id")]
    pub id: String,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            id: default_device_id(),
        }
    }
}

fn default_device_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let id: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() {
        "shelfwatch".into()
    } else {
        id
    }
}

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
}

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
}

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

/// Which detector runs and how its output is filtered.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ModelConfig {
    /// Model manifest. A bare file name is looked up in `model-dir`; any other relative
    /// path is relative to the config file.
    #[serde(default = "default_manifest")]
    pub manifest: PathBuf,
    /// Directory of the bundled models; see [`default_model_dir`].
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// Minimum score for a detection; the manifest's recommendation when absent.
    #[serde(default)]
    pub score_threshold: Option<f32>,
    /// Per-label minimum scores, by the model's label names.
    #[serde(default)]
    pub label_thresholds: BTreeMap<String, f32>,
    /// IoU above which a weaker box of the same class is suppressed.
    #[serde(default)]
    pub iou_threshold: Option<f32>,
    /// Upper bound on detections per frame.
    #[serde(default)]
    pub max_detections: Option<usize>,
    /// `"auto"` (the default): a model that declares its trained product sizes (the shelf
    /// counter's `[scale]`) is run per zone at the scale that puts the zone's products in
    /// that band, tiled where a zone is large (vision::scale, docs/counting-model.md).
    /// `[width, height]`: the whole frame at this input size instead, for fully
    /// convolutional models (multiples of the model's `size-multiple`).
    #[serde(default)]
    pub input_size: InputSize,
    /// Seconds between two measurements of a zone's product scale (also measured at
    /// start and on reload). A fixed camera's scale only changes when the shelf is
    /// re-stocked with other products, so this is a check, not a tracking loop.
    #[serde(default = "default_rescale_interval_s")]
    pub rescale_interval_s: u64,
    /// Threads for the matrix products of an inference: one pool, shared by the cameras
    /// (each of which has its own inference thread). More threads cut a frame's latency;
    /// on a board with a camera per core, the cameras' own threads use the cores already.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Keep the decluttered model under `<state.dir>/model-cache` so that restarts skip
    /// the ONNX parse and graph simplification (vision::cache).
    #[serde(default = "default_model_cache")]
    pub cache: bool,
}

/// `[model] input-size`: the scale rule, or one fixed size for the whole frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputSize {
    #[default]
    Auto,
    Fixed([u32; 2]),
}

impl InputSize {
    /// The fixed size, if one was asked for.
    pub fn fixed(self) -> Option<(u32, u32)> {
        match self {
            InputSize::Auto => None,
            InputSize::Fixed([w, h]) => Some((w, h)),
        }
    }
}

impl<'de> Deserialize<'de> for InputSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = InputSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\" or [width, height]")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<InputSize, E> {
                if v == "auto" {
                    Ok(InputSize::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<InputSize, A::Error> {
                let w = a
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(0, &self))?;
                let h = a
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(1, &self))?;
                if a.next_element::<u32>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(3, &self));
                }
                Ok(InputSize::Fixed([w, h]))
            }
        }
        d.deserialize_any(V)
    }
}

/// Ten minutes: a probe costs a few passes of the model, and a shelf's products keep
/// their size between restocks.
pub fn default_rescale_interval_s() -> u64 {
    600
}

/// On: a restart of a board on a slow SD card is where load time shows.
pub fn default_model_cache() -> bool {
    true
}

/// One inference thread: the daemon already runs one inference worker per camera.
pub fn default_threads() -> usize {
    1
}

/// More threads than this per inference only add scheduling overhead on the boards
/// shelfwatch targets (4 to 12 cores).
pub const MAX_THREADS: usize = 64;

/// The bundled counting model: the class-agnostic shelf counter, which counts any
/// packaged product (`ssd_mobilenetv2_oidv4.toml` knows 24 generic classes instead).
pub fn default_manifest() -> PathBuf {
    PathBuf::from("shelf_counter.toml")
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            manifest: default_manifest(),
            model_dir: None,
            score_threshold: None,
            label_thresholds: BTreeMap::new(),
            iou_threshold: None,
            max_detections: None,
            input_size: InputSize::Auto,
            rescale_interval_s: default_rescale_interval_s(),
            threads: default_threads(),
            cache: default_model_cache(),
        }
    }
}

/// Where bundled models are found when `model-dir` is not set: `$SHELFWATCH_MODEL_DIR`,
/// then the source tree's `models/` (a development checkout), then the packaged
/// `/usr/share/shelfwatch/models`.
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHELFWATCH_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    // A binary built in a checkout and run from its target directory (cargo run, the
    // tests) uses the checkout's models; an installed one uses the packaged models even
    // if a checkout happens to sit at the path it was built from.
    let tree = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = tree.join("models");
    let packaged = PathBuf::from("/usr/share/shelfwatch/models");
    let in_tree = std::env::current_exe().is_ok_and(|exe| exe.starts_with(tree));
    if source.is_dir() && (in_tree || !packaged.is_dir()) {
        return source;
    }
    packaged
}

/// A configuration problem, located as precisely as the input allows.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted key path (`model.label-thresholds.Person`); empty for whole-file errors.
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One or more configuration problems.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A validated configuration with the file it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    /// The config file, or `None` for the built-in defaults.
    pub file: Option<PathBuf>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<LoadedConfig, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                key: String::new(),
                line: None,
                message: format!("cannot read: {e}"),
            }])
        })?;
        Self::from_text(path, &text)
    }

    /// Parses and validates config text; `path` is used for messages and relative paths.
    pub fn from_text(path: &Path, text: &str) -> Result<LoadedConfig, ConfigErrors> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.span().map(|s| line_of_offset(text, s.start));
            ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                key: if key == "." { String::new() } else { key },
                line,
                message: inner.message().trim().to_owned(),
            }])
        })?;
        let loaded = LoadedConfig {
            config,
            file: Some(path.to_owned()),
        };
        let problems = loaded.validate();
        if problems.is_empty() {
            Ok(loaded)
        } else {
            let doc = toml_edit::ImDocument::parse(text.to_owned()).ok();
            Err(ConfigErrors(
                problems
                    .into_iter()
                    .map(|(key, message)| ConfigError {
                        line: doc.as_ref().and_then(|d| line_of_key(text, d, &key)),
                        file: path.to_owned(),
                        key,
                        message,
                    })
                    .collect(),
            ))
        }
    }
}

impl LoadedConfig {
    /// The built-in defaults (what an empty config file means).
    pub fn defaults() -> Self {
        Self {
            config: Config::default(),
            file: None,
        }
    }

    fn base_dir(&self) -> PathBuf {
        self.file
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// Resolves a path from the config: absolute as is, relative to the config file.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir().join(p)
        }
    }

    /// The model manifest to load.
    pub fn manifest_path(&self) -> PathBuf {
        self.model_file(&self.config.model.manifest)
    }

    /// A bare file name is a bundled model in `model-dir`; any other path is relative to
    /// the config file.
    fn model_file(&self, p: &Path) -> PathBuf {
        if p.components().count() == 1 && !p.is_absolute() {
            let dir = match &self.config.model.model_dir {
                Some(d) => self.resolve(d),
                None => default_model_dir(),
            };
            dir.join(p)
        } else {
            self.resolve(p)
        }
    }

    /// The embedding model's manifest and the gallery directory, when identification is
    /// configured.
    pub fn identify_paths(&self) -> Option<(PathBuf, PathBuf)> {
        self.config
            .identify
            .as_ref()
            .map(|i| (self.model_file(&i.model), self.resolve(&i.gallery)))
    }

    /// Embedding model options: the same threads and cache as the detector.
    pub fn embedder_options(&self) -> crate::vision::EmbedderOptions {
        let d = self.detector_options();
        crate::vision::EmbedderOptions {
            threads: d.threads,
            cache_dir: d.cache_dir,
        }
    }

    /// Detector options as configured.
    pub fn detector_options(&self) -> DetectorOptions {
        let m = &self.config.model;
        DetectorOptions {
            score_threshold: m.score_threshold,
            iou_threshold: m.iou_threshold,
            max_detections: m.max_detections,
            label_thresholds: m.label_thresholds.clone(),
            input_size: m.input_size.fixed(),
            threads: m.threads,
            cache_dir: m
                .cache
                .then(|| self.resolve(&self.config.state.dir).join("model-cache")),
        }
    }

    /// The occluder model's manifest and options, when `counting.occluder-model` is set:
    /// its own score threshold, the counting model's threads and cache.
    pub fn occluder_model(&self) -> Option<(PathBuf, DetectorOptions)> {
        let k = &self.config.counting;
        let manifest = self.model_file(k.occluder_model.as_ref()?);
        let d = self.detector_options();
        Some((
            manifest,
            DetectorOptions {
                score_threshold: Some(k.occluder_score_threshold),
                iou_threshold: None,
                max_detections: None,
                label_thresholds: BTreeMap::new(),
                input_size: None,
                threads: d.threads,
                cache_dir: d.cache_dir,
            },
        ))
    }

    /// Semantic checks the types cannot express: (key path, message) for each problem.
    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let c = &self.config;
        if let Err(m) = check_name(&c.device.id) {
            problems.push(("device.id".into(), m));
        }
        let k = &c.counting;
        if k.window_frames == 0 {
            problems.push(("counting.window-frames".into(), "must be at least 1".into()));
        }
        if !(k.min_agreement > 0.0 && k.min_agreement <= 1.0) {
            problems.push((
                "counting.min-agreement".into(),
                format!("must be in (0, 1], got {}", k.min_agreement),
            ));
        }
        if k.window_seconds.is_some_and(|s| s.is_nan() || s <= 0.0) {
            problems.push(("counting.window-seconds".into(), "must be positive".into()));
        }
        if k.out_of_stock_after_s.is_nan() || k.out_of_stock_after_s < 0.0 {
            problems.push((
                "counting.out-of-stock-after-s".into(),
                "must be zero or positive".into(),
            ));
        }
        if !(k.occluder_score_threshold > 0.0 && k.occluder_score_threshold <= 1.0) {
            problems.push((
                "counting.occluder-score-threshold".into(),
                format!("must be in (0, 1], got {}", k.occluder_score_threshold),
            ));
        }
        if k.occluder_model.is_some() && k.occluders.is_empty() {
            problems.push((
                "counting.occluders".into(),
                "occluder-model is set: list the labels it should find".into(),
            ));
        }
        c.decode.validate("decode", &mut problems);
        if c.model.rescale_interval_s == 0 {
            problems.push((
                "model.rescale-interval-s".into(),
                "must be at least 1 (a probe on every frame would multiply its cost)".into(),
            ));
        }
        if matches!(c.model.input_size, InputSize::Fixed([w, h]) if w == 0 || h == 0) {
            problems.push((
                "model.input-size".into(),
                "width and height must be positive".into(),
            ));
        }
        if !(k.overlap_fraction > 0.0 && k.overlap_fraction <= 1.0) {
            problems.push((
                "counting.overlap-fraction".into(),
                "must be in (0, 1]".into(),
            ));
        }
        let mut camera_ids = std::collections::BTreeSet::new();
        for (i, cam) in c.cameras.iter().enumerate() {
            let key = format!("cameras[{i}]");
            if let Err(m) = check_name(&cam.id) {
                problems.push((format!("{key}.id"), m));
            } else if !camera_ids.insert(cam.id.clone()) {
                problems.push((
                    format!("{key}.id"),
                    format!("camera id {:?} is used twice", cam.id),
                ));
            }
            match &cam.source {
                SourceSettings::V4l2(v) => {
                    if v.formats.is_empty() {
                        problems.push((
                            format!("{key}.source.formats"),
                            "list at least one pixel format".into(),
                        ));
                    }
                    if v.width == 0 || v.height == 0 {
                        problems.push((
                            format!("{key}.source.width"),
                            "width and height must be positive".into(),
                        ));
                    }
                    if v.fps == 0 {
                        problems.push((format!("{key}.source.fps"), "must be at least 1".into()));
                    }
                    if v.buffers < 2 || v.buffers > 32 {
                        problems.push((
                            format!("{key}.source.buffers"),
                            "must be between 2 and 32".into(),
                        ));
                    }
                    if v.frame_timeout_ms < 100 {
                        problems.push((
                            format!("{key}.source.frame-timeout-ms"),
                            "must be at least 100".into(),
                        ));
                    }
                }
                SourceSettings::Files(f) => {
                    if !(f.fps > 0.0 && f.fps <= 1000.0) {
                        problems.push((format!("{key}.source.fps"), "must be in (0, 1000]".into()));
                    }
                    if let Err(e) = crate::capture::files::expand(&self.resolve(&f.path)) {
                        problems.push((format!("{key}.source.path"), e.to_string()));
                    }
                }
            }
            let mut zone_names = std::collections::BTreeSet::new();
            for (j, z) in cam.zones.iter().enumerate() {
                let zkey = format!("{key}.zones[{j}]");
                if let Err(m) = check_name(&z.name) {
                    problems.push((format!("{zkey}.name"), m));
                } else if !zone_names.insert(z.name.clone()) {
                    problems.push((
                        format!("{zkey}.name"),
                        format!("zone {:?} is used twice in this camera", z.name),
                    ));
                }
                if z.polygon.len() < 3 {
                    problems.push((
                        format!("{zkey}.polygon"),
                        format!("needs at least 3 points, has {}", z.polygon.len()),
                    ));
                } else if Polygon::new(z.polygon.iter().map(|p| (p[0], p[1])).collect()).area()
                    <= 0.0
                {
                    problems.push((format!("{zkey}.polygon"), "has no area".into()));
                }
                if z.coordinates == Coordinates::Normalised
                    && z.polygon
                        .iter()
                        .flatten()
                        .any(|v| !(-0.01..=1.01).contains(v))
                {
                    problems.push((
                        format!("{zkey}.polygon"),
                        "normalised coordinates must lie in 0..1 (set coordinates = \"pixels\" for pixel values)".into(),
                    ));
                }
                if let (Some(min), Some(max)) = (z.min, z.max) {
                    if min > max {
                        problems.push((
                            format!("{zkey}.min"),
                            format!("min {min} is above max {max}"),
                        ));
                    }
                }
                if z.overlap_fraction.is_some_and(|f| !(f > 0.0 && f <= 1.0)) {
                    problems.push((
                        format!("{zkey}.overlap-fraction"),
                        "must be in (0, 1]".into(),
                    ));
                }
            }
        }
        if c.sinks.is_empty() {
            problems.push(("sinks".into(), "configure at least one sink".into()));
        }
        // Zone names become MQTT topic levels of the device: unique across its cameras.
        let mut seen = std::collections::BTreeMap::new();
        for (i, cam) in c.cameras.iter().enumerate() {
            for (j, z) in cam.zones.iter().enumerate() {
                if let Some(other) = seen.insert(z.name.clone(), cam.id.clone()) {
                    if other != cam.id {
                        problems.push((
                            format!("cameras[{i}].zones[{j}].name"),
                            format!("zone {:?} also exists in camera {other:?}; zone names are unique per device", z.name),
                        ));
                    }
                }
            }
        }
        for (i, sink) in c.sinks.iter().enumerate() {
            let SinkSettings::Mqtt(m) = sink else {
                continue;
            };
            let key = format!("sinks[{i}]");
            if m.prefix.is_empty() || m.prefix.split('/').any(|level| check_name(level).is_err()) {
                problems.push((
                    format!("{key}.prefix"),
                    format!(
                        "{:?}: topic levels of letters, digits, '-' and '_', separated by '/'",
                        m.prefix
                    ),
                ));
            }
            if let Some(id) = &m.client_id {
                if check_name(id).is_err() {
                    problems.push((
                        format!("{key}.client-id"),
                        "letters, digits, '-' and '_' only".into(),
                    ));
                }
            }
            if m.broker != "embedded"
                && m.broker
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
            {
                problems.push((
                    format!("{key}.broker"),
                    format!("{:?}: expected \"embedded\" or host:port", m.broker),
                ));
            }
            if m.password_file.is_some() && m.username.is_none() {
                problems.push((format!("{key}.password-file"), "needs a username".into()));
            }
            if let Some(p) = &m.password_file {
                if let Err(e) = crate::fsutil::check_secret_file(&self.resolve(p)) {
                    problems.push((format!("{key}.password-file"), e));
                }
            }
            if m.broker == "embedded" {
                self.validate_embedded_broker(&key, m, &mut problems);
            }
            if let Some(t) = &m.tls {
                if let Err(e) = std::fs::metadata(self.resolve(&t.ca_file)) {
                    problems.push((
                        format!("{key}.tls.ca-file"),
                        format!("{}: {e}", self.resolve(&t.ca_file).display()),
                    ));
                }
                if let Some(k) = &t.client_key {
                    if let Err(e) = crate::fsutil::check_secret_file(&self.resolve(k)) {
                        problems.push((format!("{key}.tls.client-key"), e));
                    }
                }
            }
            if m.keep_alive_s < 5 || m.keep_alive_s > 3600 {
                problems.push((
                    format!("{key}.keep-alive-s"),
                    "must be between 5 and 3600".into(),
                ));
            }
        }
        if c.snapshots.interval_s.is_some_and(|s| s > 0) && c.snapshots.dir.is_none() {
            problems.push((
                "snapshots.interval-s".into(),
                "periodic snapshots need snapshots.dir".into(),
            ));
        }
        let m = &self.config.model;
        let mut unit = |key: String, v: f32| {
            if !(v > 0.0 && v <= 1.0) {
                problems.push((key, format!("must be in (0, 1], got {v}")));
            }
        };
        if let Some(t) = m.score_threshold {
            unit("model.score-threshold".into(), t);
        }
        if let Some(t) = m.iou_threshold {
            unit("model.iou-threshold".into(), t);
        }
        for (label, &t) in &m.label_thresholds {
            unit(format!("model.label-thresholds.{label}"), t);
        }
        if !(1..=MAX_THREADS).contains(&m.threads) {
            problems.push((
                "model.threads".into(),
                format!("must be between 1 and {MAX_THREADS}, got {}", m.threads),
            ));
        }
        if m.max_detections == Some(0) {
            problems.push(("model.max-detections".into(), "must be at least 1".into()));
        }
        if let Some(i) = &c.identify {
            self.validate_identify(i, &mut problems);
        }
        // The manifest is small and holds the labels: check it now rather than at start-up
        // of a daemon that would then fail on the first reload.
        let manifest_path = self.manifest_path();
        match Manifest::load(&manifest_path) {
            Err(e) => problems.push(("model.manifest".into(), e.to_string())),
            Ok(manifest) => {
                for label in m.label_thresholds.keys() {
                    if manifest.label_index(label).is_none() {
                        problems.push((
                            format!("model.label-thresholds.{label}"),
                            format!(
                                "model {} has no label {label:?} (labels: {})",
                                manifest.manifest.name,
                                manifest.labels.join(", ")
                            ),
                        ));
                    }
                }
                if let InputSize::Fixed([w, h]) = m.input_size {
                    if let Err(mult) = manifest.manifest.input.check_size(w, h) {
                        problems.push((
                            "model.input-size".into(),
                            format!(
                                "model {} runs at multiples of {mult}, not {w}x{h}",
                                manifest.manifest.name
                            ),
                        ));
                    }
                }
            }
        }
        if let Some((path, _)) = self.occluder_model() {
            match Manifest::load(&path) {
                Err(e) => problems.push(("counting.occluder-model".into(), e.to_string())),
                Ok(manifest) => {
                    for label in &c.counting.occluders {
                        if manifest.label_index(label).is_none() {
                            problems.push((
                                "counting.occluders".into(),
                                format!(
                                    "occluder model {} has no label {label:?}",
                                    manifest.manifest.name
                                ),
                            ));
                        }
                    }
                }
            }
        }
        problems
    }
}

impl LoadedConfig {
    /// The embedded broker's keys of MQTT sink `key`. Run before anything binds: a
    /// broker open to the LAN without credentials is refused here, with exit 78.
    fn validate_embedded_broker(
        &self,
        key: &str,
        m: &crate::publish::mqtt::MqttSettings,
        problems: &mut Vec<(String, String)>,
    ) {
        match crate::publish::mqtt::embedded_listen_address(&m.embedded_listen) {
            Err(e) => problems.push((format!("{key}.embedded-listen"), e)),
            Ok(addr)
                if !addr.ip().is_loopback()
                    && (m.username.is_none() || m.password_file.is_none()) =>
            {
                problems.push((
                    format!("{key}.embedded-listen"),
                    format!(
                        "{addr} is not a loopback address: the embedded broker has no \
                         authentication unless username and password-file are set (then every \
                         client must log in); set them, keep it on 127.0.0.1, or use mosquitto \
                         for the LAN (docs/mqtt.md)"
                    ),
                ));
            }
            Ok(_) => {}
        }
        if m.username.is_some() && m.password_file.is_none() {
            problems.push((
                format!("{key}.password-file"),
                "the embedded broker checks username against this password: set it".into(),
            ));
        }
        if !(2..=4096).contains(&m.embedded_max_connections) {
            problems.push((
                format!("{key}.embedded-max-connections"),
                "must be between 2 and 4096 (the daemon's own client is one)".into(),
            ));
        }
        if !((4 << 10)..=(16 << 20)).contains(&m.embedded_max_packet_bytes) {
            problems.push((
                format!("{key}.embedded-max-packet-bytes"),
                "must be between 4096 and 16777216".into(),
            ));
        }
        if !(500..=60_000).contains(&m.embedded_connect_timeout_ms) {
            problems.push((
                format!("{key}.embedded-connect-timeout-ms"),
                "must be between 500 and 60000".into(),
            ));
        }
    }

    fn validate_identify(&self, i: &IdentifyConfig, problems: &mut Vec<(String, String)>) {
        for (key, v) in [
            ("identify.unknown-threshold", i.unknown_threshold),
            ("identify.mismatch-threshold", i.mismatch_threshold),
            ("identify.reuse-iou", i.reuse_iou),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                problems.push((key.into(), format!("must be in (0, 1], got {v}")));
            }
        }
        if !(1..=crate::identify::requests::MAX_TOP_K).contains(&i.top_k) {
            problems.push((
                "identify.top-k".into(),
                format!(
                    "must be between 1 and {}, got {}",
                    crate::identify::requests::MAX_TOP_K,
                    i.top_k
                ),
            ));
        }
        if !(i.requests_per_s.is_finite() && i.requests_per_s > 0.0) {
            problems.push((
                "identify.requests-per-s".into(),
                format!("must be a positive rate, got {}", i.requests_per_s),
            ));
        }
        if i.request_burst == 0 {
            problems.push(("identify.request-burst".into(), "must be at least 1".into()));
        }
        if i.max_request_pixels < 64 * 64 {
            problems.push((
                "identify.max-request-pixels".into(),
                format!(
                    "must be at least 4096 (64 x 64), got {}",
                    i.max_request_pixels
                ),
            ));
        }
        for (n, f) in i.reply_topics.iter().enumerate() {
            if let Err(m) = check_topic_filter(f) {
                problems.push((format!("identify.reply-topics[{n}]"), m));
            }
        }
        if i.max_embeddings_per_frame == 0 {
            problems.push((
                "identify.max-embeddings-per-frame".into(),
                "must be at least 1".into(),
            ));
        }
        if !(i.refresh_s.is_finite() && i.refresh_s >= 0.0) {
            problems.push((
                "identify.refresh-s".into(),
                format!("must be 0 or more seconds, got {}", i.refresh_s),
            ));
        }
        // The MQTT client takes packets up to 16 MiB; a base64 envelope is 4/3 larger.
        if !(1024..=(12 << 20)).contains(&i.max_request_bytes) {
            problems.push((
                "identify.max-request-bytes".into(),
                format!(
                    "must be between 1024 and 12582912, got {}",
                    i.max_request_bytes
                ),
            ));
        }
        let (model, gallery) = self.identify_paths().expect("identify is configured");
        match Manifest::load(&model) {
            Err(e) => problems.push(("identify.model".into(), e.to_string())),
            Ok(m) => {
                let Some(id) = crate::vision::embed::ModelId::of(&m) else {
                    problems.push((
                        "identify.model".into(),
                        format!("{}: a detector, not an embedding model", model.display()),
                    ));
                    return;
                };
                // A gallery that does not exist yet is fine (enrol, then SIGHUP); one
                // that cannot be read or belongs to another model is not.
                match crate::identify::Gallery::load(&gallery) {
                    Ok(g) => {
                        if g.model() != &id {
                            problems.push((
                                "identify.gallery".into(),
                                crate::identify::GalleryError::ModelMismatch {
                                    path: crate::identify::Gallery::path(&gallery),
                                    gallery: Box::new(g.model().clone()),
                                    model: Box::new(id),
                                }
                                .to_string(),
                            ));
                        }
                    }
                    Err(crate::identify::GalleryError::Missing { .. }) => {}
                    Err(e) => problems.push(("identify.gallery".into(), e.to_string())),
                }
            }
        }
    }
}

/// Names that end up in topics and file names: non-empty, letters, digits, `-`, `_`.
/// (No `/`, `+`, `#` or spaces: an MQTT topic built from them stays well-formed.)
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 64 {
        return Err(format!("{name:?} is longer than 64 characters"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{name:?} contains {bad:?}; use letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Line of a dotted key path in the document: the key itself, or the nearest parent
/// that exists (a missing key is reported where its table is).
fn line_of_key(text: &str, doc: &toml_edit::ImDocument<String>, key: &str) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut line = None;
    for seg in split_key(key) {
        // A key of the table as it is, else `name[index]` for an array element: a label
        // in `model.label-thresholds` may hold brackets, and `x[` made the old slicing
        // here panic (found by fuzzing, issue #19).
        let element = seg
            .strip_suffix(']')
            .and_then(|s| s.rsplit_once('['))
            .and_then(|(name, i)| Some((name, i.parse::<usize>().ok()?)));
        let (name, index) = match element {
            Some((name, i)) if !table.contains_key(seg) => (name, Some(i)),
            _ => (seg, None),
        };
        let Some((k, item)) = table.get_key_value(name) else {
            break;
        };
        if let Some(span) = k.span() {
            line = Some(line_of_offset(text, span.start));
        }
        let item = match (item, index) {
            (toml_edit::Item::ArrayOfTables(a), Some(i)) => match a.get(i) {
                Some(t) => {
                    if let Some(span) = t.span() {
                        line = Some(line_of_offset(text, span.start));
                    }
                    t as &dyn toml_edit::TableLike
                }
                None => break,
            },
            (item, _) => match item.as_table_like() {
                Some(t) => t,
                None => break,
            },
        };
        table = item;
    }
    line
}

/// Splits `a.b[2].c` into `a`, `b[2]`, `c`.
fn split_key(key: &str) -> impl Iterator<Item = &str> {
    key.split('.').filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<LoadedConfig, ConfigErrors> {
        Config::from_text(Path::new("test.toml"), text)
    }

    #[test]
    fn the_shipped_default_config_is_valid() {
        let c = load(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.config.model.manifest, default_manifest());
    }

    #[test]
    fn an_unknown_key_is_named_with_its_path_and_line() {
        let e = load("[model]\nscore-threshold = 0.5\nscore-treshold = 0.5\n").unwrap_err();
        let e = &e.0[0];
        assert_eq!(e.key, "model.score-treshold");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("unknown field"), "{}", e.message);
    }

    #[test]
    fn a_value_out_of_range_is_named_with_its_path_and_line() {
        let e = load("[model]\n\n[model.label-thresholds]\nBottle = 1.5\n").unwrap_err();
        assert_eq!(e.0[0].key, "model.label-thresholds.Bottle");
        assert_eq!(e.0[0].line, Some(4));
    }

    #[test]
    fn a_label_the_model_does_not_know_is_rejected() {
        let e = load("[model.label-thresholds]\nBotle = 0.5\n").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("model.label-thresholds.Botle"), "{text}");
        assert!(text.contains("no label \"Botle\""), "{text}");
    }

    /// Issue #19 (found by fuzzing): locating the line of `model.label-thresholds.x[`
    /// sliced `x[` from 2 to 1 and panicked, so `check-config` crashed instead of
    /// naming the key.
    #[test]
    fn a_label_with_brackets_is_named_with_its_line_not_a_panic() {
        for label in ["x[", "]", "[0]", "a[1", "a[1]"] {
            let e = load(&format!("[model.label-thresholds]\n{label:?} = 0.5\n")).unwrap_err();
            assert_eq!(e.0[0].key, format!("model.label-thresholds.{label}"));
            assert_eq!(e.0[0].line, Some(2), "{label}");
        }
    }

    #[test]
    fn zero_inference_threads_are_rejected_naming_the_key_and_line() {
        let e = load("[model]\nthreads = 0\n").unwrap_err();
        assert_eq!(e.0[0].key, "model.threads");
        assert_eq!(e.0[0].line, Some(2));
        assert!(e.to_string().contains("between 1 and 64"), "{e}");
    }

    #[test]
    fn an_occluder_the_occluder_model_cannot_find_is_rejected_naming_the_key() {
        let e = load("[counting]\noccluder-model = \"shelf_counter.toml\"\n").unwrap_err();
        assert_eq!(e.0[0].key, "counting.occluders");
        assert!(
            e.to_string()
                .contains("occluder model shelf_counter has no label \"Person\""),
            "{e}"
        );
        // The SSD has people.
        load("[counting]\noccluder-model = \"ssd_mobilenetv2_oidv4.toml\"\n").unwrap();
    }

    #[test]
    fn input_size_is_auto_by_default_and_accepts_auto_or_a_size_and_nothing_else() {
        assert_eq!(load("").unwrap().config.model.input_size, InputSize::Auto);
        let c = load("[model]\ninput-size = \"auto\"\n").unwrap();
        assert_eq!(c.detector_options().input_size, None);
        let e = load("[model]\ninput-size = \"big\"\n").unwrap_err();
        assert_eq!(e.0[0].key, "model.input-size");
        let e = load("[model]\ninput-size = [384, 288, 3]\n").unwrap_err();
        assert_eq!(e.0[0].key, "model.input-size");
        let e = load("[model]\nrescale-interval-s = 0\n").unwrap_err();
        assert_eq!(e.0[0].key, "model.rescale-interval-s");
    }

    #[test]
    fn an_input_size_off_the_models_multiple_is_rejected_naming_the_key_and_line() {
        let e = load("[model]\ninput-size = [400, 300]\n").unwrap_err();
        assert_eq!(e.0[0].key, "model.input-size");
        assert_eq!(e.0[0].line, Some(2));
        assert!(
            e.to_string()
                .contains("model shelf_counter runs at multiples of 32, not 400x300"),
            "{e}"
        );
        let c = load("[model]\ninput-size = [512, 384]\n").unwrap();
        assert_eq!(c.detector_options().input_size, Some((512, 384)));
    }

    // Issue #19: the MQTT password and TLS key files were read whatever their mode.
    #[test]
    fn secret_files_others_can_read_are_refused_naming_the_key_and_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (pw, key, ca) = (
            dir.path().join("mqtt-password"),
            dir.path().join("client.key"),
            dir.path().join("ca.pem"),
        );
        for f in [&pw, &key, &ca] {
            std::fs::write(f, "x\n").unwrap();
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let text = format!(
            "[[sinks]]\nkind = \"mqtt\"\nusername = \"u\"\npassword-file = {pw:?}\n\
             [sinks.tls]\nca-file = {ca:?}\nclient-key = {key:?}\n"
        );
        let e = load(&text).unwrap_err();
        let problems: Vec<_> = e.0.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(
            problems,
            [
                ("sinks[0].password-file", Some(4)),
                ("sinks[0].tls.client-key", Some(7))
            ],
            "{e}"
        );
        assert!(e.0[0].message.contains(&pw.display().to_string()), "{e}");
        assert!(e.0[1].message.contains(&key.display().to_string()), "{e}");
        assert!(e.to_string().contains("world-readable"), "{e}");
        for f in [&pw, &key] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o640)).unwrap();
        }
        load(&text).unwrap();
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let e = load("[model]\nmax-detections = \"many\"\n").unwrap_err();
        assert_eq!(e.0[0].key, "model.max-detections");
        assert_eq!(e.0[0].line, Some(2));
    }
}
