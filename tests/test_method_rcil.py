"""RCIL: parallel branches merged after each step, pooled cube distillation, GSC on top."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ciss.engine import Experiment
from ciss.losses import pooled_cube_channel, pooled_cube_spatial
from ciss.methods import build_method
from ciss.models import ParallelConvBN, build_segmenter, fold_parallel_branches, merge_parallel_branches
from ciss.models.parallel import parallel_modules
from ciss.results import load_checkpoint
from ciss.types import StepContext

CTX1 = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)


def _trained_module(groups: int = 1) -> ParallelConvBN:
    """A ParallelConvBN whose two branches and BN statistics all differ."""
    torch.manual_seed(0)
    m = ParallelConvBN(nn.Conv2d(4, 6 if groups == 1 else 4, 3, padding=2, dilation=2, groups=groups,
                                 bias=False), nn.BatchNorm2d(6 if groups == 1 else 4))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for bn in (m.bn, m.bn_new):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("groups", [1, 4])
def test_merged_branch_reproduces_the_two_branch_output(groups):
    m = _trained_module(groups)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        before = m(x)
        new_branch = m.bn_new(m.conv_new(x))
        m.merge_()
        merged_alone = F.batch_norm(m.conv(x), m.bn.running_mean, m.bn.running_var, m.bn.weight,
                                    m.bn.bias, False, 0.0, m.bn.eps)
        after = m(x)
    torch.testing.assert_close(merged_alone, before, atol=1e-5, rtol=1e-5)
    # The twin keeps its weights: the output is now the mean of the old output and the twin.
    torch.testing.assert_close(after, 0.5 * (before + new_branch), atol=1e-5, rtol=1e-5)
    assert bool(m.merged)
    assert not any(p.requires_grad for p in (*m.conv.parameters(), *m.bn.parameters()))
    assert all(p.requires_grad for p in (*m.conv_new.parameters(), *m.bn_new.parameters()))


def test_merged_branch_is_frozen_in_train_mode():
    m = _trained_module()
    m.merge_()
    m.train()
    stats = (m.bn.running_mean.clone(), m.bn.running_var.clone())
    m(torch.randn(4, 4, 8, 8) * 5 + 3)
    assert torch.equal(m.bn.running_mean, stats[0]) and torch.equal(m.bn.running_var, stats[1])
    assert not torch.equal(m.bn_new.running_mean, _trained_module().bn_new.running_mean)


def test_drop_path_takes_one_branch_or_the_mean_per_channel():
    m = _trained_module()
    m.train()
    m.bn.eval(), m.bn_new.eval()  # fixed statistics, so that the branches are deterministic
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        a, b = m.bn(m.conv(x)), m.bn_new(m.conv_new(x))
        seen = set()
        for _ in range(30):
            y = m(x)
            for c in range(y.shape[1]):
                choice = [torch.allclose(y[:, c], t[:, c], atol=1e-6)
                          for t in (a, b, 0.5 * (a + b))]
                assert any(choice), "a channel is neither branch nor their mean"
                seen.add(choice.index(True))
    assert seen == {0, 1, 2}
    m.drop_path = False
    torch.testing.assert_close(m(x), 0.5 * (a + b))


@pytest.mark.parametrize("backbone", ["tiny", "efficientnet_lite0"])
def test_folded_model_equals_the_two_branch_model_and_keeps_its_size(backbone):
    torch.manual_seed(0)
    model = build_segmenter(backbone, classes_per_step=(3, 2), parallel_branches=True)
    plain = build_segmenter(backbone, classes_per_step=(3, 2))
    n_branch_points = len(parallel_modules(model))
    assert n_branch_points == len(model.backbone.branch_points()) + 4  # + the four ASPP convs
    model.train()
    model(torch.randn(4, 3, 64, 64))  # move the BN statistics of both branches
    for m in parallel_modules(model):
        with torch.no_grad():
            m.conv_new.weight.add_(0.1 * torch.randn_like(m.conv_new.weight))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x).logits
        folded = fold_parallel_branches(copy.deepcopy(model))
        got = folded(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not parallel_modules(folded)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(folded) <= n(plain) < n(model)


def test_checkpoint_of_a_merged_model_loads_strictly_into_a_rebuilt_one():
    model = build_segmenter("tiny", classes_per_step=(3,), parallel_branches=True)
    merge_parallel_branches(model)
    config = model.config()
    assert config["parallel_branches"] is True
    assert "parallel_branches" not in build_segmenter("tiny", classes_per_step=(3,)).config()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = build_segmenter(**config)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert all(bool(m.merged) for m in parallel_modules(fresh))
    x = torch.randn(1, 3, 32, 32)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_backbone_without_branch_points_is_refused():
    from ciss.models.parallel import add_parallel_branches

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    with pytest.raises(TypeError, match="branch_points"):
        add_parallel_branches(Plain())


def _channel_reference(old, new, window):
    def pool(x):
        x = x.pow(2)
        c = x.shape[1]
        padded = torch.cat([x.new_zeros(x.shape[0], window // 2, *x.shape[2:]), x,
                            x.new_zeros(x.shape[0], window // 2, *x.shape[2:])], dim=1)
        return torch.stack([padded[:, i:i + window].sum(1) / window for i in range(c)], dim=1)

    return torch.stack([torch.sqrt(((pool(old) - pool(new))[i] ** 2).sum()) for i in range(old.shape[0])]).mean()


def _spatial_reference(old, new, windows):
    total = 0.0
    for k in windows:
        pa = F.avg_pool2d(F.pad(old.pow(2), [k // 2] * 4), k, stride=1)
        pb = F.avg_pool2d(F.pad(new.pow(2), [k // 2] * 4), k, stride=1)
        total += torch.stack([torch.linalg.norm((pa - pb)[i].flatten()) for i in range(old.shape[0])]).mean()
    return total / len(windows)


def test_pooled_cube_distillation_matches_a_hand_computation_and_is_zero_for_equal_maps():
    torch.manual_seed(0)
    old, new = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    windows = (4, 8, 12, 16, 20, 24)  # windows larger than the map are fine
    torch.testing.assert_close(pooled_cube_spatial(old, new, windows), _spatial_reference(old, new, windows))
    torch.testing.assert_close(pooled_cube_channel(old, new, 3), _channel_reference(old, new, 3))
    assert pooled_cube_spatial(old, old.clone()).item() == 0.0
    assert pooled_cube_channel(old, old.clone()).item() == 0.0
    # Squared activations: a sign flip is invisible.
    assert pooled_cube_spatial(old, -old).item() == 0.0 and pooled_cube_channel(old, -old).item() == 0.0


def test_rcil_loss_terms_and_defaults():
    m = build_method("rcil")
    assert (m.loss_kd, m.pckd_factor, m.pckd_logits_factor, m.channel_window) == (100.0, 0.01, 0.0005, 3)
    assert m.spatial_windows == (4, 8, 12, 16, 20, 24)
    assert m.architecture() == {"parallel_branches": True} and m.base_step_key() != "ce"
    torch.manual_seed(0)
    old = build_segmenter("tiny", classes_per_step=(3,), parallel_branches=True).eval()
    model = copy.deepcopy(old)
    model.add_step(2)
    m.init_new_classifiers(model, old, CTX1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    with torch.no_grad():
        old_out = old(x)
    # In a freshly built model each twin equals its original, so merging changes no output and the
    # features of the two models coincide.
    for o, n in zip([*old_out.features["distilled"], old_out.features["head"]],
                    [*out.features["distilled"], out.features["head"]]):
        assert pooled_cube_spatial(o, n).item() == pytest.approx(0.0, abs=1e-5)
    spatial, channel = m.pckd_loss(out, old_out, CTX1)
    assert channel.item() == pytest.approx(0.0, abs=1e-5)
    # The spatial term also distils the logits, where the new classes (summed into background, raw
    # logits as the official code does) make a difference after MiB's initialisation.
    assert spatial.item() > 0
    with torch.no_grad():
        for p in parallel_modules(model):
            p.conv_new.weight.add_(0.2 * torch.randn_like(p.conv_new.weight))
    out = model(x)
    from ciss.types import Targets

    label = torch.randint(0, 5, (2, 32, 32))
    terms = m.loss(out, Targets(label=label), old_out, None, CTX1)
    assert {"loss", "unce", "unkd", "pckd_spatial", "pckd_channel"} <= set(terms)
    assert terms["pckd_spatial"].item() > 0 and terms["pckd_channel"].item() > 0
    total = terms["unce"] + terms["unkd"] + terms["pckd_spatial"] + terms["pckd_channel"]
    torch.testing.assert_close(terms["loss"], total)


def test_rcil_on_a_plain_model_says_what_is_missing():
    m = build_method("rcil")
    old = build_segmenter("tiny", classes_per_step=(3,)).eval()
    model = copy.deepcopy(old)
    model.add_step(2)
    with pytest.raises(TypeError, match="parallel_branches"):
        m.init_new_classifiers(model, old, CTX1)


@pytest.mark.parametrize("name", ["rcil", "gsc_rcil"])
def test_step_keeps_the_merged_old_representation_frozen(name, tiny_cfg):
    """After step 1 the merged branches hold exactly the step-0 model's eval-mode conv-BN, untouched
    by training, while the twins have moved."""
    cfg = tiny_cfg(f"method={name}")
    exp = Experiment(cfg)
    res = exp.run_all()
    step0 = exp.build_model(tuple(exp.train_scenario.classes_per_step[:1]))
    exp.load_into(step0, load_checkpoint(res.run_dir / "ckpt" / "step-0.pt"), with_method=False)
    step1 = exp.build_model(tuple(exp.train_scenario.classes_per_step[:1]))
    exp.load_into(step1, load_checkpoint(res.run_dir / "ckpt" / "step-1.pt"), with_method=False)
    expected = copy.deepcopy(step0)
    merge_parallel_branches(expected)
    for want, got, before in zip(parallel_modules(expected), parallel_modules(step1), parallel_modules(step0)):
        assert bool(got.merged) and not bool(before.merged)
        assert torch.equal(got.conv.weight, want.conv.weight)
        assert torch.equal(got.bn.bias, want.bn.bias)
        assert torch.equal(got.bn.running_var, want.bn.running_var)
    assert any(not torch.equal(g.conv_new.weight, b.conv_new.weight)
               for g, b in zip(parallel_modules(step1), parallel_modules(step0)))


def test_continuing_a_plain_model_file_with_rcil_is_refused(tiny_cfg, tmp_path):
    """A model file without parallel branches cannot start an RCIL run (and the reverse)."""
    from ciss.engine import train
    from ciss.modelfile import ModelFile

    res = train(tiny_cfg("method=ft", "data.task=4-1", "name=plain"))  # 3 steps: 4, 1, 1 classes
    model_file = ModelFile.from_run(res.run_dir, step=0).save(tmp_path / "plain.ciss")
    exp = Experiment(tiny_cfg("method=rcil", "data.task=4-1", f"init_from={model_file}", "name=cont"))
    with pytest.raises(ValueError, match="parallel branches"):
        exp.run_all()
