"""Deterministic synthetic shelf generator for the class-agnostic product counter.

    python generate.py --out OUT/data --split train --count 4000 [--seed 1] [--workers 2]

Each image is a camera frame (640x480, or 640x360 for 16:9 frames) of 1-5 shelf rows:
backgrounds (gradients, planks, panels, blurred photo crops), boards with shelf-edge
strips and price labels, products packed side by side with small gaps (boxes textured
with photo crops / colour bands / text / logos, boxes lying flat and stacked, bottles and
cans with label bands, pouches), runs of the same product, out-of-stock gaps, products
cut by the frame edge, occlusion by an arm or a person-like blob, a perspective warp (a
camera mounted high or low, or off to one side), lighting gradient, reflections, colour
cast, noise, blur, JPEG, some greyscale.

Texture photos are split by source photo (common.TRAIN / common.HELD_OUT): --split
train/val use only TRAIN photos, --split test only HELD_OUT photos. The split is written
into OUT/<split>/textures.json.

Labels: OUT/<split>/labels.json (per image: objects with type, cx, cy, w, h normalised to
the frame, and `ignore` for products mostly cut off or hidden: neither to be found nor
to be penalised) and a YOLO txt beside each image (class 0, non-ignored products only).
Every image has its own seed (seed, split, index), so the output does not depend on the
number of workers.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TEXTURES = None  # list of (name, RGB uint8 array), loaded per process
FONTS = {}


def font(size):
    size = int(max(6, min(size, 96)))
    if size not in FONTS:
        FONTS[size] = ImageFont.load_default(size=size)  # Pillow's built-in font
    return FONTS[size]


def load_textures(names):
    out = []
    for n in names:
        with Image.open(common.source_path(n)) as im:
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            s = 512 / max(im.size)
            if s < 1:
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                               Image.LANCZOS)
            out.append((n, np.asarray(im)))
    return out


def seed_for(seed, split, index):
    h = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little")


# --- Colours and small helpers ---------------------------------------------------------

def rand_colour(rng, sat=None, light=None):
    """A random RGB colour via HSV."""
    h = rng.random()
    s = rng.uniform(0.3, 1.0) if sat is None else sat
    v = rng.uniform(0.35, 1.0) if light is None else light
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (int(r * 255), int(g * 255), int(b * 255))


def photo_crop(rng, w, h, tint=True):
    """A random crop of a random texture photo, resized to w x h (PIL RGB)."""
    name, a = TEXTURES[rng.integers(len(TEXTURES))]
    H, W = a.shape[:2]
    aspect = w / max(h, 1)
    cw = int(rng.uniform(0.25, 1.0) * W)
    ch = int(cw / aspect)
    if ch > H:
        ch = int(rng.uniform(0.25, 1.0) * H)
        cw = max(4, min(W, int(ch * aspect)))
    cw, ch = max(cw, 4), max(ch, 4)
    x0 = int(rng.integers(0, max(1, W - cw + 1)))
    y0 = int(rng.integers(0, max(1, H - ch + 1)))
    im = Image.fromarray(a[y0:y0 + ch, x0:x0 + cw]).resize((max(1, w), max(1, h)),
                                                             Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if tint and (a.ndim == 2 or np.ptp(a[..., 0].astype(int) - a[..., 1]) < 10 or
                 rng.random() < 0.2):
        # grey photos: colourise
        c = np.array(rand_colour(rng), np.float32) / 255
        g = np.asarray(im.convert("L"), np.float32)[..., None]
        im = Image.fromarray(np.clip(g * (0.4 + 0.8 * c), 0, 255).astype(np.uint8))
    return im


def random_text(rng, n=None):
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    n = n or int(rng.integers(3, 9))
    s = "".join(letters[rng.integers(26)] for _ in range(n))
    if rng.random() < 0.5:
        s = s.capitalize() if rng.random() < 0.5 else s.lower()
    return s


def draw_logo(d, rng, x, y, size, colour):
    kind = rng.integers(4)
    if kind == 0:
        d.ellipse([x, y, x + size, y + size * rng.uniform(0.5, 1.0)], fill=colour)
    elif kind == 1:
        pts = [(x + size * rng.random(), y + size * rng.random()) for _ in range(3)]
        d.polygon(pts, fill=colour)
    elif kind == 2:
        d.rectangle([x, y, x + size, y + size * 0.6], outline=colour,
                    width=max(1, int(size / 8)))
    else:
        n = int(rng.integers(5, 9))
        r1, r2 = size / 2, size / 4
        cx, cy = x + size / 2, y + size / 2
        pts = [(cx + (r1 if i % 2 == 0 else r2) * math.cos(math.pi * i / n),
                cy + (r1 if i % 2 == 0 else r2) * math.sin(math.pi * i / n))
               for i in range(2 * n)]
        d.polygon(pts, fill=colour)


def face_texture(rng, w, h):
    """A packaging face: a photo crop, colour bands or a flat colour, with text and logos."""
    w, h = max(w, 2), max(h, 2)
    style = rng.random()
    if style < 0.4:
        im = photo_crop(rng, w, h)
    elif style < 0.55:
        im = pattern(rng, w, h)
    else:
        im = Image.new("RGB", (w, h), rand_colour(rng))
        d = ImageDraw.Draw(im)
        if style < 0.8:
            y = 0
            horizontal = rng.random() < 0.75
            while y < (h if horizontal else w):
                t = int(rng.integers(max(2, (h if horizontal else w) // 8),
                                     max(3, (h if horizontal else w) // 2)))
                c = rand_colour(rng)
                d.rectangle([0, y, w, y + t] if horizontal else [y, 0, y + t, h], fill=c)
                y += t + int(rng.integers(0, max(1, t)))
        if rng.random() < 0.5:  # a picture window
            pw, ph = int(w * rng.uniform(0.4, 0.9)), int(h * rng.uniform(0.25, 0.6))
            if pw > 3 and ph > 3:
                im.paste(photo_crop(rng, pw, ph),
                         (int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(0, 3))):
        draw_logo(d, rng, rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7),
                  min(w, h) * rng.uniform(0.15, 0.5), rand_colour(rng))
    for _ in range(int(rng.integers(1, 4))):
        size = max(6, int(min(h * rng.uniform(0.06, 0.2), w * rng.uniform(0.15, 0.35))))
        d.text((rng.uniform(0, w * 0.5), rng.uniform(0, h * 0.85)), random_text(rng),
               fill=rand_colour(rng, light=rng.choice([0.1, 1.0])), font=font(size))
    return im


def pattern(rng, w, h):
    """A printed packaging pattern (stripes, checks, dots, waves) in 2-3 colours."""
    c = [np.array(rand_colour(rng), np.float32) for _ in range(3)]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(4, max(5, min(w, h) / 2))
    kind = rng.integers(4)
    if kind == 0:  # stripes at an angle
        ang = rng.choice([0, np.pi / 2, np.pi / 4, -np.pi / 4, rng.uniform(0, np.pi)])
        t = ((np.cos(ang) * x + np.sin(ang) * y) / period) % 1 < rng.uniform(0.3, 0.7)
        a = np.where(t[..., None], c[0], c[1])
    elif kind == 1:  # checks
        t = ((x // period + y // period) % 2).astype(bool)
        a = np.where(t[..., None], c[0], c[1])
    elif kind == 2:  # dots
        r = period * rng.uniform(0.15, 0.4)
        t = ((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2) < r * r
        a = np.where(t[..., None], c[0], c[1])
    else:  # waves
        t = np.sin(2 * np.pi * (x / period + 0.3 * np.sin(2 * np.pi * y / (3 * period))))
        a = c[0] * (0.5 + 0.5 * t[..., None]) + c[2] * (0.5 - 0.5 * t[..., None])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def cylinder_shade(a, rng):
    """Horizontal cylinder shading with a specular stripe on an RGB float array."""
    w = a.shape[1]
    x = np.linspace(-1, 1, w, dtype=np.float32)
    shade = 0.55 + 0.45 * np.sqrt(np.clip(1 - x ** 2, 0, 1))
    hx = rng.uniform(-0.6, 0.2)
    spec = 90 * np.exp(-((x - hx) / rng.uniform(0.05, 0.15)) ** 2) * rng.uniform(0.3, 1.0)
    return np.clip(a * shade[None, :, None] + spec[None, :, None], 0, 255)


# --- Products: RGBA images ------------------------------------------------------------

def make_box(rng, w, h):
    face = face_texture(rng, w, h)
    a = np.asarray(face, np.float32).copy()
    # a darker side face and a lit top edge: the box is seen slightly from one side
    side = int(w * rng.uniform(0.0, 0.12))
    if side > 0:
        if rng.random() < 0.5:
            a[:, :side] *= rng.uniform(0.45, 0.75)
        else:
            a[:, w - side:] *= rng.uniform(0.45, 0.75)
    top = int(h * rng.uniform(0.0, 0.06))
    if top > 0:
        a[:top] = np.clip(a[:top] * 1.25 + 20, 0, 255)
    edge = max(1, w // 60)
    a[:, :edge] *= 0.6
    a[:, -edge:] *= 0.6
    rgb = Image.fromarray(a.astype(np.uint8))
    return rgb, Image.new("L", (w, h), 255)


def make_can(rng, w, h):
    label = np.asarray(face_texture(rng, w, h), np.float32).copy()
    rim = max(2, int(h * rng.uniform(0.04, 0.08)))
    metal = np.array(rand_colour(rng, sat=0.05, light=rng.uniform(0.6, 0.9)), np.float32)
    label[:rim] = metal
    label[-rim:] = metal * 0.85
    rgb = Image.fromarray(cylinder_shade(label, rng).astype(np.uint8))
    mask = Image.new("L", (w, h), 0)
    r = max(1, min(w // 6, rim))
    ImageDraw.Draw(mask).rounded_rectangle([0, 0, w - 1, h - 1], radius=r, fill=255)
    return rgb, mask


def make_bottle(rng, w, h):
    body_top = h * rng.uniform(0.3, 0.45)
    neck_w = w * rng.uniform(0.28, 0.45)
    cap_h = h * rng.uniform(0.05, 0.1)
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    cx = w / 2
    shoulder = h * rng.uniform(0.08, 0.2)
    pts = [(cx - neck_w / 2, cap_h), (cx + neck_w / 2, cap_h),
           (cx + neck_w / 2, body_top - shoulder), (w - 1, body_top), (w - 1, h - 1),
           (0, h - 1), (0, body_top), (cx - neck_w / 2, body_top - shoulder)]
    md.polygon(pts, fill=255)
    md.rectangle([cx - neck_w * 0.6, 0, cx + neck_w * 0.6, cap_h], fill=255)
    md.rounded_rectangle([0, body_top, w - 1, h - 1], radius=max(1, w // 5), fill=255)
    liquid = np.array(rand_colour(rng), np.float32)
    a = np.ones((h, w, 3), np.float32) * liquid
    if rng.random() < 0.4:  # clear bottle: show the shelf colour-ish
        a = a * 0.5 + 100
    # label band
    ly0 = int(body_top + (h - body_top) * rng.uniform(0.05, 0.3))
    ly1 = int(ly0 + (h - ly0) * rng.uniform(0.4, 0.9))
    if ly1 - ly0 > 2:
        a[ly0:ly1] = np.asarray(face_texture(rng, w, ly1 - ly0), np.float32)
    cap = np.array(rand_colour(rng), np.float32)
    a[:int(cap_h) + 1] = cap
    rgb = Image.fromarray(cylinder_shade(a, rng).astype(np.uint8))
    return rgb, mask


def make_pouch(rng, w, h):
    a = np.asarray(face_texture(rng, w, h), np.float32).copy()
    seal = max(2, int(h * rng.uniform(0.05, 0.1)))
    a[:seal] = a[:seal] * 0.7 + 60
    # wrinkles: soft vertical and diagonal shading
    x = np.linspace(0, 1, w, dtype=np.float32)
    k = rng.uniform(2, 6)
    a *= (0.85 + 0.15 * np.sin(2 * np.pi * k * x + rng.uniform(0, 6)))[None, :, None]
    y = np.linspace(0, 1, h, dtype=np.float32)
    a *= (0.8 + 0.2 * np.sqrt(y))[:, None, None]
    rgb = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    inset = w * rng.uniform(0.0, 0.12)
    md.polygon([(inset, 0), (w - 1 - inset, 0), (w - 1, h * 0.8), (w - 1, h - 1), (0, h - 1),
                (0, h * 0.8)], fill=255)
    md.rounded_rectangle([0, h * 0.3, w - 1, h - 1], radius=max(1, w // 8), fill=255)
    # a zigzag crimp at the top seal
    n = max(2, w // 6)
    for i in range(n):
        x0 = inset + (w - 2 * inset) * i / n
        md.polygon([(x0, 0), (x0 + (w - 2 * inset) / (2 * n), seal * 0.6),
                    (x0 + (w - 2 * inset) / n, 0)], fill=0)
    return rgb, mask


MAKERS = {"box": make_box, "lying_box": make_box, "can": make_can, "bottle": make_bottle,
          "pouch": make_pouch}


# width factor relative to the row's base width, and height / width range, per type
SHAPES = {"box": (1.0, (1.05, 2.2)), "lying_box": (1.6, (0.3, 0.7)),
          "bottle": (0.7, (2.4, 3.8)), "can": (0.8, (1.3, 2.0)), "pouch": (1.0, (1.05, 1.6))}


def product_size(rng, kind, base_w, clear_h, max_px):
    """(w, h) in flat-canvas pixels: about the row's base width (times the type's
    factor), the type's aspect; never taller than the row's free height nor larger than
    max_px (common.MAX_SIZE_UNITS) in either direction."""
    f, (a0, a1) = SHAPES[kind]
    w = base_w * f * rng.uniform(0.8, 1.2)
    h = w * rng.uniform(a0, a1)
    h = min(h, clear_h * 0.97, max_px)
    w = min(w, max_px)
    return max(6, int(w)), max(6, int(h))


def base_width_units(rng):
    """An image's median product width in width units (8 model-input pixels):
    log-uniform over the bulk (3-10) for 75% of images, over the whole range (2-16) for
    the rest."""
    lo, hi = common.WIDTH_UNITS_BULK if rng.random() < 0.75 else common.WIDTH_UNITS_RANGE
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


# --- Backgrounds and shelves ------------------------------------------------------------

def background(rng, w, h):
    kind = rng.random()
    if kind < 0.3:
        c0 = np.array(rand_colour(rng, sat=rng.uniform(0, 0.4)), np.float32)
        c1 = np.array(rand_colour(rng, sat=rng.uniform(0, 0.4)), np.float32)
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        a = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3)).copy()
    elif kind < 0.55:  # planks
        a = np.zeros((h, w, 3), np.float32)
        base = np.array(rand_colour(rng, sat=rng.uniform(0.2, 0.6),
                                    light=rng.uniform(0.35, 0.8)), np.float32)
        vertical = rng.random() < 0.5
        n = w if vertical else h
        pos = 0
        while pos < n:
            t = int(rng.integers(20, 80))
            c = base * rng.uniform(0.8, 1.15)
            if vertical:
                a[:, pos:pos + t] = c
                a[:, pos:pos + 2] *= 0.6
            else:
                a[pos:pos + t] = c
                a[pos:pos + 2] *= 0.6
            pos += t
        grain = rng.normal(0, 1, (h if not vertical else 1, w if vertical else 1))
        a *= (1 + 0.05 * np.tanh(grain))[..., None].astype(np.float32)
    elif kind < 0.75:  # panels (pegboard/metal)
        c = np.array(rand_colour(rng, sat=rng.uniform(0, 0.3)), np.float32)
        a = np.ones((h, w, 3), np.float32) * c
        step = int(rng.integers(12, 30))
        if rng.random() < 0.6:
            a[step // 2::step, step // 2::step] *= 0.4
        pw = int(rng.integers(80, 250))
        a[:, ::pw] *= 0.6
    else:  # a blurred photo
        im = photo_crop(rng, w // 4, h // 4, tint=False).filter(
            ImageFilter.GaussianBlur(rng.uniform(0.7, 2.5))).resize((w, h), Image.BILINEAR)
        a = np.asarray(im, np.float32) * rng.uniform(0.5, 1.0)
    return np.clip(a, 0, 255)


def price_strip(rng, im, x0, y0, x1, y1):
    d = ImageDraw.Draw(im)
    colour = [(235, 235, 235), (40, 40, 40), (230, 200, 40), (40, 80, 170), (180, 40, 40),
              (150, 150, 150)][rng.integers(6)]
    d.rectangle([x0, y0, x1, y1], fill=colour)
    d.line([x0, y0, x1, y0], fill=tuple(min(255, c + 50) for c in colour), width=1)
    sh = y1 - y0
    if sh < 6:
        return
    x = x0 + rng.uniform(0, 60)
    while x < x1:
        lw = sh * rng.uniform(1.2, 2.6)
        lc = (255, 255, 255) if rng.random() < 0.7 else (250, 230, 60)
        ly0 = y0 + sh * 0.12
        ly1 = y1 - sh * 0.12
        d.rectangle([x, ly0, x + lw, ly1], fill=lc)
        fs = max(6, int((ly1 - ly0) * 0.55))
        d.text((x + 2, ly0 + 1), f"{rng.integers(0, 20)}.{rng.integers(0, 99):02d}",
               fill=(0, 0, 0), font=font(fs))
        if rng.random() < 0.5:
            d.rectangle([x + lw * 0.55, ly0 + 2, x + lw - 2, ly1 - 2], fill=(0, 0, 0))
            for k in range(int(lw * 0.4 / 3)):  # a barcode
                xx = x + lw * 0.57 + k * 3
                d.line([xx, ly0 + 3, xx, ly1 - 3], fill=(255, 255, 255),
                       width=int(rng.integers(1, 3)))
        x += lw + rng.uniform(20, 200)


def homography(src, dst):
    """3x3 H with dst ~ H src (four point pairs)."""
    A, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        A.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        A.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    h = np.linalg.solve(np.array(A, float), np.array(b, float))
    return np.append(h, 1).reshape(3, 3)


def apply_h(H, pts):
    p = np.c_[pts, np.ones(len(pts))] @ H.T
    return p[:, :2] / p[:, 2:3]


# --- One image ------------------------------------------------------------------------

def render(seed):
    rng = np.random.default_rng(seed)
    wide = rng.random() < 0.25
    FW, FH = (640, 360) if wide else (640, 480)
    # flat canvas, larger than the frame so a perspective warp never shows its border
    margin = 0.12
    CW, CH = int(FW * (1 + 2 * margin)), int(FH * (1 + 2 * margin))
    canvas = Image.fromarray(background(rng, CW, CH).astype(np.uint8))
    objects = []  # (kind, x0, y0, x1, y1) in canvas pixels

    # model-input pixels per frame pixel (the frame is stretched to 384 x 288)
    mx = common.INPUT_W / FW
    units = base_width_units(rng)
    aisle = rng.random() < 0.2  # camera looking down the aisle: products shrink along
    if aisle:
        units *= 1.4  # the near end is larger than the median, the far end smaller
    base_w = units * common.WIDTH_UNIT / mx
    max_px = common.MAX_SIZE_UNITS * common.WIDTH_UNIT / mx
    row_h = min(base_w * rng.uniform(2.0, 3.4), CH * 1.1)
    n_rows = max(1, int(math.ceil(CH / row_h)))
    y = CH / 2 - n_rows * row_h / 2 + rng.uniform(-0.3, 0.3) * row_h
    uprights = rng.random() < 0.5
    board_colour = rand_colour(rng, sat=rng.uniform(0, 0.4), light=rng.uniform(0.3, 0.95))
    conditions = {"far": units < 3.0, "perspective": aisle}
    occluders = []  # (x0, y0, x1, y1) canvas rectangles drawn over products
    for r in range(n_rows):
        board_t = row_h * rng.uniform(0.04, 0.1)
        strip_t = row_h * rng.uniform(0.05, 0.12)
        top = y + row_h * rng.uniform(0.0, 0.08)
        floor = y + row_h - board_t - strip_t
        clear = floor - top
        row_w = base_w * float(np.exp(rng.normal(0, 0.15)))
        # products of this row, left to right; half the rows packed touching (0-2 px)
        dense = rng.random() < 0.5
        gap_px = rng.uniform(0, 2) if dense else rng.uniform(1, 8)
        x = -rng.uniform(0, 0.6) * row_w
        row_products = []
        while x < CW:
            kind = str(rng.choice(common.PRODUCT_TYPES, p=[0.34, 0.17, 0.17, 0.16, 0.16]))
            w, h = product_size(rng, kind, row_w, clear, max_px)
            run = int(rng.integers(1, 9))
            stack = 1
            if kind == "lying_box":
                stack = int(rng.integers(1, max(2, min(5, int(clear * 0.95 / h)) + 1)))
            elif kind in ("box", "can") and h < clear * 0.48 and rng.random() < 0.6:
                stack = 2
            rgb, mask = MAKERS[kind](rng, w, h)
            for _ in range(run):
                if x > CW:
                    break
                for s_ in range(stack):
                    py = floor - (s_ + 1) * h - s_ * rng.uniform(0, 2)
                    px = x + rng.uniform(-1.5, 1.5) * (s_ > 0)
                    f = rng.uniform(0.85, 1.1)
                    lut = np.minimum(np.arange(256) * f, 255).astype(np.uint8).tolist()
                    v = rgb.point(lut * 3)
                    row_products.append((kind, int(px), int(py), v, mask,
                                         {"dense": dense, "stacked": stack > 1}))
                x += w + gap_px * (rng.uniform(0.5, 1.5) if not dense else 1.0)
            if rng.random() < 0.15:  # out of stock
                x += row_h * rng.uniform(0.3, 1.5)
            else:
                x += gap_px
        for kind, px, py, v, mask, flags in row_products:
            canvas.paste(v, (px, py), mask)
            objects.append((kind, px, py, px + v.width, py + v.height, flags))
        # board and shelf-edge strip; in a third of the rows the strip (price labels) is
        # mounted higher and hides the products' bottoms (8-30% of the row's height)
        d = ImageDraw.Draw(canvas)
        lift = clear * rng.uniform(0.08, 0.3) if rng.random() < 0.33 else 0.0
        d.rectangle([0, floor, CW, floor + board_t], fill=tuple(
            int(c * 0.8) for c in board_colour))
        s0 = int(floor + board_t - lift)
        price_strip(rng, canvas, 0, s0, CW, int(s0 + strip_t + lift * 0.5))
        if lift:
            occluders.append((0, s0, CW, s0 + strip_t + lift))
        # the lip of the board above hides the tops of tall products in some rows
        if r > 0 and rng.random() < 0.2:
            lip = clear * rng.uniform(0.05, 0.2)
            d.rectangle([0, y, CW, y + lip], fill=tuple(int(c * 0.7) for c in board_colour))
            occluders.append((0, y, CW, y + lip))
        y += row_h
    if uprights:
        d = ImageDraw.Draw(canvas)
        for ux in [rng.uniform(0, 0.1) * CW, rng.uniform(0.9, 1.0) * CW]:
            uw = rng.uniform(0.02, 0.05) * CW
            if rng.random() < 0.5:
                d.rectangle([ux - uw / 2, 0, ux + uw / 2, CH], fill=board_colour)
                occluders.append((ux - uw / 2, 0, ux + uw / 2, CH))
    # visible part of each product after the occluders (strips, lips, uprights): the
    # label is the visible box, like a human labeller's; mostly hidden ones are ignored
    clipped = []
    for kind, x0, y0, x1, y1, flags in objects:
        area = (x1 - x0) * (y1 - y0)
        hidden_any = False
        for ox0, oy0, ox1, oy1 in occluders:
            if ox1 <= x0 or ox0 >= x1 or oy1 <= y0 or oy0 >= y1:
                continue
            hidden_any = True
            if ox0 <= x0 and ox1 >= x1:  # a full-width band: cut from top or bottom
                if oy0 <= y0:
                    y0 = max(y0, oy1)
                elif oy1 >= y1:
                    y1 = min(y1, oy0)
            elif oy0 <= y0 and oy1 >= y1:  # a full-height band: cut from a side
                if ox0 <= x0:
                    x0 = max(x0, ox1)
                elif ox1 >= x1:
                    x1 = min(x1, ox0)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        vis = (x1 - x0) * (y1 - y0) / area
        clipped.append((kind, x0, y0, x1, y1, dict(flags, occluded=hidden_any), vis))
    objects = clipped

    # perspective: the frame is a quad inside the canvas (camera high/low/sideways), or
    # for an aisle view the canvas maps to a trapezoid narrowing towards the far end
    m = margin
    fx, fy = CW * m, CH * m
    frame = np.array([[0, 0], [FW, 0], [FW, FH], [0, FH]], float)
    if aisle:
        r = rng.uniform(0.3, 0.65)  # far-end height / near-end height
        ext = rng.uniform(0.0, 0.15) * FH
        cy = FH * rng.uniform(0.4, 0.6)
        near = [(-0.05 * FW, -ext), (-0.05 * FW, FH + ext)]
        far = [(1.05 * FW, cy - r * (cy + ext)), (1.05 * FW, cy + r * (FH - cy + ext))]
        dst = np.array([near[0], far[0], far[1], near[1]], float)
        if rng.random() < 0.5:  # looking down the aisle to the left
            dst[:, 0] = FW - dst[:, 0]
            dst = dst[[1, 0, 3, 2]]
        src = np.array([[0, 0], [CW, 0], [CW, CH], [0, CH]], float)
        H_c2f = homography(src, dst)
    else:
        quad = np.array([[fx, fy], [CW - fx, fy], [CW - fx, CH - fy], [fx, CH - fy]], float)
        mode = rng.random()
        k = rng.uniform(0.0, 0.9)
        if mode < 0.35:  # camera low (looking up): the top is farther
            quad[0, 0] -= k * fx
            quad[1, 0] += k * fx
        elif mode < 0.7:  # camera high
            quad[3, 0] -= k * fx
            quad[2, 0] += k * fx
        elif mode < 0.85:  # off to one side
            if rng.random() < 0.5:
                quad[0, 1] -= k * fy
                quad[3, 1] += k * fy
            else:
                quad[1, 1] -= k * fy
                quad[2, 1] += k * fy
        quad += rng.uniform(-0.25, 0.25, quad.shape) * [fx, fy]
        H_c2f = homography(quad, frame)   # canvas -> frame
    H_f2c = np.linalg.inv(H_c2f)
    coeffs = tuple((H_f2c / H_f2c[2, 2]).flatten()[:8])
    img = canvas.transform((FW, FH), Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    if aisle:  # outside the shelf: floor/ceiling/aisle background
        cover = Image.new("L", (CW, CH), 255).transform((FW, FH), Image.PERSPECTIVE, coeffs,
                                                       Image.BILINEAR)
        bg = Image.fromarray(background(rng, FW, FH).astype(np.uint8))
        img = Image.composite(img, bg, cover)

    boxes = []
    for kind, x0, y0, x1, y1, flags, vis0 in objects:
        c = apply_h(H_c2f, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float))
        bx0, by0 = c[:, 0].min(), c[:, 1].min()
        bx1, by1 = c[:, 0].max(), c[:, 1].max()
        full = (bx1 - bx0) * (by1 - by0)
        vx0, vy0, vx1, vy1 = max(bx0, 0), max(by0, 0), min(bx1, FW), min(by1, FH)
        if vx1 <= vx0 or vy1 <= vy0:
            continue
        vis = (vx1 - vx0) * (vy1 - vy0) / full * vis0
        boxes.append([kind, vx0, vy0, vx1, vy1, vis, flags])
    # products behind later-drawn products of the same row are not possible (packed
    # side by side); stacked items are separate objects.

    a = np.asarray(img, np.float32).copy()
    # occluders: an arm or a person-like blob, in front of everything
    occ = None
    if rng.random() < 0.2:
        om = Image.new("L", (FW, FH), 0)
        od = ImageDraw.Draw(om)
        colour = rand_colour(rng, sat=rng.uniform(0.1, 0.7), light=rng.uniform(0.2, 0.9))
        skin = [(224, 172, 105), (141, 85, 36), (255, 219, 172), (198, 134, 66)][rng.integers(4)]
        if rng.random() < 0.6:  # an arm reaching in from an edge
            side = rng.integers(4)
            ex, ey = [(rng.uniform(0, FW), FH + 20), (rng.uniform(0, FW), -20),
                      (-20, rng.uniform(0, FH)), (FW + 20, rng.uniform(0, FH))][side]
            hx, hy = rng.uniform(0.2, 0.8) * FW, rng.uniform(0.2, 0.8) * FH
            wdt = int(rng.uniform(0.06, 0.12) * FH)
            od.line([ex, ey, hx, hy], fill=255, width=wdt)
            arm = Image.new("RGB", (FW, FH), colour)
            ad = ImageDraw.Draw(arm)
            ad.ellipse([hx - wdt, hy - wdt, hx + wdt, hy + wdt], fill=skin)
            od.ellipse([hx - wdt, hy - wdt, hx + wdt, hy + wdt], fill=255)
        else:  # a person-like blob: body and head
            cx = rng.uniform(0, FW)
            bw = rng.uniform(0.25, 0.45) * FW
            top = rng.uniform(0.1, 0.5) * FH
            od.ellipse([cx - bw / 2, top + bw * 0.35, cx + bw / 2, FH + bw], fill=255)
            od.ellipse([cx - bw * 0.2, top - bw * 0.1, cx + bw * 0.2, top + bw * 0.35], fill=255)
            arm = Image.new("RGB", (FW, FH), colour)
            ImageDraw.Draw(arm).ellipse([cx - bw * 0.2, top - bw * 0.1, cx + bw * 0.2,
                                         top + bw * 0.35], fill=skin)
        om = om.filter(ImageFilter.GaussianBlur(1.5))
        occ = np.asarray(om, np.float32)[..., None] / 255
        arm_a = np.asarray(arm, np.float32)
        y_ = np.linspace(0.7, 1.1, FH, dtype=np.float32)[:, None, None]
        a = a * (1 - occ) + arm_a * y_ * occ
        occ = occ[..., 0] > 0.5

    labels = []
    for kind, x0, y0, x1, y1, vis, flags in boxes:
        hidden = 0.0
        if occ is not None:
            ix0, iy0, ix1, iy1 = int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1))
            region = occ[iy0:iy1, ix0:ix1]
            hidden = float(region.mean()) if region.size else 0.0
        w, h = x1 - x0, y1 - y0
        ignore = vis < 0.45 or hidden > 0.5 or min(w, h) < 12
        labels.append({"type": kind, "cx": round((x0 + x1) / 2 / FW, 6),
                       "cy": round((y0 + y1) / 2 / FH, 6), "w": round(w / FW, 6),
                       "h": round(h / FH, 6), "ignore": bool(ignore),
                       "conditions": sorted(k for k, v in dict(flags, **conditions).items()
                                            if v)})

    # photometric: lighting gradient, reflections, colour cast, noise, blur, JPEG, grey
    gx = np.linspace(-1, 1, FW, dtype=np.float32)[None, :]
    gy = np.linspace(-1, 1, FH, dtype=np.float32)[:, None]
    ang = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.45) * (np.cos(ang) * gx + np.sin(ang) * gy)
    light *= rng.uniform(0.6, 1.25)
    a *= light[..., None]
    if rng.random() < 0.35:  # a reflection: a soft bright diagonal band
        d = np.cos(ang) * gx * FW - np.sin(ang) * gy * FH + rng.uniform(-300, 300)
        a += rng.uniform(30, 110) * np.exp(-(d / rng.uniform(10, 60)) ** 2)[..., None]
    if rng.random() < 0.35:  # glare: specular highlights, clipped white
        for _ in range(int(rng.integers(1, 5))):
            gx0, gy0 = rng.uniform(0, FW), rng.uniform(0, FH)
            rx, ry = rng.uniform(5, 60), rng.uniform(5, 40)
            blob = np.exp(-(((gx * FW / 2 + FW / 2) - gx0) / rx) ** 2
                          - (((gy * FH / 2 + FH / 2) - gy0) / ry) ** 2)
            a += rng.uniform(120, 300) * blob[..., None]
        conditions["glare"] = True
    a *= rng.uniform(0.85, 1.15, 3).astype(np.float32)[None, None, :]
    if rng.random() < 0.15:  # motion blur along x or y (camera shake, a passing cart)
        n = int(rng.integers(3, 10))
        axis = int(rng.integers(0, 2))
        c = np.cumsum(np.pad(a, [(n, 0) if i == axis else (0, 0) for i in range(3)],
                             mode="edge"), axis=axis, dtype=np.float32)
        a = (np.take(c, np.arange(n, c.shape[axis]), axis=axis)
             - np.take(c, np.arange(0, c.shape[axis] - n), axis=axis)) / n
        conditions["blur"] = True
    noise = rng.uniform(0, 8)
    conditions["noise"] = noise > 5
    a += rng.standard_normal(a.shape, dtype=np.float32) * np.float32(noise)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if rng.random() < 0.35:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6)))
        conditions["blur"] = True
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    quality = int(rng.integers(35, 95))
    conditions["jpeg_low"] = quality < 55
    for o in labels:  # per product: its own conditions and the image's
        o["conditions"] = sorted(set(o["conditions"]) | {k for k, v in conditions.items() if v})
    return img, labels, quality


def work(job):
    seed, split, index, out_dir = job
    img, labels, quality = render(seed_for(seed, split, index))
    name = f"{index:05d}.jpg"
    img.save(os.path.join(out_dir, name), quality=quality)
    with open(os.path.join(out_dir, f"{index:05d}.txt"), "w") as f:
        for o in labels:
            if not o["ignore"]:
                f.write(f"0 {o['cx']:.6f} {o['cy']:.6f} {o['w']:.6f} {o['h']:.6f}\n")
    return {"file": name, "width": img.width, "height": img.height, "objects": labels}


def init_worker(names):
    global TEXTURES
    TEXTURES = load_textures(names)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(common.OUT, "data"))
    ap.add_argument("--split", choices=["train", "val", "test"], required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    names = common.HELD_OUT if args.split == "test" else common.TRAIN
    out_dir = os.path.join(args.out, args.split)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    jobs = [(args.seed, args.split, i, out_dir) for i in range(args.count)]
    if args.workers > 1:
        with Pool(args.workers, initializer=init_worker, initargs=(names,)) as pool:
            images = pool.map(work, jobs, chunksize=8)
    else:
        init_worker(names)
        images = [work(j) for j in jobs]
    common.write_json(os.path.join(out_dir, "labels.json"), {
        "split": args.split, "seed": args.seed, "types": common.PRODUCT_TYPES,
        "images": images})
    common.write_json(os.path.join(out_dir, "textures.json"), {
        "split": args.split,
        "textures_used": names,
        "train_textures": common.TRAIN,
        "held_out_textures": common.HELD_OUT,
        "rule": "train/val images are textured only with train_textures; test images only "
                "with held_out_textures (split by source photo)"})
    n = sum(1 for im in images for o in im["objects"] if not o["ignore"])
    print(json.dumps({"split": args.split, "images": len(images), "products": n,
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
