"""A user's labelled frames, rescaled so their products are as wide as the model was
trained on (train.py --finetune DIR).

shelfwatch's scale rule resizes each shelf zone so the median product is about
`target-width-cells` wide (manifest [scale]); fine-tune frames get the same treatment, or
the model would be taught sizes it never meets at run time. Per frame, the median
labelled product width in cells at the stretched model input (YOLO boxes; for centre
clicks the size estimated from the nearest neighbour) is compared with the band
common.SCALE_MIN/MAX_WIDTH_CELLS:

- inside the band: the frame is used as it is;
- products too large (scale s < 1): the frame is shrunk by s and centred on a canvas of
  its own size, filled with its mean colour (the pad holds no product);
- products too small (s > 1): the frame is cut into an n x n grid of overlapping tiles
  (n = ceil(s)), each stretched back to the full size; a product less than 45% inside a
  tile is `ignore` there (neither a centre nor a negative).

The rescaled frames are written as PNG to a work folder, named by the source's stem and
content hash; train.py caches their features by the hash of the files it trains on.
"""
import math
import os

import numpy as np
from PIL import Image

import common

EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def median_width_cells(objs):
    ws = [o["w"] if o["w"] is not None else o["size"] for o in objs if not o.get("ignore")]
    return float(np.median(ws)) / common.STRIDE if ws else None


def _scaled(o, fx, fy, ox, oy):
    """An object (model-input pixels) under x' = x * fx + ox, y' = y * fy + oy."""
    r = dict(o, cx=o["cx"] * fx + ox, cy=o["cy"] * fy + oy)
    if o["w"] is not None:
        r["w"], r["h"] = o["w"] * fx, o["h"] * fy
    else:
        r["size"] = o["size"] * math.sqrt(fx * fy)
    return r


def _clip_to_frame(o):
    """Visible part of a boxed object inside the model input; ignore when < 45% shows
    or its centre left the frame (centre clicks)."""
    W, H = common.INPUT_W, common.INPUT_H
    if o["w"] is None:
        inside = 0 <= o["cx"] < W and 0 <= o["cy"] < H
        return o if inside else None
    x0, x1 = o["cx"] - o["w"] / 2, o["cx"] + o["w"] / 2
    y0, y1 = o["cy"] - o["h"] / 2, o["cy"] + o["h"] / 2
    vx0, vx1, vy0, vy1 = max(x0, 0), min(x1, W), max(y0, 0), min(y1, H)
    if vx1 <= vx0 or vy1 <= vy0:
        return None
    vis = (vx1 - vx0) * (vy1 - vy0) / max(1e-6, (x1 - x0) * (y1 - y0))
    return dict(o, cx=(vx0 + vx1) / 2, cy=(vy0 + vy1) / 2, w=vx1 - vx0, h=vy1 - vy0,
                ignore=bool(o.get("ignore")) or vis < 0.45)


def prepare(folder, read_labels, work):
    """-> [(image path, objects in model-input pixels)], rescaled as described above."""
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(EXTS))
    os.makedirs(work, exist_ok=True)
    lo, hi = common.SCALE_MIN_WIDTH_CELLS, common.SCALE_MAX_WIDTH_CELLS
    target = common.SCALE_TARGET_WIDTH_CELLS
    items = []
    for f in files:
        txt = os.path.join(folder, os.path.splitext(f)[0] + ".txt")
        if not os.path.exists(txt):
            continue
        path = os.path.join(folder, f)
        with Image.open(path) as im:
            im = im.convert("RGB")
        objs = read_labels(txt, im.size)
        med = median_width_cells(objs)
        if med is None or lo <= med <= hi:
            items.append((path, objs))
            continue
        s = target / med
        key = os.path.splitext(f)[0] + "_" + common.file_sha256(path)[:12]
        if s < 1:
            W, H = im.size
            small = im.resize((max(1, round(W * s)), max(1, round(H * s))), Image.BILINEAR)
            canvas = Image.new("RGB", (W, H), tuple(int(c) for c in
                                                     np.asarray(im).reshape(-1, 3).mean(0)))
            ox, oy = (W - small.width) // 2, (H - small.height) // 2
            canvas.paste(small, (ox, oy))
            out = os.path.join(work, f"{key}_s.png")
            canvas.save(out)
            fx, fy = small.width / W, small.height / H
            items.append((out, [_scaled(o, fx, fy, ox / W * common.INPUT_W,
                                        oy / H * common.INPUT_H) for o in objs]))
            continue
        n = int(math.ceil(s))
        W, H = im.size
        tw, th = W / s, H / s
        for i in range(n):
            for j in range(n):
                x0 = (W - tw) * (i / (n - 1) if n > 1 else 0)
                y0 = (H - th) * (j / (n - 1) if n > 1 else 0)
                tile = im.crop((round(x0), round(y0), round(x0 + tw), round(y0 + th)))
                out = os.path.join(work, f"{key}_t{i}{j}.png")
                tile.resize((W, H), Image.BILINEAR).save(out)
                ox, oy = -x0 / W * common.INPUT_W * s, -y0 / H * common.INPUT_H * s
                moved = [_clip_to_frame(_scaled(o, s, s, ox, oy)) for o in objs]
                moved = [o for o in moved if o is not None]
                if any(not o.get("ignore") for o in moved):
                    items.append((out, moved))
    if not items:
        raise SystemExit(f"{folder}: no image with a .txt label beside it")
    return items
