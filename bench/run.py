"""Side-by-side benchmark: shelfwatch against onnxruntime and a plain Python pipeline, on
the same images, the same thread counts and the same machine, in one run.

    bench/run.sh            # full run (a few minutes on 2 cores)
    bench/run.sh --quick    # smoke check for CI: few runs, 20 frames end to end

bench/run.sh makes the pinned venv (bench/requirements.txt) and runs this file with its
interpreter; run it that way. Writes the raw results to target/bench/results.json (per
measurement also target/bench/raw/) and renders docs/performance.md and
docs/performance.svg with bench/report.py (a --quick run renders into target/bench/).

Stages:
  inference   `shelfwatch bench --threads N` vs bench/ort_bench.py (onnxruntime, only
              session.run timed), 1 and 2 threads: the SSD in fp32 and int8 and the shelf
              counter (the default model, at its trained 384x288), each also with
              `--kernels tract` (tract's own kernels only: what shelfwatch's own add)
  parity      bench/py_pipeline.py's zone counts against `shelfwatch detect`'s on the
              scene frames (fp32 must agree, or the comparison below is not like for like)
  end to end  the daemon (files source, every frame, MQTT sink) vs py_pipeline.py on
              the same ~200 frames, the same broker, 1 thread: wall time, peak RSS
  cold start  launch to the first zone counts, both (median of 3); for the daemon a
              first start (no model cache) and a restart (model cache filled)
Everything talks to a mosquitto this script starts on 127.0.0.1 (a free port) and
stops on exit.
"""
import argparse
import contextlib
import glob
import json
import os
import platform
import shutil
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "shelfwatch")
OUT = os.path.join(ROOT, "target", "bench")
RAW = os.path.join(OUT, "raw")
FP32_MANIFEST = "models/ssd_mobilenetv2_oidv4.toml"
INT8_MANIFEST = "models/ssd_mobilenetv2_oidv4_int8.toml"
COUNTER_MANIFEST = "models/shelf_counter.toml"
# The shelf counter at one input size, its trained one: onnxruntime has no scale rule,
# so both run the same tensor.
MODEL_ARGS = {"counter": ["--input-size", "384x288"]}
# (engine, model) pairs measured. "tract": shelfwatch with `--kernels tract`. The int8
# SSD has no float depthwise convolution for shelfwatch's kernels to take, so it runs
# once.
RUNS = [("shelfwatch", "fp32"), ("tract", "fp32"), ("onnxruntime", "fp32"),
        ("shelfwatch", "int8"), ("onnxruntime", "int8"),
        ("shelfwatch", "counter"), ("tract", "counter"), ("onnxruntime", "counter")]
INFERENCE_THREADS = (1, 2)
E2E_THREADS = 1
PY = sys.executable


class BenchError(Exception):
    """A failed step; main() prints it once and exits 1."""


def tail(path, lines=20):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


class Stages:
    """Timed stages, printed as CI's logs print them and kept for results.json."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        print(f"==> {name}", flush=True)
        t0 = time.monotonic()
        yield
        took = round(time.monotonic() - t0)
        self.seconds[name] = took
        print(f"<== {name}: {took} s", flush=True)


def onnx_of(manifest):
    """The .onnx file a manifest names, relative to the repository."""
    path = os.path.join(ROOT, manifest)
    if not os.path.isfile(path):
        raise BenchError(f"{manifest} is missing: the benchmark compares the fp32 and the int8 model and skips neither")
    with open(path, "rb") as f:
        onnx = os.path.join(os.path.dirname(manifest), tomllib.load(f)["file"])
    if not os.path.isfile(os.path.join(ROOT, onnx)):
        raise BenchError(f"{onnx} (named by {manifest}) is missing")
    return onnx


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A mosquitto on 127.0.0.1 (a free port) for the run; stopped by close()."""

    def __init__(self, tmp):
        mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
        if not mosquitto:
            raise BenchError("mosquitto is missing (scripts/setup.sh --bench installs it)")
        self.port = free_port()
        conf = os.path.join(tmp, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n")
        self.log = os.path.join(tmp, "mosquitto.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([mosquitto, "-c", conf], stderr=log)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                print(f"mosquitto on 127.0.0.1:{self.port} (pid {self.proc.pid})")
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.close()
        raise BenchError(f"mosquitto did not start on 127.0.0.1:{self.port}:\n{tail(self.log)}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait()


def measured(name, cmd):
    """Runs cmd with stdout in RAW/NAME.out and stderr in RAW/NAME.err; returns wall
    seconds, peak RSS and exit status. The peak RSS is the kernel's for that child
    (wait4), so it needs no /usr/bin/time. $SHELFWATCH_BENCH_T0 tells the child its launch
    time. A failure shows the end of stderr and stops the run."""
    out, err = os.path.join(RAW, name + ".out"), os.path.join(RAW, name + ".err")
    t0 = time.time()
    env = dict(os.environ, SHELFWATCH_BENCH_T0=repr(t0))
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    m = {"wall_s": time.time() - t0, "peak_rss_mb": usage.ru_maxrss / 1024, "exit": proc.returncode}
    if proc.returncode != 0:
        raise BenchError(f"{name}: {' '.join(cmd)} exited with status {proc.returncode}:\n{tail(err)}")
    return m


def run_to_file(cmd, out, err, what):
    with open(out, "wb") as o, open(err, "wb") as e:
        if subprocess.run(cmd, stdout=o, stderr=e).returncode != 0:
            raise BenchError(f"{what} failed:\n{tail(err)}")


class Bench:
    def __init__(self, quick, tmp):
        self.quick = quick
        self.tmp = tmp
        if quick:
            self.warmup, self.runs, self.e2e_frames, self.cold_repeats = 1, 3, 20, 1
        else:
            self.warmup, self.runs, self.e2e_frames, self.cold_repeats = 5, 50, 200, 3
        self.frames = sorted(glob.glob("tests/fixtures/scenes/frames/*.jpg"))
        if not self.frames:
            raise BenchError("no frames in tests/fixtures/scenes/frames/")
        self.stages = Stages()
        self.models = {}
        self.broker = None

    def check_models(self):
        for key, manifest in (("fp32", FP32_MANIFEST), ("int8", INT8_MANIFEST), ("counter", COUNTER_MANIFEST)):
            self.models[key] = {"manifest": manifest, "onnx": onnx_of(manifest)}
        print(", ".join(f"{k}: {v['manifest']} ({v['onnx']})" for k, v in self.models.items()))

    # (a) inference: shelfwatch bench vs onnxruntime, per model and thread count.
    def inference(self):
        common = ["--json", "--warmup", str(self.warmup), "--runs", str(self.runs)]
        for n in INFERENCE_THREADS:
            for engine, key in RUNS:
                m = self.models[key]
                print(f"  {key}, {n} thread(s): {engine}")
                base = os.path.join(RAW, f"inference-{engine}-{key}-t{n}")
                if engine == "onnxruntime":
                    cmd = [PY, "bench/ort_bench.py", *common, "--threads", str(n), "--model", m["onnx"], *self.frames]
                else:
                    kernels = ["--kernels", "tract"] if engine == "tract" else []
                    cmd = [BIN, "bench", *common, "--threads", str(n), "--model", m["manifest"], *kernels,
                           *MODEL_ARGS.get(key, []), *self.frames]
                run_to_file(cmd, base + ".json", base + ".err", f"{engine} ({key}, {n} threads)")

    # Parity: the Python pipeline must count what shelfwatch counts, frame by frame.
    def parity(self):
        # py_pipeline.py decodes the SSD; the counter's comparison is its inference alone.
        for key in ("fp32", "int8"):
            m = self.models[key]
            detected = os.path.join(RAW, f"parity-detect-{key}.jsonl")
            run_to_file([BIN, "detect", "--model", m["manifest"], *self.frames], detected,
                        os.path.join(RAW, f"parity-detect-{key}.err"), f"shelfwatch detect ({key})")
            report = os.path.join(RAW, f"parity-{key}.json")
            with open(report, "wb") as o:
                same = subprocess.run([PY, "bench/py_pipeline.py", "--model", m["onnx"], "--threads", "1",
                                       "--compare-rust", detected, *self.frames], stdout=o).returncode == 0
            if same:
                print(f"  {key}: same zone counts on all {len(self.frames)} frames")
            elif key == "fp32":
                raise BenchError(f"py_pipeline.py does not count what shelfwatch counts with the fp32 model "
                                 f"(see {report}): the end-to-end comparison would not be like for like")
            else:
                # Recorded and reported; the end-to-end comparison runs the fp32 model.
                print(f"  {key}: zone counts DIFFER between shelfwatch and onnxruntime (see {report})")

    def daemon_config(self, path, state, frames, window, agreement, stdout):
        with open(os.path.join(ROOT, "bench", "daemon.toml")) as f:
            template = string.Template(f.read())
        text = template.substitute(
            manifest=os.path.join(ROOT, FP32_MANIFEST), threads=E2E_THREADS, window=window,
            agreement=agreement, frames=frames, port=self.broker.port, state=state,
            stdout_sink='\n[[sinks]]\nkind = "stdout"\n' if stdout else "")
        with open(path, "w") as f:
            f.write("# Generated by bench/run.py from bench/daemon.toml.\n" + text)
        if subprocess.run([BIN, "check-config", path], stdout=subprocess.DEVNULL).returncode != 0:
            raise BenchError(f"generated config {path} is invalid")

    # (b) end to end and cold start.
    def end_to_end(self):
        frames_dir = os.path.join(self.tmp, "e2e-frames")
        os.makedirs(frames_dir)
        e2e = []
        for i in range(self.e2e_frames):
            link = os.path.join(frames_dir, f"{i:04d}.jpg")
            os.symlink(os.path.join(ROOT, self.frames[i % len(self.frames)]), link)
            e2e.append(link)
        # The demo's counting (3 of the last 5 frames), zones and planogram; the MQTT sink only.
        config, state = os.path.join(self.tmp, "e2e.toml"), os.path.join(self.tmp, "state-e2e")
        self.daemon_config(config, state, os.path.join(frames_dir, "*.jpg"), 5, 0.6, False)
        shutil.copy(config, os.path.join(RAW, "e2e.toml"))
        # A daemon that has run before restarts from its model cache (in its state
        # directory): fill it as the first start would, so the run below is the steady state.
        warm = subprocess.run([BIN, "detect", "--model", FP32_MANIFEST, "--model-cache",
                               os.path.join(state, "model-cache"), self.frames[0]], capture_output=True)
        if warm.returncode != 0:
            raise BenchError("end to end: warming the model cache failed:\n" + warm.stderr.decode(errors="replace"))
        results = {}
        print(f"  shelfwatch run: {len(e2e)} frames, {E2E_THREADS} thread(s)")
        results["shelfwatch"] = measured("e2e-shelfwatch", [BIN, "run", "--config", config])
        print(f"  py_pipeline.py: {len(e2e)} frames, {E2E_THREADS} thread(s)")
        results["python"] = measured("e2e-python", [PY, "bench/py_pipeline.py", "--model", self.models["fp32"]["onnx"],
                                                    "--threads", str(E2E_THREADS), "--port", str(self.broker.port), *e2e])
        for m in results.values():
            m.update(frames=self.e2e_frames, frames_per_second=self.e2e_frames / m["wall_s"])
        with open(os.path.join(RAW, "e2e-python.out")) as f:
            results["python"]["self_reported"] = json.load(f)
        # Key order as results.json has always had it.
        return {k: {"frames": v.pop("frames"), **v} for k, v in results.items()}

    def first_counts(self, name, config):
        """Seconds from launching the daemon to its first "state" record on stdout, each
        line stamped as it arrives (lines also kept in RAW/NAME.out)."""
        t0 = time.time()
        first = None
        err = os.path.join(RAW, name + ".err")
        with open(err, "wb") as e, open(os.path.join(RAW, name + ".out"), "w") as out:
            proc = subprocess.Popen([BIN, "run", "--config", config], stdout=subprocess.PIPE, stderr=e, text=True)
            for line in proc.stdout:
                now = time.time()
                out.write(f"{now!r} {line}")
                if first is None and line.startswith("{") and json.loads(line).get("type") == "state":
                    first = now - t0
            status = proc.wait()
        if status != 0:
            raise BenchError(f"cold start: shelfwatch run ({name}) failed:\n{tail(err)}")
        if first is None:
            raise BenchError(f"the daemon run {name} printed no state record")
        return first

    def cold_start(self):
        config, state = os.path.join(self.tmp, "cold.toml"), os.path.join(self.tmp, "state-cold")
        # One frame; a count is stable after one frame, so the first "state" record on
        # stdout is the first frame's counts.
        self.daemon_config(config, state, os.path.join(ROOT, self.frames[0]), 1, 1.0, True)
        cold = {"shelfwatch": {"first_counts_s": []}, "shelfwatch_restart": {"first_counts_s": []},
                "python": {"first_counts_s": [], "exit_s": [], "peak_rss_mb": []},
                "shelfwatch_detect_one_frame": {"exit_s": [], "peak_rss_mb": []}}
        for i in range(1, self.cold_repeats + 1):
            print(f"  run {i} of {self.cold_repeats}: shelfwatch run (first start, restart), py_pipeline.py, "
                  "shelfwatch detect (one frame each)")
            shutil.rmtree(state, ignore_errors=True)  # no saved counts, no model cache
            cold["shelfwatch"]["first_counts_s"].append(self.first_counts(f"cold-shelfwatch-{i}", config))
            # A restart: saved counts gone again, the model cache the first start wrote kept.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(state, "state.json"))
            cold["shelfwatch_restart"]["first_counts_s"].append(self.first_counts(f"cold-restart-{i}", config))
            p = measured(f"cold-python-{i}", [PY, "bench/py_pipeline.py", "--model", self.models["fp32"]["onnx"],
                                              "--threads", str(E2E_THREADS), "--port", str(self.broker.port), self.frames[0]])
            with open(os.path.join(RAW, f"cold-python-{i}.out")) as f:
                cold["python"]["first_counts_s"].append(json.load(f)["first_detection_s"])
            cold["python"]["exit_s"].append(p["wall_s"])
            cold["python"]["peak_rss_mb"].append(p["peak_rss_mb"])
            d = measured(f"cold-detect-{i}", [BIN, "detect", "--model", FP32_MANIFEST, self.frames[0]])
            cold["shelfwatch_detect_one_frame"]["exit_s"].append(d["wall_s"])
            cold["shelfwatch_detect_one_frame"]["peak_rss_mb"].append(d["peak_rss_mb"])
        for k in ("shelfwatch", "shelfwatch_restart", "python"):
            cold[k]["median_first_counts_s"] = statistics.median(cold[k]["first_counts_s"])
        cold["shelfwatch_detect_one_frame"]["median_exit_s"] = statistics.median(
            cold["shelfwatch_detect_one_frame"]["exit_s"])
        return cold

    def results(self, date, load_start, e2e, cold):
        def rd(name):
            with open(os.path.join(RAW, name)) as f:
                return json.load(f)

        inference = [{"engine": engine, "model": model, "threads": n,
                      "result": rd(f"inference-{engine}-{model}-t{n}.json")}
                     for n in INFERENCE_THREADS for engine, model in RUNS]
        with open("/proc/loadavg") as f:
            load_end = f.read()
        return {
            "schema": 1,
            "date": date,
            "quick": self.quick,
            "machine": {
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "arch": platform.machine(),
                "kernel": platform.release(),
                "os": os_name(),
                "rustc": subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip(),
                "python": platform.python_version(),
                "loadavg_start": load_start.strip(),
                "loadavg_end": load_end.strip(),
            },
            "shelfwatch": subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip(),
            "settings": {
                "images": len(self.frames),
                "warmup": self.warmup,
                "runs": self.runs,
                "inference_threads": list(INFERENCE_THREADS),
                "e2e_frames": self.e2e_frames,
                "e2e_threads": E2E_THREADS,
                "e2e_model": "fp32",
                "cold_start_repeats": self.cold_repeats,
            },
            "models": self.models,
            "inference": inference,
            "parity": {m: rd(f"parity-{m}.json") for m in ("fp32", "int8")},
            "e2e": e2e,
            "cold_start": cold,
            "stages_s": dict(self.stages.seconds),
        }

    def run(self):
        date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open("/proc/loadavg") as f:
            load_start = f.read()
        stage = self.stages
        t_all = time.monotonic()
        with stage("build: cargo build --release --locked"):
            if subprocess.run(["cargo", "build", "--release", "--locked"]).returncode != 0:
                raise BenchError("cargo build --release failed")
        with stage("models"):
            self.check_models()
        shutil.rmtree(RAW, ignore_errors=True)
        os.makedirs(RAW)
        with stage("broker"):
            self.broker = Broker(self.tmp)
        try:
            with stage(f"inference: shelfwatch vs onnxruntime ({len(self.frames)} images, "
                       f"{self.warmup} warm-up, {self.runs} runs)"):
                self.inference()
            with stage("parity: py_pipeline.py vs shelfwatch detect"):
                self.parity()
            with stage(f"end to end: shelfwatch run vs py_pipeline.py ({self.e2e_frames} frames)"):
                e2e = self.end_to_end()
            with stage(f"cold start: launch to first counts (x{self.cold_repeats})"):
                cold = self.cold_start()
        finally:
            self.broker.close()
        results = os.path.join(OUT, "results.json")
        with stage(f"results: {os.path.relpath(results, ROOT)}"):
            with open(results, "w", encoding="utf-8") as f:
                json.dump(self.results(date, load_start, e2e, cold), f, indent=1)
                f.write("\n")
            print(f"wrote {results}")
        # A quick run's figures are too few to publish: its report stays in target/bench/.
        if self.quick:
            name, extra = f"report: {OUT}/performance.md", ["--md", f"{OUT}/performance.md", "--svg", f"{OUT}/performance.svg"]
        else:
            name, extra = "report: docs/performance.md, docs/performance.svg", []
        with stage(name):
            if subprocess.run([PY, "bench/report.py", "--results", results, *extra]).returncode != 0:
                raise BenchError("bench/report.py failed")
        print(f"bench: done in {round(time.monotonic() - t_all)} s")


def cpu_model():
    with open("/proc/cpuinfo") as f:
        info = f.read().splitlines()
    for key in ("model name", "Model", "Hardware", "CPU part"):
        for line in info:
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def os_name():
    with contextlib.suppress(OSError):
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke check: few runs, 20 frames end to end")
    args = ap.parse_args()
    os.chdir(ROOT)
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in bench/ and tests/fixtures/
    try:
        with tempfile.TemporaryDirectory(prefix="shelfwatch-bench.") as tmp:
            Bench(args.quick, tmp).run()
    except BenchError as e:
        sys.exit(f"bench: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
