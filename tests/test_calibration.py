"""Post-hoc calibration: gamma on the absent classes, ALG on every pixel, PCV on the training pixels,
the exact gamma sweep, and calibration in runs (see also tests/test_calibration_estimators.py)."""

import math

import numpy as np
import pytest
import torch

from ciss.calibration import (
    CALIBRATORS,
    ALGAll,
    PCVFit,
    GammaSweep,
    alg_sums,
    apply_gamma,
    area_under,
    build_calibrator,
    parse_calibration,
    tradeoff_curve,
)
from ciss.metrics import ConfusionMatrix
from ciss.results import RunDir, load_checkpoint
from ciss.types import IGNORE, Batch, StepContext

# 3 old classes (background, 1, 2) then 2 new ones (3, 4): absent U = {1, 2}, S = {0, 3, 4}.
CTX = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)


def test_gamma_zero_leaves_predictions_unchanged_and_only_absent_logits_move():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 4, 4)
    assert torch.equal(apply_gamma(z, 0.0, CTX.num_old).argmax(1), z.argmax(1))
    out = apply_gamma(z, 2.5, CTX.num_old)
    assert torch.equal(out[:, [0, 3, 4]], z[:, [0, 3, 4]])  # background and new classes untouched
    torch.testing.assert_close(out[:, 1:3], z[:, 1:3] + 2.5)
    assert not torch.equal(out, z) and z.equal(z)  # a copy: the input is not modified


def test_alg_gamma_equals_a_hand_computed_value():
    # two labelled pixels and one ignored
    z = torch.tensor([[1.0, 0.0, 2.0, 4.0, 6.0],  # label 0 (bg): S\{0} = {3, 4}: 5.0 ; U mean 1.0
                      [3.0, -1.0, 1.0, 9.0, 5.0],  # label 3: S\{3} = {0, 4}: 4.0 ; U mean 0.0
                      [9.0, 9.0, 9.0, 9.0, 9.0]])  # ignored
    logits = z.T.reshape(1, 5, 1, 3)
    label = torch.tensor([[[0, 3, IGNORE]]])
    total, n = alg_sums(logits, label, num_old=3)
    assert n == 2 and total == pytest.approx((5.0 - 1.0) + (4.0 - 0.0))
    alg = ALGAll()
    batches = [Batch(image=logits, label=label)]
    assert alg.fit(batches, lambda x: x, CTX) == pytest.approx(4.0)
    assert alg.state_dict() == {"name": "alg_all", "version": 1, "gamma": 4.0, "info": {"pixels": 2}}


@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_calibrators_do_nothing_at_step_0(name):
    ctx0 = StepContext(step=0, classes_per_step=(3,), num_steps=2)
    batches = [Batch(image=torch.randn(1, 3, 2, 2), label=torch.zeros(1, 2, 2, dtype=torch.long))]
    assert build_calibrator(name).fit(batches, lambda x: x, ctx0, lambda x: x) == 0.0


def _argmax_cm(z, label, gamma, num_old, c):
    cm = ConfusionMatrix(c)
    cm.update(apply_gamma(z, gamma, num_old).argmax(1), label)
    return cm.mat


def test_sweep_matrices_equal_brute_force_argmax_at_every_gamma():
    torch.manual_seed(1)
    z = 3 * torch.randn(2, 5, 6, 7)
    label = torch.randint(0, 5, (2, 6, 7))
    label[0, :2] = IGNORE
    grid = torch.tensor([-4.0, -1.0, -0.3, 0.0, 0.5, 2.0, 7.0])
    sweep = GammaSweep(5, 3, grid)
    sweep.update(z[:1], label[:1])  # streaming over two batches
    sweep.update(z[1:], label[1:])
    mats = sweep.matrices()
    gammas = sweep.gammas()
    assert len(mats) == len(gammas) == len(grid) + 2
    for g, m in zip(gammas, mats):
        assert torch.equal(m, _argmax_cm(z, label, g if math.isfinite(g) else 1e4 * np.sign(g), 3, 5)), g


def test_tradeoff_curve_runs_from_axis_to_axis_and_area_is_the_trapezoid():
    torch.manual_seed(2)
    z = torch.randn(1, 5, 8, 8)
    label = torch.randint(0, 5, (1, 8, 8))
    sweep = GammaSweep(5, 3)
    sweep.update(z, label)
    curve = tradeoff_curve(sweep)
    assert curve["miou_u"][0] == 0.0  # -inf: absent classes never predicted
    assert curve["miou_s"][-1] == 0.0  # +inf: every pixel goes to an absent class
    assert 0.0 < curve["ausuc"] <= 1.0
    # a square curve (1, 0) -> (1, 1) -> (0, 1) has area 1; a diagonal 0.5
    assert area_under(np.array([1.0, 1.0, 0.0]), np.array([0.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert area_under(np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.5, 1.0])) == pytest.approx(0.5)
    # a curve that folds back: only its upper envelope counts
    x, y = np.array([1.0, 0.9, 0.5, 0.0]), np.array([0.0, 0.8, 0.3, 0.3])
    assert area_under(x, y) == pytest.approx(0.8 * 0.9 + 0.4 * 0.1)


def test_pcv_pseudo_labels_background_with_confident_old_predictions_and_picks_the_best_gamma():
    # The current model under-scores the absent class 1: its pixels (background in the step's labels,
    # class 1 for the confident old model) are predicted background until gamma > 1.
    torch.manual_seed(0)
    h = w = 6
    truth = torch.zeros(1, h, w, dtype=torch.long)
    truth[0, :2] = 1  # an old object, unlabelled in the step's data
    truth[0, 4:] = 3  # the new class, labelled
    step_label = torch.where(truth == 1, torch.zeros_like(truth), truth)
    onehot = torch.nn.functional.one_hot(truth, 5).permute(0, 3, 1, 2).float()
    new_logits = 5 * onehot
    new_logits[:, 1] -= 3.0 * (truth == 1).float() + 3.0  # the old object's logit: -1, elsewhere -3
    new_logits[:, 2] -= 10.0  # class 2 appears nowhere
    old_logits = 10 * onehot[:, :3]
    batches = [Batch(image=torch.zeros(1, 3, h, w), label=step_label)]
    pcv = PCVFit()
    g = pcv.fit(batches, lambda x: new_logits, CTX, lambda x: old_logits)
    assert 1.0 < g < 8.0  # flips the old object (gap 1) to class 1, not the rest (gap 8)
    calibrated = pcv.apply(new_logits, CTX).argmax(1)
    assert torch.equal(calibrated, truth)
    with pytest.raises(ValueError, match="model before the step"):
        PCVFit().fit(batches, lambda x: new_logits, CTX)


@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_state_round_trips_through_a_weights_only_checkpoint(name):
    import io

    a = build_calibrator(name, gamma=1.25)
    a.info = {"pixels": 7, "tune_losses": [0.5, 0.25]}
    buf = io.BytesIO()
    torch.save({"calibration": {name: a.state_dict()}}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["calibration"][name]
    b = build_calibrator(name)
    assert b.matches(state)
    b.load_state_dict(state)
    assert b.gamma == 1.25 and b.info == a.info and b.key() == a.key()
    other = "alg" if name != "alg" else "pcv"
    with pytest.raises(ValueError, match=f"not '{other}'"):
        build_calibrator(other).load_state_dict(state)


def test_a_stored_fit_matches_only_its_name_version_and_parameters():
    assert not build_calibrator("alg").matches({"name": "alg", "gamma": 1.0})  # before versions: all pixels
    assert not build_calibrator("pcv").matches({"name": "pcv", "gamma": 1.0})  # before versions: pcv_fit
    state = build_calibrator("pcv", epochs=2).state_dict()
    assert build_calibrator("pcv", epochs=2).matches(state) and not build_calibrator("pcv").matches(state)


def test_spec_parsing():
    assert parse_calibration("alg, pcv,sweep") == ["alg", "pcv", "sweep"]
    assert parse_calibration("alg_all,pcv_fit,share,agree") == ["alg_all", "pcv_fit", "share", "agree"]
    assert parse_calibration(None) == [] and parse_calibration(["alg"]) == ["alg"]
    with pytest.raises(ValueError, match="unknown calibration"):
        parse_calibration("temperature")


# ---- in runs: recorded during training, fitted post hoc, stored in checkpoints --------------------


def _model_tensors(path):
    return {k: v.clone() for k, v in load_checkpoint(path)["model"].items()}


def test_training_with_calibration_records_raw_and_calibrated_figures(tiny_cfg):
    from ciss.engine import train

    res = train(tiny_cfg("calibration=alg,pcv,share,sweep"))
    rows = RunDir(res.run_dir, create=False).read_jsonl("results.jsonl")
    assert "calibrated" not in rows[0]  # nothing is absent after step 0
    cal = rows[1]["calibrated"]
    assert set(cal) == {"alg", "pcv", "share"}
    state = load_checkpoint(res.run_dir / "ckpt" / "step-1.pt")
    for name in ("alg", "pcv", "share"):
        assert math.isfinite(cal[name]["gamma"]) and len(cal[name]["iou"]) == len(rows[1]["iou"])
        assert state["calibration"][name]["gamma"] == pytest.approx(cal[name]["gamma"])
    fit = cal["pcv"]["fit"]  # the pseudo fine-tune's cost and data are recorded with its figures
    assert fit["tune_s"] > 0 and fit["tune_iterations"] > 0 and fit["held_out_images"] > 0
    assert state["calibration"]["pcv"]["info"]["tune_epochs"] == 1  # the step's own (tiny: 1 epoch)
    sweep = rows[1]["sweep"]
    assert len(sweep["gamma"]) == len(sweep["miou_u"]) and 0 <= sweep["ausuc"] <= 1
    # the sweep point nearest gamma = 0 is the raw model
    at0 = min(range(len(sweep["gamma"])), key=lambda i: abs(sweep["gamma"][i]))
    assert sweep["miou_all"][at0] == pytest.approx(rows[1]["miou_all"], abs=0.02)


def test_posthoc_eval_fits_stores_and_never_touches_weights(tiny_cfg):
    from ciss.engine import train
    from ciss.evaluation import evaluate_run

    res = train(tiny_cfg())
    ckpt = res.run_dir / "ckpt" / "step-1.pt"
    before = _model_tensors(ckpt)
    text = evaluate_run(res.run_dir, calibration="alg,sweep", probe="ncm")
    assert "+alg (gamma" in text and "NCM probe" in text and "AUSUC" in text
    after = load_checkpoint(ckpt)
    assert all(torch.equal(before[k], v) for k, v in after["model"].items())  # weights untouched
    assert set(after["calibration"]) == {"alg"}
    assert set(after["probe"]["ncm"]) == {0, 5, 6}  # background and the step's two classes
    base = set(load_checkpoint(res.run_dir / "ckpt" / "step-0.pt")["probe"]["ncm"])
    assert 0 in base and base <= set(range(5))  # step 0's classes (a rare one may have no pixel)
    assert (res.run_dir / "calibration" / "sweep.png").stat().st_size > 1000
    rows = RunDir(res.run_dir, create=False).read_jsonl("posthoc.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and "ncm" in rows[1] and "alg" in rows[1]["calibrated"]
    # a second evaluation reuses the stored gamma instead of fitting again
    gamma = after["calibration"]["alg"]["gamma"]
    evaluate_run(res.run_dir, step=1, calibration="alg")
    assert load_checkpoint(ckpt)["calibration"]["alg"]["gamma"] == gamma
    # a fit stored under an older definition of the name is fitted again
    from ciss.results import save_checkpoint

    state = load_checkpoint(ckpt)
    state["calibration"]["alg"] = {"name": "alg", "gamma": 123.0}
    save_checkpoint(ckpt, state)
    evaluate_run(res.run_dir, step=1, calibration="alg")
    assert load_checkpoint(ckpt)["calibration"]["alg"]["gamma"] == gamma


def test_ncm_prototypes_are_class_means_and_the_probe_picks_the_nearest():
    from ciss.probe import class_means, ncm_logits
    from ciss.types import SegOutput

    feats = torch.zeros(1, 2, 2, 2)
    feats[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    feats[0, :, 0, 1] = torch.tensor([3.0, 0.0])
    feats[0, :, 1, :] = torch.tensor([0.0, 2.0])[:, None]

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return SegOutput(logits=x, features={"head": feats})

    label = torch.tensor([[[1, 1], [0, 0]]])
    protos = class_means(Fixed(), [Batch(image=torch.zeros(1, 3, 2, 2), label=label)], [0, 1, 2])
    assert set(protos) == {0, 1}  # class 2 has no pixel
    torch.testing.assert_close(protos[1], torch.tensor([2.0, 0.0]))
    table = torch.stack([protos[0], protos[1], torch.full((2,), float("nan"))])
    pred = ncm_logits(feats, table, (2, 2)).argmax(1)
    assert torch.equal(pred, label)  # never the class without a prototype
