"""Training and evaluation speed of the `cpu` recipe's default against the default before it, timed
interleaved in one process on the same batches.

    old: EfficientNet-Lite0 with its 320->1280 head conv, ASPP on its 1280 channels, every layer
         trained, images decoded and resized every epoch, loss terms read every iteration;
         evaluation in no_grad with BN as separate layers, argmax(1), images of a dataset at their
         own size one at a time (`--set model.frozen_stride=0 --set model.head_reduce=0
         --set model.dilated=true --set data.image_cache=false`).
    new: the `cpu` recipe (`model.frozen_stride=4`, `model.head_reduce=320`, `model.dilated=false`,
         `data.image_cache=true`),
         the engine's loop (losses summed on the device) and its evaluation (inference copy with BN
         folded, inference_mode, max(1).indices, batches of equal-size images).

Each iteration is timed from fetching the batch (loading, augmentation) to the optimiser step;
evaluation per image, over the first images of the split, from fetching them to the confusion-matrix
update (new: in the engine's batches of equal-size images). The image cache is filled before
timing (its one-time cost is printed). Images come from ccp21's train split (its test split is never
read) when ../shared is there, else from a generated folder dataset of the same image size.

    python benchmarks/train_speed.py [--quick] [--profile] [--threads 2]

The last line is `speedup train X.XXx eval Y.YYx` (median time per item, old / new).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ciss` does; before torch is imported
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ciss.config import load_config
from ciss.data.transforms import EvalTransform, Resized, TrainTransform
from ciss.engine import Experiment, collate, iter_batches, size_batches
from ciss.metrics import ConfusionMatrix, predicted_labels
from ciss.models import inference_copy

ROOT = Path(__file__).resolve().parents[1]
CCP21 = ROOT.parent / "shared" / "datasets" / "ccp21"
OLD = ["model.frozen_stride=0", "model.head_reduce=0", "model.dilated=true", "data.image_cache=false"]


def generated_folder(root: Path, n: int = 96) -> Path:
    """A folder dataset of n JPEG images of ccp21's size (550 x 830) with 21 classes of blobs."""
    rng = np.random.default_rng(0)
    for sub in ("images", "labels", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(["background"] + [f"c{k}" for k in range(1, 21)]) + "\n")
    ids = []
    yy, xx = np.mgrid[:830, :550]
    for i in range(n):
        label = np.zeros((830, 550), np.uint8)
        for c in rng.choice(np.arange(1, 21), size=4, replace=False):
            cy, cx, r = rng.integers(100, 730), rng.integers(100, 450), rng.integers(40, 140)
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
        image = (rng.integers(0, 60, (830, 550, 3)) + label[..., None] * 9).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:04d}.jpg", quality=90)
        Image.fromarray(label).save(root / "labels" / f"{i:04d}.png")
        ids.append(f"{i:04d}")
    (root / "splits" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


class Variant:
    def __init__(self, name: str, overrides: list[str], base: list[str], new: bool) -> None:
        self.name, self.new = name, new
        self.cfg = load_config(None, [*base, *overrides], recipe="cpu")
        self.exp = Experiment(self.cfg)
        scn = self.exp.train_scenario
        self.model = self.exp.build_model((scn.classes_per_step[0],))
        self.ctx = self.exp.context(0, 1, 1)
        groups = self.exp.method.param_groups(self.model, self.ctx, self.exp.method.phases(self.ctx)[0])
        self.opt = torch.optim.SGD(groups, lr=self.cfg.optim.lr, momentum=0.9, nesterov=True,
                                   weight_decay=1e-4)
        transform = Resized(TrainTransform(self.cfg.data.crop_size), self.cfg.data.resize)
        self.train_loader = self.exp.loader(scn.train_dataset(0, transform), self.cfg.optim.batch_size, True)
        eval_tf = Resized(EvalTransform(self.cfg.data.eval_size), self.cfg.data.resize)
        eval_data = scn.train_dataset(0, eval_tf)
        batches = size_batches(eval_data, self.cfg.optim.eval_batch_size) if new else None
        self.eval_loader = (  # new: the engine's batches of equal-size images; old: in file order
            torch.utils.data.DataLoader(eval_data, batch_sampler=batches, collate_fn=collate)
            if batches is not None else
            torch.utils.data.DataLoader(eval_data, batch_size=self.cfg.optim.eval_batch_size,
                                        shuffle=False, collate_fn=collate))
        self.sums: dict[str, torch.Tensor] = {}

    def fill_cache(self) -> float:
        t = time.perf_counter()
        data = self.exp.train_set
        if hasattr(data, "entry"):
            for i in range(len(data)):
                data[i]
        return time.perf_counter() - t

    def train_iter(self, batch_iter, seed: int) -> float:
        m, method, ctx = self.model, self.exp.method, self.ctx
        t = time.perf_counter()
        random.seed(seed)  # the same crops for both variants
        batch = next(batch_iter)
        method.train_mode(m, ctx, method.phases(ctx)[0])
        out = m(batch.image)
        terms = method.loss(out, method.make_targets(batch, out, None, ctx), None, batch, ctx)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError("diverged")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.new:  # the engine: summed on the device, read once per epoch
            for k, v in terms.items():
                v = v.detach().float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        else:  # before: every term read on the host each iteration, and the loss for the bar
            for k, v in terms.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())  # type: ignore[assignment]
            loss.item()
        return time.perf_counter() - t

    def eval_images(self, n: int) -> float:
        """Seconds per image over the first ``n`` images of the evaluation loader (model copy included)."""
        ctx, method = self.ctx, self.exp.method
        cm = ConfusionMatrix(ctx.num_seen)
        seen = 0
        t = time.perf_counter()
        if self.new:
            net = inference_copy(self.model)
            with torch.inference_mode():
                for batch in iter_batches(self.eval_loader, torch.device("cpu")):
                    cm.update(predicted_labels(method.eval_logits(net(batch.image), ctx)), batch.label)
                    seen += batch.image.shape[0]
                    if seen >= n:
                        break
        else:
            self.model.eval()
            with torch.no_grad():
                for batch in iter_batches(self.eval_loader, torch.device("cpu")):
                    cm.update(method.eval_logits(self.model(batch.image), ctx).argmax(1), batch.label)
                    seen += batch.image.shape[0]
                    if seen >= n:
                        break
        return (time.perf_counter() - t) / seen


def profile_table(v: Variant, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    it = iter(iter_batches(v.train_loader, torch.device("cpu")))
    v.train_iter(it, 0)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for s in range(2):
            v.train_iter(it, s)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (under 4 minutes on 2 cores)")
    ap.add_argument("--iters", type=int, default=None, help="training iterations per round and variant")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also print a profile of two iterations of each")
    ap.add_argument("--new-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides of the new variant (to measure one more lever against the old)")
    args = ap.parse_args()
    iters = args.iters or (4 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 3)
    eval_n = 32 if args.quick else 64  # images per evaluation round and variant
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    root = CCP21 if CCP21.is_dir() else generated_folder(tmp / "data")
    base = ["data.dataset=folder", f"data.root={root}", "data.task=15-1", "data.setting=overlapped",
            "data.test_split=none", f"out_dir={tmp / 'runs'}", f"cache_dir={tmp / 'cache'}",
            "progress=false", "tensorboard=false", "method=ft"]
    variants = [Variant("old", OLD, base, new=False), Variant("new", args.new_set, base, new=True)]
    print(f"data: {root} ({len(variants[0].exp.train_set)} train images), batch "
          f"{variants[0].cfg.optim.batch_size} of {variants[0].cfg.data.crop_size}px crops, eval batch "
          f"{variants[0].cfg.optim.eval_batch_size} at a shorter side of {variants[0].cfg.data.resize}, "
          f"torch {torch.__version__}, {args.threads} thread(s), {rounds} rounds x {iters} iterations")
    for v in variants:
        fill = v.fill_cache()
        if v.new:
            print(f"image cache filled once in {fill:.1f} s")
    train = {v.name: [] for v in variants}
    evals = {v.name: [] for v in variants}
    iterators = {v.name: iter(iter_batches(v.train_loader, torch.device("cpu"))) for v in variants}
    for v in variants:  # warm-up
        v.train_iter(iterators[v.name], -1)
        v.eval_images(1)
    for r in range(rounds):
        for v in variants:
            for i in range(iters):
                try:
                    train[v.name].append(v.train_iter(iterators[v.name], r * 1000 + i))
                except StopIteration:
                    iterators[v.name] = iter(iter_batches(v.train_loader, torch.device("cpu")))
                    train[v.name].append(v.train_iter(iterators[v.name], r * 1000 + i))
            evals[v.name].append(v.eval_images(eval_n))
    med = {k: float(np.median(t)) for k, t in train.items()}
    emed = {k: float(np.median(t)) for k, t in evals.items()}
    bs = variants[0].cfg.optim.batch_size
    print("\n| default | train s/iter | train img/s | eval s/img | eval img/s |")
    print("|---|---:|---:|---:|---:|")
    for k in med:
        print(f"| {k} | {med[k]:.3f} | {bs / med[k]:.2f} | {emed[k]:.3f} | {1 / emed[k]:.2f} |")
    if args.profile:
        for v in variants:
            print(f"\nprofile of two training iterations, {v.name} default:\n")
            print(profile_table(v, 14))
    print(f"\nspeedup train {med['old'] / med['new']:.2f}x eval {emed['old'] / emed['new']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
