//! Configuration: strict TOML, named defaults, then a validation pass that names the key
//! path and the line of anything wrong. `check-config` and every command that reads a
//! config go through [`Config::load`], so they can never disagree.
//!
//! This file loads the file, locates a problem's key path in it and hands each section
//! to its own checks; the sections, with their types, defaults and checks, are in the
//! files next to it, the checks' wording in [`Problems`].

mod camera;
mod counting;
mod daemon;
mod device;
mod http;
#[cfg(test)]
mod man_page;
mod model;
mod mqtt;
mod problems;
mod sinks;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use camera::{CameraConfig, Coordinates, ZoneConfig};
pub use counting::CountingConfig;
pub use daemon::{HealthConfig, SnapshotConfig, StateConfig};
pub use device::DeviceConfig;
pub use http::{read_token, HttpConfig};
pub use model::{
    default_manifest, default_model_cache, default_model_dir, default_rescale_interval_s,
    default_threads, InputSize, ModelConfig, MAX_THREADS,
};
pub use problems::check_name;
pub(crate) use problems::Problems;

use crate::identify::IdentifyConfig;
use crate::publish::SinkSettings;
use crate::vision::DetectorOptions;
use sinks::default_sinks;

/// The commented default configuration, as shipped in `examples/shelfwatch.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../../examples/shelfwatch.toml");

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
    /// The local web page, JSON API and `/metrics`; absent: no HTTP server.
    #[serde(default)]
    pub http: Option<HttpConfig>,
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
            http: None,
        }
    }
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
                    .into_vec()
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
    pub(crate) fn model_file(&self, p: &Path) -> PathBuf {
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
            kernels: d.kernels,
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
            kernels: m.kernels,
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
                kernels: d.kernels,
                cache_dir: d.cache_dir,
            },
        ))
    }

    /// Semantic checks the types cannot express, section by section: (key path, message)
    /// for each problem.
    fn validate(&self) -> Problems {
        let mut problems = Problems::new();
        let c = &self.config;
        c.device.validate("device", &mut problems);
        c.model.validate("model", self, &mut problems);
        c.counting.validate("counting", self, &mut problems);
        camera::validate_cameras(&c.cameras, "cameras", self, &mut problems);
        sinks::validate_sinks(&c.sinks, "sinks", self, &mut problems);
        c.snapshots.validate("snapshots", &mut problems);
        c.decode.validate("decode", &mut problems);
        if let Some(i) = &c.identify {
            i.validate("identify", self, &mut problems);
        }
        if let Some(h) = &c.http {
            h.validate("http", self, &mut problems);
        }
        problems
    }
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

    /// Found in the #20 review: `inf` passed check-config, then `run` panicked in
    /// `Duration::from_secs_f64`.
    #[test]
    fn an_infinite_or_huge_duration_is_refused_by_check_config_not_a_panic_at_run() {
        for text in [
            "[counting]\nwindow-seconds = inf\n",
            "[counting]\nout-of-stock-after-s = inf\n",
            "[counting]\nout-of-stock-after-s = 1e300\n",
        ] {
            let e = load(text).unwrap_err();
            let e = &e.0[0];
            assert!(e.key.starts_with("counting."), "{}", e.key);
            assert_eq!(e.line, Some(2), "{text}");
            assert!(e.message.contains("seconds (a year)"), "{}", e.message);
        }
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
