#!/usr/bin/env bash
# Learning curves of the `cpu` recipe (benchmarks/results/ccp21_curves.md): Joint, the offline upper
# bound, on ccp21 15-1 overlapped, trained on train:fit and evaluated on train:holdout (val, the test
# split, is not read), at the points given as LR:EPOCHS[:RESIZE:CROP[:KEY=VALUE,...]] (the last field:
# more config overrides, e.g. model.skip_stride=8; the run's name carries them). Each finished run's records are
# copied to benchmarks/results/ccp21_curves/<name>/; a finished run is not run again, an interrupted
# one continues from its last checkpoint.
#
# METHOD (default joint) trains another method over the same points, e.g. FT's curve of a step's new
# class against optim.epochs_next / optim.lr_next (its step 0 is shared between the points).
#
#   [METHOD=ft] [POINTS="0.05:10 0.05:20"] bash benchmarks/ccp21_curves.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ccp21_curves}
DATA=${CCP21:-../shared/datasets/ccp21}
CISS=${CISS:-.venv/bin/ciss}
KEEP=benchmarks/results/ccp21_curves
for point in ${POINTS:-0.05:5 0.05:10 0.05:20 0.1:10 0.02:10 0.05:40}; do
  IFS=: read -r lr epochs resize crop extra <<<"$point"
  name="${METHOD:-joint}-lr$lr-e$epochs${resize:+-r$resize-c$crop}"
  size=()
  [[ -n "$resize" ]] && size=(--set data.resize="$resize" --set data.crop_size="$crop")
  IFS=, read -r -a sets <<<"$extra"
  for kv in "${sets[@]}"; do
    size+=(--set "$kv")
    key=${kv%%=*}
    name+="-${key##*.}${kv#*=}"
  done
  "$CISS" train --recipe cpu --set data.dataset=folder --set data.root="$DATA" \
    --set data.train_split=train:fit --set data.test_split=train:holdout \
    --set data.task=15-1 --set data.setting=overlapped --set method="${METHOD:-joint}" \
    --set optim.lr="$lr" --set optim.epochs="$epochs" --set seed=0 --set progress=false \
    --set out_dir="$OUT" --set name="$name" "${size[@]}"
  mkdir -p "$KEEP/$name"
  cp "$OUT/$name"/{config.yaml,meta.json,results.jsonl,summary.json,table.txt,losses.jsonl} "$KEEP/$name/"
done
