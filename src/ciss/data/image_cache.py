"""Images and label maps decoded and resized once, then read back from a cache instead of decoded again.

Training reads every image once per epoch; decoding a JPEG and resizing it to the recipe's shorter side
costs about as much each time as the first. ``ResizeCache`` wraps a dataset whose items are files
(``image_path(i)`` and ``label_path(i)``) and stores each resized pair as one uint8 ``.npy`` of shape
(H, W, 4): RGB then the raw label. The file's name is a digest of the image file's bytes, the label
file's bytes, the dataset's identity (its classes and label mapping) and the shorter side, so editing a
file, relabelling or another resize never reads a stale entry. Items come out exactly as
``transforms.Resized`` would make them, which then finds them at size and leaves them as they are.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ciss.data.transforms import resize_shorter

_FORMAT = 1  # bumped when the stored layout or the resize changes


def _file_digest(path: Path, memo: dict[tuple[str, int, int], str]) -> str:
    st = os.stat(path)
    key = (str(path), st.st_mtime_ns, st.st_size)
    digest = memo.get(key)
    if digest is None:
        digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
        memo[key] = digest
    return digest


def cacheable(data: Any) -> bool:
    """True when items of ``data`` are image and label files that a cache can key by their bytes."""
    return callable(getattr(data, "image_path", None)) and callable(getattr(data, "label_path", None))


class ResizeCache:
    """``data`` with items resized to a shorter side of ``shorter`` and cached under ``cache_dir``.

    Everything but the items (ids, classes, class presence, cache keys...) is ``data``'s own, so
    scenarios built on the wrapper equal those built on ``data``.
    """

    def __init__(self, data: Any, shorter: int, cache_dir: str | Path) -> None:
        if not cacheable(data):
            raise TypeError(f"{type(data).__name__} has no image_path/label_path: nothing to key a cache by")
        if shorter < 1:
            raise ValueError(f"shorter side must be positive, got {shorter}")
        self.data = data
        self.shorter = int(shorter)
        self.cache_dir = Path(cache_dir)
        self._identity: str | None = None
        self._digests: dict[tuple[str, int, int], str] = {}

    def __getattr__(self, name: str) -> Any:  # only called for what this class does not define
        if name == "data":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.data, name)

    def __len__(self) -> int:
        return len(self.data)

    def entry(self, i: int) -> Path:
        """The cache file of item i (it may not exist yet)."""
        if self._identity is None:
            self._identity = self.data.cache_key()
        h = hashlib.sha1()
        for part in (str(_FORMAT), self._identity, str(self.shorter),
                     _file_digest(self.data.image_path(i), self._digests),
                     _file_digest(self.data.label_path(i), self._digests)):
            h.update(part.encode())
            h.update(b"\0")
        return self.cache_dir / f"{h.hexdigest()}.npy"

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.entry(i)
        try:
            both = np.load(path, allow_pickle=False)
            if both.ndim == 3 and both.shape[2] == 4 and both.dtype == np.uint8:
                return both[..., :3], both[..., 3]
        except (OSError, ValueError):  # absent, or a torn file from a killed writer: make it again
            pass
        image, mask = resize_shorter(*self.data[i], self.shorter)
        both = np.concatenate([image, mask[..., None]], axis=2)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, both, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return image, mask

    def load_image(self, i: int) -> np.ndarray:
        return self[i][0]

    def load_mask(self, i: int) -> np.ndarray:
        return self[i][1]

    def __repr__(self) -> str:
        return f"ResizeCache({self.data!r}, shorter={self.shorter}, cache_dir={str(self.cache_dir)!r})"
