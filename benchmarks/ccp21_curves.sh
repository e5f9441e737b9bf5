#!/usr/bin/env bash
# Learning curves behind the `cpu` recipe (benchmarks/results/ccp21_curves.md; points are changes to
# `cpu-short`, the recipe they started from): Joint, the offline upper
# bound, on ccp21 15-1 overlapped, trained on train:fit and evaluated on train:holdout (val, the test
# split, is not read), at the points given as LR:EPOCHS[:RESIZE:CROP[:KEY=VALUE,...]] (the last field:
# more config overrides, comma-separated, e.g. model.skip_stride=8,data.scale=[0.75,1.5]; the run's name carries them). Each finished run's records are
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
  # split the overrides on the commas outside brackets (data.scale=[0.75,1.5] is one)
  sets=() kv="" depth=0
  for ((i = 0; i < ${#extra}; i++)); do
    ch=${extra:i:1}
    if [[ $ch == "[" ]]; then depth=$((depth + 1)); elif [[ $ch == "]" ]]; then depth=$((depth - 1)); fi
    if [[ $ch == "," && $depth == 0 ]]; then sets+=("$kv") kv=""; else kv+=$ch; fi
  done
  [[ -n "$kv" ]] && sets+=("$kv")
  for kv in "${sets[@]}"; do
    size+=(--set "$kv")
    key=${kv%%=*} value=${kv#*=}
    value=${value//[\[\] ]/} # a list's value in a name: data.scale=[0.75,1.5] -> scale0.75-1.5
    name+="-${key##*.}${value//,/-}"
  done
  "$CISS" train --recipe cpu-short --set data.dataset=folder --set data.root="$DATA" \
    --set data.train_split=train:fit --set data.test_split=train:holdout \
    --set data.task=15-1 --set data.setting=overlapped --set method="${METHOD:-joint}" \
    --set optim.lr="$lr" --set optim.epochs="$epochs" --set seed=0 --set progress=false \
    --set out_dir="$OUT" --set name="$name" "${size[@]}"
  mkdir -p "$KEEP/$name"
  cp "$OUT/$name"/{config.yaml,meta.json,results.jsonl,summary.json,table.txt,losses.jsonl} "$KEEP/$name/"
done
