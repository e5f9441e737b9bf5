"""What a run checkpoints and where it goes on from: the state saved after each step and each epoch,
strict loading into a model grown to the checkpoint's steps, the point an interrupted run resumes
from, the check that a run directory holds this experiment, and taking the steps of an `init_from`
model file as done. (ciss.results writes the files atomically and reads them with weights_only.)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from ciss.config import INTRODUCED, RunConfig, to_dict
from ciss.engine.distributed import DistInfo, unwrap
from ciss.methods import Method
from ciss.results import RunDir, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from ciss.modelfile import ModelFile

FORMAT = "ciss-checkpoint-v1"

# Keys that may change between an interrupted run and its resumption.
# The lr of the steps a resume has still to train may change (after a divergence); recorded.
# sync_bn is how the processes share BN statistics, like their number not part of the experiment
# (a one-process run is the same either way).
LR_KEYS = ("optim.lr", "optim.lr_next")
RESUMABLE_CHANGES = ("progress", "tensorboard", "device", "channels_last", "out_dir", "name",
                     "cache_dir", "data.num_workers", "data.root", "optim.eval_batch_size",
                     "data.image_cache", "sync_bn")


def checkpoint_state(model: nn.Module, step: int, method: Method, **extra: Any) -> dict[str, Any]:
    m = unwrap(model)
    return {"format": FORMAT, "step": step, "model": m.state_dict(), "model_config": m.config(),
            "method": method.state_dict(), **extra}


def load_into(model: nn.Module, state: dict[str, Any], method: Optional[Method]) -> nn.Module:
    """Load a checkpoint strictly, growing the classifier to its steps, and the method's state into
    `method`; None for a model that is not the one being trained (e.g. an old-model snapshot)."""
    m = unwrap(model)
    want = tuple(state["model_config"]["classes_per_step"])
    while tuple(m.classes_per_step) != want:
        if len(m.classes_per_step) >= len(want):
            raise ValueError(f"checkpoint has classes per step {want}, model has "
                             f"{tuple(m.classes_per_step)}")
        m.add_step(want[len(m.classes_per_step)])
    m.load_state_dict(state["model"], strict=True)
    if method is not None:
        method.load_state_dict(state.get("method", {}))
    return model


def resume_point(run: RunDir, done: dict[int, dict], num_steps: int, init_steps: int,
                 trim: bool = True) -> tuple[int, Optional[dict[str, Any]]]:
    """The first step to train (or, when its checkpoint exists, only to evaluate), and the partial
    checkpoint of it to go on from (None: its start). `trim`: drop the loss rows of the work that
    will be redone.

    The last step with both a checkpoint and an evaluation record (`done`) is complete; the steps of
    an init_from model (`init_steps`) need no record.
    """
    first = 0
    for t in range(num_steps):
        if t < init_steps - 1 or run.step_ckpt(t).is_file() and (t in done or t < init_steps):
            first = t + 1
        else:
            break
    partial = None
    if run.last_ckpt.is_file():
        state = load_checkpoint(run.last_ckpt)
        if state["step"] == first:
            partial = state
    if trim and first < num_steps:
        trained = run.step_ckpt(first).is_file()
        run.keep_losses(first + trained, (partial["phase"], partial["epoch"])
                        if partial is not None and not trained else None)
    return first, partial


def check_same_experiment(run: RunDir, cfg: RunConfig,
                          data: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """Refuse to resume a run directory that holds another experiment's checkpoints, or that was
    trained on other data (`data`: the datasets' cache keys, which name their folder, split, images
    and label files). The lr of steps not finished yet may change (after a divergence): returns
    every such change the run has had, to be kept in meta.json."""
    meta = run.path / "meta.json"
    recorded = json.loads(meta.read_text()) if meta.is_file() else {}
    changes = list(recorded.get("changes", []))
    if not run.config_path.is_file():
        return changes
    if not any((run.path / "ckpt").glob("*.pt")):  # nothing kept: any configuration may start over
        old = run.read_config()["optim"]
        return changes + [{"key": f"optim.{k}", "from": old.get(k), "to": getattr(cfg.optim, k),
                           "from_step": 0} for k in ("lr", "lr_next") if old.get(k) != getattr(cfg.optim, k)]
    before = recorded.get("data")
    if data is not None and before is not None and before != data:
        changed = " and ".join(k for k in data if before.get(k) != data[k])
        raise ValueError(f"{run.path} was trained on other {changed} data (another folder, split, "
                         f"image list or label files: {before} -> {data}); resume it on the data it "
                         f"was trained on, or pick another run name (--set name=...)")

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("options", "method_args"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    old, new = flat(run.read_config()), flat(to_dict(cfg))
    for key, value in INTRODUCED.items():  # a run made before a key existed had its old behaviour
        old.setdefault(key, value)
    diff = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    first = max(run.checkpointed_steps(), default=-1) + 1  # the first step the new value would train
    for key in [k for k in diff if k in LR_KEYS]:
        if key == "optim.lr" and first > 0:
            raise ValueError(f"{run.path}: optim.lr is the lr of step 0, which is finished; changing it "
                             f"changes nothing (the lr of later steps is optim.lr_next)")
        changes.append({"key": key, "from": old.get(key), "to": new.get(key), "from_step": first})
        diff.remove(key)
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
        raise ValueError(f"{run.path} holds a run with another configuration ({shown}); "
                         f"pick another run name (--set name=...) or delete that folder")
    return changes


def install_model_file(mf: "ModelFile", source: str, classes_per_step: tuple[int, ...], method: Method,
                       run: RunDir, dist: DistInfo) -> int:
    """Take the steps of the model file `mf` (read from `source`) as done: check that it matches the
    scenario's `classes_per_step` and the method, and store it as the run's checkpoint of its last
    step. Returns its number of steps."""
    have = tuple(mf.model_config["classes_per_step"])
    want = tuple(classes_per_step)
    if have != want[: len(have)] or len(have) >= len(want):
        raise ValueError(f"{source}: its classifier has classes per step {have}, which "
                         f"is not a beginning of this task's {want}")
    extra = int(mf.model_config.get("num_extra", 0))
    if extra != method.num_extra_outputs():
        raise ValueError(f"{source} was trained with {extra} extra output(s) and method "
                         f"'{method.name}' needs {method.num_extra_outputs()}: continue it "
                         f"with a method of the same family as '{mf.method}'")
    parallel = bool(mf.model_config.get("parallel_branches", False))
    if parallel != bool(method.architecture().get("parallel_branches", False)):
        raise ValueError(f"{source} was trained {'with' if parallel else 'without'} "
                         f"parallel branches and method '{method.name}' needs the opposite: "
                         f"continue it with a method of the same family as '{mf.method}'")
    path = run.step_ckpt(len(have) - 1)
    if not path.is_file() and dist.main:
        save_checkpoint(path, {"format": FORMAT, "step": len(have) - 1, "model": mf.weights,
                               "model_config": dict(mf.model_config), "method": {}})
    dist.barrier()
    return len(have)
