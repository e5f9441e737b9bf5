"""Golden tests: RCIL's pooled cube distillation (spatial and channel) against numbers the official RCIL code
(zhangchbin/RCIL, commit in the file) computed on the same maps: train.py's features_distillation_spatial
and features_distillation_channel, VOC factors."""

from __future__ import annotations

import math

import torch

from ciss.losses import pooled_cube_channel, pooled_cube_spatial
from ciss.methods.plop import merge_new_into_background
from ciss.methods.rcil import RCIL
from ciss.types import SegOutput, StepContext

from golden_common import close, load, t


G = load("rcil_pckd")
C_OLD, C_NEW = G["classes"]
CTX = StepContext(step=1, classes_per_step=(C_OLD, C_NEW), num_steps=2)


def _out(which: str) -> SegOutput:
    inp = G["inputs"]
    stages = [t(a) for a in inp[f"stages_{which}"]]
    return SegOutput(torch.zeros(1), {"stages": stages, "distilled": stages, "head": t(inp[f"head_{which}"]),
                                      "logits_lowres": t(inp[f"logits_lowres_{which}"])})


def _feature_maps():
    new, old = _out("new"), _out("old")
    return (old.features["distilled"] + [old.features["head"]],
            new.features["distilled"] + [new.features["head"]], old, new)


def test_preset():
    p, m = G["preset"], RCIL()
    assert p["dataset"] == "voc" and p["unce"] and p["unkd"] and p["init_balanced"] == m.init_balanced
    assert m.loss_kd == p["loss_kd"] and m.unbiased_ce
    assert (m.pckd_factor, m.pckd_logits_factor) == (0.01, 0.0005)  # the official VOC factors
    assert list(m.spatial_windows) == [4, 8, 12, 16, 20, 24] and m.channel_window == 3


def test_spatial_per_map():
    old_maps, new_maps, old, new = _feature_maps()
    old_maps.append(old.features["logits_lowres"])
    new_maps.append(merge_new_into_background(new.features["logits_lowres"], C_OLD))
    for a, b, golden in zip(old_maps, new_maps, G["outputs"]["spatial_per_map"], strict=True):
        close(pooled_cube_spatial(a, b), golden)


def test_channel_per_map():
    old_maps, new_maps, _, _ = _feature_maps()
    for a, b, golden in zip(old_maps, new_maps, G["outputs"]["channel_per_map"], strict=True):
        close(pooled_cube_channel(a, b), golden)


def test_pckd_loss_of_a_step():
    _, _, old, new = _feature_maps()
    spatial, channel = RCIL().pckd_loss(new, old, CTX)
    out = G["outputs"]
    close(spatial, out["spatial"])  # the official float32 accumulator: ~1e-7 relative
    # Documented choice (rcil.py): the official channel loop gives its last feature map (the decoder
    # output, last of the list once the logits are dropped) the logits' factor 0.0005; ours keeps 0.01
    # for every feature map. So ours = official + schedule x (0.01 - 0.0005) x d_last / n_maps.
    n_maps = len(out["channel_per_map"])
    schedule = math.sqrt(CTX.num_seen / CTX.num_new)
    expected = out["channel"] + schedule * (0.01 - 0.0005) * out["channel_per_map"][-1] / n_maps
    close(channel, expected)
    assert abs(float(channel) - out["channel"]) > 1e-3 * out["channel"]  # the choice is visible here
