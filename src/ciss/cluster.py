"""Grid points as cluster jobs: `ciss bench GRID --executor slurm` submits one SLURM job per point
that has not finished, through submitit (`pip install 'ciss[slurm]'`).

The job options come from the grid's `slurm:` section, then the command line (which wins):

    slurm:
      partition: gpu
      gpus_per_node: 1        # one training process per GPU (DDP when more than one)
      cpus_per_task: 8        # per process; also its torch thread count
      time: "12:00:00"        # minutes, or [D-]HH:MM:SS
      account: my-project
      sbatch: {qos: high, constraint: a100}   # any other #SBATCH flag

Each point's job keeps its files under OUT_DIR/jobs/<run>/: the sbatch script, submitit's pickles,
one log (`<job id>_0_log.out`, stdout and stderr together) and `job.json` (the job ids it has had),
which `--status` reads to show each job's state. A job that is preempted or reaches its time limit
is requeued with the same call (at most 3 times for the time limit), and that call is a rerun of
the grid point: it continues its run directory from the last finished epoch (ciss's own resume).
`--executor local` runs the same jobs as processes of this machine (submitit's local executor).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from ciss.config import ConfigError

EXECUTORS = ("slurm", "local")
OPTIONS = ("partition", "gpus_per_node", "cpus_per_task", "time", "account", "sbatch")
# SLURM states of a job that may still run: its point is left to it, not submitted again.
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
LOCAL_NO_LIMIT_MIN = 7 * 24 * 60  # submitit's local jobs stop at a time limit too: a week


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor needs submitit: pip install 'ciss[slurm]' "
                          "(or submitit==1.5.4)") from None
    return submitit


def time_minutes(value: Any, where: str = "slurm.time") -> int:
    """SLURM's time formats (minutes, H:MM:SS, D-HH[:MM[:SS]], MM:SS) as whole minutes."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if isinstance(value, bool) or m is None:
        raise ConfigError(f"{where} must be minutes or [D-]HH:MM:SS, got {value!r}")
    days, a, b, c = (int(g) if g else 0 for g in m.groups())
    if m.group(1):  # D-HH[:MM[:SS]]
        seconds = ((days * 24 + a) * 60 + b) * 60 + c
    elif m.group(4):  # H:MM:SS
        seconds = (a * 60 + b) * 60 + c
    elif m.group(3):  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"{where} must be positive, got {value!r}")
    return -(-seconds // 60)


def read_options(section: Any, where: str) -> dict[str, Any]:
    """The grid file's `slurm:` section, checked."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: 'slurm' maps job options to values, e.g. slurm: {{partition: gpu, "
                          f"time: 60}}")
    unknown = sorted(set(section) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown slurm options {unknown}; valid: {', '.join(OPTIONS)}")
    for key in ("gpus_per_node", "cpus_per_task"):
        v = section.get(key)
        least = 0 if key == "gpus_per_node" else 1
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise ConfigError(f"{where}: slurm.{key} must be a whole number of at least {least}, "
                              f"got {v!r}")
    if section.get("time") is not None:
        time_minutes(section["time"], f"{where}: slurm.time")
    if not isinstance(section.get("sbatch") or {}, dict):
        raise ConfigError(f"{where}: slurm.sbatch maps sbatch flags to values, e.g. {{qos: high}}")
    return dict(section)


def merged_options(grid_section: dict[str, Any], cli: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The grid's options with the command line's on top (its `sbatch` flags added to the grid's)."""
    cli = {k: v for k, v in (cli or {}).items() if v not in (None, {}, [])}
    out = {**grid_section, **{k: v for k, v in cli.items() if k != "sbatch"}}
    out["sbatch"] = {**(grid_section.get("sbatch") or {}), **cli.get("sbatch", {})}
    return read_options(out, "the slurm options")


def executor_parameters(kind: str, options: dict[str, Any], name: str) -> dict[str, Any]:
    """Keyword arguments of submitit's AutoExecutor.update_parameters for one point's job."""
    if kind == "slurm" and options.get("time") is None:
        raise ConfigError("--executor slurm needs a time limit: slurm.time in the grid file or --time "
                          "(minutes or [D-]HH:MM:SS)")
    gpus = int(options.get("gpus_per_node") or 0)
    params: dict[str, Any] = {
        "name": name, "nodes": 1, "tasks_per_node": max(1, gpus), "gpus_per_node": gpus,
        "timeout_min": (time_minutes(options["time"]) if options.get("time") is not None
                        else LOCAL_NO_LIMIT_MIN),
        "stderr_to_stdout": True,
        "slurm_partition": options.get("partition"), "slurm_account": options.get("account"),
        "slurm_additional_parameters": dict(options.get("sbatch") or {}),
    }
    if options.get("cpus_per_task") is not None:
        params["cpus_per_task"] = int(options["cpus_per_task"])
    return {k: v for k, v in params.items() if v is not None}


def make_executor(kind: str, folder: Path, options: dict[str, Any], name: str) -> Any:
    submitit = _submitit()
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor '{kind}'; valid: {', '.join(EXECUTORS)}")
    params = executor_parameters(kind, options, name)  # bad options are named before SLURM is looked for
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as exc:  # no srun here
        raise ConfigError(f"--executor slurm needs SLURM (sbatch, srun) on this machine: run ciss bench "
                          f"on the cluster's login node, or try the grid with --executor local "
                          f"({exc})") from None
    ex.update_parameters(**params)
    return ex


class GridPointJob:
    """The call a job runs: `ciss train` of one grid point, in the job's process (one per GPU)."""

    def __init__(self, args: list[str], recipe: Optional[str], threads: Optional[int], cwd: str) -> None:
        self.args, self.recipe, self.threads, self.cwd = list(args), recipe, threads, cwd

    def __call__(self) -> str:
        import submitit
        import torch

        from ciss.config import load_config
        from ciss.engine import train

        os.chdir(self.cwd)  # relative paths of the grid are relative to where ciss bench ran
        if self.threads:
            torch.set_num_threads(self.threads)
        if submitit.JobEnvironment().num_tasks > 1:  # one process per GPU: torchrun's variables
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return str(train(load_config(None, self.args + ["progress=false"], recipe=self.recipe)).run_dir)

    def checkpoint(self) -> Any:
        """On preemption or at the time limit: requeue the same call. Nothing to save here: the run
        directory holds the checkpoint of the last finished epoch, and rerunning the point resumes it."""
        again = GridPointJob(self.args, self.recipe, self.threads, self.cwd)
        return _submitit().helpers.DelayedSubmission(again)


def job_folder(out: Path, run: str) -> Path:
    return out / "jobs" / run


def read_job(out: Path, run: str) -> Optional[dict[str, Any]]:
    """The last job submitted for the run (executor, job id, folder, log), or None."""
    path = job_folder(out, run) / "job.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record["jobs"][-1] if record.get("jobs") else None


def job_state(job: dict[str, Any]) -> str:
    """SLURM's state of the job (sacct), or for a local job FINISHED, FAILED, RUNNING or GONE."""
    submitit = _submitit()
    folder = Path(job["folder"])
    if job["executor"] == "local":
        result = submitit.core.utils.JobPaths(folder, job["job_id"], 0).result_pickle
        if result.is_file():
            outcome = submitit.core.utils.pickle_load(result)
            return "FINISHED" if outcome[0] == "success" else "FAILED"
        try:
            os.kill(int(job["job_id"]), 0)
            return "RUNNING"
        except (OSError, ValueError):
            return "GONE"
    try:
        return str(submitit.SlurmJob(folder=folder, job_id=job["job_id"]).state)
    except Exception as exc:  # sacct missing or failing: say so, do not stop the listing
        return f"UNKNOWN ({type(exc).__name__}: {exc})"


def submit_point(kind: str, out: Path, run: str, args: list[str], recipe: Optional[str],
                 options: dict[str, Any]) -> Any:
    """Submit one grid point's job and add it to the run's job.json; returns the submitit job."""
    folder = job_folder(out, run).resolve()
    ex = make_executor(kind, folder, options, f"ciss-{run}")
    job = ex.submit(GridPointJob(args, recipe, options.get("cpus_per_task"), os.getcwd()))
    path = folder / "job.json"
    record = json.loads(path.read_text()) if path.is_file() else {"jobs": []}
    record["jobs"].append({"executor": kind, "job_id": str(job.job_id), "folder": str(folder),
                           "log": str(job.paths.stdout), "submitted": time.time()})
    path.write_text(json.dumps(record, indent=1) + "\n")
    return job
