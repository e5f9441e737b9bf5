"""Fine-tuning (FT): the lower bound. Every hook is the default."""

from __future__ import annotations

from dataclasses import dataclass

from ciss.methods.base import Method


@dataclass
class FineTuning(Method):
    name = "ft"
