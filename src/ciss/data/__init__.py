"""Raw datasets (image + raw mask), transforms and exemplar memory.

Datasets return raw label values; relabelling to a step's label space is the scenario's job
(`ciss.scenario`), done with one lookup table.

Each name below is imported from its module on first use, so that a module that needs only the
dataset contract (`ciss.data.base`, as the scenario does) does not import every concrete dataset.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module of ciss.data that defines it
_HOMES = {
    "ADE20K_CLASSES": "ade20k",
    "ADE20KDataset": "ade20k",
    "CITY_ORDER": "cityscapes",
    "CITYSCAPES_CLASSES": "cityscapes",
    "CityscapesDataset": "cityscapes",
    "DATASETS": "registry",
    "DataError": "errors",
    "EvalTransform": "transforms",
    "ExemplarMemory": "memory",
    "FolderDataset": "folder",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "MixedBatchSampler": "memory",
    "SegDataset": "base",
    "SyntheticDataset": "synthetic",
    "TrainTransform": "transforms",
    "VOC_CLASSES": "voc",
    "VOCDataset": "voc",
    "build_dataset": "registry",
    "compute_presence": "base",
    "list_datasets": "registry",
    "with_memory": "memory",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'ciss.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ciss.data.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
