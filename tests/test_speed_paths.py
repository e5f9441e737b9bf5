"""The fast paths of training and evaluation: image cache, BN folding, frozen early stages, argmax,
size-bucketed evaluation batches, the holdout split. Each must give what the slow path gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ciss.config import load_config
from ciss.data import DataError, build_dataset
from ciss.data.image_cache import ResizeCache
from ciss.data.transforms import EvalTransform, Resized, TrainTransform
from ciss.engine import Experiment, size_batches
from ciss.metrics import predicted_labels
from ciss.models import build_segmenter, freeze_early, inference_copy
from ciss.scenario import StepDataset

from test_data_folder import write_folder


def _noisy_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """A folder dataset of textured JPEGs of the given (width, height) sizes, labels of 3 classes."""
    rng = np.random.default_rng(0)
    for sub in ("images", "labels", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    ids = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.jpg")
        lbl = rng.integers(0, 3, (h, w), dtype=np.uint8)
        Image.fromarray(lbl, mode="L").save(root / "labels" / f"{i:03d}.png")
        ids.append(f"{i:03d}")
    (root / "splits" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


# ---- image cache -------------------------------------------------------------------------------

def test_cached_items_equal_decoded_and_resized(tmp_path):
    root = _noisy_folder(tmp_path / "data", [(40, 30), (33, 50)])
    raw = build_dataset("folder", "train", root)
    cached = ResizeCache(raw, 16, tmp_path / "cache")
    for i in range(len(raw)):
        for _ in range(2):  # the first read fills the entry, the second reads it back
            image, mask = cached[i]
            want = Resized(EvalTransform(None), 16)(*raw[i])
            got = Resized(EvalTransform(None), 16)(image, mask)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert cached.entry(i).is_file()
    assert min(cached[1][0].shape[:2]) == 16
    # everything but the items is the dataset's own
    assert cached.ids == raw.ids and cached.cache_key() == raw.cache_key()
    assert (cached.class_presence(0) == raw.class_presence(0)).all()


def test_cache_is_invalidated_by_an_edited_file_or_another_resize(tmp_path):
    root = _noisy_folder(tmp_path / "data", [(40, 30)])
    raw = build_dataset("folder", "train", root)
    cached = ResizeCache(raw, 16, tmp_path / "cache")
    first = cached.entry(0)
    before = cached[0][0].copy()
    assert ResizeCache(raw, 20, tmp_path / "cache").entry(0) != first
    # the image is rewritten with other pixels (same size): another entry, the new pixels
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "images" / "000.jpg")
    fresh = ResizeCache(build_dataset("folder", "train", root), 16, tmp_path / "cache")
    assert fresh.entry(0) != first
    assert not np.array_equal(fresh[0][0], before) and fresh[0][0].max() < 10
    # the label is edited: another entry, the new labels
    Image.fromarray(np.full((30, 40), 2, np.uint8), mode="L").save(root / "labels" / "000.png")
    relabelled = ResizeCache(build_dataset("folder", "train", root), 16, tmp_path / "cache")
    assert relabelled.entry(0) != fresh.entry(0)
    assert (relabelled[0][1] == 2).all()


def test_a_torn_cache_entry_is_made_again(tmp_path):
    root = _noisy_folder(tmp_path / "data", [(40, 30)])
    cached = ResizeCache(build_dataset("folder", "train", root), 16, tmp_path / "cache")
    good = cached[0][0].copy()
    cached.entry(0).write_bytes(b"\x93NUMPY torn")
    assert np.array_equal(cached[0][0], good)
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_engine_reads_file_datasets_through_the_cache(tmp_path):
    root = write_folder(tmp_path / "data", n=6, size=(24, 20))

    def experiment(*extra: str) -> Experiment:
        return Experiment(load_config(None, [
            "data.dataset=folder", f"data.root={root}", "data.task=1-1", "data.resize=16",
            f"out_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "progress=false",
            *extra], recipe="tiny"))

    exp = experiment()
    assert isinstance(exp.train_set, ResizeCache) and isinstance(exp.test_set, ResizeCache)
    assert not isinstance(experiment("data.image_cache=false").train_set, ResizeCache)


# ---- BN folded for inference -------------------------------------------------------------------

def _randomise_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.3, generator=g)


@pytest.mark.parametrize("backbone", ["tiny", "efficientnet_lite0_headless", "efficientnet_lite0", "resnet50"])
@pytest.mark.parametrize("parallel", [False, True])
def test_inference_copy_gives_the_eval_outputs(backbone, parallel):
    if parallel and backbone == "resnet50":
        pytest.skip("the parallel-branch folding is covered on the smaller backbones")
    torch.manual_seed(0)
    model = build_segmenter(backbone, head_channels=16, classes_per_step=(3, 2),
                            parallel_branches=parallel)
    _randomise_bn(model)
    model.train()
    net = inference_copy(model)
    assert model.training, "the original keeps its mode"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()), "every BN is folded"
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        want, got = model(x), net(x)
    scale = want.logits.abs().max()
    # stated tolerance: 1e-4 of the largest logit (float rounding of the folded weights)
    assert (want.logits - got.logits).abs().max() <= 1e-4 * scale
    assert (want.features["head"] - got.features["head"]).abs().max() <= 1e-4 * want.features["head"].abs().max()


# ---- frozen early stages -----------------------------------------------------------------------

@pytest.mark.parametrize("backbone,frozen", [("tiny", 2), ("efficientnet_lite0_headless", 4), ("resnet50", 3)])
def test_frozen_stride_stops_gradients_to_the_stem_and_first_stages(backbone, frozen):
    model = build_segmenter(backbone, head_channels=16, classes_per_step=(3,))
    early = model.backbone.early_modules(4)
    assert len(early) >= 2 or backbone == "tiny"
    n = freeze_early(model, 4)
    frozen_ids = {id(p) for m in early for p in m.parameters()}
    assert n == len(frozen_ids) > 0
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)).logits,
                                      torch.randint(0, 3, (2, 64, 64))).backward()
    for p in model.parameters():
        if id(p) in frozen_ids:
            assert not p.requires_grad and p.grad is None
        else:
            assert p.requires_grad and p.grad is not None
    # the last stage is never frozen, whatever the stride
    last = {"tiny": lambda b: b.stages[-1], "resnet50": lambda b: b.layer4}.get(backbone, lambda b: b.blocks[-1])
    deepest = {id(p) for p in last(model.backbone).parameters()}
    assert not deepest & {id(p) for m in model.backbone.early_modules(64) for p in m.parameters()}
    assert len(model.backbone.early_modules(4)) == frozen


def test_frozen_stride_zero_freezes_nothing():
    model = build_segmenter("tiny", head_channels=16, classes_per_step=(3,))
    assert freeze_early(model, 0) == 0 and all(p.requires_grad for p in model.parameters())


def test_engine_builds_frozen_models(tiny_cfg):
    exp = Experiment(tiny_cfg("model.frozen_stride=4"))
    model = exp.build_model((5,))
    frozen = [p for m in model.backbone.early_modules(4) for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.head.parameters())


# ---- labels, batches, splits -------------------------------------------------------------------

def test_predicted_labels_are_argmax_ties_included():
    logits = torch.randint(0, 3, (2, 7, 9, 11)).float()  # many exact ties
    assert torch.equal(predicted_labels(logits), logits.argmax(1))
    cl = logits.contiguous(memory_format=torch.channels_last)
    assert torch.equal(predicted_labels(cl), logits.argmax(1))


def test_evaluation_batches_group_images_of_one_size(tmp_path):
    sizes = [(40, 30), (30, 40), (40, 30), (41, 30), (40, 30), (30, 40)]
    root = _noisy_folder(tmp_path / "data", sizes)
    raw = build_dataset("folder", "train", root)
    data = StepDataset(raw, np.arange(len(raw)), np.arange(256, dtype=np.uint8),
                       Resized(EvalTransform(None), 20))
    batches = size_batches(data, 2)
    assert sorted(k for b in batches for k in b) == list(range(len(sizes)))
    for b in batches:
        assert 1 <= len(b) <= 2
        assert len({tuple(data[k][0].shape) for k in b}) == 1
    # equal sizes, or a transform that does not say its size: the plain loader's batches
    assert size_batches(StepDataset(raw, np.array([0, 2, 4]), np.arange(256, dtype=np.uint8),
                                    Resized(EvalTransform(None), 20)), 2) is None
    assert size_batches(StepDataset(raw, np.arange(len(raw)), np.arange(256, dtype=np.uint8),
                                    lambda i, l: (i, l)), 2) is None
    assert Resized(TrainTransform(16), 20).output_size(30, 40) is None


def test_holdout_split_is_a_fixed_fifth_of_the_ids(tmp_path):
    root = write_folder(tmp_path / "data", n=4)
    ids = [f"img{i:04d}" for i in range(400)]
    (root / "splits" / "big.txt").write_text("\n".join(ids) + "\n")
    for i in ids:  # the folder needs a file per id
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "images" / f"{i}.jpg")
        Image.fromarray(np.zeros((6, 8), np.uint8), mode="L").save(root / "labels" / f"{i}.png")
    fit = build_dataset("folder", "big:fit", root).ids
    hold = build_dataset("folder", "big:holdout", root).ids
    assert sorted(fit + hold) == sorted(ids) and not set(fit) & set(hold)
    assert 50 <= len(hold) <= 110  # about a fifth
    # fixed by the ids alone: another order or more ids never moves an id
    (root / "splits" / "big.txt").write_text("\n".join(reversed(ids[:300])) + "\n")
    assert set(build_dataset("folder", "big:holdout", root).ids) == {i for i in hold if i in ids[:300]}
    with pytest.raises(DataError, match="train:holdout"):
        build_dataset("folder", "big:test", root)


def test_head_reduce_narrows_the_aspp_input_and_round_trips():
    model = build_segmenter("tiny", head_channels=16, classes_per_step=(3, 2), head_reduce=8)
    assert model.head.reduce is not None and model.head.branches[0][0].in_channels == 8
    config = model.config()
    assert config["head_reduce"] == 8
    again = build_segmenter(**config)
    again.load_state_dict(model.state_dict(), strict=True)
    assert "head_reduce" not in build_segmenter("tiny", head_channels=16).config()  # unset: as before
    _randomise_bn(model)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x).logits
        got = inference_copy(model)(x).logits
    assert (want - got).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50", "tiny"])
def test_undilated_backbone_keeps_its_strides_and_weights(backbone):
    torch.manual_seed(0)
    dilated = build_segmenter(backbone, head_channels=16, classes_per_step=(3,), output_stride=8)
    plain = build_segmenter(backbone, head_channels=16, classes_per_step=(3,), output_stride=8, dilated=False)
    assert any(m.dilation != (1, 1) for m in dilated.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(m.dilation == (1, 1) for m in plain.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    plain.load_state_dict(dilated.state_dict(), strict=True)  # same weights, another receptive field
    x = torch.randn(1, 3, 64, 64)
    dilated.eval(), plain.eval()
    with torch.no_grad():
        a, b = dilated(x), plain(x)
    assert [s.shape for s in a.features["stages"]] == [s.shape for s in b.features["stages"]]
    assert not torch.allclose(a.features["stages"][-1], b.features["stages"][-1])
    assert plain.config()["dilated"] is False and "dilated" not in dilated.config()
    rebuilt = build_segmenter(**plain.config())
    rebuilt.load_state_dict(plain.state_dict(), strict=True)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, b.logits)
