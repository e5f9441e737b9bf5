"""The dataset registry: a dict of openers, `build_dataset(name, ...)` and `list_datasets()`."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Optional

from ciss.data.ade20k import open_ade20k
from ciss.data.base import SegDataset
from ciss.data.cityscapes import open_cityscapes
from ciss.data.errors import DataError
from ciss.data.folder import open_folder
from ciss.data.synthetic import open_synthetic
from ciss.data.voc import open_voc

DATASETS: dict[str, Callable[..., SegDataset]] = {
    "ade20k": open_ade20k,
    "cityscapes": open_cityscapes,
    "folder": open_folder,
    "synthetic": open_synthetic,
    "voc": open_voc,
}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def build_dataset(
    name: str, split: str = "train", root: Optional[str | Path] = None, **kw: Any
) -> SegDataset:
    """Open dataset `name` (see list_datasets()) for `split`; `kw` go to the dataset class."""
    try:
        opener = DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}"
        ) from None
    # Check the options against the opener's signature, so a typo is reported as such and a
    # TypeError from inside the dataset is not mistaken for one.
    try:
        inspect.signature(opener).bind(root, split, **kw)
    except TypeError as e:
        accepted = [p for p in _options(opener) if p not in ("root", "split")]
        raise DataError(
            f"dataset {name!r} does not accept the options {sorted(kw)} ({e}); its options: "
            f"{', '.join(accepted) or 'none'}"
        ) from None
    return opener(root, split, **kw)


def _options(opener: Callable[..., SegDataset]) -> list[str]:
    return list(inspect.signature(opener).parameters)
