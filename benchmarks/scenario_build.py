"""Time building the VOC 15-1 overlapped scenario on the 10,582 train_aug labels: cold (empty cache
dir: one pass over every mask) and cached (no mask read).

    .venv/bin/python benchmarks/scenario_build.py [--root ../shared/conformance/voc] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from ciss.data import build_dataset
from ciss.scenario import build_scenario

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "voc"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="VOC root (labels suffice)")
    ap.add_argument("--task", default="15-1")
    ap.add_argument("--setting", default="overlapped")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes for the cold pass (default: CPU count, at most 8)")
    args = ap.parse_args()
    if args.workers is not None:
        os.environ["CISS_WORKERS"] = str(args.workers)

    cache = Path(tempfile.mkdtemp(prefix="ciss-bench-"))
    try:
        t0 = time.perf_counter()
        train = build_dataset("voc", "train", args.root)
        t_open = time.perf_counter() - t0

        t0 = time.perf_counter()
        sc = build_scenario(train, args.task, args.setting, cache_dir=cache, progress=False)
        t_cold = time.perf_counter() - t0

        t0 = time.perf_counter()
        build_scenario(train, args.task, args.setting, cache_dir=cache, progress=False)
        t_cached = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    sizes = [len(sc.train_indices(t)) for t in range(sc.num_steps)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"workers={os.environ.get('CISS_WORKERS', 'default')}")
    print(f"dataset: voc train ({len(train):,} label PNGs), task {args.task} {args.setting}, "
          f"images per step {sizes}")
    print(f"open dataset (read list, check files): {t_open:8.3f} s")
    print(f"build, cold (empty cache dir):         {t_cold:8.3f} s  "
          f"({t_cold / len(train) * 1e3:.2f} ms per mask)")
    print(f"build, cached (no mask read):          {t_cached:8.3f} s")


if __name__ == "__main__":
    main()
