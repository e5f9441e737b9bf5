"""ILT (Michieli & Zanuttigh) as run by MiB: LwF's output distillation + L2 distillation of the encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ciss.losses import cross_entropy, knowledge_distillation
from ciss.methods.base import Method
from ciss.types import Batch, SegOutput, StepContext, Targets


@dataclass
class ILT(Method):
    """CE + `loss_kd` x output KD + `loss_de` x MSE between new and old last backbone stage."""

    name = "ilt"
    needs_old_model = True

    # MiB argparser.py, method 'ILT': opts.loss_kd = 100 and opts.loss_de = 100.
    loss_kd: float = 100.0
    loss_de: float = 100.0
    # MiB argparser.py --alpha default 1.0.
    alpha: float = 1.0

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = out.logits[:, : ctx.num_seen]
        ce = cross_entropy(logits, targets.label, targets.weight)
        if old is None:  # step 0: plain CE (MiB train.py: lde/lkd flags need model_old)
            return {"loss": ce, "ce": ce}
        kd = self.loss_kd * knowledge_distillation(logits, old.logits[:, : ctx.num_old], self.alpha)
        # MiB train.py: nn.MSELoss() (mean over all elements) on features['body'], the backbone output.
        de = self.loss_de * F.mse_loss(out.features["stages"][-1], old.features["stages"][-1])
        return {"loss": ce + kd + de, "ce": ce, "kd": kd, "de": de}
