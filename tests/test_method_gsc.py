"""GSC invariants (Cong et al., IEEE TMM) on tiny tensors and a tiny model."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from ciss.losses import cross_entropy, prediction_entropy, soft_relation_distillation
from ciss.methods import build_method
from ciss.methods.gsc import prototype_agreement, step_aware_weights
from ciss.models import build_segmenter
from ciss.types import BACKGROUND, IGNORE, Batch, SegOutput, StepContext, Targets

CTX = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)


def test_psi_is_one_on_new_classes_and_averages_one_per_old_step_group():
    torch.manual_seed(0)
    cps, step = (3, 2, 2), 2  # bg | step-0 classes 1, 2 | step-1 classes 3, 4 | new classes 5, 6
    logits = 2 * torch.randn(2, 7, 6, 6)
    label = torch.randint(0, 7, (2, 6, 6))
    label[0, 0] = IGNORE
    psi = step_aware_weights(logits, label, cps, step)
    assert psi.shape == label.shape
    assert (psi[label >= 5] == 1).all() and (psi[label == IGNORE] == 1).all()
    p = F.softmax(logits, 1)
    grad = 1 - p.gather(1, label.clamp(max=6)[:, None])[:, 0]  # |dCE/dlogit_y|
    for group in (label == BACKGROUND, (label >= 1) & (label < 3), (label >= 3) & (label < 5)):
        assert group.any()
        torch.testing.assert_close(psi[group].mean(), torch.tensor(1.0))
        # within a group, psi is proportional to the pixel's gradient magnitude
        torch.testing.assert_close(psi[group], grad[group] / grad[group].mean())
    assert not psi.requires_grad


def test_prototype_rule_ignores_disagreeing_background_pixels():
    # Pixels (0, j): background for j < 4, a new class at j = 4. The old model predicts class 1
    # everywhere; pixel 1's feature sits on class 2's prototype, the others' on class 1's (but pixel 4's).
    old_logits = torch.full((1, 3, 1, 5), -2.0)
    old_logits[:, 1] = 2.0
    old_logits[0, 2, 0, 1] = 1.5  # pixel 1: class 2 a close second, and its feature is class 2's
    protos = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])  # (C_old=3, D=2)
    feats = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]).T.reshape(1, 2, 1, 5)
    label = torch.tensor([[[0, 0, 0, 0, 3]]])
    gsc = build_method("gsc")
    gsc.prototypes, gsc.proto_valid = protos, torch.tensor([True, True, True])
    gsc.thresholds, gsc.stats_step = torch.tensor([1.0, 1.0, 1.0]), 1
    out = SegOutput(torch.zeros(1, 5, 1, 5), {"head": feats})
    old = SegOutput(old_logits)
    probs = F.softmax(old_logits, 1)
    agree = prototype_agreement(feats, protos, gsc.proto_valid, probs)
    assert agree[0, 0].tolist() == [True, False, True, True, False]
    t = gsc.relabel(Batch(image=torch.zeros(1, 3, 1, 5), label=label), out, old, CTX)
    assert t.label[0, 0].tolist() == [1, IGNORE, 1, 1, 3]  # new-class pixel keeps its label
    # A confident pixel above its class's entropy threshold is ignored too.
    gsc.thresholds = torch.tensor([1e-6, 1e-6, 1e-6])
    t = gsc.relabel(Batch(image=torch.zeros(1, 3, 1, 5), label=label), out, old, CTX)
    assert t.label[0, 0].tolist() == [IGNORE, IGNORE, IGNORE, IGNORE, 3]
    # A class without prototype has no feature evidence: its pixels are ignored.
    gsc.thresholds = torch.tensor([1.0, 1.0, 1.0])
    gsc.proto_valid = torch.tensor([True, False, True])
    t = gsc.relabel(Batch(image=torch.zeros(1, 3, 1, 5), label=label), out, old, CTX)
    assert (t.label[0, 0, :4] == IGNORE).all()


def test_soft_relation_and_sharp_confidence_losses():
    torch.manual_seed(0)
    logits, old_logits = torch.randn(1, 5, 1, 3), torch.randn(1, 3, 1, 3)
    label = torch.tensor([[[0, 4, IGNORE]]])
    log_q, p_old = F.log_softmax(logits, 1)[0, :, 0], F.softmax(old_logits, 1)[0, :, 0]  # (C, 3)
    per_pixel = -(p_old * log_q[:3]).sum(0)  # old part everywhere (soft labels replace old entries)
    per_pixel[1] = per_pixel[1] - log_q[4, 1]  # the one-hot new-class entry
    torch.testing.assert_close(soft_relation_distillation(logits, old_logits, label), per_pixel.mean())
    torch.testing.assert_close(prediction_entropy(torch.zeros(2, 4, 3, 3)), torch.tensor(math.log(4)))
    assert prediction_entropy(torch.tensor([[[[50.0]], [[0.0]]]])) < 1e-15


def tiny_setup(parallel: bool = False, vote_for: int | None = None):
    torch.manual_seed(0)
    old = build_segmenter("tiny", classes_per_step=(3,), head_channels=16,
                          parallel_branches=parallel).eval()
    with torch.no_grad():  # a random model is near-uniform everywhere; spread its confidence
        old.classifier.convs[0].weight.mul_(30)
        if vote_for is not None:  # and make it vote for one old class often
            old.classifier.convs[0].bias[vote_for] += 3.0
    model = copy.deepcopy(old)
    model.add_step(2)
    batches = [Batch(image=torch.randn(2, 3, 32, 32), label=torch.randint(0, 5, (2, 32, 32)) * (i % 2))
               for i in range(3)]
    return old, model, batches


def prepared(method: str = "gsc", parallel: bool = False, vote_for: int | None = None, **fields):
    old, model, batches = tiny_setup(parallel, vote_for)
    gsc = build_method(method, **fields)
    gsc.init_new_classifiers(model, old, CTX)
    gsc.on_step_start(model, old, batches, CTX)
    model.train()
    b = batches[1]
    out = model(b.image)
    with torch.no_grad():
        old_out = old(b.image)
    return gsc, model, old, b, out, old_out


def test_each_switch_removes_its_term():
    gsc, model, old, b, out, old_out = prepared()
    t = gsc.make_targets(b, out, old_out, CTX)
    terms = gsc.loss(out, t, old_out, b, CTX)
    assert set(terms) == {"loss", "ce", "pod", "sr", "sc"}
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["pod"] + terms["sr"] + terms["sc"])
    assert t.weight is not None and torch.equal(t.weight, t.extra["psi"])

    for switch, gone in (("sr", "sr"), ("sc", "sc")):
        setattr(gsc, switch, False)
        assert gone not in gsc.loss(out, gsc.make_targets(b, out, old_out, CTX), old_out, b, CTX)
        setattr(gsc, switch, True)
    gsc.sg = False  # no psi: plain CE on the PR labels
    t_nosg = gsc.make_targets(b, out, old_out, CTX)
    assert t_nosg.weight is None and "psi" not in t_nosg.extra and torch.equal(t_nosg.label, t.label)
    gsc.pr = False  # the base's (PLOP's) pseudo-labels
    plop_t = gsc.base.make_targets(b, out, old_out, CTX)
    assert torch.equal(gsc.make_targets(b, out, old_out, CTX).label, plop_t.label)

    # Every switch off: GSC is its base (Table V, first row).
    gsc.sr = gsc.sc = False
    t0 = gsc.make_targets(b, out, old_out, CTX)
    assert torch.equal(t0.weight, plop_t.weight)
    got = gsc.loss(out, t0, old_out, b, CTX)
    want = gsc.base.loss(out, plop_t, old_out, b, CTX)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method,base", [("gsc", "mib"), ("gsc_rcil", None)])
def test_eq6_is_a_ce_on_the_pseudo_labels_over_an_unbiased_ce_base(method, base):
    # Over MiB's (or RCIL's) unbiased CE, old-class pseudo-labels would fold into background: the
    # loss would not see them. GSC's eq. 6 is a plain CE on its targets, so they must count.
    fields = {"base": base} if base else {}
    gsc, model, old, b, out, old_out = prepared(method, parallel=method == "gsc_rcil", vote_for=1, **fields)
    assert gsc.base.unbiased_ce is False
    t = gsc.make_targets(b, out, old_out, CTX)
    pseudo = t.extra["pseudo_mask"] & (t.label > 0) & (t.label < CTX.num_old)
    assert pseudo.any(), "the test needs old-class pseudo-labels"
    terms = gsc.loss(out, t, old_out, b, CTX)
    logits = out.logits[:, : CTX.num_seen]
    torch.testing.assert_close(terms["ce"], cross_entropy(logits, t.label, t.weight))
    as_background = Targets(label=torch.where(pseudo, torch.zeros_like(t.label), t.label),
                            weight=t.weight, extra=t.extra)
    assert not torch.allclose(gsc.loss(out, as_background, old_out, b, CTX)["loss"], terms["loss"])
    # without PR the base keeps its own unbiased CE
    assert build_method(method, **fields, pr=False).base.unbiased_ce is True


def test_finite_loss_gradients_and_pr_labels_on_a_tiny_model():
    gsc, model, old, b, out, old_out = prepared()
    t = gsc.make_targets(b, out, old_out, CTX)
    assert t.label.shape == b.label.shape
    bg = b.label == BACKGROUND
    assert torch.equal(t.label[~bg], b.label[~bg])
    relabelled = t.label[bg]
    assert ((relabelled < CTX.num_old) | (relabelled == IGNORE)).all()
    assert 0 < int(t.extra["pseudo_mask"].sum()) < int(bg.sum())  # both branches of eq. 12 are met
    terms = gsc.loss(out, t, old_out, b, CTX)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert model.classifier.convs[-1].weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_statistics_match_their_definition_and_survive_a_checkpoint():
    old, model, batches = tiny_setup()
    gsc = build_method("gsc", median_bins=1000)
    gsc.on_step_start(model, old, batches, CTX)
    assert gsc.prototypes.shape == (3, 16) and gsc.stats_step == 1
    # Eq. 11 reference: mean old feature of the (feature-resolution) background pixels predicted c.
    with torch.no_grad():
        feats, preds = [], []
        for b in batches:
            o = old(b.image)
            low = F.interpolate(b.label[:, None].float(), size=o.features["head"].shape[-2:], mode="nearest")[:, 0]
            bg = low == BACKGROUND
            feats.append(o.features["head"].permute(0, 2, 3, 1)[bg])
            preds.append(o.features["logits_lowres"].argmax(1)[bg])
    f, p = torch.cat(feats), torch.cat(preds)
    for c in range(3):
        assert bool(gsc.proto_valid[c]) == bool((p == c).any())
        if (p == c).any():
            torch.testing.assert_close(gsc.prototypes[c], f[p == c].mean(0), atol=1e-5, rtol=1e-4)
    assert (gsc.thresholds >= gsc.entropy_floor).all()

    buf = io.BytesIO()
    torch.save({"method": gsc.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["method"]
    assert "base" in state  # PLOP's thresholds travel with GSC's state
    fresh = build_method("gsc")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.prototypes, gsc.prototypes) and fresh.stats_step == 1
    assert torch.equal(fresh.base.thresholds, gsc.base.thresholds)
    fresh.load_state_dict({})  # a checkpoint of a step without state erases nothing
    kept = fresh.prototypes
    fresh.on_step_start(model, old, [], CTX)  # resumed inside the step: kept, not recomputed
    assert fresh.prototypes is kept
    with pytest.raises(ValueError):
        fresh.load_state_dict({"bogus": 1})


def test_step0_and_delegation():
    old, model, batches = tiny_setup()
    gsc = build_method("gsc")
    ctx0 = StepContext(step=0, classes_per_step=(3, 2), num_steps=2)
    gsc.on_step_start(old, None, batches, ctx0)
    assert gsc.prototypes is None and gsc.state_dict() == {}
    b = batches[0]
    out = old(b.image)
    t = gsc.make_targets(b, out, None, ctx0)
    assert torch.equal(t.label, b.label) and set(gsc.loss(out, t, None, b, ctx0)) == {"loss", "ce"}
    with pytest.raises(RuntimeError, match="on_step_start"):
        gsc.make_targets(b, model(b.image), old(b.image), CTX)
    assert build_method("gsc", base="mib").base.name == "mib"
    assert gsc.base_step_key() == gsc.base.base_step_key() and gsc.needs_old_model
