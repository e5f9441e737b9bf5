"""Post-hoc calibration and the NCM probe on finished ccp21 runs (see benchmarks/ccp21_table.py).

For each method's run directory it runs (or reuses) `ciss eval RUN --calibration A,B[,sweep]
[--probe ncm]` (A,B: `--pair`, default alg,pcv), then writes one Markdown page: raw vs A vs B after
every step, the sweep's AUSUC and trade-off plot, and the probe beside the trained classifier.
benchmarks/results/ccp21_15-1_calibration.md was made with the pair now named alg_all,pcv_fit.

    python benchmarks/ccp21_calibration.py --runs ~/ciss-runs/ccp21 --methods ft mib plop ssul \
        --sweep ft mib --probe ft mib --out benchmarks/results/ccp21_15-1_calibration.md
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ciss.calibration import area_under  # noqa: E402


def pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def three(r: dict) -> str:
    return f"{pct(r['miou_old'])} | {pct(r['miou_new'])} | {pct(r['miou_all'])}"


def recovered(cal: float, raw: float, oracle: Optional[float]) -> Optional[float]:
    """(calibrated - raw) / (oracle - raw): the share of the best single gamma's gain a fit takes;
    None without an oracle or when the oracle gains nothing."""
    if oracle is None or oracle - raw <= 1e-9:
        return None
    return (cal - raw) / (oracle - raw)


def oracle_all(r: dict) -> Optional[float]:
    """The sweep's best all-class mIoU (%) of a posthoc row; None without a sweep."""
    if "sweep" not in r:
        return None
    return 100 * max(v for v in r["sweep"]["miou_all"] if v is not None and not math.isnan(v))


def every_calibrator(rows: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: per method and step, raw, every stored calibrator's all-class mIoU (its gamma,
    the share of the oracle's gain it recovers) and the oracle (the sweep's best)."""
    names = list(dict.fromkeys(n for rs in rows.values() for r in rs for n in r.get("calibrated", {})))
    lines = ["| method | step | raw | " + " | ".join(f"`{n}` (gamma, recovered)" for n in names) + " | oracle |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for m, rs in rows.items():
        for r in rs:
            if not r.get("calibrated"):
                continue
            raw = 100 * r["miou_all"]
            oracle = oracle_all(r)
            cells = []
            for n in names:
                c = r["calibrated"].get(n)
                if c is None:
                    cells.append("-")
                    continue
                rec = recovered(100 * c["miou_all"], raw, oracle)
                cells.append(f"{100 * c['miou_all']:.2f} ({c['gamma']:.3g}"
                             + (f", {100 * rec:.0f}%)" if rec is not None else ")"))
            lines.append(f"| {m} | {r['step']} | {raw:.2f} | " + " | ".join(cells)
                         + f" | {'-' if oracle is None else f'{oracle:.2f}'} |")
    return lines


def last_step_figures(rows: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per method, all-class mIoU (%) after the last step: raw, every calibrator's, the sweep's best."""
    out = {}
    for m, rs in rows.items():
        r = rs[-1]
        fig = {"step": r["step"], "raw_all": 100 * r["miou_all"]}
        fig.update({f"{name}_all": 100 * c["miou_all"] for name, c in r.get("calibrated", {}).items()})
        fig.update({f"{name}_gamma": c["gamma"] for name, c in r.get("calibrated", {}).items()})
        if "sweep" in r:
            fig["oracle_all"] = oracle_all(r)
        out[m] = {k: round(v, 4) for k, v in fig.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--task", default="15-1")
    ap.add_argument("--setting", default="overlapped")
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--sweep", nargs="*", default=[], help="methods that also get the gamma sweep")
    ap.add_argument("--probe", nargs="*", default=[], help="methods that also get the NCM probe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pair", default="alg,pcv",
                    help="the two calibrators tabulated, comma-separated (ccp21_15-1_calibration.md: alg_all,pcv_fit)")
    ap.add_argument("--notes", help="Markdown file appended to the page (findings written by hand)")
    ap.add_argument("--json", help="also write, per method, raw_all, oracle_all (with the sweep) and <calibrator>_all "
                                   "after the last step, in percent (benchmarks/results/ccp21_calibration.json)")
    args = ap.parse_args()
    pair = [n.strip() for n in args.pair.split(",") if n.strip()]
    if len(pair) != 2:
        ap.error(f"--pair needs two calibrators, comma-separated (got '{args.pair}')")
    first, second = pair
    A, B = first.upper(), second.upper()
    runs = Path(args.runs).expanduser()
    out = Path(args.out)
    fig_dir = out.parent / (out.stem + "_figures")
    fig_dir.mkdir(parents=True, exist_ok=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    rows: dict[str, list[dict]] = {}
    commands, times, recipes = {}, {}, set()
    for m in args.methods:
        run = runs / f"ccp21-{args.task}-{args.setting}-{m}"
        if not (run / "summary.json").is_file():
            print(f"skip {m}: {run} has not finished", file=sys.stderr)
            continue
        cal = f"{first},{second}" + (",sweep" if m in args.sweep else "")
        cmd = [sys.executable, "-m", "ciss.cli", "eval", str(run), "--calibration", cal]
        if m in args.probe:
            cmd += ["--probe", "ncm"]
        commands[m] = "ciss eval " + " ".join(cmd[4:])
        posthoc = run / "posthoc.jsonl"
        have = [json.loads(l) for l in posthoc.read_text().splitlines()] if posthoc.is_file() else []
        wanted_ok = lambda r: ("calibrated" not in r and r["step"] == 0) or (  # noqa: E731
            set(r.get("calibrated", {})) >= {first, second}
            and ("sweep" in r or m not in args.sweep or r["step"] == 0)
            and ("ncm" in r or m not in args.probe))
        last = {r["step"]: r for r in have}
        if not last or not all(wanted_ok(r) for r in last.values()):
            t0 = time.time()
            print("$", commands[m], flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            times[m] = time.time() - t0
            have = [json.loads(l) for l in posthoc.read_text().splitlines()]
            last = {r["step"]: r for r in have}
        rows[m] = [last[t] for t in sorted(last)]
        recipes.add(str(yaml.safe_load((run / "config.yaml").read_text()).get("recipe")))
        for r in rows[m]:  # the area from the stored curve, with the current definition
            if "sweep" in r:
                sw = r["sweep"]
                arr = lambda v: np.array([np.nan if a is None else a for a in v], dtype=float)  # noqa: E731
                sw["ausuc"] = area_under(arr(sw["miou_s"]), arr(sw["miou_u"]))

    if not rows:
        sys.exit(f"no finished run of {', '.join(args.methods)} under {runs} "
                 f"(ccp21-{args.task}-{args.setting}-<method>/summary.json); train them first")
    lines = [f"# ccp21 {args.task} {args.setting}: post-hoc calibration and the NCM probe", "",
             f"Runs of `benchmarks/ccp21_table.py` (recipe {', '.join(sorted(recipes))}) evaluated by `ciss eval` (rows of each run's `posthoc.jsonl`), tabulated at git `{sha[:10]}`; AUSUC is computed here from the stored curves. "
             "mIoU in %, old | new | all in the papers' layout (old = step-0 classes with background). "
             "gamma is added to the logits of the classes absent from the step's data (every class "
             f"learned before the step, background excluded); {A} and {B} (`{first}`, `{second}`) fit it "
             "on the step's own training images only (docs/calibration.md).", ""]
    lines += ["## After the last step", "",
              f"| method | raw old | new | all | +{A} old | new | all | gamma | +{B} old | new | all | gamma |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, rs in rows.items():
        r = rs[-1]
        a, p = r["calibrated"][first], r["calibrated"][second]
        lines.append(f"| {m} | {three(r)} | {three(a)} | {a['gamma']:.3g} | {three(p)} | {p['gamma']:.3g} |")
    lines += ["", "## Every step (all classes, mIoU %)", "",
              "| method | " + " | ".join(f"step {r['step']} raw / {A} / {B}" for r in next(iter(rows.values()))) + " |",
              "|---|" + "---|" * len(next(iter(rows.values())))]
    for m, rs in rows.items():
        cells = []
        for r in rs:
            c = r.get("calibrated")
            cells.append(pct(r["miou_all"]) if not c else
                         f"{pct(r['miou_all'])} / {pct(c[first]['miou_all'])} / {pct(c[second]['miou_all'])}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")

    lines += ["", "## Every stored calibrator, every step (all classes, mIoU %)", "",
              "Recovered = (calibrated - raw) / (oracle - raw), with the oracle the sweep's best gamma on "
              "the test images (reported, never used to choose).", ""] + every_calibrator(rows)

    swept = {m: rs for m, rs in rows.items() if any("sweep" in r for r in rs)}
    if swept:
        from ciss.plots import plot_tradeoff

        lines += ["", "## Gamma sweep (oracle: gamma chosen on the test images)", "",
                  "AUSUC = area under the curve of mIoU(absent classes) against mIoU(background + the "
                  "step's classes), in %; best all = the best mIoU of all classes over the sweep "
                  "(an upper bound for any gamma).", "",
                  "| method | step | AUSUC | raw all | best all (gamma) |", "|---|---|---|---|---|"]
        curves, figures = [], []
        for m, rs in swept.items():
            for r in rs:
                if "sweep" not in r:
                    continue
                s = r["sweep"]
                allv = [(v if v is not None else float("nan")) for v in s["miou_all"]]
                k = max(range(len(allv)), key=lambda i: -1 if math.isnan(allv[i]) else allv[i])
                lines.append(f"| {m} | {r['step']} | {pct(s['ausuc'])} | {pct(r['miou_all'])} | "
                             f"{pct(allv[k])} ({s['gamma'][k]:.3g}) |")
            curves.append((f"{m} step {rs[-1]['step']}", rs[-1]["sweep"]))
            every = plot_tradeoff([(f"step {r['step']}", r["sweep"]) for r in rs if "sweep" in r],
                                  fig_dir / f"{m}_sweep_all_steps.png",
                                  title=f"{m}, ccp21 {args.task} {args.setting}: gamma sweep")
            figures.append(f"![{m} sweep]({fig_dir.name}/{every.name})")
        png = plot_tradeoff(curves, fig_dir / "sweep_last_step.png",
                            title=f"ccp21 {args.task} {args.setting}: gamma sweep after the last step")
        for fig in figures + [f"![sweep]({fig_dir.name}/{png.name})"]:
            lines += ["", fig]

    probed = {m: rs for m, rs in rows.items() if any("ncm" in r for r in rs)}
    if probed:
        lines += ["", "## NCM probe (prototypes from each class's own step) vs the trained classifier", "",
                  "| method | step | classifier old | new | all | NCM old | new | all |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, rs in probed.items():
            for r in rs:
                if "ncm" in r:
                    lines.append(f"| {m} | {r['step']} | {three(r)} | {three(r['ncm'])} |")

    lines += ["", "## Commands", ""] + [f"    {c}" for c in commands.values()]
    if times:
        lines += ["", "Evaluation wall time (2 cores, shared with training runs): " +
                  ", ".join(f"{m} {t:.0f} s" for m, t in times.items())]
    if args.notes:
        lines += ["", Path(args.notes).read_text()]
    if args.json:
        Path(args.json).write_text(json.dumps(last_step_figures(rows), indent=1, sort_keys=True) + "\n")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
