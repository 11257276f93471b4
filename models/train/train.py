"""Train the counter end to end with JAX + optax (CPU, fixed seeds) on cached features.

    python train.py [--head-epochs 4] [--ft-epochs 4] [--ft-images 2000]
                    [--finetune DIR [--finetune-share 0.3]] [--init OUT/checkpoint.npz]

Network (net.py): EfficientNet-Lite0's blocks 11-15 (the stride-32 stage 6 and block 15,
read from models/efficientnet_lite0.onnx) and the counting head. The frozen part
(blocks 0-10) ran once in features.py: its block4/add (stride 8), block10/add (stride
16) and, for a stride-4 heat map, block2/add (stride 4) outputs are cached as float16,
with block15/project/conv of the original weights.

Two phases, because on this CPU a step through the blocks costs ~8x a head-only step:
1. `--head-epochs` over all training images with the blocks frozen, on the cached
   block15 output (the head learns to count on ImageNet features);
2. `--ft-epochs` end to end: the blocks (learning rate --ft-lr, 10x below the head's)
   and the head, each epoch on `--ft-images` images drawn from the training split (a
   different sample each epoch), running the blocks from the cached block10/add.
A linear-probe-then-fine-tune order is also what keeps the pretrained blocks from being
wrecked by the large early gradients of a randomly initialised head.

Loss: CenterNet's focal loss (alpha 2, beta 4) on the heat against anisotropic Gaussian
targets (sigma = max(0.5, 0.15 x size in cells) per axis), normalised by the number of
centres; plus L1 on the box terms over each object's core (cells whose Gaussian value is
at least 0.3, weighted by it). Products marked `ignore` are neither centres nor negatives.
AdamW (weight decay on the head's kernels only), cosine learning rate per phase.

--finetune DIR mixes a user's own frames into both phases (see README.md: YOLO lines or
centre clicks; frames rescaled so their median product lands in the trained width band).
--init continues from a checkpoint.npz (blocks + head), e.g. with --head-epochs 0
--ft-epochs 2 --finetune DIR.

Writes OUT/checkpoint.npz (the blocks' weights under their ONNX initializer names, the
head as head/<name>, the feature normalisation, the chosen threshold) and
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
import net  # noqa: E402

GW, GH, S = common.GRID_W, common.GRID_H, common.STRIDE
FEAT = os.path.join(common.OUT, "features")
BLOCKS_FROM, BLOCKS_TO = "block10/add", "block15/project/conv"


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
            # the decoder caps log sizes (boxes of 160.7 model px): train to the same cap
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
    """A user's frames -> (features [s8, s16, s32], objects): each frame rescaled so its
    median labelled product width lands in the trained band (finetune.py), then the
    frozen features extracted once and cached by content hash."""
    import features
    import finetune

    items = finetune.prepare(folder, read_user_labels,
                             os.path.join(common.OUT, "finetune_frames"))
    h = hashlib.sha256()
    for p, _ in items:
        h.update(common.file_sha256(p).encode())
    prefix = os.path.join(FEAT, "finetune_" + h.hexdigest()[:16])
    if not os.path.exists(prefix + "_s32.npy"):
        os.makedirs(FEAT, exist_ok=True)
        features.extract([p for p, _ in items], prefix, threads)
    feats = [np.load(f"{prefix}_s{s}.npy") for _, _, s in common.TAPS]
    return feats, [objs for _, objs in items]


def load_split(split):
    d = os.path.join(common.OUT, "data", split)
    labels = json.load(open(os.path.join(d, "labels.json")))["images"]
    feats = [np.load(os.path.join(FEAT, f"{split}_s{s}.npy")) for _, _, s in common.TAPS]
    return feats, [synthetic_objects(e) for e in labels]


# --- Loss ----------------------------------------------------------------------------------

def loss_fn(out, Y, negw, T, bw):
    """out [B, 5, GH, GW]; CenterNet focal loss + weighted L1 on the box terms."""
    import jax
    import jax.numpy as jnp

    z = out[:, 0]
    p = jnp.clip(jax.nn.sigmoid(z), 1e-6, 1 - 1e-6)
    pos = (Y >= 1.0).astype(z.dtype)
    npos = jnp.maximum(1.0, pos.sum())
    # log(sigmoid) computed stably from the logit
    lp, l1p = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    neg_w = ((1 - Y) ** 4) * negw * (1 - pos)
    heat = -(jnp.sum(pos * (1 - p) ** 2 * lp) + jnp.sum(neg_w * p * p * l1p)) / npos
    box = jnp.sum(jnp.abs(out[:, 1:5] - T) * bw[:, None]) / jnp.maximum(1.0, bw.sum())
    return heat + box, (heat, box)


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


def predict(params, blocks, norm, feats, frozen_blocks, batch=32):
    """Head outputs for a whole split (numpy [N, 5, GH, GW], cells of common.STRIDE).
    frozen_blocks: use the cached block15 output instead of running the blocks (phase 1)."""
    import jax

    @jax.jit
    def run(params, *f):
        if not frozen_blocks:
            f = f[:-1] + (blocks(params["blocks"], f[-2]),)
        return net.head_apply(params["head"], *net.normalise(norm, *f))

    outs = []
    for i in range(0, len(feats[0]), batch):
        f = [np.asarray(a[i:i + batch], np.float32) for a in feats]
        outs.append(np.asarray(run(params, *f)))
    return np.concatenate(outs)


def validate(out, objs, thresholds):
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


# --- Checkpoints -------------------------------------------------------------------------------

def save_checkpoint(path, params, norm, threshold):
    arrays = {k: np.asarray(v, np.float32) for k, v in params["blocks"].items()}
    arrays.update({f"head/{k}": np.asarray(v, np.float32) for k, v in params["head"].items()})
    for (m, s), (_, _, st) in zip(norm, common.TAPS):
        arrays[f"norm/mean{st}"] = np.asarray(m, np.float32).reshape(-1)
        arrays[f"norm/std{st}"] = np.asarray(s, np.float32).reshape(-1)
    arrays["threshold"] = np.float32(threshold)
    np.savez(path, **arrays)


def load_checkpoint(path):
    z = np.load(path)
    blocks = {k: z[k] for k in z.files if k.startswith("block")}
    head = {k[5:]: z[k] for k in z.files if k.startswith("head/")}
    norm = [(z[f"norm/mean{s}"].reshape(1, -1, 1, 1), z[f"norm/std{s}"].reshape(1, -1, 1, 1))
            for _, _, s in common.TAPS]
    return {"blocks": blocks, "head": head}, norm, float(z["threshold"])


# --- Training ------------------------------------------------------------------------------------

class Batches:
    """Synthetic and fine-tune items, as (source, index), gathered into float32 batches
    with their targets."""

    def __init__(self, feats, tg, ft_feats, ft_tg):
        self.src = {"s": (feats, tg), "f": (ft_feats, ft_tg)}

    def get(self, chunk, need_s32):
        n = len(common.TAPS)
        taps = range(n) if need_s32 else range(n - 1)
        f = {k: [] for k in taps}
        t = [[], [], [], []]
        for src, i in chunk:
            fs, tg = self.src[src]
            for k in taps:
                f[k].append(fs[k][i])
            for a, b in zip(t, tg[i]):
                a.append(b)
        f = [np.asarray(np.stack(f[k]), np.float32) for k in taps]
        return f, [np.stack(a) for a in t]


def make_step(opt, blocks, norm, end_to_end):
    import jax
    import optax

    def loss_of(params, f, t):
        if end_to_end:
            out = net.forward(params, blocks, norm, *f)
        else:
            out = net.head_apply(params["head"], *net.normalise(norm, *f))
        return loss_fn(out, *t)

    @jax.jit
    def step(params, state, f, t):
        (loss, parts), g = jax.value_and_grad(loss_of, has_aux=True)(params, f, t)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss, parts

    return step


def optimiser(head_lr, block_lr, steps, train_blocks):
    """AdamW with a cosine schedule; weight decay on the head's kernels only (the blocks'
    pretrained weights are held in place by their small learning rate instead)."""
    import jax
    import optax

    def sched(lr):
        return optax.cosine_decay_schedule(lr, max(1, steps), alpha=0.05)

    def decay_mask(params):
        return {"blocks": jax.tree_util.tree_map(lambda _: False, params["blocks"]),
                "head": {k: k in net.HEAD_KERNELS for k in params["head"]}}

    def labels(params):
        return {"blocks": jax.tree_util.tree_map(lambda _: "blocks", params["blocks"]),
                "head": jax.tree_util.tree_map(lambda _: "head", params["head"])}

    head = optax.adamw(sched(head_lr), weight_decay=1e-4, mask=decay_mask)
    blocks = optax.adam(sched(block_lr)) if train_blocks else optax.set_to_zero()
    return optax.multi_transform({"head": head, "blocks": blocks}, labels)


def run_phase(name, params, step_fn, opt, batches, order_fn, epochs, batch, need_s32, val,
              log):
    import jax

    state = opt.init(params)
    for epoch in range(epochs):
        te = time.time()
        order = order_fn(epoch)
        sums, nb = np.zeros(3), 0
        for bi in range(len(order) // batch):
            f, t = batches.get(order[bi * batch:(bi + 1) * batch], need_s32)
            params, state, loss, (lh, lb) = step_fn(params, state, f, t)
            sums += (float(loss), float(lh), float(lb))
            nb += 1
        ev = val(params)
        rec = {"phase": name, "epoch": epoch + 1, "images": len(order),
               "loss": round(sums[0] / max(1, nb), 4), "heat": round(sums[1] / max(1, nb), 4),
               "box": round(sums[2] / max(1, nb), 4), "val@0.3": ev[0.3],
               "seconds": round(time.time() - te, 1)}
        log["epochs"].append(rec)
        print(json.dumps(rec), flush=True)
    return jax.device_get(params)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head-epochs", type=int, default=4)
    ap.add_argument("--ft-epochs", type=int, default=4)
    ap.add_argument("--ft-images", type=int, default=2000,
                    help="images per end-to-end epoch (a fresh sample each epoch)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="head, phase 1")
    ap.add_argument("--ft-head-lr", type=float, default=5e-4, help="head, phase 2")
    ap.add_argument("--ft-lr", type=float, default=5e-5, help="blocks, phase 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune", help="a folder of your own labelled frames")
    ap.add_argument("--finetune-share", type=float, default=0.3)
    ap.add_argument("--init", help="start from this checkpoint.npz")
    ap.add_argument("--threads", type=int, default=2, help="for finetune features")
    ap.add_argument("--out", default=os.path.join(common.OUT, "checkpoint.npz"))
    args = ap.parse_args()
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    import onnx

    blocks = net.Blocks(onnx.load(common.BACKBONE), BLOCKS_FROM, BLOCKS_TO)
    feats, objs = load_split("train")
    n_syn = len(objs)
    if args.init:
        params, norm, _ = load_checkpoint(args.init)
    else:
        # per-channel feature normalisation from (a sample of) the training features;
        # for stride 32 from the original blocks' output, fixed while they fine-tune
        norm = []
        for a in feats:
            sample = np.asarray(a[: min(len(a), 1000)], np.float32)
            norm.append((sample.mean((0, 2, 3))[None, :, None, None],
                         sample.std((0, 2, 3))[None, :, None, None] + 1e-3))
        params = {"blocks": blocks.params,
                  "head": net.init_head(rng, *[c for _, c, _ in common.TAPS])}
    norm = [(np.asarray(m, np.float32), np.asarray(s, np.float32)) for m, s in norm]
    tg = [targets(o) for o in objs]
    ft_feats, ft_tg = None, []
    if args.finetune:
        ft_feats, ft_objs = load_finetune(args.finetune, args.threads)
        ft_tg = [targets(o) for o in ft_objs]
        print(json.dumps({"finetune_frames": len(ft_tg),
                          "finetune_products": sum(len(o) for o in ft_objs)}))
    val_feats, val_objs = load_split("val")
    batches = Batches(feats, tg, ft_feats, ft_tg)

    def order_fn(count):
        """A shuffled epoch of `count` synthetic images (a fresh sample when fewer than
        the split), plus the fine-tune frames oversampled to --finetune-share."""
        def order(epoch):
            n = min(count, n_syn)
            items = [("s", int(i)) for i in rng.permutation(n_syn)[:n]]
            if ft_tg:
                n_ft = int(round(args.finetune_share * n / (1 - args.finetune_share)))
                items += [("f", int(i) % len(ft_tg)) for i in rng.permutation(max(n_ft, 1))]
            return [items[i] for i in rng.permutation(len(items))]
        return order

    log = {"epochs": [], "blocks": f"{BLOCKS_FROM} -> {BLOCKS_TO}", "seed": args.seed}

    def val_frozen(p):
        return validate(predict(p, blocks, norm, val_feats, True), val_objs, [0.3])

    def val_e2e(p):
        return validate(predict(p, blocks, norm, val_feats, False), val_objs, [0.3])

    per_epoch = lambda n: (min(n, n_syn) + (int(round(args.finetune_share * min(n, n_syn) /
                           (1 - args.finetune_share))) if ft_tg else 0)) // args.batch
    if args.head_epochs:
        steps = args.head_epochs * per_epoch(n_syn)
        opt = optimiser(args.lr, 0.0, steps, False)
        step = make_step(opt, blocks, norm, False)
        params = run_phase("head", params, step, opt, batches, order_fn(n_syn),
                           args.head_epochs, args.batch, True, val_frozen, log)
    if args.ft_epochs:
        steps = args.ft_epochs * per_epoch(args.ft_images)
        opt = optimiser(args.ft_head_lr, args.ft_lr, steps, True)
        step = make_step(opt, blocks, norm, True)
        params = run_phase("end-to-end", params, step, opt, batches, order_fn(args.ft_images),
                           args.ft_epochs, args.batch, False, val_e2e, log)

    thresholds = [round(x, 2) for x in np.arange(0.15, 0.66, 0.05)]
    out = predict(params, blocks, norm, val_feats, False)
    ev = validate(out, val_objs, thresholds)
    best = max(thresholds, key=lambda t: (ev[t]["f1"], -ev[t]["count_mae"]))
    log["val_thresholds"] = {str(k): v for k, v in ev.items()}
    log["threshold"] = best
    log["seconds"] = round(time.time() - t0, 1)
    log["train_images"] = n_syn
    log["finetune_frames"] = len(ft_tg)
    print(json.dumps({"threshold": best, "val": ev[best], "seconds": log["seconds"]}))
    save_checkpoint(args.out, params, norm, best)
    common.write_json(os.path.join(os.path.dirname(args.out), "train_log.json"), log)


if __name__ == "__main__":
    main()
