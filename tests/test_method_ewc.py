"""EWC (as run by MiB): Fisher from squared CE gradients, merged across steps, and a quadratic penalty
that vanishes at the previous step's parameters."""

import copy

import pytest
import torch

from ciss.methods import build_method
from ciss.methods.ewc import estimate_fisher, min_max_normalize
from ciss.models import build_segmenter
from conftest import checkpoint_round_trip
from ciss.types import IGNORE, Batch, StepContext, Targets

CTX0 = StepContext(step=0, classes_per_step=(3, 2), num_steps=2)
CTX1 = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)


def batches(num_classes, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Batch(image=torch.randn(2, 3, 32, 32, generator=g),
                  label=torch.randint(0, num_classes, (2, 32, 32), generator=g)) for _ in range(n)]


def trained_step0():
    """A tiny model after 'step 0' and the EWC method holding its Fisher."""
    torch.manual_seed(0)
    model = build_segmenter("tiny", classes_per_step=(3,), head_channels=16)
    ewc = build_method("ewc")
    ewc.on_step_start(model, None, [], CTX0)
    ewc.on_step_end(model, None, batches(3), CTX0)
    return model, ewc


def test_defaults_and_base_step():
    ewc = build_method("ewc")
    assert (ewc.reg_importance, ewc.reg_alpha, ewc.normalize) == (100.0, 0.9, True)
    assert not ewc.needs_old_model
    assert ewc.base_step_key() == "ce" and ewc.step_end_from_model()  # the Fisher: from the model


def test_fisher_is_mean_squared_gradient_and_keeps_bn_statistics():
    torch.manual_seed(0)
    model = build_segmenter("tiny", classes_per_step=(3,), head_channels=16).train()
    data = batches(3)
    data[1].label[:] = IGNORE  # a batch without labels adds nothing
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    fisher = estimate_fisher(model, data, 3)
    assert model.training  # mode restored ...
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # ... nothing moved
    assert all(p.grad is None for p in model.parameters())
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    model.eval()
    loss = torch.nn.functional.cross_entropy(model(data[0].image).logits, data[0].label)
    ref = torch.autograd.grad(loss, [model.classifier.convs[0].weight])[0].pow(2)
    torch.testing.assert_close(fisher["classifier.convs.0.weight"], ref)
    assert all((f >= 0).all() for f in fisher.values())


def test_fisher_merges_across_steps_with_alpha():
    model, ewc = trained_step0()
    f0 = {n: f.clone() for n, f in ewc.fisher.items()}
    assert all((f >= 0).all() for f in f0.values()) and sum(f.sum() for f in f0.values()) > 0
    assert ewc.fisher_step == 0 and set(ewc.old_params) == set(f0)

    old = copy.deepcopy(model).eval()
    model.add_step(2)
    ewc.on_step_start(model, old, [], CTX1)
    data = batches(5, seed=1)
    ewc.on_step_end(model, old, data, CTX1)
    new = estimate_fisher(model, data, 5)
    assert ewc.fisher_step == 1
    for n, f in ewc.fisher.items():
        if n in f0:  # F = alpha F_new + (1 - alpha) F_prev
            torch.testing.assert_close(f, 0.9 * new[n] + 0.1 * f0[n])
        else:  # the classifier added at this step: F = F_new
            assert n.startswith("classifier.convs.1")
            torch.testing.assert_close(f, new[n])
        assert (f >= 0).all()


def test_penalty_zero_at_old_parameters_positive_after_perturbation():
    model, ewc = trained_step0()
    model.add_step(2)
    ewc.on_step_start(model, None, [], CTX1)
    assert ewc.penalty(model).item() == 0.0
    out = model(torch.randn(2, 3, 32, 32))
    label = torch.randint(0, 5, (2, 32, 32))
    terms = ewc.loss(out, Targets(label), None, None, CTX1)
    assert set(terms) == {"loss", "ce", "ewc"} and terms["ewc"].item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pen = ewc.penalty(model)
    assert pen.item() > 0
    # Only parameters of the previous step are held: the new classifier is free.
    pen.backward()
    assert model.classifier.convs[1].weight.grad is None
    assert model.classifier.convs[0].weight.grad.abs().sum() > 0
    # The penalty is the normalised Fisher-weighted squared distance, times reg_importance.
    params = dict(model.named_parameters())
    ref = sum((min_max_normalize(ewc.fisher[n]) * (params[n] - ewc.old_params[n]).pow(2)).sum()
              for n in ewc.old_params)
    torch.testing.assert_close(pen, ref)
    terms = ewc.loss(model(torch.randn(2, 3, 32, 32)), Targets(label), None, None, CTX1)
    torch.testing.assert_close(terms["ewc"], 100.0 * ref)


def test_state_round_trips_through_a_checkpoint():
    model, ewc = trained_step0()
    fresh = checkpoint_round_trip(ewc)
    assert fresh.fisher_step == 0
    for a, b in [(fresh.fisher, ewc.fisher), (fresh.old_params, ewc.old_params)]:
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    fresh.load_state_dict({})  # a checkpoint without EWC state erases nothing
    assert fresh.fisher is not None
    with pytest.raises(ValueError):
        fresh.load_state_dict({"bogus": 1})


def test_step_without_fisher_fails_early():
    model = build_segmenter("tiny", classes_per_step=(3, 2), head_channels=16)
    with pytest.raises(RuntimeError, match="Fisher"):
        build_method("ewc").on_step_start(model, None, [], CTX1)
