"""ResNets: torchvision key names, strict loading of a user's file, clear refusals."""

from __future__ import annotations

import re

import pytest
import torch

from ciss.models import build_backbone


@pytest.fixture(scope="module")
def resnet50():
    return build_backbone("resnet50", output_stride=16)


@pytest.fixture
def torchvision_file(tmp_path, resnet50):
    """A randomly filled file laid out like torchvision's resnet50 ImageNet weights (fc included)."""
    g = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in resnet50.state_dict().items()
    }
    state["fc.weight"] = torch.randn(1000, 2048, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    return path, state


def test_torchvision_layout(resnet50):
    keys = resnet50.state_dict().keys()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer4.2.bn3.bias"):
        assert key in keys
    # torchvision's resnet50 has 25,557,032 parameters, 2,049,000 of them in fc.
    assert sum(p.numel() for p in resnet50.parameters()) == 25_557_032 - 2_049_000


def test_torchvision_file_round_trip(torchvision_file):
    path, state = torchvision_file
    model = build_backbone("resnet50", pretrained=path, output_stride=8)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_file_without_num_batches_tracked_loads(tmp_path, torchvision_file):
    # the original torchvision files predate the num_batches_tracked buffers
    _, state = torchvision_file
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    model = build_backbone("resnet50", pretrained=tmp_path / "old.pth")
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_pretrained_true_needs_a_file():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet101", pretrained=True)
    assert str(info.value) == (
        "resnet101 needs a local weights file: pass pretrained=/path/to/resnet101.pth "
        "(torchvision ImageNet weights); nothing is downloaded"
    )


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        build_backbone("resnet50", pretrained=path)


def test_mismatched_file_lists_keys(tmp_path, torchvision_file):
    _, state = torchvision_file
    state = dict(state)
    del state["layer2.1.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["layer3.0.bn1.weight"] = torch.zeros(7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        build_backbone("resnet50", pretrained=tmp_path / "bad.pth")
    message = str(info.value)
    for key in ("layer2.1.conv2.weight", "layer5.0.conv1.weight", "layer3.0.bn1.weight"):
        assert key in message
    assert "missing" in message and "unexpected" in message and "shape mismatch" in message


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        build_backbone("resnet50", pretrained=tmp_path / "list.pth")


def test_dilation_keeps_resolution(resnet50):
    resnet50.eval()
    with torch.no_grad():
        stages = resnet50(torch.randn(1, 3, 64, 64))
    assert [s.shape[-1] for s in stages] == [16, 8, 4, 4]
    assert resnet50.layer4[0].conv2.stride == (1, 1) and resnet50.layer4[0].conv2.dilation == (1, 1)
    assert resnet50.layer4[1].conv2.dilation == (2, 2)
    assert resnet50.layer4[0].downsample[0].stride == (1, 1)
