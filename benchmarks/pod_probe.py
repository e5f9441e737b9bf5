"""PLOP's Local POD per distilled map, at the start of a step and after it: the step-t model (right
after its initialisation, or with `--trained` the step's checkpoint) against the step t-1 model, on
one training batch of the step (the run's batch size, fixed crops), each map's term as it enters the
loss (its factor and the sqrt(seen / new) schedule applied). Three pairings:
  train/running  the new model in train mode, the old one in eval mode: what PLOP trains on;
  train/batch    both with the batch's BN statistics (method_args.pod_old_bn=batch);
  eval/running   both with running statistics: the distance of the weights alone.

    python benchmarks/pod_probe.py runs/ccp21_curves/<plop run> [--step 1] [--trained]
"""
import argparse
import copy
from pathlib import Path

import torch
import yaml
from torch import nn

from ciss.methods.plop import batch_statistics_copy, step_factor
from ciss.results import load_checkpoint
from pckd_probe import start_of_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--trained", action="store_true", help="the step's checkpoint, not its start")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run).expanduser()
    batch_size = yaml.safe_load((run / "config.yaml").read_text())["optim"]["batch_size"]
    exp, old, model, ctx, batch = start_of_step(run, args.step, n=batch_size)
    plop = getattr(exp.method, "base", exp.method)  # GSC and NeST+PLOP hold PLOP as their base
    if not hasattr(plop, "pod_terms"):
        raise SystemExit(f"{run}: method {exp.method.name} distils no POD")
    if args.trained:
        exp.load_into(model, load_checkpoint(run / "ckpt" / f"step-{args.step}.pt"), with_method=False)
    schedule = step_factor(ctx) if plop.pod_schedule else 1.0
    names = [f"stage {i}" for i in range(len(old.backbone.distill_stages))] + ["decoder"]
    names += ["logits"] if plop.pod_logits else []
    with torch.no_grad():
        rows = {}
        for new_mode, old_bn in (("train", "running"), ("train", "batch"), ("eval", "running")):
            new = copy.deepcopy(model).train(new_mode == "train")  # train mode moves running statistics
            for m in new.modules():  # dropout's masks are noise of their own, not the statistics'
                if isinstance(m, nn.Dropout):
                    m.eval()
            o = batch_statistics_copy(old)(batch.image) if old_bn == "batch" else old(batch.image)
            rows[f"{new_mode}/{old_bn}"] = [schedule * float(t) for t in plop.pod_terms(new(batch.image), o, ctx)]
    print(f"{run.name}, step {args.step} {'trained' if args.trained else 'at its start'}, batch of "
          f"{batch.image.shape[0]}: each map's term of the POD loss (the loss is their mean)")
    print("| pairing | " + " | ".join(names) + " | POD loss |")
    print("|---|" + "---:|" * (len(names) + 1))
    for k, v in rows.items():
        print(f"| {k} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {sum(v) / len(v):.2f} |")


if __name__ == "__main__":
    main()
