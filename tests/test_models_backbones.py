"""The backbone contract, checked across the whole registry."""

from __future__ import annotations

import pytest
import torch

from ciss.models import Backbone, build_backbone, list_backbones
from ciss.models.timm_backbones import TIMM_BACKBONES

SIZE = 64
# The timm backbones have their own contract tests (test_models_timm.py; they need timm).
NATIVE = [n for n in list_backbones() if n not in TIMM_BACKBONES]


def _check_contract(model: torch.nn.Module, output_stride: int, batch: int = 2) -> None:
    assert isinstance(model, Backbone)
    assert model.output_stride == output_stride
    assert model.strides[-1] == output_stride
    assert len(model.out_channels) == len(model.strides) >= 4
    assert model.strides == sorted(model.strides)
    model.eval()
    with torch.no_grad():
        stages = model(torch.randn(batch, 3, SIZE, SIZE))
    assert isinstance(stages, list) and len(stages) == len(model.out_channels)
    for out, channels, stride in zip(stages, model.out_channels, model.strides):
        assert out.shape == (batch, channels, SIZE // stride, SIZE // stride)


@pytest.mark.parametrize("name", NATIVE)
def test_contract_at_output_stride_16(name):
    model = build_backbone(name, output_stride=16)
    assert model.name == name
    _check_contract(model, 16)


# resnet101 is left out: building it is slow and its layout is resnet50's with a deeper layer3.
@pytest.mark.parametrize("name", [n for n in NATIVE if n != "resnet101"])
@pytest.mark.parametrize("output_stride", [8, 32])
def test_contract_at_other_output_strides(name, output_stride):
    try:
        model = build_backbone(name, output_stride=output_stride)
    except ValueError as err:
        assert name == "tiny" and output_stride == 32 and "output_stride must be one of" in str(err)
        return
    _check_contract(model, output_stride, batch=1)


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as info:
        build_backbone("resnet18")
    for name in list_backbones():
        assert name in str(info.value)


def test_registry_names():
    assert {"efficientnet_lite0", "resnet50", "resnet101", "tiny"} <= set(list_backbones())


def test_bad_output_stride_says_what_is_valid():
    with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16, 32\)"):
        build_backbone("efficientnet_lite0", output_stride=4)


def test_tiny_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="tiny has no pretrained weights"):
        build_backbone("tiny", pretrained=True)


def test_tiny_weights_round_trip(tmp_path):
    source = build_backbone("tiny")
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("tiny", pretrained=path, output_stride=8)  # dilation changes no weight shape
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_weights_round_trip_through_safetensors(tmp_path):
    save_file = pytest.importorskip("safetensors.torch").save_file
    from ciss.models import load_weights

    source = build_backbone("tiny")
    save_file(source.state_dict(), str(tmp_path / "tiny.safetensors"))
    loaded = build_backbone("tiny", pretrained=tmp_path / "tiny.safetensors")
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read .*bad.safetensors as a safetensors file"):
        load_weights(build_backbone("tiny"), tmp_path / "bad.safetensors")
