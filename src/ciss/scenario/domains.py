"""Domain-incremental tasks (cityscapes, PLOP): every class is labelled at every step and the steps
introduce cities. For step t PLOP takes the images of the step's cities (dataset order), shuffles
them with RandomState(1) and trains on the first 80%; it tests on the last 20% of the same shuffle
of all cities seen so far. (As in PLOP, those test images may include training images of earlier
steps.) Such a scenario records setting "sequential" (all labels kept) and evaluates on its own
train+val pool."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ciss.data.base import SegDataset
from ciss.data.errors import DataError
from ciss.scenario.orders import OrderSpec
from ciss.scenario.tasks import JOINT_TASKS, step_sizes

DOMAIN_TASKS = ("11-5", "11-1", "1-1")  # cityscapes cities (PLOP)


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
    sizes = step_sizes(name, num_domains, "domains")
    steps, start = [], 0
    for n in sizes:
        steps.append(list(range(start, start + n)))
        start += n
    return steps


def plop_domain_split(
    domains: Sequence[str], wanted: set[str], part: str
) -> np.ndarray:
    """PLOP: images of `wanted` domains in dataset order, RandomState(1) shuffle, 80 / 20."""
    idxs = [i for i, d in enumerate(domains) if d in wanted]
    np.random.RandomState(1).shuffle(idxs)
    cut = int(0.8 * len(idxs))
    chosen = idxs[:cut] if part == "train" else idxs[cut:]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def domain_steps(
    train: SegDataset, task: str, test: Optional[SegDataset], order: OrderSpec
) -> tuple[list[tuple[str, ...]], list[np.ndarray], list[np.ndarray]]:
    """The domains each step of `task` introduces, and per step PLOP's train and test indices into
    `train`, after checking that `train` holds the protocol's whole pool."""
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
        train_idx.append(plop_domain_split(train.domains, set(doms), "train"))
        test_idx.append(plop_domain_split(train.domains, seen, "test"))
    return step_domains, train_idx, test_idx
