#!/usr/bin/env bash
# What a lent GPU should run (under 8 minutes on one H200): bf16 and fp16 autocast training steps of
# the default model against float32, a `torchrun --nproc_per_node 1` NCCL run (process group,
# all-reduce, SyncBN, DDP, and `ciss train` of a tiny scenario on CUDA), and the training throughput
# of resnet101 at crop 512 through the engine against a bare forward+backward. Writes
# benchmarks/results/gpu_check.md (or $OUT) with the figures and this command; the logs of each part
# stay in $WORK (default: a temporary folder, printed at the end).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to choose the interpreter (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-benchmarks/results/gpu_check.md}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: needs a CUDA device (torch.cuda.is_available() is False with $PY)" >&2
  exit 2
fi
WORK=${WORK:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$WORK"
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$PY" - "$WORK/env.json" <<'PYEOF'
import json, subprocess, sys, time, torch
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "git": sha or "?", "date": time.strftime("%Y-%m-%d")}, open(sys.argv[1], "w"))
PYEOF

run() {  # name, seconds, command...: a part's output goes to $WORK/name.log; a failure is reported, not fatal
  local name=$1 limit=$2
  shift 2
  echo "gpu_check: $name (at most ${limit} s)"
  if ! timeout "$limit" "$@" >"$WORK/$name.log" 2>&1; then
    echo "gpu_check: $name failed; last lines of $WORK/$name.log:" >&2
    tail -n 20 "$WORK/$name.log" >&2
  fi
}

export OMP_WAIT_POLICY=PASSIVE
run amp 90 "$PY" benchmarks/gpu_check.py amp "$WORK/amp.json"
run nccl 60 "$PY" -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port "$PORT" \
  benchmarks/gpu_check.py nccl "$WORK/nccl.json"
run cli 90 "$PY" -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port "$PORT" \
  -m ciss.cli train --recipe tiny --set data.dataset=synthetic --set data.task=4-2 \
  --set "data.options={num_classes: 6, size: 64, length: 64}" --set optim.epochs=2 --set optim.amp=bf16 \
  --set device=cuda --set out_dir="$WORK" --set name=cli --set cache_dir="$WORK/cache" \
  --set progress=false --set tensorboard=false
run throughput 170 "$PY" benchmarks/gpu_check.py throughput "$WORK/throughput.json"

mkdir -p "$(dirname "$OUT")"
status=0
"$PY" benchmarks/gpu_check.py report "$WORK" "$OUT" --command "bash benchmarks/gpu_check.sh" || status=$?
echo "gpu_check: wrote $OUT (logs in $WORK)"
exit $status
