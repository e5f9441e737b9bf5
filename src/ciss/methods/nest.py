"""NeST (Xie et al., ECCV 2024, "Early Preparation Pays Off: New Classifier Pre-tuning for Class
Incremental Semantic Segmentation"), a wrapper over any base method: before a step's formal training,
the new classifiers are generated from ALL old classifiers, w_n = sum_c P[n, c] * (M[n, c] * W_old[c]),
with per-new-class importance matrices M (channel level) and projection matrices P (class level)
initialised from cross-task class similarity; only M, P (and the new biases) are pre-tuned, then the
generated classifiers are written into the model's new 1x1 conv and the base method trains as usual.

Formulas settled against the official code (zhengyuan-xie/ECCV24_NeST); files are named beside each choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ciss.losses import unbiased_cross_entropy
from ciss.methods.base import Method, Phase, Wrapper
from ciss.methods.mib import MiB
from ciss.methods.plop import PLOP
from ciss.types import Batch, SegOutput, StepContext, Targets

PRETUNE = "pretune"
INITS = ("similarity", "uniform", "random")
PRETUNE_LOSSES = ("unce", "base")
NEW_BIASES = ("fresh", "background")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ClassifierTransform(nn.Module):
    """The pre-tuned parameters: importance (N, C_old, D), projection (N, C_old), new biases (N,), and
    optionally the background row's channel weights (D,) and scale (1,).

    Not part of the segmenter: the model's state_dict keeps its keys and loads strictly.
    """

    def __init__(self, importance: torch.Tensor, projection: torch.Tensor, bias: torch.Tensor,
                 bg_channels: Optional[torch.Tensor] = None, bg_scale: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.importance = nn.Parameter(importance.float().clone())
        self.projection = nn.Parameter(projection.float().clone())
        self.bias = nn.Parameter(bias.float().clone())
        self.bg_channels = None if bg_channels is None else nn.Parameter(bg_channels.float().clone())
        self.bg_scale = None if bg_scale is None else nn.Parameter(bg_scale.float().clone())

    @property
    def transforms_background(self) -> bool:
        return self.bg_channels is not None

    def new_weight(self, old_weight: torch.Tensor) -> torch.Tensor:
        """(C_old, D) old classifier rows -> (N, D) generated rows."""
        # ECCV24_NeST segmentation_module.py avg_weight_output: weight_new[n] @ (weight_old[n] * W_old).
        return torch.einsum("nc,ncd,cd->nd", self.projection, self.importance, old_weight)

    def background_weight(self, bg_weight: torch.Tensor) -> torch.Tensor:
        """(D,) old background row -> (D,) pre-tuned background row."""
        # ECCV24_NeST avg_weight_output: weight_new_bg (1x1) @ (weight_old_bg (1xD) * w_bg).
        return self.bg_scale * self.bg_channels * bg_weight


@torch.no_grad()
def class_similarity(old_model: nn.Module, loader: Iterable[Batch], ctx: StepContext,
                     size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-task class similarity: for new class n, old class c and channel d, the mean over the pixels
    labelled n of p_old(c | x) * [f_d(x) * W_old[c, d] > 0].

    Returns the importance initialisation (N, C_old, D) and the pixel count of each new class (N,).
    """
    # ECCV24_NeST train.py select(): old softmax and old decoder features ("pre_logits"), both resized
    # bilinearly to 128x128, labels nearest-resized; relu(f * W) > 0 as the channel indicator.
    was_training = old_model.training
    old_model.eval()
    c_old, n_new = ctx.num_old, ctx.num_new
    w_old = torch.cat([c.weight for c in old_model.classifier.convs]).flatten(1).float()  # (C_old, D)
    acc_pos = acc_neg = counts = None
    for batch in loader:
        out = old_model(batch.image)
        if acc_pos is None:
            dev = w_old.device
            acc_pos = torch.zeros(n_new, c_old, w_old.shape[1], dtype=torch.float64, device=dev)
            acc_neg = torch.zeros_like(acc_pos)
            counts = torch.zeros(n_new, dtype=torch.float64, device=dev)
        for i in range(batch.image.shape[0]):  # one image at a time: (D, 128, 128) per image at most
            label = F.interpolate(batch.label[i:i + 1, None].float(), size=(size, size),
                                  mode="nearest").long().flatten()  # (S,)
            present = [int(k) - ctx.num_old for k in torch.unique(label).tolist()
                       if ctx.num_old <= k < ctx.num_seen]
            if not present:
                continue
            feats = F.interpolate(out.features["head"][i:i + 1].float(), size=(size, size),
                                  mode="bilinear", align_corners=False)[0].flatten(1).T  # (S, D)
            probs = F.softmax(F.interpolate(out.logits[i:i + 1, :c_old].float(), size=(size, size),
                                            mode="bilinear", align_corners=False), dim=1)[0].flatten(1).T  # (S, C_old)
            for n in present:
                m = label == ctx.num_old + n
                p, f = probs[m].double(), feats[m]  # (P, C_old), (P, D)
                # [f_d W_cd > 0] = [f_d > 0][W_cd > 0] + [f_d < 0][W_cd < 0]: two (C_old, D) matmuls
                # instead of the (P, C_old, D) product.
                acc_pos[n] += p.T @ (f > 0).double()
                acc_neg[n] += p.T @ (f < 0).double()
                counts[n] += m.sum()
    old_model.train(was_training)
    if acc_pos is None:
        raise ValueError(f"NeST: step {ctx.step} has no training batch to measure class similarity on")
    if _distributed():  # every rank starts the pre-tuning from the same matrices
        for t in (acc_pos, acc_neg, counts):
            dist.all_reduce(t)
    importance = acc_pos * (w_old > 0) + acc_neg * (w_old < 0)  # (N, C_old, D)
    importance = importance / counts.clamp_min(1)[:, None, None]
    return importance.float(), counts.float()


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
        if self.init not in INITS:
            raise ValueError(f"NeST init must be one of {INITS}, got '{self.init}'")
        if self.pretune_loss not in PRETUNE_LOSSES:
            raise ValueError(f"NeST pretune_loss must be one of {PRETUNE_LOSSES}, got '{self.pretune_loss}'")
        if self.new_bias not in NEW_BIASES:
            raise ValueError(f"NeST new_bias must be one of {NEW_BIASES}, got '{self.new_bias}'")
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
        w_old = torch.cat([c.weight for c in convs]).flatten(1).detach().float()  # (C_old, D)
        n, c, d = ctx.num_new, ctx.num_old, w_old.shape[1]
        if self.init == "similarity":
            importance, counts = class_similarity(old_model, loader, ctx, self.similarity_size)
            # A new class absent from the step's data has no similarity: it starts uniform.
            importance[counts == 0] = 1.0
            # ECCV24_NeST reset_weight_old: P[n] = softmax_c(sum_d M[n, c, d]).
            projection = importance.sum(dim=-1).softmax(dim=-1)  # (N, C_old)
        elif self.init == "uniform":
            importance = torch.ones(n, c, d)
            projection = torch.full((n, c), 1.0 / c)
        else:
            importance = nn.init.kaiming_normal_(torch.empty(n, c, d), mode="fan_out")
            projection = nn.init.kaiming_normal_(torch.empty(n, c), mode="fan_out")
        if self.new_bias == "background":
            bias = convs[0].bias.detach()[0].float().repeat(n)
        else:  # the step's new conv is fresh here (NeST skips the base's init): one of its values
            bias = model.classifier.convs[-1].bias.detach()[:1].float().repeat(n)
        bg = (torch.ones(d), torch.ones(1)) if self.transform_background else (None, None)
        transform = ClassifierTransform(importance.cpu(), projection.cpu(), bias.cpu(), *bg)
        if _distributed():  # the random init must not differ between ranks
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
        """Make the new conv (and the background row) compute the generated weights.

        Forward hooks rather than torch.nn.utils.parametrize: the engine checkpoints the model every
        epoch of the phase, and parametrize renames the conv's state_dict keys, which would break the
        strict load when resuming. Hooks leave the model's parameters and keys untouched.
        """
        self.detach()
        t = self.transform
        convs = model.classifier.convs
        w_old = torch.cat([c.weight for c in convs[:-1]]).flatten(1).detach().clone()  # (C_old, D)

        def new_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            w = t.new_weight(w_old)[:, :, None, None]  # (N, D, 1, 1)
            # output * 0 keeps the conv's own parameters in the graph: DDP expects every parameter
            # to take part in the backward (they get zero gradients and are not in the optimizer).
            return output * 0 + F.conv2d(args[0], w.to(args[0].dtype), t.bias.to(args[0].dtype))

        self._handles.append(convs[-1].register_forward_hook(new_rows))
        if t.transforms_background:
            def bg_row(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                w = t.background_weight(w_old[0])[None, :, None, None]  # (1, D, 1, 1)
                row = F.conv2d(args[0], w.to(args[0].dtype), module.bias[:1].to(args[0].dtype))
                return torch.cat([output[:, :1] * 0 + row, output[:, 1:]], dim=1)

            self._handles.append(convs[0].register_forward_hook(bg_row))
        if _distributed():
            # The matrices live outside the DDP module: average their gradients across ranks here.
            world = dist.get_world_size()

            def average(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                dist.all_reduce(grad)
                return grad / world

            self._handles.extend(p.register_hook(average) for p in t.parameters())
        else:
            # ECCV24_NeST train.py warm_up freezes every model parameter: without DDP the features fed
            # to the classifier are detached, so no backward runs through the backbone for nothing.
            self._handles.append(model.classifier.register_forward_pre_hook(
                lambda module, args: (args[0].detach(), *args[1:])))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def generated(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The classifier rows the current matrices give, aligned as the official code writes them:
        "weight" (N, D), "bias" (N,), and "background" (D,) when the background row is transformed."""
        convs = model.classifier.convs
        t = self.transform
        w_old = torch.cat([c.weight for c in convs[:-1]]).flatten(1).float()  # (C_old, D)
        b_old = torch.cat([c.bias for c in convs[:-1]]).float()  # (C_old,)
        weight = t.new_weight(w_old)  # (N, D)
        bias = t.bias.detach().clone()  # (N,)
        out: dict[str, torch.Tensor] = {}
        if t.transforms_background:
            bg = t.background_weight(w_old[0])  # (D,)
            if self.align:  # ECCV24_NeST init_via_weight: gamma_bg restores the old background norm
                bg = bg * w_old[0].norm() / bg.norm().clamp_min(1e-12)
            out["background"] = bg
            w_old = torch.cat([bg[None], w_old[1:]])
        if self.align:
            # ECCV24_NeST init_via_weight: gamma_b = ||old biases|| / ||new biases|| (vector norms),
            # then align_weight("all"): mean old row norm / mean new row norm.
            bias = bias * b_old.norm() / bias.norm().clamp_min(1e-12)
            weight = weight * w_old.norm(dim=1).mean() / weight.norm(dim=1).mean().clamp_min(1e-12)
        out["weight"], out["bias"] = weight, bias
        return out

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
