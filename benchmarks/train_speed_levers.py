"""One lever at a time: bare training steps (forward, CE, backward, SGD) and evaluation forwards of
model variants of the `cpu` recipe, timed interleaved in one process on the same random batch, as
ratios to the default before (Lite0 with its 1280-channel head conv, every layer trained).

    python benchmarks/train_speed_levers.py [--rounds 6] [--compile]

Data loading is not timed here (benchmarks/train_speed.py times the whole loop). `--compile` also
times torch.compile of the new default, its first call (the compilation) counted apart.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ciss` does; before torch is imported
import time

import torch
import torch.nn.functional as F

from ciss.metrics import predicted_labels
from ciss.models import build_segmenter, freeze_early, inference_copy
from ciss.models.segmenter import undilate

# name -> (backbone, frozen_stride, head_reduce, output_stride, undilated last stage)
VARIANTS = {
    "old (lite0 + 1280 head conv, all trained)": ("efficientnet_lite0", 0, 0, 16, False),
    "frozen_stride=4": ("efficientnet_lite0", 4, 0, 16, False),
    "new: frozen_stride=4, head_reduce=320, last stage undilated": ("efficientnet_lite0", 4, 320, 16, True),
    "frozen_stride=4, head_reduce=320": ("efficientnet_lite0", 4, 320, 16, False),
    "frozen_stride=4, head_reduce=256": ("efficientnet_lite0", 4, 256, 16, False),
    "headless (ASPP on 320 ch)": ("efficientnet_lite0_headless", 0, 0, 16, False),
    "headless, frozen_stride=4": ("efficientnet_lite0_headless", 4, 0, 16, False),
    "headless, frozen_stride=8": ("efficientnet_lite0_headless", 8, 0, 16, False),
    "headless, frozen_stride=4, last stage undilated": ("efficientnet_lite0_headless", 4, 0, 16, True),
    "headless, frozen_stride=4, output stride 32": ("efficientnet_lite0_headless", 4, 0, 32, False),
}


def build(backbone: str, frozen: int, reduce: int, os_: int, undilated: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_segmenter(backbone, pretrained=True, head_channels=128, classes_per_step=(16,),
                            output_stride=os_, head_reduce=reduce)
    if undilated:  # model.dilated=false
        undilate(model.backbone)
    freeze_early(model, frozen)
    return model.to(memory_format=torch.channels_last)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(8, 3, 224, 224)
    y = torch.randint(0, 16, (8, 224, 224))
    xe = torch.randn(16, 3, 256, 384)  # a batch of ccp21 images at the recipe's shorter side 256
    models = {k: build(*v) for k, v in VARIANTS.items()}
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
            for k, m in models.items()}
    train = {k: [] for k in models}
    evals = {k: [] for k in models}
    for r in range(args.rounds + 1):  # round 0 warms up
        for k, m in models.items():
            m.train()
            t = time.perf_counter()
            loss = F.cross_entropy(m(x).logits, y)
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            if r:
                train[k].append(time.perf_counter() - t)
            net = inference_copy(m)
            t = time.perf_counter()
            with torch.inference_mode():
                predicted_labels(net(xe).logits)
            if r:
                evals[k].append(time.perf_counter() - t)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    base = next(iter(models))
    print(f"batch 8 of 224x224 (train), 16 of 256x384 (eval: BN folded, inference mode), "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds\n")
    print("| variant | train s/step | train speed-up | eval s/batch | eval speed-up |")
    print("|---|---:|---:|---:|---:|")
    for k in models:
        print(f"| {k} | {med(train[k]):.3f} | {med(train[base]) / med(train[k]):.2f}x | "
              f"{med(evals[k]):.3f} | {med(evals[base]) / med(evals[k]):.2f}x |")

    # evaluation paths of the old default: what folding BN, inference mode and max(1) each give
    m = models[base].eval()
    paths = {}
    for name, fn in (
        ("no_grad, BN layers, argmax(1)", lambda: _eval(m, xe, torch.no_grad, True)),
        ("inference_mode, BN layers, argmax(1)", lambda: _eval(m, xe, torch.inference_mode, True)),
        ("inference_mode, BN folded, argmax(1)", lambda: _eval(inference_copy(m), xe, torch.inference_mode, True)),
        ("inference_mode, BN folded, max(1).indices", lambda: _eval(inference_copy(m), xe, torch.inference_mode, False)),
    ):
        fn()
        paths[name] = med([_timed(fn) for _ in range(args.rounds)])
    print("\n| evaluation path (old default's model) | s/batch | speed-up |")
    print("|---|---:|---:|")
    first = next(iter(paths.values()))
    for name, t in paths.items():
        print(f"| {name} | {t:.3f} | {first / t:.2f}x |")

    if args.compile:
        key = "new: frozen_stride=4, head_reduce=320, last stage undilated"
        new, eager = build(*VARIANTS[key]), build(*VARIANTS[key])
        compiled = torch.compile(new)
        new.train()
        t = time.perf_counter()
        F.cross_entropy(compiled(x).logits, y).backward()
        first_call = time.perf_counter() - t
        times = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for name, mod, fn in (("eager", eager, eager), ("compiled", new, compiled)):
                mod.train()
                t = time.perf_counter()
                F.cross_entropy(fn(x).logits, y).backward()
                times[name].append(time.perf_counter() - t)
        print(f"\ntorch.compile (training, new default): first call {first_call:.1f} s; steady step "
              f"eager {med(times['eager']):.3f} s, compiled {med(times['compiled']):.3f} s "
              f"({med(times['eager']) / med(times['compiled']):.2f}x)")
    return 0


def _eval(model: torch.nn.Module, x: torch.Tensor, mode, argmax: bool) -> None:
    with mode():
        logits = model(x).logits
        logits.argmax(1) if argmax else predicted_labels(logits)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    raise SystemExit(main())
