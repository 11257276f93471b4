//! The model manifest: a TOML file beside each model that says how to feed it and how
//! to read its outputs. shelfwatch never guesses a model's preprocessing or decoder.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::VisionError;

/// Everything needed to run one model correctly, as written in `<model>.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version; only 1 exists.
    pub schema: u32,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Model file, relative to the manifest's directory.
    pub file: PathBuf,
    /// Lower-case hex sha256 of `file`; loading refuses any other content.
    pub sha256: String,
    /// Label file (one label a line, index order), relative to the manifest's directory.
    /// Detectors need one; an embedding model has none.
    #[serde(default)]
    pub labels: Option<PathBuf>,
    pub licence: String,
    #[serde(default)]
    pub source: Option<Source>,
    pub input: InputSpec,
    pub decoder: DecoderSpec,
    #[serde(default)]
    pub postprocess: Postprocess,
    /// For fully convolutional counters: the product sizes the model was trained on, so
    /// shelfwatch can scale each shelf zone to them (`vision::scale`). Absent: the model
    /// runs on the whole frame at its input size.
    #[serde(default)]
    pub scale: Option<ScaleSpec>,
}

/// The band of product widths, in heat-map cells (`decoder.stride` input pixels), that
/// a fully convolutional counter was trained to find, and the width the scale rule aims
/// the median product of a zone at.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScaleSpec {
    pub min_width_cells: f32,
    pub max_width_cells: f32,
    pub target_width_cells: f32,
}

/// Where the weights came from, for the model card and for audits.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Source {
    pub package: String,
    pub version: String,
    #[serde(default)]
    pub member: Option<String>,
    #[serde(default)]
    pub converter: Option<String>,
}

/// Tensor layout of the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    Nchw,
    Nhwc,
}

/// Channel order the model expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColourOrder {
    Rgb,
    Bgr,
}

/// How a frame of any aspect ratio is fitted to the model input.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizePolicy {
    /// Scale each axis independently (what SSD models were trained with).
    Stretch,
    /// Keep the aspect ratio and pad (what YOLO exports expect).
    Letterbox,
    /// Scale the shorter side to `resize-shorter-side`, then take the centre
    /// width x height (what ImageNet classifiers and their embeddings expect).
    CentreCrop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InputSpec {
    /// Input tensor name; informational, the first model input is used.
    #[serde(default)]
    pub name: Option<String>,
    pub width: u32,
    pub height: u32,
    pub layout: Layout,
    pub colour: ColourOrder,
    pub resize: ResizePolicy,
    /// For `centre-crop`: the shorter side is scaled to this before the centre is taken.
    #[serde(default)]
    pub resize_shorter_side: Option<u32>,
    /// For fully convolutional models that run at other sizes (`--input-size`): the
    /// width and height must be multiples of this (the deepest stride the graph adds
    /// feature maps at). Absent: only `width` x `height`, or a size the graph accepts.
    #[serde(default)]
    pub size_multiple: Option<u32>,
    /// Value written into letterbox padding, 0..255 before normalisation.
    #[serde(default = "default_pad_value")]
    pub pad_value: u8,
    /// Per channel (in the model's colour order): value = (pixel - mean) / std.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl InputSpec {
    /// `Err(multiple)` when `width` x `height` breaks the model's `size-multiple`.
    pub fn check_size(&self, width: u32, height: u32) -> Result<(), u32> {
        match self.size_multiple {
            Some(m) if m > 1 && (!width.is_multiple_of(m) || !height.is_multiple_of(m)) => Err(m),
            _ => Ok(()),
        }
    }
}

fn default_pad_value() -> u8 {
    114
}

/// Which decoder turns the raw outputs into boxes, with its parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DecoderSpec {
    Ssd(SsdSpec),
    Yolov5(YoloSpec),
    Yolov8(YoloSpec),
    Heatmap(HeatmapSpec),
    /// Not a detector: one image embedding per input (product identification).
    Embedding(EmbeddingSpec),
}

/// An image-embedding model: one vector per image, compared by cosine similarity.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EmbeddingSpec {
    /// Output tensor [1, dimensions].
    pub output: String,
    pub dimensions: usize,
    /// The graph already divides by the L2 norm; otherwise shelfwatch does.
    #[serde(default)]
    pub normalised: bool,
}

/// A centre heat map with box terms per cell (CenterNet-style), for counting models
/// that find objects by their centres. Per cell (x, y) of the stride-`stride` grid:
/// the heat per class, and (dx, dy, log w, log h) in cells: centre
/// ((x + 0.5 + dx) * stride, (y + 0.5 + dy) * stride), size (e^lw * stride, e^lh * stride)
/// in model-input pixels.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HeatmapSpec {
    /// [1, classes, H, W].
    pub heat_output: String,
    /// [1, 4, H, W]: dx, dy, log w, log h.
    pub box_output: String,
    /// [1, classes, H, W]: the heat max-pooled over 3x3 (stride 1); a cell is a peak when
    /// its heat equals it. Computed here when the model does not provide it.
    #[serde(default)]
    pub peak_output: Option<String>,
    /// Input pixels per grid cell.
    pub stride: u32,
    /// The heat is a logit (a sigmoid is applied) rather than a probability.
    #[serde(default)]
    pub heat_is_logit: bool,
    /// Size-aware suppression: a weaker peak whose centre lies inside this fraction
    /// (centred) of a stronger peak's box is the same object seen twice. 1 = the whole box.
    #[serde(default = "one")]
    pub suppression_box_fraction: f32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SsdSpec {
    pub boxes_output: String,
    pub scores_output: String,
    pub background_class: Option<usize>,
    /// (y, x, h, w) scales the encodings were divided by.
    pub box_scales: [f32; 4],
    pub anchors: AnchorSpec,
}

/// The standard multi-layer SSD anchor generator's parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AnchorSpec {
    pub input_size: u32,
    pub min_scale: f32,
    pub max_scale: f32,
    pub strides: Vec<u32>,
    pub aspect_ratios: Vec<f32>,
    #[serde(default)]
    pub reduce_boxes_in_lowest_layer: bool,
    #[serde(default = "one")]
    pub interpolated_scale_aspect_ratio: f32,
    /// Expected anchor count, checked against the generator and the model's output.
    pub count: usize,
}

fn one() -> f32 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct YoloSpec {
    /// Output tensor name; the first output when absent.
    #[serde(default)]
    pub output: Option<String>,
}

/// The model's recommended post-processing; config may override each value.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Postprocess {
    #[serde(default = "default_score_threshold")]
    pub score_threshold: f32,
    #[serde(default = "default_iou_threshold")]
    pub iou_threshold: f32,
    #[serde(default = "default_max_detections")]
    pub max_detections: usize,
}

fn default_score_threshold() -> f32 {
    0.4
}
fn default_iou_threshold() -> f32 {
    0.45
}
fn default_max_detections() -> usize {
    100
}

impl Default for Postprocess {
    fn default() -> Self {
        Self {
            score_threshold: default_score_threshold(),
            iou_threshold: default_iou_threshold(),
            max_detections: default_max_detections(),
        }
    }
}

/// A manifest with its files resolved and checked.
#[derive(Debug, Clone)]
pub struct LoadedManifest {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub model_path: PathBuf,
    pub labels: Vec<String>,
}

impl Manifest {
    /// Reads and parses a manifest, resolving its files against the manifest's directory.
    /// The model file's hash is not checked here; see [`LoadedManifest::verify_model`].
    pub fn load(path: &Path) -> Result<LoadedManifest, VisionError> {
        let text = std::fs::read_to_string(path).map_err(|error| VisionError::Io {
            path: path.to_owned(),
            error,
        })?;
        let manifest: Manifest = toml::from_str(&text).map_err(|e| VisionError::Manifest {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if manifest.schema != 1 {
            return Err(VisionError::Manifest {
                path: path.to_owned(),
                message: format!(
                    "schema {} is not supported (this build reads 1)",
                    manifest.schema
                ),
            });
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let model_path = dir.join(&manifest.file);
        let invalid = |message: String| VisionError::Manifest {
            path: path.to_owned(),
            message,
        };
        if manifest.input.resize == ResizePolicy::CentreCrop {
            match manifest.input.resize_shorter_side {
                Some(s) if s >= manifest.input.width.max(manifest.input.height) => {}
                Some(s) => {
                    return Err(invalid(format!(
                        "input.resize-shorter-side = {s} is smaller than the input size {}x{}",
                        manifest.input.width, manifest.input.height
                    )))
                }
                None => {
                    return Err(invalid(
                        "input.resize = \"centre-crop\" needs input.resize-shorter-side".into(),
                    ))
                }
            }
        }
        if let Some(sc) = &manifest.scale {
            let ordered = sc.min_width_cells > 0.0
                && sc.min_width_cells <= sc.target_width_cells
                && sc.target_width_cells <= sc.max_width_cells
                && sc.max_width_cells.is_finite();
            if !ordered {
                return Err(invalid(format!(
                    "scale: needs 0 < min-width-cells <= target-width-cells <= \
                     max-width-cells, got {} / {} / {}",
                    sc.min_width_cells, sc.target_width_cells, sc.max_width_cells
                )));
            }
            if manifest.input.size_multiple.is_none()
                || manifest.input.resize != ResizePolicy::Stretch
                || !matches!(manifest.decoder, DecoderSpec::Heatmap(_))
            {
                return Err(invalid(
                    "scale: only a heat-map model with input.size-multiple and \
                     input.resize = \"stretch\" can be run at the scale of a zone"
                        .into(),
                ));
            }
        }
        let labels = match (&manifest.labels, &manifest.decoder) {
            (Some(file), _) => {
                let labels_path = dir.join(file);
                let labels_text =
                    std::fs::read_to_string(&labels_path).map_err(|error| VisionError::Io {
                        path: labels_path.clone(),
                        error,
                    })?;
                let labels: Vec<String> =
                    labels_text.lines().map(|l| l.trim().to_owned()).collect();
                if labels.is_empty() {
                    return Err(VisionError::Manifest {
                        path: labels_path,
                        message: "label file is empty".into(),
                    });
                }
                labels
            }
            (None, DecoderSpec::Embedding(_)) => Vec::new(),
            (None, _) => {
                return Err(invalid(
                    "labels: missing; a detector needs its label file".into(),
                ))
            }
        };
        Ok(LoadedManifest {
            path: path.to_owned(),
            manifest,
            model_path,
            labels,
        })
    }
}

impl LoadedManifest {
    /// Reads the model file and checks it against the manifest's sha256, so a truncated
    /// copy or a model swapped without its manifest is refused instead of mis-decoded.
    pub fn verify_model(&self) -> Result<Vec<u8>, VisionError> {
        let bytes = std::fs::read(&self.model_path).map_err(|error| VisionError::Io {
            path: self.model_path.clone(),
            error,
        })?;
        let actual = hex(&Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(self.manifest.sha256.trim()) {
            return Err(VisionError::Checksum {
                path: self.model_path.clone(),
                manifest: self.path.clone(),
                expected: self.manifest.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Index of a label by name (exact match), for per-label thresholds.
    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == name)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
