"""Pure loss functions. Shapes: logits (B, C, H, W), label (B, H, W) long with IGNORE = 255."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ciss.types import IGNORE


def cross_entropy(logits: torch.Tensor, label: torch.Tensor,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean CE over non-ignored pixels; `weight` (B, H, W) scales each pixel's term."""
    if weight is None:
        return F.cross_entropy(logits, label, ignore_index=IGNORE)
    per_pixel = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")  # (B, H, W)
    valid = (label != IGNORE).float()
    # Normalise by the number of valid pixels, not by the weights, so down-weighting lowers the loss.
    return (per_pixel * weight * valid).sum() / valid.sum().clamp_min(1.0)


# ---- output distillation (LwF, ILT, MiB) --------------------------------------------------------

def knowledge_distillation(logits: torch.Tensor, old_logits: torch.Tensor,
                           alpha: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy from the old model's old-class distribution to the new model's.

    logits (B, C, H, W) with C >= C_old; old_logits (B, C_old, H, W). Scalar.
    """
    c_old = old_logits.shape[1]
    # MiB's KnowledgeDistillationLoss: student renormalised over the old classes only (utils/loss.py).
    log_q = F.log_softmax(logits[:, :c_old], dim=1)  # (B, C_old, H, W)
    # alpha scales only the teacher's logits ("hard-ify the soft labels"), no student temperature.
    p = F.softmax(old_logits * alpha, dim=1)  # (B, C_old, H, W)
    # Mean over classes then pixels, as MiB: the 1/C_old factor is part of the loss_kd calibration.
    return -(p * log_q).mean(dim=1).mean()


def unbiased_cross_entropy(logits: torch.Tensor, label: torch.Tensor, num_old: int,
                           weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MiB's unbiased CE: a background pixel may be any old class, so its target is p(bg) + sum p(old).

    logits (B, C, H, W); label (B, H, W) with labels < num_old treated as background. Scalar.
    """
    den = torch.logsumexp(logits, dim=1)  # (B, H, W)
    log_p = logits - den[:, None]  # (B, C, H, W)
    log_bg = torch.logsumexp(logits[:, :num_old], dim=1) - den  # (B, H, W)
    # Channels 1..num_old-1 are never a target once old labels are folded into 0.
    log_p = torch.cat([log_bg[:, None], log_p[:, 1:]], dim=1)  # (B, C, H, W)
    label = torch.where(label < num_old, torch.zeros_like(label), label)
    if weight is None:
        return F.nll_loss(log_p, label, ignore_index=IGNORE)
    per_pixel = F.nll_loss(log_p, label, ignore_index=IGNORE, reduction="none")  # (B, H, W)
    valid = (label != IGNORE).float()
    return (per_pixel * weight * valid).sum() / valid.sum().clamp_min(1.0)


def unbiased_knowledge_distillation(logits: torch.Tensor, old_logits: torch.Tensor,
                                    alpha: float = 1.0) -> torch.Tensor:
    """MiB's unbiased KD: the old model's background is matched by the new p(bg) + sum p(new).

    logits (B, C, H, W) with C > C_old (new classes at the end); old_logits (B, C_old, H, W). Scalar.
    """
    c_old = old_logits.shape[1]
    den = torch.logsumexp(logits, dim=1)  # (B, H, W)
    log_old = logits[:, 1:c_old] - den[:, None]  # (B, C_old - 1, H, W)
    log_bg = torch.logsumexp(torch.cat([logits[:, :1], logits[:, c_old:]], dim=1), dim=1) - den  # (B, H, W)
    p = F.softmax(old_logits * alpha, dim=1)  # (B, C_old, H, W)
    # Divided by C_old (MiB averages over the old classes, background included).
    per_pixel = (p[:, 0] * log_bg + (p[:, 1:] * log_old).sum(dim=1)) / c_old  # (B, H, W)
    return -per_pixel.mean()


# ---- PLOP ---------------------------------------------------------------------------------------

def plop_uncertainty(probs: torch.Tensor, num_seen: int) -> torch.Tensor:
    """PLOP's per-pixel uncertainty of the old model: entropy / (C_old * log C_old * log num_seen).

    probs (B, C_old, H, W) -> (B, H, W). The scale is PLOP's own (its entropy() averages over the
    channels and find_median divides by log(nb_current_classes)); kept so that its 0.001 floor on the
    thresholds means what it means there.
    """
    c_old = probs.shape[1]
    h = -torch.special.xlogy(probs, probs).sum(dim=1)  # (B, H, W) nats
    # With a single old class the entropy is 0; max(., 2) only avoids 0/0.
    return h / (c_old * math.log(max(c_old, 2)) * math.log(max(num_seen, 2)))


def local_pod(x: torch.Tensor, scales: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """Local POD embedding: in each cell of an s x s grid, the width- and height-pooled means.

    x (B, C, H, W) -> (B, D). Scales with cells smaller than one pixel are skipped (they would be empty
    regions; PLOP's 512-pixel crops never meet them).
    """
    b, _, h, w = x.shape
    emb = []
    for s in scales:
        if s > h or s > w:
            continue
        # PLOP slices both axes with w // s (square crops); separate sizes generalise it.
        kh, kw = h // s, w // s
        for i in range(s):
            for j in range(s):
                cell = x[..., i * kh:(i + 1) * kh, j * kw:(j + 1) * kw]  # (B, C, kh, kw)
                emb.append(cell.mean(dim=3).reshape(b, -1))  # (B, C * kh)
                emb.append(cell.mean(dim=2).reshape(b, -1))  # (B, C * kw)
    return torch.cat(emb, dim=1)


def local_pod_distance(old: torch.Tensor, new: torch.Tensor,
                       scales: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """Mean over images of the L2 distance between local POD embeddings of squared activations.

    old, new (B, C, H, W). Scalar.
    """
    # PLOP's pod_prepro="pow" squares the activations; embeddings are not L2-normalised (norm=False).
    a = local_pod(old.pow(2), scales)  # (B, D)
    b = local_pod(new.pow(2), scales)  # (B, D)
    return torch.linalg.vector_norm(a - b, dim=-1).mean()


# ---- RCIL ---------------------------------------------------------------------------------------

def pooled_cube_spatial(old: torch.Tensor, new: torch.Tensor,
                        windows: Sequence[int] = (4, 8, 12, 16, 20, 24)) -> torch.Tensor:
    """RCIL's spatial pooled-cube distillation: squared activations average-pooled with each k x k window
    (stride 1, zero padding k // 2, padded zeros counted); per window, the L2 distance over the whole
    pooled map, averaged over images; then the mean over windows.

    old, new (B, C, H, W). Scalar.
    """
    a, b = old.pow(2), new.pow(2)
    total = new.new_zeros(())
    for k in windows:
        pa = F.avg_pool2d(a, k, stride=1, padding=k // 2)  # (B, C, H', W')
        pb = F.avg_pool2d(b, k, stride=1, padding=k // 2)
        total = total + torch.linalg.vector_norm((pa - pb).flatten(1), dim=-1).mean()
    return total / len(windows)


def pooled_cube_channel(old: torch.Tensor, new: torch.Tensor, window: int = 3) -> torch.Tensor:
    """RCIL's channel pooled-cube distillation: squared activations averaged over ``window`` neighbouring
    channels (stride 1, zero padding, padded zeros counted); L2 distance over the pooled map, averaged
    over images.

    old, new (B, C, H, W). Scalar.
    """
    def pool(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H, C, W), pooled along C
        return F.avg_pool2d(x.pow(2).transpose(1, 2), (window, 1), stride=1, padding=(window // 2, 0))

    return torch.linalg.vector_norm((pool(old) - pool(new)).flatten(1), dim=-1).mean()


# ---- GSC ----------------------------------------------------------------------------------------

def soft_relation_distillation(logits: torch.Tensor, old_logits: torch.Tensor,
                               label: torch.Tensor) -> torch.Tensor:
    """GSC's soft semantic relation distillation (eq. 7): CE to the one-hot label whose old-class
    entries are replaced by the old model's probabilities.

    logits (B, C, H, W) with C >= C_old; old_logits (B, C_old, H, W); label (B, H, W), the current
    step's ground truth (new classes >= C_old, IGNORE = 255). Scalar.
    """
    c_old = old_logits.shape[1]
    log_q = F.log_softmax(logits, dim=1)  # (B, C, H, W)
    # Eq. 7 calls them the sigmoid of the old output; eq. 2 uses the same word for the softmax
    # probability that CE differentiates, so the old model's softmax (its "output probability") is used.
    p_old = F.softmax(old_logits, dim=1)  # (B, C_old, H, W)
    per_pixel = -(p_old * log_q[:, :c_old]).sum(dim=1)  # (B, H, W)
    new = (label >= c_old) & (label < logits.shape[1])  # IGNORE (255) is never a class index here
    new_term = -log_q.gather(1, torch.where(new, label, torch.zeros_like(label))[:, None])[:, 0]
    # Eq. 7 averages over every pixel: the old-class part distils even where the label is ignored.
    return (per_pixel + torch.where(new, new_term, torch.zeros_like(new_term))).mean()


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """GSC's sharp confidence loss (eq. 8): mean per-pixel entropy of the softmax, in nats.

    logits (B, C, H, W). Scalar.
    """
    log_q = F.log_softmax(logits, dim=1)  # (B, C, H, W)
    return -(log_q.exp() * log_q).sum(dim=1).mean()


# ---- SSUL ---------------------------------------------------------------------------------------

def binary_cross_entropy_one_hot(logits: torch.Tensor, label: torch.Tensor,
                                 weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SSUL's loss: independent sigmoids, each channel's BCE against the one-hot label, summed over
    the channels and averaged over the non-ignored pixels (an ignored pixel has no term at all).

    logits (B, C, H, W); label (B, H, W) long in [0, C) or IGNORE; weight (B, H, W) or None. Scalar.
    """
    valid = label != IGNORE  # (B, H, W)
    # scatter instead of F.one_hot: no (B, H, W, C) int64 copy at full resolution.
    target = torch.zeros_like(logits)  # (B, C, H, W)
    target.scatter_(1, torch.where(valid, label, torch.zeros_like(label))[:, None],
                    valid[:, None].to(logits.dtype))
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)  # (B, H, W)
    if weight is not None:
        per_pixel = per_pixel * weight
    # SSUL utils/loss.py: mean over pixels whose one-hot is not all zero, i.e. the non-ignored ones.
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1)
