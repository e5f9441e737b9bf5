"""Run records are strict JSON: an undefined figure is null on disk and NaN once read back."""

from __future__ import annotations

import json
import math

from ciss.engine import train
from ciss.results import RunDir, dumps, loads


def test_nan_is_written_as_null_and_read_back_as_nan(tmp_path):
    run = RunDir(tmp_path / "r")
    run.append_jsonl("results.jsonl", {"step": 0, "miou_new": float("nan"), "iou": [0.5, float("nan")],
                                       "calibrated": {"alg": {"miou_new": float("inf")}}})
    text = (tmp_path / "r" / "results.jsonl").read_text()
    assert "NaN" not in text and "\"Infinity\"" in text  # no bare NaN; infinities as strings
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict readers accept it
    row = run.read_jsonl("results.jsonl")[0]
    assert math.isnan(row["miou_new"]) and row["iou"][0] == 0.5 and math.isnan(row["iou"][1])
    assert row["calibrated"]["alg"]["miou_new"] == float("inf")
    assert loads(dumps({"name": None}))["name"] is None  # other nulls stay None


def test_a_trained_run_writes_strict_json(tiny_cfg):
    res = train(tiny_cfg())
    for name in ("results.jsonl", "losses.jsonl", "summary.json"):
        text = (res.run_dir / name).read_text()
        assert "NaN" not in text, name
    summary = RunDir(res.run_dir, create=False).read_summary()
    assert math.isnan(summary["steps"][0]["miou_new"])  # step 0 has no new class


def test_checkpoints_follow_the_umask_and_stale_temp_files_are_removed(tmp_path):
    import os
    import time

    from ciss.results import FILE_MODE, STALE_TEMP_S, atomic_write_text, save_checkpoint

    target = tmp_path / "ckpt" / "last.pt"
    target.parent.mkdir()
    stale = target.parent / ".last.pt.abc123.tmp"  # what a writer killed mid-write leaves
    stale.write_bytes(b"half")
    old = time.time() - STALE_TEMP_S - 5
    os.utime(stale, (old, old))
    fresh = target.parent / ".last.pt.def456.tmp"  # too recent to be judged dead
    fresh.write_bytes(b"half")
    save_checkpoint(target, {"step": 0})
    assert target.is_file() and (target.stat().st_mode & 0o777) == FILE_MODE
    assert not stale.exists() and fresh.exists()
    atomic_write_text(tmp_path / "a.txt", "x")
    assert ((tmp_path / "a.txt").stat().st_mode & 0o777) == FILE_MODE
