"""Calibrators that choose gamma on the grid by a score on pseudo-labelled pixels: the background
pixels the old model gives to an old class with confidence >= 0.7 are labelled with that class.

- `pcv`: the paper's pseudo cross-validation carried into segmentation: a copy of the step's
  starting model is fine-tuned on half the step's images (plain CE on the step's labels) and gamma
  is validated on the other half, where the model never saw the pseudo-labelled old objects.
- `pcv_method`: the same, but the pseudo step is the run's own method (its losses, old model and
  hooks) on that half: the bias measured is the method's, not plain fine-tuning's.
- `pcv_fit`: the same score on the trained model's own training pixels (no held-out image).
- `agree`: on the trained model's training pixels, the gamma whose old-class predictions on the
  background agree best with the old model's confident ones while the new classes stay right.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Optional, Sized

import numpy as np
import torch
from torch import nn

from ciss.calibration.base import CONFIDENT, Calibrator, confident_old, held_out_image
from ciss.calibration.sweep import GammaSweep, best_finite_gamma, iou_of, nanmean
from ciss.losses import cross_entropy
from ciss.types import BACKGROUND, IGNORE, Batch, SegOutput, StepContext


def pseudo_labelled(label: torch.Tensor, old_logits: torch.Tensor, threshold: float,
                    ignore_unsure: bool = False) -> torch.Tensor:
    """`label` (B, H, W) with its background pixels that the old model gives to an old class with
    confidence >= threshold labelled with that class; with `ignore_unsure`, those it gives to an old
    class with less confidence ignored (neither background nor old for certain)."""
    pred, confident = confident_old(old_logits, threshold)
    bg = label == BACKGROUND
    out = torch.where(bg & confident, pred.to(label.dtype), label)
    if ignore_unsure:
        out = torch.where(bg & (pred >= 1) & ~confident, torch.full_like(out, IGNORE), out)
    return out


@dataclass
class PCVFit(Calibrator):
    """Best mIoU over background, the pseudo-labelled old classes and the new classes."""

    name = "pcv_fit"
    needs_old = True
    threshold: float = CONFIDENT
    calibrated_old: bool = False  # as first defined: the old model's raw logits
    ignore_unsure: bool = False  # as first defined: every other background pixel counts as background

    def start(self, ctx):  # type: ignore[override]
        self._sweep = GammaSweep(ctx.num_seen, ctx.num_old) if ctx.num_old >= 2 else None
        return super().start(ctx)

    def update(self, logits, label, old_logits=None):  # type: ignore[override]
        assert self._sweep is not None and old_logits is not None
        self._sweep.update(logits, pseudo_labelled(label, old_logits, self.threshold, self.ignore_unsure))

    def finish(self) -> float:
        assert self._sweep is not None
        self.gamma = best_finite_gamma(self._sweep, [nanmean(iou_of(m)) for m in self._sweep.matrices()])
        self.info = {**self.info, "pixels": self._sweep.counted()}
        return self.gamma


# (epoch) -> that epoch's batches of the pseudo-fine-tuning images, shuffled and augmented, on the device
EpochBatches = Callable[[int], Iterable[Batch]]


@dataclass
class PCV(PCVFit):
    """Fine-tune a copy of the step's starting model on the images `held_out` rejects (`tune`), then
    score its logits on the held-out ones as PCVFit does. epochs / lr None: the step's own."""

    name = "pcv"
    needs_training = True
    # False: `tune` trains the copy with a plain CE; True: the evaluator trains it as the run's method
    # trains a step (ciss.engine.calibration_training), and scores the method's decision logits.
    trains_method: ClassVar[bool] = False
    version = 2  # version 1 scored the trained model's own pixels (now pcv_fit)
    # The old model's argmax labels the absent classes, as in `share`: at 0.7 too few are labelled
    # and gamma <= 0 wins (docs/calibration.md; benchmarks/results/ccp21_calibration_v2.md).
    threshold: float = 0.0
    calibrated_old: bool = True
    ignore_unsure: bool = True  # matters only with a threshold > 0
    epochs: Optional[int] = None
    lr: Optional[float] = None

    def training_key(self) -> tuple[Any, ...]:
        """Calibrators with equal keys can share one re-trained copy."""
        return (type(self).__name__, self.trains_method, self.epochs, self.lr)

    def held_out(self, index: int) -> bool:
        return held_out_image(index)

    def tune(self, model: nn.Module, batches: EpochBatches, ctx: StepContext, optim: Any,
             autocast: Callable[[], ContextManager] = nullcontext) -> None:
        """Train `model` in place: plain CE on the step's labels (background and the new classes),
        every parameter that requires grad, SGD with the run's momentum, weight decay and poly
        schedule (`optim`, an OptimConfig); `ctx.epochs` is the step's number of epochs."""
        epochs = ctx.epochs if self.epochs is None else self.epochs
        lr = optim.lr_next if self.lr is None else self.lr
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov,
                              weight_decay=optim.weight_decay)
        t0 = time.perf_counter()
        iters, losses, images = 0, [], 0
        first = batches(0)
        total = epochs * (len(first) if isinstance(first, Sized) else 1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda it: max(0.0, 1.0 - min(it, total) / max(1, total)) ** optim.poly_power)
        device = params[0].device if params else torch.device("cpu")
        scaler = torch.amp.GradScaler("cuda", enabled=optim.amp == "fp16" and device.type == "cuda")
        model.train()
        with torch.enable_grad():
            for epoch in range(epochs):
                loss_sum = torch.zeros((), device=device)
                n = 0
                for batch in (first if epoch == 0 else batches(epoch)):
                    with autocast():
                        out: SegOutput = model(batch.image)
                    loss = cross_entropy(out.logits[:, : ctx.num_seen].float(), batch.label)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    loss_sum += loss.detach()
                    n += 1
                    if epoch == 0:
                        images += batch.image.shape[0]
                losses.append(float(loss_sum) / max(1, n))
                iters += n
        model.eval()
        if not (all(np.isfinite(losses)) and all(bool(torch.isfinite(p).all()) for p in params)):
            raise ValueError(f"{self.name}: the pseudo fine-tune diverged (epoch losses {losses}); "
                             f"give it a lower lr: build_calibrator('{self.name}', lr={lr / 10:g})")
        self.info = {"tune_s": time.perf_counter() - t0, "tune_epochs": epochs, "tune_lr": lr,
                     "tune_iterations": iters, "tune_images": images, "tune_losses": losses}

    def tuned_logits(self, out: SegOutput, ctx: StepContext) -> torch.Tensor:
        """The re-trained copy's decision logits: the ones its softmax CE trained (extra outputs and
        the method's own decision rule left out). (B, num_seen, H, W)"""
        return out.logits[:, : ctx.num_seen].float()


@dataclass
class PCVMethod(PCV):
    """PCV whose pseudo step is the run's method on the pseudo-fine-tuning half: its losses against
    the old model, its hooks and phases, its state as the previous step left it. Plain PCV measures
    the bias of fine-tuning and gives it to every method (on MiB, which has little, it costs points)."""

    name = "pcv_method"
    trains_method = True
    # version 1 trained SSUL on all the step's images (held-out half included) and kept state a later
    # step had loaded into the method (PLOP's step-1 thresholds, NeST's generated step)
    version = 2


@dataclass
class Agree(Calibrator):
    """Best Dice between the calibrated model's old-class predictions and the old model's confident
    ones on the background-labelled pixels, among the gammas that lose at most `tolerance` of the
    labelled new-class pixels the raw model gets right."""

    name = "agree"
    needs_old = True
    threshold: float = 0.0  # the old model's argmax, as `share` (0.7 leaves almost no old pixel)
    tolerance: float = 0.01
    calibrated_old: bool = True
    ignore_unsure: bool = True

    def start(self, ctx):  # type: ignore[override]
        self._sweep = GammaSweep(ctx.num_seen, ctx.num_old) if ctx.num_old >= 2 else None
        self._new_right = 0
        return super().start(ctx)

    def update(self, logits, label, old_logits=None):  # type: ignore[override]
        assert self._sweep is not None and old_logits is not None
        new = (label != IGNORE) & (label >= self._ctx.num_old)
        self._new_right += int((new & (logits.argmax(1) == label)).sum())
        self._sweep.update(logits, pseudo_labelled(label, old_logits, self.threshold, self.ignore_unsure))

    def finish(self) -> float:
        assert self._sweep is not None
        u = list(range(1, self._ctx.num_old))
        bg_rows = [BACKGROUND] + u  # the background-labelled pixels, pseudo-labelled or not
        new = list(range(self._ctx.num_old, self._ctx.num_seen))
        scores = []
        for m in self._sweep.matrices().double():
            hit = float(m[u, u].sum())
            dice = 2 * hit / max(1.0, float(m[bg_rows][:, u].sum() + m[u].sum()))
            kept = float(m[new, new].sum()) >= (1 - self.tolerance) * self._new_right
            scores.append(dice if kept else float("nan"))
        self.gamma = best_finite_gamma(self._sweep, scores)
        self.info = {"pixels": self._sweep.counted()}
        return self.gamma
