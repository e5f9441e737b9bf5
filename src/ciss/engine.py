"""The one training loop. It knows no method by name: methods act only through their hooks.

Per step: snapshot the frozen old model, grow the classifier, let the method initialise it, train
the method's phases, checkpoint, evaluate on the test split. Owns device, AMP, DDP, clipping,
logging, checkpoints, step-0 reuse and resuming.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ciss.calibration import CALIBRATORS, Calibrator, GammaSweep, build_calibrator, parse_calibration, tradeoff_curve
from ciss.config import INTRODUCED, ConfigError, RunConfig, default_cache_root, stable_hash, to_dict
from ciss.data import build_dataset
from ciss.data.image_cache import ResizeCache, cacheable
from ciss.data.transforms import EvalTransform, Resized, TrainTransform
from ciss.methods import Method, Phase, build_method
from ciss.metrics import ConfusionMatrix, StepMetrics, forgetting, format_table, predicted_labels, step_metrics
from ciss.models import build_segmenter, freeze_early, inference_copy
from ciss.probe import class_means, ncm_logits
from ciss.results import LockHeld, RunDir, exclusive, load_checkpoint, save_checkpoint
from ciss.scenario import Scenario, build_scenario
from ciss.types import Batch, SegOutput, StepContext


class TrainingDiverged(RuntimeError):
    """A loss became NaN/inf; the last good checkpoint is left untouched."""


# ---------------------------------------------------------------------------------------------
# small pieces
# ---------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' was asked for but CUDA is not available; use device=cpu")
    return torch.device(name)


def collate(items: list[tuple]) -> Batch | list[Batch]:
    """Stack (image, label, index[, extra maps]) items into a Batch.

    Images of different sizes become single-image batches (evaluation at native resolution).
    """
    if len({tuple(it[0].shape) for it in items}) > 1:
        return [collate([it]) for it in items]  # type: ignore[misc]
    extras = [it[3] if len(it) > 3 else {} for it in items]
    return Batch(
        image=torch.stack([it[0] for it in items]),
        label=torch.stack([it[1] for it in items]).long(),
        index=torch.tensor([it[2] for it in items]),
        extra={k: torch.stack([torch.as_tensor(e[k]) for e in extras]) for k in extras[0]},
    )


def iter_batches(loader: Iterable, device: torch.device) -> Iterator[Batch]:
    for b in loader:
        for one in (b if isinstance(b, list) else [b]):
            yield one.to(device)


class DeviceLoader:
    """A DataLoader view that yields Batches on the device; methods iterate it in their hooks."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[Batch]:
        return iter_batches(self.loader, self.device)

    def __len__(self) -> int:
        return len(self.loader)


def size_batches(data: Dataset, batch_size: int) -> Optional[list[list[int]]]:
    """Batches of items of one size, in order of first appearance, when the items' sizes differ and
    are known from file headers (``StepDataset.item_sizes``); None otherwise. Evaluation of images at
    their own size then runs in full batches instead of one image at a time (collate makes a batch
    of one of each image of a mixed batch); a confusion matrix does not depend on the order."""
    sizes_of = getattr(data, "item_sizes", None)
    sizes = sizes_of() if callable(sizes_of) else None
    if sizes is None or len(set(sizes)) <= 1:
        return None
    groups: dict[tuple[int, int], list[int]] = {}
    for k, size in enumerate(sizes):
        groups.setdefault(size, []).append(k)
    return [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


def poly_lambda(total_iters: int, power: float):
    total = max(1, total_iters)
    return lambda it: max(0.0, 1.0 - min(it, total) / total) ** power


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_ctx(device: torch.device, amp: str):
    """Mixed precision: bf16 or fp16 on CUDA, bf16 on CPU; fp16 on CPU runs in float32."""
    if amp != "none" and amp not in AMP_DTYPES:
        raise ValueError(f"optim.amp must be none, bf16 or fp16, got '{amp}'")
    enabled = amp != "none" and (device.type == "cuda" or amp == "bf16")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES.get(amp, torch.float32)
                          if enabled else None, enabled=enabled)


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    run_dir: Path
    steps: list[StepMetrics] = field(default_factory=list)
    wall_time_s: float = 0.0
    peak_rss_mb: float = 0.0

    def table(self, title: str = "") -> str:
        return format_table(self.steps, title)


@dataclass
class EvalResult:
    """One evaluation after a step: the trained model's figures, then post-hoc variants of it."""

    raw: StepMetrics
    calibrated: dict[str, tuple[float, StepMetrics]] = field(default_factory=dict)  # name -> (gamma, figures)
    sweep: Optional[dict[str, Any]] = None  # calibration.tradeoff_curve on the test images
    ncm: Optional[StepMetrics] = None  # nearest-prototype classifier on the same features

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.raw.as_dict())
        if self.calibrated:
            out["calibrated"] = {k: {"gamma": g, **m.as_dict()} for k, (g, m) in self.calibrated.items()}
        if self.sweep is not None:
            out["sweep"] = self.sweep
        if self.ncm is not None:
            out["ncm"] = self.ncm.as_dict()
        return out

    def lines(self) -> list[str]:
        """Table rows: raw, then one per variant, labelled."""
        rows = [("", self.raw)] + [(f"+{k} (gamma {g:.3g})", m) for k, (g, m) in self.calibrated.items()]
        if self.ncm is not None:
            rows.append(("NCM probe", self.ncm))
        out = []
        for label, m in rows:
            line = format_table([m]).splitlines()[-1]
            out.append(f"{line}  {label}".rstrip())
        if self.sweep is not None:
            out.append(f"     gamma sweep: AUSUC {100 * self.sweep['ausuc']:.2f} "
                       f"(mIoU of absent classes vs of background + the step's classes)")
        return out


def peak_rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return float("nan")


def default_run_name(cfg: RunConfig) -> str:
    order = "" if cfg.data.order is None else f"-order{cfg.data.order}".replace("/", "_")
    return f"{cfg.data.dataset}-{cfg.data.task}-{cfg.data.setting}{order}-{cfg.method}-s{cfg.seed}"


def cache_root(cfg: RunConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return default_cache_root()


class Experiment:
    """Builds data, scenario, model and method from a RunConfig and runs every step."""

    def __init__(self, cfg: RunConfig, run_dir: Optional[Path] = None) -> None:
        self.cfg = cfg
        self._t0, self._wall_kept = time.time(), 0.0  # reset when the steps start (run_wall_time)
        self.dist = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.optim.amp == "fp16" and self.device.type != "cuda":
            warnings.warn(f"optim.amp=fp16 needs CUDA; training in float32 on {self.device} "
                          "(bf16 works on CPU)", stacklevel=2)
        self.method: Method = build_method(cfg.method, **cfg.method_args)
        if getattr(self.method, "cache_dir", "") is None:  # methods with on-disk caches use the run's
            self.method.cache_dir = str(cache_root(cfg))  # type: ignore[attr-defined]
        d = cfg.data
        self.train_set = build_dataset(d.dataset, split=d.train_split, root=d.root, **d.options)
        # test_split None: the scenario holds out its own test images (domain-incremental protocols)
        self.evaluates = d.test_split != "none"
        self.init_model = None  # the model file whose steps are done (config init_from)
        if cfg.init_from:
            from ciss.modelfile import load_model

            self.init_model = load_model(cfg.init_from)
        self.test_set = (None if d.test_split in (None, "none") else
                         build_dataset(d.dataset, split=d.test_split, root=d.test_root or d.root,
                                       **d.options))
        if d.resize and d.image_cache:  # decode and resize each file once (data/image_cache.py)
            images = cache_root(cfg) / "images"
            if cacheable(self.train_set):
                self.train_set = ResizeCache(self.train_set, d.resize, images)
            if self.test_set is not None and cacheable(self.test_set):
                self.test_set = ResizeCache(self.test_set, d.resize, images)
        self.scenario: Scenario = build_scenario(
            self.train_set, d.task, setting=d.setting, order=d.order, test=self.test_set,
            cache_dir=cache_root(cfg) / "scenarios", progress=cfg.progress and self.dist.main,
            trained_steps=len(self.init_model.classes_per_step) if self.init_model is not None else 0)
        self.train_scenario = self.scenario.as_joint() if self.method.offline else self.scenario
        self.num_base = self.scenario.classes_per_step[0]
        self.calibration = parse_calibration(cfg.calibration)
        self.run = RunDir(run_dir or Path(cfg.out_dir) / (cfg.name or default_run_name(cfg)))
        self.writer = None

    # -- helpers ------------------------------------------------------------------------------
    def context(self, step: int, epochs: int, iters: int) -> StepContext:
        return StepContext(step=step, classes_per_step=self.train_scenario.classes_per_step,
                           num_steps=self.train_scenario.num_steps, epochs=epochs,
                           iters_per_epoch=iters, device=self.device)

    def build_model(self, classes_per_step: tuple[int, ...]) -> nn.Module:
        m = self.cfg.model
        model = build_segmenter(backbone=m.backbone, pretrained=m.pretrained,
                                output_stride=m.output_stride, head_channels=m.head_channels,
                                head_reduce=m.head_reduce, dilated=m.dilated,
                                classes_per_step=classes_per_step,
                                num_extra=self.method.num_extra_outputs(),
                                **self.method.architecture())
        freeze_early(model, m.frozen_stride)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def step_epochs(self, step: int) -> int:
        """Epochs of the step's training (before the method splits them into phases)."""
        o = self.cfg.optim
        return o.epochs if step == 0 or o.epochs_next is None else o.epochs_next

    def base_cache_path(self) -> Path:
        """Step-0 checkpoints are shared by every run with the same base-step configuration."""
        c = self.cfg
        key = {
            "dataset": self.train_set.cache_key(),
            "task_step0": list(self.train_scenario.steps[0]),
            "order": list(self.train_scenario.order),
            "setting": c.data.setting,
            "crop": c.data.crop_size,
            "resize": c.data.resize,
            "model": to_dict(c.model),
            "seed": c.seed,
            "recipe": {k: getattr(c.optim, k) for k in
                       ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                        "poly_power", "grad_clip", "amp")},
            "base_step": self.method.base_step_key(),
            "extra_outputs": self.method.num_extra_outputs(),
            "world": self.dist.world,
        }
        if self.method.architecture():  # only when set, so plain models keep their cached bases
            key["architecture"] = self.method.architecture()
        return cache_root(c) / "base" / f"{stable_hash(key)}.pt"

    def loader(self, dataset: Dataset, batch_size: int, train: bool,
               batch_sampler: Optional[torch.utils.data.Sampler] = None) -> DataLoader:
        if batch_sampler is not None:  # the method composes its own batches (e.g. half memory)
            if self.dist.enabled:
                raise ValueError(f"method '{self.method.name}' composes its own batches, which is "
                                 "not supported under torchrun yet; run it in one process")
            return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                              num_workers=self.cfg.data.num_workers,
                              pin_memory=self.device.type == "cuda")
        sampler = None
        if self.dist.enabled:
            sampler = torch.utils.data.distributed.DistributedSampler(
                dataset, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=train,
                seed=self.cfg.seed)
        g = torch.Generator()
        g.manual_seed(self.cfg.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None,
                          sampler=sampler, num_workers=self.cfg.data.num_workers,
                          collate_fn=collate, drop_last=train and len(dataset) > batch_size,
                          generator=g, persistent_workers=False,
                          pin_memory=self.device.type == "cuda")

    def log_scalars(self, tag: str, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{tag}/{k}", v, step)

    def open_writer(self) -> None:
        if not (self.cfg.tensorboard and self.dist.main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra; JSONL logs are always written
            return
        self.writer = SummaryWriter(str(self.run.path / "tb"))

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module, step: int, **extra: Any) -> dict[str, Any]:
        m = unwrap(model)
        return {"format": "ciss-checkpoint-v1", "step": step, "model": m.state_dict(),
                "model_config": m.config(), "method": self.method.state_dict(), **extra}

    def load_into(self, model: nn.Module, state: dict[str, Any], with_method: bool = True) -> nn.Module:
        """Load a checkpoint strictly, growing the classifier to its steps; `with_method=False`
        for a model that is not the one being trained (e.g. an old-model snapshot)."""
        m = unwrap(model)
        want = tuple(state["model_config"]["classes_per_step"])
        while tuple(m.classes_per_step) != want:
            if len(m.classes_per_step) >= len(want):
                raise ValueError(f"checkpoint has classes per step {want}, model has "
                                 f"{tuple(m.classes_per_step)}")
            m.add_step(want[len(m.classes_per_step)])
        m.load_state_dict(state["model"], strict=True)
        if with_method:
            self.method.load_state_dict(state.get("method", {}))
        return model

    # -- training -----------------------------------------------------------------------------
    def train_phase(self, model: nn.Module, old_model: Optional[nn.Module], loader: DataLoader,
                    ctx: StepContext, phase: Phase, phase_idx: int, lr: float,
                    resume: Optional[dict]) -> None:
        cfg = self.cfg.optim
        core = unwrap(model)
        self.method.on_phase_start(phase, core, old_model, DeviceLoader(loader, self.device), ctx)
        groups = self.method.param_groups(core, ctx, phase)
        for g in groups:
            g["lr"] = lr * phase.lr_scale * g.pop("lr_scale", 1.0)
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise ValueError(f"method '{self.method.name}' returned no trainable parameter for "
                             f"phase '{phase.name}' of step {ctx.step}")
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
        total = phase.epochs * max(1, len(loader))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(total, cfg.poly_power))
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and self.device.type == "cuda")
        start_epoch = 0
        if resume is not None and resume["phase"] == phase_idx:
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            start_epoch = resume["epoch"] + 1
        params = [p for g in groups for p in g["params"]]
        # The old model only runs forward, in eval mode: its BN folded into the convs (same outputs to
        # float rounding, about a quarter of its time saved on a CPU).
        old_forward = (inference_copy(old_model) if old_model is not None and self.method.needs_old_model
                       else None)
        # Loss terms are summed on the device and read once per epoch; finiteness is checked every
        # iteration on a CPU (free there) and every `sync_every` iterations on a GPU, where each read
        # stalls the queue of kernels.
        sync_every = 1 if self.device.type == "cpu" else 20
        for epoch in range(start_epoch, phase.epochs):
            if isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler):
                loader.sampler.set_epoch(epoch)
            sums: dict[str, torch.Tensor] = {}
            n = 0
            bar = tqdm(iter_batches(loader, self.device), total=len(loader), leave=False,
                       disable=not (self.cfg.progress and self.dist.main),
                       desc=f"step {ctx.step} {phase.name} epoch {epoch + 1}/{phase.epochs}")
            for batch in bar:
                self.method.train_mode(core, ctx, phase)
                with autocast_ctx(self.device, cfg.amp):
                    out: SegOutput = model(batch.image)
                    old_out = None
                    if old_forward is not None:
                        with torch.no_grad():  # not inference_mode: losses may save its outputs
                            old_out = old_forward(batch.image)
                    targets = self.method.make_targets(batch, out, old_out, ctx)
                    terms = self.method.loss(out, targets, old_out, batch, ctx)
                loss = terms["loss"]
                if n % sync_every == 0 and not torch.isfinite(loss):
                    raise self.diverged(ctx, phase, epoch, f"loss is {loss.detach().item()} "
                                        f"({ {k: float(v.detach()) for k, v in terms.items()} })")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                for k, v in terms.items():
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v.clone()
                n += 1
                if not bar.disable and n % sync_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            means = {k: float(v) / max(1, n) for k, v in sums.items()}
            if not all(np.isfinite(v) for v in means.values()):
                raise self.diverged(ctx, phase, epoch, f"mean losses {means}")
            if self.dist.main:
                self.run.append_jsonl("losses.jsonl", {"step": ctx.step, "phase": phase.name,
                                                       "epoch": epoch, **means})
                self.log_scalars(f"step{ctx.step}/{phase.name}", means, epoch)
                save_checkpoint(self.run.last_ckpt, self.checkpoint_state(
                    model, ctx.step, phase=phase_idx, epoch=epoch, optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(), run_wall_time_s=self.run_wall_time()))
        self.method.on_phase_end(phase, core, old_model, DeviceLoader(loader, self.device), ctx)

    def diverged(self, ctx: StepContext, phase: Phase, epoch: int, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"step {ctx.step}, phase '{phase.name}', epoch {epoch + 1}: {what}. The last good "
            f"checkpoint in {self.run.path / 'ckpt'} is intact; lower optim.lr or check the data, "
            f"then rerun the same command to resume.")

    def step_images(self, step: int, train: bool) -> DataLoader:
        """Step `step`'s training images (train=True) or test images, at evaluation size, unshuffled."""
        transform = Resized(EvalTransform(self.cfg.data.eval_size), self.cfg.data.resize)
        scn = self.train_scenario
        data = scn.train_dataset(step, transform) if train else scn.test_dataset(step, transform)
        if self.dist.enabled and not train:  # each rank evaluates a shard; the matrices are summed
            data = torch.utils.data.Subset(data, list(range(self.dist.rank, len(data), self.dist.world)))
        batches = size_batches(data, self.cfg.optim.eval_batch_size)
        if batches is not None:
            return DataLoader(data, batch_sampler=batches, num_workers=self.cfg.data.num_workers,
                              collate_fn=collate)
        return DataLoader(data, batch_size=self.cfg.optim.eval_batch_size, shuffle=False,
                          num_workers=self.cfg.data.num_workers, collate_fn=collate)

    def _bar(self, loader: DataLoader, desc: str) -> Iterable[Batch]:
        total = len(loader.dataset)  # type: ignore[arg-type]
        bar = tqdm(total=total, leave=False, desc=desc, unit="img",
                   disable=not (self.cfg.progress and self.dist.main))
        for batch in iter_batches(loader, self.device):
            yield batch
            bar.update(batch.image.shape[0])
        bar.close()

    def decision_logits(self, model: nn.Module, ctx: StepContext) -> Any:
        def fn(image: torch.Tensor) -> torch.Tensor:
            with autocast_ctx(self.device, self.cfg.optim.amp):
                out = model(image)
            return self.method.eval_logits(out, ctx).float()
        return fn

    @torch.no_grad()
    def fit_calibrators(self, model: nn.Module, old_model: nn.Module, step: int,
                        names: list[str]) -> dict[str, Calibrator]:
        """Fit the named calibrators after `step` on the step's own training images (no old image),
        in one pass of the model (and of the old model when one of them needs it)."""
        ctx = self.context(step, 0, 0)
        new_fn = self.decision_logits(inference_copy(model), ctx)
        old_fn = self.decision_logits(inference_copy(old_model), self.context(step - 1, 0, 0))
        cals = {name: build_calibrator(name) for name in names}
        active = [c for c in cals.values() if c.start(ctx)]
        if active:
            need_old = any(c.needs_old for c in active)
            for batch in self._bar(self.step_images(step, train=True), f"fit {', '.join(names)} step {step}"):
                logits = new_fn(batch.image)
                old = old_fn(batch.image) if need_old else None
                for c in active:
                    c.update(logits, batch.label, old)
            for c in active:
                c.finish()
        return cals

    def step_calibrators(self, model: nn.Module, step: int, names: list[str],
                         state: dict[str, Any]) -> tuple[dict[str, Calibrator], bool]:
        """The named calibrators of `step` from its checkpoint `state`, fitting (and adding to
        `state`) those it lacks. Returns them and whether `state` changed."""
        names = [n for n in names if n in CALIBRATORS]
        if step == 0 or not names:
            return {}, False
        saved = dict(state.get("calibration", {}))
        missing = [n for n in names if n not in saved]
        if missing:
            fitted = self.fit_calibrators(unwrap(model), self.load_step_model(step - 1), step, missing)
            saved.update({n: c.state_dict() for n, c in fitted.items()})
            state["calibration"] = saved
        cals = {n: build_calibrator(n) for n in names}
        for n, c in cals.items():
            c.load_state_dict(saved[n])
        return cals, bool(missing)

    @torch.no_grad()
    def step_prototypes(self, model: nn.Module, step: int) -> dict[int, torch.Tensor]:
        """Mean decoder feature of background and of each class the step teaches, on its own images."""
        model.eval()
        ctx = self.context(step, 0, 0)
        classes = [0] + list(range(ctx.num_old, ctx.num_seen)) if step > 0 else list(range(ctx.num_seen))
        return class_means(model, self._bar(self.step_images(step, train=True), f"prototypes step {step}"),
                           classes)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> StepMetrics:
        """Confusion matrix on the whole test split with unseen classes relabelled background."""
        return self.evaluate_full(model, step).raw

    @torch.no_grad()
    def evaluate_full(self, model: nn.Module, step: int,
                      calibrators: Optional[dict[str, Calibrator]] = None, sweep: bool = False,
                      prototypes: Optional[dict[int, torch.Tensor]] = None) -> EvalResult:
        """The trained model's figures and, in the same pass, calibrated ones, the gamma sweep and
        the nearest-prototype probe (each only when asked)."""
        core = inference_copy(unwrap(model))
        scn = self.train_scenario
        ctx = self.context(step, 0, 0)
        calibrators = calibrators or {}
        sweep = sweep and step > 0 and ctx.num_old > 1
        cms = {k: ConfusionMatrix(ctx.num_seen, device=self.device) for k in ["", *calibrators]}
        sw = GammaSweep(ctx.num_seen, ctx.num_old) if sweep else None
        ncm_cm = ConfusionMatrix(ctx.num_seen, device=self.device) if prototypes is not None else None
        if prototypes is not None:  # a class without a prototype (no pixel at feature scale) is never predicted
            dim = next(iter(prototypes.values())).numel()
            protos = torch.stack([prototypes.get(c, torch.full((dim,), float("nan")))
                                  for c in range(ctx.num_seen)]).to(self.device)
        with torch.inference_mode():
            for batch in self._bar(self.step_images(step, train=False), f"eval step {step}"):
                with autocast_ctx(self.device, self.cfg.optim.amp):
                    out = core(batch.image)
                logits = self.method.eval_logits(out, ctx)
                cms[""].update(predicted_labels(logits), batch.label)
                for name, cal in calibrators.items():
                    cms[name].update(predicted_labels(cal.apply(logits.float(), ctx)), batch.label)
                if sw is not None:
                    sw.update(logits.float(), batch.label)
                if ncm_cm is not None:
                    ncm = ncm_logits(out.features["head"].float(), protos, batch.label.shape[-2:])
                    ncm_cm.update(predicted_labels(ncm), batch.label)
        if self.dist.enabled:
            for cm in [*cms.values(), *([ncm_cm] if ncm_cm is not None else [])]:
                dist.all_reduce(cm.mat)
            if sw is not None:
                dist.all_reduce(sw.at_a)
                dist.all_reduce(sw.at_b)
        metrics = {k: step_metrics(cm, step, self.num_base, scn.class_names) for k, cm in cms.items()}
        return EvalResult(
            raw=metrics[""],
            calibrated={k: (c.gamma, metrics[k]) for k, c in calibrators.items()},
            sweep=tradeoff_curve(sw) if sw is not None else None,
            ncm=step_metrics(ncm_cm, step, self.num_base, scn.class_names) if ncm_cm is not None else None)

    def load_step_model(self, step: int) -> nn.Module:
        """A fresh model holding the checkpoint of `step` of this run (for an old-model snapshot)."""
        state = load_checkpoint(self.run.step_ckpt(step))
        model = self.build_model(tuple(state["model_config"]["classes_per_step"][:1]))
        self.load_into(model, state, with_method=False)
        return model.to(self.device).eval()

    def calibrate_step(self, model: nn.Module, step: int) -> dict[str, Calibrator]:
        """Fit the run's calibrators after `step` (none at step 0) and store them in its checkpoint."""
        if step == 0 or not any(n in CALIBRATORS for n in self.calibration):
            return {}
        path = self.run.step_ckpt(step)
        state = load_checkpoint(path)
        cals, changed = self.step_calibrators(model, step, self.calibration, state)
        if changed and self.dist.main:
            save_checkpoint(path, state)
        return cals

    def install_init_model(self) -> int:
        """Take the steps of the `init_from` model file as done: check that it matches the scenario
        and the method, and store it as the run's checkpoint of its last step. Returns its steps."""
        mf = self.init_model
        assert mf is not None
        have = tuple(mf.model_config["classes_per_step"])
        want = tuple(self.train_scenario.classes_per_step)
        if have != want[: len(have)] or len(have) >= len(want):
            raise ValueError(f"{self.cfg.init_from}: its classifier has classes per step {have}, which "
                             f"is not a beginning of this task's {want}")
        extra = int(mf.model_config.get("num_extra", 0))
        if extra != self.method.num_extra_outputs():
            raise ValueError(f"{self.cfg.init_from} was trained with {extra} extra output(s) and method "
                             f"'{self.method.name}' needs {self.method.num_extra_outputs()}: continue it "
                             f"with a method of the same family as '{mf.method}'")
        parallel = bool(mf.model_config.get("parallel_branches", False))
        if parallel != bool(self.method.architecture().get("parallel_branches", False)):
            raise ValueError(f"{self.cfg.init_from} was trained {'with' if parallel else 'without'} "
                             f"parallel branches and method '{self.method.name}' needs the opposite: "
                             f"continue it with a method of the same family as '{mf.method}'")
        path = self.run.step_ckpt(len(have) - 1)
        if not path.is_file() and self.dist.main:
            save_checkpoint(path, {"format": "ciss-checkpoint-v1", "step": len(have) - 1,
                                   "model": mf.weights, "model_config": dict(mf.model_config),
                                   "method": {}})
        if self.dist.enabled:
            dist.barrier()
        return len(have)

    def run_all(self) -> RunResult:
        if self.dist.enabled:  # ranks of one launch share the directory
            try:
                res = self._run_all()
                # no rank exits while another still talks to it: gloo aborts a process whose peer
                # closed the connection under its background threads
                dist.barrier()
                return res
            finally:
                dist.destroy_process_group()
        try:
            with exclusive(self.run.path / ".lock", wait=False):
                return self._run_all()
        except LockHeld:  # raised on entering only: the block holds no other non-waiting lock
            raise ConfigError(f"{self.run.path} is being trained by another process; wait for it to "
                              "finish (it resumes from there) or give this run another name") from None

    def _run_all(self) -> RunResult:
        cfg = self.cfg
        t0 = time.time()
        seed_everything(cfg.seed)
        self.check_same_experiment()
        if self.dist.main:
            self.run.write_config(to_dict(cfg))
            self.run.write_meta(cfg.seed, {"world_size": self.dist.world,
                                           "uses_memory": self.method.uses_memory})
        self.open_writer()
        scn = self.train_scenario
        done = self.run.step_results()
        model = self.build_model((scn.classes_per_step[0],)).to(self.device)

        init_steps = self.install_init_model() if cfg.init_from else 0
        # Resume: the last step with both a checkpoint and an evaluation record is complete (the
        # steps of an init_from model need no record).
        first = 0
        for t in range(scn.num_steps):
            if t < init_steps - 1 or self.run.step_ckpt(t).is_file() and (t in done or t < init_steps):
                first = t + 1
            else:
                break
        if first > 0:
            self.load_into(model, load_checkpoint(self.run.step_ckpt(first - 1)))
            model.to(self.device)
        partial = None
        if self.run.last_ckpt.is_file():
            state = load_checkpoint(self.run.last_ckpt)
            if state["step"] == first:
                partial = state
        # wall time of the work kept from earlier invocations: the finished steps, and the part of
        # the next one saved in its partial checkpoint
        self._wall_kept = (float(partial["run_wall_time_s"]) if partial and "run_wall_time_s" in partial
                           else self.run.kept_wall_time(before_step=first))
        self._t0 = t0

        results = [StepMetrics(step=r["step"], iou=[float("nan") if v is None else v for v in r["iou"]],
                               num_base=r["num_base"], class_names=r.get("class_names"))
                   for t, r in sorted(done.items()) if t < first and "iou" in r]
        for r in results:
            self.print(format_table([r]).splitlines()[-1] if r.step else format_table([r]))

        for step in range(first, scn.num_steps):
            self.train_step(model, step, partial)
            partial = None
            if not self.evaluates:  # data.test_split "none": trained, checkpointed, not evaluated
                if self.dist.main:
                    self.run.append_jsonl("results.jsonl", {
                        "step": step, "evaluated": False, "method": cfg.method,
                        "wall_time_s": time.time() - t0, "run_wall_time_s": self.run_wall_time(),
                        "uses_memory": self.method.uses_memory})
                self.print(f"step {step}: trained (no evaluation set)")
                continue
            calibrators = self.calibrate_step(model, step)
            res_t = self.evaluate_full(model, step, calibrators, sweep="sweep" in self.calibration)
            metrics = res_t.raw
            results.append(metrics)
            if self.dist.main:
                row = {**res_t.as_dict(), "method": cfg.method, "wall_time_s": time.time() - t0,
                       "run_wall_time_s": self.run_wall_time(), "uses_memory": self.method.uses_memory}
                self.run.append_jsonl("results.jsonl", row)
                scalars = {"miou_old": metrics.miou_old, "miou_new": metrics.miou_new,
                           "miou_all": metrics.miou_all}
                for name, (gamma, m) in res_t.calibrated.items():
                    scalars.update({f"{name}_miou_old": m.miou_old, f"{name}_miou_new": m.miou_new,
                                    f"{name}_miou_all": m.miou_all, f"{name}_gamma": gamma})
                self.log_scalars("eval", scalars, step)
                if step == 0:
                    self.print(format_table([metrics]))
                else:
                    self.print("\n".join(res_t.lines()))
        res = RunResult(self.run.path, results, time.time() - t0, peak_rss_mb())
        if self.dist.main:
            title = f"{cfg.method} on {cfg.data.dataset} {cfg.data.task} {cfg.data.setting}"
            (self.run.path / "table.txt").write_text(res.table(title) + "\n")
            history = [m.iou for m in results]
            self.run.write_summary({
                "method": cfg.method, "uses_memory": self.method.uses_memory,
                "wall_time_s": res.wall_time_s, "run_wall_time_s": self.run_wall_time(),
                "peak_rss_mb": res.peak_rss_mb,
                # per class: IoU after the step that taught it minus IoU after the last step
                "forgetting": [None if f != f else f for f in
                               forgetting(history, scn.classes_per_step)] if len(results) > 1 else [],
                "steps": [m.as_dict() for m in results]})
        if self.writer is not None:
            self.writer.close()
        return res

    def run_wall_time(self) -> float:
        """Seconds this run has worked, over all its invocations (see RunDir.kept_wall_time)."""
        return self._wall_kept + time.time() - self._t0

    # Keys that may change between an interrupted run and its resumption.
    RESUMABLE_CHANGES = ("progress", "tensorboard", "device", "channels_last", "out_dir", "name",
                         "cache_dir", "data.num_workers", "data.root", "optim.eval_batch_size",
                         "data.image_cache")

    def check_same_experiment(self) -> None:
        """Refuse to resume a run directory that holds another experiment's checkpoints."""
        if not self.run.config_path.is_file() or not any((self.run.path / "ckpt").glob("*.pt")):
            return

        def flat(d: dict, prefix: str = "") -> dict:
            out = {}
            for k, v in d.items():
                if isinstance(v, dict) and k not in ("options", "method_args"):
                    out.update(flat(v, f"{prefix}{k}."))
                else:
                    out[f"{prefix}{k}"] = v
            return out

        old, new = flat(self.run.read_config()), flat(to_dict(self.cfg))
        for key, value in INTRODUCED.items():  # a run made before a key existed had its old behaviour
            old.setdefault(key, value)
        diff = sorted(k for k in set(old) | set(new)
                      if k not in self.RESUMABLE_CHANGES and old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
            raise ValueError(f"{self.run.path} holds a run with another configuration ({shown}); "
                             f"pick another run name (--set name=...) or delete that folder")

    def print(self, text: str) -> None:
        if self.dist.main and self.cfg.progress is not None:
            tqdm.write(text)

    def train_step(self, model: nn.Module, step: int, partial: Optional[dict]) -> None:
        cfg = self.cfg
        scn = self.train_scenario
        core = unwrap(model)
        old_model = None
        if step > 0:
            old_model = copy.deepcopy(core).eval()
            for p in old_model.parameters():
                p.requires_grad_(False)
            if scn.classes_per_step[step] > 0:  # domain-incremental steps add no class
                core.add_step(scn.classes_per_step[step])
            core.to(self.device)
        epochs = self.step_epochs(step)
        lr = cfg.optim.lr if step == 0 else cfg.optim.lr_next
        transform = Resized(TrainTransform(cfg.data.crop_size), cfg.data.resize)
        data = scn.train_dataset(step, transform)
        if len(data) == 0:
            raise ValueError(f"step {step} has no training image (task {cfg.data.task}, "
                             f"setting {cfg.data.setting}); choose another task or class order")
        data, batch_sampler = self.method.train_data(data, scn, step, transform,
                                                     cfg.optim.batch_size, cfg.seed, old_model)
        loader = self.loader(data, cfg.optim.batch_size, train=True, batch_sampler=batch_sampler)
        ctx = self.context(step, epochs, len(loader))
        if step > 0 and partial is None and ctx.num_new > 0:
            self.method.init_new_classifiers(core, old_model, ctx)
        if partial is not None:
            self.load_into(core, partial)

        base_path = self.base_cache_path() if step == 0 and cfg.reuse_base else None
        # one process trains a shared base step at a time; the others wait and then load it (not under
        # DDP, whose ranks must all take the same branch)
        waiting = f"step 0: waiting for another run that trains the same base step ({base_path})"
        lock = (exclusive(base_path.with_suffix(".lock"), on_wait=lambda: self.print(waiting))
                if base_path is not None and partial is None and not self.dist.enabled
                else contextlib.nullcontext())
        with lock:
            if base_path is not None and base_path.is_file() and partial is None:
                self.load_into(core, load_checkpoint(base_path))
                self.print(f"step 0: reusing the base-step checkpoint {base_path}")
            else:
                dev_loader = DeviceLoader(loader, self.device)
                self.method.on_step_start(core, old_model, dev_loader, ctx)
                train_model: nn.Module = core
                if self.dist.enabled:
                    train_model = nn.parallel.DistributedDataParallel(
                        core, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                for i, phase in enumerate(self.method.phases(ctx)):
                    if partial is not None and partial["phase"] > i:
                        continue
                    self.train_phase(train_model, old_model, loader, ctx, phase, i, lr, partial)
                    partial = None
                self.method.on_step_end(core, old_model, dev_loader, ctx)
                if base_path is not None and self.dist.main:
                    save_checkpoint(base_path, self.checkpoint_state(core, 0))
        if self.dist.main:
            save_checkpoint(self.run.step_ckpt(step), self.checkpoint_state(core, step))
            self.run.last_ckpt.unlink(missing_ok=True)
        if self.dist.enabled:
            dist.barrier()


def train(cfg: RunConfig, run_dir: Optional[Path] = None) -> RunResult:
    return Experiment(cfg, run_dir).run_all()
