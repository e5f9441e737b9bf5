"""Run by tests/test_sync_bn.py under torchrun (2 gloo processes on CPU): one SyncBN layer on
batches of unequal size, and one SGD step of a tiny segmenter with SyncBN on and off. Each rank
saves what it holds to OUT/rank<r>.pt."""

import sys
from pathlib import Path

import torch
from torch import nn

from ciss.engine.distributed import init_distributed, wrap_ddp
from ciss.models import build_segmenter

CPU = torch.device("cpu")


def layer_and_inputs() -> tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]:
    """A BN layer with non-trivial affine weights, a batch of 6 and the weights of a loss on it."""
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=g))
    x = torch.randn(6, 3, 5, 4, generator=g) * 2 + 1
    w = torch.randn(6, 3, 5, 4, generator=g)
    return bn, x, w


def main(out: Path) -> None:
    rank = init_distributed("cpu").rank
    saved: dict = {}
    bn, x, w = layer_and_inputs()
    part = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shares of the batch
    ddp = wrap_ddp(nn.Sequential(bn), CPU, sync_bn=True)
    xr = x[part].clone().requires_grad_()
    y = ddp(xr)
    (y * w[part]).sum().backward()
    saved["layer"] = {"y": y.detach(), "x_grad": xr.grad, "weight_grad": bn.weight.grad,
                      "bias_grad": bn.bias.grad, "mean": bn.running_mean, "var": bn.running_var}
    for sync in (True, False):
        torch.manual_seed(0)
        model = build_segmenter("tiny", head_channels=8, classes_per_step=(3,))
        ddp = wrap_ddp(model, CPU, sync_bn=sync)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)  # each rank its own images
        images = torch.randn(2, 3, 32, 32) + rank
        ddp(images).logits.square().mean().backward()
        opt.step()
        saved[f"model_sync_{sync}"] = {k: v.clone() for k, v in model.state_dict().items()}
        saved[f"types_sync_{sync}"] = sorted({type(m).__name__ for m in model.modules() if "Norm" in
                                              type(m).__name__})
    if rank == 0:  # outside the DDP forward a training-mode forward on one rank must not wait
        model.train()(images)
    torch.distributed.barrier()
    torch.save(saved, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
