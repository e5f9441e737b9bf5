"""The DeepLabV3 decoder: atrous spatial pyramid pooling, then a 3x3 conv, as MiB, PLOP and SSUL use it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Atrous rates per output stride (DeepLabV3 paper: 6/12/18 at OS16, doubled at OS8).
DEFAULT_RATES: dict[int, tuple[int, int, int]] = {
    8: (12, 24, 36),
    16: (6, 12, 18),
    32: (3, 6, 9),
}


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _init_convs(module: nn.Module) -> None:
    """He-normal (fan-out) conv weights and zero conv biases, as DeepLab's heads start."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv (with bias, no BN) -> ReLU, broadcast back to the map size.

    No BN here: in train mode BN on a (B, C, 1, 1) tensor has one value per channel when B == 1 and
    raises, and with small B its statistics are noise. The bias takes BN's shift role.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, h, w) -> (B, Cout, h, w)
        pooled = self.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))  # (B, Cout, 1, 1)
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPPHead(nn.Module):
    """ASPP (1x1, three atrous 3x3, image pooling; each conv-BN-ReLU) -> concat -> 1x1 project
    conv-BN-ReLU -> dropout -> 3x3 conv-BN-ReLU. Input (B, in_channels, h, w), output (B, channels, h, w).

    rates: atrous rates of the three 3x3 branches; default from ``output_stride`` (DEFAULT_RATES).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        rates: Sequence[int] | None = None,
        output_stride: int = 16,
        dropout: float = 0.1,
        reduce: int = 0,
    ) -> None:
        super().__init__()
        # reduce > 0: a 1x1 conv-BN-ReLU first brings the input to `reduce` channels, so that the
        # pyramid's 3x3 convs read a narrow map (EfficientNet-Lite0's 1280-channel head output costs
        # them 4x its 320-channel last block; benchmarks/results/train_speed.md).
        self.reduce = _conv_bn_relu(in_channels, reduce, 1) if reduce else None
        self.in_reduce = int(reduce)
        in_channels = reduce or in_channels
        if rates is None:
            if output_stride not in DEFAULT_RATES:
                raise ValueError(
                    f"no default ASPP rates for output_stride={output_stride}; pass rates= "
                    f"or use one of {sorted(DEFAULT_RATES)}"
                )
            rates = DEFAULT_RATES[output_stride]
        self.rates = tuple(int(r) for r in rates)
        self.out_channels = channels
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, channels, 1)]
            + [_conv_bn_relu(in_channels, channels, 3, dilation=r) for r in self.rates]
        )
        self.pooling = ImagePooling(in_channels, channels)
        self.project = _conv_bn_relu(channels * (len(self.rates) + 2), channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.refine = _conv_bn_relu(channels, channels, 3)
        _init_convs(self)

    def branch_points(self) -> list[tuple[nn.Module, str, str]]:
        """The conv-BN of each ASPP conv branch (RCIL's map_convs / map_bn), not pooling or projections."""
        return [(branch, "0", "1") for branch in self.branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, h, w) -> (B, channels, h, w)
        if self.reduce is not None:
            x = self.reduce(x)  # (B, reduce, h, w)
        pyramid = [branch(x) for branch in self.branches] + [self.pooling(x)]
        y = self.project(torch.cat(pyramid, dim=1))  # (B, channels, h, w)
        return self.refine(self.dropout(y))


class SkipFusion(nn.Module):
    """DeepLabV3+'s decoder step: the head's map (B, D, h, w), upsampled bilinearly to a shallower
    backbone stage's size, concatenated with that stage brought to ``reduce`` channels by a 1x1
    conv-BN-ReLU, then a 3x3 conv-BN-ReLU back to D channels: (B, D, H_s, W_s). The papers' DeepLabV3
    has no such step; on ccp21 it sharpens the boundaries of large classes, not small objects
    (benchmarks/results/ccp21_curves.md).
    """

    def __init__(self, low_channels: int, channels: int, reduce: int = 48) -> None:
        super().__init__()
        self.low = _conv_bn_relu(low_channels, reduce, 1)
        self.fuse = _conv_bn_relu(channels + reduce, channels, 3)
        self.out_channels = channels
        _init_convs(self)

    def branch_points(self) -> list[tuple[nn.Module, str, str]]:
        """Its 3x3 conv-BN (a decoder conv: RCIL gives it a parallel branch); the 1x1 reduction has none."""
        return [(self.fuse, "0", "1")]

    def forward(self, head: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(head, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([up, self.low(low)], dim=1))
