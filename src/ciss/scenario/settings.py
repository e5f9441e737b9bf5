"""Settings and the image filter (MiB `filter_images`, reproduced exactly on the official VOC files):
  overlapped  an image is used at step t if it holds a pixel of a class new at t;
  disjoint    ... and no pixel of a future class;
  sequential  image selection as disjoint; labels of every seen class are kept.
0 and 255 never qualify or disqualify an image; step 0 follows the same rule with old = {}.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ciss.data.errors import DataError
from ciss.types import BACKGROUND, IGNORE, SETTINGS

SETTING_ALIASES = {"disjoint": "disjoint", "overlapped": "overlapped", "overlap": "overlapped",
                   "sequential": "sequential"}


def normalize_setting(setting: str) -> str:
    try:
        return SETTING_ALIASES[str(setting).lower()]
    except KeyError:
        raise DataError(
            f"unknown setting {setting!r}; valid settings: {', '.join(SETTINGS)} "
            f"('overlap' is accepted for overlapped)"
        ) from None


def filter_images(
    presence: np.ndarray, new: Sequence[int], old: Sequence[int], overlap: bool
) -> np.ndarray:
    """MiB's image filter on a (N, 256) presence table -> increasing int64 image indices."""
    new_fg = [c for c in new if c not in (BACKGROUND, IGNORE)]
    if not new_fg:
        return np.zeros(0, dtype=np.int64)
    keep = presence[:, new_fg].any(axis=1)
    if not overlap:
        allowed = np.zeros(256, dtype=bool)
        allowed[list(new_fg) + list(old) + [BACKGROUND, IGNORE]] = True
        keep &= ~(presence & ~allowed).any(axis=1)
    return np.flatnonzero(keep).astype(np.int64)


def derive_indices(
    train_p: np.ndarray, test_p: Optional[np.ndarray], steps: Sequence[Sequence[int]],
    setting: str,
) -> dict[str, list[np.ndarray]]:
    overlap = setting == "overlapped"  # sequential selects images as disjoint does
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "tov": []}
    for t, new in enumerate(steps):
        old = [c for s in steps[:t] for c in s]
        out["train"].append(filter_images(train_p, new, old, overlap))
        if test_p is not None:
            # RCIL: val always uses the overlapped rule; test_on_val = any seen class.
            out["val"].append(filter_images(test_p, new, old, overlap=True))
            out["tov"].append(filter_images(test_p, list(old) + list(new), [], overlap=True))
    return out
