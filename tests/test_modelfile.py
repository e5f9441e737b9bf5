"""The self-describing model file: from a run, round trip, refusals, prediction from it."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ciss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ciss.engine import train
from ciss.modelfile import FORMAT, ModelFile, load_model
from ciss.predict import Predictor
from ciss.results import load_checkpoint

from conftest import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained two-step SSUL run (its decision rule folds an extra 'unknown' output into bg)."""
    tmp = tmp_path_factory.mktemp("modelfile")
    return train(tiny_config(tmp, "method=ssul", "data.resize=36", "name=mf")).run_dir


def _image(h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _decision(mf: ModelFile, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return mf.decision_logits(mf.build()(x))


def test_from_run_describes_the_last_step(run_dir):
    mf = ModelFile.from_run(run_dir)
    state = load_checkpoint(run_dir / "ckpt" / "step-1.pt")
    assert mf.model_config == state["model_config"] and mf.step == 1
    assert mf.model_config["classes_per_step"] == [5, 2] and mf.model_config["num_extra"] == 1
    assert all(torch.equal(mf.weights[k], v) for k, v in state["model"].items())
    assert len(mf.classes) == 7 and mf.classes[0] == "background"
    assert (mf.method, mf.resize, mf.crop_size) == ("ssul", 36, 32)
    assert mf.mean == list(IMAGENET_MEAN) and mf.std == list(IMAGENET_STD)
    sha = json.loads((run_dir / "meta.json").read_text())["git_sha"] or ""
    assert [e["step"] for e in mf.lineage] == [0, 1]
    assert mf.lineage[0]["classes"] == mf.classes[:5] and mf.lineage[1]["classes"] == mf.classes[5:]
    assert all(e["method"] == "ssul" and e["git"] == sha and e["dataset"] == "synthetic" and e["date"]
               for e in mf.lineage)
    first = ModelFile.from_run(run_dir, step=0)
    assert first.step == 0 and first.classes == mf.classes[:5] and len(first.lineage) == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5"):
        ModelFile.from_run(run_dir, step=5)


def test_save_load_round_trip(run_dir, tmp_path):
    mf = load_model(run_dir)  # a run directory goes through from_run
    path = mf.save(tmp_path / "model.ciss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ciss"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and isinstance(raw, dict)
    back = load_model(path)
    assert back.classes == mf.classes and back.lineage == mf.lineage
    for name in ("model_config", "method", "method_args", "resize", "crop_size", "mean", "std"):
        assert getattr(back, name) == getattr(mf, name), name
    assert back.weights.keys() == mf.weights.keys()
    assert all(torch.equal(back.weights[k], v) for k, v in mf.weights.items())
    x = torch.randn(2, 3, 32, 40)
    assert torch.equal(_decision(back, x), _decision(mf, x))


def test_predictor_from_model_file_matches_run_directory(run_dir, tmp_path):
    path = load_model(run_dir).save(tmp_path / "model.ciss")
    from_run, from_file = Predictor(run_dir), Predictor(path)
    assert (from_file.step, from_file.num_classes) == (from_run.step, from_run.num_classes) == (1, 7)
    assert from_file.class_names == from_run.class_names
    for seed, (h, w) in enumerate([(40, 48), (23, 61)]):
        image = _image(h, w, seed)
        assert np.array_equal(from_file.predict(image), from_run.predict(image))
    Image.fromarray(_image()).save(tmp_path / "a.png")
    written = from_file.predict_files([tmp_path / "a.png"], tmp_path / "pred")
    assert [p.name for p in written] == ["a.png", "a_overlay.png"]
    assert Predictor(run_dir, step=0).num_classes == 5
    with pytest.raises(ValueError, match="holds step 1 only"):
        Predictor(path, step=0)


def test_predict_preprocesses_as_evaluation_does(run_dir):
    """ciss predict brings an image to the trained scale as training and evaluation do (PIL bilinear
    on the uint8 image, then normalisation), and the ONNX metadata states that rule."""
    from ciss.data.transforms import EvalTransform, Resized
    from ciss.export import preprocessing

    pred = Predictor(run_dir)
    mf = pred.model_file
    image = _image(40, 61, 3)
    x, _ = Resized(EvalTransform(None), mf.resize)(image, np.zeros((40, 61), np.uint8))
    assert x.shape[-2:] == (36, 55)
    logits = torch.nn.functional.interpolate(_decision(mf, x[None]), size=(40, 61), mode="bilinear",
                                             align_corners=False)
    assert np.array_equal(pred.predict(image), logits.argmax(1)[0].numpy().astype(np.uint8))
    text = preprocessing(mf)
    assert "resize = 36" in text and "Image.BILINEAR" in text and "round(h * k)" in text
    assert str(list(mf.mean)) in text and "argmax" in text


class _Boom:
    """Unpickling this would create a directory: proof that loading ran foreign code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _saved(tmp_path, obj):
    path = tmp_path / "bad.ciss"
    torch.save(obj, path)
    return path


def test_refuses_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_model(tmp_path / "nope.ciss")


def test_refuses_arbitrary_python_objects_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    path = _saved(tmp_path, {"format": FORMAT, "payload": _Boom(marker)})
    with pytest.raises(ValueError, match="arbitrary Python objects") as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    (tmp_path / "junk.ciss").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a ciss model file"):
        load_model(tmp_path / "junk.ciss")


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("format"), "no 'format' entry"),
    (lambda s: s.update(format="ciss-model-v0"), "format 'ciss-model-v0'.*re-export"),
    (lambda s: s.update(format="ciss-checkpoint-v1"), "pass its run directory"),
    (lambda s: s.pop("lineage"), "lacks lineage"),
    (lambda s: s.update(classes=s["classes"][:-1]), "6 class names for 7 classes"),
    (lambda s: s["weights"].pop("classifier.extra.bias"), "missing: classifier.extra.bias"),
    (lambda s: s["weights"].update({"classifier.extra.bias": torch.zeros(3)}), "wrong shape"),
    (lambda s: s["model_config"].update(classes_per_step=[5, 3]), "8 classes"),
    (lambda s: s["model_config"].update(classes_per_step=[4, 3]), "wrong shape: classifier.convs"),
    (lambda s: s["model_config"].update(backbone="nope"), "bad model_config"),
])
def test_refuses_malformed_files(run_dir, tmp_path, change, message):
    state = load_model(run_dir).to_dict()
    change(state)
    path = _saved(tmp_path, state)
    with pytest.raises(ValueError, match=message) as err:
        load_model(path)
    assert str(path) in str(err.value)



def test_a_swapped_checkpoint_is_refused_naming_the_file(run_dir, tmp_path):
    import shutil

    from ciss.evaluation import evaluate_run

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.copy(copy / "ckpt" / "step-0.pt", copy / "ckpt" / "step-1.pt")  # step 0's file as step 1
    with pytest.raises(ValueError, match=r"step-1.pt is not this run's checkpoint of step 1: it holds step 0"):
        Predictor(copy, step=1)
    with pytest.raises(ValueError, match="step-1.pt is not this run's checkpoint"):
        evaluate_run(copy, step=1)
    other = train(tiny_config(tmp_path, "method=ssul", "data.resize=36", "name=wide",
                              "model.head_channels=24", "optim.epochs=1"))
    shutil.copy(other.run_dir / "ckpt" / "step-1.pt", copy / "ckpt" / "step-1.pt")
    with pytest.raises(ValueError, match=r"head_channels 24 \(the run's: 32\)"):
        Predictor(copy, step=1)
