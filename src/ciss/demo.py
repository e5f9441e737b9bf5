"""`ciss demo`: every registered method on a synthetic multi-step task, no data or download needed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from ciss.config import load_config
from ciss.engine import train
from ciss.methods import list_methods

# Synthetic 10 classes at 96 px, task 6-2 (3 steps); the tiny backbone at output stride 8 learns the
# base step to ~70% mIoU in 10 epochs, enough for forgetting to show.
DEMO_SETTINGS = [
    "data.dataset=synthetic",
    "data.task=6-2",
    "data.setting=overlapped",
    "data.options={num_classes: 10, size: 96, length: 300}",
    "data.crop_size=96",
    "model.output_stride=8",
    "model.head_channels=64",
    "optim.epochs=10",
    "optim.epochs_next=4",
]
# Per-method settings the demo's step size needs. EWC's Nesterov SGD on the normalised Fisher diverges
# once lr_next > 0.68 / reg_importance (ciss.methods.ewc); the tiny recipe's lr_next 0.01 needs < 68.
DEMO_METHOD_ARGS = {"ewc": ["method_args={reg_importance: 50}"]}
# Registered names that are another name's method with its defaults: trained once, under that name.
SAME_AS = {"nest": "nest_mib"}  # NeST's default base is MiB


def demo_methods() -> list[str]:
    """The methods `ciss demo` trains by default: every registered one, each once."""
    return [m for m in list_methods() if m not in SAME_AS]


def run_demo(out_dir: str | Path = "runs/demo", methods: Optional[Sequence[str]] = None,
             extra: Sequence[str] = ()) -> dict[str, object]:
    """Trains each method on the same scenario and prints one table row per method."""
    out = Path(out_dir)
    methods = list(methods) if methods else demo_methods()
    results = {}
    t0 = time.time()
    for name in methods:
        cfg = load_config(None, [*DEMO_SETTINGS, f"method={name}", *DEMO_METHOD_ARGS.get(name, []),
                                 f"out_dir={out}", f"cache_dir={out / 'cache'}", *extra], recipe="tiny")
        print(f"\n== {name} ==")
        results[name] = train(cfg)
    print(f"\nAfter the last step (mIoU %, synthetic {DEMO_SETTINGS[1].split('=')[1]} overlapped):")
    first = next(iter(results.values()))
    old_h, new_h = first.steps[-1].ranges()
    print(f"{'method':<12} | {old_h:>7} | {new_h:>7} | {'all':>6}")
    for name, res in results.items():
        last = res.steps[-1]
        print(f"{name:<12} | {100 * last.miou_old:7.2f} | {100 * last.miou_new:7.2f} | "
              f"{100 * last.miou_all:6.2f}")
    print(f"\nrun directories under {out.resolve()}  (total {time.time() - t0:.0f} s)")
    return results
