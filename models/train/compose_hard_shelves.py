"""Compose tests/fixtures/shelves-hard/: harder real-photo shelf frames at camera
resolutions (1280x960, 1280x720) for measuring the class-agnostic shelf counter under
the conditions real shelves show: dense touching rows, a camera looking along the shelf,
a whole unit seen from far, stacked boxes, price strips hiding product bottoms, glare,
blur, low light.

    /tmp/composer-venv/bin/python models/train/compose_hard_shelves.py [--out DIR] [--only NAME]

(any venv with the pinned models/requirements.txt: numpy 1.26.4, Pillow 11.0.0, scipy).

Textures: ONLY the held-out photos of common.HELD_OUT, as crops at different places and
zooms, with printed bands, brand text, logos and badges drawn on top (Pillow's bundled
font), on box faces, bottle and can labels and pouches. Everything else (walls, shelving,
price labels, light, noise) is procedural.

Labels: one YOLO line `0 cx cy w h` per product, the axis-aligned box of the product's
visible pixels (an id map is drawn with the products; a shelf-edge strip in front of a
product hides its bottom, and the label ends at the strip). Perspective frames are drawn
flat and warped with a homography; the id map is warped with the same sampling, and for
box-shaped products the label is checked against the warped box corners. No product is
cut by the frame edge.

Deterministic: a fixed seed per frame; re-running writes identical files.
"""
import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SEED = 20260305
JPEG_QUALITY = 85

# --- Sources -------------------------------------------------------------------------------

PHOTOS = None


def load_photos():
    global PHOTOS
    assert not set(common.HELD_OUT) & set(common.TRAIN), "HELD_OUT and TRAIN overlap"
    PHOTOS = []
    for src in common.HELD_OUT:
        with Image.open(common.source_path(src)) as im:
            PHOTOS.append(im.convert("RGB"))


_FONTS = {}


def font(size):
    size = max(5, int(size))
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)  # Pillow's bundled Aileron
    return _FONTS[size]


def fit_font(text, maxw, maxh):
    size = max(5, int(maxh))
    while size > 5:
        left, t, r, b = font(size).getbbox(text)
        if r - left <= maxw and b - t <= maxh:
            break
        size = int(size * 0.9)
    return font(size)


def text_in(d, box, text, fill, stroke=0, stroke_fill=None, fill_frac=0.8):
    x0, y0, x1, y1 = box
    f = fit_font(text, (x1 - x0) * 0.9, (y1 - y0) * fill_frac)
    d.text(((x0 + x1) / 2, (y0 + y1) / 2), text, font=f, fill=fill, anchor="mm",
           stroke_width=stroke, stroke_fill=stroke_fill if stroke_fill else fill)


def cover(im, w, h):
    """Scale and centre-crop to exactly w x h."""
    s = max(w / im.width, h / im.height)
    r = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.LANCZOS)
    x0, y0 = (r.width - w) // 2, (r.height - h) // 2
    return r.crop((x0, y0, x0 + w, y0 + h))


# --- Product designs (SKUs) ------------------------------------------------------------------

COLOURS = [(200, 30, 40), (20, 70, 160), (30, 130, 60), (240, 200, 30), (240, 120, 20),
           (110, 40, 130), (25, 25, 25), (245, 245, 238), (0, 130, 140), (120, 70, 30),
           (230, 90, 140), (20, 30, 80), (160, 200, 40), (180, 20, 90), (90, 160, 220)]
SYLL = ["ka", "lo", "mi", "ra", "ve", "to", "nu", "shi", "bel", "cor", "dan", "fi", "gre",
        "hal", "jo", "kri", "lu", "mar", "nor", "pol", "qui", "ros", "sel", "tur", "vin",
        "zen", "ax", "om", "ly"]
SMALL = ["ORIGINAL", "CLASSIC", "NEW", "500 g", "1 L", "FAMILY PACK", "BIO", "LIGHT",
         "EXTRA", "x12", "250 ml", "PREMIUM", "ZERO", "750 g", "2 x 150 g", "FRESH"]
BADGES = ["NEW", "-30%", "BIO", "+20%", "XL", "2for1"]


def brand_name(rng):
    s = "".join(SYLL[int(i)] for i in rng.integers(0, len(SYLL), int(rng.integers(2, 4))))
    return s.upper() if rng.random() < 0.6 else s.capitalize()


def make_family(rng):
    c1, c2 = rng.choice(len(COLOURS), 2, replace=False)
    c1, c2 = COLOURS[int(c1)], COLOURS[int(c2)]
    tc = (255, 255, 255) if sum(c1) < 380 else (20, 20, 20)
    return {"brand": brand_name(rng), "c1": c1, "c2": c2, "tc": tc,
            "style": int(rng.integers(0, 4)), "logo": int(rng.integers(0, 3))}


def make_sku(rng, fam, shape, w, h):
    """A product: its family's printing with its own photo crop and variant text, a shape
    and a size in frame pixels (of the flat shelf)."""
    pi = int(rng.integers(0, len(PHOTOS)))
    ph = PHOTOS[pi]
    zoom = float(rng.uniform(1.0, 2.6))
    asp = h / w if shape not in ("bottle",) else 0.5
    cw = ph.width / zoom
    ch = cw * asp
    if ch > ph.height:
        ch = ph.height
        cw = ch / asp
    x0 = float(rng.uniform(0, ph.width - cw))
    y0 = float(rng.uniform(0, ph.height - ch))
    return {"fam": fam, "shape": shape, "w": int(w), "h": int(h), "photo": pi,
            "crop": (int(x0), int(y0), int(x0 + cw), int(y0 + ch)),
            "small": SMALL[int(rng.integers(0, len(SMALL)))],
            "badge": BADGES[int(rng.integers(0, len(BADGES)))] if rng.random() < 0.35 else None,
            "glossy": bool(rng.random() < 0.75), "seed": int(rng.integers(0, 2 ** 31)),
            "liquid": COLOURS[int(rng.integers(0, len(COLOURS)))],
            "cap": COLOURS[int(rng.integers(0, len(COLOURS)))]}


def artwork(sku, w, h):
    """The printed face of a product, w x h, PIL RGB."""
    fam = sku["fam"]
    r = np.random.default_rng(sku["seed"])
    photo = PHOTOS[sku["photo"]].crop(sku["crop"])
    c1, c2, tc = fam["c1"], fam["c2"], fam["tc"]
    st = fam["style"]
    wide = w > h * 1.3
    if st == 1:  # a photo window on a solid printed background
        img = Image.new("RGB", (w, h), c1)
        d = ImageDraw.Draw(img)
        if wide:
            win = (int(0.45 * w), int(0.1 * h), int(0.95 * w), int(0.9 * h))
        else:
            win = (int(0.1 * w), int(0.3 * h), int(0.9 * w), int(0.84 * h))
        img.paste(cover(photo, win[2] - win[0], win[3] - win[1]), win[:2])
        d.rectangle(win, outline=c2, width=max(2, w // 40))
    else:
        img = cover(photo, w, h)
        if st == 3:  # tinted photo
            a = np.asarray(img, np.float32) * 0.6 + np.array(c1, np.float32) * 0.4
            img = Image.fromarray(a.astype(np.uint8))
        d = ImageDraw.Draw(img)
    if wide:
        band = (0, 0, int(0.42 * w), h) if st != 1 else (0, 0, int(0.42 * w), h)
    else:
        band = (0, 0, w, int(0.24 * h))
    if st == 2:  # diagonal band
        y = int(0.2 * h)
        d.polygon([(0, y), (w, y - int(0.14 * h)), (w, y + int(0.1 * h)), (0, y + int(0.24 * h))],
                  fill=c2)
        d.rectangle((0, 0, w, int(0.06 * h)), fill=c1)
        tb = (0, y - int(0.07 * h), w, y + int(0.2 * h))
    elif st == 1:
        tb = band if wide else (0, int(0.03 * h), w, int(0.27 * h))
    else:
        d.rectangle(band, fill=c1)
        tb = band
    text_in(d, tb, fam["brand"], tc if st != 2 else ((255, 255, 255) if sum(c2) < 380 else (20, 20, 20)),
            stroke=max(1, min(w, h) // 90))
    # variant line at the bottom
    if wide:
        sb = (int(0.46 * w), int(0.8 * h), w, h) if st != 1 else (0, int(0.78 * h), int(0.42 * w), h)
    else:
        sb = (0, int(0.88 * h), w, h)
    if st != 1:
        d.rectangle(sb, fill=c2)
    under = c1 if st == 1 else c2
    text_in(d, sb, sku["small"], (255, 255, 255) if sum(under) < 380 else (20, 20, 20))
    # logo
    s = int(min(w, h) * 0.22)
    lx = int(r.uniform(0.05, 0.7) * (w - s)) if not wide else int(r.uniform(0.05, 0.3) * w)
    ly = int(tb[3] + 0.02 * h) if not wide else int(0.55 * h)
    ly = min(ly, h - s - 2)
    if fam["logo"] == 0:
        d.ellipse((lx, ly, lx + s, ly + s), fill=c2, outline=(255, 255, 255), width=max(1, s // 12))
        text_in(d, (lx, ly, lx + s, ly + s), fam["brand"][0], (255, 255, 255))
    elif fam["logo"] == 1:
        pts = []
        for k in range(10):
            a = np.pi / 2 + k * np.pi / 5
            rr = s / 2 if k % 2 == 0 else s / 4.5
            pts.append((lx + s / 2 + rr * np.cos(a), ly + s / 2 - rr * np.sin(a)))
        d.polygon(pts, fill=(250, 210, 40), outline=(120, 60, 0))
    else:
        d.rounded_rectangle((lx, ly, lx + int(1.5 * s), ly + int(0.7 * s)), radius=s // 4,
                            fill=(255, 255, 255), outline=c1, width=max(1, s // 10))
        text_in(d, (lx, ly, lx + int(1.5 * s), ly + int(0.7 * s)), fam["brand"][:3], c1)
    if sku["badge"]:
        bx, by = int(w - s * 1.1), int(tb[3] + 0.05 * h) if not wide else int(0.05 * h)
        d.ellipse((bx, by, bx + s, by + s), fill=(230, 20, 20))
        text_in(d, (bx, by, bx + s, by + s), sku["badge"], (255, 255, 255))
    return img


def silhouette(shape, w, h, rng):
    """(alpha uint8 [h, w], half-width per row as a fraction of w) of a product shape."""
    ss = 4
    v = np.linspace(0, 1, 200)
    if shape == "bottle":
        nw = rng.uniform(0.13, 0.18)
        cw = nw + 0.025
        sh0, sh1 = rng.uniform(0.16, 0.22), rng.uniform(0.32, 0.4)
        hw = np.where(v < 0.06, cw, np.where(v < sh0, nw, np.where(
            v < sh1, nw + (0.5 - nw) * (0.5 - 0.5 * np.cos(np.pi * (v - sh0) / (sh1 - sh0))), 0.5)))
        hw = np.where(v > 0.975, 0.5 - (v - 0.975) * 1.2, hw)
    elif shape == "can":
        hw = np.where(v < 0.04, 0.45 + v / 0.04 * 0.05, 0.5)
        hw = np.where(v > 0.965, 0.5 - (v - 0.965) / 0.035 * 0.04, hw)
    elif shape == "pouch":
        hw = 0.455 + 0.045 * np.sin(np.clip(v / 0.6, 0, 1) * np.pi / 2)
        hw = np.where(v > 0.97, hw - (v - 0.97) / 0.03 * 0.03, hw)
    else:
        hw = np.full_like(v, 0.5)
    pts_r, pts_l = [], []
    for vi, hi in zip(v, hw):
        pts_r.append(((0.5 + hi) * w * ss, vi * h * ss))
        pts_l.append(((0.5 - hi) * w * ss, vi * h * ss))
    top = []
    if shape == "pouch":  # serrated heat seal
        n = max(8, int(w / 4))
        for k in range(n + 1):
            u = 0.5 - hw[0] + 2 * hw[0] * k / n
            top.append((u * w * ss, (0 if k % 2 == 0 else 0.012) * h * ss))
        pts = top + pts_r[1:] + pts_l[::-1][:-1]
    else:
        pts = pts_r + pts_l[::-1]
    m = Image.new("L", (w * ss, h * ss), 0)
    ImageDraw.Draw(m).polygon(pts, fill=255)
    m = m.resize((w, h), Image.BOX)
    hw_rows = np.interp(np.linspace(0, 1, h), v, hw)
    return np.asarray(m), hw_rows


CANON = 360  # designs are drawn with their longer side this long, then scaled


def design(sku):
    """A product at its canonical size: RGBA uint8 PIL."""
    r = np.random.default_rng(sku["seed"] + 1)
    shape = sku["shape"]
    s = CANON / max(sku["w"], sku["h"])
    w, h = max(8, round(sku["w"] * s)), max(8, round(sku["h"] * s))
    alpha, hw = silhouette(shape, w, h, r)
    yy = np.linspace(0, 1, h)[:, None]
    xx = (np.arange(w)[None, :] + 0.5) / w
    if shape in ("box", "lying_box"):
        a = np.asarray(artwork(sku, w, h), np.float32).copy()
        side = max(2, round(w * (0.06 if shape == "box" else 0.035)))
        a[:, w - side:] *= np.linspace(0.66, 0.5, side)[None, :, None]
        a[:max(2, h // 70)] = a[:max(2, h // 70)] * 1.15 + 30
        a[:, :max(1, w // 120)] *= 0.7
        a *= (1.04 - 0.1 * yy)[..., None]
    else:
        base = np.zeros((h, w, 3), np.float32)
        if shape == "bottle":
            liquid = np.array(sku["liquid"], np.float32) * 0.75 + 30
            base[:] = liquid
            cap_h = int(0.06 * h)
            base[:cap_h + 1] = np.array(sku["cap"], np.float32)
            l0, l1 = int(r.uniform(0.4, 0.46) * h), int(r.uniform(0.84, 0.9) * h)
            base[l0:l1] = np.asarray(artwork(sku, w, l1 - l0), np.float32)
        elif shape == "can":
            base[:] = 190
            l0, l1 = int(0.045 * h), int(0.962 * h)
            base[l0:l1] = np.asarray(artwork(sku, w, l1 - l0), np.float32)
            base[l0:l0 + max(1, h // 90)] *= 0.6
        else:  # pouch
            base[:] = np.asarray(artwork(sku, w, h), np.float32)
            seal = int(0.08 * h)
            ridges = 0.82 + 0.18 * ((np.arange(w) // max(1, w // 60)) % 2)
            base[:seal] = base[:seal] * 0.5 + np.array(sku["fam"]["c1"], np.float32) * 0.5
            base[:seal] *= ridges[None, :, None]
            base[seal:seal + max(1, h // 100)] *= 0.6
        rel = (xx - 0.5) / np.maximum(hw[:, None], 1e-3)  # -1..1 across the body
        relc = np.clip(rel, -1, 1)
        if shape == "pouch":
            ph = r.uniform(0, 2 * np.pi, 3)
            shade = (0.9 + 0.1 * np.sqrt(1 - relc ** 2)
                     + 0.06 * np.sin(7 * xx + ph[0]) * np.sin(5 * yy + ph[1])
                     + 0.04 * np.sin(13 * yy + 3 * xx + ph[2]))
            hl = 40 * np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.45) / 0.25) ** 2))
        else:
            shade = 0.55 + 0.45 * np.sqrt(1 - relc ** 2)
            hl = (55 if sku["glossy"] else 25) * np.exp(-((relc + 0.42) / 0.12) ** 2)
            hl = hl + 20 * np.exp(-((relc - 0.55) / 0.08) ** 2)
        a = base * shade[..., None] + hl[..., None]
    a = np.clip(a, 0, 255).astype(np.uint8)
    rgba = np.dstack([a, alpha])
    return Image.fromarray(rgba, "RGBA")


class Catalogue:
    def __init__(self):
        self.cache = {}

    def get(self, sku, w, h):
        """The product scaled to w x h: float32 [h, w, 4] (alpha 0..1)."""
        key = (id(sku), w, h)
        if key not in self.cache:
            if ("d", id(sku)) not in self.cache:
                self.cache[("d", id(sku))] = design(sku)
            im = self.cache[("d", id(sku))].resize((w, h), Image.LANCZOS)
            a = np.asarray(im, np.float32).copy()
            a[..., 3] /= 255.0
            self.cache[key] = a
        return self.cache[key]


def make_skus(rng, n, mix, sizes, families=None, wclip=None):
    """n products; mix: {shape: weight}; sizes: {shape: (h min, h max px, w/h min, max)};
    wclip: (min, max) product width px. Products come in families (the same brand
    printing, a different photo crop and variant)."""
    shapes = list(mix)
    p = np.array([mix[s] for s in shapes], np.float64)
    p /= p.sum()
    fams = [make_family(rng) for _ in range(families or max(2, n // 2))]
    out = []
    for _ in range(n):
        shape = shapes[int(rng.choice(len(shapes), p=p))]
        hmin, hmax, amin, amax = sizes[shape]
        h = rng.uniform(hmin, hmax)
        w = h * rng.uniform(amin, amax)
        if wclip:
            w = float(np.clip(w, *wclip))
        out.append(make_sku(rng, fams[int(rng.integers(0, len(fams)))], shape, round(w), round(h)))
    return out


# --- Scene -----------------------------------------------------------------------------------

class Scene:
    def __init__(self, w, h):
        self.W, self.H = w, h
        self.img = np.zeros((h, w, 3), np.float32)
        self.ids = np.zeros((h, w), np.int32)
        self.objs = []  # per id - 1: dict(type, x, y, w, h, sku)
        self.gloss = []

    def place(self, batch, shadow=(5, 3, 4.0, 0.45)):
        """batch: (rgba [h, w, 4], x, y, type, sku); drop shadows on what is behind, then
        paste in order."""
        dx, dy, sig, k = shadow
        sh = np.zeros((self.H, self.W), np.float32)
        for rgba, x, y, _, _ in batch:
            h, w = rgba.shape[:2]
            y0, x0 = y + dy, x + dx
            y1, x1 = min(self.H, y0 + h), min(self.W, x0 + w)
            sl = sh[y0:y1, x0:x1]
            np.maximum(sl, rgba[:y1 - y0, :x1 - x0, 3], out=sl)
        sh = ndimage.gaussian_filter(sh, sig)
        self.img *= (1 - k * sh)[..., None]
        for rgba, x, y, typ, sku in batch:
            self.add(rgba, x, y, typ, sku)

    def add(self, rgba, x, y, typ, sku):
        h, w = rgba.shape[:2]
        assert x >= 1 and y >= 1 and x + w <= self.W - 1 and y + h <= self.H - 1, (x, y, w, h)
        a = rgba[..., 3:4]
        reg = self.img[y:y + h, x:x + w]
        reg[:] = reg * (1 - a) + rgba[..., :3] * a
        pid = len(self.objs) + 1
        self.ids[y:y + h, x:x + w][rgba[..., 3] >= 0.5] = pid
        self.objs.append({"type": typ, "x": x, "y": y, "w": w, "h": h, "sku": sku})
        return pid

    def rect(self, box, colour, occlude=True):
        x0, y0, x1, y1 = [int(round(v)) for v in box]
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(self.W, x1), min(self.H, y1)
        self.img[y0:y1, x0:x1] = np.array(colour, np.float32)
        if occlude:
            self.ids[y0:y1, x0:x1] = 0

    def paste_rgb(self, arr, x, y, occlude=True):
        h, w = arr.shape[:2]
        self.img[y:y + h, x:x + w] = arr
        if occlude:
            self.ids[y:y + h, x:x + w] = 0


def gradient_wall(scene, rng, base, top_bright=1.08, bottom=0.8):
    H, W = scene.H, scene.W
    g = np.linspace(top_bright, bottom, H, dtype=np.float32)[:, None, None]
    gx = (1 + 0.06 * np.sin(np.linspace(0, np.pi, W, dtype=np.float32) + rng.uniform(0, 3)))[None, :, None]
    tex = ndimage.gaussian_filter(rng.standard_normal((H, W)).astype(np.float32), 6)[..., None] * 12
    scene.img[:] = np.array(base, np.float32)[None, None] * g * gx + tex


def price_tag(w, h, rng, colour=None):
    """A shelf-edge price label with a price, text and a barcode: float32 [h, w, 3]."""
    bg = colour or [(250, 250, 245), (255, 230, 40), (250, 250, 245), (255, 250, 200)][int(rng.integers(0, 4))]
    im = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(im)
    price = f"{int(rng.integers(0, 9))}.{int(rng.integers(0, 100)):02d}"
    if w >= 14 and h >= 6:
        text_in(d, (int(0.42 * w), 0, w, int(0.72 * h)), price, (20, 20, 20), fill_frac=0.9)
        if h >= 16:
            text_in(d, (int(0.42 * w), int(0.7 * h), w, h), brand_name(rng) + " " +
                    SMALL[int(rng.integers(0, len(SMALL)))], (60, 60, 60))
        # barcode
        bx0, bx1 = int(0.05 * w), int(0.38 * w)
        x = bx0
        while x < bx1:
            bw = int(rng.integers(1, 3))
            if rng.random() < 0.55:
                d.rectangle((x, int(0.25 * h), x + bw - 1, int(0.85 * h)), fill=(10, 10, 10))
            x += bw
        d.rectangle((0, 0, w - 1, max(0, h // 8)), fill=(200, 30, 30) if rng.random() < 0.3 else bg)
    return np.asarray(im, np.float32)


def draw_unit_back(scene, rng, x0, x1, y0, y1, colour, pegboard=False):
    """The unit's back panel, darker right under each board (set later by shade_under)."""
    sc = scene.img[y0:y1, x0:x1]
    sc[:] = np.array(colour, np.float32)
    if pegboard:
        step = max(6, (x1 - x0) // 60)
        for yy in range(y0 + step // 2, y1, step):
            for xx in range(x0 + step // 2, x1, step):
                scene.img[yy:yy + 2, xx:xx + 2] *= 0.6


def shade_under(scene, x0, x1, y_board_bottom, depth, k=0.45):
    """Shadow on the back panel just below a board (light comes from the front, above)."""
    d = max(2, int(depth))
    y1 = min(scene.H, y_board_bottom + d)
    prof = (1 - k * np.linspace(1, 0, y1 - y_board_bottom, dtype=np.float32) ** 1.5)[:, None, None]
    scene.img[y_board_bottom:y1, x0:x1] *= prof


def fill_row(rng, skus, cat, x0, x1, floor, clearance, gaps=(0, 3), runs=(1, 4), oos=0.08,
             stacks=(2, 3), stack_gap=(0, 1), can_stack=0.4, choose=None):
    """A row of products standing on `floor`, x0..x1. Returns (batch, groups):
    groups = (x start, x end) of each run (one price label each)."""
    batch, groups = [], []
    x = x0 + int(rng.integers(0, 6))
    prev = None
    fits = [s for s in skus if s["h"] <= clearance]
    assert fits, "no product fits the row"
    tries = 0
    while tries < 40:
        tries += 1
        sku = choose(rng, fits, prev) if choose else fits[int(rng.integers(0, len(fits)))]
        if sku is prev and len(fits) > 1:
            continue
        n = int(rng.integers(runs[0], runs[1] + 1))
        st = 1
        if sku["shape"] == "can" and rng.random() < can_stack:
            st = 2
            while st > 1 and st * (sku["h"] + stack_gap[1]) > clearance:
                st -= 1
        if sku["shape"] == "lying_box":
            st = int(rng.integers(stacks[0], stacks[1] + 1))
            while st > 1 and st * (sku["h"] + stack_gap[1]) > clearance:
                st -= 1
        g0 = x
        placed = 0
        for _ in range(n):
            if x + sku["w"] > x1:
                break
            for s in range(st):
                gy = int(rng.integers(stack_gap[0], stack_gap[1] + 1)) if s else 0
                y = floor - (s + 1) * sku["h"] - s * gy if s else floor - sku["h"]
                if s:
                    y = batch[-1][2] - sku["h"] - gy
                jx = int(rng.integers(-1, 2)) if s and sku["w"] > 30 else 0
                xx = max(x0, min(x + jx, x1 - sku["w"]))
                batch.append((cat.get(sku, sku["w"], sku["h"]), xx, y, sku["shape"], sku))
            x += sku["w"] + int(rng.integers(gaps[0], gaps[1] + 1))
            placed += 1
        if placed:
            groups.append((g0, x))
            prev = sku
            tries = 0
        if x + min(s["w"] for s in fits) > x1:
            break
        if rng.random() < oos:
            x += int(rng.uniform(0.5, 1.4) * sku["w"])
    return batch, groups


def shelf_board(scene, rng, x0, x1, floor, t, colour, tags, groups, strip=None, tag_h=None):
    """A board whose front face is floor..floor+t; `strip` px of a price strip rising in
    front of the products' bottoms (0 = none). Price labels at the runs' starts."""
    c = strip or 0
    top = floor - c
    scene.rect((x0, top, x1, floor + t), colour)
    # a lit top edge and a dark bottom edge
    scene.img[max(0, top):top + max(1, t // 8), x0:x1] = np.minimum(
        255, scene.img[max(0, top):top + max(1, t // 8), x0:x1] * 1.2 + 20)
    scene.img[floor + t - max(1, t // 8):floor + t, x0:x1] *= 0.55
    if tags:
        th = tag_h or max(5, int(0.7 * (t + c)))
        ty = top + (t + c - th) // 2 + 1
        for g0, g1 in groups:
            tw = int(min(max(2.2 * th, 0.6 * (g1 - g0)), 4 * th))
            tx = int(g0 + rng.integers(0, 4))
            if tx + tw > x1 - 2:
                continue
            scene.paste_rgb(price_tag(tw, th, rng), tx, ty)


# --- Photometric effects ---------------------------------------------------------------------

def lighting(img, rng, strength=0.18):
    H, W = img.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * W, rng.uniform(-0.1, 0.4) * H
    r = np.hypot((xx - cx) / W, (yy - cy) / H)
    g = 1.06 - strength * r ** 1.5
    g *= 1 + rng.uniform(-0.06, 0.06) * (xx / W - 0.5)
    return img * g[..., None]


def glare(img, ids, objs, rng, n_bands, n_spots):
    """Reflections of ceiling lights on glossy packaging: soft bright bands across rows and
    vertical streaks on bottles and cans, clipped to white, with bloom."""
    H, W = img.shape[:2]
    gloss = np.zeros((H, W), np.float32)
    glossy_ids = np.array([0] + [1 if o["sku"]["glossy"] else 0 for o in objs], np.float32)
    gm = glossy_ids[ids]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    boxes = [o for o in objs]
    for _ in range(n_bands):
        o = boxes[int(rng.integers(0, len(boxes)))]
        cy = o["y"] + rng.uniform(0.15, 0.6) * o["h"]
        cx = rng.uniform(0.15, 0.85) * W
        lx, ly = rng.uniform(60, 200), rng.uniform(0.04, 0.09) * o["h"]
        ang = rng.uniform(-0.15, 0.15)
        u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        gloss += rng.uniform(0.6, 1.1) * np.exp(-((u / lx) ** 4 + (v / ly) ** 2))
    for _ in range(n_spots):
        o = boxes[int(rng.integers(0, len(boxes)))]
        cx = o["x"] + rng.uniform(0.2, 0.8) * o["w"]
        cy = o["y"] + rng.uniform(0.2, 0.7) * o["h"]
        sx, sy = rng.uniform(0.04, 0.12) * o["w"], rng.uniform(0.06, 0.2) * o["h"]
        gloss += rng.uniform(0.5, 1.0) * np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    gloss *= ndimage.gaussian_filter(gm, 1.0) * 0.9 + 0.1
    out = img + gloss[..., None] * 255 * np.array([1.0, 0.98, 0.93], np.float32)
    over = np.clip(out.max(axis=2) - 235, 0, None)
    bloom = ndimage.gaussian_filter(over, 10) * 1.2
    out = out + bloom[..., None]
    return out


def motion_blur(img, length, angle_deg, defocus):
    k = int(np.ceil(length)) | 1
    kern = Image.new("L", (k * 4, k * 4), 0)
    c = k * 2
    a = np.deg2rad(angle_deg)
    dx, dy = np.cos(a) * length * 2, np.sin(a) * length * 2
    ImageDraw.Draw(kern).line((c - dx, c - dy, c + dx, c + dy), fill=255, width=4)
    kern = np.asarray(kern.resize((k, k), Image.BOX), np.float32)
    kern /= kern.sum()
    out = np.stack([ndimage.convolve(img[..., i], kern, mode="nearest") for i in range(3)], -1)
    if defocus:
        out = np.stack([ndimage.gaussian_filter(out[..., i], defocus) for i in range(3)], -1)
    return out


def low_light(img, rng, exposure, cast, read, gain_to):
    """Under-exposure with shot and read noise, a camera's gain back up, colour cast and
    the mild noise smoothing of a camera pipeline."""
    lin = (np.clip(img, 0, 255) / 255.0) ** 2.2 * exposure
    photons = 900.0
    sig = lin * photons
    noisy = sig + rng.standard_normal(sig.shape).astype(np.float32) * np.sqrt(np.maximum(sig, 0) + read ** 2)
    noisy = np.stack([ndimage.gaussian_filter(noisy[..., i], 0.6) for i in range(3)], -1)
    chroma = ndimage.gaussian_filter(rng.standard_normal(img.shape[:2]).astype(np.float32), 2.0)
    noisy[..., 0] += chroma * read * 0.8
    noisy[..., 2] -= chroma * read * 0.8
    lin = np.clip(noisy / photons, 0, None) * np.array(cast, np.float32) * gain_to / exposure
    return (np.clip(lin, 0, 1) ** (1 / 2.2)) * 255


def finish(img, rng, noise=1.8):
    img = img + rng.standard_normal(img.shape).astype(np.float32) * noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# --- Perspective ------------------------------------------------------------------------------

def homography(src, dst):
    A = []
    for (x, y), (u, v) in zip(src, dst):
        A.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        A.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    _, _, vt = np.linalg.svd(np.array(A, np.float64))
    Hm = vt[-1].reshape(3, 3)
    return Hm / Hm[2, 2]


def apply_h(Hm, pts):
    p = np.asarray(pts, np.float64)
    q = np.c_[p, np.ones(len(p))] @ Hm.T
    return q[:, :2] / q[:, 2:3]


def warp(flat, Hm, W, H, bg, ss=3):
    """Warp the flat scene (image and id map) into a W x H frame: each output pixel is the
    mean of ss x ss bilinear samples of the flat image (antialiasing the far end), its id
    the flat id at the pixel's centre. Pixel (i, j) covers [i, i+1) x [j, j+1)."""
    Hi = np.linalg.inv(Hm)
    fh, fw = flat.ids.shape
    out = np.zeros((H, W, 3), np.float64)
    cov = np.zeros((H, W), np.float64)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    for a in range(ss):
        for b in range(ss):
            px, py = xs + (b + 0.5) / ss, ys + (a + 0.5) / ss
            q = np.stack([px, py, np.ones_like(px)], -1) @ Hi.T
            fx, fy = q[..., 0] / q[..., 2] - 0.5, q[..., 1] / q[..., 2] - 0.5
            ok = (fx >= 0) & (fy >= 0) & (fx <= fw - 1) & (fy <= fh - 1)
            for c in range(3):
                out[..., c] += np.where(ok, ndimage.map_coordinates(
                    flat.img[..., c], [fy, fx], order=1, mode="nearest"), 0)
            cov += ok
    q = np.stack([xs + 0.5, ys + 0.5, np.ones_like(xs)], -1) @ Hi.T
    fx, fy = np.floor(q[..., 0] / q[..., 2]).astype(np.int64), np.floor(q[..., 1] / q[..., 2]).astype(np.int64)
    ok = (fx >= 0) & (fy >= 0) & (fx < fw) & (fy < fh)
    ids = np.where(ok, flat.ids[np.clip(fy, 0, fh - 1), np.clip(fx, 0, fw - 1)], 0)
    cov = cov[..., None] / (ss * ss)
    img = out / (ss * ss) + bg * (1 - cov)
    return img.astype(np.float32), ids.astype(np.int32)


# --- Frames ------------------------------------------------------------------------------------

SHOP_SIZES = {  # product height as a fraction of the row's clearance, and width / height
    "box": (0.6, 0.92, 0.55, 0.8),
    "lying_box": (0.2, 0.3, 2.2, 3.2),
    "bottle": (0.75, 0.93, 0.28, 0.36),
    "can": (0.42, 0.58, 0.53, 0.62),
    "pouch": (0.55, 0.85, 0.68, 0.85),
}


def sizes_for(clear, scale=1.0, override=None):
    out = {}
    for k, (a, b, c, d) in SHOP_SIZES.items():
        out[k] = (a * clear * scale, b * clear * scale, c, d)
    if override:
        out.update(override)
    return out


def frame_sizes(clear, p):
    sz = sizes_for(clear, p.get("scale", 1.0), p.get("sizes"))
    for k, (a, b) in p.get("sizes_wh", {}).items():
        sz[k] = (sz[k][0], sz[k][1], a, b)
    return sz


def fit_heights(skus, clear, frac=0.93):
    """Shrink products that are taller than the row's clearance allows."""
    for s in skus:
        if s["h"] > clear * frac:
            f = clear * frac / s["h"]
            s["h"] = int(s["h"] * f)
            s["w"] = max(6, int(s["w"] * f))


def build_unit(scene, rng, cat, skus, x0, x1, top, floors, t, back, board, opts, strips=None,
               uprights=None, upright_w=None, tags=True, tag_h=None, header=True):
    """A shelving unit: back panel, uprights, rows on `floors` (board tops), boards with
    price labels. opts: fill_row keywords; strips: per row px of the price strip above
    the board top (or None)."""
    uw = upright_w or max(4, t)
    draw_unit_back(scene, rng, x0, x1, top, floors[-1], back, pegboard=opts.pop("pegboard", False))
    prev = top
    rows = []
    for fl in floors:
        shade_under(scene, x0, x1, prev, (fl - prev) * 0.35)
        clear = fl - prev - 3
        bays = uprights or [(x0, x1)]
        allb, allg = [], []
        for bx0, bx1 in bays:
            b, g = fill_row(rng, skus, cat, bx0 + 2, bx1 - 2, fl, clear, **opts)
            allb += b
            allg += g
        rows.append((fl, allb, allg))
        prev = fl + t
    for _fl, b, _g in rows:
        scene.place(b, shadow=(max(2, t // 3), max(1, t // 5), max(1.5, t / 3), 0.45))
    for i, (fl, _b, g) in enumerate(rows):
        strip = strips[i] if strips else 0
        shelf_board(scene, rng, x0 - uw, x1 + uw, fl, t, board, tags, g, strip=strip, tag_h=tag_h)
    # uprights (at the unit's ends and between bays) and a header board
    up_col = tuple(int(c * 0.8) for c in board)
    segs = [(x0 - uw, x0), (x1, x1 + uw)]
    if uprights:
        segs += [(uprights[k][1], uprights[k + 1][0]) for k in range(len(uprights) - 1)]
    for a, b in segs:
        scene.rect((a, top - (t if header else 0), b, floors[-1] + t), up_col)
    if header:
        scene.rect((x0 - uw, top - t * 2, x1 + uw, top), board)
    return rows


def strip_fraction_ok(scene, rows, strips):
    for (fl, b, _g), c in zip(rows, strips):
        if not c:
            continue
        for rgba, _x, y, _typ, _sku in b:
            if y + rgba.shape[0] == fl:  # standing on the board (not the top of a stack)
                f = c / rgba.shape[0]
                assert 0.095 <= f <= 0.255, f"strip covers {f:.2f} of a product"


def dense_choose(p_same_family=0.45):
    def choose(rng, fits, prev):
        if prev is not None and rng.random() < p_same_family:
            fam = [s for s in fits if s["fam"] is prev["fam"] and s is not prev]
            if fam:
                return fam[int(rng.integers(0, len(fam)))]
        return fits[int(rng.integers(0, len(fits)))]
    return choose


def frame_flat(name, W, H, rng, cat, p):
    """Every frame but the perspective ones: drawn straight in the frame."""
    sc = Scene(W, H)
    gradient_wall(sc, rng, p.get("wall", (200, 196, 186)))
    n_rows = p["rows"]
    top = p["top"]
    bottom = p["bottom"]
    t = p["t"]
    x0, x1 = p["x0"], p["x1"]
    pitch = (bottom - top) / n_rows
    floors = [int(top + (i + 1) * pitch - t) for i in range(n_rows)]
    clear = int(pitch - t - 3)
    skus = make_skus(rng, p["n_sku"], p["mix"], frame_sizes(clear, p),
                     families=p.get("families"), wclip=p.get("wclip"))
    fit_heights(skus, clear)
    opts = dict(p["fill"])
    strips = p.get("strip")
    if strips:
        # price-strip rows: only products the strip covers 10-25 % of
        lo, hi = p["strip_h"]
        skus = [s for s in skus if lo <= s["h"] <= hi]
        assert len(skus) >= 6, len(skus)
    floor_col = p.get("floor")
    if floor_col:
        sc.img[bottom + t:] = np.array(floor_col, np.float32) * np.linspace(
            0.9, 1.05, H - bottom - t, dtype=np.float32)[:, None, None]
    rows = build_unit(sc, rng, cat, skus, x0, x1, top, floors, t, p.get("back", (150, 150, 150)),
                      p.get("board", (225, 225, 222)), opts, strips=strips,
                      uprights=p.get("bays"), tags=True, tag_h=p.get("tag_h"))
    if strips:
        strip_fraction_ok(sc, rows, strips)
    return sc


def frame_perspective(name, W, H, rng, cat, p):
    """A flat shelf (long, several rows) warped so the camera looks along it."""
    fw, fh = p["flat"]
    flat = Scene(fw, fh)
    gradient_wall(flat, rng, (190, 190, 185), 1.0, 0.95)
    n_rows, t = p["rows"], p["t"]
    top, bottom = p["t"] * 2 + 4, fh - 6
    pitch = (bottom - top) / n_rows
    floors = [int(top + (i + 1) * pitch - t) for i in range(n_rows)]
    clear = int(pitch - t - 3)
    skus = make_skus(rng, p["n_sku"], p["mix"], frame_sizes(clear, p))
    fit_heights(skus, clear)
    build_unit(flat, rng, cat, skus, 8, fw - 8, top, floors, t, p.get("back", (140, 140, 145)),
               p.get("board", (215, 215, 210)), dict(p["fill"]), tags=True)
    src = [(0, 0), (fw, 0), (fw, fh), (0, fh)]
    Hm = homography(src, p["quad"])
    bgs = Scene(W, H)
    gradient_wall(bgs, rng, p.get("wall", (185, 180, 170)))
    bg = bgs.img
    img, ids = warp(flat, Hm, W, H, bg)
    sc = Scene(W, H)
    sc.img, sc.ids = img, ids
    sc.objs = flat.objs
    sc.H_flat = Hm
    return sc


def labels_of(sc, Hm=None):
    """Per product the box of its visible pixels in the frame (x0, y0, x1, y1), checked."""
    sl = ndimage.find_objects(sc.ids, max_label=len(sc.objs))
    boxes = []
    for i, s in enumerate(sl):
        o = sc.objs[i]
        assert s is not None, f"product {i} entirely hidden"
        y0, y1, x0, x1 = s[0].start, s[0].stop, s[1].start, s[1].stop
        # visible fraction
        vis = np.count_nonzero(sc.ids[s] == i + 1)
        if Hm is None:
            assert o["x"] - 1 <= x0 and x1 <= o["x"] + o["w"] + 1 and o["y"] - 1 <= y0 and \
                y1 <= o["y"] + o["h"] + 1, (i, o, (x0, y0, x1, y1))
            if o["type"] in ("box", "lying_box"):
                assert abs(x0 - o["x"]) <= 1 and abs(x1 - o["x"] - o["w"]) <= 1 and \
                    abs(y0 - o["y"]) <= 1, (i, o, (x0, y0, x1, y1))
            full = o["w"] * o["h"]
        else:
            # the product's corners, warped; all inside the frame
            c = apply_h(Hm, [(o["x"], o["y"]), (o["x"] + o["w"], o["y"]),
                             (o["x"] + o["w"], o["y"] + o["h"]), (o["x"], o["y"] + o["h"])])
            assert c.min() >= 1 and c[:, 0].max() <= sc.W - 1 and c[:, 1].max() <= sc.H - 1
            if o["type"] in ("box", "lying_box"):
                e = max(abs(x0 - c[:, 0].min()), abs(x1 - c[:, 0].max()), abs(y0 - c[:, 1].min()))
                assert e <= 1.5, (i, e)
                assert abs(y1 - c[:, 1].max()) <= 1.5, (i, y1, c)
            full = vis
        assert vis >= 0.45 * full, (i, vis, full)
        boxes.append((x0, y0, x1, y1))
    return boxes


FRAMES = [
    # name, W, H, condition, conditions, description, kind, params
    ("dense_01", 1280, 960, "dense", ["dense"],
     "four rows of boxes, cans and pouches touching (0-2 px gaps), runs of the same product "
     "and look-alike variants of one brand side by side", "flat",
     dict(rows=4, top=40, bottom=930, t=16, x0=30, x1=1250, n_sku=24, families=8,
          mix={"box": 6, "can": 1.5, "pouch": 1.5}, sizes_wh={"box": (0.45, 0.7)},
          back=(120, 122, 128), fill=dict(gaps=(0, 2), runs=(1, 5), oos=0.0, choose=dense_choose()))),
    ("dense_02", 1280, 720, "dense", ["dense"],
     "three rows of narrow boxes, bottles and pouches packed flush (0-1 px), long runs of "
     "identical products", "flat",
     dict(rows=3, top=30, bottom=700, t=14, x0=24, x1=1256, n_sku=18, families=6,
          mix={"box": 5, "bottle": 2, "pouch": 1}, sizes_wh={"box": (0.42, 0.62)},
          back=(165, 160, 150), fill=dict(gaps=(0, 1), runs=(2, 6), oos=0.0, choose=dense_choose(0.35)))),
    ("perspective_01", 1280, 960, "perspective", ["perspective"],
     "camera looking along a three-row shelf from its left end: products shrink about 2.6:1 "
     "in height (and much more in width) towards the far end, rows converge", "persp",
     dict(flat=(4400, 1000), rows=3, t=22, n_sku=22,
          mix={"box": 5, "can": 1, "bottle": 1, "pouch": 1.2},
          fill=dict(gaps=(1, 4), runs=(1, 4), oos=0.05),
          quad=[(30, 40), (1250, 329), (1250, 671), (30, 930)])),
    ("perspective_02", 1280, 720, "perspective", ["perspective", "stacked"],
     "camera looking along a three-row shelf from its right end, a little from above: "
     "products shrink about 2.4:1 in height towards the far (left) end", "persp",
     dict(flat=(4200, 900), rows=3, t=20, n_sku=22,
          mix={"box": 4, "lying_box": 1, "can": 1.5, "bottle": 1.5},
          back=(100, 100, 108), fill=dict(gaps=(1, 5), runs=(1, 4), oos=0.06, stacks=(2, 3)),
          quad=[(40, 245), (1240, 30), (1240, 690), (40, 520)])),
    ("far_01", 1280, 960, "far", ["far"],
     "a whole two-bay shelving unit seen from far away: six shelves, products 18-35 px wide",
     "flat",
     dict(rows=6, top=150, bottom=850, t=9, x0=360, x1=920, bays=[(360, 640), (648, 920)],
          n_sku=44, families=14, mix={"box": 5, "can": 1.5, "bottle": 1.5, "pouch": 1.5},
          sizes={"box": (45, 90, 0.35, 0.6), "can": (40, 52, 0.53, 0.62),
                 "bottle": (70, 95, 0.28, 0.34), "pouch": (45, 80, 0.55, 0.75)}, wclip=(18, 35),
          wall=(205, 200, 190), floor=(120, 115, 110), tag_h=6, back=(140, 140, 145),
          fill=dict(gaps=(1, 4), runs=(1, 4), oos=0.12))),
    ("far_02", 1280, 720, "far", ["far"],
     "a single-bay unit of five shelves seen from across the aisle, products 18-32 px wide, "
     "out-of-stock gaps", "flat",
     dict(rows=5, top=80, bottom=690, t=8, x0=340, x1=940, n_sku=34, families=12,
          mix={"box": 5, "can": 2, "bottle": 1.5, "pouch": 1},
          sizes={"box": (48, 95, 0.33, 0.55), "can": (40, 52, 0.53, 0.62),
                 "bottle": (75, 100, 0.27, 0.32), "pouch": (50, 85, 0.5, 0.7)}, wclip=(18, 32),
          wall=(190, 195, 200), floor=(110, 110, 118), tag_h=5, back=(95, 98, 105),
          board=(200, 200, 205), fill=dict(gaps=(1, 3), runs=(1, 4), oos=0.15))),
    ("stacked_01", 1280, 960, "stacked", ["stacked"],
     "three rows of boxes lying flat, stacked 2-4 high (0-1 px between layers), beside "
     "upright boxes", "flat",
     dict(rows=3, top=40, bottom=930, t=18, x0=30, x1=1250, n_sku=20,
          mix={"lying_box": 5, "box": 2},
          sizes={"lying_box": (40, 68, 2.2, 3.2)}, wclip=(60, 190), back=(150, 145, 135),
          fill=dict(gaps=(1, 4), runs=(1, 3), oos=0.05, stacks=(2, 4), stack_gap=(0, 1)))),
    ("stacked_02", 1280, 720, "stacked", ["stacked"],
     "two rows: stacks of flat boxes 2-4 high, some runs two stacks wide, cans stacked two "
     "high between them", "flat",
     dict(rows=2, top=30, bottom=700, t=16, x0=30, x1=1250, n_sku=16,
          mix={"lying_box": 5, "can": 1.5, "box": 1},
          sizes={"lying_box": (45, 75, 2.2, 3.0), "can": (95, 130, 0.53, 0.62)}, wclip=(50, 180),
          back=(80, 82, 90), fill=dict(gaps=(1, 5), runs=(1, 2), oos=0.08, stacks=(2, 4),
                                       stack_gap=(0, 1), can_stack=0.8))),
    ("price_strip_01", 1280, 960, "price-strip", ["price-strip"],
     "four rows seen from below the shelf edges: a price-label strip (labels, barcodes, "
     "prices) hides the bottom 10-25 % of every product standing on a board", "flat",
     dict(rows=4, top=40, bottom=930, t=14, x0=30, x1=1250, n_sku=28,
          mix={"box": 5, "can": 1.5, "pouch": 1.5}, strip=[26, 26, 26, 26], strip_h=(106, 250),
          back=(135, 135, 140), fill=dict(gaps=(1, 4), runs=(1, 4), oos=0.06))),
    ("price_strip_02", 1280, 720, "price-strip", ["price-strip"],
     "three rows of bottles, cans and boxes behind tall price-label strips covering 10-25 % "
     "of their height", "flat",
     dict(rows=3, top=30, bottom=700, t=12, x0=30, x1=1250, n_sku=26,
          mix={"bottle": 2, "can": 2, "box": 3}, strip=[24, 26, 22], strip_h=(104, 220),
          back=(160, 158, 150), fill=dict(gaps=(1, 4), runs=(1, 4), oos=0.05, can_stack=0.0))),
    ("glare_01", 1280, 960, "glare", ["glare"],
     "four rows of glossy boxes and pouches with reflections of ceiling lights washing out "
     "parts of faces, bloom", "flat",
     dict(rows=4, top=40, bottom=930, t=16, x0=30, x1=1250, n_sku=24,
          mix={"box": 5, "pouch": 2, "lying_box": 0.6}, back=(130, 130, 135),
          fill=dict(gaps=(1, 5), runs=(1, 4), oos=0.06, stacks=(2, 2)),
          glare=(9, 18))),
    ("glare_02", 1280, 720, "glare", ["glare"],
     "three rows of bottles and cans with specular streaks and light bands", "flat",
     dict(rows=3, top=30, bottom=700, t=14, x0=30, x1=1250, n_sku=22,
          mix={"bottle": 3, "can": 3, "box": 1.5}, back=(110, 110, 115),
          fill=dict(gaps=(1, 5), runs=(1, 4), oos=0.05), glare=(5, 22))),
    ("blur_01", 1280, 960, "blur", ["blur"],
     "four mixed rows, horizontal motion blur of about 7 px and slight defocus", "flat",
     dict(rows=4, top=40, bottom=930, t=16, x0=30, x1=1250, n_sku=24,
          mix={"box": 5, "can": 1.5, "bottle": 1, "pouch": 1.5}, back=(145, 142, 138),
          fill=dict(gaps=(1, 4), runs=(1, 4), oos=0.06), blur=(7, 0, 1.0))),
    ("blur_02", 1280, 720, "blur", ["blur", "dense"],
     "three tight rows (0-2 px), diagonal motion blur of about 5 px and defocus", "flat",
     dict(rows=3, top=30, bottom=700, t=14, x0=30, x1=1250, n_sku=20,
          mix={"box": 4, "can": 2, "pouch": 1, "lying_box": 0.6}, back=(125, 128, 135),
          fill=dict(gaps=(0, 2), runs=(1, 4), oos=0.03, stacks=(2, 3)), blur=(5, 35, 1.4))),
    ("noise_01", 1280, 960, "noise", ["noise"],
     "four rows in low light: under-exposed, sensor noise, warm (tungsten) colour cast", "flat",
     dict(rows=4, top=40, bottom=930, t=16, x0=30, x1=1250, n_sku=24,
          mix={"box": 5, "can": 1.5, "bottle": 1, "pouch": 1.5}, back=(140, 140, 140),
          fill=dict(gaps=(1, 4), runs=(1, 4), oos=0.06),
          noise=(0.07, (1.2, 0.92, 0.6), 3.0, 0.33))),
    ("noise_02", 1280, 720, "noise", ["noise", "blur"],
     "three rows at night light: strong sensor noise, green-blue fluorescent cast, slight "
     "hand-shake blur", "flat",
     dict(rows=3, top=30, bottom=700, t=14, x0=30, x1=1250, n_sku=20,
          mix={"box": 4, "bottle": 1.5, "can": 1.5, "lying_box": 0.6}, back=(150, 150, 150),
          fill=dict(gaps=(1, 4), runs=(1, 4), oos=0.06, stacks=(2, 3)),
          blur=(3, 70, 0.6), noise=(0.05, (0.78, 1.08, 1.18), 4.0, 0.4))),
]


def compose(frame, out, cat):
    name, W, H, cond, conds, desc, kind, p = frame
    idx = [f[0] for f in FRAMES].index(name)
    rng = np.random.default_rng([SEED, idx])
    p = {k: (dict(v) if isinstance(v, dict) else v) for k, v in p.items()}
    if kind == "persp":
        sc = frame_perspective(name, W, H, rng, cat, p)
        boxes = labels_of(sc, sc.H_flat)
    else:
        sc = frame_flat(name, W, H, rng, cat, p)
        boxes = labels_of(sc)
    img = lighting(sc.img, rng)
    if "glare" in p:
        img = glare(img, sc.ids, sc.objs, rng, *p["glare"])
    if "blur" in p:
        img = motion_blur(img, *p["blur"])
    if "noise" in p:
        img = low_light(img, rng, *p["noise"])
        arr = finish(img, rng, 0.0)
    else:
        arr = finish(img, rng)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    with open(os.path.join(out, name + ".jpg"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(out, name + ".txt"), "w") as f:
        for x0, y0, x1, y1 in boxes:
            f.write(f"0 {(x0 + x1) / 2 / W:.6f} {(y0 + y1) / 2 / H:.6f} "
                    f"{(x1 - x0) / W:.6f} {(y1 - y0) / H:.6f}\n")
    widths = sorted(x1 - x0 for x0, y0, x1, y1 in boxes)
    info = {"count": len(boxes), "description": desc, "types": [o["type"] for o in sc.objs],
            "condition": cond, "conditions": conds, "width": W, "height": H,
            "product_width_px": [int(widths[0]), float(np.median(widths)), int(widths[-1])]}
    return name + ".jpg", info, len(buf.getvalue())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(common.ROOT, "tests", "fixtures", "shelves-hard"))
    ap.add_argument("--only", help="compose only this frame (expected.json is not written)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    load_photos()
    t0 = time.time()
    images = {}
    for fr in FRAMES:
        if args.only and fr[0] != args.only:
            continue
        cat = Catalogue()
        t1 = time.time()
        fname, info, size = compose(fr, args.out, cat)
        images[fname] = info
        print(f"{fname:22s} {info['condition']:12s} {info['width']}x{info['height']} "
              f"count {info['count']:4d} widths {info['product_width_px']} "
              f"{size / 1024:.0f} KB {time.time() - t1:.1f} s", flush=True)
    if not args.only:
        common.write_json(os.path.join(args.out, "expected.json"), {
            "about": "Harder real-photo shelf frames at camera resolutions: held-out photos "
                     "as product faces; YOLO labels (class 0 = product, the box of its "
                     "visible pixels). Made by models/train/compose_hard_shelves.py.",
            "photos": common.HELD_OUT, "images": images})
        print(f"total {sum(v['count'] for v in images.values())} products, "
              f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
