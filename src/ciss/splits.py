"""`ciss splits`: show which classes and how many images each step of a scenario has, and write
each step's training image ids (one per line) to OUT/step-<t>.txt."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from ciss.config import default_cache_root
from ciss.data.registry import build_dataset
from ciss.scenario import OrderSpec, Scenario, build_scenario


FEW_IMAGES = 8  # a step with fewer training images than this is worth a warning


def format_table(scenario: Scenario, header: str) -> str:
    """Plain-text table: step, #classes, #images, class (or domain) names."""
    rows = scenario.summary()
    what = "domains" if scenario.domains else "classes"
    lines = [header, f"{'step':>4}  {'#' + what:>9}  {'#images':>8}  {what}"]
    for t, names, n_images in rows:
        lines.append(f"{t:>4}  {len(names):>9}  {n_images:>8,}  {', '.join(names)}")
    return "\n".join(lines)


def _coerce(value: Any) -> Any:
    """Command-line option strings -> numbers / booleans / lists ("64" -> 64, "false" -> False)."""
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return parsed if isinstance(parsed, (int, float, bool, list)) else value


def run_splits(
    dataset: str,
    root: Optional[str | Path],
    task: str,
    setting: str = "overlapped",
    order: OrderSpec = None,
    out: Optional[Path] = None,
    *,
    split: str = "train",
    cache_dir: Optional[str | Path] = None,
    progress: bool = True,
    **dataset_kw: Any,
) -> str:
    """Build the scenario, write OUT/step-<t>.txt (image ids, one per line) and return the table."""
    data = build_dataset(dataset, split, root, **{k: _coerce(v) for k, v in dataset_kw.items()})
    if isinstance(task, str) and task.strip().startswith("["):  # explicit class groups, as in a config
        try:
            task = yaml.safe_load(task)
        except yaml.YAMLError as exc:
            raise ValueError(f"task {task!r} is not a list of class groups ({exc}); write e.g. "
                             "'[[1, 2, 3], [4], [5]]' or '[[cat, dog], [bird]]'") from None
    if cache_dir is None:  # the cache `ciss train` reads, so the masks are scanned once for both
        cache_dir = default_cache_root() / "scenarios"
    scenario = build_scenario(data, task, setting, order=order, cache_dir=cache_dir,
                              progress=progress)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for t in range(scenario.num_steps):
            ids = [data.ids[i] for i in scenario.train_indices(t)]
            (out / f"step-{t}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    order_txt = "identity" if order is None else str(order)
    header = (
        f"{dataset} {split} ({len(data):,} images), task {scenario.task}, {scenario.setting}, "
        f"order {order_txt}: {scenario.num_steps} steps"
    )
    table = format_table(scenario, header)
    few = [(t, n) for t, _, n in scenario.summary() if n < FEW_IMAGES]
    if few:
        table += "\n" + "\n".join(
            f"warning: step {t} has {n} training image(s); with fewer than {FEW_IMAGES} a step barely "
            f"trains: choose another task, setting or class order" for t, n in few)
    return table
