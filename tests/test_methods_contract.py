"""Contract test over the whole method registry (tiny synthetic data, CPU)."""

import math

import pytest
import torch

from ciss.engine import Experiment
from ciss.methods import build_method, list_methods
from ciss.types import IGNORE


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, tiny_cfg):
    method = build_method(name)  # builds from its defaults
    assert method.name == name
    cfg = tiny_cfg(f"method={name}")
    exp = Experiment(cfg)
    res = exp.run_all()
    assert len(res.steps) == exp.train_scenario.num_steps
    for s in res.steps:
        assert not math.isnan(s.miou_all)

    # One more batch by hand at the last step: finite loss, gradient on the new classifier,
    # targets in range.
    model = exp.build_model(tuple(exp.train_scenario.classes_per_step[:1]))
    from ciss.results import load_checkpoint
    last = exp.train_scenario.num_steps - 1
    exp.load_into(model, load_checkpoint(res.run_dir / "ckpt" / f"step-{last}.pt"))
    from ciss.data.transforms import TrainTransform
    from ciss.engine import collate
    data = exp.train_scenario.train_dataset(last, TrainTransform(cfg.data.crop_size))
    batch = collate([data[i] for i in range(min(4, len(data)))])
    ctx = exp.context(last, 1, 1)
    old = None
    if last > 0 and exp.method.needs_old_model:
        old = exp.build_model(tuple(exp.train_scenario.classes_per_step[:1]))
        exp.load_into(old, load_checkpoint(res.run_dir / "ckpt" / f"step-{last - 1}.pt"),
                      with_method=False)
        old.eval()
    exp.method.train_mode(model, ctx, exp.method.phases(ctx)[-1])
    out = model(batch.image)
    with torch.no_grad():
        old_out = old(batch.image) if old is not None else None
    targets = exp.method.make_targets(batch, out, old_out, ctx)
    lab = targets.label
    assert lab.shape == batch.label.shape
    valid = lab[lab != IGNORE]
    assert valid.min() >= 0 and valid.max() < out.logits.shape[1]
    terms = exp.method.loss(out, targets, old_out, batch, ctx)
    assert "loss" in terms and all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    grad = model.classifier.convs[-1].weight.grad if hasattr(model.classifier, "convs") else None
    if grad is None:
        grads = [p.grad for p in model.classifier.parameters() if p.grad is not None]
        assert grads, "no gradient reached the classifier"
        grad = grads[-1]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_wrapper_delegates_every_hook():
    """A wrapper (GSC, NeST) must not silently fall back to fine-tuning for a hook it does not write."""
    import inspect

    from ciss.methods.base import Method, Wrapper

    hooks = {n for n, v in vars(Method).items() if not n.startswith("_") and (callable(v) or isinstance(v, bool))}
    missing = {n for n in hooks if n not in vars(Wrapper)} - {"name"}
    assert not missing, f"Wrapper does not delegate: {sorted(missing)}"
    from ciss.methods.gsc import GSC
    from ciss.methods.ssul import SSUL

    wrapped = GSC(base=SSUL())
    assert wrapped.num_extra_outputs() == 1 and wrapped.base_step_key() == SSUL().base_step_key()
    assert inspect.signature(Wrapper.train_data).parameters.keys() == \
        inspect.signature(Method.train_data).parameters.keys()


@pytest.mark.parametrize("name", list_methods())
def test_every_method_runs_with_the_skip_fusion(name, tiny_cfg):
    """The methods that read features["head"] (prototypes, distillation, NeST's generation) take it at
    the fusion's finer resolution too."""
    exp = Experiment(tiny_cfg(f"method={name}", "model.skip_stride=4", "optim.epochs=1"))
    res = exp.run_all()
    assert len(res.steps) == exp.train_scenario.num_steps
    assert all(math.isfinite(s.miou_all) for s in res.steps)
