#!/usr/bin/env bash
# Installs what building and testing shelfwatch needs and is missing on this machine:
# Debian packages and rustup components. Safe to run again; does nothing when all is there.
set -euo pipefail

apt_packages=(
  libclang-dev   # bindgen, for the v4l crate's videodev2.h bindings
  pkg-config
  systemd        # systemd-analyze verify/security on the unit
  mosquitto      # the real broker the MQTT tests start on loopback
  mosquitto-clients
  openssl
)

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
