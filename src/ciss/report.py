"""Reports from run directories: the papers' tables, mIoU after every step, per-class forgetting, and
one self-contained HTML page (figures inlined) that gathers them.

Runs are grouped by dataset, task, setting and class order; runs of one method in a group (seeds)
become mean ± std. Where one task and setting was run in several class orders, a robustness table
gives each method's mean ± std over the orders (GSC Table VI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ciss.report_html import to_html
from ciss.results import RunDir


@dataclass
class RunRecord:
    """What a report needs of one run directory."""

    path: Path
    method: str
    group: str  # "dataset task setting", then "order X" unless the classes come in their own order
    steps: list[dict]  # evaluated results.jsonl rows, in step order
    task_key: str = ""  # "dataset task setting": the group of every class order
    order: str = "identity"
    forgetting: list[Optional[float]] = field(default_factory=list)
    wall_time_s: float = float("nan")
    uses_memory: bool = False
    method_args: dict = field(default_factory=dict)  # the run's own method settings

    @property
    def label(self) -> str:
        """The method and its own settings (runs of one method with other settings are not seeds)."""
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.method_args.items()))
        name = f"{self.method} ({args})" if args else self.method
        return f"{name} (uses old images)" if self.uses_memory else name


def load_run(path: str | Path) -> RunRecord:
    run = RunDir(path, create=False)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{path}: not a ciss run directory (no config.yaml)")
    cfg = run.read_config()
    rows = [r for _, r in sorted(run.step_results().items()) if "iou" in r]
    if not rows:
        raise FileNotFoundError(f"{path}: no evaluated step yet; train (or evaluate) first")
    summary = run.read_summary()
    data = cfg.get("data") or {}
    task = data.get("task")
    task = task if isinstance(task, str) else f"custom {len(task)} steps"
    task_key = f"{data.get('dataset')} {task} {data.get('setting')}"
    order = _order_label(data.get("order"), len(rows[-1]["iou"]))
    return RunRecord(path=run.path, method=cfg["method"], task_key=task_key, order=order,
                     group=task_key if order == "identity" else f"{task_key} order {order}", steps=rows,
                     forgetting=list(summary.get("forgetting") or []),
                     wall_time_s=run.kept_wall_time() or float("nan"),
                     method_args=dict(cfg.get("method_args") or {}),
                     uses_memory=bool(summary.get("uses_memory", rows[-1].get("uses_memory", False))))


def _order_label(order: Any, num_classes: int) -> str:
    """"identity" for every spelling of the dataset's own order (None, "identity", GSC's "A"), else
    the order as configured ("custom" for an inline list)."""
    from ciss.data.errors import DataError
    from ciss.scenario import resolve_order

    try:  # ids need no class names; an order written with names is simply not the identity here
        if resolve_order(order, [str(i) for i in range(num_classes)]) == tuple(range(num_classes)):
            return "identity"
    except DataError:
        pass
    return order if isinstance(order, str) else "custom"


def _order_key(order: str) -> tuple[bool, str]:
    """The dataset's own order first, then the others by name."""
    return order != "identity", order


def _finite(values: Sequence[Optional[float]]) -> list[float]:
    return [x for x in values if x is not None and not math.isnan(x)]


def _mean(values: Sequence[float]) -> float:
    v = _finite(values)
    return sum(v) / len(v) if v else float("nan")


def _mean_std(values: Sequence[float]) -> str:
    v = np.array(_finite(values), dtype=float) * 100
    if v.size == 0:
        return "-"
    return f"{v.mean():.2f}" if v.size == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def groups(runs: Sequence[RunRecord]) -> dict[str, dict[str, list[RunRecord]]]:
    """Runs by group: tasks as first met, each task's own class order before the others."""
    first: dict[str, int] = {}
    for r in runs:
        first.setdefault(r.task_key, len(first))
    out: dict[str, dict[str, list[RunRecord]]] = {}
    for r in sorted(runs, key=lambda r: (first[r.task_key], *_order_key(r.order))):
        out.setdefault(r.group, {}).setdefault(r.label, []).append(r)
    return out


def markdown(runs: Sequence[RunRecord], figures: dict[str, list[str]]) -> str:
    """Old | new | all after the last step per group (GSC Table I layout), then mIoU per step."""
    lines = ["# ciss report", ""]
    walls = [r.wall_time_s for r in runs if not math.isnan(r.wall_time_s)]
    lines += [f"{len(runs)} run(s); wall time {sum(walls) / 3600:.1f} h in total, each run's own "
              "(a run that reused a shared step-0 checkpoint did not pay for step 0).", ""]
    for group, by_method in groups(runs).items():
        last = next(iter(by_method.values()))[0].steps[-1]
        n_base, n_all = last["num_base"], len(last["iou"])
        old_h = f"old (0-{n_base - 1})"
        new_h = f"new ({n_base}-{n_all - 1})" if n_all > n_base else "new"
        lines += [f"## {group}", "", f"| method | runs | {old_h} | {new_h} | all | wall time (min) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, rs in by_method.items():
            f = [r.steps[-1] for r in rs]
            wall = [r.wall_time_s for r in rs if not math.isnan(r.wall_time_s)]
            minutes = f"{sum(wall) / 60 / len(wall):.0f}" if wall else "-"  # mean over the runs
            lines.append(f"| {label} | {len(rs)} | {_mean_std([x['miou_old'] for x in f])} | "
                         f"{_mean_std([x['miou_new'] for x in f])} | {_mean_std([x['miou_all'] for x in f])} | "
                         f"{minutes} |")
        n_steps = max(len(r.steps) for rs in by_method.values() for r in rs)
        lines += ["", "mIoU of all seen classes after each step:", "",
                  "| method | " + " | ".join(f"step {t}" for t in range(n_steps)) + " |",
                  "|---|" + "---:|" * n_steps]
        for label, rs in by_method.items():
            if _offline(rs, n_steps):  # trained once on every class: its figure is the last step's
                cells = ["-"] * (n_steps - 1) + [_mean_std([r.steps[0]["miou_all"] for r in rs])]
            else:
                cells = [_mean_std([r.steps[t]["miou_all"] for r in rs if t < len(r.steps)])
                         for t in range(n_steps)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for fig in figures.get(group, []):
            lines += ["", f"![{Path(fig).stem}]({fig})"]
        lines.append("")
    lines += order_robustness(runs)
    return "\n".join(lines)


def order_robustness(runs: Sequence[RunRecord]) -> list[str]:
    """Per task and setting run in two or more class orders: each method's old | new | all after the
    last step as mean ± std over the orders, one value per order (its seeds averaged first)."""
    lines: list[str] = []
    by_task: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_task.setdefault(r.task_key, []).append(r)
    for task_key, rs in by_task.items():
        if len({r.order for r in rs}) < 2:
            continue
        last = rs[0].steps[-1]
        n_base, n_all = last["num_base"], len(last["iou"])
        lines += [f"## Class-order robustness: {task_key}", "",
                  "Mean ± std over class orders (GSC Table VI layout). Class indices are positions in "
                  "each run's own order: old = the classes of step 0.", "",
                  f"| method | orders | old (0-{n_base - 1}) | new ({n_base}-{n_all - 1}) | all |",
                  "|---|---|---:|---:|---:|"]
        by_method: dict[str, dict[str, list[dict]]] = {}
        for r in rs:
            by_method.setdefault(r.label, {}).setdefault(r.order, []).append(r.steps[-1])
        for label, per_order in by_method.items():
            names = sorted(per_order, key=_order_key)
            cells = [_mean_std([_mean([x[k] for x in per_order[o]]) for o in names])
                     for k in ("miou_old", "miou_new", "miou_all")]
            lines.append(f"| {label} | {' '.join(names)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def _offline(rs: Sequence[RunRecord], n_steps: int) -> bool:
    """Runs of one step among incremental ones: an offline method (Joint) that learned every class
    at once, an upper bound for the last step rather than a step-0 figure."""
    return n_steps > 1 and all(len(r.steps) == 1 for r in rs)


def _style(k: int) -> dict[str, Any]:
    """Colour and line style of the k-th method: 20 distinct colours, then dashed, dotted..."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](k % 20),
            "linestyle": ("-", "--", ":", "-.")[(k // 20) % 4]}


def _compact_png(path: Path) -> Path:
    """Rewrite a PNG with 256 colours, a third of the size or less (the page embeds every figure)."""
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    return path


def _save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return _compact_png(path)


def plot_steps(group: str, by_method: dict[str, list[RunRecord]], path: Path) -> Path:
    """mIoU of all seen classes after every step, one line per method (GSC Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    n_steps = max(len(r.steps) for rs in by_method.values() for r in rs)
    for k, (label, rs) in enumerate(by_method.items()):
        if _offline(rs, n_steps):  # a level line over the steps, not a dot at step 0
            level = np.nanmean([100 * r.steps[0]["miou_all"] for r in rs])
            ax.axhline(level, label=f"{label} (all classes at once)", **{**_style(k), "linestyle": "--"})
            continue
        n = max(len(r.steps) for r in rs)
        mean = [np.nanmean([100 * r.steps[t]["miou_all"] for r in rs if t < len(r.steps)]) for t in range(n)]
        ax.plot(range(n), mean, marker="o", label=label, **_style(k))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU, all seen classes (%)")
    ax.set_title(group, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_forgetting(group: str, by_method: dict[str, list[RunRecord]], path: Path) -> Optional[Path]:
    """Per-class forgetting (IoU after the class's own step minus after the last step; GSC Fig. 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = {k: rs for k, rs in by_method.items() if any(r.forgetting for r in rs)}
    if not have:
        return None
    names = max((r.steps[-1].get("class_names") or [] for rs in have.values() for r in rs), key=len)
    n = max(len(r.forgetting) for rs in have.values() for r in rs)
    names = list(names) + [str(i) for i in range(len(names), n)]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n), 4), dpi=110)
    width = 0.8 / len(have)
    slot = {label: j for j, label in enumerate(have)}
    for label, rs in have.items():
        k = list(by_method).index(label)  # the colour it has in every figure
        vals = [np.nanmean([100 * (r.forgetting[c] if c < len(r.forgetting) and r.forgetting[c] is not None
                                   else np.nan) for r in rs]) for c in range(n)]
        ax.bar(np.arange(n) + slot[label] * width, vals, width=width, label=label, color=_style(k)["color"])
    ax.set_xticks(np.arange(n) + 0.4 - width / 2)
    ax.set_xticklabels(names[:n], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("forgetting (IoU points)")
    ax.set_title(group, fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_predictions(group: str, by_method: dict[str, list[RunRecord]], path: Path,
                     num_images: int = 2, methods: Optional[Sequence[str]] = None) -> Optional[Path]:
    """The same test images predicted after every step by each method (or those in `methods`),
    beside the ground truth, with a colour legend of class names (GSC Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ciss.config import from_dict
    from ciss.data import build_dataset
    from ciss.predict import Predictor, palette

    first = next(iter(by_method.values()))[0]
    d = from_dict(RunDir(first.path, create=False).read_config()).data
    if d.test_split in (None, "none"):
        return None
    test = build_dataset(d.dataset, split=d.test_split, root=d.test_root or d.root, **d.options)
    picks = list(range(min(num_images, len(test))))
    # Runs kept as records only (results without checkpoints) cannot predict: they are left out.
    rows = [(label, rs[0]) for label, rs in by_method.items()
            if (methods is None or rs[0].method in methods)
            and any((Path(rs[0].path) / "ckpt").glob("step-*.pt"))]
    if not rows:
        return None
    n_steps = max(len(r.steps) for _, r in rows)
    pal = palette() / 255.0
    fig, axes = plt.subplots(len(picks) * len(rows), n_steps + 2, squeeze=False,
                             figsize=(1.6 * (n_steps + 2), 1.4 * len(picks) * len(rows)), dpi=100)
    seen: set[int] = set()
    names: list[str] = []
    for k, i in enumerate(picks):
        image, truth = test[i]
        for j, (label, run) in enumerate(rows):
            ax_row = axes[k * len(rows) + j]
            ax_row[0].imshow(image)
            ax_row[0].set_ylabel(label, fontsize=6)
            gt = truth.copy()
            ax_row[1].imshow(pal[gt])
            seen.update(int(c) for c in np.unique(gt) if c != 255)
            for t in range(n_steps):
                if t >= len(run.steps):  # a run with fewer steps (Joint): no empty frame
                    ax_row[t + 2].axis("off")
                    continue
                pred = Predictor(run.path, step=run.steps[t]["step"])
                names = max(names, pred.class_names, key=len)
                lab = pred.predict(image)
                seen.update(int(c) for c in np.unique(lab))
                ax_row[t + 2].imshow(pal[lab])
            for ax in ax_row:
                ax.set_xticks([])
                ax.set_yticks([])
    for t, title in enumerate(["image", "ground truth"] + [f"step {t}" for t in range(n_steps)]):
        axes[0][t].set_title(title, fontsize=7)
    handles = [Patch(color=pal[c], label=names[c] if c < len(names) else str(c)) for c in sorted(seen)]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=6)
    fig.suptitle(group, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return _save_png(fig, path)


def plot_sweeps(group: str, by_method: dict[str, list[RunRecord]], path: Path) -> Optional[Path]:
    """Calibration trade-off curves after the last step of the runs evaluated with
    `ciss eval --calibration sweep` (their posthoc.jsonl)."""
    from ciss.plots import plot_tradeoff

    curves = []
    for label, rs in by_method.items():
        posthoc = rs[0].path / "posthoc.jsonl"
        if not posthoc.is_file():
            continue
        rows = RunDir(rs[0].path, create=False).read_jsonl("posthoc.jsonl")
        swept = [r for r in rows if "sweep" in r]
        if swept:
            last = max(swept, key=lambda r: r["step"])
            curves.append((f"{label} step {last['step']}", last["sweep"]))
    return _compact_png(plot_tradeoff(curves, path, title=f"{group}: calibration trade-off")) if curves else None


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, images: int = 2,
                 predict_methods: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """report.md, per group PNGs of mIoU per step, forgetting and predictions of `images` test
    images (0: none) by every method or those of `predict_methods`, and report.html (figures inlined)."""
    runs = [load_run(p) for p in run_dirs]
    if predict_methods is not None:
        unknown = sorted(set(predict_methods) - {r.method for r in runs})
        if unknown:
            raise ValueError(f"no run of method(s) {', '.join(unknown)} among the runs given; their "
                             f"methods are {', '.join(sorted({r.method for r in runs}))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[str]] = {}
    for group, by_method in groups(runs).items():
        made = [plot_steps(group, by_method, out / f"{_slug(group)}_steps.png"),
                plot_forgetting(group, by_method, out / f"{_slug(group)}_forgetting.png")]
        if images > 0:
            made.append(plot_predictions(group, by_method, out / f"{_slug(group)}_predictions.png",
                                         images, predict_methods))
        made.append(plot_sweeps(group, by_method, out / f"{_slug(group)}_calibration.png"))
        figures[group] = [p.name for p in made if p is not None]
    text = markdown(runs, figures)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(to_html(text, out))
    return {"markdown": out / "report.md", "html": out / "report.html", "runs": len(runs),
            "groups": len(figures)}
