"""Step-0 reuse: runs whose base step is the same share one checkpoint of it, found under a key of
everything the base step depends on; a lock lets one process train it while the others wait and
then load what it wrote."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

from torch import nn

from ciss.config import INTRODUCED, RunConfig, stable_hash, to_dict
from ciss.data.base import SegDataset
from ciss.engine.checkpoints import checkpoint_state
from ciss.engine.data import cache_root
from ciss.methods import Method
from ciss.results import exclusive
from ciss.scenario import Scenario

# The recipe keys the base step's training depends on (not those of the later steps).
BASE_RECIPE = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "poly_power",
               "grad_clip", "amp")


def base_cache_key(cfg: RunConfig, train_set: SegDataset, scenario: Scenario, method: Method,
                   world: int) -> dict[str, Any]:
    key = {
        "dataset": train_set.cache_key(),
        "task_step0": list(scenario.steps[0]),
        "order": list(scenario.order),
        "setting": cfg.data.setting,
        "crop": cfg.data.crop_size,
        "resize": cfg.data.resize,
        "model": to_dict(cfg.model),
        "seed": cfg.seed,
        "recipe": {k: getattr(cfg.optim, k) for k in BASE_RECIPE},
        "base_step": method.base_step_key(),
        "extra_outputs": method.num_extra_outputs(),
        "world": world,
    }
    if list(cfg.data.scale) != INTRODUCED["data.scale"]:  # only when set, so earlier bases stay valid
        key["scale"] = [float(x) for x in cfg.data.scale]
    if world > 1 and cfg.sync_bn:  # only when it changes training, so earlier DDP bases stay valid
        key["sync_bn"] = True
    if method.architecture():  # only when set, so plain models keep their cached bases
        key["architecture"] = method.architecture()
    return key


def base_cache_path(cfg: RunConfig, train_set: SegDataset, scenario: Scenario, method: Method,
                    world: int) -> Path:
    """Step-0 checkpoints are shared by every run with the same base-step configuration."""
    key = base_cache_key(cfg, train_set, scenario, method, world)
    return cache_root(cfg) / "base" / f"{stable_hash(key)}.pt"


def base_step_lock(path: Optional[Path], say: Callable[[str], None]) -> ContextManager[None]:
    """Held while this process trains (or loads) the shared base step at `path`; a process that
    asks while another holds it says so and waits. No lock without a path."""
    if path is None:
        return contextlib.nullcontext()
    waiting = f"step 0: waiting for another run that trains the same base step ({path})"
    return exclusive(path.with_suffix(".lock"), on_wait=lambda: say(waiting))


def shared_base_state(model: nn.Module, method: Method) -> dict[str, Any]:
    """The step-0 checkpoint shared by the methods of one base-step key: without the state a method
    rebuilds from the model (`step_end_from_model`), which the others could not load."""
    state = checkpoint_state(model, 0, method)
    if method.step_end_from_model():
        state["method"] = {}
    return state

