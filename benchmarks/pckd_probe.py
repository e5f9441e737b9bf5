"""Distillation distances at the start of a step: the step-t model right after its initialisation
(RCIL: branches merged) against the step t-1 model, per distilled map, on 8 of the step's training
crops, with the new model in train mode and in eval mode. Spatial and channel pooled cube distances
(RCIL) and the norm of the old model's squared activations.

    python benchmarks/pckd_probe.py ~/ciss-runs/ccp21/ccp21-15-1-overlapped-rcil [--step 1]
"""
import argparse
import copy
import random
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from ciss.config import from_dict
from ciss.data.transforms import Resized, TrainTransform
from ciss.engine import Experiment, collate
from ciss.losses import pooled_cube_channel, pooled_cube_spatial
from ciss.results import load_checkpoint


def start_of_step(run: Path, step: int, n: int = 8):
    """The run's step-(t-1) model (eval mode), the step-t model right after its initialisation, the
    step's context and a batch of `n` of its training crops (fixed seeds)."""
    if not (run / "ckpt" / f"step-{step - 1}.pt").is_file():
        sys.exit(f"{run}: no checkpoint of step {step - 1}")
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    cfg.progress = None
    exp = Experiment(cfg, run)
    scn = exp.train_scenario
    old = exp.build_model(tuple(scn.classes_per_step[:step]))
    exp.load_into(old, load_checkpoint(run / "ckpt" / f"step-{step - 1}.pt"), with_method=False)
    old.eval()
    model = copy.deepcopy(old)
    model.add_step(scn.classes_per_step[step])
    ctx = exp.context(step, 4, 12)
    exp.method.init_new_classifiers(model, old, ctx)
    exp.method.on_step_start(model, old, [], ctx)
    data = scn.train_dataset(step, Resized(TrainTransform(cfg.data.crop_size), cfg.data.resize))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)  # the crops are random: fix them
    return exp, old, model, ctx, collate([data[i] for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--step", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, old, model, _, batch = start_of_step(Path(args.run).expanduser(), args.step)
    with torch.no_grad():
        o = old(batch.image)
        for mode in ("train", "eval"):
            model.train() if mode == "train" else model.eval()
            n = model(batch.image)
            maps_n = [*n.features["stages"], n.features["head"]]
            maps_o = [*o.features["stages"], o.features["head"]]
            sp = [round(float(pooled_cube_spatial(a, b)), 1) for a, b in zip(maps_o, maps_n)]
            ch = [round(float(pooled_cube_channel(a, b)), 1) for a, b in zip(maps_o, maps_n)]
            size = [round(float(torch.linalg.vector_norm(a.pow(2).flatten(1), dim=-1).mean()), 0) for a in maps_o]
            print(mode, "spatial per map", sp, "channel per map", ch)
            print("  ||old^2|| per map", size, "shapes", [tuple(a.shape[1:]) for a in maps_o])


if __name__ == "__main__":
    main()
