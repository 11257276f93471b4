"""A straightforward Python pipeline doing the same work as the shelfwatch daemon.

    py_pipeline.py --model models/ssd_mobilenetv2_oidv4.onnx --threads 1 --port 1883 FRAMES...

For each frame file, in order: read and decode the JPEG (Pillow), RGB, stretch to the
model input (Pillow bilinear), normalise (numpy), onnxruntime (N intra-op threads), SSD
decoding (anchors, sigmoid) and class-aware NMS, count the detections per zone (box
bottom-centre in the zone polygon; occluders such as Person are not counted and mark
the zones they overlap as occluded), and publish the frame's counts of each zone as JSON
to `pybench/<zone>/count` (QoS 1) on the MQTT broker at 127.0.0.1:PORT. At the end it
waits until the broker has acknowledged every message and prints one JSON object:
frames, wall seconds, frames/s, peak RSS, model load time and the time from process
start to the first frame's counts.

Preprocessing, decoding and NMS are tests/fixtures/scenes/detect.py's (the reference
pipeline shelfwatch's fidelity test is checked against), run here with an N-thread
session. The zones are examples/demo.toml's: top half and bottom half of the frame.

`--compare-rust DETECT.jsonl` (the output of `shelfwatch detect` on the same frames)
checks instead that both pipelines give the same counts per zone on every frame, and
exits 1 if not. Without `--port` nothing is published.

Process start is the launch time in $SHELFWATCH_BENCH_T0 (Unix seconds, as bash's
$EPOCHREALTIME gives it) when set, else the kernel's start time of this process (in
clock ticks, 10 ms).
"""
import time

_T_SCRIPT = time.time()  # the interpreter is up

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures", "scenes"))
sys.path.insert(0, HERE)

import detect  # noqa: E402  (tests/fixtures/scenes/detect.py)
import ort_bench  # noqa: E402
from PIL import Image  # noqa: E402

_T_IMPORTED = time.time()  # numpy, onnxruntime, Pillow loaded (paho-mqtt comes later)

# examples/demo.toml's zones, normalised.
ZONES = [
    ("top-shelf", [(0.0, 0.0), (1.0, 0.0), (1.0, 0.5), (0.0, 0.5)]),
    ("bottom-shelf", [(0.0, 0.5), (1.0, 0.5), (1.0, 1.0), (0.0, 1.0)]),
]
OCCLUDERS = {"Person"}
TOPIC = "pybench/{zone}/count"


def process_start():
    """Launch time of this process, Unix seconds."""
    t0 = os.environ.get("SHELFWATCH_BENCH_T0")
    if t0:
        return float(t0.replace(",", "."))
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return btime + start_ticks / os.sysconf("SC_CLK_TCK")


class Detector(detect.Detector):
    """detect.Detector (preprocessing, decoding, NMS) on a session with N threads."""

    def __init__(self, onnx_path, threads):
        man, man_path = ort_bench.manifest_for(onnx_path)
        self.name = man["name"]
        mdir = os.path.dirname(os.path.abspath(onnx_path))
        with open(os.path.join(mdir, man["labels"]), encoding="utf-8") as f:
            self.labels = f.read().splitlines()
        self.sess = ort_bench.session(os.path.abspath(onnx_path), threads)
        ort_bench.check_io(self.sess, man, man_path)
        self.dec = man["decoder"]
        if self.dec["kind"] != "ssd":
            sys.exit(f"py_pipeline: only SSD models (decoder.kind = \"ssd\"), not {self.dec['kind']!r}")
        self.anc = detect.make_reference.anchors(self.dec["anchors"])
        assert len(self.anc) == self.dec["anchors"]["count"], len(self.anc)
        self.inp = man["input"]
        self.post = man["postprocess"]
        self.threshold = self.post["score-threshold"]


def contains(poly, x, y):
    """Even-odd rule; left and top edges inside, right and bottom edges outside."""
    inside = False
    j = len(poly) - 1
    for i in range(len(poly)):
        (xi, yi), (xj, yj) = poly[i], poly[j]
        if (yi > y) != (yj > y) and x < xi + (y - yi) * (xj - xi) / (yj - yi):
            inside = not inside
        j = i
    return inside


def overlap_area(poly, box):
    """Area of the polygon clipped to the box (Sutherland-Hodgman, then the shoelace)."""
    x1, y1, x2, y2 = box
    pts = list(poly)
    for axis, bound, keep_above in ((0, x1, True), (0, x2, False), (1, y1, True), (1, y2, False)):
        inside = lambda p, axis=axis, bound=bound, keep_above=keep_above: p[axis] >= bound if keep_above else p[axis] <= bound
        out = []
        for k in range(len(pts)):
            cur, prev = pts[k], pts[k - 1]
            if inside(cur) != inside(prev):
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(tuple(prev[d] + t * (cur[d] - prev[d]) for d in range(2)))
            if inside(cur):
                out.append(cur)
        pts = out
        if not pts:
            return 0.0
    return abs(sum(pts[k - 1][0] * pts[k][1] - pts[k][0] * pts[k - 1][1] for k in range(len(pts)))) / 2


def zone_counts(detections, width, height):
    """{zone: {"counts": {label: n}, "occluded": bool}} for [(label, (x1, y1, x2, y2))]."""
    out = {}
    for name, norm in ZONES:
        poly = [(x * width, y * height) for x, y in norm]
        counts = {}
        occluded = False
        for label, (x1, y1, x2, y2) in detections:
            if label in OCCLUDERS:
                occluded = occluded or bool(overlap_area(poly, (x1, y1, x2, y2)) > 0)
            elif contains(poly, (x1 + x2) / 2, y2 - 1e-3):  # bottom-centre, as shelfwatch
                counts[label] = counts.get(label, 0) + 1
        out[name] = {"counts": counts, "occluded": occluded}
    return out


def compare_rust(detect_jsonl, ours):
    """Compares our per-frame zone counts with those of `shelfwatch detect` output."""
    theirs = []
    with open(detect_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                dets = [
                    (x["label"], x["score"], (x["box"]["x1"], x["box"]["y1"], x["box"]["x2"], x["box"]["y2"]))
                    for x in d["detections"]
                ]
                zc = zone_counts([(label, box) for label, _, box in dets], d["width"], d["height"])
                theirs.append((d["file"], zc, dets))
    problems = []
    if len(theirs) != len(ours):
        problems.append(f"{len(ours)} frames here, {len(theirs)} in {detect_jsonl}")
    max_box = max_score = 0.0
    for (file, zc, dets), (our_file, our_zc, our_dets) in zip(theirs, ours):
        if os.path.basename(file) != os.path.basename(our_file):
            problems.append(f"frame order differs: {file} vs {our_file}")
        elif zc != our_zc:
            problems.append(f"{our_file}: shelfwatch {json.dumps(zc)} vs python {json.dumps(our_zc)}")
        elif sorted(d[0] for d in dets) == sorted(d[0] for d in our_dets):
            # Each of shelfwatch's boxes against the nearest of ours with its label.
            for label, score, box in dets:
                diff, score_diff = min(
                    (max(abs(a - b) for a, b in zip(box, ob)), abs(score - os_))
                    for ol, os_, ob in our_dets if ol == label
                )
                max_box = max(max_box, diff)
                max_score = max(max_score, score_diff)
    return {
        "frames": len(ours),
        "same_zone_counts": not problems,
        "max_box_difference_px": round(max_box, 3),
        "max_score_difference": round(max_score, 6),
        "problems": problems,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the .onnx file (its manifest .toml beside it)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--port", type=int, help="MQTT broker port on 127.0.0.1; none: publish nothing")
    ap.add_argument("--counts-out", help="write each frame's zone counts here (JSON lines)")
    ap.add_argument("--compare-rust", metavar="DETECT_JSONL", help="check the counts against `shelfwatch detect` output")
    ap.add_argument("frames", nargs="+")
    a = ap.parse_args()
    t_start = process_start()

    client = None
    if a.port is not None:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pybench-{os.getpid()}", protocol=mqtt.MQTTv311)
        client.connect("127.0.0.1", a.port, keepalive=30)
        client.loop_start()

    t = time.perf_counter()
    detector = Detector(a.model, a.threads)
    model_load_ms = (time.perf_counter() - t) * 1e3

    t_first = None
    pending = []
    per_frame = []
    t_loop = time.perf_counter()
    for i, path in enumerate(a.frames):
        with Image.open(path) as img:
            img = img.convert("RGB")
        w, h = img.size
        dets = [(label, score, tuple(float(v) for v in box)) for score, _, label, box in detector(img)]
        zones = zone_counts([(label, box) for label, _, box in dets], w, h)
        if t_first is None:
            t_first = time.time()
        if client is not None:
            for zone, z in zones.items():
                payload = json.dumps({"frame": i, "file": os.path.basename(path), **z})
                pending.append(client.publish(TOPIC.format(zone=zone), payload, qos=1))
        if a.counts_out or a.compare_rust:
            per_frame.append((path, zones, dets))
    for info in pending:
        info.wait_for_publish(timeout=30)
        if not info.is_published():
            sys.exit(f"py_pipeline: message {info.mid} not acknowledged by the broker")
    loop_s = time.perf_counter() - t_loop
    if client is not None:
        client.disconnect()
        client.loop_stop()
    wall_s = time.time() - t_start

    if a.counts_out:
        with open(a.counts_out, "w", encoding="utf-8") as f:
            for path, zones, _ in per_frame:
                f.write(json.dumps({"file": path, "zones": zones}) + "\n")
    if a.compare_rust:
        result = compare_rust(a.compare_rust, per_frame)
        print(json.dumps(result, indent=2))
        sys.exit(0 if result["same_zone_counts"] else 1)

    n = len(a.frames)
    print(json.dumps({
        "engine": "python",
        "onnxruntime": detect.ort.__version__,
        "model": detector.name,
        "onnx": os.path.relpath(os.path.abspath(a.model)),
        "threads": a.threads,
        "frames": n,
        "wall_s": wall_s,
        "frames_per_second": n / wall_s,
        "loop_s": loop_s,
        "loop_frames_per_second": n / loop_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_load_ms": model_load_ms,
        "interpreter_s": _T_SCRIPT - t_start,
        "imports_done_s": _T_IMPORTED - t_start,
        "first_detection_s": t_first - t_start,
        "messages": len(pending),
    }, indent=2))


if __name__ == "__main__":
    main()
