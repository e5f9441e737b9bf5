"""benchmarks/ccp21_calibration.py --json: the last step's raw, calibrated and oracle figures."""

import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ccp21_calibration.py"


def load():
    return load_benchmark("ccp21_calibration")


def test_last_step_figures_reads_the_last_row_and_the_sweeps_best():
    rows = {"ft": [
        {"step": 0, "miou_all": 0.5},
        {"step": 1, "miou_all": 0.04, "calibrated": {"pcv": {"miou_all": 0.2, "gamma": 6.5}},
         "sweep": {"miou_all": [0.04, None, float("nan"), 0.25, 0.1]}},
    ]}
    fig = load().last_step_figures(rows)["ft"]
    assert fig["step"] == 1
    assert fig["raw_all"] == 4.0
    assert fig["pcv_all"] == 20.0 and fig["pcv_gamma"] == 6.5
    assert fig["oracle_all"] == 25.0


def test_last_step_figures_without_calibration_has_raw_only():
    fig = load().last_step_figures({"joint": [{"step": 0, "miou_all": 0.2863}]})["joint"]
    assert fig == {"step": 0, "raw_all": 28.63}


def test_plot_tradeoff_reads_a_sweep_as_stored_in_posthoc_jsonl(tmp_path):
    from ciss.plots import plot_tradeoff

    sweep = {"gamma": ["-Infinity", -1.0, 0.0, 2.0, "Infinity"],  # the infinite ends as written to JSON
             "miou_s": [0.9, 0.85, 0.8, 0.5, 0.1], "miou_u": [0.0, 0.05, 0.1, 0.3, 0.4]}
    path = plot_tradeoff([("step 1", sweep)], tmp_path / "sweep.png", title="t")
    assert Path(path).stat().st_size > 0


def test_every_calibrator_rows_give_each_fits_share_of_the_oracles_gain():
    rows = {"mib": [
        {"step": 0, "miou_all": 0.3},
        {"step": 1, "miou_all": 0.20, "calibrated": {"share": {"miou_all": 0.25, "gamma": 1.0},
                                                     "pcv": {"miou_all": 0.15, "gamma": 9.0}},
         "sweep": {"miou_all": [0.1, 0.30, None]}},
        {"step": 2, "miou_all": 0.20, "calibrated": {"share": {"miou_all": 0.20, "gamma": 0.0}}},
    ]}
    lines = load().every_calibrator(rows)
    assert lines[0] == "| method | step | raw | `share` (gamma, recovered) | `pcv` (gamma, recovered) | oracle |"
    assert lines[2] == "| mib | 1 | 20.00 | 25.00 (1, 50%) | 15.00 (9, -50%) | 30.00 |"
    assert lines[3] == "| mib | 2 | 20.00 | 20.00 (0) | - | - |"  # no sweep: no share of a gain
    assert load().recovered(12.0, 10.0, 10.0) is None  # an oracle that gains nothing


def test_help_prints(capsys, monkeypatch):
    module = load()
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--help"])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 0
    assert "--json" in capsys.readouterr().out
