"""The method contract. Every hook's default is plain fine-tuning; a method overrides a few.

The engine calls, per step t:
  init_new_classifiers (t >= 1) -> on_step_start -> for each phase: on_phase_start, param_groups,
  [train_mode, forward, old forward if needs_old_model, make_targets, loss, backward]*, on_phase_end
  -> on_step_end -> evaluation through `eval_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from ciss.losses import cross_entropy
from ciss.types import Batch, SegOutput, StepContext, Targets


@dataclass(frozen=True)
class Phase:
    """A stretch of training inside a step with its own parameters (e.g. NeST's pre-tuning)."""

    name: str
    epochs: int
    lr_scale: float = 1.0


@dataclass
class Method:
    """Fine-tuning: cross-entropy on the current step's labels, every parameter trained."""

    name: ClassVar[str] = "ft"
    # Forward the frozen previous-step model on every batch and pass its output to the hooks.
    needs_old_model: ClassVar[bool] = False
    # Train once on all classes of the scenario (the offline upper bound) instead of step by step.
    offline: ClassVar[bool] = False
    # Uses images of past steps (exemplar memory); results are labelled as such.
    uses_memory: ClassVar[bool] = False

    # ---- identity -------------------------------------------------------------------------
    def base_step_key(self) -> str:
        """Identifies how step 0 is trained; methods with equal keys share step-0 checkpoints."""
        return "ce"

    def step_end_from_model(self) -> bool:
        """True when what on_step_end keeps is a function of the trained model and the step's data
        alone (EWC's Fisher): a shared step-0 checkpoint then stores none of it, and a run that
        loads one reruns on_step_end on it."""
        return False

    def num_extra_outputs(self) -> int:
        """Outputs appended after the real classes (e.g. an 'unknown' logit)."""
        return 0

    def architecture(self) -> dict[str, Any]:
        """Options of `build_segmenter` the method's model needs (e.g. parallel branches)."""
        return {}

    # ---- data -----------------------------------------------------------------------------
    def train_data(self, data: Dataset, scenario: Any, step: int, transform: Callable,
                   batch_size: int, seed: int, old_model: Optional[nn.Module] = None
                   ) -> tuple[Dataset, Optional[Sampler]]:
        """The step's training set and, optionally, a batch sampler composing the batches.

        `data` yields (image, label, index); a method may wrap it (items may carry a 4th element,
        a dict of extra per-pixel maps that land in `Batch.extra`) or mix in other images.
        `old_model` is the model of the previous step (None at step 0), in eval mode.
        """
        return data, None

    # ---- step life cycle ----------------------------------------------------------------
    def init_new_classifiers(self, model: nn.Module, old_model: nn.Module, ctx: StepContext) -> None:
        """Called right after the classifier grew; default keeps the random initialisation."""

    def on_step_start(self, model: nn.Module, old_model: Optional[nn.Module],
                      loader: Iterable[Batch], ctx: StepContext) -> None:
        """Before training a step, e.g. thresholds or prototypes computed over the step's data."""

    def phases(self, ctx: StepContext) -> list[Phase]:
        return [Phase("train", ctx.epochs)]

    def on_phase_start(self, phase: Phase, model: nn.Module, old_model: Optional[nn.Module],
                       loader: Iterable[Batch], ctx: StepContext) -> None:
        """Before a phase's optimizer is built."""

    def on_phase_end(self, phase: Phase, model: nn.Module, old_model: Optional[nn.Module],
                     loader: Iterable[Batch], ctx: StepContext) -> None:
        """After a phase."""

    def on_step_end(self, model: nn.Module, old_model: Optional[nn.Module],
                    loader: Iterable[Batch], ctx: StepContext) -> None:
        """After a step's training, before evaluation and checkpointing."""

    # ---- per batch ------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, ctx: StepContext, phase: Phase) -> list[dict[str, Any]]:
        """Optimizer parameter groups; an optional 'lr_scale' key multiplies the recipe's lr."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def train_mode(self, model: nn.Module, ctx: StepContext, phase: Phase) -> None:
        model.train()

    def make_targets(self, batch: Batch, out: SegOutput, old: Optional[SegOutput],
                     ctx: StepContext) -> Targets:
        return Targets(label=batch.label)

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named loss terms; "loss" is the total that is back-propagated."""
        ce = cross_entropy(out.logits[:, : ctx.num_seen], targets.label, targets.weight)
        return {"loss": ce, "ce": ce}

    # ---- evaluation -----------------------------------------------------------------------
    def eval_logits(self, out: SegOutput, ctx: StepContext) -> torch.Tensor:
        """Logits of the seen classes used for prediction, (B, num_seen, H, W)."""
        return out.logits[:, : ctx.num_seen]

    # ---- state kept across steps (saved in checkpoints) --------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method '{self.name}' keeps no state, got keys {sorted(state)}")


def as_method(spec: Any) -> Method:
    """A wrapped method's base, given as a Method, a registry name or {name: ..., <fields>}."""
    if isinstance(spec, Method):
        return spec
    from ciss.methods import build_method  # the registry imports the wrappers that call this

    if isinstance(spec, str):
        return build_method(spec)
    if isinstance(spec, dict) and "name" in spec:
        return build_method(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    raise ValueError(f"base must be a Method, a method name or {{name: ..., <fields>}}, got {spec!r}")


@dataclass
class Wrapper(Method):
    """A method added on top of another (`GSC(base=PLOP())`, `NeST(base=MiB())`): every hook and
    property is the base's unless the wrapper overrides it, so a wrapper never drops a hook."""

    name: ClassVar[str] = "wrapper"
    base: Method = field(default_factory=Method)

    def __post_init__(self) -> None:
        self.base = as_method(self.base)

    @property
    def needs_old_model(self) -> bool:  # type: ignore[override]
        return self.base.needs_old_model

    @property
    def offline(self) -> bool:  # type: ignore[override]
        return self.base.offline

    @property
    def uses_memory(self) -> bool:  # type: ignore[override]
        return self.base.uses_memory

    def base_step_key(self) -> str:
        return self.base.base_step_key()

    def step_end_from_model(self) -> bool:
        return self.base.step_end_from_model()

    def num_extra_outputs(self) -> int:
        return self.base.num_extra_outputs()

    def architecture(self) -> dict[str, Any]:
        return self.base.architecture()

    def train_data(self, data, scenario, step, transform, batch_size, seed,  # type: ignore[override]
                   old_model=None):
        return self.base.train_data(data, scenario, step, transform, batch_size, seed, old_model)

    def init_new_classifiers(self, model, old_model, ctx):  # type: ignore[override]
        self.base.init_new_classifiers(model, old_model, ctx)

    def on_step_start(self, model, old_model, loader, ctx):  # type: ignore[override]
        self.base.on_step_start(model, old_model, loader, ctx)

    def phases(self, ctx):  # type: ignore[override]
        return self.base.phases(ctx)

    def on_phase_start(self, phase, model, old_model, loader, ctx):  # type: ignore[override]
        self.base.on_phase_start(phase, model, old_model, loader, ctx)

    def on_phase_end(self, phase, model, old_model, loader, ctx):  # type: ignore[override]
        self.base.on_phase_end(phase, model, old_model, loader, ctx)

    def on_step_end(self, model, old_model, loader, ctx):  # type: ignore[override]
        self.base.on_step_end(model, old_model, loader, ctx)

    def param_groups(self, model, ctx, phase):  # type: ignore[override]
        return self.base.param_groups(model, ctx, phase)

    def train_mode(self, model, ctx, phase):  # type: ignore[override]
        self.base.train_mode(model, ctx, phase)

    def make_targets(self, batch, out, old, ctx):  # type: ignore[override]
        return self.base.make_targets(batch, out, old, ctx)

    def loss(self, out, targets, old, batch, ctx):  # type: ignore[override]
        return self.base.loss(out, targets, old, batch, ctx)

    def eval_logits(self, out, ctx):  # type: ignore[override]
        return self.base.eval_logits(out, ctx)

    def state_dict(self) -> dict[str, Any]:
        base = self.base.state_dict()
        return {"base": base} if base else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state.get("base", {}))
