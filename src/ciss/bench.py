"""Experiment grids: `ciss bench GRID.yaml` expands methods x tasks x settings x orders x seeds
(x calibrators) in code, runs what has not finished (an interrupted grid continues; step-0
checkpoints are shared through the cache as in any run) and appends one JSONL row per run and step.

    recipe: cpu                      # optional
    out_dir: runs/grid               # run directories and grid.jsonl go here
    set:                             # config keys every run shares
      data.dataset: folder
      data.root: ../shared/datasets/ccp21
    axes:                            # config keys to vary; the grid is their product
      method: [ft, mib]
      data.task: [15-1, 10-1]
      data.setting: [overlapped, disjoint]
      data.order: [null]
      seed: [0]
      calibration: [null]
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from tqdm import tqdm

from ciss.config import ConfigError, load_config, stable_hash, to_dict
from ciss.engine import peak_rss_mb, train
from ciss.results import git_sha


def _scalar(v: Any) -> str:
    return "null" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v))


def read_grid(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        grid = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the grid ({exc})") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("axes"), dict) or not grid["axes"]:
        raise ConfigError(f"{path}: a grid needs an 'axes' mapping of config keys to lists of values")
    for k, v in grid["axes"].items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: axis '{k}' must be a non-empty list")
    unknown = set(grid) - {"recipe", "out_dir", "set", "axes"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {sorted(unknown)}; use recipe, out_dir, set, axes")
    return grid


def expand(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """One {key: value} per run: the product of the axes, in the order written."""
    keys = list(grid["axes"])
    return [dict(zip(keys, values)) for values in itertools.product(*(grid["axes"][k] for k in keys))]


def overrides(grid: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """`--set` strings of a grid point: the shared keys, then the point's."""
    return [f"{k}={_scalar(v)}" for k, v in {**(grid.get("set") or {}), **point}.items()]


def run_name(point: dict[str, Any]) -> str:
    readable = "-".join(_scalar(v) for v in point.values()).replace("/", "_").replace(" ", "")
    return f"{readable[:80]}-{stable_hash(point)[:8]}"


def run_grid(path: str | Path, out_dir: Optional[str] = None, progress: bool = True) -> Path:
    """Run every point of the grid that has not finished; returns the grid's JSONL file."""
    grid = read_grid(path)
    out = Path(out_dir or grid.get("out_dir") or "runs/grid")
    points = expand(grid)
    configs = []
    for point in points:  # every configuration is checked before the first run starts
        cfg = load_config(None, overrides(grid, point) + [f"out_dir={out}", f"name={run_name(point)}"],
                          recipe=grid.get("recipe"))
        cfg.progress = False
        configs.append((point, cfg))
    rows_path = out / "grid.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    sha = git_sha() or ""
    for point, cfg in tqdm(configs, desc=f"grid {Path(path).name}", unit="run", disable=not progress):
        run_dir = out / cfg.name
        if (run_dir / "summary.json").is_file():
            continue
        t0 = time.time()
        res = train(cfg)
        summary = json.loads((res.run_dir / "summary.json").read_text())
        steps = [json.loads(l) for l in (res.run_dir / "results.jsonl").read_text().splitlines()]
        with open(rows_path, "a") as f:
            for r in steps:
                f.write(json.dumps({
                    "run": cfg.name, "config_hash": stable_hash(to_dict(cfg)), "git": sha,
                    "seed": cfg.seed, **point, "step": r["step"],
                    "miou_old": r.get("miou_old"), "miou_new": r.get("miou_new"),
                    "miou_all": r.get("miou_all"), "calibrated": r.get("calibrated"),
                    "wall_time_s": time.time() - t0, "run_wall_time_s": summary.get("wall_time_s"),
                    "process_peak_rss_mb": peak_rss_mb()}) + "\n")
    return rows_path
