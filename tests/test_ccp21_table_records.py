"""benchmarks/ccp21_table.py keeps a run's small files, calibration rows included, and no checkpoint."""

import json

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
