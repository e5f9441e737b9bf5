"""Class orders: which raw class each model label is. Model label k is raw class `order[k]`, so each
step's classes are a contiguous block of labels and the classifier grows by appending blocks. An
order is the identity, one of GSC's five VOC orders, a seeded shuffle, a file or a list of ids or
class names; explicit class groups define their own order."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from ciss.data.errors import DataError
from ciss.types import BACKGROUND

# GSC (Table VI) / PLOP's 15-5s_b.._e: five 15-1 class orders of VOC, background first.
GSC_ORDERS: dict[str, tuple[int, ...]] = {
    "A": tuple(range(21)),
    "B": (0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11, 17, 3, 6, 18, 10),
    "C": (0, 13, 19, 15, 17, 9, 8, 5, 20, 4, 3, 10, 11, 18, 16, 7, 12, 14, 6, 1, 2),
    "D": (0, 15, 3, 2, 12, 14, 18, 20, 16, 11, 1, 19, 8, 10, 7, 17, 6, 5, 13, 9, 4),
    "E": (0, 7, 5, 3, 9, 13, 12, 14, 19, 10, 2, 1, 4, 16, 8, 17, 15, 18, 6, 11, 20),
}

OrderSpec = Union[None, str, os.PathLike, Sequence[Union[int, str]]]


def _class_id(token: Union[int, str], classes: Sequence[str], where: str) -> int:
    """A raw class id from an int, a digit string or a class name."""
    if isinstance(token, (int, np.integer)):
        value = int(token)
    else:
        tok = str(token).strip()
        if re.fullmatch(r"\d+", tok):
            value = int(tok)
        else:
            lowered = [c.lower() for c in classes]
            if tok in classes:
                return classes.index(tok)
            if tok.lower() in lowered:
                return lowered.index(tok.lower())
            raise DataError(
                f"{where}: {tok!r} is not a class name of this dataset (classes: "
                f"{', '.join(classes[:25])}{', ...' if len(classes) > 25 else ''})"
            )
    if not 0 <= value < len(classes):
        raise DataError(
            f"{where}: class id {value} is out of range; this dataset's ids are "
            f"0..{len(classes) - 1}"
        )
    return value


def _check_order(ids: list[int], classes: Sequence[str], where: str) -> tuple[int, ...]:
    n = len(classes)
    if BACKGROUND not in ids and len(ids) == n - 1:
        ids = [BACKGROUND] + ids  # foreground-only orders are unambiguous: background leads
    dups = sorted({c for c in ids if ids.count(c) > 1})
    if dups:
        raise DataError(f"{where}: class id(s) {dups} appear more than once")
    missing = sorted(set(range(n)) - set(ids))
    if missing:
        raise DataError(
            f"{where}: class id(s) {missing} are missing; an order lists every class "
            f"0..{n - 1} once"
        )
    if ids[0] != BACKGROUND:
        raise DataError(
            f"{where}: background ({BACKGROUND}) must come first (it is part of the base step), "
            f"but the order starts with {ids[0]}"
        )
    return tuple(ids)


def resolve_order(order: OrderSpec, classes: Sequence[str]) -> tuple[int, ...]:
    """Raw class ids in learning order, background first.

    order: None / "identity"; "A".."E" (GSC's five VOC 15-1 orders); "random:<seed>" (background
    first, the rest shuffled by numpy RandomState(seed)); a path to a text file of whitespace- or
    comma-separated ids or class names; such a list inline ("0,3,1,2"); or a sequence of ids /
    names.
    """
    n = len(classes)
    if order is None or (isinstance(order, str) and order.strip().lower() == "identity"):
        return tuple(range(n))
    if isinstance(order, str) and order.strip().upper() in GSC_ORDERS and len(order.strip()) == 1:
        key = order.strip().upper()
        if n != 21:
            raise DataError(
                f"class order {order!r} is one of GSC's VOC orders (A..E) and needs 20 foreground "
                f"classes; this dataset has {n - 1}; use 'random:<seed>', a file or a list"
            )
        return GSC_ORDERS[key]
    if isinstance(order, str) and order.strip().lower().startswith("random:"):
        seed_txt = order.strip().split(":", 1)[1]
        if not re.fullmatch(r"\d+", seed_txt):
            raise DataError(f"class order {order!r}: write random:<non-negative integer seed>")
        rest = list(range(1, n))
        np.random.RandomState(int(seed_txt)).shuffle(rest)
        return (BACKGROUND, *rest)
    if isinstance(order, str) and re.search(r"[,\s]", order.strip()) and not Path(order).is_file():
        # an inline list from a command line: "0,12,9,..." or "0 12 9 ..."
        where = "class order"
        tokens = [t for t in re.split(r"[\s,]+", order.strip()) if t]
        return _check_order([_class_id(t, classes, where) for t in tokens], classes, where)
    if isinstance(order, (str, os.PathLike)):
        path = Path(order).expanduser()
        if not path.is_file():
            raise DataError(
                f"class order {str(order)!r} is neither a known order (None, 'identity', 'A'..'E', "
                f"'random:<seed>') nor an existing file of class ids / names"
            )
        tokens = [t for t in re.split(r"[\s,]+", path.read_text(encoding="utf-8")) if t]
        where = f"class order file {path}"
        return _check_order([_class_id(t, classes, where) for t in tokens], classes, where)
    where = "class order"
    return _check_order([_class_id(t, classes, where) for t in order], classes, where)


def groups_to_steps(
    groups: Sequence[Sequence[Union[int, str]]], classes: Sequence[str]
) -> list[list[int]]:
    """Explicit class groups (raw ids or names) -> steps; background joins step 0 if absent."""
    where = "task (explicit class groups)"
    if not groups or isinstance(groups, (str, bytes)):
        raise DataError(f"{where}: give a non-empty list of class groups, e.g. [[1, 2], [3]]")
    steps: list[list[int]] = []
    for k, g in enumerate(groups):
        if isinstance(g, (str, bytes, int)) or not len(g):
            raise DataError(f"{where}: group {k} must be a non-empty list of class ids or names")
        steps.append([_class_id(c, classes, where) for c in g])
    if BACKGROUND not in steps[0]:
        steps[0] = [BACKGROUND] + steps[0]
    flat = [c for s in steps for c in s]
    if flat[0] != BACKGROUND:
        raise DataError(f"{where}: background ({BACKGROUND}) belongs to the first group")
    _check_order(flat, classes, where)
    return steps
