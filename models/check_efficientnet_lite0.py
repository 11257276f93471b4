"""Check models/efficientnet_lite0.onnx on real photos (tests/fixtures/photos).

1. Classification: coffee.png, preprocessed as the manifest says (shorter side to 256
   with Pillow bilinear, centre crop 224, (x - 127) / 128), must give ImageNet class
   967 (espresso) as top-1. Prints the top-5 with probabilities.
2. Graph against weights: the logits and embedding equal a plain numpy float64 forward
   pass straight from the .pth (BatchNorm not folded), so the folding and the wiring
   are right (needs the installed package, or --pth; skipped with --no-reference).
3. Retrieval: each photo's centre crop is the gallery; mirrored, shifted, zoomed and
   stretched views of every photo are the queries. Each query's nearest gallery
   embedding (cosine) must be its own photo, and so must its nearest neighbour among
   all other views (leave-one-out).
4. The embedding has unit L2 norm.
5. tract (Python bindings), when importable, gives the same outputs as onnxruntime.
6. Latency: onnxruntime, 1 thread, 20 runs after 3 warm-up runs (and tract, if there).

Exits non-zero when a check fails. Prints one JSON summary line last.
"""
import argparse
import glob
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import convert_efficientnet_lite0 as conv  # noqa: E402  (the .pth reader, the stage table)

SIZE = 224
SHORTER = 256
MEAN, STD = 127.0, 128.0
ESPRESSO = 967


def to_input(rgb):
    """A 224x224 RGB PIL image -> [1, 3, 224, 224] float32, (x - 127) / 128."""
    x = (np.asarray(rgb, np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def shorter_side(img, target=SHORTER):
    w, h = img.size
    s = target / min(w, h)
    return img.resize((max(target, round(w * s)), max(target, round(h * s))), Image.BILINEAR)


def centre_crop(img, size=SIZE):
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess(img):
    """The manifest's pipeline: shorter side to 256, centre crop 224."""
    return centre_crop(shorter_side(img))


def views(img):
    """Other views of one photo than the gallery's centre crop: (name, 224x224 image)."""
    w, h = img.size
    side = min(w, h)
    out = [("mirrored", preprocess(img).transpose(Image.FLIP_LEFT_RIGHT))]
    # 80% squares at opposite corners (the second mirrored), resized to 224.
    c = int(side * 0.8)
    tl = img.crop((0, 0, c, c)).resize((SIZE, SIZE), Image.BILINEAR)
    br = img.crop((w - c, h - c, w, h)).resize((SIZE, SIZE), Image.BILINEAR)
    out += [("top-left 80%", tl), ("bottom-right 80% mirrored", br.transpose(Image.FLIP_LEFT_RIGHT))]
    # A closer look: the centre 60% square.
    c = int(side * 0.6)
    left, top = (w - c) // 2, (h - c) // 2
    out.append(("centre 60%", img.crop((left, top, left + c, top + c)).resize((SIZE, SIZE), Image.BILINEAR)))
    # The whole photo squeezed to a square (aspect ratio not kept).
    out.append(("stretched", img.resize((SIZE, SIZE), Image.BILINEAR)))
    return out


# --- numpy float64 reference, straight from the state dict ----------------------------

def _bn(x, w, name):
    g, b = w[f"{name}.weight"], w[f"{name}.bias"]
    m, v = w[f"{name}.running_mean"], w[f"{name}.running_var"]
    s = g / np.sqrt(v + conv.BN_EPS)
    return x * s[:, None, None] + (b - m * s)[:, None, None]


def _pad_same(x, k, stride):
    t, b, _ = conv.same_pads(x.shape[1], k, stride)
    lft, r, _ = conv.same_pads(x.shape[2], k, stride)
    return np.pad(x, ((0, 0), (t, b), (lft, r)))


def _conv_full(x, wt, stride):
    """Dense convolution, x [C, H, W], wt [O, C, k, k], SAME padding."""
    k = wt.shape[2]
    xp = _pad_same(x, k, stride)
    ho = -(-x.shape[1] // stride)
    wo = -(-x.shape[2] // stride)
    out = np.zeros((wt.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            patch = xp[:, i:i + stride * ho:stride, j:j + stride * wo:stride]
            out += np.einsum("oc,chw->ohw", wt[:, :, i, j], patch)
    return out


def _conv_dw(x, wt, stride):
    k = wt.shape[2]
    xp = _pad_same(x, k, stride)
    ho = -(-x.shape[1] // stride)
    wo = -(-x.shape[2] // stride)
    out = np.zeros((x.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            out += wt[:, 0, i, j][:, None, None] * xp[:, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return out


def reference(weights, x):
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    relu6 = lambda t: np.clip(t, 0.0, 6.0)  # noqa: E731
    h = relu6(_bn(_conv_full(x[0].astype(np.float64), w["_conv_stem.weight"], 2), w, "_bn0"))
    blocks = conv.blocks_from_weights(weights)
    for (p, cin, mid, cout, _k), stride in zip(blocks, conv.block_strides(blocks)):
        skip = h
        if mid != cin:
            h = relu6(_bn(np.einsum("oc,chw->ohw", w[f"{p}._expand_conv.weight"][:, :, 0, 0], h), w, f"{p}._bn0"))
        h = relu6(_bn(_conv_dw(h, w[f"{p}._depthwise_conv.weight"], stride), w, f"{p}._bn1"))
        h = _bn(np.einsum("oc,chw->ohw", w[f"{p}._project_conv.weight"][:, :, 0, 0], h), w, f"{p}._bn2")
        if stride == 1 and cin == cout:
            h = h + skip
    h = relu6(_bn(np.einsum("oc,chw->ohw", w["_conv_head.weight"][:, :, 0, 0], h), w, "_bn1"))
    feat = h.mean(axis=(1, 2))
    logits = w["_fc.weight"] @ feat + w["_fc.bias"]
    return feat / max(np.linalg.norm(feat), conv.L2_EPS), logits


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def timed(fn, runs=20, warmup=3):
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(ms), 2), "mean_ms": round(statistics.fmean(ms), 2),
            "min_ms": round(min(ms), 2), "runs": runs}


def main():
    root = os.path.dirname(HERE)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(HERE, "efficientnet_lite0.onnx"))
    ap.add_argument("--photos", default=os.path.join(root, "tests/fixtures/photos"))
    ap.add_argument("--pth", help="the .pth for the numpy reference (default: installed package)")
    ap.add_argument("--no-reference", action="store_true", help="skip the numpy reference")
    ap.add_argument("--no-tract", action="store_true", help="skip tract even if importable")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()

    failures = []
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    if names != ["embedding", "logits"]:
        failures.append(f"outputs are {names}")

    def run(x):
        emb, logits = sess.run(["embedding", "logits"], {"input": x})
        return emb[0], logits[0]

    # 1. classification
    coffee = to_input(preprocess(Image.open(os.path.join(args.photos, "coffee.png")).convert("RGB")))
    emb, logits = run(coffee)
    p = softmax(logits.astype(np.float64))
    top5 = [(int(i), round(float(p[i]), 4)) for i in np.argsort(-p)[:5]]
    print("coffee.png top-5 (ImageNet index, probability):", top5)
    if top5[0][0] != ESPRESSO:
        failures.append(f"coffee.png top-1 is {top5[0][0]}, not espresso ({ESPRESSO})")

    # 2. numpy reference
    ref = None
    if not args.no_reference:
        pth = args.pth or conv.package_member()
        weights = conv.read_legacy_torch(open(pth, "rb").read())
        r_emb, r_logits = reference(weights, coffee)
        ref = {"logits_max_abs_diff": float(np.abs(r_logits - logits).max()),
               "embedding_max_abs_diff": float(np.abs(r_emb - emb).max())}
        print("onnxruntime vs numpy float64 reference (BatchNorm unfolded):", ref)
        if ref["logits_max_abs_diff"] > 1e-3 or ref["embedding_max_abs_diff"] > 1e-5:
            failures.append(f"graph differs from the reference: {ref}")

    # 3. retrieval
    photos = sorted(glob.glob(os.path.join(args.photos, "*")))
    gallery, queries = [], []
    for i, path in enumerate(photos):
        img = Image.open(path).convert("RGB")
        gallery.append(run(to_input(preprocess(img)))[0])
        for name, view in views(img):
            queries.append((i, f"{os.path.basename(path)}: {name}", run(to_input(view))[0]))
    gallery = np.stack(gallery)
    norms = np.linalg.norm(np.concatenate([gallery, np.stack([q[2] for q in queries])]), axis=1)
    norm_err = float(np.abs(norms - 1).max())
    print(f"embedding norms: max |norm - 1| = {norm_err:.2e}")
    if norm_err > 1e-5:
        failures.append(f"embeddings are not unit length ({norm_err})")

    hits, margins = 0, []
    for own, label, q in queries:
        sims = gallery @ q
        best = int(np.argmax(sims))
        margin = float(sims[own] - np.max(np.delete(sims, own)))
        margins.append(margin)
        hits += best == own
        print(f"  {label:40s} -> {os.path.basename(photos[best]):14s} cos {sims[best]:.3f} margin {margin:+.3f}")
    print(f"retrieval against the centre crops: {hits}/{len(queries)}")
    if hits != len(queries):
        failures.append(f"retrieval {hits}/{len(queries)}")

    # Leave-one-out over every view (gallery crops included).
    everything = [(i, g) for i, g in enumerate(gallery)] + [(q[0], q[2]) for q in queries]
    vecs = np.stack([v for _, v in everything])
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    loo = sum(everything[int(np.argmax(row))][0] == own for (own, _), row in zip(everything, sims))
    print(f"leave-one-out nearest neighbour over all {len(everything)} views: {loo}/{len(everything)}")
    if loo != len(everything):
        failures.append(f"leave-one-out {loo}/{len(everything)}")

    # 4./5. tract
    tract_info = "not installed: skipped"
    tract_runnable = None
    if not args.no_tract:
        try:
            import tract
        except ImportError:
            tract = None
        if tract is not None:
            tract_runnable = tract.onnx().load(args.model).into_model().into_runnable()
            t_emb, t_logits = [t.to_numpy() for t in tract_runnable.run([coffee])]
            tract_info = {"version": tract.version(),
                          "logits_max_abs_diff": float(np.abs(t_logits[0] - logits).max()),
                          "embedding_max_abs_diff": float(np.abs(t_emb[0] - emb).max())}
            if tract_info["logits_max_abs_diff"] > 1e-3 or tract_info["embedding_max_abs_diff"] > 1e-4:
                failures.append(f"tract differs from onnxruntime: {tract_info}")
    print("tract vs onnxruntime:", tract_info)

    # 6. latency
    latency = {"onnxruntime_1_thread": timed(lambda: sess.run(None, {"input": coffee}), args.runs)}
    if tract_runnable is not None:
        latency["tract"] = timed(lambda: tract_runnable.run([coffee]), args.runs)
    print("latency:", latency)

    summary = {
        "model": os.path.relpath(args.model, root),
        "bytes": os.path.getsize(args.model),
        "espresso_top1": top5[0][0] == ESPRESSO,
        "espresso_probability": round(float(p[ESPRESSO]), 4),
        "top5": top5,
        "reference": ref,
        "retrieval": f"{hits}/{len(queries)}",
        "retrieval_min_margin": round(min(margins), 4),
        "leave_one_out": f"{loo}/{len(everything)}",
        "tract": tract_info,
        "latency": latency,
        "failures": failures,
    }
    print(json.dumps(summary))
    if failures:
        for f in failures:
            print("FAILED:", f, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
