"""SDR over MiB: prototype matching, attraction/repulsion, sparsity on the decoder features; running
class prototypes kept across steps."""

import copy
import io

import pytest
import torch

from ciss.methods import build_method
from ciss.methods.sdr import attraction, class_means, prototype_matching, repulsion, sparsity
from ciss.models import build_segmenter
from conftest import outputs_on_random_batch
from ciss.types import IGNORE, SegOutput, StepContext, Targets

CTX0 = StepContext(step=0, classes_per_step=(3, 2), num_steps=2)
CTX1 = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)


def test_defaults_are_the_official_presets():
    m = build_method("sdr")
    assert (m.loss_kd, m.init_balanced, m.alpha) == (100.0, False, 1.0)
    assert (m.lambda_pm, m.lambda_att, m.lambda_rep, m.lambda_sp) == (1e-2, 1e-3, 1e-3, 1e-3)
    assert m.pm and m.cl and m.sp and m.needs_old_model
    assert m.base_step_key() != "ce"  # its step-0 checkpoint carries the prototypes


def test_prototype_matching_zero_when_class_means_equal_prototypes():
    torch.manual_seed(0)
    feats = torch.rand(2, 8, 4, 4, requires_grad=True)
    label = torch.randint(0, 3, (2, 4, 4))
    means, counts = class_means(feats.detach(), label, 3)
    known = counts > 0
    pm = prototype_matching(feats, label, means, known)
    assert pm.item() == pytest.approx(0.0, abs=1e-12)
    # Shifted prototypes: the mean over old classes (background excluded) of the per-channel MSE.
    shifted = means + 0.5
    pm = prototype_matching(feats, label, shifted, known)
    torch.testing.assert_close(pm, torch.tensor(0.25))
    pm.backward()
    assert feats.grad.abs().sum() > 0
    # A class without a prototype is not matched.
    assert prototype_matching(feats, label, shifted, torch.tensor([True, False, False])).item() == 0.0


def test_clustering_and_sparsity_are_finite_and_non_negative():
    torch.manual_seed(0)
    feats = torch.relu(torch.randn(2, 8, 4, 4))
    feats[0, :, 0, 0] = 0  # an all-zero feature has no sparsity ratio and is skipped
    label = torch.randint(0, 3, (2, 4, 4))
    label[1, 0] = IGNORE
    means, counts = class_means(feats, label, 3)
    for value in [attraction(feats, label, means, counts > 0), repulsion(feats, label, 3),
                  sparsity(feats, label, 3)]:
        assert torch.isfinite(value) and value.item() >= 0
    assert repulsion(feats, torch.zeros_like(label), 3).item() == 0.0  # one class: nothing to repel
    # Repulsion is the mean inverse distance between distinct class means.
    d = torch.cdist(means, means)
    torch.testing.assert_close(repulsion(feats, label, 3), (1 / d[~torch.eye(3, dtype=torch.bool)]).mean())
    # Attraction is zero when every pixel sits on its prototype; sparsity of a one-hot feature is
    # (e + D - 1) / 1, the least sparse score being the uniform feature's D e / D.
    flat = torch.zeros(1, 8, 1, 2)
    flat[0, 0] = 1.0
    lab = torch.zeros(1, 1, 2, dtype=torch.long)
    assert attraction(flat, lab, flat[0, :, 0, :1].T, torch.tensor([True])).item() == 0.0
    torch.testing.assert_close(sparsity(flat, lab, 1), torch.tensor(torch.e + 7))


def pair():
    torch.manual_seed(0)
    old = build_segmenter("tiny", classes_per_step=(3,), head_channels=16).eval()
    model = copy.deepcopy(old)
    model.add_step(2)
    model.eval()
    return old, model


def test_prototypes_are_running_means_updated_by_steps_and_round_trip():
    old, model = pair()
    sdr = build_method("sdr")
    x = torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 3, (2, 32, 32))
    sdr.on_step_start(old, None, [], CTX0)
    out = old(x)
    terms = sdr.loss(out, Targets(label), None, None, CTX0)
    assert set(terms) == {"loss", "ce"}  # step 0: plain CE ...
    assert sdr.prototypes is None  # ... while the step's running sums fill up
    sdr.on_step_end(old, None, [], CTX0)
    feats = out.features["head"].detach()
    small = torch.nn.functional.interpolate(label[:, None].float(), size=feats.shape[-2:])[:, 0].long()
    ref, counts = class_means(feats, small, 3)
    torch.testing.assert_close(sdr.prototypes, ref)
    assert sdr.proto_step == 0 and torch.equal(sdr.counts, counts.double())

    buf = io.BytesIO()
    torch.save({"method": sdr.state_dict()}, buf)
    buf.seek(0)
    fresh = build_method("sdr")
    fresh.load_state_dict(torch.load(buf, weights_only=True)["method"])
    assert torch.equal(fresh.prototypes, sdr.prototypes) and torch.equal(fresh.counts, sdr.counts)
    assert fresh.proto_step == 0

    # Step 1: new classes get prototypes, background is not renewed, old ones stay.
    fresh.on_step_start(model, old, [], CTX1)
    label1 = torch.where(label == 2, torch.full_like(label, 4), label)  # classes 0, 1 and new 4
    out1 = model(x)
    with torch.no_grad():
        old1 = old(x)
    terms = fresh.loss(out1, Targets(label1), old1, None, CTX1)
    assert set(terms) == {"loss", "unce", "unkd", "pm", "att", "rep", "sp"}
    assert all(torch.isfinite(v) for v in terms.values())
    fresh.on_step_end(model, old, [], CTX1)
    assert fresh.proto_step == 1 and fresh.prototypes.shape == (5, 16)
    # Background (left out from step 1 on) and class 2 (absent) keep their step-0 prototypes.
    for c in (0, 2):
        torch.testing.assert_close(fresh.prototypes[c], sdr.prototypes[c])
        assert fresh.counts[c] == sdr.counts[c]
    small1 = torch.nn.functional.interpolate(label1[:, None].float(), size=feats.shape[-2:])[:, 0].long()
    m1, c1 = class_means(out1.features["head"].detach(), small1, 5)
    # The new class gets the mean of its pixels; class 1, labelled again, the mean over both steps.
    assert fresh.counts[4] == c1[4] and fresh.counts[3] == 0
    torch.testing.assert_close(fresh.prototypes[4], m1[4])
    both = (sdr.prototypes[1] * counts[1] + m1[1] * c1[1]) / (counts[1] + c1[1])
    torch.testing.assert_close(fresh.prototypes[1], both)
    assert fresh.counts[1] == counts[1] + c1[1]
    with pytest.raises(ValueError):
        fresh.load_state_dict({"bogus": 1})


def test_zero_weights_give_mibs_loss_and_missing_prototypes_fail_early():
    old, model = pair()
    sdr = build_method("sdr", lambda_pm=0.0, lambda_att=0.0, lambda_rep=0.0, lambda_sp=0.0)
    mib = build_method("mib", loss_kd=100.0, init_balanced=False)
    with pytest.raises(RuntimeError, match="prototypes"):
        sdr.on_step_start(model, old, [], CTX1)
    sdr.prototypes, sdr.counts, sdr.proto_step = torch.rand(3, 16), torch.ones(3, dtype=torch.float64), 0
    sdr.on_step_start(model, old, [], CTX1)
    label, out, old_out = outputs_on_random_batch(model, old)
    terms = sdr.loss(out, Targets(label), old_out, None, CTX1)
    ref = mib.loss(out, Targets(label), old_out, None, CTX1)
    torch.testing.assert_close(terms["loss"], ref["loss"])
    assert all(terms[k].item() == 0.0 for k in ("pm", "att", "rep", "sp"))
    # The switches remove the terms altogether.
    off = build_method("sdr", pm=False, cl=False, sp=False)
    off.on_step_start(model, old, [], CTX1)  # no prototype needed without matching
    terms = off.loss(out, Targets(label), old_out, None, CTX1)
    assert set(terms) == {"loss", "unce", "unkd"}
    torch.testing.assert_close(terms["loss"], ref["loss"])


def test_old_class_pixels_come_from_the_old_model_on_background():
    ctx = CTX1
    label = torch.tensor([[[0, 1, 3, IGNORE]]])  # background, an old label (sequential), new, ignored
    old_logits = torch.zeros(1, 3, 1, 4)
    old_logits[0, 2] = 5.0  # the old model says class 2 everywhere
    got = build_method("sdr").old_class_label(label, SegOutput(logits=old_logits), ctx)
    assert got.tolist() == [[[2, 1, 0, 0]]]
