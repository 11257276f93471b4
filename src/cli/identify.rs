//! `shelfwatch enroll`, `shelfwatch identify` and `shelfwatch gallery list|remove|bench`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use super::{report, ModelArgs};
use crate::capture::load_image;
use crate::identify::gallery::{open_for_change, SkuSummary};
use crate::identify::{answer, Answer, Gallery, GalleryLock, Reference};
use crate::vision::embed::ModelId;
use crate::vision::{BBox, Detector, Embedder};

/// Where the gallery is and which embedding model reads it.
#[derive(Debug, clap::Args)]
pub struct GalleryArgs {
    /// Gallery directory; `[identify] gallery` of the config when absent.
    #[arg(long, value_name = "DIR")]
    pub gallery: Option<PathBuf>,
    /// Embedding model manifest; `[identify] model` of the config, else the bundled
    /// EfficientNet-Lite0.
    #[arg(long, value_name = "MANIFEST")]
    pub embedder: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub gallery: GalleryArgs,
    /// The product's SKU (EAN, article number, ...): no spaces, `/`, `+` or `#`.
    #[arg(long)]
    pub sku: String,
    /// Product name shown with matches.
    #[arg(long)]
    pub name: Option<String>,
    /// Enrol the largest detection of each image (the detector of `--model`/the
    /// config) instead of the whole photo.
    #[arg(long)]
    pub crop_largest: bool,
    /// Reference photos of the product (PNG, JPEG, BMP).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct IdentifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub gallery: GalleryArgs,
    /// Matches to report per image (or detection).
    #[arg(long, default_value_t = crate::identify::default_top_k())]
    pub top_k: usize,
    /// Below this similarity the answer is `unknown`; `[identify] unknown-threshold` of
    /// the config, else 0.5.
    #[arg(long)]
    pub unknown_threshold: Option<f32>,
    /// Identify each detection (the detector of `--model`/the config) instead of the
    /// whole photo.
    #[arg(long)]
    pub per_detection: bool,
    /// One JSON object per image on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum GalleryCommand {
    /// List the enrolled SKUs with their reference counts.
    List {
        #[command(flatten)]
        gallery: GalleryArgs,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a SKU's references (all, or those enrolled from one image file).
    Remove {
        #[command(flatten)]
        gallery: GalleryArgs,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        sku: String,
        /// Only the reference enrolled from this file name (as `gallery list` shows it).
        #[arg(long)]
        source: Option<String>,
    },
    /// Time an exact search over a gallery of random references (no model needed).
    Bench {
        /// References in the synthetic gallery.
        #[arg(long, default_value_t = 10_000)]
        references: usize,
        /// References per SKU.
        #[arg(long, default_value_t = 5)]
        per_sku: usize,
        #[arg(long, default_value_t = 1280)]
        dimensions: usize,
        #[arg(long, default_value_t = 200)]
        queries: usize,
    },
}

/// The gallery directory and the embedding model manifest, from flags then config.
fn locate(
    args: &GalleryArgs,
    config: &Option<PathBuf>,
) -> Result<(PathBuf, PathBuf, crate::config::LoadedConfig), ExitCode> {
    let loaded = ModelArgs::config_at(config)?;
    let from_config = loaded.identify_paths();
    let gallery = args
        .gallery
        .clone()
        .or_else(|| from_config.as_ref().map(|(_, g)| g.clone()));
    let Some(gallery) = gallery else {
        eprintln!("error: no gallery: pass --gallery DIR or configure [identify] gallery");
        return Err(ExitCode::from(2));
    };
    let embedder = args
        .embedder
        .clone()
        .or_else(|| from_config.map(|(m, _)| m))
        .unwrap_or_else(|| {
            crate::config::default_model_dir().join(crate::identify::default_embedder())
        });
    Ok((gallery, embedder, loaded))
}

fn load_embedder(
    manifest: &Path,
    loaded: &crate::config::LoadedConfig,
) -> Result<Embedder, ExitCode> {
    let mut options = loaded.embedder_options();
    options.cache_dir = None;
    Embedder::load(manifest, &options).map_err(|e| {
        report(&e.into());
        ExitCode::FAILURE
    })
}

fn load_detector(model: &ModelArgs) -> Result<Detector, ExitCode> {
    let (manifest, options) = model.load()?;
    Detector::load(&manifest, &options).map_err(|e| {
        report(&e.into());
        ExitCode::FAILURE
    })
}

pub fn enroll(args: EnrollArgs) -> ExitCode {
    if let Err(e) = crate::identify::gallery::check_sku(&args.sku) {
        eprintln!("error: --sku: {e}");
        return ExitCode::from(2);
    }
    let (dir, manifest, loaded) = match locate(&args.gallery, &args.model.config) {
        Ok(v) => v,
        Err(c) => return c,
    };
    let mut embedder = match load_embedder(&manifest, &loaded) {
        Ok(e) => e,
        Err(c) => return c,
    };
    let mut detector = if args.crop_largest {
        match load_detector(&args.model) {
            Ok(d) => Some(d),
            Err(c) => return c,
        }
    } else {
        None
    };
    // Embed first, then lock only for the short read-modify-write.
    let mut new = Vec::new();
    let mut failed = 0;
    for path in &args.images {
        match reference_vector(&mut embedder, detector.as_mut(), path) {
            Ok(v) => new.push((path, v)),
            Err(e) => {
                failed += 1;
                report(&e);
            }
        }
    }
    let result = (|| -> anyhow::Result<(usize, usize)> {
        let _lock = GalleryLock::acquire(&dir)?;
        let mut g = open_for_change(&dir, &embedder.model_id())?;
        let added = crate::publish::rfc3339(std::time::SystemTime::now());
        for (path, v) in &new {
            g.add(
                Reference {
                    sku: args.sku.clone(),
                    name: args.name.clone(),
                    source: path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| path.display().to_string()),
                    added: added.clone(),
                },
                v,
            )?;
        }
        if !new.is_empty() {
            g.save(&dir)?;
        }
        Ok((g.len(), g.skus().len()))
    })();
    match result {
        Ok((refs, skus)) => {
            println!(
                "{}: enrolled {} reference(s) for SKU {}; the gallery has {refs} reference(s) of {skus} SKU(s)",
                dir.display(),
                new.len(),
                args.sku
            );
        }
        Err(e) => {
            report(&e);
            return ExitCode::FAILURE;
        }
    }
    if failed > 0 {
        eprintln!(
            "error: {failed} of {} images were not enrolled",
            args.images.len()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn reference_vector(
    embedder: &mut Embedder,
    detector: Option<&mut Detector>,
    path: &Path,
) -> anyhow::Result<Vec<f32>> {
    let img = load_image(path)?;
    match detector {
        None => Ok(embedder.embed(&img)?),
        Some(d) => {
            let (dets, _) = d.detect(&img)?;
            let largest = dets
                .iter()
                .max_by(|a, b| a.bbox.area().total_cmp(&b.bbox.area()))
                .with_context(|| {
                    format!(
                        "{}: --crop-largest: the detector found nothing to crop",
                        path.display()
                    )
                })?;
            Ok(embedder.embed_region(&img, &largest.bbox)?)
        }
    }
}

#[derive(Serialize)]
struct WholeImage<'a> {
    file: &'a Path,
    #[serde(flatten)]
    answer: Answer,
    embed_ms: f64,
}

#[derive(Serialize)]
struct DetectionAnswer {
    label: String,
    score: f32,
    #[serde(rename = "box")]
    bbox: BBox,
    #[serde(flatten)]
    answer: Answer,
}

#[derive(Serialize)]
struct PerDetection<'a> {
    file: &'a Path,
    detections: Vec<DetectionAnswer>,
}

pub fn identify(args: IdentifyArgs) -> ExitCode {
    let (dir, manifest, loaded) = match locate(&args.gallery, &args.model.config) {
        Ok(v) => v,
        Err(c) => return c,
    };
    let threshold = args
        .unknown_threshold
        .or(loaded.config.identify.as_ref().map(|i| i.unknown_threshold))
        .unwrap_or_else(crate::identify::default_unknown_threshold);
    if !(threshold > 0.0 && threshold <= 1.0) {
        eprintln!("error: --unknown-threshold must be in (0, 1], got {threshold}");
        return ExitCode::from(2);
    }
    if args.top_k == 0 {
        eprintln!("error: --top-k must be at least 1");
        return ExitCode::from(2);
    }
    let mut embedder = match load_embedder(&manifest, &loaded) {
        Ok(e) => e,
        Err(c) => return c,
    };
    let gallery = match Gallery::load_for(&dir, &embedder.model_id()) {
        Ok(g) => g,
        Err(e) => {
            report(&e.into());
            return ExitCode::FAILURE;
        }
    };
    let mut detector = if args.per_detection {
        match load_detector(&args.model) {
            Ok(d) => Some(d),
            Err(c) => return c,
        }
    } else {
        None
    };
    let mut failed = 0;
    for path in &args.images {
        let r = identify_one(
            &mut embedder,
            detector.as_mut(),
            &gallery,
            path,
            args.top_k,
            threshold,
            args.json,
        );
        if let Err(e) = r {
            failed += 1;
            report(&e);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"file": path, "error": format!("{e:#}")})
                );
            }
        }
    }
    if failed > 0 {
        eprintln!("error: {failed} of {} images failed", args.images.len());
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn identify_one(
    embedder: &mut Embedder,
    detector: Option<&mut Detector>,
    gallery: &Gallery,
    path: &Path,
    top_k: usize,
    threshold: f32,
    json: bool,
) -> anyhow::Result<()> {
    let img = load_image(path)?;
    match detector {
        None => {
            let t = Instant::now();
            let v = embedder.embed(&img)?;
            let embed_ms = t.elapsed().as_secs_f64() * 1e3;
            let a = answer(gallery, &v, top_k, threshold);
            if json {
                let out = WholeImage {
                    file: path,
                    answer: a,
                    embed_ms,
                };
                println!("{}", serde_json::to_string(&out).expect("serialises"));
            } else {
                println!("{}: {}", path.display(), describe(&a));
            }
        }
        Some(d) => {
            let (dets, _) = d.detect(&img)?;
            let mut out = Vec::new();
            for det in dets {
                let v = embedder.embed_region(&img, &det.bbox)?;
                out.push(DetectionAnswer {
                    answer: answer(gallery, &v, top_k, threshold),
                    label: det.label,
                    score: det.score,
                    bbox: det.bbox,
                });
            }
            if json {
                let line = PerDetection {
                    file: path,
                    detections: out,
                };
                println!("{}", serde_json::to_string(&line).expect("serialises"));
            } else {
                println!("{}: {} detection(s)", path.display(), out.len());
                for d in &out {
                    println!(
                        "  {} {:.2} at ({:.0},{:.0})-({:.0},{:.0}): {}",
                        d.label,
                        d.score,
                        d.bbox.x1,
                        d.bbox.y1,
                        d.bbox.x2,
                        d.bbox.y2,
                        describe(&d.answer)
                    );
                }
            }
        }
    }
    Ok(())
}

fn describe(a: &Answer) -> String {
    let rest: Vec<String> = a
        .matches
        .iter()
        .map(|m| format!("{} {:.3}", m.sku, m.similarity))
        .collect();
    format!("{} ({:.3}); top: {}", a.sku, a.similarity, rest.join(", "))
}

pub fn gallery(cmd: GalleryCommand) -> ExitCode {
    match cmd {
        GalleryCommand::List {
            gallery,
            config,
            json,
        } => {
            let (dir, _, _) = match locate(&gallery, &config) {
                Ok(v) => v,
                Err(c) => return c,
            };
            match Gallery::load(&dir) {
                Ok(g) => {
                    print_list(&dir, g.model(), &g.skus(), json);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report(&e.into());
                    ExitCode::FAILURE
                }
            }
        }
        GalleryCommand::Remove {
            gallery,
            config,
            sku,
            source,
        } => {
            let (dir, _, _) = match locate(&gallery, &config) {
                Ok(v) => v,
                Err(c) => return c,
            };
            let r = (|| -> anyhow::Result<usize> {
                let _lock = GalleryLock::acquire(&dir)?;
                let mut g = Gallery::load(&dir)?;
                let n = g.remove(&sku, source.as_deref());
                if n > 0 {
                    g.save(&dir)?;
                }
                Ok(n)
            })();
            match r {
                Ok(0) => {
                    eprintln!(
                        "error: {}: no reference of SKU {sku}{} to remove",
                        dir.display(),
                        source.map(|s| format!(" from {s}")).unwrap_or_default()
                    );
                    ExitCode::FAILURE
                }
                Ok(n) => {
                    println!("{}: removed {n} reference(s) of SKU {sku}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            }
        }
        GalleryCommand::Bench {
            references,
            per_sku,
            dimensions,
            queries,
        } => {
            bench_search(
                references,
                per_sku.max(1),
                dimensions.max(1),
                queries.max(1),
            );
            ExitCode::SUCCESS
        }
    }
}

fn print_list(dir: &Path, model: &ModelId, skus: &[SkuSummary], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"gallery": dir, "model": model, "skus": skus})
        );
        return;
    }
    let refs: usize = skus.iter().map(|s| s.references).sum();
    println!(
        "{}: {} SKU(s), {refs} reference(s), model {}",
        dir.display(),
        skus.len(),
        model.name
    );
    for s in skus {
        println!(
            "  {:<24} {:>3} ref(s)  {}  [{}]",
            s.sku,
            s.references,
            s.name.as_deref().unwrap_or(""),
            s.sources.join(", ")
        );
    }
}

/// Exact search time over `references` random unit vectors, for the "when does a
/// gallery need an index" question.
fn bench_search(references: usize, per_sku: usize, dimensions: usize, queries: usize) {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut g = Gallery::new(ModelId {
        name: "bench".into(),
        sha256: "0".repeat(64),
        dimensions,
    });
    for i in 0..references {
        let v: Vec<f32> = (0..dimensions).map(|_| next()).collect();
        g.add(
            Reference {
                sku: format!("sku-{}", i / per_sku),
                name: None,
                source: format!("{i}.jpg"),
                added: String::new(),
            },
            &v,
        )
        .expect("generated SKUs are valid");
    }
    let mut times = Vec::with_capacity(queries);
    for _ in 0..queries {
        let mut q: Vec<f32> = (0..dimensions).map(|_| next()).collect();
        crate::vision::embed::normalise(&mut q);
        let t = Instant::now();
        std::hint::black_box(g.search(&q, 5));
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let at = |p: f64| times[((p * times.len() as f64) as usize).min(times.len() - 1)];
    println!(
        "exact search, {references} references of {dimensions} dimensions ({} SKUs): p50 {:.3} ms, p99 {:.3} ms, {:.1} MB of vectors",
        references.div_ceil(per_sku),
        at(0.5),
        at(0.99),
        (references * dimensions * 4) as f64 / 1e6
    );
}
