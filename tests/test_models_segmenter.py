"""The segmenter: shapes, features, growth, strict rebuild from config, BN freezing, trainability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ciss.models import Segmenter, build_segmenter, inference_copy, set_bn_eval
from ciss.types import SegOutput


def _tiny(**kw):
    kw.setdefault("head_channels", 16)
    return build_segmenter("tiny", **kw)


def test_output_shapes_and_features():
    model = _tiny(classes_per_step=[5])
    out = model(torch.randn(2, 3, 64, 48))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 5, 64, 48)
    assert set(out.features) == {"stages", "distilled", "head", "logits_lowres"}
    assert [s.shape[1] for s in out.features["stages"]] == model.backbone.out_channels
    assert out.features["head"].shape == (2, 16, 4, 3)
    assert out.features["logits_lowres"].shape == (2, 5, 4, 3)


def test_logits_upsampled_to_odd_input_size():
    model = _tiny(output_stride=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 37, 50))
    assert out.logits.shape == (1, 21, 37, 50)
    expected = F.interpolate(out.features["logits_lowres"], size=(37, 50), mode="bilinear", align_corners=False)
    assert torch.equal(out.logits, expected)


def test_add_step_keeps_old_weights_and_config_rebuilds_strictly():
    model = _tiny(classes_per_step=[4], num_extra=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_step(2)
    model.add_step(3)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.classes_per_step == (4, 2, 3) and model.num_classes == 9 and model.num_extra == 1

    config = model.config()
    assert config == {
        "backbone": "tiny",
        "output_stride": 16,
        "head_channels": 16,
        "classes_per_step": [4, 2, 3],
        "num_extra": 1,
    }
    rebuilt = build_segmenter(**config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, rebuilt(x).logits)
    assert model(x).logits.shape[1] == 10


def test_forward_backward_is_finite():
    model = _tiny().train()
    out = model(torch.randn(2, 3, 64, 64))
    loss = F.cross_entropy(out.logits, torch.randint(0, 21, (2, 64, 64)))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_set_bn_eval_freezes_statistics():
    model = _tiny().train()
    assert set_bn_eval(model, freeze_affine=True) > 0
    bn = model.backbone.stages[0][0][1]
    mean = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not bn.training and torch.equal(bn.running_mean, mean)
    assert not bn.weight.requires_grad
    assert model.head.training  # only BN layers change mode


def test_tiny_segmenter_learns_synthetic_squares():
    # Images hold a bright square on noise; label 1 inside it. The tiny model must learn this fast.
    torch.manual_seed(0)

    def batch(n=8, size=64):
        images = torch.randn(n, 3, size, size) * 0.3
        labels = torch.zeros(n, size, size, dtype=torch.long)
        for i in range(n):
            top, left = torch.randint(0, size - 24, (2,)).tolist()
            images[i, :, top : top + 24, left : left + 24] += 1.5
            labels[i, top : top + 24, left : left + 24] = 1
        return images, labels

    model = build_segmenter("tiny", head_channels=16, classes_per_step=[2], output_stride=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        images, labels = batch()
        loss = F.cross_entropy(model(images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images, labels = batch(16)
    with torch.no_grad():
        pred = model(images).logits.argmax(1)
    accuracy = (pred == labels).float().mean().item()
    iou = ((pred == 1) & (labels == 1)).sum().item() / ((pred == 1) | (labels == 1)).sum().item()
    assert accuracy > 0.93 and iou > 0.6, (accuracy, iou)  # all-background scores 0.86 and 0


def test_efficientnet_segmenter_pretrained():
    model = build_segmenter("efficientnet_lite0", pretrained=True, head_channels=32, classes_per_step=[3])
    assert isinstance(model, Segmenter) and model.config()["backbone"] == "efficientnet_lite0"
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 3, 64, 64)
    assert out.features["head"].shape == (1, 32, 4, 4)


def test_skip_fusion_gives_the_head_a_finer_map_and_round_trips():
    torch.manual_seed(0)
    model = build_segmenter("tiny", head_channels=16, classes_per_step=(3, 2), skip_stride=4)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.features["head"].shape == (2, 16, 16, 16)  # stride 4, where the head alone is at 16
    assert out.features["logits_lowres"].shape == (2, 5, 16, 16) and out.logits.shape == (2, 5, 64, 64)
    assert build_segmenter("tiny", head_channels=16)(x).features["head"].shape[-1] == 4
    config = model.config()
    assert config["skip_stride"] == 4 and "skip_stride" not in build_segmenter("tiny").config()
    again = build_segmenter(**config)
    again.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():  # the fusion's conv-BN pairs fold like the head's
        want = model(x).logits
        got = inference_copy(model)(x).logits
    assert (want - got).abs().max() <= 1e-4 * want.abs().max()
    # the low-level stage receives gradient through the fusion
    model.train()
    model(x).logits.sum().backward()
    assert model.skip.low[0].weight.grad is not None and model.skip.low[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stride", [16, 3, 32])
def test_skip_stride_must_name_a_shallower_stage(stride):
    with pytest.raises(ValueError, match="model.skip_stride"):
        build_segmenter("tiny", head_channels=16, skip_stride=stride)


def test_rcil_parallel_branches_reach_the_skip_fusion():
    from ciss.models.parallel import ParallelConvBN

    model = build_segmenter("tiny", head_channels=16, skip_stride=4, parallel_branches=True)
    assert isinstance(model.skip.fuse[0], ParallelConvBN)
    assert not isinstance(model.skip.low[0], ParallelConvBN)  # a 1x1 reduction, as in the head
