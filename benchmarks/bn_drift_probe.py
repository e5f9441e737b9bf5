"""How much of a step's forgetting is BN statistics: a run's step-t checkpoint evaluated on its test
split as trained, then with the running mean and variance of the step-0 checkpoint put back into the
BN layers of the frozen early stages (model.frozen_stride: their weights never change, their
statistics follow every step's images), then into every BN layer (the weights stay step t's).

    python benchmarks/bn_drift_probe.py runs/ccp21_curves/<run> [--step 5]
"""
import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from ciss.config import from_dict
from ciss.engine import Experiment
from ciss.results import RunDir


def bn_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def with_statistics(model: nn.Module, source: nn.Module, only: list[nn.Module] | None) -> nn.Module:
    """`model` with the running statistics of `source`'s BN layers (those under `only`, if given)."""
    inside = None if only is None else {id(m) for o in only for m in o.modules()}
    keep = {n for n, m in bn_layers(model).items() if inside is None or id(m) in inside}
    if not keep:
        raise SystemExit("no BN layer to take the statistics of")
    model = copy.deepcopy(model)
    theirs = bn_layers(source)
    for name, m in bn_layers(model).items():
        if name in keep:
            m.running_mean.copy_(theirs[name].running_mean)
            m.running_var.copy_(theirs[name].running_var)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--step", type=int, help="default: the last checkpointed step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = RunDir(Path(args.run).expanduser(), create=False)
    steps = run.checkpointed_steps()
    step = steps[-1] if args.step is None else args.step
    if 0 not in steps or step not in steps:
        raise SystemExit(f"{run.path}: needs the checkpoints of steps 0 and {step}; has {steps}")
    cfg = from_dict(run.read_config())
    cfg.progress, cfg.tensorboard = None, False
    exp = Experiment(cfg, run.path)
    models = {}
    for t in (0, step):
        state = run.step_state(t)
        models[t] = exp.build_model(tuple(state["model_config"]["classes_per_step"][:1]))
        exp.load_into(models[t], state, with_method=False)
    frozen = models[step].backbone.early_modules(cfg.model.frozen_stride) if cfg.model.frozen_stride else []
    variants = {"as trained": models[step]}
    if frozen:
        variants[f"step-0 statistics in the frozen stages (stride <= {cfg.model.frozen_stride})"] = \
            with_statistics(models[step], models[0], frozen)
    variants["step-0 statistics in every BN layer"] = with_statistics(models[step], models[0], None)
    print(f"{run.path.name}, step {step} on {cfg.data.test_split}: mIoU % old | new | all")
    print("| model | old | new | all |\n|---|---:|---:|---:|")
    for what, model in variants.items():
        r = exp.evaluator.evaluate_full(model.eval(), step).raw
        print(f"| {what} | {100 * r.miou_old:.2f} | {100 * r.miou_new:.2f} | {100 * r.miou_all:.2f} |")


if __name__ == "__main__":
    main()
