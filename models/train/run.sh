#!/usr/bin/env bash
# The shelf-counter training pipeline, from a fresh clone, in one command:
#
#   models/train/run.sh                    generate -> features -> train -> export -> evaluate
#   models/train/run.sh --finetune DIR     the same, with your own labelled frames mixed in
#   QUICK=1 models/train/run.sh            a smoke run (a few dozen images, 1 epoch)
#
# Sizes (environment): TRAIN_IMAGES (5000), VAL_IMAGES (300), TEST_IMAGES (400),
# HEAD_EPOCHS (4, head only on cached features), FT_EPOCHS (4, end to end through blocks
# 11-15), FT_IMAGES (2000 per end-to-end epoch), THREADS (2); SHELF_HEAT_STRIDE (8, or 4
# for a stride-4 heat map: README.md says why it is not the default). Everything goes to
# models/train/out/ (gitignored): data/, features/, checkpoint.npz, train_log.json,
# shelf_counter.onnx/.toml/.labels, eval_*.json.
# Needs python3 (with venv) and the PyPI registry, like models/build.sh, whose venv it
# shares; the training's own pins (JAX, optax) are in models/train/requirements.txt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
models=$(cd "$here/.." && pwd)
root=$(cd "$models/.." && pwd)

finetune=()
if [ "${1:-}" = "--finetune" ]; then
  [ -d "${2:-}" ] || { echo "usage: $0 [--finetune DIR]" >&2; exit 2; }
  finetune=(--finetune "$(cd "$2" && pwd)")
fi

# The pinned venv, made exactly as models/build.sh makes it.
work=${SHELFWATCH_MODEL_WORK:-$models/.build}
venv=$work/venv
mkdir -p "$work"
t_all=$SECONDS
t_venv=$t_all
# shellcheck source=../../scripts/lib.sh
. "$root/scripts/lib.sh"
ensure_venv "$venv" .requirements.sha256 "$models/requirements.txt"
# the training's extra pins, on top (their own marker, so models/build.sh's is untouched)
ensure_venv "$venv" .train-requirements.sha256 "$models/requirements.txt" "$here/requirements.txt"
py="$venv/bin/python"

threads=${THREADS:-2}
export PYTHONHASHSEED=0 OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
if [ "${QUICK:-0}" = 1 ]; then
  ntrain=${TRAIN_IMAGES:-64}; nval=${VAL_IMAGES:-16}; ntest=${TEST_IMAGES:-16}
  head_epochs=${HEAD_EPOCHS:-1}; ft_epochs=${FT_EPOCHS:-1}; ft_images=${FT_IMAGES:-32}
else
  ntrain=${TRAIN_IMAGES:-5000}; nval=${VAL_IMAGES:-300}; ntest=${TEST_IMAGES:-400}
  head_epochs=${HEAD_EPOCHS:-4}; ft_epochs=${FT_EPOCHS:-4}; ft_images=${FT_IMAGES:-2000}
fi
out=${SHELF_TRAIN_OUT:-$here/out}
export SHELF_TRAIN_OUT=$out
mkdir -p "$out"

# Each stage's seconds go to stages.txt (name, tab, seconds), which CI prints.
export STAGE_LOG=$out/stages.txt
printf 'venv\t%s\n' "$((SECONDS - t_venv))" >"$STAGE_LOG"
rm -rf "$out/data"
stage check-decoder "$py" "$here/test_decode.py"
stage generate-train "$py" "$here/generate.py" --split train --count "$ntrain" --workers "$threads"
stage generate-val "$py" "$here/generate.py" --split val --count "$nval" --seed 2 --workers "$threads"
stage generate-test "$py" "$here/generate.py" --split test --count "$ntest" --seed 3 --workers "$threads"
stage features-train "$py" "$here/features.py" --split train --threads "$threads"
stage features-val "$py" "$here/features.py" --split val --threads "$threads"
stage train "$py" "$here/train.py" --head-epochs "$head_epochs" --ft-epochs "$ft_epochs" \
  --ft-images "$ft_images" --threads "$threads" "${finetune[@]}"
stage export "$py" "$here/export.py"
stage evaluate "$py" "$here/evaluate.py" --split test --sweep --json "$out/eval_test.json"
if [ -f "$root/tests/fixtures/shelves/expected.json" ]; then
  stage evaluate-real-composites "$py" "$here/evaluate.py" --yolo "$root/tests/fixtures/shelves" \
    --per-image --json "$out/eval_shelves.json"
fi
printf 'total\t%s\n' "$((SECONDS - t_all))" | tee -a "$STAGE_LOG"
sha256sum "$out/shelf_counter.onnx"
