"""Quantise the SSD detector to int8 in the form tract runs on its int8 kernels.

Why this form (measured with `shelfwatch bench --profile`, tract 0.23.9; see
models/README.md):
- QOperator, not QDQ: tract runs a QDQ graph's convolutions in float and pays for the
  (de)quantisation on top; QLinearConv maps to its int8 matrix kernels.
- Every convolution is quantised, the depthwise ones included. tract itself has no int8
  depthwise kernel (it would run one as im2col + a matrix product + an unfused
  requantisation, four times slower than its float one), but shelfwatch replaces those
  layers by its own (src/vision/kernels/quant.rs: 8-bit in, 8-bit out, requantisation
  fused), so the model has no float island around them. Run with `--kernels tract`,
  this model is slow by design: it is meant for shelfwatch's kernels.
- Clip (ReLU6) after a quantised convolution is folded into the output range.
- Per-tensor scales and unsigned activations: tract's per-channel requantisation runs
  as separate element-wise passes (168 ms vs 40 ms per frame).
- onnxruntime's contrib ops (QLinearAdd, QLinearConcat, ...) are not used: tract does
  not know them; residual adds stay in float.

Calibration: min/max over the four scikit-image photos and the even-numbered shelf
scenes (tests/fixtures), preprocessed exactly as shelfwatch does (stretch, bilinear,
(x - 127.5) / 127.5). Deterministic: same inputs, same bytes.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import tempfile

import numpy as np
import onnx
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from PIL import Image

SRC = "ssd_mobilenetv2_oidv4"
DST = "ssd_mobilenetv2_oidv4_int8"


def calibration_images(root):
    photos = sorted(glob.glob(os.path.join(root, "tests/fixtures/photos/*")))
    frames = sorted(glob.glob(os.path.join(root, "tests/fixtures/scenes/frames/*.jpg")))
    return photos + frames[::2]


class Frames(CalibrationDataReader):
    def __init__(self, paths, input_name):
        self.paths = iter(paths)
        self.input_name = input_name

    def get_next(self):
        path = next(self.paths, None)
        if path is None:
            return None
        rgb = Image.open(path).convert("RGB").resize((300, 300), Image.BILINEAR)
        x = (np.asarray(rgb, np.float32) - 127.5) / 127.5
        return {self.input_name: x.transpose(2, 0, 1)[None]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, help="directory with the fp32 model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", required=True, help="the source tree (for calibration images)")
    args = ap.parse_args()

    fp32 = onnx.load(os.path.join(args.models, f"{SRC}.onnx"))
    input_name = fp32.graph.input[0].name
    # onnxruntime's quantiser needs opset >= 13 for per-axis (De)QuantizeLinear attributes.
    fp32 = version_converter.convert_version(fp32, 13)
    images = calibration_images(args.root)
    out_path = os.path.join(args.out, f"{DST}.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "fp32-opset13.onnx")
        onnx.save(fp32, src)
        quantize_static(
            src,
            out_path,
            Frames(images, input_name),
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=["Conv", "Clip"],
            per_channel=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    model = onnx.load(out_path)
    ops = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1

    sha = hashlib.sha256(open(out_path, "rb").read()).hexdigest()
    manifest = open(os.path.join(args.models, f"{SRC}.toml"), encoding="utf-8").read()
    manifest = manifest.replace(
        "# Written by models/convert_ssd.py;", "# Written by models/quantize_ssd.py;"
    )
    manifest = re.sub(r'(?m)^name = .*$', f'name = "{DST}"', manifest, count=1)
    manifest = re.sub(
        r'(?m)^description = "(.*)"$',
        lambda m: f'description = "{m.group(1)}, int8 (every convolution; residual additions in float)"',
        manifest,
    )
    manifest = re.sub(r'(?m)^file = .*$', f'file = "{DST}.onnx"', manifest)
    manifest = re.sub(r'(?m)^sha256 = .*$', f'sha256 = "{sha}"', manifest)
    manifest = re.sub(
        r'(?m)^converter = "(.*)"$',
        lambda m: (
            f'converter = "{m.group(1)}; onnxruntime 1.20.1 quantize_static: QOperator, '
            'per-tensor, u8 activations, s8 weights, min/max calibration (models/quantize_ssd.py)"'
        ),
        manifest,
    )
    with open(os.path.join(args.out, f"{DST}.toml"), "w", encoding="utf-8") as f:
        f.write(manifest)
    print(json.dumps({"model": out_path, "sha256": sha, "calibration-images": len(images),
                      "ops": ops}))


if __name__ == "__main__":
    main()
