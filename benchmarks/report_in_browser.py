"""Open a `ciss report` HTML page in headless Chromium as a person would: screenshot it, and check
from the rendered DOM that its tables are there and that every figure decoded.

Needs Chromium (Debian: `apt-get install chromium`).

    python benchmarks/report_in_browser.py benchmarks/results/ccp21_report/report.html \\
        --screenshot benchmarks/results/ccp21_report/screenshot.png
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise SystemExit("no Chromium found; install it (Debian: apt-get install chromium)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page")
    ap.add_argument("--screenshot", required=True)
    args = ap.parse_args()
    url = Path(args.page).resolve().as_uri()
    base = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=5000"]
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run(base + [f"--screenshot={Path(args.screenshot).resolve()}", "--window-size=1200,2600",
                           url], capture_output=True, timeout=120, check=True)
    tables = dom.count("<table>")
    images = len(re.findall(r"<img\b", dom))
    shown = len(re.findall(r'data-shown="true"', dom))
    shot = Path(args.screenshot)
    print(f"{url}: {tables} tables, {images} figures, {shown} decoded; screenshot {shot} "
          f"({shot.stat().st_size if shot.is_file() else 0} bytes)")
    ok = tables > 0 and images > 0 and shown == images and shot.is_file() and shot.stat().st_size > 10_000
    if not ok:
        print("FAILED: the page does not show all of its tables and figures", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
