"""Run configuration: dataclasses loaded from YAML plus `--set a.b=c` overrides; unknown keys are errors.

Recipes are data: a recipe is a named dict of overrides applied before the user's file and `--set`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: Optional[str] = None
    train_split: str = "train"
    test_split: Optional[str] = "val"  # None: the scenario's own held-out images (Cityscapes domains); "none": no evaluation
    test_root: Optional[str] = None  # the test split's dataset root when it is another folder (default: root)
    task: Any = "4-2"  # a task name, or explicit class groups (lists of ids or names), one per step
    setting: str = "overlapped"
    order: Optional[Any] = None  # None | "A".."E" | "random:<seed>" | path | list of class ids
    crop_size: int = 64
    eval_size: Optional[int] = None  # shorter side resized + centre crop; None = whole image
    resize: Optional[int] = None  # shorter side resized to this first (train and eval); None = native
    scale: list = field(default_factory=lambda: [0.5, 2.0])  # training's random rescale range [low, high] (MiB's)
    num_workers: int = 0
    # With `resize`: images and labels of file datasets decoded and resized once, then read from
    # <cache_dir>/images (data/image_cache.py).
    image_cache: bool = True
    options: dict = field(default_factory=dict)  # extra keyword arguments of the dataset


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    pretrained: Any = True  # True = weights shipped with the package (efficientnet_lite0); or a path
    output_stride: int = 16
    head_channels: int = 256
    # > 0: a 1x1 conv-BN-ReLU brings the backbone's last stage to this many channels before ASPP
    head_reduce: int = 0
    # False: the stages output_stride keeps from striding run at rate 1 instead of dilated
    dilated: bool = True
    # The stem and the stages of output stride <= this take no gradient (0: every layer trains), as
    # detectron2 freezes a pretrained backbone's stem and first stage: backward skips the layers at
    # the highest resolutions.
    frozen_stride: int = 0
    # > 0: DeepLabV3+'s decoder step fuses the head's map with the backbone stage of this stride
    skip_stride: int = 0


@dataclass
class OptimConfig:
    """The papers' recipe: SGD, momentum 0.9, Nesterov, poly schedule; lr 0.01 at step 0, 0.001 after."""

    epochs: int = 30
    epochs_next: Optional[int] = None  # epochs of steps >= 1; None = same as `epochs`
    batch_size: int = 24
    lr: float = 0.01
    lr_next: float = 0.001
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    grad_clip: Optional[float] = None
    amp: str = "none"  # none | bf16 | fp16 (CUDA only; ignored with a warning on CPU)
    eval_batch_size: int = 8


@dataclass
class RunConfig:
    method: str = "ft"
    method_args: dict = field(default_factory=dict)
    calibration: Optional[str] = None
    recipe: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    # Conv weights in channels-last layout: same model and numerics up to rounding, ~1.4x faster
    # training of EfficientNet-Lite0 on one CPU thread (benchmarks/results/channels_last.md).
    channels_last: bool = True
    # Under DDP (more than one process): BN normalises with the statistics of every process's batch
    # together (SyncBN, ciss.engine.sync_bn), as one process with the global batch would.
    sync_bn: bool = True
    out_dir: str = "runs"
    name: Optional[str] = None
    cache_dir: Optional[str] = None
    reuse_base: bool = True  # share step-0 checkpoints between runs with the same base step
    init_from: Optional[str] = None  # a ciss model file whose steps count as done: training starts after them
    tensorboard: bool = True
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


# Keys added after runs were made, with the value those runs had implicitly: a run directory whose
# config lacks one is read with that value (to resume it, or to compare it with a new config).
INTRODUCED: dict[str, Any] = {"model.frozen_stride": 0, "data.image_cache": False, "model.head_reduce": 0,
                               "model.dilated": True, "model.skip_stride": 0, "sync_bn": False,
                               "data.scale": [0.5, 2.0]}

# Recipes: overrides, applied in this order: recipe, YAML file, --set.
RECIPES: dict[str, dict] = {
    # MiB/PLOP on Pascal VOC: 30 epochs, batch 24, crop 512, OS 16, lr 0.01 then 0.001 (SSUL trains
    # longer, GSC and NeST change some settings: the paper grids carry those, with their sources).
    "paper": {
        "data": {"crop_size": 512, "eval_size": 512},
        "model": {"output_stride": 16, "head_channels": 256},
        "optim": {"epochs": 30, "batch_size": 24, "lr": 0.01, "lr_next": 0.001},
    },
    # The `cpu` recipe before the learning curves (results measured with it say cpu-short): sized
    # for a 2-core machine without GPU: images at a shorter side of 256, crops of 224, a narrower
    # head, few epochs. With so few iterations the papers' lr 0.01 underfits: on ccp21 15-1
    # step 0, lr 0.05 lowered the 2nd-epoch training loss from 0.97 to 0.81 (chosen on that training
    # loss; step-0 val mIoU was 12.2 after 4 epochs at 0.01, 14.1 after 2 at 0.05). lr_next keeps the
    # papers' 10x ratio.
    "cpu-short": {
        "data": {"crop_size": 224, "eval_size": None, "resize": 256},
        # The stem and stride-2/4 stages frozen, ASPP on a 320-channel 1x1 reduction of Lite0's
        # 1280-channel head, the last stage at rate 1 instead of dilated: faster steps at no loss of
        # step-0 mIoU on ccp21's train:holdout (two seeds); without the head conv ASPP loses 4.5
        # points there (benchmarks/results/train_speed.md).
        "model": {"output_stride": 16, "head_channels": 128, "frozen_stride": 4, "head_reduce": 320,
                  "dilated": False},
        "optim": {"epochs": 5, "epochs_next": 4, "batch_size": 8, "lr": 0.05, "lr_next": 0.005,
                  "eval_batch_size": 16},
    },
    # Sized for a 2-core machine without GPU, from the learning curves on ccp21's train:holdout
    # (benchmarks/results/ccp21_curves.md; val, the test split, decides nothing): cpu-short's model with
    # DeepLabV3+'s stride-8 skip fusion (Joint +2.2 points at 10 epochs for 0.98x the iteration time)
    # and 40 step-0 epochs (Joint 23.64 / 26.33 / 28.24 at 10 / 20 / 40, still rising ~2 points per
    # doubling; 40 took 100 minutes on one thread beside another run, within a 90-minute step 0 on two). epochs_next 16 at lr_next 0.01: FT
    # learns a step's class about as well as with 8 at 0.02 or 16 at 0.05 (the class stays far below
    # Joint's IoU at every point measured), with the smaller lr of the three for the distilling methods.
    "cpu": {
        "data": {"crop_size": 224, "eval_size": None, "resize": 256},
        "model": {"output_stride": 16, "head_channels": 128, "frozen_stride": 4, "head_reduce": 320,
                  "dilated": False, "skip_stride": 8},
        "optim": {"epochs": 40, "epochs_next": 16, "batch_size": 8, "lr": 0.05, "lr_next": 0.01,
                  "eval_batch_size": 16},
    },
    # Unit tests and the demo on synthetic data.
    "tiny": {
        "data": {"crop_size": 64, "eval_size": None},
        "model": {"backbone": "tiny", "pretrained": False, "head_channels": 32},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 0.05, "lr_next": 0.01, "eval_batch_size": 16},
    },
}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Light type checks for scalar fields; YAML already gives int/float/bool/str/None."""
    origin = getattr(typ, "__origin__", None)
    args = getattr(typ, "__args__", ())
    if origin is Union and len(args) == 2 and type(None) in args:  # Optional[X]: None or an X
        return None if value is None else _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{key: value}}, got {value!r}")
        return value
    if typ is Any or origin is not None and typ is not float:
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a name or path that YAML read as a number (name=2024)
    if typ is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot, no exponent sign) as a string: accept every float notation
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    if typ is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    return value


def _apply(obj: Any, overrides: dict, where: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in overrides.items():
        path = f"{where}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown config key '{path}'; valid keys here: {', '.join(sorted(names))}"
            )
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' is a section; give a mapping, e.g. {path}.<key>=...")
            _apply(current, value, path + ".")
        elif isinstance(current, dict) and isinstance(value, dict) and key in ("options", "method_args"):
            current.update(value)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def parse_set(items: list[str]) -> dict:
    """['optim.lr=0.1', 'method=mib'] -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


# key -> (test, what it must be): checked after every override, so a bad value is refused at once,
# naming the key, instead of failing deep inside a step.
_RANGES: dict[str, tuple[Any, str]] = {
    "optim.epochs": (lambda v: v >= 1, "at least 1"),
    "optim.epochs_next": (lambda v: v is None or v >= 1, "at least 1 (or null: as optim.epochs)"),
    "optim.batch_size": (lambda v: v >= 1, "at least 1"),
    "optim.eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "optim.lr": (lambda v: v > 0, "positive"),
    "optim.lr_next": (lambda v: v > 0, "positive"),
    "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, "0 or more"),
    "optim.poly_power": (lambda v: v >= 0, "0 or more"),
    "optim.grad_clip": (lambda v: v is None or v > 0, "positive (or null: no clipping)"),
    "data.crop_size": (lambda v: v >= 1, "at least 1"),
    "data.resize": (lambda v: v is None or v >= 1, "at least 1 (or null: native size)"),
    "data.scale": (lambda v: isinstance(v, list) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and 0 < v[0] <= v[1],
        "a list [low, high] of two numbers with 0 < low <= high, e.g. [0.5, 2.0]"),
    "data.eval_size": (lambda v: v is None or v >= 1, "at least 1 (or null: whole images)"),
    "data.num_workers": (lambda v: v >= 0, "0 or more"),
    "model.head_channels": (lambda v: v >= 1, "at least 1"),
    "model.head_reduce": (lambda v: v >= 0, "0 (none) or a channel count"),
    "model.frozen_stride": (lambda v: v >= 0, "0 (none) or an output stride"),
    "model.skip_stride": (lambda v: v >= 0, "0 (none) or the stride of a backbone stage"),
}


def check_ranges(cfg: RunConfig) -> None:
    for key, (ok, what) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{key} must be {what}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                recipe: str | None = None) -> RunConfig:
    """Defaults <- recipe <- YAML file <- --set overrides."""
    user: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of config keys")
        user = loaded
    user = _merge(user, parse_set(overrides or []))
    recipe = user.get("recipe", recipe)
    cfg = RunConfig()
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe '{recipe}'; valid: {', '.join(sorted(RECIPES))}")
        _apply(cfg, RECIPES[recipe])
    _apply(cfg, user)
    cfg.recipe = recipe
    check_ranges(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, d)
    return cfg


def default_cache_root() -> Path:
    """Where caches go when a run names no cache_dir: $CISS_CACHE, else ~/.cache/ciss."""
    return Path(os.environ.get("CISS_CACHE", Path.home() / ".cache" / "ciss"))


def stable_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
