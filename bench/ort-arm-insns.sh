#!/usr/bin/env bash
# Guest instructions per inference of onnxruntime on ARM, counted under qemu-user with the
# TCG plugin of bench/arm-insns.sh (bench/qemu-insn/insn.c): onnxruntime's counterpart of
# that script's shelfwatch counts, measured the same way.
#
#   bench/ort-arm-insns.sh [--models a.onnx,b.onnx] [--cpus cortex-a72,cortex-a76]
#                          [--image IMG] [--setup-only]
#
# For each CPU (default cortex-a72 and cortex-a76) and each model (default the fp32 and int8
# SSDs and the shelf counter; each .onnx needs its manifest .toml beside it) it runs
#
#   python3.11 bench/ort_bench.py --model M --threads 1 --warmup 0 --runs R --json IMAGE
#
# with an arm64 Python under qemu-aarch64 and the plugin, for R=1 and R=3: instructions per
# inference = (count(3) - count(1)) / 2, so starting Python, importing numpy, Pillow and
# onnxruntime, decoding and preprocessing the image (done once, before the runs) and
# creating the session fall out ("setup insns" in the table: the --runs 1 count less one
# inference). An "inference" is one `session.run` on the preprocessed tensor: one intra-op
# thread, inter-op 1, ORT_ENABLE_ALL, sequential, CPU execution provider. Its
# Python-side overhead (the binding, copying outputs to numpy) is included, and nothing
# else is: shelfwatch's counts also include converting and resizing the frame, decoding
# and NMS, which for these models are a small part of its total.
# It writes target/bench/ort-arm-insns.json, a list of {"cpu","model","insns_per_inference",
# "engine":"onnxruntime"} (with "manifest" and "onnxruntime", the version), prints a table,
# and keeps each run's JSON, log and raw count in target/bench/ort-arm-insns/.
#
# Options:
#   --models LIST   comma-separated .onnx files
#   --cpus LIST     comma-separated qemu-aarch64 -cpu names
#   --image IMG     default tests/fixtures/scenes/frames/000.jpg
#   --setup-only    set up the plugin and the guest root, count nothing
#
# The guest, set up once and kept in target/bench/ort-arm-root (remade when this
# script's package lists or bench/requirements.txt change): Debian's arm64 python3.11
# and the shared libraries it needs (glibc, libstdc++ and the rest, found by following
# the packages' Depends through lib* packages only), fetched with apt-get download
# from the host's apt sources through arm64 indexes of our own under
# target/bench/ort-arm/apt (the host's indexes and dpkg architectures are left alone),
# and the aarch64 manylinux wheels of onnxruntime, numpy, Pillow and their dependencies
# at the pins of bench/requirements.txt (those of the x86 bench), fetched with `pip
# download`. Only the host's Debian mirror and PyPI are contacted. The standard library and wheels are compiled to .pyc once, by the host's
# Python when it is 3.11 (else the guest's), and the runs write none
# (PYTHONDONTWRITEBYTECODE), so every run imports the same way. The guest runs with a
# clean environment: python -S with PYTHONPATH set to the wheels, PYTHONHASHSEED=0 and
# OPENBLAS_NUM_THREADS=1 (numpy's OpenBLAS would otherwise start a thread per host core).
# Needs qemu-user, gcc, apt-get, dpkg-deb and python3 with pip or venv (on the host).
#
# What the counts can and cannot show: qemu-user 7.2 gives the program the emulated CPU's
# HWCAP bits (cortex-a76 has dot product and fp16, cortex-a72 neither; neither has i8mm
# or SVE) but the host's /proc/cpuinfo, which has no ARM fields. onnxruntime 1.20's wheel
# is built with pytorch's cpuinfo library (CPUINFO_SUPPORTED), which takes the feature
# bits from HWCAP (getauxval) and each core's MIDR, hence its microarchitecture, from
# /proc/cpuinfo; under qemu it starts without complaint, features from HWCAP, every core
# of unknown microarchitecture (had it failed, onnxruntime reads HWCAP itself). So MLAS
# sees dot product on cortex-a76 and runs the int8 model's QLinearConvs on its UDOT/SDOT
# kernels there and on the plain NEON ones on cortex-a72: the int8 counts of the two
# CPUs differ for that reason. Its one choice by microarchitecture on aarch64,
# narrow-load int8 kernels for Cortex-A53/A55 cores, never applies under qemu. fp16 is
# used only by fp16 tensors, which none of these models has, so fp32 models run the same
# code on both CPUs (their counts agree to a few thousand instructions). Counts vary by
# a few thousand instructions from one run to the next (about 0.001%). Instruction
# counts are not cycles: a UDOT does the work of several widening multiply-adds in one
# instruction, and cores differ in what each instruction costs.
set -euo pipefail
cd "$(dirname "$0")/.."
# stage (a step with its time) and die, as every script here has them.
# shellcheck source=../scripts/lib.sh
. scripts/lib.sh

models=models/ssd_mobilenetv2_oidv4.onnx,models/ssd_mobilenetv2_oidv4_int8.onnx,models/shelf_counter.onnx
cpus=cortex-a72,cortex-a76
image=tests/fixtures/scenes/frames/000.jpg
runs_lo=1
runs_hi=3
setup_only=false
requirements=bench/requirements.txt
# Debian packages to start from: their Depends are followed through lib* packages.
root_packages=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libstdc++6)
# Wheels to fetch (pip adds their dependencies; versions from $requirements).
wheels=(onnxruntime numpy pillow)

# The comment at the top of this file, without its `#`s.
header() { sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
usage() {
  header | sed -n '5,6p' >&2
  exit 2
}
while [[ $# -gt 0 ]]; do
  case $1 in
    --models) models=${2:?--models needs a list}; shift 2 ;;
    --cpus) cpus=${2:?--cpus needs a list}; shift 2 ;;
    --image) image=${2:?--image needs a file}; shift 2 ;;
    --setup-only) setup_only=true; shift ;;
    -h|--help) header; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage ;;
  esac
done

t_start=$SECONDS

for tool in qemu-aarch64 gcc python3 apt-get apt-cache dpkg-deb sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/setup.sh --test installs qemu-user)"
done
qemu=$(command -v qemu-aarch64)
[[ -f $image ]] || die "no image $image"
[[ -f $requirements ]] || die "no $requirements (the pins of onnxruntime, numpy and pillow)"

IFS=, read -r -a model_list <<<"$models"
IFS=, read -r -a cpu_list <<<"$cpus"
for m in "${model_list[@]}"; do
  [[ $m == *.onnx ]] || die "--models: $m is not an .onnx file"
  [[ -f $m ]] || die "model $m does not exist"
done
for c in "${cpu_list[@]}"; do
  [[ $c =~ ^[a-z0-9-]+$ ]] || die "--cpus: bad CPU name $c"
done

out_dir=target/bench
cache=$out_dir/ort-arm
root=$out_dir/ort-arm-root
runs_dir=$out_dir/ort-arm-insns
mkdir -p "$cache" "$runs_dir"

# ---------------------------------------------------------------- the plugin
plugin=$out_dir/insn.so
if [[ ! -f $plugin || bench/qemu-insn/insn.c -nt $plugin || bench/qemu-insn/qemu-plugin-api.h -nt $plugin ]]; then
  stage "plugin: $plugin" gcc -O2 -Wall -Wextra -Werror -shared -fPIC -fvisibility=hidden \
    -o "$plugin" bench/qemu-insn/insn.c
fi

# ---------------------------------------------------------------- the guest root
# The pinned versions, and a stamp of everything the root is made from.
pins=()
for w in "${wheels[@]}"; do
  pin=$(grep -i "^$w==" "$requirements" | head -n1 || true)
  [[ -n $pin ]] || die "$requirements pins no version of $w"
  pins+=("$pin")
done
# shellcheck source=/dev/null
release=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n $release ]] || die "no VERSION_CODENAME in /etc/os-release: cannot tell which Debian release to fetch"
stamp=$( { echo "$release"; echo "${root_packages[*]}"; cat "$requirements"; echo setup-2; } |
  sha256sum | cut -c1-16)

# The interpreter under qemu, with a clean environment (so no QEMU_CPU, QEMU_LD_PREFIX
# or PYTHON* of the caller's either). guest_env ROOT ARGS... runs env -i VARS ARGS...,
# so ARGS start with the qemu-aarch64 command line.
guest_env() {
  local r=$1; shift
  env -i PATH=/usr/bin:/bin HOME=/nonexistent LC_ALL=C.UTF-8 \
    PYTHONHOME="$PWD/$r/usr" PYTHONPATH="$PWD/$r/site-packages" \
    PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1 PYTHONNOUSERSITE=1 \
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "$@"
}

setup_root() {
  local apt_dir=$PWD/$cache/apt deb_dir=$cache/debs wheel_dir=$cache/wheels-$stamp
  local -a apt_opts=(-q -o Acquire::Languages=none
    -o APT::Architecture=arm64 -o APT::Architectures=arm64
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
    -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false)
  # As root apt would drop to _apt, which cannot write into our cache dir.
  ((EUID != 0)) || apt_opts+=(-o APT::Sandbox::User=root)
  # The host's own sources (its mirror, or the proxy CI reaches the registry through),
  # as tests/vivid/run-vm.sh uses them, with indexes of our own for arm64.
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$deb_dir"
  local updated=false
  apt_update() {
    echo "    apt-get update (arm64 $release indexes, into $apt_dir)"
    apt-get "${apt_opts[@]}" update >"$cache/apt-update.log" 2>&1 || {
      tail -n 20 "$cache/apt-update.log" >&2
      die "apt-get update of the arm64 $release indexes failed (log: $cache/apt-update.log)"
    }
    updated=true
  }
  compgen -G "$apt_dir/lists/*_Packages*" >/dev/null || apt_update

  # The packages: root_packages and, following Depends and Pre-Depends, every lib*
  # package (and zlib1g) they need. Tool and data packages (media-types, perl, debconf,
  # tzdata, ...) are not followed: Python does not need them to run. One apt-cache call
  # per level of the walk, as each call reads the whole index.
  local -a pkgs=() level=() next=() missing=() want=() debs=()
  local -A seen=() file_of=()
  local p line name="" ver="" arch=""
  resolve() {
    pkgs=() next=() missing=()
    seen=() file_of=()
    level=("${root_packages[@]}")
    for p in "${level[@]}"; do seen[$p]=1; done
    while ((${#level[@]})); do
      pkgs+=("${level[@]}")
      next=()
      while read -r p; do
        [[ $p =~ ^(lib|python3\.11|zlib1g) && $p != libperl* && -z ${seen[$p]:-} ]] || continue
        seen[$p]=1
        next+=("$p")
      done < <(apt-cache "${apt_opts[@]}" depends --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "${level[@]}" 2>/dev/null |
        sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \([^<> ]*\)$/\2/p' | sed 's/:.*//')
      level=("${next[@]}")
    done
    # Each package's .deb as apt-get download names it: NAME_VERSION_ARCH.deb, with an
    # epoch's colon as %3a.
    while IFS= read -r line; do
      case $line in
        "Package: "*) name=${line#Package: } ;;
        "Version: "*) ver=${line#Version: } ;;
        "Architecture: "*) arch=${line#Architecture: } ;;
        "") [[ -n $name ]] && file_of[$name]=${name}_${ver//:/%3a}_$arch.deb; name="" ;;
      esac
    done < <(apt-cache "${apt_opts[@]}" show --no-all-versions "${pkgs[@]}" 2>/dev/null; echo)
    for p in "${pkgs[@]}"; do [[ -n ${file_of[$p]:-} ]] || missing+=("$p"); done
  }
  resolve
  if ((${#missing[@]})) && ! $updated; then
    apt_update
    resolve
  fi
  ((${#missing[@]} == 0)) || die "not in the arm64 $release indexes: ${missing[*]}"
  echo "    ${#pkgs[@]} arm64 packages: ${pkgs[*]}"

  # Download what $deb_dir does not have yet, in one go.
  local attempt
  for attempt in 1 2; do
    want=()
    for p in "${pkgs[@]}"; do [[ -f $deb_dir/${file_of[$p]} ]] || want+=("$p"); done
    ((${#want[@]})) || break
    echo "    apt-get download ${want[*]}"
    (cd "$deb_dir" && apt-get "${apt_opts[@]}" download "${want[@]}") >"$cache/apt-download.log" 2>&1 &&
      continue
    if ((attempt == 1)) && ! $updated; then
      # Stale indexes name versions the mirror no longer has: refresh once and retry.
      apt_update
      resolve
      ((${#missing[@]} == 0)) || die "not in the arm64 $release indexes: ${missing[*]}"
      continue
    fi
    grep -E '^(E|W):' "$cache/apt-download.log" >&2 || tail -n 20 "$cache/apt-download.log" >&2
    die "apt-get download of arm64 packages failed (log: $cache/apt-download.log); wanted: ${want[*]}"
  done

  # Unpack them all into a new root (renamed to $root once it works; removed on failure).
  local deb
  rm -rf "$root".tmp.*
  staging=$(mktemp -d "$root.tmp.XXXXXX")
  trap 'rm -rf "$staging"' EXIT
  for p in "${pkgs[@]}"; do
    deb=$deb_dir/${file_of[$p]}
    [[ -f $deb ]] || die "apt-get download $p left no $deb"
    dpkg-deb -x "$deb" "$staging" || die "cannot unpack $deb"
    debs+=("$deb")
  done
  echo "    debs: $(du -ch "${debs[@]}" | tail -n1 | cut -f1) in $deb_dir"
  [[ -x $staging/usr/bin/python3.11 ]] || die "the packages gave no usr/bin/python3.11"
  # The arm64 loader finds libraries in its default dirs; without a cache of its own
  # in the root it would read the host's /etc/ld.so.cache (and ignore it). An empty one
  # is ignored at once.
  mkdir -p "$staging/etc"
  : >"$staging/etc/ld.so.cache"

  # The wheels, unpacked into site-packages (PYTHONPATH).
  local -a platforms=()
  local v
  for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_aarch64"); done
  platforms+=(--platform manylinux2014_aarch64)
  mkdir -p "$wheel_dir"
  echo "    pip download ${pins[*]} (aarch64, cp311)"
  # The host's python3 may have no pip (python3-pip is not in scripts/setup.sh): a venv
  # of our own always has one.
  local pip_python=python3
  if ! python3 -m pip --version >/dev/null 2>&1; then
    [[ -x $cache/pip-venv/bin/python ]] || python3 -m venv "$cache/pip-venv" ||
      die "python3 -m venv failed (scripts/setup.sh --test installs python3-venv)"
    pip_python=$cache/pip-venv/bin/python
  fi
  "$pip_python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 \
    -c "$requirements" -d "$wheel_dir" "${pins[@]}" >"$cache/pip.log" 2>&1 || {
    tail -n 20 "$cache/pip.log" >&2
    die "pip download of the aarch64 wheels (${pins[*]}) failed (log: $cache/pip.log)"
  }
  echo "    wheels: $(du -ch "$wheel_dir"/*.whl | tail -n1 | cut -f1) in $wheel_dir"
  mkdir -p "$staging/site-packages"
  local whl
  for whl in "$wheel_dir"/*.whl; do
    python3 -m zipfile -e "$whl" "$staging/site-packages" || die "cannot unpack $whl"
  done
  # Shared libraries inside wheels (numpy.libs/, pillow.libs/) must stay executable.
  find "$staging/site-packages" -name '*.so*' -type f -exec chmod 755 {} +

  # Byte-compile once, so that runs import from .pyc as an installed Python would.
  local -a compile_dirs=("$staging/usr/lib/python3.11" "$staging/site-packages")
  if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "    compiling .pyc (host python3)"
    python3 -m compileall -q -q "${compile_dirs[@]}" >/dev/null || true
  else
    echo "    compiling .pyc (guest python3.11 under qemu: slow)"
    guest_env "$staging" "$qemu" -U PYTHONDONTWRITEBYTECODE -L "$staging" \
      "$staging/usr/bin/python3.11" -S -m compileall -q -q "${compile_dirs[@]}" >/dev/null || true
  fi

  # Check that it all loads.
  local check
  if ! check=$(guest_env "$staging" "$qemu" -L "$staging" "$staging/usr/bin/python3.11" -S -c \
    'import platform, numpy, PIL, onnxruntime; print("python", platform.python_version(), "numpy", numpy.__version__, "Pillow", PIL.__version__, "onnxruntime", onnxruntime.__version__)' 2>&1); then
    echo "$check" >&2
    die "the arm64 Python in $staging cannot import numpy, PIL and onnxruntime (above)"
  fi
  echo "    $check"
  echo "$stamp" >"$staging/.ready"
  rm -rf "$root"
  mv "$staging" "$root"
  trap - EXIT
}

exec 9>"$cache/.lock"
flock -w 1800 9 || die "timed out waiting for another run setting up $root"
if [[ $(cat "$root/.ready" 2>/dev/null || true) != "$stamp" ]]; then
  stage "guest root: $root (arm64 python3.11, ${pins[*]})" setup_root
fi
exec 9>&-
if $setup_only; then
  echo "setup only: $root is ready; total: $((SECONDS - t_start)) s"
  exit 0
fi

# ---------------------------------------------------------------- the counts
# count CPU MODEL RUNS TAG: runs ort_bench.py under the plugin; leaves TAG.{insns,json,log}.
count() {
  local cpu=$1 model=$2 runs=$3 tag=$4
  local t0=$SECONDS
  if ! guest_env "$root" "$qemu" -L "$root" -cpu "$cpu" -plugin "$plugin,out=$tag.insns" \
    "$root/usr/bin/python3.11" -S bench/ort_bench.py --model "$model" --threads 1 \
    --warmup 0 --runs "$runs" --json "$image" >"$tag.json" 2>"$tag.log"; then
    echo "error: qemu-aarch64 $cpu $model --runs $runs failed; its log, $tag.log, ends:" >&2
    tail -n 20 "$tag.log" >&2
    exit 1
  fi
  grep -q '^insns [0-9]' "$tag.insns" || die "the plugin wrote no count to $tag.insns (did the guest die of a signal?)"
  echo "    --runs $runs: $(sed -n 's/^insns //p' "$tag.insns") instructions," \
    "$(sed -n 's/^vcpus //p' "$tag.insns") thread(s), $((SECONDS - t0)) s"
}

results=$runs_dir/results.tsv
: >"$results"
for cpu in "${cpu_list[@]}"; do
  for model in "${model_list[@]}"; do
    base=$runs_dir/$cpu-$(basename "$model" .onnx)
    t0=$SECONDS
    echo "==> $cpu $model"
    count "$cpu" "$model" "$runs_lo" "$base-r$runs_lo"
    count "$cpu" "$model" "$runs_hi" "$base-r$runs_hi"
    printf '%s\t%s\t%s\t%s\n' "$cpu" "$model" "$base-r$runs_lo" "$base-r$runs_hi" >>"$results"
    echo "<== $cpu $model: $((SECONDS - t0)) s"
  done
done

# The JSON list and the table, from the runs' counts and bench reports.
python3 - "$results" "$out_dir/ort-arm-insns.json" "$runs_lo" "$runs_hi" <<'EOF'
import json, sys

results, out, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

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
    cpu, model, tag_lo, tag_hi = line.rstrip("\n").split("\t")
    c_lo, c_hi = counts(tag_lo), counts(tag_hi)
    b_lo, b_hi = json.load(open(tag_lo + ".json")), json.load(open(tag_hi + ".json"))
    if b_lo["runs"] != lo or b_hi["runs"] != hi:
        sys.exit(f"error: {cpu} {model}: the bench reports {b_lo['runs']} and {b_hi['runs']} runs")
    per = (c_hi["insns"] - c_lo["insns"]) // (hi - lo)
    if per <= 0:
        sys.exit(f"error: {cpu} {model}: --runs {hi} counted no more than --runs {lo}")
    rows.append({"cpu": cpu, "model": model, "insns_per_inference": per, "engine": "onnxruntime",
                 "manifest": b_hi["manifest"], "onnxruntime": b_hi["onnxruntime"]})
    # Not inference: Python, imports, the image, creating the session.
    table.append((cpu, b_hi["model"], per, c_lo["insns"] - per, max(c_lo["vcpus"], c_hi["vcpus"])))

with open(out, "w") as f:
    json.dump(rows, f, indent=2)
    f.write("\n")

head = ("model", "cpu", "M insns/inference", "M setup insns", "threads")
cells = [head] + [(m, c, f"{p / 1e6:,.1f}", f"{s / 1e6:,.0f}", str(v)) for c, m, p, s, v in table]
widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
for r in cells:
    print("  ".join(s.rjust(w) if i >= 2 else s.ljust(w) for i, (s, w) in enumerate(zip(r, widths))))
print(f"onnxruntime {rows[0]['onnxruntime']}; wrote {out}")
EOF
echo "total: $((SECONDS - t_start)) s"
