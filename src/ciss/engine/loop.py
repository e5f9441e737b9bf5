"""The training loop of one phase of a step: SGD with a poly schedule over the step's batches.

It knows no method by name. Per batch: forward the model; forward the frozen old model once if the
method needs it; the method's targets and loss terms; backward, clip, step. Per epoch: the mean of
every loss term goes to `epoch_done` (which logs it and checkpoints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ciss.config import OptimConfig
from ciss.engine.data import DeviceLoader, iter_batches
from ciss.engine.distributed import autocast_ctx, unwrap
from ciss.engine.seeding import seed_epoch
from ciss.methods import Method, Phase
from ciss.models import inference_copy
from ciss.types import SegOutput, StepContext

# (phase index, phase, epoch, mean loss terms, optimizer, scheduler), after each epoch
EpochDone = Callable[[int, Phase, int, dict[str, float], torch.optim.Optimizer,
                      torch.optim.lr_scheduler.LRScheduler], None]


class TrainingDiverged(ValueError):
    """The loss became NaN/inf or blew up, or a weight stopped being finite: a setting to change
    (the step's lr), not a bug. The partial checkpoint of the diverging step is discarded."""


# A loss this many times the phase's first one is a blow-up, not learning (a step's losses start at
# their largest; lr 1e6 took step 0 of ccp21 from about 3 to 1.5e11 before any NaN).
BLOWUP = 1e4


def poly_lambda(total_iters: int, power: float):
    total = max(1, total_iters)
    return lambda it: max(0.0, 1.0 - min(it, total) / total) ** power


def train_phase(model: nn.Module, old_model: Optional[nn.Module], loader: DataLoader,
                ctx: StepContext, phase: Phase, phase_idx: int, lr: float, resume: Optional[dict], *,
                method: Method, optim: OptimConfig, device: torch.device, show_progress: bool,
                last_ckpt: Path, epoch_done: EpochDone, seed: int = 0) -> None:
    """Train `phase` of step `ctx.step`; `resume` is a partial checkpoint to continue from."""
    core = unwrap(model)
    method.on_phase_start(phase, core, old_model, DeviceLoader(loader, device), ctx)
    groups = method.param_groups(core, ctx, phase)
    for g in groups:
        g["lr"] = lr * phase.lr_scale * g.pop("lr_scale", 1.0)
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError(f"method '{method.name}' returned no trainable parameter for "
                         f"phase '{phase.name}' of step {ctx.step}")
    opt = torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov,
                          weight_decay=optim.weight_decay)
    total = phase.epochs * max(1, len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(total, optim.poly_power))
    scaler = torch.amp.GradScaler("cuda", enabled=optim.amp == "fp16" and device.type == "cuda")
    start_epoch = 0
    if resume is not None and resume["phase"] == phase_idx:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start_epoch = resume["epoch"] + 1
    params = [p for g in groups for p in g["params"]]
    # The old model only runs forward, in eval mode: its BN folded into the convs (same outputs to
    # float rounding, about a quarter of its time saved on a CPU).
    old_forward = inference_copy(old_model) if old_model is not None and method.needs_old_model else None
    # Loss terms are summed on the device and read once per epoch; finiteness is checked every
    # iteration on a CPU (free there) and every `sync_every` iterations on a GPU, where each read
    # stalls the queue of kernels.
    sync_every = 1 if device.type == "cpu" else 20

    def diverged(epoch: int, what: str) -> TrainingDiverged:
        last_ckpt.unlink(missing_ok=True)  # the diverging trajectory is not kept
        key = "optim.lr" if ctx.step == 0 else "optim.lr_next"
        return TrainingDiverged(
            f"step {ctx.step} diverged (phase '{phase.name}', epoch {epoch + 1}: {what}). Lower "
            f"{key} (now {lr:g}): rerun the same command with --set {key}={lr / 10:g}; the finished "
            f"steps in {last_ckpt.parent} are kept and step {ctx.step} starts again.")

    first_loss: Optional[float] = None

    for epoch in range(start_epoch, phase.epochs):
        seed_epoch(seed, ctx.step, phase_idx, epoch, loader)  # as if no epoch had run before it
        sums: dict[str, torch.Tensor] = {}
        n = 0
        bar = tqdm(iter_batches(loader, device), total=len(loader), leave=False, disable=not show_progress,
                   desc=f"step {ctx.step} {phase.name} epoch {epoch + 1}/{phase.epochs}")
        for batch in bar:
            method.train_mode(core, ctx, phase)
            with autocast_ctx(device, optim.amp):
                out: SegOutput = model(batch.image)
                old_out = None
                if old_forward is not None:
                    with torch.no_grad():  # not inference_mode: losses may save its outputs
                        old_out = old_forward(batch.image)
                targets = method.make_targets(batch, out, old_out, ctx)
                terms = method.loss(out, targets, old_out, batch, ctx)
            loss = terms["loss"]
            if n % sync_every == 0:
                value = float(loss.detach())
                first_loss = value if first_loss is None else first_loss
                if not np.isfinite(value) or abs(value) > BLOWUP * max(abs(first_loss), 1e-3):
                    raise diverged(epoch, f"loss {value:g}, {abs(first_loss):g} at its start "
                                   f"({ {k: float(v.detach()) for k, v in terms.items()} })")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if optim.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            for k, v in terms.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v.clone()
            n += 1
            if not bar.disable and n % sync_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        means = {k: float(v) / max(1, n) for k, v in sums.items()}
        if not all(np.isfinite(v) for v in means.values()):
            raise diverged(epoch, f"mean losses {means}")
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise diverged(epoch, "a weight is no longer finite")
        epoch_done(phase_idx, phase, epoch, means, opt, sched)
    method.on_phase_end(phase, core, old_model, DeviceLoader(loader, device), ctx)
