//! shelfwatch's own depthwise kernels (src/vision/kernels) leave what the bundled models
//! find unchanged: the same boxes within a pixel and the same scores within 1e-3 as
//! tract's own kernels, on real photos and shelves, and the same embeddings. The int8
//! model finds the same objects with either, to a quantisation step (the two requantise
//! differently: the exact scale against tract's fixed-point one). On ARM this runs under
//! qemu (scripts/test-arm.sh) with the board's kernels, named.

use shelfwatch::vision::kernels::{kernel_name, pointwise, quant, DotIsa, Isa, Kernels};
use shelfwatch::vision::{Detection, Detector, DetectorOptions, Embedder, EmbedderOptions};

use crate::util::{fixture, model};

const IMAGES: [&str; 4] = [
    "shelves/shelf_01.jpg",
    "shelves/shelf_05.jpg",
    "photos/coffee.png",
    "photos/astronaut.png",
];

/// Our op in the plan of an f32 model, and of the int8 one.
const OURS: &str = "ShelfwatchDepthwise";
const OURS_INT8: &str = "ShelfwatchQuantDepthwise";

fn detections(
    manifest: &str,
    kernels: Kernels,
    size: Option<(u32, u32)>,
    own_op: &str,
) -> (Vec<Vec<Detection>>, Vec<String>) {
    let options = DetectorOptions {
        // Low, so weak detections (the most sensitive to arithmetic) are compared too.
        score_threshold: Some(0.2),
        input_size: size,
        kernels,
        ..Default::default()
    };
    let mut d = Detector::load(&model(manifest), &options).unwrap();
    let found = IMAGES
        .iter()
        .map(|f| {
            let img = image::open(fixture(f)).unwrap().to_rgb8();
            let mut dets = d.detect(&img).unwrap().0;
            dets.sort_by(|a, b| {
                (a.bbox.x1, a.bbox.y1)
                    .partial_cmp(&(b.bbox.x1, b.bbox.y1))
                    .unwrap()
            });
            dets
        })
        .collect();
    // Every depthwise convolution, whatever layout tract moved it to (NCHW here, NHWC
    // on aarch64), runs on one kernel or the other, never on a mix. (tract runs an int8
    // one as im2col and a matrix product, not as its DepthWiseConv.)
    let img = image::open(fixture(IMAGES[0])).unwrap().to_rgb8();
    let ops: Vec<String> = d.profile(&img).unwrap().into_iter().map(|t| t.op).collect();
    let (ours, any_ours, tracts) = (
        ops.iter().any(|o| o == own_op),
        ops.iter().any(|o| o.starts_with("Shelfwatch")),
        ops.iter().any(|o| o == "DepthWiseConv"),
    );
    match kernels {
        Kernels::Shelfwatch => assert!(ours && !tracts, "{manifest}: {ops:?}"),
        Kernels::Tract => assert!(
            !any_ours && (tracts || own_op == OURS_INT8),
            "{manifest}: {ops:?}"
        ),
    }
    (found, d.kernels())
}

/// What this build should run on this CPU: the tests run where the CI machines and
/// boards run, x86_64 with AVX2+FMA, aarch64 (NEON), armv7 with NEON.
fn expected_kernel(own_op: &str) -> String {
    if own_op == OURS_INT8 {
        quant::kernel_name(Isa::detect())
    } else {
        kernel_name(Isa::detect())
    }
}

/// The int8 pointwise kernel this CPU runs: only on one with an 8-bit dot product
/// (x86_64 with AVX-512 VNNI, aarch64 with `dotprod`); elsewhere those layers stay
/// tract's. `SHELFWATCH_REQUIRE_DOT` (set by scripts/test-arm.sh on its Cortex-A76 run)
/// names the one that must be there.
fn expected_pointwise() -> Option<String> {
    let dot = DotIsa::detect();
    if let Ok(required) = std::env::var("SHELFWATCH_REQUIRE_DOT") {
        assert_eq!(dot.map(DotIsa::name), Some(required.as_str()));
    }
    dot.map(pointwise::kernel_name)
}

/// Runs `manifest` at `size` on tract's kernels and on ours and compares what each finds.
fn same_products_with_either_kernels(manifest: &str, size: Option<(u32, u32)>) {
    let own_op = OURS;
    let (want, tract_kernels) = detections(manifest, Kernels::Tract, size, own_op);
    let (got, ours) = detections(manifest, Kernels::Shelfwatch, size, own_op);
    assert!(
        !tract_kernels.iter().any(|k| k.starts_with("shelfwatch_")),
        "{manifest}: --kernels tract still ran ours: {tract_kernels:?}"
    );
    assert!(
        ours.contains(&expected_kernel(own_op)),
        "{manifest}: {} not in the plan: {ours:?}",
        expected_kernel(own_op)
    );
    let total: usize = want.iter().map(Vec::len).sum();
    assert!(
        total >= 10,
        "{manifest}: too few detections to compare ({total})"
    );
    for ((w, g), file) in want.iter().zip(&got).zip(IMAGES) {
        assert_eq!(
            w.len(),
            g.len(),
            "{manifest} {size:?} {file}: detections differ in number"
        );
        for (a, b) in w.iter().zip(g) {
            assert_eq!(a.label, b.label, "{manifest} {file}");
            assert!(
                (a.score - b.score).abs() <= 1e-3,
                "{manifest} {file}: score {} vs {}",
                b.score,
                a.score
            );
            for (p, q) in [
                (a.bbox.x1, b.bbox.x1),
                (a.bbox.y1, b.bbox.y1),
                (a.bbox.x2, b.bbox.x2),
                (a.bbox.y2, b.bbox.y2),
            ] {
                assert!(
                    (p - q).abs() <= 1.0,
                    "{manifest} {file}: box {:?} vs {:?}",
                    b.bbox,
                    a.bbox
                );
            }
        }
    }
}

#[test]
fn own_kernels_find_the_same_products_as_tracts_with_the_shelf_counter() {
    same_products_with_either_kernels("shelf_counter.toml", None);
}

/// A second size: other plane widths, other tails of the vector loops. (On ARM under
/// emulation the unit tests' random shapes cover those tails; scripts/test-arm.sh skips
/// this one there.)
#[test]
fn own_kernels_find_the_same_products_as_tracts_with_the_shelf_counter_at_640_by_480() {
    same_products_with_either_kernels("shelf_counter.toml", Some((640, 480)));
}

#[test]
fn own_kernels_find_the_same_products_as_tracts_with_the_ssd() {
    same_products_with_either_kernels("ssd_mobilenetv2_oidv4.toml", None);
}

#[test]
fn the_int8_model_on_own_kernels_finds_what_it_finds_on_tracts() {
    // The int8 SSD's scores move in steps of its output quantisation (about 0.016 near
    // 0.3), and a step of difference in one depthwise layer can move a weak detection
    // by a step or a few pixels. So: every detection of one above 0.3 has one of the
    // same label on the other, overlapping by at least 0.8, within three steps of score;
    // and the strong ones (above 0.5, the real objects in the photos) are all there.
    let manifest = "ssd_mobilenetv2_oidv4_int8.toml";
    let (tracts, tract_kernels) = detections(manifest, Kernels::Tract, None, OURS_INT8);
    let (ours, own_kernels) = detections(manifest, Kernels::Shelfwatch, None, OURS_INT8);
    assert!(
        !tract_kernels.iter().any(|k| k.starts_with("shelfwatch_")),
        "{tract_kernels:?}"
    );
    assert!(
        own_kernels.contains(&expected_kernel(OURS_INT8)),
        "{} not in the plan: {own_kernels:?}",
        expected_kernel(OURS_INT8)
    );
    match expected_pointwise() {
        Some(k) => assert!(
            own_kernels.contains(&k),
            "{k} not in the plan: {own_kernels:?}"
        ),
        None => assert!(
            !own_kernels.iter().any(|k| k.starts_with("shelfwatch_pw")),
            "{own_kernels:?}"
        ),
    }
    let mut compared = (0, 0);
    for ((t, o), file) in tracts.iter().zip(&ours).zip(IMAGES) {
        for (a, b, which) in [(t, o, "tract's"), (o, t, "ours")] {
            for d in a.iter().filter(|d| d.score >= 0.3) {
                let found = b.iter().any(|e| {
                    e.label == d.label
                        && e.bbox.iou(&d.bbox) >= 0.8
                        && (e.score - d.score).abs() <= 0.05
                });
                assert!(found, "{file}: {which} {d:?} has no match in {b:?}");
                compared.0 += 1;
                compared.1 += (d.score >= 0.5) as usize;
            }
        }
    }
    assert!(
        compared.1 >= 4,
        "too few strong detections to compare: {compared:?}"
    );
}

#[test]
fn own_kernels_give_the_identification_model_the_same_embeddings() {
    let embed = |kernels| {
        let options = EmbedderOptions {
            threads: 1,
            kernels,
            cache_dir: None,
        };
        let mut e = Embedder::load(&model("efficientnet_lite0.toml"), &options).unwrap();
        ["photos/coffee.png", "photos/chelsea.png"]
            .iter()
            .map(|f| {
                e.embed(&image::open(fixture(f)).unwrap().to_rgb8())
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let (want, got) = (embed(Kernels::Tract), embed(Kernels::Shelfwatch));
    for (w, g) in want.iter().zip(&got) {
        let max = w
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-4, "embeddings differ by up to {max}");
    }
}

#[test]
fn a_model_read_back_from_the_model_cache_runs_on_the_same_own_kernels() {
    // The daemon reads its models from the cache after the first start: the kernels
    // must not depend on where the graph came from.
    let dir = tempfile::tempdir().unwrap();
    let options = DetectorOptions {
        cache_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let img = image::open(fixture("shelves/shelf_01.jpg"))
        .unwrap()
        .to_rgb8();
    for (manifest, own_op) in [
        ("shelf_counter.toml", OURS),
        ("ssd_mobilenetv2_oidv4_int8.toml", OURS_INT8),
    ] {
        let mut first = Detector::load(&model(manifest), &options).unwrap();
        let mut again = Detector::load(&model(manifest), &options).unwrap();
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() > 0,
            "nothing was cached"
        );
        assert!(
            again.kernels().contains(&expected_kernel(own_op)),
            "{manifest}: {:?}",
            again.kernels()
        );
        assert_eq!(
            first.detect(&img).unwrap().0,
            again.detect(&img).unwrap().0,
            "{manifest}"
        );
    }
}
