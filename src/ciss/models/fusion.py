"""An inference copy of a model: every batch norm that follows a convolution folded into its weights.

In evaluation mode BN is the affine map ``x -> (x - mean) / sqrt(var + eps) * gamma + beta`` per channel,
so ``bn(conv(x))`` equals one convolution with scaled weights and a bias. On a CPU the separate BN pass
is about a quarter of a forward pass of EfficientNet-Lite0 (benchmarks/results/train_speed.md); folded,
the outputs agree with the unfolded model to float rounding (about 1e-5 relative), and argmax labels
can differ only where two logits tie to that precision.

Which convs a BN follows is read from the modules themselves: consecutive ``Conv2d``, ``BatchNorm2d``
children of an ``nn.Sequential``, and the ``(conv, bn)`` attribute-name pairs a module lists in
``conv_bn_pairs()`` when its own forward computes ``bn(conv(x))``. RCIL's ``ParallelConvBN`` becomes its
single equivalent conv.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .parallel import ParallelConvBN, conv_bn_weights, fold_parallel_branches


def fold_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """A copy of ``conv`` (its own forward kept, e.g. TF "SAME" padding) equal to ``bn(conv(x))`` with
    BN in eval mode."""
    if conv.out_channels != bn.num_features or bn.running_var is None or bn.weight is None:
        raise ValueError(f"cannot fold {bn} into {conv}")
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        weight, bias = conv_bn_weights(conv, bn)
        fused.weight.copy_(weight)
        fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return fused


def _fold_children(module: nn.Module) -> int:
    count = 0
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
                module._modules[a] = fold_bn(conv, bn)
                module._modules[b] = nn.Identity()
                count += 1
    pairs = getattr(module, "conv_bn_pairs", None)
    if callable(pairs):
        for conv_name, bn_name in pairs():
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
                setattr(module, conv_name, fold_bn(conv, bn))
                setattr(module, bn_name, nn.Identity())
                count += 1
    return count


def inference_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with BN folded into the convs before it and no parameter
    requiring grad. The original is left untouched (it may go on training)."""
    was_training = model.training
    model.eval()  # BN's running statistics are what is folded; a copy in train mode would differ
    try:
        net = copy.deepcopy(model)
    finally:
        model.train(was_training)
    if any(isinstance(m, ParallelConvBN) for m in net.modules()):
        fold_parallel_branches(net)
    for m in list(net.modules()):
        _fold_children(m)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
