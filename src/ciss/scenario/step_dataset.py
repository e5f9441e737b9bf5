"""A step's view of a dataset: its images, with masks relabelled to the step's model labels by one
lookup-table index."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch.utils.data

from ciss.data.base import SegDataset

class StepDataset(torch.utils.data.Dataset):
    """Items (image (3, H, W) float, label (H, W) long in model label space, dataset index)."""

    def __init__(
        self,
        data: SegDataset,
        indices: np.ndarray,
        lut: np.ndarray,
        transform: Optional[Callable] = None,
    ) -> None:
        from ciss.data.transforms import EvalTransform

        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lut = lut
        self.transform = transform if transform is not None else EvalTransform(None)

    def __len__(self) -> int:
        return len(self.indices)

    def item_sizes(self) -> Optional[list[tuple[int, int]]]:
        """(H, W) of every item from file headers, or None when the transform does not say."""
        size = getattr(self.transform, "output_size", None)
        if not callable(size):
            return None
        sizes = []
        for i in self.indices:
            native = self.data.image_size(int(i))
            out = None if native is None else size(*native)
            if out is None:
                return None
            sizes.append(out)
        return sizes

    def __getitem__(self, k: int) -> tuple[Any, Any, int]:
        i = int(self.indices[k])
        image, mask = self.data[i]
        label = self.lut[mask]  # (H, W) uint8: relabel before geometry, one index op
        img, lbl = self.transform(image, label)
        return img, lbl, i
