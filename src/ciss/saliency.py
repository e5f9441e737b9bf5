"""Binary saliency maps for SSUL's unknown class: a classical detector (no downloaded weights),
computed once per image and cached on disk, or the user's own maps from a folder.

SSUL uses DSS, a deep detector trained on MSRA-B; its Table 4 shows that DRFI, a classical
(random-forest) detector, lands within 1.6 mIoU of it, and that the map's quality matters little.
The classical detectors here are OpenCV's static saliency (pip `opencv-contrib-python-headless`):

  fine_grained       Montabone & Soto 2010, centre-surround differences (the default: on real
                     photos it overlaps the labelled objects best of the two)
  spectral_residual  Hou & Zhang 2007, the image's log-spectrum minus its local average

A map is computed on the image shrunk to `max_side`, smoothed, brought back to the image's size
and binarised with Otsu's threshold (a continuous map has no natural cut-off; Otsu is also how
OpenCV's own StaticSaliency.computeBinaryMap binarises). Everything is deterministic.

Where a map comes from, first match wins:
  1. `saliency_dir/<id>.png` (uint8, > 127 = salient): the user's maps, from any detector, one per
     training image or it is an error (SSUL's code counts any value > 0: binarise soft maps first);
  2. the cache `<cache_dir>/saliency/<dataset cache_key>/<detector key>/<id>.png` (same format);
  3. the detector, whose result is written to the cache (atomically, so DataLoader workers can
     share it).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ciss.data.base import SegDataset
from ciss.data.errors import DataError

CACHE_ENV = "CISS_CACHE"
SALIENT_ABOVE = 127  # folder and cache PNGs: a pixel is salient when its value is > 127
_VERSION = 1  # bump when a detector's output changes: it is part of the cache key

# name -> factory in cv2.saliency
DETECTORS: dict[str, str] = {
    "fine_grained": "StaticSaliencyFineGrained_create",
    "spectral_residual": "StaticSaliencySpectralResidual_create",
}

_INSTALL = ("pip install opencv-contrib-python-headless (OpenCV with its contrib modules; "
            "uninstall opencv-python / opencv-python-headless first, they shadow it), or give "
            "saliency_dir=<folder of <id>.png saliency maps>")


def list_detectors() -> list[str]:
    return sorted(DETECTORS)


def _check_detector(name: str) -> None:
    if name not in DETECTORS:
        raise ValueError(f"unknown saliency detector {name!r}; valid: {', '.join(list_detectors())}")


def detector_key(name: str, max_side: int = 256) -> str:
    """Identity of a detector's output, for cache paths and step-0 checkpoint keys."""
    _check_detector(name)
    return f"{name}-s{int(max_side)}-v{_VERSION}"


def source_key(detector: str = "fine_grained", max_side: int = 256,
               saliency_dir: Optional[str | os.PathLike] = None) -> str:
    """What the maps are: the user's folder (by its resolved path) or the detector's key."""
    if saliency_dir:
        path = str(Path(saliency_dir).expanduser().resolve())
        return f"dir-{hashlib.sha1(path.encode()).hexdigest()[:10]}"
    return detector_key(detector, max_side)


def detect(image: np.ndarray, detector: str = "fine_grained", max_side: int = 256) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) bool salient pixels, computed from scratch (no cache)."""
    _check_detector(detector)
    try:
        import cv2
    except ImportError:
        raise ImportError(f"saliency detection needs OpenCV: {_INSTALL}") from None
    if not hasattr(cv2, "saliency"):
        raise ImportError(f"this OpenCV has no saliency module (contrib): {_INSTALL}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    # The detectors respond to object-scale structure: shrinking first makes the map blob-like
    # (and costs milliseconds whatever the photo's size).
    s = min(1.0, max_side / max(h, w))
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA) if s < 1.0 else image
    ok, sal = getattr(cv2.saliency, DETECTORS[detector])().computeSaliency(
        cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"OpenCV's {detector} saliency failed on a {h}x{w} image")
    sal = np.asarray(sal, dtype=np.float32)  # (sh, sw); [0, 1] or [0, 255] by OpenCV version
    # Smooth at 2% of the side so that the mask is regions, not edges.
    sal = cv2.GaussianBlur(sal, (0, 0), max(1.0, 0.02 * max(sh, sw)))
    lo, hi = float(sal.min()), float(sal.max())
    if hi - lo < 1e-6:  # a flat map (blank image): nothing stands out
        return np.zeros((h, w), dtype=bool)
    u8 = np.clip((sal - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    u8 = cv2.resize(u8, (w, h), interpolation=cv2.INTER_LINEAR)  # (H, W)
    _, binary = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return binary > 0


def _safe_name(image_id: str) -> str:
    """A file name for an image id; ids with path separators or odd characters get a hash."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", image_id).lstrip(".")
    if safe != image_id or not safe:
        safe = f"{safe[:80]}-{hashlib.sha1(image_id.encode('utf-8')).hexdigest()[:10]}"
    return safe + ".png"


def read_map(path: Path, shape: Optional[tuple[int, int]] = None) -> np.ndarray:
    """A saliency PNG -> (H, W) bool (> 127 salient), resized (nearest) to `shape` if given."""
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if shape is not None and im.size != (shape[1], shape[0]):
                im = im.resize((shape[1], shape[0]), Image.NEAREST)
            return np.asarray(im, dtype=np.uint8) > SALIENT_ABOVE
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises several unrelated types for corrupt files
        raise DataError(f"cannot read saliency map {path} ({type(e).__name__}: {e}); "
                        f"re-export it as a uint8 PNG") from None


def _write_map(path: Path, salient: np.ndarray) -> None:
    """Atomic write (temp file + os.replace): a concurrent reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(salient.astype(np.uint8) * 255, mode="L").save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class SaliencyMaps:
    """Per-image binary saliency of one dataset: user folder, else disk cache, else the detector.

    `maps(i)` -> (H, W) bool for dataset item i (pass `image` when it is already loaded).
    Picklable (no OpenCV object is kept), so DataLoader workers can use it.
    """

    def __init__(self, dataset: SegDataset, detector: str = "fine_grained",
                 cache_dir: Optional[str | os.PathLike] = None,
                 saliency_dir: Optional[str | os.PathLike] = None, max_side: int = 256) -> None:
        _check_detector(detector)
        self.dataset = dataset
        self.detector = detector
        self.max_side = int(max_side)
        self.saliency_dir = Path(saliency_dir).expanduser() if saliency_dir else None
        if self.saliency_dir is not None and not self.saliency_dir.is_dir():
            raise DataError(f"saliency_dir {self.saliency_dir} is not a folder; it should hold "
                            f"<image id>.png saliency maps (uint8, > {SALIENT_ABOVE} = salient)")
        if cache_dir is None:
            env = os.environ.get(CACHE_ENV)
            cache_dir = Path(env) if env else Path.home() / ".cache" / "ciss"
        self.cache_dir = (Path(cache_dir).expanduser() / "saliency" / dataset.cache_key()
                          / detector_key(detector, self.max_side))
        self._warned = False

    @property
    def key(self) -> str:
        """What the maps are: the user folder or the detector."""
        return source_key(self.detector, self.max_side, self.saliency_dir)

    def cache_path(self, i: int) -> Path:
        return self.cache_dir / _safe_name(str(self.dataset.ids[i]))

    def __call__(self, i: int, image: Optional[np.ndarray] = None) -> np.ndarray:
        image_id = str(self.dataset.ids[i])
        if self.saliency_dir is not None:
            path = self.saliency_dir / f"{image_id}.png"
            if not path.is_file():
                raise DataError(f"saliency map {path} is missing for {self.dataset.describe(i)}; "
                                f"saliency_dir needs one per training image (or drop it to use "
                                f"the '{self.detector}' detector)")
            shape = image.shape[:2] if image is not None else self._shape(i)
            return read_map(path, shape)
        path = self.cache_path(i)
        if path.is_file():
            try:
                return read_map(path)
            except (DataError, FileNotFoundError):
                pass  # unreadable (or removed meanwhile): recompute and overwrite
        if image is None:
            image = self.dataset.load_image(i)
        salient = detect(image, self.detector, self.max_side)
        try:
            _write_map(path, salient)
        except OSError as e:
            if not self._warned:
                warnings.warn(f"ciss: cannot write saliency cache {path} ({e}); maps are "
                              f"recomputed on every use", stacklevel=2)
                self._warned = True
        return salient

    def _shape(self, i: int) -> tuple[int, int]:
        return tuple(self.dataset.load_image(i).shape[:2])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"SaliencyMaps({self.dataset.name}, {self.key})"
