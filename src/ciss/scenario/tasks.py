"""Task names: `15-1` is 15 base classes, then 1 new class per step; named tasks mean what the papers
mean. A task gives the positions in the class order (or, for domain-incremental tasks, in the
domain order) that each step introduces."""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from ciss.data.errors import DataError

# Named tasks of the papers -> number of foreground classes they are defined for. Any other N-M
# works too when it divides the classes evenly.
VOC_TASKS = ("19-1", "15-5", "15-1", "10-10", "10-1", "5-3", "2-2")
ADE_TASKS = ("100-50", "100-10", "100-5", "50-50")
TASK_ALIASES = {"15-5s": "15-1"}  # MiB's name for 15-1
JOINT_TASKS = ("offline", "joint")  # every class at step 0


TaskSpec = Union[str, Sequence[Sequence[Union[int, str]]]]


def step_sizes(task: str, total: int, unit: str) -> list[int]:
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
    sizes = step_sizes(name, num_fg_classes, "classes")
    steps, start = [], 1
    for k, n in enumerate(sizes):
        block = list(range(start, start + n))
        steps.append([0] + block if k == 0 else block)
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
