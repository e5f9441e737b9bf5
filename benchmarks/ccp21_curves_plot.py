"""Figure and table of the Joint learning curves kept by benchmarks/ccp21_curves.sh.

    python benchmarks/ccp21_curves_plot.py        # writes benchmarks/results/ccp21_curves.png, prints a table

Reads every run record under benchmarks/results/ccp21_curves/: its lr, epochs, image size and the
all-class mIoU and per-class IoU on train:holdout; `skip` is the model's skip_stride (0: DeepLabV3's head
alone).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent / "results"


def points() -> list[dict]:
    out = []
    for run in sorted((HERE / "ccp21_curves").iterdir()):
        if not (run / "summary.json").is_file():
            continue
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        step = json.loads((run / "summary.json").read_text())["steps"][-1]
        out.append({"run": run.name, "lr": cfg["optim"]["lr"], "epochs": cfg["optim"]["epochs"],
                    "size": f"{cfg['data']['resize']}/{cfg['data']['crop_size']}",
                    "skip": int(cfg["model"].get("skip_stride", 0)),
                    "all": 100 * step["miou_all"], "iou": step["iou"], "names": step["class_names"],
                    "minutes": json.loads((run / "summary.json").read_text())["run_wall_time_s"] / 60})
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points()
    print("| run | lr | epochs | resize/crop | skip | all-class mIoU | classes at 0 IoU | minutes |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for p in pts:
        zeros = [n for n, v in zip(p["names"], p["iou"]) if v is not None and v < 0.005]
        print(f"| {p['run']} | {p['lr']:g} | {p['epochs']} | {p['size']} | {p['skip']} | {p['all']:.2f} | "
              f"{len(zeros)} ({', '.join(zeros)}) | {p['minutes']:.0f} |")
    lines = defaultdict(list)
    for p in pts:
        lines[(p["lr"], p["size"], p["skip"])].append((p["epochs"], p["all"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for (lr, size, skip), xy in sorted(lines.items()):
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o",
                label=f"lr {lr:g}, resize/crop {size}" + (f", skip stride {skip}" if skip else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("step-0 epochs")
    ax.set_ylabel("all-class mIoU on train:holdout (%)")
    ax.set_title("Joint, ccp21 (21 classes), cpu recipe", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "ccp21_curves.png")
    print(f"\nwrote {HERE / 'ccp21_curves.png'}")


if __name__ == "__main__":
    main()
