"""Figures (PNG, matplotlib without a display)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ciss.calibration import area_under


def plot_tradeoff(curves: Sequence[tuple[str, dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """mIoU of the absent classes against mIoU of background + the step's classes, one line per
    curve, with its AUSUC (computed from the points) in the legend (calibration.tradeoff_curve output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for label, c in curves:
        pts = [(s, u) for s, u in zip(c["miou_s"], c["miou_u"])
               if s is not None and u is not None and not (math.isnan(s) or math.isnan(u))]
        area = area_under(np.array([s for s, _ in pts]), np.array([u for _, u in pts]))
        ax.plot([100 * s for s, _ in pts], [100 * u for _, u in pts], label=f"{label} (AUSUC {100 * area:.1f})")
        gammas = [float(g) for g in c["gamma"]]  # posthoc.jsonl stores the infinite ends as "-Infinity"/"Infinity"
        at0 = gammas.index(min(gammas, key=abs))  # the uncalibrated point
        ax.scatter([100 * c["miou_s"][at0]], [100 * c["miou_u"][at0]], marker="o", s=18)
    ax.set_xlabel("mIoU, background + the step's classes (%)")
    ax.set_ylabel("mIoU, absent classes (%)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
