#!/usr/bin/env bash
# Accuracy guard of the speed defaults (benchmarks/results/train_speed.md): step 0 of ccp21 15-1
# overlapped (background + classes 1-15, the `cpu` recipe's 5 epochs; step 0 of 15-5, whose step 1 is
# cut to one epoch and not read), trained on train:fit and
# evaluated on train:holdout (ccp21's val split, its test split, is not read), for the default before
# ("old"), the new default ("new") and the new default at output stride 32 ("os32"), seeds 0 and 1;
# "headless" and "frozen" take one lever of the new default each.
#
#   [SEEDS="0 1"] [VARIANTS="old new os32"] bash benchmarks/train_speed_guard.sh [OUT_DIR]     # then: ciss report OUT_DIR/* or read results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/speed_guard}
DATA=${CCP21:-../shared/datasets/ccp21}
CISS=${CISS:-.venv/bin/ciss}
declare -A VARIANT=(
  [old]="--set model.backbone=efficientnet_lite0 --set model.frozen_stride=0 --set data.image_cache=false"
  [new]=""
  [os32]="--set model.output_stride=32"
  [headless]="--set model.frozen_stride=0"
  [frozen]="--set model.backbone=efficientnet_lite0"
)
for seed in ${SEEDS:-0 1}; do
  for v in ${VARIANTS:-old new os32}; do
    # shellcheck disable=SC2086
    "$CISS" train --recipe cpu --set data.dataset=folder --set data.root="$DATA" \
      --set data.train_split=train:fit --set data.test_split=train:holdout \
      --set data.task=15-5 --set optim.epochs_next=1 --set data.setting=overlapped \
      --set method=ft --set seed=$seed --set reuse_base=false --set progress=false \
      --set out_dir="$OUT" --set name=$v-s$seed ${VARIANT[$v]}
  done
done
