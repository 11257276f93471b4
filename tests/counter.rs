//! The class-agnostic shelf counter (models/shelf_counter.*, trained by models/train/) on
//! real photos it never saw in training, composed into shelf rows
//! (tests/fixtures/shelves/, ground truth in expected.json).

use std::path::PathBuf;

use serde_json::Value;
use shelfwatch::vision::{Detector, DetectorOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_shelf_counter_counts_real_product_photos_on_composed_shelves_within_five_percent() {
    let mut detector = Detector::load(
        &root().join("models/shelf_counter.toml"),
        &DetectorOptions::default(),
    )
    .unwrap();
    let dir = root().join("tests/fixtures/shelves");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let images = expected["images"].as_object().unwrap();
    assert_eq!(images.len(), 8);
    let (mut truth_total, mut abs_error, mut exact) = (0u64, 0u64, 0usize);
    let mut report = Vec::new();
    for (file, e) in images {
        let truth = e["count"].as_u64().unwrap();
        let img = image::open(dir.join(file)).unwrap().to_rgb8();
        let (dets, _) = detector.detect(&img).unwrap();
        let counted = dets.len() as u64;
        assert!(dets.iter().all(|d| d.label == "product"));
        report.push(format!("{file}: {counted}/{truth} ({})", e["description"]));
        // No frame may be far off, whatever its layout (every one is within 1 today).
        assert!(
            counted.abs_diff(truth) <= 2,
            "{file}: counted {counted} of {truth}; {report:?}"
        );
        truth_total += truth;
        abs_error += counted.abs_diff(truth);
        exact += usize::from(counted == truth);
    }
    let relative = abs_error as f64 / truth_total as f64;
    eprintln!(
        "shelf counter on {} composed shelves: count error {abs_error} of {truth_total} \
         ({relative:.3}), exact on {exact}; {report:?}",
        images.len()
    );
    // The target: count error at most 5% of the true count.
    assert!(
        relative <= 0.05,
        "relative count error {relative:.3}: {report:?}"
    );
    // 6 of 8 today (the target is 70%); a shelf of large upright boxes and a mixed
    // one are off by one. One frame of slack for float differences between platforms.
    assert!(exact >= 5, "exact on {exact} of 8: {report:?}");
}
