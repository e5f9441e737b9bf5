"""Tiny exemplar memory with SSUL-M's class-balanced sampling, and half-memory batches.

After step t the memory holds `size` training images split evenly over all foreground classes seen
so far: classes are visited round-robin (in a shuffled order), and each visit takes one
not-yet-taken candidate holding that class, candidates being the previous memory plus step t's
training images. So every seen class keeps at least one image whenever size >= number of classes.

Labels: as in SSUL (`image_set='memory'`), a memory image is relabelled at step t with the ground
truth of every class seen up to t (`Scenario.test_lut(t)`), whatever step it was stored at.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.utils.data

from ciss.data.errors import DataError
from ciss.types import BACKGROUND, IGNORE

if TYPE_CHECKING:  # scenario imports data; only type hints go the other way
    from ciss.scenario import Scenario, StepDataset


class ExemplarMemory:
    """Class-balanced exemplar memory of training-image indices, kept across steps."""

    def __init__(self, size: int = 100, seed: int = 0) -> None:
        if size < 0:
            raise DataError(f"memory size must be >= 0, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        self._indices: list[int] = []
        self._steps: list[int] = []  # step whose training set each memory image came from
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def indices(self) -> np.ndarray:
        """(M,) int64 train-dataset indices, increasing."""
        return np.asarray(self._indices, dtype=np.int64)

    @property
    def steps(self) -> np.ndarray:
        return np.asarray(self._steps, dtype=np.int64)

    def update(self, scenario: "Scenario", step: int) -> None:
        """Refill after training `step` from the memory plus the step's training images."""
        if scenario.train_presence is None:
            raise DataError("the memory needs the scenario's class-presence table; use "
                            "build_scenario")
        fg = [c for c in scenario.seen_classes(step) if c not in (BACKGROUND, IGNORE)]
        ids = scenario.train_data.ids if scenario.train_data is not None else None
        self.update_from(scenario.train_presence, scenario.train_indices(step), fg, step, ids)

    def update_from(
        self,
        presence: np.ndarray,
        new_indices: Sequence[int],
        classes: Sequence[int],
        step: int,
        ids: Optional[Sequence[str]] = None,
    ) -> None:
        """Low-level update: presence (N, 256) bool of the train dataset; `classes` = the seen
        foreground raw class ids to balance over; `new_indices` = this step's training images."""
        carried = dict(zip(self._indices, self._steps, strict=True))
        cands = list(dict.fromkeys([*self._indices, *map(int, new_indices)]))  # unique, stable
        origin = np.asarray([carried.get(i, step) for i in cands], dtype=np.int64)
        rng = np.random.RandomState(self.seed * 1000 + step)
        perm = rng.permutation(len(cands))
        cand = np.asarray(cands, dtype=np.int64)[perm]  # (C,)
        origin = origin[perm]
        class_order = [int(c) for c in rng.permutation(np.asarray(classes, dtype=np.int64))]
        has = presence[cand][:, class_order] if len(cand) else np.zeros((0, len(class_order)), bool)
        free = np.ones(len(cand), dtype=bool)
        taken: list[int] = []
        while len(taken) < self.size:
            progress = False
            for k in range(len(class_order)):
                hits = has[:, k] & free  # candidates holding the class, not yet taken
                if not hits.any():
                    continue
                j = int(np.argmax(hits))
                free[j] = False
                taken.append(j)
                progress = True
                if len(taken) >= self.size:
                    break
            if not progress:
                break
        taken.sort(key=lambda j: int(cand[j]))
        self._indices = [int(cand[j]) for j in taken]
        self._steps = [int(origin[j]) for j in taken]
        self._ids = [str(ids[i]) for i in self._indices] if ids is not None else []

    def class_counts(self, presence: np.ndarray, classes: Sequence[int]) -> dict[int, int]:
        """How many memory images hold each of `classes` (an image may count for several)."""
        rows = presence[self.indices] if len(self) else np.zeros((0, 256), bool)
        return {int(c): int(rows[:, c].sum()) for c in classes}

    def dataset(
        self, scenario: "Scenario", step: int, transform: Optional[Callable] = None
    ) -> "StepDataset":
        """Memory images for training `step`, labelled with every class seen up to `step`."""
        from ciss.scenario import StepDataset

        if scenario.train_data is None:
            raise DataError("the scenario holds no train dataset")
        return StepDataset(scenario.train_data, self.indices, scenario.test_lut(step), transform)

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "seed": self.seed, "indices": list(self._indices),
                "steps": list(self._steps), "ids": list(self._ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"size", "seed", "indices", "steps"} - set(state)
        if missing:
            raise DataError(f"memory state is missing {sorted(missing)}; not an ExemplarMemory "
                            f"state_dict")
        if len(state["indices"]) != len(state["steps"]):
            raise DataError("memory state has different numbers of indices and steps")
        self.size = int(state["size"])
        self.seed = int(state["seed"])
        self._indices = [int(i) for i in state["indices"]]
        self._steps = [int(s) for s in state["steps"]]
        self._ids = [str(s) for s in state.get("ids", [])]

    def check_ids(self, ids: Sequence[str]) -> None:
        """Refuse a restored memory whose image ids do not match the dataset it is used with."""
        if self._ids and [ids[i] for i in self._indices] != self._ids:
            raise DataError("the restored memory's image ids do not match this train dataset; "
                            "was the checkpoint made with another dataset or split?")

    def __repr__(self) -> str:
        return f"ExemplarMemory(size={self.size}, stored={len(self)})"


class MixedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of a ConcatDataset([current, memory]): half current data, half memory (SSUL-M).

    An epoch visits every current image once (shuffled); the memory half cycles through shuffled
    passes over the memory. With an empty memory, batches are all current data.
    """

    def __init__(
        self, num_current: int, num_memory: int, batch_size: int, drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 2 and num_memory:
            raise DataError("mixing with memory needs batch_size >= 2")
        self.num_current = int(num_current)
        self.num_memory = int(num_memory)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch = 0
        self.n_mem = self.batch_size // 2 if self.num_memory else 0
        self.n_cur = self.batch_size - self.n_mem

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_current // self.n_cur
        return math.ceil(self.num_current / self.n_cur)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self.epoch += 1
        cur = torch.randperm(self.num_current, generator=g).tolist()
        mem: list[int] = []
        for b in range(len(self)):
            batch = cur[b * self.n_cur : (b + 1) * self.n_cur]
            for _ in range(self.n_mem):
                if not mem:
                    mem = (torch.randperm(self.num_memory, generator=g) + self.num_current).tolist()
                batch.append(mem.pop())
            yield batch


def with_memory(
    current: torch.utils.data.Dataset,
    memory: torch.utils.data.Dataset,
    batch_size: int,
    drop_last: bool = False,
    seed: int = 0,
) -> tuple[torch.utils.data.ConcatDataset, MixedBatchSampler]:
    """(dataset, batch_sampler) for DataLoader(dataset, batch_sampler=sampler)."""
    ds = torch.utils.data.ConcatDataset([current, memory])
    sampler = MixedBatchSampler(len(current), len(memory), batch_size, drop_last, seed)
    return ds, sampler
