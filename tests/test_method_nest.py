"""NeST invariants (Xie et al., ECCV 2024) on a tiny model, CPU."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from ciss.methods import build_method
from ciss.methods.nest import PRETUNE, class_similarity
from ciss.models import build_segmenter
from ciss.types import Batch, StepContext

CTX = StepContext(step=1, classes_per_step=(3, 2), num_steps=2, epochs=2)


def tiny_setup():
    torch.manual_seed(0)
    old = build_segmenter("tiny", classes_per_step=(3,), head_channels=16).eval()
    model = copy.deepcopy(old)
    model.add_step(2)
    batches = [Batch(image=torch.randn(2, 3, 32, 32), label=torch.randint(0, 5, (2, 32, 32)))
               for _ in range(2)]
    batches[1].label[1] = 0  # an image without new class
    return old, model, batches


def started(name="nest", **fields):
    old, model, batches = tiny_setup()
    nest = build_method(name, **fields)
    nest.init_new_classifiers(model, old, CTX)
    nest.on_step_start(model, old, batches, CTX)
    return nest, old, model, batches


def old_rows(model):
    return torch.cat([c.weight for c in model.classifier.convs[:-1]]).flatten(1)  # (C_old, D)


def pretune_step(nest, old, model, batch, phase):
    groups = nest.param_groups(model, CTX, phase)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    nest.train_mode(model, CTX, phase)
    out = model(batch.image)
    with torch.no_grad():
        old_out = old(batch.image) if nest.needs_old_model else None
    targets = nest.make_targets(batch, out, old_out, CTX)
    terms = nest.loss(out, targets, old_out, batch, CTX)
    assert torch.isfinite(terms["loss"])
    opt.zero_grad()
    terms["loss"].backward()
    opt.step()
    return out, terms


def test_phases_and_delegation():
    nest = build_method("nest")
    assert nest.needs_old_model == nest.base.needs_old_model and nest.base.name == "mib"
    assert nest.base_step_key() == nest.base.base_step_key()
    ctx0 = StepContext(step=0, classes_per_step=(3, 2), num_steps=2, epochs=2)
    assert nest.phases(ctx0) == nest.base.phases(ctx0)
    ph = nest.phases(CTX)
    assert [p.name for p in ph] == [PRETUNE, "train"] and ph[0].epochs == 5 and ph[1].epochs == 2
    assert build_method("nest", pretune_epochs=3).phases(CTX)[0].epochs == 3
    assert build_method("nest_plop").base.name == "plop" and build_method("nest_mib").base.name == "mib"
    assert build_method("nest", base="plop").base.name == "plop"
    for bad in ({"init": "zeros"}, {"pretune_loss": "kd"}, {"pretune_epochs": -1}):
        with pytest.raises(ValueError):
            build_method("nest", **bad)


def test_pretuning_changes_only_the_matrices_and_computes_the_generated_classifier():
    nest, old, model, batches = started()
    phase = nest.phases(CTX)[0]
    keys = list(model.state_dict())
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    matrices = {k: v.detach().clone() for k, v in nest.transform.named_parameters()}
    nest.on_phase_start(phase, model, old, batches, CTX)
    groups = nest.param_groups(model, CTX, phase)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in nest.transform.parameters()}
    assert not ids & {id(p) for p in model.parameters()}
    assert list(model.state_dict()) == keys  # mid-phase checkpoints load strictly

    out, terms = pretune_step(nest, old, model, batches[0], phase)
    assert set(terms) == {"loss", "pretune_unce"}
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), f"{k} changed during pre-tuning"
    assert any(not torch.equal(v, matrices[k]) for k, v in nest.transform.named_parameters())

    # The new logits of that step came from the generated classifier (of the matrices before the
    # update), the background row from its transform.
    with torch.no_grad():
        m = matrices
        head = out.features["head"]
        w = torch.einsum("nc,ncd,cd->nd", m["projection"], m["importance"], old_rows(model))
        low = out.features["logits_lowres"]
        torch.testing.assert_close(low[:, 3:5], F.conv2d(head, w[:, :, None, None], m["bias"]),
                                   atol=1e-5, rtol=1e-4)
        bg = (m["bg_scale"] * m["bg_channels"] * old_rows(model)[0])[None, :, None, None]
        torch.testing.assert_close(low[:, :1], F.conv2d(head, bg, model.classifier.convs[0].bias[:1]),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(low[:, 1:3], model.classifier.convs[0](head)[:, 1:], atol=1e-5, rtol=1e-4)

    nest.on_phase_end(phase, model, old, batches, CTX)
    assert list(model.state_dict()) == keys and nest.transform is None and nest.generated_step == 1
    assert not nest._pretuning
    # Hooks are gone: the model computes with its own (now generated) weights.
    with torch.no_grad():
        o = model(batches[0].image).features
        torch.testing.assert_close(o["logits_lowres"], model.classifier(o["head"]))


def test_generated_classifiers_are_the_transformation_of_the_old_ones():
    nest, old, model, batches = started(align=False, transform_background=False)
    phase = nest.phases(CTX)[0]
    nest.on_phase_start(phase, model, old, batches, CTX)
    pretune_step(nest, old, model, batches[0], phase)
    t = nest.transform
    w_old = old_rows(model).detach().clone()
    bg_before = model.classifier.convs[0].weight.detach().clone()
    with torch.no_grad():
        want_w = torch.einsum("nc,ncd,cd->nd", t.projection, t.importance, w_old)
        want_b = t.bias.detach().clone()
    nest.on_phase_end(phase, model, old, batches, CTX)
    new = model.classifier.convs[-1]
    torch.testing.assert_close(new.weight.flatten(1), want_w)
    torch.testing.assert_close(new.bias, want_b)
    assert torch.equal(model.classifier.convs[0].weight, bg_before)

    # With the official alignment: same directions, new rows at the old rows' mean norm, background
    # row at its old norm, every other old row untouched.
    nest, old, model, batches = started()
    t = nest.transform
    w_old = old_rows(model).detach().clone()
    with torch.no_grad():
        raw = t.new_weight(w_old)
        bg = t.background_weight(w_old[0])
    nest.write_classifiers(model, CTX)
    got = model.classifier.convs[-1].weight.flatten(1)
    torch.testing.assert_close(F.normalize(got, dim=1), F.normalize(raw, dim=1), atol=1e-5, rtol=1e-4)
    rows = old_rows(model)
    torch.testing.assert_close(got.norm(dim=1).mean(), rows.norm(dim=1).mean())
    torch.testing.assert_close(rows[0].norm(), w_old[0].norm())
    torch.testing.assert_close(F.normalize(rows[0], dim=0), F.normalize(bg, dim=0))
    assert torch.equal(rows[1:], w_old[1:])
    torch.testing.assert_close(model.classifier.convs[-1].bias.norm(),
                               model.classifier.convs[0].bias.norm())


def test_similarity_init_matches_its_definition():
    old, model, batches = tiny_setup()
    imp, counts = class_similarity(old, batches, CTX, size=32)
    # Brute force: mean over the pixels of new class n of p_old(c) * [f_d W_cd > 0].
    w = old_rows(model)  # the grown model's old rows are the old model's
    ref = torch.zeros(2, 3, 16)
    n_ref = torch.zeros(2)
    with torch.no_grad():
        for b in batches:
            o = old(b.image)
            f = F.interpolate(o.features["head"], size=(32, 32), mode="bilinear", align_corners=False)
            p = F.softmax(o.logits, 1)
            f, p, lab = f.permute(0, 2, 3, 1).reshape(-1, 16), p.permute(0, 2, 3, 1).reshape(-1, 3), b.label.flatten()
            for n in range(2):
                m = lab == 3 + n
                ref[n] += (p[m][:, :, None] * ((f[m][:, None, :] * w[None]) > 0)).sum(0)
                n_ref[n] += m.sum()
    torch.testing.assert_close(counts, n_ref)
    torch.testing.assert_close(imp, ref / n_ref[:, None, None], atol=1e-5, rtol=1e-4)

    fresh = model.classifier.convs[-1].bias.detach()[0].clone()  # PyTorch's default init
    nest = build_method("nest")
    nest.on_step_start(model, old, batches, CTX)
    torch.testing.assert_close(nest.transform.importance.detach(), imp)
    torch.testing.assert_close(nest.transform.projection.detach(), imp.sum(-1).softmax(-1))
    # the official code's run-time new bias: one fresh-conv value, repeated (not the old background's)
    torch.testing.assert_close(nest.transform.bias.detach(), fresh.repeat(2))
    assert abs(float(fresh)) <= 1 / 16 ** 0.5  # U(-1/sqrt(D), 1/sqrt(D)), D = 16 head channels
    assert not torch.equal(fresh, old.classifier.convs[0].bias[0].detach())
    bg = build_method("nest", new_bias="background")
    bg.on_step_start(model, old, batches, CTX)
    torch.testing.assert_close(bg.transform.bias.detach(), old.classifier.convs[0].bias[0].repeat(2).detach())
    with pytest.raises(ValueError, match="new_bias"):
        build_method("nest", new_bias="zero")


def test_uniform_and_random_inits():
    nest, old, model, batches = started(init="uniform", align=False, transform_background=False)
    with torch.no_grad():
        w = nest.transform.new_weight(old_rows(model))
    torch.testing.assert_close(w, old_rows(model).mean(0).expand(2, -1))  # the mean old classifier

    torch.manual_seed(1)
    a = build_method("nest", init="random")
    a.on_step_start(model, old, batches, CTX)
    torch.manual_seed(2)
    b = build_method("nest", init="random")
    b.on_step_start(model, old, batches, CTX)
    assert a.transform.importance.shape == (2, 3, 16) and a.transform.projection.shape == (2, 3)
    assert not torch.equal(a.transform.importance, b.transform.importance)
    assert torch.isfinite(a.transform.importance).all()


def test_no_pretuning_writes_the_initial_generated_classifiers_at_step_start():
    nest, old, model, batches = started(pretune_epochs=0, align=False, transform_background=False,
                                        init="uniform")
    assert [p.name for p in nest.phases(CTX)] == ["train"]
    assert nest.transform is None and nest.generated_step == 1
    torch.testing.assert_close(model.classifier.convs[-1].weight.flatten(1),
                               old_rows(model).mean(0).expand(2, -1))


def test_resuming_inside_the_pretuning_restores_the_matrices():
    nest, old, model, batches = started()
    phase = nest.phases(CTX)[0]
    nest.on_phase_start(phase, model, old, batches, CTX)
    pretune_step(nest, old, model, batches[0], phase)
    buf = io.BytesIO()
    torch.save({"method": nest.state_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh_model = copy.deepcopy(old)
    fresh_model.add_step(2)
    fresh_model.load_state_dict(ckpt["model"], strict=True)
    fresh = build_method("nest")
    fresh.load_state_dict(ckpt["method"])
    fresh.on_step_start(fresh_model, old, [], CTX)  # no data needed: nothing is recomputed
    for (k, v), (_, u) in zip(fresh.transform.named_parameters(), nest.transform.named_parameters()):
        assert torch.equal(v, u.detach()), k
    fresh.load_state_dict({})  # a checkpoint of a step without state erases nothing
    assert fresh.transform is not None
    nest.on_phase_end(phase, model, old, batches, CTX)
    # Resumed after the pre-tuning (in the base's phase): the written classifiers are kept.
    done = build_method("nest")
    done.load_state_dict(nest.state_dict())
    w = model.classifier.convs[-1].weight.detach().clone()
    done.on_step_start(model, old, [], CTX)
    assert done.transform is None and torch.equal(model.classifier.convs[-1].weight, w)
    with pytest.raises(ValueError):
        done.load_state_dict({"bogus": 1})


def test_formal_phase_delegates_and_old_classifiers_can_be_frozen():
    nest, old, model, batches = started("nest_plop")
    phase = nest.phases(CTX)[-1]
    ids = {id(p) for g in nest.param_groups(model, CTX, phase) for p in g["params"]}
    assert not ids & {id(p) for p in model.classifier.convs[0].parameters()}  # --fix_pre_cls
    assert {id(p) for p in model.classifier.convs[-1].parameters()} <= ids
    b = batches[0]
    out = model(b.image)
    with torch.no_grad():
        old_out = old(b.image)
    t = nest.make_targets(b, out, old_out, CTX)
    assert set(nest.loss(out, t, old_out, b, CTX)) == {"loss", "ce", "pod"}  # PLOP's terms
    # pretune_loss="base": the base's targets and loss in the pre-tuning too.
    nest, old, model, batches = started("nest_plop", pretune_loss="base")
    nest.on_phase_start(nest.phases(CTX)[0], model, old, batches, CTX)
    _, terms = pretune_step(nest, old, model, batches[0], nest.phases(CTX)[0])
    assert set(terms) == {"loss", "ce", "pod"}
    nest.on_phase_end(nest.phases(CTX)[0], model, old, batches, CTX)
