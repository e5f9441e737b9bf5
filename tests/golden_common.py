"""What the golden tests share: the folder of golden numbers, their tolerance, reading them back."""

from __future__ import annotations

import json
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "golden"
RTOL = 1e-6


def load(name: str) -> dict:
    """tests/golden/<name>.json."""
    return json.loads((GOLDEN / f"{name}.json").read_text())


def t(a: dict) -> torch.Tensor:
    """A tensor stored as {"data", "dtype", "shape"}."""
    return torch.tensor(a["data"], dtype=getattr(torch, a["dtype"])).reshape(a["shape"])


def close(ours, golden, rtol: float = RTOL, atol: float = 0.0) -> None:
    torch.testing.assert_close(torch.as_tensor(ours, dtype=torch.float64),
                               torch.as_tensor(golden, dtype=torch.float64), rtol=rtol, atol=atol)
