"""GSC (Cong et al., "Gradient-Semantic Compensation for Incremental Semantic Segmentation", IEEE TMM):
step-aware gradient compensation (SG), soft-sharp semantic relation distillation (SR + SC) and
prototypical pseudo re-labelling (PR), plugged onto a base method (PLOP by default, whose Local POD is
the paper's multi-scale pooling distillation L_pd, eq. 13).

No public code exists: the paper's equations are the spec. GSC wraps its base: PR replaces the base's
targets, SG puts the step-aware weight psi on them, so the base's classification term on those targets
is L_sg (eq. 6); SR and SC are added to the base's loss. With every switch off, GSC is its base (the
first row of the paper's Table V is PLOP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ciss.losses import plop_uncertainty, prediction_entropy, soft_relation_distillation
from ciss.methods.base import Method, Wrapper
from ciss.methods.plop import PLOP, histogram_median
from ciss.metrics import predicted_labels
from ciss.types import BACKGROUND, IGNORE, Batch, SegOutput, StepContext, Targets


def step_aware_weights(logits: torch.Tensor, label: torch.Tensor,
                       classes_per_step: tuple[int, ...], step: int) -> torch.Tensor:
    """GSC's psi (eq. 2-5): |dCE/dlogit_y| = 1 - p_y of each pixel, divided by the mean of that quantity
    over its group: the background, or the old classes of one past step m < t (background excluded).

    logits (B, C, H, W) of the current model, label (B, H, W) the pseudo-labelled targets. Returns
    (B, H, W), no gradient; new-class and ignored pixels get 1.
    """
    num_seen = sum(classes_per_step[: step + 1])
    with torch.no_grad():
        p = F.softmax(logits[:, :num_seen].float(), dim=1)  # (B, C_seen, H, W)
        valid = label != IGNORE
        safe = torch.where(valid, label, torch.zeros_like(label))
        # Eq. 2 speaks of the sigmoid output; the gradient of the softmax CE (eq. 1) wrt the target
        # logit is p_y - 1 with p the softmax, which is what is re-weighted.
        grad = 1.0 - p.gather(1, safe[:, None])[:, 0]  # (B, H, W) = |G_ij|
        psi = torch.ones_like(grad)
        groups = [valid & (label == BACKGROUND)]
        start = 0
        for m in range(step):
            end = start + classes_per_step[m]
            lo = max(start, BACKGROUND + 1)  # step 0's block holds the background, handled apart
            groups.append(valid & (label >= lo) & (label < end))
            start = end
        for g in groups:
            # Eq. 3-4: the averages are taken over the pixels at hand; "constantly updated" (Sec. IV-A)
            # is read as per batch, so every group's psi has mean 1 in every batch.
            mean = (grad * g).sum() / g.sum().clamp_min(1)
            # An all-zero group (perfect fit) carries no loss whatever its weight: it keeps 1.
            psi = torch.where(g & (mean > 0), grad / mean.clamp_min(1e-12), psi)
    return psi


def prototype_agreement(features: torch.Tensor, prototypes: torch.Tensor, proto_valid: torch.Tensor,
                        old_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 10-12's prototype rule: argmax_c zeta(c) p_old(c) == argmax_c p_old(c), with
    zeta = softmax_c(-||f - eta_c|| / T).

    features (B, D, h, w) of the current model; prototypes (C_old, D); proto_valid (C_old,) bool;
    old_probs (B, C_old, H, W). Returns (B, H, W) bool.
    """
    b, d, h, w = features.shape
    flat = features.float().flatten(2).transpose(1, 2)  # (B, h*w, D)
    dist_ = torch.cdist(flat, prototypes.float()[None].expand(b, -1, -1))  # (B, h*w, C_old)
    dist_ = dist_.transpose(1, 2).reshape(b, -1, h, w)  # (B, C_old, h, w)
    # Distances are smooth in space: upsampled like the logits rather than upsampling D-dim features.
    dist_ = F.interpolate(dist_, size=old_probs.shape[-2:], mode="bilinear", align_corners=False)
    pred = predicted_labels(old_probs)  # (B, H, W)
    if not bool(proto_valid.any()):
        return torch.ones_like(pred, dtype=torch.bool)  # no prototype at all: nothing to check against
    # A class without prototype (no background pixel of the step predicted as it) gets zeta = 0: the
    # old model's vote for it has no feature evidence, so such pixels are ignored.
    score = (-dist_ / temperature).masked_fill(~proto_valid[None, :, None, None], float("-inf"))
    zeta = F.softmax(score, dim=1)  # (B, C_old, H, W)
    return predicted_labels(zeta * old_probs) == pred


@dataclass
class GSC(Wrapper):
    """PR targets with step-aware weights psi for the base's CE, + lambda_sr * L_sr + lambda_sc * L_sc."""

    name = "gsc"
    # PR and SR read the frozen previous model on every batch.
    needs_old_model = True

    # Table VIII: GSC is plug-and-play; its own model is built on PLOP (Table V), whose Local POD with
    # pod_factor 0.01 is eq. 13's lambda * L_pd (lambda = 0.01 on VOC; set base.pod_factor for ADE/Cityscapes).
    base: Method = field(default_factory=PLOP)
    # Table V's switches: prototypical pseudo re-labelling, step-aware gradient compensation, soft
    # semantic relation distillation, sharp confidence.
    pr: bool = True
    sg: bool = True
    sr: bool = True
    sc: bool = True
    # Sec. V-A: lambda_1 = 0.3, lambda_2 = 0.1 (eq. 9).
    lambda_sr: float = 0.3
    lambda_sc: float = 0.1
    # Eq. 10: T = 1.
    temperature: float = 1.0
    # Eq. 12's tau^c follows PLOP (the paper keeps PLOP's other settings): PLOP's uncertainty scale,
    # its 0.001 floor and its histogram median ...
    entropy_floor: float = 0.001
    # ... on finer bins: PLOP-scale uncertainties stay below 1 / (C_old log C_seen), which PLOP's 100
    # bins on [0, 1] cover with two or three bins; GSC has no code to match, so the median is made exact
    # to 1e-4.
    median_bins: int = 10_000

    def __post_init__(self) -> None:
        super().__post_init__()
        # Eq. 6 is a CE on the PR targets, whose background pixels carry old classes: a base with
        # MiB's unbiased CE (mib, rcil) would fold them back into background, so it gets a plain CE.
        if self.pr and getattr(self.base, "unbiased_ce", False):
            self.base.unbiased_ce = False  # type: ignore[attr-defined]

    # State, not hyperparameters: prototypes / thresholds of the step they were computed for.
    prototypes: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    proto_valid: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    thresholds: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    stats_step: int = field(default=-1, init=False, repr=False, compare=False)

    # Every hook not written here is the base's (Wrapper); GSC changes nothing at step 0.
    def on_step_start(self, model: nn.Module, old_model: Optional[nn.Module],
                      loader: Iterable[Batch], ctx: StepContext) -> None:
        self.base.on_step_start(model, old_model, loader, ctx)
        if ctx.step == 0 or old_model is None or not self.pr:
            return
        if self.stats_step == ctx.step and self.prototypes is not None:
            return  # resumed inside this step: keep the prototypes it trained with
        self.prototypes, self.proto_valid, self.thresholds = self.compute_statistics(old_model, loader, ctx)
        self.stats_step = ctx.step

    @torch.no_grad()
    def compute_statistics(self, old_model: nn.Module, loader: Iterable[Batch],
                           ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass of the old model over the step's data. Returns prototypes (C_old, D) (eq. 11),
        which classes have one (C_old,) bool, and entropy thresholds tau (C_old,) (eq. 12)."""
        was_training = old_model.training
        old_model.eval()
        c_old, nb = ctx.num_old, self.median_bins
        sums = counts = hist = None
        for batch in loader:
            out = old_model(batch.image)
            feats = out.features["head"].float()  # (B, D, h, w)
            if sums is None:
                dev = feats.device
                sums = torch.zeros(c_old, feats.shape[1], dtype=torch.float64, device=dev)
                counts = torch.zeros(c_old, dtype=torch.float64, device=dev)
                hist = torch.zeros(c_old * nb, dtype=torch.long, device=dev)
            probs = F.softmax(out.logits[:, :c_old].float(), dim=1)  # (B, C_old, H, W)
            pred = predicted_labels(probs)  # (B, H, W)
            u = plop_uncertainty(probs, ctx.num_seen)  # (B, H, W)
            # Eq. 12: tau^c over all pixels the old model predicts as c (PLOP uses only background
            # pixels); ignored pixels (padding, borders) are left out.
            valid = batch.label != IGNORE
            bins = (u[valid] * nb).long().clamp(0, nb - 1)
            hist += torch.bincount(pred[valid] * nb + bins, minlength=c_old * nb)
            # Eq. 11: eta^c is the mean old feature of the background pixels predicted as c, taken at the
            # feature resolution (labels nearest-downsampled).
            low_pred = predicted_labels(out.features["logits_lowres"][:, :c_old])  # (B, h, w)
            low_label = F.interpolate(batch.label[:, None].float(), size=feats.shape[-2:],
                                      mode="nearest")[:, 0].long()  # (B, h, w)
            bg = low_label == BACKGROUND
            sums.index_add_(0, low_pred[bg], feats.permute(0, 2, 3, 1)[bg].double())
            counts += torch.bincount(low_pred[bg], minlength=c_old).double()
        old_model.train(was_training)
        if sums is None:
            raise ValueError(f"GSC: step {ctx.step} has no training batch to compute prototypes from")
        if dist.is_available() and dist.is_initialized():  # every rank must label alike
            for t in (sums, counts, hist):
                dist.all_reduce(t)
        prototypes = (sums / counts.clamp_min(1)[:, None]).float().cpu()
        thresholds = histogram_median(hist.view(c_old, nb)).clamp_min(self.entropy_floor).cpu()
        return prototypes, (counts > 0).cpu(), thresholds

    # ---- per batch ------------------------------------------------------------------------
    def make_targets(self, batch: Batch, out: SegOutput, old: Optional[SegOutput],
                     ctx: StepContext) -> Targets:
        if ctx.step == 0 or old is None:
            return self.base.make_targets(batch, out, old, ctx)
        if self.pr:
            targets = self.relabel(batch, out, old, ctx)
        else:  # Table V without PR: the base's own pseudo-labels (PLOP's), SG then weights them
            targets = self.base.make_targets(batch, out, old, ctx)
        if self.sg:
            psi = step_aware_weights(out.logits, targets.label, ctx.classes_per_step, ctx.step)
            weight = psi if targets.weight is None else targets.weight * psi
            targets = Targets(label=targets.label, weight=weight, extra={**targets.extra, "psi": psi})
        return targets

    @torch.no_grad()
    def relabel(self, batch: Batch, out: SegOutput, old: SegOutput, ctx: StepContext) -> Targets:
        """Eq. 12: ground truth where it is not background; on background, the old argmax when the old
        model is confident (u < tau^c) and the prototype rule agrees; otherwise ignored."""
        if self.prototypes is None or self.stats_step != ctx.step or \
                self.prototypes.shape[0] != ctx.num_old:
            raise RuntimeError(f"GSC has no prototypes for step {ctx.step}; call "
                               f"on_step_start(model, old_model, loader, ctx) first")
        label = batch.label
        dev = label.device
        probs = F.softmax(old.logits[:, : ctx.num_old].float(), dim=1)  # (B, C_old, H, W)
        pred = predicted_labels(probs)  # (B, H, W)
        u = plop_uncertainty(probs, ctx.num_seen)  # (B, H, W)
        confident = u < self.thresholds.to(dev)[pred]  # (B, H, W)
        # Eq. 10 measures the CURRENT model's features against the old model's prototypes (L_pd keeps
        # the two feature spaces aligned, Sec. IV-C).
        agree = prototype_agreement(out.features["head"].detach(), self.prototypes.to(dev),
                                    self.proto_valid.to(dev), probs, self.temperature)
        bg = label == BACKGROUND
        accepted = bg & confident & agree
        new_label = torch.where(accepted, pred, torch.where(bg, torch.full_like(label, IGNORE), label))
        return Targets(label=new_label, extra={"pseudo_mask": accepted})

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        # The base's classification term on GSC's targets (weighted by psi) is L_sg (eq. 6).
        terms = dict(self.base.loss(out, targets, old, batch, ctx))
        if ctx.step == 0 or old is None:
            return terms
        total = terms["loss"]
        logits = out.logits[:, : ctx.num_seen]
        if self.sr:
            terms["sr"] = self.lambda_sr * soft_relation_distillation(
                logits, old.logits[:, : ctx.num_old], batch.label)
            total = total + terms["sr"]
        if self.sc:
            terms["sc"] = self.lambda_sc * prediction_entropy(logits)
            total = total + terms["sc"]
        terms["loss"] = total
        return terms

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.prototypes is not None:
            state.update(prototypes=self.prototypes.detach().cpu().clone(),
                         proto_valid=self.proto_valid.detach().cpu().clone(),
                         thresholds=self.thresholds.detach().cpu().clone(),
                         stats_step=int(self.stats_step))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"base", "prototypes", "proto_valid", "thresholds", "stats_step"}
        if unknown:
            raise ValueError(f"method 'gsc': unknown state keys {sorted(unknown)}")
        # Like the base's, an empty state (a checkpoint of a step without state) keeps what is there:
        # it is tagged with its step and recomputed by on_step_start when stale.
        self.base.load_state_dict(state.get("base", {}))
        if "prototypes" in state:
            self.prototypes = torch.as_tensor(state["prototypes"], dtype=torch.float32).cpu()
            self.proto_valid = torch.as_tensor(state["proto_valid"], dtype=torch.bool).cpu()
            self.thresholds = torch.as_tensor(state["thresholds"], dtype=torch.float32).cpu()
            self.stats_step = int(state.get("stats_step", -1))
