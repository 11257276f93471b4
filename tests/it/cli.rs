//! The real `shelfwatch` binary, as a user runs it.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::util::{self, fixture, root, shelfwatch, SHELFWATCH};

fn stdout_json(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The generic-class detector; the default model is the class-agnostic shelf counter.
const SSD: &str = "models/ssd_mobilenetv2_oidv4.toml";

#[test]
fn detect_on_the_coffee_photo_reports_a_cup() {
    let out = shelfwatch(&["detect", "--model", SSD, "tests/fixtures/photos/coffee.png"]);
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

fn products(v: &serde_json::Value) -> usize {
    v["detections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["label"] == "product")
        .count()
}

#[test]
fn detect_without_a_model_counts_any_product_with_the_shelf_counter() {
    // Ten products of photos the counter never trained on, in two rows.
    let out = shelfwatch(&["detect", "tests/fixtures/shelves/shelf_02.jpg"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = &stdout_json(&out)[0];
    assert_eq!(v["model"], "shelf_counter");
    let n = products(v);
    assert!((9..=11).contains(&n), "{n} products for 10: {v}");
}

#[test]
fn the_shelf_counter_runs_at_another_input_size_and_refuses_one_off_its_multiple() {
    // Small products (40 px in a 640-px frame) are 5 cells wide at 512x384.
    let shelf = "tests/fixtures/shelves/shelf_03.jpg";
    let out = shelfwatch(&["detect", "--input-size", "512x384", shelf]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = products(&stdout_json(&out)[0]);
    assert!((46..=50).contains(&n), "{n} products for 48 at 512x384");
    let out = shelfwatch(&["detect", "--input-size", "500x380", shelf]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("input size 500x380: this model runs at multiples of 32 (e.g. 480x352)"),
        "{stderr}"
    );
}

#[test]
fn detect_reports_each_bad_image_processes_the_rest_and_exits_non_zero() {
    let out = shelfwatch(&[
        "detect",
        "--model",
        SSD,
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

// Issue #19: a 274-byte PNG declaring 60000 x 60000 aborted `detect` (exit 134) and the
// good image after it was never processed.
#[test]
fn a_decompression_bomb_is_an_error_line_and_the_next_image_is_still_detected() {
    let out = shelfwatch(&[
        "detect",
        "--model",
        SSD,
        "tests/fixtures/bad/bomb-60000x60000.png",
        "tests/fixtures/photos/chelsea.png",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = stdout_json(&out);
    assert_eq!(lines.len(), 2, "one line per image");
    let err = lines[0]["error"].as_str().unwrap();
    assert!(
        err.contains("bomb-60000x60000.png")
            && err.contains("60000x60000")
            && err.contains("decode limit"),
        "{err}"
    );
    assert_eq!(lines[1]["detections"][0]["label"], "Cat");
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
    let original = image::open(fixture("photos/coffee.png")).unwrap().to_rgb8();
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
    let photo = fixture("photos/coffee.png");
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
    for stage in [
        "convert",
        "preprocess",
        "inference",
        "postprocess",
        "counting",
        "publish",
        "total",
    ] {
        let s = &v["stages_ms"][stage];
        assert!(
            s["p50"].as_f64().unwrap() <= s["p99"].as_f64().unwrap(),
            "{v}"
        );
    }
    assert!(v["frames_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(v["camera_frame"], serde_json::json!([1280, 720]));
    // The binary counts allocations: tract allocates its intermediate tensors on every
    // inference, while converting a YUYV frame into the reused RGB buffer allocates none.
    assert!(
        v["stages_ms"]["inference"]["allocations"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert_eq!(v["stages_ms"]["convert"]["allocations"], 0.0, "{v}");
    assert!(v["peak_rss_mb"].as_f64().unwrap() > 1.0, "{v}");
}

#[test]
fn bench_compare_sets_a_run_beside_a_saved_one() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.json");
    let args = ["bench", "--warmup", "0", "--runs", "1"];
    let photo = "tests/fixtures/photos/coffee.png";
    let out = shelfwatch(&[&args[..], &["--json", photo]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&base, &out.stdout).unwrap();
    let out = shelfwatch(&[&args[..], &["--compare", base.to_str().unwrap(), photo]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for row in ["inference", "total", "load (ms)", "peak RSS", "frames/s"] {
        assert!(
            text.lines().any(|l| l.starts_with(row)),
            "no {row} row: {text}"
        );
    }
    // A file that is not bench output is refused by name.
    let out = shelfwatch(&["bench", "--runs", "1", "--compare", photo, photo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("coffee.png: not the JSON of"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_inference_threads_find_the_same_boxes_as_one() {
    let photo = "tests/fixtures/photos/coffee.png";
    let one = stdout_json(&shelfwatch(&["detect", "--threads", "1", photo]));
    let two = stdout_json(&shelfwatch(&["detect", "--threads", "2", photo]));
    assert!(!one[0]["detections"].as_array().unwrap().is_empty());
    let boxes = |v: &serde_json::Value| {
        v["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["label"].clone(), d["box"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(boxes(&one[0]), boxes(&two[0]));
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let out = shelfwatch(&[&["eval", "--json"], args].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn label<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["labels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["label"] == name)
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

const SCENES: &str = "tests/fixtures/scenes/frames";
const INT8: &str = "models/ssd_mobilenetv2_oidv4_int8.toml";

#[test]
fn eval_finds_every_labelled_cup_and_person_in_the_shelf_scenes() {
    let v = eval_json(&["--model", SSD, SCENES]);
    assert_eq!(
        (v["images"].as_u64(), v["format"].as_str()),
        (Some(28), Some("yolo"))
    );
    let cups = label(&v, "Coffee cup");
    assert_eq!(cups["truth"], 107);
    assert_eq!(
        (
            cups["true_positives"].as_u64(),
            cups["false_positives"].as_u64()
        ),
        (Some(107), Some(0))
    );
    assert_eq!(cups["count_mae"], 0.0);
    assert_eq!(label(&v, "Person")["truth"], 5);
    assert!(v["map"].as_f64().unwrap() > 0.99, "{v}");
}

#[test]
fn the_int8_model_keeps_the_float_models_quality_on_the_shelf_scenes() {
    let fp32 = eval_json(&["--model", SSD, SCENES]);
    let int8 = eval_json(&["--model", INT8, SCENES]);
    for key in ["map", "f1", "count_mae"] {
        let (a, b) = (fp32[key].as_f64().unwrap(), int8[key].as_f64().unwrap());
        assert!((a - b).abs() <= 0.01, "{key}: fp32 {a}, int8 {b}");
    }
    // Box for box: the float model's detections as the truth.
    let agree = eval_json(&["--model", INT8, "--reference-model", SSD, SCENES]);
    assert_eq!(agree["truth"], "ssd_mobilenetv2_oidv4");
    assert!(agree["f1"].as_f64().unwrap() >= 0.99, "{agree}");
}

#[test]
fn eval_reads_coco_json_with_the_same_result_as_yolo_labels() {
    // The scenes' expected.json as a COCO file: same objects, pixel boxes.
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("scenes/expected.json")).unwrap()).unwrap();
    let frames = &expected["frames"].as_array().unwrap()[..6];
    let (mut images, mut annotations) = (vec![], vec![]);
    for (id, f) in frames.iter().enumerate() {
        // An absolute file_name: the JSON lives elsewhere than the frames.
        let file = fixture("scenes").join(f["file"].as_str().unwrap());
        images.push(serde_json::json!({"id": id, "file_name": file, "width": 640, "height": 480}));
        for o in f["objects"].as_array().unwrap() {
            let b: Vec<f64> = o["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            annotations.push(serde_json::json!({
                "image_id": id, "category_id": o["class"],
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            }));
        }
    }
    let coco = serde_json::json!({
        "images": images, "annotations": annotations,
        "categories": [{"id": 13, "name": "Coffee cup"}, {"id": 4, "name": "Person"},
                       {"id": 99, "name": "pallet"}],
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.json");
    std::fs::write(&path, coco.to_string()).unwrap();
    let v = eval_json(&["--model", SSD, path.to_str().unwrap()]);
    assert_eq!(
        (v["images"].as_u64(), v["format"].as_str()),
        (Some(6), Some("coco"))
    );
    assert_eq!(v["ignored_categories"], serde_json::json!(["pallet"]));
    let cups = label(&v, "Coffee cup");
    assert_eq!(
        (cups["truth"].as_u64(), cups["true_positives"].as_u64()),
        (Some(29), Some(29))
    );
}

#[test]
fn eval_names_the_label_file_and_line_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("scenes/frames/000.jpg"), dir.path().join("a.jpg")).unwrap();
    std::fs::write(
        dir.path().join("a.txt"),
        "13 0.5 0.5 0.2 0.2\n13 0.5 0.5 0.2\n",
    )
    .unwrap();
    let out = shelfwatch(&["eval", "--model", SSD, dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a.txt:2: expected `class cx cy w h`, found 4 fields"),
        "{stderr}"
    );
}

#[test]
fn a_cached_model_finds_the_same_boxes_and_a_damaged_entry_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().to_str().unwrap();
    let run = || {
        let out = util::output(
            Command::new(SHELFWATCH)
                .args([
                    "detect",
                    "--model-cache",
                    cache,
                    "tests/fixtures/photos/coffee.png",
                ])
                .current_dir(root())
                .env("SHELFWATCH_LOG", "info"),
        )
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            stdout_json(&out)[0]["detections"].clone(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (first, log) = run();
    assert!(log.contains("cached=false"), "{log}");
    // One entry per input size the scale rule ran (the probes, the aimed scale).
    let entries: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".nnef.tar"))
        .collect();
    let loads = log.matches("cached=false").count();
    assert_eq!(entries.len(), loads, "{entries:?}\n{log}");
    let (second, log) = run();
    assert!(log.contains("cached=true"), "{log}");
    assert!(!log.contains("cached=false"), "{log}");
    assert_eq!(first, second);

    // A flipped byte in the middle of an entry: noticed, rebuilt from the ONNX file.
    let mut bytes = std::fs::read(&entries[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&entries[0], bytes).unwrap();
    let (third, log) = run();
    assert!(
        log.contains("model cache entry damaged; rebuilding"),
        "{log}"
    );
    assert_eq!(log.matches("cached=false").count(), 1, "{log}");
    assert_eq!(first, third);
    let (_, log) = run();
    assert!(!log.contains("cached=false"), "{log}");
}

#[test]
fn a_model_cache_that_cannot_be_written_costs_a_warning_not_the_detection() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"").unwrap();
    let cache = file.join("cache");
    let out = shelfwatch(&[
        "detect",
        "--model-cache",
        cache.to_str().unwrap(),
        "tests/fixtures/photos/coffee.png",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot write the model cache"), "{stderr}");
    assert!(!stdout_json(&out)[0]["detections"]
        .as_array()
        .unwrap()
        .is_empty());
    // Nothing half-written is left beside the file.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_mistyped_log_filter_is_named_and_the_command_still_runs() {
    let out = shelfwatch(&[
        "--log",
        "shelfwatch=loud",
        "check-config",
        "examples/demo.toml",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("\"shelfwatch=loud\" is not a log filter"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("examples/demo.toml: ok"));
}

#[test]
fn an_image_without_products_costs_the_scale_rule_one_pass_not_a_pyramid() {
    // An empty shelf is common (out of stock); its zone is probed again every 30 s.
    let dir = tempfile::tempdir().unwrap();
    let blank = dir.path().join("blank.png");
    image::RgbImage::from_pixel(1280, 720, image::Rgb([128, 128, 128]))
        .save(&blank)
        .unwrap();
    let out = shelfwatch(&["detect", blank.to_str().unwrap()]);
    assert!(out.status.success());
    let v = &stdout_json(&out)[0];
    assert_eq!(v["detections"].as_array().unwrap().len(), 0);
    assert_eq!(v["passes"], 1, "{v}");
    assert!(v["scale"]["median_width_cells"].is_null(), "{v}");
}

// Issue #19: a gallery whose header says 0 dimensions loaded, then `gallery remove`
// panicked cutting its vectors into rows of 0 (the panic hook aborts the binary).
#[test]
fn gallery_remove_on_a_gallery_of_zero_dimensions_is_an_error_naming_the_file() {
    use shelfwatch::identify::gallery::{Gallery, Reference};
    use shelfwatch::vision::embed::ModelId;
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gallery::new(ModelId {
        name: "hostile".into(),
        sha256: "ab".repeat(32),
        dimensions: 0,
    });
    let reference = Reference {
        sku: "A".into(),
        name: None,
        source: "a.jpg".into(),
        added: "2026-01-01T00:00:00Z".into(),
    };
    g.add(reference, &[]).unwrap();
    g.save(dir.path()).unwrap();
    let out = shelfwatch(&[
        "gallery",
        "remove",
        "--gallery",
        dir.path().to_str().unwrap(),
        "--sku",
        "A",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let file = dir.path().join("gallery.swg");
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("0 dimensions"),
        "{stderr}"
    );
}

// Issue #19: docs/mqtt.md asked for a password file of mode 0640, but a world-readable
// one was used as is.
#[test]
fn check_config_with_a_world_readable_password_file_exits_78_naming_key_and_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("mqtt-password");
    std::fs::write(&password, "secret\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file = dir.path().join("mqtt.toml");
    std::fs::write(
        &file,
        "[[sinks]]\nkind = \"mqtt\"\nusername = \"shelf\"\npassword-file = \"mqtt-password\"\n",
    )
    .unwrap();
    let out = shelfwatch(&["check-config", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("mqtt.toml:4: sinks[0].password-file")
            && stderr.contains(&password.display().to_string())
            && stderr.contains("world-readable"),
        "{stderr}"
    );
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = shelfwatch(&["check-config", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
