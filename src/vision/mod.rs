//! Vision: a frame in, detections in source-image pixels out.
//!
//! One [`Detector`] owns one optimised tract plan with its input shape pinned, a reusable
//! execution state and a reusable input tensor, so the per-frame path does not rebuild
//! anything. How to feed the model and how to read its outputs comes from its manifest.

pub mod annotate;
pub mod cache;
pub mod embed;
pub mod eval;
pub mod kernels;
pub mod manifest;
pub mod nms;
pub mod outputs;
pub mod preprocess;
pub mod scale;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use serde::Serialize;
use tract_onnx::prelude::*;

pub use embed::{Embedder, EmbedderOptions};
pub use manifest::{LoadedManifest, Manifest};
pub use outputs::{Candidate, Decoder, Thresholds};
pub use preprocess::{Geometry, Preprocessor};

/// Errors of the vision module. Each names the file or tensor it is about.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: invalid model manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error(
        "{path}: sha256 is {actual} but {manifest} expects {expected}; the model file is \
         corrupt or does not belong to this manifest"
    )]
    Checksum {
        path: PathBuf,
        manifest: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: cannot load model: {message}")]
    Model { path: PathBuf, message: String },
    #[error("model {model}: {message}")]
    Outputs { model: String, message: String },
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("unknown label {label:?} (model {model} knows: {known})")]
    UnknownLabel {
        label: String,
        model: String,
        known: String,
    },
}

/// An axis-aligned box in pixels of the image it refers to: (x1, y1) top-left, (x2, y2)
/// bottom-right, x2 >= x1, y2 >= y1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BBox {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
}

impl BBox {
    pub fn width(&self) -> f32 {
        (self.x2 - self.x1).max(0.0)
    }
    pub fn height(&self) -> f32 {
        (self.y2 - self.y1).max(0.0)
    }
    pub fn area(&self) -> f32 {
        self.width() * self.height()
    }
    /// Intersection over union; 0 for two empty boxes.
    pub fn iou(&self, other: &BBox) -> f32 {
        let iw = (self.x2.min(other.x2) - self.x1.max(other.x1)).max(0.0);
        let ih = (self.y2.min(other.y2) - self.y1.max(other.y1)).max(0.0);
        let inter = iw * ih;
        let union = self.area() + other.area() - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }
}

/// One detected object in source-image pixels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub label: String,
    #[serde(rename = "class")]
    pub class_id: usize,
    pub score: f32,
    #[serde(rename = "box")]
    pub bbox: BBox,
}

/// Milliseconds spent in each stage for one frame.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StageTimings {
    pub preprocess_ms: f64,
    pub inference_ms: f64,
    pub postprocess_ms: f64,
    /// Heap allocations in each of the three stages (see [`crate::alloc`]; zeros
    /// unless the binary counts them). For `bench`, not part of `detect`'s output.
    #[serde(skip)]
    pub allocations: [u64; 3],
}

/// Overrides of the manifest's post-processing, from config or the command line.
#[derive(Debug, Clone, Default)]
pub struct DetectorOptions {
    pub score_threshold: Option<f32>,
    pub iou_threshold: Option<f32>,
    pub max_detections: Option<usize>,
    /// Per-label score thresholds by label name.
    pub label_thresholds: BTreeMap<String, f32>,
    /// Model input size override (width, height) for fully convolutional models.
    pub input_size: Option<(u32, u32)>,
    /// Threads for one inference (tract's matrix products); 0 or 1: the calling thread
    /// only.
    pub threads: usize,
    /// Whose kernels run the depthwise convolutions (see [`kernels`]).
    pub kernels: kernels::Kernels,
    /// Where to keep decluttered models between starts (see [`cache`]); none: every
    /// start reads the ONNX file.
    pub cache_dir: Option<PathBuf>,
}

/// Time spent in one kind of operation during one inference, from [`Detector::profile`].
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct OpTime {
    /// tract's operation name, e.g. `OptMatMul`, `DepthWise`, `QuantizeLinearU8`.
    pub op: String,
    /// How many nodes of this kind the optimised plan has.
    pub nodes: usize,
    pub ms: f64,
}

/// One optimised plan at one pinned input size, with its execution state and buffers.
struct SizedPlan {
    size: (u32, u32),
    /// The optimised model, shared by every fork: weights are in memory once however
    /// many cameras run inference in parallel.
    plan: Arc<TypedSimplePlan>,
    state: TypedSimpleState,
    /// Reused between frames: written in place whenever tract has released it.
    input: Arc<Tensor>,
    preprocessor: Preprocessor,
    decoder: Decoder,
    /// When it last ran (the detector's call counter), for evicting the oldest size.
    last_used: u64,
}

impl SizedPlan {
    fn fork(&self) -> Result<Self, VisionError> {
        let state = self
            .plan
            .spawn()
            .map_err(|e| VisionError::Inference(format!("{e:#}")))?;
        Ok(Self {
            size: self.size,
            plan: self.plan.clone(),
            state,
            input: Arc::new(self.preprocessor.new_tensor()),
            preprocessor: self.preprocessor.fork(),
            decoder: self.decoder.clone(),
            last_used: self.last_used,
        })
    }
}

/// Input sizes a detector keeps optimised at once. The scale rule (`vision::scale`)
/// needs one per zone scale plus its full tile size; a probe at a passing size must not
/// evict those, and every plan holds its own packed weights, so this stays small.
pub const MAX_PLANS: usize = 6;

/// A loaded, optimised model with its pre- and post-processing.
pub struct Detector {
    manifest: LoadedManifest,
    /// Plans by input size; the first is the configured size and is never evicted.
    plans: Vec<SizedPlan>,
    threads: usize,
    kernels: kernels::Kernels,
    cache_dir: Option<PathBuf>,
    calls: u64,
    thresholds: Thresholds,
    iou_threshold: f32,
    max_detections: usize,
    candidates: Vec<Candidate>,
}

impl Detector {
    /// Loads the model a manifest describes: verifies its sha256 (or takes the verified
    /// cache entry made from it), pins the input shape and optimises the graph once.
    pub fn load(manifest_path: &Path, options: &DetectorOptions) -> Result<Self, VisionError> {
        let manifest = Manifest::load(manifest_path)?;
        let spec = &manifest.manifest;
        let (width, height) = options
            .input_size
            .unwrap_or((spec.input.width, spec.input.height));
        let plan = sized_plan(
            &manifest,
            (width, height),
            options.threads,
            options.kernels,
            options.cache_dir.as_ref(),
        )?;
        let thresholds = Thresholds::new(
            &manifest,
            options
                .score_threshold
                .unwrap_or(spec.postprocess.score_threshold),
            &options.label_thresholds,
        )?;
        Ok(Self {
            iou_threshold: options
                .iou_threshold
                .unwrap_or(spec.postprocess.iou_threshold),
            max_detections: options
                .max_detections
                .unwrap_or(spec.postprocess.max_detections),
            manifest,
            plans: vec![plan],
            threads: options.threads,
            kernels: options.kernels,
            cache_dir: options.cache_dir.clone(),
            calls: 0,
            thresholds,
            candidates: Vec::new(),
        })
    }

    /// A detector on the same loaded model with its own execution state and buffers, for
    /// another inference thread.
    pub fn fork(&self) -> Result<Self, VisionError> {
        Ok(Self {
            manifest: self.manifest.clone(),
            plans: self
                .plans
                .iter()
                .map(SizedPlan::fork)
                .collect::<Result<_, _>>()?,
            threads: self.threads,
            kernels: self.kernels,
            cache_dir: self.cache_dir.clone(),
            calls: self.calls,
            thresholds: self.thresholds.clone(),
            iou_threshold: self.iou_threshold,
            max_detections: self.max_detections,
            candidates: Vec::new(),
        })
    }

    /// Applies new thresholds (config reload) without reloading the model.
    pub fn set_options(&mut self, options: &DetectorOptions) -> Result<(), VisionError> {
        let post = &self.manifest.manifest.postprocess;
        self.thresholds = Thresholds::new(
            &self.manifest,
            options.score_threshold.unwrap_or(post.score_threshold),
            &options.label_thresholds,
        )?;
        self.iou_threshold = options.iou_threshold.unwrap_or(post.iou_threshold);
        self.max_detections = options.max_detections.unwrap_or(post.max_detections);
        Ok(())
    }

    pub fn manifest(&self) -> &LoadedManifest {
        &self.manifest
    }

    pub fn labels(&self) -> &[String] {
        &self.manifest.labels
    }

    /// The kernels this model runs on this CPU (sorted, each once): the matrix products
    /// tract chose, e.g. `arm64simd_mmm_f32_8x8_a55` on a Cortex-A72 or
    /// `fma_mmm_f32_16x6` on x86_64 with FMA, and shelfwatch's own depthwise kernels,
    /// e.g. `shelfwatch_dw_f32_neon` ([`kernels`]). Convolutions run through these, so
    /// they are where inference time goes; a `generic` name means no SIMD kernel was
    /// found for the CPU (`shelfwatch bench` prints them; docs/arm.md lists them per
    /// board).
    pub fn kernels(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .plans
            .iter()
            .flat_map(|p| p.plan.model().nodes().iter())
            .flat_map(|n| {
                if let Some(op) = n.op_as::<kernels::DepthwiseConv>() {
                    vec![op.kernel_name()]
                } else if let Some(op) = n.op_as::<kernels::QuantDepthwiseConv>() {
                    vec![op.kernel_name()]
                } else if let Some(op) = n.op_as::<kernels::QuantPointwiseConv>() {
                    vec![op.kernel_name()]
                } else if let Some(op) =
                    n.op_as::<tract_onnx::tract_core::ops::matmul::optimized::OptMatMul>()
                {
                    op.mmm.iter().map(|k| k.name().to_string()).collect()
                } else {
                    vec![]
                }
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The configured model input size (width, height): what [`Detector::detect`] runs
    /// the whole frame at.
    pub fn input_size(&self) -> (u32, u32) {
        self.plans[0].size
    }

    /// The input sizes optimised so far, the configured one first.
    pub fn plan_sizes(&self) -> Vec<(u32, u32)> {
        self.plans.iter().map(|p| p.size).collect()
    }

    /// Runs inference once on `frame`, timing every node of the plan; the times are
    /// summed per kind of operation, largest first. For `shelfwatch bench --profile`:
    /// it shows where a model spends its time (float vs int8 kernels, layout changes,
    /// (de)quantisation) on this CPU.
    pub fn profile(&mut self, frame: &RgbImage) -> Result<Vec<OpTime>, VisionError> {
        let p = &mut self.plans[0];
        let mut input = p.preprocessor.new_tensor();
        p.preprocessor.run(frame, &mut input);
        let mut by_op: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        p.state
            .run_plan_with_eval(tvec!(input.into_tvalue()), |ctx, state, node, inputs| {
                let t = Instant::now();
                let result = tract_onnx::tract_core::plan::eval(ctx, state, node, inputs);
                let entry = by_op.entry(node.op().name().to_string()).or_default();
                entry.0 += 1;
                entry.1 += ms(t.elapsed());
                result
            })
            .map_err(|e| VisionError::Inference(format!("{e:#}")))?;
        let mut times: Vec<OpTime> = by_op
            .into_iter()
            .map(|(op, (nodes, ms))| OpTime { op, nodes, ms })
            .collect();
        times.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(times)
    }

    /// Runs the whole detector on one RGB frame at the configured input size.
    pub fn detect(
        &mut self,
        frame: &RgbImage,
    ) -> Result<(Vec<Detection>, StageTimings), VisionError> {
        self.run(frame, None, 0)
    }

    /// Runs the detector on `region` (left, top, width, height in frame pixels, inside
    /// the frame) stretched over a model input of `size`, which must suit the model
    /// (`input.size-multiple`). Detections are in frame pixels. A size not run before is
    /// optimised first (once; the least recently used of more than [`MAX_PLANS`] sizes
    /// is dropped).
    pub fn detect_region(
        &mut self,
        frame: &RgbImage,
        region: (f64, f64, f64, f64),
        size: (u32, u32),
    ) -> Result<(Vec<Detection>, StageTimings), VisionError> {
        let index = self.plan_for(size)?;
        self.run(frame, Some(region), index)
    }

    fn plan_for(&mut self, size: (u32, u32)) -> Result<usize, VisionError> {
        if let Some(i) = self.plans.iter().position(|p| p.size == size) {
            return Ok(i);
        }
        let plan = sized_plan(
            &self.manifest,
            size,
            self.threads,
            self.kernels,
            self.cache_dir.as_ref(),
        )?;
        if self.plans.len() >= MAX_PLANS {
            let oldest = (1..self.plans.len())
                .min_by_key(|&i| self.plans[i].last_used)
                .expect("MAX_PLANS > 1");
            self.plans.swap_remove(oldest);
        }
        self.plans.push(plan);
        Ok(self.plans.len() - 1)
    }

    fn run(
        &mut self,
        frame: &RgbImage,
        region: Option<(f64, f64, f64, f64)>,
        index: usize,
    ) -> Result<(Vec<Detection>, StageTimings), VisionError> {
        self.calls += 1;
        let p = &mut self.plans[index];
        p.last_used = self.calls;
        let t0 = Instant::now();
        let a0 = crate::alloc::allocations();
        if Arc::get_mut(&mut p.input).is_none() {
            p.input = Arc::new(p.preprocessor.new_tensor());
        }
        let input = Arc::get_mut(&mut p.input).expect("input tensor was just made unique");
        let geometry = match region {
            Some(r) => p.preprocessor.run_region(frame, r, input),
            None => p.preprocessor.run(frame, input),
        };
        let t1 = Instant::now();
        let a1 = crate::alloc::allocations();
        let outputs = p
            .state
            .run(tvec!(p.input.clone().into_tvalue()))
            .map_err(|e| VisionError::Inference(format!("{e:#}")))?;
        let t2 = Instant::now();
        let a2 = crate::alloc::allocations();
        self.candidates.clear();
        p.decoder
            .decode(&outputs, &self.thresholds, &mut self.candidates)?;
        drop(outputs);
        let kept = nms::nms(
            &mut self.candidates,
            self.iou_threshold,
            self.max_detections,
        );
        let detections = kept
            .iter()
            .map(|c| Detection {
                label: self.manifest.labels[c.class_id].clone(),
                class_id: c.class_id,
                score: c.score,
                bbox: geometry.to_source(&c.bbox),
            })
            .collect();
        let t3 = Instant::now();
        let a3 = crate::alloc::allocations();
        Ok((
            detections,
            StageTimings {
                preprocess_ms: ms(t1 - t0),
                inference_ms: ms(t2 - t1),
                postprocess_ms: ms(t3 - t2),
                allocations: [a1 - a0, a2 - a1, a3 - a2],
            },
        ))
    }

    /// The IoU threshold and detection cap in use, for merging tiles the same way.
    pub(crate) fn nms_params(&self) -> (f32, usize) {
        (self.iou_threshold, self.max_detections)
    }
}

/// Loads and optimises the manifest's model at one input size.
fn sized_plan(
    manifest: &LoadedManifest,
    (width, height): (u32, u32),
    threads: usize,
    kernels: kernels::Kernels,
    cache_dir: Option<&PathBuf>,
) -> Result<SizedPlan, VisionError> {
    let spec = &manifest.manifest;
    if let Err(m) = spec.input.check_size(width, height) {
        return Err(VisionError::Outputs {
            model: spec.name.clone(),
            message: format!(
                "input size {width}x{height}: this model runs at multiples of {m} \
                 (e.g. {}x{}); it was trained at {}x{}",
                (width / m).max(1) * m,
                (height / m).max(1) * m,
                spec.input.width,
                spec.input.height
            ),
        });
    }
    let shape: [usize; 4] = match spec.input.layout {
        manifest::Layout::Nchw => [1, 3, height as usize, width as usize],
        manifest::Layout::Nhwc => [1, height as usize, width as usize, 3],
    };
    let loaded = load_plan(
        manifest,
        shape,
        threads,
        kernels,
        cache_dir,
        |names| Decoder::new(manifest, names, (width, height)),
        Decoder::output_names,
    )?;
    let (plan, decoder) = (loaded.plan, loaded.reader);
    let state = plan
        .spawn()
        .map_err(|e| VisionError::Inference(format!("{e:#}")))?;
    let preprocessor = Preprocessor::new(&spec.input, width, height);
    let input = Arc::new(preprocessor.new_tensor());
    tracing::info!(
        model = %spec.name,
        file = %manifest.model_path.display(),
        width,
        height,
        labels = manifest.labels.len(),
        threads = threads.max(1),
        cached = loaded.cached,
        read_ms = loaded.read_ms,
        optimise_ms = loaded.optimise_ms,
        "model loaded"
    );
    Ok(SizedPlan {
        size: (width, height),
        plan,
        state,
        input,
        preprocessor,
        decoder,
        last_used: 0,
    })
}

/// An optimised plan and what reads its outputs.
pub(crate) struct LoadedPlan<R> {
    pub plan: Arc<TypedSimplePlan>,
    pub reader: R,
    pub cached: bool,
    pub read_ms: f64,
    pub optimise_ms: f64,
}

/// Loads the model of a manifest with its input pinned to `shape`: from the model cache
/// when it has a verified entry, otherwise from the ONNX file (sha256-checked), keeping
/// only the outputs `reader` reads, then optimised with its own thread pool. `make_reader`
/// binds the output reader (a decoder) to the model's output names.
pub(crate) fn load_plan<R>(
    manifest: &LoadedManifest,
    shape: [usize; 4],
    threads: usize,
    kernels: kernels::Kernels,
    cache_dir: Option<&PathBuf>,
    make_reader: impl Fn(&[String]) -> Result<R, VisionError>,
    outputs_of: impl Fn(&R) -> Vec<String>,
) -> Result<LoadedPlan<R>, VisionError> {
    let spec = &manifest.manifest;
    let model_err = |e: TractError| VisionError::Model {
        path: manifest.model_path.clone(),
        message: format!("{e:#}"),
    };
    let t0 = Instant::now();
    let cache = cache_dir.map(cache::ModelCache::new);
    let key = cache::ModelCache::key(&spec.sha256, &shape, &format!("{:?}", spec.decoder));
    let (mut model, reader, cached) = match cache.as_ref().and_then(|c| c.load(&key)) {
        Some((model, outputs)) => (model, make_reader(&outputs)?, true),
        None => {
            let bytes = manifest.verify_model()?;
            let mut model = tract_onnx::onnx()
                .model_for_read(&mut std::io::Cursor::new(bytes))
                .map_err(model_err)?
                .with_input_fact(0, f32::fact(shape).into())
                .map_err(model_err)?;
            let reader = make_reader(&output_names(&model))?;
            // Only the outputs the reader uses are kept, so the optimiser can drop the
            // rest (an embedding model's classifier, for one).
            model
                .select_outputs_by_name(outputs_of(&reader))
                .map_err(model_err)?;
            let model = model
                .into_typed()
                .and_then(|m| m.into_decluttered())
                .map_err(model_err)?;
            if let Some(c) = &cache {
                c.store(&key, &model, &outputs_of(&reader));
            }
            (model, reader, false)
        }
    };
    // After the cache: the cache keeps tract's decluttered graph, whatever kernels this
    // start chooses for this CPU.
    if kernels == kernels::Kernels::Shelfwatch {
        if cached {
            // tract's NNEF reader wires each convolution's bias through reshape and cast
            // nodes; simplified again, those fold back into the constants `install`
            // reads, so a cached model runs the same kernels (and gives the same
            // numbers) as one read from ONNX.
            model = model.into_decluttered().map_err(model_err)?;
        }
        let isa = kernels::Isa::detect();
        let installed = kernels::install(&mut model, isa).map_err(model_err)?;
        tracing::debug!(
            model = %spec.name,
            depthwise = installed.depthwise,
            fused_clamps = installed.fused_clamps,
            quant_depthwise = installed.quant_depthwise,
            quant_pointwise = installed.quant_pointwise,
            kernel = kernels::kernel_name(isa),
            "own kernels installed"
        );
    }
    let t1 = Instant::now();
    // The pool belongs to this plan, so the forks (one per camera) share it, and a
    // second model in the process (the embedder) has its own.
    let run_options = RunOptions {
        executor: (threads > 1).then(|| {
            tract_linalg::multithread::Executor::multithread_with_name(threads, "shelfwatch-mm")
        }),
        ..RunOptions::default()
    };
    let plan = model
        .into_optimized()
        .map_err(model_err)?
        .into_runnable_with_options(&run_options)
        .map_err(model_err)?;
    Ok(LoadedPlan {
        plan,
        reader,
        cached,
        read_ms: ms(t1 - t0),
        optimise_ms: ms(t1.elapsed()),
    })
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// ONNX output names in output order (tract keeps them as outlet labels).
fn output_names(model: &InferenceModel) -> Vec<String> {
    model
        .output_outlets()
        .map(|outlets| {
            outlets
                .iter()
                .map(|o| {
                    model
                        .outlet_label(*o)
                        .map(str::to_owned)
                        .unwrap_or_else(|| model.node(o.node).name.clone())
                })
                .collect()
        })
        .unwrap_or_default()
}
