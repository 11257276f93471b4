"""Evaluate the exported counter with onnxruntime, decoded exactly as shelfwatch does.

    python evaluate.py [--model OUT/shelf_counter.toml] [--split test]   (synthetic, held out)
    python evaluate.py --yolo tests/fixtures/shelves                       (images + YOLO txt)

Decoding (common.decode): peaks where heat >= peak and heat >= score-threshold; centre
((x + 0.5 + dx) * 8, (y + 0.5 + dy) * 8), size exp(min(l, 3)) * 8 in model-input pixels;
size-aware suppression with the manifest's suppression-box-fraction; greedy NMS at the
manifest's iou-threshold, at most max-detections. Frames are stretched to the model input
with Pillow BILINEAR (as shelfwatch's resize) and boxes mapped back to frame pixels.

Metrics, per image and summed: count error (detections - products), MAE, bias, exact
count rate; a detection is a true positive when its centre lies within half the short
side of a not yet matched product (greedy, strongest detection first, nearest product);
detections on `ignore` products (mostly cut off or hidden) count neither way. Per product
type: recall; precision counts a type's true positives against the false positives whose
centre lies inside a product of that type (duplicates); false positives on no product are
reported as `background`. The same per product width bin (width in units of 8 pixels
at the model input, the first models' heat-map cell) and, for synthetic splits, per condition (generate.py's per-product
flags: dense = packed 0-2 px apart, stacked, occluded = partly behind a price strip,
board lip or upright, perspective = aisle view, far = median product < 3 units; image
conditions glare, blur, noise, jpeg_low): recall over the products having it, precision
counting the false positives lying on them.

`in_band`: the same metrics with only the products whose width lies inside the
manifest's [scale] band counted; products outside it are treated like `ignore` ones
(neither to be found nor false when hit), which is what the scale rule's zone resizing
is for. Also the onnxruntime latency at 1 thread.
"""
import argparse
import json
import os
import sys
import time
import tomllib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def run_model(sess, path):
    heat, boxes, peak = sess.run(["heat", "boxes", "peak"], {"input": common.load_input(path)})
    return heat[0, 0], boxes[0], peak[0, 0]


def match(dets, objects):
    """dets: (score, cx, cy, w, h) in frame pixels; objects: dicts in frame pixels.
    Returns the products to find, their matched flags and per detection (kind, the
    product it hit or lies on, None for the background)."""
    gts = [o for o in objects if not o["ignore"]]
    used = [False] * len(gts)
    kinds = []
    for d in dets:
        best, bd = -1, None
        for k, o in enumerate(gts):
            if used[k]:
                continue
            dist = float(np.hypot(d[1] - o["cx"], d[2] - o["cy"]))
            if dist <= 0.5 * min(o["w"], o["h"]) and (bd is None or dist < bd):
                best, bd = k, dist
        if best >= 0:
            used[best] = True
            kinds.append(("tp", gts[best]))
            continue
        inside = [o for o in objects
                  if abs(d[1] - o["cx"]) <= o["w"] / 2 and abs(d[2] - o["cy"]) <= o["h"] / 2]
        if any(o["ignore"] for o in inside) and not any(not o["ignore"] for o in inside):
            kinds.append(("ignored", None))
        elif inside:
            kinds.append(("fp", min(inside, key=lambda o: np.hypot(d[1] - o["cx"],
                                                                   d[2] - o["cy"]))))
        else:
            kinds.append(("fp", None))
    return gts, used, kinds


def load_synthetic(split):
    d = os.path.join(common.OUT, "data", split)
    items = []
    for e in json.load(open(os.path.join(d, "labels.json")))["images"]:
        W, H = e["width"], e["height"]
        objs = [{"type": o["type"], "cx": o["cx"] * W, "cy": o["cy"] * H, "w": o["w"] * W,
                 "h": o["h"] * H, "ignore": o["ignore"],
                 "conditions": o.get("conditions", [])} for o in e["objects"]]
        items.append((os.path.join(d, e["file"]), W, H, objs))
    return items


def load_yolo(folder):
    from PIL import Image

    types = {}
    meta = os.path.join(folder, "expected.json")
    if os.path.exists(meta):
        for name, info in json.load(open(meta))["images"].items():
            types[name] = info.get("types")
    items = []
    for f in sorted(os.listdir(folder)):
        if not f.lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        txt = os.path.join(folder, os.path.splitext(f)[0] + ".txt")
        if not os.path.exists(txt):
            continue
        with Image.open(os.path.join(folder, f)) as im:
            W, H = im.size
        objs = []
        rows = [line.split() for line in open(txt) if line.strip()]
        for i, v in enumerate(rows):
            _, cx, cy, w, h = map(float, v[:5])
            t = types.get(f)[i] if types.get(f) else "product"
            objs.append({"type": t, "cx": cx * W, "cy": cy * H, "w": w * W, "h": h * H,
                         "ignore": False})
        items.append((os.path.join(folder, f), W, H, objs))
    return items


WIDTH_BINS = [0, 2, 2.5, 3, 4, 6, 8, 10, 12, 16, 1e9]


def width_bin(o, W):
    """The product's width in width units (8 pixels) at the (stretched) model input,
    binned."""
    c = o["w"] * common.INPUT_W / W / common.WIDTH_UNIT
    for lo, hi in zip(WIDTH_BINS, WIDTH_BINS[1:]):
        if lo <= c < hi:
            return f"{lo:g}-{hi:g}" if hi < 1e9 else f">={lo:g}"
    return "?"


def in_band(items, band, stride):
    """Products outside [lo, hi] cells (of `stride` pixels) become `ignore`."""
    lo, hi = band
    out = []
    for path, W, H, objs in items:
        o2 = []
        for o in objs:
            c = o["w"] * common.INPUT_W / W / stride
            o2.append(dict(o, ignore=o["ignore"] or not (lo <= c <= hi)))
        out.append((path, W, H, o2))
    return out


def evaluate(sess, items, post, per_image=False, cache=None):
    """cache: a dict path -> model outputs, filled on the first call (one run per image)."""
    cache = {} if cache is None else cache
    errs, rows = [], []
    groups = {"per_type": {}, "per_width_units": {}, "per_condition": {}}

    def keys(o, W):
        yield "per_type", o["type"]
        yield "per_width_units", width_bin(o, W)
        for c in o.get("conditions", []):
            yield "per_condition", c

    def st(g, t):
        return groups[g].setdefault(t, {"products": 0, "found": 0, "tp": 0, "fp": 0})

    tp_all = fp_all = n_all = 0
    for path, W, H, objs in items:
        if path not in cache:
            cache[path] = run_model(sess, path)
        heat, boxes, peak = cache[path]
        dets = common.decode(heat, boxes, peak, threshold=post["score"],
                             stride=post["stride"], fraction=post["fraction"],
                             iou_threshold=post["iou"],
                             max_detections=post["max"])
        sx, sy = W / common.INPUT_W, H / common.INPUT_H
        dets = [(s, cx * sx, cy * sy, w * sx, h * sy) for s, cx, cy, w, h in dets]
        gts, used, kinds = match(dets, objs)
        for o, u in zip(gts, used):
            for g, t in keys(o, W):
                st(g, t)["products"] += 1
                st(g, t)["found"] += int(u)
        for k, o in kinds:
            if k not in ("tp", "fp"):
                continue
            if o is None:
                st("per_type", "background")["fp"] += 1
                continue
            for g, t in keys(o, W):
                st(g, t)[k] += 1
        tp = sum(1 for k, _ in kinds if k == "tp")
        fp = sum(1 for k, _ in kinds if k == "fp")
        counted = tp + fp  # detections on ignored products are not counted
        errs.append(counted - len(gts))
        tp_all, fp_all, n_all = tp_all + tp, fp_all + fp, n_all + len(gts)
        rows.append({"image": os.path.basename(path), "products": len(gts),
                     "detections": len(dets), "counted": counted, "tp": tp, "fp": fp})
    errs = np.array(errs)
    res = {
        "images": len(items), "products": n_all,
        "products_per_image": round(n_all / max(1, len(items)), 2),
        "count_mae": round(float(np.abs(errs).mean()), 3),
        "count_bias": round(float(errs.mean()), 3),
        "exact_count_rate": round(float((errs == 0).mean()), 4),
        "within_1_rate": round(float((np.abs(errs) <= 1).mean()), 4),
        "relative_count_error": round(float(np.abs(errs).sum() / max(1, n_all)), 4),
        "precision": round(tp_all / max(1, tp_all + fp_all), 4),
        "recall": round(tp_all / max(1, n_all), 4),
    }
    for g, stats in groups.items():
        res[g] = {}
        order = sorted(stats, key=lambda t: (WIDTH_BINS.index(float(t.split("-")[0].lstrip(">=")))
                                             if g == "per_width_units" else t))
        for t in order:
            s = stats[t]
            r = {"products": s["products"], "recall": round(s["found"] / s["products"], 4)
                 if s["products"] else None, "false_positives": s["fp"]}
            if t != "background":
                r["precision"] = round(s["tp"] / max(1, s["tp"] + s["fp"]), 4)
            res[g][t] = r
    if per_image:
        res["per_image"] = rows
    return res


def latency(sess, runs=30):
    x = np.zeros((1, 3, common.INPUT_H, common.INPUT_W), np.float32)
    for _ in range(3):
        sess.run(None, {"input": x})
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        t.append(time.perf_counter() - t0)
    return round(float(np.median(t)) * 1000, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(common.OUT, "shelf_counter.toml"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--yolo", help="a folder of images with YOLO txt labels instead")
    ap.add_argument("--threshold", type=float, help="override the manifest's threshold")
    ap.add_argument("--sweep", action="store_true", help="also report other thresholds")
    ap.add_argument("--per-image", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    m = tomllib.load(open(args.model, "rb"))
    onnx_path = os.path.join(os.path.dirname(args.model), m["file"])
    blob = open(onnx_path, "rb").read()
    if common.hashlib.sha256(blob).hexdigest() != m["sha256"]:
        raise SystemExit(f"{onnx_path}: sha256 differs from {args.model}")
    post = {"score": args.threshold or m["postprocess"]["score-threshold"],
            "iou": m["postprocess"]["iou-threshold"],
            "max": m["postprocess"]["max-detections"],
            "fraction": m["decoder"].get("suppression-box-fraction", 1.0),
            "stride": m["decoder"]["stride"]}
    sess = common.ort_session(blob, 1)
    items = load_yolo(args.yolo) if args.yolo else load_synthetic(args.split)
    res = {"model": onnx_path, "model_bytes": len(blob), "set": args.yolo or args.split,
           "threshold": post["score"], "centre_tolerance": "half the product's short side"}
    cache = {}
    res.update(evaluate(sess, items, post, args.per_image, cache))
    if "scale" in m:
        band = (m["scale"]["min-width-cells"], m["scale"]["max-width-cells"])
        r = evaluate(sess, in_band(items, band, post["stride"]), post, cache=cache)
        res["in_band"] = {"band_cells": list(band), **{k: r[k] for k in (
            "products", "count_mae", "count_bias", "exact_count_rate", "precision", "recall",
            "per_condition")}}
    if args.sweep:
        res["sweep"] = {}
        for t in (0.2, 0.3, 0.4, 0.5):
            r = evaluate(sess, items, dict(post, score=t), cache=cache)
            res["sweep"][str(t)] = {k: r[k] for k in ("count_mae", "count_bias",
                                                      "exact_count_rate", "precision",
                                                      "recall")}
    res["latency_ms_1_thread"] = latency(sess)
    if args.json:
        common.write_json(args.json, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
