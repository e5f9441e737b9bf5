"""Golden tests: SSUL's training-label transform (relabelling to the step, unknown from saliency) and its BCE
against numbers the official SSUL code (clovaai/SSUL, commit in the file) computed on the same masks and
logits: datasets/voc.py VOCSegmentation.__getitem__ (train split, --unknown) and utils/loss.py
BCEWithLogitsLossWithIgnoreIndex.

Label spaces: the official one puts the unknown first, [unknown 0, background 1, class k at k + 1]; ours
keeps the model's [background 0, class k at k] and appends the unknown after the seen classes. The
tests map one onto the other (labels, and the logits' channels for the BCE, which sums over channels)."""

from __future__ import annotations


import numpy as np
import torch

from ciss.losses import binary_cross_entropy_one_hot
from ciss.methods.ssul import SSUL, mark_unknown
from ciss.scenario import Scenario, parse_task
from ciss.types import IGNORE, Batch, SegOutput, StepContext, Targets

from golden_common import close, load, t


G = load("ssul")


def official_to_ours(label: torch.Tensor, num_seen: int) -> torch.Tensor:
    """Official [unknown, background, classes...] labels -> ours [background, classes..., unknown]."""
    return torch.where(label == IGNORE, label, torch.where(label == 0, torch.full_like(label, num_seen), label - 1))


def test_label_transform():
    steps = tuple(tuple(s) for s in parse_task(G["task"], 20))
    scenario = Scenario(dataset="voc", task=G["task"], setting="overlapped", order=tuple(range(21)), steps=steps,
                        class_names=tuple(f"c{i}" for i in range(21)))
    ssul = SSUL()
    for step in (0, 1):
        ctx = StepContext(step=step, classes_per_step=scenario.classes_per_step, num_steps=scenario.num_steps)
        golden = G["outputs"]["targets"][f"step{step}"]
        assert sorted(golden) == sorted(G["inputs"]["masks"])  # every image is listed at both steps
        for name, target in golden.items():
            mask = t(G["inputs"]["masks"][name]).numpy().astype(np.uint8)
            # Saliency maps of 0 / 255: salient for the official `sal_map > 0` and for ours (> 127).
            salient = t(G["inputs"]["saliency"][name]).numpy() > 127
            marked = mark_unknown(scenario.train_lut(step)[mask], salient)
            label = torch.from_numpy(marked).long()[None]
            ours = ssul.make_targets(Batch(torch.zeros(1, 3, *label.shape[1:]), label), None, None, ctx).label
            assert torch.equal(ours[0], official_to_ours(t(target), ctx.num_seen)), (step, name)


def _bce_inputs():
    inp = G["inputs"]
    logits = t(inp["bce_logits"])  # official channels: unknown, background, classes
    ours_logits = torch.cat([logits[:, 1:], logits[:, :1]], dim=1)  # background, classes, unknown
    num_seen = logits.shape[1] - 1
    return ours_logits, official_to_ours(t(inp["bce_label"]), num_seen), t(inp["bce_weight"]), num_seen


def test_bce():
    logits, label, weight, _ = _bce_inputs()
    # Both average over the labelled pixels (the official masked_select of non-empty one-hots).
    close(binary_cross_entropy_one_hot(logits, label), G["outputs"]["bce"])
    close(binary_cross_entropy_one_hot(logits, label, weight), G["outputs"]["bce_weighted"])


def test_ssul_loss_hook():
    logits, label, _, num_seen = _bce_inputs()
    ctx = StepContext(step=1, classes_per_step=(num_seen - 2, 2), num_steps=2)
    batch = Batch(torch.zeros(label.shape[0], 3, *label.shape[1:]), label)
    terms = SSUL().loss(SegOutput(logits), Targets(label), None, batch, ctx)
    close(terms["bce"], G["outputs"]["bce"])
