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
stage "systemd unit: verify and security rating" bash -c '
  tmp=$(mktemp -d)
  trap "rm -rf $tmp" EXIT
  # verify resolves ExecStart on this machine: point it at the binary just built.
  sed "s#/usr/bin/shelfwatch#$PWD/target/debug/shelfwatch#" systemd/shelfwatch.service > "$tmp/shelfwatch.service"
  out=$(systemd-analyze verify --man=no "$tmp/shelfwatch.service" 2>&1)
  if [ -n "$out" ]; then echo "$out"; exit 1; fi
  # Fails above an exposure of 2.0.
  systemd-analyze security --offline=true --threshold=20 systemd/shelfwatch.service | tail -n 1'
