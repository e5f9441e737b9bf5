"""benchmarks/ccp21_table.py keeps a run's small files, calibration rows included, and no checkpoint."""

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
