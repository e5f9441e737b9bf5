"""Joint training: all classes of the scenario at once, with all labels (the offline upper bound)."""

from __future__ import annotations

from dataclasses import dataclass

from ciss.methods.base import Method


@dataclass
class Joint(Method):
    name = "joint"
    offline = True
