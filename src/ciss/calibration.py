"""Post-hoc logit calibration for incremental steps (Mai et al., "Fine-tuning is fine, if calibrated").

After step t the model was trained on the step's classes only. The classes learned before it and
absent from its data, the *absent* classes U = 1 .. num_old - 1, keep useful features but get logits
on a smaller scale; one bias gamma added to their logits at evaluation restores much of them. The
*fine-tuning* classes S are the step's new classes and the background: background is labelled and
trained at every step, so it is never absent and never shifted.

A calibrator is fitted after a step from that step's training images only (no old image), stored in
the step checkpoint and applied only at evaluation; the trained weights are never touched.

- `alg`: the average logit gap over the step's labelled pixels: for a pixel of class y in S, the mean
  logit of S minus {y} minus the mean logit of U, averaged over pixels (the paper's ALG, per pixel).
- `pcv`: the paper's pseudo cross-validation re-trains on splits of the fine-tuning classes into
  pseudo-fine-tuning and pseudo-absent ones, which a step with a single new class (15-1, 10-1...)
  cannot do. Adaptation: the absent classes are given pseudo-labels instead. On the step's images,
  background pixels that the model before the step assigns to an absent class with probability >=
  `threshold` are labelled with it; gamma is the grid value with the best mIoU over the classes so
  labelled (background, pseudo-absent, new). It works the same with one new class or many.
- `sweep`: the oracle analysis on the test images: mIoU of U and of S for every gamma on a grid, the
  trade-off curve and the area under it (the paper's AUSUC, with mIoU in place of accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ciss.metrics import ConfusionMatrix
from ciss.types import BACKGROUND, IGNORE, Batch, StepContext

CALIBRATORS = ("alg", "pcv")
ANALYSES = ("sweep",)

# Logits -> decision logits of the seen classes, (B, num_seen, H, W) (the method's eval_logits).
LogitFn = Callable[[torch.Tensor], torch.Tensor]


def parse_calibration(spec: Any) -> list[str]:
    """'alg', 'alg,pcv', ['alg', 'sweep'] or None -> validated list of names."""
    if spec is None or spec == "" or spec == "none":
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    bad = [n for n in names if n not in CALIBRATORS + ANALYSES]
    if bad:
        raise ValueError(f"unknown calibration {bad}; choose from {', '.join(CALIBRATORS + ANALYSES)} "
                         "(comma-separated for several)")
    return list(dict.fromkeys(names))


def apply_gamma(logits: torch.Tensor, gamma: float, num_old: int) -> torch.Tensor:
    """A copy of `logits` (B, C, H, W) with gamma added to the absent classes 1 .. num_old - 1."""
    out = logits.clone()
    if num_old > 1 and gamma != 0.0:
        out[:, 1:num_old] += gamma
    return out


def gamma_grid(scale: float = 0.05, extent: float = 10.0, points: int = 801) -> torch.Tensor:
    """Sorted gammas dense near 0 and reaching +-scale*sinh(extent) (~1100): fine for logits and for
    log-probabilities alike, 2.5% relative resolution away from 0."""
    return scale * torch.sinh(torch.linspace(-extent, extent, points, dtype=torch.float64))


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
        s_cols = [0] + list(range(self.num_old, self.c))
        zs, ia = z[:, s_cols].max(dim=1)
        a = torch.as_tensor(s_cols)[ia]
        zb, ib = z[:, 1 : self.num_old].max(dim=1)
        b = ib + 1
        # A pixel flips when zb + g > zs, i.e. g > d. Bin j holds grid[j-1] <= d < grid[j], so the
        # pixels flipped at grid[k] are those of bins 0 .. k.
        d = zs - zb
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


def iou_of(mat: torch.Tensor) -> np.ndarray:
    cm = ConfusionMatrix(mat.shape[0])
    cm.mat = mat
    return cm.iou()


def _nanmean(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def tradeoff_curve(sweep: GammaSweep) -> dict[str, Any]:
    """mIoU of the absent classes U and of the fine-tuning classes S (background + the step's new
    classes) for every gamma, and the area under the U-vs-S curve (AUSUC with mIoU)."""
    u_cols = list(range(1, sweep.num_old))
    s_cols = [0] + list(range(sweep.num_old, sweep.c))
    rows = []
    for g, mat in zip(sweep.gammas(), sweep.matrices()):
        iou = iou_of(mat)
        rows.append((g, _nanmean(iou[s_cols]), _nanmean(iou[u_cols]), _nanmean(iou)))
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


@dataclass
class Calibrator:
    """A gamma for the absent classes, fitted after a step; 0 until fitted.

    Fitting streams over the step's batches (`start`, `update` per batch, `finish`), so several
    calibrators share one pass of the models; `fit` runs that loop for one calibrator.
    """

    name = "calibrator"
    needs_old: ClassVar[bool] = False  # update() wants the previous step's decision logits
    gamma: float = 0.0

    def start(self, ctx: StepContext) -> bool:
        """Begin fitting after the step of `ctx`; False (gamma 0) when nothing is absent or new."""
        self._ctx = ctx
        self.gamma = 0.0
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
        return {"name": self.name, "gamma": float(self.gamma)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"calibrator state is for '{state.get('name')}', not '{self.name}'")
        self.gamma = float(state["gamma"])


def alg_sums(logits: torch.Tensor, label: torch.Tensor, num_old: int) -> tuple[float, int]:
    """Sum over the labelled pixels of (mean logit of S minus the pixel's class) - (mean logit of U),
    and the number of pixels. logits (B, C, H, W), label (B, H, W)."""
    c = logits.shape[1]
    z = logits.detach().double().permute(0, 2, 3, 1)  # (B, H, W, C)
    keep = label != IGNORE
    z, y = z[keep], label[keep].long()  # (N, C), (N,)
    s_mask = torch.zeros(c, dtype=torch.bool)
    s_mask[BACKGROUND] = True
    s_mask[num_old:] = True
    s_mask = s_mask.to(z.device)
    zs_sum = z[:, s_mask].sum(1) - z.gather(1, y[:, None])[:, 0]  # S without the pixel's own class
    n_s = int(s_mask.sum()) - 1
    gap = zs_sum / max(n_s, 1) - z[:, 1:num_old].mean(1)
    return float(gap.sum()), int(gap.numel())


@dataclass
class ALG(Calibrator):
    name = "alg"

    def start(self, ctx: StepContext) -> bool:
        self._total, self._n = 0.0, 0
        return super().start(ctx)

    def update(self, logits, label, old_logits=None):  # type: ignore[override]
        t, k = alg_sums(logits.cpu(), label.cpu(), self._ctx.num_old)
        self._total, self._n = self._total + t, self._n + k

    def finish(self) -> float:
        self.gamma = self._total / self._n if self._n else 0.0
        return self.gamma


@dataclass
class PCV(Calibrator):
    name = "pcv"
    needs_old = True
    # SSUL's pseudo-label confidence (0.7): an old-model prediction trusted as a pseudo label.
    threshold: float = 0.7

    def start(self, ctx: StepContext) -> bool:
        self._sweep = GammaSweep(ctx.num_seen, ctx.num_old) if ctx.num_old >= 2 else None
        return super().start(ctx)

    def update(self, logits, label, old_logits=None):  # type: ignore[override]
        assert self._sweep is not None and old_logits is not None
        label = label.clone()
        old_p = F.softmax(old_logits.float(), dim=1)  # (B, num_old, H, W)
        conf, pred = old_p.max(1)
        pseudo = (label == BACKGROUND) & (pred >= 1) & (conf >= self.threshold)
        label[pseudo] = pred[pseudo]
        self._sweep.update(logits, label)

    def finish(self) -> float:
        assert self._sweep is not None
        scores = [_nanmean(iou_of(m)) for m in self._sweep.matrices()]
        gammas = self._sweep.gammas()
        best = max(scores[1:-1])  # finite gammas only
        # Among equally good gammas the one closest to 0 (the least change).
        self.gamma = min((g for g, s in zip(gammas[1:-1], scores[1:-1]) if s == best), key=abs)
        return self.gamma


def build_calibrator(name: str) -> Calibrator:
    if name == "alg":
        return ALG()
    if name == "pcv":
        return PCV()
    raise ValueError(f"unknown calibrator '{name}'; choose from {', '.join(CALIBRATORS)}")
