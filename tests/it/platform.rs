//! The boards run the same detector as the x86_64 build: on the CPU's SIMD kernels (NEON
//! on ARM, not tract's generic fallback nor SVE, which no Raspberry Pi or Jetson has), and
//! with the same detections on the fixture photos.
//!
//! On ARM this file runs under qemu-user (scripts/test-arm.sh), with `QEMU_CPU=cortex-a72`
//! for aarch64 and `TRACT_CPU_ARM32_NEON=true` for armv7, because under emulation tract
//! reads the host's /proc/cpuinfo. The x86_64 detections are recorded in
//! tests/fixtures/platform/x86_64.json (regenerate on x86_64 with
//! `SHELFWATCH_RECORD_X86_64=1 cargo test --release --test it platform::`).

use serde::{Deserialize, Serialize};
use shelfwatch::vision::{Detector, DetectorOptions};

use crate::util::{fixture, model};

/// Low enough that every photo yields several boxes, including weak ones whose scores
/// are the most sensitive to arithmetic differences between kernels.
const THRESHOLD: f32 = 0.1;
const PHOTOS: [&str; 4] = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"];

#[derive(Serialize, Deserialize, Debug)]
struct Recorded {
    file: String,
    detections: Vec<RecordedDetection>,
}

#[derive(Serialize, Deserialize, Debug)]
struct RecordedDetection {
    label: String,
    score: f32,
    #[serde(rename = "box")]
    bbox: [f32; 4],
}

fn detector() -> Detector {
    let options = DetectorOptions {
        score_threshold: Some(THRESHOLD),
        ..Default::default()
    };
    Detector::load(&model("ssd_mobilenetv2_oidv4.toml"), &options).unwrap()
}

fn detect_all(d: &mut Detector) -> Vec<Recorded> {
    PHOTOS
        .iter()
        .map(|f| {
            let img = image::open(fixture("photos").join(f)).unwrap().to_rgb8();
            let (dets, _) = d.detect(&img).unwrap();
            Recorded {
                file: f.to_string(),
                detections: dets
                    .into_iter()
                    .map(|x| RecordedDetection {
                        label: x.label,
                        score: x.score,
                        bbox: [x.bbox.x1, x.bbox.y1, x.bbox.x2, x.bbox.y2],
                    })
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn inference_runs_on_the_simd_kernels_the_boards_have() {
    let (own, kernels): (Vec<String>, Vec<String>) = detector()
        .kernels()
        .into_iter()
        .partition(|k| k.starts_with("shelfwatch_"));
    eprintln!("tract kernels: {kernels:?}, shelfwatch's: {own:?}");
    assert!(!kernels.is_empty(), "no matmul kernel found in the plan");
    // shelfwatch's own depthwise kernels (src/vision/kernels), on the board's SIMD.
    let own_expected = if cfg!(target_arch = "aarch64") {
        "shelfwatch_dw_f32_neon"
    } else if cfg!(target_arch = "arm") {
        "shelfwatch_dw_f32_armv7neon"
    } else {
        "shelfwatch_dw_f32_avx2_fma"
    };
    assert_eq!(
        own,
        [own_expected],
        "the depthwise convolutions run elsewhere"
    );
    let expected_prefix = if cfg!(target_arch = "aarch64") {
        "arm64simd_"
    } else if cfg!(target_arch = "arm") {
        "armv7neon_"
    } else if cfg!(target_arch = "x86_64") {
        // AVX2+FMA (every x86_64 server and desktop of the last decade) or AVX-512.
        ""
    } else {
        panic!("no expectation for this architecture")
    };
    for k in &kernels {
        assert!(
            // tract's portable fallback is `generic_*`; a `_generic` suffix on a SIMD
            // kernel only means it is not tuned for one core (A53, Cortex-A7...).
            !k.starts_with("generic") && !k.contains("sve") && !k.contains("vfp"),
            "kernel {k} is a fallback or needs a CPU feature no supported board has: {kernels:?}"
        );
        assert!(
            k.starts_with(expected_prefix),
            "kernel {k} is not a {expected_prefix}* kernel: {kernels:?}"
        );
    }
}

#[test]
fn detections_on_the_fixture_photos_equal_the_x86_64_ones() {
    let got = detect_all(&mut detector());
    let path = fixture("platform/x86_64.json");
    if cfg!(target_arch = "x86_64") && std::env::var_os("SHELFWATCH_RECORD_X86_64").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
    }
    let want: Vec<Recorded> = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap();
    assert_eq!(want.len(), PHOTOS.len());
    let (mut max_score, mut max_box) = (0f32, 0f32);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.file, w.file);
        // A score within rounding of the threshold may land on either side of it.
        let keep = |d: &&RecordedDetection| (d.score - THRESHOLD).abs() > 1e-4;
        let gd: Vec<_> = g.detections.iter().filter(keep).collect();
        let wd: Vec<_> = w.detections.iter().filter(keep).collect();
        assert!(
            !wd.is_empty(),
            "{}: the recording has no detections",
            w.file
        );
        assert_eq!(
            gd.iter().map(|d| &d.label).collect::<Vec<_>>(),
            wd.iter().map(|d| &d.label).collect::<Vec<_>>(),
            "{}: labels differ from x86_64",
            g.file
        );
        for (a, b) in gd.iter().zip(&wd) {
            max_score = max_score.max((a.score - b.score).abs());
            for (x, y) in a.bbox.iter().zip(b.bbox) {
                max_box = max_box.max((x - y).abs());
            }
        }
    }
    eprintln!("largest difference from x86_64: score {max_score:e}, box {max_box:e} px");
    // Kernels differ in summation order and FMA use: allow float rounding, nothing more
    // (a wrong kernel moves scores by whole percents and boxes by pixels).
    assert!(
        max_score <= 1e-4,
        "scores differ from x86_64 by {max_score}"
    );
    assert!(max_box <= 0.05, "boxes differ from x86_64 by {max_box} px");
}
