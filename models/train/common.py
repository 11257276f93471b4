"""Shared constants and helpers of the shelf-counter training pipeline (models/train/).

Everything here is deterministic: paths, the texture split, the cut backbone, the
product-width range and [scale] band, and the heat-map decoder (identical to shelfwatch's Rust decoder,
src/vision/outputs.rs HeatmapDecoder + src/vision/nms.rs).
"""
import hashlib
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.environ.get("SHELF_TRAIN_OUT", os.path.join(HERE, "out"))
BACKBONE = os.path.join(ROOT, "models", "efficientnet_lite0.onnx")
BACKBONE_SHA256 = "93ad2ed2c410c5bf849855f08e68477c46fcdbc27a2c6916a425f40334006756"

# Model input: 384x288 (4:3), stretched like the SSD. See README.md for why.
INPUT_W = 384
INPUT_H = 288
# The heat map's stride: 8 (the bundled model), or 4 with SHELF_HEAT_STRIDE=4 (one cell
# per 4 x 4 model pixels, so two product centres 8 px apart are still two peaks of the
# 3x3 max-pool; measured and not the default: README.md, "A stride-4 heat map").
STRIDE = int(os.environ.get("SHELF_HEAT_STRIDE", "8"))
if STRIDE not in (4, 8):
    raise SystemExit(f"SHELF_HEAT_STRIDE={STRIDE}: the head is built for stride 8 or 4")
GRID_W = INPUT_W // STRIDE
GRID_H = INPUT_H // STRIDE
MEAN = 127.0
STD = 128.0
HEAD_CH = 64     # the stride-8 trunk of the head
HEAD4_CH = 32    # the stride-4 part, when there is one (4x the cells: fewer channels)
# The generator's and the evaluation's width unit: 8 model pixels (the first models'
# heat-map cell), kept so that training data and the per-width tables do not change
# with the heat map's stride.
WIDTH_UNIT = 8
# The Rust decoder caps log sizes at 3 + ln(8 / stride) before exp: boxes of at most
# e^3 x 8 = 160.7 model pixels, whatever the stride.
def log_size_cap(stride):
    return np.float32(3.0) + np.log(np.float32(8.0) / np.float32(stride))


LOG_SIZE_CAP = float(log_size_cap(STRIDE))
# The generator keeps every product's width and height below this many width units, so
# no training target is ever clipped by the cap (20.1 units).
MAX_SIZE_UNITS = 19.0

# Product widths in width units (8 model pixels). The generator draws each image's base
# width from WIDTH_UNITS_RANGE (log-uniform, most images in WIDTH_UNITS_BULK).
WIDTH_UNITS_RANGE = (2.0, 16.0)
WIDTH_UNITS_BULK = (3.0, 10.0)
# The manifest's [scale] section tells shelfwatch's scale rule the band where the
# measured held-out recall is reliably high (README.md's per-width table) and where to
# aim the median product (the band's geometric middle), in model pixels here and in
# heat-map cells in the manifest.
SCALE_MIN_WIDTH_PX = 20.0
SCALE_MAX_WIDTH_PX = 80.0
SCALE_TARGET_WIDTH_PX = 40.0
SCALE_MIN_WIDTH_CELLS = SCALE_MIN_WIDTH_PX / STRIDE
SCALE_MAX_WIDTH_CELLS = SCALE_MAX_WIDTH_PX / STRIDE
SCALE_TARGET_WIDTH_CELLS = SCALE_TARGET_WIDTH_PX / STRIDE

# Feature taps of EfficientNet-Lite0 (tensor names of models/efficientnet_lite0.onnx):
# the last block of stage 2 (24 ch, stride 4; only for a stride-4 heat map), of stage 3
# (40 ch, stride 8), of stage 5 (112 ch, stride 16) and of stage 7 (320 ch, stride 32).
# Blocks per stage: 1, 2, 2, 3, 3, 4, 1. The last tap is the fine-tuned blocks' output.
TAPS = [("block2/add", 24, 4), ("block4/add", 40, 8), ("block10/add", 112, 16),
        ("block15/project/conv", 320, 32)][(0 if STRIDE == 4 else 1):]

PRODUCT_TYPES = ["box", "lying_box", "bottle", "can", "pouch"]

# --- Texture photos, split by source photo --------------------------------------------
SKIMAGE_DATA = None


def skimage_data_dir():
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data")


PRODUCTS = os.path.join(ROOT, "tests", "fixtures", "products")
PHOTOS = os.path.join(ROOT, "tests", "fixtures", "photos")

# Held-out sources: never used to texture training or validation images. They texture
# the held-out synthetic test shelves, and they are the only photos pasted into the
# real-photo composites in tests/fixtures/shelves/ (compose_shelves.py).
HELD_OUT = [
    "products/camera.jpg", "products/guitar.jpg", "products/fighter_fish.jpg",
    "products/puppy.jpg", "products/flower.jpg", "products/grace_hopper.jpg",
    "products/github_mug.jpg", "photos/coffee.png", "photos/chelsea.png",
]
# Training sources (skimage/ = the scikit-image 0.24.0 wheel's skimage/data/; the
# fixtures' photos/ are byte-identical copies of four of them, listed once).
TRAIN = [
    "products/black_cat.jpg", "products/gold_fish.jpg", "products/quokka.jpg",
    "products/china.jpg", "products/city.jpg", "products/wall.jpg", "products/tent.jpg",
    "products/motorcycle.jpg", "photos/astronaut.png", "photos/rocket.jpg",
    "skimage/brick.png", "skimage/camera.png", "skimage/coins.png", "skimage/color.png",
    "skimage/grass.png", "skimage/gravel.png", "skimage/hubble_deep_field.jpg",
    "skimage/ihc.png", "skimage/logo.png", "skimage/moon.png", "skimage/page.png",
    "skimage/retina.jpg", "skimage/text.png", "skimage/cell.png",
    "skimage/clock_motion.png", "skimage/chessboard_RGB.png",
    # added for issue #16 (scikit-image 0.24.0 wheel, skimage/data/; licences as stated
    # in skimage/data/_fetchers.py: horse CC0 (openclipart), microaneurysms CC0, the
    # Shepp-Logan phantom and the grey chessboard are generated images, BSD-3 with the
    # package)
    "skimage/horse.png", "skimage/microaneurysms.png", "skimage/phantom.png",
    "skimage/chessboard_GRAY.png",
]


def source_path(src):
    kind, name = src.split("/", 1)
    if kind == "products":
        return os.path.join(PRODUCTS, name)
    if kind == "photos":
        return os.path.join(PHOTOS, name)
    if kind == "skimage":
        return os.path.join(skimage_data_dir(), name)
    raise ValueError(src)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


# --- Preprocessing, as shelfwatch does it ---------------------------------------------

def load_input(path):
    """An image file -> [1, 3, H, W] float32, stretched to the model input with Pillow's
    BILINEAR (what shelfwatch's resize reproduces), RGB, (pixel - 127) / 128."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (INPUT_W, INPUT_H):
            im = im.resize((INPUT_W, INPUT_H), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32)
    return ((a - MEAN) / STD).transpose(2, 0, 1)[None].copy()


# --- The cut backbone ------------------------------------------------------------------

def cut_backbone(width=INPUT_W, height=INPUT_H):
    """models/efficientnet_lite0.onnx with a fixed input size and the three feature taps
    as its outputs (pooling, classifier and embedding removed). Its stride-2 pads are
    explicit and the same for every even size, so any size with even feature maps down
    to stride 16 gives TensorFlow SAME padding."""
    import onnx
    from onnx import TensorProto, helper

    if file_sha256(BACKBONE) != BACKBONE_SHA256:
        raise SystemExit(f"{BACKBONE}: sha256 differs from the committed model")
    m = onnx.load(BACKBONE)
    g = m.graph
    producers = {o: n for n in g.node for o in n.output}
    for name, _, _ in TAPS:
        if name not in producers:
            raise SystemExit(f"tensor {name} not in {BACKBONE}")
    # Keep only what the taps need.
    need, stack = set(), [t for t, _, _ in TAPS]
    while stack:
        t = stack.pop()
        n = producers.get(t)
        if n is None or id(n) in need:
            continue
        need.add(id(n))
        stack.extend(n.input)
    nodes = [n for n in g.node if id(n) in need]
    used = {i for n in nodes for i in n.input}
    inits = [i for i in g.initializer if i.name in used]
    outs = []
    for name, ch, s in TAPS:
        outs.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, [1, ch, -(-height // s), -(-width // s)]))
    graph = helper.make_graph(
        nodes, "efficientnet_lite0_taps",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, height, width])],
        outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(m.opset_import))
    model.ir_version = m.ir_version
    return model


def ort_session(model_bytes, threads=1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


# --- Helpers --------------------------------------------------------------------------

def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --- Decoding, identical to shelfwatch's HeatmapDecoder + nms ---------------------------

def maxpool3(heat):
    """3x3 max-pool, stride 1, padding 1 (padding never wins), of [H, W]."""
    h, w = heat.shape
    p = np.full((h + 2, w + 2), -np.inf, np.float32)
    p[1:-1, 1:-1] = heat
    m = np.full((h, w), -np.inf, np.float32)
    for i in range(3):
        for j in range(3):
            m = np.maximum(m, p[i:i + h, j:j + w])
    return m


def decode(heat, boxes, peak=None, threshold=0.4, stride=STRIDE, fraction=1.0,
           iou_threshold=0.45, max_detections=100, heat_is_logit=False):
    """heat [H, W], boxes [4, H, W] (dx, dy, log w, log h in cells), peak [H, W] or None.
    Returns a list of (score, cx, cy, w, h) in model-input pixels, as shelfwatch finds
    them: peaks where heat >= its 3x3 max, score >= threshold, size-aware suppression
    (a weaker peak whose centre lies inside `fraction` of a stronger peak's box is
    dropped), then greedy NMS (IoU > iou_threshold) and at most max_detections."""
    heat = heat.astype(np.float32)
    boxes = boxes.astype(np.float32)
    if peak is None:
        peak = maxpool3(heat)
    gh, gw = heat.shape
    ys, xs = np.nonzero(heat >= peak)  # row-major, like the Rust loops
    cap = np.float32(log_size_cap(stride))
    peaks = []
    for y, x in zip(ys.tolist(), xs.tolist()):
        v = np.float32(heat[y, x])
        score = np.float32(1.0) / (np.float32(1.0) + np.exp(-v)) if heat_is_logit else v
        if score < np.float32(threshold):
            continue
        st = np.float32(stride)
        cx = (np.float32(x) + np.float32(0.5) + boxes[0, y, x]) * st
        cy = (np.float32(y) + np.float32(0.5) + boxes[1, y, x]) * st
        w = np.exp(np.minimum(boxes[2, y, x], cap)) * st
        h = np.exp(np.minimum(boxes[3, y, x], cap)) * st
        peaks.append((float(score), float(cx), float(cy), float(w), float(h)))
    peaks.sort(key=lambda p: -p[0])  # stable, like Rust's sort_by
    f = fraction / 2.0
    kept = []
    for p in peaks:
        if not any(abs(p[1] - k[1]) <= f * k[3] and abs(p[2] - k[2]) <= f * k[4]
                   for k in kept):
            kept.append(p)
    # shelfwatch then runs its class-aware greedy NMS on the (normalised) boxes.
    final = []
    for p in kept:
        if len(final) == max_detections:
            break
        if not any(iou(p, k) > iou_threshold for k in final):
            final.append(p)
    return final


def iou(a, b):
    ax1, ay1, ax2, ay2 = a[1] - a[3] / 2, a[2] - a[4] / 2, a[1] + a[3] / 2, a[2] + a[4] / 2
    bx1, by1, bx2, by2 = b[1] - b[3] / 2, b[2] - b[4] / 2, b[1] + b[3] / 2, b[2] + b[4] / 2
    iw = max(min(ax2, bx2) - max(ax1, bx1), 0.0)
    ih = max(min(ay2, by2) - max(ay1, by1), 0.0)
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0
