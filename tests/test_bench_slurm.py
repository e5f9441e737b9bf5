"""`ciss bench --executor`: one submitit job per grid point, run here by submitit's local executor;
SLURM options from the grid file and the command line reach the sbatch script."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

submitit = pytest.importorskip("submitit")

from ciss import cluster  # noqa: E402
from ciss.bench import read_grid  # noqa: E402
from ciss.cli import main  # noqa: E402
from ciss.config import ConfigError  # noqa: E402


def write_grid(path: Path, tmp_path: Path, methods=("ft", "lwf"), **extra) -> Path:
    grid = {
        "recipe": "tiny", "out_dir": str(tmp_path / "grid"),
        "set": {"data.dataset": "synthetic", "data.task": "4-2",
                "data.options": {"num_classes": 6, "size": 32, "length": 24}, "data.crop_size": 32,
                "optim.epochs": 1, "cache_dir": str(tmp_path / "cache"), "tensorboard": False},
        "axes": {"method": list(methods)}, **extra,
    }
    path.write_text(yaml.safe_dump(grid))
    return path


def test_slurm_options_of_the_grid_and_the_command_line_reach_the_sbatch_script(tmp_path, monkeypatch):
    g = write_grid(tmp_path / "g.yaml", tmp_path, slurm={
        "partition": "gpu", "gpus_per_node": 2, "cpus_per_task": 6, "time": "1-02:00:00",
        "account": "proj", "sbatch": {"qos": "high", "mem": "64G"}})
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no cluster here
    scripts = {}

    def sbatch_text(kind, out, run, args, recipe, options):  # what would be submitted, not submitted
        ex = cluster.make_executor(kind, cluster.job_folder(out, run), options, f"ciss-{run}")
        scripts[run] = ex._executor._make_submission_file_text("CMD", "uid")
        raise SystemExit(0)

    monkeypatch.setattr(cluster, "submit_point", sbatch_text)
    with pytest.raises(SystemExit):
        main(["bench", str(g), "--executor", "slurm", "--partition", "big", "--time", "90",
              "--sbatch", "constraint=a100", "--sbatch", "exclusive"])
    (text,) = scripts.values()
    for line in ("--partition=big", "--time=90", "--gpus-per-node=2", "--ntasks-per-node=2",
                 "--cpus-per-task=6", "--account=proj", "--qos=high", "--mem=64G", "--constraint=a100",
                 "--exclusive", "--job-name=ciss-ft", "--signal=USR2@"):
        assert f"#SBATCH {line}" in text, line
    assert "_log.out" in text and "--error" not in text  # one log per job
    assert read_grid(g)["slurm"]["time"] == "1-02:00:00"
    assert main(["bench", str(g), "--executor", "slurm", "--time", "0"]) == 2  # bad value: named


def test_bad_slurm_options_are_refused_with_the_fix(tmp_path, capsys):
    assert [cluster.time_minutes(v) for v in (30, "90", "2:00:00", "1-00", "05:30", "0:0:1")] == [
        30, 90, 120, 1440, 6, 1]
    for section, match in (({"partiton": "gpu"}, "unknown slurm options"), ({"time": "soon"}, "HH:MM:SS"),
                           ({"gpus_per_node": -1}, "gpus_per_node"), ({"sbatch": ["qos"]}, "sbatch")):
        g = write_grid(tmp_path / "g.yaml", tmp_path, slurm=section)
        with pytest.raises(ConfigError, match=match):
            read_grid(g)
    with pytest.raises(ConfigError, match="time limit"):
        cluster.executor_parameters("slurm", {}, "x")
    g = write_grid(tmp_path / "g.yaml", tmp_path)
    assert main(["bench", str(g), "--executor", "local", "--jobs", "2"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_local_executor_runs_every_point_and_status_reads_the_jobs(tmp_path, capsys):
    g = write_grid(tmp_path / "g.yaml", tmp_path)
    assert main(["bench", str(g), "--executor", "local", "--cpus-per-task", "1", "--wait"]) == 0
    out = tmp_path / "grid"
    rows = [json.loads(l) for l in (out / "grid.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["step"]) for r in rows) == [("ft", 0), ("ft", 1), ("lwf", 0), ("lwf", 1)]
    assert all(r["recorded"] == "local" and r["job_id"] and r["miou_all"] is not None for r in rows)
    for r in rows:
        assert (out / r["run"] / "summary.json").is_file()
        job = cluster.read_job(out, r["run"])
        assert job["job_id"] == r["job_id"] and Path(job["log"]).is_file()  # one log per job
        assert cluster.job_state(job) == "FINISHED"
    capsys.readouterr()
    assert main(["bench", str(g), "--status"]) == 0
    assert "2 of 2 runs finished" in capsys.readouterr().out
    assert main(["bench", str(g), "--executor", "local"]) == 0  # finished: nothing submitted again
    assert len(json.loads((cluster.job_folder(out, rows[0]["run"]) / "job.json").read_text())["jobs"]) == 1
    assert len((out / "grid.jsonl").read_text().splitlines()) == 4


def _wait_for(what, timeout: float = 240.0):
    t0 = time.time()
    while not (value := what()):
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)
    return value


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the job's process through /proc")
def test_a_preempted_job_is_requeued_and_resumes_its_run(tmp_path, capsys):
    """SIGUSR2 (SLURM's preemption warning through submitit) while step 1 trains: the job is requeued
    and the rerun of the point continues the run directory; step 0 is not trained again."""
    g = write_grid(tmp_path / "g.yaml", tmp_path, methods=["ft"])
    grid = yaml.safe_load(g.read_text())
    grid["set"].update({"optim.epochs_next": 6, "data.options": {"num_classes": 6, "size": 32, "length": 64}})
    g.write_text(yaml.safe_dump(grid))
    assert main(["bench", str(g), "--executor", "local", "--cpus-per-task", "1"]) == 0
    out = tmp_path / "grid"
    (folder,) = (out / "jobs").iterdir()
    run = out / folder.name
    job = cluster.read_job(out, run.name)
    results = run / "results.jsonl"
    _wait_for(lambda: results.is_file() and results.read_text().strip())  # step 0 done
    step0 = (run / "ckpt" / "step-0.pt").stat().st_mtime_ns
    controller = job["job_id"]
    (task,) = _wait_for(lambda: Path(f"/proc/{controller}/task/{controller}/children").read_text().split())
    os.kill(int(task), signal.SIGUSR2)
    _wait_for(lambda: cluster.job_state(job) != "RUNNING")
    assert cluster.job_state(job) == "FINISHED"
    log = Path(job["log"]).read_text()
    assert "preempted" in log and "Requeued" in log
    assert [json.loads(l)["step"] for l in results.read_text().splitlines()] == [0, 1]
    assert (run / "ckpt" / "step-0.pt").stat().st_mtime_ns == step0  # resumed, not retrained
    capsys.readouterr()
    assert main(["bench", str(g), "--status"]) == 0
    assert "1 of 1 runs finished" in capsys.readouterr().out
