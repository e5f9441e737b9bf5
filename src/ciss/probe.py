"""Nearest-class-mean probe: were features lost, or only logits?

Each class keeps a prototype, the mean decoder feature (`features["head"]`) of its pixels, computed on
the images of the step that taught it with the model of that step (features only, no image kept);
background's is renewed every step, as background is labelled at every step. After each step the
probe labels every test pixel with the class of the most similar prototype (cosine similarity) and is
scored like the trained classifier. If the probe holds the old classes where the classifier loses
them, the features kept them and the logits did not (the calibration paper's diagnosis).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ciss.types import Batch


@torch.no_grad()
def class_means(model: nn.Module, batches: Iterable[Batch], classes: Sequence[int]) -> dict[int, torch.Tensor]:
    """{class: mean feature (D,)} over the labelled pixels of `classes`; absent classes are left out.

    Labels are brought to the feature map's size by nearest neighbour.
    """
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for batch in batches:
        feat = model(batch.image).features["head"].float()  # (B, D, h, w)
        lab = F.interpolate(batch.label[:, None].float(), size=feat.shape[-2:], mode="nearest")[:, 0].long()
        flat = feat.permute(0, 2, 3, 1)  # (B, h, w, D)
        for c in classes:
            m = lab == c
            n = int(m.sum())
            if n:
                sums[c] = sums.get(c, 0) + flat[m].sum(0)
                counts[c] = counts.get(c, 0) + n
    return {c: (sums[c] / counts[c]).cpu() for c in sums}


def ncm_logits(features: torch.Tensor, prototypes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Cosine similarity of every pixel feature to every prototype, upsampled to `size`.

    features (B, D, h, w), prototypes (K, D) -> (B, K, *size); a NaN prototype (a class never seen
    at feature scale) scores -inf.
    """
    missing = torch.isnan(prototypes).any(dim=1)
    f = F.normalize(features, dim=1)
    p = F.normalize(torch.nan_to_num(prototypes).to(features), dim=1)
    sim = torch.einsum("bdhw,kd->bkhw", f, p)
    sim = F.interpolate(sim, size=tuple(size), mode="bilinear", align_corners=False)
    return sim.masked_fill(missing.to(sim.device)[None, :, None, None], float("-inf"))
