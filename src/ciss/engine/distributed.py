"""Where a run computes: the device, the torchrun ranks and their process group, the DDP wrapper
(with SyncBN), and mixed precision."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ciss.engine.sync_bn import convert_sync_bn, sync_on_forward


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' was asked for but CUDA is not available; use device=cpu")
    return torch.device(name)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.enabled:
            dist.barrier()


def init_distributed(device_name: str) -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local)


def rank_device(name: str, info: DistInfo) -> torch.device:
    """This process's device: under torchrun on CUDA, the GPU of its local rank."""
    device = resolve_device(name)
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def wrap_ddp(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """The DDP wrapper of `model`. `sync_bn`: its BatchNorm2d layers become SyncBatchNorm2d (in
    place, same state_dict keys), which normalise with the whole batch of every process inside the
    wrapper's forward (ciss.engine.sync_bn)."""
    if sync_bn:
        convert_sync_bn(model)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    return sync_on_forward(ddp) if sync_bn else ddp


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_ctx(device: torch.device, amp: str):
    """Mixed precision: bf16 or fp16 on CUDA, bf16 on CPU; fp16 on CPU runs in float32."""
    if amp != "none" and amp not in AMP_DTYPES:
        raise ValueError(f"optim.amp must be none, bf16 or fp16, got '{amp}'")
    enabled = amp != "none" and (device.type == "cuda" or amp == "bf16")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES.get(amp, torch.float32)
                          if enabled else None, enabled=enabled)
