"""NeST's ablation switches (the paper's Sec. 4.3): each must change what is generated."""

import io

import pytest
import torch
import torch.nn.functional as F

from ciss.methods import build_method
from ciss.methods.nest import class_similarity
from test_method_nest import CTX, old_rows, pretune_step, started, tiny_setup


def test_generation_from_the_background_classifier_only():
    # Uniform matrices over the background alone: every new row is the background row (MiB's init
    # weight); over every old classifier they are the mean old row.
    plain = {"init": "uniform", "align": False, "transform_background": False}
    nest, old, model, batches = started(sources="background", **plain)
    t = nest.transform
    assert t.importance.shape == (2, 1, 16) and t.projection.shape == (2, 1) and t.num_sources == 1
    with torch.no_grad():
        w = t.new_weight(old_rows(model))
    torch.testing.assert_close(w, old_rows(model)[0].expand(2, -1))
    assert not torch.allclose(w, old_rows(model).mean(0).expand(2, -1))

    # Similarity init: the background's column of the similarity, projected with weight 1.
    nest, old, model, batches = started(sources="background")
    imp, _ = class_similarity(old, batches, CTX)
    torch.testing.assert_close(nest.transform.importance.detach(), imp[:, :1])
    torch.testing.assert_close(nest.transform.projection.detach(), torch.ones(2, 1))

    # The pre-tuning's new logits read the background row only, and the matrices survive a checkpoint.
    phase = nest.phases(CTX)[0]
    nest.on_phase_start(phase, model, old, batches, CTX)
    m = {k: v.detach().clone() for k, v in nest.transform.named_parameters()}
    out, _ = pretune_step(nest, old, model, batches[0], phase)
    with torch.no_grad():
        want = (m["projection"][:, :, None] * m["importance"] * old_rows(model)[:1]).sum(1)  # (N, D)
        torch.testing.assert_close(out.features["logits_lowres"][:, 3:5],
                                   F.conv2d(out.features["head"], want[:, :, None, None], m["bias"]),
                                   atol=1e-5, rtol=1e-4)
    buf = io.BytesIO()
    torch.save(nest.state_dict(), buf)
    buf.seek(0)
    resumed = build_method("nest", sources="background")
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(resumed.transform.new_weight(old_rows(model)),
                               nest.transform.new_weight(old_rows(model)))
    nest.on_phase_end(phase, model, old, batches, CTX)
    with pytest.raises(ValueError, match="sources"):
        build_method("nest", sources="old")


def test_uniform_channels_keep_the_similarity_projection():
    old, model, batches = tiny_setup()
    imp, _ = class_similarity(old, batches, CTX)
    proj = imp.sum(-1).softmax(-1)  # (N, C_old): the similarity's projection
    assert not torch.allclose(proj, torch.full_like(proj, 1 / 3))  # the case tells the inits apart

    nest, old, model, batches = started(uniform_channels=True)
    t = nest.transform
    assert torch.equal(t.importance.detach(), torch.ones(2, 3, 16))
    torch.testing.assert_close(t.projection.detach(), proj)
    with torch.no_grad():
        w = t.new_weight(old_rows(model))
    torch.testing.assert_close(w, proj @ old_rows(model))  # similarity-weighted sum of the old rows
    # ... which is neither the paper's full init nor init="uniform" (both matrices uniform).
    full, *_ = started()
    uniform, *_ = started(init="uniform")
    with torch.no_grad():
        assert not torch.allclose(w, full.transform.new_weight(old_rows(model)))
        assert not torch.allclose(w, uniform.transform.new_weight(old_rows(model)))
    torch.testing.assert_close(uniform.transform.importance.detach(), torch.ones(2, 3, 16))
    torch.testing.assert_close(uniform.transform.projection.detach(), torch.full((2, 3), 1 / 3))


def test_defaults_are_the_papers_full_method():
    nest = build_method("nest")
    assert (nest.init, nest.sources, nest.uniform_channels) == ("similarity", "all", False)
    nest, old, model, batches = started()
    imp, _ = class_similarity(old, batches, CTX)
    torch.testing.assert_close(nest.transform.importance.detach(), imp)
