"""Streaming confusion matrix and the figures the CISS papers print (mIoU old | new | all)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ciss.types import IGNORE


def predicted_labels(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) long: the index of the largest logit, the first of ties (as argmax).

    ``max(1).indices`` gives argmax's labels, and on contiguous (B, C, H, W) CPU tensors it is about 6x
    faster than ``argmax(1)`` (benchmarks/results/train_speed.md)."""
    return logits.max(dim=1).indices


class ConfusionMatrix:
    """Accumulates a (C, C) matrix of (ground truth, prediction) pixel counts on any device."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: (B, H, W) long; label IGNORE pixels are skipped."""
        keep = label != IGNORE
        gt = label[keep]
        pr = pred[keep]
        if gt.numel() and int(gt.max()) >= self.num_classes:
            raise ValueError(
                f"label {int(gt.max())} is outside the {self.num_classes} evaluated classes; "
                "the test relabel table must map unseen classes to background"
            )
        idx = gt * self.num_classes + pr.clamp_max(self.num_classes - 1)
        self.mat += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, -1)

    def merge_(self, other: torch.Tensor) -> None:
        self.mat += other.to(self.mat.device)

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for classes absent from both ground truth and prediction."""
        m = self.mat.double().cpu().numpy()
        tp = np.diag(m)
        denom = m.sum(0) + m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / denom, np.nan)

    def pixel_accuracy(self) -> float:
        m = self.mat.double()
        total = m.sum().item()
        return float(m.diag().sum().item() / total) if total else float("nan")


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


@dataclass
class StepMetrics:
    """Figures after one step. IoUs are fractions in [0, 1]; `summary` prints them in percent."""

    step: int
    iou: list[float]  # per seen class, model label order
    num_base: int  # classes of step 0, background included
    class_names: Optional[Sequence[str]] = None
    confusion: Optional[list[list[int]]] = None  # [ground truth][prediction] pixel counts, when measured

    @property
    def miou_old(self) -> float:
        return _nanmean(np.asarray(self.iou[: self.num_base], dtype=float))

    @property
    def miou_new(self) -> float:
        return _nanmean(np.asarray(self.iou[self.num_base :], dtype=float))

    @property
    def miou_all(self) -> float:
        return _nanmean(np.asarray(self.iou, dtype=float))

    def as_dict(self) -> dict:
        names = list(self.class_names) if self.class_names is not None else None
        return {
            "step": self.step,
            "miou_old": self.miou_old,
            "miou_new": self.miou_new,
            "miou_all": self.miou_all,
            "iou": [None if np.isnan(v) else float(v) for v in self.iou],
            "class_names": names[: len(self.iou)] if names else None,
            "num_base": self.num_base,
            **({"confusion": self.confusion} if self.confusion is not None else {}),
        }

    @classmethod
    def from_dict(cls, row: dict) -> "StepMetrics":
        """The inverse of `as_dict` (a recorded row; its None IoUs back to NaN)."""
        return cls(step=row["step"], iou=[float("nan") if v is None else v for v in row["iou"]],
                   num_base=row["num_base"], class_names=row.get("class_names"), confusion=row.get("confusion"))

    def ranges(self) -> tuple[str, str]:
        """Column headers in the papers' style, e.g. ('0-15', '16-20')."""
        n = len(self.iou)
        old = f"0-{self.num_base - 1}"
        new = f"{self.num_base}-{n - 1}" if n > self.num_base else "-"
        return old, new


def step_metrics(cm: ConfusionMatrix, step: int, num_base: int, class_names=None) -> StepMetrics:
    return StepMetrics(step=step, iou=[float(v) for v in cm.iou()], num_base=num_base,
                       class_names=class_names, confusion=cm.mat.cpu().tolist())


def class_errors(confusion: Sequence[Sequence[int]], class_names: Optional[Sequence[str]] = None,
                 top: int = 2) -> list[dict]:
    """Per class of a confusion matrix ([ground truth][prediction] pixel counts): IoU, recall,
    precision, the classes its missed pixels were predicted as, and the true classes of the pixels
    wrongly predicted as it (each the `top` largest, as fractions of the class's ground truth or of
    its predictions). Absent from both: NaN figures."""
    m = np.asarray(confusion, dtype=float)
    n = m.shape[0]
    names = list(class_names)[:n] if class_names is not None else [str(c) for c in range(n)]
    gt, pred, tp = m.sum(1), m.sum(0), np.diag(m)
    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else float("nan")

    out = []
    for c in range(n):
        missed = [(names[k], ratio(m[c, k], gt[c])) for k in np.argsort(-m[c]) if k != c and m[c, k] > 0][:top]
        wrong = [(names[k], ratio(m[k, c], pred[c])) for k in np.argsort(-m[:, c]) if k != c and m[k, c] > 0][:top]
        out.append({"class": names[c], "iou": ratio(tp[c], gt[c] + pred[c] - tp[c]),
                    "recall": ratio(tp[c], gt[c]), "precision": ratio(tp[c], pred[c]),
                    "pixels": int(gt[c]), "predicted": int(pred[c]),
                    "missed_as": missed, "false_from": wrong})
    return out


def format_class_errors(rows: Sequence[dict]) -> str:
    """One line per class: IoU, recall and precision in percent, where its misses went and where its
    false positives came from."""
    def pct(v: float) -> str:
        return "    -" if np.isnan(v) else f"{100 * v:5.1f}"

    def pairs(p: Sequence[tuple[str, float]]) -> str:
        return ", ".join(f"{k} {100 * v:.0f}%" for k, v in p) or "-"

    width = max([len("class")] + [len(r["class"]) for r in rows])
    lines = [f"{'class':<{width}} |   IoU | recall | precision | missed pixels predicted as | false positives are truly"]
    for r in rows:
        lines.append(f"{r['class']:<{width}} | {pct(r['iou'])} |  {pct(r['recall'])} |     {pct(r['precision'])} | "
                     f"{pairs(r['missed_as'])} | {pairs(r['false_from'])}")
    return "\n".join(lines)


def forgetting(history: Sequence[Sequence[float]], classes_per_step: Sequence[int]) -> list[float]:
    """Per-class forgetting after the last step: IoU at the step a class was learned minus IoU now.

    history[t] = per-class IoU after step t (length = classes seen at t).
    """
    if not history:
        return []
    final = history[-1]
    out = []
    start = 0
    for t, n in enumerate(classes_per_step[: len(history)]):
        for c in range(start, start + n):
            first = history[t][c]
            now = final[c]
            out.append(float("nan") if first is None or now is None else float(first) - float(now))
        start += n
    return out


def format_table(rows: Sequence[StepMetrics], title: str = "") -> str:
    """A fixed-width table: step | old | new | all (percent), the papers' column names."""
    if not rows:
        return ""
    old_h, new_h = rows[-1].ranges()
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'step':>4} | {old_h:>8} | {new_h:>8} | {'all':>6}")
    lines.append("-" * len(lines[-1]))

    def pct(v: float) -> str:
        return "   -" if np.isnan(v) else f"{100 * v:6.2f}"

    for r in rows:
        lines.append(f"{r.step:>4} | {pct(r.miou_old):>8} | {pct(r.miou_new):>8} | {pct(r.miou_all):>6}")
    return "\n".join(lines)
