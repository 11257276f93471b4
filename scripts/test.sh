#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs every test.
# Nothing is skipped for lack of a tool: a missing tool is installed or the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

stage() {
  local name=$1; shift
  local t0=$SECONDS
  echo "==> $name"
  "$@"
  echo "<== $name: $((SECONDS - t0)) s"
}

stage "setup" bash scripts/setup.sh
stage "unit and integration tests" cargo test --locked --all-targets
stage "shipped configs" bash -c '
  for f in examples/*.toml; do
    target/debug/shelfwatch check-config "$f"
  done'
stage "vivid VM: capture from the real V4L2 driver (x86_64)" bash -c '
  cargo build --locked --example vivid-guest
  tests/vivid/run-vm.sh --arch x86_64 --binary target/debug/examples/vivid-guest -- /dev/video0'
