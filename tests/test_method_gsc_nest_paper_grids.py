"""The paper grids give GSC, NeST and SSUL their papers' per-dataset settings, and only them."""

from pathlib import Path

import pytest

from ciss.bench import expand, overrides, read_grid
from ciss.config import load_config
from ciss.methods import build_method

GRIDS = Path(__file__).resolve().parents[1] / "benchmarks" / "grids"


def configs(name: str) -> list:
    grid = read_grid(GRIDS / name)
    return [load_config(None, overrides(grid, p), recipe=grid.get("recipe")) for p in expand(grid)]


@pytest.mark.parametrize("grid,lam,logits_factor", [("ade_paper.yaml", 0.001, 0.00001),
                                                    ("cityscapes_paper.yaml", 0.0001, 0.0001)])
def test_gsc_runs_at_its_papers_settings(grid, lam, logits_factor):
    cfgs = configs(grid)
    gsc = [c for c in cfgs if c.method == "gsc"]
    assert gsc, f"{grid} has no GSC run"
    step0 = {(c.optim.epochs, c.optim.lr) for c in cfgs if not c.method.startswith("ssul")}  # SSUL's own
    for c in gsc:
        # GSC Sec. V-A: 60 epochs and lr 4e-3 after the first step, whose training is the grid's shared one.
        assert (c.optim.epochs_next, c.optim.lr_next) == (60, 0.004)
        assert {(c.optim.epochs, c.optim.lr)} <= step0 and len(step0) == 1
        method = build_method(c.method, **c.method_args)
        assert method.base.name == "plop"
        assert (method.base.pod_factor, method.base.pod_logits_factor) == (lam, logits_factor)
        assert isinstance(method.base.pod_logits_factor, float)
    for c in cfgs:
        if c.method not in ("gsc", "nest_mib", "ssul", "ssul_m"):
            assert c.optim.epochs_next is None and c.method_args == {}, c.method


def test_nest_pretunes_as_its_official_ade_script():
    nest = [c for c in configs("ade_paper.yaml") if c.method == "nest_mib"]
    assert nest
    for c in nest:
        method = build_method(c.method, **c.method_args)
        assert (method.pretune_epochs, method.pretune_lr_scale) == (15, 500)
        assert c.optim.lr_next * method.pretune_lr_scale == pytest.approx(0.5)  # --lr 0.001 x 500


def test_on_voc_gsc_and_nest_run_at_their_defaults():
    for c in configs("voc_paper.yaml"):
        if c.method in ("gsc", "nest_mib", "nest_plop"):
            assert c.method_args == {} and c.optim.epochs_next is None
            assert (c.optim.epochs, c.optim.lr_next) == (30, 0.001)


@pytest.mark.parametrize("grid,epochs,batch", [("voc_paper.yaml", 50, 32), ("ade_paper.yaml", 60, 24)])
def test_ssul_trains_every_step_as_its_paper(grid, epochs, batch):
    # SSUL Sec. 4.1: 50 epochs at batch 32 per step on VOC, 60 at batch 24 on ADE20K (its step 0 is
    # its own, so it changes no shared step).
    ssul = [c for c in configs(grid) if c.method.startswith("ssul")]
    assert ssul
    for c in ssul:
        assert (c.optim.epochs, c.optim.epochs_next, c.optim.batch_size) == (epochs, epochs, batch)

