"""The re-training a calibrator that declares `needs_training` asks for (the paper's pseudo
cross-validation): a copy of the step's starting model trained on one part of the step's images,
by the calibrator's own `tune` or, for one that `trains_method`, as the run's method trains a step;
its logits on the other part streamed to the calibrators that share that training setup."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ciss.config import RunConfig
from ciss.engine.data import (DeviceLoader, batch_loader, eval_transform, ordered_loader, progress_batches,
                              train_transform)
from ciss.engine.distributed import DistInfo, autocast_ctx
from ciss.engine.loop import TrainingDiverged, train_phase
from ciss.engine.seeding import derived_seed, seed_everything
from ciss.methods import Method, build_method
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
                  scenario: Scenario, device: torch.device, show: bool = False,
                  method: Optional[Method] = None, old_model: Optional[nn.Module] = None,
                  method_state: Optional[dict[str, Any]] = None) -> None:
    """Train `start` (a copy the caller owns) on the images the first calibrator's `held_out`
    rejects, with the step's augmentation, batch size and epochs (its `tune`, or `pseudo_step` for
    a calibrator that `trains_method`: `method`, `old_model` and `method_state`, the method's state
    as the previous step left it, are then needed), then stream the held-out images at evaluation
    size to every calibrator of `group` (label -> calibrator, one training setup) with the copy's
    logits and `old_of(label, old_logits(images))`. `ctx`: the step's, with its number of epochs.
    Under torchrun every process trains the same copy, unwrapped."""
    o = cfg.optim
    step = ctx.step
    lead = next(iter(group.values()))
    part = step_part(scenario, step, train_transform(cfg), lead.held_out, which=False)
    held = step_part(scenario, step, eval_transform(cfg), lead.held_out, which=True)
    if len(part) == 0 or len(held) == 0:
        for c in group.values():
            c.info = {"skipped": f"{len(part)} images to fine-tune on, {len(held)} held out"}
        return
    if lead.trains_method:
        if method is None or old_model is None or method_state is None:
            raise ValueError(f"{lead.name} trains the run's method: give method, old_model and method_state")
        ctx = dataclasses.replace(ctx, epochs=ctx.epochs if lead.epochs is None else lead.epochs)
        method = pseudo_step(lead, start, old_model, method, method_state, part, ctx, cfg, scenario, device,
                             show)

        def decision(out: Any) -> torch.Tensor:
            return method.eval_logits(out, ctx).float()  # type: ignore[union-attr]
    else:
        # every process trains the same copy on all of `part`: not sharded
        loader = batch_loader(part, o.batch_size, True, cfg, DistInfo(), device)
        g = loader.generator

        def epoch_batches(epoch: int) -> DeviceLoader:  # its own random stream, apart from training's
            s = derived_seed(cfg.seed, "calibration", lead.name, step, epoch)
            seed_everything(s)
            g.manual_seed(s)
            return DeviceLoader(loader, device)

        lead.tune(start, epoch_batches, ctx, o, lambda: autocast_ctx(device, o.amp))

        def decision(out: Any) -> torch.Tensor:
            return lead.tuned_logits(out, ctx)
    net = inference_copy(start)
    held_loader = ordered_loader(held, cfg)
    for batch in progress_batches(held_loader, device, f"fit {', '.join(group)} step {step}", show):
        with autocast_ctx(device, o.amp):
            out = net(batch.image)
        logits = decision(out)
        old = old_logits(batch.image)
        for k, c in group.items():
            c.update(logits, batch.label, old_of(k, old))
    tuned = dict(lead.info)  # the shared fine-tune's record
    for c in group.values():
        c.info = dict(tuned)
        c.finish()
        c.info["held_out_images"] = len(held)


def pseudo_step(lead: Any, start: nn.Module, old_model: nn.Module, method: Method, method_state: dict[str, Any],
                part: StepDataset, ctx: StepContext, cfg: RunConfig, scenario: Scenario, device: torch.device,
                show: bool = False) -> Method:
    """Train `start` in place on `part` as the run trains a step: a copy of `method` holding
    `method_state`, its training data (memory included), `on_step_start`, every phase of the
    engine's loop (losses against `old_model`, param groups, train mode), `on_step_end`; lr
    `lead.lr` or the run's `lr_next`, `ctx.epochs` epochs. Its random stream is its own. Returns
    the method copy (its `eval_logits` decide). The run's method and models are not touched."""
    o = cfg.optim
    step = ctx.step
    t0 = time.perf_counter()
    # a fresh method of the run's configuration: a copy of `method` would keep, wherever
    # `method_state` has no key (a step-0 checkpoint holds none), what a later step loaded into it
    m = build_method(cfg.method, **cfg.method_args)
    if type(m) is not type(method):
        raise ValueError(f"{lead.name}: the run's method is {cfg.method}, got a {type(method).__name__}")
    m.load_state_dict(method_state)
    seed = derived_seed(cfg.seed, "calibration", lead.name, step)
    seed_everything(seed)
    # the data as the run composes it (a memory and its batch mixing take the run's seed); the loop
    # below draws from the pseudo step's own stream
    data, batch_sampler = m.train_data(part, scenario, step, part.transform, o.batch_size, cfg.seed, old_model)
    loader = batch_loader(data, o.batch_size, True, cfg, DistInfo(), device, batch_sampler, m.name)
    ctx = dataclasses.replace(ctx, iters_per_epoch=len(loader))
    lr = o.lr_next if lead.lr is None else lead.lr
    dev_loader = DeviceLoader(loader, device)
    losses: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, torch.enable_grad():  # the evaluator runs without grad
        m.on_step_start(start, old_model, dev_loader, ctx)
        try:
            for i, phase in enumerate(m.phases(ctx)):
                train_phase(start, old_model, loader, ctx, phase, i, lr, None, method=m, optim=o, device=device,
                            show_progress=show, last_ckpt=Path(tmp) / "none.pt", seed=seed,
                            epoch_done=lambda _i, _p, _e, means, _o, _s: losses.append(means))
        except TrainingDiverged as exc:
            raise ValueError(f"{lead.name}: the pseudo step diverged ({exc}); give it a lower lr: "
                             f"build_calibrator('{lead.name}', lr={lr / 10:g})") from None
        m.on_step_end(start, old_model, dev_loader, ctx)
    start.eval()
    lead.info = {"tune_s": time.perf_counter() - t0, "tune_epochs": ctx.epochs, "tune_lr": lr,
                 "tune_iterations": ctx.epochs * len(loader), "tune_images": len(data),
                 "tune_losses": [l.get("loss") for l in losses]}
    return m
