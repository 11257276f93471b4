"""Compose tests/fixtures/shelves/: real product-like photos pasted as product faces into
shelf rows (upright, lying flat, stacked, several scales, with gaps), 640x480 JPEG with
YOLO labels (class 0) and expected.json (counts and per-product type).

    models/.build/venv/bin/python models/train/compose_shelves.py [--out tests/fixtures/shelves]

Only the HELD-OUT texture photos of common.HELD_OUT are pasted (tests/fixtures/products/
camera, guitar, fighter_fish, puppy, flower, grace_hopper, github_mug and tests/fixtures/
photos/ coffee, chelsea): the training pipeline never textures a training image with
them. Deterministic: a fixed seed and fixed scene table; re-running writes identical files
with the pinned Pillow/numpy.
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

W, H = 640, 480

# (file, rows); a row: (photo index, orientation, face width, face height, run, stack,
# gap px, out-of-stock gap after the run in faces (0 = none)), repeated across the row.
# orientation: "upright" (taller than wide) or "lying" (wider than tall).
SCENES = [
    ("shelf_01.jpg", "three rows, upright, medium", [
        [(0, "upright", 62, 96, 4, 1, 4, 1.0), (1, "upright", 62, 96, 4, 1, 4, 0)],
        [(2, "upright", 58, 100, 9, 1, 5, 0)],
        [(3, "upright", 64, 90, 3, 1, 3, 1.5), (4, "upright", 64, 90, 4, 1, 3, 0)]]),
    ("shelf_02.jpg", "two rows, upright, large", [
        [(5, "upright", 104, 160, 3, 1, 6, 0.6), (6, "upright", 104, 160, 2, 1, 6, 0)],
        [(7, "upright", 96, 150, 5, 1, 8, 0)]]),
    ("shelf_03.jpg", "four rows, upright, small", [
        [(8, "upright", 40, 64, 7, 1, 3, 1.0), (0, "upright", 40, 64, 6, 1, 3, 0)],
        [(1, "upright", 38, 62, 13, 1, 4, 0)],
        [(2, "upright", 42, 66, 5, 1, 3, 2.0), (3, "upright", 42, 66, 5, 1, 3, 0)],
        [(4, "upright", 40, 60, 6, 1, 2, 0), (5, "upright", 40, 60, 6, 1, 2, 0)]]),
    ("shelf_04.jpg", "two rows, boxes lying flat, stacked two high", [
        [(6, "lying", 130, 62, 4, 2, 6, 0)],
        [(7, "lying", 116, 56, 2, 2, 5, 0.6), (8, "lying", 116, 56, 2, 2, 5, 0)]]),
    ("shelf_05.jpg", "three rows, mixed: upright runs, a lying stack, gaps", [
        [(0, "upright", 56, 90, 3, 1, 4, 0), (1, "lying", 110, 44, 1, 1, 4, 0.6),
         (2, "upright", 56, 90, 4, 1, 4, 0)],
        [(3, "lying", 96, 40, 3, 3, 4, 0.8), (4, "upright", 50, 100, 3, 1, 4, 0)],
        [(5, "upright", 70, 96, 2, 1, 5, 1.2), (6, "upright", 70, 96, 3, 1, 5, 0)]]),
    ("shelf_06.jpg", "two rows, small boxes lying flat, stacked up to three high, one run single", [
        [(7, "lying", 84, 36, 3, 3, 4, 0), (8, "lying", 84, 36, 3, 3, 4, 0)],
        [(0, "lying", 90, 38, 2, 3, 5, 0.7), (1, "lying", 90, 38, 3, 1, 5, 0)]]),
    ("shelf_07.jpg", "three rows, one product per row at three scales", [
        [(2, "upright", 36, 58, 14, 1, 3, 0)],
        [(3, "upright", 60, 90, 9, 1, 5, 0)],
        [(4, "upright", 92, 120, 6, 1, 8, 0)]]),
    ("shelf_08.jpg", "three rows, dense, neighbours differ, tight gaps", [
        [(5, "upright", 54, 84, 2, 1, 2, 0), (6, "upright", 54, 84, 2, 1, 2, 0),
         (7, "upright", 54, 84, 2, 1, 2, 0), (8, "upright", 54, 84, 2, 1, 2, 0),
         (0, "upright", 54, 84, 2, 1, 2, 0), (1, "upright", 54, 84, 1, 1, 2, 0)],
        [(2, "lying", 100, 42, 2, 2, 2, 0), (3, "upright", 48, 84, 3, 1, 2, 0),
         (4, "lying", 100, 42, 2, 2, 2, 0)],
        [(5, "upright", 58, 88, 3, 1, 2, 0), (6, "upright", 58, 88, 3, 1, 2, 0),
         (7, "upright", 58, 88, 3, 1, 2, 0)]]),
]


def cover(im, w, h):
    """Scale and centre-crop a photo to exactly w x h."""
    s = max(w / im.width, h / im.height)
    r = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.LANCZOS)
    x0, y0 = (r.width - w) // 2, (r.height - h) // 2
    return r.crop((x0, y0, x0 + w, y0 + h))


def face(photo, w, h, rng):
    a = np.asarray(cover(photo, w, h), np.float32).copy()
    a *= rng.uniform(0.92, 1.06)
    side = max(2, w // 14)
    a[:, w - side:] *= 0.6  # a side face in shadow
    a[:2] = np.clip(a[:2] * 1.2 + 25, 0, 255)
    a[:, :1] *= 0.5
    a[-1:] *= 0.5
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(common.ROOT, "tests", "fixtures", "shelves"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    photos = []
    for src in common.HELD_OUT:
        with Image.open(common.source_path(src)) as im:
            photos.append(im.convert("RGB"))
    rng = np.random.default_rng(20261127)
    expected = {"about": "Real held-out photos pasted as product faces; YOLO labels, "
                         "class 0 = product. Made by models/train/compose_shelves.py.",
                "photos": common.HELD_OUT, "images": {}}
    for fname, desc, rows in SCENES:
        wall = np.array([rng.uniform(150, 215)] * 3) * rng.uniform(0.9, 1.05, 3)
        img = Image.new("RGB", (W, H), tuple(int(c) for c in wall))
        d = ImageDraw.Draw(img)
        # a soft vertical gradient on the back wall
        g = np.linspace(1.05, 0.85, H, dtype=np.float32)[:, None, None]
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) * g, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        labels, types = [], []
        row_h = (H - 10) / len(rows)
        board = tuple(int(c) for c in rng.uniform(60, 200, 3))
        strip = [(235, 235, 235), (40, 40, 40), (40, 80, 170)][len(fname) % 3]
        for r, runs in enumerate(rows):
            floor = 6 + (r + 1) * row_h - 16
            shadow = Image.new("L", (W, H), 0)
            sd = ImageDraw.Draw(shadow)
            x = 10 + rng.uniform(0, 12)
            placed = []
            for (pi, orient, fw, fh, run, stack, gap, oos) in runs:
                for _ in range(run):
                    for s in range(stack):
                        y1 = floor - s * (fh + 1)
                        y0 = y1 - fh
                        placed.append((pi, int(x), int(y0), fw, fh, orient, stack > 1))
                        sd.rectangle([x + 3, y0 + 3, x + fw + 3, y1 + 2], fill=90)
                    x += fw + gap
                x += oos * fw
            right = max(px + fw for _, px, _, fw, _, _, _ in placed)
            if right > W - 2:
                raise SystemExit(f"{fname}: row {r} ends at {right} px, outside the frame")
            shadow = shadow.filter(ImageFilter.GaussianBlur(3))
            dark = Image.new("RGB", (W, H), (0, 0, 0))
            img = Image.composite(dark, img, shadow)
            for pi, px, py, fw, fh, orient, stacked in placed:
                img.paste(face(photos[pi], fw, fh, rng), (px, py))
                labels.append(((px + fw / 2) / W, (py + fh / 2) / H, fw / W, fh / H))
                types.append(("stacked_" if stacked else "") + orient)
            d = ImageDraw.Draw(img)
            d.rectangle([0, floor, W, floor + 5], fill=board)
            d.rectangle([0, floor + 5, W, floor + 15], fill=strip)
            for _k in range(int(rng.integers(3, 6))):
                lx = rng.uniform(10, W - 40)
                d.rectangle([lx, floor + 6, lx + 26, floor + 14], fill=(255, 255, 255))
        a = np.asarray(img, np.float32)
        a += rng.standard_normal(a.shape, dtype=np.float32) * 2.0
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        img.save(os.path.join(args.out, fname), quality=90)
        with open(os.path.join(args.out, fname[:-4] + ".txt"), "w") as f:
            for cx, cy, w, h in labels:
                f.write(f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
        expected["images"][fname] = {"count": len(labels), "description": desc,
                                     "types": types}
    common.write_json(os.path.join(args.out, "expected.json"), expected)
    print(json.dumps({k: v["count"] for k, v in expected["images"].items()}))


if __name__ == "__main__":
    main()
