//! shelfwatch's detections equal an independent onnxruntime pipeline's on real photos.
//! The reference is produced by tests/fixtures/make_reference.py and committed.

use std::path::Path;

use serde::Deserialize;
use shelfwatch::vision::{Detection, Detector, DetectorOptions};

use crate::util::{fixture, model, root};

#[derive(Deserialize)]
struct Reference {
    file: String,
    width: u32,
    height: u32,
    #[serde(rename = "score-threshold")]
    score_threshold: f32,
    detections: Vec<RefDetection>,
}

#[derive(Deserialize, Debug)]
struct RefDetection {
    label: String,
    score: f32,
    #[serde(rename = "box")]
    bbox: [f32; 4],
}

fn references() -> Vec<Reference> {
    let dir = fixture("reference");
    let mut out: Vec<Reference> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
        })
        .collect();
    out.sort_by(|a, b| a.file.cmp(&b.file));
    assert!(
        out.len() >= 4,
        "reference fixtures missing in {}",
        dir.display()
    );
    out
}

fn detector(threshold: f32) -> Detector {
    let options = DetectorOptions {
        score_threshold: Some(threshold),
        ..Default::default()
    };
    Detector::load(&model("ssd_mobilenetv2_oidv4.toml"), &options).unwrap()
}

fn detect(d: &mut Detector, file: &Path) -> (u32, u32, Vec<Detection>) {
    let img = image::open(file).unwrap().to_rgb8();
    let (dets, _) = d.detect(&img).unwrap();
    (img.width(), img.height(), dets)
}

#[test]
fn detections_on_real_photos_equal_the_onnxruntime_reference() {
    let refs = references();
    let mut d = detector(refs[0].score_threshold);
    for r in &refs {
        let (w, h, got) = detect(&mut d, &fixture("photos").join(&r.file));
        assert_eq!((w, h), (r.width, r.height), "{}", r.file);
        // A box whose score sits within the tolerance of the threshold may fall on either
        // side of it; every other box must be present in both.
        let near = |s: f32| (s - r.score_threshold).abs() < 1e-3;
        let want: Vec<_> = r.detections.iter().filter(|x| !near(x.score)).collect();
        let got: Vec<_> = got.iter().filter(|x| !near(x.score)).collect();
        assert_eq!(
            got.len(),
            want.len(),
            "{}: shelfwatch {got:?} vs reference {want:?}",
            r.file
        );
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.label, w.label, "{}", r.file);
            assert!(
                (g.score - w.score).abs() < 1e-3,
                "{}: {} score {} vs {}",
                r.file,
                g.label,
                g.score,
                w.score
            );
            let b = [g.bbox.x1, g.bbox.y1, g.bbox.x2, g.bbox.y2];
            for (a, e) in b.iter().zip(w.bbox) {
                assert!(
                    (a - e).abs() <= 1.0,
                    "{}: box {b:?} vs {:?}",
                    r.file,
                    w.bbox
                );
            }
        }
    }
}

#[test]
fn the_coffee_photo_shows_a_coffee_cup_where_the_cup_is() {
    let mut d = detector(0.4);
    let (_, _, dets) = detect(&mut d, &fixture("photos/coffee.png"));
    let cup = dets
        .iter()
        .find(|x| x.label == "Coffee cup" || x.label == "Mug")
        .unwrap_or_else(|| panic!("no cup in {dets:?}"));
    // The cup sits in the middle of the 600x400 photo.
    let (cx, cy) = (
        (cup.bbox.x1 + cup.bbox.x2) / 2.0,
        (cup.bbox.y1 + cup.bbox.y2) / 2.0,
    );
    assert!(
        (150.0..450.0).contains(&cx) && (100.0..300.0).contains(&cy),
        "{cup:?}"
    );
}

#[test]
fn a_model_whose_sha256_differs_from_its_manifest_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let models = root().join("models");
    for f in ["ssd_mobilenetv2_oidv4.toml", "ssd_mobilenetv2_oidv4.labels"] {
        std::fs::copy(models.join(f), dir.path().join(f)).unwrap();
    }
    let mut bytes = std::fs::read(models.join("ssd_mobilenetv2_oidv4.onnx")).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(dir.path().join("ssd_mobilenetv2_oidv4.onnx"), bytes).unwrap();
    let err = Detector::load(
        &dir.path().join("ssd_mobilenetv2_oidv4.toml"),
        &DetectorOptions::default(),
    )
    .err()
    .expect("a tampered model must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains("ssd_mobilenetv2_oidv4.onnx") && msg.contains("sha256"),
        "{msg}"
    );
}
