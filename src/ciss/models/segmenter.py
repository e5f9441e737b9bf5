"""The segmenter: backbone -> DeepLabV3 head [-> skip fusion] -> incremental classifier -> logits at
input size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..types import SegOutput
from .backbones import build_backbone
from .classifier import IncrementalClassifier
from .deeplab import ASPPHead, SkipFusion
from .parallel import add_parallel_branches, parallel_modules


class Segmenter(nn.Module):
    """Composes a backbone (see ``backbones``), a head mapping its last stage (B, C, h, w) to
    (B, D, h, w) and exposing ``out_channels = D``, and an ``IncrementalClassifier``.

    forward(x) returns ``SegOutput(logits, features)``: logits (B, num_classes + num_extra, H, W),
    bilinearly upsampled (align_corners=False); features "stages" (backbone outputs, shallow to deep),
    "distilled" (the stages the backbone's ``distill_stages`` names, for feature distillation),
    "head" (B, D, h, w) and "logits_lowres" (B, num_classes + num_extra, h, w).

    ``skip`` (optional): a ``SkipFusion`` of the head's map with backbone stage ``skip_stage``; then
    "head" is its output, at that stage's resolution.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, classifier: IncrementalClassifier,
                 skip: SkipFusion | None = None, skip_stage: int = -1) -> None:
        super().__init__()
        for attr in ("out_channels", "output_stride", "distill_stages"):
            if not hasattr(backbone, attr):
                raise TypeError(f"backbone {type(backbone).__name__} lacks `{attr}`; see ciss.models.backbones")
        self.backbone = backbone
        self.head = head
        self.classifier = classifier
        self.skip = skip
        self.skip_stage = int(skip_stage)

    @property
    def classes_per_step(self) -> tuple[int, ...]:
        return self.classifier.classes_per_step

    @property
    def num_classes(self) -> int:
        """Real classes seen so far; the logits have ``num_extra`` more channels after them."""
        return self.classifier.num_classes

    @property
    def num_extra(self) -> int:
        return self.classifier.num_extra

    @property
    def output_stride(self) -> int:
        return int(self.backbone.output_stride)

    def add_step(self, n_new: int) -> None:
        """Grow the classifier by ``n_new`` classes; every existing weight stays bit-identical."""
        self.classifier.add_step(n_new)

    def forward(self, x: torch.Tensor) -> SegOutput:  # (B, 3, H, W)
        stages = self.backbone(x)  # shallow to deep, each (B, C_i, H_i, W_i)
        head = self.head(stages[-1])  # (B, D, h, w)
        if self.skip is not None:
            head = self.skip(head, stages[self.skip_stage])  # (B, D, H_s, W_s)
        logits_lowres = self.classifier(head)  # (B, C, h, w)
        # Upsampled from a contiguous (NCHW) map: losses and argmax over the class dimension run
        # faster on it than on channels-last logits (benchmarks/results/train_speed.md).
        logits = F.interpolate(logits_lowres.contiguous(), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return SegOutput(
            logits=logits,  # (B, C, H, W)
            features={"stages": stages, "distilled": [stages[i] for i in self.backbone.distill_stages],
                      "head": head, "logits_lowres": logits_lowres},
        )

    def config(self) -> dict[str, Any]:
        """Plain-data description such that ``build_segmenter(**config)`` rebuilds this architecture
        (same state_dict keys and shapes) for strict checkpoint loading."""
        name = getattr(self.backbone, "name", None)
        if name is None or not isinstance(self.head, ASPPHead):
            raise TypeError(
                "config() describes segmenters made by build_segmenter (a registered backbone and an "
                "ASPPHead); save the architecture of a hand-assembled one yourself"
            )
        config: dict[str, Any] = {
            "backbone": name,
            "output_stride": self.output_stride,
            "head_channels": self.head.out_channels,
            "classes_per_step": list(self.classes_per_step),
            "num_extra": self.num_extra,
        }
        if getattr(self.backbone, "undilated", False):  # only when set, as below
            config["dilated"] = False
        if self.head.in_reduce:  # only when set, so models without it keep their config
            config["head_reduce"] = self.head.in_reduce
        if self.skip is not None:
            config["skip_stride"] = int(self.backbone.strides[self.skip_stage])
        if parallel_modules(self):  # only when present, so plain models keep their config
            config["parallel_branches"] = True
        return config


def build_segmenter(
    backbone: str = "efficientnet_lite0",
    pretrained: bool | str | Path = False,
    output_stride: int = 16,
    head_channels: int = 256,
    classes_per_step: Sequence[int] = (21,),
    num_extra: int = 0,
    parallel_branches: bool = False,
    head_reduce: int = 0,
    dilated: bool = True,
    skip_stride: int = 0,
) -> Segmenter:
    """DeepLabV3 on a registered backbone (``list_backbones()``); ``pretrained`` is passed to
    ``build_backbone`` (only the backbone is ever pretrained). ``parallel_branches`` doubles the
    spatial conv-BN pairs of backbone and head (``ciss.models.parallel``; RCIL's architecture).
    ``skip_stride`` > 0 fuses the head's map with the backbone stage of that stride (``SkipFusion``,
    DeepLabV3+'s decoder step); 0 keeps DeepLabV3."""
    body = build_backbone(backbone, pretrained=pretrained, output_stride=output_stride)
    if parallel_branches and not callable(getattr(body, "branch_points", None)):
        raise ValueError(f"parallel branches (RCIL) double a backbone's conv-BN pairs, and backbone "
                         f"{backbone} declares none (branch_points()); use one that does, e.g. "
                         "resnet101, timm_resnet101 or efficientnet_lite0")
    if not dilated:
        undilate(body)
    head = ASPPHead(body.out_channels[-1], channels=head_channels, output_stride=output_stride,
                    reduce=head_reduce)
    classifier = IncrementalClassifier(head_channels, classes_per_step, num_extra=num_extra)
    skip, skip_stage = None, -1
    if skip_stride:
        strides = list(body.strides)
        if skip_stride not in strides[:-1] or skip_stride >= output_stride:
            raise ValueError(f"model.skip_stride={skip_stride}: backbone {backbone} has stages of strides "
                             f"{strides[:-1]} below its output stride {output_stride}; use one of them or 0")
        skip_stage = len(strides) - 1 - strides[::-1].index(skip_stride)  # the deepest of that stride
        skip = SkipFusion(body.out_channels[skip_stage], head_channels)
    model = Segmenter(body, head, classifier, skip=skip, skip_stage=skip_stage)
    if parallel_branches:
        add_parallel_branches(model)
    return model


def undilate(backbone: nn.Module) -> int:
    """Run the convs that ``output_stride`` dilated at rate 1 (same weights, half or a quarter of their
    receptive field; dilated depthwise convs are the slowest layers of Lite0 on a CPU). Returns how
    many convs it changed."""
    count = 0
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d) and m.dilation != (1, 1) and m.stride == (1, 1):
            m.dilation = (1, 1)
            m.padding = tuple((k - 1) // 2 for k in m.kernel_size)
            count += 1
    backbone.undilated = True
    return count


def freeze_early(model: Segmenter, max_stride: int) -> int:
    """Stop gradients to the backbone's stem and to its stages of output stride <= ``max_stride`` (0:
    none), so that backward never runs through the high-resolution layers, as detectron2's
    ``freeze_at`` does. Their BN layers still normalise with batch statistics. Returns how many
    parameters it froze."""
    if not max_stride:
        return 0
    early = getattr(model.backbone, "early_modules", None)
    if not callable(early):
        raise TypeError(f"backbone {type(model.backbone).__name__} declares no early_modules(); use "
                        "model.frozen_stride=0 with it")
    params = [p for m in early(max_stride) for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    return len(params)


def set_bn_eval(module: nn.Module, freeze_affine: bool = False) -> int:
    """Put every batch-norm layer under ``module`` in eval mode (running statistics frozen) and, with
    ``freeze_affine``, stop gradients to their weight and bias. Returns how many layers it touched.

    ``module.train()`` switches BN back to train mode, so call this after every ``train()``.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            if freeze_affine:
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.requires_grad_(False)
            count += 1
    return count
