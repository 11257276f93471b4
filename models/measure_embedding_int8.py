"""Does an int8 EfficientNet-Lite0 keep product-identification quality? A measurement.

1. Quantise models/efficientnet_lite0.onnx to int8 the way models/quantize_ssd.py does it
   for the SSD (the form tract runs on its int8 kernels): onnxruntime quantize_static,
   QOperator, per-tensor, u8 activations, s8 weights, min/max calibration, only the dense
   convolutions (and the Clips after them) quantised, depthwise convolutions kept in float.
   Calibration: the enrolled product photos, preprocessed as the manifest says. The int8
   model goes to a temporary directory (or --keep DIR); it is not a bundled model.
2. Queries: per product photo, --variants deterministic augmentations (seeded per file
   name): random crop keeping 60-90% of each side, rescale 0.5x-1.5x, horizontal flip
   (p=0.5), brightness 0.6-1.4, Gaussian blur radius 0-2, JPEG re-encode at quality 30-90.
3. Gallery: one reference per SKU, the original photo. Nearest-neighbour cosine retrieval,
   top-1 / top-5 accuracy for fp32 and int8 (each model with its own gallery), and the
   similarity distribution: true-match similarity (query vs its own SKU) and best
   wrong-SKU similarity (what a product that is not enrolled would score), to choose an
   "unknown" threshold.
4. onnxruntime latency (1 thread, median of --runs runs after 5 warm-ups) and file sizes.

Photos: tests/fixtures/products/*.jpg plus coffee, chelsea, astronaut and rocket from
tests/fixtures/photos. Prints a markdown table, the misses, and one JSON line last.

    models/.build/venv/bin/python models/measure_embedding_int8.py
"""
import argparse
import glob
import io
import json
import os
import statistics
import sys
import tempfile
import time
import zlib

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from PIL import Image, ImageEnhance, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import check_efficientnet_lite0 as chk  # noqa: E402  (the manifest's preprocessing)

THRESHOLDS = (0.35, 0.40, 0.45, 0.50, 0.55, 0.60)
EXISTING = ["coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg"]


def product_photos(root):
    new = sorted(glob.glob(os.path.join(root, "tests/fixtures/products/*.jpg")))
    old = [os.path.join(root, "tests/fixtures/photos", n) for n in EXISTING]
    return new + old


def sku(path):
    return os.path.splitext(os.path.basename(path))[0]


def model_input(img):
    """The manifest's pipeline: shorter side to 256 (bilinear), centre 224, (x-127)/128."""
    return chk.to_input(chk.preprocess(img.convert("RGB")))


def augment(img, rng):
    """One random query view of a photo, and the parameters that made it."""
    w, h = img.size
    fx, fy = rng.uniform(0.6, 0.9, size=2)
    cw, ch = max(1, round(w * fx)), max(1, round(h * fy))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((left, top, left + cw, top + ch))
    scale = float(rng.uniform(0.5, 1.5))
    out = out.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
    flip = bool(rng.random() < 0.5)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    bright = float(rng.uniform(0.6, 1.4))
    out = ImageEnhance.Brightness(out).enhance(bright)
    blur = float(rng.uniform(0.0, 2.0))
    out = out.filter(ImageFilter.GaussianBlur(blur))
    quality = int(rng.integers(30, 91))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf).convert("RGB")
    params = (f"crop {fx:.2f}x{fy:.2f} scale {scale:.2f} flip {int(flip)} "
              f"bright {bright:.2f} blur {blur:.1f} q{quality}")
    return out, params


def queries(paths, variants, seed):
    """[(sku index, input tensor, description)], deterministic per file name and seed."""
    out = []
    for i, p in enumerate(paths):
        img = Image.open(p).convert("RGB")
        rng = np.random.default_rng([seed, zlib.crc32(os.path.basename(p).encode())])
        for v in range(variants):
            view, params = augment(img, rng)
            out.append((i, model_input(view), f"{sku(p)}#{v} ({params})"))
    return out


class Photos(CalibrationDataReader):
    def __init__(self, paths, input_name):
        self.paths = iter(paths)
        self.input_name = input_name

    def get_next(self):
        path = next(self.paths, None)
        if path is None:
            return None
        return {self.input_name: model_input(Image.open(path))}


def quantise(src, dst, calibration):
    fp32 = onnx.load(src)
    input_name = fp32.graph.input[0].name
    depthwise = sorted(
        n.name
        for n in fp32.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    )
    quantize_static(
        src,
        dst,
        Photos(calibration, input_name),
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=["Conv", "Clip"],
        nodes_to_exclude=depthwise,
        per_channel=False,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    ops = {}
    for n in onnx.load(dst).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return len(depthwise), ops


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def embed(sess, x):
    e = sess.run(["embedding"], {"input": x})[0][0].astype(np.float64)
    return e / np.linalg.norm(e)


def retrieval(sess, gallery_inputs, qs):
    g = np.stack([embed(sess, x) for x in gallery_inputs])
    q = np.stack([embed(sess, x) for _, x, _ in qs])
    labels = np.array([i for i, _, _ in qs])
    sims = q @ g.T                                   # [queries, skus]
    order = np.argsort(-sims, axis=1)
    top1 = order[:, 0] == labels
    top5 = (order[:, :5] == labels[:, None]).any(axis=1)
    true_sim = sims[np.arange(len(labels)), labels]
    wrong = sims.copy()
    wrong[np.arange(len(labels)), labels] = -np.inf
    best_wrong = wrong.max(axis=1)
    # Gallery-to-gallery: how close the enrolled SKUs are to each other.
    gg = g @ g.T
    np.fill_diagonal(gg, -np.inf)
    return {
        "top1": float(top1.mean()), "top5": float(top5.mean()),
        "n_top1": int(top1.sum()), "n": len(labels),
        "true_min": float(true_sim.min()), "true_p05": float(np.percentile(true_sim, 5)),
        "true_median": float(np.median(true_sim)),
        "wrong_max": float(best_wrong.max()), "wrong_p95": float(np.percentile(best_wrong, 95)),
        "wrong_median": float(np.median(best_wrong)),
        "gallery_max_pair": float(gg.max()),
        # queries whose own-SKU similarity exceeds every wrong-SKU similarity of any query
        "separable": float((true_sim > best_wrong.max()).mean()),
        # open-set operating points: a query is accepted when its nearest SKU is at least t
        "sweep": {t: (float(((sims.max(1) >= t) & top1).mean()), float((best_wrong >= t).mean()))
                  for t in THRESHOLDS},
        "misses": [(qs[k][2], int(order[k, 0]), float(sims[k, order[k, 0]]), float(true_sim[k]))
                   for k in np.flatnonzero(~top1)],
        "_q": q, "_sims": sims,
    }


def latency_ms(sess, x, runs):
    for _ in range(5):
        sess.run(None, {"input": x})
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        ms.append((time.perf_counter() - t) * 1000)
    return statistics.median(ms)


def best_threshold(fp):
    """The midpoint between the worst true match and the best wrong SKU, if they separate."""
    lo, hi = fp["wrong_max"], fp["true_min"]
    return (lo + hi) / 2 if hi > lo else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.dirname(HERE), help="the source tree")
    ap.add_argument("--model", default=os.path.join(HERE, "efficientnet_lite0.onnx"))
    ap.add_argument("--variants", type=int, default=12)
    ap.add_argument("--seed", type=int, default=20240917)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--keep", help="write the int8 model here instead of a temp dir")
    args = ap.parse_args()

    paths = product_photos(args.root)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        sys.exit(f"missing photos: {missing}")

    with tempfile.TemporaryDirectory() as tmp:
        int8_path = os.path.join(args.keep or tmp, "efficientnet_lite0_int8.onnx")
        t = time.perf_counter()
        n_dw, ops = quantise(args.model, int8_path, paths)
        quant_s = time.perf_counter() - t

        gallery = [model_input(Image.open(p)) for p in paths]
        qs = queries(paths, args.variants, args.seed)
        s32, s8 = session(args.model), session(int8_path)
        fp = retrieval(s32, gallery, qs)
        q8 = retrieval(s8, gallery, qs)
        agree = np.sum(fp["_q"] * q8["_q"], axis=1)          # cos(fp32, int8) per query
        top1_same = float((fp["_sims"].argmax(1) == q8["_sims"].argmax(1)).mean())
        coffee = gallery[paths.index(os.path.join(args.root, "tests/fixtures/photos/coffee.png"))]
        lat32, lat8 = latency_ms(s32, coffee, args.runs), latency_ms(s8, coffee, args.runs)
        size32, size8 = os.path.getsize(args.model), os.path.getsize(int8_path)

    n = fp["n"]
    rows = [
        ("top-1 accuracy", f"{fp['top1']:.3f} ({fp['n_top1']}/{n})", f"{q8['top1']:.3f} ({q8['n_top1']}/{n})"),
        ("top-5 accuracy", f"{fp['top5']:.3f}", f"{q8['top5']:.3f}"),
        ("true-match sim: min / p5 / median",
         f"{fp['true_min']:.3f} / {fp['true_p05']:.3f} / {fp['true_median']:.3f}",
         f"{q8['true_min']:.3f} / {q8['true_p05']:.3f} / {q8['true_median']:.3f}"),
        ("best wrong-SKU sim: max / p95 / median",
         f"{fp['wrong_max']:.3f} / {fp['wrong_p95']:.3f} / {fp['wrong_median']:.3f}",
         f"{q8['wrong_max']:.3f} / {q8['wrong_p95']:.3f} / {q8['wrong_median']:.3f}"),
        ("queries above every wrong-SKU sim", f"{fp['separable']:.3f}", f"{q8['separable']:.3f}"),
        ("closest pair of enrolled SKUs (sim)", f"{fp['gallery_max_pair']:.3f}", f"{q8['gallery_max_pair']:.3f}"),
        ("latency, onnxruntime 1 thread, median of %d" % args.runs, f"{lat32:.2f} ms", f"{lat8:.2f} ms"),
        ("model size", f"{size32:,} B", f"{size8:,} B"),
    ]
    print(f"{len(paths)} SKUs (one reference photo each), {n} queries "
          f"({args.variants} augmented views per SKU, seed {args.seed})\n")
    print("| | fp32 | int8 |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"\nint8 vs fp32 embedding of the same query: cosine min {agree.min():.3f}, "
          f"median {np.median(agree):.3f}; same top-1 SKU for {top1_same:.3f} of queries")
    print(f"int8 graph: {n_dw} depthwise convolutions left in float; ops {json.dumps(ops, sort_keys=True)}; "
          f"quantised in {quant_s:.1f} s")
    print("\n'unknown' threshold t: correct-and-accepted rate of enrolled queries / rate at which "
          "the best wrong SKU reaches t (a stand-in for a product that is not enrolled)\n")
    print("| t | fp32 accepted | fp32 wrong >= t | int8 accepted | int8 wrong >= t |")
    print("|---:|---:|---:|---:|---:|")
    for t in THRESHOLDS:
        a32, w32 = fp["sweep"][t]
        a8, w8 = q8["sweep"][t]
        print(f"| {t:.2f} | {a32:.3f} | {w32:.3f} | {a8:.3f} | {w8:.3f} |")
    print()
    for name, r in (("fp32", fp), ("int8", q8)):
        thr = best_threshold(r)
        print(f"{name}: 'unknown' threshold "
              + (f"{thr:.3f} separates every query here" if thr is not None else
                 "cannot separate every query here (worst true match below best wrong SKU)"))
        for desc, got, got_sim, true_sim in r["misses"]:
            print(f"  {name} miss: {desc} -> {sku(paths[got])} {got_sim:.3f} (own SKU {true_sim:.3f})")
    summary = {k: {m: v for m, v in r.items() if not m.startswith("_") and m not in ("misses", "sweep")}
               for k, r in (("fp32", fp), ("int8", q8))}
    summary.update({"skus": len(paths), "queries": n, "latency_ms": {"fp32": lat32, "int8": lat8},
                    "bytes": {"fp32": size32, "int8": size8},
                    "int8_vs_fp32_cos_min": float(agree.min()), "top1_same": top1_same,
                    "ort": ort.__version__})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
