"""MiB (Cermelli et al., CVPR 2020): model the background shift in the loss and in the init."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ciss.losses import cross_entropy, unbiased_cross_entropy, unbiased_knowledge_distillation
from ciss.methods.base import Method
from ciss.types import Batch, SegOutput, StepContext, Targets


def init_balanced(model: nn.Module, old_model: nn.Module, num_new: int) -> None:
    """Split the old background over background + new classes so the grown model predicts as before.

    New weights = old background weight; new biases and the background bias = old background bias
    - log(num_new + 1). Then p(bg) + sum p(new) = p_old(bg) and every old-class probability is unchanged.
    """
    # MiB segmentation_module.py init_new_classifier (also PLOP's): bias_diff = log(classes[-1] + 1).
    src = old_model.classifier.convs[0]
    with torch.no_grad():
        bias = src.bias[0] - math.log(num_new + 1)
        new = model.classifier.convs[-1]
        new.weight.copy_(src.weight[0].expand_as(new.weight))
        new.bias.fill_(float(bias))
        model.classifier.convs[0].bias[0] = bias


@dataclass
class MiB(Method):
    """Unbiased CE + `loss_kd` x unbiased KD, new classifiers initialised from the background."""

    name = "mib"
    needs_old_model = True

    # MiB argparser.py, method 'MiB': loss_kd = 10, unce, unkd, init_balanced (VOC and ADE alike).
    loss_kd: float = 10.0
    # MiB argparser.py --alpha default 1.0: multiplies the teacher's logits only.
    alpha: float = 1.0
    init_balanced: bool = True
    # The unbiased CE (old classes' probabilities folded into background on background-labelled
    # pixels); False: a plain CE on the targets, which GSC sets for its pseudo-labels of old classes.
    unbiased_ce: bool = True

    def init_new_classifiers(self, model: nn.Module, old_model: nn.Module, ctx: StepContext) -> None:
        if self.init_balanced:
            init_balanced(model, old_model, ctx.num_new)

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = out.logits[:, : ctx.num_seen]
        if old is None or ctx.num_old == 0:  # step 0: plain CE (MiB train.py: unce only if old_classes != 0)
            ce = cross_entropy(logits, targets.label, targets.weight)
            return {"loss": ce, "ce": ce}
        # MiB averages the CE over all pixels (ignored ones count as 0); we keep the toolkit's mean over
        # valid pixels, as every method here does.
        unkd = self.loss_kd * unbiased_knowledge_distillation(logits, old.logits[:, : ctx.num_old],
                                                              self.alpha)
        if not self.unbiased_ce:
            ce = cross_entropy(logits, targets.label, targets.weight)
            return {"loss": ce + unkd, "ce": ce, "unkd": unkd}
        unce = unbiased_cross_entropy(logits, targets.label, ctx.num_old, targets.weight)
        return {"loss": unce + unkd, "unce": unce, "unkd": unkd}
