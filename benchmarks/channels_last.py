"""Training and evaluation speed of the segmenter with conv weights in channels-last layout vs the
default contiguous layout (`channels_last` in the run config), timed in one process, alternating.

    python benchmarks/channels_last.py [--backbone efficientnet_lite0] [--head 128] [--crop 224]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ciss` does; before torch is imported
import torch
import torch.nn.functional as F

from ciss.models import build_segmenter


def build(args: argparse.Namespace, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_segmenter(args.backbone, head_channels=args.head, classes_per_step=(16,))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times = []
    for _ in range(iters + 1):  # the first is a warm-up
        t = time.perf_counter()
        loss = F.cross_entropy(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]  # median


def eval_time(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(iters + 1):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--head", type=int, default=128)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.crop, args.crop)
    y = torch.randint(0, 16, (args.batch, args.crop, args.crop))
    with torch.inference_mode():
        a, b = build(args, False).eval(), build(args, True).eval()
        diff = (a(x).logits - b(x).logits).abs().max().item()
    res: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):  # alternate, so that load on the machine hits both alike
        for cl in (False, True):
            model = build(args, cl)
            res[cl].append((train_time(model, x, y, args.iters), eval_time(model, x, args.iters)))
    print(f"{args.backbone}, head {args.head}, batch {args.batch} of {args.crop}x{args.crop}, "
          f"{args.threads} thread(s), median of {args.iters} iterations x {args.rounds} rounds; "
          f"logits max |diff| between layouts at init: {diff:.1e}\n")
    print("| layout | train step (s) | eval batch (s) |")
    print("|---|---:|---:|")
    mean = {cl: [sum(v[i] for v in res[cl]) / len(res[cl]) for i in (0, 1)] for cl in res}
    for cl in (False, True):
        print(f"| {'channels_last' if cl else 'contiguous'} | {mean[cl][0]:.2f} | {mean[cl][1]:.2f} |")
    print(f"\nspeed-up: train {mean[False][0] / mean[True][0]:.2f}x, eval {mean[False][1] / mean[True][1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
