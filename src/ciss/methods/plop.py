"""PLOP (Douillard et al., CVPR 2021): entropy-filtered pseudo-labels of old classes in the background
and Local POD distillation of the backbone stages, the decoder output and the logits."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ciss.losses import cross_entropy, local_pod_distance, plop_uncertainty
from ciss.methods.base import Method, Phase
from ciss.methods.mib import init_balanced
from ciss.metrics import predicted_labels
from ciss.models.segmenter import set_bn_eval
from ciss.types import BACKGROUND, IGNORE, Batch, SegOutput, StepContext, Targets


def histogram_median(hist: torch.Tensor) -> torch.Tensor:
    """Per-row median of values in [0, 1] binned uniformly, interpolated inside the median bin.

    hist (C, nb_bins) counts -> (C,); rows without any count give 0.
    """
    nb_bins = hist.shape[1]
    hist = hist.double()
    total = hist.sum(dim=1)  # (C,)
    cum = hist.cumsum(dim=1)  # (C, nb_bins)
    half = total / 2
    idx = (cum < half[:, None]).sum(dim=1).clamp(max=nb_bins - 1)  # (C,) first bin reaching half
    in_bin = hist.gather(1, idx[:, None])[:, 0]
    before = cum.gather(1, idx[:, None])[:, 0] - in_bin
    frac = torch.where(in_bin > 0, (half - before) / in_bin.clamp_min(1), torch.zeros_like(half))
    median = (idx.double() + frac) / nb_bins
    return torch.where(total > 0, median, torch.zeros_like(median)).float()


def merge_new_into_background(logits: torch.Tensor, num_old: int) -> torch.Tensor:
    """(B, C_seen, h, w) -> (B, C_old, h, w): the new-class logits are added to the background's."""
    # PLOP pod_options "extra_channels": "sum": raw logits summed (not logsumexp) into channel 0.
    bg = logits[:, :1] + logits[:, num_old:].sum(dim=1, keepdim=True)
    return torch.cat([bg, logits[:, 1:num_old]], dim=1)


def step_factor(ctx: StepContext) -> float:
    """PLOP's distillation schedule sqrt(seen classes / new classes). A domain-incremental step adds
    no class; its official task lists give every step all the classes, i.e. a factor of 1."""
    return math.sqrt(ctx.num_seen / ctx.num_new) if ctx.num_new else 1.0


def batch_statistics_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode but for its BN layers, which normalise with the batch's statistics."""
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return twin


@dataclass
class PLOP(Method):
    """CE on pseudo-labelled targets (weighted per image by PLOP's adaptive factor) + Local POD."""

    name = "plop"
    needs_old_model = True

    # PLOP argparser.py 'PLOP': pod_factor 0.01 for the backbone stages and the decoder output ...
    pod_factor: float = 0.01
    # ... and pod_options switch.after factor 0.0005 for the last map: the low-res logits (pod_logits),
    # or without them the decoder output.
    pod_logits_factor: float = 0.0005
    pod_logits: bool = True
    # PLOP argparser.py --spp_scales default [1, 2, 4].
    spp_scales: tuple[int, ...] = (1, 2, 4)
    # PLOP train.py features_distillation: use_pod_schedule (no_pod_schedule False) -> x sqrt(seen / new).
    pod_schedule: bool = True
    # PLOP argparser.py 'PLOP': threshold 0.001, the floor of every class's entropy threshold.
    entropy_floor: float = 0.001
    # PLOP train.py find_median: 100 bins on [0, 1] in entropy mode. Coarse on purpose: u stays below
    # 1 / (C_old log C_seen), so medians interpolate inside the first bins as PLOP's do; raise for exact.
    median_bins: int = 100
    # PLOP argparser.py 'PLOP': classif_adaptive_factor True.
    classif_adaptive_factor: bool = True
    # PLOP argparser.py 'PLOP': init_balanced True (MiB's background split).
    init_balanced: bool = True
    # PLOP's --fix_bn, off as in its scripts. At batch 8 the batch statistics alone give a step's first
    # POD ~64 with unchanged weights (ccp21, cpu-short recipe), but freezing them diverges within 3
    # iterations on EfficientNet-Lite, whose early depthwise BNs hold channels of running variance 0.
    fix_bn: bool = False
    # Which BN statistics the old model's maps for POD use. "running": PLOP run.py's old model in eval
    # mode, beside a new model normalising with the batch's statistics, so POD is large before any
    # update. "batch" (ours, not the paper's): the old model's maps from the batch's statistics too
    # (unchanged weights give POD 0 but for the head's dropout); its pseudo-labels stay eval-mode.
    # Measured on ccp21: benchmarks/results/ccp21_curves.md.
    pod_old_bn: str = "running"

    # State, not hyperparameters: the (num_old,) thresholds of the step they were computed for.
    thresholds: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    thresholds_step: int = field(default=-1, init=False, repr=False, compare=False)
    _old_batch_bn: Optional[nn.Module] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pod_old_bn not in ("running", "batch"):
            raise ValueError(f"PLOP pod_old_bn must be 'running' (PLOP's) or 'batch', got {self.pod_old_bn!r}")

    # ---- step life cycle --------------------------------------------------------------------
    def train_mode(self, model: nn.Module, ctx: StepContext, phase: Phase) -> None:
        model.train()
        if ctx.step > 0 and self.fix_bn:
            set_bn_eval(model)

    def init_new_classifiers(self, model: nn.Module, old_model: nn.Module, ctx: StepContext) -> None:
        if self.init_balanced:
            init_balanced(model, old_model, ctx.num_new)

    def on_step_start(self, model: nn.Module, old_model: Optional[nn.Module],
                      loader: Iterable[Batch], ctx: StepContext) -> None:
        # PLOP train.py before(): thresholds only for step > 0; step 0 is plain CE.
        if ctx.step == 0 or old_model is None:
            return
        if self.pod_old_bn == "batch":
            self._old_batch_bn = batch_statistics_copy(old_model).requires_grad_(False)
        if self.thresholds_step == ctx.step and self.thresholds is not None:
            return  # resumed inside this step: keep the thresholds it trained with
        self.thresholds = self.compute_thresholds(old_model, loader, ctx).cpu()
        self.thresholds_step = ctx.step

    @torch.no_grad()
    def compute_thresholds(self, old_model: nn.Module, loader: Iterable[Batch],
                           ctx: StepContext) -> torch.Tensor:
        """Per old class, the median uncertainty of the background pixels the old model assigns to it,
        floored at `entropy_floor`. Returns (num_old,)."""
        was_training = old_model.training
        old_model.eval()
        nb = self.median_bins
        hist = torch.zeros(ctx.num_old * nb, dtype=torch.long, device=ctx.device)
        for batch in loader:
            hist = hist.to(batch.image.device)
            probs = F.softmax(old_model(batch.image).logits[:, : ctx.num_old].float(), dim=1)
            pred = predicted_labels(probs)  # (B, H, W)
            u = plop_uncertainty(probs, ctx.num_seen)  # (B, H, W)
            # PLOP find_median: only pixels labelled background (labels == 0).
            bg = batch.label == BACKGROUND
            bins = (u[bg] * nb).long().clamp(0, nb - 1)
            hist += torch.bincount(pred[bg] * nb + bins, minlength=ctx.num_old * nb)
        old_model.train(was_training)
        if dist.is_available() and dist.is_initialized():  # every rank must use the same thresholds
            dist.all_reduce(hist)
        # PLOP find_median approximates the median in the bin holding half the count (its running sum
        # adds bin indices instead of counts, a bug we do not copy); entropy mode: max(median, floor).
        return histogram_median(hist.view(ctx.num_old, nb)).clamp_min(self.entropy_floor)

    # ---- per batch ------------------------------------------------------------------------
    def make_targets(self, batch: Batch, out: SegOutput, old: Optional[SegOutput],
                     ctx: StepContext) -> Targets:
        if ctx.step == 0 or old is None:
            return Targets(label=batch.label)
        if self.thresholds is None or self.thresholds_step != ctx.step or \
                self.thresholds.numel() != ctx.num_old:
            raise RuntimeError(f"PLOP has no entropy thresholds for step {ctx.step}; "
                               f"call on_step_start(model, old_model, loader, ctx) first")
        label = batch.label
        probs = F.softmax(old.logits[:, : ctx.num_old].float(), dim=1)  # (B, C_old, H, W)
        pseudo = predicted_labels(probs)  # (B, H, W)
        u = plop_uncertainty(probs, ctx.num_seen)  # (B, H, W)
        confident = u < self.thresholds.to(u.device)[pseudo]  # (B, H, W)
        # PLOP masks labels < old_classes, which are the label-0 pixels in its disjoint/overlapped
        # data; we test label == 0 so that true old labels (sequential setting) are kept.
        bg = label == BACKGROUND
        accepted = bg & confident
        # PLOP train.py pseudo="entropy": confident background -> old argmax (bg included), the
        # rest of the background -> ignored.
        new_label = torch.where(accepted, pseudo, torch.where(bg, torch.full_like(label, IGNORE), label))
        weight = None
        if self.classif_adaptive_factor:
            # PLOP train.py: factor = #accepted / (#background + 1e-6) per image, on every pixel's CE.
            factor = accepted.float().sum(dim=(1, 2)) / (bg.float().sum(dim=(1, 2)) + 1e-6)  # (B,)
            weight = factor[:, None, None].expand_as(label)
        return Targets(label=new_label, weight=weight, extra={"pseudo_mask": accepted})

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        # PLOP multiplies the per-pixel CE by the factor and averages over all pixels; we average over
        # the non-ignored ones, the toolkit's convention for every method.
        ce = cross_entropy(out.logits[:, : ctx.num_seen], targets.label, targets.weight)
        if ctx.step == 0 or old is None:
            return {"loss": ce, "ce": ce}
        if self.pod_old_bn == "batch":
            if self._old_batch_bn is None:
                raise RuntimeError(f"PLOP has no batch-statistics old model for step {ctx.step}; "
                                   f"call on_step_start(model, old_model, loader, ctx) first")
            with torch.no_grad():
                old = self._old_batch_bn(batch.image)
        pod = self.pod_loss(out, old, ctx)
        return {"loss": ce + pod, "ce": ce, "pod": pod}

    def pod_loss(self, out: SegOutput, old: SegOutput, ctx: StepContext) -> torch.Tensor:
        # PLOP features_distillation: sqrt(nb_current_classes / nb_new_classes) on every layer; it
        # returns the sum over layers divided by the number of layers.
        schedule = step_factor(ctx) if self.pod_schedule else 1.0
        terms = self.pod_terms(out, old, ctx)
        return schedule * sum(terms) / len(terms)

    def pod_terms(self, out: SegOutput, old: SegOutput, ctx: StepContext) -> list[torch.Tensor]:
        """Each distilled map's POD distance times its factor, in PLOP's order (before the schedule)."""
        # PLOP defaults pod_apply="all" and pod_deeplab_mask=False: every map, no background mask.
        # PLOP attentions: ResNet's four stages (strides 4, 8, 16, 16, pre-activation), i.e. the stages
        # the backbone declares in `distill_stages` (EfficientNet-Lite0: its stages 1-4, which end in
        # linear projections but for the last one's ReLU6 with the 1280-channel head conv), then the
        # decoder output, then the low-res logits (pod_logits): 6 maps.
        new_maps = [*out.features["distilled"], out.features["head"]]
        old_maps = [*old.features["distilled"], old.features["head"]]
        if self.pod_logits:
            new_maps.append(merge_new_into_background(
                out.features["logits_lowres"][:, : ctx.num_seen], ctx.num_old))
            old_maps.append(old.features["logits_lowres"][:, : ctx.num_old])
        # PLOP pod_options switch.after: its factor goes to the last map of the list, the logits,
        # or the decoder output when the logits are not distilled.
        factors = [self.pod_factor] * (len(new_maps) - 1) + [self.pod_logits_factor]
        return [f * local_pod_distance(o, n, self.spp_scales)
                for f, o, n in zip(factors, old_maps, new_maps)]

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.thresholds is None:
            return {}
        return {"thresholds": self.thresholds.detach().cpu().clone(),
                "thresholds_step": int(self.thresholds_step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"thresholds", "thresholds_step"}
        if unknown:
            raise ValueError(f"method 'plop': unknown state keys {sorted(unknown)}")
        # An empty state (a step-0 checkpoint) leaves the thresholds as they are: they are tagged
        # with their step and recomputed by on_step_start when stale.
        if "thresholds" in state:
            self.thresholds = torch.as_tensor(state["thresholds"], dtype=torch.float32).cpu()
            self.thresholds_step = int(state.get("thresholds_step", -1))
