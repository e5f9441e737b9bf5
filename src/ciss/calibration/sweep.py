"""The bias gamma on the absent classes, and the exact sweep of its values.

`apply_gamma` adds gamma to the absent classes' decision logits; `GammaSweep` counts the confusion
matrix of every gamma of a grid in one pass (the oracle analysis on the test images, and the
selection rule of the pseudo-validation calibrators on the step's images); `tradeoff_curve` and
`area_under` turn it into the paper's seen-unseen curve and its area (AUSUC, with mIoU).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from ciss.metrics import ConfusionMatrix
from ciss.types import IGNORE


def apply_gamma(logits: torch.Tensor, gamma: float, num_old: int) -> torch.Tensor:
    """A copy of `logits` (B, C, H, W) with gamma added to the absent classes 1 .. num_old - 1."""
    out = logits.clone()
    if num_old > 1 and gamma != 0.0:
        out[:, 1:num_old] += gamma
    return out


def gamma_grid(scale: float = 0.05, extent: float = 10.0, points: int = 801) -> torch.Tensor:
    """Sorted gammas dense near 0 and reaching +-scale*sinh(extent) (~550): fine for logits and for
    log-probabilities alike, 2.5% relative resolution away from 0."""
    half = (points - 1) / 2  # an odd count holds 0 itself, not a rounding of it
    return scale * torch.sinh((torch.arange(points, dtype=torch.float64) - half) * (extent / half))


def fine_tuning_columns(num_classes: int, num_old: int) -> list[int]:
    """The classes that are never shifted: background and the step's new classes."""
    return [0] + list(range(num_old, num_classes))


def logit_gap(logits: torch.Tensor, num_old: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel of `logits` (N, C): d = best fine-tuning logit - best absent logit, and the two
    classes. The pixel is predicted absent exactly when gamma > d."""
    s_cols = fine_tuning_columns(logits.shape[1], num_old)
    zs, ia = logits[:, s_cols].max(dim=1)
    zb, ib = logits[:, 1:num_old].max(dim=1)
    return zs - zb, torch.as_tensor(s_cols, device=logits.device)[ia], ib + 1


class GammaSweep:
    """Confusion matrices of argmax(apply_gamma(logits, g)) for every g of a grid, in one pass.

    A pixel's prediction changes with gamma only once: from its best fine-tuning class a (best of S)
    to its best absent class b when gamma > d = z_a - z_b. So the matrix at g is the one of "all
    pixels at a", minus the pixels with d < g counted at a, plus the same pixels counted at b.
    Entry k of `matrices()` is for grid[k]; before it comes -inf (no flip), after it +inf (all flip).
    """

    def __init__(self, num_classes: int, num_old: int, grid: Optional[torch.Tensor] = None) -> None:
        if num_old < 2:
            raise ValueError("a gamma sweep needs at least one absent class (a step after step 0)")
        self.c = num_classes
        self.num_old = num_old
        self.grid = (gamma_grid() if grid is None else grid.double()).sort().values
        k = self.grid.numel() + 1  # bins: d < grid[0], grid[0] <= d < grid[1], ..., d >= grid[-1]
        self.at_a = torch.zeros(k, num_classes * num_classes, dtype=torch.int64)
        self.at_b = torch.zeros(k, num_classes * num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, label: torch.Tensor) -> None:
        """logits (B, C, H, W) decision logits; label (B, H, W) with IGNORE skipped."""
        logits = logits.detach().double().cpu()
        label = label.cpu()
        keep = label != IGNORE
        z = logits.permute(0, 2, 3, 1)[keep]  # (N, C)
        gt = label[keep].long()
        # A pixel flips when zb + g > zs, i.e. g > d. Bin j holds grid[j-1] <= d < grid[j], so the
        # pixels flipped at grid[k] are those of bins 0 .. k.
        d, a, b = logit_gap(z, self.num_old)
        bins = torch.searchsorted(self.grid, d, right=True)
        cc = self.c * self.c
        self.at_a += torch.bincount(bins * cc + gt * self.c + a, minlength=self.at_a.numel()).view_as(self.at_a)
        self.at_b += torch.bincount(bins * cc + gt * self.c + b, minlength=self.at_b.numel()).view_as(self.at_b)

    def matrices(self) -> torch.Tensor:
        """(len(grid) + 2, C, C): at -inf, at each grid value, at +inf."""
        total_a = self.at_a.sum(0)  # -inf flips none, grid[k] flips bins 0 .. k, +inf flips all
        flipped_a = torch.cat([torch.zeros_like(total_a)[None], self.at_a.cumsum(0)])
        flipped_b = torch.cat([torch.zeros_like(total_a)[None], self.at_b.cumsum(0)])
        return (total_a[None] - flipped_a + flipped_b).view(-1, self.c, self.c)

    def gammas(self) -> list[float]:
        return [-math.inf] + self.grid.tolist() + [math.inf]

    def counted(self) -> int:
        """Pixels seen so far."""
        return int(self.at_a.sum())


def iou_of(mat: torch.Tensor) -> np.ndarray:
    cm = ConfusionMatrix(mat.shape[0])
    cm.mat = mat
    return cm.iou()


def nanmean(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def best_finite_gamma(sweep: GammaSweep, scores: list[float]) -> float:
    """The finite grid gamma with the best score (one per entry of `sweep.matrices()`, NaN never
    best); among equally good ones the closest to 0 (the least change); 0 when none is a number."""
    pairs = [(g, s) for g, s in zip(sweep.gammas()[1:-1], scores[1:-1]) if s == s]
    if not pairs:
        return 0.0
    best = max(s for _, s in pairs)
    return min((g for g, s in pairs if s == best), key=abs)


def tradeoff_curve(sweep: GammaSweep) -> dict[str, Any]:
    """mIoU of the absent classes U and of the fine-tuning classes S (background + the step's new
    classes) for every gamma, and the area under the U-vs-S curve (AUSUC with mIoU)."""
    u_cols = list(range(1, sweep.num_old))
    s_cols = fine_tuning_columns(sweep.c, sweep.num_old)
    rows = []
    for g, mat in zip(sweep.gammas(), sweep.matrices()):
        iou = iou_of(mat)
        rows.append((g, nanmean(iou[s_cols]), nanmean(iou[u_cols]), nanmean(iou)))
    return {"gamma": [r[0] for r in rows], "miou_s": [r[1] for r in rows],
            "miou_u": [r[2] for r in rows], "miou_all": [r[3] for r in rows],
            "ausuc": area_under(np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))}


def area_under(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the upper envelope of sweep points (x, y), NaNs dropped: at each x, the best y
    reached with at least that x (the sweep's curve folds back on itself, the envelope does not).
    Closed to the axes like the paper's seen-unseen curve: from x = 0 at the best y to the largest x."""
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if x.size == 0:
        return float("nan")
    order = np.argsort(-x, kind="stable")
    x, env = x[order], np.maximum.accumulate(y[order])  # decreasing x, best y so far
    x, env = x[::-1], env[::-1]
    x = np.concatenate([[0.0], x])
    env = np.concatenate([[env[0]], env])
    return float(np.trapezoid(env, x))
