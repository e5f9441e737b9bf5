"""Method registry: `build_method(name, **fields)`, `list_methods()`."""

from __future__ import annotations

from typing import Any

from ciss.methods.base import Method, Phase
from ciss.methods.ewc import EWC
from ciss.methods.ft import FineTuning
from ciss.methods.gsc import GSC
from ciss.methods.ilt import ILT
from ciss.methods.joint import Joint
from ciss.methods.lwf import LwF
from ciss.methods.lwf_mc import LwFMC
from ciss.methods.mib import MiB
from ciss.methods.nest import NeST, NeSTMiB, NeSTPLOP
from ciss.methods.plop import PLOP
from ciss.methods.rcil import RCIL, GSCRCIL
from ciss.methods.sdr import SDR
from ciss.methods.ssul import SSUL, SSULM

METHODS: dict[str, type[Method]] = {
    "ft": FineTuning,
    "joint": Joint,
    "lwf": LwF,
    "lwf_mc": LwFMC,
    "ewc": EWC,
    "ilt": ILT,
    "mib": MiB,
    "sdr": SDR,
    "plop": PLOP,
    "gsc": GSC,
    "rcil": RCIL,
    "gsc_rcil": GSCRCIL,
    "nest": NeST,
    "nest_mib": NeSTMiB,
    "nest_plop": NeSTPLOP,
    "ssul": SSUL,
    "ssul_m": SSULM,
}


def list_methods() -> list[str]:
    return sorted(METHODS)


def build_method(name: str, **fields: Any) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; valid: {', '.join(list_methods())}")
    cls = METHODS[name]
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ValueError(f"method '{name}': bad argument ({exc}); see its fields in "
                         f"{cls.__module__}") from None


__all__ = ["METHODS", "Method", "Phase", "build_method", "list_methods"]
