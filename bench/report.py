"""Renders bench/run.sh's results as docs/performance.md and docs/performance.svg.

    report.py [--results target/bench/results.json] [--arm target/bench/arm-insns.json]
              [--md docs/performance.md] [--svg docs/performance.svg]

Everything shown comes from the results file (and the ARM instruction counts when that
file exists), so rendering the same results again writes the same bytes. The text
between `<!-- notes -->` and `<!-- /notes -->` of an existing performance.md is kept.
"""
import argparse
import json
import os
import re
import tomllib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ENGINES = {"shelfwatch": "shelfwatch (own kernels + tract)", "tract": "shelfwatch, tract's kernels only",
           "onnxruntime": "onnxruntime"}
MODELS = {"fp32": "SSD fp32", "int8": "SSD int8", "counter": "shelf counter fp32"}
NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"
NOTES_DEFAULT = "_No analysis yet._"


def ms(v):
    return "n/a" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def ratio(v):
    return "n/a" if v is None else f"{v:.2f}x"


def div(a, b):
    return None if a is None or not b else a / b


def table(header, rows):
    """A Markdown table; columns of numbers (and ratios, n/a) right-aligned."""
    rows = [[str(c) for c in r] for r in rows]
    number = re.compile(r"[-+]?[\d.,]+x?|n/a|")
    align = ["---:" if rows and all(number.fullmatch(r[i]) for r in rows) else "---" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


class Results:
    def __init__(self, data):
        self.d = data
        self.threads = data["settings"]["inference_threads"]

    def run(self, engine, model, threads):
        for r in self.d["inference"]:
            if (r["engine"], r["model"], r["threads"]) == (engine, model, threads):
                return r["result"]
        return None

    def p(self, engine, model, threads, q="p50"):
        r = self.run(engine, model, threads)
        try:
            return r["stages_ms"]["inference"][q]
        except (TypeError, KeyError):
            return None


def targets(res):
    """[(target, measured, needed, met)] for the issue's targets."""
    e2e = res.d["e2e"]
    sw, py = e2e["shelfwatch"], e2e["python"]
    speedup = div(res.p("shelfwatch", "fp32", 1), res.p("shelfwatch", "int8", 1))
    vs_ort = div(res.p("shelfwatch", "fp32", 1), res.p("onnxruntime", "fp32", 1))
    counter_vs_ort = div(res.p("shelfwatch", "counter", 1), res.p("onnxruntime", "counter", 1))
    fps = div(sw["frames_per_second"], py["frames_per_second"])
    mem = div(sw["peak_rss_mb"], py["peak_rss_mb"])
    ok = lambda v, good: "n/a" if v is None else ("**met**" if good(v) else "**missed**")
    return [
        ("int8 at least 1.5x faster than fp32 (shelfwatch, inference p50, 1 thread)",
         f"fp32 / int8 = {ratio(speedup)}", ">= 1.50x", ok(speedup, lambda v: v >= 1.5)),
        ("SSD fp32: shelfwatch at most 1.3x onnxruntime's time (inference p50, 1 thread)",
         f"shelfwatch / onnxruntime = {ratio(vs_ort)}", "<= 1.30x", ok(vs_ort, lambda v: v <= 1.3)),
        ("shelf counter fp32: shelfwatch at most 1.3x onnxruntime's time (inference p50, 1 thread)",
         f"shelfwatch / onnxruntime = {ratio(counter_vs_ort)}", "<= 1.30x", ok(counter_vs_ort, lambda v: v <= 1.3)),
        ("end to end: frames/s at least the Python pipeline's",
         f"shelfwatch / Python = {ratio(fps)}", ">= 1.00x", ok(fps, lambda v: v >= 1.0)),
        ("end to end: peak memory at most half the Python pipeline's",
         f"shelfwatch / Python = {ratio(mem)}", "<= 0.50x", ok(mem, lambda v: v <= 0.5)),
    ]


def inference_tables(res):
    header = ["engine", "model"]
    for n in res.threads:
        t = f"{n} thread{'s' if n > 1 else ''}"
        header += [f"{t}: p50 ms", f"{t}: p90 ms"]
    header += ["load ms (1 thread)"]
    rows = []
    for model in MODELS:
        for engine in ENGINES:
            if res.run(engine, model, res.threads[0]) is None:
                continue
            row = [ENGINES[engine], MODELS[model]]
            for n in res.threads:
                row += [ms(res.p(engine, model, n)), ms(res.p(engine, model, n, "p90"))]
            r = res.run(engine, model, res.threads[0]) or {}
            row.append(ms(r.get("load_ms", r.get("session_ms"))))
            rows.append(row)
    main = table(header, rows)

    # shelfwatch's own stages, whatever its bench reports.
    stage_names = []
    for r in res.d["inference"]:
        if r["engine"] == "shelfwatch":
            for s in r["result"].get("stages_ms", {}):
                if s not in stage_names:
                    stage_names.append(s)
    rows = []
    for n in res.threads:
        for model in MODELS:
            r = res.run("shelfwatch", model, n) or {}
            st = r.get("stages_ms", {})
            rss = r.get("peak_rss_mb")
            rows.append([MODELS[model], n] + [ms(st.get(s, {}).get("p50")) for s in stage_names]
                        + [ms(r.get("frames_per_second")), "n/a" if rss is None else f"{rss:.0f}"])
    stages = table(["model", "threads"] + [f"{s} p50 ms" for s in stage_names] + ["frames/s", "peak RSS MB"], rows)
    # Heap allocations per frame and stage (the binary counts them), 1 thread.
    rows = []
    for model in MODELS:
        st = (res.run("shelfwatch", model, res.threads[0]) or {}).get("stages_ms", {})
        if any("allocations" in st.get(s, {}) for s in stage_names):
            rows.append([MODELS[model]] + [f"{st.get(s, {}).get('allocations', 0):.1f}" for s in stage_names])
    if rows:
        stages += "\n\nHeap allocations per frame, by stage (" + str(res.threads[0]) + " thread):\n\n" + table(
            ["model"] + stage_names, rows)

    rows = []
    for n in res.threads:
        rows.append([n,
                     ratio(div(res.p("shelfwatch", "fp32", n), res.p("shelfwatch", "int8", n))),
                     ratio(div(res.p("onnxruntime", "fp32", n), res.p("onnxruntime", "int8", n))),
                     ratio(div(res.p("shelfwatch", "fp32", n), res.p("onnxruntime", "fp32", n))),
                     ratio(div(res.p("shelfwatch", "int8", n), res.p("onnxruntime", "int8", n))),
                     ratio(div(res.p("tract", "fp32", n), res.p("shelfwatch", "fp32", n))),
                     ratio(div(res.p("shelfwatch", "counter", n), res.p("onnxruntime", "counter", n))),
                     ratio(div(res.p("tract", "counter", n), res.p("shelfwatch", "counter", n)))])
    ratios = table(["threads", "int8 speed-up, shelfwatch (fp32/int8)", "int8 speed-up, onnxruntime (fp32/int8)",
                    "shelfwatch / onnxruntime, SSD fp32", "shelfwatch / onnxruntime, SSD int8",
                    "own kernels' speed-up, SSD fp32 (tract only / shelfwatch)",
                    "shelfwatch / onnxruntime, counter", "own kernels' speed-up, counter"], rows)
    return main, stages, ratios


def e2e_table(res):
    sw, py = res.d["e2e"]["shelfwatch"], res.d["e2e"]["python"]
    rows = [
        ["frames", sw["frames"], py["frames"], ""],
        ["wall time s (launch to exit)", f"{sw['wall_s']:.2f}", f"{py['wall_s']:.2f}", ratio(div(sw["wall_s"], py["wall_s"]))],
        ["frames/s", f"{sw['frames_per_second']:.1f}", f"{py['frames_per_second']:.1f}",
         ratio(div(sw["frames_per_second"], py["frames_per_second"]))],
        ["peak RSS MB", f"{sw['peak_rss_mb']:.0f}", f"{py['peak_rss_mb']:.0f}", ratio(div(sw["peak_rss_mb"], py["peak_rss_mb"]))],
    ]
    return table(["", "shelfwatch daemon", "Python pipeline", "shelfwatch / Python"], rows)


def cold_table(res):
    c = res.d["cold_start"]
    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)
    rows = [
        ["shelfwatch run, first start: launch to the first frame's counts", f"{c['shelfwatch']['median_first_counts_s']:.3f}",
         fmt(c["shelfwatch"]["first_counts_s"])],
        *([["shelfwatch run, restart (model cache filled): the same", f"{c['shelfwatch_restart']['median_first_counts_s']:.3f}",
            fmt(c["shelfwatch_restart"]["first_counts_s"])]] if "shelfwatch_restart" in c else []),
        ["py_pipeline.py: launch to the first frame's counts", f"{c['python']['median_first_counts_s']:.3f}",
         fmt(c["python"]["first_counts_s"])],
        ["shelfwatch detect, one frame: launch to exit", f"{c['shelfwatch_detect_one_frame']['median_exit_s']:.3f}",
         fmt(c["shelfwatch_detect_one_frame"]["exit_s"])],
    ]
    return table(["", "median s", "runs s"], rows)


def parity_lines(res):
    out = []
    for model, p in res.d.get("parity", {}).items():
        if p.get("same_zone_counts"):
            out.append(f"- {model}: the same counts per zone on all {p['frames']} frames (largest box difference "
                       f"{p['max_box_difference_px']:.1f} px, score difference {p['max_score_difference']:.4f}).")
        else:
            out.append(f"- {model}: counts **differ** on {len(p.get('problems', []))} frame(s); first: "
                       f"`{(p.get('problems') or ['?'])[0]}`.")
    return "\n".join(out)


def has_scale_band(manifest):
    """A model with a [scale] band runs the scale rule unless bench is given an input size."""
    with open(manifest, "rb") as f:
        return "scale" in tomllib.load(f)


def input_of(r):
    size = r.get("input_size", "auto")
    if size != "auto":
        return size
    return "scale rule" if has_scale_band(r["model"]) else "the model's"


def arm_table(path):
    if not os.path.exists(path):
        return None
    rows = json.load(open(path, encoding="utf-8"))
    rows = sorted(rows, key=lambda r: (r["target"], r["cpu"], r["model"], r.get("depthwise", "")))
    header = ["target", "CPU", "model", "input", "depthwise kernels", "instructions per inference"]
    body = [[r["target"], r["cpu"], r["model"], input_of(r), r.get("depthwise", "tract"),
             f"{int(r['insns_per_inference']):,}"]
            for r in rows]
    if any("kernels" in r for r in rows):  # tract's matmul kernels, when the script lists them
        header.append("kernels")
        for row, r in zip(body, rows):
            k = r.get("kernels", [])
            row.append(", ".join(k) if isinstance(k, list) else str(k))
    return table(header, body)


def arm_ort_table(path, ort_path):
    """shelfwatch's aarch64 counts beside onnxruntime's (bench/ort-arm-insns.sh) for the same
    model and CPU: shelfwatch's own kernels at a fixed input size (a scale-rule run is not
    one inference of the model)."""
    if not (os.path.exists(path) and os.path.exists(ort_path)):
        return None
    ours = {(r["cpu"], r["model"]): r for r in json.load(open(path, encoding="utf-8"))
            if r["target"].startswith("aarch64") and r.get("depthwise", "tract") == "shelfwatch"
            and input_of(r) != "scale rule"}
    body = []
    for r in sorted(json.load(open(ort_path, encoding="utf-8")), key=lambda r: (r["cpu"], r["manifest"])):
        o = ours.get((r["cpu"], r["manifest"]))
        sw = int(o["insns_per_inference"]) if o else None
        body.append([r["cpu"], r["manifest"], f"{sw:,}" if sw else "not counted",
                     f"{int(r['insns_per_inference']):,}",
                     f"{sw / int(r['insns_per_inference']):.2f}x" if sw else ""])
    return table(["CPU", "model", "shelfwatch", f"onnxruntime {r.get('onnxruntime', '')}",
                  "shelfwatch / onnxruntime"], body)


def chart(res, path):
    plt.rcParams["svg.hashsalt"] = "shelfwatch-performance"
    plt.rcParams["svg.fonttype"] = "path"
    groups = [(m, n) for m in MODELS for n in res.threads]
    fig, ax = plt.subplots(figsize=(9.0, 4.0))
    width = 0.27
    colours = {"shelfwatch": "#3b6ea8", "tract": "#8fb3d9", "onnxruntime": "#c8742a"}
    for k, engine in enumerate(ENGINES):
        xs = [i + (k - 1) * width for i in range(len(groups))]
        vals = [res.p(engine, m, n) or 0.0 for m, n in groups]
        bars = ax.bar(xs, vals, width, label=ENGINES[engine], color=colours[engine])
        ax.bar_label(bars, labels=[ms(v) if v else "n/a" for v in vals], padding=2, fontsize=8)
    ax.set_xticks(range(len(groups)), [f"{MODELS[m]},\n{n} thread{'s' if n > 1 else ''}" for m, n in groups],
                  fontsize=7)
    ax.set_ylabel("inference p50 (ms), lower is better")
    ax.set_title("One inference: SSD-MobileNetV2 300x300, shelf counter 384x288", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    ax.margins(y=0.15)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)


def load(mach, key):
    return " ".join(mach.get(key, "?").split()[:3])


def kept_notes(md_path):
    try:
        text = open(md_path, encoding="utf-8").read()
    except FileNotFoundError:
        return NOTES_DEFAULT
    m = re.search(re.escape(NOTES_START) + r"\n(.*?)\n?" + re.escape(NOTES_END), text, re.S)
    return m.group(1).strip("\n") if m and m.group(1).strip() else NOTES_DEFAULT


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="target/bench/results.json")
    ap.add_argument("--arm", default="target/bench/arm-insns.json")
    ap.add_argument("--arm-ort", default="target/bench/ort-arm-insns.json")
    ap.add_argument("--md", default="docs/performance.md")
    ap.add_argument("--svg", default="docs/performance.svg")
    a = ap.parse_args()
    res = Results(json.load(open(a.results, encoding="utf-8")))
    d = res.d
    s, mach = d["settings"], d["machine"]
    main_t, stages_t, ratios_t = inference_tables(res)
    arm = arm_table(a.arm)
    arm_ort = arm_ort_table(a.arm, a.arm_ort)
    py = d["e2e"]["python"].get("self_reported", {})
    ort_version = next((r["result"].get("onnxruntime") for r in d["inference"] if r["engine"] == "onnxruntime"), "?")

    md = ["# Performance", ""]
    md.append(f"Measured by `bench/run.sh{' --quick' if d['quick'] else ''}` on {d['date'][:10]} (machine below); "
              "written by `bench/report.py` from `target/bench/results.json`.")
    if d["quick"]:
        md += ["", "**Quick run** (smoke check): few runs; these numbers are not a measurement."]
    md += ["", "## Targets", "", table(["target", "measured", "needed", "status"], targets(res)), ""]
    md += ["## Inference", "",
           f"One inference of the same model, {s['images']} scene frames (640x480, stretched to the SSD's 300x300 "
           "and the shelf counter's 384x288), "
           f"{s['warmup']} warm-up and {s['runs']} timed runs per cell. shelfwatch: `shelfwatch bench --threads N` "
           "(the shelf counter with `--input-size 384x288`; "
           "\"tract's kernels only\": the same with `--kernels tract`) "
           f"(its inference stage); onnxruntime {ort_version}: `bench/ort_bench.py` (only `session.run` timed; "
           "intra-op threads N, inter-op 1, all graph optimisations, sequential).", "",
           main_t, "", "![inference p50 per engine and model](performance.svg)", "",
           "Ratios of p50 times (above 1.00x: the first is slower).", "", ratios_t, "",
           "shelfwatch's stages (p50):", "", stages_t, ""]
    md += ["## End to end", "",
           f"The same {s['e2e_frames']} frames (the scene frames repeated), {s['e2e_threads']} inference thread, "
           f"the {s['e2e_model']} model, the same mosquitto on 127.0.0.1. The daemon: `shelfwatch run` with a files "
           "source (`every-frame`, not looping: it exits when done), examples/demo.toml's zones and counting, an MQTT sink, "
           "its model cache filled beforehand (as on any restart). "
           "The Python pipeline (`bench/py_pipeline.py`): decode (Pillow), resize, normalise, onnxruntime, SSD decoding, "
           "NMS, counts per zone, each frame's counts published with QoS 1, one frame after the other. "
           "Wall time is launch to exit for both (model loading and waiting for the broker's acknowledgements included); "
           "peak RSS from the kernel's accounting of the child (wait4).", "",
           e2e_table(res), ""]
    if py:
        md += [f"The Python pipeline's own account: frame loop {py['loop_s']:.2f} s ({py['loop_frames_per_second']:.1f} frames/s), "
               f"model load {py['model_load_ms']:.0f} ms, {py['messages']} messages.", ""]
    md += ["Detections: the Python pipeline against `shelfwatch detect`, per scene frame:", "", parity_lines(res), ""]
    md += ["## Cold start", "",
           "From launch to the first frame's zone counts: for the daemon the first `state` record on stdout "
           "(a one-frame window; first start: empty state directory, so the model is read from ONNX and cached; "
           "restart: the same again with the model cache kept), for the Python pipeline when its first frame is counted.", "",
           cold_table(res), ""]
    if arm:
        md += ["## ARM instruction counts", "", "Instructions per inference, from `target/bench/arm-insns.json`.", "", arm, ""]
    if arm_ort:
        md += ["onnxruntime on aarch64, counted the same way (`bench/ort-arm-insns.sh`: an arm64 Python and "
               "onnxruntime's aarch64 wheel under the same qemu plugin; one `session.run`, 1 thread, from "
               "`target/bench/ort-arm-insns.json`), beside shelfwatch's count for the same model and CPU "
               "(its whole per-frame work, conversion and decoding included; the shelf counter at 384x288). "
               "Instructions are not cycles: compare them as work, not as time.", "", arm_ort, ""]
    md += ["## Notes", "", NOTES_START, kept_notes(a.md), NOTES_END, ""]
    md += ["## Machine", "", table(["", ""], [
        ["CPU", mach["cpu"]],
        ["cores", mach["cores"]],
        ["architecture", mach.get("arch", "?")],
        ["kernel", mach["kernel"]],
        ["OS", mach.get("os", "?")],
        ["rustc", mach["rustc"]],
        ["shelfwatch", d.get("shelfwatch", "?")],
        ["Python, onnxruntime", f"{mach.get('python', '?')}, {ort_version}"],
        ["date (UTC)", d["date"]],
        ["load average (1, 5, 15 min) at start; at end", f"{load(mach, 'loadavg_start')}; {load(mach, 'loadavg_end')}"],
    ]), ""]
    stages = ", ".join(f"{k} {v} s" for k, v in d.get("stages_s", {}).items())
    md += ["## How to reproduce", "", "From the repository root:", "", "```sh", "bench/run.sh            # or --quick for a smoke check",
           "```", "",
           "It creates the Python venv (`bench/requirements.txt`, pinned) in "
           "`${SHELFWATCH_BENCH_VENV:-$HOME/.cache/shelfwatch/bench-venv}` if missing, runs `cargo build --release --locked`, "
           "starts its own mosquitto on a free loopback port, runs every stage, writes `target/bench/results.json` "
           "(raw outputs in `target/bench/raw/`) and renders this page and `performance.svg` with `bench/report.py`. "
           "It needs python3 (3.11 or later) and mosquitto (`scripts/setup.sh --test` installs it). "
           "Close other work first: every number here is a wall-clock time on a shared machine.", ""]
    if stages:
        md += [f"Stage times of this run: {stages}.", ""]

    os.makedirs(os.path.dirname(os.path.abspath(a.md)), exist_ok=True)
    with open(a.md, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    chart(res, a.svg)
    print(f"wrote {a.md} and {a.svg}")


if __name__ == "__main__":
    main()
