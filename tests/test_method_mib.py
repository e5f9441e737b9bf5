"""MiB invariants (Cermelli et al., CVPR 2020) on tiny tensors and a tiny model."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ciss.losses import cross_entropy, unbiased_cross_entropy, unbiased_knowledge_distillation
from ciss.methods import build_method
from ciss.models import build_segmenter
from conftest import outputs_on_random_batch
from ciss.types import IGNORE, SegOutput, StepContext, Targets


def grown_pair(old_classes=3, new_classes=2, seed=0):
    torch.manual_seed(seed)
    old = build_segmenter("tiny", classes_per_step=(old_classes,), head_channels=16).eval()
    model = copy.deepcopy(old)
    model.add_step(new_classes)
    ctx = StepContext(step=1, classes_per_step=(old_classes, new_classes), num_steps=2)
    return old, model, ctx


@torch.no_grad()
def test_init_balanced_preserves_the_old_distribution():
    old, model, ctx = grown_pair()
    build_method("mib").init_new_classifiers(model, old, ctx)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    p_old = F.softmax(old(x).logits, dim=1)  # (B, 3, H, W)
    p_new = F.softmax(model(x).logits, dim=1)  # (B, 5, H, W)
    torch.testing.assert_close(p_new[:, 1:3], p_old[:, 1:3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p_new[:, 0] + p_new[:, 3:].sum(1), p_old[:, 0], atol=1e-5, rtol=1e-4)
    # Old-class weights untouched; only the background bias moved, by -log(n_new + 1).
    c_old, c_new = old.classifier.convs[0], model.classifier.convs[0]
    assert torch.equal(c_new.weight, c_old.weight) and torch.equal(c_new.bias[1:], c_old.bias[1:])
    torch.testing.assert_close(c_new.bias[0], c_old.bias[0] - torch.log(torch.tensor(3.0)))


def test_unbiased_ce_is_ce_when_background_is_the_only_old_class():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    label = torch.randint(0, 4, (2, 5, 5))
    label[0, 0] = IGNORE
    weight = torch.rand(2, 5, 5)
    torch.testing.assert_close(unbiased_cross_entropy(logits, label, 1), cross_entropy(logits, label))
    torch.testing.assert_close(unbiased_cross_entropy(logits, label, 1, weight),
                               cross_entropy(logits, label, weight))


def test_unbiased_ce_background_target_sums_old_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 1, 2)
    label = torch.tensor([[[0, 3]]])
    p = F.softmax(logits, dim=1)[0, :, 0]  # (5, 2)
    expected = (-torch.log(p[:3, 0].sum()) - torch.log(p[3, 1])) / 2
    torch.testing.assert_close(unbiased_cross_entropy(logits, label, 3), expected)
    # An old-class label is folded into the background like label 0.
    torch.testing.assert_close(unbiased_cross_entropy(logits, torch.tensor([[[2, 3]]]), 3), expected)


def test_unbiased_kd_is_minimal_right_after_init():
    """After init_balanced the new model's aggregated background equals the old background and old
    classes are unchanged, so the unbiased KD (a cross-entropy from the old distribution) equals its
    minimum, the old distribution's entropy / C_old, and its gradient w.r.t. the new logits vanishes."""
    old, model, ctx = grown_pair()
    build_method("mib").init_new_classifiers(model, old, ctx)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        old_logits = old(x).logits
        new_logits = model(x).logits
    new_logits.requires_grad_(True)
    kd = unbiased_knowledge_distillation(new_logits, old_logits)
    p = F.softmax(old_logits, dim=1)
    entropy_over_c = (-(p * p.log()).sum(1) / 3).mean()
    torch.testing.assert_close(kd.detach(), entropy_over_c, atol=1e-5, rtol=1e-4)
    kd.backward()
    assert new_logits.grad.abs().max() < 1e-6
    # Any perturbation of the new model's logits can only raise it.
    with torch.no_grad():
        assert unbiased_knowledge_distillation(new_logits + 0.5 * torch.randn_like(new_logits),
                                               old_logits) > kd


def test_mib_loss_terms_and_step0():
    old, model, ctx = grown_pair()
    mib = build_method("mib")
    mib.init_new_classifiers(model, old, ctx)
    label, out, old_out = outputs_on_random_batch(model, old)
    terms = mib.loss(out, Targets(label), old_out, None, ctx)
    assert set(terms) == {"loss", "unce", "unkd"}
    torch.testing.assert_close(terms["loss"], terms["unce"] + terms["unkd"])
    terms["loss"].backward()
    assert model.classifier.convs[-1].weight.grad.abs().sum() > 0
    ctx0 = StepContext(step=0, classes_per_step=(3, 2), num_steps=2)
    out0 = SegOutput(logits=torch.randn(2, 3, 4, 4))
    t0 = mib.loss(out0, Targets(torch.randint(0, 3, (2, 4, 4))), None, None, ctx0)
    assert set(t0) == {"loss", "ce"}
    assert mib.base_step_key() == "ce"


def test_mib_reads_no_old_class_label_and_ft_does():
    # docs/extend.md: with MiB a new folder's labels of old classes are not used; its unbiased CE
    # folds every old class into background, so the loss is the same with them as background.
    old, model, ctx = grown_pair()
    label, out, old_out = outputs_on_random_batch(model, old)
    as_background = torch.where(label < ctx.num_old, torch.zeros_like(label), label)
    assert (label != as_background).any()
    mib, ft = build_method("mib"), build_method("ft")
    torch.testing.assert_close(mib.loss(out, Targets(label), old_out, None, ctx)["loss"],
                               mib.loss(out, Targets(as_background), old_out, None, ctx)["loss"])
    assert not torch.allclose(ft.loss(out, Targets(label), old_out, None, ctx)["loss"],
                              ft.loss(out, Targets(as_background), old_out, None, ctx)["loss"])


def test_mib_defaults_are_the_papers():
    m = build_method("mib")
    assert (m.loss_kd, m.alpha, m.init_balanced) == (10.0, 1.0, True)
    with pytest.raises(ValueError):
        build_method("mib", nope=1)
