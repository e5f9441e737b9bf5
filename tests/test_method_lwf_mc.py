"""LwF-MC (iCaRL's multi-class LwF, as run by MiB): BCE on one-hot labels + sigmoid distillation that
is minimal and stationary at the old model's outputs."""

import copy

import torch
import torch.nn.functional as F

from ciss.methods import build_method
from ciss.methods.lwf_mc import sigmoid_distillation
from ciss.models import build_segmenter
from ciss.types import IGNORE, StepContext, Targets

CTX = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)


def binary_entropy(p):
    return -(p * p.log() + (1 - p) * (1 - p).log())


def test_defaults_and_base_step():
    m = build_method("lwf_mc")
    assert m.icarl_importance == 10.0 and m.needs_old_model
    assert m.base_step_key() == "bce"  # MiB trains step 0 with BCE when iCaRL is on


def test_distillation_minimal_and_stationary_at_the_old_outputs():
    torch.manual_seed(0)
    old_logits = torch.randn(2, 3, 4, 4)
    logits = torch.cat([old_logits, torch.randn(2, 2, 4, 4)], 1).requires_grad_(True)
    d = sigmoid_distillation(logits, old_logits)
    # BCE of sigmoid(old) against itself: the binary entropy, summed over old channels.
    torch.testing.assert_close(d.detach(), binary_entropy(torch.sigmoid(old_logits)).sum(1).mean())
    d.backward()
    assert logits.grad.abs().max() < 1e-7  # zero on the old channels, and new ones are outside it
    with torch.no_grad():
        assert sigmoid_distillation(logits + 0.5 * torch.randn_like(logits), old_logits) > d


def test_loss_terms_one_hot_targets_and_step0():
    torch.manual_seed(0)
    old = build_segmenter("tiny", classes_per_step=(3,), head_channels=16).eval()
    model = copy.deepcopy(old)
    model.add_step(2)
    model.eval()  # equal to the old model on the old classes
    x = torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 5, (2, 32, 32))
    label[0, :4] = IGNORE
    m = build_method("lwf_mc")
    out = model(x)
    with torch.no_grad():
        old_out = old(x)
    logits = out.logits.detach().requires_grad_(True)
    terms = m.loss(type(out)(logits=logits), Targets(label), old_out, None, CTX)
    assert set(terms) == {"loss", "bce", "distill"}
    torch.testing.assert_close(terms["loss"], terms["bce"] + terms["distill"])
    torch.testing.assert_close(terms["distill"],
                               10.0 * binary_entropy(torch.sigmoid(old_out.logits)).sum(1).mean())
    # Only the BCE reaches the logits: its gradient is (sigmoid - one-hot) / #labelled pixels, so
    # every channel, new ones included, is pulled to the one-hot label; ignored pixels get none.
    terms["loss"].backward()
    valid = label != IGNORE
    onehot = F.one_hot(label.clamp(max=4), 5).permute(0, 3, 1, 2).float()
    ref = (torch.sigmoid(logits.detach()) - onehot) * valid[:, None] / valid.sum()
    torch.testing.assert_close(logits.grad, ref, atol=1e-6, rtol=1e-4)

    ctx0 = StepContext(step=0, classes_per_step=(3, 2), num_steps=2)
    t0 = m.loss(old_out, Targets(label.clamp(max=2)), None, None, ctx0)
    assert set(t0) == {"loss", "bce"}
