//! `shelfwatch bench IMAGE...`: the daemon's per-frame work stage by stage (camera frame
//! conversion to published payload), latency percentiles, frames/s and peak memory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use image::RgbImage;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::{report, ModelArgs};
use crate::capture::convert::{to_rgb, PixelFormat, RawLayout, YuvEncoding};
use crate::capture::load_image;
use crate::config::LoadedConfig;
use crate::counting::{Polygon, ZoneCounter, ZoneSpec};
use crate::publish::{rfc3339, Body, Envelope};
use crate::vision::scale::{ScaleChoice, ScaledDetector};
use crate::vision::Detector;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Untimed runs before measuring (caches, allocator, CPU frequency).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed runs, cycling through the images.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also time every operation of the model (after the timed runs, averaged over up to
    /// 10 runs) and list the time per kind of operation: where inference time goes on
    /// this CPU.
    #[arg(long)]
    pub profile: bool,
    /// Size of the YUYV frames the pipeline starts from (the photos are scaled to it).
    #[arg(long, value_parser = super::parse_size, default_value = "1280x720")]
    pub camera_size: (u32, u32),
    /// A previous `bench --json` output: print this run's figures beside it.
    #[arg(long, value_name = "BENCH.json")]
    pub compare: Option<PathBuf>,
    /// Images to run on.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// Percentiles of one stage, in milliseconds.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StageStats {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    /// Heap allocations per frame in this stage (mean over the timed runs).
    #[serde(default)]
    pub allocations: f64,
}

impl StageStats {
    pub fn of(samples: &mut [f64]) -> Self {
        samples.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            // Nearest-rank percentile.
            let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        let mean = if samples.is_empty() {
            0.0
        } else {
            samples.iter().sum::<f64>() / samples.len() as f64
        };
        Self {
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            mean,
            allocations: 0.0,
        }
    }

    fn with_allocations(self, allocations: f64) -> Self {
        Self {
            allocations,
            ..self
        }
    }
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct Report {
    model: String,
    /// The configured input size (the whole frame at it without the scale rule).
    input_size: [u32; 2],
    /// The scale rule ran (`--input-size auto` on a model with a `[scale]` band).
    #[serde(default)]
    scale_rule: bool,
    /// What it chose per zone, after the warm-up frames measured it.
    #[serde(default)]
    zone_scales: Vec<Option<ScaleChoice>>,
    /// Model passes per frame (tiles of every zone), mean over the timed runs.
    #[serde(default)]
    passes_per_frame: f64,
    /// The raw frame the pipeline starts from: YUYV at this size, as a camera delivers.
    camera_frame: [u32; 2],
    images: usize,
    warmup: usize,
    runs: usize,
    load_ms: f64,
    /// tract's matmul kernels for this CPU: shows whether SIMD (NEON, FMA) is in use.
    kernels: Vec<String>,
    threads: usize,
    /// Peak resident memory of this process (VmHWM): model, buffers and all.
    peak_rss_mb: Option<f64>,
    stages_ms: Stages,
    /// Frames per second through the whole pipeline on one thread of work (1000 / mean
    /// of `total`).
    frames_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    profile: Option<Vec<crate::vision::OpTime>>,
}

/// The daemon's per-frame work, stage by stage.
#[derive(Debug, Serialize, serde::Deserialize)]
struct Stages {
    /// YUYV camera frame -> RGB.
    convert: StageStats,
    /// RGB frame -> model input tensor (resize, normalise, layout).
    preprocess: StageStats,
    inference: StageStats,
    /// Model outputs -> boxes (decoder, thresholds, NMS).
    postprocess: StageStats,
    /// Boxes -> zone counts and events (the configured zones, or two halves).
    counting: StageStats,
    /// Zone states -> the JSON payloads every sink sends (network excluded).
    publish: StageStats,
    total: StageStats,
}

impl Stages {
    fn rows(&self) -> [(&'static str, &StageStats); 7] {
        [
            ("convert", &self.convert),
            ("preprocess", &self.preprocess),
            ("inference", &self.inference),
            ("postprocess", &self.postprocess),
            ("counting", &self.counting),
            ("publish", &self.publish),
            ("total", &self.total),
        ]
    }
}

pub fn run(args: BenchArgs) -> ExitCode {
    // A config error has been reported already and exits 78, as for every command.
    let (manifest, options) = match args.model.load() {
        Ok(v) => v,
        Err(code) => return code,
    };
    let config = match args.model.config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match bench(&args, &manifest, &options, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// A frame as a YUYV camera delivers it (BT.601, limited range), made from a photo
/// outside the timed loop.
fn yuyv_frame(img: &RgbImage, (w, h): (u32, u32)) -> Vec<u8> {
    let img = image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle);
    let mut out = Vec::with_capacity((w * h * 2) as usize);
    let luma = |p: &image::Rgb<u8>| {
        let [r, g, b] = p.0.map(f32::from);
        (16.0 + 0.257 * r + 0.504 * g + 0.098 * b, r, g, b)
    };
    for y in 0..h {
        for x in (0..w).step_by(2) {
            let (y0, r0, g0, b0) = luma(img.get_pixel(x, y));
            let (y1, r1, g1, b1) = luma(img.get_pixel((x + 1).min(w - 1), y));
            let (r, g, b) = ((r0 + r1) / 2.0, (g0 + g1) / 2.0, (b0 + b1) / 2.0);
            let u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b;
            let v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b;
            out.extend([y0, u, y1, v].map(|c| c.round().clamp(0.0, 255.0) as u8));
        }
    }
    out
}

/// Peak resident set size of this process in MB, from /proc (Linux).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn bench(
    args: &BenchArgs,
    manifest: &std::path::Path,
    options: &crate::vision::DetectorOptions,
    config: &LoadedConfig,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let baseline = args.compare.as_deref().map(read_baseline).transpose()?;
    let (cw, ch) = args.camera_size;
    let frames = args
        .images
        .iter()
        .map(|p| load_image(p).map(|img| yuyv_frame(&img, (cw, ch))))
        .collect::<Result<Vec<_>, _>>()?;
    let t = Instant::now();
    let detector = ScaledDetector::new(
        Detector::load(manifest, options)?,
        options.input_size,
        std::time::Duration::from_secs(config.config.model.rescale_interval_s),
    );
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut pipeline = Pipeline::new(detector, config, (cw, ch));
    let measured = pipeline.measure(args, &frames)?;
    // Averaged over up to 10 runs: one run's per-operation times are noisy.
    let profile = if args.profile {
        Some(pipeline.profile(args.runs.min(10))?)
    } else {
        None
    };
    let passes = measured.passes;
    let stages = measured.stages(args.runs);
    let detector = &pipeline.detector;
    let (w, h) = detector.detector.input_size();
    let report = Report {
        model: detector.detector.manifest().manifest.name.clone(),
        input_size: [w, h],
        scale_rule: detector.rule().is_some(),
        zone_scales: detector.choices(),
        passes_per_frame: passes as f64 / args.runs as f64,
        camera_frame: [cw, ch],
        images: frames.len(),
        warmup: args.warmup,
        runs: args.runs,
        load_ms,
        kernels: detector.detector.kernels(),
        threads: options.threads.max(1),
        peak_rss_mb: peak_rss_mb(),
        frames_per_second: 1e3 / stages.total.mean,
        stages_ms: stages,
        profile,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_header(&report);
    match &baseline {
        None => print_stages(&report),
        Some(base) => {
            let path = args.compare.as_deref().unwrap_or(std::path::Path::new("-"));
            print_comparison(&report, base, path);
        }
    }
    if let Some(ops) = &report.profile {
        print_profile(ops);
    }
    Ok(())
}

/// A previous `bench --json` output, for `--compare`.
fn read_baseline(path: &std::path::Path) -> anyhow::Result<Report> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("{}: cannot read the baseline", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: not the JSON of `shelfwatch bench --json`",
            path.display()
        )
    })
}

/// The first camera's zones in the config, or the frame's two halves.
fn zone_specs(config: &LoadedConfig, (cw, ch): (u32, u32)) -> Vec<ZoneSpec> {
    let counting = &config.config.counting;
    if let Some(camera) = config.config.cameras.iter().find(|c| !c.zones.is_empty()) {
        return camera
            .zones
            .iter()
            .map(|z| z.spec(counting, (cw, ch)))
            .collect();
    }
    [("top", 0.0), ("bottom", 0.5)]
        .into_iter()
        .map(|(name, y)| {
            let (w, h) = (cw as f32, ch as f32);
            ZoneSpec {
                name: name.into(),
                polygon: Polygon::new(vec![
                    (0.0, y * h),
                    (w, y * h),
                    (w, (y + 0.5) * h),
                    (0.0, (y + 0.5) * h),
                ]),
                membership: counting.membership,
                overlap_fraction: counting.overlap_fraction,
                expected: Vec::new(),
                min: None,
                max: None,
            }
        })
        .collect()
}

/// The daemon's per-frame work, set up once: camera frame layout, the model with the
/// scale rule, the zones' counters and the buffers the loop reuses.
struct Pipeline {
    layout: RawLayout,
    detector: ScaledDetector,
    bounds: Vec<crate::vision::BBox>,
    counters: Vec<ZoneCounter>,
    params: crate::counting::CountingParams,
    device: String,
    rgb: RgbImage,
    payload: Vec<u8>,
}

/// Per-stage samples (ms) and allocation totals over the timed runs, in the order of
/// [`Stages::rows`].
struct Measured {
    samples: [Vec<f64>; 7],
    allocations: [u64; 7],
    passes: usize,
}

impl Measured {
    fn stages(self, runs: usize) -> Stages {
        let [convert, preprocess, inference, postprocess, counting, publish, total] = self
            .samples
            .into_iter()
            .zip(self.allocations)
            .map(|(mut v, n)| StageStats::of(&mut v).with_allocations(n as f64 / runs as f64))
            .collect::<Vec<_>>()
            .try_into()
            .expect("seven stages");
        Stages {
            convert,
            preprocess,
            inference,
            postprocess,
            counting,
            publish,
            total,
        }
    }
}

impl Pipeline {
    fn new(detector: ScaledDetector, config: &LoadedConfig, (cw, ch): (u32, u32)) -> Self {
        let specs = zone_specs(config, (cw, ch));
        Self {
            layout: RawLayout {
                format: PixelFormat::Yuyv,
                width: cw,
                height: ch,
                stride: cw * 2,
                encoding: YuvEncoding::default(),
                limits: crate::capture::DecodeLimits::default(),
            },
            detector,
            bounds: specs.iter().map(|z| z.polygon.bounds()).collect(),
            counters: specs.into_iter().map(ZoneCounter::new).collect(),
            params: config.config.counting.params(),
            device: config.config.device.id.clone(),
            rgb: RgbImage::new(cw, ch),
            payload: Vec::new(),
        }
    }

    /// The warm-up, then the timed runs, cycling through the frames.
    fn measure(&mut self, args: &BenchArgs, frames: &[Vec<u8>]) -> anyhow::Result<Measured> {
        let bar = ProgressBar::new((args.warmup + args.runs) as u64).with_style(
            ProgressStyle::with_template("{msg:>8} {bar:40} {pos}/{len} [{elapsed}<{eta}]")
                .expect("static template"),
        );
        let mut m = Measured {
            samples: Default::default(),
            allocations: [0; 7],
            passes: 0,
        };
        bar.set_message("warm-up");
        for i in 0..args.warmup + args.runs {
            if i == args.warmup {
                bar.set_message("measure");
            }
            let (ms, allocations, passes) = self.frame(&frames[i % frames.len()], i as u64)?;
            if i >= args.warmup {
                m.passes += passes;
                for (sum, n) in m.allocations.iter_mut().zip(allocations) {
                    *sum += n;
                }
                for (v, x) in m.samples.iter_mut().zip(ms) {
                    v.push(x);
                }
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(m)
    }

    /// One camera frame through the daemon's stages: per stage the milliseconds and the
    /// heap allocations (rows of [`Stages::rows`]), and the model passes it took.
    fn frame(&mut self, raw: &[u8], seq: u64) -> anyhow::Result<([f64; 7], [u64; 7], usize)> {
        let t0 = Instant::now();
        let a0 = crate::alloc::allocations();
        to_rgb(&self.layout, raw, &mut self.rgb)?;
        let t1 = Instant::now();
        let a1 = crate::alloc::allocations();
        // As in the daemon: the warm-up's first frame measures each zone's scale, the
        // timed frames run its tiles.
        let (detections, frame) = self
            .detector
            .detect(&self.rgb, &self.bounds, Instant::now())?;
        let s = frame.timings;
        let t2 = Instant::now();
        let a2 = crate::alloc::allocations();
        let now = Instant::now();
        let params = &self.params;
        let states: Vec<_> = self
            .counters
            .iter_mut()
            .map(|c| {
                c.observe(now, &detections, params);
                (c.spec().name.clone(), c.state())
            })
            .collect();
        let t3 = Instant::now();
        let a3 = crate::alloc::allocations();
        for (zone, state) in states {
            let Some(state) = state else { continue };
            let message = Envelope {
                schema: 1,
                device: self.device.clone(),
                seq,
                ts: rfc3339(SystemTime::now()),
                body: Body::State {
                    camera: "bench".into(),
                    zone,
                    state,
                },
            };
            self.payload.clear();
            serde_json::to_writer(&mut self.payload, &message)?;
        }
        let t4 = Instant::now();
        let a4 = crate::alloc::allocations();
        let [pre, inf, post] = s.allocations;
        let times = [
            ms(t1 - t0),
            s.preprocess_ms,
            s.inference_ms,
            s.postprocess_ms,
            ms(t3 - t2),
            ms(t4 - t3),
            ms(t4 - t0),
        ];
        let allocations = [a1 - a0, pre, inf, post, a3 - a2, a4 - a3, a4 - a0];
        Ok((times, allocations, frame.passes))
    }

    /// Time per kind of operation, averaged over n runs on the last frame.
    fn profile(&mut self, n: usize) -> anyhow::Result<Vec<crate::vision::OpTime>> {
        let mut total: Vec<crate::vision::OpTime> = Vec::new();
        for _ in 0..n {
            for op in self.detector.detector.profile(&self.rgb)? {
                match total.iter_mut().find(|t| t.op == op.op) {
                    Some(t) => t.ms += op.ms,
                    None => total.push(op),
                }
            }
        }
        for t in &mut total {
            t.ms /= n as f64;
        }
        total.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(total)
    }
}

fn print_header(report: &Report) {
    let at = if report.scale_rule {
        let zones: Vec<String> = report
            .zone_scales
            .iter()
            .map(|c| match c {
                Some(c) => format!(
                    "{:.2} ({} tiles, median {} cells)",
                    c.scale,
                    c.tiles,
                    c.median_width_cells
                        .map_or("-".into(), |m| format!("{m:.1}"))
                ),
                None => "-".into(),
            })
            .collect();
        format!(
            "the scale rule (zone scales {}; {:.1} passes/frame)",
            zones.join(", "),
            report.passes_per_frame
        )
    } else {
        let [w, h] = report.input_size;
        format!("{w}x{h}")
    };
    let [cw, ch] = report.camera_frame;
    println!(
        "model {} at {} from {}x{} YUYV frames, {} threads, {} images, {} runs after {} warm-up",
        report.model, at, cw, ch, report.threads, report.images, report.runs, report.warmup
    );
    println!("kernels {}", report.kernels.join(", "));
}

fn rss(r: &Report) -> String {
    r.peak_rss_mb.map_or("-".into(), |v| format!("{v:.1} MB"))
}

fn print_stages(report: &Report) {
    println!("load {:.1} ms, peak RSS {}", report.load_ms, rss(report));
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "stage (ms)", "p50", "p90", "p99", "mean", "allocs/frame"
    );
    for (name, s) in report.stages_ms.rows() {
        println!(
            "{name:<12} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>11.1}",
            s.p50, s.p90, s.p99, s.mean, s.allocations
        );
    }
    println!("{:.1} frames/s", report.frames_per_second);
}

fn print_comparison(report: &Report, base: &Report, path: &std::path::Path) {
    println!("compared with {} ({}):", path.display(), base.model);
    println!(
        "{:<12} {:>10} {:>10} {:>9}",
        "p50 (ms)", "baseline", "this", "speed-up"
    );
    for ((name, s), (_, b)) in report
        .stages_ms
        .rows()
        .into_iter()
        .zip(base.stages_ms.rows())
    {
        println!(
            "{name:<12} {:>10.3} {:>10.3} {:>8.2}x",
            b.p50,
            s.p50,
            b.p50 / s.p50.max(f64::EPSILON)
        );
    }
    println!(
        "{:<12} {:>10.1} {:>10.1} {:>8.2}x",
        "load (ms)",
        base.load_ms,
        report.load_ms,
        base.load_ms / report.load_ms.max(f64::EPSILON)
    );
    println!("{:<12} {:>10} {:>10}", "peak RSS", rss(base), rss(report));
    println!(
        "{:<12} {:>10.1} {:>10.1} {:>8.2}x",
        "frames/s",
        base.frames_per_second,
        report.frames_per_second,
        report.frames_per_second / base.frames_per_second.max(f64::EPSILON)
    );
}

fn print_profile(ops: &[crate::vision::OpTime]) {
    let sum: f64 = ops.iter().map(|o| o.ms).sum();
    println!(
        "{:<28} {:>6} {:>9} {:>6}",
        "operation", "nodes", "ms", "share"
    );
    for o in ops {
        println!(
            "{:<28} {:>6} {:>9.2} {:>5.1}%",
            o.op,
            o.nodes,
            o.ms,
            100.0 * o.ms / sum.max(f64::EPSILON)
        );
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_hundred() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = StageStats::of(&mut v);
        assert_eq!((s.p50, s.p90, s.p99), (50.0, 90.0, 99.0));
        assert_eq!(s.mean, 50.5);
    }
}
