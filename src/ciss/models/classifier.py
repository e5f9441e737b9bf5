"""The classifier that grows: one 1x1 conv per step, logits concatenated in step order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class IncrementalClassifier(nn.Module):
    """Per-pixel logits of all classes seen so far, plus an optional block of extra outputs.

    ``convs[t]`` is the 1x1 conv (with bias) producing the ``classes_per_step[t]`` logits of step t;
    ``add_step`` appends a new conv and never touches the old ones, so their weights stay bit-identical.
    New convs get PyTorch's default init; a method that wants another init (MiB's background split)
    overwrites them.

    ``num_extra`` outputs (e.g. SSUL's "unknown" logit) come from ``extra``, one conv that persists
    across steps and sits at the END of the logits: ``logits[:, :num_classes]`` are always the real
    classes, ``logits[:, num_classes:]`` the extra outputs.
    """

    def __init__(self, in_channels: int, classes_per_step: Sequence[int], num_extra: int = 0) -> None:
        super().__init__()
        counts = [int(n) for n in classes_per_step]
        if not counts or any(n < 1 for n in counts):
            raise ValueError(
                f"classes_per_step must be a non-empty list of positive ints, got {list(classes_per_step)}"
            )
        if num_extra < 0:
            raise ValueError(f"num_extra must be >= 0, got {num_extra}")
        self.in_channels = in_channels
        self.convs = nn.ModuleList([nn.Conv2d(in_channels, n, 1, bias=True) for n in counts])
        self.extra = nn.Conv2d(in_channels, num_extra, 1, bias=True) if num_extra > 0 else None

    @property
    def classes_per_step(self) -> tuple[int, ...]:
        return tuple(conv.out_channels for conv in self.convs)

    @property
    def num_classes(self) -> int:
        """Real classes over all steps so far (extra outputs not counted)."""
        return sum(self.classes_per_step)

    @property
    def num_extra(self) -> int:
        return 0 if self.extra is None else self.extra.out_channels

    @property
    def num_outputs(self) -> int:
        """Channels of the logits: num_classes + num_extra."""
        return self.num_classes + self.num_extra

    def add_step(self, n_new: int) -> None:
        """Append the classifier of a new step with ``n_new`` classes (on the device/dtype of the old ones)."""
        if int(n_new) < 1:
            raise ValueError(f"a step adds at least one class, got n_new={n_new}")
        old = self.convs[0].weight
        self.convs.append(nn.Conv2d(self.in_channels, int(n_new), 1, bias=True).to(old.device, old.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, h, w) -> (B, num_classes + num_extra, h, w)
        logits = [conv(x) for conv in self.convs]
        if self.extra is not None:
            logits.append(self.extra(x))
        return torch.cat(logits, dim=1)
