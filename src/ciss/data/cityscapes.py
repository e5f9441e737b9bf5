"""Cityscapes (gtFine), 19 train classes, with cities as domains for domain-incremental learning.

    leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png
    gtFine/{train,val}/<city>/<id>_gtFine_labelIds.png

The 34 labelIds are mapped to the 19 trainIds (others -> 255) when a mask is read, so raw value =
trainId and `classes` are the 19 train classes. There is no background class: raw 0 is "road"
(`has_background = False`); the domain-incremental protocol never relabels classes.

Domain-incremental protocol (PLOP): its 21 "cities" are the 18 train cities plus the 3 val cities,
in PLOP's fixed order (`CITY_ORDER`), pooled in the split "trainval" (train images then val images,
each sorted by path). Tasks `11-5`, `11-1`, `1-1` count cities; see `ciss.scenario` for the 80/20
train/test rule.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ciss.data.base import SegDataset, label_histogram, read_label, read_rgb
from ciss.data.errors import DataError
from ciss.types import IGNORE

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]

# labelId -> trainId (cityscapesScripts labels.py); every other labelId is ignored.
_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
              24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE, dtype=np.uint8)
for _lid, _tid in _TRAIN_IDS.items():
    LABEL_ID_TO_TRAIN_ID[_lid] = _tid

# PLOP's city -> domain id order (train cities, then val cities). Not alphabetical: it is the
# order the published cityscapes-domain numbers were produced with.
CITY_ORDER = (
    "aachen", "bremen", "darmstadt", "erfurt", "hanover", "krefeld", "strasbourg", "tubingen",
    "weimar", "bochum", "cologne", "dusseldorf", "hamburg", "jena", "monchengladbach",
    "stuttgart", "ulm", "zurich", "frankfurt", "lindau", "munster",
)

_SPLITS = {"train": ("train",), "val": ("val",), "trainval": ("train", "val")}
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_IMAGE_SUFFIX = "_leftImg8bit.png"


class CityscapesDataset(SegDataset):
    """Cityscapes fine annotations as 19 trainIds; `cities[i]` is the city of ids[i]."""

    name = "cityscapes"
    has_background = False
    domain_order = CITY_ORDER
    label_hint = "the file is not a Cityscapes *_gtFine_labelIds.png map"

    def __init__(self, root: str | Path, split: str = "train") -> None:
        root = Path(root).expanduser()
        if not (root / "gtFine").is_dir():
            raise DataError(
                f"Cityscapes root {root} has no gtFine/ folder; pass the folder holding gtFine/ "
                f"and leftImg8bit/"
            )
        if split not in _SPLITS:
            raise DataError(
                f"unknown Cityscapes split {split!r}; valid splits: 'train', 'val', 'trainval' "
                f"(train+val pool of the domain-incremental protocol)"
            )
        self.root = root
        self.split = split
        self.classes = list(CITYSCAPES_CLASSES)
        self.ids, self.cities, self._label_paths, self._image_paths = [], [], [], []
        for sub in _SPLITS[split]:
            gt_dir = root / "gtFine" / sub
            if not gt_dir.is_dir():
                raise DataError(f"Cityscapes annotation folder {gt_dir} is missing")
            for city in sorted(os.listdir(gt_dir)):
                if not (gt_dir / city).is_dir():
                    continue
                names = sorted(n for n in os.listdir(gt_dir / city) if n.endswith(_LABEL_SUFFIX))
                for n in names:
                    id_ = n[: -len(_LABEL_SUFFIX)]
                    self.ids.append(id_)
                    self.cities.append(city)
                    self._label_paths.append(gt_dir / city / n)
                    self._image_paths.append(
                        root / "leftImg8bit" / sub / city / f"{id_}{_IMAGE_SUFFIX}"
                    )
        if not self.ids:
            raise DataError(
                f"no *{_LABEL_SUFFIX} file under {root / 'gtFine'} for split {split!r}"
            )
        self.domains = self.cities
        self.has_images = (root / "leftImg8bit").is_dir() and self._image_paths[0].is_file()

    def missing_images_hint(self) -> str:
        return f"put leftImg8bit/ into {self.root}"

    def load_image(self, i: int) -> np.ndarray:
        self._require_images()
        return read_rgb(self._image_paths[i])

    def load_mask(self, i: int) -> np.ndarray:
        return LABEL_ID_TO_TRAIN_ID[read_label(self._label_paths[i])]  # (H, W) trainIds

    def class_presence(self, i: int) -> np.ndarray:
        present = np.zeros(256, dtype=bool)
        raw = np.flatnonzero(label_histogram(self._label_paths[i]))
        present[LABEL_ID_TO_TRAIN_ID[raw]] = True
        return present

    def describe(self, i: int) -> str:
        return f"label file {self._label_paths[i]}"

    def key_params(self) -> dict[str, Any]:
        return {"mapping": "labelIds->trainIds"}


def open_cityscapes(root: Optional[str | Path], split: str = "train") -> CityscapesDataset:
    if root is None:
        raise DataError("dataset 'cityscapes' needs a root: the folder holding gtFine/")
    return CityscapesDataset(root, split)
