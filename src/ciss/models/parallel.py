"""Parallel conv-BN branches that merge back into one conv (RCIL's representation compensation).

A model grows them through its own extension point: a backbone or head that supports them defines
``branch_points() -> list[(owner, conv_name, bn_name)]``, the conv-BN pairs whose ``owner`` computes
``bn(conv(x))``. ``add_parallel_branches`` puts a ``ParallelConvBN`` in the conv's place and an identity
in the BN's, so the owner's forward is unchanged and the segmenter's state-dict keys are fixed by
construction (strict checkpoint loading keeps working).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

BranchPoint = tuple[nn.Module, str, str]


def conv_bn_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one conv equal to bn(conv(x)) with BN in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


class ParallelConvBN(nn.Module):
    """Two conv-BN branches on the same input, averaged: ``0.5 * (bn(conv(x)) + bn_new(conv_new(x)))``.

    ``merge_()`` folds both into ``conv``/``bn`` (the output in eval mode is unchanged) and freezes that
    branch: from then on it runs with BN in eval mode and takes no gradient, while ``conv_new``/``bn_new``
    keep their weights and go on training. In training, each output channel takes, with probability 1/3
    each, the first branch, the second, or their mean (RCIL's drop-path; ``drop_path=False`` turns it off).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if conv.out_channels != bn.num_features:
            raise ValueError(f"conv has {conv.out_channels} outputs but its BN {bn.num_features} features")
        self.conv, self.bn = conv, bn
        # RCIL starts the new branch from the pretrained one (its ResNet loader copies conv2 into conv2_new).
        self.conv_new, self.bn_new = copy.deepcopy(conv), copy.deepcopy(bn)
        self.register_buffer("merged", torch.zeros((), dtype=torch.bool))
        self.drop_path = True

    def _branch_weights(self, channels: int, device: torch.device, dtype: torch.dtype):
        # RCIL residual.py: r ~ U(0, 1) per channel, shared by the batch; weights (1, 0), (0, 1), (0.5, 0.5).
        r = torch.rand(1, channels, 1, 1, device=device)
        w_old = torch.where(r < 1 / 3, 1.0, torch.where(r < 2 / 3, 0.0, 0.5)).to(dtype)
        return w_old, 1.0 - w_old

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H', W')
        y_new = self.bn_new(self.conv_new(x))
        y = self.conv(x)
        if bool(self.merged):  # the merged branch is frozen: its BN never updates its statistics
            y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                             False, 0.0, self.bn.eps)
        else:
            y = self.bn(y)
        if self.training and self.drop_path:
            w_old, w_new = self._branch_weights(y.shape[1], y.device, y.dtype)
            return y * w_old + y_new * w_new
        return 0.5 * (y + y_new)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single conv equal to this module in eval mode."""
        w1, b1 = conv_bn_weights(self.conv, self.bn)
        w2, b2 = conv_bn_weights(self.conv_new, self.bn_new)
        return 0.5 * (w1 + w2), 0.5 * (b1 + b2)

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold both branches into the first (exactly, BN in eval form) and freeze it."""
        # RCIL run.py convert_model scales BN by |gamma| + eps; we fold exactly, so that the merged
        # branch reproduces the two-branch output bit for bit up to rounding.
        weight, bias = self.fused()
        self.conv.weight.copy_(weight)
        if self.conv.bias is not None:
            self.conv.bias.zero_()
        # The BN becomes an affine map x -> x + bias: mean 0, var chosen so that sqrt(var + eps) == 1.
        self.bn.running_mean.zero_()
        self.bn.running_var.fill_(1.0 - self.bn.eps)
        self.bn.weight.fill_(1.0)
        self.bn.bias.copy_(bias)
        self.merged.fill_(True)
        self.freeze_merged()

    def freeze_merged(self) -> None:
        """No gradient to the merged branch (call again after loading a checkpoint)."""
        if bool(self.merged):
            for p in (*self.conv.parameters(), *self.bn.parameters()):
                p.requires_grad_(False)

    def folded(self) -> nn.Conv2d:
        """One plain conv with bias, equal to this module in eval mode (for deployment)."""
        c = self.conv
        conv = copy.deepcopy(c)  # keeps the conv's own forward (e.g. TF "SAME" padding)
        conv.bias = nn.Parameter(torch.zeros(c.out_channels, dtype=c.weight.dtype, device=c.weight.device))
        weight, bias = self.fused()
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return conv


def _branch_points(model: nn.Module) -> list[BranchPoint]:
    points: list[BranchPoint] = []
    for name, part in model.named_children():
        fn = getattr(part, "branch_points", None)
        if callable(fn):
            points.extend(fn())
    return points


def add_parallel_branches(model: nn.Module) -> int:
    """Give every branch point of ``model``'s children (backbone, head) a parallel branch. Returns how
    many; raises if a child that has conv-BN pairs declares none (the method would silently do nothing)."""
    missing = [type(part).__name__ for _, part in model.named_children()
               if not callable(getattr(part, "branch_points", None))
               and any(isinstance(m, nn.BatchNorm2d) for m in part.modules())]
    if missing:
        raise TypeError(f"{', '.join(missing)} declare(s) no branch_points(); parallel branches need them "
                        "(see ciss.models.parallel)")
    points = _branch_points(model)
    for owner, conv_name, bn_name in points:
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"branch point {type(owner).__name__}.{conv_name}/{bn_name} is not a conv-BN pair")
        setattr(owner, conv_name, ParallelConvBN(conv, bn))
        setattr(owner, bn_name, nn.Identity())
    return len(points)


def parallel_modules(model: nn.Module) -> list[ParallelConvBN]:
    return [m for m in model.modules() if isinstance(m, ParallelConvBN)]


def merge_parallel_branches(model: nn.Module) -> int:
    """Merge every ParallelConvBN of ``model`` (see ``ParallelConvBN.merge_``). Returns how many."""
    mods = parallel_modules(model)
    for m in mods:
        m.merge_()
    return len(mods)


def fold_parallel_branches(model: nn.Module) -> nn.Module:
    """Replace, in place, every ParallelConvBN by its single equivalent conv (eval-mode output is
    unchanged, the model has the size of the plain architecture). For export; not trainable further."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ParallelConvBN):
                setattr(parent, name, child.folded())
    return model
