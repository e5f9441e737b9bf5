"""NeST (Xie et al., ECCV 2024, "Early Preparation Pays Off: New Classifier Pre-tuning for Class
Incremental Semantic Segmentation"), a wrapper over any base method: before a step's formal training,
the new classifiers are generated from all old classifiers, w_n = sum_c P[n, c] * (M[n, c] * W_old[c]),
with per-new-class importance matrices M (channel level) and projection matrices P (class level)
initialised from cross-task class similarity; only M, P (and the new biases) are pre-tuned, then the
generated classifiers are written into the model's new 1x1 conv and the base method trains as usual.

The generation itself (matrices, similarity, hooks) is in `nest_generation`; this module holds the
method: when the matrices are made, pre-tuned and written, and what the pre-tuning optimises.
Formulas settled against the official code (zhengyuan-xie/ECCV24_NeST); files are named beside each choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ciss.losses import unbiased_cross_entropy
from ciss.methods.base import Method, Phase, Wrapper
from ciss.methods.mib import MiB
from ciss.methods.nest_generation import (INITS, SOURCES, ClassifierTransform, attach_generation,
                                          class_similarity, initial_matrices)
from ciss.methods.plop import PLOP
from ciss.types import Batch, SegOutput, StepContext, Targets

PRETUNE = "pretune"
PRETUNE_LOSSES = ("unce", "base")
NEW_BIASES = ("fresh", "background")

__all__ = ["NeST", "NeSTMiB", "NeSTPLOP", "ClassifierTransform", "class_similarity", "PRETUNE",
           "INITS", "SOURCES", "PRETUNE_LOSSES", "NEW_BIASES"]


@dataclass
class NeST(Wrapper):
    """Pre-tune generated new classifiers (phase "pretune"), then train with the base method."""

    name = "nest"

    base: Method = field(default_factory=MiB)
    # ECCV24_NeST argparser.py 'ours': warm_epochs 5 on VOC (15 on ADE20K); 0 skips the pre-tuning
    # but still writes the (initialised) generated classifiers.
    pretune_epochs: int = 5
    # ECCV24_NeST scripts/voc/*: --warm_lr_scale 1 (the pre-tune lr is the step's lr times this).
    pretune_lr_scale: float = 1.0
    # "similarity" (the paper's), "uniform" (every channel and old class alike: the mean old classifier)
    # or "random" (ECCV24_NeST segmentation_module.py: kaiming_normal_ fan_out, the matrices' default).
    init: str = "similarity"
    # Ablation of the paper's Sec. 4.3 ("equally treated channels"): M starts at 1 while P keeps the
    # start `init` gives it (with "similarity", softmax_c of the summed similarity). False: the paper's.
    uniform_channels: bool = False
    # Which old classifiers generate the new ones: "all" (the paper's, Sec. 3.2) or "background" (the
    # background classifier alone, as MiB's init: the paper's ablation of the source classifiers, the
    # official init_via_weight's commented "only bg transform" line); M is then (N, 1, D), P (N, 1).
    sources: str = "all"
    # ECCV24_NeST argparser.py 'ours' / scripts: --unce_in_warm, no KD in warm-up, for MiB and PLOP alike:
    # MiB's unbiased CE on the raw labels. "base" pre-tunes with the base method's own targets and loss.
    pretune_loss: str = "unce"
    # ECCV24_NeST weight_old_bg / weight_new_bg: the background row is pre-tuned through its own
    # channel weights and scale, then written back at its old norm.
    transform_background: bool = True
    # ECCV24_NeST init_via_weight: new biases rescaled by |old biases| / |new biases|, then every new row
    # by mean |old row| / mean |new row| (align_weight "all").
    align: bool = True
    # ECCV24_NeST scripts/voc/plop+ours_*.sh: --fix_pre_cls, old classifiers frozen in formal training.
    freeze_old_classifiers: bool = False
    # ECCV24_NeST train.py select(): similarity measured on 128x128 resized maps.
    similarity_size: int = 128
    # Where the new biases start. "fresh": one value of a freshly initialised classifier conv
    # (PyTorch's default init), repeated, which is what the official code runs with: its new_bias is
    # taken from cls[0].bias[0] when the model is built, before the previous step's weights are
    # loaded, and no checkpoint holds it. "background": the old model's trained background bias,
    # repeated, which that code's comment intends.
    new_bias: str = "fresh"

    # State, not hyperparameters.
    transform: Optional[ClassifierTransform] = field(default=None, init=False, repr=False, compare=False)
    transform_step: int = field(default=-1, init=False, repr=False, compare=False)
    generated_step: int = field(default=-1, init=False, repr=False, compare=False)
    _pretuning: bool = field(default=False, init=False, repr=False, compare=False)
    _handles: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, valid in (("init", INITS), ("sources", SOURCES), ("pretune_loss", PRETUNE_LOSSES),
                           ("new_bias", NEW_BIASES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"NeST {key} must be one of {valid}, got '{getattr(self, key)}'")
        if self.pretune_epochs < 0:
            raise ValueError(f"NeST pretune_epochs must be >= 0, got {self.pretune_epochs}")

    # ---- step life cycle (every hook not written here is the base's: Wrapper) -----------------
    # NeST acts from step 1 on: step 0 (base_step_key) is the base's.
    def init_new_classifiers(self, model: nn.Module, old_model: nn.Module, ctx: StepContext) -> None:
        """The generated classifiers replace the base's init (ECCV24_NeST run.py: with warm_up, MiB's
        init_balanced is not applied, the background bias keeps its old value)."""

    def on_step_start(self, model: nn.Module, old_model: Optional[nn.Module],
                      loader: Iterable[Batch], ctx: StepContext) -> None:
        self.base.on_step_start(model, old_model, loader, ctx)
        if ctx.step == 0 or old_model is None or self.generated_step == ctx.step:
            return  # step 0, or resumed after this step's classifiers were generated
        if self.transform is None or self.transform_step != ctx.step:
            self.transform = self.initial_transform(model, old_model, loader, ctx)
            self.transform_step = ctx.step
        # else: resumed inside the pre-tuning, the matrices come from the checkpoint
        self.transform.to(model.classifier.convs[0].weight.device)
        if self.pretune_epochs == 0:
            self.write_classifiers(model, ctx)

    def initial_transform(self, model: nn.Module, old_model: nn.Module, loader: Iterable[Batch],
                          ctx: StepContext) -> ClassifierTransform:
        convs = old_model.classifier.convs
        n, d = ctx.num_new, convs[0].weight.shape[1]
        c = ctx.num_old if self.sources == "all" else 1  # the background is the first old row
        similarity = None
        if self.init == "similarity":
            importance, counts = class_similarity(old_model, loader, ctx, self.similarity_size)
            similarity = (importance[:, :c], counts)
        importance, projection = initial_matrices(self.init, (n, c, d), self.uniform_channels, similarity)
        if self.new_bias == "background":
            bias = convs[0].bias.detach()[0].float().repeat(n)
        else:  # the step's new conv is fresh here (NeST skips the base's init): one of its values
            bias = model.classifier.convs[-1].bias.detach()[:1].float().repeat(n)
        bg = (torch.ones(d), torch.ones(1)) if self.transform_background else (None, None)
        transform = ClassifierTransform(importance.cpu(), projection.cpu(), bias.cpu(), *bg)
        if dist.is_available() and dist.is_initialized():  # the random init must not differ between ranks
            dev = model.classifier.convs[0].weight.device
            transform.to(dev)
            for p in transform.parameters():
                dist.broadcast(p.data, src=0)
        return transform

    def phases(self, ctx: StepContext) -> list[Phase]:
        base = self.base.phases(ctx)
        if ctx.step == 0 or self.pretune_epochs == 0:
            return base
        return [Phase(PRETUNE, self.pretune_epochs, self.pretune_lr_scale), *base]

    def on_phase_start(self, phase: Phase, model: nn.Module, old_model: Optional[nn.Module],
                       loader: Iterable[Batch], ctx: StepContext) -> None:
        if phase.name != PRETUNE:
            self.base.on_phase_start(phase, model, old_model, loader, ctx)
            return
        if self.transform is None or self.transform_step != ctx.step:
            raise RuntimeError(f"NeST has no transformation matrices for step {ctx.step}; call "
                               f"on_step_start(model, old_model, loader, ctx) first")
        self.attach(model)
        self._pretuning = True

    def on_phase_end(self, phase: Phase, model: nn.Module, old_model: Optional[nn.Module],
                     loader: Iterable[Batch], ctx: StepContext) -> None:
        if phase.name != PRETUNE:
            self.base.on_phase_end(phase, model, old_model, loader, ctx)
            return
        self.detach()
        self._pretuning = False
        self.write_classifiers(model, ctx)

    def on_step_end(self, model: nn.Module, old_model: Optional[nn.Module],
                    loader: Iterable[Batch], ctx: StepContext) -> None:
        self.base.on_step_end(model, old_model, loader, ctx)

    # ---- the generated classifiers ------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Make the new conv (and the background row) compute the generated weights (hooks)."""
        self.detach()
        self._handles.extend(attach_generation(model, self.transform))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def generated(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The classifier rows the current matrices give, aligned as the official code writes them:
        "weight" (N, D), "bias" (N,), and "background" (D,) when the background row is transformed."""
        convs = model.classifier.convs
        w_old = torch.cat([c.weight for c in convs[:-1]]).flatten(1).float()  # (C_old, D)
        b_old = torch.cat([c.bias for c in convs[:-1]]).float()  # (C_old,)
        return self.transform.written_rows(w_old, b_old, self.align)

    @torch.no_grad()
    def write_classifiers(self, model: nn.Module, ctx: StepContext) -> None:
        """The generated classifiers join the old ones; the matrices are dropped."""
        convs = model.classifier.convs
        g = self.generated(model)
        new = convs[-1]
        new.weight.copy_(g["weight"].reshape(new.weight.shape).to(new.weight.dtype))
        new.bias.copy_(g["bias"].to(new.bias.dtype))
        if "background" in g:
            convs[0].weight[0].copy_(g["background"].reshape(convs[0].weight[0].shape))
        self.transform = None
        self.transform_step = -1
        self.generated_step = ctx.step

    # ---- per batch ------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, ctx: StepContext, phase: Phase) -> list[dict[str, Any]]:
        if phase.name == PRETUNE:
            return [{"params": list(self.transform.parameters())}]
        groups = self.base.param_groups(model, ctx, phase)
        if self.freeze_old_classifiers and ctx.step > 0:
            frozen = {id(p) for c in model.classifier.convs[:-1] for p in c.parameters()}
            groups = [{**g, "params": [p for p in g["params"] if id(p) not in frozen]} for g in groups]
            groups = [g for g in groups if g["params"]]
        return groups

    def train_mode(self, model: nn.Module, ctx: StepContext, phase: Phase) -> None:
        # ECCV24_NeST run.py calls model.train() before each warm-up epoch: BN statistics keep updating.
        self.base.train_mode(model, ctx, phase)

    def make_targets(self, batch: Batch, out: SegOutput, old: Optional[SegOutput],
                     ctx: StepContext) -> Targets:
        if self._pretuning and self.pretune_loss == "unce":
            return Targets(label=batch.label)
        return self.base.make_targets(batch, out, old, ctx)

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        if self._pretuning and self.pretune_loss == "unce":
            unce = unbiased_cross_entropy(out.logits[:, : ctx.num_seen], targets.label, ctx.num_old,
                                          targets.weight)
            return {"loss": unce, "pretune_unce": unce}
        return self.base.loss(out, targets, old, batch, ctx)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # Mid-pre-tune checkpoints carry the matrices, so a resumed pre-tuning continues from them.
        if self.transform is not None:
            state["transform"] = {k: v.detach().cpu().clone() for k, v in self.transform.state_dict().items()}
            state["transform_step"] = int(self.transform_step)
        if self.generated_step >= 0:
            state["generated_step"] = int(self.generated_step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"base", "transform", "transform_step", "generated_step"}
        if unknown:
            raise ValueError(f"method '{self.name}': unknown state keys {sorted(unknown)}")
        # An empty state (a checkpoint of a step without state) keeps what is there: everything is
        # tagged with its step.
        self.base.load_state_dict(state.get("base", {}))
        if "transform" in state:
            tensors = {k: torch.as_tensor(v) for k, v in state["transform"].items()}
            self.transform = ClassifierTransform(**tensors)
            self.transform_step = int(state.get("transform_step", -1))
        if "generated_step" in state:
            self.generated_step = int(state["generated_step"])


@dataclass
class NeSTMiB(NeST):
    """NeST on MiB (ECCV24_NeST scripts/voc/mib+ours_*.sh)."""

    name = "nest_mib"


@dataclass
class NeSTPLOP(NeST):
    """NeST on PLOP (ECCV24_NeST scripts/voc/plop+ours_*.sh, which also pass --fix_pre_cls)."""

    name = "nest_plop"

    base: Method = field(default_factory=PLOP)
    freeze_old_classifiers: bool = True
