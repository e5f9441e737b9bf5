"""Reports from run directories: tables with mean ± std, figures, one self-contained HTML page."""

import json

import pytest

from ciss.cli import main
from ciss.engine import train
from ciss.report import load_run, to_html, write_report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import tiny_config

    tmp = tmp_path_factory.mktemp("report")
    out = []
    for method, seed in [("ft", 0), ("ft", 1), ("mib", 0)]:
        cfg = tiny_config(tmp, f"method={method}", f"seed={seed}", f"name={method}-{seed}")
        out.append(train(cfg).run_dir)
    return out


def test_report_tables_are_the_runs_figures_with_mean_and_std(runs, tmp_path):
    res = write_report(runs, tmp_path / "rep")
    text = res["markdown"].read_text()
    rows = [json.loads(l) for l in (runs[0] / "results.jsonl").read_text().splitlines()]
    rows1 = [json.loads(l) for l in (runs[1] / "results.jsonl").read_text().splitlines()]
    mean = 100 * (rows[-1]["miou_all"] + rows1[-1]["miou_all"]) / 2
    ft_line = next(l for l in text.splitlines() if l.startswith("| ft | 2 |"))
    assert f"{mean:.2f} ±" in ft_line
    mib = json.loads((runs[2] / "results.jsonl").read_text().splitlines()[-1])
    assert f"| mib | 1 | {100 * mib['miou_old']:.2f} |" in text
    assert "synthetic 4-2 overlapped" in text
    walls = [json.loads((r / "summary.json").read_text())["run_wall_time_s"] for r in runs]
    assert f"3 run(s); wall time {sum(walls) / 3600:.1f} h in total" in text
    assert ft_line.endswith(f"| {(walls[0] + walls[1]) / 2 / 60:.0f} |")
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert pngs == ["synthetic_4_2_overlapped_forgetting.png", "synthetic_4_2_overlapped_predictions.png",
                    "synthetic_4_2_overlapped_steps.png"]
    from PIL import Image

    assert {Image.open(tmp_path / "rep" / p).mode for p in pngs} == {"P"}  # 256 colours: a compact page
    page = res["html"].read_text()
    assert page.count("<table>") == 2 and page.count('src="data:image/png;base64,') == 3
    assert "<th>method</th>" in page


def test_report_command_and_bad_input(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r")]) == 0
    assert "3 runs in 1 group" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x")]) != 0
    assert "not a ciss run directory" in capsys.readouterr().err
    assert load_run(runs[2]).method == "mib"


def test_html_escapes_text_and_keeps_tables():
    page = to_html("# A <b>\n| m | x |\n|---|---|\n| <i> | 1 |\n", out_dir=None)
    assert "&lt;b&gt;" in page and "<td>&lt;i&gt;</td>" in page


def test_report_draws_the_calibration_sweep_of_evaluated_runs(runs, tmp_path):
    from ciss.evaluation import evaluate_run

    evaluate_run(runs[2], calibration="sweep")
    write_report([runs[2]], tmp_path / "rep", images=0)
    assert (tmp_path / "rep" / "synthetic_4_2_overlapped_calibration.png").stat().st_size > 1000
    from PIL import Image

    assert Image.open(tmp_path / "rep" / "synthetic_4_2_overlapped_calibration.png").mode == "P"
    assert "calibration.png" in (tmp_path / "rep" / "report.md").read_text()


def test_report_of_records_without_checkpoints_skips_predictions(runs, tmp_path):
    import shutil

    kept = []
    for r in runs:
        dst = tmp_path / "records" / r.name
        dst.mkdir(parents=True)
        for f in ("config.yaml", "meta.json", "summary.json", "results.jsonl"):
            shutil.copy(r / f, dst / f)
        kept.append(dst)
    res = write_report(kept, tmp_path / "rep")
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert pngs == ["synthetic_4_2_overlapped_forgetting.png", "synthetic_4_2_overlapped_steps.png"]
    assert "| mib | 1 |" in res["markdown"].read_text()


def test_runs_in_other_class_orders_get_their_groups_and_a_robustness_table(runs, tmp_path):
    from conftest import tiny_config

    extra = [train(tiny_config(tmp_path, "method=ft", f"data.order={order}", f"name=ft-{k}")).run_dir
             for k, order in enumerate(["random:3", "random:5", "0,1,2,3,4,5,6"])]
    assert load_run(extra[2]).order == "identity"  # the dataset's own order, however written
    text = write_report([*extra, *runs], tmp_path / "rep", images=0)["markdown"].read_text()
    assert "## synthetic 4-2 overlapped order random:3" in text
    assert "## synthetic 4-2 overlapped order random:5" in text
    heads = [l for l in text.splitlines() if l.startswith("## synthetic")]
    assert heads[0] == "## synthetic 4-2 overlapped"  # the task's own order first, whatever the input order
    robust = text.split("## Class-order robustness: synthetic 4-2 overlapped", 1)[1]
    ft = next(l for l in robust.splitlines() if l.startswith("| ft |"))
    assert ft.startswith("| ft | identity random:3 random:5 |") and ft.count("±") == 3
    mib = next(l for l in robust.splitlines() if l.startswith("| mib |"))
    assert mib.startswith("| mib | identity |") and "±" not in mib  # one order: its value, no spread


def test_order_robustness_averages_seeds_within_an_order_then_spreads_over_orders():
    from ciss.report import RunRecord, order_robustness

    def rec(order, all_, seed_shift=0.0):
        step = {"miou_old": 0.5 + seed_shift, "miou_new": float("nan"), "miou_all": all_, "iou": [0.0] * 4,
                "num_base": 3}
        return RunRecord(path=None, method="ft", group="", steps=[step], task_key="d 3-1 disjoint",
                         order=order)

    runs = [rec("identity", 0.10), rec("identity", 0.30, 0.2), rec("B", 0.40), rec("C", 0.60)]
    lines = order_robustness(runs)
    assert lines[0] == "## Class-order robustness: d 3-1 disjoint"
    row = next(l for l in lines if l.startswith("| ft |"))
    # all: identity (0.1 + 0.3) / 2 = 0.2, then 0.2, 0.4, 0.6: mean 40, sample std 20; old: 0.6, 0.5, 0.5
    assert row == "| ft | identity B C | 53.33 ± 5.77 | - | 40.00 ± 20.00 |"
    assert order_robustness(runs[:2]) == []  # one order: no robustness table


def test_prediction_figures_can_be_limited_to_some_methods(runs, tmp_path, capsys):
    from PIL import Image

    write_report(runs, tmp_path / "all", images=1)
    write_report(runs, tmp_path / "mib", images=1, predict_methods=["mib"])
    name = "synthetic_4_2_overlapped_predictions.png"
    rows_all = Image.open(tmp_path / "all" / name).size[1]
    assert Image.open(tmp_path / "mib" / name).size[1] < rows_all  # one method's row, not two
    code = main(["report", *map(str, runs), "--out", str(tmp_path / "bad"), "--predict-methods", "mibb"])
    assert code == 2
    err = capsys.readouterr().err
    assert "mibb" in err and "ft, mib" in err


def test_joint_is_an_upper_bound_of_the_last_step_not_a_step_0_figure(runs, tmp_path):
    from conftest import tiny_config

    joint = train(tiny_config(tmp_path, "method=joint", "name=joint")).run_dir
    res = write_report([*runs, joint], tmp_path / "rep", images=0)
    text = res["markdown"].read_text()
    row = json.loads((joint / "results.jsonl").read_text().splitlines()[-1])
    line = next(l for l in text.splitlines() if l.startswith("| joint |") and "step" not in l
                and l.count("|") == 4)
    assert line == f"| joint | - | {100 * row['miou_all']:.2f} |"  # under the last step only
    assert (tmp_path / "rep" / "synthetic_4_2_overlapped_steps.png").is_file()


def test_runs_of_one_method_with_other_settings_are_not_averaged_as_seeds(runs, tmp_path):
    from conftest import tiny_config

    other = train(tiny_config(tmp_path, "method=mib", "seed=0", "name=mib-kd", "method_args={loss_kd: 5}")).run_dir
    assert load_run(other).label == "mib (loss_kd=5)" and load_run(runs[2]).label == "mib"
    text = write_report([runs[2], other], tmp_path / "rep")["markdown"].read_text()
    assert "| mib | 1 |" in text and "| mib (loss_kd=5) | 1 |" in text
