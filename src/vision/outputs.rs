//! Decoders: raw model outputs -> scored candidate boxes in normalised model-input
//! coordinates (0..1 of the input tensor). Which decoder runs, and with which
//! parameters, comes from the model manifest.

use std::collections::BTreeMap;

use tract_onnx::prelude::{TValue, Tensor};

use super::manifest::{AnchorSpec, DecoderSpec, HeatmapSpec, LoadedManifest, SsdSpec};
use super::{BBox, VisionError};

/// A box before non-maximum suppression.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub class_id: usize,
    pub score: f32,
    /// Normalised model-input coordinates.
    pub bbox: BBox,
}

/// Score thresholds: one global value, overridden per label.
#[derive(Debug, Clone)]
pub struct Thresholds {
    per_class: Vec<f32>,
}

impl Thresholds {
    /// Builds per-class thresholds; a label that the model does not know is an error, not
    /// silently ignored, since a typo would otherwise leave the global threshold in force.
    pub fn new(
        manifest: &LoadedManifest,
        global: f32,
        per_label: &BTreeMap<String, f32>,
    ) -> Result<Self, VisionError> {
        let mut per_class = vec![global; manifest.labels.len()];
        for (label, &t) in per_label {
            let i = manifest
                .label_index(label)
                .ok_or_else(|| VisionError::UnknownLabel {
                    label: label.clone(),
                    model: manifest.manifest.name.clone(),
                    known: manifest.labels.join(", "),
                })?;
            per_class[i] = t;
        }
        Ok(Self { per_class })
    }

    /// The same threshold for `classes` classes.
    pub fn uniform(classes: usize, t: f32) -> Self {
        Self {
            per_class: vec![t; classes],
        }
    }

    pub fn for_class(&self, class_id: usize) -> f32 {
        self.per_class[class_id]
    }

    fn min(&self) -> f32 {
        self.per_class.iter().copied().fold(f32::INFINITY, f32::min)
    }
}

/// The decoder a manifest names, bound to the model's output indices.
#[derive(Debug, Clone)]
pub enum Decoder {
    Ssd(SsdDecoder),
    Yolo(YoloDecoder),
    Heatmap(HeatmapDecoder),
}

impl Decoder {
    /// `outputs` are the model's output names in order; `input_size` is (width, height).
    pub fn new(
        manifest: &LoadedManifest,
        outputs: &[String],
        input_size: (u32, u32),
    ) -> Result<Self, VisionError> {
        let model = manifest.manifest.name.clone();
        let find = |name: &str| -> Result<String, VisionError> {
            outputs
                .iter()
                .find(|o| o.as_str() == name)
                .cloned()
                .ok_or_else(|| VisionError::Outputs {
                    model: model.clone(),
                    message: format!(
                        "manifest names output {name:?} but the model has {outputs:?}"
                    ),
                })
        };
        let classes = manifest.labels.len();
        match &manifest.manifest.decoder {
            DecoderSpec::Ssd(spec) => {
                let boxes = find(&spec.boxes_output)?;
                let scores = find(&spec.scores_output)?;
                SsdDecoder::new(spec, classes, [boxes, scores]).map(Decoder::Ssd)
            }
            DecoderSpec::Yolov5(spec) | DecoderSpec::Yolov8(spec) => {
                let version = match &manifest.manifest.decoder {
                    DecoderSpec::Yolov5(_) => YoloVersion::V5,
                    _ => YoloVersion::V8,
                };
                let output = match &spec.output {
                    Some(name) => find(name)?,
                    None => outputs
                        .first()
                        .cloned()
                        .ok_or_else(|| VisionError::Outputs {
                            model: model.clone(),
                            message: "model has no outputs".into(),
                        })?,
                };
                Ok(Decoder::Yolo(YoloDecoder::new(
                    version, classes, input_size, output,
                )))
            }
            DecoderSpec::Heatmap(spec) => {
                let mut names = vec![find(&spec.heat_output)?, find(&spec.box_output)?];
                if let Some(p) = &spec.peak_output {
                    names.push(find(p)?);
                }
                HeatmapDecoder::new(spec, classes, input_size, names).map(Decoder::Heatmap)
            }
            DecoderSpec::Embedding(_) => Err(VisionError::Manifest {
                path: manifest.path.clone(),
                message: "an embedding model, not a detector: name it as [identify] model \
                          (or --embedder), not as the detection model"
                    .into(),
            }),
        }
    }

    /// Names of the model outputs this decoder reads, in the order `decode` expects them.
    pub fn output_names(&self) -> Vec<String> {
        match self {
            Decoder::Ssd(d) => d.outputs.to_vec(),
            Decoder::Yolo(d) => vec![d.output.clone()],
            Decoder::Heatmap(d) => d.outputs.clone(),
        }
    }

    /// Appends every candidate at or above its class threshold to `out`.
    pub fn decode(
        &self,
        outputs: &[TValue],
        thresholds: &Thresholds,
        out: &mut Vec<Candidate>,
    ) -> Result<(), VisionError> {
        match self {
            Decoder::Ssd(d) => d.decode(&outputs[0], &outputs[1], thresholds, out),
            Decoder::Yolo(d) => d.decode(&outputs[0], thresholds, out),
            Decoder::Heatmap(d) => d.decode(outputs, thresholds, out),
        }
    }
}

/// An SSD anchor in normalised coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Anchor {
    pub yc: f32,
    pub xc: f32,
    pub h: f32,
    pub w: f32,
}

/// The standard multi-layer SSD anchor set (TensorFlow object detection API's
/// `multiple_grid_anchor_generator`, as MediaPipe's SsdAnchorsCalculator computes it):
/// y-major, then x, then anchor shape.
pub fn ssd_anchors(spec: &AnchorSpec) -> Vec<Anchor> {
    let n = spec.strides.len();
    let scale = |i: usize| -> f32 {
        if n == 1 {
            (spec.min_scale + spec.max_scale) / 2.0
        } else {
            spec.min_scale + (spec.max_scale - spec.min_scale) * i as f32 / (n - 1) as f32
        }
    };
    let mut anchors = Vec::new();
    for (layer, &stride) in spec.strides.iter().enumerate() {
        let fm = spec.input_size.div_ceil(stride) as usize;
        let mut shapes: Vec<(f32, f32)> = Vec::new();
        if layer == 0 && spec.reduce_boxes_in_lowest_layer {
            shapes.extend([(0.1, 1.0), (scale(0), 2.0), (scale(0), 0.5)]);
        } else {
            let s = scale(layer);
            shapes.extend(spec.aspect_ratios.iter().map(|&r| (s, r)));
            let next = if layer + 1 == n {
                1.0
            } else {
                scale(layer + 1)
            };
            shapes.push(((s * next).sqrt(), spec.interpolated_scale_aspect_ratio));
        }
        for y in 0..fm {
            for x in 0..fm {
                for &(s, r) in &shapes {
                    anchors.push(Anchor {
                        yc: (y as f32 + 0.5) / fm as f32,
                        xc: (x as f32 + 0.5) / fm as f32,
                        h: s / r.sqrt(),
                        w: s * r.sqrt(),
                    });
                }
            }
        }
    }
    anchors
}

/// SSD with box encodings relative to anchors and per-class sigmoid logits.
#[derive(Debug, Clone)]
pub struct SsdDecoder {
    anchors: Vec<Anchor>,
    scales: [f32; 4],
    classes: usize,
    background: Option<usize>,
    outputs: [String; 2],
}

impl SsdDecoder {
    pub fn new(spec: &SsdSpec, classes: usize, outputs: [String; 2]) -> Result<Self, VisionError> {
        let anchors = ssd_anchors(&spec.anchors);
        if anchors.len() != spec.anchors.count {
            return Err(VisionError::Outputs {
                model: outputs[0].clone(),
                message: format!(
                    "anchor parameters give {} anchors, manifest says {}",
                    anchors.len(),
                    spec.anchors.count
                ),
            });
        }
        Ok(Self {
            anchors,
            scales: spec.box_scales,
            classes,
            background: spec.background_class,
            outputs,
        })
    }

    pub fn anchors(&self) -> &[Anchor] {
        &self.anchors
    }

    /// Decodes one encoding (ty, tx, th, tw) against anchor `i`.
    pub fn decode_box(&self, i: usize, enc: &[f32]) -> BBox {
        let a = &self.anchors[i];
        let [sy, sx, sh, sw] = self.scales;
        let yc = enc[0] / sy * a.h + a.yc;
        let xc = enc[1] / sx * a.w + a.xc;
        let h = (enc[2] / sh).exp() * a.h;
        let w = (enc[3] / sw).exp() * a.w;
        BBox {
            x1: xc - w / 2.0,
            y1: yc - h / 2.0,
            x2: xc + w / 2.0,
            y2: yc + h / 2.0,
        }
    }

    pub fn decode(
        &self,
        boxes: &Tensor,
        logits: &Tensor,
        thresholds: &Thresholds,
        out: &mut Vec<Candidate>,
    ) -> Result<(), VisionError> {
        let n = self.anchors.len();
        let boxes = f32_slice(boxes, &[1, n, 4], &self.outputs[0])?;
        let logits = f32_slice(logits, &[1, n, self.classes], &self.outputs[1])?;
        // Compare logits against the threshold's logit: a sigmoid only for the few that pass.
        let min_logit = logit(thresholds.min());
        for (i, row) in logits.chunks_exact(self.classes).enumerate() {
            for (c, &l) in row.iter().enumerate() {
                if l < min_logit || Some(c) == self.background {
                    continue;
                }
                let score = sigmoid(l);
                if score >= thresholds.for_class(c) {
                    out.push(Candidate {
                        class_id: c,
                        score,
                        bbox: self.decode_box(i, &boxes[i * 4..i * 4 + 4]),
                    });
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YoloVersion {
    /// `[1, N, 5 + C]`: cx, cy, w, h, objectness, class scores.
    V5,
    /// `[1, 4 + C, N]`: cx, cy, w, h, class scores (no objectness).
    V8,
}

/// Ultralytics ONNX export layouts; coordinates are model-input pixels, scores already
/// sigmoided. One class per box (the best), as ultralytics' own NMS does by default.
#[derive(Debug, Clone)]
pub struct YoloDecoder {
    version: YoloVersion,
    classes: usize,
    input_size: (u32, u32),
    output: String,
}

impl YoloDecoder {
    pub fn new(
        version: YoloVersion,
        classes: usize,
        input_size: (u32, u32),
        output: String,
    ) -> Self {
        Self {
            version,
            classes,
            input_size,
            output,
        }
    }

    pub fn decode(
        &self,
        t: &Tensor,
        thresholds: &Thresholds,
        out: &mut Vec<Candidate>,
    ) -> Result<(), VisionError> {
        let shape = t.shape();
        let c = self.classes;
        let (w, h) = (self.input_size.0 as f32, self.input_size.1 as f32);
        let mut push = |cx: f32, cy: f32, bw: f32, bh: f32, class_id: usize, score: f32| {
            if score >= thresholds.for_class(class_id) {
                out.push(Candidate {
                    class_id,
                    score,
                    bbox: BBox {
                        x1: (cx - bw / 2.0) / w,
                        y1: (cy - bh / 2.0) / h,
                        x2: (cx + bw / 2.0) / w,
                        y2: (cy + bh / 2.0) / h,
                    },
                });
            }
        };
        match self.version {
            YoloVersion::V5 => {
                let n = if shape.len() == 3 { shape[1] } else { 0 };
                let data = f32_slice(t, &[1, n, 5 + c], &self.output)?;
                for row in data.chunks_exact(5 + c) {
                    let (best, cls) = argmax(&row[5..]);
                    push(row[0], row[1], row[2], row[3], best, row[4] * cls);
                }
            }
            YoloVersion::V8 => {
                let n = if shape.len() == 3 { shape[2] } else { 0 };
                let data = f32_slice(t, &[1, 4 + c, n], &self.output)?;
                let at = |row: usize, i: usize| data[row * n + i];
                for i in 0..n {
                    let mut best = 0;
                    let mut score = f32::MIN;
                    for k in 0..c {
                        let s = at(4 + k, i);
                        if s > score {
                            score = s;
                            best = k;
                        }
                    }
                    push(at(0, i), at(1, i), at(2, i), at(3, i), best, score);
                }
            }
        }
        Ok(())
    }
}

fn argmax(v: &[f32]) -> (usize, f32) {
    v.iter().copied().enumerate().fold(
        (0, f32::MIN),
        |best, (i, s)| if s > best.1 { (i, s) } else { best },
    )
}

fn f32_slice<'a>(t: &'a Tensor, shape: &[usize], name: &str) -> Result<&'a [f32], VisionError> {
    if t.shape() != shape {
        return Err(VisionError::Outputs {
            model: name.to_owned(),
            message: format!(
                "output {name:?} has shape {:?}, expected {shape:?}",
                t.shape()
            ),
        });
    }
    let view = t.try_as_plain_ram().map_err(|e| VisionError::Outputs {
        model: name.to_owned(),
        message: format!("output {name:?} is not in host memory: {e}"),
    })?;
    view.as_slice::<f32>().map_err(|e| VisionError::Outputs {
        model: name.to_owned(),
        message: format!("output {name:?} is not f32: {e}"),
    })
}

/// Peaks of a centre heat map, with size-aware suppression (see [`HeatmapSpec`]).
#[derive(Debug, Clone)]
pub struct HeatmapDecoder {
    classes: usize,
    input_size: (u32, u32),
    grid: (usize, usize),
    stride: f32,
    /// Log sizes (in cells) are clamped here before `exp`.
    log_size_cap: f32,
    heat_is_logit: bool,
    suppression: f32,
    /// heat, boxes and, if the model has it, the max-pooled heat.
    outputs: Vec<String>,
}

/// One heat-map peak in model-input pixels.
#[derive(Debug, Clone, Copy)]
struct Peak {
    class_id: usize,
    score: f32,
    cx: f32,
    cy: f32,
    w: f32,
    h: f32,
}

impl HeatmapDecoder {
    pub fn new(
        spec: &HeatmapSpec,
        classes: usize,
        input_size: (u32, u32),
        outputs: Vec<String>,
    ) -> Result<Self, VisionError> {
        let (w, h) = input_size;
        if spec.stride == 0 || w % spec.stride != 0 || h % spec.stride != 0 {
            return Err(VisionError::Outputs {
                model: outputs[0].clone(),
                message: format!(
                    "input size {w}x{h} is not a multiple of the heat map's stride {}",
                    spec.stride
                ),
            });
        }
        Ok(Self {
            classes,
            input_size,
            grid: ((w / spec.stride) as usize, (h / spec.stride) as usize),
            stride: spec.stride as f32,
            // exp of a wild value would make an infinite box: sizes stop at e^3 x 8 =
            // 160.7 model pixels (20 cells of 8), beyond any product the scale rule
            // shows a model, whatever its stride (models/train/common.py does the same).
            log_size_cap: 3.0 + (8.0 / spec.stride as f32).ln(),
            heat_is_logit: spec.heat_is_logit,
            suppression: spec.suppression_box_fraction,
            outputs,
        })
    }

    pub fn decode(
        &self,
        outputs: &[TValue],
        thresholds: &Thresholds,
        out: &mut Vec<Candidate>,
    ) -> Result<(), VisionError> {
        let (gw, gh) = self.grid;
        let plane = gw * gh;
        let heat = f32_slice(&outputs[0], &[1, self.classes, gh, gw], &self.outputs[0])?;
        let boxes = f32_slice(&outputs[1], &[1, 4, gh, gw], &self.outputs[1])?;
        let pooled = match outputs.get(2) {
            Some(t) => Some(f32_slice(t, &[1, self.classes, gh, gw], &self.outputs[2])?),
            None => None,
        };
        let prob = |v: f32| if self.heat_is_logit { sigmoid(v) } else { v };
        let mut peaks = Vec::new();
        for c in 0..self.classes {
            let threshold = thresholds.for_class(c);
            let map = &heat[c * plane..(c + 1) * plane];
            for y in 0..gh {
                for x in 0..gw {
                    let v = map[y * gw + x];
                    // Monotone: the raw value decides being a local maximum.
                    let is_peak = match pooled {
                        Some(p) => v >= p[c * plane + y * gw + x],
                        None => neighbours(x, y, gw, gh).all(|(nx, ny)| v >= map[ny * gw + nx]),
                    };
                    if !is_peak {
                        continue;
                    }
                    let score = prob(v);
                    if score < threshold {
                        continue;
                    }
                    let term = |k: usize| boxes[k * plane + y * gw + x];
                    let size = |v: f32| v.min(self.log_size_cap).exp() * self.stride;
                    peaks.push(Peak {
                        class_id: c,
                        score,
                        cx: (x as f32 + 0.5 + term(0)) * self.stride,
                        cy: (y as f32 + 0.5 + term(1)) * self.stride,
                        w: size(term(2)),
                        h: size(term(3)),
                    });
                }
            }
        }
        peaks.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut kept: Vec<Peak> = Vec::with_capacity(peaks.len());
        let f = self.suppression / 2.0;
        for p in peaks {
            // Size-aware suppression: one large product shows several peaks (its printed
            // picture); a real neighbour's centre lies outside the stronger box.
            let duplicate = kept.iter().any(|k| {
                k.class_id == p.class_id
                    && (p.cx - k.cx).abs() <= f * k.w
                    && (p.cy - k.cy).abs() <= f * k.h
            });
            if !duplicate {
                kept.push(p);
            }
        }
        let (iw, ih) = (self.input_size.0 as f32, self.input_size.1 as f32);
        out.extend(kept.into_iter().map(|p| Candidate {
            class_id: p.class_id,
            score: p.score,
            bbox: BBox {
                x1: (p.cx - p.w / 2.0) / iw,
                y1: (p.cy - p.h / 2.0) / ih,
                x2: (p.cx + p.w / 2.0) / iw,
                y2: (p.cy + p.h / 2.0) / ih,
            },
        }));
        Ok(())
    }
}

/// The up to 8 cells around (x, y) inside a w x h grid.
fn neighbours(x: usize, y: usize, w: usize, h: usize) -> impl Iterator<Item = (usize, usize)> {
    (y.saturating_sub(1)..=(y + 1).min(h - 1))
        .flat_map(move |ny| (x.saturating_sub(1)..=(x + 1).min(w - 1)).map(move |nx| (nx, ny)))
        .filter(move |&(nx, ny)| (nx, ny) != (x, y))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn logit(p: f32) -> f32 {
    let p = p.clamp(1e-7, 1.0 - 1e-7);
    (p / (1.0 - p)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::tract_ndarray::{Array3, Array4};
    use tract_onnx::prelude::IntoTValue;

    fn oidv4_anchor_spec() -> AnchorSpec {
        AnchorSpec {
            input_size: 300,
            min_scale: 0.2,
            max_scale: 0.95,
            strides: vec![16, 32, 64, 128, 256, 512],
            aspect_ratios: vec![1.0, 2.0, 0.5, 3.0, 0.3333],
            reduce_boxes_in_lowest_layer: true,
            interpolated_scale_aspect_ratio: 1.0,
            count: 1917,
        }
    }

    fn ssd() -> SsdDecoder {
        let spec = SsdSpec {
            boxes_output: "b".into(),
            scores_output: "s".into(),
            background_class: Some(0),
            box_scales: [10.0, 10.0, 5.0, 5.0],
            anchors: oidv4_anchor_spec(),
        };
        SsdDecoder::new(&spec, 3, ["b".into(), "s".into()]).unwrap()
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn ssd_anchor_set_has_1917_anchors_with_the_known_values() {
        let a = ssd_anchors(&oidv4_anchor_spec());
        assert_eq!(a.len(), 1917);
        // First cell of the 19x19 layer: the small square anchor, then scale 0.2 at 2:1 and 1:2.
        assert!(close(a[0].xc, 0.5 / 19.0) && close(a[0].yc, 0.5 / 19.0));
        assert!(close(a[0].w, 0.1) && close(a[0].h, 0.1));
        assert!(close(a[1].w, 0.2 * 2f32.sqrt()) && close(a[1].h, 0.2 / 2f32.sqrt()));
        assert!(close(a[2].w, 0.2 / 2f32.sqrt()));
        // Second cell moves along x first.
        assert!(close(a[3].xc, 1.5 / 19.0) && close(a[3].yc, 0.5 / 19.0));
        // First anchor of the 10x10 layer (index 19*19*3), scale 0.35, ratio 1.
        let b = a[1083];
        assert!(close(b.xc, 0.05) && close(b.yc, 0.05) && close(b.w, 0.35));
        // Its sixth shape is the interpolated scale sqrt(0.35 * 0.5).
        assert!(close(a[1088].w, (0.35f32 * 0.5).sqrt()));
        // The last anchor is the 1x1 layer's interpolated one: sqrt(0.95 * 1.0), centred.
        let z = a[1916];
        assert!(close(z.xc, 0.5) && close(z.yc, 0.5) && close(z.w, 0.95f32.sqrt()));
    }

    #[test]
    fn ssd_known_encoding_decodes_to_known_box() {
        let d = ssd();
        // Anchor 1916: centre (0.5, 0.5), w = h = sqrt(0.95).
        let s = 0.95f32.sqrt();
        // ty = 1 moves the centre down by h/10; th = 5 * ln(0.5) halves the height.
        let b = d.decode_box(1916, &[1.0, 0.0, 5.0 * 0.5f32.ln(), 0.0]);
        let yc = 0.5 + s / 10.0;
        assert!(close(b.y1, yc - s / 4.0) && close(b.y2, yc + s / 4.0));
        assert!(close(b.x1, 0.5 - s / 2.0) && close(b.x2, 0.5 + s / 2.0));
    }

    #[test]
    fn ssd_decode_applies_sigmoid_per_class_thresholds_and_skips_background() {
        let d = ssd();
        let boxes = Tensor::from(Array3::<f32>::zeros((1, 1917, 4)));
        let mut logits = Array3::<f32>::from_elem((1, 1917, 3), -10.0);
        logits[[0, 5, 0]] = 5.0; // background: never reported
        logits[[0, 5, 1]] = 0.0; // sigmoid 0.5
        logits[[0, 7, 2]] = 0.0; // sigmoid 0.5, but class 2 needs 0.6
        let logits = Tensor::from(logits);
        let mut t = Thresholds::uniform(3, 0.4);
        t.per_class[2] = 0.6;
        let mut out = vec![];
        d.decode(&boxes, &logits, &t, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].class_id, 1);
        assert!(close(out[0].score, 0.5));
        assert_eq!(out[0].bbox, d.decode_box(5, &[0.0; 4]));
    }

    #[test]
    fn ssd_decode_rejects_an_output_of_the_wrong_shape_by_name() {
        let d = ssd();
        let boxes = Tensor::from(Array3::<f32>::zeros((1, 100, 4)));
        let logits = Tensor::from(Array3::<f32>::zeros((1, 1917, 3)));
        let err = d
            .decode(&boxes, &logits, &Thresholds::uniform(3, 0.5), &mut vec![])
            .unwrap_err();
        assert!(
            err.to_string().contains("\"b\" has shape [1, 100, 4]"),
            "{err}"
        );
    }

    #[test]
    fn yolov8_layout_tensor_decodes_to_pixel_normalised_boxes_with_the_best_class() {
        // Ultralytics export: [1, 4 + classes, anchors], xywh in input pixels.
        let d = YoloDecoder::new(YoloVersion::V8, 2, (640, 320), "output0".into());
        let mut t = Array3::<f32>::zeros((1, 6, 3));
        // Anchor 1: centre (320, 160), 64 x 32 px, class 1 at 0.9 (class 0 at 0.2).
        for (row, v) in [320.0, 160.0, 64.0, 32.0, 0.2, 0.9].into_iter().enumerate() {
            t[[0, row, 1]] = v;
        }
        // Anchor 2: below threshold.
        t[[0, 4, 2]] = 0.1;
        let mut out = vec![];
        d.decode(&Tensor::from(t), &Thresholds::uniform(2, 0.25), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].class_id, 1);
        assert!(close(out[0].score, 0.9));
        let b = out[0].bbox;
        assert!(close(b.x1, 288.0 / 640.0) && close(b.x2, 352.0 / 640.0));
        assert!(close(b.y1, 144.0 / 320.0) && close(b.y2, 176.0 / 320.0));
    }

    #[test]
    fn yolov5_layout_tensor_scores_are_objectness_times_class() {
        let d = YoloDecoder::new(YoloVersion::V5, 2, (100, 100), "output".into());
        let mut t = Array3::<f32>::zeros((1, 2, 7));
        for (k, v) in [50.0, 50.0, 20.0, 10.0, 0.8, 0.1, 0.5]
            .into_iter()
            .enumerate()
        {
            t[[0, 0, k]] = v;
        }
        let mut out = vec![];
        d.decode(&Tensor::from(t), &Thresholds::uniform(2, 0.3), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].class_id, 1);
        assert!(close(out[0].score, 0.4));
        assert!(close(out[0].bbox.x1, 0.4) && close(out[0].bbox.y2, 0.55));
    }

    fn heatmap_spec(peak_output: bool, logit: bool) -> HeatmapSpec {
        HeatmapSpec {
            heat_output: "heat".into(),
            box_output: "boxes".into(),
            peak_output: peak_output.then(|| "peak".into()),
            stride: 8,
            heat_is_logit: logit,
            suppression_box_fraction: 1.0,
        }
    }

    /// A 64x32 input: an 8x4 grid of 8-pixel cells, one class.
    fn heatmap_outputs(peaks: &[(usize, usize, f32, [f32; 4])]) -> (Array4<f32>, Array4<f32>) {
        let mut heat = Array4::<f32>::zeros((1, 1, 4, 8));
        let mut boxes = Array4::<f32>::zeros((1, 4, 4, 8));
        for &(x, y, v, terms) in peaks {
            heat[[0, 0, y, x]] = v;
            for (k, t) in terms.into_iter().enumerate() {
                boxes[[0, k, y, x]] = t;
            }
        }
        (heat, boxes)
    }

    /// Probabilities, no pooled output, a 64x32 input.
    fn plain_heatmap_decoder() -> HeatmapDecoder {
        let names = vec!["heat".into(), "boxes".into()];
        HeatmapDecoder::new(&heatmap_spec(false, false), 1, (64, 32), names).unwrap()
    }

    fn decode_heatmap(d: &HeatmapDecoder, outputs: Vec<Tensor>, t: f32) -> Vec<Candidate> {
        let outputs: Vec<TValue> = outputs.into_iter().map(|t| t.into_tvalue()).collect();
        let mut out = vec![];
        d.decode(&outputs, &Thresholds::uniform(1, t), &mut out)
            .unwrap();
        out
    }

    #[test]
    fn heatmap_peaks_become_boxes_from_their_offsets_and_log_sizes() {
        let d = plain_heatmap_decoder();
        // Cell (2, 1): centre (2.5 + 0.25, 1.5 - 0.5) cells = (22, 8) px; size e^0 x e^ln2
        // cells = 8 x 16 px. Cell (3, 1) beside it is weaker: not a local maximum.
        let (heat, boxes) = heatmap_outputs(&[
            (2, 1, 0.9, [0.25, -0.5, 0.0, 2f32.ln()]),
            (3, 1, 0.6, [0.0; 4]),
            (6, 3, 0.2, [0.0; 4]),
        ]);
        let out = decode_heatmap(&d, vec![Tensor::from(heat), Tensor::from(boxes)], 0.3);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(close(out[0].score, 0.9));
        let b = out[0].bbox;
        assert!(
            close(b.x1, 18.0 / 64.0) && close(b.x2, 26.0 / 64.0),
            "{b:?}"
        );
        assert!(close(b.y1, 0.0) && close(b.y2, 16.0 / 32.0), "{b:?}");
    }

    #[test]
    fn a_weaker_peak_inside_a_stronger_peaks_box_is_the_same_object() {
        let d = plain_heatmap_decoder();
        // A large box (5 x 3 cells) at cell (2, 1), a second peak two cells right inside
        // it, and a neighbour at cell (6, 1) outside it: two objects.
        let big = [0.0, 0.0, 5f32.ln(), 3f32.ln()];
        let (heat, boxes) = heatmap_outputs(&[
            (2, 1, 0.9, big),
            (4, 1, 0.7, [0.0; 4]),
            (6, 1, 0.8, [0.0; 4]),
        ]);
        let out = decode_heatmap(&d, vec![Tensor::from(heat), Tensor::from(boxes)], 0.3);
        let centres: Vec<f32> = out
            .iter()
            .map(|c| (c.bbox.x1 + c.bbox.x2) / 2.0 * 64.0)
            .collect();
        assert_eq!(centres, vec![20.0, 52.0]);
    }

    #[test]
    fn a_max_pooled_output_decides_peaks_and_logits_go_through_a_sigmoid() {
        let d = HeatmapDecoder::new(
            &heatmap_spec(true, true),
            1,
            (64, 32),
            vec!["heat".into(), "boxes".into(), "peak".into()],
        )
        .unwrap();
        let (mut heat, boxes) = heatmap_outputs(&[(1, 1, 2.0, [0.0; 4]), (5, 2, 1.0, [0.0; 4])]);
        // Logits: the background far below zero.
        heat.mapv_inplace(|v| if v == 0.0 { -10.0 } else { v });
        // The model's pool says cell (5, 2) is dominated (as if by a cell off this map).
        let mut pooled = heat.clone();
        pooled[[0, 0, 2, 5]] = 3.0;
        let out = decode_heatmap(
            &d,
            vec![
                Tensor::from(heat),
                Tensor::from(boxes),
                Tensor::from(pooled),
            ],
            0.5,
        );
        assert_eq!(out.len(), 1);
        assert!(close(out[0].score, 1.0 / (1.0 + (-2f32).exp())));
    }

    #[test]
    fn a_wild_log_size_stops_at_the_same_box_in_pixels_whatever_the_stride() {
        // An 8x4 grid at stride 8 (64x32) and at stride 4 (32x16): the cap is e^3 x 8 =
        // 160.7 model pixels either way, so a stride-4 model can still say how large a
        // product of 20 old cells is, and the stride-8 models decode as they always did.
        for (stride, size) in [(8, (64, 32)), (4, (32, 16))] {
            let spec = HeatmapSpec {
                stride,
                ..heatmap_spec(false, false)
            };
            let d =
                HeatmapDecoder::new(&spec, 1, size, vec!["heat".into(), "boxes".into()]).unwrap();
            let (heat, boxes) = heatmap_outputs(&[(2, 1, 0.9, [0.0, 0.0, 10.0, 10.0])]);
            let out = decode_heatmap(&d, vec![Tensor::from(heat), Tensor::from(boxes)], 0.3);
            let width_px = out[0].bbox.width() * size.0 as f32;
            assert!(
                (width_px - 3f32.exp() * 8.0).abs() < 1e-3,
                "stride {stride}: {width_px}"
            );
        }
    }

    #[test]
    fn a_heatmap_input_size_off_the_stride_is_refused() {
        let e = HeatmapDecoder::new(
            &heatmap_spec(false, false),
            1,
            (60, 32),
            vec!["heat".into(), "boxes".into()],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("not a multiple of the heat map's stride 8"),
            "{e}"
        );
    }
}
