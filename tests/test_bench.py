"""Experiment grids: expansion, one JSONL row per run and step, finished runs skipped."""

import json

import pytest
import yaml

from ciss.bench import expand, read_grid
from ciss.cli import main
from ciss.config import ConfigError


def write_grid(path, tmp_path):
    grid = {
        "recipe": "tiny",
        "out_dir": str(tmp_path / "grid"),
        "set": {"data.dataset": "synthetic", "data.task": "4-2",
                "data.options": {"num_classes": 6, "size": 32, "length": 24}, "data.crop_size": 32,
                "optim.epochs": 1, "cache_dir": str(tmp_path / "cache"), "tensorboard": False},
        "axes": {"method": ["ft", "lwf"], "seed": [0], "data.order": [None]},
    }
    path.write_text(yaml.safe_dump(grid))
    return path


def test_grid_runs_once_and_writes_rows(tmp_path, capsys):
    g = write_grid(tmp_path / "g.yaml", tmp_path)
    assert [p["method"] for p in expand(read_grid(g))] == ["ft", "lwf"]
    assert main(["bench", str(g)]) == 0
    rows = [json.loads(l) for l in (tmp_path / "grid" / "grid.jsonl").read_text().splitlines()]
    assert [(r["method"], r["step"]) for r in rows] == [("ft", 0), ("ft", 1), ("lwf", 0), ("lwf", 1)]
    assert all(r["config_hash"] and r["seed"] == 0 and r["wall_time_s"] > 0 for r in rows)
    assert rows[0]["miou_old"] == pytest.approx(rows[2]["miou_old"])  # the shared step 0
    assert main(["bench", str(g)]) == 0  # finished: nothing runs again
    assert len((tmp_path / "grid" / "grid.jsonl").read_text().splitlines()) == 4


def test_bad_grids_are_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: {method: []}\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        read_grid(bad)
    bad.write_text("axis: {method: [ft]}\n")
    assert main(["bench", str(bad)]) != 0
    assert "needs an 'axes' mapping" in capsys.readouterr().err


def test_committed_grids_expand_into_valid_configs():
    from pathlib import Path

    from ciss.bench import overrides, run_name
    from ciss.config import load_config

    grids = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "grids").glob("*.yaml"))
    assert grids
    for g in grids:
        grid = read_grid(g)
        points = expand(grid)
        assert len({run_name(p) for p in points}) == len(points)
        for p in points[:50]:
            load_config(None, overrides(grid, p), recipe=grid.get("recipe"))
