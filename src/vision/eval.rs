//! Detection quality against labelled images: precision, recall, F1 and AP at an IoU
//! threshold, and count error per image, per label. For `shelfwatch eval`: choosing a
//! model, a threshold or an input size on a warehouse's own frames, and checking that a
//! quantised model keeps the quality of its float original.
//!
//! Datasets come in the two formats labelling tools export:
//! - YOLO txt: a directory of images, each with a `.txt` beside it (or the Ultralytics
//!   layout `images/` + `labels/`), one `class cx cy w h` line per object, normalised to
//!   0..1. Class numbers are the model's label indices, or names from a `classes.txt`
//!   in the directory (one name a line, line N = class N).
//! - COCO JSON: `images`, `annotations` (`bbox` = [x, y, width, height] in pixels) and
//!   `categories`, matched to the model's labels by name; image files relative to the
//!   JSON file (or its `images/` directory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{BBox, Detection};

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "bmp"];

/// Errors reading a dataset; each names the file (and line) it is about.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Ground truth boxes of one image, as the dataset states them.
#[derive(Debug, Clone, PartialEq)]
pub enum TruthBoxes {
    /// YOLO: (class, [cx, cy, w, h]) as fractions of the image size.
    Normalised(Vec<(usize, [f32; 4])>),
    /// COCO: (class, box in pixels).
    Pixels(Vec<(usize, BBox)>),
}

impl TruthBoxes {
    /// The boxes in pixels of an image of this size.
    pub fn to_pixels(&self, width: u32, height: u32) -> Vec<(usize, BBox)> {
        match self {
            TruthBoxes::Pixels(v) => v.clone(),
            TruthBoxes::Normalised(v) => {
                let (w, h) = (width as f32, height as f32);
                v.iter()
                    .map(|&(c, [cx, cy, bw, bh])| {
                        let bbox = BBox {
                            x1: (cx - bw / 2.0) * w,
                            y1: (cy - bh / 2.0) * h,
                            x2: (cx + bw / 2.0) * w,
                            y2: (cy + bh / 2.0) * h,
                        };
                        (c, bbox)
                    })
                    .collect()
            }
        }
    }
}

/// One labelled image.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: PathBuf,
    pub truth: TruthBoxes,
}

/// A loaded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub format: &'static str,
    pub samples: Vec<Sample>,
    /// YOLO images without a label file: taken as showing nothing (Ultralytics does the
    /// same), reported so that a misplaced labels folder does not go unnoticed.
    pub images_without_labels: usize,
    /// COCO categories the model has no label for: their annotations are left out.
    pub ignored_categories: Vec<String>,
}

impl Dataset {
    /// A directory is read as YOLO txt, a `.json` file as COCO. `labels` are the model's
    /// label names in index order.
    pub fn load(path: &Path, labels: &[String]) -> Result<Self, DatasetError> {
        if path.is_dir() {
            load_yolo(path, labels)
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            load_coco(path, labels)
        } else {
            Err(DatasetError::Invalid {
                path: path.to_owned(),
                message: "not a directory of YOLO-labelled images nor a COCO .json file".into(),
            })
        }
    }
}

fn read(path: &Path) -> Result<String, DatasetError> {
    std::fs::read_to_string(path).map_err(|error| DatasetError::Io {
        path: path.to_owned(),
        error,
    })
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn load_yolo(dir: &Path, labels: &[String]) -> Result<Dataset, DatasetError> {
    // Ultralytics layout (images/ + labels/) or images with their .txt beside them.
    let (image_dir, label_dir) = if dir.join("images").is_dir() {
        (dir.join("images"), dir.join("labels"))
    } else {
        (dir.to_owned(), dir.to_owned())
    };
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| DatasetError::Io { path, error }
    };
    let mut images: Vec<PathBuf> = std::fs::read_dir(&image_dir)
        .map_err(io(&image_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_image(p))
        .collect();
    images.sort();
    if images.is_empty() {
        return Err(DatasetError::Invalid {
            path: image_dir,
            message: format!("no images ({})", IMAGE_EXTENSIONS.join(", ")),
        });
    }
    let class_map = yolo_classes(dir, labels)?;
    let mut samples = Vec::with_capacity(images.len());
    let mut without = 0;
    for image in images {
        let stem = image.file_stem().unwrap_or_default();
        let txt = label_dir.join(stem).with_extension("txt");
        let boxes = if txt.is_file() {
            parse_yolo(&txt, &read(&txt)?, &class_map, labels.len())?
        } else {
            without += 1;
            Vec::new()
        };
        samples.push(Sample {
            image,
            truth: TruthBoxes::Normalised(boxes),
        });
    }
    Ok(Dataset {
        format: "yolo",
        samples,
        images_without_labels: without,
        ignored_categories: Vec::new(),
    })
}

/// `classes.txt` (line N names class N) mapped to the model's label indices; `None`
/// when absent: class numbers are then the model's own.
fn yolo_classes(dir: &Path, labels: &[String]) -> Result<Option<Vec<usize>>, DatasetError> {
    let path = dir.join("classes.txt");
    if !path.is_file() {
        return Ok(None);
    }
    let text = read(&path)?;
    let mut map = Vec::new();
    for (i, name) in text.lines().enumerate() {
        let name = name.trim();
        let index = labels
            .iter()
            .position(|l| l == name)
            .ok_or_else(|| DatasetError::Line {
                path: path.clone(),
                line: i + 1,
                message: format!(
                    "class {name:?} is not a label of the model ({})",
                    labels.join(", ")
                ),
            })?;
        map.push(index);
    }
    Ok(Some(map))
}

fn parse_yolo(
    path: &Path,
    text: &str,
    class_map: &Option<Vec<usize>>,
    n_labels: usize,
) -> Result<Vec<(usize, [f32; 4])>, DatasetError> {
    let mut boxes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |message: String| DatasetError::Line {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(err(format!(
                "expected `class cx cy w h`, found {} fields",
                fields.len()
            )));
        }
        let class: usize = fields[0]
            .parse()
            .map_err(|_| err(format!("class {:?} is not a whole number", fields[0])))?;
        let class = match class_map {
            Some(map) => *map.get(class).ok_or_else(|| {
                err(format!(
                    "class {class} has no line in classes.txt ({} lines)",
                    map.len()
                ))
            })?,
            None if class < n_labels => class,
            None => {
                return Err(err(format!(
                    "class {class} is not a label index of the model (0..{})",
                    n_labels - 1
                )))
            }
        };
        let mut v = [0f32; 4];
        for (slot, field) in v.iter_mut().zip(&fields[1..]) {
            *slot = field
                .parse()
                .ok()
                .filter(|x: &f32| x.is_finite() && (0.0..=1.0).contains(x))
                .ok_or_else(|| err(format!("{field:?} is not a fraction between 0 and 1")))?;
        }
        boxes.push((class, v));
    }
    Ok(boxes)
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: u64,
    category_id: u64,
    bbox: [f32; 4],
}

#[derive(Deserialize)]
struct CocoCategory {
    id: u64,
    name: String,
}

fn load_coco(path: &Path, labels: &[String]) -> Result<Dataset, DatasetError> {
    let text = read(path)?;
    let coco: CocoFile = serde_json::from_str(&text).map_err(|e| DatasetError::Line {
        path: path.to_owned(),
        line: e.line(),
        message: format!("not a COCO annotation file: {e}"),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut category = BTreeMap::new();
    let mut ignored = Vec::new();
    for c in &coco.categories {
        match labels.iter().position(|l| *l == c.name) {
            Some(i) => {
                category.insert(c.id, i);
            }
            None => ignored.push(c.name.clone()),
        }
    }
    let known_categories: std::collections::BTreeSet<u64> =
        coco.categories.iter().map(|c| c.id).collect();
    let mut by_image: BTreeMap<u64, Vec<(usize, BBox)>> = BTreeMap::new();
    for (n, a) in coco.annotations.iter().enumerate() {
        if !known_categories.contains(&a.category_id) {
            return Err(DatasetError::Invalid {
                path: path.to_owned(),
                message: format!(
                    "annotations[{n}]: category_id {} is not in categories",
                    a.category_id
                ),
            });
        }
        let [x, y, w, h] = a.bbox;
        if !(w >= 0.0 && h >= 0.0 && x.is_finite() && y.is_finite()) {
            return Err(DatasetError::Invalid {
                path: path.to_owned(),
                message: format!("annotations[{n}]: bbox {:?} is not [x, y, w, h]", a.bbox),
            });
        }
        if let Some(&class) = category.get(&a.category_id) {
            let bbox = BBox {
                x1: x,
                y1: y,
                x2: x + w,
                y2: y + h,
            };
            by_image.entry(a.image_id).or_default().push((class, bbox));
        }
    }
    let mut samples = Vec::with_capacity(coco.images.len());
    for image in &coco.images {
        let direct = base.join(&image.file_name);
        let file = if direct.is_file() {
            direct
        } else {
            base.join("images").join(&image.file_name)
        };
        samples.push(Sample {
            image: file,
            truth: TruthBoxes::Pixels(by_image.remove(&image.id).unwrap_or_default()),
        });
    }
    if let Some(id) = by_image.keys().next() {
        return Err(DatasetError::Invalid {
            path: path.to_owned(),
            message: format!("annotations refer to image_id {id}, which is not in images"),
        });
    }
    Ok(Dataset {
        format: "coco",
        samples,
        images_without_labels: 0,
        ignored_categories: ignored,
    })
}

/// Quality of one label over a dataset.
#[derive(Debug, Clone, Serialize)]
pub struct LabelMetrics {
    pub label: String,
    /// Objects in the ground truth.
    pub truth: usize,
    /// Detections at or above the operating threshold.
    pub detections: usize,
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Average precision over all detections down to the evaluation floor (all-point
    /// interpolation); `None` for a label with no ground truth.
    pub ap: Option<f64>,
    /// Mean over images of |detections - truth| for this label.
    pub count_mae: f64,
}

/// The whole evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub images: usize,
    pub iou_threshold: f32,
    /// Micro-averaged over labels.
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Mean AP over labels with ground truth.
    pub map: Option<f64>,
    /// Mean of the per-label count MAE over labels with ground truth.
    pub count_mae: f64,
    pub labels: Vec<LabelMetrics>,
}

#[derive(Debug, Default, Clone)]
struct LabelAcc {
    /// Every detection (down to the floor): score and whether it matched.
    ranked: Vec<(f32, bool)>,
    truth: usize,
    tp: usize,
    fp: usize,
    count_abs_error: f64,
}

/// Accumulates detections against ground truth, image by image.
#[derive(Debug, Clone)]
pub struct Evaluator {
    iou_threshold: f32,
    labels: Vec<String>,
    acc: BTreeMap<usize, LabelAcc>,
    images: usize,
}

impl Evaluator {
    pub fn new(labels: &[String], iou_threshold: f32) -> Self {
        Self {
            iou_threshold,
            labels: labels.to_vec(),
            acc: BTreeMap::new(),
            images: 0,
        }
    }

    /// One image: `detections` down to the evaluation floor, `operating(label)` the
    /// threshold at which a detection counts, `truth` in the same pixels.
    pub fn add(
        &mut self,
        detections: &[Detection],
        truth: &[(usize, BBox)],
        operating: impl Fn(usize) -> f32,
    ) {
        self.images += 1;
        let mut classes: Vec<usize> = detections
            .iter()
            .map(|d| d.class_id)
            .chain(truth.iter().map(|t| t.0))
            .collect();
        classes.sort_unstable();
        classes.dedup();
        for class in classes {
            let mut dets: Vec<&Detection> =
                detections.iter().filter(|d| d.class_id == class).collect();
            dets.sort_by(|a, b| b.score.total_cmp(&a.score));
            let gts: Vec<&BBox> = truth
                .iter()
                .filter(|t| t.0 == class)
                .map(|t| &t.1)
                .collect();
            let mut taken = vec![false; gts.len()];
            let acc = self.acc.entry(class).or_default();
            let threshold = operating(class);
            let mut counted = 0usize;
            // Greedy in score order, each detection to the free truth box it overlaps
            // most: the usual VOC/COCO matching. The operating threshold cuts a prefix of
            // this order, so its matches are the same as when matching only above it.
            for d in dets {
                let best = gts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !taken[*i])
                    .map(|(i, g)| (i, d.bbox.iou(g)))
                    .filter(|(_, iou)| *iou >= self.iou_threshold)
                    .max_by(|a, b| a.1.total_cmp(&b.1));
                let matched = best.map(|(i, _)| taken[i] = true).is_some();
                acc.ranked.push((d.score, matched));
                if d.score >= threshold {
                    counted += 1;
                    if matched {
                        acc.tp += 1;
                    } else {
                        acc.fp += 1;
                    }
                }
            }
            acc.truth += gts.len();
            acc.count_abs_error += (counted as f64 - gts.len() as f64).abs();
        }
    }

    pub fn summary(&self) -> Summary {
        let images = self.images.max(1) as f64;
        // Labels that only ever scored below the operating threshold and have no truth
        // say nothing about the model at that threshold (they are in no AP either).
        let labels: Vec<LabelMetrics> = self
            .acc
            .iter()
            .filter(|(_, a)| a.truth > 0 || a.tp + a.fp > 0)
            .map(|(&class, a)| {
                let detections = a.tp + a.fp;
                let precision = ratio(a.tp, detections);
                let recall = ratio(a.tp, a.truth);
                LabelMetrics {
                    label: self
                        .labels
                        .get(class)
                        .cloned()
                        .unwrap_or_else(|| class.to_string()),
                    truth: a.truth,
                    detections,
                    true_positives: a.tp,
                    false_positives: a.fp,
                    false_negatives: a.truth - a.tp,
                    precision,
                    recall,
                    f1: f1(precision, recall),
                    ap: (a.truth > 0).then(|| average_precision(&a.ranked, a.truth)),
                    count_mae: a.count_abs_error / images,
                }
            })
            .collect();
        let (tp, det, truth) = self.acc.values().fold((0, 0, 0), |(tp, det, truth), a| {
            (tp + a.tp, det + a.tp + a.fp, truth + a.truth)
        });
        let with_truth: Vec<&LabelMetrics> = labels.iter().filter(|l| l.truth > 0).collect();
        let map = (!with_truth.is_empty())
            .then(|| with_truth.iter().filter_map(|l| l.ap).sum::<f64>() / with_truth.len() as f64);
        let count_mae = if with_truth.is_empty() {
            0.0
        } else {
            with_truth.iter().map(|l| l.count_mae).sum::<f64>() / with_truth.len() as f64
        };
        let precision = ratio(tp, det);
        let recall = ratio(tp, truth);
        Summary {
            images: self.images,
            iou_threshold: self.iou_threshold,
            precision,
            recall,
            f1: f1(precision, recall),
            map,
            count_mae,
            labels,
        }
    }
}

/// 1 when there is nothing to get wrong (no detections for precision, no truth for
/// recall): an empty shelf correctly reported empty is perfect, not undefined.
fn ratio(n: usize, d: usize) -> f64 {
    if d == 0 {
        1.0
    } else {
        n as f64 / d as f64
    }
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    }
}

/// Area under the precision-recall curve with precision made monotone (all-point
/// interpolation, as PASCAL VOC since 2010).
fn average_precision(ranked: &[(f32, bool)], truth: usize) -> f64 {
    let mut order: Vec<&(f32, bool)> = ranked.iter().collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut points = Vec::with_capacity(order.len());
    let (mut tp, mut fp) = (0usize, 0usize);
    for &&(_, matched) in &order {
        if matched {
            tp += 1;
        } else {
            fp += 1;
        }
        points.push((tp as f64 / truth as f64, tp as f64 / (tp + fp) as f64));
    }
    // Precision envelope from the right.
    for i in (0..points.len().saturating_sub(1)).rev() {
        points[i].1 = points[i].1.max(points[i + 1].1);
    }
    let mut ap = 0.0;
    let mut last_recall = 0.0;
    for (recall, precision) in points {
        ap += (recall - last_recall) * precision;
        last_recall = recall;
    }
    ap
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(x1: f32, y1: f32, x2: f32, y2: f32) -> BBox {
        BBox { x1, y1, x2, y2 }
    }

    fn det(class: usize, score: f32, b: BBox) -> Detection {
        Detection {
            label: format!("c{class}"),
            class_id: class,
            score,
            bbox: b,
        }
    }

    fn labels() -> Vec<String> {
        vec!["background".into(), "Box".into(), "Bottle".into()]
    }

    #[test]
    fn perfect_detections_score_one_everywhere_and_no_count_error() {
        let mut e = Evaluator::new(&labels(), 0.5);
        let truth = [(1, bx(0., 0., 10., 10.)), (1, bx(20., 0., 30., 10.))];
        let dets = [
            det(1, 0.9, bx(0., 0., 10., 10.)),
            det(1, 0.8, bx(20., 0., 30., 10.)),
        ];
        e.add(&dets, &truth, |_| 0.5);
        let s = e.summary();
        assert_eq!(
            (s.precision, s.recall, s.f1, s.map, s.count_mae),
            (1.0, 1.0, 1.0, Some(1.0), 0.0)
        );
    }

    #[test]
    fn a_duplicate_box_is_a_false_positive_and_a_count_error() {
        let mut e = Evaluator::new(&labels(), 0.5);
        let truth = [(1, bx(0., 0., 10., 10.))];
        let dets = [
            det(1, 0.9, bx(0., 0., 10., 10.)),
            det(1, 0.7, bx(1., 0., 11., 10.)),
        ];
        e.add(&dets, &truth, |_| 0.5);
        let l = &e.summary().labels[0];
        assert_eq!(
            (l.true_positives, l.false_positives, l.false_negatives),
            (1, 1, 0)
        );
        assert_eq!(l.precision, 0.5);
        assert_eq!(l.count_mae, 1.0);
        // The duplicate ranks below the hit: AP is unaffected.
        assert_eq!(l.ap, Some(1.0));
    }

    #[test]
    fn detections_below_the_operating_threshold_count_only_towards_ap() {
        let mut e = Evaluator::new(&labels(), 0.5);
        let truth = [(2, bx(0., 0., 10., 10.)), (2, bx(50., 50., 60., 60.))];
        let dets = [
            det(2, 0.9, bx(0., 0., 10., 10.)),
            det(2, 0.6, bx(100., 100., 110., 110.)),
            det(2, 0.2, bx(50., 50., 60., 60.)),
        ];
        e.add(&dets, &truth, |_| 0.4);
        let l = &e.summary().labels[0];
        assert_eq!(
            (l.true_positives, l.false_positives, l.false_negatives),
            (1, 1, 1)
        );
        // Ranked: hit, miss, hit -> recall 0.5 at precision 1, recall 1 at 2/3.
        let ap = l.ap.unwrap();
        assert!((ap - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-9, "{ap}");
    }

    #[test]
    fn a_box_of_the_wrong_label_matches_nothing() {
        let mut e = Evaluator::new(&labels(), 0.5);
        e.add(
            &[det(2, 0.9, bx(0., 0., 10., 10.))],
            &[(1, bx(0., 0., 10., 10.))],
            |_| 0.5,
        );
        let s = e.summary();
        assert_eq!((s.precision, s.recall), (0.0, 0.0));
        assert_eq!(s.map, Some(0.0));
    }

    #[test]
    fn yolo_lines_become_pixel_boxes_of_the_image() {
        let boxes = parse_yolo(Path::new("a.txt"), "1 0.5 0.5 0.25 0.5\n\n", &None, 3).unwrap();
        let px = TruthBoxes::Normalised(boxes).to_pixels(100, 50);
        // Fractions that binary floating point holds exactly: exact pixels.
        assert_eq!(px, vec![(1, bx(37.5, 12.5, 62.5, 37.5))]);
    }

    #[test]
    fn a_bad_yolo_line_is_named_by_file_and_line() {
        let e = parse_yolo(
            Path::new("f/a.txt"),
            "1 0.5 0.5 0.2 0.4\n7 0.5 0.5 0.2 0.4\n",
            &None,
            3,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "f/a.txt:2: class 7 is not a label index of the model (0..2)"
        );
        let e = parse_yolo(Path::new("a.txt"), "1 0.5 1.5 0.2 0.4\n", &None, 3).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("a.txt:1: \"1.5\" is not a fraction"),
            "{e}"
        );
    }

    #[test]
    fn coco_categories_are_matched_to_labels_by_name_and_unknown_ones_reported() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{"images":[{"id":7,"file_name":"a.jpg","width":10,"height":10}],
            "annotations":[{"image_id":7,"category_id":44,"bbox":[1,2,3,4]},
                           {"image_id":7,"category_id":1,"bbox":[0,0,5,5]}],
            "categories":[{"id":44,"name":"Bottle"},{"id":1,"name":"person"}]}"#;
        let path = dir.path().join("ann.json");
        std::fs::write(&path, json).unwrap();
        let d = Dataset::load(&path, &labels()).unwrap();
        assert_eq!(d.ignored_categories, vec!["person".to_string()]);
        assert_eq!(
            d.samples[0].truth,
            TruthBoxes::Pixels(vec![(2, bx(1., 2., 4., 6.))])
        );
    }
}
