#!/usr/bin/env bash
# Side-by-side benchmark: shelfwatch against onnxruntime and a plain Python pipeline, on
# the same images, the same thread counts and the same machine, in one run.
#
#   bench/run.sh            # full run (a few minutes on 2 cores)
#   bench/run.sh --quick    # smoke check for CI: few runs, 20 frames end to end
#
# Writes the raw results to target/bench/results.json (per measurement also
# target/bench/raw/) and renders docs/performance.md and docs/performance.svg with
# bench/report.py (a --quick run renders into target/bench/ instead). Needs python3 3.11
# or later; mosquitto, python3-venv and time come from `scripts/setup.sh --bench`, which
# it runs first; the Python packages (bench/requirements.txt,
# pinned) go into ${SHELFWATCH_BENCH_VENV:-$HOME/.cache/shelfwatch/bench-venv}.
#
# Stages:
#   inference   `shelfwatch bench --threads N` vs bench/ort_bench.py (onnxruntime, only
#               session.run timed), fp32 and int8 models, 1 and 2 threads
#   parity      bench/py_pipeline.py's zone counts against `shelfwatch detect`'s on the
#               scene frames (fp32 must agree, or the comparison below is not like for like)
#   end to end  the daemon (files source, every frame, MQTT sink) vs py_pipeline.py on
#               the same ~200 frames, the same broker, 1 thread: wall time, peak RSS
#   cold start  launch to the first zone counts, both (median of 3); for the daemon a
#               first start (no model cache) and a restart (model cache filled)
# Everything talks to a mosquitto this script starts on 127.0.0.1 (a free port) and
# stops on exit.
set -euo pipefail
export LC_ALL=C # $EPOCHREALTIME with a decimal point
export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in bench/ and tests/fixtures/
cd "$(dirname "$0")/.."

quick=false
case ${1:-} in
  "") ;;
  --quick) quick=true ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

if $quick; then
  warmup=1 runs=3 e2e_frames=20 cold_repeats=1
else
  warmup=5 runs=50 e2e_frames=200 cold_repeats=3
fi
inference_threads=(1 2)
e2e_threads=1
fp32_manifest=models/ssd_mobilenetv2_oidv4.toml
int8_manifest=models/ssd_mobilenetv2_oidv4_int8.toml
frames=(tests/fixtures/scenes/frames/*.jpg)
bin=target/release/shelfwatch
venv=${SHELFWATCH_BENCH_VENV:-$HOME/.cache/shelfwatch/bench-venv}
py=$venv/bin/python
out=target/bench
raw=$out/raw

die() { echo "bench: $*" >&2; exit 1; }

stage() {
  local name=$1; shift
  local t0=$SECONDS
  echo "==> $name"
  "$@"
  echo "<== $name: $((SECONDS - t0)) s"
  printf '%s\t%s\n' "$name" "$((SECONDS - t0))" >>"$tmp/stages.tsv"
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/shelfwatch-bench.XXXXXX")
mosquitto_pid=""
child_pid=""
cleanup() {
  [ -z "$child_pid" ] || kill "$child_pid" 2>/dev/null || true
  if [ -n "$mosquitto_pid" ]; then
    kill "$mosquitto_pid" 2>/dev/null || true
    wait "$mosquitto_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# Setup: the venv, the release build, the models, a broker.

setup_venv() {
  # mosquitto, python3-venv and time from the distribution, if missing.
  bash scripts/setup.sh --bench
  command -v python3 >/dev/null || die "python3 is missing"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); the benchmark needs 3.11 or later (tomllib)"
  local want have=""
  want=$(sha256sum bench/requirements.txt | cut -d' ' -f1)
  [ -f "$venv/.requirements.sha256" ] && have=$(cat "$venv/.requirements.sha256")
  if [ ! -x "$py" ] || [ "$want" != "$have" ]; then
    echo "bench: installing bench/requirements.txt into $venv"
    python3 -m venv "$venv" || die "cannot create $venv (on Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r bench/requirements.txt
    echo "$want" >"$venv/.requirements.sha256"
  fi
}

# The .onnx a manifest names, relative to the repository.
onnx_of() {
  "$py" -c 'import os, sys, tomllib
m = sys.argv[1]
print(os.path.join(os.path.dirname(m), tomllib.load(open(m, "rb"))["file"]))' "$1"
}

check_models() {
  local m
  for m in "$fp32_manifest" "$int8_manifest"; do
    [ -f "$m" ] || die "$m is missing: the benchmark compares the fp32 and the int8 model and skips neither"
    [ -f "$(onnx_of "$m")" ] || die "$(onnx_of "$m") (named by $m) is missing"
  done
  fp32_onnx=$(onnx_of "$fp32_manifest")
  int8_onnx=$(onnx_of "$int8_manifest")
  echo "fp32: $fp32_manifest ($fp32_onnx); int8: $int8_manifest ($int8_onnx)"
}

start_broker() {
  local mosquitto
  mosquitto=$(command -v mosquitto || true)
  [ -n "$mosquitto" ] || { [ -x /usr/sbin/mosquitto ] && mosquitto=/usr/sbin/mosquitto; } ||
    die "mosquitto is missing (scripts/setup.sh --test installs it)"
  port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat >"$tmp/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
EOF
  "$mosquitto" -c "$tmp/mosquitto.conf" 2>"$tmp/mosquitto.log" &
  mosquitto_pid=$!
  local i
  for i in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "mosquitto on 127.0.0.1:$port (pid $mosquitto_pid)"
      return
    fi
    kill -0 "$mosquitto_pid" 2>/dev/null || break
    sleep 0.05
  done
  cat "$tmp/mosquitto.log" >&2
  die "mosquitto did not start on 127.0.0.1:$port"
}

# ---------------------------------------------------------------------------------------
# Measuring a process: measured NAME CMD... runs CMD with stdout in $raw/NAME.out and
# stderr in $raw/NAME.err and writes $raw/NAME.time: launch and exit times (Unix seconds,
# $SHELFWATCH_BENCH_T0 is the launch time), peak RSS in KiB, exit status. A failure
# shows the end of stderr and stops the run.

measured() {
  local name=$1; shift
  local t0 t1 rss_kb=0 status=0
  t0=$EPOCHREALTIME
  if [ -x /usr/bin/time ]; then
    SHELFWATCH_BENCH_T0=$t0 /usr/bin/time -f '%M' -o "$tmp/$name.rss" "$@" >"$raw/$name.out" 2>"$raw/$name.err" || status=$?
    t1=$EPOCHREALTIME
    rss_kb=$(tail -n 1 "$tmp/$name.rss")
  else
    # No GNU time: the peak (VmHWM) of /proc/PID/status, polled until the process exits.
    SHELFWATCH_BENCH_T0=$t0 "$@" >"$raw/$name.out" 2>"$raw/$name.err" &
    child_pid=$!
    local s v
    while s=$(cat "/proc/$child_pid/status" 2>/dev/null) && ! grep -q '^State:.*zombie' <<<"$s"; do
      v=$(awk '/^VmHWM:/ {print $2}' <<<"$s")
      [ -z "$v" ] || rss_kb=$v
      sleep 0.01
    done
    wait "$child_pid" || status=$?
    t1=$EPOCHREALTIME
    child_pid=""
  fi
  printf '%s %s %s %s\n' "$t0" "$t1" "$rss_kb" "$status" >"$raw/$name.time"
  if [ "$status" != 0 ]; then
    tail -n 20 "$raw/$name.err" >&2
    die "$name: '$*' exited with status $status"
  fi
}

# ---------------------------------------------------------------------------------------
# (a) inference: shelfwatch bench vs onnxruntime, per model and thread count.

inference() {
  local n model manifest onnx
  for n in "${inference_threads[@]}"; do
    for model in fp32 int8; do
      if [ $model = fp32 ]; then manifest=$fp32_manifest onnx=$fp32_onnx; else manifest=$int8_manifest onnx=$int8_onnx; fi
      echo "  $model, $n thread(s): shelfwatch"
      "$bin" bench --json --threads "$n" --model "$manifest" --warmup "$warmup" --runs "$runs" "${frames[@]}" \
        >"$raw/inference-shelfwatch-$model-t$n.json" 2>"$raw/inference-shelfwatch-$model-t$n.err" ||
        { tail -n 20 "$raw/inference-shelfwatch-$model-t$n.err" >&2; die "shelfwatch bench failed ($model, $n threads)"; }
      echo "  $model, $n thread(s): onnxruntime"
      "$py" bench/ort_bench.py --json --threads "$n" --model "$onnx" --warmup "$warmup" --runs "$runs" "${frames[@]}" \
        >"$raw/inference-onnxruntime-$model-t$n.json"
    done
  done
}

# ---------------------------------------------------------------------------------------
# Parity: the Python pipeline must count what shelfwatch counts, frame by frame.

parity() {
  local model manifest onnx
  for model in fp32 int8; do
    if [ $model = fp32 ]; then manifest=$fp32_manifest onnx=$fp32_onnx; else manifest=$int8_manifest onnx=$int8_onnx; fi
    "$bin" detect --model "$manifest" "${frames[@]}" >"$raw/parity-detect-$model.jsonl" 2>"$raw/parity-detect-$model.err" ||
      { tail -n 20 "$raw/parity-detect-$model.err" >&2; die "shelfwatch detect failed ($model)"; }
    if "$py" bench/py_pipeline.py --model "$onnx" --threads 1 --compare-rust "$raw/parity-detect-$model.jsonl" \
      "${frames[@]}" >"$raw/parity-$model.json"; then
      echo "  $model: same zone counts on all ${#frames[@]} frames"
    elif [ $model = fp32 ]; then
      cat "$raw/parity-$model.json" >&2
      die "py_pipeline.py does not count what shelfwatch counts with the fp32 model: the end-to-end comparison would not be like for like"
    else
      # Recorded and reported; the end-to-end comparison runs the fp32 model.
      echo "  $model: zone counts DIFFER between shelfwatch and onnxruntime (see $raw/parity-$model.json)"
    fi
  done
}

# ---------------------------------------------------------------------------------------
# (b) end to end and cold start.

# daemon_config FILE STATE_DIR FRAMES_GLOB WINDOW MIN_AGREEMENT STDOUT(true|false)
daemon_config() {
  local file=$1 state=$2 glob=$3 window=$4 agreement=$5 stdout=$6
  {
    cat <<EOF
# Generated by bench/run.sh.
[device]
id = "bench"

[model]
manifest = "$PWD/$fp32_manifest"
threads = $e2e_threads

[counting]
window-frames = $window
min-agreement = $agreement
out-of-stock-after-s = 0.5

[[cameras]]
id = "bench-shelf"

[cameras.source]
kind = "files"
path = "$glob"
fps = 1000.0
loop = false
every-frame = true

[[cameras.zones]]
name = "top-shelf"
polygon = [[0.0, 0.0], [1.0, 0.0], [1.0, 0.5], [0.0, 0.5]]
labels = ["Coffee cup"]
min = 2
max = 4

[[cameras.zones]]
name = "bottom-shelf"
polygon = [[0.0, 0.5], [1.0, 0.5], [1.0, 1.0], [0.0, 1.0]]
labels = ["Coffee cup"]
min = 2
max = 4

[[sinks]]
kind = "mqtt"
broker = "127.0.0.1:$port"
EOF
    if $stdout; then printf '\n[[sinks]]\nkind = "stdout"\n'; fi
    cat <<EOF

[state]
dir = "$state"

[health]
interval-s = 0
EOF
  } >"$file"
  "$bin" check-config "$file" >/dev/null || die "generated config $file is invalid"
}

end_to_end() {
  local i src
  mkdir -p "$tmp/e2e-frames"
  for ((i = 0; i < e2e_frames; i++)); do
    src=${frames[i % ${#frames[@]}]}
    ln -s "$PWD/$src" "$tmp/e2e-frames/$(printf %04d "$i").jpg"
  done
  local e2e=("$tmp"/e2e-frames/*.jpg)
  # The demo's counting (3 of the last 5 frames), zones and planogram; the MQTT sink only.
  daemon_config "$tmp/e2e.toml" "$tmp/state-e2e" "$tmp/e2e-frames/*.jpg" 5 0.6 false
  cp "$tmp/e2e.toml" "$raw/e2e.toml"
  # A daemon that has run before restarts from its model cache (in its state directory):
  # fill it as the first start would, so that the run below is the steady state.
  "$bin" detect --model "$fp32_manifest" --model-cache "$tmp/state-e2e/model-cache" "${frames[0]}" >/dev/null 2>&1 ||
    die "end to end: warming the model cache failed"
  echo "  shelfwatch run: ${#e2e[@]} frames, $e2e_threads thread(s)"
  measured e2e-shelfwatch "$bin" run --config "$tmp/e2e.toml"
  echo "  py_pipeline.py: ${#e2e[@]} frames, $e2e_threads thread(s)"
  measured e2e-python "$py" bench/py_pipeline.py --model "$fp32_onnx" --threads "$e2e_threads" --port "$port" "${e2e[@]}"
}

# The cold-start daemon once, its stdout lines stamped with the time they arrive:
# $raw/NAME.out, its launch time in $raw/NAME.t0.
daemon_stamped() {
  local name=$1 t0 status=0
  t0=$EPOCHREALTIME
  "$bin" run --config "$tmp/cold.toml" 2>"$raw/$name.err" |
    while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done >"$raw/$name.out" ||
    status=$?
  echo "$t0" >"$raw/$name.t0"
  [ "$status" = 0 ] || { tail -n 20 "$raw/$name.err" >&2; die "cold start: shelfwatch run ($name) failed"; }
}

cold_start() {
  local i
  # One frame; a count is stable after one frame, so the first "state" record on stdout
  # is the first frame's counts.
  daemon_config "$tmp/cold.toml" "$tmp/state-cold" "$PWD/${frames[0]}" 1 1.0 true
  for ((i = 1; i <= cold_repeats; i++)); do
    echo "  run $i of $cold_repeats: shelfwatch run (first start, restart), py_pipeline.py, shelfwatch detect (one frame each)"
    rm -rf "$tmp/state-cold" # no saved counts to publish at start, no model cache
    daemon_stamped "cold-shelfwatch-$i"
    # A restart: saved counts gone again, the model cache the first start wrote kept.
    rm -f "$tmp/state-cold/state.json"
    daemon_stamped "cold-restart-$i"
    measured "cold-python-$i" "$py" bench/py_pipeline.py --model "$fp32_onnx" --threads "$e2e_threads" --port "$port" "${frames[0]}"
    measured "cold-detect-$i" "$bin" detect --model "$fp32_manifest" "${frames[0]}"
  done
}

# ---------------------------------------------------------------------------------------
# Results.

collect() {
  BENCH_RAW=$raw BENCH_QUICK=$quick BENCH_WARMUP=$warmup BENCH_RUNS=$runs BENCH_E2E_FRAMES=$e2e_frames \
  BENCH_E2E_THREADS=$e2e_threads BENCH_THREADS="${inference_threads[*]}" BENCH_COLD_REPEATS=$cold_repeats \
  BENCH_IMAGES=${#frames[@]} BENCH_DATE=$date BENCH_LOAD_START=$load_start BENCH_LOAD_END="$(cat /proc/loadavg)" \
  BENCH_RUSTC="$(rustc --version)" BENCH_SHELFWATCH="$("$bin" --version)" \
  BENCH_FP32="$fp32_manifest $fp32_onnx" BENCH_INT8="$int8_manifest $int8_onnx" \
    "$py" - "$out/results.json" <<'EOF'
import json, os, platform, statistics, sys

env = os.environ
raw = env["BENCH_RAW"]
rd = lambda name: json.load(open(os.path.join(raw, name)))


def timed(name):
    t0, t1, rss_kb, status = open(os.path.join(raw, name + ".time")).read().split()
    return {"wall_s": float(t1) - float(t0), "peak_rss_mb": int(rss_kb) / 1024, "exit": int(status)}


def cpu_model():
    info = open("/proc/cpuinfo").read().splitlines()
    for key in ("model name", "Model", "Hardware", "CPU part"):
        for line in info:
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def os_name():
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


threads = [int(n) for n in env["BENCH_THREADS"].split()]
inference = []
for n in threads:
    for model in ("fp32", "int8"):
        for engine in ("shelfwatch", "onnxruntime"):
            inference.append({"engine": engine, "model": model, "threads": n,
                              "result": rd(f"inference-{engine}-{model}-t{n}.json")})

frames = int(env["BENCH_E2E_FRAMES"])
e2e = {}
for engine in ("shelfwatch", "python"):
    m = timed(f"e2e-{engine}")
    e2e[engine] = {"frames": frames, **m, "frames_per_second": frames / m["wall_s"]}
e2e["python"]["self_reported"] = rd("e2e-python.out")

cold = {"shelfwatch": {"first_counts_s": [], "exit_s": []}, "shelfwatch_restart": {"first_counts_s": []},
        "python": {"first_counts_s": [], "exit_s": [], "peak_rss_mb": []},
        "shelfwatch_detect_one_frame": {"exit_s": [], "peak_rss_mb": []}}
def first_counts(run):
    t0 = float(open(os.path.join(raw, f"{run}.t0")).read())
    lines = [l.split(" ", 1) for l in open(os.path.join(raw, f"{run}.out")).read().splitlines()]
    first = next((float(t) for t, rec in lines if json.loads(rec).get("type") == "state"), None)
    if first is None:
        sys.exit(f"bench: the daemon run {run} printed no state record")
    return first - t0
for i in range(1, int(env["BENCH_COLD_REPEATS"]) + 1):
    cold["shelfwatch"]["first_counts_s"].append(first_counts(f"cold-shelfwatch-{i}"))
    cold["shelfwatch_restart"]["first_counts_s"].append(first_counts(f"cold-restart-{i}"))
    p = timed(f"cold-python-{i}")
    cold["python"]["first_counts_s"].append(rd(f"cold-python-{i}.out")["first_detection_s"])
    cold["python"]["exit_s"].append(p["wall_s"])
    cold["python"]["peak_rss_mb"].append(p["peak_rss_mb"])
    d = timed(f"cold-detect-{i}")
    cold["shelfwatch_detect_one_frame"]["exit_s"].append(d["wall_s"])
    cold["shelfwatch_detect_one_frame"]["peak_rss_mb"].append(d["peak_rss_mb"])
for k in ("shelfwatch", "shelfwatch_restart", "python"):
    cold[k]["median_first_counts_s"] = statistics.median(cold[k]["first_counts_s"])
cold["shelfwatch_detect_one_frame"]["median_exit_s"] = statistics.median(cold["shelfwatch_detect_one_frame"]["exit_s"])
del cold["shelfwatch"]["exit_s"]

stages = {}
for line in open(os.path.join(raw, "stages.tsv")):
    name, secs = line.rstrip("\n").split("\t")
    stages[name] = int(secs)

models = {}
for key in ("fp32", "int8"):
    manifest, onnx = env["BENCH_" + key.upper()].split()
    models[key] = {"manifest": manifest, "onnx": onnx}

results = {
    "schema": 1,
    "date": env["BENCH_DATE"],
    "quick": env["BENCH_QUICK"] == "true",
    "machine": {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "kernel": platform.release(),
        "os": os_name(),
        "rustc": env["BENCH_RUSTC"],
        "python": platform.python_version(),
        "loadavg_start": env["BENCH_LOAD_START"],
        "loadavg_end": env["BENCH_LOAD_END"],
    },
    "shelfwatch": env["BENCH_SHELFWATCH"],
    "settings": {
        "images": int(env["BENCH_IMAGES"]),
        "warmup": int(env["BENCH_WARMUP"]),
        "runs": int(env["BENCH_RUNS"]),
        "inference_threads": threads,
        "e2e_frames": frames,
        "e2e_threads": int(env["BENCH_E2E_THREADS"]),
        "e2e_model": "fp32",
        "cold_start_repeats": int(env["BENCH_COLD_REPEATS"]),
    },
    "models": models,
    "inference": inference,
    "parity": {m: rd(f"parity-{m}.json") for m in ("fp32", "int8")},
    "e2e": e2e,
    "cold_start": cold,
    "stages_s": stages,
}
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
    f.write("\n")
print(f"wrote {sys.argv[1]}")
EOF
}

date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
load_start=$(cat /proc/loadavg)
t_all=$SECONDS
stage "venv ($venv)" setup_venv
stage "build: cargo build --release --locked" cargo build --release --locked
stage "models" check_models
rm -rf "$raw" && mkdir -p "$raw"
stage "broker" start_broker
stage "inference: shelfwatch vs onnxruntime (${#frames[@]} images, $warmup warm-up, $runs runs)" inference
stage "parity: py_pipeline.py vs shelfwatch detect" parity
stage "end to end: shelfwatch run vs py_pipeline.py ($e2e_frames frames)" end_to_end
stage "cold start: launch to first counts (x$cold_repeats)" cold_start
cp "$tmp/stages.tsv" "$raw/stages.tsv"
stage "results: $out/results.json" collect
# A quick run's figures are too few to publish: its report stays in target/bench/.
if $quick; then
  stage "report: $out/performance.md" "$py" bench/report.py --results "$out/results.json" \
    --md "$out/performance.md" --svg "$out/performance.svg"
else
  stage "report: docs/performance.md, docs/performance.svg" "$py" bench/report.py --results "$out/results.json"
fi
echo "bench: done in $((SECONDS - t_all)) s"
