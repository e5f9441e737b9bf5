"""A user's own dataset in the toolkit's folder format.

    <root>/classes.txt            line i = name of label value i (line 0 = background)
    <root>/images/<id>.jpg|png    RGB images (.jpeg accepted)
    <root>/labels/<id>.png        uint8 single-channel (L or palette) index PNGs, 255 = ignore
    <root>/splits/train.txt       one id per line (val.txt likewise)

Opening checks everything that can be checked from file headers and lists, so a broken dataset
fails with one message naming the file before any training; label *values* need the pixels and are
checked by `validate(full=True)` or by the scenario's class-presence pass (which decodes each mask
once anyway).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ciss.data.base import (
    LabelFileDataset,
    compute_presence,
    header_size,
    label_histogram,
    open_label,
    read_label,
    read_rgb,
)
from ciss.data.errors import DataError
from ciss.types import IGNORE

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_SHOW = 5  # how many offending ids a message lists


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def read_classes(path: Path) -> list[str]:
    """Class names from classes.txt: one per line, line i = label value i."""
    if not path.is_file():
        raise DataError(
            f"{path} is missing: the folder format needs a classes.txt with one class name per "
            f"line (line 0 = background, line i = name of label value i)"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); save it as UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines are harmless
    names = [ln.strip() for ln in lines]
    for k, name in enumerate(names):
        if not name:
            raise DataError(
                f"{path} line {k + 1} is empty: every label value 0..{len(names) - 1} needs a name"
            )
    if len(names) < 2:
        raise DataError(
            f"{path} lists {len(names)} class(es): it needs background on line 1 and at least one "
            f"more class"
        )
    if len(names) > 255:
        raise DataError(
            f"{path} lists {len(names)} classes, but uint8 label PNGs with 255 = ignore hold at "
            f"most 255 classes (values 0..254)"
        )
    seen: dict[str, int] = {}
    for k, name in enumerate(names):
        if name in seen:
            raise DataError(
                f"{path}: class name {name!r} appears on lines {seen[name] + 1} and {k + 1}; "
                f"class names must be unique"
            )
        seen[name] = k
    return names


def read_split(path: Path, available: list[str]) -> list[str]:
    """Image ids of a split file (one per line; blank lines and #-comments skipped)."""
    if not path.is_file():
        have = ", ".join(available) or "none"
        raise DataError(
            f"split file {path} is missing (available splits: {have}); write one image id "
            f"(file stem) per line"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read split file {path} ({e}); save it as UTF-8 text") from None
    ids: list[str] = []
    where: dict[str, int] = {}
    for k, line in enumerate(text.splitlines()):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if item in where:
            raise DataError(
                f"split file {path}: id {item!r} appears on lines {where[item] + 1} and {k + 1}; "
                f"remove the duplicate"
            )
        where[item] = k
        ids.append(item)
    if not ids:
        raise DataError(f"split file {path} lists no image ids; add one id per line")
    return ids


# A split "<name>:holdout" is the ids of splits/<name>.txt whose SHA-1 (of the id's UTF-8 bytes), read
# as an integer, is 0 modulo HOLDOUT_MODULUS: about a fifth, fixed by the ids alone, so adding or
# reordering ids never moves another id. "<name>:fit" is the rest. Tune on train:fit / train:holdout
# and keep the real test split for the end.
HOLDOUT_MODULUS = 5
SPLIT_PARTS = ("fit", "holdout")


def parse_split(split: str) -> tuple[str, Optional[str]]:
    """'train' -> ('train', None); 'train:holdout' -> ('train', 'holdout')."""
    if ":" not in split:
        return split, None
    listed, part = split.rsplit(":", 1)
    if part not in SPLIT_PARTS or not listed:
        raise DataError(f"split {split!r}: after ':' give one of {', '.join(SPLIT_PARTS)} "
                        f"(e.g. train:fit to train and train:holdout to validate)")
    return listed, part


def in_holdout(id_: str) -> bool:
    return int(hashlib.sha1(id_.encode("utf-8")).hexdigest(), 16) % HOLDOUT_MODULUS == 0


def carve(ids: list[str], part: str, where: Path) -> list[str]:
    """The ids of ``part`` ('fit' or 'holdout'), in list order."""
    keep = [i for i in ids if in_holdout(i) == (part == "holdout")]
    if not keep:
        raise DataError(f"{where}: its {part} part is empty ({len(ids)} ids; the holdout takes about "
                        f"1 in {HOLDOUT_MODULUS}); list more ids")
    return keep


class FolderDataset(LabelFileDataset):
    """A dataset in the folder format (see module docstring)."""

    label_hint = (
        "fix the label file, or add the missing class names to classes.txt (line i = name of "
        "label value i); 255 marks pixels to ignore"
    )

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        check_files: bool = True,
        name: str = "folder",
        classes: Optional[list[str]] = None,
    ) -> None:
        self.name = name
        self.split = split
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(
                f"dataset root {root} does not exist or is not a folder; pass the folder that "
                f"holds classes.txt, images/, labels/ and splits/"
            )
        self.root = root
        self.own_classes = read_classes(root / "classes.txt")
        self.classes = self.own_classes
        self._lut: Optional[np.ndarray] = None  # own label value -> index in `classes`
        if classes is not None:  # labels renumbered into a given class list, by name
            self.classes, self._lut = remap_by_name(self.own_classes, list(classes), root / "classes.txt")
        split_dir = root / "splits"
        available = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
        listed, part = parse_split(split)
        split_file = split_dir / f"{listed}.txt"
        self.split_file = split_file
        self.ids = read_split(split_file, available)
        if part is not None:
            self.ids = carve(self.ids, part, split_file)

        for sub in ("images", "labels"):
            if not (root / sub).is_dir():
                raise DataError(
                    f"folder {root / sub} is missing: the folder format keeps "
                    f"{'images/<id>.jpg' if sub == 'images' else 'labels/<id>.png'} there"
                )
        self._image_paths = self._find_images()
        self._label_paths = self._find_labels()
        self.has_images = True
        if check_files:
            self.check_headers()

    # -- discovery ----------------------------------------------------------------------------

    def _find_images(self) -> list[Path]:
        assert self.root is not None
        by_stem: dict[str, list[str]] = {}
        with os.scandir(self.root / "images") as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_EXTS:
                    by_stem.setdefault(stem, []).append(entry.name)
        paths, missing = [], []
        for id_ in self.ids:
            names = by_stem.get(id_)
            if not names:
                missing.append(id_)
                continue
            if len(names) > 1:
                raise DataError(
                    f"image id {id_!r} of {self.split_file} matches several files in "
                    f"{self.root / 'images'} ({', '.join(sorted(names))}); keep only one"
                )
            paths.append(self.root / "images" / names[0])
        if missing:
            raise DataError(
                f"{len(missing)} id(s) of {self.split_file} have no image in "
                f"{self.root / 'images'} (looked for <id>.jpg/.jpeg/.png): {_listing(missing)}; "
                f"add the images or remove the ids from the split file"
            )
        return paths

    def _find_labels(self) -> list[Path]:
        assert self.root is not None
        label_dir = self.root / "labels"
        with os.scandir(label_dir) as it:
            present = {entry.name for entry in it}
        missing = [id_ for id_ in self.ids if f"{id_}.png" not in present]
        if missing:
            raise DataError(
                f"{len(missing)} id(s) of {self.split_file} have no label {label_dir}/<id>.png: "
                f"{_listing(missing)}; add the label PNGs or remove the ids from the split file"
            )
        return [label_dir / f"{id_}.png" for id_ in self.ids]

    # -- checks -------------------------------------------------------------------------------

    def check_headers(self) -> None:
        """Readable files, index-PNG labels, and image size == label size, from headers only."""
        for img_path, lbl_path in zip(self._image_paths, self._label_paths, strict=True):
            w, h = header_size(img_path, "image")
            with open_label(lbl_path) as lbl:
                lw, lh = lbl.size
            if (w, h) != (lw, lh):
                raise DataError(
                    f"label {lbl_path} is {lw}x{lh} but its image {img_path} is {w}x{h} "
                    f"(width x height); a label map must have its image's size"
                )

    def validate(self, full: bool = True, progress: bool = False) -> None:
        """Check the whole dataset; full=True also decodes every mask to check its values."""
        self.check_headers()
        if full:
            compute_presence(self, progress=progress)

    # -- contract -----------------------------------------------------------------------------

    def load_image(self, i: int) -> np.ndarray:
        return read_rgb(self._image_paths[i])

    def image_path(self, i: int) -> Path:
        return self._image_paths[i]

    def label_path(self, i: int) -> Path:
        return self._label_paths[i]

    def _check_values(self, i: int, present: np.ndarray) -> None:
        bad = np.flatnonzero(present[len(self.own_classes):IGNORE])
        if bad.size:
            raise DataError(
                f"label file {self.label_path(i)} holds value(s) {(bad + len(self.own_classes)).tolist()} "
                f"that are neither a class of {self.root / 'classes.txt'} "
                f"(0..{len(self.own_classes) - 1}) nor {IGNORE} (ignore); {self.label_hint}")

    def load_mask(self, i: int) -> np.ndarray:
        mask = read_label(self.label_path(i))
        if self._lut is None:
            return mask
        self._check_values(i, np.bincount(mask.ravel(), minlength=256) > 0)
        return self._lut[mask]

    def class_presence(self, i: int) -> np.ndarray:
        # The scan that reads every label (once per dataset, then cached) decodes its image too, so a
        # truncated or broken image stops the run before training, naming the file.
        read_rgb(self._image_paths[i])
        present = label_histogram(self.label_path(i)) > 0
        if self._lut is None:
            return present
        self._check_values(i, present)
        out = np.zeros(256, dtype=bool)
        out[self._lut[np.flatnonzero(present)]] = True
        return out

    def key_params(self) -> dict[str, Any]:
        # User data gets edited in place, and copied (new mtimes, same bytes): the digest of every
        # label file's bytes makes an edit visible to the caches and keeps them across a copy
        # (about 10 ms per 1,000 small PNGs, no decoding).
        h = hashlib.sha1()
        for p in self._label_paths:
            h.update(hashlib.sha1(p.read_bytes()).digest())
        return {"classes": self.classes, "labels": h.hexdigest(),
                "remap": None if self._lut is None else self._lut[: len(self.own_classes)].tolist()}


def remap_by_name(own: list[str], target: list[str], where: Path) -> tuple[list[str], np.ndarray]:
    """`target` and the (256,) lut from this folder's label values to indices in `target`: a class is
    matched by name (case and surrounding spaces ignored); value 0 is background in both; 255 stays."""
    index = {n.strip().lower(): k for k, n in enumerate(target)}
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[0] = 0
    missing = []
    for v, n in enumerate(own[1:], start=1):
        k = index.get(n.strip().lower())
        if k is None or k == 0:
            missing.append(n)
        else:
            lut[v] = k
    if missing:
        raise DataError(f"{where} names {missing}, which are not among the classes {target[1:]}; "
                        "rename them to match, or remove them")
    return list(target), lut


def open_folder(
    root: Optional[str | Path], split: str = "train", check_files: bool = True,
    classes: Optional[list[str]] = None,
) -> FolderDataset:
    if root is None:
        raise DataError(
            "dataset 'folder' needs a root: the folder holding classes.txt, images/, labels/ and "
            "splits/"
        )
    if isinstance(check_files, str):  # from a command line
        check_files = check_files.strip().lower() not in ("0", "false", "no", "off")
    return FolderDataset(root, split, check_files=check_files, classes=classes)
