"""Experiment grids: `ciss bench GRID.yaml` expands methods x tasks x settings x orders x seeds
(x calibrators) in code, runs what has not finished (an interrupted grid continues; step-0
checkpoints are shared through the cache as in any run) and appends one JSONL row per run and step.

    recipe: cpu                      # optional
    out_dir: runs/grid               # run directories and grid.jsonl go here
    set:                             # config keys every run shares
      data.dataset: folder
      data.root: ../../../shared/datasets/ccp21   # relative paths: to this file
    axes:                            # config keys to vary; the grid is their product
      method: [ft, mib]
      data.task: [15-1, 10-1]
      data.setting: [overlapped, disjoint]
      data.order: [null]
      seed: [0]
      calibration: [null]
    name: "ccp21-{data.task}-{data.setting}-{method}"   # optional run names; {axis} = its value
    methods:                         # optional: config keys of one method's runs (after `set`;
      mib: {method_args.loss_kd: 10} # an axis still wins); an entry with a `method` key is a
      gsc-no_pr: {method: gsc, method_args.pr: false}  # named variant, put in the method axis

Relative data paths (`data.root`, `data.test_root`) are read from the grid file's folder, so a grid
runs from any directory; `out_dir` stays relative to where `ciss bench` runs.

A finished run found under its name is not run again; if grid.jsonl has no rows for it yet (a run
made by `ciss train` under that name, or an earlier grid), they are written from its results, marked
`"recorded": "found"`. `ciss bench GRID --status` lists what remains; `--only PATTERN` keeps the runs
whose names match a shell pattern (e.g. `'*-plop*'`; repeatable); `--jobs N` runs N points at once;
`--executor slurm` submits one job per point instead (ciss.cluster; options in an optional `slurm:`
section), whose runs `--status` (or `--wait`) records once they have finished.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from tqdm import tqdm

from ciss import cluster
from ciss.config import ConfigError, load_config, stable_hash, to_dict
from ciss.engine import peak_rss_mb, train
from ciss.results import LockHeld, RunDir, dumps, exclusive, git_sha, kept_wall_time


class RunsFailed(Exception):
    """Some runs of a parallel grid exited with an error."""


def _scalar(v: Any) -> str:
    return "null" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v))


def _set_value(v: Any) -> str:
    """`v` as `--set` text, which YAML reads back as `v` (JSON's 1e-05 would read as a string)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=float("inf")).strip()
    return text[:-3].strip() if text.endswith("...") else text


# Keys whose relative values name files next to the grid, not next to the caller.
GRID_RELATIVE_KEYS = ("data.root", "data.test_root")


def _from_grid_dir(value: Any, folder: Path) -> Any:
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value
    return os.path.relpath(folder / value)  # as the caller would write it from where it runs


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
    folder = path.resolve().parent
    shared = grid.get("set") or {}
    for key in GRID_RELATIVE_KEYS:
        if key in shared:
            shared[key] = _from_grid_dir(shared[key], folder)
        if key in grid["axes"]:
            grid["axes"][key] = [_from_grid_dir(v, folder) for v in grid["axes"][key]]
    unknown = set(grid) - {"recipe", "out_dir", "set", "axes", "name", "methods", "slurm"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {sorted(unknown)}; use recipe, out_dir, set, axes, "
                          f"name, methods, slurm")
    grid["slurm"] = cluster.read_options(grid.get("slurm"), str(path))
    per_method = grid.get("methods") or {}
    if not isinstance(per_method, dict) or not all(isinstance(v, dict) for v in per_method.values()):
        raise ConfigError(f"{path}: 'methods' maps a method to config keys of its runs, e.g. "
                          f"methods: {{gsc: {{optim.epochs_next: 60}}}}")
    used = {str(m) for m in grid["axes"].get("method", [shared.get("method", "ft")])}
    if set(per_method) - used:
        raise ConfigError(f"{path}: 'methods' names {sorted(set(per_method) - used)}, which no run of "
                          f"the grid uses (its methods: {', '.join(sorted(used))})")
    if "name" in grid:
        template = grid["name"]
        fields = re.findall(r"\{([^{}]*)\}", template) if isinstance(template, str) else []
        if not fields or any(f not in grid["axes"] for f in fields):
            raise ConfigError(f"{path}: name must be a string using axes as {{axis}} fields (axes: "
                              f"{', '.join(grid['axes'])}), got {template!r}")
        names = [run_name(p, template) for p in expand(grid)]
        if len(set(names)) != len(names):
            varying = [k for k, v in grid["axes"].items() if len(v) > 1 and k not in fields]
            raise ConfigError(f"{path}: the name template gives two runs the same name; add "
                              f"{', '.join('{' + k + '}' for k in varying)}")
    return grid


def expand(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """One {key: value} per run: the product of the axes, in the order written."""
    keys = list(grid["axes"])
    return [dict(zip(keys, values)) for values in itertools.product(*(grid["axes"][k] for k in keys))]


def overrides(grid: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """`--set` strings of a grid point: the shared keys, its method's own (`methods`), the point's."""
    shared = grid.get("set") or {}
    own = (grid.get("methods") or {}).get(point.get("method", shared.get("method", "ft")), {})
    keys = {**shared, **own, **point}
    if "method" in own:  # a named variant: the axis value names the run, the entry's method trains
        keys["method"] = own["method"]
    return [f"{k}={_set_value(v)}" for k, v in keys.items()]


def run_name(point: dict[str, Any], template: Optional[str] = None) -> str:
    """The point's run directory name: the grid's template filled in, or its values and a hash."""
    if template is not None:
        name = re.sub(r"\{([^{}]*)\}", lambda m: _scalar(point[m.group(1)]), template)
        return name.replace("/", "_").replace(" ", "")
    readable = "-".join(_scalar(v) for v in point.values()).replace("/", "_").replace(" ", "")
    return f"{readable[:80]}-{stable_hash(point)[:8]}"


def _rows(name: str, config: dict[str, Any], point: dict[str, Any], run_dir: Path, sha: str,
          wall: Optional[float], extra: dict[str, Any]) -> list[dict[str, Any]]:
    steps = RunDir(run_dir, create=False).read_jsonl("results.jsonl")
    run_wall = kept_wall_time(steps)
    return [{"run": name, "config_hash": stable_hash(config), "git": sha, "seed": config.get("seed"),
             **point, "step": r["step"], "miou_old": r.get("miou_old"), "miou_new": r.get("miou_new"),
             "miou_all": r.get("miou_all"), "calibrated": r.get("calibrated"), "wall_time_s": wall,
             "run_wall_time_s": run_wall, **extra} for r in steps]


def run_grid(path: str | Path, out_dir: Optional[str] = None, progress: bool = True, jobs: int = 1,
             status: bool = False, executor: Optional[str] = None, slurm: Optional[dict] = None,
             wait: bool = False, only: Sequence[str] = ()) -> Path:
    """Run every point of the grid that has not finished; returns the grid's JSONL file.

    `only`: shell patterns (fnmatch); when given, the grid is reduced to the runs whose names match one.

    `jobs` > 1 runs that many points at once, each a `ciss train` process with its share of the cores
    and its log in <out_dir>/<run>.log. `status` only records finished runs and lists what remains.
    `executor` ("slurm" or "local") submits one job per point instead (ciss.cluster), with the job
    options of the grid's `slurm` section updated by `slurm`; `wait` waits for them and records them."""
    if jobs < 1:
        raise ConfigError(f"jobs must be 1 or more, got {jobs}")
    if executor is not None and jobs > 1:
        raise ConfigError("--jobs runs points on this machine; with --executor every point is its own job: "
                          "give one of them")
    grid = read_grid(path)
    out = Path(out_dir or grid.get("out_dir") or "runs/grid")
    configs = []
    for point in expand(grid):  # every configuration is checked before the first run starts
        args = overrides(grid, point) + [f"out_dir={out}", f"name={run_name(point, grid.get('name'))}"]
        cfg = load_config(None, args, recipe=grid.get("recipe"))
        cfg.progress = False
        configs.append((point, cfg, args))
    if only:
        configs = select_runs(configs, only, path)
    rows_path = out / "grid.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    recorded = set()
    if rows_path.is_file():
        recorded = {json.loads(l)["run"] for l in rows_path.read_text().splitlines() if l.strip()}
    todo, busy, queued = [], [], []
    states = {}  # run -> (job, its state) of the runs submitted as jobs
    for point, cfg, args in configs:
        run_dir = out / cfg.name
        job = cluster.read_job(out, cfg.name)
        if job is not None and not (run_dir / "summary.json").is_file():
            states[cfg.name] = (job, cluster.job_state(job))
        if not (run_dir / "summary.json").is_file():
            if cfg.name in states and states[cfg.name][1] in cluster.ACTIVE and not status:
                queued.append(cfg.name)
            else:
                (busy if _in_use(run_dir) else todo).append((point, cfg, args))
        elif cfg.name not in recorded:  # finished outside this run of the grid: record what it measured
            _record_found(rows_path, cfg.name, point, run_dir, job)
    for _, cfg, _ in busy:
        print(f"{out / cfg.name} is being trained by another process: left to it")
    for name in queued:
        job, state = states[name]
        print(f"{out / name}: left to {job['executor']} job {job['job_id']} ({state})")
    if status:
        print(f"{path}: {len(configs) - len(todo) - len(busy)} of {len(configs)} runs finished in {out}")
        for _, cfg, _ in todo:
            job, state = states.get(cfg.name, (None, ""))
            print(f"  to run: {cfg.name}" + ("  (started)" if (out / cfg.name).is_dir() else "")
                  + (f"  [{job['executor']} job {job['job_id']}: {state}, log {job['log']}]" if job else ""))
        return rows_path
    if executor is not None:
        _submit(todo, out, grid, executor, cluster.merged_options(grid["slurm"], slurm), rows_path, wait)
        return rows_path
    sha = git_sha() or ""
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo) - len(busy),
               desc=f"grid {Path(path).name}", unit="run", disable=not progress)
    if jobs == 1:
        for point, cfg, _ in todo:
            t0 = time.time()
            res = train(cfg)
            _append(rows_path, _rows(cfg.name, to_dict(cfg), point, res.run_dir, sha, time.time() - t0,
                                     {"process_peak_rss_mb": peak_rss_mb()}))
            bar.update()
    else:
        _run_parallel(todo, out, grid.get("recipe"), jobs, rows_path, sha, bar)
    bar.close()
    return rows_path


def select_runs(configs: list, patterns: Sequence[str], path: str | Path) -> list:
    """The (point, config, args) of `configs` whose run name matches one of `patterns`; a pattern that
    matches no run is refused with the grid's names, since it is most likely a typo."""
    names = [cfg.name for _, cfg, _ in configs]
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} runs)" if len(names) > 8 else "")
        raise ConfigError(f"{path}: --only {' '.join(unmatched)} matches none of the grid's runs ({shown})")
    return [c for c in configs if any(fnmatch.fnmatchcase(c[1].name, p) for p in patterns)]


def _record_found(rows_path: Path, name: str, point: dict[str, Any], run_dir: Path,
                  job: Optional[dict[str, Any]]) -> None:
    """Rows of a finished run that grid.jsonl lacks: made outside the grid, or by a job."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    _check_found(run_dir, config, point)
    meta = run_dir / "meta.json"
    run_sha = json.loads(meta.read_text()).get("git_sha", "") if meta.is_file() else ""
    extra: dict[str, Any] = {"recorded": "found"}
    if job is not None:
        summary = RunDir(run_dir, create=False).read_summary()
        extra = {"recorded": job["executor"], "job_id": job["job_id"],
                 "process_peak_rss_mb": summary.get("peak_rss_mb")}
    _append(rows_path, _rows(name, config, point, run_dir, run_sha or "", None, extra))


def _submit(todo: list, out: Path, grid: dict[str, Any], kind: str, options: dict[str, Any],
            rows_path: Path, wait: bool) -> None:
    """One job per point; with `wait`, wait for them and record the finished runs."""
    submitted = []
    for point, cfg, args in todo:
        job = cluster.submit_point(kind, out, cfg.name, args, grid.get("recipe"), options)
        submitted.append((point, cfg, job))
        print(f"{cfg.name}: {kind} job {job.job_id} (log {job.paths.stdout})")
    if not wait:
        if submitted:
            print(f"{len(submitted)} job(s) submitted; `ciss bench GRID --status` shows them and records "
                  "the finished runs")
        return
    failed = []
    for point, cfg, job in submitted:
        try:
            job.result()
        except Exception as exc:  # the job's own error, with its log
            failed.append(f"{cfg.name} (job {job.job_id}: {str(exc).strip().splitlines()[-1]}; "
                          f"log {job.paths.stdout})")
            continue
        _record_found(rows_path, cfg.name, point, out / cfg.name, cluster.read_job(out, cfg.name))
    if failed:
        raise RunsFailed(f"{len(failed)} job(s) failed: " + "; ".join(failed)
                         + "; the others are recorded, and running the grid again resumes these")


def _in_use(run_dir: Path) -> bool:
    """Whether another process holds the run directory's lock (is training it now)."""
    if not (run_dir / ".lock").is_file():
        return False
    try:
        with exclusive(run_dir / ".lock", wait=False):
            return False
    except LockHeld:
        return True


def _run_parallel(todo: list, out: Path, recipe: Optional[str], jobs: int, rows_path: Path, sha: str,
                  bar: tqdm) -> None:
    """Each point in its own `ciss train` process; rows are written as runs finish. Runs that share a
    step 0 wait for each other through the base cache's lock instead of training it twice."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or jobs) // jobs)))
    lock = threading.Lock()
    failed: list[str] = []

    def one(item: tuple) -> None:
        point, cfg, args = item
        cmd = [sys.executable, "-m", "ciss.cli", "train", *(["--recipe", recipe] if recipe else []),
               *[a for kv in args + ["progress=false"] for a in ("--set", kv)]]
        log = out / f"{cfg.name}.log"
        t0 = time.time()
        with open(log, "a") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        with lock:
            run_dir = out / cfg.name
            if rc != 0 or not (run_dir / "summary.json").is_file():
                failed.append(f"{cfg.name} (exit {rc}, log {log})")
            else:
                summary = RunDir(run_dir, create=False).read_summary()
                config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
                _append(rows_path, _rows(cfg.name, config, point, run_dir, sha, time.time() - t0,
                                         {"process_peak_rss_mb": summary.get("peak_rss_mb")}))
            bar.update()

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    if failed:  # the others finished and are recorded; rerunning the grid resumes the failed ones
        raise RunsFailed(f"{len(failed)} run(s) failed: " + "; ".join(failed)
                         + "; the others are recorded, and running the grid again resumes these")


def _check_found(run_dir: Path, config: dict[str, Any], point: dict[str, Any]) -> None:
    """A run found under a point's name must be that point's experiment."""
    for key, want in point.items():
        have: Any = config
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if have != want:
            raise ConfigError(f"{run_dir} has {key}={_scalar(have)} but the grid point wants "
                              f"{_scalar(want)}; move that run away or change the grid's name template")


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(dumps(r) + "\n")
