"""Evaluate the checkpoints of a finished (or interrupted) run directory again."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ciss.config import from_dict
from ciss.engine import Experiment
from ciss.metrics import format_table
from ciss.results import RunDir, load_checkpoint


def evaluate_run(run_dir: str | Path, step: Optional[int] = None, device: str = "cpu") -> str:
    run = RunDir(run_dir, create=False)
    cfg = from_dict(run.read_config())
    cfg.device = device
    cfg.tensorboard = False
    exp = Experiment(cfg, run.path)
    steps = run.checkpointed_steps()
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"{run.path}: no checkpoint for step {step}; have {steps}")
        steps = [step]
    if not steps:
        raise FileNotFoundError(f"{run.path}: no step checkpoint yet; train first (ciss train)")
    rows = []
    model = None
    for t in steps:
        state = load_checkpoint(run.step_ckpt(t))
        if model is None:
            model = exp.build_model(tuple(state["model_config"]["classes_per_step"][:1]))
        exp.load_into(model, state)
        model.to(exp.device)
        rows.append(exp.evaluate(model, t))
    return format_table(rows, f"{cfg.method} on {cfg.data.dataset} {cfg.data.task} {cfg.data.setting}")
