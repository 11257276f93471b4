#!/usr/bin/env bash
# Installs what building shelfwatch needs and is missing on this machine. With --test,
# also what the tests need: mosquitto, the ARM cross toolchains and qemu (user mode for
# the ARM test runs, system mode for the vivid VMs), cargo-zigbuild for binaries that run
# on glibc 2.31, and the Debian packaging tools. Safe to run again; does nothing when all
# is there.
#
#   scripts/setup.sh          # to build and run (the README's first command)
#   scripts/setup.sh --bench  # to run bench/run.sh (it calls this itself): mosquitto,
#                             # python3-venv
#   scripts/setup.sh --test   # to run scripts/test.sh (it calls this itself)
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=false
with_bench=false
case ${1:-} in
  "") ;;
  --test) with_tests=true ;;
  --bench) with_bench=true ;;
  *) echo "usage: $0 [--bench | --test]" >&2; exit 2 ;;
esac

apt_packages=(
  libclang-dev   # bindgen, for the v4l crate's videodev2.h bindings
  pkg-config
)
if $with_tests; then
  apt_packages+=(
    systemd        # systemd-analyze verify/security on the unit
    mosquitto      # the real broker the MQTT tests start on loopback
    mosquitto-clients
    openssl
    # ARM: cross linkers and sysroots (bindgen reads the target's headers there, and
    # qemu-user loads the target's libraries from them), qemu-user with binfmt entries
    # so tests can start the ARM shelfwatch binary as a child process.
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
    qemu-user qemu-user-binfmt binfmt-support
    qemu-system-x86 qemu-system-arm busybox-static # vivid VMs (tests/vivid/run-vm.sh)
    python3-venv   # cargo-zigbuild and zig, pinned, from PyPI
    dpkg-dev lintian debootstrap man-db groff-base # packages: checks and a throwaway install
    gcc            # bench/arm-insns.sh: the qemu instruction-count plugin
    chromium chromium-driver fonts-dejavu-core # the web page's tests in a real browser
  )
fi
if $with_bench; then
  apt_packages+=(mosquitto python3-venv)
fi

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
$with_tests || exit 0

targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

# binfmt_misc is not mounted on every machine (containers, minimal VMs); the entries
# qemu-user-binfmt ships are imported by hand where systemd-binfmt did not run.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  $sudo mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
for q in qemu-aarch64 qemu-arm; do
  [ -e /proc/sys/fs/binfmt_misc/$q ] && continue
  # The package's postinst imports the format into binfmt-support's database but cannot
  # enable it while binfmt_misc is unmounted; --import is a no-op once imported.
  $sudo update-binfmts --import $q 2>/dev/null || true
  [ -e /proc/sys/fs/binfmt_misc/$q ] || $sudo update-binfmts --enable $q
  [ -e /proc/sys/fs/binfmt_misc/$q ] || {
    echo "setup: could not register $q with binfmt_misc" >&2
    exit 1
  }
done

# cargo-zigbuild links against a chosen glibc version (2.31) with zig's libc stubs.
# Pinned (scripts/zig-requirements.txt). The venv lives outside the source tree on
# purpose: zig reports its library directory relative to the working directory when it
# is below it, and cargo-zigbuild hands that relative path to bindgen, whose build
# script runs elsewhere and then finds no headers.
# shellcheck source=lib.sh
. scripts/lib.sh
ensure_venv "$(bash scripts/zig-venv.sh)" .requirements.sha256 scripts/zig-requirements.txt
tools=target/tools

# cargo-deb builds the .deb packages (scripts/package.sh).
if ! "$tools/bin/cargo-deb" --version 2>/dev/null | grep -q 3.8.0; then
  cargo install --locked --root "$tools" --version 3.8.0 cargo-deb
fi
