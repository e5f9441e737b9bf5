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
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from ciss.results import RunDir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "ccp21"


def command(method: str, task: str, setting: str, runs: Path, extra: list[str],
            recipe: str = "cpu") -> list[str]:
    return [
        sys.executable, "-m", "ciss.cli", "train", "--recipe", recipe,
        "--set", "data.dataset=folder", "--set", f"data.root={DATA}",
        "--set", f"data.task={task}", "--set", f"data.setting={setting}",
        "--set", f"method={method}", "--set", f"out_dir={runs}",
        "--set", f"name=ccp21-{task}-{setting}-{method}",
        *[a for kv in extra for a in ("--set", kv)],
    ]


def recorded_command(run_dir: Path) -> Optional[list[str]]:
    """The command a run was started with (meta.json's argv: `ciss train ...`, or `ciss bench GRID
    --only NAME` for a grid's variant or seed), with the data folder as it sits beside the repo and
    an absolute output folder as runs/<its name>. None without a record of it."""
    meta = run_dir / "meta.json"
    argv = json.loads(meta.read_text()).get("argv") if meta.is_file() else None
    if not argv:
        return None
    out = ["ciss"]  # argv[0]: the `ciss` script, or ciss/cli.py under `python -m ciss.cli`
    for a in argv[1:]:
        a = a.replace(str(DATA), "../shared/datasets/ccp21")
        if a.startswith("out_dir=/"):
            a = f"out_dir=runs/{Path(a[len('out_dir='):]).name}"
        out.append(a)
    return out


# posthoc.jsonl (`ciss eval --calibration`) is kept too: benchmarks/ccp21_calibration.py reuses its rows.
RECORD_FILES = ("config.yaml", "meta.json", "summary.json", "results.jsonl", "losses.jsonl", "table.txt",
                "posthoc.jsonl")


def keep(runs: Path, records: Path, names: list[str]) -> None:
    """Copy the small files of finished runs (no checkpoints) into `records`/<run name>/."""
    for name in names:
        if (runs / name).resolve() == (records / name).resolve():
            continue
        (records / name).mkdir(parents=True, exist_ok=True)
        for f in RECORD_FILES:
            src, dst = runs / name / f, records / name / f
            if not src.is_file():
                continue
            if f == "posthoc.jsonl":  # each evaluation appends its rows: keep the last one of each step
                last = {json.loads(line)["step"]: line for line in src.read_text().splitlines() if line.strip()}
                dst.write_text("".join(last[t] + "\n" for t in sorted(last)))
            else:
                dst.write_bytes(src.read_bytes())


def label(method: str, memory: set[str]) -> str:
    """Results that replay old images say so wherever they are shown."""
    return f"{method} (uses old images)" if method in memory else method


def pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--settings", nargs="+", default=["overlapped"])
    ap.add_argument("--task", default="15-1")
    ap.add_argument("--runs", nargs="+", default=[str(ROOT / "runs" / "ccp21")],
                    help="run folders; with --report-only each run is read from the first that holds it")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", default="cpu", help="the recipe of every run (the pages made before the "
                    "learning curves used what is now cpu-short)")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads)")
    ap.add_argument("--report-only", action="store_true", help="only tabulate the finished runs")
    ap.add_argument("--notes", help="Markdown file appended to the page (findings written by hand)")
    ap.add_argument("--records", help="copy each tabulated run's small files (config, results, summary, "
                    "meta, losses) here, so the page can be rebuilt with --report-only --runs RECORDS")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"ccp21 not found at {DATA}; this benchmark needs the shared data folder", file=sys.stderr)
        return 2
    folders = [Path(r) for r in args.runs]
    runs = folders[0]

    def found(name: str) -> Path:
        """The folder of run `name`: the first of --runs where it finished (else the first's)."""
        return next((f / name for f in folders if (f / name / "summary.json").is_file()), runs / name)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    env = dict(os.environ)
    if args.jobs > 1:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // args.jobs))

    def one(job: tuple[str, str]) -> tuple[str, str, list[str], dict]:
        setting, method = job
        cmd = command(method, args.task, setting, runs, args.set, args.recipe)
        run_dir = runs / f"ccp21-{args.task}-{setting}-{method}"
        log = runs / f"ccp21-{args.task}-{setting}-{method}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
        with open(log, "a") as f:
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        return setting, method, cmd, json.loads((run_dir / "summary.json").read_text())

    # Methods are started in the order given: put one method of each base step first, so that the
    # methods sharing it find its checkpoint ready instead of training it again in parallel.
    jobs = [(s, m) for s in args.settings for m in args.methods]
    if args.report_only:  # tabulate the runs that finished, launch nothing
        done = []
        for setting, method in jobs:
            summary = found(f"ccp21-{args.task}-{setting}-{method}") / "summary.json"
            if summary.is_file():
                cmd = (recorded_command(summary.parent)
                       or command(method, args.task, setting, runs, args.set, args.recipe))
                done.append((setting, method, cmd, json.loads(summary.read_text())))
            else:
                print(f"not finished: {setting} {method}")
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            done = list(pool.map(one, jobs))
    sections = [(s, [(m, c, summ) for (s2, m, c, summ) in done if s2 == s]) for s in args.settings]
    sections = [(s, rows) for s, rows in sections if rows]

    at_once = "one or two runs at a time" if args.report_only else f"{args.jobs} run(s) at a time"
    lines = [f"# ccp21 `{args.task}`: {', '.join(args.methods)}", "",
             f"Tabulated at git `{sha[:10]}`; each run's own git revision is in its row. `{args.recipe}` "
             f"recipe; 2-core CPU machine, {at_once}; mIoU in %. Wall time is the "
             "run's own, over all its invocations (a run reusing a shared step-0 checkpoint does "
             "not pay for step 0).", ""]
    if len(sections) > 1:  # the GSC paper's Table I: settings side by side, old | new | all each
        by = {(st, m): summ["steps"][-1] for st, rows in sections for m, _, summ in rows}
        memory = {m for _, rows in sections for m, _, summ in rows if summ.get("uses_memory")}
        names = [st for st, _ in sections]
        lines += ["After the last step, old | new | all:", "",
                  "| method | " + " | ".join(f"{st} {c}" for st in names for c in ("old", "new", "all")) + " |",
                  "|---|" + "---:|" * (3 * len(names))]
        for m in args.methods:
            cells = [pct(by[(st, m)][k]) if (st, m) in by else "-"
                     for st in names for k in ("miou_old", "miou_new", "miou_all")]
            lines.append(f"| {label(m, memory)} | " + " | ".join(cells) + " |")
        lines.append("")
    for setting, rows in sections:
        n_base = rows[0][2]["steps"][0]["num_base"]
        n_all = max(len(r[2]["steps"][-1]["iou"]) for r in rows)
        lines += [f"## {setting}", "",
                  f"After the last step: old = classes 0-{n_base - 1} (background included), "
                  f"new = {n_base}-{n_all - 1}.", "",
                  "| method | old | new | all | wall time (s) | peak RSS (MB) | git |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for method, _, s in rows:
            f = s["steps"][-1]
            meta = found(f"ccp21-{args.task}-{setting}-{method}") / "meta.json"
            rev = json.loads(meta.read_text()).get("git_sha", "")[:10] if meta.is_file() else ""
            # every invocation of a resumed run counted (summary.json's wall_time_s is the last one's)
            wall = RunDir(meta.parent, create=False).kept_wall_time() or s["wall_time_s"]
            lines.append(f"| {label(method, {method} if s.get('uses_memory') else set())} | {pct(f['miou_old'])} | {pct(f['miou_new'])} | {pct(f['miou_all'])} "
                         f"| {wall:.0f} | {s['peak_rss_mb']:.0f} | {rev} |")
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
    if args.records:
        for s, m, _, _ in done:
            name = f"ccp21-{args.task}-{s}-{m}"
            keep(found(name).parent, Path(args.records), [name])
    if args.notes:
        lines += [Path(args.notes).read_text()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
