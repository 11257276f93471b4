#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs every test.
# Nothing is skipped for lack of a tool: a missing tool is installed or the run fails.
#
# One release build per target (x86_64, aarch64, armv7) serves its tests, the vivid VM
# runs and the .deb packages, which keeps the whole run within CI's time on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib.sh
. scripts/lib.sh
export STAGE_DISK=1

stage "setup" bash scripts/setup.sh --test
PATH=$(bash scripts/zig-venv.sh)/bin:$PWD/target/tools/bin:$PATH
export PATH

# Plain `cargo test` (not --all-targets, which would build the examples as test
# harnesses): the vivid-guest example is built as the program the x86_64 VM runs.
stage "x86_64: unit and integration tests" cargo test --release --locked
shipped_configs() {
  local f
  for f in examples/*.toml; do
    target/release/shelfwatch check-config "$f"
  done
}
stage "shipped configs" shipped_configs
# The shelf counter's training pipeline from this clone, one command (README of
# models/train), on a few dozen images, fine-tuning on labelled frames included; then the
# binary reads what it exported. The full run (35 min) is not repeated here.
train_smoke() {
  local out=$PWD/target/train-smoke
  rm -rf "$out"
  QUICK=1 SHELF_TRAIN_OUT=$out models/train/run.sh --finetune tests/fixtures/shelf-scenes/frames \
    >"$out.log" 2>&1 || { tail -n 40 "$out.log"; return 1; }
  cat "$out/stages.txt"
  target/release/shelfwatch detect --model "$out/shelf_counter.toml" \
    tests/fixtures/shelves/shelf_01.jpg >/dev/null
}
stage "shelf counter: retrain and fine-tune with one command, smoke run" train_smoke
stage "vivid VM: capture from the real V4L2 driver (x86_64)" \
  tests/vivid/run-vm.sh --arch x86_64 --binary target/release/examples/vivid-guest -- /dev/video0

stage "aarch64: build and tests under qemu" scripts/test-arm.sh aarch64-unknown-linux-gnu
stage "armv7: build and tests under qemu" scripts/test-arm.sh armv7-unknown-linux-gnueabihf

# Benchmarks are never timed tests; CI only checks that the harnesses still run from a
# fresh clone (few runs, figures not published: --quick renders into target/bench/).
stage "benchmarks: side-by-side harness, smoke run" bench/run.sh --quick
stage "benchmarks: ARM instruction counts, smoke run" bench/arm-insns.sh \
  --configs aarch64-unknown-linux-gnu:cortex-a76 --models models/ssd_mobilenetv2_oidv4.toml
# onnxruntime's side of the ARM counts: an arm64 Python and onnxruntime's aarch64 wheel
# (about 60 MB from the Debian mirror and PyPI, set up once) under the same plugin.
stage "benchmarks: onnxruntime's ARM instruction counts, smoke run" bench/ort-arm-insns.sh \
  --models models/ssd_mobilenetv2_oidv4.onnx --cpus cortex-a76

a64=target/aarch64-unknown-linux-gnu/release
stage "vivid VM: capture from the real V4L2 driver (arm64, cortex-a72)" \
  tests/vivid/run-vm.sh --arch aarch64 --binary $a64/examples/vivid-guest -- /dev/video0
models=()
for f in models/ssd_mobilenetv2_oidv4.{onnx,labels,toml}; do models+=(--file "$f:/$f"); done
stage "vivid VM: the daemon end to end on arm64 (capture, model, counts, events)" \
  tests/vivid/run-vm.sh --arch aarch64 --timeout 400 --binary $a64/shelfwatch \
  --script tests/vivid/e2e.sh --file tests/vivid/e2e.toml:/e2e.toml "${models[@]}"

stage "packages: build the .debs" scripts/package.sh --target x86_64-unknown-linux-gnu \
  --target aarch64-unknown-linux-gnu --target armv7-unknown-linux-gnueabihf
check_debs() {
  local deb
  for deb in target/debian/*.deb; do scripts/check-deb.sh "$deb"; done
}
stage "packages: lintian, and the amd64 one installed in a throwaway root" check_debs

check_unit() {
  local dir out
  dir=$(mktemp -d)
  # verify resolves ExecStart on this machine: point it at the binary just built.
  sed "s#/usr/bin/shelfwatch#$PWD/target/release/shelfwatch#" systemd/shelfwatch.service >"$dir/shelfwatch.service"
  out=$(systemd-analyze verify --man=no "$dir/shelfwatch.service" 2>&1)
  rm -rf "$dir"
  if [ -n "$out" ]; then echo "$out"; return 1; fi
  # Fails above an exposure of 2.0.
  systemd-analyze security --offline=true --threshold=20 systemd/shelfwatch.service | tail -n 1
}
stage "systemd unit: verify and security rating" check_unit
