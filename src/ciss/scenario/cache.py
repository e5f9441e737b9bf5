"""The scenario's caches. The filter needs the set of values of every mask: one pass builds a
per-image class-presence table (N x 256 bool), cached on disk under the dataset's cache_key(); the
per-step index arrays are cached under a key of (dataset, task, setting, order). A second build
reads no mask."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ciss.data.base import SegDataset, compute_presence

CACHE_ENV = "CISS_CACHE"
_FORMAT = 1  # bump when cached presence/index files change meaning


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ciss"


def _atomic_save(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"ciss: could not write cache file {path} ({e}); continuing without it",
                      stacklevel=3)


def presence_table(
    dataset: SegDataset,
    cache_dir: Optional[str | Path] = None,
    progress: bool = True,
) -> np.ndarray:
    """(N, 256) bool class presence of every mask, from the cache or from one pass over masks."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / "presence" / f"{dataset.cache_key()}.npy"
    if path.is_file():
        try:
            packed = np.load(path, allow_pickle=False)
            if packed.shape == (len(dataset), 32) and packed.dtype == np.uint8:
                return np.unpackbits(packed, axis=1, count=256).astype(bool)
        except (OSError, ValueError):
            pass  # unreadable or stale: recompute and overwrite
    table = compute_presence(dataset, progress=progress)
    packed = np.packbits(table, axis=1)  # (N, 32)
    _atomic_save(path, lambda f: np.save(f, packed, allow_pickle=False))
    return table


def scenario_key(train: SegDataset, test: Optional[SegDataset], task_name: str,
                  steps: Sequence[Sequence[int]], setting: str, order: Sequence[int],
                  extra: Any = None) -> str:
    ident = {"format": _FORMAT, "train": train.cache_key(),
             "test": None if test is None else test.cache_key(), "steps": [list(s) for s in steps],
             "setting": setting, "order": list(order), "extra": extra}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", task_name)[:40]
    return f"{train.name}-{slug}-{setting}-{digest}"


def load_index_cache(path: Path, num_steps: int) -> Optional[dict[str, list[np.ndarray]]]:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "tov": []}
            for kind in out:
                n = int(z[f"{kind}_n"])
                if n not in (0, num_steps):
                    return None
                out[kind] = [z[f"{kind}_{t}"] for t in range(n)]
            return out
    except (OSError, ValueError, KeyError):
        return None


def save_index_cache(path: Path, arrays: dict[str, list[np.ndarray]]) -> None:
    payload: dict[str, np.ndarray] = {}
    for kind, arrs in arrays.items():
        payload[f"{kind}_n"] = np.asarray(len(arrs))
        for t, a in enumerate(arrs):
            payload[f"{kind}_{t}"] = np.asarray(a, dtype=np.int64)
    _atomic_save(path, lambda f: np.savez(f, **payload))
