"""NeST's pre-tuning: its loss on a hand-made case, its lr, MiB's init left out, and its place before
the formal training, the last three through the engine."""

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ciss.engine import train
from ciss.methods import METHODS, build_method
from ciss.methods.nest import PRETUNE, NeST
from ciss.types import Batch, SegOutput
from test_method_nest import CTX, started, tiny_setup


def test_pretuning_loss_is_the_unbiased_ce_on_the_step_labels():
    nest, old, model, batches = started()
    phase = nest.phases(CTX)[0]
    nest.on_phase_start(phase, model, old, batches, CTX)
    # Four pixels over bg | old 1, 2 | new 3, 4 with these softmax rows; labels bg, new 4, new 3,
    # ignored (whose row would dominate if it counted).
    p = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15],
                      [0.3, 0.1, 0.1, 0.1, 0.4],
                      [0.05, 0.05, 0.1, 0.6, 0.2],
                      [0.96, 0.01, 0.01, 0.01, 0.01]])  # (pixels, C_seen)
    logits = p.log().T.reshape(1, 5, 1, 4)
    label = torch.tensor([[[0, 4, 3, 255]]])
    batch = Batch(image=torch.zeros(1, 3, 1, 4), label=label)
    out = SegOutput(logits)
    old_out = SegOutput(torch.randn(1, 3, 1, 4))  # no distillation in the pre-tuning: not read
    targets = nest.make_targets(batch, out, old_out, CTX)
    assert torch.equal(targets.label, label) and targets.weight is None  # the raw labels
    terms = nest.loss(out, targets, old_out, batch, CTX)
    assert set(terms) == {"loss", "pretune_unce"}
    # Background: its probability plus every old class's (MiB's unbiased CE); new classes: their own.
    by_hand = (-math.log(0.1 + 0.2 + 0.3) - math.log(0.4) - math.log(0.6)) / 3
    # Mean over the 3 labelled pixels; the official loss.mean() also counts the ignored one (x 3/4).
    assert abs(float(terms["loss"]) - by_hand) < 1e-6
    nest.on_phase_end(phase, model, old, batches, CTX)
    # Out of the pre-tuning the base's loss is back (MiB: unbiased CE + distillation).
    assert set(nest.loss(out, nest.make_targets(batch, out, old_out, CTX), old_out, batch, CTX)) == \
        {"loss", "unce", "unkd"}


def test_mibs_background_init_is_skipped():
    for name in ("nest", "nest_plop"):
        old, model, _ = tiny_setup()
        before = copy.deepcopy(model.state_dict())
        build_method(name).init_new_classifiers(model, old, CTX)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), name
        # ... where the base alone would have split the background (init_balanced).
        base = copy.deepcopy(model)
        build_method(name).base.init_new_classifiers(base, old, CTX)
        assert not torch.equal(base.classifier.convs[0].bias, model.classifier.convs[0].bias)
    # The written classifiers leave the old background bias as it was.
    nest, old, model, _ = started(pretune_epochs=0)
    assert torch.equal(model.classifier.convs[0].bias, old.classifier.convs[0].bias)
    assert not torch.equal(model.classifier.convs[-1].weight[0], old.classifier.convs[0].weight[0])


EVENTS: list = []


@dataclass
class _RecordingNeST(NeST):
    """NeST over MiB that records the hooks the engine calls, in order."""

    name = "_recording_nest"

    def init_new_classifiers(self, model, old_model, ctx):
        super().init_new_classifiers(model, old_model, ctx)
        EVENTS.append(("init", ctx.step))

    def on_step_start(self, model, old_model, loader, ctx):
        if old_model is not None:  # what the step starts from, once the classifiers grew
            EVENTS.append(("bias", torch.equal(model.classifier.convs[0].bias, old_model.classifier.convs[0].bias)))
        super().on_step_start(model, old_model, loader, ctx)
        EVENTS.append(("step_start", ctx.step))

    def on_phase_start(self, phase, model, old_model, loader, ctx):
        super().on_phase_start(phase, model, old_model, loader, ctx)
        ids = {id(p) for p in self.transform.parameters()} if phase.name == PRETUNE else set()
        EVENTS.append(("phase_start", ctx.step, phase.name, ids))

    def on_phase_end(self, phase, model, old_model, loader, ctx):
        super().on_phase_end(phase, model, old_model, loader, ctx)
        EVENTS.append(("phase_end", ctx.step, phase.name))


def test_pretuning_runs_first_at_its_lr_through_the_engine(tiny_cfg, monkeypatch):
    monkeypatch.setitem(METHODS, _RecordingNeST.name, _RecordingNeST)
    EVENTS.clear()

    def record_sgd_step(opt, args, kwargs):
        EVENTS.append(("sgd", [g["lr"] for g in opt.param_groups],
                       {id(p) for g in opt.param_groups for p in g["params"]}))

    hook = register_optimizer_step_pre_hook(record_sgd_step)
    try:
        cfg = tiny_cfg(f"method={_RecordingNeST.name}", "optim.lr_next=0.01",
                       "method_args={pretune_epochs: 2, pretune_lr_scale: 3.0}")
        train(cfg)
    finally:
        hook.remove()
    step1 = EVENTS[next(i for i, e in enumerate(EVENTS) if e[:2] == ("init", 1)):]
    assert [e[0] if e[0] in ("init", "bias", "step_start") else e[:3] for e in step1 if e[0] != "sgd"] == [
        "init", "bias", "step_start", ("phase_start", 1, PRETUNE), ("phase_end", 1, PRETUNE),
        ("phase_start", 1, "train"), ("phase_end", 1, "train")]
    assert step1[1] == ("bias", True)  # MiB's init_balanced did not touch the background bias
    start, end = (i for i, e in enumerate(step1) if e[0] in ("phase_start", "phase_end") and e[2] == PRETUNE)
    pretune_ids = step1[start][3]
    pretune_sgd = [e for e in step1[start:end] if e[0] == "sgd"]
    formal_sgd = [e for e in step1[end:] if e[0] == "sgd"]
    assert formal_sgd and len(pretune_sgd) == 2 * len(formal_sgd)  # 2 pre-tuning epochs, then 1
    # Every pre-tuning update moves the matrices only, and none comes after the formal training began.
    assert all(e[2] == pretune_ids for e in pretune_sgd)
    assert all(not e[2] & pretune_ids for e in formal_sgd)
    # The pre-tuning lr is the step's lr times pretune_lr_scale (poly-decayed from there).
    assert pretune_sgd[0][1] == [pytest.approx(0.03)]
    assert max(lr for e in pretune_sgd for lr in e[1]) == pytest.approx(0.03)
    assert all(lr == pytest.approx(0.01) for lr in formal_sgd[0][1])
