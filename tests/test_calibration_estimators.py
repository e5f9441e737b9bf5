"""The estimators of gamma on hand-made logits whose gamma is known in closed form (alg, alg_all,
share, agree), the image split rule, pcv's pseudo fine-tune (a copy of the step's starting model
changes, the trained and the old model do not), and every calibrator on a sigmoid method."""

import hashlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ciss.calibration import (
    CALIBRATORS,
    ALG,
    PCV,
    Agree,
    ALGAll,
    Share,
    build_calibrator,
    held_out_image,
    share_gamma,
)
from ciss.types import IGNORE, Batch, SegOutput, StepContext

# 3 old classes (background, 1, 2) then 2 new ones (3, 4): absent U = {1, 2}, S = {0, 3, 4}.
CTX = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)


def _pixels(rows):
    """(1, C, 1, N) logits from N rows of C values."""
    z = torch.tensor(rows, dtype=torch.float32)
    return z.T.reshape(1, z.shape[1], 1, z.shape[0])


def _fit(cal, logits, label, old_logits, ctx=CTX):
    return cal.fit([Batch(image=logits, label=label)], lambda x: x, ctx, lambda x: old_logits)


def test_alg_leaves_out_background_pixels_the_old_model_calls_old():
    logits = _pixels([[1.0, 0.0, 2.0, 4.0, 6.0],   # label 0, old: bg.  S\{0} = {3, 4}: 5 ; U mean 1 -> 4
                      [3.0, -1.0, 1.0, 9.0, 7.0],  # label 3, old: 1.   S\{3} = {0, 4}: 5 ; U mean 0 -> 5
                      [5.0, 4.0, 0.0, 0.0, 0.0],   # label 0, old: 1 (an old object): 0 - 2 -> -2
                      [9.0, 9.0, 9.0, 9.0, 9.0]])  # ignored
    label = torch.tensor([[[0, 3, 0, IGNORE]]])
    old = _pixels([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    assert _fit(ALG(), logits, label, old) == pytest.approx((4.0 + 5.0) / 2)
    assert _fit(ALGAll(), logits, label, old) == pytest.approx((4.0 + 5.0 - 2.0) / 3)
    alg = ALG()
    _fit(alg, logits, label, old)
    assert alg.info == {"pixels": 2}


def _background_with_gaps(gaps):
    """Background-labelled pixels whose logit gap (best of S - best of U) is each of `gaps`."""
    rows = [[d, 0.0, -1.0, -100.0, -100.0] for d in gaps]
    return _pixels(rows)


def test_share_is_the_gap_quantile_that_gives_old_classes_the_old_models_share():
    gaps = [3.0, -1.0, 0.5, 7.0, 2.0, 10.0]
    logits = torch.cat([_background_with_gaps(gaps), _pixels([[0.0, 50.0, 0.0, 1.0, 0.0]])], dim=3)
    label = torch.tensor([[[0, 0, 0, 0, 0, 0, 3]]])  # the new-class pixel is not counted
    confident_old = [0.0, 10.0, 0.0]
    unsure_old = [0.0, 0.5, 0.0]  # class 1 at probability ~0.45: not confident
    old = _pixels([confident_old, [10.0, 0.0, 0.0], unsure_old, [10.0, 0.0, 0.0], confident_old,
                   [10.0, 0.0, 0.0], confident_old])
    share = Share(threshold=0.7)
    g = _fit(share, logits, label, old)
    assert g == pytest.approx((0.5 + 2.0) / 2)  # k = 2: between the 2nd and 3rd smallest gap
    pred = share.apply(logits, CTX).argmax(1)[0, 0, :6]
    assert int((pred != 0).sum()) == 2  # exactly as many as the old model's confident ones
    assert share.info["background_pixels"] == 6 and share.info["old_share"] == pytest.approx(2 / 6)
    # by default the old model's argmax counts, the unsure pixel too: k = 3
    assert _fit(Share(), logits, label, old) == pytest.approx((2.0 + 3.0) / 2)
    t = torch.tensor(gaps)
    assert share_gamma(t, 0) == -1.0 and share_gamma(t, 6) > 10.0 and share_gamma(t, 3) == 2.5
    assert share_gamma(torch.zeros(0), 0) == 0.0


def _agree_case(new_gap):
    old_object, background = [2.0, 0.0, -50.0, -50.0, -50.0], [6.0, 0.0, -50.0, -50.0, -50.0]
    new_pixel = [-50.0, 0.0, -50.0, new_gap, -50.0]
    logits = _pixels([old_object, old_object, background, background, new_pixel, new_pixel])
    label = torch.tensor([[[0, 0, 0, 0, 3, 3]]])
    old = _pixels([[0.0, 10.0, 0.0]] * 2 + [[10.0, 0.0, 0.0]] * 4)
    return logits, label, old


def test_agree_flips_the_old_objects_while_the_new_classes_stay_right():
    logits, label, old = _agree_case(new_gap=4.0)
    agree = Agree()
    g = _fit(agree, logits, label, old)
    assert 2.0 < g <= 4.0  # old objects (gap 2) flip; new pixels (gap 4) and background (gap 6) do not
    assert agree.apply(logits, CTX).argmax(1)[0, 0].tolist() == [1, 1, 0, 0, 3, 3]
    # when every gamma that reaches the old objects costs new-class pixels, none is taken
    logits, label, old = _agree_case(new_gap=1.0)
    assert _fit(Agree(), logits, label, old) <= 1.0


def test_the_split_rule_is_a_fixed_hash_of_the_image_index_and_halves_the_images():
    ids = range(2000)
    held = [held_out_image(i) for i in ids]
    assert 0.45 < np.mean(held) < 0.55
    assert held == [bool(hashlib.sha256(str(i).encode()).digest()[0] & 1) for i in ids]
    assert held_out_image(np.int64(17)) == held_out_image(17)
    assert PCV().held_out(17) == held_out_image(17)


class _Pixelwise(torch.nn.Module):
    """A 1x1 conv as a segmenter: images (B, 3, H, W) -> 5 logits per pixel."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return SegOutput(logits=self.conv(x), features={})


OPTIM = SimpleNamespace(lr_next=0.5, momentum=0.9, nesterov=False, weight_decay=0.0, poly_power=0.9,
                        amp="none")


def _tune_batches():
    torch.manual_seed(0)
    image = torch.randn(4, 3, 6, 6)
    label = torch.where(image[:, 0] > 0, 3, 0)  # new class 3 where channel 0 is positive
    return lambda epoch: [Batch(image=image, label=label)]


def test_pcv_tune_trains_the_model_it_is_given_with_plain_ce():
    torch.manual_seed(0)
    model = _Pixelwise()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pcv = PCV()
    pcv.tune(model, _tune_batches(), StepContext(step=1, classes_per_step=(3, 2), num_steps=2, epochs=4), OPTIM)
    assert not torch.equal(before["conv.weight"], model.conv.weight)
    info = pcv.info
    assert info["tune_epochs"] == 4 and info["tune_lr"] == 0.5  # None: the step's epochs and lr_next
    assert info["tune_iterations"] == 4 and info["tune_images"] == 4 and info["tune_s"] > 0
    assert info["tune_losses"][-1] < info["tune_losses"][0]
    assert not model.training and model.conv.weight.requires_grad
    with pytest.raises(ValueError, match="diverged"):
        PCV(epochs=2, lr=math.inf).tune(_Pixelwise(), _tune_batches(), CTX, OPTIM)


def test_pcv_fine_tunes_a_copy_of_the_steps_starting_model_and_nothing_else(tiny_cfg, monkeypatch):
    from ciss.engine import Experiment, train
    import ciss.engine.evaluator as evaluator

    # lr_next ~ 0: the trained step-1 model still holds the step's initial new rows
    res = train(tiny_cfg("optim.lr_next=1e-12"))
    exp = Experiment(tiny_cfg("optim.lr_next=1e-12"), res.run_dir)
    old, trained = exp.load_step_model(0), exp.load_step_model(1)
    old_state = {k: v.clone() for k, v in old.state_dict().items()}
    trained_state = {k: v.clone() for k, v in trained.state_dict().items()}

    start = exp.evaluator.step_start_model(old, 1)
    torch.testing.assert_close(start.classifier.convs[-1].weight, trained.classifier.convs[-1].weight,
                               atol=1e-6, rtol=0)  # the step's own random draw, reproduced
    assert torch.equal(start.classifier.convs[0].weight, old.classifier.convs[0].weight)

    seen = {}
    tune = PCV.tune

    def spy(self, model, batches, ctx, optim, autocast=None):
        seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["model"] = model
        tune(self, model, batches, ctx, optim, autocast)
        seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(PCV, "tune", spy)
    monkeypatch.setattr(evaluator, "build_calibrator", lambda name: PCV(lr=0.05))
    pcv = exp.evaluator.fit_calibrators(trained, old, 1, ["pcv"])["pcv"]
    assert seen["model"] is not trained and seen["model"] is not old
    assert any(not torch.equal(seen["before"][k], seen["after"][k]) for k in seen["after"])
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in trained_state.items())
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in old_state.items())
    assert math.isfinite(pcv.gamma) and pcv.info["held_out_images"] > 0
    images = exp.scenario.train_indices(1)
    assert pcv.info["held_out_images"] == sum(held_out_image(i) for i in images)
    assert pcv.info["tune_images"] == len(images) - pcv.info["held_out_images"]
    # variants of one training setup share one fine-tune; each reads the held-out half its own way
    seen.clear()
    calls = []
    monkeypatch.setattr(PCV, "tune", lambda self, *a, **k: calls.append(self) or tune(self, *a, **k))
    both = exp.evaluator.fit_calibrators(trained, old, 1, {"a": PCV(lr=0.05), "b": PCV(lr=0.05, ignore_unsure=False)})
    assert len(calls) == 1 and both["a"].info["tune_s"] == both["b"].info["tune_s"]
    assert both["a"].gamma == pytest.approx(pcv.gamma)  # the same copy, redrawn from the same seeds


def test_every_calibrator_runs_on_a_sigmoid_method(tiny_cfg, tmp_path, monkeypatch):
    """SSUL decides on log-sigmoid scores (its unknown folded into background): gamma is added to
    those, i.e. the absent classes' sigmoid scores are multiplied by exp(gamma)."""
    from ciss.engine import train
    from ciss.results import RunDir

    monkeypatch.setenv("CISS_CACHE", str(tmp_path / "ciss-cache"))
    res = train(tiny_cfg("method=ssul", f"calibration={','.join(CALIBRATORS)}"))
    row = RunDir(res.run_dir, create=False).read_jsonl("results.jsonl")[1]
    assert set(row["calibrated"]) == set(CALIBRATORS)
    for name, cal in row["calibrated"].items():
        assert math.isfinite(cal["gamma"]), name
        if cal["gamma"] == 0.0:
            assert cal["iou"] == row["iou"], name


def test_every_registered_calibrator_is_built_by_its_name():
    for name, cls in CALIBRATORS.items():
        cal = build_calibrator(name)
        assert type(cal) is cls and cal.name == name and cal.gamma == 0.0
        if cal.needs_training:
            assert callable(cal.held_out) and callable(cal.tune) and callable(cal.tuned_logits)
    with pytest.raises(ValueError, match="choose from"):
        build_calibrator("temperature")


def test_the_old_model_carries_the_calibrators_own_gamma_of_the_step_before(tiny_cfg):
    """After step 2, `share` reads the step-1 model calibrated by share's step-1 gamma (fitted and
    stored there first when missing); `pcv_fit`, as first defined, reads it raw."""
    from ciss.engine import train
    from ciss.evaluation import evaluate_run
    from ciss.results import load_checkpoint

    res = train(tiny_cfg("data.task=4-1"))  # three steps
    evaluate_run(res.run_dir, step=2, calibration="share,pcv_fit")
    ckpt = res.run_dir / "ckpt"
    s1 = load_checkpoint(ckpt / "step-1.pt")["calibration"]
    s2 = load_checkpoint(ckpt / "step-2.pt")["calibration"]
    assert set(s1) == {"share"} and set(s2) == {"share", "pcv_fit"}
    assert s2["share"]["info"]["old_gamma"] == s1["share"]["gamma"]
    assert "old_gamma" not in s1["share"]["info"] or s1["share"]["info"]["old_gamma"] == 0.0
    assert "old_gamma" not in s2["pcv_fit"].get("info", {})
    assert build_calibrator("share").matches(s1["share"])


def test_pseudo_labels_mark_confident_old_pixels_and_can_ignore_unsure_ones():
    from ciss.calibration import pseudo_labelled

    label = torch.tensor([[[0, 0, 0, 3]]])
    old = _pixels([[0.0, 10.0, 0.0],   # confident class 1 -> 1
                   [0.0, 0.5, 0.0],    # class 1 at ~0.45 -> background, or ignored
                   [10.0, 0.0, 0.0],   # background stays
                   [0.0, 10.0, 0.0]])  # a labelled new-class pixel is never relabelled
    assert pseudo_labelled(label, old, 0.7).tolist() == [[[1, 0, 0, 3]]]
    assert pseudo_labelled(label, old, 0.7, ignore_unsure=True).tolist() == [[[1, IGNORE, 0, 3]]]


def test_pcv_method_trains_a_copy_as_the_runs_method_does_from_its_stored_state(tiny_cfg, monkeypatch):
    """`pcv_method`'s pseudo step is the run's method: EWC's loss, with the Fisher information the
    step-0 checkpoint stored (its on_step_start refuses to run without it), on a copy of the method;
    the run's method, trained and old models are untouched and the held-out half is scored."""
    from ciss.engine import Experiment, train
    from ciss.methods.ewc import EWC

    cfg = tiny_cfg("method=ewc", "method_args={reg_importance: 10}")
    res = train(cfg)
    exp = Experiment(cfg, res.run_dir)
    old, trained = exp.load_step_model(0), exp.load_step_model(1)
    old_state = {k: v.clone() for k, v in old.state_dict().items()}
    trained_state = {k: v.clone() for k, v in trained.state_dict().items()}
    exp.method.fisher = None  # the evaluator's own method holds no state: the copy must read it from step 0
    calls = []
    loss = EWC.loss

    def spy(self, out, targets, old_out, batch, ctx):
        terms = loss(self, out, targets, old_out, batch, ctx)
        calls.append((self, sorted(terms), ctx.step))
        return terms

    monkeypatch.setattr(EWC, "loss", spy)
    cal = exp.evaluator.fit_calibrators(trained, old, 1, ["pcv_method"])["pcv_method"]
    assert calls and all(m is not exp.method and isinstance(m, EWC) for m, _, _ in calls)
    assert all(terms == ["ce", "ewc", "loss"] and step == 1 for _, terms, step in calls)
    assert exp.method.fisher is None
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in trained_state.items())
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in old_state.items())
    images = exp.scenario.train_indices(1)
    assert cal.info["held_out_images"] == sum(held_out_image(i) for i in images) > 0
    assert cal.info["tune_images"] == len(images) - cal.info["held_out_images"]
    assert cal.info["tune_s"] > 0 and len(cal.info["tune_losses"]) == cal.info["tune_epochs"]
    assert math.isfinite(cal.gamma)
    # plain pcv trains its copy with its own CE loop: the method's loss is never called
    calls.clear()
    exp.evaluator.fit_calibrators(trained, old, 1, ["pcv"])
    assert calls == []


def test_pcv_method_composes_a_memory_methods_batches_with_the_runs_seed(tiny_cfg):
    """SSUL-M's pseudo step mixes its memory into the batches as the run does; the sampler and
    the memory take the run's seed (a derived 63-bit seed is out of NumPy's range)."""
    from ciss.engine import Experiment, train

    cfg = tiny_cfg("method=ssul_m", "method_args={memory_size: 4}", "seed=3")
    res = train(cfg)
    exp = Experiment(cfg, res.run_dir)
    old, trained = exp.load_step_model(0), exp.load_step_model(1)
    cal = exp.evaluator.fit_calibrators(trained, old, 1, ["pcv_method"])["pcv_method"]
    assert math.isfinite(cal.gamma)
    images = exp.scenario.train_indices(1)
    # the memory's images come on top of the pseudo-fine-tuning part of the step's own images
    assert cal.info["tune_images"] == len(images) - cal.info["held_out_images"] + 4


def test_pcv_method_trains_ssul_on_its_pseudo_fine_tuning_part_only(tiny_cfg):
    """SSUL builds its unknown-marked data from the images it is given, so the pseudo step never
    trains on the held-out half that chooses gamma."""
    from ciss.engine import Experiment, train

    cfg = tiny_cfg("method=ssul")
    res = train(cfg)
    exp = Experiment(cfg, res.run_dir)
    old, trained = exp.load_step_model(0), exp.load_step_model(1)
    cal = exp.evaluator.fit_calibrators(trained, old, 1, ["pcv_method"])["pcv_method"]
    images = exp.scenario.train_indices(1)
    assert 0 < cal.info["held_out_images"] < len(images)
    assert cal.info["tune_images"] == len(images) - cal.info["held_out_images"]


def test_pcv_method_after_the_run_is_evaluated_step_by_step(tiny_cfg):
    """`ciss eval --calibration pcv_method` loads each step's method state into the run's method
    before fitting; the pseudo step must start from the previous step's state alone (NeST's
    generated step, left at the later step, skipped its matrices)."""
    from ciss.engine import train
    from ciss.evaluation import evaluate_run

    cfg = tiny_cfg("method=nest_mib", "method_args={pretune_epochs: 1}")
    res = train(cfg)
    text = evaluate_run(res.run_dir, calibration=["pcv_method"])
    assert "+pcv_method" in text
