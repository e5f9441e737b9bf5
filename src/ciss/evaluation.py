"""Evaluate the checkpoints of a finished (or interrupted) run directory again, optionally with
post-hoc calibration (fitted on each step's own training images, stored in its checkpoint) and the
nearest-prototype probe."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from ciss.calibration import parse_calibration
from ciss.config import from_dict
from ciss.engine import Experiment
from ciss.metrics import class_errors, format_class_errors, format_table
from ciss.results import RunDir, save_checkpoint

PROBES = ("ncm",)


def evaluate_run(run_dir: str | Path, step: Optional[int] = None, device: str = "cpu",
                 calibration: Any = None, probe: Optional[str] = None, errors: bool = False) -> str:
    """Text report (`errors`: after each step, every class's recall, precision and confusions);
    with calibration or a probe also `RUN/posthoc.jsonl` (one row per step) and, for
    the sweep, `RUN/calibration/sweep.png` + `sweep.json`."""
    run = RunDir(run_dir, create=False)
    cfg = from_dict(run.read_config())
    cfg.device = device
    cfg.tensorboard = False
    names = parse_calibration(calibration)
    if probe is not None and probe not in PROBES:
        raise ValueError(f"unknown probe '{probe}'; choose from {', '.join(PROBES)}")
    exp = Experiment(cfg, run.path)
    steps = run.checkpointed_steps()
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"{run.path}: no checkpoint for step {step}; have {steps}")
    if not steps:
        raise FileNotFoundError(f"{run.path}: no step checkpoint yet; train first (ciss train)")
    if probe and steps != list(range(len(steps))):
        raise FileNotFoundError(f"{run.path}: the probe needs every step's checkpoint from 0; have {steps}")
    title = f"{cfg.method} on {cfg.data.dataset} {cfg.data.task} {cfg.data.setting}"
    lines: list[str] = []
    last = None
    prototypes: dict[int, Any] = {}
    curves = []
    model = None
    for t in steps:
        if step is not None and (t > step or t < step and not probe):  # the probe needs earlier steps
            continue
        path = run.step_ckpt(t)
        state = run.step_state(t)
        if model is None:
            model = exp.build_model(tuple(state["model_config"]["classes_per_step"][:1]))
        exp.load_into(model, state)
        model.to(exp.device)
        changed = False
        if probe:
            own = state.get("probe", {}).get("ncm")
            if own is None:
                own = exp.evaluator.step_prototypes(model, t)
                state.setdefault("probe", {})["ncm"] = own
                changed = True
            prototypes.update(own)
        if step is not None and t != step:
            if changed:
                save_checkpoint(path, state)
            continue
        cals, fitted = exp.evaluator.step_calibrators(model, t, names, state, path)
        changed = changed or fitted
        if changed:
            save_checkpoint(path, state)
        res = exp.evaluator.evaluate_full(model, t, cals, sweep="sweep" in names,
                                          prototypes=dict(prototypes) if probe else None)
        lines.extend(res.lines())
        if errors and res.raw.confusion is not None:
            lines.append(format_class_errors(class_errors(res.raw.confusion, res.raw.class_names)))
        last = res.raw
        if names or probe:
            run.append_jsonl("posthoc.jsonl", {"method": cfg.method, **res.as_dict()})
        if res.sweep is not None:
            curves.append((f"step {t}", res.sweep))
    if last is not None:  # the header names the last step's class ranges
        lines = format_table([last], title).splitlines()[:-1] + lines
    if curves:
        out = run.path / "calibration"
        out.mkdir(exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(
            {label: {k: [None if isinstance(x, float) and math.isnan(x) else x for x in v]
                     if isinstance(v, list) else v for k, v in c.items()} for label, c in curves}))
        from ciss.plots import plot_tradeoff

        plot_tradeoff(curves, out / "sweep.png", title=f"{title}: gamma sweep")
        lines.append(f"sweep curves: {out / 'sweep.png'}")
    return "\n".join(lines)
