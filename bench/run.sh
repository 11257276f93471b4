#!/usr/bin/env bash
# Side-by-side benchmark: shelfwatch against onnxruntime and a plain Python pipeline
# (bench/run.py says what it measures and where the results go).
#
#   bench/run.sh            # full run (a few minutes on 2 cores)
#   bench/run.sh --quick    # smoke check for CI: few runs, 20 frames end to end
#
# This wrapper only prepares: mosquitto and python3-venv from `scripts/setup.sh --bench`,
# and the pinned packages of bench/requirements.txt in
# ${SHELFWATCH_BENCH_VENV:-$HOME/.cache/shelfwatch/bench-venv}; then bench/run.py runs
# under that venv's python (3.11 or later, for tomllib).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=../scripts/lib.sh
. scripts/lib.sh

bash scripts/setup.sh --bench
venv=${SHELFWATCH_BENCH_VENV:-$HOME/.cache/shelfwatch/bench-venv}
t0=$SECONDS
ensure_venv "$venv" .requirements.sha256 bench/requirements.txt
echo "bench: venv $venv ready in $((SECONDS - t0)) s"
"$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "python3 is $("$venv/bin/python" -V 2>&1 | cut -d' ' -f2); the benchmark needs 3.11 or later (tomllib)"
exec "$venv/bin/python" bench/run.py "$@"
