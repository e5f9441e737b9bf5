"""A tiny random-init backbone so that whole-system tests train in seconds on 64x64 synthetic images."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """Four stages of (3x3 stride-2 conv, 3x3 conv), each with BN and ReLU: channels 8/16/32/64 at
    strides 2/4/8/16. With output_stride 8 the last stage keeps stride 8 and dilates its second conv."""

    name = "tiny"
    valid_output_strides = (8, 16)

    def __init__(self, output_stride: int = 16, channels: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        if output_stride not in self.valid_output_strides:
            raise ValueError(
                f"tiny: output_stride must be one of {self.valid_output_strides}, got {output_stride}"
            )
        self.output_stride = output_stride
        stages = []
        in_channels, stride_now, dilation = 3, 1, 1
        for out_channels in channels:
            stride = 2
            first_dilation = dilation
            if stride_now * 2 > output_stride:
                dilation *= 2
                stride = 1
            else:
                stride_now *= 2
            stages.append(
                nn.Sequential(
                    _conv_bn_relu(in_channels, out_channels, stride, first_dilation),
                    _conv_bn_relu(out_channels, out_channels, dilation=dilation),
                )
            )
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(channels)
        self.strides = [min(2 ** (i + 1), output_stride) for i in range(len(channels))]
        self.distill_stages = [i for i, s in enumerate(self.strides) if s >= 4]  # as ResNet's 4-16

    def early_modules(self, max_stride: int) -> list[nn.Module]:
        """The stages whose output stride is at most ``max_stride`` (never the last)."""
        return [st for st, s in zip(self.stages[:-1], self.strides) if s <= max_stride]

    def branch_points(self) -> list[tuple[nn.Module, str, str]]:
        """Every conv-BN (each is 3x3)."""
        return [(unit, "0", "1") for stage in self.stages for unit in stage]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, 3, H, W) -> 4 x (B, C_i, H/s_i, W/s_i)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs
