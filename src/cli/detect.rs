//! `shelfwatch detect IMAGE...`

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use super::{report, ModelArgs};
use crate::capture::load_image;
use crate::vision::scale::{ScaleChoice, ScaledDetector};
use crate::vision::{annotate, Detection, Detector, StageTimings};

#[derive(Debug, clap::Args)]
pub struct DetectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Write a copy of each image with boxes and labels drawn into this directory.
    #[arg(long, value_name = "DIR")]
    pub annotate: Option<PathBuf>,
    /// Images to examine (PNG, JPEG, BMP).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Serialize)]
struct ImageResult<'a> {
    file: &'a Path,
    width: u32,
    height: u32,
    model: &'a str,
    /// The scale rule's choice for the image (absent with a fixed input size).
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<ScaleChoice>,
    /// Model passes run: probes, aims and tiles.
    passes: usize,
    detections: Vec<Detection>,
    timings_ms: Timings,
}

#[derive(Serialize)]
struct Timings {
    decode_image: f64,
    #[serde(flatten)]
    stages: StageTimings,
}

#[derive(Serialize)]
struct ImageError<'a> {
    file: &'a Path,
    error: String,
}

pub fn run(args: DetectArgs) -> ExitCode {
    let (manifest, options) = match args.model.load() {
        Ok(v) => v,
        Err(code) => return code,
    };
    let mut detector = match Detector::load(&manifest, &options) {
        Ok(d) => ScaledDetector::new(d, options.input_size, std::time::Duration::MAX),
        Err(e) => {
            report(&e.into());
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = &args.annotate {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("error: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    }
    let mut failed = 0usize;
    for path in &args.images {
        if let Err(e) = detect_one(&mut detector, path, args.annotate.as_deref()) {
            failed += 1;
            report(&e);
            let line = ImageError {
                file: path,
                error: format!("{e:#}"),
            };
            println!(
                "{}",
                serde_json::to_string(&line).expect("plain struct serialises")
            );
        }
    }
    if failed > 0 {
        eprintln!("error: {failed} of {} images failed", args.images.len());
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn detect_one(
    detector: &mut ScaledDetector,
    path: &Path,
    annotate_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let img = load_image(path)?;
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Every image is its own camera: its scale is measured afresh.
    detector.reset();
    let (detections, frame) = detector.detect(&img, &[], Instant::now())?;
    if let Some(dir) = annotate_dir {
        let mut copy = img.clone();
        annotate::draw_detections(&mut copy, &detections);
        let out = annotated_path(dir, path);
        copy.save(&out)
            .with_context(|| format!("{}: cannot write annotated copy", out.display()))?;
    }
    let result = ImageResult {
        file: path,
        width: img.width(),
        height: img.height(),
        model: &detector.detector.manifest().manifest.name,
        scale: detector.choices().first().copied().flatten(),
        passes: frame.passes,
        detections,
        timings_ms: Timings {
            decode_image: decode_ms,
            stages: frame.timings,
        },
    };
    println!(
        "{}",
        serde_json::to_string(&result).expect("plain struct serialises")
    );
    Ok(())
}

/// `DIR/<name>`, keeping JPEG as JPEG and writing everything else as PNG.
fn annotated_path(dir: &Path, src: &Path) -> PathBuf {
    let stem = src.file_stem().unwrap_or_default().to_string_lossy();
    let ext = match src
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
    {
        Some(e) if e == "jpg" || e == "jpeg" => "jpg",
        _ => "png",
    };
    dir.join(format!("{stem}.{ext}"))
}
