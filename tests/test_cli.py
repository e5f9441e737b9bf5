import json

import numpy as np
from PIL import Image

from ciss.cli import main


def _tiny_sets(tmp_path, name="cli"):
    sets = ["data.dataset=synthetic", "data.task=4-2",
            "data.options={num_classes: 6, size: 32, length: 16}", "data.crop_size=32",
            "optim.epochs=1", f"out_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
            f"name={name}", "progress=false", "tensorboard=false"]
    return [a for s in sets for a in ("--set", s)]


def test_list_commands(capsys):
    for what, expected in [("methods", "ft"), ("datasets", "folder"), ("backbones", "efficientnet_lite0"),
                           ("tasks", "15-1")]:
        assert main(["list", what]) == 0
        assert expected in capsys.readouterr().out.split()


def test_train_eval_predict(tmp_path, capsys):
    assert main(["train", "--recipe", "tiny", *_tiny_sets(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run directory" in out and "0-4" in out
    run = tmp_path / "runs" / "cli"
    last_row = (run / "table.txt").read_text().splitlines()[-1]
    assert out.count(last_row) == 1  # each step's row is printed once
    rows = [json.loads(l) for l in (run / "results.jsonl").read_text().splitlines()]

    assert main(["eval", str(run)]) == 0
    table = capsys.readouterr().out
    assert f"{100 * rows[-1]['miou_all']:6.2f}" in table  # same checkpoint, same figure
    assert "confusion" in rows[-1]  # every evaluation records its confusion matrix
    assert main(["eval", str(run), "--step", "1", "--errors"]) == 0
    errors = capsys.readouterr().out
    assert "recall | precision" in errors
    n = len(rows[-1]["iou"])
    assert sum(1 for l in errors.splitlines() if l.count("|") == 5) == n + 1  # header + one per class

    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(img)
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "pred")]) == 0
    label = np.asarray(Image.open(tmp_path / "pred" / "a.png"))
    assert label.shape == (40, 48) and label.max() < 7
    overlay = Image.open(tmp_path / "pred" / "a_overlay.png")
    assert overlay.size[0] > 48 and overlay.size[1] >= 40  # image plus legend

    # two inputs of one stem are refused before anything is written, never overwritten silently
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "b" / "a.png")
    assert main(["predict", str(run), str(img), str(tmp_path / "b" / "a.png"), "--out", str(tmp_path / "p2")]) == 2
    assert "would both be written as" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()


def test_bad_input_gives_message_not_traceback(tmp_path, capsys):
    assert main(["train", "--set", "optim.nope=1"]) == 2
    assert "unknown config key 'optim.nope'" in capsys.readouterr().err
    assert main(["train", "--recipe", "tiny", *_tiny_sets(tmp_path), "--set", "method=nope"]) == 2
    assert "valid: " in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a ciss run directory" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()  # a failed command writes nothing
    assert main(["predict", str(tmp_path / "missing"), "x.png", "--out", str(tmp_path / "p")]) == 2
    assert "not a ciss run directory" in capsys.readouterr().err
