"""LwF (Li & Hoiem) for segmentation, as run by MiB: cross-entropy + distillation of the old outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ciss.losses import cross_entropy, knowledge_distillation
from ciss.methods.base import Method
from ciss.types import Batch, SegOutput, StepContext, Targets


@dataclass
class LwF(Method):
    """CE on the current labels + `loss_kd` x KD from the frozen previous model on the old classes."""

    name = "lwf"
    needs_old_model = True

    # MiB argparser.py, method 'LWF': opts.loss_kd = 100 (VOC and ADE alike).
    loss_kd: float = 100.0
    # MiB argparser.py --alpha default 1.0: multiplies the teacher's logits only.
    alpha: float = 1.0

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = out.logits[:, : ctx.num_seen]
        ce = cross_entropy(logits, targets.label, targets.weight)
        if old is None:  # step 0: plain CE, the shared base step (MiB train.py: lkd_flag needs model_old)
            return {"loss": ce, "ce": ce}
        kd = self.loss_kd * knowledge_distillation(logits, old.logits[:, : ctx.num_old], self.alpha)
        return {"loss": ce + kd, "ce": ce, "kd": kd}
