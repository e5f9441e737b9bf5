"""Class-incremental scenarios as data: which classes each step teaches, in which order, how masks
are relabelled (one lookup table), and which images each step trains on (the MiB image filter).

  tasks.py         task names ("15-1", "100-50", "offline", any N-M) -> the positions each step introduces
  orders.py        class orders (identity, GSC's A..E, random:<seed>, files, lists, explicit groups)
  settings.py      disjoint / overlapped / sequential, and the image filter they select with
  cache.py         the class-presence table and the per-step index arrays, cached on disk
  domains.py       domain-incremental tasks (cityscapes cities, PLOP's 80 / 20 split)
  scenario.py      the frozen Scenario: labels per step, relabelling tables, image sets
  step_dataset.py  StepDataset: a step's images with relabelled masks
  build.py         build_scenario: a task on a dataset pair -> Scenario
"""

from ciss.scenario.build import build_scenario
from ciss.scenario.cache import CACHE_ENV, default_cache_dir, presence_table
from ciss.scenario.domains import DOMAIN_TASKS, parse_domain_task
from ciss.scenario.orders import GSC_ORDERS, OrderSpec, resolve_order
from ciss.scenario.scenario import Scenario
from ciss.scenario.settings import SETTING_ALIASES, filter_images, normalize_setting
from ciss.scenario.step_dataset import StepDataset
from ciss.scenario.tasks import ADE_TASKS, JOINT_TASKS, TASK_ALIASES, VOC_TASKS, TaskSpec, list_tasks, parse_task

__all__ = [
    "ADE_TASKS",
    "CACHE_ENV",
    "DOMAIN_TASKS",
    "GSC_ORDERS",
    "JOINT_TASKS",
    "OrderSpec",
    "SETTING_ALIASES",
    "Scenario",
    "StepDataset",
    "TASK_ALIASES",
    "TaskSpec",
    "VOC_TASKS",
    "build_scenario",
    "default_cache_dir",
    "filter_images",
    "list_tasks",
    "normalize_setting",
    "parse_domain_task",
    "parse_task",
    "presence_table",
    "resolve_order",
]
