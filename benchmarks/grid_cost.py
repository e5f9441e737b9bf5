"""The training work a grid asks for, before running it, and the time it should take on this machine.

    python benchmarks/grid_cost.py benchmarks/grids/voc_paper.yaml \
        --set data.root=../shared/conformance/voc [--measure 3]
    python benchmarks/grid_cost.py benchmarks/grids/ccp21_cpu.yaml --measure 5 --threads 1

For every run of the grid it builds the run's scenario (labels only: no image is read) and counts the
training steps the run will train itself (a step 0 shared with an earlier run of the grid is counted
once, as `ciss bench` trains it once), the image passes (images x epochs of every phase of a step,
NeST's pre-tuning included, summed over steps), the SGD iterations and the teacher passes (the
frozen old model's forward on every batch of the methods that distil from it). `--measure N` times N
iterations of forward + loss + backward + SGD step, and N no-grad forwards, of each model of the grid
at its batch and crop on this machine's device (random pixels: speed does not depend on them), and
turns the passes into hours. Not counted: evaluation after each step and the passes some methods make
outside training (SSUL-M memory images, EWC Fisher, SDR prototypes).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ciss` does; before torch is imported
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ciss.bench import expand, overrides, read_grid, run_name
from ciss.config import ConfigError, load_config
from ciss.data.errors import DataError
from ciss.engine import Experiment


def step_work(exp: Experiment, step: int) -> tuple[int, int, int]:
    """(image passes, iterations, teacher passes) of training one step of `exp`."""
    batch = exp.cfg.optim.batch_size
    n = len(exp.train_scenario.train_indices(step))
    iters = n // batch if n > batch else 1  # the train loader drops the last batch
    epochs = sum(p.epochs for p in exp.method.phases(exp.context(step, exp.step_epochs(step), iters)))
    teacher = epochs * n if step > 0 and exp.method.needs_old_model else 0
    return epochs * n, epochs * iters, teacher


def seconds_per_image(exp: Experiment, iters: int) -> tuple[float, float]:
    """Seconds of one image of training (forward, loss, backward, SGD step) and of a no-grad forward
    (the old model's, in eval mode) at the run's batch and crop."""
    model = exp.build_model(exp.train_scenario.classes_per_step[:1]).to(exp.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    b, crop = exp.cfg.optim.batch_size, exp.cfg.data.crop_size
    x = torch.randn(b, 3, crop, crop, device=exp.device)
    y = torch.randint(0, exp.train_scenario.classes_per_step[0], (b, crop, crop), device=exp.device)

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).logits, y).backward()
        opt.step()

    @torch.no_grad()
    def teacher() -> None:
        model(x)

    times = []
    for fn, mode in ((one, model.train), (teacher, model.eval)):
        mode()
        fn()  # warm-up: allocation, kernel choice
        if exp.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if exp.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / (iters * b))
    return times[0], times[1]


def grid_work(grid_path: Path, sets: list[str], measure: int = 0) -> tuple[dict, dict]:
    """Per "task setting[ order]": [runs, trained steps, image passes, iterations, teacher passes], and the expected
    hours of training on this machine when `measure` > 0 (else an empty dict)."""
    grid = read_grid(grid_path)
    groups: dict[str, list[int]] = {}
    speed: dict[str, tuple[float, float]] = {}  # model, crop, batch, device -> s/image train, teacher
    hours: dict[str, float] = {}
    seen_bases: set[Path] = set()
    points = expand(grid)
    with tempfile.TemporaryDirectory(prefix="grid-cost-") as tmp:
        for i, point in enumerate(points):
            name = run_name(point, grid.get("name"))
            cfg = load_config(None, overrides(grid, point) + sets + [f"out_dir={tmp}", f"name={name}"],
                              recipe=grid.get("recipe"))
            cfg.progress = False
            if measure:
                cfg.model.pretrained = None  # the weights do not change the speed
            exp = Experiment(cfg, run_dir=Path(tmp) / name)
            d = cfg.data
            key = f"{d.task} {d.setting}" + ("" if d.order in (None, "identity", "A") else f" order {d.order}")
            row = groups.setdefault(key, [0, 0, 0, 0, 0])
            row[0] += 1
            passes = teacher_passes = 0
            for step in range(exp.train_scenario.num_steps):
                if step == 0 and cfg.reuse_base:
                    base = exp.base_cache_path()
                    if base in seen_bases:
                        continue
                    seen_bases.add(base)
                images, iters, teacher = step_work(exp, step)
                row[1] += 1
                row[2] += images
                row[3] += iters
                row[4] += teacher
                passes += images
                teacher_passes += teacher
            if measure:
                arch = exp.method.architecture()  # e.g. RCIL's two-branch convolutions
                model = (f"{cfg.model.backbone}{' ' + str(arch) if arch else ''} crop {d.crop_size} "
                         f"batch {cfg.optim.batch_size} {exp.device}")
                if model not in speed:
                    speed[model] = seconds_per_image(exp, measure)
                    print(f"{model}: {1 / speed[model][0]:.2f} training images/s, "
                          f"{1 / speed[model][1]:.2f} teacher images/s")
                train_s, teacher_s = speed[model]
                hours[key] = hours.get(key, 0.0) + (passes * train_s + teacher_passes * teacher_s) / 3600
            if (i + 1) % 16 == 0 or i + 1 == len(points):
                print(f"{i + 1}/{len(points)} runs counted", flush=True)
    return groups, hours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", type=Path)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of every run, e.g. data.root=/data/VOCdevkit/VOC2012")
    ap.add_argument("--measure", type=int, default=0, metavar="N",
                    help="time N training iterations of each recipe's model here (0: count only)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads while measuring")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        groups, hours = grid_work(args.grid, args.sets, args.measure)
    except (ConfigError, DataError, FileNotFoundError) as exc:  # e.g. data.root still /path/to/...
        raise SystemExit(f"{args.grid}: {exc} (set it with --set KEY=VALUE)") from None
    head = "| task | runs | trained steps | image passes | iterations | teacher passes |"
    print(head + (" expected hours |" if hours else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if hours else ""))
    for key, (runs, steps, images, iters, teacher) in groups.items():
        cells = f"| {key} | {runs} | {steps} | {images:,} | {iters:,} | {teacher:,} |"
        print(cells + (f" {hours[key]:.1f} |" if hours else ""))
    total = [sum(r[j] for r in groups.values()) for j in range(5)]
    line = (f"{total[0]} runs, {total[1]} trained steps, {total[2]:,} image passes, {total[3]:,} "
            f"iterations, {total[4]:,} teacher passes")
    print(line + (f": {sum(hours.values()):.1f} h of training on this machine" if hours else ""))


if __name__ == "__main__":
    main()
