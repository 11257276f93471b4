#!/usr/bin/env bash
# Checks the vivid VM harness end to end without the Rust binary: builds probe.c
# static for the guest arch, then expects run-vm.sh to carry back both a pass (0) and
# a specific failure code (1), so a harness that always says 0 cannot slip through.
#
#   tests/vivid/smoke.sh [x86_64|aarch64]   (default x86_64)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
arch=${1:-x86_64}

case $arch in
  x86_64) cc=gcc pkgs=(gcc libc6-dev) ;;
  aarch64) cc=aarch64-linux-gnu-gcc pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
  *) echo "smoke: arch must be x86_64 or aarch64" >&2; exit 2 ;;
esac
if ! command -v "$cc" >/dev/null; then
  sudo=()
  ((EUID == 0)) || sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends --no-remove -o DPkg::Lock::Timeout=600 "${pkgs[@]}" >&2
fi

out=$(mktemp -d "${TMPDIR:-/tmp}/shelfwatch-smoke.XXXXXX")
trap 'rm -rf -- "$out"' EXIT
"$cc" -static -O2 -Wall -Wextra -o "$out/probe" "$here/probe.c"

check() {
  local want=$1 rc=0
  shift
  "$here/run-vm.sh" --arch "$arch" --binary "$out/probe" -- "$@" || rc=$?
  if ((rc != want)); then
    echo "smoke: FAIL: probe${*:+ $*} in the $arch guest: exit $rc, expected $want" >&2
    exit 1
  fi
  echo "smoke: ok: probe${*:+ $*} in the $arch guest exited $rc as expected" >&2
}
check 0
check 1 --expect-driver not-vivid
echo "smoke: $arch harness passes" >&2
