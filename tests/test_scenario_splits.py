"""`ciss splits` logic: the printed table and OUT/step-<t>.txt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ciss.splits import run_splits


def _folder(root: Path) -> Path:
    """6 images; classes a, b, c; image i holds the classes listed in CONTENT[i]."""
    content = [{1}, {1, 2}, {2}, {3}, {2, 3}, {1, 3}]
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("background\na\nb\nc\n")
    for i, cls in enumerate(content):
        lbl = np.zeros((4, 4), dtype=np.uint8)
        for k, c in enumerate(sorted(cls)):
            lbl[k] = c
        Image.fromarray(lbl, mode="L").save(root / "labels" / f"im{i}.png")
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / f"im{i}.jpg")
    (root / "splits" / "train.txt").write_text("".join(f"im{i}\n" for i in range(6)))
    return root


def test_run_splits_folder(tmp_path):
    root = _folder(tmp_path / "data")
    out = tmp_path / "out"
    table = run_splits("folder", root, "1-1", "disjoint", None, out, cache_dir=tmp_path / "c",
                       progress=False)
    lines = table.splitlines()
    assert "task 1-1, disjoint" in lines[0]
    assert lines[1].split()[:3] == ["step", "#classes", "#images"]
    assert lines[2].split() == ["0", "2", "1", "background,", "a"]  # im0 only: others show b/c
    assert lines[3].split() == ["1", "1", "2", "b"]
    assert lines[4].split() == ["2", "1", "3", "c"]
    assert (out / "step-0.txt").read_text() == "im0\n"
    assert (out / "step-1.txt").read_text() == "im1\nim2\n"
    assert (out / "step-2.txt").read_text() == "im3\nim4\nim5\n"

    table = run_splits("folder", root, "1-1", "overlapped", "random:0", out,
                       cache_dir=tmp_path / "c", progress=False)
    assert "overlapped, order random:0" in table
    n_files = sorted(p.name for p in out.iterdir())
    assert n_files == ["step-0.txt", "step-1.txt", "step-2.txt"]
    total = sum(len((out / f).read_text().split()) for f in n_files)
    assert total == 3 + 3 + 3  # overlapped: every image with the class


def test_run_splits_synthetic(tmp_path):
    table = run_splits("synthetic", None, "8-2", "overlapped", None, tmp_path / "o",
                       cache_dir=tmp_path / "c", progress=False, num_classes=10, length=40)
    assert "synthetic train (40 images)" in table
    assert len(table.splitlines()) == 2 + 2
    ids = (tmp_path / "o" / "step-1.txt").read_text().split()
    assert ids and all(i.startswith("train-") for i in ids)


def test_explicit_class_groups_and_a_warning_for_nearly_empty_steps(tmp_path):
    root = _folder(tmp_path / "data")
    table = run_splits("folder", root, "[[a], [b, c]]", "overlapped", None, tmp_path / "o",
                       cache_dir=tmp_path / "c", progress=False)
    lines = table.splitlines()
    assert lines[2].split()[:3] == ["0", "2", "3"] and lines[3].split()[:3] == ["1", "2", "5"]
    assert "warning: step 0 has 3 training image(s)" in table
    with pytest.raises(ValueError, match="list of class groups"):
        run_splits("folder", root, "[[a], [b", "overlapped", None, None, cache_dir=tmp_path / "c",
                   progress=False)
