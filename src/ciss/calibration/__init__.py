"""Post-hoc logit calibration for incremental steps (Mai et al., "Fine-tuning is fine, if calibrated").

After step t the model was trained on the step's classes only. The classes learned before it and
absent from its data, the *absent* classes U = 1 .. num_old - 1, keep useful features but get logits
on a smaller scale; one bias gamma added to their logits at evaluation restores much of them. The
*fine-tuning* classes S are the step's new classes and the background: background is labelled and
trained at every step, so it is never absent and never shifted.

A calibrator is fitted after a step from that step's training images only (no old image, no test
image), stored in the step checkpoint and applied only at evaluation; the trained weights are never
touched. docs/calibration.md says what each one computes and reads.

  sweep.py   apply_gamma, the exact gamma sweep (the oracle `sweep` on the test images), AUSUC
  base.py    the Calibrator contract, the old model's confident predictions, the image split rule
  gap.py     closed forms: `alg` (the paper's), `alg_all` (every labelled pixel), `share`
  pseudo.py  grid searches on pseudo-labels: `pcv` (with a pseudo fine-tune), `pcv_method` (with a
             pseudo step of the run's method), `pcv_fit`, `agree`
"""

from __future__ import annotations

from typing import Any

from ciss.calibration.base import CONFIDENT, Calibrator, LogitFn, confident_old, held_out_image
from ciss.calibration.gap import ALG, ALGAll, Share, alg_pixels, alg_sums, share_gamma
from ciss.calibration.pseudo import PCV, Agree, PCVFit, PCVMethod, pseudo_labelled
from ciss.calibration.sweep import (
    GammaSweep,
    apply_gamma,
    area_under,
    best_finite_gamma,
    gamma_grid,
    iou_of,
    logit_gap,
    tradeoff_curve,
)

CALIBRATORS: dict[str, type[Calibrator]] = {
    c.name: c for c in (ALG, ALGAll, PCV, PCVMethod, PCVFit, Share, Agree)
}
ANALYSES = ("sweep",)


def list_calibrators() -> list[str]:
    return list(CALIBRATORS)


def build_calibrator(name: str, **kwargs: Any) -> Calibrator:
    if name not in CALIBRATORS:
        raise ValueError(f"unknown calibrator '{name}'; choose from {', '.join(CALIBRATORS)}")
    return CALIBRATORS[name](**kwargs)


def parse_calibration(spec: Any) -> list[str]:
    """'alg', 'alg,pcv', ['alg', 'sweep'] or None -> validated list of names."""
    if spec is None or spec == "" or spec == "none":
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    valid = [*CALIBRATORS, *ANALYSES]
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown calibration {bad}; choose from {', '.join(valid)} "
                         "(comma-separated for several)")
    return list(dict.fromkeys(names))


__all__ = [
    "ALG", "ALGAll", "ANALYSES", "Agree", "CALIBRATORS", "CONFIDENT", "Calibrator", "GammaSweep",
    "LogitFn", "PCV", "PCVFit", "PCVMethod", "Share", "alg_pixels", "alg_sums", "apply_gamma", "area_under",
    "best_finite_gamma", "build_calibrator", "confident_old", "gamma_grid", "held_out_image", "iou_of",
    "list_calibrators", "logit_gap", "parse_calibration", "pseudo_labelled", "share_gamma",
    "tradeoff_curve",
]
