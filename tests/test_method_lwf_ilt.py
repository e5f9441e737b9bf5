"""LwF and ILT (as run by MiB): the distillation terms are minimal when the model equals the old one."""

import copy

import torch
import torch.nn.functional as F

from ciss.losses import knowledge_distillation
from ciss.methods import build_method
from ciss.models import build_segmenter
from ciss.types import StepContext, Targets


def test_kd_minimal_and_stationary_at_the_old_outputs():
    torch.manual_seed(0)
    old_logits = torch.randn(2, 3, 4, 4)
    new_logits = torch.cat([old_logits, torch.randn(2, 2, 4, 4)], 1).requires_grad_(True)
    kd = knowledge_distillation(new_logits, old_logits)
    p = F.softmax(old_logits, 1)
    torch.testing.assert_close(kd.detach(), (-(p * p.log()).sum(1) / 3).mean())
    kd.backward()
    assert new_logits.grad.abs().max() < 1e-7  # new-class logits are outside the KD entirely
    with torch.no_grad():
        assert knowledge_distillation(new_logits + torch.randn_like(new_logits), old_logits) > kd


def pair():
    torch.manual_seed(0)
    old = build_segmenter("tiny", classes_per_step=(3,), head_channels=16).eval()
    model = copy.deepcopy(old)
    model.add_step(2)
    model.eval()  # same BN statistics as the old model: the two agree on the old classes
    ctx = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)
    x = torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 5, (2, 32, 32))
    return model(x), old(x), label, ctx


def test_lwf_terms():
    out, old, label, ctx = pair()
    lwf = build_method("lwf")
    assert (lwf.loss_kd, lwf.alpha) == (100.0, 1.0) and lwf.needs_old_model
    terms = lwf.loss(out, Targets(label), old, None, ctx)
    assert set(terms) == {"loss", "ce", "kd"}
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["kd"])
    p = F.softmax(old.logits.detach(), 1)
    torch.testing.assert_close(terms["kd"].detach(), 100 * (-(p * p.log()).sum(1) / 3).mean(),
                               atol=1e-4, rtol=1e-4)


def test_ilt_terms_feature_distillation_zero_for_equal_models():
    out, old, label, ctx = pair()
    ilt = build_method("ilt")
    assert (ilt.loss_kd, ilt.loss_de) == (100.0, 100.0)
    terms = ilt.loss(out, Targets(label), old, None, ctx)
    assert set(terms) == {"loss", "ce", "kd", "de"}
    assert terms["de"].item() == 0.0
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["kd"] + terms["de"])
    ctx0 = StepContext(step=0, classes_per_step=(3, 2), num_steps=2)
    assert set(ilt.loss(old, Targets(label.clamp(max=2)), None, None, ctx0)) == {"loss", "ce"}
