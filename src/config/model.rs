//! `[model]`: which detector runs, where its files are and how its output is filtered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{LoadedConfig, Problems};
use crate::vision::Manifest;

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
    /// `"shelfwatch"` (the default): the depthwise convolutions run on shelfwatch's own
    /// kernels (AVX2+FMA, NEON, chosen from the CPU at start; vision::kernels) with their
    /// ReLU6 fused. `"tract"`: tract's own, to compare (`shelfwatch bench --kernels`) or
    /// to fall back to.
    #[serde(default)]
    pub kernels: crate::vision::kernels::Kernels,
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
            kernels: Default::default(),
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

impl ModelConfig {
    /// `loaded` locates the manifest, which must load and know the labels named here.
    pub(crate) fn validate(&self, key: &str, loaded: &LoadedConfig, problems: &mut Problems) {
        problems.at_least(
            format!("{key}.rescale-interval-s"),
            self.rescale_interval_s,
            1,
            "a probe on every frame would multiply its cost",
        );
        if matches!(self.input_size, InputSize::Fixed([w, h]) if w == 0 || h == 0) {
            problems.push(
                format!("{key}.input-size"),
                "width and height must be positive",
            );
        }
        if let Some(t) = self.score_threshold {
            problems.unit(format!("{key}.score-threshold"), t);
        }
        if let Some(t) = self.iou_threshold {
            problems.unit(format!("{key}.iou-threshold"), t);
        }
        for (label, &t) in &self.label_thresholds {
            problems.unit(format!("{key}.label-thresholds.{label}"), t);
        }
        problems.between(format!("{key}.threads"), self.threads, 1, MAX_THREADS, "");
        if let Some(n) = self.max_detections {
            problems.at_least(format!("{key}.max-detections"), n, 1, "");
        }
        // The manifest is small and holds the labels: check it now rather than at start-up
        // of a daemon that would then fail on the first reload.
        match Manifest::load(&loaded.manifest_path()) {
            Err(e) => problems.push(format!("{key}.manifest"), e.to_string()),
            Ok(manifest) => {
                for label in self.label_thresholds.keys() {
                    if manifest.label_index(label).is_none() {
                        problems.push(
                            format!("{key}.label-thresholds.{label}"),
                            format!(
                                "model {} has no label {label:?} (labels: {})",
                                manifest.manifest.name,
                                manifest.labels.join(", ")
                            ),
                        );
                    }
                }
                if let InputSize::Fixed([w, h]) = self.input_size {
                    if let Err(mult) = manifest.manifest.input.check_size(w, h) {
                        problems.push(
                            format!("{key}.input-size"),
                            format!(
                                "model {} runs at multiples of {mult}, not {w}x{h}",
                                manifest.manifest.name
                            ),
                        );
                    }
                }
            }
        }
    }
}
