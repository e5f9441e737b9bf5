"""Run methods on ccp21 (real images, 21 classes) and write a results page.

Each run is its own `ciss train` process (so wall time and peak memory are per run); finished runs
are reused, interrupted ones resume. Output: a Markdown page with the old | new | all table after the
last step (the GSC paper's Table I layout), the per-step mIoU, wall time, peak RSS, commands, git SHA.

    python benchmarks/ccp21_table.py --methods ft joint --settings overlapped --task 15-1 \
        --out benchmarks/results/ccp21_15-1_ft_joint.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "ccp21"


def command(method: str, task: str, setting: str, runs: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "ciss.cli", "train", "--recipe", "cpu",
        "--set", "data.dataset=folder", "--set", f"data.root={DATA}",
        "--set", f"data.task={task}", "--set", f"data.setting={setting}",
        "--set", f"method={method}", "--set", f"out_dir={runs}",
        "--set", f"name=ccp21-{task}-{setting}-{method}",
        *[a for kv in extra for a in ("--set", kv)],
    ]


def pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--settings", nargs="+", default=["overlapped"])
    ap.add_argument("--task", default="15-1")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "ccp21"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"ccp21 not found at {DATA}; this benchmark needs the shared data folder", file=sys.stderr)
        return 2
    runs = Path(args.runs)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    sections = []
    for setting in args.settings:
        rows = []
        for method in args.methods:
            cmd = command(method, args.task, setting, runs, args.set)
            run_dir = runs / f"ccp21-{args.task}-{setting}-{method}"
            print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT)
            summary = json.loads((run_dir / "summary.json").read_text())
            summary["wall_total_s"] = time.time() - t0
            rows.append((method, cmd, summary))
        sections.append((setting, rows))

    lines = [f"# ccp21 `{args.task}`: {', '.join(args.methods)}", "",
             f"git SHA `{sha}`; `cpu` recipe; 2-core CPU machine; mIoU in %.", ""]
    for setting, rows in sections:
        steps = rows[0][2]["steps"]
        last = steps[-1] if len(steps) > 1 else None
        n_base = rows[0][2]["steps"][0]["num_base"]
        n_all = max(len(r[2]["steps"][-1]["iou"]) for r in rows)
        lines += [f"## {setting}", "",
                  f"After the last step: old = classes 0-{n_base - 1} (background included), "
                  f"new = {n_base}-{n_all - 1}.", "",
                  "| method | old | new | all | wall time (s) | peak RSS (MB) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for method, _, s in rows:
            f = s["steps"][-1]
            lines.append(f"| {method} | {pct(f['miou_old'])} | {pct(f['miou_new'])} | {pct(f['miou_all'])} "
                         f"| {s['wall_time_s']:.0f} | {s['peak_rss_mb']:.0f} |")
        del last
        lines += ["", "mIoU (all seen classes) after each step:", ""]
        max_steps = max(len(s["steps"]) for _, _, s in rows)
        lines.append("| method | " + " | ".join(f"step {t}" for t in range(max_steps)) + " |")
        lines.append("|---|" + "---:|" * max_steps)
        for method, _, s in rows:
            vals = [pct(st["miou_all"]) for st in s["steps"]] + [""] * (max_steps - len(s["steps"]))
            lines.append(f"| {method} | " + " | ".join(vals) + " |")
        lines += ["", "Per-class IoU after the last step:", ""]
        names = max((s["steps"][-1].get("class_names") or [] for _, _, s in rows), key=len)
        lines.append("| method | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(names))
        for method, _, s in rows:
            iou = s["steps"][-1]["iou"]
            lines.append(f"| {method} | " + " | ".join(pct(v) for v in iou) + " |")
        lines += ["", "Commands:", "", "```"]
        lines += [" ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")
                  .replace(str(DATA), "../shared/datasets/ccp21").replace(str(ROOT) + "/", "")
                  for _, cmd, _ in rows]
        lines += ["```", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
