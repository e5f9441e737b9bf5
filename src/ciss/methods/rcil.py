"""RCIL (Zhang et al., CVPR 2022): representation compensation and pooled cube distillation.

Every spatial conv-BN of the backbone and every ASPP conv branch gets a parallel twin
(`build_segmenter(parallel_branches=True)`, see `ciss.models.parallel`). Step 0 trains both. Before each
later step the two are merged into one frozen branch (the previous model's output, exactly) while the
twin keeps its weights and trains on: the old representation is kept, the new one compensates, and the
deployed model folds back to the size of the plain network (`fold_parallel_branches`). The losses are
MiB's (unbiased CE and KD, background-based init) plus pooled cube distillation (PCKD): spatial
average pooling at six window sizes and channel pooling, on squared activations of old and new model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ciss.losses import pooled_cube_channel, pooled_cube_spatial
from ciss.methods.base import Method
from ciss.methods.gsc import GSC
from ciss.methods.mib import MiB
from ciss.methods.plop import merge_new_into_background, step_factor
from ciss.models.parallel import merge_parallel_branches, parallel_modules
from ciss.types import Batch, SegOutput, StepContext, Targets


@dataclass
class RCIL(MiB):
    """MiB's losses and init + PCKD, on a model with parallel branches merged after each step."""

    name = "rcil"

    # RCIL argparser.py, method 'RCIL': loss_kd = 100 with unce, unkd and init_balanced (MiB's own is 10).
    loss_kd: float = 100.0
    # RCIL train.py features_distillation_spatial: windows 4, 8, 12, 16, 20, 24 (stride 1, padding k/2).
    spatial_windows: tuple[int, ...] = (4, 8, 12, 16, 20, 24)
    # ... features_distillation_channel: a (3, 1) average pool along the channels.
    channel_window: int = 3
    # pckd_factor on VOC and Cityscapes: 0.01 for the feature maps, 0.0005 for the low-res logits
    # (ADE: 5e-6 and 5e-7; set both fields for ADE-like data).
    pckd_factor: float = 0.01
    pckd_logits_factor: float = 0.0005
    # Both terms x sqrt(seen classes / new classes), as in the official loss.
    pckd_schedule: bool = True
    # Per-channel random choice of branch during training (residual.py / deeplab.py).
    drop_path: bool = True

    # RCIL also sets classif_adaptive_factor, which only scales the loss when pseudo-labelling is on;
    # RCIL does not pseudo-label, so it has no effect and is not a field here.

    def architecture(self) -> dict[str, Any]:
        return {"parallel_branches": True}

    def base_step_key(self) -> str:
        # Step 0 trains both branches (with drop-path), so its checkpoint is RCIL's own.
        return "rcil" if self.drop_path else "rcil-no-drop-path"

    # ---- step life cycle --------------------------------------------------------------------
    def init_new_classifiers(self, model: nn.Module, old_model: nn.Module, ctx: StepContext) -> None:
        super().init_new_classifiers(model, old_model, ctx)
        # RCIL run.py convert_model: at the start of every step after the first, on the new model only
        # (the old model keeps two branches, whose eval output the merged one reproduces).
        if merge_parallel_branches(model) == 0:
            raise TypeError("rcil needs a model built with parallel_branches=True")

    def on_step_start(self, model: nn.Module, old_model: Optional[nn.Module],
                      loader: Iterable[Batch], ctx: StepContext) -> None:
        super().on_step_start(model, old_model, loader, ctx)
        mods = parallel_modules(model)
        if not mods:
            raise TypeError("rcil needs a model built with parallel_branches=True")
        for m in mods:
            m.drop_path = self.drop_path
            m.freeze_merged()  # also after resuming from a checkpoint, which restores requires_grad

    # ---- per batch ------------------------------------------------------------------------
    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        terms = dict(super().loss(out, targets, old, batch, ctx))
        if old is None or ctx.num_old == 0:
            return terms
        spatial, channel = self.pckd_loss(out, old, ctx)
        terms["loss"] = terms["loss"] + spatial + channel
        terms["pckd_spatial"], terms["pckd_channel"] = spatial, channel
        return terms

    def pckd_loss(self, out: SegOutput, old: SegOutput, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(spatial, channel) pooled cube distillation over backbone stages, decoder output and logits."""
        new_maps = [*out.features["distilled"], out.features["head"]]
        old_maps = [*old.features["distilled"], old.features["head"]]
        schedule = step_factor(ctx) if self.pckd_schedule else 1.0
        # Channel term: feature maps only (the official code drops the logits from it).
        # The official channel loop gives its last feature map the logits' factor (an index of the
        # shortened list); we keep the feature factor for every feature map, as for the spatial term.
        channel = sum(pooled_cube_channel(o, n, self.channel_window) for o, n in zip(old_maps, new_maps))
        channel = schedule * self.pckd_factor * channel / len(new_maps)
        # Spatial term: feature maps, then the low-res logits with the new classes summed into background.
        factors = [self.pckd_factor] * len(new_maps) + [self.pckd_logits_factor]
        new_maps.append(merge_new_into_background(out.features["logits_lowres"][:, : ctx.num_seen],
                                                  ctx.num_old))
        old_maps.append(old.features["logits_lowres"][:, : ctx.num_old])
        spatial = sum(f * pooled_cube_spatial(o, n, self.spatial_windows)
                      for f, o, n in zip(factors, old_maps, new_maps))
        return schedule * spatial / len(new_maps), channel


@dataclass
class GSCRCIL(GSC):
    """GSC plugged onto RCIL (the GSC paper's Table VIII): GSC's targets and weights go to a plain CE
    (eq. 6; RCIL's unbiased CE would fold the old-class pseudo-labels into background), RCIL's pooled
    cube distillation stands in for PLOP's pooling distillation (eq. 13)."""

    name = "gsc_rcil"
    base: Method = field(default_factory=RCIL)
