"""The golden files themselves: each names the official repository and commit it came from, and each is
read by a golden test."""

from __future__ import annotations

import json
import re
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"
REPOSITORIES = {"fcdl94/MiB", "arthurdouillard/CVPR2021_PLOP", "zhangchbin/RCIL", "clovaai/SSUL",
                "zhengyuan-xie/ECCV24_NeST"}


def test_golden_files_name_their_official_commit():
    files = sorted(GOLDEN.glob("*.json"))
    assert len(files) >= 6, files
    for path in files:
        doc = json.loads(path.read_text())
        official = doc["official"]
        assert official["repository"] in REPOSITORIES, path.name
        assert re.fullmatch(r"[0-9a-f]{40}", official["commit"]), path.name
        assert official["functions"] and "seed" in doc and doc["outputs"], path.name


def test_every_golden_file_is_read_by_a_test():
    tests = "".join(p.read_text() for p in GOLDEN.parent.glob("test_golden_*.py"))
    for path in GOLDEN.glob("*.json"):
        assert f'load("{path.stem}")' in tests, f"{path.name} is read by no test"
