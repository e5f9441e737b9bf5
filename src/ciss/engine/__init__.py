"""The one training loop. It knows no method by name: methods act only through their hooks.

Per step: snapshot the frozen old model, grow the classifier, let the method initialise it, train
the method's phases, checkpoint, evaluate on the test split. The engine owns device, AMP, DDP,
clipping, logging, checkpoints, step-0 reuse and resuming, one concept per module:

  steps.py        Experiment: builds a run from its config and runs the step sequence; train()
  loop.py         the SGD loop of one phase of a step (forward, old model, targets, loss, backward)
  data.py         the run's datasets, and the loaders that batch a step's images
  checkpoints.py  checkpoint state, strict loading, the resume point, init_from model files
  base_cache.py   step-0 checkpoints shared between runs, and the lock around training one
  evaluator.py    evaluation after a step: raw, calibrated, gamma sweep, prototype probe
  distributed.py  device, torchrun ranks, the DDP wrapper, mixed precision
  sync_bn.py      BN statistics of every process's batch together under DDP (SyncBN)
  log.py          console lines and TensorBoard scalars
"""

from ciss.engine.checkpoints import RESUMABLE_CHANGES, checkpoint_state, load_into
from ciss.engine.data import DeviceLoader, cache_root, collate, iter_batches, size_batches
from ciss.engine.distributed import AMP_DTYPES, DistInfo, autocast_ctx, init_distributed, resolve_device, unwrap
from ciss.engine.evaluator import EvalResult, StepEvaluator
from ciss.engine.loop import TrainingDiverged, poly_lambda, train_phase
from ciss.engine.steps import Experiment, RunResult, default_run_name, peak_rss_mb, seed_everything, train

__all__ = [
    "AMP_DTYPES",
    "DeviceLoader",
    "DistInfo",
    "EvalResult",
    "Experiment",
    "RESUMABLE_CHANGES",
    "RunResult",
    "StepEvaluator",
    "TrainingDiverged",
    "autocast_ctx",
    "cache_root",
    "checkpoint_state",
    "collate",
    "default_run_name",
    "init_distributed",
    "iter_batches",
    "load_into",
    "peak_rss_mb",
    "poly_lambda",
    "resolve_device",
    "seed_everything",
    "size_batches",
    "train",
    "train_phase",
    "unwrap",
]
