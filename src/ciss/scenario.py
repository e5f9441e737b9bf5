"""Class-incremental scenarios as data: which classes each step teaches, in which order, how masks
are relabelled (one lookup table), and which images each step trains on (the MiB image filter).

Model label space: model label k is raw class `order[k]`, so each step's classes are a contiguous
block of labels and the classifier grows by appending blocks.

The image filter (MiB `filter_images`, reproduced exactly on the official VOC files):
  overlapped  an image is used at step t if it holds a pixel of a class new at t;
  disjoint    ... and no pixel of a future class;
  sequential  image selection as disjoint; labels of every seen class are kept.
0 and 255 never qualify or disqualify an image; step 0 follows the same rule with old = {}.

The filter needs the set of values of every mask. One pass builds a per-image class-presence table
(N x 256 bool), cached on disk under the dataset's cache_key(); the per-step index arrays are
cached under a key of (dataset, task, setting, order). A second build reads no mask.

Domain-incremental tasks (cityscapes, PLOP): every class is labelled at every step and the steps
introduce cities. For step t PLOP takes the images of the step's cities (dataset order), shuffles
them with RandomState(1) and trains on the first 80%; it tests on the last 20% of the same shuffle
of all cities seen so far. (As in PLOP, those test images may include training images of earlier
steps.) Such a scenario records setting "sequential" (all labels kept) and evaluates on its own
train+val pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch.utils.data

from ciss.data.base import SegDataset, compute_presence
from ciss.data.errors import DataError
from ciss.types import BACKGROUND, IGNORE, SETTINGS

CACHE_ENV = "CISS_CACHE"
_FORMAT = 1  # bump when cached presence/index files change meaning

SETTING_ALIASES = {"disjoint": "disjoint", "overlapped": "overlapped", "overlap": "overlapped",
                   "sequential": "sequential"}

# Named tasks of the papers -> number of foreground classes they are defined for. Any other N-M
# works too when it divides the classes evenly.
VOC_TASKS = ("19-1", "15-5", "15-1", "10-10", "10-1", "5-3", "2-2")
ADE_TASKS = ("100-50", "100-10", "100-5", "50-50")
DOMAIN_TASKS = ("11-5", "11-1", "1-1")  # cityscapes cities (PLOP)
TASK_ALIASES = {"15-5s": "15-1"}  # MiB's name for 15-1
JOINT_TASKS = ("offline", "joint")  # every class at step 0

# GSC (Table VI) / PLOP's 15-5s_b.._e: five 15-1 class orders of VOC, background first.
GSC_ORDERS: dict[str, tuple[int, ...]] = {
    "A": tuple(range(21)),
    "B": (0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11, 17, 3, 6, 18, 10),
    "C": (0, 13, 19, 15, 17, 9, 8, 5, 20, 4, 3, 10, 11, 18, 16, 7, 12, 14, 6, 1, 2),
    "D": (0, 15, 3, 2, 12, 14, 18, 20, 16, 11, 1, 19, 8, 10, 7, 17, 6, 5, 13, 9, 4),
    "E": (0, 7, 5, 3, 9, 13, 12, 14, 19, 10, 2, 1, 4, 16, 8, 17, 15, 18, 6, 11, 20),
}

TaskSpec = Union[str, Sequence[Sequence[Union[int, str]]]]
OrderSpec = Union[None, str, os.PathLike, Sequence[Union[int, str]]]


# ----------------------------------------------------------------------------------------------
# Tasks, settings and orders
# ----------------------------------------------------------------------------------------------


def normalize_setting(setting: str) -> str:
    try:
        return SETTING_ALIASES[str(setting).lower()]
    except KeyError:
        raise DataError(
            f"unknown setting {setting!r}; valid settings: {', '.join(SETTINGS)} "
            f"('overlap' is accepted for overlapped)"
        ) from None


def _step_sizes(task: str, total: int, unit: str) -> list[int]:
    """[base, step1, step2, ...] sizes of task "N-M" (or "N-a-b-..." explicit sizes) over total."""
    if not re.fullmatch(r"\d+(-\d+)+", task):
        raise DataError(
            f"unknown task {task!r}; use N-M (N {unit} first, then M per step, e.g. 15-1), "
            f"N-a-b-... (explicit step sizes), 'offline', or an explicit list of class groups; "
            f"named tasks: {', '.join(list_tasks())}"
        )
    nums = [int(x) for x in task.split("-")]
    if any(x < 1 for x in nums):
        raise DataError(f"task {task!r}: every step must introduce at least one {unit[:-1]}")
    if len(nums) == 2:
        base, m = nums
        if base >= total:
            raise DataError(
                f"task {task!r} starts with {base} {unit} but the dataset has only {total}; "
                f"the base step must leave {unit} for later steps"
            )
        rest = total - base
        if rest % m:
            divisors = [d for d in range(1, rest + 1) if rest % d == 0]
            raise DataError(
                f"task {task!r} does not fit {total} {unit}: after {base} base {unit}, {rest} "
                f"remain, which is not a multiple of {m}; for N={base} valid M are "
                f"{', '.join(map(str, divisors))} (or give explicit sizes, e.g. "
                f"{base}-{'-'.join([str(m)] * (rest // m) + [str(rest % m)])})"
            )
        return [base] + [m] * (rest // m)
    if sum(nums) != total:
        raise DataError(
            f"task {task!r}: the step sizes add up to {sum(nums)}, but the dataset has {total} "
            f"{unit}"
        )
    return nums


def parse_task(task: str, num_fg_classes: int) -> list[list[int]]:
    """Positions in the class order introduced at each step: step 0 = [0, 1..N], then M per step.

    Positions are 1-based for foreground classes (position 0 is background), so with the identity
    order they equal the raw class ids: parse_task("15-1", 20) = [[0..15], [16], ..., [20]].
    """
    if not isinstance(task, str):
        raise DataError(f"parse_task needs a task name such as '15-1', got {task!r}")
    name = TASK_ALIASES.get(task.strip(), task.strip())
    if name in JOINT_TASKS:
        return [list(range(num_fg_classes + 1))]
    sizes = _step_sizes(name, num_fg_classes, "classes")
    steps, start = [], 1
    for k, n in enumerate(sizes):
        block = list(range(start, start + n))
        steps.append([0] + block if k == 0 else block)
        start += n
    return steps


def parse_domain_task(task: str, num_domains: int) -> list[list[int]]:
    """0-based positions in the domain order introduced at each step ("11-5": 11, 5, 5 cities)."""
    name = task.strip()
    if name in JOINT_TASKS:
        return [list(range(num_domains))]
    if name in ("10-5", "10-1"):
        raise DataError(
            f"task {name!r}: PLOP's code names the cityscapes tasks 10-5 / 10-1 but means 11 "
            f"cities first (ids 0..10); use the paper's names 11-5 / 11-1"
        )
    sizes = _step_sizes(name, num_domains, "domains")
    steps, start = [], 0
    for n in sizes:
        steps.append(list(range(start, start + n)))
        start += n
    return steps


def list_tasks(num_classes: Optional[int] = None) -> list[str]:
    """Task names: all named tasks, or those valid for `num_classes` foreground classes (plus a
    few common N-M patterns for other class counts). Any valid N-M is accepted by build_scenario."""
    if num_classes is None:
        return list(VOC_TASKS) + list(ADE_TASKS)
    n = int(num_classes)
    out: list[str] = []

    def fits(name: str) -> bool:
        try:
            parse_task(name, n)
            return True
        except DataError:
            return False

    out = [t for t in (*VOC_TASKS, *ADE_TASKS) if fits(t)]
    if n not in (20, 150) and n >= 2:
        candidates = [f"{n - 1}-1"]
        for base in sorted({n // 2, (3 * n) // 4}):
            if 1 <= base < n:
                candidates += [f"{base}-{m}" for m in (1, 2, 3, 5, 10, n - base)]
        out += [t for t in dict.fromkeys(candidates) if t not in out and fits(t)]
    return out


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


def _groups_to_steps(
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


# ----------------------------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------------------------


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


def _plop_domain_split(
    domains: Sequence[str], wanted: set[str], part: str
) -> np.ndarray:
    """PLOP: images of `wanted` domains in dataset order, RandomState(1) shuffle, 80 / 20."""
    idxs = [i for i, d in enumerate(domains) if d in wanted]
    np.random.RandomState(1).shuffle(idxs)
    cut = int(0.8 * len(idxs))
    chosen = idxs[:cut] if part == "train" else idxs[cut:]
    return np.sort(np.asarray(chosen, dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# The scenario
# ----------------------------------------------------------------------------------------------


def _frozen(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    out = []
    for a in arrays:
        a = np.asarray(a, dtype=np.int64)
        a.setflags(write=False)
        out.append(a)
    return tuple(out)


@dataclass(frozen=True)
class Scenario:
    """A class-incremental (or domain-incremental) protocol over one train / test dataset pair."""

    dataset: str
    task: str
    setting: str
    order: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    class_names: tuple[str, ...]
    has_background: bool = True
    background_is_void: bool = False
    # Domain-incremental scenarios: the domains (cities) introduced at each step; () otherwise.
    domains: tuple[tuple[str, ...], ...] = ()
    key: str = ""
    _train_idx: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    _test_idx: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    _val_idx: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    _test_on_val_idx: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    train_data: Optional[SegDataset] = field(default=None, repr=False, compare=False)
    test_data: Optional[SegDataset] = field(default=None, repr=False, compare=False)
    train_presence: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    test_presence: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    # -- structure ----------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_classes(self) -> int:
        return len(self.order)

    @property
    def classes_per_step(self) -> tuple[int, ...]:
        """Model labels introduced at each step (step 0 includes background)."""
        return tuple(len(s) for s in self.steps)

    def _check_step(self, t: int) -> int:
        if not isinstance(t, (int, np.integer)) or not 0 <= t < self.num_steps:
            raise IndexError(
                f"step {t!r} out of range: scenario {self.task} has steps 0..{self.num_steps - 1}"
            )
        return int(t)

    def labels_of_step(self, t: int) -> range:
        """Model label ids introduced at step t (contiguous)."""
        t = self._check_step(t)
        cps = self.classes_per_step
        start = sum(cps[:t])
        return range(start, start + cps[t])

    def new_classes(self, t: int) -> tuple[int, ...]:
        """Raw class ids introduced at step t."""
        return self.steps[self._check_step(t)]

    def seen_classes(self, t: int) -> tuple[int, ...]:
        """Raw class ids learned at steps 0..t, in model label order."""
        t = self._check_step(t)
        return tuple(c for s in self.steps[: t + 1] for c in s)

    def model_label(self, raw: int) -> int:
        """Model label of raw class id `raw` (its position in the order)."""
        try:
            return self.order.index(raw)
        except ValueError:
            raise DataError(f"raw class id {raw} is not a class of scenario {self.task}") from None

    # -- relabelling --------------------------------------------------------------------------

    def _lut(self, keep: Sequence[int], background_to: int = BACKGROUND) -> np.ndarray:
        lut = np.full(256, IGNORE, dtype=np.uint8)  # values that are no class: ignored
        lut[list(self.order)] = background_to
        for raw in keep:
            lut[raw] = self.order.index(raw)
        lut[IGNORE] = IGNORE
        return lut

    def train_lut(self, t: int) -> np.ndarray:
        """(256,) uint8 raw value -> model label for step t's training masks.

        disjoint/overlapped: the classes new at step t keep their label, every other class
        becomes BACKGROUND; sequential: every seen class is kept. 255 stays 255.
        """
        t = self._check_step(t)
        keep = self.seen_classes(t) if self.setting == "sequential" else self.steps[t]
        return self._lut(keep)

    def test_lut(self, t: int, ignore_background: bool = False) -> np.ndarray:
        """(256,) uint8: seen classes (steps 0..t) kept, unseen -> BACKGROUND, 255 -> 255.

        ignore_background=True maps raw background to IGNORE too (MiB's ADE20K evaluation, where
        raw 0 is unlabelled; see `background_is_void`).
        """
        lut = self._lut(self.seen_classes(t))
        if ignore_background and self.has_background:
            lut[BACKGROUND] = IGNORE
        return lut

    # -- image sets ---------------------------------------------------------------------------

    def train_indices(self, t: int) -> np.ndarray:
        """Increasing int64 indices into the train dataset of the images step t trains on."""
        return self._train_idx[self._check_step(t)]

    def test_indices(self, t: int) -> np.ndarray:
        """Indices into the test dataset evaluated after step t: all of it (unseen -> background,
        as MiB/PLOP); for domain scenarios, PLOP's held-out 20% of the seen cities."""
        t = self._check_step(t)
        if self.test_data is None:
            raise DataError(
                "this scenario was built without a test dataset; pass test=... to build_scenario"
            )
        if self._test_idx:
            return self._test_idx[t]
        return np.arange(len(self.test_data), dtype=np.int64)

    def val_indices(self, t: int) -> np.ndarray:
        """RCIL's val-<t>: test images with a pixel of a class new at t (overlapped rule)."""
        return self._rcil(self._val_idx, t, "val")

    def test_on_val_indices(self, t: int) -> np.ndarray:
        """RCIL's test_on_val-<t>: test images with a pixel of any class seen up to t."""
        return self._rcil(self._test_on_val_idx, t, "test_on_val")

    def _rcil(self, arrays: tuple[np.ndarray, ...], t: int, what: str) -> np.ndarray:
        t = self._check_step(t)
        if not arrays:
            why = ("domain-incremental scenarios have no class-based validation sets"
                   if self.domains else "pass test=... to build_scenario")
            raise DataError(f"no {what} indices for scenario {self.task}: {why}")
        return arrays[t]

    # -- datasets -----------------------------------------------------------------------------

    def train_dataset(self, t: int, transform: Optional[Callable] = None) -> "StepDataset":
        """Step t's training images, labels relabelled with train_lut(t)."""
        if self.train_data is None:
            raise DataError("this scenario holds no train dataset (it was built from arrays)")
        return StepDataset(self.train_data, self.train_indices(t), self.train_lut(t), transform)

    def test_dataset(
        self, t: int, transform: Optional[Callable] = None, subset: str = "all",
        ignore_background: bool = False,
    ) -> "StepDataset":
        """Evaluation after step t with test_lut(t); subset: 'all' | 'val' | 'test_on_val'."""
        pick = {"all": self.test_indices, "val": self.val_indices,
                "test_on_val": self.test_on_val_indices}
        if subset not in pick:
            raise DataError(f"unknown subset {subset!r}; valid: {', '.join(pick)}")
        indices = pick[subset](t)
        assert self.test_data is not None
        return StepDataset(self.test_data, indices, self.test_lut(t, ignore_background), transform)

    def as_joint(self) -> "Scenario":
        """One step with every class (same order): joint training on every train image that holds
        any non-background, non-ignore class (domain scenarios: PLOP's split of all cities)."""
        steps = (tuple(self.order),)
        if self.domains:
            all_domains = tuple(d for s in self.domains for d in s)
            assert self.train_data is not None and self.train_data.domains is not None
            train = (_plop_domain_split(self.train_data.domains, set(all_domains), "train"),)
            test = (_plop_domain_split(self.train_data.domains, set(all_domains), "test"),)
            return replace(self, task="joint", steps=(tuple(self.order),), domains=(all_domains,),
                           key=self.key + "-joint", _train_idx=_frozen(train),
                           _test_idx=_frozen(test))
        if self.train_presence is None:
            raise DataError("as_joint needs the class-presence table; build with build_scenario")
        train = (filter_images(self.train_presence, list(self.order), [], overlap=True),)
        val = tov = ()
        if self.test_presence is not None:
            val = tov = (filter_images(self.test_presence, list(self.order), [], overlap=True),)
        return replace(self, task="joint", steps=steps, key=self.key + "-joint",
                       _train_idx=_frozen(train), _val_idx=_frozen(val),
                       _test_on_val_idx=_frozen(tov))

    def summary(self) -> list[tuple[int, tuple[str, ...], int]]:
        """(step, names of the classes or domains it introduces, number of training images)."""
        rows = []
        for t in range(self.num_steps):
            names = self.domains[t] if self.domains else tuple(
                self.class_names[k] for k in self.labels_of_step(t))
            rows.append((t, tuple(names), len(self.train_indices(t))))
        return rows


class StepDataset(torch.utils.data.Dataset):
    """Items (image (3, H, W) float, label (H, W) long in model label space, dataset index)."""

    def __init__(
        self,
        data: SegDataset,
        indices: np.ndarray,
        lut: np.ndarray,
        transform: Optional[Callable] = None,
    ) -> None:
        from ciss.data.transforms import EvalTransform

        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lut = lut
        self.transform = transform if transform is not None else EvalTransform(None)

    def __len__(self) -> int:
        return len(self.indices)

    def item_sizes(self) -> Optional[list[tuple[int, int]]]:
        """(H, W) of every item from file headers, or None when the transform does not say."""
        size = getattr(self.transform, "output_size", None)
        if not callable(size):
            return None
        sizes = []
        for i in self.indices:
            native = self.data.image_size(int(i))
            out = None if native is None else size(*native)
            if out is None:
                return None
            sizes.append(out)
        return sizes

    def __getitem__(self, k: int) -> tuple[Any, Any, int]:
        i = int(self.indices[k])
        image, mask = self.data[i]
        label = self.lut[mask]  # (H, W) uint8: relabel before geometry, one index op
        img, lbl = self.transform(image, label)
        return img, lbl, i


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def _scenario_key(train: SegDataset, test: Optional[SegDataset], task_name: str,
                  steps: Sequence[Sequence[int]], setting: str, order: Sequence[int],
                  extra: Any = None) -> str:
    ident = {"format": _FORMAT, "train": train.cache_key(),
             "test": None if test is None else test.cache_key(), "steps": [list(s) for s in steps],
             "setting": setting, "order": list(order), "extra": extra}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", task_name)[:40]
    return f"{train.name}-{slug}-{setting}-{digest}"


def _load_index_cache(path: Path, num_steps: int) -> Optional[dict[str, list[np.ndarray]]]:
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


def _save_index_cache(path: Path, arrays: dict[str, list[np.ndarray]]) -> None:
    payload: dict[str, np.ndarray] = {}
    for kind, arrs in arrays.items():
        payload[f"{kind}_n"] = np.asarray(len(arrs))
        for t, a in enumerate(arrs):
            payload[f"{kind}_{t}"] = np.asarray(a, dtype=np.int64)
    _atomic_save(path, lambda f: np.savez(f, **payload))


def build_scenario(
    train: SegDataset,
    task: TaskSpec,
    setting: str = "overlapped",
    order: OrderSpec = None,
    test: Optional[SegDataset] = None,
    cache_dir: Optional[str | Path] = None,
    progress: bool = True,
    trained_steps: int = 0,
) -> Scenario:
    """The scenario `task` on `train` (and `test`, for evaluation sets) in `setting`.

    trained_steps: the first steps are trained already (a model continued on new data), so they
    may have no image in `train`.

    task: a name ("15-1", "100-50", "15-5s", "offline", any N-M that divides the classes evenly,
    or N-a-b-... explicit sizes) or an explicit list of class groups (raw ids or names; the groups
    then define the order). order: see resolve_order. Cityscapes-like datasets (with domains and
    no background) take domain-incremental tasks ("11-5", "11-1", "1-1").
    """
    setting = normalize_setting(setting)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if test is not None and list(test.classes) != list(train.classes):
        raise DataError(
            f"train ({train.name} {train.split}) and test ({test.name} {test.split}) datasets "
            f"have different classes; build both from the same dataset"
        )
    if not train.has_background:
        if not (train.domain_order and isinstance(task, str)):
            raise DataError(
                f"dataset {train.name} has no background class (raw 0 is "
                f"{train.classes[0]!r}), so class-incremental tasks do not apply; it supports "
                f"domain-incremental tasks {', '.join(DOMAIN_TASKS)}"
            )
        return _build_domain_scenario(train, task, test, order)

    classes = list(train.classes)
    if isinstance(task, str):
        order_t = resolve_order(order, classes)
        positions = parse_task(task, len(classes) - 1)
        steps = [[order_t[p] for p in step] for step in positions]
        task_name = TASK_ALIASES.get(task.strip(), task.strip())
    else:
        if order is not None:
            raise DataError(
                "explicit class groups define the class order themselves; do not pass order too"
            )
        steps = _groups_to_steps(task, classes)
        order_t = tuple(c for s in steps for c in s)
        digest = hashlib.sha1(json.dumps(steps).encode()).hexdigest()[:8]
        task_name = f"custom:{digest}"

    key = _scenario_key(train, test, task_name, steps, setting, order_t)
    train_p = presence_table(train, cache, progress)
    test_p = presence_table(test, cache, progress) if test is not None else None

    index_path = cache / "scenarios" / f"{key}.npz"
    arrays = _load_index_cache(index_path, len(steps))
    if arrays is None or (test is not None and not arrays["val"]):
        arrays = _derive_indices(train_p, test_p, steps, setting)
        _save_index_cache(index_path, arrays)

    for t, idx in enumerate(arrays["train"]):
        if len(idx) == 0 and t >= trained_steps:
            names = ", ".join(classes[c] for c in steps[t] if c != BACKGROUND)
            raise DataError(
                f"step {t} of task {task_name} ({setting}) on {train.name} {train.split} has no "
                f"training image (classes: {names}); no image holds them"
                + (" without a future class; try the overlapped setting" if setting != "overlapped"
                   else "")
            )
    return Scenario(
        dataset=train.name,
        task=task_name,
        setting=setting,
        order=tuple(order_t),
        steps=tuple(tuple(s) for s in steps),
        class_names=tuple(classes[c] for c in order_t),
        has_background=True,
        background_is_void=train.background_is_void,
        key=key,
        _train_idx=_frozen(arrays["train"]),
        _val_idx=_frozen(arrays["val"]),
        _test_on_val_idx=_frozen(arrays["tov"]),
        train_data=train,
        test_data=test,
        train_presence=train_p,
        test_presence=test_p,
    )


def _derive_indices(
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


def _build_domain_scenario(
    train: SegDataset, task: str, test: Optional[SegDataset], order: OrderSpec
) -> Scenario:
    if order is not None:
        raise DataError(
            f"{train.name}: domain-incremental tasks keep the class order; the domain order is "
            f"fixed by the protocol ({', '.join(train.domain_order[:3])}, ...); do not pass order"
        )
    if test is not None and test.cache_key() != train.cache_key():
        raise DataError(
            f"{train.name} domain-incremental tasks (PLOP) evaluate on a held-out 20% of the seen "
            f"cities' images of the same pool; pass test=None"
        )
    assert train.domains is not None
    present = set(train.domains)
    missing = [d for d in train.domain_order if d not in present]
    if missing:
        raise DataError(
            f"{train.name} {train.split} lacks the domains {', '.join(missing)} of the "
            f"domain-incremental protocol; build the dataset with split='trainval' (PLOP's 21 "
            f"cities = 18 train + 3 val cities)"
        )
    positions = parse_domain_task(task, len(train.domain_order))
    step_domains = [tuple(train.domain_order[p] for p in step) for step in positions]
    train_idx, test_idx, seen = [], [], set()
    for doms in step_domains:
        seen |= set(doms)
        train_idx.append(_plop_domain_split(train.domains, set(doms), "train"))
        test_idx.append(_plop_domain_split(train.domains, seen, "test"))
    all_classes = tuple(range(len(train.classes)))
    steps = (all_classes,) + ((),) * (len(step_domains) - 1)
    key = _scenario_key(train, None, task, steps, "sequential", all_classes, extra=step_domains)
    return Scenario(
        dataset=train.name,
        task=task.strip(),
        setting="sequential",
        order=all_classes,
        steps=steps,
        class_names=tuple(train.classes),
        has_background=False,
        background_is_void=False,
        domains=tuple(step_domains),
        key=key,
        _train_idx=_frozen(train_idx),
        _test_idx=_frozen(test_idx),
        train_data=train,
        test_data=train,
    )
