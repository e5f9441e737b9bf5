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
    # the steps' rows were printed as they were evaluated; table.txt holds them under a title
    print(f"run directory: {res.run_dir}  ({res.wall_time_s:.0f} s, peak RSS {res.peak_rss_mb:.0f} MB; "
          f"table in table.txt)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ciss.evaluation import evaluate_run

    print(evaluate_run(args.run_dir, step=args.step, device=args.device,
                       calibration=args.calibration, probe=args.probe, errors=args.errors))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ciss.predict import Predictor

    pred = Predictor(args.run_dir, step=args.step, device=args.device)
    written = pred.predict_files(args.images, args.out)
    print(f"wrote {len(written)} files to {args.out} (step {pred.step}, {pred.num_classes} classes)")
    return 0


def _report_model(mf, figures, out: str) -> None:
    print(f"wrote {out}: {len(mf.classes) - 1} classes ({', '.join(mf.classes[1:])}), "
          f"{len(mf.lineage)} step(s); run directory {out}.run")
    if figures is not None:
        print(f"validation after the last step: mIoU old {100 * figures['miou_old']:.2f} | "
              f"new {100 * figures['miou_new']:.2f} | all {100 * figures['miou_all']:.2f}")


def _fit(args: argparse.Namespace) -> int:
    from ciss.workflow import fit

    mf, figures = fit(args.data, args.out, method=args.method, recipe=args.recipe,
                      overrides=args.set, val=args.val)
    _report_model(mf, figures, args.out)
    return 0


def _extend(args: argparse.Namespace) -> int:
    from ciss.workflow import extend

    mf, figures = extend(args.model, args.data, args.out, method=args.method, recipe=args.recipe,
                         overrides=args.set, val=args.val)
    _report_model(mf, figures, args.out)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ciss.export import export_onnx

    out = args.out or str(Path(args.model).with_suffix(".onnx"))
    path = export_onnx(args.model, out)
    print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import yaml

    from ciss.bench import RunsFailed, run_grid
    from ciss.config import ConfigError

    sbatch = {}
    for item in args.sbatch:
        flag, _, value = item.partition("=")
        if not flag.strip():
            raise ConfigError(f"--sbatch expects FLAG=VALUE or FLAG (e.g. --sbatch qos=high), got '{item}'")
        sbatch[flag.strip()] = yaml.safe_load(value) if value else True
    slurm = {"partition": args.partition, "gpus_per_node": args.gpus_per_node, "time": args.time,
             "cpus_per_task": args.cpus_per_task, "account": args.account, "sbatch": sbatch}
    try:
        rows = run_grid(args.grid, out_dir=args.out_dir, jobs=args.jobs, status=args.status,
                        executor=args.executor, slurm=slurm, wait=args.wait, only=args.only)
        print(f"rows: {rows}")
    except RunsFailed as exc:
        print(f"ciss: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from ciss.report import write_report

    res = write_report(args.run_dirs, args.out, images=args.images,
                       predict_methods=args.predict_methods)
    print(f"{res['runs']} runs in {res['groups']} group(s): {res['markdown']}, {res['html']}")
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
    t.add_argument("--recipe", help="named preset applied first: paper | cpu | cpu-short | tiny")
    t.add_argument("--run-dir", help="run directory (default: out_dir/<dataset>-<task>-...)")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate the checkpoints of a run directory again")
    e.add_argument("run_dir")
    e.add_argument("--step", type=int, help="only this step (default: every step)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--calibration", metavar="NAMES",
                   help="post-hoc calibration, comma-separated: alg, alg_all, pcv, pcv_fit, share, agree (fitted on each step's own "
                        "training images, stored in its checkpoint), sweep (gamma trade-off curve)")
    e.add_argument("--errors", action="store_true",
                   help="after each step, every class's recall and precision, what its missed pixels were "
                        "predicted as and what its false positives truly are")
    e.add_argument("--probe", choices=["ncm"],
                   help="ncm: nearest-prototype classifier on the features, beside the trained one")
    e.set_defaults(fn=_eval)

    from ciss.workflow import DEFAULT_METHOD

    def workflow_options(q: argparse.ArgumentParser, data_help: str, method_help: str, val_help: str) -> None:
        q.add_argument("--data", required=True, help=data_help)
        q.add_argument("--out", required=True, help="model file to write (its run directory: OUT.run)")
        q.add_argument("--method", default=DEFAULT_METHOD, help=method_help)
        q.add_argument("--val", help=val_help)
        q.add_argument("--recipe", default="cpu", help="paper | cpu | cpu-short | tiny (default cpu)")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    f = sub.add_parser("fit", help="train a first model on a folder dataset (every class at once)")
    workflow_options(f, "folder dataset (classes.txt, images/, labels/, splits/)",
                     f"the method later extend calls will use (default {DEFAULT_METHOD})",
                     "folder dataset to evaluate on (split val if it has one, else train)")
    f.set_defaults(fn=_fit)

    x = sub.add_parser("extend", help="teach a model the classes of a new folder dataset")
    x.add_argument("model", help="ciss model file (or run directory)")
    workflow_options(x, "folder dataset whose classes.txt names the new classes (old ones by name)",
                     f"default {DEFAULT_METHOD}", "folder dataset to evaluate on, labelled with any of the classes")
    x.set_defaults(fn=_extend)

    ex = sub.add_parser("export", help="write an ONNX model from a model file")
    ex.add_argument("model", help="ciss model file (or run directory)")
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--out", help="default: MODEL with suffix .onnx")
    ex.set_defaults(fn=_export)

    pr = sub.add_parser("predict", help="write label PNGs and colour overlays")
    pr.add_argument("run_dir", metavar="model", help="ciss model file or run directory")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--out", required=True)
    pr.add_argument("--step", type=int, help="checkpoint of this step (default: the last)")
    pr.add_argument("--device", default="cpu")
    pr.set_defaults(fn=_predict)

    b = sub.add_parser("bench", help="run a grid of experiments (finished runs are skipped)")
    b.add_argument("grid", help="grid YAML: recipe, out_dir, set, axes (see ciss.bench)")
    b.add_argument("--out-dir", help="default: the grid's out_dir")
    b.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each a process with its share of the cores (default 1)")
    b.add_argument("--status", action="store_true",
                   help="record finished runs, list the ones still to run and their jobs; train nothing")
    b.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="only the runs whose names match this shell pattern, e.g. '*-plop*' (repeatable)")
    b.add_argument("--executor", choices=["slurm", "local"],
                   help="one job per point through submitit: slurm, or local (jobs on this machine)")
    b.add_argument("--wait", action="store_true", help="with --executor: wait for the jobs, record the runs")
    job = b.add_argument_group("job options (override the grid's slurm: section)")
    job.add_argument("--partition")
    job.add_argument("--gpus-per-node", type=int, help="training processes (DDP) per job, one per GPU")
    job.add_argument("--cpus-per-task", type=int, help="CPUs per process (also its torch threads)")
    job.add_argument("--time", help="time limit: minutes or [D-]HH:MM:SS")
    job.add_argument("--account")
    job.add_argument("--sbatch", action="append", default=[], metavar="FLAG=VALUE",
                     help="any other sbatch flag, e.g. --sbatch qos=high --sbatch constraint=a100")
    b.set_defaults(fn=_bench)

    rp = sub.add_parser("report", help="tables, figures and one HTML page from run directories")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", required=True, help="folder for report.md, report.html and the PNGs")
    rp.add_argument("--images", type=int, default=2,
                    help="test images predicted after every step by each method (default 2; 0: none)")
    rp.add_argument("--predict-methods", nargs="+", metavar="METHOD",
                    help="only these methods in the prediction figures (default: every method)")
    rp.set_defaults(fn=_report)

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
