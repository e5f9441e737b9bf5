"""PLOP invariants (Douillard et al., CVPR 2021) on tiny tensors and a tiny model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ciss.losses import local_pod, local_pod_distance, plop_uncertainty
from ciss.methods import build_method
from ciss.methods.base import Phase
from ciss.methods.plop import histogram_median, merge_new_into_background
from ciss.models import build_segmenter
from conftest import checkpoint_round_trip
from ciss.types import BACKGROUND, IGNORE, Batch, SegOutput, StepContext

CTX = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)


def test_histogram_median_matches_the_exact_median():
    torch.manual_seed(0)
    values = torch.rand(2, 5001) ** 3
    nb = 1000
    hist = torch.stack([torch.bincount((v * nb).long().clamp(max=nb - 1), minlength=nb) for v in values])
    med = histogram_median(hist)
    torch.testing.assert_close(med, values.median(dim=1).values, atol=1.0 / nb, rtol=0)
    assert histogram_median(torch.zeros(1, 10, dtype=torch.long)).item() == 0.0


def test_pseudo_labels_replace_only_confident_background_with_old_classes():
    torch.manual_seed(0)
    plop = build_method("plop")
    plop.thresholds = torch.tensor([0.02, 0.05, 0.01])
    plop.thresholds_step = 1
    old_logits = 3 * torch.randn(2, 3, 8, 8)  # a spread of confident and unsure pixels
    label = torch.randint(0, 5, (2, 8, 8))
    label[:, 0, :3] = IGNORE
    batch = Batch(image=torch.zeros(2, 3, 8, 8), label=label)
    out = SegOutput(logits=torch.zeros(2, 5, 8, 8))
    t = plop.make_targets(batch, out, SegOutput(logits=old_logits), CTX)

    probs = F.softmax(old_logits, 1)
    pred = probs.argmax(1)
    u = plop_uncertainty(probs, CTX.num_seen)
    bg = label == BACKGROUND
    confident = u < plop.thresholds[pred]
    assert torch.equal(t.label[~bg], label[~bg])  # new-class and ignored pixels untouched
    assert torch.equal(t.label[bg & confident], pred[bg & confident])  # old argmax, bg included
    assert (t.label[bg & confident] < CTX.num_old).all()
    assert (t.label[bg & ~confident] == IGNORE).all()  # unsure background is not trained on
    assert 0 < (bg & confident).sum() < bg.sum()  # the test exercises both branches
    factor = (bg & confident).float().sum((1, 2)) / (bg.float().sum((1, 2)) + 1e-6)
    torch.testing.assert_close(t.weight, factor[:, None, None].expand_as(label))


def test_uncertainty_scale_is_plops():
    p = torch.full((1, 4, 1, 1), 0.25)  # uniform: entropy log 4
    u = plop_uncertainty(p, num_seen=6)
    torch.testing.assert_close(u, torch.full((1, 1, 1), 1 / (4 * math.log(6))))


def test_local_pod_shape_and_zero_for_identical_maps():
    x = torch.randn(2, 3, 8, 8)
    assert local_pod(x).shape == (2, 3 * (16 + 4 * 8 + 16 * 4))
    assert local_pod_distance(x, x.clone()).item() == 0.0
    assert local_pod_distance(x, x + 0.1).item() > 0.0
    # Scales finer than the map are skipped instead of pooling empty cells.
    assert torch.isfinite(local_pod(torch.randn(1, 2, 2, 2))).all()


def test_pod_loss_zero_for_identical_features_and_logits_merge():
    torch.manual_seed(0)
    stages = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    head = torch.randn(2, 6, 4, 4)
    old_low = torch.randn(2, 3, 4, 4)
    new_low = torch.cat([old_low, torch.zeros(2, 2, 4, 4)], 1)  # new logits add nothing to bg
    feats = lambda low: {"distilled": [s.clone() for s in stages], "head": head.clone(), "logits_lowres": low}
    old = SegOutput(torch.zeros(2, 3, 8, 8), feats(old_low))
    new = SegOutput(torch.zeros(2, 5, 8, 8), feats(new_low))
    plop = build_method("plop")
    assert plop.pod_loss(new, old, CTX).item() == 0.0
    merged = merge_new_into_background(torch.ones(1, 5, 1, 1), 3)
    assert merged.flatten().tolist() == [3.0, 1.0, 1.0]
    new.features["head"] = head + 1
    expected = 0.01 * local_pod_distance(head, head + 1) * math.sqrt(5 / 2) / 4
    torch.testing.assert_close(plop.pod_loss(new, old, CTX), expected)


def test_without_logits_the_decoder_output_takes_the_last_map_factor():
    # PLOP's pod_options switch.after factor (0.0005) goes to the last distilled map: the decoder
    # output when the logits are not distilled (pod_logits=False), not the stages' 0.01.
    torch.manual_seed(0)
    stages = [torch.randn(2, 4, 8, 8)]
    head = torch.randn(2, 6, 4, 4)
    low = torch.randn(2, 3, 4, 4)
    old = SegOutput(torch.zeros(2, 3, 8, 8), {"distilled": stages, "head": head, "logits_lowres": low})
    new = SegOutput(torch.zeros(2, 5, 8, 8), {"distilled": [stages[0] + 1], "head": head + 2,
                                              "logits_lowres": torch.cat([low, low[:, :2]], 1)})
    plop = build_method("plop", pod_logits=False)
    expected = (0.01 * local_pod_distance(stages[0], stages[0] + 1)
                + 0.0005 * local_pod_distance(head, head + 2)) * math.sqrt(5 / 2) / 2
    torch.testing.assert_close(plop.pod_loss(new, old, CTX), expected)


@pytest.mark.parametrize("name,strides", [("efficientnet_lite0", [4, 8, 16, 16]),
                                          ("efficientnet_lite0_headless", [4, 8, 16, 16]),
                                          ("tiny", [4, 8, 16])])
def test_pod_reads_the_stages_the_backbone_declares(name, strides):
    # PLOP distils ResNet's four stages (strides 4, 8, 16, 16) + decoder output + logits: 6 maps.
    # Lite0's stride-2 stage has no counterpart and is left out.
    torch.manual_seed(0)
    model = build_segmenter(name, classes_per_step=(3,), head_channels=16, pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in out.features["distilled"]] == strides
    assert [model.backbone.strides[i] for i in model.backbone.distill_stages] == strides
    assert len(out.features["stages"]) == len(strides) + 1  # one stride-2 stage left out
    plop = build_method("plop")
    old = SegOutput(out.logits[:, :3], dict(out.features))
    low = out.features["logits_lowres"]
    grown = torch.cat([low, torch.zeros_like(low[:, :2])], 1)  # new logits add nothing to bg
    other_stages = {**out.features, "logits_lowres": grown,
                    "stages": [s + 1.0 for s in out.features["stages"]]}
    assert plop.pod_loss(SegOutput(out.logits, other_stages), old, CTX).item() == 0.0
    other_distilled = {**other_stages, "distilled": [s + 1.0 for s in out.features["distilled"]]}
    assert plop.pod_loss(SegOutput(out.logits, other_distilled), old, CTX).item() > 0.0


def tiny_setup():
    torch.manual_seed(0)
    old = build_segmenter("tiny", classes_per_step=(3,), head_channels=16).eval()
    model = copy.deepcopy(old)
    model.add_step(2)
    batches = [Batch(image=torch.randn(2, 3, 32, 32), label=torch.randint(0, 5, (2, 32, 32)) * (i % 2))
               for i in range(3)]
    return old, model, batches


@pytest.mark.parametrize("fix_bn", [True, False])
def test_feature_pod_starts_at_zero_only_with_frozen_bn_statistics(fix_bn):
    old, model, batches = tiny_setup()
    model.train()  # leave the old model's statistics behind, as a step's first batches would
    plop = build_method("plop", fix_bn=fix_bn)
    assert build_method("plop").fix_bn is False  # PLOP's scripts
    plop.train_mode(model, CTX, plop.phases(CTX)[0])
    with torch.no_grad():
        new_maps = model(batches[0].image).features["stages"]
        old_maps = old(batches[0].image).features["stages"]
    pod = sum(local_pod_distance(o, n).item() for o, n in zip(old_maps, new_maps))
    # Unchanged weights: with frozen statistics the stages are the old model's exactly; with batch
    # statistics they differ before any update (a POD of ~64 at batch 8 on ccp21). (The head's dropout
    # still draws masks in train mode, as in every method.)
    assert (pod == 0.0) if fix_bn else (pod > 1e-3)
    plop.train_mode(model, StepContext(step=0, classes_per_step=(3,), num_steps=2), Phase("train", 1))
    assert all(m.training for m in model.modules())  # step 0 trains BN as usual


@pytest.mark.parametrize("old_bn", ["running", "batch"])
def test_pod_old_bn_batch_compares_maps_under_the_same_statistics(old_bn):
    old, model, batches = tiny_setup()
    with torch.no_grad():  # new classes adding nothing to the background logit
        for p in model.classifier.convs[1].parameters():
            p.zero_()
    plop = build_method("plop", pod_old_bn=old_bn)
    assert build_method("plop").pod_old_bn == "running"  # PLOP's
    plop.on_step_start(model, old, batches, CTX)
    plop.train_mode(model, CTX, plop.phases(CTX)[0])
    model.head.dropout.eval()  # isolate BN: dropout draws masks in the new model only
    b = batches[0]
    with torch.no_grad():
        out = model(b.image)
        old_out = old(b.image)  # what the loop passes: the eval-mode old model
        terms = plop.loss(out, plop.make_targets(b, out, old_out, CTX), old_out, b, CTX)
    # Unchanged weights: the eval-mode old model's maps differ from the train-mode new model's by the
    # BN statistics alone; under "batch" the old maps use the batch's statistics too.
    assert (terms["pod"].item() == 0.0) if old_bn == "batch" else (terms["pod"].item() > 1e-3)
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not old.training  # the pseudo-labels' old model is untouched
    with pytest.raises(ValueError, match="pod_old_bn"):
        build_method("plop", pod_old_bn="frozen")
    if old_bn == "batch":
        with pytest.raises(RuntimeError, match="on_step_start"):
            build_method("plop", pod_old_bn="batch").loss(out, plop.make_targets(b, out, old_out, CTX),
                                                          old_out, b, CTX)


def test_thresholds_are_floored_medians_and_survive_a_checkpoint():
    old, model, batches = tiny_setup()
    plop = build_method("plop", median_bins=1000)
    plop.init_new_classifiers(model, old, CTX)
    plop.on_step_start(model, old, batches, CTX)
    assert plop.thresholds.shape == (3,) and plop.thresholds_step == 1
    # Reference: exact per-class median over the background pixels, floored.
    with torch.no_grad():
        us, preds = [], []
        for b in batches:
            p = F.softmax(old(b.image).logits, 1)
            bg = b.label == BACKGROUND
            us.append(plop_uncertainty(p, 5)[bg])
            preds.append(p.argmax(1)[bg])
    u, pred = torch.cat(us), torch.cat(preds)
    for c in range(3):
        if (pred == c).any():
            ref = max(u[pred == c].median().item(), plop.entropy_floor)
            assert abs(plop.thresholds[c].item() - ref) <= 1.0 / 1000 + 1e-6
        else:
            assert plop.thresholds[c].item() == pytest.approx(plop.entropy_floor)

    fresh = checkpoint_round_trip(plop)
    assert torch.equal(fresh.thresholds, plop.thresholds) and fresh.thresholds_step == 1
    fresh.load_state_dict({})  # a step-0 checkpoint carries no thresholds and erases none
    assert fresh.thresholds is not None
    # Resumed inside the step: the thresholds are kept, not recomputed.
    kept = fresh.thresholds
    fresh.on_step_start(model, old, [], CTX)
    assert fresh.thresholds is kept
    with pytest.raises(ValueError):
        fresh.load_state_dict({"bogus": 1})


def test_plop_step_loss_and_step0():
    old, model, batches = tiny_setup()
    plop = build_method("plop")
    ctx0 = StepContext(step=0, classes_per_step=(3, 2), num_steps=2)
    plop.on_step_start(old, None, batches, ctx0)
    assert plop.thresholds is None and plop.state_dict() == {}
    b = batches[0]
    with pytest.raises(RuntimeError, match="on_step_start"):
        plop.make_targets(b, model(b.image), old(b.image), CTX)
    plop.init_new_classifiers(model, old, CTX)
    plop.on_step_start(model, old, batches, CTX)
    model.train()
    out = model(b.image)
    with torch.no_grad():
        old_out = old(b.image)
    t = plop.make_targets(b, out, old_out, CTX)
    terms = plop.loss(out, t, old_out, b, CTX)
    assert set(terms) == {"loss", "ce", "pod"} and terms["pod"] > 0
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    t0 = plop.make_targets(b, out, None, ctx0)
    assert t0.weight is None and torch.equal(t0.label, b.label)
    assert plop.base_step_key() == "ce"


def test_a_domain_step_distils_with_factor_one():
    # A domain-incremental step (Cityscapes domains) adds no class: sqrt(seen / new) would divide by
    # zero; the official task lists give such a step every class, a factor of 1.
    from ciss.methods.plop import step_factor

    assert step_factor(StepContext(step=1, classes_per_step=(19, 0), num_steps=2)) == 1.0
    assert step_factor(CTX) == pytest.approx(math.sqrt(5 / 2))
    torch.manual_seed(0)
    feats = {"distilled": [torch.randn(2, 4, 8, 8)], "head": torch.randn(2, 6, 4, 4),
             "logits_lowres": torch.randn(2, 3, 4, 4)}
    moved = {k: [v[0] + 1] if k == "distilled" else v + 1 for k, v in feats.items()}
    ctx = StepContext(step=1, classes_per_step=(3, 0), num_steps=2)
    pod = build_method("plop").pod_loss(SegOutput(torch.zeros(2, 3, 8, 8), moved),
                                        SegOutput(torch.zeros(2, 3, 8, 8), feats), ctx)
    unscheduled = build_method("plop", pod_schedule=False).pod_loss(
        SegOutput(torch.zeros(2, 3, 8, 8), moved), SegOutput(torch.zeros(2, 3, 8, 8), feats), ctx)
    assert torch.isfinite(pod) and pod.item() > 0 and torch.equal(pod, unscheduled)


@pytest.mark.parametrize("wrapper", ["gsc", "nest_plop"])
def test_methods_over_plop_take_its_pod_old_bn(wrapper):
    old, model, batches = tiny_setup()
    m = build_method(wrapper, base={"name": "plop", "pod_old_bn": "batch"})
    assert m.base.pod_old_bn == "batch"
    m.init_new_classifiers(model, old, CTX)
    m.on_step_start(model, old, batches, CTX)
    assert m.base._old_batch_bn is not None and not m.base._old_batch_bn.training
    model.train()
    b = batches[1]
    out = model(b.image)
    with torch.no_grad():
        old_out = old(b.image)
    terms = m.loss(out, m.make_targets(b, out, old_out, CTX), old_out, b, CTX)
    assert torch.isfinite(terms["loss"]) and terms["pod"] > 0
