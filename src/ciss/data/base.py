"""The raw dataset contract, label-file reading, and the one pass that records which classes each
image holds (the class-presence table every image filter is computed from)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ciss.data.errors import DataError
from ciss.types import IGNORE

# Label maps store class indices, so only 8-bit single-channel modes can hold them. "P" (palette)
# PNGs are read by index, which is how VOC ships its masks.
LABEL_MODES = ("L", "P")

# Bumped when the meaning of a cache_key() or a presence table changes: old caches are skipped.
CACHE_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


def open_label(path: str | Path) -> Image.Image:
    """Open a label PNG lazily (header only) and check it can hold class indices."""
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"label file {path} does not exist") from None
    except Exception as e:  # PIL raises several unrelated types for corrupt files
        raise DataError(
            f"cannot read label file {path} ({type(e).__name__}: {e}); re-export it as a PNG"
        ) from None
    if im.mode not in LABEL_MODES:
        im.close()
        if im.mode in ("RGB", "RGBA", "LA", "PA"):
            hint = (
                "labels must be single-channel index PNGs (mode L or P) whose pixel value is the "
                "class index; convert colour-coded masks to class indices first"
            )
        else:
            hint = "labels must be 8-bit single-channel index PNGs (mode L or P), values 0..255"
        raise DataError(f"label file {path} has PIL mode {im.mode!r}: {hint}")
    return im


def read_label(path: str | Path) -> np.ndarray:
    """(H, W) uint8 raw label values; palette PNGs give their index values, not colours."""
    im = open_label(path)
    try:
        arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(
            f"cannot decode label file {path} ({type(e).__name__}: {e}); the file is truncated "
            f"or corrupt, re-export it"
        ) from None
    return arr


def label_histogram(path: str | Path) -> np.ndarray:
    """(256,) int64 pixel count per raw value, computed by PIL in C without a numpy copy."""
    im = open_label(path)
    try:
        hist = im.histogram()
    except Exception as e:
        raise DataError(
            f"cannot decode label file {path} ({type(e).__name__}: {e}); the file is truncated "
            f"or corrupt, re-export it"
        ) from None
    return np.asarray(hist[:256], dtype=np.int64)


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of any image file PIL can read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except Exception as e:
        raise DataError(
            f"cannot read image file {path} ({type(e).__name__}: {e}); the file is truncated "
            f"or not an image, replace it"
        ) from None


def header_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"{what} file {path} does not exist") from None
    except Exception as e:
        raise DataError(
            f"cannot read {what} file {path} ({type(e).__name__}: {e}); the file is truncated or "
            f"not an image, replace it"
        ) from None


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# The dataset contract
# ----------------------------------------------------------------------------------------------


class SegDataset:
    """A raw segmentation dataset: images and label maps in their own label space.

    classes[v] is the name of raw label value v (0 = background where the dataset has one); ids are
    file stems in list order, so index i of every derived array refers to ids[i].
    """

    name: str = "dataset"
    split: str = "train"
    classes: list[str]
    ids: list[str]
    has_images: bool = True
    root: Optional[Path] = None
    # False where value 0 is a real class (cityscapes' "road"): class-incremental tasks then make no
    # sense, only domain-incremental ones.
    has_background: bool = True
    # True where raw 0 means "unlabelled" rather than a background class (ADE20K's "other"): it is
    # trained as background, and an evaluation may choose to ignore it (MiB does, PLOP does not).
    background_is_void: bool = False
    # Domain-incremental protocols (cityscapes cities): the domain of each id, and the protocol's
    # fixed domain order. None / () for datasets without domains.
    domains: Optional[list[str]] = None
    domain_order: tuple[str, ...] = ()
    # Appended to label-value errors: how to fix such a file for this dataset.
    label_hint: str = "fix the label file"

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        raise NotImplementedError

    def load_mask(self, i: int) -> np.ndarray:
        """(H, W) uint8 raw label values (class index or IGNORE)."""
        raise NotImplementedError

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        """(H, W) of image i without decoding it, or None where that costs a decode (subclasses with
        files read it from the header)."""
        return None

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.load_image(i), self.load_mask(i)

    def class_presence(self, i: int) -> np.ndarray:
        """(256,) bool: which raw values occur in mask i (subclasses read it faster if they can)."""
        mask = self.load_mask(i)
        return np.bincount(mask.ravel(), minlength=256)[:256] > 0

    def describe(self, i: int) -> str:
        """Where item i comes from, for error messages (a file path when there is one)."""
        return f"{self.name} {self.split} item {i} (id {self.ids[i]!r})"

    def valid_label_values(self) -> np.ndarray:
        """(256,) bool: raw values a mask may hold (the class indices and IGNORE)."""
        valid = np.zeros(256, dtype=bool)
        valid[: len(self.classes)] = True
        valid[IGNORE] = True
        return valid

    def key_params(self) -> dict[str, Any]:
        """What besides root/split/ids changes the masks (generation params, mappings)."""
        return {}

    def cache_key(self) -> str:
        """Stable identity for on-disk caches: readable prefix + hash of everything that matters."""
        ident = {
            "format": CACHE_FORMAT,
            "name": self.name,
            "root": None if self.root is None else str(Path(self.root).resolve()),
            "split": self.split,
            "n": len(self.ids),
            "ids": ids_digest(self.ids),
            "classes": len(self.classes),
            "params": self.key_params(),
        }
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.name}-{self.split}-{len(self.ids)}-{digest}"

    def _require_images(self) -> None:
        if not self.has_images:
            raise DataError(
                f"{self.name} at {self.root} has label maps but no images (labels-only copy): it "
                f"can build scenarios and splits, but training needs the images; "
                f"{self.missing_images_hint()}"
            )

    def missing_images_hint(self) -> str:
        return "add the image folder to the dataset root"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes)}, root={str(self.root) if self.root else None!r})"
        )


# ----------------------------------------------------------------------------------------------
# The class-presence pass
# ----------------------------------------------------------------------------------------------

# Masks per task sent to a worker: big enough that pickling the result is noise.
_CHUNK = 256
# Below this many masks a process pool costs more than it saves.
_PARALLEL_MIN = 1024

_worker_dataset: Optional[SegDataset] = None


def _init_worker(dataset: SegDataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset


def _presence_rows(dataset: SegDataset, start: int, stop: int) -> np.ndarray:
    """(stop-start, 256) bool presence rows, refusing values that are not classes."""
    valid = dataset.valid_label_values()
    rows = np.zeros((stop - start, 256), dtype=bool)
    for k, i in enumerate(range(start, stop)):
        row = dataset.class_presence(i)
        bad = np.flatnonzero(row & ~valid)
        if bad.size:
            raise DataError(
                f"{dataset.describe(i)}: label value(s) {bad.tolist()} are neither a class index "
                f"(0..{len(dataset.classes) - 1}) nor {IGNORE} (ignore); {dataset.label_hint}"
            )
        rows[k] = row
    return rows


def _worker_chunk(bounds: tuple[int, int]) -> tuple[int, np.ndarray]:
    assert _worker_dataset is not None
    start, stop = bounds
    # Packed bits: 32 bytes per mask instead of 256 on the way back.
    return start, np.packbits(_presence_rows(_worker_dataset, start, stop), axis=1)


def default_workers() -> int:
    env = os.environ.get("CISS_WORKERS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def compute_presence(
    dataset: SegDataset,
    progress: bool = True,
    workers: Optional[int] = None,
    desc: Optional[str] = None,
) -> np.ndarray:
    """(N, 256) bool: presence[i, v] is True when mask i holds raw value v. Reads every mask once.

    Raises DataError naming the file for a mask that cannot be read or holds a value that is
    neither a class index nor IGNORE, so bad labels are caught before training.
    """
    from tqdm.auto import tqdm

    n = len(dataset)
    workers = default_workers() if workers is None else max(1, workers)
    out = np.zeros((n, 256), dtype=bool)
    bar = tqdm(
        total=n,
        desc=desc or f"scanning {dataset.name} {dataset.split} masks",
        unit="mask",
        disable=not progress,
        leave=False,
    )
    bounds = [(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
    try:
        if workers > 1 and n >= _PARALLEL_MIN and "fork" in mp.get_all_start_methods():
            try:
                # fork: the dataset object is inherited, not pickled once per worker.
                pool = mp.get_context("fork").Pool(
                    min(workers, len(bounds)), initializer=_init_worker, initargs=(dataset,)
                )
            except (AssertionError, OSError):  # e.g. inside a daemonic DataLoader worker
                pool = None
            if pool is not None:
                with pool:
                    for start, packed in pool.imap(_worker_chunk, bounds):
                        rows = np.unpackbits(packed, axis=1, count=256).astype(bool)
                        out[start : start + len(rows)] = rows
                        bar.update(len(rows))
                return out
        for start, stop in bounds:
            out[start:stop] = _presence_rows(dataset, start, stop)
            bar.update(stop - start)
        return out
    finally:
        bar.close()


class LabelFileDataset(SegDataset):
    """A dataset whose raw label map of image i is the index PNG at `label_path(i)`."""

    def label_path(self, i: int) -> Path:
        raise NotImplementedError

    def load_mask(self, i: int) -> np.ndarray:
        return read_label(self.label_path(i))

    def class_presence(self, i: int) -> np.ndarray:
        return label_histogram(self.label_path(i)) > 0

    def describe(self, i: int) -> str:
        return f"label file {self.label_path(i)}"

    def image_size(self, i: int) -> tuple[int, int]:
        w, h = header_size(self.label_path(i), "label")  # a label map has its image's size
        return h, w
