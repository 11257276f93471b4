"""Frozen EfficientNet-Lite0 features at strides (4,) 8, 16 and 32, extracted once and cached.

    python features.py --data OUT/data --split train [--threads 2]
    python features.py --images DIR --cache OUT/features/finetune   (a user's own frames)

The backbone is models/efficientnet_lite0.onnx cut at common.TAPS (block4/add, 40 ch,
stride 8; block10/add, 112 ch, stride 16; block15/project/conv, 320 ch, stride 32; and
for a stride-4 heat map block2/add, 24 ch, stride 4) with its input fixed to 384x288
(common.cut_backbone). Images are stretched to 384x288 with
Pillow BILINEAR and normalised as (pixel - 127) / 128, exactly as shelfwatch feeds the
exported model. Writes OUT/features/<split>_s8.npy, _s16.npy, _s32.npy (and _s4.npy
at stride 4; float16, N x C x H x W) and <split>_files.json (image order).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def extract(paths, out_prefix, threads):
    sess = common.ort_session(common.cut_backbone().SerializeToString(), threads)
    names = [t for t, _, _ in common.TAPS]
    arrays = None
    for i, p in enumerate(paths):
        outs = sess.run(names, {"input": common.load_input(p)})
        if arrays is None:
            arrays = [np.lib.format.open_memmap(f"{out_prefix}_s{s}.npy", mode="w+",
                                                dtype=np.float16,
                                                shape=(len(paths),) + o.shape[1:])
                      for o, (_, _, s) in zip(outs, common.TAPS)]
        for a, o in zip(arrays, outs):
            a[i] = o[0]
    for a in arrays or []:
        a.flush()
    return len(paths)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(common.OUT, "data"))
    ap.add_argument("--split")
    ap.add_argument("--images", help="a directory of images (finetune frames)")
    ap.add_argument("--cache", help="output prefix (default OUT/features/<split>)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t0 = time.time()
    if args.split:
        d = os.path.join(args.data, args.split)
        files = [im["file"] for im in json.load(open(os.path.join(d, "labels.json")))["images"]]
        paths = [os.path.join(d, f) for f in files]
        prefix = args.cache or os.path.join(common.OUT, "features", args.split)
    else:
        exts = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
        files = sorted(f for f in os.listdir(args.images) if f.lower().endswith(exts))
        paths = [os.path.join(args.images, f) for f in files]
        prefix = args.cache
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    n = extract(paths, prefix, args.threads)
    common.write_json(prefix + "_files.json", {"files": paths})
    print(json.dumps({"features": prefix, "images": n, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
