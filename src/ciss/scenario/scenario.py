"""The frozen Scenario: the classes each step teaches in model label order, the lookup tables that
relabel a step's masks, and the images each step trains and is tested on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from ciss.data.base import SegDataset
from ciss.data.errors import DataError
from ciss.scenario.domains import plop_domain_split
from ciss.scenario.settings import filter_images
from ciss.scenario.step_dataset import StepDataset
from ciss.types import BACKGROUND, IGNORE

def frozen_indices(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
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

    def train_dataset(self, t: int, transform: Optional[Callable] = None) -> StepDataset:
        """Step t's training images, labels relabelled with train_lut(t)."""
        if self.train_data is None:
            raise DataError("this scenario holds no train dataset (it was built from arrays)")
        return StepDataset(self.train_data, self.train_indices(t), self.train_lut(t), transform)

    def test_dataset(
        self, t: int, transform: Optional[Callable] = None, subset: str = "all",
        ignore_background: bool = False,
    ) -> StepDataset:
        """Evaluation after step t with test_lut(t); subset: 'all' | 'val' | 'test_on_val'."""
        pick = {"all": self.test_indices, "val": self.val_indices,
                "test_on_val": self.test_on_val_indices}
        if subset not in pick:
            raise DataError(f"unknown subset {subset!r}; valid: {', '.join(pick)}")
        indices = pick[subset](t)
        assert self.test_data is not None
        return StepDataset(self.test_data, indices, self.test_lut(t, ignore_background), transform)

    def as_joint(self) -> Scenario:
        """One step with every class (same order): joint training on every train image that holds
        any non-background, non-ignore class (domain scenarios: PLOP's split of all cities)."""
        steps = (tuple(self.order),)
        if self.domains:
            all_domains = tuple(d for s in self.domains for d in s)
            assert self.train_data is not None and self.train_data.domains is not None
            train = (plop_domain_split(self.train_data.domains, set(all_domains), "train"),)
            test = (plop_domain_split(self.train_data.domains, set(all_domains), "test"),)
            return replace(self, task="joint", steps=(tuple(self.order),), domains=(all_domains,),
                           key=self.key + "-joint", _train_idx=frozen_indices(train),
                           _test_idx=frozen_indices(test))
        if self.train_presence is None:
            raise DataError("as_joint needs the class-presence table; build with build_scenario")
        train = (filter_images(self.train_presence, list(self.order), [], overlap=True),)
        val = tov = ()
        if self.test_presence is not None:
            val = tov = (filter_images(self.test_presence, list(self.order), [], overlap=True),)
        return replace(self, task="joint", steps=steps, key=self.key + "-joint",
                       _train_idx=frozen_indices(train), _val_idx=frozen_indices(val),
                       _test_on_val_idx=frozen_indices(tov))

    def summary(self) -> list[tuple[int, tuple[str, ...], int]]:
        """(step, names of the classes or domains it introduces, number of training images)."""
        rows = []
        for t in range(self.num_steps):
            names = self.domains[t] if self.domains else tuple(
                self.class_names[k] for k in self.labels_of_step(t))
            rows.append((t, tuple(names), len(self.train_indices(t))))
        return rows
