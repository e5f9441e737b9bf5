"""Training throughput of the full loop vs the bare model forward+backward on the same images.

The loop adds data loading (decode, relabel, augment), the method hooks, logging and the per-epoch
checkpoint; the ratio says what all of that costs. Both are timed in one process, one after the
other, on the same images and model.

    python benchmarks/loop_throughput.py [--dataset ccp21|synthetic] [--batches 10]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ciss` does; before torch is imported
import tempfile
import time
from pathlib import Path

import torch

from ciss.config import load_config
from ciss.engine import Experiment, collate
from ciss.data.transforms import Resized, TrainTransform
from ciss.methods import Phase

ROOT = Path(__file__).resolve().parents[1]
CCP21 = ROOT.parent / "shared" / "datasets" / "ccp21"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=["ccp21", "synthetic"], default="ccp21" if CCP21.is_dir() else "synthetic")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    data = (["data.dataset=folder", f"data.root={CCP21}"] if args.dataset == "ccp21"
            else ["data.dataset=synthetic", "data.options={num_classes: 20, size: 256, length: 400}"])
    cfg = load_config(None, [*data, "data.task=15-1", f"out_dir={tmp}", f"cache_dir={tmp / 'cache'}",
                             "progress=false", "tensorboard=false"], recipe="cpu")
    exp = Experiment(cfg)
    scn = exp.train_scenario
    bs = cfg.optim.batch_size
    full = scn.train_dataset(0, Resized(TrainTransform(cfg.data.crop_size), cfg.data.resize))
    subset = torch.utils.data.Subset(full, list(range(args.batches * bs)))
    n_images = len(subset)
    ctx = exp.context(0, 1, args.batches)

    # bare: the same images, pre-loaded, fed straight to forward+backward+SGD step
    model = exp.build_model((scn.classes_per_step[0],))
    batches = [collate([subset[i] for i in range(b * bs, (b + 1) * bs)]) for b in range(args.batches)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.train()
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)
    for b in batches[:1]:  # warm-up
        loss_fn(model(b.image).logits, b.label).backward()
    t0 = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(b.image).logits, b.label).backward()
        opt.step()
    bare_s = time.perf_counter() - t0

    # full loop: the engine's phase training over a loader of the same images
    model = exp.build_model((scn.classes_per_step[0],))
    loader = exp.loader(subset, bs, train=True)
    t0 = time.perf_counter()
    exp.train_phase(model, None, loader, ctx, Phase("train", 1), 0, cfg.optim.lr, None)
    loop_s = time.perf_counter() - t0

    print(f"dataset {args.dataset}, backbone {cfg.model.backbone}, crop {cfg.data.crop_size}, "
          f"batch {bs}, {args.batches} batches, {args.threads} threads")
    print(f"bare forward+backward+step: {n_images / bare_s:7.2f} images/s ({bare_s:.1f} s)")
    print(f"full training loop        : {n_images / loop_s:7.2f} images/s ({loop_s:.1f} s)")
    print(f"loop / bare throughput    : {bare_s / loop_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
