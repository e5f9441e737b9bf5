"""The words of class-incremental segmentation, fixed once and used everywhere.

step        one incremental stage; step 0 is the base step
old         classes learned before the current step (background included from step 1 on)
new         classes taught at the current step
seen        old + new
future      classes of later steps
setting     "disjoint" | "overlapped" | "sequential"

Model label space: label ``k`` is the ``k``-th class of the scenario's class order, so the classes of
each step are a contiguous block and the classifier grows by appending blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

BACKGROUND = 0
IGNORE = 255

SETTINGS = ("disjoint", "overlapped", "sequential")


@dataclass
class Batch:
    """A training or evaluation batch, already on the model's device."""

    image: torch.Tensor  # (B, 3, H, W) float, normalised
    label: torch.Tensor  # (B, H, W) long, model label space, IGNORE = 255
    index: Optional[torch.Tensor] = None  # (B,) dataset indices, for caches keyed by image
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "saliency": (B, H, W)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            image=self.image.to(device, non_blocking=True),
            label=self.label.to(device, non_blocking=True),
            index=None if self.index is None else self.index.to(device),
            extra={k: v.to(device, non_blocking=True) for k, v in self.extra.items()},
        )


@dataclass
class SegOutput:
    """What a segmenter returns.

    logits:   (B, C, H, W) at input resolution, C = all classes seen so far (plus extra outputs a
              method asked the classifier for, e.g. SSUL's unknown class).
    features: named intermediate tensors for distillation:
              "stages": list of backbone stage outputs, shallow to deep, each (B, C_i, H_i, W_i);
              "distilled": the stages feature distillation reads (the backbone's distill_stages);
              "head":   the decoder output fed to the classifier, (B, D, h, w);
              "logits_lowres": classifier output before upsampling, (B, C, h, w).
    """

    logits: torch.Tensor
    features: dict[str, Any] = field(default_factory=dict)


@dataclass
class Targets:
    """Per-pixel supervision built by a method for one batch.

    label:  (B, H, W) long, IGNORE = 255 means no loss on that pixel.
    weight: (B, H, W) float or None; a per-pixel loss weight (e.g. PLOP's pseudo-label confidence).
    extra:  anything else a method's loss needs (e.g. old-model probabilities).
    """

    label: torch.Tensor
    weight: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a method may know about the step being trained.

    classes_per_step[t] = number of model labels introduced at step t (step 0 includes background).
    """

    step: int
    classes_per_step: tuple[int, ...]
    num_steps: int
    epochs: int = 1
    iters_per_epoch: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def num_old(self) -> int:
        """Labels learned before this step (background included)."""
        return sum(self.classes_per_step[: self.step])

    @property
    def num_seen(self) -> int:
        return sum(self.classes_per_step[: self.step + 1])

    @property
    def num_new(self) -> int:
        return self.classes_per_step[self.step]

    @property
    def old_classes(self) -> range:
        return range(0, self.num_old)

    @property
    def new_classes(self) -> range:
        return range(self.num_old, self.num_seen)
