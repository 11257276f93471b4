"""Convert MediaPipe's SSD-MobileNetV2 (Open Images v4, 24 classes) to ONNX.

The npm package @mediapipe/objectron ships the detector inside a packed asset
file; its loader script gives each member's byte range. We slice the TFLite
model and the label map out, convert with tflite2onnx (fp16 weights are
widened to fp32, NCHW input) and write the manifest shelfwatch reads.
"""
import argparse
import hashlib
import json
import os
import re
import tempfile

import onnx
import tflite2onnx

MODEL = "ssd_mobilenetv2_oidv4"
TFLITE_MEMBER = "object_detection_ssd_mobilenetv2_oidv4_fp16.tflite"
LABELS_MEMBER = "object_detection_oidv4_labelmap.txt"


def members(loader_js):
    text = open(loader_js, encoding="utf-8").read()
    found = {}
    for m in re.finditer(r'\{"filename": "([^"]+)", "start": (\d+), "end": (\d+)', text):
        found[os.path.basename(m.group(1))] = (int(m.group(2)), int(m.group(3)))
    for name in (TFLITE_MEMBER, LABELS_MEMBER):
        if name not in found:
            raise SystemExit(f"{loader_js}: no member {name}")
    return found


MANIFEST = """\
# Model manifest: everything shelfwatch needs to run this model correctly.
# Written by models/convert_ssd.py; do not edit by hand (models/build.sh rebuilds it).
schema = 1
name = "{name}"
description = "SSD-MobileNetV2 trained on a 24-class subset of Open Images v4 (MediaPipe Objectron's box detector)"
file = "{name}.onnx"
sha256 = "{sha}"
labels = "{name}.labels"
licence = "Apache-2.0"

[source]
package = "npm:@mediapipe/objectron"
version = "0.4.1675468480"
member = "objectron_solution_packed_assets.data:{member}[{start}..{end}]"
converter = "tflite2onnx 0.4.1 (fp16 weights widened to fp32, opset 11, NCHW)"

[input]
name = "normalized_input_image_tensor"
width = 300
height = 300
layout = "nchw"
colour = "rgb"
resize = "stretch"
# value = (pixel - mean) / std, per channel: maps 0..255 to -1..1
mean = [127.5, 127.5, 127.5]
std = [127.5, 127.5, 127.5]

[decoder]
kind = "ssd"
boxes-output = "raw_outputs/box_encodings"
scores-output = "raw_outputs/class_predictions"
# Class logits go through a sigmoid; class 0 is the background and never reported.
background-class = 0
# Encodings are (ty, tx, th, tw) divided by these scales.
box-scales = [10.0, 10.0, 5.0, 5.0]

[decoder.anchors]
# The standard 6-layer SSD anchor set (TensorFlow object detection API, MediaPipe SsdAnchorsCalculator).
input-size = 300
min-scale = 0.2
max-scale = 0.95
strides = [16, 32, 64, 128, 256, 512]
aspect-ratios = [1.0, 2.0, 0.5, 3.0, 0.3333]
reduce-boxes-in-lowest-layer = true
interpolated-scale-aspect-ratio = 1.0
count = 1917

[postprocess]
score-threshold = 0.4
iou-threshold = 0.45
max-detections = 100
"""


def canonicalise(path):
    """tflite2onnx emits initializers and value_info in set order, which changes from run
    to run with Python's hash seed. Sorting them by name makes the file reproducible
    without changing the graph (node order, which is topological, is already stable)."""
    model = onnx.load(path)
    for field in (model.graph.initializer, model.graph.value_info):
        items = sorted(field, key=lambda t: t.name)
        del field[:]
        field.extend(items)
    onnx.save(model, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--packed", required=True)
    ap.add_argument("--loader", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    spans = members(args.loader)
    blob = open(args.packed, "rb").read()
    ls, le = spans[LABELS_MEMBER]
    ts, te = spans[TFLITE_MEMBER]
    labels = blob[ls:le]
    with open(os.path.join(args.out, f"{MODEL}.labels"), "wb") as f:
        f.write(labels)

    onnx_path = os.path.join(args.out, f"{MODEL}.onnx")
    if os.path.exists(onnx_path):
        os.remove(onnx_path)
    with tempfile.TemporaryDirectory() as tmp:
        tfl = os.path.join(tmp, "model.tflite")
        with open(tfl, "wb") as f:
            f.write(blob[ts:te])
        tflite2onnx.convert(tfl, onnx_path)
    canonicalise(onnx_path)

    sha = hashlib.sha256(open(onnx_path, "rb").read()).hexdigest()
    with open(os.path.join(args.out, f"{MODEL}.toml"), "w", encoding="utf-8") as f:
        f.write(MANIFEST.format(name=MODEL, sha=sha, member=TFLITE_MEMBER, start=ts, end=te))
    print(json.dumps({"model": onnx_path, "sha256": sha, "labels": labels.count(b"\n")}))


if __name__ == "__main__":
    main()
