"""ADE20K (SceneParsing ADEChallengeData2016), 150 classes.

Root = the ADEChallengeData2016 folder (or its parent):

    images/{training,validation}/<id>.jpg
    annotations/{training,validation}/<id>.png     value 0 = "other" (unlabelled), 1..150 = classes

Raw 0 is the background class 0, as in MiB/PLOP: trained as background; `background_is_void` tells
an evaluation it may ignore it (MiB's ADE evaluation does, PLOP's does not by default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ciss.data.base import LabelFileDataset, read_rgb
from ciss.data.errors import DataError

# objectInfo150 order (first name of each entry); index = raw label value.
ADE20K_CLASSES = [
    "background",
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
assert len(ADE20K_CLASSES) == 151

_SPLITS = {"train": "training", "val": "validation", "training": "training",
           "validation": "validation"}


class ADE20KDataset(LabelFileDataset):
    """ADEChallengeData2016; ids = sorted annotation stems of the split."""

    name = "ade20k"
    background_is_void = True
    label_hint = "ADE20K labels hold 0..150; the file is not an ADEChallengeData2016 annotation"

    def __init__(self, root: str | Path, split: str = "train") -> None:
        root = Path(root).expanduser()
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        if not (root / "annotations").is_dir():
            raise DataError(
                f"ADE20K root {root} has no annotations/ folder; pass the ADEChallengeData2016 "
                f"folder (holding images/ and annotations/)"
            )
        if split not in _SPLITS:
            raise DataError(f"unknown ADE20K split {split!r}; valid splits: 'train', 'val'")
        self.root = root
        self.split = split
        self.classes = list(ADE20K_CLASSES)
        sub = _SPLITS[split]
        ann_dir = root / "annotations" / sub
        if not ann_dir.is_dir():
            raise DataError(f"ADE20K annotation folder {ann_dir} is missing")
        self.ids = sorted(n[:-4] for n in os.listdir(ann_dir) if n.endswith(".png"))
        if not self.ids:
            raise DataError(f"ADE20K annotation folder {ann_dir} holds no .png file")
        self._ann_dir = ann_dir
        self._img_dir = root / "images" / sub
        self.has_images = self._img_dir.is_dir()
        if self.has_images:
            present = {n[:-4] for n in os.listdir(self._img_dir) if n.endswith(".jpg")}
            missing = [i for i in self.ids if i not in present]
            if missing:
                raise DataError(
                    f"{len(missing)} annotation(s) of {ann_dir} have no image in {self._img_dir}, "
                    f"e.g. {missing[0]}.jpg; restore the images"
                )

    def missing_images_hint(self) -> str:
        return f"put images/{_SPLITS[self.split]}/ into {self.root}"

    def label_path(self, i: int) -> Path:
        return self._ann_dir / f"{self.ids[i]}.png"

    def load_image(self, i: int) -> np.ndarray:
        self._require_images()
        return read_rgb(self._img_dir / f"{self.ids[i]}.jpg")



def open_ade20k(root: Optional[str | Path], split: str = "train") -> ADE20KDataset:
    if root is None:
        raise DataError("dataset 'ade20k' needs a root: the ADEChallengeData2016 folder")
    return ADE20KDataset(root, split)
