"""An int8 shelf counter, for measuring (not bundled: see models/README.md).

    python quantize.py [--model OUT/shelf_counter.toml] [--out OUT] [--calibration N]

Quantises the exported counter the way models/quantize_ssd.py does the SSD (the form tract
runs on its int8 kernels): onnxruntime quantize_static, QOperator, per-tensor, u8
activations, s8 weights, min/max calibration, only the dense convolutions quantised;
depthwise convolutions (the backbone's and the head's upsampling) stay in float, as do the
head's outputs (sigmoid, max-pool). Calibration: N synthetic validation shelves generated
with their own seed (never the real-photo test composites). Writes
OUT/shelf_counter_int8.{onnx,toml,labels}; then measure with

    python evaluate.py --model OUT/shelf_counter_int8.toml --yolo tests/fixtures/shelves
    shelfwatch detect --model OUT/shelf_counter_int8.toml tests/fixtures/shelves/*.jpg
"""
import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAME = "shelf_counter"
DST = "shelf_counter_int8"


class Frames(CalibrationDataReader):
    def __init__(self, paths):
        self.paths = iter(paths)

    def get_next(self):
        p = next(self.paths, None)
        return None if p is None else {"input": common.load_input(p)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(common.OUT, f"{NAME}.toml"))
    ap.add_argument("--out", default=common.OUT)
    ap.add_argument("--calibration", type=int, default=48)
    args = ap.parse_args()
    src_dir = os.path.dirname(os.path.abspath(args.model))
    fp32 = onnx.load(os.path.join(src_dir, f"{NAME}.onnx"))
    depthwise = sorted(
        n.name for n in fp32.graph.node
        if n.op_type in ("Conv", "ConvTranspose")
        and any(a.name == "group" and a.i > 1 for a in n.attribute))
    os.makedirs(args.out, exist_ok=True)
    dst = os.path.join(args.out, f"{DST}.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, os.path.join(common.HERE, "generate.py"), "--out", tmp,
                        "--split", "val", "--count", str(args.calibration), "--seed", "7",
                        "--workers", "2"], check=True, stdout=subprocess.DEVNULL)
        images = sorted(glob.glob(os.path.join(tmp, "val", "*.jpg")))
        if not images:
            raise SystemExit(f"generate.py wrote no images under {tmp}")
        quantize_static(
            os.path.join(src_dir, f"{NAME}.onnx"), dst, Frames(images),
            quant_format=QuantFormat.QOperator, op_types_to_quantize=["Conv"],
            nodes_to_exclude=depthwise, per_channel=False,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax)
    blob = open(dst, "rb").read()
    sha = hashlib.sha256(blob).hexdigest()
    manifest = open(args.model, encoding="utf-8").read()
    manifest = re.sub(r'(?m)^name = .*$', f'name = "{DST}"', manifest, count=1)
    manifest = re.sub(r'(?m)^file = .*$', f'file = "{DST}.onnx"', manifest)
    manifest = re.sub(r'(?m)^sha256 = .*$', f'sha256 = "{sha}"', manifest)
    manifest = manifest.replace("# Written by models/train/export.py",
                                "# Written by models/train/quantize.py (int8, for measuring)")
    with open(os.path.join(args.out, f"{DST}.toml"), "w", encoding="utf-8") as f:
        f.write(manifest)
    shutil.copyfile(os.path.join(src_dir, f"{NAME}.labels"),
                    os.path.join(args.out, f"{NAME}.labels"))
    ops = {}
    for n in onnx.load(dst).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(json.dumps({"model": dst, "bytes": len(blob), "sha256": sha,
                      "calibration_images": len(images), "float_depthwise": len(depthwise),
                      "ops": ops}))


if __name__ == "__main__":
    main()
