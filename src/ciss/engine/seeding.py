"""Random state derived from the run's seed and the position in the run, never carried along.

Every step starts from a state drawn from (seed, step), and every epoch from (seed, step, phase,
epoch): Python's `random` (the augmentation), NumPy, torch (initialisation, dropout) and the
loader's shuffling. So a run resumed from a checkpoint, or whose step 0 came from the shared cache,
draws exactly what the uninterrupted run drew, and ends with its weights bit for bit (same machine,
same thread count).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch.utils.data import DataLoader


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, *where: object) -> int:
    """A 63-bit seed for position `where` (e.g. step, phase, epoch) of a run seeded `seed`."""
    key = ":".join(map(str, (seed, *where))).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def seed_step(seed: int, step: int, moment: str) -> None:
    """The state at `moment` ("start", "train") of `step`."""
    seed_everything(derived_seed(seed, "step", step, moment))


def seed_epoch(seed: int, step: int, phase: int, epoch: int, loader: DataLoader) -> None:
    """The state of an epoch, the loader's shuffle and its samplers' epochs included."""
    s = derived_seed(seed, "epoch", step, phase, epoch)
    seed_everything(s)
    if loader.generator is not None:
        loader.generator.manual_seed(s)
    for sampler in (loader.sampler, loader.batch_sampler):
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):  # DistributedSampler, the half-memory batch sampler
            set_epoch(phase * 100_000 + epoch)


# The pass over a step's data after its training (on_step_end: a method's statistics over it) is
# seeded as an epoch of a phase past every real one, whether the step was trained or loaded from the
# shared cache.
AFTER_TRAINING = 10_000


def seed_after_training(seed: int, step: int, loader: DataLoader) -> None:
    """The state in which on_step_end reads the step's data."""
    seed_epoch(seed, step, AFTER_TRAINING, 0, loader)
