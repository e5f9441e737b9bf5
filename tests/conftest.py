"""Shared fixtures: a tiny synthetic configuration that trains in seconds on a CPU."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see ciss.cli.main; before torch is imported
if "CISS_CACHE" not in os.environ:  # tests never write into the user's cache
    import tempfile

    os.environ["CISS_CACHE"] = tempfile.mkdtemp(prefix="ciss-test-cache-")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest
import torch

from ciss.config import RunConfig, load_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

torch.set_num_threads(2)


def tiny_config(tmp_path: Path, *overrides: str) -> RunConfig:
    """Synthetic 6 classes, task 4-2 (2 steps), tiny backbone, 32x32 images, 1 epoch."""
    return load_config(None, [
        "data.dataset=synthetic",
        "data.task=4-2",
        "data.options={num_classes: 6, size: 32, length: 24}",
        "data.crop_size=32",
        "optim.epochs=1",
        "optim.batch_size=8",
        f"out_dir={tmp_path / 'runs'}",
        f"cache_dir={tmp_path / 'cache'}",
        "progress=false",
        "tensorboard=false",
        *overrides,
    ], recipe="tiny")


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py imported as module `name` (registered, so its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *o: tiny_config(tmp_path, *o)


def checkpoint_round_trip(method):
    """A fresh method of the same name loaded from `method`'s state after a weights-only save."""
    import io

    from ciss.methods import build_method

    buf = io.BytesIO()
    torch.save({"method": method.state_dict()}, buf)
    buf.seek(0)
    fresh = build_method(method.name)
    fresh.load_state_dict(torch.load(buf, weights_only=True)["method"])
    return fresh


def outputs_on_random_batch(model, old, num_classes: int = 5, size: int = 32):
    """(label, model output, old model output without gradients) on a random batch of 2."""
    x = torch.randn(2, 3, size, size)
    label = torch.randint(0, num_classes, (2, size, size))
    out = model(x)
    with torch.no_grad():
        old_out = old(x)
    return label, out, old_out
