"""SDR (Michieli & Zanuttigh, CVPR 2021, "Continual semantic segmentation via repulsion-attraction of
sparse and disentangled latent representations") over MiB's unbiased CE and KD: prototype matching
of the old classes, contrastive clustering (attraction to the class prototype, repulsion between
class means) and feature sparsification, on the decoder features.

Prototypes are running means of every class's features over the training iterations of the step that
teaches it (SDR train.py _update_running_stats), kept across steps in the method's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ciss.methods.mib import MiB
from ciss.metrics import predicted_labels
from ciss.types import BACKGROUND, Batch, SegOutput, StepContext, Targets


def nearest(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) long -> (B, *size) long by nearest neighbour (SDR brings labels to feature size so)."""
    return F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()


def class_means(features: torch.Tensor, label: torch.Tensor, num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of each class over the pixels labelled with it, differentiable.

    features (B, D, h, w); label (B, h, w) with classes in [0, num_classes), anything else skipped.
    Returns means (num_classes, D) (zero rows for absent classes) and pixel counts (num_classes,).
    """
    valid = (label >= 0) & (label < num_classes)
    flat = features.permute(0, 2, 3, 1)[valid]  # (N, D)
    idx = label[valid]  # (N,)
    sums = flat.new_zeros(num_classes, flat.shape[1]).index_add(0, idx, flat)
    counts = torch.bincount(idx, minlength=num_classes).to(flat.dtype)
    return sums / counts.clamp_min(1)[:, None], counts


def prototype_matching(features: torch.Tensor, label: torch.Tensor, prototypes: torch.Tensor,
                       known: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present in `label` (background excluded) that have a prototype of the
    squared distance, averaged over channels, between their current mean feature and the prototype.

    features (B, D, h, w); label (B, h, w), 0 = not an old class; prototypes (C, D); known (C,) bool.
    """
    means, counts = class_means(features, label, prototypes.shape[0])
    present = (counts > 0) & known
    present[BACKGROUND] = False
    if not bool(present.any()):
        return features.new_zeros(())
    # SDR loss.py DistillationEncoderPrototypesLoss with loss_de_prototypes_sumafter: MSE(mean, proto)
    # averaged over the present classes. There (LTTM/SDR 8638296, loss.py L501) the masked (B, C, h, w)
    # features are .view(-1, C)'d without a permute, so a row mixes channels and pixels and the "class
    # mean" is near a constant vector; here it is the per-channel mean of the class's pixels, the
    # paper's Eq. for prototype matching. Its running prototypes (train.py L474, .view(C, -1)) mix
    # channels when a class spans several images of a batch; ours are per-channel sums.
    return (means[present] - prototypes[present]).pow(2).mean(dim=1).mean()


def attraction(features: torch.Tensor, label: torch.Tensor, prototypes: torch.Tensor,
               known: torch.Tensor) -> torch.Tensor:
    """Mean over the labelled classes with a prototype of the mean squared distance (per channel)
    between their pixels' features and the prototype. Arguments as `prototype_matching`."""
    c = prototypes.shape[0]
    valid = (label < c) & known[label.clamp(0, c - 1)]
    if not bool(valid.any()):
        return features.new_zeros(())
    idx = label[valid]  # (N,)
    per_pixel = (features.permute(0, 2, 3, 1)[valid] - prototypes[idx]).pow(2).mean(dim=1)  # (N,)
    counts = torch.bincount(idx, minlength=c).to(per_pixel.dtype)
    per_class = per_pixel.new_zeros(c).index_add(0, idx, per_pixel) / counts.clamp_min(1)
    # SDR loss.py FeaturesClusteringSeparationLoss: MSE to the prototype per present class (background
    # included), averaged over the classes (its running division inside the loop is not copied).
    return per_class[counts > 0].mean()


def repulsion(features: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over pairs of distinct classes present in `label` of 1 / ||mean_i - mean_j||; zero with
    fewer than two classes. features (B, D, h, w); label (B, h, w)."""
    means, counts = class_means(features, label, num_classes)
    means = means[counts > 0]  # (K, D)
    k = means.shape[0]
    if k < 2:
        return features.new_zeros(())
    # Distances from squared norms clamped away from 0, so that coinciding means stay finite.
    dist_ = (means[:, None] - means[None]).pow(2).sum(dim=-1).clamp_min(1e-12).sqrt()  # (K, K)
    off = ~torch.eye(k, dtype=torch.bool, device=means.device)
    # SDR loss.py lfc_sep_clust: mean of the inverse pairwise distances between the batch's class means.
    return (1.0 / dist_[off]).mean()


def sparsity(features: torch.Tensor, label: torch.Tensor, num_classes: int,
             eps: float = 1e-15) -> torch.Tensor:
    """SDR's feature sparsification: features divided by the largest activation among the pixels of
    their class, then per pixel sum_d exp(f_d) / sum_d f_d, averaged over the labelled pixels.

    features (B, D, h, w), non-negative (post-ReLU); label (B, h, w). Scalar, >= 0.
    """
    # SDR argparser.py 'SDR': lfs_normalization max_maskedforclass, lfs_shrinkingfn exponential,
    # lfs_loss_fn_touse ratio. Ignored pixels carry no term (SDR normalises them as a class of their own).
    valid = label < num_classes
    if not bool(valid.any()):
        return features.new_zeros(())
    idx = label[valid]  # (N,)
    flat = features.permute(0, 2, 3, 1)[valid]  # (N, D)
    class_max = flat.new_zeros(num_classes).scatter_reduce(0, idx, flat.amax(dim=1), "amax",
                                                           include_self=False)
    norm = flat / (class_max[idx][:, None] + eps)  # (N, D)
    total = norm.sum(dim=1)  # (N,)
    keep = total > 0  # an all-zero feature has no ratio
    if not bool(keep.any()):
        return features.new_zeros(())
    return (norm[keep].exp().sum(dim=1) / total[keep]).mean()


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] >= rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


@dataclass
class SDR(MiB):
    """MiB's unbiased CE + `loss_kd` x unbiased KD, + prototype matching, attraction, repulsion and
    sparsity on the decoder features (each a switch with its weight)."""

    name = "sdr"

    # SDR argparser.py, method 'SDR': loss_kd = 100 with unce and unkd (MiB's preset is 10) ...
    loss_kd: float = 100.0
    # ... and no init_balanced (its step-1 scripts pass none either).
    init_balanced: bool = False
    # Switches: prototype matching, contrastive clustering (attraction + repulsion), sparsification.
    pm: bool = True
    cl: bool = True
    sp: bool = True
    # SDR argparser.py 'SDR' (VOC): loss_de_prototypes 0.01, loss_fc 1e-3 (attraction), lfc_sep_clust
    # 1e-3 (repulsion), loss_featspars 1e-3; the paper's VOC settings as far as its code states them.
    lambda_pm: float = 1e-2
    lambda_att: float = 1e-3
    lambda_rep: float = 1e-3
    lambda_sp: float = 1e-3

    # State, not hyperparameters: prototypes (C, D) with their pixel counts (C,) after step
    # `proto_step`, and the running sums of the step being trained (`running_step`).
    prototypes: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    counts: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    proto_step: int = field(default=-1, init=False, repr=False, compare=False)
    running_sums: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    running_counts: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    running_step: int = field(default=-1, init=False, repr=False, compare=False)

    def base_step_key(self) -> str:
        # Step 0 is CE training (SDR's step-0 script runs FT), but its checkpoint must carry the
        # prototypes accumulated while training it, so it is not shared with the other CE methods.
        return "ce+sdr_prototypes"

    # ---- step life cycle --------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, old_model: Optional[nn.Module],
                      loader: Iterable[Batch], ctx: StepContext) -> None:
        if ctx.step > 0 and self.pm and (self.prototypes is None or self.proto_step != ctx.step - 1):
            raise RuntimeError(
                f"SDR has no class prototypes of step {ctx.step - 1}: that step was not trained with "
                f"method=sdr in this run (e.g. init_from a model file); train every step with "
                f"method=sdr, or turn prototype matching off with method_args={{pm: false}}")
        if self.running_step != ctx.step:  # a resumed step keeps the sums it had accumulated
            self.running_sums = self.running_counts = None
            self.running_step = ctx.step

    def on_step_end(self, model: nn.Module, old_model: Optional[nn.Module],
                    loader: Iterable[Batch], ctx: StepContext) -> None:
        if self.running_sums is None or self.running_counts is None:
            return
        sums, counts = self.running_sums, self.running_counts
        if dist.is_available() and dist.is_initialized():  # every rank must keep the same prototypes
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        total, merged = self.merged(sums.shape[0], sums.shape[1], sums.device)
        self.prototypes, self.counts = merged.float().cpu(), total.cpu()
        self.proto_step = ctx.step
        self.running_sums = self.running_counts = None

    # ---- prototypes -------------------------------------------------------------------------
    def merged(self, rows: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel counts (rows,) and prototypes (rows, D) float64 of the stored steps and of the
        running sums: a cumulative mean, as SDR's running statistics."""
        counts = torch.zeros(rows, dtype=torch.float64, device=device)
        sums = torch.zeros(rows, dim, dtype=torch.float64, device=device)
        if self.prototypes is not None and self.counts is not None:
            n = self.counts.shape[0]
            counts[:n] += self.counts.to(device, torch.float64)
            sums[:n] += self.prototypes.to(device, torch.float64) * counts[:n, None]
        if self.running_sums is not None and self.running_counts is not None:
            n = self.running_counts.shape[0]
            counts[:n] += self.running_counts
            sums[:n] += self.running_sums
        return counts, sums / counts.clamp_min(1)[:, None]

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, label: torch.Tensor, ctx: StepContext) -> None:
        """Fold the batch's features into the running sums of the classes it labels.

        features (B, D, h, w); label (B, h, w) at feature size.
        """
        # SDR train.py _update_running_stats: from step 1 on the background is left out (it holds old
        # classes in disjoint/overlapped data; the method is not told the setting, so in sequential
        # data too); so is IGNORE.
        valid = label < ctx.num_seen
        if ctx.step > 0:
            valid &= label != BACKGROUND
        rows, dim = ctx.num_seen, features.shape[1]
        if self.running_sums is None or self.running_counts is None:
            self.running_sums = torch.zeros(rows, dim, dtype=torch.float64, device=features.device)
            self.running_counts = torch.zeros(rows, dtype=torch.float64, device=features.device)
        self.running_sums = _pad_rows(self.running_sums.to(features.device), rows)
        self.running_counts = _pad_rows(self.running_counts.to(features.device), rows)
        idx = label[valid]
        self.running_sums.index_add_(0, idx, features.permute(0, 2, 3, 1)[valid].double())
        self.running_counts += torch.bincount(idx, minlength=rows).double()

    # ---- per batch ------------------------------------------------------------------------
    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        """MiB's terms + SDR's; every call also folds the batch's features into the running
        prototypes (SDR updates them at every training iteration, before its losses)."""
        terms = super().loss(out, targets, old, batch, ctx)
        # SDR train.py uses features['body'], ResNet-101's post-ReLU output; ours is the decoder output
        # (post-ReLU for every backbone; EfficientNet-Lite's last stage is a linear projection, on
        # which the max-normalised sparsity is undefined).
        feats = out.features["head"].float()  # (B, D, h, w)
        label = nearest(targets.label, tuple(feats.shape[-2:]))  # (B, h, w)
        self.accumulate(feats.detach(), label, ctx)
        if old is None or ctx.step == 0:  # SDR's step 0 is its FT run: plain CE, prototypes gathered
            return terms
        counts, protos = self.merged(ctx.num_seen, feats.shape[1], feats.device)
        protos, known = protos.float(), counts > 0
        total = terms["loss"]
        if self.pm:
            old_label = self.old_class_label(label, old, ctx)
            terms["pm"] = self.lambda_pm * prototype_matching(feats, old_label, protos, known)
            total = total + terms["pm"]
        if self.cl:
            terms["att"] = self.lambda_att * attraction(feats, label, protos, known)
            terms["rep"] = self.lambda_rep * repulsion(feats, label, ctx.num_seen)
            total = total + terms["att"] + terms["rep"]
        if self.sp:
            terms["sp"] = self.lambda_sp * sparsity(feats, label, ctx.num_seen)
            total = total + terms["sp"]
        terms["loss"] = total
        return terms

    @staticmethod
    def old_class_label(label: torch.Tensor, old: SegOutput, ctx: StepContext) -> torch.Tensor:
        """(B, h, w): the old class of each feature pixel, 0 where none.

        Background pixels take the old model's prediction (disjoint/overlapped data hide old classes
        there); pixels labelled with an old class (sequential data) keep their label.
        """
        # SDR loss.py DistillationEncoderPrototypesLoss: argmax of the old outputs at full resolution,
        # brought to feature size by nearest neighbour, on the background pixels.
        pred = nearest(predicted_labels(old.logits[:, : ctx.num_old]), tuple(label.shape[-2:]))
        kept = torch.where(label < ctx.num_old, label, torch.zeros_like(label))  # new classes, IGNORE -> 0
        return torch.where(label == BACKGROUND, pred, kept)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.prototypes is not None and self.counts is not None:
            state.update(prototypes=self.prototypes.detach().cpu().clone(),
                         counts=self.counts.detach().cpu().clone(), proto_step=int(self.proto_step))
        if self.running_sums is not None and self.running_counts is not None:
            state.update(running_sums=self.running_sums.detach().cpu().clone(),
                         running_counts=self.running_counts.detach().cpu().clone(),
                         running_step=int(self.running_step))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"prototypes", "counts", "proto_step", "running_sums", "running_counts", "running_step"}
        unknown = set(state) - keys
        if unknown:
            raise ValueError(f"method 'sdr': unknown state keys {sorted(unknown)}")
        # A state without prototypes (another method's checkpoint) leaves them as they are:
        # on_step_start checks that they belong to the previous step.
        if "prototypes" in state:
            self.prototypes = torch.as_tensor(state["prototypes"], dtype=torch.float32).cpu()
            self.counts = torch.as_tensor(state["counts"], dtype=torch.float64).cpu()
            self.proto_step = int(state["proto_step"])
        self.running_sums = self.running_counts = None
        self.running_step = -1
        if "running_sums" in state:
            self.running_sums = torch.as_tensor(state["running_sums"], dtype=torch.float64)
            self.running_counts = torch.as_tensor(state["running_counts"], dtype=torch.float64)
            self.running_step = int(state["running_step"])
