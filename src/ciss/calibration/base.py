"""The calibrator contract, and what several calibrators read: the old model's confident
predictions and the split of a step's images into a pseudo-fine-tuning and a pseudo-validation half."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
import torch.nn.functional as F

from ciss.calibration.sweep import apply_gamma
from ciss.types import Batch, StepContext

# Logits -> decision logits of the seen classes, (B, num_seen, H, W) (the method's eval_logits).
LogitFn = Callable[[torch.Tensor], torch.Tensor]

# SSUL's pseudo-label confidence: an old-model prediction trusted as a label.
CONFIDENT = 0.7


def confident_old(old_logits: torch.Tensor, threshold: float = CONFIDENT) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, mask) per pixel of the old model's decision logits (B, num_old, H, W): its argmax,
    and where that is an old foreground class with softmax probability >= threshold (threshold 0:
    wherever it is)."""
    conf, pred = F.softmax(old_logits.float(), dim=1).max(1)  # (B, H, W)
    return pred, (pred >= 1) & (conf >= threshold)


def held_out_image(index: int) -> bool:
    """The split rule of the cross-validated calibrators: an image is in the pseudo-validation half
    when the first byte of the SHA-256 of its index in the train dataset (decimal) is odd. It does
    not depend on the step, the order of the images or the seed."""
    return bool(hashlib.sha256(str(int(index)).encode()).digest()[0] & 1)


@dataclass
class Calibrator:
    """A gamma for the absent classes, fitted after a step; 0 until fitted.

    Fitting streams over the step's batches (`start`, `update` per batch, `finish`), so several
    calibrators share one pass of the models; `fit` runs that loop for one calibrator. Its dataclass
    fields other than `gamma` and `info` are its parameters; they, the name and `version` identify
    a stored fit, which is reused only when all three match.
    """

    name: ClassVar[str] = "calibrator"
    needs_old: ClassVar[bool] = False  # update() wants the previous step's decision logits
    # A calibrator with a field `calibrated_old` set gets those logits with its own gamma of the
    # previous step added: the old model as deployed, which for FT is what still knows old classes.
    # The evaluator re-trains a copy of the step's starting model (`tune`) on the step's images that
    # `held_out` rejects, then streams the held-out ones to update() with the copy's `tuned_logits`.
    needs_training: ClassVar[bool] = False
    version: ClassVar[int] = 1  # raised when the estimator's definition changes: older fits are redone
    gamma: float = 0.0
    info: dict[str, Any] = field(default_factory=dict, repr=False)  # what the fit measured (stored)

    @property
    def reads_calibrated_old(self) -> bool:
        return bool(getattr(self, "calibrated_old", False))

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("gamma", "info")}

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, **self.params()}

    def matches(self, state: dict[str, Any]) -> bool:
        """Whether a stored fit is one of this calibrator (same name, version and parameters)."""
        return all(state.get(k) == v for k, v in self.key().items())

    def start(self, ctx: StepContext) -> bool:
        """Begin fitting after the step of `ctx`; False (gamma 0) when nothing is absent or new."""
        self._ctx = ctx
        self.gamma = 0.0
        self.info = {}
        return ctx.num_old >= 2 and ctx.num_new > 0

    def update(self, logits: torch.Tensor, label: torch.Tensor,
               old_logits: Optional[torch.Tensor] = None) -> None:
        raise NotImplementedError

    def finish(self) -> float:
        raise NotImplementedError

    def fit(self, batches: Iterable[Batch], logit_fn: LogitFn, ctx: StepContext,
            old_logit_fn: Optional[LogitFn] = None) -> float:
        if not self.start(ctx):
            return self.gamma
        if self.needs_old and old_logit_fn is None:
            raise ValueError(f"{self.name} needs the model before the step to pseudo-label the absent classes")
        for batch in batches:
            old = old_logit_fn(batch.image) if self.needs_old and old_logit_fn is not None else None
            self.update(logit_fn(batch.image), batch.label, old)
        return self.finish()

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return apply_gamma(logits, self.gamma, ctx.num_old)

    def state_dict(self) -> dict[str, Any]:
        return {**self.key(), "gamma": float(self.gamma), **({"info": dict(self.info)} if self.info else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"calibrator state is for '{state.get('name')}', not '{self.name}'")
        self.gamma = float(state["gamma"])
        self.info = dict(state.get("info", {}))
