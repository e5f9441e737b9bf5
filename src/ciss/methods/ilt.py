"""ILT (Michieli & Zanuttigh) as run by MiB: LwF's output distillation + L2 distillation of the encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ciss.methods.lwf import LwF
from ciss.types import Batch, SegOutput, StepContext, Targets


@dataclass
class ILT(LwF):
    """LwF's CE + `loss_kd` x output KD, plus `loss_de` x MSE between new and old last backbone stage."""

    name = "ilt"

    # MiB argparser.py, method 'ILT': opts.loss_kd = 100 (LwF's default) and opts.loss_de = 100.
    loss_de: float = 100.0

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        terms = super().loss(out, targets, old, batch, ctx)
        if old is None:  # step 0: plain CE (MiB train.py: the lde flag needs model_old)
            return terms
        # MiB train.py: nn.MSELoss() (mean over all elements) on features['body'], the backbone output.
        de = self.loss_de * F.mse_loss(out.features["stages"][-1], old.features["stages"][-1])
        return {**terms, "loss": terms["loss"] + de, "de": de}
