"""EWC (Kirkpatrick et al., PNAS 2017) as run by MiB: cross-entropy + a quadratic penalty that keeps
every parameter of the previous step near its old value, weighted by its Fisher information."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ciss.losses import cross_entropy
from ciss.methods.base import Method
from ciss.types import IGNORE, Batch, SegOutput, StepContext, Targets


def estimate_fisher(model: nn.Module, loader: Iterable[Batch], num_seen: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: per trainable parameter, the mean over batches of the squared
    gradient of the batch's cross-entropy on its labels. Returns {name: tensor like the parameter}."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    # Eval mode: BatchNorm running statistics must not move during the estimate.
    model.eval()
    batches = 0
    for batch in loader:
        if not bool((batch.label != IGNORE).any()):
            continue  # no labelled pixel: the CE is undefined
        loss = cross_entropy(model(batch.image).logits[:, :num_seen], batch.label)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:
                fisher[name] += g.detach().pow(2)
        batches += 1
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():  # every rank must penalise with the same Fisher
        for f in fisher.values():
            dist.all_reduce(f)
        batches *= dist.get_world_size()
    return {n: f / max(batches, 1) for n, f in fisher.items()}


def min_max_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rescale a tensor to [0, 1] by its own minimum and maximum (a constant tensor gives zeros)."""
    # MiB utils/regularizer.py normalize_fn: (F - min) / (max - min + 1e-8), per parameter tensor.
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


def ewc_penalty(params: dict[str, torch.Tensor], old: dict[str, torch.Tensor],
                importance: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over the parameters in `old` of importance * (p - p_old)^2. Scalar."""
    zero = next(iter(params.values())).new_zeros(())
    return sum(((importance[n] * (params[n] - old[n]).pow(2)).sum() for n in old), zero)


@dataclass
class EWC(Method):
    """CE + `reg_importance` x sum F (theta - theta_old)^2 over the previous step's parameters."""

    name = "ewc"

    # PLOP argparser.py 'EWC': 100 (MiB's preset is 500, SDR's 1000). The normalised Fisher peaks at 1, so
    # Nesterov SGD diverges once lr_next > 0.68 / reg_importance: 500 holds at MiB's 0.001 only, 100 also
    # at cpu-short's 0.005, not at the cpu recipe's 0.01 (its v2 grid sets 50). Set 500 with the paper
    # recipe to reproduce MiB's EWC.
    reg_importance: float = 100.0
    # MiB argparser.py --reg_alpha default 0.9: F = alpha F_new + (1 - alpha) F_prev. MiB applies it
    # at every iteration to the squared gradients; here once per step, to the step's Fisher.
    reg_alpha: float = 0.9
    # MiB argparser.py --reg_no_normalize default False: each tensor's Fisher is min-max normalised
    # before the penalty (reg_importance is calibrated for it).
    normalize: bool = True

    # State, not hyperparameters: Fisher and parameters at the end of step `fisher_step`.
    fisher: Optional[dict[str, torch.Tensor]] = field(default=None, init=False, repr=False, compare=False)
    old_params: Optional[dict[str, torch.Tensor]] = field(default=None, init=False, repr=False,
                                                          compare=False)
    fisher_step: int = field(default=-1, init=False, repr=False, compare=False)
    # The model being trained (the loss hook gets outputs only) and the penalty weights on its device.
    _model: Optional[nn.Module] = field(default=None, init=False, repr=False, compare=False)
    _importance: Optional[dict[str, torch.Tensor]] = field(default=None, init=False, repr=False,
                                                           compare=False)

    def step_end_from_model(self) -> bool:
        # Step 0 is CE training and the Fisher a pass over its data: the step-0 checkpoint is the other
        # CE methods', and a run that loads it estimates the Fisher on it.
        return True

    # ---- step life cycle --------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, old_model: Optional[nn.Module],
                      loader: Iterable[Batch], ctx: StepContext) -> None:
        self._model = model
        if ctx.step == 0:
            return
        if self.fisher is None or self.fisher_step != ctx.step - 1:
            raise RuntimeError(
                f"EWC has no Fisher information of step {ctx.step - 1} (it has "
                f"{'none' if self.fisher is None else f'step {self.fisher_step}'}): that step was not "
                f"trained with method=ewc in this run (e.g. init_from a model file); train every step "
                f"with method=ewc")
        device = next(model.parameters()).device
        self.fisher = {n: f.to(device) for n, f in self.fisher.items()}
        self.old_params = {n: p.to(device) for n, p in self.old_params.items()}  # type: ignore[union-attr]
        self._importance = None

    def on_step_end(self, model: nn.Module, old_model: Optional[nn.Module],
                    loader: Iterable[Batch], ctx: StepContext) -> None:
        new = estimate_fisher(model, loader, ctx.num_seen)
        prev = self.fisher or {}
        # Without a previous estimate (step 0, the classifier added at this step) F = F_new.
        self.fisher = {n: self.reg_alpha * f + (1 - self.reg_alpha) * prev[n].to(f) if n in prev else f
                       for n, f in new.items()}
        self.old_params = {n: p.detach().clone() for n, p in model.named_parameters() if n in new}
        self.fisher_step = ctx.step
        self._importance = None

    # ---- per batch ------------------------------------------------------------------------
    def importance(self) -> dict[str, torch.Tensor]:
        """The penalty's per-parameter weights: the stored Fisher, normalised if `normalize`."""
        if self._importance is None:
            assert self.fisher is not None
            self._importance = {n: min_max_normalize(f) if self.normalize else f
                                for n, f in self.fisher.items()}
        return self._importance

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """sum F (theta - theta_old)^2 over the parameters of the previous step (the classifiers
        added since have no old value); unscaled."""
        assert self.old_params is not None
        params = dict(model.named_parameters())
        missing = [n for n, p in self.old_params.items() if n not in params or params[n].shape != p.shape]
        if missing:
            raise ValueError(f"EWC: the model lacks (or reshaped) parameters of the previous step: "
                             f"{missing[:5]}")
        # MiB regularizer.py EWC.penalty: parameters of the old model that still require grad.
        old = {n: p for n, p in self.old_params.items() if params[n].requires_grad}
        return ewc_penalty(params, old, self.importance())

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        ce = cross_entropy(out.logits[:, : ctx.num_seen], targets.label, targets.weight)
        if ctx.step == 0 or self.fisher is None:  # step 0: plain CE, nothing to keep yet
            return {"loss": ce, "ce": ce}
        if self._model is None:
            raise RuntimeError("EWC needs the trained model; call on_step_start(model, ...) first")
        reg = self.reg_importance * self.penalty(self._model)
        return {"loss": ce + reg, "ce": ce, "ewc": reg}

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.fisher is None or self.old_params is None:
            return {}
        return {"fisher": {n: f.detach().cpu().clone() for n, f in self.fisher.items()},
                "old_params": {n: p.detach().cpu().clone() for n, p in self.old_params.items()},
                "fisher_step": int(self.fisher_step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"fisher", "old_params", "fisher_step"}
        if unknown:
            raise ValueError(f"method 'ewc': unknown state keys {sorted(unknown)}")
        if not state:  # a checkpoint without EWC state (another method's): on_step_start says so
            return
        self.fisher = {n: torch.as_tensor(f) for n, f in state["fisher"].items()}
        self.old_params = {n: torch.as_tensor(p) for n, p in state["old_params"].items()}
        self.fisher_step = int(state["fisher_step"])
        self._importance = None
