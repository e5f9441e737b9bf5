"""Figures and tables of the learning curves kept by benchmarks/ccp21_curves.sh.

    python benchmarks/ccp21_curves_plot.py   # writes ccp21_curves.png and ccp21_curves_ft.png, prints both tables

Reads every run record under benchmarks/results/ccp21_curves/ (all evaluated on train:holdout):
- Joint: all-class mIoU against step-0 epochs, per lr, image size, skip stride (`skip`, 0: DeepLabV3's
  head alone) and the other model or data settings a point changed (`other`);
- FT (the class-incremental runs): the IoU of each step's new class right after its step, against
  epochs_next and lr_next, and the last step's class after the last step as a fraction of its IoU
  under Joint with the same step-0 settings.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import yaml

from ciss.metrics import class_errors

HERE = Path(__file__).resolve().parent / "results"
DEFAULTS = {("model", "head_channels"): 128, ("data", "scale"): [0.5, 2.0]}  # the cpu recipe's


def _other(cfg: dict) -> str:
    """The settings a point changed from the recipe beyond lr, epochs, size and skip."""
    out = []
    for (section, key), default in DEFAULTS.items():
        value = cfg.get(section, {}).get(key, default)
        if value != default:
            out.append(f"{key} {value}")
    return ", ".join(out)


def points() -> list[dict]:
    out = []
    for run in sorted((HERE / "ccp21_curves").iterdir()):
        if not (run / "summary.json").is_file():
            continue
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        summary = json.loads((run / "summary.json").read_text())
        step = summary["steps"][-1]
        rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
        out.append({"run": run.name, "method": cfg["method"], "lr": cfg["optim"]["lr"],
                    "epochs": cfg["optim"]["epochs"], "size": f"{cfg['data']['resize']}/{cfg['data']['crop_size']}",
                    "skip": int(cfg["model"].get("skip_stride", 0)), "other": _other(cfg),
                    "epochs_next": cfg["optim"].get("epochs_next") or cfg["optim"]["epochs"],
                    "lr_next": cfg["optim"]["lr_next"], "all": 100 * step["miou_all"], "iou": step["iou"],
                    "names": step["class_names"], "rows": rows, "minutes": summary.get("run_wall_time_s", summary["wall_time_s"]) / 60})
    return out


def base_key(p: dict) -> tuple:
    return (p["lr"], p["epochs"], p["size"], p["skip"], p["other"])


def joint_table(pts: list[dict]) -> None:
    print("| run | lr | epochs | resize/crop | skip | other | all-class mIoU | classes at 0 IoU | minutes |")
    print("|---|---:|---:|---|---:|---|---:|---:|---:|")
    for p in pts:
        zeros = [n for n, v in zip(p["names"], p["iou"]) if v is not None and v < 0.005]
        print(f"| {p['run']} | {p['lr']:g} | {p['epochs']} | {p['size']} | {p['skip']} | {p['other'] or '-'} | "
              f"{p['all']:.2f} | {len(zeros)} ({', '.join(zeros)}) | {p['minutes']:.0f} |")


def new_class_ious(p: dict) -> list[tuple[str, float]]:
    """(class, IoU %) of each incremental step's new classes right after that step."""
    out = []
    for prev, r in zip(p["rows"], p["rows"][1:]):
        out += [(r["class_names"][c], 100 * (r["iou"][c] or 0.0)) for c in range(len(prev["iou"]), len(r["iou"]))]
    return out


def new_class_errors(p: dict) -> str:
    """Recall / precision (%) of each incremental step's new classes right after that step, from the
    confusion matrices the records hold (runs evaluated before they were recorded: '-')."""
    out = []
    for prev, r in zip(p["rows"], p["rows"][1:]):
        if "confusion" not in r:
            return "-"
        errs = class_errors(r["confusion"], r["class_names"])
        out += [f"{e['class']} {100 * e['recall']:.0f} / {100 * e['precision']:.0f}" if e["predicted"]
                else f"{e['class']} {100 * e['recall']:.0f} / -" for e in errs[len(prev["iou"]):]]
    return ", ".join(out)


def ft_table(pts: list[dict], joints: list[dict]) -> None:
    print("| run | step 0 (lr, epochs, size, skip) | lr_next | epochs_next | new class right after its step "
          "(mean; per step) | its recall / precision | last class after the last step: this run / Joint | "
          "all-class mIoU | minutes |")
    print("|---|---|---:|---:|---|---|---|---:|---:|")
    for p in pts:
        news = new_class_ious(p)
        last_name = p["names"][-1]
        ft_last = 100 * (p["iou"][-1] or 0.0)
        joint: Optional[dict] = next((j for j in joints if base_key(j) == base_key(p)), None)
        ratio = "-"
        if joint is not None:
            j_last = 100 * (joint["iou"][joint["names"].index(last_name)] or 0.0)
            ratio = f"{last_name} {ft_last:.1f} / {j_last:.1f} = {ft_last / j_last:.2f}" if j_last else "-"
        mean = sum(v for _, v in news) / len(news) if news else float("nan")
        per = ", ".join(f"{n} {v:.1f}" for n, v in news)
        print(f"| {p['run']} | {p['lr']:g}, {p['epochs']}, {p['size']}, {p['skip']} | {p['lr_next']:g} | "
              f"{p['epochs_next']} | {mean:.1f}; {per} | {new_class_errors(p)} | {ratio} | {p['all']:.2f} | {p['minutes']:.0f} |")


def _save(fig, ax, xlabel: str, ylabel: str, title: str, name: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / name)
    print(f"\nwrote {HERE / name}\n")


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points()
    joints = [p for p in pts if p["method"] == "joint"]
    incremental = [p for p in pts if p["method"] != "joint"]
    joint_table(joints)
    lines = defaultdict(list)
    for p in joints:
        lines[(p["lr"], p["size"], p["skip"], p["other"])].append((p["epochs"], p["all"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for (lr, size, skip, other), xy in sorted(lines.items()):
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o",
                label=f"lr {lr:g}, resize/crop {size}" + (f", skip stride {skip}" if skip else "")
                + (f", {other}" if other else ""))
    _save(fig, ax, "step-0 epochs", "all-class mIoU on train:holdout (%)",
          "Joint, ccp21 (21 classes), changes to cpu-short", "ccp21_curves.png")
    if not incremental:
        return
    ft_table(incremental, joints)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    by_lr = defaultdict(list)
    for p in incremental:
        news = new_class_ious(p)
        by_lr[(p["method"], p["lr_next"])].append((p["epochs_next"], sum(v for _, v in news) / max(1, len(news))))
    for (method, lr_next), xy in sorted(by_lr.items()):
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=f"{method}, lr_next {lr_next:g}")
    _save(fig, ax, "epochs_next", "new class IoU right after its step (%, mean of 5 steps)",
          "ccp21 15-1 overlapped, train:holdout", "ccp21_curves_ft.png")


if __name__ == "__main__":
    main()
