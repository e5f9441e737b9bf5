"""Golden tests: PLOP's entropy, pseudo-label thresholds, pseudo-labels, adaptive factor, CE and Local POD
against numbers the official PLOP code (arthurdouillard/CVPR2021_PLOP, commit in the file) computed on the
same inputs: its Trainer.find_median and one batch of its Trainer.train with the method's preset.

The official find_median adds the bin index instead of the bin's count to its running sum
(`running_sum += lower_border * nb_bins`). ciss computes the median of the histogram as intended, so the
thresholds are compared with the official code run with that one line corrected
(`running_sum += histograms[c, bin_index]`), and the pseudo-labels, factor, CE and POD with the official
training step run on those thresholds. test_official_running_sum_slip_changes_thresholds records what the
uncorrected code gives on the same inputs."""

from __future__ import annotations

import math

import torch
from torch import nn

from ciss.losses import local_pod_distance, plop_uncertainty
from ciss.methods.plop import PLOP, merge_new_into_background
from ciss.types import IGNORE, Batch, SegOutput, StepContext

from golden_common import close, load, t


G = load("plop")
C_OLD, C_NEW = G["classes"]
CTX = StepContext(step=1, classes_per_step=(C_OLD, C_NEW), num_steps=2)


def _features(which: str) -> dict:
    inp = G["inputs"]
    stages = [t(a) for a in inp[f"stages_{which}"]]
    # The four maps the official code takes from ResNet's stages (strides 4, 8, 16, 16): every stage here,
    # so "stages" and the backbone's distilled stages are the same list.
    return {"stages": stages, "distilled": stages, "head": t(inp[f"head_{which}"]),
            "logits_lowres": t(inp[f"logits_lowres_{which}"])}


def outputs():
    inp = G["inputs"]
    return SegOutput(t(inp["logits"]), _features("new")), SegOutput(t(inp["old_logits"][0]), _features("old"))


class Replay(nn.Module):
    """The old model of the golden file: batch k (read from the image) gives the stored logits."""

    def __init__(self, logits: list) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, image):
        return SegOutput(self.logits[int(image.reshape(-1)[0])])


def batches():
    labels = [t(a) for a in G["inputs"]["labels"]]
    return [Batch(image=torch.full((lab.shape[0], 3, 2, 2), float(k)), label=lab) for k, lab in enumerate(labels)]


def test_preset_matches_official_argparser():
    p, m = G["preset"], PLOP()
    assert p["pod"] == "local" and p["pseudo"] == "entropy" and p["pod_prepro"] == "pow"
    assert p["pod_apply"] == "all" and not p["pod_deeplab_mask"]
    assert m.pod_factor == p["pod_factor"] and m.pod_logits == p["pod_logits"]
    assert m.pod_logits_factor == p["pod_options"]["switch"]["after"]["factor"]
    assert p["pod_options"]["switch"]["after"]["extra_channels"] == "sum"
    assert list(m.spp_scales) == p["spp_scales"] and m.pod_schedule == (not p["no_pod_schedule"])
    assert m.entropy_floor == p["threshold"] and m.classif_adaptive_factor == p["classif_adaptive_factor"]
    assert m.init_balanced == p["init_balanced"]
    assert p["pseudo_nb_bins"] is None and m.median_bins == 100  # find_median: 100 bins in entropy mode


def test_entropy():
    """Official entropy() / log(nb_current_classes) (find_median's max_value) = our uncertainty."""
    e = G["outputs"]["entropy"]
    probs = t(e["probs"])
    ours = plop_uncertainty(probs, CTX.num_seen) * math.log(CTX.num_seen)
    # The official p * log(p + 1e-8) adds about 1e-8 per channel: after its mean over the C_old channels
    # and 1 / log(C_old), at most 1e-8 / log(C_old) (7.2e-9 here); it dominates only on pixels whose
    # entropy is ~1e-4 or less, hence the absolute tolerance.
    close(ours, t(e["entropy"]), atol=1e-8 / math.log(C_OLD))
    close(G["outputs"]["max_entropy_fixed"], math.log(CTX.num_seen))


def test_thresholds_match_corrected_median():
    ours = PLOP().compute_thresholds(Replay([t(o) for o in G["inputs"]["old_logits"]]), batches(), CTX)
    # Official thresholds cover every current class; the new ones are never predicted by the old
    # model and sit at the floor. Ours cover the old classes.
    fixed = t(G["outputs"]["thresholds_fixed"])
    close(ours, fixed[:C_OLD])
    assert torch.all(fixed[C_OLD:] == torch.tensor(PLOP().entropy_floor, dtype=fixed.dtype))


def test_official_running_sum_slip_changes_thresholds():
    """Not a comparison but the record: the uncorrected official median differs on these inputs
    (its loop never reaches half the count for 3 of the 4 old classes, and their thresholds fall to the
    0.001 floor)."""
    official = t(G["outputs"]["thresholds_official"])[:C_OLD]
    fixed = t(G["outputs"]["thresholds_fixed"])[:C_OLD]
    assert not torch.allclose(official, fixed)
    assert official[0] == fixed[0]  # the background class reaches half the count in bins where both agree


def _targets():
    new, old = outputs()
    m = PLOP()
    m.thresholds = t(G["outputs"]["thresholds_fixed"])[:C_OLD].float()
    m.thresholds_step = 1
    label = batches()[0]
    return m, new, old, label, m.make_targets(label, new, old, CTX)


def test_pseudo_labels_and_adaptive_factor():
    _, _, _, _, targets = _targets()
    tr = G["outputs"]["train"]
    assert torch.equal(targets.label, t(tr["pseudo_labels"]))
    # classif_adaptive_factor = confident background pixels / (background pixels + 1e-6), per image.
    close(targets.weight[:, 0, 0], t(tr["classif_adaptive_factor"]))
    assert torch.all(targets.weight == targets.weight[:, :1, :1])


def test_ce_and_pod_of_a_training_step():
    m, new, old, batch, targets = _targets()
    terms = m.loss(new, targets, old, batch, CTX)
    tr = G["outputs"]["train"]
    # PLOP: (factor x CE per pixel).mean() over all pixels (ignored ones count 0); ours averages over
    # the labelled pixels: official = ours x labelled / all.
    factor = float((targets.label != IGNORE).sum()) / targets.label.numel()
    close(terms["ce"] * factor, tr["ce"])
    # The official sum accumulates in float32 (torch.tensor(0.)): ~1e-7 relative.
    close(terms["pod"], tr["pod"])


def test_local_pod_per_map():
    new, old = outputs()
    per_map = G["outputs"]["pod_per_map"]
    maps = list(zip(old.features["distilled"] + [old.features["head"]],
                    new.features["distilled"] + [new.features["head"]]))
    maps.append((old.features["logits_lowres"], merge_new_into_background(new.features["logits_lowres"], C_OLD)))
    assert len(maps) == len(per_map)
    for (a, b), golden in zip(maps, per_map):
        close(local_pod_distance(a, b, (1, 2, 4)), golden)


def test_pod_without_logits_gives_the_last_factor_to_the_decoder():
    new, old = outputs()
    close(PLOP(pod_logits=False).pod_loss(new, old, CTX), G["outputs"]["pod_without_logits"])
