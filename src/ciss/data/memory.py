"""Tiny exemplar memory with SSUL-M's class-balanced sampling, and half-memory batches.

Before step t the memory is refilled with `size` images split evenly over the foreground classes
seen so far: classes are visited round-robin (in a shuffled order), and each visit takes one
not-yet-taken candidate holding that class. The candidates are the previous memory and step t-1's
training images; which classes a candidate holds is what the method knows of it: the labels of
the step that trained on it plus the previous model's pseudo-labels (SSUL's utils/memory.py), fixed
when the image becomes a candidate. So every seen class keeps at least one image whenever
size >= number of classes and some candidate is known to hold it.

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

if TYPE_CHECKING:  # scenario imports data; only type hints go the other way
    from ciss.scenario import Scenario, StepDataset

SAMPLINGS = ("balanced", "random")


class ExemplarMemory:
    """Exemplar memory of training-image indices, kept across steps, with the classes each image
    was known to hold when it became a candidate."""

    def __init__(self, size: int = 100, seed: int = 0, sampling: str = "balanced") -> None:
        if size < 0:
            raise DataError(f"memory size must be >= 0, got {size}")
        if sampling not in SAMPLINGS:
            raise DataError(f"memory sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        self.size = int(size)
        self.seed = int(seed)
        self.sampling = sampling
        self._indices: list[int] = []
        self._steps: list[int] = []  # step whose training set each memory image came from
        self._ids: list[str] = []
        self._classes: list[list[int]] = []  # model labels each image was known to hold

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def indices(self) -> np.ndarray:
        """(M,) int64 train-dataset indices, increasing."""
        return np.asarray(self._indices, dtype=np.int64)

    @property
    def steps(self) -> np.ndarray:
        return np.asarray(self._steps, dtype=np.int64)

    @property
    def classes(self) -> list[list[int]]:
        """Per memory image, the model labels it was known to hold."""
        return [list(c) for c in self._classes]

    def update(
        self,
        candidates: Sequence[tuple[int, Sequence[int]]],
        classes: Sequence[int],
        step: int,
        ids: Optional[Sequence[str]] = None,
    ) -> None:
        """Refill from the memory plus `candidates`, (train index, labels it holds) of step `step`'s
        images; `classes` are the labels to balance over (the seen foreground classes)."""
        known = {i: (s, c) for i, s, c in zip(self._indices, self._steps, self._classes, strict=True)}
        for i, held in candidates:
            known.setdefault(int(i), (step, sorted({int(c) for c in held})))
        cand = list(known)
        rng = np.random.RandomState(self.seed * 1000 + step)
        cand = [cand[j] for j in rng.permutation(len(cand))]
        if self.sampling == "random":  # SSUL Table 4's random memory
            taken = cand[: self.size]
        else:
            taken = self._balanced(cand, [set(known[i][1]) for i in cand],
                                   [int(c) for c in rng.permutation(np.asarray(classes, np.int64))])
        taken.sort()
        self._indices = taken
        self._steps = [known[i][0] for i in taken]
        self._classes = [list(known[i][1]) for i in taken]
        self._ids = [str(ids[i]) for i in taken] if ids is not None else []

    def _balanced(self, cand: list[int], held: list[set[int]], class_order: list[int]) -> list[int]:
        """Round-robin over `class_order`: each visit takes the first free candidate holding the
        class; stops when full or when no class finds a candidate."""
        free = [True] * len(cand)
        taken: list[int] = []
        while len(taken) < self.size:
            progress = False
            for c in class_order:
                j = next((j for j in range(len(cand)) if free[j] and c in held[j]), None)
                if j is None:
                    continue
                free[j] = False
                taken.append(cand[j])
                progress = True
                if len(taken) >= self.size:
                    break
            if not progress:
                break
        return taken

    def class_counts(self, classes: Sequence[int]) -> dict[int, int]:
        """How many memory images were known to hold each of `classes` (an image may count for
        several)."""
        return {int(c): sum(int(c) in held for held in self._classes) for c in classes}

    def dataset(
        self, scenario: "Scenario", step: int, transform: Optional[Callable] = None
    ) -> "StepDataset":
        """Memory images for training `step`, labelled with every class seen up to `step`."""
        from ciss.scenario import StepDataset

        if scenario.train_data is None:
            raise DataError("the scenario holds no train dataset")
        return StepDataset(scenario.train_data, self.indices, scenario.test_lut(step), transform)

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "seed": self.seed, "sampling": self.sampling,
                "indices": list(self._indices), "steps": list(self._steps), "ids": list(self._ids),
                "classes": [list(c) for c in self._classes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"size", "seed", "indices", "steps", "classes"} - set(state)
        if missing:
            raise DataError(f"memory state is missing {sorted(missing)}; not an ExemplarMemory "
                            f"state_dict of this version (a memory without the classes of its "
                            f"images cannot be refilled: start the run again)")
        if not len(state["indices"]) == len(state["steps"]) == len(state["classes"]):
            raise DataError("memory state has different numbers of indices, steps and classes")
        self.size = int(state["size"])
        self.seed = int(state["seed"])
        self.sampling = str(state.get("sampling", "balanced"))
        self._indices = [int(i) for i in state["indices"]]
        self._steps = [int(s) for s in state["steps"]]
        self._classes = [[int(c) for c in held] for held in state["classes"]]
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
