//! The class-agnostic shelf counter (models/shelf_counter.*, trained by models/train/) on
//! real photos it never saw in training, composed into shelves: the easier set of rows
//! with gaps (tests/fixtures/shelves/) and the hard one (tests/fixtures/shelves-hard/:
//! dense rows, perspective, far views, stacks, price strips, glare, blur, noise). Both
//! are counted with the default settings, as `shelfwatch detect` and the daemon count:
//! the scale rule, no per-image option (issue #16).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use shelfwatch::vision::scale::ScaledDetector;
use shelfwatch::vision::{Detector, DetectorOptions};

use crate::util::{fixture, model, root};

/// Counts per condition: (true total, absolute error, exact images, images).
#[derive(Default, Debug)]
struct Tally {
    truth: u64,
    error: u64,
    exact: usize,
    images: usize,
}

impl Tally {
    fn add(&mut self, truth: u64, counted: u64) {
        self.truth += truth;
        self.error += counted.abs_diff(truth);
        self.exact += usize::from(counted == truth);
        self.images += 1;
    }
    fn relative(&self) -> f64 {
        self.error as f64 / self.truth.max(1) as f64
    }
    /// At most `relative` count error and at least `exact` images exact.
    fn assert_within(&self, relative: f64, exact: usize, report: &[String]) {
        assert!(
            self.relative() <= relative,
            "relative count error {:.3}: {report:#?}",
            self.relative()
        );
        assert!(
            self.exact >= exact,
            "exact on {} of {}: {report:#?}",
            self.exact,
            self.images
        );
    }
}

/// Counts every image of a fixture set with the bundled counter at its defaults; the
/// whole-set tally, per-condition tallies and a line per image for failure messages.
fn count_set(dir: &str) -> (Tally, BTreeMap<String, Tally>, Vec<String>) {
    let detector =
        Detector::load(&model("shelf_counter.toml"), &DetectorOptions::default()).unwrap();
    let mut detector = ScaledDetector::new(detector, None, Duration::MAX);
    assert!(
        detector.rule().is_some(),
        "the bundled counter declares its [scale] band"
    );
    let dir = root().join(dir);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let images = expected["images"].as_object().unwrap();
    let (mut all, mut by_condition, mut report) = (Tally::default(), BTreeMap::new(), Vec::new());
    for (file, e) in images {
        let truth = e["count"].as_u64().unwrap();
        let img = image::open(dir.join(file)).unwrap().to_rgb8();
        detector.reset();
        let (dets, _) = detector.detect(&img, &[], Instant::now()).unwrap();
        assert!(dets.iter().all(|d| d.label == "product"));
        let counted = dets.len() as u64;
        let condition = e["condition"].as_str().unwrap_or("gaps").to_owned();
        report.push(format!("{file} ({condition}): {counted}/{truth}"));
        all.add(truth, counted);
        by_condition
            .entry(condition)
            .or_insert_with(Tally::default)
            .add(truth, counted);
    }
    eprintln!("{dir:?}: {all:?}");
    for (c, t) in &by_condition {
        eprintln!("  {c}: {t:?} ({:.3})", t.relative());
    }
    eprintln!("  {report:#?}");
    (all, by_condition, report)
}

#[test]
fn the_shelf_counter_counts_composed_shelves_with_gaps_within_five_percent() {
    let (all, _, report) = count_set("tests/fixtures/shelves");
    assert_eq!(all.images, 8);
    // Issue #16's target for the count error: at most 5% of the true count (2.9% today).
    // It asks for 70% of images exact; 5 of 8 on x86_64 today. One frame of slack for
    // float differences between platforms (this test runs under qemu too).
    all.assert_within(0.05, 4, &report);
}

/// Issue #16's count-error target on the hard set: at most 5% (3.9% of 1012 products
/// today). Its other target, 70% of frames exact, is not reached (4 of 16), so the exact
/// frames are a regression guard; so is the per-condition cap (dense rows the weakest,
/// 8.6%). docs/counting-model.md has the table.
#[test]
fn the_shelf_counter_counts_dense_far_and_perspective_shelves_within_five_percent() {
    let (all, by_condition, report) = count_set("tests/fixtures/shelves-hard");
    assert_eq!(all.images, 16);
    assert_eq!(
        by_condition.len(),
        8,
        "conditions: {:?}",
        by_condition.keys()
    );
    all.assert_within(0.05, 3, &report);
    // No condition may hide behind the others.
    for (c, t) in &by_condition {
        assert!(
            t.relative() <= 0.12,
            "{c}: relative count error {:.3}: {report:#?}",
            t.relative()
        );
    }
}

/// Along the aisle the far end's products are too narrow to separate at the scale that
/// suits the near end: they are not measured as narrow there, they are missed (the
/// previous model counted 63 of 93 when only products already measured below the band
/// asked for a finer level).
/// Products in the octave below the target ask for it, and it finds them.
#[test]
fn a_shelf_seen_along_the_aisle_gets_a_finer_level_for_its_far_end() {
    let detector =
        Detector::load(&model("shelf_counter.toml"), &DetectorOptions::default()).unwrap();
    let mut auto = ScaledDetector::new(detector, None, Duration::MAX);
    let img = image::open(fixture("shelves-hard/perspective_01.jpg"))
        .unwrap()
        .to_rgb8();
    let (found, _) = auto.detect(&img, &[], Instant::now()).unwrap();
    let choice = auto.choices()[0].unwrap();
    assert!(choice.levels >= 2, "{choice:?}");
    // 93 products; 84 counted on x86_64.
    assert!(found.len().abs_diff(93) <= 16, "{}", found.len());
}

/// What the scale rule is for: at the bundled input size (the whole frame at 384 x 288,
/// the default before the rule) the far views lose most of their products.
#[test]
fn at_one_fixed_input_size_the_far_shelves_lose_most_products_and_the_scale_rule_finds_them() {
    let detector =
        Detector::load(&model("shelf_counter.toml"), &DetectorOptions::default()).unwrap();
    let mut fixed = ScaledDetector::new(detector.fork().unwrap(), Some((384, 288)), Duration::MAX);
    let mut auto = ScaledDetector::new(detector, None, Duration::MAX);
    assert!(fixed.rule().is_none());
    let img = image::open(fixture("shelves-hard/far_01.jpg"))
        .unwrap()
        .to_rgb8();
    let (at_fixed, _) = fixed.detect(&img, &[], Instant::now()).unwrap();
    let (with_rule, report) = auto.detect(&img, &[], Instant::now()).unwrap();
    // 99 products of 20-35 px in a 1280 x 960 frame.
    assert!(at_fixed.len() < 70, "{}", at_fixed.len());
    assert!(with_rule.len().abs_diff(99) <= 3, "{}", with_rule.len());
    let choice = auto.choices()[0].unwrap();
    assert!(
        choice.tiles > 1 && report.passes > choice.tiles,
        "{choice:?}"
    );
}
