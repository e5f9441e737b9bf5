"""GSC invariants checked against values worked out by hand: the lambdas of eq. 9, the psi-weighted
eq. 6 and the entropy thresholds tau^c of eq. 12."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ciss.losses import plop_uncertainty, prediction_entropy, soft_relation_distillation
from ciss.methods import build_method
from ciss.types import IGNORE, Batch, SegOutput
from test_method_gsc import CTX, prepared


def test_lambdas_scale_their_terms_by_exactly_their_factor():
    gsc, model, old, b, out, old_out = prepared()
    assert (gsc.lambda_sr, gsc.lambda_sc) == (0.3, 0.1)  # Sec. V-A
    t = gsc.make_targets(b, out, old_out, CTX)
    ref = gsc.loss(out, t, old_out, b, CTX)
    logits = out.logits[:, : CTX.num_seen]
    torch.testing.assert_close(ref["sr"], 0.3 * soft_relation_distillation(logits, old_out.logits, b.label))
    torch.testing.assert_close(ref["sc"], 0.1 * prediction_entropy(logits))
    for lambda_sr, lambda_sc in ((0.9, 0.1), (0.3, 0.25), (0.0, 0.0)):
        gsc.lambda_sr, gsc.lambda_sc = lambda_sr, lambda_sc
        got = gsc.loss(out, t, old_out, b, CTX)
        torch.testing.assert_close(got["sr"], ref["sr"] * lambda_sr / 0.3)
        torch.testing.assert_close(got["sc"], ref["sc"] * lambda_sc / 0.1)
        # ... and nothing else moves: the total changes by the two terms' change alone.
        torch.testing.assert_close(got["loss"] - ref["loss"], (got["sr"] - ref["sr"]) + (got["sc"] - ref["sc"]))
        assert all(torch.equal(got[k], ref[k]) for k in ref if k not in ("sr", "sc", "loss"))


@pytest.mark.parametrize("base", ["ft", "mib", "plop"])
def test_psi_weighted_eq6_on_a_hand_made_case(base):
    # Seven pixels over bg | step-0 classes 1, 2 | new classes 3, 4. Step labels: background on four
    # (which the old model calls bg, bg, 1, 2), new classes on two, one ignored.
    label = torch.tensor([[[0, 0, 0, 0, 3, 4, IGNORE]]])
    old_logits = torch.full((1, 3, 1, 7), -5.0)
    for j, c in enumerate([0, 0, 1, 2, 0, 0, 0]):
        old_logits[0, c, 0, j] = 5.0
    # The current model's probability of each pixel's (pseudo-)label, the rest spread evenly.
    target = [0, 0, 1, 2, 3, 4, 0]
    p_y = [0.5, 0.9, 0.2, 0.6, 0.25, 0.4, 0.3]
    p = torch.empty(5, 7)
    for j, (y, q) in enumerate(zip(target, p_y)):
        p[:, j] = (1 - q) / 4
        p[y, j] = q
    logits = p.log().reshape(1, 5, 1, 7)
    head = torch.zeros(1, 2, 1, 7)
    gsc = build_method("gsc", base=base)
    # Every old pixel confident (tau = 1 > u) and no prototype to disagree: PR keeps the old argmax.
    gsc.prototypes, gsc.proto_valid = torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool)
    gsc.thresholds, gsc.stats_step = torch.ones(3), 1
    maps = {"head": head, "stages": [], "distilled": []}  # PLOP's distillation: decoder and logits only
    out = SegOutput(logits, {**maps, "logits_lowres": logits})
    old = SegOutput(old_logits, {**maps, "logits_lowres": old_logits})
    batch = Batch(image=torch.zeros(1, 3, 1, 7), label=label)
    t = gsc.make_targets(batch, out, old, CTX)
    assert t.label[0, 0].tolist() == [0, 0, 1, 2, 3, 4, IGNORE]
    # psi: |dCE/dz_y| = 1 - p_y over its group's mean. Background (0.5, 0.1; mean 0.3) -> 5/3, 1/3;
    # step-0 classes (0.8, 0.4; mean 0.6) -> 4/3, 2/3; new classes -> 1.
    psi = [5 / 3, 1 / 3, 4 / 3, 2 / 3, 1.0, 1.0]
    torch.testing.assert_close(t.extra["psi"][0, 0, :6], torch.tensor(psi))
    eq6 = sum(w * -math.log(q) for w, q in zip(psi, p_y)) / 6  # mean over the 6 labelled pixels
    terms = gsc.loss(out, t, old, batch, CTX)
    assert abs(float(terms["ce"]) - eq6) < 1e-6
    unweighted = sum(-math.log(q) for q in p_y[:6]) / 6
    assert abs(eq6 - unweighted) > 1e-2  # the weights matter on this case


class _LogitsAsImage(nn.Module):
    """An old model whose logits are its input (C_old channels), at full and low resolution."""

    def forward(self, image: torch.Tensor) -> SegOutput:
        head = torch.ones(image.shape[0], 2, *image.shape[-2:])
        return SegOutput(image, {"head": head, "logits_lowres": image})


def _pixels(scores: list[float], classes: list[int]) -> torch.Tensor:
    """(1, 3, 1, P) old logits: pixel j votes for classes[j] with margin scores[j]."""
    x = torch.zeros(1, 3, 1, len(scores))
    for j, (s, c) in enumerate(zip(scores, classes)):
        x[0, c, 0, j] = s
    return x


def test_tau_is_the_median_over_every_pixel_predicted_as_the_class():
    # Class-1 votes: image A three confident ones (one on a new-class pixel), image B two hesitant
    # ones and a very confident one on an ignored pixel; class 0 has one pixel per image; class 2 none.
    img_a = _pixels([4.0, 3.5, 3.0, 3.0], [1, 1, 1, 0])
    lab_a = torch.tensor([[[0, 0, 3, 0]]])
    img_b = _pixels([0.5, 0.6, 5.0, 3.0], [1, 1, 1, 0])
    lab_b = torch.tensor([[[0, 0, IGNORE, 0]]])
    batches = [Batch(image=img_a, label=lab_a), Batch(image=img_b, label=lab_b)]
    gsc = build_method("gsc")
    _, _, tau = gsc.compute_statistics(_LogitsAsImage(), batches, CTX)

    u_a = plop_uncertainty(F.softmax(img_a, 1), CTX.num_seen)[0, 0]  # (4,)
    u_b = plop_uncertainty(F.softmax(img_b, 1), CTX.num_seen)[0, 0]
    counted = torch.cat([u_a[:3], u_b[:2]])  # every class-1 pixel but the ignored one
    want = counted.median()  # 5 values: the middle one, u_a[2] (the new-class pixel's)
    tol = 1 / gsc.median_bins
    assert abs(float(tau[1]) - float(want)) <= tol
    # The alternatives this rules out give other values on this case:
    wrong = {"mean": counted.mean(),
             "per-image medians, averaged": (u_a[:3].median() + u_b[:2].sort().values[0]) / 2,
             "background-labelled pixels only (PLOP's)": torch.cat([u_a[:2], u_b[:2]]).sort().values[1],
             "ignored pixels counted": torch.cat([counted, u_b[2:3]]).sort().values[2]}
    for what, value in wrong.items():
        assert abs(float(value) - float(want)) > 10 * tol, what
    torch.testing.assert_close(tau[0], torch.cat([u_a[3:], u_b[3:]]).max().clamp_min(gsc.entropy_floor),
                               atol=tol, rtol=0)  # two equal values: their median
    assert float(tau[2]) == pytest.approx(gsc.entropy_floor)  # no pixel: PLOP's floor
