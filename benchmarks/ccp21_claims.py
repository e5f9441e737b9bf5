"""The papers' claims, re-measured on ccp21: benchmarks/results/ccp21_claims.md.

Reads finished runs named as benchmarks/ccp21_table.py and the ccp21 grids name them,
`ccp21-<task>-<setting>-<method>[-<variant>][-seed<N>]` (a run of seed 0 has no seed suffix), and
for each claim "A beats B" gives the paper's figures, ours (mean over seeds, and their spread), and
a verdict: `holds` when our gap A - B exceeds twice its standard error, `fails` when it is below
minus twice that, `within noise` otherwise. The standard error is sqrt(sA^2/nA + sB^2/nB), with s
the standard deviation over a method's seeds; a run of one seed takes the median s of the methods
with two or more seeds in its scenario (said in its row), and with no such method the verdict only
says which way the one-seed gap points.

    python benchmarks/ccp21_claims.py [--runs benchmarks/results/ccp21_v2_runs] \
        [--reasons reasons.json] [--out benchmarks/results/ccp21_claims.md]

`--reasons` maps a claim's id (first column of the page) to the measured reason of a miss.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
BEST_OTHER = "*"  # as the beaten side: the best measured method of the scenario other than A


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    a: str  # run key: method name, or method-variant (e.g. gsc-no_pr)
    b: str
    task: str
    setting: str
    source: str  # where the paper's figures come from
    paper_a: Optional[float] = None  # the paper's all-class mIoU (%) after the last step
    paper_b: Optional[float] = None
    paper_note: str = ""  # when the paper gives no pair of figures for this exact comparison


def _pair(cid: str, text: str, a: str, b: str, source: str, figures: dict, task: str = "15-1",
          note: str = "") -> list[Claim]:
    """The claim in each setting the paper reports it for: figures = {setting: (A, B)}."""
    return [Claim(f"{cid}-{s[:3]}", text, a, b, task, s, source, *fig, paper_note=note)
            for s, fig in figures.items()]


# Pascal VOC figures, all-class mIoU after the last step; GSC Table I gives 15-1 for both settings,
# SSUL reports the overlapped setting only.
GSC_T1 = "GSC Table I (VOC 15-1)"
CLAIMS: list[Claim] = [
    *_pair("gsc>plop", "GSC > PLOP", "gsc", "plop", GSC_T1,
           {"overlapped": (60.8, 54.6), "disjoint": (55.8, 46.5)}),
    *_pair("plop>mib", "PLOP > MiB", "plop", "mib", GSC_T1,
           {"overlapped": (54.6, 29.7), "disjoint": (46.5, 37.9)}),
    *_pair("mib>ft", "MiB > FT", "mib", "ft", GSC_T1,
           {"overlapped": (29.7, 0.6), "disjoint": (37.9, 0.6)}),
    *[c for sw, name in (("pr", "prototypical pseudo re-labelling"), ("sg", "step-aware gradient "
      "compensation"), ("sr", "soft relation distillation"), ("sc", "sharp confidence"))
      for c in _pair(f"gsc>no_{sw}", f"GSC's {name} helps", "gsc", f"gsc-no_{sw}",
                     "GSC Table V (VOC 10-1 disjoint)", {"overlapped": (None, None)},
                     note="adding the components one by one raises PLOP's 8.4 to GSC's 20.8")],
    *_pair("nest_mib>mib", "NeST+MiB > MiB", "nest_mib", "mib", "NeST (VOC 15-1)",
           {"overlapped": (None, None), "disjoint": (None, None)}, note="+13.6 points on MiB"),
    *_pair("nest_plop>plop", "NeST+PLOP > PLOP", "nest_plop", "plop", "NeST (VOC 15-1)",
           {"overlapped": (None, None), "disjoint": (None, None)}, note="a gain on PLOP too"),
    *_pair("ssul_m>ssul", "SSUL-M > SSUL", "ssul_m", "ssul", "SSUL Table 1 (VOC 15-1)",
           {"overlapped": (71.37, 67.61)}),
    *_pair("ssul>mib", "SSUL > MiB", "ssul", "mib", "SSUL Table 1 (VOC 15-1)",
           {"overlapped": (67.61, 29.29)}),
    *_pair("ssul>no_unknown", "SSUL's unknown class helps", "ssul", "ssul-no_unknown",
           "SSUL Table 3 (VOC 15-1)", {"overlapped": (67.61, 61.12)}),
    *_pair("ssul>no_freeze", "SSUL's frozen backbone helps", "ssul", "ssul-no_freeze",
           "SSUL Table 3 (VOC 15-1)", {"overlapped": (67.61, 44.25)}),
    *_pair("ssul>ce", "SSUL's sigmoid + BCE helps", "ssul", "ssul-ce", "SSUL Table 3 (VOC 15-1)",
           {"overlapped": (67.61, 52.26)}),
    *_pair("lwf_mc>lwf", "LwF-MC > LwF", "lwf_mc", "lwf", GSC_T1,
           {"overlapped": (6.9, 1.8), "disjoint": (5.2, 1.5)}),
    *_pair("joint>all", "Joint above every method", "joint", BEST_OTHER, GSC_T1,
           {"overlapped": (77.4, 60.8), "disjoint": (77.4, 55.8)}, note="B: GSC, the paper's best"),
]

_NAME = re.compile(r"^ccp21-(?P<task>\d+-\d+)-(?P<setting>overlapped|disjoint)-(?P<key>.+?)(?:-seed(?P<seed>\d+))?$")


def read_runs(runs: Path) -> dict[tuple[str, str, str], dict[int, float]]:
    """(task, setting, run key) -> {seed: all-class mIoU (%) after the last step} of finished runs."""
    out: dict[tuple[str, str, str], dict[int, float]] = {}
    for summary in sorted(runs.glob("ccp21-*/summary.json")):
        m = _NAME.match(summary.parent.name)
        if m is None:
            continue
        last = json.loads(summary.read_text())["steps"][-1]
        key = (m["task"], m["setting"], m["key"])
        out.setdefault(key, {})[int(m["seed"] or 0)] = 100 * last["miou_all"]
    return out


def _sd(values: list[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) >= 2 else None


def verdict(claim: Claim, runs: dict) -> dict:
    """Ours for one claim: means, seeds, spreads and the verdict (see the module docstring)."""
    scen = {k[2]: list(v.values()) for k, v in runs.items() if k[:2] == (claim.task, claim.setting)}
    b = claim.b
    if b == BEST_OTHER:
        others = {k: statistics.mean(v) for k, v in scen.items() if k != claim.a and "-" not in k}
        b = max(others, key=others.get) if others else ""
    row = {"a": claim.a, "b": b, "a_mean": None, "b_mean": None, "a_n": 0, "b_n": 0, "verdict": "not measured",
           "spread": ""}
    if claim.a not in scen or b not in scen:
        return row
    va, vb = scen[claim.a], scen[b]
    row.update(a_mean=statistics.mean(va), b_mean=statistics.mean(vb), a_n=len(va), b_n=len(vb))
    gap = row["a_mean"] - row["b_mean"]
    seeded = [s for s in (_sd(v) for v in scen.values()) if s is not None]
    fallback = statistics.median(seeded) if seeded else None
    sa, sb = _sd(va), _sd(vb)
    borrowed = (sa is None or sb is None) and fallback is not None
    sa, sb = (fallback if sa is None else sa), (fallback if sb is None else sb)
    if sa is None or sb is None:
        row["verdict"] = ("points the paper's way" if gap > 0 else "points against the paper") + " (one seed, no spread)"
        return row
    se = math.sqrt(sa ** 2 / len(va) + sb ** 2 / len(vb))
    row["spread"] = f"{sa:.2f} / {sb:.2f}" + (" (median of the seeded methods for a one-seed run)" if borrowed else "")
    row["se"] = se
    row["verdict"] = "holds" if gap > 2 * se else "fails" if gap < -2 * se else "within noise"
    return row


def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def page(runs_dir: Path, reasons: dict[str, str]) -> str:
    runs = read_runs(runs_dir)
    lines = ["# The papers' claims on ccp21", "",
             f"Runs: `{_shown(runs_dir)}` "
             f"({sum(len(v) for v in runs.values())} finished). All-class mIoU (%) after the last step; "
             "the papers' figures are Pascal VOC's (ResNet-101, crop 512), ours ccp21's test split under "
             "the `cpu` recipe, so compare directions and gaps, not levels. Ours: mean over seeds "
             "(n seeds), spread = standard deviation over seeds of A / B. Rule: `python "
             "benchmarks/ccp21_claims.py` (its docstring).", "",
             "| id | claim | paper A / B | source | ours A | ours B | n | spread | verdict | reason of a miss |",
             "|---|---|---|---|---:|---:|---|---|---|---|"]
    for c in CLAIMS:
        r = verdict(c, runs)
        paper = f"{_f(c.paper_a)} / {_f(c.paper_b)}" if c.paper_a is not None else c.paper_note
        if c.paper_a is not None and c.paper_note:
            paper += f" ({c.paper_note})"
        who = f"{c.text}" + (f" (B = {r['b']})" if c.b == BEST_OTHER and r["b"] else "")
        reason = reasons.get(c.id, "")
        if r["verdict"] in ("fails", "within noise") and not reason:
            reason = "not yet measured"
        lines.append(f"| {c.id} | {who}, {c.task} {c.setting} | {paper} | {c.source} | {_f(r['a_mean'])} "
                     f"| {_f(r['b_mean'])} | {r['a_n']} / {r['b_n']} | {r['spread']} | {r['verdict']} | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "benchmarks" / "results" / "ccp21_v2_runs"))
    ap.add_argument("--reasons", help="JSON file: claim id -> the measured reason of a miss")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ccp21_claims.md"))
    args = ap.parse_args()
    runs = Path(args.runs).resolve()
    if not runs.is_dir():
        print(f"no run folder at {runs}: run the ccp21 v2 grid first (or pass --runs)", file=sys.stderr)
        return 2
    reasons = json.loads(Path(args.reasons).read_text()) if args.reasons else {}
    made = " ".join(["python benchmarks/ccp21_claims.py", f"--runs {_shown(runs)}",
                     *([f"--reasons {_shown(Path(args.reasons).resolve())}"] if args.reasons else []),
                     f"--out {_shown(Path(args.out).resolve())}"])
    Path(args.out).write_text(page(runs, reasons) + f"\nMade with `{made}`.\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
