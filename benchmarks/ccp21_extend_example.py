"""The worked example of docs/extend.md: a model of ccp21's classes 1-15, extended with 16, 17, 18,
19 and 20 one at a time, each from a folder that labels only its new class.

Writes the folders (images are links to ccp21's), runs `ciss fit` and five `ciss extend` calls with
`--val`, and prints a Markdown table of the commands, wall times and validation mIoU.

    python benchmarks/ccp21_extend_example.py --work ~/ciss-work/extend --out benchmarks/results/ccp21_extend_example.md
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "ccp21"


def write_folder(dst: Path, ids: list[str], names: list[str], keep: list[int], split: str) -> Path:
    """A folder dataset over ccp21 images `ids` where only classes `keep` (ccp21 ids) are labelled,
    renumbered 1.. in that order; every other class is background. Images are symbolic links."""
    if (dst / "splits" / f"{split}.txt").is_file():
        return dst
    for sub in ("images", "labels", "splits"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    (dst / "classes.txt").write_text("\n".join([names[0]] + [names[c] for c in keep]) + "\n")
    lut = np.zeros(256, dtype=np.uint8)
    lut[255] = 255
    for k, c in enumerate(keep, start=1):
        lut[c] = k
    for i in ids:
        img = next((DATA / "images").glob(f"{i}.*"))
        link = dst / "images" / img.name
        if not link.exists():
            link.symlink_to(img)
        Image.fromarray(lut[np.asarray(Image.open(DATA / "labels" / f"{i}.png"))], mode="L").save(
            dst / "labels" / f"{i}.png")
    (dst / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return dst


def run(cmd: list[str]) -> tuple[float, str]:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit(out.returncode)
    print(out.stdout, flush=True)
    return time.time() - t0, out.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the datasets, models and runs")
    ap.add_argument("--out", required=True, help="Markdown page to write")
    args = ap.parse_args()
    work = Path(args.work).expanduser()
    names = (DATA / "classes.txt").read_text().split("\n")[:21]
    train = (DATA / "splits" / "train.txt").read_text().split()
    val = (DATA / "splits" / "val.txt").read_text().split()

    def holds(ids: list[str], c: int) -> list[str]:
        return [i for i in ids if (np.asarray(Image.open(DATA / "labels" / f"{i}.png")) == c).any()]

    base = write_folder(work / "data" / "base", train, names, list(range(1, 16)), "train")
    cli = [sys.executable, "-m", "ciss.cli"]
    rows = []
    sec, out = run(cli + ["fit", "--data", str(base), "--out", str(work / "m15.pt"), "--val",
                          str(write_folder(work / "data" / "val-15", val, names, list(range(1, 16)), "val"))])
    rows.append(("fit classes 1-15", sec, out))
    model = work / "m15.pt"
    for c in range(16, 21):
        new = write_folder(work / "data" / f"new-{c}", holds(train, c), names, [c], "train")
        v = write_folder(work / "data" / f"val-{c}", val, names, list(range(1, c + 1)), "val")
        nxt = work / f"m{c}.pt"
        sec, out = run(cli + ["extend", str(model), "--data", str(new), "--out", str(nxt), "--val", str(v)])
        rows.append((f"extend with {names[c]} ({c})", sec, out))
        model = nxt

    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = ["| step | wall time | mIoU old (1-15 + bg) | new (16-...) | all |", "|---|---|---|---|---|"]
    for label, sec, out in rows:
        m = re.search(r"mIoU old ([\d.na]+) \| new ([\d.na-]+) \| all ([\d.na]+)", out)
        old, new, all_ = m.groups() if m else ("?", "?", "?")
        lines.append(f"| {label} | {sec / 60:.1f} min | {old} | {new} | {all_} |")
    meta = json.dumps({"git": sha, "work": str(work)})
    text = "\n".join(lines) + f"\n\n<!-- {meta} -->\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
