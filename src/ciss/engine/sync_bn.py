"""Batch normalisation over the global batch of a DDP run (SyncBN).

Under DDP each process normalises its own share of the batch, so with the papers' global batch of 24
on 8 GPUs every BN sees 3 images. SyncBN all-reduces each channel's sum, sum of squares and count
across the processes, so every process normalises with, and moves its running statistics by, the
statistics of the whole batch: the same result as one process with the whole batch.

torch.nn.SyncBatchNorm refuses CPU tensors (gloo), so this module does the synchronisation itself,
on every device. `convert_sync_bn` turns a model's BatchNorm2d layers into SyncBatchNorm2d in place:
the class of each layer changes, nothing else, so the layers keep their identity (the optimizer's
parameters, hooks, and methods' references stay valid) and their state_dict keys: checkpoints load
into plain models and back. The statistics are synchronised only inside the forward of the DDP
wrapper made by `ciss.engine.distributed.wrap_ddp` (the training loop's forward); anything else
that runs the model in training mode, on one rank or on all, normalises locally as before, so no
collective call can wait for a rank that never makes it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_active = 0  # > 0 while a DDP forward with SyncBN runs


def sync_on_forward(ddp: nn.Module) -> nn.Module:
    """SyncBatchNorm2d layers in training mode synchronise within the forward of `ddp` (a DDP
    wrapper), and only there."""

    def start(module: nn.Module, args: tuple) -> None:
        global _active
        _active += 1

    def end(module: nn.Module, args: tuple, output: object) -> None:
        global _active
        _active = max(0, _active - 1)

    ddp.register_forward_pre_hook(start)
    ddp.register_forward_hook(end, always_call=True)  # also when the forward raises
    return ddp


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; its gradient is the sum of the processes' gradients, because every
    process's loss depends on the summed statistics."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of every process's batch together
    (in the forward of a `sync_on_forward` wrapper, under a process group of more than one
    process); plain BatchNorm2d otherwise. Statistics are computed in float32, also under
    autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if not (self.training and _active and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        return self.synchronised(x)

    def synchronised(self, x: torch.Tensor) -> torch.Tensor:
        """The training-mode forward with the statistics summed over the process group."""
        self._check_input_dim(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           xf.new_full((1,), float(x.numel() // c))])
        total = _AllReduceSum.apply(local)  # (2C + 1,): sums, sums of squares, count
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as BN normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = var * (n / (n - 1).clamp_min(1.0))  # running_var is unbiased, as in BN
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype),
                                                        alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach().to(self.running_var.dtype),
                                                       alpha=factor)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        y = xf * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_bn(model: nn.Module) -> int:
    """Turn every BatchNorm2d of `model` into a SyncBatchNorm2d, in place (see the module's
    docstring); layers already converted stay as they are. Returns how many were converted."""
    count = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
            count += 1
    return count
