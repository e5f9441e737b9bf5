#!/usr/bin/env bash
# Accuracy guard of the speed defaults (benchmarks/results/train_speed.md): step 0 of ccp21 15-1
# overlapped (background + classes 1-15, the `cpu-short` recipe's 5 epochs; step 0 of 15-5, whose step 1 is
# cut to one epoch and not read), trained on train:fit and
# evaluated on train:holdout (ccp21's val split, its test split, is not read), for the default before
# ("old": Lite0 with its 1280-channel head conv, ASPP on it, every layer trained), the new default
# ("new": the same with the stem and stride-2/4 stages frozen, ASPP on a 1x1 reduction to 320
# channels and the last stage undilated), and other levers: "frozen_reduce" (new, dilated),
# "frozen" (freezing only), "headless" (ASPP on the last block's 320 channels, no head conv),
# "headless_frozen", "os32" (headless_frozen at output stride 32).
#
#   [SEEDS="0 1"] [VARIANTS="old new"] bash benchmarks/train_speed_guard.sh [OUT_DIR]     # then: ciss report OUT_DIR/* or read results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/speed_guard}
DATA=${CCP21:-../shared/datasets/ccp21}
CISS=${CISS:-.venv/bin/ciss}
declare -A VARIANT=(
  [old]="--set model.frozen_stride=0 --set model.head_reduce=0 --set model.dilated=true --set data.image_cache=false"
  [new]=""
  [frozen_reduce]="--set model.dilated=true"
  [frozen]="--set model.head_reduce=0 --set model.dilated=true"
  [headless]="--set model.backbone=efficientnet_lite0_headless --set model.head_reduce=0 --set model.frozen_stride=0 --set model.dilated=true"
  [headless_frozen]="--set model.backbone=efficientnet_lite0_headless --set model.head_reduce=0 --set model.dilated=true"
  [os32]="--set model.backbone=efficientnet_lite0_headless --set model.head_reduce=0 --set model.dilated=true --set model.output_stride=32"
)
for seed in ${SEEDS:-0 1}; do
  for v in ${VARIANTS:-old new}; do
    # shellcheck disable=SC2086
    "$CISS" train --recipe cpu-short --set data.dataset=folder --set data.root="$DATA" \
      --set data.train_split=train:fit --set data.test_split=train:holdout \
      --set data.task=15-5 --set optim.epochs_next=1 --set data.setting=overlapped \
      --set method=ft --set seed=$seed --set reuse_base=false --set progress=false \
      --set out_dir="$OUT" --set name=$v-s$seed ${VARIANT[$v]}
  done
done
