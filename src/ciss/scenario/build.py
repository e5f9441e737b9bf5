"""build_scenario: a task, setting and order on a dataset pair become a Scenario, its image sets
read from the caches or derived from the class-presence tables."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from ciss.data.base import SegDataset
from ciss.data.errors import DataError
from ciss.scenario.cache import default_cache_dir, load_index_cache, presence_table, save_index_cache, scenario_key
from ciss.scenario.domains import DOMAIN_TASKS, domain_steps
from ciss.scenario.orders import OrderSpec, groups_to_steps, resolve_order
from ciss.scenario.scenario import Scenario, frozen_indices
from ciss.scenario.settings import derive_indices, normalize_setting
from ciss.scenario.tasks import TASK_ALIASES, TaskSpec, parse_task
from ciss.types import BACKGROUND

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
        return build_domain_scenario(train, task, test, order)

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
        steps = groups_to_steps(task, classes)
        order_t = tuple(c for s in steps for c in s)
        digest = hashlib.sha1(json.dumps(steps).encode()).hexdigest()[:8]
        task_name = f"custom:{digest}"

    key = scenario_key(train, test, task_name, steps, setting, order_t)
    train_p = presence_table(train, cache, progress)
    test_p = presence_table(test, cache, progress) if test is not None else None

    index_path = cache / "scenarios" / f"{key}.npz"
    arrays = load_index_cache(index_path, len(steps))
    if arrays is None or (test is not None and not arrays["val"]):
        arrays = derive_indices(train_p, test_p, steps, setting)
        save_index_cache(index_path, arrays)

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
        _train_idx=frozen_indices(arrays["train"]),
        _val_idx=frozen_indices(arrays["val"]),
        _test_on_val_idx=frozen_indices(arrays["tov"]),
        train_data=train,
        test_data=test,
        train_presence=train_p,
        test_presence=test_p,
    )


def build_domain_scenario(
    train: SegDataset, task: str, test: Optional[SegDataset], order: OrderSpec
) -> Scenario:
    step_domains, train_idx, test_idx = domain_steps(train, task, test, order)
    all_classes = tuple(range(len(train.classes)))
    steps = (all_classes,) + ((),) * (len(step_domains) - 1)
    key = scenario_key(train, None, task, steps, "sequential", all_classes, extra=step_domains)
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
        _train_idx=frozen_indices(train_idx),
        _test_idx=frozen_indices(test_idx),
        train_data=train,
        test_data=train,
    )
