"""A run killed with SIGKILL and resumed ends bit-identical to the uninterrupted run, wherever the kill
came (during step 0, a later step, an evaluation, a checkpoint write, between a step's checkpoint and
its record); a run whose step 0 came from the shared cache ends bit-identical to one that trained it.

Each run is a `ciss train` process on a tiny synthetic 3-step task; the test watches its run
directory and kills it when the moment's condition first holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ciss.results import load_checkpoint

pytestmark = pytest.mark.slow

STEPS = 3


def _command(out: Path, name: str, cache: Path, method: str = "mib", *extra: str) -> list[str]:
    sets = [*extra, "data.dataset=synthetic", "data.task=4-1", "data.options={num_classes: 6, size: 32, length: 32}",
            "data.crop_size=32", "optim.epochs=2", "optim.epochs_next=2", "optim.batch_size=8",
            f"method={method}", f"out_dir={out}", f"cache_dir={cache}", f"name={name}",
            "progress=false", "tensorboard=false", "device=cpu"]
    return [sys.executable, "-m", "ciss.cli", "train", "--recipe", "tiny",
            *[a for s in sets for a in ("--set", s)]]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _rows(run: Path, name: str) -> list[dict]:
    path = run / name
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _temp_in(folder: Path) -> bool:
    return folder.is_dir() and any(".tmp" in p.name for p in folder.iterdir())


def _partial_of(run: Path, step: int) -> bool:
    """The partial checkpoint of `step` exists (the kill then comes mid-step, after an epoch)."""
    last = run / "ckpt" / "last.pt"
    return last.is_file() and any(x["step"] == step for x in _rows(run, "losses.jsonl"))


# moment -> condition on the run directory; each holds from some point until the run's end (a
# transient moment is paired with a later fallback), so the kill always lands in the run.
MOMENTS = {
    "step 0, from its partial checkpoint": lambda r: _partial_of(r, 0) or (r / "ckpt" / "step-0.pt").is_file(),
    "step 0 checkpointed, evaluation": lambda r: (r / "ckpt" / "step-0.pt").is_file(),
    "step 1, from its partial checkpoint": lambda r: _partial_of(r, 1) or (r / "ckpt" / "step-1.pt").is_file(),
    "step 1, before its first epoch ended": lambda r: any(x["step"] == 0 for x in _rows(r, "results.jsonl")),
    "a checkpoint write": lambda r: _temp_in(r / "ckpt")
    or any(x["step"] == 1 and x["epoch"] == 1 for x in _rows(r, "losses.jsonl")),
    "step 1 checkpointed, before its record": lambda r: (r / "ckpt" / "step-1.pt").is_file(),
    "step 2, after its record of step 1": lambda r: any(x["step"] == 1 for x in _rows(r, "results.jsonl")),
}


def _final(run: Path) -> tuple[dict, list, list]:
    state = load_checkpoint(run / "ckpt" / f"step-{STEPS - 1}.pt")
    results = [(r["step"], r["iou"]) for r in _rows(run, "results.jsonl")]
    losses = _rows(run, "losses.jsonl")
    return state["model"], results, losses


def _assert_identical(a: Path, b: Path, losses_from_step: int = 0) -> None:
    wa, ra, la = _final(a)
    wb, rb, lb = _final(b)
    la, lb = ([r for r in rows if r["step"] >= losses_from_step] for rows in (la, lb))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"
    assert ra == rb, "evaluation records differ"
    assert la == lb, "loss records differ (a redone epoch, a duplicated or a lost row)"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    done = subprocess.run(_command(tmp / "runs", "ref", tmp / "cache-ref"), env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, tmp / "runs" / "ref"


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_killed_run_resumes_bit_identical(reference, moment):
    tmp, ref = reference
    name = "kill-" + "".join(c if c.isalnum() else "-" for c in moment)
    cmd = _command(tmp / "runs", name, tmp / f"cache-{name}")  # its own cache: step 0 is trained
    run = tmp / "runs" / name
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not MOMENTS[moment](run):
            time.sleep(0.002)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, f"the run ended before the moment '{moment}'"
    recorded = {x["step"] for x in _rows(run, "results.jsonl")}
    unrecorded = [t for t in range(STEPS) if (run / "ckpt" / f"step-{t}.pt").is_file() and t not in recorded]
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    if unrecorded:  # a trained step is evaluated, not trained again
        assert f"step {unrecorded[0]}: trained in an earlier invocation" in again.stdout
    _assert_identical(ref, run)


def test_a_run_whose_step_0_came_from_the_cache_is_bit_identical(reference):
    tmp, ref = reference
    # the reference trained step 0 and cached it; this run loads it from that cache
    done = subprocess.run(_command(tmp / "runs", "cached", tmp / "cache-ref"), env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reusing the base-step checkpoint" in done.stdout
    _assert_identical(ref, tmp / "runs" / "cached", losses_from_step=1)  # step 0 was not trained


def test_ewc_reuses_the_plain_step_0_and_ends_as_if_it_had_trained_it(reference):
    tmp, _ = reference
    ewc = ("method_args.reg_importance=10",)
    runs = {}
    for name, cache in (("ewc-trained", "cache-ewc"), ("ewc-reused", "cache-ref")):  # cache-ref: MiB's
        done = subprocess.run(_command(tmp / "runs", name, tmp / cache, "ewc", *ewc), env=ENV,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = done.stdout
    assert "reusing the base-step checkpoint" in runs["ewc-reused"]
    assert "reusing the base-step checkpoint" not in runs["ewc-trained"]
    # the Fisher estimated on the loaded step 0 is the one estimated right after training it
    trained, reused = (load_checkpoint(tmp / "runs" / n / "ckpt" / "step-0.pt")["method"]
                       for n in ("ewc-trained", "ewc-reused"))
    assert trained["fisher"].keys() == reused["fisher"].keys()
    assert all(torch.equal(trained["fisher"][k], reused["fisher"][k]) for k in trained["fisher"])
    _assert_identical(tmp / "runs" / "ewc-trained", tmp / "runs" / "ewc-reused", losses_from_step=1)
    # the step 0 EWC trained is shared as a plain one: FT loads it
    (shared,) = (tmp / "cache-ewc" / "base").glob("*.pt")
    assert load_checkpoint(shared)["method"] == {}
    done = subprocess.run(_command(tmp / "runs", "ft", tmp / "cache-ewc", "ft"), env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reusing the base-step checkpoint" in done.stdout
