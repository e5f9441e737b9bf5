"""SSUL / SSUL-M invariants (Cha et al., NeurIPS 2021) on tiny tensors, tiny models and tiny runs."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ciss.saliency
from ciss.data import SyntheticDataset
from ciss.data.transforms import EvalTransform
from ciss.engine import train
from ciss.losses import binary_cross_entropy_one_hot
from ciss.methods import Phase, build_method
from ciss.methods.ssul import UNKNOWN_MARK, pseudo_label
from ciss.models import build_segmenter
from ciss.results import load_checkpoint
from ciss.scenario import build_scenario
from ciss.types import BACKGROUND, IGNORE, Batch, SegOutput, StepContext

pytest.importorskip("cv2", reason="SSUL's saliency detectors need opencv-contrib-python-headless")

CTX1 = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)  # old 0..2, new 3..4, unknown 5


def grown_pair(seed=0):
    torch.manual_seed(seed)
    old = build_segmenter("tiny", classes_per_step=(3,), head_channels=16, num_extra=1).eval()
    model = copy.deepcopy(old)
    model.add_step(2)
    return old, model


def _no_detector(*args, **kwargs):
    raise AssertionError("the saliency detector ran")


# ---- pseudo-labels --------------------------------------------------------------------------

def test_pseudo_labels_only_overwrite_background_and_unknown():
    unk = CTX1.num_seen  # 5
    label = torch.tensor([[[BACKGROUND, unk, 3, 4, IGNORE, BACKGROUND]]])  # (1, 1, 6)
    old_logits = torch.full((1, 4, 1, 6), -10.0)  # background, old 1, old 2, old unknown
    old_logits[:, 2] = 10.0  # the old model is sure: class 2 everywhere
    out = pseudo_label(label, old_logits, num_old=3, threshold=0.7, unknown_label=unk)
    assert out.tolist() == [[[2, 2, 3, 4, IGNORE, 2]]]  # current classes and ignore untouched

    old_logits[:, 2] = 0.5  # sigmoid 0.62 < 0.7: not confident enough
    assert torch.equal(pseudo_label(label, old_logits, 3, 0.7, unk), label)
    # the old model's best output is its background or its unknown: nothing to pseudo-label
    for winner in (0, 3):
        logits = torch.full((1, 4, 1, 6), -10.0)
        logits[:, winner] = 10.0
        logits[:, 1] = 5.0  # an old class is confident too, but not the most confident
        assert torch.equal(pseudo_label(label, logits, 3, 0.7, unk), label)


def test_make_targets_maps_the_mark_to_unknown_then_pseudo_labels():
    method = build_method("ssul")
    label = torch.tensor([[[UNKNOWN_MARK, BACKGROUND, 3, UNKNOWN_MARK]]])
    batch = Batch(image=torch.zeros(1, 3, 1, 4), label=label)
    old_logits = torch.full((1, 4, 1, 4), -10.0)
    old_logits[0, 1, 0, 3] = 10.0  # old class 1, confident, at the last pixel only
    t = method.make_targets(batch, SegOutput(torch.zeros(1, 6, 1, 4)), SegOutput(old_logits), CTX1)
    assert t.label.tolist() == [[[5, BACKGROUND, 3, 1]]]
    # step 0: no old model, the mark becomes the unknown label (index num_seen)
    ctx0 = StepContext(step=0, classes_per_step=(3, 2), num_steps=2)
    t0 = method.make_targets(batch, SegOutput(torch.zeros(1, 4, 1, 4)), None, ctx0)
    assert t0.label.tolist() == [[[3, BACKGROUND, 3, 3]]]
    no_unknown = build_method("ssul", unknown=False)
    assert no_unknown.num_extra_outputs() == 0
    t1 = no_unknown.make_targets(batch, SegOutput(torch.zeros(1, 5, 1, 4)), None, ctx0)
    assert t1.label.tolist() == [[[BACKGROUND, BACKGROUND, 3, BACKGROUND]]]


# ---- loss, prediction, init -------------------------------------------------------------------

def test_bce_sums_channels_and_averages_valid_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 3)
    label = torch.randint(0, 4, (2, 3, 3))
    label[0, 0, 0] = IGNORE
    onehot = torch.nn.functional.one_hot(label.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(1)
    valid = label != IGNORE
    torch.testing.assert_close(binary_cross_entropy_one_hot(logits, label), per[valid].mean())
    # an ignored pixel contributes nothing, whatever its logits
    logits2 = logits.clone()
    logits2[0, :, 0, 0] = 1e3
    torch.testing.assert_close(binary_cross_entropy_one_hot(logits2, label), per[valid].mean())


def test_eval_adds_unknown_to_background_and_drops_it():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4, 4) * 3  # 5 seen classes + unknown
    got = build_method("ssul").eval_logits(SegOutput(logits), CTX1)
    assert got.shape == (2, 5, 4, 4)
    p = torch.sigmoid(logits)
    ref = torch.cat([(p[:, 0] + p[:, 5])[:, None], p[:, 1:5]], dim=1)  # SSUL main.py validate
    torch.testing.assert_close(got.exp(), ref)
    assert torch.equal(got.argmax(1), ref.argmax(1))


@torch.no_grad()
def test_new_classifiers_start_as_the_unknown_classifier():
    old, model = grown_pair()
    build_method("ssul").init_new_classifiers(model, old, CTX1)
    new, unk = model.classifier.convs[-1], old.classifier.extra
    assert torch.equal(new.weight, unk.weight.expand_as(new.weight))
    assert torch.equal(new.bias, unk.bias.expand_as(new.bias))
    assert torch.equal(model.classifier.convs[0].weight, old.classifier.convs[0].weight)


def test_only_new_and_unknown_classifiers_train_after_step_0():
    old, model = grown_pair()
    method = build_method("ssul")
    phase = Phase("train", 1)
    ctx0 = StepContext(step=0, classes_per_step=(3,), num_steps=2)
    g0 = method.param_groups(old, ctx0, phase)
    assert g0[0]["lr_scale"] == pytest.approx(0.1)  # SSUL: backbone at a tenth of the lr
    assert sum(len(g["params"]) for g in g0) == len(list(old.parameters()))

    method.on_step_start(model, old, [], CTX1)
    groups = method.param_groups(model, CTX1, phase)
    trained = {id(p) for g in groups for p in g["params"]}
    expected = {id(p) for m in (model.classifier.convs[1], model.classifier.extra) for p in m.parameters()}
    assert trained == expected
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    method.train_mode(model, CTX1, phase)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.classifier.training


def test_base_step_is_its_own():
    keys = {build_method("ssul").base_step_key(), build_method("ssul_m").base_step_key()}
    assert len(keys) == 1 and "ce" not in keys  # SSUL and SSUL-M share step 0, CE methods do not
    assert build_method("ssul", detector="spectral_residual").base_step_key() not in keys
    assert build_method("ssul", unknown=False).base_step_key() not in keys
    with pytest.raises(ValueError, match="valid"):
        build_method("ssul", detector="dss")


def test_lr_after_step_0_is_ten_times_lr_next():
    # SSUL trains every step at lr 0.01; lr_next is MiB's 0.001, so the trained heads get x10
    old, model = grown_pair()
    method = build_method("ssul")
    method.on_step_start(model, old, [], CTX1)
    groups = method.param_groups(model, CTX1, Phase("train", 1))
    assert [g["lr_scale"] for g in groups] == [10.0, 10.0]
    unfrozen = build_method("ssul", freeze=False).param_groups(model, CTX1, Phase("train", 1))
    assert [g["lr_scale"] for g in unfrozen] == [pytest.approx(1.0), 10.0]  # backbone x0.1 of x10


# ---- ablations: Table 3 (softmax + CE), Table 4 (background init, random memory) ------------------

def test_ce_ablation_uses_softmax_everywhere():
    torch.manual_seed(0)
    method = build_method("ssul", loss_type="ce")
    logits = torch.randn(2, 6, 3, 3) * 3  # 5 seen classes + unknown
    label = torch.randint(0, 6, (2, 3, 3))
    label[0, 0, 0] = IGNORE
    ctx0 = StepContext(step=0, classes_per_step=(5,), num_steps=2)
    targets = method.make_targets(Batch(image=torch.zeros(2, 3, 3, 3), label=label),
                                  SegOutput(logits), None, ctx0)
    loss = method.loss(SegOutput(logits), targets, None, None, ctx0)
    ref = torch.nn.functional.cross_entropy(logits, label, ignore_index=IGNORE)
    torch.testing.assert_close(loss["loss"], ref)
    assert "ce" in loss and "bce" not in loss
    p = torch.softmax(logits, 1)
    got = method.eval_logits(SegOutput(logits), CTX1)
    torch.testing.assert_close(got.exp(), torch.cat([(p[:, 0] + p[:, 5])[:, None], p[:, 1:5]], 1))
    # pseudo-labels from softmax scores: two equally sure old classes give 0.5 each, below 0.7,
    # where their sigmoids (1.0) would pass
    old_logits = torch.full((1, 4, 1, 2), -10.0)
    old_logits[:, 1] = old_logits[:, 2] = 10.0
    lbl = torch.zeros(1, 1, 2, dtype=torch.long)
    assert pseudo_label(lbl, old_logits, 3, 0.7, softmax=True).tolist() == [[[0, 0]]]
    assert pseudo_label(lbl, old_logits, 3, 0.7).tolist() == [[[1, 1]]]
    assert method.base_step_key() != build_method("ssul").base_step_key()
    with pytest.raises(ValueError, match="loss_type"):
        build_method("ssul", loss_type="focal")


@torch.no_grad()
def test_new_classifiers_can_start_from_the_background_classifier():
    old, model = grown_pair()
    build_method("ssul", transfer_from="background").init_new_classifiers(model, old, CTX1)
    new, bg = model.classifier.convs[-1], old.classifier.convs[0]
    assert torch.equal(new.weight, bg.weight[:1].expand_as(new.weight))
    assert torch.equal(new.bias, bg.bias[:1].expand_as(new.bias))
    assert not torch.equal(new.weight, old.classifier.extra.weight.expand_as(new.weight))
    with pytest.raises(ValueError, match="transfer_from"):
        build_method("ssul", transfer_from="mean")


# ---- data: the unknown mark ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_scenario(tmp_path_factory):
    ds = SyntheticDataset("train", num_classes=4, size=32, length=16)
    return build_scenario(ds, "2-2", "overlapped", cache_dir=tmp_path_factory.mktemp("cache"),
                          progress=False)


def test_train_data_marks_salient_background(small_scenario, tmp_path, monkeypatch):
    scn, step = small_scenario, 1
    folder = tmp_path / "sal"
    folder.mkdir()
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    for i in scn.train_indices(step):
        Image.fromarray(left).save(folder / f"{scn.train_data.ids[i]}.png")
    monkeypatch.setattr(ciss.saliency, "detect", _no_detector)
    method = build_method("ssul", saliency_dir=str(folder), cache_dir=str(tmp_path / "c"))
    data, sampler = method.train_data(scn.train_dataset(step), scn, step, EvalTransform(None), 4, 0)
    assert sampler is None and len(data) == len(scn.train_indices(step))
    for k in range(len(data)):
        _, lbl, i = data[k]
        plain = torch.from_numpy(scn.train_lut(step)[scn.train_data.load_mask(i)].astype(np.int64))
        expect = plain.clone()
        expect[:, :16][plain[:, :16] == BACKGROUND] = UNKNOWN_MARK
        assert torch.equal(lbl, expect)


def test_densely_labelled_data_takes_unknown_from_unlabelled_pixels(small_scenario, monkeypatch):
    scn = dataclasses.replace(small_scenario, background_is_void=True)  # ADE-like
    monkeypatch.setattr(ciss.saliency, "detect", _no_detector)
    data, _ = build_method("ssul").train_data(scn.train_dataset(1), scn, 1, EvalTransform(None), 4, 0)
    _, lbl, i = data[0]
    plain = scn.train_lut(1)[scn.train_data.load_mask(i)]
    assert torch.equal(lbl == UNKNOWN_MARK, torch.from_numpy(plain == BACKGROUND))


# ---- SSUL-M -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    ds = SyntheticDataset("train", num_classes=10, size=32, length=120)
    return build_scenario(ds, "5-1", "overlapped", cache_dir=tmp_path_factory.mktemp("cache"),
                          progress=False)


def ssul_m(**kw):  # unknown from unlabelled pixels: these tests need no saliency
    return build_method("ssul_m", unknown_source="unlabelled", memory_size=10, **kw)


@torch.no_grad()
def constant_model(scenario, step, winner):
    """A model of the classes up to `step` (+ unknown) that outputs class `winner` everywhere,
    sure of it."""
    model = build_segmenter("tiny", classes_per_step=scenario.classes_per_step[: step + 1],
                            head_channels=8, num_extra=1).eval()
    heads = [*model.classifier.convs, model.classifier.extra]
    for conv in heads:
        conv.weight.zero_()
        conv.bias.fill_(-10.0)
    row = winner
    for conv in heads:
        if row < conv.bias.numel():
            conv.bias[row] = 10.0
            break
        row -= conv.bias.numel()
    return model


def test_batches_are_half_memory(scenario):
    method = ssul_m()
    data0, sampler0 = method.train_data(scenario.train_dataset(0), scenario, 0, EvalTransform(None), 8, 0)
    assert sampler0 is None and method.state_dict() == {}  # no memory at step 0
    with pytest.raises(ValueError, match="previous step's model"):
        ssul_m().train_data(scenario.train_dataset(2), scenario, 2, EvalTransform(None), 8, 0)
    data, sampler = method.train_data(scenario.train_dataset(2), scenario, 2, EvalTransform(None), 8, 0,
                                      constant_model(scenario, 1, BACKGROUND))
    n_cur = len(scenario.train_indices(2))
    assert len(data) == n_cur + 10 and method.memory_step == 1
    batches = list(sampler)
    assert batches and all(len(b) == 8 for b in batches)
    assert all(sum(j >= n_cur for j in b) == 4 for b in batches)
    # memory images are relabelled with every seen class and carry the unknown mark too
    seen = set(range(scenario.classes_per_step[0] + 2))
    for j in range(n_cur, n_cur + 10):
        _, lbl, i = data[j]
        assert i in set(method.memory.indices.tolist())
        assert set(lbl.unique().tolist()) <= seen | {UNKNOWN_MARK, IGNORE}
        assert not (lbl == BACKGROUND).any()  # densely labelled mode: all background is unknown


def test_memory_reads_only_step_labels_and_pseudo_labels(scenario):
    """utils/memory.py: a candidate holds the classes of its step's labels plus, after step 0, the
    previous model's confident predictions on background; never another step's ground truth."""
    method = ssul_m()
    view = EvalTransform(None)
    step1 = set(scenario.labels_of_step(1))
    sure_bg = method.memory_candidates(scenario, 1, constant_model(scenario, 1, BACKGROUND), 1, view)
    assert {i for i, _ in sure_bg} == set(scenario.train_indices(1).tolist())
    assert all(set(held) <= step1 for _, held in sure_bg)
    lut = scenario.test_lut(1)
    gt_old = [i for i, _ in sure_bg if set(lut[scenario.train_data.load_mask(i)].ravel()) & {1, 2, 3}]
    assert gt_old, "some step-1 image shows a step-0 class in its ground truth"
    # a model sure of class 2 everywhere pseudo-labels every image's background as 2
    sure_2 = method.memory_candidates(scenario, 1, constant_model(scenario, 1, 2), 1, view)
    assert all(2 in held for _, held in sure_2)
    # after step 0 there is no previous model: the step's labels only
    first = method.memory_candidates(scenario, 0, constant_model(scenario, 0, 2), 0, view)
    lut0 = scenario.train_lut(0)
    for i, held in first:
        assert held == sorted(set(lut0[scenario.train_data.load_mask(i)].ravel()) - {0, 255})
    # a model that is not sure (sigmoid of 0.5 = 0.62 < 0.7) adds nothing
    unsure = constant_model(scenario, 1, 2)
    with torch.no_grad():
        unsure.classifier.convs[0].bias[2] = 0.5
    assert method.memory_candidates(scenario, 1, unsure, 1, view) == sure_bg


def test_memory_state_round_trips(scenario):
    prev = constant_model(scenario, 1, BACKGROUND)
    a = ssul_m()
    a.train_data(scenario.train_dataset(2), scenario, 2, EvalTransform(None), 8, 0, prev)
    state = a.state_dict()
    json.dumps(state)  # plain data only
    b = ssul_m()
    b.load_state_dict(state)
    assert b.memory.indices.tolist() == a.memory.indices.tolist() and b.memory_step == 1
    # already up to date: unchanged
    b.train_data(scenario.train_dataset(2), scenario, 2, EvalTransform(None), 8, 0, prev)
    assert b.memory.indices.tolist() == a.memory.indices.tolist()
    c = ssul_m()  # refilled step by step, as after each step
    c.train_data(scenario.train_dataset(1), scenario, 1, EvalTransform(None), 8, 0,
                 constant_model(scenario, 0, BACKGROUND))
    c.train_data(scenario.train_dataset(2), scenario, 2, EvalTransform(None), 8, 0, prev)
    assert c.state_dict() == state
    c.load_state_dict({})  # a step-0 checkpoint: no memory yet
    assert c.memory is None and c.state_dict() == {}
    with pytest.raises(ValueError, match="unknown state keys"):
        c.load_state_dict({"thresholds": []})
    r = ssul_m(memory_sampling="random")
    r.train_data(scenario.train_dataset(2), scenario, 2, EvalTransform(None), 8, 0, prev)
    assert len(r.memory) == 10 and r.state_dict()["memory"]["sampling"] == "random"
    with pytest.raises(ValueError, match="memory_sampling"):
        ssul_m(memory_sampling="herding")


# ---- whole runs through the engine --------------------------------------------------------------

def test_step_leaves_network_and_old_classifiers_bit_identical(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("CISS_CACHE", str(tmp_path / "ciss-cache"))
    cfg = tiny_cfg("method=ssul", "optim.epochs_next=2")
    res = train(cfg)
    s0 = load_checkpoint(res.run_dir / "ckpt" / "step-0.pt")["model"]
    s1 = load_checkpoint(res.run_dir / "ckpt" / "step-1.pt")["model"]
    trained = ("classifier.convs.1.", "classifier.extra.")
    frozen = [k for k in s1 if not k.startswith(trained)]
    assert any("running_mean" in k for k in frozen) and any("num_batches_tracked" in k for k in frozen)
    changed = [k for k in frozen if not torch.equal(s0[k], s1[k])]
    assert not changed, f"changed after step 0: {changed}"
    assert not torch.equal(s0["classifier.extra.weight"], s1["classifier.extra.weight"])
    losses = [json.loads(l) for l in (res.run_dir / "losses.jsonl").read_text().splitlines()]
    assert all("bce" in r for r in losses)
    assert list((Path(cfg.cache_dir) / "saliency").rglob("*.png"))  # maps cached with the run's cache


def test_ssul_m_run_is_flagged_and_checkpoints_its_memory(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("CISS_CACHE", str(tmp_path / "ciss-cache"))
    res = train(tiny_cfg("method=ssul_m", "method_args={memory_size: 4}"))
    rows = [json.loads(l) for l in (res.run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(r["uses_memory"] for r in rows)
    assert json.loads((res.run_dir / "meta.json").read_text())["uses_memory"] is True
    state = load_checkpoint(res.run_dir / "ckpt" / "step-1.pt")["method"]
    assert state["memory_step"] == 0 and len(state["memory"]["indices"]) == 4
    assert load_checkpoint(res.run_dir / "ckpt" / "step-0.pt")["method"] == {}
