"""Pure loss functions. Shapes: logits (B, C, H, W), label (B, H, W) long with IGNORE = 255."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ciss.types import IGNORE


def cross_entropy(logits: torch.Tensor, label: torch.Tensor,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean CE over non-ignored pixels; `weight` (B, H, W) scales each pixel's term."""
    if weight is None:
        return F.cross_entropy(logits, label, ignore_index=IGNORE)
    per_pixel = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")  # (B, H, W)
    valid = (label != IGNORE).float()
    # Normalise by the number of valid pixels, not by the weights, so down-weighting lowers the loss.
    return (per_pixel * weight * valid).sum() / valid.sum().clamp_min(1.0)
