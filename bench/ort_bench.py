"""onnxruntime inference timing for one model, the counterpart of `shelfwatch bench`.

    ort_bench.py --model models/ssd_mobilenetv2_oidv4.onnx --threads 1 \
        --warmup 5 --runs 50 --json tests/fixtures/scenes/frames/*.jpg

The model's manifest is the .toml next to the .onnx (the one whose `file` names it).
Every image is decoded and preprocessed once, before timing, as shelfwatch does it
(Pillow bilinear stretch to the input size, vertical pass first, mean/std, NCHW; see
tests/fixtures/scenes/detect.py); then `warmup` untimed and `runs` timed calls of
`session.run`, cycling through the images. Only `session.run` is timed. Percentiles are
nearest-rank, as in shelfwatch's bench. Session options: intra-op threads N, inter-op 1,
all graph optimisations, sequential execution.
"""
import argparse
import json
import math
import os
import platform
import sys
import time
import tomllib

import numpy as np
import onnxruntime as ort
from PIL import Image


def manifest_for(onnx_path):
    """(manifest dict, manifest path) of the .toml next to an .onnx that names it."""
    onnx_path = os.path.abspath(onnx_path)
    mdir, name = os.path.split(onnx_path)
    same_stem = os.path.splitext(onnx_path)[0] + ".toml"
    candidates = [same_stem] + sorted(
        os.path.join(mdir, f) for f in os.listdir(mdir) if f.endswith(".toml") and f != os.path.basename(same_stem)
    )
    for path in candidates:
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            man = tomllib.load(f)
        if man.get("file") == name:
            return man, path
    sys.exit(f"ort_bench: no manifest (.toml) next to {onnx_path} names it as its `file`")


def session(onnx_path, threads):
    """An onnxruntime CPU session with the benchmark's options."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])


def check_io(sess, man, man_path):
    """Stops with a clear message when the manifest's tensor names are not the model's."""
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    problems = []
    if man["input"]["name"] not in inputs:
        problems.append(f"input.name = {man['input']['name']!r}, the model's inputs are {inputs}")
    for key in ("boxes-output", "scores-output"):
        name = man.get("decoder", {}).get(key)
        if name is not None and name not in outputs:
            problems.append(f"decoder.{key} = {name!r}, the model's outputs are {outputs}")
    if problems:
        sys.exit(f"{os.path.relpath(man_path)} does not match {man['file']}: " + "; ".join(problems))


def preprocess(img, man):
    """The model's input tensor for a decoded image, as shelfwatch computes it."""
    inp = man["input"]
    if inp.get("resize", "stretch") != "stretch" or inp.get("colour", "rgb") != "rgb":
        sys.exit("ort_bench: only resize = \"stretch\" and colour = \"rgb\" manifests are supported")
    img = img.convert("RGB")
    w, _ = img.size
    # Vertical pass first, then horizontal, each rounding to 8 bits: the order of
    # shelfwatch's resizer (tests/fixtures/make_reference.py explains it).
    tall = img.resize((w, inp["height"]), Image.BILINEAR, reducing_gap=None)
    small = tall.resize((inp["width"], inp["height"]), Image.BILINEAR, reducing_gap=None)
    mean = np.array(inp["mean"], dtype=np.float32)
    std = np.array(inp["std"], dtype=np.float32)
    x = (np.asarray(small, dtype=np.float32) - mean) / std
    layout = inp.get("layout", "nchw")
    if layout == "nchw":
        x = x.transpose(2, 0, 1)
    elif layout != "nhwc":
        sys.exit(f"ort_bench: unknown layout {layout!r}")
    return np.ascontiguousarray(x[None])


def stats(samples):
    """p50/p90/p99/mean of a list of milliseconds (nearest-rank percentiles)."""
    s = sorted(samples)
    pct = lambda p: s[min(max(math.ceil(p / 100 * len(s)), 1), len(s)) - 1]
    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": sum(s) / len(s)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the .onnx file (its manifest .toml beside it)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    ap.add_argument("--runs", type=int, default=50, help="timed runs, cycling through the images")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()
    if a.runs < 1 or a.threads < 1 or a.warmup < 0:
        ap.error("--runs and --threads must be at least 1, --warmup at least 0")

    man, man_path = manifest_for(a.model)
    inputs = [preprocess(Image.open(p), man) for p in a.images]
    t = time.perf_counter()
    sess = session(os.path.abspath(a.model), a.threads)
    session_ms = (time.perf_counter() - t) * 1e3
    check_io(sess, man, man_path)
    in_name = man["input"]["name"]
    outputs = [o.name for o in sess.get_outputs()]

    for i in range(a.warmup):
        sess.run(outputs, {in_name: inputs[i % len(inputs)]})
    times = []
    for i in range(a.runs):
        x = inputs[i % len(inputs)]
        t = time.perf_counter()
        sess.run(outputs, {in_name: x})
        times.append((time.perf_counter() - t) * 1e3)

    inference = stats(times)
    report = {
        "engine": "onnxruntime",
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "model": man["name"],
        "manifest": os.path.relpath(man_path),
        "onnx": os.path.relpath(os.path.abspath(a.model)),
        "input_size": [man["input"]["width"], man["input"]["height"]],
        "images": len(inputs),
        "threads": a.threads,
        "warmup": a.warmup,
        "runs": a.runs,
        "session_ms": session_ms,
        "stages_ms": {"inference": inference},
        "inferences_per_second": 1e3 / inference["mean"],
    }
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"onnxruntime {ort.__version__}: model {report['model']}, {a.threads} thread(s), "
            f"{len(inputs)} images, {a.runs} runs after {a.warmup} warm-up; session {session_ms:.1f} ms"
        )
        print(f"{'inference (ms)':<16} p50 {inference['p50']:.2f}  p90 {inference['p90']:.2f}  "
              f"p99 {inference['p99']:.2f}  mean {inference['mean']:.2f}")


if __name__ == "__main__":
    main()
