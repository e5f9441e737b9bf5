"""Command line: parse and dispatch only."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence


def _train(args: argparse.Namespace) -> int:
    from ciss.config import load_config
    from ciss.engine import train

    cfg = load_config(args.config, args.set, recipe=args.recipe)
    res = train(cfg, Path(args.run_dir) if args.run_dir else None)
    print(res.table(f"{cfg.method} on {cfg.data.dataset} {cfg.data.task} {cfg.data.setting}"))
    print(f"run directory: {res.run_dir}  ({res.wall_time_s:.0f} s, peak RSS {res.peak_rss_mb:.0f} MB)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ciss.evaluation import evaluate_run

    print(evaluate_run(args.run_dir, step=args.step, device=args.device,
                       calibration=args.calibration, probe=args.probe))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ciss.predict import Predictor

    pred = Predictor(args.run_dir, step=args.step, device=args.device)
    written = pred.predict_files(args.images, args.out)
    print(f"wrote {len(written)} files to {args.out} (step {pred.step}, {pred.num_classes} classes)")
    return 0


def _list(args: argparse.Namespace) -> int:
    what = args.what
    if what == "datasets":
        from ciss.data import list_datasets as fn
    elif what == "methods":
        from ciss.methods import list_methods as fn
    elif what == "backbones":
        from ciss.models import list_backbones as fn
    else:
        from ciss.scenario import list_tasks as fn
    print("\n".join(fn()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ciss.demo import run_demo

    run_demo(out_dir=args.out_dir, methods=args.methods)
    return 0


def _splits(args: argparse.Namespace) -> int:
    from ciss.splits import run_splits

    options = {}
    for item in args.option or []:
        key, _, value = item.partition("=")
        options[key] = value
    print(run_splits(args.dataset, args.root, args.task, args.setting, args.order,
                     Path(args.out), **options))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciss", description="Class-incremental semantic segmentation.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run every step of an incremental experiment")
    t.add_argument("config", nargs="?", help="YAML config (optional)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set method=ft --set optim.epochs=2")
    t.add_argument("--recipe", help="named preset applied first: paper | cpu | tiny")
    t.add_argument("--run-dir", help="run directory (default: out_dir/<dataset>-<task>-...)")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate the checkpoints of a run directory again")
    e.add_argument("run_dir")
    e.add_argument("--step", type=int, help="only this step (default: every step)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--calibration", metavar="NAMES",
                   help="post-hoc calibration, comma-separated: alg, pcv (fitted on each step's own "
                        "training images, stored in its checkpoint), sweep (gamma trade-off curve)")
    e.add_argument("--probe", choices=["ncm"],
                   help="ncm: nearest-prototype classifier on the features, beside the trained one")
    e.set_defaults(fn=_eval)

    pr = sub.add_parser("predict", help="write label PNGs and colour overlays")
    pr.add_argument("run_dir")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--out", required=True)
    pr.add_argument("--step", type=int, help="checkpoint of this step (default: the last)")
    pr.add_argument("--device", default="cpu")
    pr.set_defaults(fn=_predict)

    ls = sub.add_parser("list", help="list datasets, tasks, methods or backbones")
    ls.add_argument("what", choices=["datasets", "tasks", "methods", "backbones"])
    ls.set_defaults(fn=_list)

    d = sub.add_parser("demo", help="synthetic data, every method, a few minutes on a CPU")
    d.add_argument("--out-dir", default="runs/demo")
    d.add_argument("--methods", nargs="*", help="default: every registered method")
    d.set_defaults(fn=_demo)

    s = sub.add_parser("splits", help="print and write the images of every step")
    s.add_argument("--dataset", required=True)
    s.add_argument("--root")
    s.add_argument("--task", required=True)
    s.add_argument("--setting", default="overlapped")
    s.add_argument("--order")
    s.add_argument("--out", required=True)
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="dataset option, e.g. --option size=64")
    s.set_defaults(fn=_splits)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    # OpenMP threads that spin while waiting collapse throughput (10x seen) when another process
    # shares the cores; passive waiting costs little when they do not. Must precede torch's import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from ciss.config import ConfigError
    from ciss.data.errors import DataError

    try:
        return args.fn(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("CISS_DEBUG"):
            raise
        print(f"ciss: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("ciss: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
