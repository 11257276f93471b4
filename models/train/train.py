"""Train the counting head (numpy, Adam, fixed seed) on cached frozen features.

    python train.py [--epochs 10] [--finetune DIR [--finetune-share 0.3]] [--init HEAD.npz]

Head, per stride-8 cell (48x36 at the 384x288 input): per scale a 1x1 projection to 64
channels (features normalised per channel first; the normalisation is folded into the
projection at export), nearest-neighbour upsampling to stride 8, sum + bias, ReLU, a 3x3
convolution to 5 channels: centre heat logit, dx, dy, log w, log h (cells).
Loss: CenterNet's focal loss (alpha 2, beta 4) on the heat against anisotropic Gaussian
targets (sigma = max(0.5, 0.15 x size in cells) per axis), normalised by the number of
centres; plus L1 on the box terms over each object's core (cells whose Gaussian value is
at least 0.3, weighted by it), so a peak one cell off still carries the right box.
Products marked `ignore` (mostly cut off or hidden) are neither centres nor negatives.

--finetune DIR mixes a user's own frames into training: images with a .txt beside them
(same stem), each line either YOLO `class cx cy w h` (normalised; class ignored) or a
centre click `cx cy` (normalised if both <= 1, else pixels of that image). Centre-only
frames train the heat only (no box terms); their Gaussian size is taken from the distance
to the nearest other centre. They make up --finetune-share of each epoch (oversampled).

Writes OUT/head.npz (weights, feature normalisation, chosen threshold) and
OUT/train_log.json. The score threshold is chosen on the validation split (training
textures, other seeds) by F1 at the evaluation's centre tolerance.
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GW, GH, S = common.GRID_W, common.GRID_H, common.STRIDE
FEAT = os.path.join(common.OUT, "features")


# --- Targets ------------------------------------------------------------------------------

def targets(objects):
    """objects: list of dicts with cx, cy, w, h in model-input pixels (w/h None for centre
    clicks), ignore. Returns heat target Y [GH,GW], negative weight [GH,GW], box target
    [4,GH,GW], box weight [GH,GW]."""
    Y = np.zeros((GH, GW), np.float32)
    negw = np.ones((GH, GW), np.float32)
    T = np.zeros((4, GH, GW), np.float32)
    bw = np.zeros((GH, GW), np.float32)
    owner = np.zeros((GH, GW), np.float32)
    xs = np.arange(GW, dtype=np.float32) + 0.5
    ys = np.arange(GH, dtype=np.float32) + 0.5
    for o in objects:
        cx, cy = o["cx"] / S, o["cy"] / S
        if o.get("ignore"):
            w, h = o["w"] / S, o["h"] / S
            x0, x1 = int(np.floor(cx - w / 2)), int(np.ceil(cx + w / 2))
            y0, y1 = int(np.floor(cy - h / 2)), int(np.ceil(cy + h / 2))
            negw[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 0.0
            continue
        ix, iy = min(max(int(cx), 0), GW - 1), min(max(int(cy), 0), GH - 1)
        if o["w"] is None:
            w = h = o["size"] / S
        else:
            w, h = o["w"] / S, o["h"] / S
        sx, sy = max(0.5, 0.15 * w), max(0.5, 0.15 * h)
        g = np.exp(-((xs[None, :] - (ix + 0.5)) ** 2) / (2 * sx * sx)
                   - ((ys[:, None] - (iy + 0.5)) ** 2) / (2 * sy * sy)).astype(np.float32)
        g[iy, ix] = 1.0
        Y = np.maximum(Y, g)
        if o["w"] is not None:
            core = (g >= 0.3) & (g > owner)
            owner = np.where(core, g, owner)
            T[0][core] = (cx - xs[None, :].repeat(GH, 0))[core]
            T[1][core] = (cy - ys[:, None].repeat(GW, 1))[core]
            # the decoder caps log sizes at 3 (20 cells): train to the same cap
            T[2][core] = min(np.log(max(w, 0.25)), common.LOG_SIZE_CAP)
            T[3][core] = min(np.log(max(h, 0.25)), common.LOG_SIZE_CAP)
            bw[core] = g[core]
    negw[Y >= 1.0] = 1.0
    return Y, negw, T, bw


def synthetic_objects(entry):
    out = []
    for o in entry["objects"]:
        out.append({"cx": o["cx"] * common.INPUT_W, "cy": o["cy"] * common.INPUT_H,
                    "w": o["w"] * common.INPUT_W, "h": o["h"] * common.INPUT_H,
                    "ignore": o["ignore"], "type": o["type"]})
    return out


def read_user_labels(txt, img_size):
    """A user's label file -> objects in model-input pixels (see the module doc)."""
    from_w, from_h = img_size
    pts = []
    for line in open(txt, encoding="utf-8"):
        v = line.split()
        if not v or v[0].startswith("#"):
            continue
        nums = [float(x) for x in v]
        if len(nums) == 5:
            _, cx, cy, w, h = nums
            pts.append((cx, cy, w, h))
        elif len(nums) == 2:
            cx, cy = nums
            if cx > 1 or cy > 1:
                cx, cy = cx / from_w, cy / from_h
            pts.append((cx, cy, None, None))
        else:
            raise SystemExit(f"{txt}: a line must be `class cx cy w h` or `cx cy`: {line!r}")
    objs = []
    for i, (cx, cy, w, h) in enumerate(pts):
        o = {"cx": cx * common.INPUT_W, "cy": cy * common.INPUT_H, "ignore": False,
             "type": "user", "w": None, "h": None}
        if w is not None:
            o["w"], o["h"] = w * common.INPUT_W, h * common.INPUT_H
        else:
            d = [np.hypot((cx - p[0]) * common.INPUT_W, (cy - p[1]) * common.INPUT_H)
                 for j, p in enumerate(pts) if j != i]
            o["size"] = float(np.clip(0.8 * min(d), 16, 160)) if d else 48.0
        objs.append(o)
    return objs


def load_finetune(folder, threads):
    from PIL import Image

    import features

    exts = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(exts))
    items = []
    for f in files:
        txt = os.path.join(folder, os.path.splitext(f)[0] + ".txt")
        if not os.path.exists(txt):
            continue
        with Image.open(os.path.join(folder, f)) as im:
            size = im.size
        items.append((os.path.join(folder, f), read_user_labels(txt, size)))
    if not items:
        raise SystemExit(f"{folder}: no image with a .txt label beside it")
    h = hashlib.sha256()
    for p, _ in items:
        h.update(p.encode())
        h.update(common.file_sha256(p).encode())
    prefix = os.path.join(FEAT, "finetune_" + h.hexdigest()[:16])
    if not os.path.exists(prefix + "_s32.npy"):
        os.makedirs(FEAT, exist_ok=True)
        features.extract([p for p, _ in items], prefix, threads)
    feats = [np.load(f"{prefix}_s{s}.npy", mmap_mode="r") for _, _, s in common.TAPS]
    return feats, [objs for _, objs in items]


def load_split(split):
    d = os.path.join(common.OUT, "data", split)
    labels = json.load(open(os.path.join(d, "labels.json")))["images"]
    feats = [np.load(os.path.join(FEAT, f"{split}_s{s}.npy")) for _, _, s in common.TAPS]
    return feats, [synthetic_objects(e) for e in labels]


# --- Head: forward and backward -----------------------------------------------------------

def mm(w, f):
    """[O, C] x [B, C, H, W] -> [B, O, H, W] as one matrix product."""
    b, c, h, wd = f.shape
    return np.matmul(w, f.reshape(b, c, h * wd)).reshape(b, w.shape[0], h, wd)


def mm_grad(d, f):
    """dL/dW for mm: [B, O, H, W], [B, C, H, W] -> [O, C]."""
    b, o, h, w = d.shape
    c = f.shape[1]
    return np.matmul(d.transpose(1, 0, 2, 3).reshape(o, -1),
                     f.transpose(1, 0, 2, 3).reshape(c, -1).T)


def forward(P, f8, f16, f32):
    s = mm(P["p8"], f8)
    s += common.upsample(mm(P["p16"], f16), 2)
    s += common.upsample(mm(P["p32"], f32), 4)
    s += P["pb"][None, :, None, None]
    a = np.maximum(s, 0)
    b, c, h, w = a.shape
    ap = np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((b, 5, h, w), ap.dtype)
    for i in range(3):
        for j in range(3):
            out += mm(P["k"][:, :, i, j], np.ascontiguousarray(ap[:, :, i:i + h, j:j + w]))
    out += P["kb"][None, :, None, None]
    return out, (s, ap)


def backward(P, cache, dout, f8, f16, f32):
    s, ap = cache
    b, c, h, w = s.shape
    G = {"kb": dout.sum((0, 2, 3)), "k": np.zeros_like(P["k"])}
    dap = np.zeros_like(ap)
    for i in range(3):
        for j in range(3):
            win = np.ascontiguousarray(ap[:, :, i:i + h, j:j + w])
            G["k"][:, :, i, j] = mm_grad(dout, win)
            dap[:, :, i:i + h, j:j + w] += mm(P["k"][:, :, i, j].T, dout)
    ds = dap[:, :, 1:-1, 1:-1] * (s > 0)
    G["pb"] = ds.sum((0, 2, 3))
    G["p8"] = mm_grad(ds, f8)
    d16 = ds.reshape(b, c, h // 2, 2, w // 2, 2).sum((3, 5))
    G["p16"] = mm_grad(d16, f16)
    d32 = ds.reshape(b, c, h // 4, 4, w // 4, 4).sum((3, 5))
    G["p32"] = mm_grad(d32, f32)
    return G


def loss_and_grad(out, Y, negw, T, bw, box_weight=1.0):
    z = out[:, 0]
    p = np.clip(common.sigmoid(z), 1e-6, 1 - 1e-6)
    pos = Y >= 1.0
    npos = max(1.0, float(pos.sum()))
    lp, l1p = np.log(p), np.log(1 - p)
    neg_w = ((1 - Y) ** 4) * negw * (~pos)
    loss_heat = -(np.sum(((1 - p) ** 2 * lp)[pos]) + np.sum(neg_w * p * p * l1p)) / npos
    gz = np.where(pos, -((1 - p) ** 2) * ((1 - p) - 2 * p * lp),
                  neg_w * (p ** 3 - 2 * p * p * (1 - p) * l1p)) / npos
    dout = np.zeros_like(out)
    dout[:, 0] = gz
    wsum = max(1.0, float(bw.sum()))
    diff = out[:, 1:5] - T
    loss_box = float(np.sum(np.abs(diff) * bw[:, None])) / wsum
    dout[:, 1:5] = box_weight * np.sign(diff) * bw[:, None] / wsum
    return loss_heat + box_weight * loss_box, loss_heat, loss_box, dout


# --- Validation: decode and match like evaluate.py -------------------------------------------

def match(dets, objects):
    """Greedy by score: a detection is a true positive when its centre lies within half
    the short side of an unmatched product; detections on `ignore` products are neither.
    Returns tp, fp, per-object matched flags."""
    gts = [o for o in objects if not o.get("ignore")]
    ign = [o for o in objects if o.get("ignore")]
    used = [False] * len(gts)
    tp = fp = 0
    for d in dets:
        best, bd = -1, None
        for k, o in enumerate(gts):
            if used[k]:
                continue
            dist = np.hypot(d[1] - o["cx"], d[2] - o["cy"])
            if dist <= 0.5 * min(o["w"], o["h"]) and (bd is None or dist < bd):
                best, bd = k, dist
        if best >= 0:
            used[best] = True
            tp += 1
        elif any(abs(d[1] - o["cx"]) <= o["w"] / 2 and abs(d[2] - o["cy"]) <= o["h"] / 2
                 for o in ign):
            continue
        else:
            fp += 1
    return tp, fp, used


def validate(P, feats, objs, norm, thresholds, batch=32):
    heats = []
    for i in range(0, len(objs), batch):
        f = [(np.asarray(a[i:i + batch], np.float32) - m) / s for a, (m, s) in zip(feats, norm)]
        out, _ = forward(P, *f)
        heats.append(out)
    out = np.concatenate(heats)
    res = {}
    for t in thresholds:
        tp = fp = n = 0
        err = []
        for k, objects in enumerate(objs):
            heat = common.sigmoid(out[k, 0])
            dets = common.decode(heat, out[k, 1:5], threshold=t)
            a, b, _ = match(dets, objects)
            g = sum(1 for o in objects if not o.get("ignore"))
            tp, fp, n = tp + a, fp + b, n + g
            err.append(len(dets) - g)
        prec, rec = tp / max(1, tp + fp), tp / max(1, n)
        res[round(t, 2)] = {"precision": round(prec, 4), "recall": round(rec, 4),
                            "f1": round(2 * prec * rec / max(1e-9, prec + rec), 4),
                            "count_mae": round(float(np.mean(np.abs(err))), 3),
                            "count_bias": round(float(np.mean(err)), 3)}
    return res


# --- Main ----------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune", help="a folder of your own labelled frames")
    ap.add_argument("--finetune-share", type=float, default=0.3)
    ap.add_argument("--init", help="start from this head.npz (e.g. to fine-tune briefly)")
    ap.add_argument("--threads", type=int, default=2, help="for finetune features")
    ap.add_argument("--out", default=os.path.join(common.OUT, "head.npz"))
    args = ap.parse_args()
    t0 = time.time()
    rng = np.random.default_rng(args.seed)

    feats, objs = load_split("train")
    n_syn = len(objs)
    # per-channel feature normalisation from the training features
    norm = []
    for a in feats:
        sample = a[: min(len(a), 1000)].astype(np.float32)
        m = sample.mean((0, 2, 3))[None, :, None, None]
        s = sample.std((0, 2, 3))[None, :, None, None] + 1e-3
        norm.append((m.astype(np.float32), s.astype(np.float32)))
    tg = [targets(o) for o in objs]
    ft_feats, ft_tg = None, []
    if args.finetune:
        ft_feats, ft_objs = load_finetune(args.finetune, args.threads)
        ft_tg = [targets(o) for o in ft_objs]
        print(json.dumps({"finetune_frames": len(ft_tg),
                          "finetune_products": sum(len(o) for o in ft_objs)}))
    val_feats, val_objs = load_split("val")

    if args.init:
        z = np.load(args.init)
        P = {k: z[k].astype(np.float32) for k in ("p8", "p16", "p32", "pb", "k", "kb")}
    else:
        C = common.HEAD_CH
        P = {"p8": rng.normal(0, np.sqrt(1 / (3 * 40)), (C, 40)),
             "p16": rng.normal(0, np.sqrt(1 / (3 * 112)), (C, 112)),
             "p32": rng.normal(0, np.sqrt(1 / (3 * 320)), (C, 320)),
             "pb": np.zeros(C), "k": rng.normal(0, 0.01, (5, C, 3, 3)),
             "kb": np.array([-2.19, 0.0, 0.0, 1.3, 1.5])}
        P = {k: v.astype(np.float32) for k, v in P.items()}
    M = {k: np.zeros_like(v) for k, v in P.items()}
    V = {k: np.zeros_like(v) for k, v in P.items()}
    step, b1, b2 = 0, 0.9, 0.999

    n_ft = 0
    if ft_tg:
        n_ft = int(round(args.finetune_share * n_syn / (1 - args.finetune_share)))
    per_epoch = n_syn + n_ft
    total_steps = args.epochs * (per_epoch // args.batch)
    log = {"epochs": []}
    for epoch in range(args.epochs):
        te = time.time()
        order = [("s", i) for i in range(n_syn)]
        if n_ft:
            order += [("f", int(i) % len(ft_tg)) for i in rng.permutation(n_ft)]
        order = [order[i] for i in rng.permutation(len(order))]
        sums = np.zeros(3)
        nb = 0
        for bi in range(len(order) // args.batch):
            chunk = order[bi * args.batch:(bi + 1) * args.batch]
            f = [np.empty((len(chunk),) + a.shape[1:], np.float32) for a in feats]
            Yb, Nb, Tb, Wb = [], [], [], []
            for j, (src, i) in enumerate(chunk):
                fs, t = (feats, tg[i]) if src == "s" else (ft_feats, ft_tg[i])
                for k in range(3):
                    f[k][j] = fs[k][i]
                Yb.append(t[0]); Nb.append(t[1]); Tb.append(t[2]); Wb.append(t[3])
            f = [(x - m) / s for x, (m, s) in zip(f, norm)]
            Yb, Nb, Tb, Wb = map(np.stack, (Yb, Nb, Tb, Wb))
            out, cache = forward(P, *f)
            loss, lh, lb, dout = loss_and_grad(out, Yb, Nb, Tb, Wb)
            G = backward(P, cache, dout.astype(np.float32), *f)
            step += 1
            lr = args.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / total_steps)))
            for k in P:
                g = G[k] + (1e-4 * P[k] if k in ("p8", "p16", "p32", "k") else 0)
                M[k] = b1 * M[k] + (1 - b1) * g
                V[k] = b2 * V[k] + (1 - b2) * g * g
                mh = M[k] / (1 - b1 ** step)
                vh = V[k] / (1 - b2 ** step)
                P[k] = (P[k] - lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
            sums += (loss, lh, lb)
            nb += 1
        ev = validate(P, val_feats, val_objs, norm, [0.3])
        rec = {"epoch": epoch + 1, "loss": round(sums[0] / nb, 4),
               "heat": round(sums[1] / nb, 4), "box": round(sums[2] / nb, 4),
               "val@0.3": ev[0.3], "seconds": round(time.time() - te, 1)}
        log["epochs"].append(rec)
        print(json.dumps(rec), flush=True)

    thresholds = [round(x, 2) for x in np.arange(0.15, 0.66, 0.05)]
    ev = validate(P, val_feats, val_objs, norm, thresholds)
    best = max(thresholds, key=lambda t: (ev[t]["f1"], -ev[t]["count_mae"]))
    log["val_thresholds"] = {str(k): v for k, v in ev.items()}
    log["threshold"] = best
    log["seconds"] = round(time.time() - t0, 1)
    log["train_images"] = n_syn
    log["finetune_frames"] = len(ft_tg)
    print(json.dumps({"threshold": best, "val": ev[best], "seconds": log["seconds"]}))
    np.savez(args.out, **P, **{f"mean{s}": m.reshape(-1) for (m, _), (_, _, s)
                               in zip(norm, common.TAPS)},
             **{f"std{s}": sd.reshape(-1) for (_, sd), (_, _, s) in zip(norm, common.TAPS)},
             threshold=np.float32(best))
    common.write_json(os.path.join(os.path.dirname(args.out), "train_log.json"), log)


if __name__ == "__main__":
    main()
