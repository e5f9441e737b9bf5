"""benchmarks/ccp21_table.py keeps a run's small files, calibration rows included, and no checkpoint."""

import json

import pytest

from conftest import load_benchmark


def test_keep_copies_records_and_posthoc_but_not_checkpoints(tmp_path):
    table = load_benchmark("ccp21_table")
    run = tmp_path / "runs" / "ccp21-15-1-overlapped-ft"
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / "step0.pt").write_bytes(b"weights")
    for name, text in [("summary.json", "{}"), ("results.jsonl", '{"step": 0}\n'),
                       ("posthoc.jsonl", '{"step": 1, "old": 1}\n{"step": 0}\n{"step": 1, "calibrated": {}}\n')]:
        (run / name).write_text(text)
    records = tmp_path / "records"
    table.keep(tmp_path / "runs", records, [run.name])
    kept = records / run.name
    assert sorted(p.name for p in kept.iterdir()) == ["posthoc.jsonl", "results.jsonl", "summary.json"]
    # an evaluation appends its rows: the record keeps the last one of each step, in step order
    assert (kept / "posthoc.jsonl").read_text() == '{"step": 0}\n{"step": 1, "calibrated": {}}\n'
    table.keep(records, records, [run.name])  # records onto themselves: a no-op, not an error
    assert (kept / "summary.json").read_text() == "{}"


def test_a_page_shows_the_command_each_run_was_started_with(tmp_path):
    table = load_benchmark("ccp21_table")
    run = tmp_path / "ccp21-15-1-overlapped-plop-bn_batch"
    run.mkdir()
    assert table.recorded_command(run) is None  # no meta.json: the page builds the command itself
    argv = ["/x/src/ciss/cli.py", "train", "--set", f"data.root={table.DATA}", "--set", "method=plop",
            "--set", "out_dir=/scratch/ciss_runs/ccp21_v2"]
    (run / "meta.json").write_text(json.dumps({"argv": argv}))
    assert table.recorded_command(run) == ["ciss", "train", "--set", "data.root=../shared/datasets/ccp21",
                                           "--set", "method=plop", "--set", "out_dir=runs/ccp21_v2"]
    (run / "meta.json").write_text(json.dumps({"argv": ["/venv/bin/ciss", "bench", "g.yaml", "--only", "*-ewc"]}))
    assert table.recorded_command(run) == ["ciss", "bench", "g.yaml", "--only", "*-ewc"]


def test_a_page_reads_each_run_from_the_first_folder_that_holds_it(tmp_path, monkeypatch):
    table = load_benchmark("ccp21_table")
    if not table.DATA.is_dir():
        pytest.skip("needs the shared ccp21 folder")
    step = {"miou_old": 0.5, "miou_new": None, "miou_all": 0.5, "num_base": 2, "iou": [0.4, 0.6],
            "class_names": ["background", "a"]}
    for folder, method, all_ in (("a", "plop", 0.25), ("b", "plop", 0.75), ("b", "mib", 0.5)):
        run = tmp_path / folder / f"ccp21-15-1-overlapped-{method}"
        run.mkdir(parents=True)
        summary = {"steps": [dict(step, miou_all=all_)], "wall_time_s": 1.0, "peak_rss_mb": 1.0}
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "results.jsonl").write_text('{"step": 0, "wall_time_s": 1.0}\n')
        (run / "config.yaml").write_text(f"method: {method}\n")
    out, records = tmp_path / "page.md", tmp_path / "records"
    monkeypatch.setattr("sys.argv", ["ccp21_table.py", "--report-only", "--methods", "plop", "mib",
                                     "--runs", str(tmp_path / "a"), str(tmp_path / "b"),
                                     "--out", str(out), "--records", str(records)])
    assert table.main() == 0
    page = out.read_text()
    assert "| plop | 50.00 | - | 25.00 |" in page and "| mib | 50.00 | - | 50.00 |" in page  # plop: a's
    assert json.loads((records / "ccp21-15-1-overlapped-plop" / "summary.json").read_text())[
        "steps"][0]["miou_all"] == 0.25
    assert (records / "ccp21-15-1-overlapped-mib" / "summary.json").is_file()  # from b
