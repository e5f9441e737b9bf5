"""LwF-MC (the multi-class LwF of iCaRL, Rebuffi et al., CVPR 2017) for segmentation, as run by MiB:
independent sigmoids trained with BCE on one-hot labels, plus BCE distillation of the old model's
sigmoid outputs on the old classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ciss.losses import binary_cross_entropy_one_hot
from ciss.methods.base import Method
from ciss.types import Batch, SegOutput, StepContext, Targets


def sigmoid_distillation(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """BCE from the old model's sigmoids to the new ones on the old channels, summed over those
    channels and averaged over every pixel.

    logits (B, C, H, W) with C >= C_old; old_logits (B, C_old, H, W). Scalar; its minimum over
    `logits` is reached at logits[:, :C_old] == old_logits (the old sigmoids' binary entropy).
    """
    c_old = old_logits.shape[1]
    target = torch.sigmoid(old_logits)  # (B, C_old, H, W)
    per_elem = F.binary_cross_entropy_with_logits(logits[:, :c_old], target, reduction="none")
    # MiB train.py icarl_combined: n_cl_old * BCEWithLogitsLoss(mean) = sum over old channels, mean
    # over all pixels (ignored ones included: the distillation needs no label).
    return per_elem.sum(dim=1).mean()


@dataclass
class LwFMC(Method):
    """BCE on one-hot labels over all seen classes + `icarl_importance` x sigmoid distillation."""

    name = "lwf_mc"
    needs_old_model = True

    # MiB argparser.py, method 'LWF-MC': icarl = True, icarl_importance = 10 (VOC and ADE alike;
    # PLOP's and SDR's argparsers keep it). --icarl_disjoint is off: MiB's "combined" iCaRL.
    icarl_importance: float = 10.0

    def base_step_key(self) -> str:
        # MiB train.py: self.bce = opts.bce or opts.icarl, so step 0 trains with BCE, not CE.
        return "bce"

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = out.logits[:, : ctx.num_seen]
        # MiB utils/loss.py BCEWithLogitsLossWithIgnoreIndex: one-hot targets over every seen channel
        # (old classes get 0 where their pixels are labelled background), summed over channels; the
        # mean is over non-ignored pixels, the toolkit's convention (MiB divides by all pixels).
        bce = binary_cross_entropy_one_hot(logits, targets.label, targets.weight)
        if old is None or ctx.num_old == 0:  # step 0 (MiB train.py: icarl_combined needs model_old)
            return {"loss": bce, "bce": bce}
        distill = self.icarl_importance * sigmoid_distillation(logits, old.logits[:, : ctx.num_old])
        return {"loss": bce + distill, "bce": bce, "distill": distill}
