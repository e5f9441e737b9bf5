"""benchmarks/grid_cost.py: the training work of a grid, counted from its scenarios before it runs."""

import pytest
import yaml

from ciss.data import build_dataset
from ciss.scenario import build_scenario
from conftest import load_benchmark



@pytest.fixture(scope="module")
def grid_cost():
    return load_benchmark("grid_cost")


OPTIONS = {"num_classes": 6, "size": 32, "length": 24}


def write_grid(tmp_path, methods, **extra):
    grid = {"recipe": "tiny", "out_dir": str(tmp_path / "runs"),
            "set": {"data.dataset": "synthetic", "data.task": "4-2", "data.options": OPTIONS,
                    "data.crop_size": 32, "optim.epochs": 2, "optim.epochs_next": 3,
                    "optim.batch_size": 4, "cache_dir": str(tmp_path / "cache"), **extra},
            "axes": {"method": methods}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_shared_step_zero_is_counted_once_and_passes_are_images_times_epochs(grid_cost, tmp_path):
    sc = build_scenario(build_dataset("synthetic", "train", **OPTIONS), "4-2", "overlapped",
                        cache_dir=tmp_path / "sc", progress=False)
    n0, n1 = len(sc.train_indices(0)), len(sc.train_indices(1))
    assert n0 > 4 and n1 > 4
    groups, hours = grid_cost.grid_work(write_grid(tmp_path, ["ft", "lwf"]), [])
    assert hours == {}
    runs, steps, passes, iters, teacher = groups["4-2 overlapped"]
    assert (runs, steps) == (2, 3)  # one step 0 for both, a step 1 each
    assert passes == 2 * n0 + 2 * 3 * n1
    assert iters == 2 * (n0 // 4) + 2 * 3 * (n1 // 4)
    assert teacher == 3 * n1  # LwF's old model at step 1; FT has none
    groups, _ = grid_cost.grid_work(write_grid(tmp_path, ["ft", "lwf"], reuse_base=False), [])
    assert groups["4-2 overlapped"][1:3] == [4, 2 * 2 * n0 + 2 * 3 * n1]
    groups, _ = grid_cost.grid_work(write_grid(tmp_path, ["nest_mib"], **{"method_args.pretune_epochs": 2}), [])
    assert groups["4-2 overlapped"][2] == 2 * n0 + (2 + 3) * n1  # NeST's pre-tuning epochs count


def test_measure_gives_hours_and_bad_input_names_the_grid(grid_cost, tmp_path, monkeypatch, capsys):
    groups, hours = grid_cost.grid_work(write_grid(tmp_path, ["ft"]), [], measure=1)
    assert hours["4-2 overlapped"] > 0 and "training images/s" in capsys.readouterr().out
    grid = write_grid(tmp_path, ["ft"], **{"data.dataset": "folder", "data.options": {}})
    monkeypatch.setattr("sys.argv", ["grid_cost.py", str(grid), "--set", "data.root=/no/such/folder"])
    with pytest.raises(SystemExit, match="g.yaml: .*/no/such/folder"):
        grid_cost.main()
