"""What a run says as it goes: lines on the console of the main rank, and scalars to TensorBoard
when asked for (and installed). The JSONL records are the run directory's (ciss.results)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from ciss.engine.evaluator import EvalResult
from ciss.metrics import format_table


class RunLog:
    """Console lines when `show` (the main rank of a run with progress output), scalars once a
    TensorBoard writer is open."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.writer: Optional[Any] = None

    def open_tensorboard(self, path: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra; JSONL logs are always written
            return
        self.writer = SummaryWriter(str(path))

    def print(self, text: str) -> None:
        if self.show:
            tqdm.write(text)

    def scalars(self, tag: str, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{tag}/{k}", v, step)

    def step_figures(self, res: EvalResult, step: int) -> None:
        """A step's figures: mIoU old / new / all (raw and calibrated) as scalars, the table rows
        on the console."""
        metrics = res.raw
        scalars = {"miou_old": metrics.miou_old, "miou_new": metrics.miou_new, "miou_all": metrics.miou_all}
        for name, (gamma, m) in res.calibrated.items():
            scalars.update({f"{name}_miou_old": m.miou_old, f"{name}_miou_new": m.miou_new,
                            f"{name}_miou_all": m.miou_all, f"{name}_gamma": gamma})
        self.scalars("eval", scalars, step)
        self.print(format_table([metrics]) if step == 0 else "\n".join(res.lines()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
