"""RCIL's deployed size: parameters and inference time of the plain network, the two-branch training
model, and the two-branch model folded back (what `ciss export` writes), timed in one process.

    python benchmarks/rcil_fold.py [--backbone efficientnet_lite0] [--size 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ciss` does; before torch is imported
import torch

from ciss.models import build_segmenter, fold_parallel_branches


def timed(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(x)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = build_segmenter(args.backbone, classes_per_step=(16, 1, 1, 1, 1, 1)).eval()
    branched = build_segmenter(args.backbone, classes_per_step=(16, 1, 1, 1, 1, 1),
                               parallel_branches=True)
    branched.train()
    with torch.no_grad():
        branched(torch.randn(2, 3, 128, 128))  # the twins' statistics move away from the originals
    branched.eval()
    folded = fold_parallel_branches(copy.deepcopy(branched)).eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.inference_mode():
        diff = (folded(x).logits - branched(x).logits).abs().max().item()
    print(f"{args.backbone}, 21 classes, one {args.size}x{args.size} image, {args.threads} thread(s), "
          f"best of {args.repeats}; folded vs two-branch logits: max |diff| {diff:.2e}\n")
    print("| model | parameters (M) | forward (ms) | vs plain |")
    print("|---|---:|---:|---:|")
    t_plain = timed(plain, x, args.repeats)
    for name, model in [("plain", plain), ("two-branch (training)", branched), ("folded (exported)", folded)]:
        t = t_plain if model is plain else timed(model, x, args.repeats)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {n:.2f} | {1000 * t:.0f} | {t / t_plain:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
