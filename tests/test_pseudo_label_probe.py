"""benchmarks/pseudo_label_probe.py counts exactly the targets PLOP's own make_targets gives."""

import numpy as np
import pytest
import torch

from ciss.engine import Experiment
from ciss.engine.data import eval_transform, ordered_loader
from ciss.losses import plop_uncertainty
from ciss.results import load_checkpoint
from ciss.scenario.step_dataset import StepDataset
from ciss.types import BACKGROUND, IGNORE
from conftest import load_benchmark, tiny_config



@pytest.fixture(scope="module")
def probe():
    return load_benchmark("pseudo_label_probe")


def median_uncertainty(exp, run) -> float:
    scn = exp.train_scenario
    old = exp.build_model(tuple(scn.classes_per_step[:1]))
    exp.load_into(old, load_checkpoint(run / "ckpt" / "step-0.pt"), with_method=False)
    old.eval()
    data = StepDataset(scn.train_data, scn.train_indices(1), scn.train_lut(1), eval_transform(exp.cfg))
    with torch.no_grad():
        u = [plop_uncertainty(torch.softmax(old(b.image).logits, 1), sum(scn.classes_per_step[:2]))
             for b in ordered_loader(data, exp.cfg)]
    return float(torch.cat([x.flatten() for x in u]).median())


def test_probe_counts_plops_targets_against_the_full_ground_truth(tmp_path, probe):
    cfg = tiny_config(tmp_path, "method=plop", "optim.epochs=2")
    exp = Experiment(cfg)
    exp.run_all()
    run = exp.run.path
    # A tiny model after 2 epochs is unsure everywhere: thresholds at the median uncertainty of its
    # background pixels, written into the step's checkpoint, give both accepted and ignored pixels.
    ckpt_path = run / "ckpt" / "step-1.pt"
    ckpt = load_checkpoint(ckpt_path)
    ckpt["method"]["thresholds"] = torch.full_like(ckpt["method"]["thresholds"], median_uncertainty(exp, run))
    torch.save(ckpt, ckpt_path)
    pc, ac, names = probe.probe_step(exp, run, 1)
    scn = exp.train_scenario
    num_old = scn.classes_per_step[0]
    assert pc.shape == (num_old, num_old + 1) and ac.shape == (num_old, num_old) and len(names) == num_old

    # the same counts from the method itself: its targets on the step's background pixels
    old = exp.build_model(tuple(scn.classes_per_step[:1]))
    exp.load_into(old, load_checkpoint(run / "ckpt" / "step-0.pt"), with_method=False)
    old.eval()
    exp.method.load_state_dict(load_checkpoint(run / "ckpt" / "step-1.pt")["method"])
    ctx = exp.context(1, 1, 1)
    step_data = StepDataset(scn.train_data, scn.train_indices(1), scn.train_lut(1), eval_transform(cfg))
    true_data = StepDataset(scn.train_data, scn.train_indices(1), scn.test_lut(scn.num_steps - 1),
                            eval_transform(cfg))
    want = np.zeros_like(pc)
    with torch.no_grad():
        for b, t in zip(ordered_loader(step_data, cfg), ordered_loader(true_data, cfg)):
            o = old(b.image)
            target = exp.method.make_targets(b, o, o, ctx).label
            keep = (b.label == BACKGROUND) & (t.label != IGNORE) & (t.label < num_old)
            got = torch.where(target == IGNORE, torch.full_like(target, num_old), target)[keep]
            np.add.at(want, (t.label[keep].numpy(), got.numpy()), 1)
    np.testing.assert_array_equal(pc, want)
    assert pc.sum() == ac.sum() > 0
    assert (pc[:, :num_old].sum() > 0) and (pc[:, num_old].sum() > 0)  # accepted and ignored pixels both


def test_probe_refuses_a_step_without_checkpoints(tmp_path, probe):
    cfg = tiny_config(tmp_path, "method=plop")
    exp = Experiment(cfg)
    with pytest.raises(SystemExit, match="checkpoints of steps 0 and 1"):
        probe.probe_step(exp, exp.run.path, 1)
