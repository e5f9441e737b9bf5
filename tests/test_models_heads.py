"""The DeepLabV3 head and the incremental classifier."""

from __future__ import annotations

import pytest
import torch

from ciss.models import ASPPHead, IncrementalClassifier


def test_aspp_shapes_and_default_rates():
    head = ASPPHead(64, channels=32)
    assert head.rates == (6, 12, 18)
    assert ASPPHead(64, channels=32, output_stride=8).rates == (12, 24, 36)
    assert ASPPHead(64, channels=32, rates=(1, 2, 3)).rates == (1, 2, 3)
    assert head(torch.randn(2, 64, 5, 7)).shape == (2, 32, 5, 7)


def test_aspp_trains_with_batch_size_one():
    # BN on the 1x1 pooled map would raise here; the pooling branch has none.
    head = ASPPHead(16, channels=8).train()
    out = head(torch.randn(1, 16, 4, 4))
    out.sum().backward()
    assert head.pooling.conv.weight.grad is not None


def test_aspp_unknown_output_stride_needs_rates():
    with pytest.raises(ValueError, match="pass rates="):
        ASPPHead(16, output_stride=4)


def test_classifier_grows_and_keeps_old_weights_bit_identical():
    clf = IncrementalClassifier(8, [3])
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    x = torch.randn(2, 8, 4, 4)
    old_logits = clf(x)
    clf.add_step(2)
    clf.add_step(1)
    assert clf.classes_per_step == (3, 2, 1) and clf.num_classes == 6 and clf.num_outputs == 6
    for key, value in before.items():
        assert torch.equal(clf.state_dict()[key], value), key
    logits = clf(x)
    assert logits.shape == (2, 6, 4, 4)
    assert torch.equal(logits[:, :3], old_logits)


def test_classifier_extra_outputs_sit_after_all_classes_and_persist():
    clf = IncrementalClassifier(8, [4], num_extra=1)
    assert clf.num_classes == 4 and clf.num_extra == 1 and clf.num_outputs == 5
    x = torch.randn(1, 8, 2, 2)
    unknown = clf(x)[:, 4:]
    clf.add_step(2)
    logits = clf(x)
    assert logits.shape[1] == 7
    assert torch.equal(logits[:, clf.num_classes :], unknown)  # same conv, still at the end
    assert torch.equal(logits[:, :4], clf.convs[0](x))


def test_classifier_rejects_bad_sizes():
    with pytest.raises(ValueError):
        IncrementalClassifier(8, [])
    with pytest.raises(ValueError):
        IncrementalClassifier(8, [2, 0])
    with pytest.raises(ValueError):
        IncrementalClassifier(8, [2]).add_step(0)
