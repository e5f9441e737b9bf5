"""The re-training a calibrator that declares `needs_training` asks for (the paper's pseudo
cross-validation): a copy of the step's starting model trained on one part of the step's images,
its logits on the other part streamed to the calibrators that share that training setup."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ciss.config import RunConfig
from ciss.engine.data import (DeviceLoader, batch_loader, eval_transform, ordered_loader, progress_batches,
                              train_transform)
from ciss.engine.distributed import DistInfo, autocast_ctx
from ciss.engine.seeding import derived_seed, seed_everything
from ciss.models import inference_copy
from ciss.scenario import Scenario, StepDataset
from ciss.types import StepContext


def step_part(scenario: Scenario, step: int, transform: Any, held_out: Callable[[int], bool],
              which: bool) -> StepDataset:
    """The step's training images whose `held_out(index)` is `which`."""
    data = scenario.train_dataset(step, transform)
    keep = np.array([held_out(int(i)) == which for i in data.indices], dtype=bool)
    return StepDataset(data.data, data.indices[keep], data.lut, transform)


def fit_retrained(group: dict[str, Any], start: nn.Module, old_logits: Callable[[torch.Tensor], torch.Tensor],
                  old_of: Callable[[str, torch.Tensor], torch.Tensor], ctx: StepContext, cfg: RunConfig,
                  scenario: Scenario, device: torch.device, show: bool = False) -> None:
    """Train `start` (a copy the caller owns) on the images the first calibrator's `held_out`
    rejects, with the step's augmentation, batch size and epochs (its `tune`), then stream the
    held-out images at evaluation size to every calibrator of `group` (label -> calibrator, one
    training setup) with the copy's logits and `old_of(label, old_logits(images))`. `ctx`: the
    step's, with its number of epochs. Under torchrun every process trains the same copy, unwrapped."""
    o = cfg.optim
    step = ctx.step
    lead = next(iter(group.values()))
    part = step_part(scenario, step, train_transform(cfg), lead.held_out, which=False)
    held = step_part(scenario, step, eval_transform(cfg), lead.held_out, which=True)
    if len(part) == 0 or len(held) == 0:
        for c in group.values():
            c.info = {"skipped": f"{len(part)} images to fine-tune on, {len(held)} held out"}
        return
    # every process trains the same copy on all of `part`: not sharded
    loader = batch_loader(part, o.batch_size, True, cfg, DistInfo(), device)
    g = loader.generator

    def epoch_batches(epoch: int) -> DeviceLoader:  # its own random stream, apart from training's
        s = derived_seed(cfg.seed, "calibration", lead.name, step, epoch)
        seed_everything(s)
        g.manual_seed(s)
        return DeviceLoader(loader, device)

    lead.tune(start, epoch_batches, ctx, o, lambda: autocast_ctx(device, o.amp))
    net = inference_copy(start)
    held_loader = ordered_loader(held, cfg)
    for batch in progress_batches(held_loader, device, f"fit {', '.join(group)} step {step}", show):
        with autocast_ctx(device, o.amp):
            out = net(batch.image)
        logits = lead.tuned_logits(out, ctx)
        old = old_logits(batch.image)
        for k, c in group.items():
            c.update(logits, batch.label, old_of(k, old))
    tuned = dict(lead.info)  # the shared fine-tune's record
    for c in group.values():
        c.info = dict(tuned)
        c.finish()
        c.info["held_out_images"] = len(held)
