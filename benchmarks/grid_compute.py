"""Compute spent by the runs under one or more output folders, per task, from the runs' own records.

    python benchmarks/grid_compute.py ~/ciss-runs/ccp21 ~/ciss-runs/ccp21-orders [--skip lr0.001]

Each run counts the wall time of the work it kept over all its invocations (RunDir.kept_wall_time);
a run that reused a shared step-0 checkpoint did not pay for step 0, the run that trained it did.
Finished runs (summary.json) and unfinished ones are counted apart.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ciss.results import RunDir


def group_of(run: RunDir) -> str:
    data = run.read_config().get("data") or {}
    order = data.get("order")
    key = f"{data.get('task')} {data.get('setting')}"
    return key if order in (None, "identity", "A") else f"{key} order {order}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--skip", nargs="*", default=[], help="leave out runs whose name contains one of these")
    args = ap.parse_args()
    table: dict[str, list[float]] = {}  # group -> [finished runs, their hours, unfinished, their hours]
    for folder in args.folders:
        if not folder.is_dir():
            raise SystemExit(f"{folder}: no such folder")
        for path in sorted(p for p in folder.iterdir() if (p / "config.yaml").is_file()):
            if any(s in path.name for s in args.skip):
                continue
            run = RunDir(path, create=False)
            hours = run.kept_wall_time() / 3600
            row = table.setdefault(group_of(run), [0, 0.0, 0, 0.0])
            i = 0 if (path / "summary.json").is_file() else 2
            row[i] += 1
            row[i + 1] += hours
    print("| task | finished runs | hours | unfinished runs | hours so far |")
    print("|---|---:|---:|---:|---:|")
    for group, (n, h, m, hm) in table.items():
        print(f"| {group} | {n} | {h:.1f} | {m} | {hm:.1f} |")
    n = sum(r[0] for r in table.values())
    m = sum(r[2] for r in table.values())
    total = sum(r[1] + r[3] for r in table.values())
    print(f"\n{n} finished and {m} unfinished run(s): {total:.1f} h of compute in all")


if __name__ == "__main__":
    main()
