"""Experiment grids: expansion, one JSONL row per run and step, finished runs skipped."""

import json
import os
from pathlib import Path

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


def test_a_methods_settings_apply_to_its_runs_only(tmp_path):
    from ciss.bench import overrides
    from ciss.config import load_config

    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump({
        "set": {"optim.lr_next": 0.001}, "axes": {"method": ["ft", "mib"], "optim.epochs": [1, 2]},
        "methods": {"mib": {"optim.lr_next": 0.00001, "optim.epochs": 9, "method_args.loss_kd": 0.00005}}}))
    grid = read_grid(g)
    cfgs = {(p["method"], p["optim.epochs"]): load_config(None, overrides(grid, p)) for p in expand(grid)}
    assert cfgs["ft", 1].optim.lr_next == 0.001 and cfgs["ft", 1].method_args == {}
    assert cfgs["mib", 2].optim.lr_next == 0.00001 and cfgs["mib", 2].optim.epochs == 2  # the axis wins
    assert cfgs["mib", 1].method_args == {"loss_kd": 0.00005}  # a number, not the string '5e-05'
    for methods, match in (({"lwf": {"seed": 1}}, "no run of the grid uses"), ({"mib": 3}, "maps a method")):
        g.write_text(yaml.safe_dump({"axes": {"method": ["ft", "mib"]}, "methods": methods}))
        with pytest.raises(ConfigError, match=match):
            read_grid(g)


def test_named_grid_records_runs_made_outside_it(tmp_path, capsys):
    """A run trained by `ciss train` under the name the grid gives it is recorded, not run again; a
    run of another experiment under that name is refused."""
    g = write_grid(tmp_path / "g.yaml", tmp_path)
    grid = yaml.safe_load(g.read_text())
    grid["name"] = "toy-{method}"
    g.write_text(yaml.safe_dump(grid))
    common = [f"--set={k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in grid["set"].items()]
    assert main(["train", "--recipe", "tiny", *common, f"--set=out_dir={tmp_path / 'grid'}",
                 "--set=name=toy-ft", "--set=method=ft", "--set=progress=false"]) == 0
    before = (tmp_path / "grid" / "toy-ft" / "summary.json").stat().st_mtime
    assert main(["bench", str(g)]) == 0
    rows = [json.loads(l) for l in (tmp_path / "grid" / "grid.jsonl").read_text().splitlines()]
    assert [(r["run"], r["step"], r.get("recorded")) for r in rows] == [
        ("toy-ft", 0, "found"), ("toy-ft", 1, "found"), ("toy-lwf", 0, None), ("toy-lwf", 1, None)]
    assert (tmp_path / "grid" / "toy-ft" / "summary.json").stat().st_mtime == before  # not retrained
    assert rows[0]["miou_all"] == pytest.approx(
        json.loads((tmp_path / "grid" / "toy-ft" / "results.jsonl").read_text().splitlines()[0])["miou_all"])
    assert main(["bench", str(g)]) == 0  # recorded once
    assert len((tmp_path / "grid" / "grid.jsonl").read_text().splitlines()) == 4

    grid["name"] = "toy-{seed}"  # two methods would share a name
    g.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match="same name"):
        read_grid(g)
    grid["name"] = "toy-{optim.lr}"
    g.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match="axes as"):
        read_grid(g)
    grid["name"] = "toy-{method}"
    grid["axes"]["method"] = ["lwf"]
    grid["out_dir"] = str(tmp_path / "other")
    g.write_text(yaml.safe_dump(grid))
    (tmp_path / "other").mkdir()
    import shutil
    shutil.copytree(tmp_path / "grid" / "toy-ft", tmp_path / "other" / "toy-lwf")  # ft under lwf's name
    assert main(["bench", str(g)]) != 0
    assert "method=ft" in capsys.readouterr().err


def test_status_lists_what_remains_and_parallel_jobs_finish_the_grid(tmp_path, capsys):
    """--status trains nothing; --jobs 2 runs the points as processes and writes the same rows."""
    g = write_grid(tmp_path / "g.yaml", tmp_path)
    assert main(["bench", str(g), "--status"]) == 0
    out = capsys.readouterr().out
    assert "0 of 2 runs finished" in out and out.count("to run:") == 2
    assert not (tmp_path / "grid" / "grid.jsonl").exists()
    assert main(["bench", str(g), "--jobs", "2"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "grid" / "grid.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["step"]) for r in rows) == [("ft", 0), ("ft", 1), ("lwf", 0), ("lwf", 1)]
    assert all(r["wall_time_s"] > 0 and r["process_peak_rss_mb"] > 0 for r in rows)
    step0 = {r["method"]: r["miou_all"] for r in rows if r["step"] == 0}
    assert step0["ft"] == pytest.approx(step0["lwf"])  # one base step, trained once and shared
    trained0 = [m for m in ("ft", "lwf") if any(json.loads(l)["step"] == 0 for l in
                (tmp_path / "grid" / next(n for n in (r["run"] for r in rows if r["method"] == m))
                 / "losses.jsonl").read_text().splitlines())]
    assert len(trained0) == 1, f"the base step was trained by {trained0}"
    assert (tmp_path / "grid" / f"{rows[0]['run']}.log").is_file()
    capsys.readouterr()
    assert main(["bench", str(g), "--status"]) == 0
    assert "2 of 2 runs finished" in capsys.readouterr().out


def test_a_failed_parallel_run_is_reported_with_its_log(tmp_path, capsys):
    g = write_grid(tmp_path / "g.yaml", tmp_path)
    grid = yaml.safe_load(g.read_text())
    grid["set"]["data.root"] = str(tmp_path / "missing")  # accepted by the config, fails in the run
    grid["set"]["data.dataset"] = "folder"
    g.write_text(yaml.safe_dump(grid))
    assert main(["bench", str(g), "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "2 run(s) failed" in err and ".log" in err


def test_a_point_another_process_is_training_is_left_to_it(tmp_path, capsys):
    from ciss.bench import run_name
    from ciss.results import exclusive

    g = write_grid(tmp_path / "g.yaml", tmp_path)
    busy = tmp_path / "grid" / run_name(expand(read_grid(g))[0])
    busy.mkdir(parents=True)
    with exclusive(busy / ".lock"):
        assert main(["bench", str(g)]) == 0
    assert "being trained by another process" in capsys.readouterr().out
    rows = [json.loads(l) for l in (tmp_path / "grid" / "grid.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"lwf"}
    assert main(["bench", str(g), "--status"]) == 0  # free again: it is what remains
    assert "to run: " + busy.name in capsys.readouterr().out


def test_relative_data_paths_are_read_from_the_grid_folder(tmp_path, monkeypatch):
    folder = tmp_path / "a" / "grids"
    folder.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    g = folder / "g.yaml"
    g.write_text(yaml.safe_dump({"set": {"data.root": "../../data", "data.test_root": "/abs/test"},
                                 "axes": {"method": ["ft"], "data.root": ["../../data", "/abs/x"]}}))
    for cwd in (tmp_path, folder, tmp_path / "data"):
        monkeypatch.chdir(cwd)
        grid = read_grid(g)
        assert (cwd / grid["set"]["data.root"]).resolve() == (tmp_path / "data").resolve()
        assert (cwd / grid["axes"]["data.root"][0]).resolve() == (tmp_path / "data").resolve()
        assert grid["set"]["data.test_root"] == "/abs/test" and grid["axes"]["data.root"][1] == "/abs/x"
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the committed grids, from the root
    grid = read_grid("benchmarks/grids/ccp21_cpu.yaml")
    assert grid["set"]["data.root"] == os.path.join("..", "shared", "datasets", "ccp21")


def test_a_named_variant_trains_its_method_with_its_keys_under_its_own_name(tmp_path):
    from ciss.bench import overrides, run_name
    from ciss.config import load_config

    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump({
        "axes": {"method": ["gsc", "gsc-no_pr"]}, "name": "r-{method}",
        "methods": {"gsc-no_pr": {"method": "gsc", "method_args.pr": False}}}))
    grid = read_grid(g)
    points = expand(grid)
    assert [run_name(p, grid["name"]) for p in points] == ["r-gsc", "r-gsc-no_pr"]
    plain, variant = (load_config(None, overrides(grid, p)) for p in points)
    assert plain.method == variant.method == "gsc"
    assert plain.method_args == {} and variant.method_args == {"pr": False}


def test_only_runs_the_matching_points_and_refuses_a_pattern_that_matches_none(tmp_path, capsys):
    g = write_grid(tmp_path / "g.yaml", tmp_path)
    assert main(["bench", str(g), "--only", "*lwf*", "--status"]) == 0
    out = capsys.readouterr().out
    assert "0 of 1 runs finished" in out and out.count("to run:") == 1 and "lwf" in out
    assert main(["bench", str(g), "--only", "*lwf*"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "grid" / "grid.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"lwf"}
    capsys.readouterr()
    assert main(["bench", str(g), "--only", "*plop*"]) == 2
    err = capsys.readouterr().err
    assert "g.yaml" in err and "--only *plop*" in err and "matches none" in err
    assert "Traceback" not in err
