"""What PLOP's pseudo-labels teach at a step: the step t-1 model's entropy-filtered argmax on the
background pixels of step t's training images (the targets PLOP's CE trains on), read against the
images' full ground truth, which no method sees: per true old class, the share of its
background-labelled pixels pseudo-labelled as itself, as another old class (the largest named), as
background, or ignored (too uncertain); for a method other than PLOP and NeST+PLOP, only the
argmax columns mean something. The old model's plain argmax on the same pixels is what
MiB's distillation and unbiased CE follow instead, as a distribution rather than a hard label.
Whole images at evaluation size (training crops hold the same pixels at other scales); the
thresholds are the ones the run's step t trained with, from its checkpoint.

    python benchmarks/pseudo_label_probe.py runs/ccp21_v2/ccp21-15-1-overlapped-plop [--steps 1 3 5]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ciss.config import from_dict
from ciss.engine import Experiment
from ciss.engine.data import eval_transform, ordered_loader
from ciss.losses import plop_uncertainty
from ciss.metrics import predicted_labels
from ciss.results import load_checkpoint
from ciss.scenario.step_dataset import StepDataset
from ciss.types import BACKGROUND, IGNORE


def probe_step(exp: Experiment, run: Path, step: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(C_old, C_old + 1) counts of true old class x pseudo-label (the last column: ignored) and
    (C_old, C_old) true class x plain argmax, over step `step`'s background-labelled pixels."""
    scn, cfg = exp.train_scenario, exp.cfg
    ckpt = run / "ckpt" / f"step-{step}.pt"
    if not ckpt.is_file() or not (run / "ckpt" / f"step-{step - 1}.pt").is_file():
        sys.exit(f"{run}: needs the checkpoints of steps {step - 1} and {step}")
    old = exp.build_model(tuple(scn.classes_per_step[:step]))
    exp.load_into(old, load_checkpoint(run / "ckpt" / f"step-{step - 1}.pt"), with_method=False)
    old.eval()
    num_old = sum(scn.classes_per_step[:step])
    num_seen = sum(scn.classes_per_step[: step + 1])
    thresholds = torch.full((num_old,), -1.0)  # other methods: no pseudo-label, all "ignored"
    if exp.method.name in ("plop", "nest_plop"):  # GSC replaces PLOP's targets with its own
        state = load_checkpoint(ckpt).get("method", {})
        state = state.get("base", state)  # NeST+PLOP holds PLOP's state under its base
        thresholds = torch.as_tensor(state["thresholds"], dtype=torch.float32)
    full_lut = scn.test_lut(scn.num_steps - 1)  # every class kept: the full ground truth
    step_data = StepDataset(scn.train_data, scn.train_indices(step), scn.train_lut(step), eval_transform(cfg))
    true_data = StepDataset(scn.train_data, scn.train_indices(step), full_lut, eval_transform(cfg))
    pseudo_counts = np.zeros((num_old, num_old + 1), dtype=np.int64)
    argmax_counts = np.zeros((num_old, num_old), dtype=np.int64)
    with torch.inference_mode():
        for b, t in zip(ordered_loader(step_data, cfg), ordered_loader(true_data, cfg)):
            assert torch.equal(b.index, t.index)
            probs = F.softmax(old(b.image).logits[:, :num_old].float(), dim=1)
            pred = predicted_labels(probs)
            confident = plop_uncertainty(probs, num_seen) < thresholds[pred]
            pseudo = torch.where(confident, pred, torch.full_like(pred, num_old))  # num_old: ignored
            keep = (b.label == BACKGROUND) & (t.label != IGNORE) & (t.label < num_old)
            truth = t.label[keep]
            pseudo_counts += np.bincount((truth * (num_old + 1) + pseudo[keep]).numpy(),
                                         minlength=num_old * (num_old + 1)).reshape(num_old, num_old + 1)
            argmax_counts += np.bincount((truth * num_old + pred[keep]).numpy(),
                                         minlength=num_old * num_old).reshape(num_old, num_old)
    return pseudo_counts, argmax_counts, list(scn.class_names[:num_old])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--steps", type=int, nargs="+", default=[1])
    ap.add_argument("--classes", nargs="+", default=None, help="true classes to print (default: all old)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run).expanduser()
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    cfg.progress = None
    exp = Experiment(cfg, run)
    print(f"{run.name}: the step t-1 model on step t's background-labelled training pixels "
          "(% of each true class's pixels)")
    print("| step | true class | pixels | pseudo: itself | pseudo: another old class (largest) | "
          "pseudo: background | ignored | argmax: itself | argmax: largest other |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---|")
    for step in args.steps:
        pc, ac, names = probe_step(exp, run, step)
        has_pseudo = exp.method.name in ("plop", "nest_plop")
        rows = [(names[c], pc[c], ac[c], c) for c in range(1, len(names))
                if pc[c].sum() and (not args.classes or names[c] in args.classes)]
        # every old class but background pooled by pixel: "itself" is then the correct class
        rows.append(("all old (pooled)", None, None, None))
        for name, p, a, c in rows:
            if c is None:
                cls = range(1, len(names))
                n = int(pc[1:].sum())
                right_p = sum(pc[k, k] for k in cls)
                other_p = n - right_p - int(pc[1:, BACKGROUND].sum()) - int(pc[1:, -1].sum())
                bg_p, ign = int(pc[1:, BACKGROUND].sum()), int(pc[1:, -1].sum())
                right_a = sum(ac[k, k] for k in cls)
                other = "-"
                wrong_old = n - right_a - int(ac[1:, BACKGROUND].sum())
                largest = (f"another old class {100 * wrong_old / n:.1f}, "
                           f"background {100 * ac[1:, BACKGROUND].sum() / n:.1f}")
            else:
                n = int(p.sum())
                right_p, bg_p, ign = p[c], p[BACKGROUND], p[-1]
                others = [(j, p[j]) for j in range(1, len(names)) if j != c]
                j, k = max(others, key=lambda x: x[1])
                other_p = sum(v for _, v in others)
                other = f"{names[j]} {100 * k / n:.1f}"
                right_a = a[c]
                aj = max((j2 for j2 in range(len(names)) if j2 != c), key=lambda j2: a[j2])
                largest = f"{names[aj]} {100 * a[aj] / n:.1f}"
            pseudo = (f"{100 * right_p / n:.1f} | {100 * other_p / n:.1f} ({other}) | {100 * bg_p / n:.1f} | "
                      f"{100 * ign / n:.1f}") if has_pseudo else "- | - | - | -"
            print(f"| {step} | {name} | {n} | {pseudo} | {100 * right_a / n:.1f} | {largest} |")

if __name__ == "__main__":
    main()
