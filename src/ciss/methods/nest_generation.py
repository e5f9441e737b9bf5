"""NeST's generation of new classifiers from old ones (Xie et al., ECCV 2024): the pre-tuned
transformation, w_n = sum_c P[n, c] * (M[n, c] * W_src[c]), with importance matrices M (channel
level) and projection matrices P (class level); their initialisation from cross-task class
similarity; and the forward hooks through which a model computes the generated rows while the
matrices are pre-tuned. The source classifiers W_src are every old classifier (the paper's) or the
background classifier alone (its ablation): the first `num_sources` old rows.

Formulas settled against the official code (zhengyuan-xie/ECCV24_NeST); files are named beside each choice.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ciss.types import Batch, StepContext

INITS = ("similarity", "uniform", "random")
SOURCES = ("all", "background")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ClassifierTransform(nn.Module):
    """The pre-tuned parameters: importance (N, C_src, D), projection (N, C_src), new biases (N,), and
    optionally the background row's channel weights (D,) and scale (1,). C_src is the number of
    source classifiers: C_old, or 1 when only the background generates.

    Not part of the segmenter: the model's state_dict keeps its keys and loads strictly.
    """

    def __init__(self, importance: torch.Tensor, projection: torch.Tensor, bias: torch.Tensor,
                 bg_channels: Optional[torch.Tensor] = None, bg_scale: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.importance = nn.Parameter(importance.float().clone())
        self.projection = nn.Parameter(projection.float().clone())
        self.bias = nn.Parameter(bias.float().clone())
        self.bg_channels = None if bg_channels is None else nn.Parameter(bg_channels.float().clone())
        self.bg_scale = None if bg_scale is None else nn.Parameter(bg_scale.float().clone())

    @property
    def transforms_background(self) -> bool:
        return self.bg_channels is not None

    @property
    def num_sources(self) -> int:
        return self.projection.shape[1]

    def new_weight(self, old_weight: torch.Tensor) -> torch.Tensor:
        """(C_old, D) old classifier rows, background first -> (N, D) generated rows."""
        # ECCV24_NeST segmentation_module.py avg_weight_output: weight_new[n] @ (weight_old[n] * W_old).
        src = old_weight[: self.num_sources]  # (C_src, D)
        return torch.einsum("nc,ncd,cd->nd", self.projection, self.importance, src)

    def background_weight(self, bg_weight: torch.Tensor) -> torch.Tensor:
        """(D,) old background row -> (D,) pre-tuned background row."""
        # ECCV24_NeST avg_weight_output: weight_new_bg (1x1) @ (weight_old_bg (1xD) * w_bg).
        return self.bg_scale * self.bg_channels * bg_weight

    @torch.no_grad()
    def written_rows(self, old_weight: torch.Tensor, old_bias: torch.Tensor,
                     align: bool) -> dict[str, torch.Tensor]:
        """The classifier rows the matrices give for old rows (C_old, D) and biases (C_old,), aligned
        as the official code writes them: "weight" (N, D), "bias" (N,), and "background" (D,) when
        the background row is transformed."""
        weight = self.new_weight(old_weight)  # (N, D)
        bias = self.bias.detach().clone()  # (N,)
        out: dict[str, torch.Tensor] = {}
        if self.transforms_background:
            bg = self.background_weight(old_weight[0])  # (D,)
            if align:  # ECCV24_NeST init_via_weight: gamma_bg restores the old background norm
                bg = bg * old_weight[0].norm() / bg.norm().clamp_min(1e-12)
            out["background"] = bg
            old_weight = torch.cat([bg[None], old_weight[1:]])
        if align:
            # ECCV24_NeST init_via_weight: gamma_b = ||old biases|| / ||new biases|| (vector norms),
            # then align_weight("all"): mean old row norm / mean new row norm.
            bias = bias * old_bias.norm() / bias.norm().clamp_min(1e-12)
            weight = weight * old_weight.norm(dim=1).mean() / weight.norm(dim=1).mean().clamp_min(1e-12)
        out["weight"], out["bias"] = weight, bias
        return out


@torch.no_grad()
def class_similarity(old_model: nn.Module, loader: Iterable[Batch], ctx: StepContext,
                     size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-task class similarity: for new class n, old class c and channel d, the mean over the pixels
    labelled n of p_old(c | x) * [f_d(x) * W_old[c, d] > 0].

    Returns the importance initialisation (N, C_old, D) and the pixel count of each new class (N,).
    """
    # ECCV24_NeST train.py select(): old softmax and old decoder features ("pre_logits"), both resized
    # bilinearly to 128x128, labels nearest-resized; relu(f * W) > 0 as the channel indicator.
    was_training = old_model.training
    old_model.eval()
    c_old, n_new = ctx.num_old, ctx.num_new
    w_old = torch.cat([c.weight for c in old_model.classifier.convs]).flatten(1).float()  # (C_old, D)
    acc_pos = acc_neg = counts = None
    for batch in loader:
        out = old_model(batch.image)
        if acc_pos is None:
            dev = w_old.device
            acc_pos = torch.zeros(n_new, c_old, w_old.shape[1], dtype=torch.float64, device=dev)
            acc_neg = torch.zeros_like(acc_pos)
            counts = torch.zeros(n_new, dtype=torch.float64, device=dev)
        for i in range(batch.image.shape[0]):  # one image at a time: (D, 128, 128) per image at most
            label = F.interpolate(batch.label[i:i + 1, None].float(), size=(size, size),
                                  mode="nearest").long().flatten()  # (S,)
            present = [int(k) - ctx.num_old for k in torch.unique(label).tolist()
                       if ctx.num_old <= k < ctx.num_seen]
            if not present:
                continue
            feats = F.interpolate(out.features["head"][i:i + 1].float(), size=(size, size),
                                  mode="bilinear", align_corners=False)[0].flatten(1).T  # (S, D)
            probs = F.softmax(F.interpolate(out.logits[i:i + 1, :c_old].float(), size=(size, size),
                                            mode="bilinear", align_corners=False), dim=1)[0].flatten(1).T  # (S, C_old)
            for n in present:
                m = label == ctx.num_old + n
                p, f = probs[m].double(), feats[m]  # (P, C_old), (P, D)
                # [f_d W_cd > 0] = [f_d > 0][W_cd > 0] + [f_d < 0][W_cd < 0]: two (C_old, D) matmuls
                # instead of the (P, C_old, D) product.
                acc_pos[n] += p.T @ (f > 0).double()
                acc_neg[n] += p.T @ (f < 0).double()
                counts[n] += m.sum()
    old_model.train(was_training)
    if acc_pos is None:
        raise ValueError(f"NeST: step {ctx.step} has no training batch to measure class similarity on")
    if _distributed():  # every rank starts the pre-tuning from the same matrices
        for t in (acc_pos, acc_neg, counts):
            dist.all_reduce(t)
    importance = acc_pos * (w_old > 0) + acc_neg * (w_old < 0)  # (N, C_old, D)
    importance = importance / counts.clamp_min(1)[:, None, None]
    return importance.float(), counts.float()


def initial_matrices(init: str, shape: tuple[int, int, int], uniform_channels: bool = False,
                     similarity: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting importance (N, C_src, D) and projection (N, C_src) for `init` ("similarity" needs
    `similarity`: class_similarity's output restricted to the C_src source classes).

    `uniform_channels` sets the importance to 1 after the projection took its start from it."""
    n, c, d = shape
    if init == "similarity":
        importance, counts = similarity
        importance = importance.clone()
        # A new class absent from the step's data has no similarity: it starts uniform.
        importance[counts == 0] = 1.0
        # ECCV24_NeST reset_weight_old: P[n] = softmax_c(sum_d M[n, c, d]).
        projection = importance.sum(dim=-1).softmax(dim=-1)  # (N, C_src)
    elif init == "uniform":
        importance = torch.ones(n, c, d)
        projection = torch.full((n, c), 1.0 / c)
    else:
        importance = nn.init.kaiming_normal_(torch.empty(n, c, d), mode="fan_out")
        projection = nn.init.kaiming_normal_(torch.empty(n, c), mode="fan_out")
    if uniform_channels:
        importance = torch.ones(n, c, d)
    return importance, projection


def attach_generation(model: nn.Module, transform: ClassifierTransform) -> list:
    """Make the new conv (and the background row) compute the generated weights; returns the handles
    to remove.

    Forward hooks rather than torch.nn.utils.parametrize: the engine checkpoints the model every
    epoch of the phase, and parametrize renames the conv's state_dict keys, which would break the
    strict load when resuming. Hooks leave the model's parameters and keys untouched.
    """
    t = transform
    handles = []
    convs = model.classifier.convs
    w_old = torch.cat([c.weight for c in convs[:-1]]).flatten(1).detach().clone()  # (C_old, D)

    def new_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        w = t.new_weight(w_old)[:, :, None, None]  # (N, D, 1, 1)
        # output * 0 keeps the conv's own parameters in the graph: DDP expects every parameter
        # to take part in the backward (they get zero gradients and are not in the optimizer).
        return output * 0 + F.conv2d(args[0], w.to(args[0].dtype), t.bias.to(args[0].dtype))

    handles.append(convs[-1].register_forward_hook(new_rows))
    if t.transforms_background:
        def bg_row(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            w = t.background_weight(w_old[0])[None, :, None, None]  # (1, D, 1, 1)
            row = F.conv2d(args[0], w.to(args[0].dtype), module.bias[:1].to(args[0].dtype))
            return torch.cat([output[:, :1] * 0 + row, output[:, 1:]], dim=1)

        handles.append(convs[0].register_forward_hook(bg_row))
    if _distributed():
        # The matrices live outside the DDP module: average their gradients across ranks here.
        world = dist.get_world_size()

        def average(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad / world

        handles.extend(p.register_hook(average) for p in t.parameters())
    else:
        # ECCV24_NeST train.py warm_up freezes every model parameter: without DDP the features fed
        # to the classifier are detached, so no backward runs through the backbone for nothing.
        handles.append(model.classifier.register_forward_pre_hook(
            lambda module, args: (args[0].detach(), *args[1:])))
    return handles
