//! Image embeddings for product identification: an image (a whole photo or one
//! detection's crop) in, an L2-normalised vector out, compared by cosine similarity.
//!
//! The model is an ordinary image classifier cut before its classifier (EfficientNet-Lite0
//! bundled); how to feed it comes from its manifest, like the detectors'.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use tract_onnx::prelude::*;

use super::manifest::{DecoderSpec, Layout, LoadedManifest};
use super::{load_plan, BBox, Manifest, Preprocessor, VisionError};

/// Crops smaller than this (in source pixels, per side) are grown around their centre:
/// a few pixels carry no identity, and the resizer needs something to resample.
const MIN_CROP: f32 = 16.0;

#[derive(Debug, Clone, Default)]
pub struct EmbedderOptions {
    /// Threads for one inference; 0 or 1: the calling thread only.
    pub threads: usize,
    /// Whose kernels run the depthwise convolutions (see [`super::kernels`]).
    pub kernels: super::kernels::Kernels,
    /// Model cache directory (see [`super::cache`]).
    pub cache_dir: Option<PathBuf>,
}

/// Which model made an embedding: vectors of different models are not comparable, so a
/// gallery records it and refuses a query from another model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ModelId {
    pub name: String,
    pub sha256: String,
    pub dimensions: usize,
}

impl ModelId {
    /// The id of the embedding model a manifest describes (None for a detector).
    pub fn of(manifest: &LoadedManifest) -> Option<Self> {
        match &manifest.manifest.decoder {
            DecoderSpec::Embedding(e) => Some(Self {
                name: manifest.manifest.name.clone(),
                sha256: manifest.manifest.sha256.to_ascii_lowercase(),
                dimensions: e.dimensions,
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Reader {
    output: String,
    dimensions: usize,
    normalised: bool,
}

/// A loaded embedding model with its preprocessing; one per thread (see [`Embedder::fork`]).
pub struct Embedder {
    manifest: LoadedManifest,
    plan: Arc<TypedSimplePlan>,
    state: TypedSimpleState,
    preprocessor: Preprocessor,
    reader: Reader,
}

impl Embedder {
    /// Loads the embedding model a manifest describes (its decoder kind must be
    /// `embedding`).
    pub fn load(manifest_path: &Path, options: &EmbedderOptions) -> Result<Self, VisionError> {
        let manifest = Manifest::load(manifest_path)?;
        let spec = &manifest.manifest;
        let DecoderSpec::Embedding(e) = &spec.decoder else {
            return Err(VisionError::Manifest {
                path: manifest.path.clone(),
                message: "a detector, not an embedding model (decoder kind must be \
                          \"embedding\")"
                    .into(),
            });
        };
        let (w, h) = (spec.input.width, spec.input.height);
        let shape = match spec.input.layout {
            Layout::Nchw => [1, 3, h as usize, w as usize],
            Layout::Nhwc => [1, h as usize, w as usize, 3],
        };
        let wanted = Reader {
            output: e.output.clone(),
            dimensions: e.dimensions,
            normalised: e.normalised,
        };
        let model = spec.name.clone();
        let loaded = load_plan(
            &manifest,
            shape,
            options.threads,
            options.kernels,
            options.cache_dir.as_ref(),
            |names| {
                if names.iter().any(|n| n == &wanted.output) {
                    Ok(wanted.clone())
                } else {
                    Err(VisionError::Outputs {
                        model: model.clone(),
                        message: format!(
                            "manifest names output {:?} but the model has {names:?}",
                            wanted.output
                        ),
                    })
                }
            },
            |r| vec![r.output.clone()],
        )?;
        let state = loaded
            .plan
            .spawn()
            .map_err(|e| VisionError::Inference(format!("{e:#}")))?;
        tracing::info!(
            model = %spec.name,
            file = %manifest.model_path.display(),
            dimensions = e.dimensions,
            cached = loaded.cached,
            read_ms = loaded.read_ms,
            optimise_ms = loaded.optimise_ms,
            "embedding model loaded"
        );
        Ok(Self {
            preprocessor: Preprocessor::new(&spec.input, w, h),
            manifest,
            plan: loaded.plan,
            state,
            reader: loaded.reader,
        })
    }

    /// The same model with its own execution state, for another thread.
    pub fn fork(&self) -> Result<Self, VisionError> {
        Ok(Self {
            manifest: self.manifest.clone(),
            plan: self.plan.clone(),
            state: self
                .plan
                .spawn()
                .map_err(|e| VisionError::Inference(format!("{e:#}")))?,
            preprocessor: self.preprocessor.fork(),
            reader: self.reader.clone(),
        })
    }

    pub fn model_id(&self) -> ModelId {
        ModelId::of(&self.manifest).expect("loaded as an embedding model")
    }

    pub fn manifest_path(&self) -> &Path {
        &self.manifest.path
    }

    /// The unit-length embedding of a whole image.
    pub fn embed(&mut self, image: &RgbImage) -> Result<Vec<f32>, VisionError> {
        let mut input = self.preprocessor.new_tensor();
        self.preprocessor.run(image, &mut input);
        let outputs = self
            .state
            .run(tvec!(input.into_tvalue()))
            .map_err(|e| VisionError::Inference(format!("{e:#}")))?;
        let view = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| VisionError::Inference(format!("{e:#}")))?;
        let mut v: Vec<f32> = view.iter().copied().collect();
        if v.len() != self.reader.dimensions {
            return Err(VisionError::Outputs {
                model: self.manifest.manifest.name.clone(),
                message: format!(
                    "output {:?} has {} values, the manifest says {}",
                    self.reader.output,
                    v.len(),
                    self.reader.dimensions
                ),
            });
        }
        if !self.reader.normalised || !is_unit(&v) {
            normalise(&mut v);
        }
        Ok(v)
    }

    /// The embedding of one region of a frame (a detection's box), clamped to the frame
    /// and grown to at least [`MIN_CROP`] pixels per side.
    pub fn embed_region(&mut self, frame: &RgbImage, b: &BBox) -> Result<Vec<f32>, VisionError> {
        let crop = crop(frame, b);
        self.embed(&crop)
    }
}

/// The pixels of `b` (clamped to the frame, grown to [`MIN_CROP`]) as an image of its own.
pub fn crop(frame: &RgbImage, b: &BBox) -> RgbImage {
    // Per axis: the box's pixel span, clamped; if narrower than the minimum (or the
    // frame, if that is smaller), a span of that size centred on the box instead.
    let span = |lo: f32, hi: f32, limit: u32| -> (u32, u32) {
        let lim = limit as f32;
        let (lo, hi) = (lo.clamp(0.0, lim), hi.clamp(0.0, lim));
        let (a, b) = (lo.floor() as u32, (hi.ceil() as u32).min(limit));
        let min = (MIN_CROP as u32).min(limit);
        if b.saturating_sub(a) >= min {
            return (a, b - a);
        }
        let centre = ((lo + hi) / 2.0) as u32;
        (centre.saturating_sub(min / 2).min(limit - min), min)
    };
    let (x, w) = span(b.x1, b.x2, frame.width());
    let (y, h) = span(b.y1, b.y2, frame.height());
    image::imageops::crop_imm(frame, x, y, w, h).to_image()
}

fn is_unit(v: &[f32]) -> bool {
    (v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-3
}

/// Scales to unit length (a zero vector stays zero: it matches nothing).
pub fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Cosine similarity of two unit vectors (their dot product), in eight independent
/// partial sums so the compiler can vectorise it (NEON on ARM).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_unit_vectors_is_their_dot_product() {
        let mut a: Vec<f32> = (0..21).map(|i| i as f32).collect();
        let mut b: Vec<f32> = (0..21).map(|i| (20 - i) as f32).collect();
        normalise(&mut a);
        normalise(&mut b);
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((cosine(&a, &b) - plain).abs() < 1e-6);
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_crop_is_clamped_to_the_frame_and_never_smaller_than_the_minimum() {
        let frame = RgbImage::new(100, 50);
        let c = crop(
            &frame,
            &BBox {
                x1: 95.0,
                y1: -10.0,
                x2: 140.0,
                y2: 20.0,
            },
        );
        assert_eq!((c.width(), c.height()), (16, 20));
        let tiny = crop(
            &frame,
            &BBox {
                x1: 10.0,
                y1: 10.0,
                x2: 11.0,
                y2: 11.0,
            },
        );
        assert_eq!((tiny.width(), tiny.height()), (16, 16));
    }
}
