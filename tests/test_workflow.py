"""The practitioner's workflow: fit a first model from a folder, extend it twice, predict, refuse bad
input without writing anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ciss.cli import main
from ciss.data.synthetic import SyntheticDataset
from ciss.modelfile import load_model
from ciss.workflow import extend, fit, run_dir_for

TINY = ["model.head_channels=16", "optim.epochs=2", "optim.epochs_next=2", "data.crop_size=48",
        "progress=false", "tensorboard=false"]


def write_folder(root: Path, keep: dict[int, str], n: int = 16, seed: int = 0, val: bool = False) -> Path:
    """A folder dataset from synthetic images (6 classes); only the classes of `keep` (synthetic id ->
    name, in classes.txt order) are labelled, every other class is background."""
    ds = SyntheticDataset("train", num_classes=6, size=48, length=n, seed=seed)
    for sub in ("images", "labels", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(["background", *keep.values()]) + "\n")
    lut = np.zeros(256, dtype=np.uint8)
    lut[255] = 255
    for k, src in enumerate(keep, start=1):
        lut[src] = k
    ids = []
    for i in range(n):
        img, mask = ds[i]
        if not (np.isin(mask, list(keep))).any():
            continue
        ids.append(f"{i:03d}")
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(lut[mask], mode="L").save(root / "labels" / f"{i:03d}.png")
    (root / "splits" / ("val.txt" if val else "train.txt")).write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    names = SyntheticDataset("train", num_classes=6, size=48, length=1).classes
    base = write_folder(root / "base", {1: names[1], 2: names[2], 3: names[3]})
    new1 = write_folder(root / "new1", {4: names[4]}, seed=1)
    new2 = write_folder(root / "new2", {5: names[5], 1: names[1]}, seed=2)  # an old class, by name
    val = write_folder(root / "val", {c: names[c] for c in range(1, 5)}, n=8, seed=3, val=True)
    return {"root": root, "names": names, "base": base, "new1": new1, "new2": new2, "val": val}


@pytest.fixture(scope="module")
def models(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base, _ = fit(folders["base"], out / "base.pt", recipe="tiny", overrides=TINY)
    m1, fig1 = extend(out / "base.pt", folders["new1"], out / "m1.pt", recipe="tiny", overrides=TINY,
                      val=folders["val"])
    m2, fig2 = extend(out / "m1.pt", folders["new2"], out / "m2.pt", recipe="tiny", overrides=TINY)
    return {"out": out, "base": base, "m1": m1, "m2": m2, "fig1": fig1, "fig2": fig2}


def test_fit_then_two_extends_know_the_union_with_names_and_lineage(folders, models):
    names = folders["names"]
    assert models["base"].classes == ["background", names[1], names[2], names[3]]
    m1, m2 = load_model(models["out"] / "m1.pt"), load_model(models["out"] / "m2.pt")
    assert m1.classes == models["base"].classes + [names[4]]
    assert m2.classes == m1.classes + [names[5]]  # names[1] was recognised, not added again
    assert m2.model_config["classes_per_step"] == [4, 1, 1]
    assert [e["classes"] for e in m2.lineage] == [[names[1], names[2], names[3]], [names[4]], [names[5]]]
    assert [Path(e["data"]).name for e in m2.lineage] == ["base", "new1", "new2"]
    assert all(e["method"] == "mib" for e in m2.lineage)
    # validation figures only where a val folder was given; old / new / all present
    assert models["fig2"] is None and 0.0 <= models["fig1"]["miou_all"] <= 1.0
    assert len(models["fig1"]["iou"]) == 5


def test_extend_keeps_the_parent_weights_of_old_classifiers_at_start(folders, models):
    run = run_dir_for(models["out"] / "m1.pt")
    start = torch.load(run / "ckpt" / "step-0.pt", weights_only=True)["model"]
    parent = load_model(models["out"] / "base.pt").weights
    assert all(torch.equal(start[k], v) for k, v in parent.items())


def test_predict_and_rerun_resumes_without_training(folders, models, capsys, tmp_path):
    img = next((folders["val"] / "images").iterdir())
    assert main(["predict", str(models["out"] / "m2.pt"), str(img), "--out", str(tmp_path / "p")]) == 0
    label = np.asarray(Image.open(tmp_path / "p" / f"{img.stem}.png"))
    assert label.max() < 6
    assert (tmp_path / "p" / f"{img.stem}_overlay.png").is_file()
    before = (models["out"] / "m1.pt").stat().st_mtime_ns
    m1, _ = extend(models["out"] / "base.pt", folders["new1"], models["out"] / "m1.pt", recipe="tiny",
                   overrides=TINY, val=folders["val"])  # finished run: reused, file rewritten equal
    again = load_model(models["out"] / "m1.pt")
    assert all(torch.equal(again.weights[k], v) for k, v in models["m1"].weights.items())
    assert (models["out"] / "m1.pt").stat().st_mtime_ns >= before


def _refused(capsys, argv, *fragments):
    assert main(argv) != 0
    err = capsys.readouterr().err
    for f in fragments:
        assert f in err, err
    assert "Traceback" not in err


def test_bad_input_is_refused_with_a_message_and_nothing_written(folders, models, capsys, tmp_path):
    out = tmp_path / "x.pt"
    base = str(models["out"] / "base.pt")
    # a folder that names only classes the model knows
    same = write_folder(tmp_path / "same", {1: folders["names"][1]})
    _refused(capsys, ["extend", base, "--data", str(same), "--out", str(out)], "nothing to extend")
    # an empty split
    empty = write_folder(tmp_path / "empty", {4: folders["names"][4]})
    (empty / "splits" / "train.txt").write_text("")
    _refused(capsys, ["extend", base, "--data", str(empty), "--out", str(out)], "train.txt")
    # a label value not in classes.txt
    bad = write_folder(tmp_path / "bad", {4: folders["names"][4]})
    first = sorted((bad / "labels").iterdir())[0]
    Image.fromarray(np.full((48, 48), 7, dtype=np.uint8), mode="L").save(first)
    _refused(capsys, ["extend", base, "--data", str(bad), "--out", str(out)], first.name, "classes.txt")
    # the same name on two lines
    dup = write_folder(tmp_path / "dup", {4: "thing", 5: "Thing"})
    _refused(capsys, ["extend", base, "--data", str(dup), "--out", str(out)], "several lines")
    # an image the backbone cannot take
    small = write_folder(tmp_path / "small", {4: folders["names"][4]})
    im = sorted((small / "images").iterdir())[0]
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(im)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8), mode="L").save(small / "labels" / im.name)
    _refused(capsys, ["extend", base, "--data", str(small), "--out", str(out)], "at least 32")
    # not a model file
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    _refused(capsys, ["extend", str(junk), "--data", str(folders["new1"]), "--out", str(out)], "junk.pt")
    # a memory method needs old images
    _refused(capsys, ["extend", base, "--data", str(folders["new1"]), "--out", str(out), "--method",
                      "ssul_m"], "old images")
    assert not out.exists() and not run_dir_for(out).exists()


def test_export_command_writes_an_onnx_model_matching_pytorch(folders, models, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "m2.onnx"
    assert main(["export", str(models["out"] / "m2.pt"), "--out", str(out)]) == 0
    mf = load_model(models["out"] / "m2.pt")
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ref = mf.decision_logits(mf.build()(x)).numpy()
    got = ort.InferenceSession(str(out)).run(None, {"image": x.numpy()})[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
