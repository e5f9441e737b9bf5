"""ResNet-50/101 with torchvision's architecture and state_dict key names, dilated for DeepLab.

A torchvision ImageNet weights file (``resnet101-*.pth``) loads strictly; only its ``fc.*`` classifier
keys are dropped. Nothing is downloaded: the user passes the file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# blocks per layer
DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}

# Which of layer2..layer4 trade their stride for dilation (torchvision's replace_stride_with_dilation).
_DILATE: dict[int, tuple[bool, bool, bool]] = {
    32: (False, False, False),
    16: (False, False, True),
    8: (False, True, True),
}


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries stride and dilation, "ResNet v1.5") -> 1x1 expand x4, + shortcut."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """The conv-BN pairs of forward (``ciss.models.fusion`` folds them for inference)."""
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stage outputs: layer1..layer4, channels 256/512/1024/2048, strides 4/8/16/32 capped at
    ``output_stride`` (16: layer4 dilated 2; 8: layer3 dilated 2 and layer4 dilated 4)."""

    valid_output_strides = (8, 16, 32)

    def __init__(self, name: str = "resnet101", output_stride: int = 16) -> None:
        super().__init__()
        if name not in DEPTHS:
            raise ValueError(f"unknown ResNet {name!r}; valid: {', '.join(sorted(DEPTHS))}")
        if output_stride not in _DILATE:
            raise ValueError(
                f"{name}: output_stride must be one of {self.valid_output_strides}, got {output_stride}"
            )
        self.name = name
        self.output_stride = output_stride
        self._in_channels = 64
        self._dilation = 1

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        depths = DEPTHS[name]
        dilate = _DILATE[output_stride]
        self.layer1 = self._make_layer(64, depths[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(128, depths[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(256, depths[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(512, depths[3], stride=2, dilate=dilate[2])

        self.out_channels = [256, 512, 1024, 2048]
        self.strides = [min(s, output_stride) for s in (4, 8, 16, 32)]
        self.distill_stages = [0, 1, 2, 3]  # PLOP / RCIL: layer1-4
        self._init_weights()

    def _make_layer(self, width: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        # As torchvision: a dilated layer's first block keeps the previous rate, the rest use the new one.
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [Bottleneck(self._in_channels, width, stride, previous_dilation, downsample)]
        self._in_channels = out_channels
        layers += [Bottleneck(out_channels, width, dilation=self._dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, 3, H, W) -> 4 x (B, C_i, H/s_i, W/s_i)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [("conv1", "bn1")]

    def early_modules(self, max_stride: int) -> list[nn.Module]:
        """The stem (conv1, bn1) and the layers whose output stride is at most ``max_stride`` (never
        the last): detectron2's ``freeze_at=2`` is ``max_stride=4``."""
        if max_stride < 4:
            return [self.conv1, self.bn1] if max_stride >= 2 else []
        layers = [self.layer1, self.layer2, self.layer3][: sum(s <= max_stride for s in self.strides[:3])]
        return [self.conv1, self.bn1, *layers]

    def branch_points(self) -> list[tuple[nn.Module, str, str]]:
        """The 3x3 conv-BN of every bottleneck (where RCIL puts its parallel branch)."""
        return [(m, "conv2", "bn2") for m in self.modules() if isinstance(m, Bottleneck)]

    def adapt_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop torchvision's ImageNet classifier (``fc.weight``, ``fc.bias``); everything else must match."""
        return {k: v for k, v in state.items() if k not in ("fc.weight", "fc.bias")}
