#!/usr/bin/env bash
# Prints where scripts/setup.sh keeps cargo-zigbuild and zig (a Python venv): outside
# the source tree (see setup.sh for why), per zig version, overridable for CI caches.
echo "${SHELFWATCH_ZIG_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/shelfwatch/zig-0.17.1}"
