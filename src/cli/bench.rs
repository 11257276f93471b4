//! `shelfwatch bench IMAGE...`: per-stage latency percentiles and frames/s.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::{report, ModelArgs};
use crate::capture::load_image;
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
    /// Images to run on.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// Percentiles of one stage, in milliseconds.
#[derive(Debug, Serialize)]
pub struct StageStats {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
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
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    input_size: [u32; 2],
    images: usize,
    warmup: usize,
    runs: usize,
    load_ms: f64,
    /// tract's matmul kernels for this CPU: shows whether SIMD (NEON, FMA) is in use.
    kernels: Vec<String>,
    stages_ms: Stages,
    frames_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Stages {
    preprocess: StageStats,
    inference: StageStats,
    postprocess: StageStats,
    total: StageStats,
}

pub fn run(args: BenchArgs) -> ExitCode {
    // A config error has been reported already and exits 78, as for every command.
    let (manifest, options) = match args.model.load() {
        Ok(v) => v,
        Err(code) => return code,
    };
    match bench(&args, &manifest, &options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

fn bench(
    args: &BenchArgs,
    manifest: &std::path::Path,
    options: &crate::vision::DetectorOptions,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let frames = args
        .images
        .iter()
        .map(|p| load_image(p))
        .collect::<Result<Vec<_>, _>>()?;
    let t = Instant::now();
    let mut detector = Detector::load(manifest, options)?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;

    let bar = ProgressBar::new((args.warmup + args.runs) as u64).with_style(
        ProgressStyle::with_template("{msg:>8} {bar:40} {pos}/{len} [{elapsed}<{eta}]")
            .expect("static template"),
    );
    bar.set_message("warm-up");
    for i in 0..args.warmup {
        detector.detect(&frames[i % frames.len()])?;
        bar.inc(1);
    }
    bar.set_message("measure");
    let (mut pre, mut inf, mut post, mut total) = (vec![], vec![], vec![], vec![]);
    for i in 0..args.runs {
        let (_, s) = detector.detect(&frames[i % frames.len()])?;
        pre.push(s.preprocess_ms);
        inf.push(s.inference_ms);
        post.push(s.postprocess_ms);
        total.push(s.preprocess_ms + s.inference_ms + s.postprocess_ms);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let stages = Stages {
        preprocess: StageStats::of(&mut pre),
        inference: StageStats::of(&mut inf),
        postprocess: StageStats::of(&mut post),
        total: StageStats::of(&mut total),
    };
    let (w, h) = detector.input_size();
    let report = Report {
        model: detector.manifest().manifest.name.clone(),
        input_size: [w, h],
        images: frames.len(),
        warmup: args.warmup,
        runs: args.runs,
        load_ms,
        kernels: detector.kernels(),
        frames_per_second: 1e3 / stages.total.mean,
        stages_ms: stages,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {} at {}x{}, {} images, {} runs after {} warm-up; load {:.1} ms",
            report.model, w, h, report.images, report.runs, report.warmup, report.load_ms
        );
        println!("kernels {}", report.kernels.join(", "));
        println!(
            "{:<12} {:>9} {:>9} {:>9} {:>9}",
            "stage (ms)", "p50", "p90", "p99", "mean"
        );
        for (name, s) in [
            ("preprocess", &report.stages_ms.preprocess),
            ("inference", &report.stages_ms.inference),
            ("postprocess", &report.stages_ms.postprocess),
            ("total", &report.stages_ms.total),
        ] {
            println!(
                "{name:<12} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                s.p50, s.p90, s.p99, s.mean
            );
        }
        println!("{:.1} frames/s", report.frames_per_second);
    }
    Ok(())
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
