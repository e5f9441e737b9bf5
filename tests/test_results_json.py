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
