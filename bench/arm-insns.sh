#!/usr/bin/env bash
# Guest instructions per inference of the detector on ARM, counted under qemu-user with a
# TCG plugin (bench/qemu-insn/insn.c): a measure of the work an inference costs on each
# CPU and model that, unlike timings under emulation, does not depend on this machine.
#
#   bench/arm-insns.sh [--models a.toml,b.toml] [--configs LIST] [--image IMG]
#                      [--threads N] [--kernels LIST] [--input-size WxH] [--no-build]
#
# For each configuration (default: aarch64 on cortex-a72 and on cortex-a76, armv7 on
# cortex-a15 with NEON) and each model manifest (default: the fp32 and int8 SSDs) it runs
#
#   shelfwatch bench --json --warmup 0 --runs R --model M IMAGE
#
# under the plugin for R=1 and R=3: instructions per inference = (count(3) - count(1)) / 2,
# so reading the image, loading and optimising the model and the first run's one-off work
# fall out ("setup insns" in the table: the --runs 1 count less one inference). An
# "inference" is one timed run of `bench`: a 1280x720 YUYV frame converted, resized and
# normalised, the network, decoding and NMS, counting and payloads (the network is
# nearly all of it). Counts vary by up to 0.2% from one run to the next (the
# model's loading is not quite deterministic), so smaller differences mean nothing.
# It writes target/bench/arm-insns.json, a list of {"target","cpu","model","depthwise",
# "input_size","insns_per_inference","kernels"}, prints a table, and keeps each run's
# bench JSON, log and raw count in target/bench/arm-insns/.
#
# Options:
#   --models LIST   comma-separated model manifests
#   --configs LIST  comma-separated TARGET:CPU, e.g. aarch64-unknown-linux-gnu:cortex-a76
#   --image IMG     default tests/fixtures/scenes/frames/000.jpg
#   --threads N     pass `--threads N` to bench (binaries that have it). With N > 1 the
#                   count includes what the worker threads spend spinning while they wait,
#                   so it measures scheduling as well as work.
#   --kernels LIST  comma-separated `bench --kernels` values (default shelfwatch);
#                   `shelfwatch,tract` counts both, to show what shelfwatch's own
#                   depthwise kernels save against tract's alone
#   --input-size WxH  pass `--input-size WxH` to bench: the whole frame at one input size
#                   instead of the scale rule (the shelf counter at 384x288 is what
#                   bench/ort-arm-insns.sh counts for onnxruntime)
#   --no-build      use the ARM binaries as they are, even when older than the sources
#
# Each ARM binary comes from `scripts/test-arm.sh TARGET --build-only` (a release build
# through cargo-zigbuild), which this script runs when the binary is missing or older than
# the sources. Needs qemu-user, gcc and python3 (scripts/setup.sh --test).
#
# What the counts can and cannot show: qemu-user gives the program the emulated CPU's
# HWCAP bits (cortex-a76 has dot product and fp16, cortex-a72 neither) but the host's
# /proc/cpuinfo. tract takes the CPU part (its tuned kernel sets) and fp16 from
# /proc/cpuinfo, so under qemu every aarch64 CPU is "Generic" without fp16, whatever
# -cpu says; dot product it reads from HWCAP, so int8 models get the `_dot` kernel on
# cortex-a76. On armv7 NEON comes from TRACT_CPU_ARM32_NEON=true, set here.
# Instruction counts are not cycles: an SDOT does the work of several SMLALs in one
# instruction, and cores differ in what each instruction costs.
set -euo pipefail
cd "$(dirname "$0")/.."

models=models/ssd_mobilenetv2_oidv4.toml,models/ssd_mobilenetv2_oidv4_int8.toml
configs=aarch64-unknown-linux-gnu:cortex-a72,aarch64-unknown-linux-gnu:cortex-a76,armv7-unknown-linux-gnueabihf:cortex-a15
image=tests/fixtures/scenes/frames/000.jpg
threads=""
kernels=shelfwatch
input_size=""
build=true
runs_lo=1
runs_hi=3

# The comment at the top of this file, without its `#`s.
header() { sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
usage() {
  header | sed -n '5,6p' >&2
  exit 2
}
while [[ $# -gt 0 ]]; do
  case $1 in
    --models) models=${2:?--models needs a list}; shift 2 ;;
    --configs) configs=${2:?--configs needs a list}; shift 2 ;;
    --image) image=${2:?--image needs a file}; shift 2 ;;
    --threads) threads=${2:?--threads needs a number}; shift 2 ;;
    --kernels) kernels=${2:?--kernels needs a list}; shift 2 ;;
    --input-size) input_size=${2:?--input-size needs WxH}; shift 2 ;;
    --no-build) build=false; shift ;;
    -h|--help) header; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage ;;
  esac
done

t_start=$SECONDS
step() {
  # step NAME COMMAND...: runs it and prints how long it took.
  local name=$1; shift
  local t0=$SECONDS
  echo "==> $name"
  "$@"
  echo "<== $name: $((SECONDS - t0)) s"
}

for tool in qemu-aarch64 qemu-arm gcc python3; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool not found (scripts/setup.sh --test installs qemu-user)" >&2
    exit 1
  }
done
[[ -f $image ]] || { echo "error: no image $image" >&2; exit 1; }

IFS=, read -r -a model_list <<<"$models"
IFS=, read -r -a config_list <<<"$configs"
IFS=, read -r -a kernels_list <<<"$kernels"
for k in "${kernels_list[@]}"; do
  [[ $k == shelfwatch || $k == tract ]] || { echo "error: --kernels: $k is not shelfwatch or tract" >&2; exit 1; }
done
for m in "${model_list[@]}"; do
  [[ -f $m ]] || {
    echo "error: model manifest $m does not exist" >&2
    [[ $m == *int8* ]] && echo "  (the int8 model may not have been made yet;" \
      "--models ${model_list[0]} runs the others alone)" >&2
    exit 1
  }
done
for c in "${config_list[@]}"; do
  case ${c%%:*} in
    aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf) ;;
    *) echo "error: $c: TARGET must be aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf" >&2
       exit 1 ;;
  esac
  [[ $c == *:?* ]] || { echo "error: $c: expected TARGET:CPU" >&2; exit 1; }
done

out_dir=target/bench
runs_dir=$out_dir/arm-insns
mkdir -p "$runs_dir"
plugin=$out_dir/insn.so
step "plugin: $plugin" gcc -O2 -Wall -Wextra -Werror -shared -fPIC -fvisibility=hidden \
  -o "$plugin" bench/qemu-insn/insn.c

# The ARM binaries: built (once per target) when missing or older than the sources.
declare -A checked=()
for c in "${config_list[@]}"; do
  target=${c%%:*}
  [[ -n ${checked[$target]:-} ]] && continue
  checked[$target]=1
  bin=target/$target/release/shelfwatch
  if [[ ! -x $bin ]]; then
    stale="missing"
  else
    sources=()
    for s in src Cargo.toml Cargo.lock build.rs .cargo; do [[ -e $s ]] && sources+=("$s"); done
    stale=$(find "${sources[@]}" -type f -newer "$bin" | sed -n '1,3p' | tr '\n' ' ')
  fi
  if [[ -n $stale ]]; then
    if $build; then
      step "build $target ($bin: ${stale% })" scripts/test-arm.sh "$target" --build-only
    elif [[ $stale == missing ]]; then
      echo "error: $bin is missing (and --no-build)" >&2
      exit 1
    else
      echo "warning: $bin is older than ${stale% }; using it anyway (--no-build)" >&2
    fi
  fi
done

# count TARGET CPU MODEL KERNELS RUNS TAG: runs bench under the plugin; leaves
# TAG.{insns,json,log}.
count() {
  local target=$1 cpu=$2 model=$3 kernels=$4 runs=$5 tag=$6
  local qemu sysroot
  local -a env_args=(-u QEMU_CPU -u QEMU_LD_PREFIX -u QEMU_PLUGIN -u TRACT_CPU_ARM32_NEON)
  case $target in
    aarch64-*) qemu=qemu-aarch64 sysroot=/usr/aarch64-linux-gnu ;;
    armv7-*) qemu=qemu-arm sysroot=/usr/arm-linux-gnueabihf env_args+=(TRACT_CPU_ARM32_NEON=true) ;;
  esac
  local -a bench_args=(bench --json --warmup 0 --runs "$runs" --model "$model" --kernels "$kernels")
  [[ -n $threads ]] && bench_args+=(--threads "$threads")
  [[ -n $input_size ]] && bench_args+=(--input-size "$input_size")
  local t0=$SECONDS
  if ! env "${env_args[@]}" "$qemu" -L "$sysroot" -cpu "$cpu" \
    -plugin "$plugin,out=$tag.insns" \
    "target/$target/release/shelfwatch" "${bench_args[@]}" "$image" \
    >"$tag.json" 2>"$tag.log"; then
    echo "error: $qemu $cpu $model --runs $runs failed; its log, $tag.log, ends:" >&2
    tail -n 20 "$tag.log" >&2
    exit 1
  fi
  grep -q '^insns [0-9]' "$tag.insns" || {
    echo "error: the plugin wrote no count to $tag.insns (did the guest die of a signal?)" >&2
    exit 1
  }
  echo "    --runs $runs: $(sed -n 's/^insns //p' "$tag.insns") instructions," \
    "$(sed -n 's/^vcpus //p' "$tag.insns") thread(s), $((SECONDS - t0)) s"
}

results=$runs_dir/results.tsv
: >"$results"
for c in "${config_list[@]}"; do
  target=${c%%:*} cpu=${c#*:}
  for model in "${model_list[@]}"; do
    for k in "${kernels_list[@]}"; do
      name=$(basename "$model" .toml)
      base=$runs_dir/$target-$cpu-$name-$k
      t0=$SECONDS
      echo "==> $target $cpu $model, $k kernels"
      count "$target" "$cpu" "$model" "$k" "$runs_lo" "$base-r$runs_lo"
      count "$target" "$cpu" "$model" "$k" "$runs_hi" "$base-r$runs_hi"
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$cpu" "$model" "$k" "$base-r$runs_lo" \
        "$base-r$runs_hi" >>"$results"
      echo "<== $target $cpu $model, $k kernels: $((SECONDS - t0)) s"
    done
  done
done

# The JSON list and the table, from the runs' counts and bench reports.
python3 - "$results" "$out_dir/arm-insns.json" "$runs_lo" "$runs_hi" "${input_size:-auto}" <<'EOF'
import json, sys

results, out, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
input_size = sys.argv[5]

def counts(tag):
    d = {}
    with open(tag + ".insns") as f:
        for line in f:
            k, _, v = line.strip().partition(" ")
            if k in ("insns", "vcpus"):
                d[k] = int(v)
    return d

rows, table = [], []
for line in open(results):
    target, cpu, model, choice, tag_lo, tag_hi = line.rstrip("\n").split("\t")
    c_lo, c_hi = counts(tag_lo), counts(tag_hi)
    b_lo, b_hi = json.load(open(tag_lo + ".json")), json.load(open(tag_hi + ".json"))
    if b_lo["kernels"] != b_hi["kernels"]:
        sys.exit(f"error: {target} {cpu} {model}: the two runs report different kernels: "
                 f"{b_lo['kernels']} and {b_hi['kernels']}")
    per = (c_hi["insns"] - c_lo["insns"]) // (hi - lo)
    if per <= 0:
        sys.exit(f"error: {target} {cpu} {model}: --runs {hi} counted no more than --runs {lo}")
    rows.append({"target": target, "cpu": cpu, "model": model, "depthwise": choice,
                 "input_size": input_size, "insns_per_inference": per,
                 "kernels": b_hi["kernels"]})
    # Not inference: reading the image, loading and optimising the model, first-run work.
    table.append((target.split("-")[0], cpu, f"{b_hi['model']} ({choice})", per, c_lo["insns"] - per,
                  max(c_lo["vcpus"], c_hi["vcpus"]), ", ".join(b_hi["kernels"])))

with open(out, "w") as f:
    json.dump(rows, f, indent=2)
    f.write("\n")

head = ("target", "cpu", "model", "insns/inference", "setup insns", "threads", "kernels")
cells = [head] + [(t, c, m, f"{p:,}", f"{l:,}", str(v), k) for t, c, m, p, l, v, k in table]
widths = [max(len(r[i]) for r in cells) for i in range(len(head) - 1)]
for r in cells:
    print("  ".join(s.rjust(w) if i in (3, 4, 5) else s.ljust(w)
                    for i, (s, w) in enumerate(zip(r, widths))) + "  " + r[-1])
print(f"wrote {out}")
EOF
echo "total: $((SECONDS - t_start)) s"
