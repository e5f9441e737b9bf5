"""Calibrators computed in closed form from logit gaps: the paper's average logit gap (`alg`, on the
pixels where its assumption holds, and `alg_all`, on every labelled pixel) and `share`, the
quantile of the gap that gives the old classes the share of the background the old model gives them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ciss.calibration.base import Calibrator, confident_old
from ciss.calibration.sweep import fine_tuning_columns, logit_gap
from ciss.types import BACKGROUND, IGNORE


def alg_sums(logits: torch.Tensor, label: torch.Tensor, num_old: int) -> tuple[float, int]:
    """Sum over the labelled pixels of (mean logit of S minus the pixel's class) - (mean logit of U),
    and the number of pixels. logits (B, C, H, W), label (B, H, W)."""
    c = logits.shape[1]
    z = logits.detach().double().permute(0, 2, 3, 1)  # (B, H, W, C)
    keep = label != IGNORE
    z, y = z[keep], label[keep].long()  # (N, C), (N,)
    s_mask = torch.zeros(c, dtype=torch.bool)
    s_mask[fine_tuning_columns(c, num_old)] = True
    s_mask = s_mask.to(z.device)
    zs_sum = z[:, s_mask].sum(1) - z.gather(1, y[:, None])[:, 0]  # S without the pixel's own class
    n_s = int(s_mask.sum()) - 1
    gap = zs_sum / max(n_s, 1) - z[:, 1:num_old].mean(1)
    return float(gap.sum()), int(gap.numel())


def alg_pixels(label: torch.Tensor, old_logits: torch.Tensor, num_old: int) -> torch.Tensor:
    """The pixels the paper's assumption holds on (no sample of an absent class): those labelled with
    a new class, and the background-labelled ones the old model also calls background. (B, H, W)."""
    new = (label != IGNORE) & (label >= num_old)
    return new | ((label == BACKGROUND) & (old_logits.argmax(1) == BACKGROUND))


@dataclass
class ALGAll(Calibrator):
    """The average logit gap over every labelled pixel of the step, background showing old objects
    included (their old-class logits are high, so gamma comes out low)."""

    name = "alg_all"

    def start(self, ctx):  # type: ignore[override]
        self._total, self._n = 0.0, 0
        return super().start(ctx)

    def update(self, logits, label, old_logits=None):  # type: ignore[override]
        t, k = alg_sums(logits.cpu(), label.cpu(), self._ctx.num_old)
        self._total, self._n = self._total + t, self._n + k

    def finish(self) -> float:
        self.gamma = self._total / self._n if self._n else 0.0
        self.info = {"pixels": self._n}
        return self.gamma


@dataclass
class ALG(ALGAll):
    """The paper's ALG on the pixels where the fine-tuning data holds no absent class (alg_pixels)."""

    name = "alg"
    needs_old = True
    version = 2  # version 1 counted every labelled pixel (now alg_all)
    calibrated_old: bool = True

    def update(self, logits, label, old_logits=None):  # type: ignore[override]
        assert old_logits is not None
        label = torch.where(alg_pixels(label, old_logits, self._ctx.num_old), label, IGNORE)
        super().update(logits, label)


def share_gamma(gaps: torch.Tensor, k: int) -> float:
    """A gamma under which exactly `k` of the pixels with logit gaps `gaps` (N,) go to an absent class
    (a pixel does when gamma > its gap): midway between the k-th and (k+1)-th smallest gap; the
    smallest gap when k = 0, just above the largest when k = N."""
    n = gaps.numel()
    if n == 0:
        return 0.0
    k = min(max(int(k), 0), n)
    s = gaps.double().sort().values
    if k == 0:
        return float(s[0])
    if k == n:
        return math.nextafter(float(s[-1]), math.inf)
    return float(s[k - 1] + s[k]) / 2


@dataclass
class Share(Calibrator):
    """gamma such that, on the step's background-labelled pixels, as many go to an old class as the
    old model gives to one (its argmax; with confidence >= threshold when that is > 0): a quantile
    of the logit gap, one pass."""

    name = "share"
    needs_old = True
    # 0: argmax against argmax; at SSUL's 0.7 the old model's share is a fraction of the real one
    # (a pilot FT run on ccp21 at resize 128: 0.7% of background after step 1, 0 from step 3 on).
    threshold: float = 0.0
    calibrated_old: bool = True

    def start(self, ctx):  # type: ignore[override]
        self._gaps: list[torch.Tensor] = []
        self._old = 0
        return super().start(ctx)

    def update(self, logits: torch.Tensor, label: torch.Tensor,  # type: ignore[override]
               old_logits: Optional[torch.Tensor] = None) -> None:
        assert old_logits is not None
        bg = label == BACKGROUND  # (B, H, W)
        z = logits.detach().float().permute(0, 2, 3, 1)[bg]  # (N, C)
        self._gaps.append(logit_gap(z, self._ctx.num_old)[0].cpu())  # 4 bytes a background pixel
        self._old += int((confident_old(old_logits, self.threshold)[1] & bg).sum())

    def finish(self) -> float:
        gaps = torch.cat(self._gaps) if self._gaps else torch.zeros(0)
        self._gaps = []
        self.gamma = share_gamma(gaps, self._old)
        self.info = {"background_pixels": int(gaps.numel()), "old_share": self._old / max(1, gaps.numel())}
        return self.gamma
