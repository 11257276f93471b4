//! The real `shelfwatch` binary, as a user runs it.

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shelfwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shelfwatch"))
        .args(args)
        .current_dir(root())
        .env("SHELFWATCH_LOG", "warn")
        .output()
        .expect("run shelfwatch")
}

fn stdout_json(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn detect_on_the_coffee_photo_reports_a_cup() {
    let out = shelfwatch(&["detect", "tests/fixtures/photos/coffee.png"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = &stdout_json(&out)[0];
    assert_eq!(v["file"], "tests/fixtures/photos/coffee.png");
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(600), Some(400))
    );
    let labels: Vec<_> = v["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["label"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        labels.iter().any(|l| l == "Coffee cup" || l == "Mug"),
        "{labels:?}"
    );
    for stage in [
        "decode_image",
        "preprocess_ms",
        "inference_ms",
        "postprocess_ms",
    ] {
        assert!(
            v["timings_ms"][stage].as_f64().is_some(),
            "timing {stage} missing: {v}"
        );
    }
}

#[test]
fn detect_reports_each_bad_image_processes_the_rest_and_exits_non_zero() {
    let out = shelfwatch(&[
        "detect",
        "tests/fixtures/bad/not-an-image.png",
        "tests/fixtures/photos/chelsea.png",
        "tests/fixtures/bad/truncated.jpg",
        "tests/fixtures/no-such-file.png",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let lines = stdout_json(&out);
    assert_eq!(lines.len(), 4, "one line per image");
    assert!(lines[0]["error"]
        .as_str()
        .unwrap()
        .contains("not-an-image.png"));
    assert_eq!(lines[1]["detections"][0]["label"], "Cat");
    assert!(lines[2]["error"]
        .as_str()
        .unwrap()
        .contains("truncated.jpg"));
    assert!(lines[3]["error"]
        .as_str()
        .unwrap()
        .contains("no-such-file.png"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3 of 4 images failed"), "{stderr}");
}

#[test]
fn detect_annotate_writes_a_copy_with_boxes_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let out = shelfwatch(&[
        "detect",
        "--annotate",
        dir.path().to_str().unwrap(),
        "tests/fixtures/photos/coffee.png",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let annotated = image::open(dir.path().join("coffee.png"))
        .unwrap()
        .to_rgb8();
    let original = image::open(root().join("tests/fixtures/photos/coffee.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(annotated.dimensions(), original.dimensions());
    let changed = annotated
        .pixels()
        .zip(original.pixels())
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 500, "only {changed} pixels changed");
}

#[test]
fn detect_threshold_override_removes_weaker_detections() {
    let out = shelfwatch(&[
        "detect",
        "--threshold",
        "0.9",
        "tests/fixtures/photos/coffee.png",
    ]);
    assert!(out.status.success());
    assert_eq!(
        stdout_json(&out)[0]["detections"].as_array().unwrap().len(),
        0
    );
}

#[test]
fn check_config_with_an_unknown_key_exits_78_and_names_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[model]\nscore-threshold = 0.5\nscore-treshold = 0.3\n",
    )
    .unwrap();
    let out = shelfwatch(&["check-config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("model.score-treshold"), "{stderr}");
    assert!(stderr.contains("bad.toml:3"), "{stderr}");
}

#[test]
fn detect_and_bench_with_a_broken_config_exit_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[model]\nscore-threshold = 1.5\n").unwrap();
    let photo = root().join("tests/fixtures/photos/coffee.png");
    for command in ["detect", "bench"] {
        let out = shelfwatch(&[
            command,
            "--config",
            file.to_str().unwrap(),
            photo.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{command}: {stderr}");
        assert!(
            stderr.contains("model.score-threshold"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn print_default_config_prints_a_config_that_check_config_accepts() {
    let out = shelfwatch(&["print-default-config"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("default.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let check = shelfwatch(&["check-config", file.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(
        out.stdout,
        std::fs::read(root().join("examples/shelfwatch.toml")).unwrap(),
        "print-default-config and the committed example differ"
    );
}

#[test]
fn a_tampered_model_is_refused_by_the_binary_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let models = root().join("models");
    for f in ["ssd_mobilenetv2_oidv4.toml", "ssd_mobilenetv2_oidv4.labels"] {
        std::fs::copy(models.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("ssd_mobilenetv2_oidv4.onnx"),
        b"not the model",
    )
    .unwrap();
    let manifest = dir.path().join("ssd_mobilenetv2_oidv4.toml");
    let out = shelfwatch(&[
        "detect",
        "--model",
        manifest.to_str().unwrap(),
        "tests/fixtures/photos/coffee.png",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ssd_mobilenetv2_oidv4.onnx: sha256"),
        "{stderr}"
    );
}

#[test]
fn bench_json_reports_percentiles_per_stage() {
    let out = shelfwatch(&[
        "bench",
        "--warmup",
        "1",
        "--runs",
        "3",
        "--json",
        "tests/fixtures/photos/coffee.png",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runs"], 3);
    for stage in ["preprocess", "inference", "postprocess", "total"] {
        let s = &v["stages_ms"][stage];
        assert!(
            s["p50"].as_f64().unwrap() <= s["p99"].as_f64().unwrap(),
            "{v}"
        );
    }
    assert!(v["frames_per_second"].as_f64().unwrap() > 0.0);
}
