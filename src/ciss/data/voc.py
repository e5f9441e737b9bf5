"""Pascal VOC 2012 with the SBD-augmented training set (10,582 train_aug + 1,449 val).

Root layout (either list style is found):

    SegmentationClassAug/<id>.png     palette PNGs, value = class index, 255 = void
    JPEGImages/<id>.jpg               optional: without it the dataset is labels-only
    list/{train_aug,val}.txt          "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png" lines
    ImageSets/Segmentation/{train_aug,val}.txt   or one id per line

Ids keep the list's order, so dataset index i == line i of the list: the official MiB/RCIL step
files (positions into these lists) compare directly with our indices.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ciss.data.base import LabelFileDataset, read_rgb
from ciss.data.errors import DataError

VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

# split name -> list file stem; "train" means the SBD-augmented set, as in every CISS paper.
_LIST_NAMES = {"train": "train_aug", "train_aug": "train_aug", "val": "val"}
_LIST_DIRS = ("list", "ImageSets/Segmentation")


def _find_list(root: Path, split: str) -> Path:
    if split not in _LIST_NAMES:
        raise DataError(
            f"unknown VOC split {split!r}; valid splits: 'train' (= train_aug, 10,582 images), "
            f"'val' (1,449 images)"
        )
    stem = _LIST_NAMES[split]
    tried = [root / d / f"{stem}.txt" for d in _LIST_DIRS]
    for path in tried:
        if path.is_file():
            return path
    raise DataError(
        f"no VOC image list for split {split!r} under {root}: looked for "
        f"{' and '.join(str(p) for p in tried)}; put the standard list there"
    )


class VOCDataset(LabelFileDataset):
    """Pascal VOC 2012 + SBD augmented; works labels-only (has_images=False)."""

    name = "voc"
    label_hint = "VOC labels hold 0..20 and 255; the file is not a VOC label map"

    def __init__(self, root: str | Path, split: str = "train") -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(
                f"VOC root {root} does not exist; pass the folder holding SegmentationClassAug/ "
                f"and list/ (or ImageSets/Segmentation/)"
            )
        self.root = root
        self.split = split
        self.classes = list(VOC_CLASSES)
        self.list_file = _find_list(root, split)
        self.ids, label_rel, image_rel = self._read_list(self.list_file)
        self._label_paths = [root / p for p in label_rel]
        self._image_paths = [root / p for p in image_rel]
        self._check_labels_exist()
        image_dir = root / "JPEGImages"
        self.has_images = image_dir.is_dir() and self._image_paths[0].is_file()

    def _read_list(self, path: Path) -> tuple[list[str], list[str], list[str]]:
        # Text mode strips the CRLF endings the published lists have.
        with open(path, "r", encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
        ids, labels, images = [], [], []
        for k, line in enumerate(lines):
            if not line:
                continue
            parts = line.split()
            if len(parts) == 1:
                id_ = parts[0]
                label = f"SegmentationClassAug/{id_}.png"
                image = f"JPEGImages/{id_}.jpg"
            elif len(parts) == 2:
                # DeepLab's older lists start paths with "/"; drop slashes only, never a character.
                image, label = (p.lstrip("/") for p in parts)
                id_ = Path(label).stem
            else:
                raise DataError(
                    f"{path} line {k + 1} has {len(parts)} fields; expected '<id>' or "
                    f"'JPEGImages/<id>.jpg SegmentationClassAug/<id>.png'"
                )
            ids.append(id_)
            labels.append(label)
            images.append(image)
        if not ids:
            raise DataError(f"VOC list {path} is empty")
        return ids, labels, images

    def _check_labels_exist(self) -> None:
        # One directory listing instead of 10k stat calls.
        dirs: dict[Path, set[str]] = {}
        missing = []
        for p in self._label_paths:
            names = dirs.get(p.parent)
            if names is None:
                names = set(os.listdir(p.parent)) if p.parent.is_dir() else set()
                dirs[p.parent] = names
            if p.name not in names:
                missing.append(str(p))
        if missing:
            raise DataError(
                f"{len(missing)} label file(s) listed in {self.list_file} are missing, e.g. "
                f"{missing[0]}; unpack SegmentationClassAug/ into {self.root}"
            )

    def missing_images_hint(self) -> str:
        return f"put the VOC JPEGImages/ folder into {self.root}"

    def load_image(self, i: int) -> np.ndarray:
        self._require_images()
        return read_rgb(self._image_paths[i])

    def label_path(self, i: int) -> Path:
        return self._label_paths[i]


def open_voc(root: Optional[str | Path], split: str = "train") -> VOCDataset:
    if root is None:
        raise DataError(
            "dataset 'voc' needs a root: the folder holding SegmentationClassAug/ and "
            "list/train_aug.txt, list/val.txt (JPEGImages/ optional)"
        )
    return VOCDataset(root, split)
