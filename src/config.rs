//! Configuration: strict TOML, named defaults, then a validation pass that names the key
//! path and the line of anything wrong. `check-config` and every command that reads a
//! config go through [`Config::load`], so they can never disagree.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::vision::{DetectorOptions, Manifest};

/// The commented default configuration, as shipped in `examples/shelfwatch.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../examples/shelfwatch.toml");

/// Exit status for a configuration error (sysexits.h EX_CONFIG).
pub const EX_CONFIG: u8 = 78;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub model: ModelConfig,
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
}

/// The bundled counting model.
pub fn default_manifest() -> PathBuf {
    PathBuf::from("ssd_mobilenetv2_oidv4.toml")
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
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    if source.is_dir() {
        return source;
    }
    PathBuf::from("/usr/share/shelfwatch/models")
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
        let m = &self.config.model;
        if m.manifest.components().count() == 1 && !m.manifest.is_absolute() {
            let dir = match &m.model_dir {
                Some(d) => self.resolve(d),
                None => default_model_dir(),
            };
            dir.join(&m.manifest)
        } else {
            self.resolve(&m.manifest)
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
            input_size: None,
        }
    }

    /// Semantic checks the types cannot express: (key path, message) for each problem.
    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
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
        if m.max_detections == Some(0) {
            problems.push(("model.max-detections".into(), "must be at least 1".into()));
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
            }
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
        let (name, index) = match seg.find('[') {
            Some(i) => (&seg[..i], seg[i + 1..seg.len() - 1].parse::<usize>().ok()),
            None => (seg, None),
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

    #[test]
    fn a_wrong_type_names_the_key() {
        let e = load("[model]\nmax-detections = \"many\"\n").unwrap_err();
        assert_eq!(e.0[0].key, "model.max-detections");
        assert_eq!(e.0[0].line, Some(2));
    }
}
