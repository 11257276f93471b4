//! `shelfwatch eval DATASET`: detection quality on labelled images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::{report, ModelArgs};
use crate::capture::load_image;
use crate::vision::eval::{Dataset, Evaluator, Summary};
use crate::vision::scale::ScaledDetector;
use crate::vision::{Detector, DetectorOptions};

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A box matches a labelled object when their IoU is at least this.
    #[arg(long, default_value_t = 0.5)]
    pub iou: f32,
    /// Detections down to this score are ranked for AP; precision, recall, F1 and
    /// counts use the operating threshold (configured, manifest's, or --threshold).
    #[arg(long, default_value_t = 0.05)]
    pub ap_floor: f32,
    /// Take the ground truth from this model's detections instead of the labels: how
    /// far a model (e.g. the int8 one) agrees with another (its float original).
    #[arg(long, value_name = "MANIFEST")]
    pub reference_model: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A directory of images with YOLO txt labels, or a COCO annotation .json file.
    pub dataset: PathBuf,
}

#[derive(Serialize)]
struct Report<'a> {
    dataset: &'a Path,
    format: &'static str,
    model: &'a str,
    /// "labels", or the reference model's name.
    truth: String,
    operating_threshold: f32,
    images_without_labels: usize,
    ignored_categories: &'a [String],
    #[serde(flatten)]
    summary: Summary,
}

pub fn run(args: EvalArgs) -> ExitCode {
    let (manifest, options) = match args.model.load() {
        Ok(v) => v,
        Err(code) => return code,
    };
    match eval(&args, &manifest, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// A detector that reports everything down to `floor`, and the threshold per label at
/// which a detection counts as the configured detector would report it.
fn ranked_detector(
    manifest: &Path,
    options: &DetectorOptions,
    floor: f32,
) -> anyhow::Result<(Detector, Vec<f32>)> {
    let mut wide = options.clone();
    wide.score_threshold = Some(floor);
    wide.label_thresholds.clear();
    let detector = Detector::load(manifest, &wide)?;
    let post = &detector.manifest().manifest.postprocess;
    let default = options.score_threshold.unwrap_or(post.score_threshold);
    let operating = detector
        .labels()
        .iter()
        .map(|l| options.label_thresholds.get(l).copied().unwrap_or(default))
        .collect();
    Ok((detector, operating))
}

fn eval(args: &EvalArgs, manifest: &Path, options: DetectorOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.iou > 0.0 && args.iou <= 1.0,
        "--iou must be in (0, 1], got {}",
        args.iou
    );
    anyhow::ensure!(
        args.ap_floor > 0.0 && args.ap_floor < 1.0,
        "--ap-floor must be in (0, 1), got {}",
        args.ap_floor
    );
    let (detector, operating) = ranked_detector(manifest, &options, args.ap_floor)?;
    let labels = detector.labels().to_vec();
    // The same scale rule as the daemon, measured on what the operating threshold
    // reports (the ranked detections below it must not move the scale).
    let mut detector = ScaledDetector::new(detector, options.input_size, std::time::Duration::MAX);
    detector.set_measure_min_score(operating.iter().copied().fold(f32::INFINITY, f32::min));
    let dataset = Dataset::load(&args.dataset, &labels)?;
    let mut reference = args
        .reference_model
        .as_deref()
        .map(|m| reference_detector(m, manifest, &options, &labels))
        .transpose()?;

    let bar = ProgressBar::new(dataset.samples.len() as u64).with_style(
        ProgressStyle::with_template("{msg:>8} {bar:40} {pos}/{len} [{elapsed}<{eta}]")
            .expect("static template"),
    );
    bar.set_message("eval");
    let mut evaluator = Evaluator::new(&labels, args.iou);
    for sample in &dataset.samples {
        let image = load_image(&sample.image)?;
        let truth = match reference.as_mut() {
            Some(r) => {
                r.reset();
                r.detect(&image, &[], std::time::Instant::now())?
                    .0
                    .into_iter()
                    .map(|d| (d.class_id, d.bbox))
                    .collect()
            }
            None => sample.truth.to_pixels(image.width(), image.height()),
        };
        detector.reset();
        let (detections, _) = detector.detect(&image, &[], std::time::Instant::now())?;
        evaluator.add(&detections, &truth, |class| operating[class]);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let default_threshold = options.score_threshold.unwrap_or(
        detector
            .detector
            .manifest()
            .manifest
            .postprocess
            .score_threshold,
    );
    let report = Report {
        dataset: &args.dataset,
        format: dataset.format,
        model: &detector.detector.manifest().manifest.name,
        truth: reference
            .as_ref()
            .map(|r| r.detector.manifest().manifest.name.clone())
            .unwrap_or_else(|| "labels".into()),
        operating_threshold: default_threshold,
        images_without_labels: dataset.images_without_labels,
        ignored_categories: &dataset.ignored_categories,
        summary: evaluator.summary(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_report(&report);
    Ok(())
}

/// The model whose detections stand in for labels (`--reference-model`): it must know
/// the same labels.
fn reference_detector(
    m: &Path,
    manifest: &Path,
    options: &DetectorOptions,
    labels: &[String],
) -> anyhow::Result<ScaledDetector> {
    let r = Detector::load(m, options)?;
    let r = ScaledDetector::new(r, options.input_size, std::time::Duration::MAX);
    anyhow::ensure!(
        r.detector.labels() == labels,
        "{}: its labels differ from those of {}; agreement needs the same label set",
        m.display(),
        manifest.display()
    );
    Ok(r)
}

/// The table `eval` prints without `--json`.
fn print_report(report: &Report<'_>) {
    let s = &report.summary;
    println!(
        "{} on {} ({} images, {}), truth: {}, IoU >= {}, threshold {}",
        report.model,
        report.dataset.display(),
        s.images,
        report.format,
        report.truth,
        s.iou_threshold,
        report.operating_threshold
    );
    if report.images_without_labels > 0 {
        println!(
            "{} images have no label file (taken as empty)",
            report.images_without_labels
        );
    }
    if !report.ignored_categories.is_empty() {
        println!(
            "categories the model does not know, left out: {}",
            report.ignored_categories.join(", ")
        );
    }
    println!(
        "{:<20} {:>6} {:>6} {:>9} {:>7} {:>6} {:>7} {:>9}",
        "label", "truth", "dets", "precision", "recall", "F1", "AP", "count MAE"
    );
    let ap = |a: Option<f64>| a.map_or("-".to_string(), |v| format!("{v:.3}"));
    for l in &s.labels {
        println!(
            "{:<20} {:>6} {:>6} {:>9.3} {:>7.3} {:>6.3} {:>7} {:>9.3}",
            l.label,
            l.truth,
            l.detections,
            l.precision,
            l.recall,
            l.f1,
            ap(l.ap),
            l.count_mae
        );
    }
    println!(
        "{:<20} {:>6} {:>6} {:>9.3} {:>7.3} {:>6.3} {:>7} {:>9.3}",
        "all (micro; mAP)",
        s.labels.iter().map(|l| l.truth).sum::<usize>(),
        s.labels.iter().map(|l| l.detections).sum::<usize>(),
        s.precision,
        s.recall,
        s.f1,
        ap(s.map),
        s.count_mae
    );
}
