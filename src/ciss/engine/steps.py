"""The step sequence of a run. An Experiment builds data, scenario, model and method from a
RunConfig and runs every step: snapshot the frozen old model, grow the classifier, let the method
initialise it, train the method's phases (ciss.engine.loop), checkpoint, calibrate and evaluate,
record. It knows no method by name: methods act only through their hooks."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ciss.calibration import parse_calibration
from ciss.config import ConfigError, RunConfig, to_dict
from ciss.engine.base_cache import base_cache_path, base_step_lock, shared_base_state
from ciss.engine.checkpoints import (
    check_same_experiment,
    checkpoint_state,
    install_model_file,
    load_into,
    resume_point,
)
from ciss.engine.data import DeviceLoader, batch_loader, cache_root, open_datasets, train_transform
from ciss.engine.distributed import init_distributed, rank_device, unwrap, wrap_ddp
from ciss.engine.evaluator import StepEvaluator
from ciss.engine.log import RunLog
from ciss.engine.loop import train_phase
from ciss.engine.seeding import seed_after_training, seed_everything, seed_step
from ciss.methods import Method, Phase, build_method
from ciss.metrics import StepMetrics, forgetting, format_table
from ciss.models import build_segmenter, freeze_early
from ciss.results import LockHeld, RunDir, exclusive, load_checkpoint, save_checkpoint
from ciss.scenario import Scenario, build_scenario
from ciss.types import StepContext


def peak_rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return float("nan")


def default_run_name(cfg: RunConfig) -> str:
    order = "" if cfg.data.order is None else f"-order{cfg.data.order}".replace("/", "_")
    return f"{cfg.data.dataset}-{cfg.data.task}-{cfg.data.setting}{order}-{cfg.method}-s{cfg.seed}"


def frozen_copy(model: nn.Module) -> nn.Module:
    """The old model of a step: a copy in eval mode that no gradient reaches."""
    old = copy.deepcopy(model).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


@dataclass
class RunResult:
    run_dir: Path
    steps: list[StepMetrics] = field(default_factory=list)
    wall_time_s: float = 0.0
    peak_rss_mb: float = 0.0

    def table(self, title: str = "") -> str:
        return format_table(self.steps, title)


class Experiment:
    """Builds data, scenario, model and method from a RunConfig and runs every step."""

    def __init__(self, cfg: RunConfig, run_dir: Optional[Path] = None) -> None:
        self.cfg = cfg
        self._t0, self._wall_kept = time.time(), 0.0  # reset when the steps start (run_wall_time)
        self.dist = init_distributed(cfg.device)
        self.device = rank_device(cfg.device, self.dist)
        if cfg.optim.amp == "fp16" and self.device.type != "cuda":
            warnings.warn(f"optim.amp=fp16 needs CUDA; training in float32 on {self.device} "
                          "(bf16 works on CPU)", stacklevel=2)
        self.method: Method = build_method(cfg.method, **cfg.method_args)
        if getattr(self.method, "cache_dir", "") is None:  # methods with on-disk caches use the run's
            self.method.cache_dir = str(cache_root(cfg))  # type: ignore[attr-defined]
        d = cfg.data
        self.train_set, self.test_set = open_datasets(cfg)
        # test_split None: the scenario holds out its own test images (domain-incremental protocols)
        self.evaluates = d.test_split != "none"
        self.init_model = None  # the model file whose steps are done (config init_from)
        if cfg.init_from:
            from ciss.modelfile import load_model

            self.init_model = load_model(cfg.init_from)
        self.scenario: Scenario = build_scenario(
            self.train_set, d.task, setting=d.setting, order=d.order, test=self.test_set,
            cache_dir=cache_root(cfg) / "scenarios", progress=cfg.progress and self.dist.main,
            trained_steps=len(self.init_model.classes_per_step) if self.init_model is not None else 0)
        self.train_scenario = self.scenario.as_joint() if self.method.offline else self.scenario
        self.num_base = self.scenario.classes_per_step[0]
        self.calibration = parse_calibration(cfg.calibration)
        self.run = RunDir(run_dir or Path(cfg.out_dir) / (cfg.name or default_run_name(cfg)))
        self.log = RunLog(show=self.dist.main and cfg.progress is not None)
        self.evaluator = StepEvaluator(cfg, self.train_scenario, self.num_base, self.method, self.device,
                                       self.dist, self.context, self.load_step_model,
                                       lambda step: load_checkpoint(self.run.step_ckpt(step)).get("method", {}))

    # -- what the steps are made of -----------------------------------------------------------
    def context(self, step: int, epochs: int, iters: int) -> StepContext:
        return StepContext(step=step, classes_per_step=self.train_scenario.classes_per_step,
                           num_steps=self.train_scenario.num_steps, epochs=epochs,
                           iters_per_epoch=iters, device=self.device)

    def build_model(self, classes_per_step: tuple[int, ...]) -> nn.Module:
        m = self.cfg.model
        model = build_segmenter(backbone=m.backbone, pretrained=m.pretrained,
                                output_stride=m.output_stride, head_channels=m.head_channels,
                                head_reduce=m.head_reduce, dilated=m.dilated, skip_stride=m.skip_stride,
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
        """Where the step-0 checkpoint shared with every run of the same base step lives."""
        return base_cache_path(self.cfg, self.train_set, self.train_scenario, self.method, self.dist.world)

    def loader(self, dataset: Dataset, batch_size: int, train: bool,
               batch_sampler: Optional[torch.utils.data.Sampler] = None) -> DataLoader:
        return batch_loader(dataset, batch_size, train, self.cfg, self.dist, self.device,
                            batch_sampler, self.method.name)

    def load_into(self, model: nn.Module, state: dict[str, Any], with_method: bool = True) -> nn.Module:
        """Load a checkpoint strictly, growing the classifier to its steps; `with_method=False`
        for a model that is not the one being trained (e.g. an old-model snapshot)."""
        return load_into(model, state, self.method if with_method else None)

    def load_step_model(self, step: int) -> nn.Module:
        """A fresh model holding the checkpoint of `step` of this run (for an old-model snapshot)."""
        state = load_checkpoint(self.run.step_ckpt(step))
        model = self.build_model(tuple(state["model_config"]["classes_per_step"][:1]))
        self.load_into(model, state, with_method=False)
        return model.to(self.device).eval()

    def train_phase(self, model: nn.Module, old_model: Optional[nn.Module], loader: DataLoader,
                    ctx: StepContext, phase: Phase, phase_idx: int, lr: float,
                    resume: Optional[dict]) -> None:
        def epoch_done(phase_idx: int, phase: Phase, epoch: int, means: dict[str, float],
                       opt: torch.optim.Optimizer, sched: Any) -> None:
            if not self.dist.main:
                return
            self.run.append_jsonl("losses.jsonl", {"step": ctx.step, "phase": phase.name,
                                                   "phase_index": phase_idx, "epoch": epoch, **means})
            self.log.scalars(f"step{ctx.step}/{phase.name}", means, epoch)
            save_checkpoint(self.run.last_ckpt, checkpoint_state(
                model, ctx.step, self.method, phase=phase_idx, epoch=epoch, optimizer=opt.state_dict(),
                scheduler=sched.state_dict(), run_wall_time_s=self.run_wall_time()))

        train_phase(model, old_model, loader, ctx, phase, phase_idx, lr, resume, method=self.method,
                    optim=self.cfg.optim, device=self.device,
                    show_progress=bool(self.cfg.progress and self.dist.main), seed=self.cfg.seed,
                    last_ckpt=self.run.last_ckpt, epoch_done=epoch_done)

    def run_wall_time(self) -> float:
        """Seconds this run has worked, over all its invocations (see RunDir.kept_wall_time)."""
        return self._wall_kept + time.time() - self._t0

    # -- the steps ----------------------------------------------------------------------------
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
        data = {"train": self.train_set.cache_key(), "test": self.test_set and self.test_set.cache_key()}
        changes = check_same_experiment(self.run, cfg, data)
        if self.dist.main:
            self.run.write_config(to_dict(cfg))
            self.run.write_meta(cfg.seed, {"world_size": self.dist.world, "data": data, "changes": changes,
                                           "uses_memory": self.method.uses_memory})
            if cfg.tensorboard:
                self.log.open_tensorboard(self.run.path / "tb")
        scn = self.train_scenario
        done = self.run.step_results()
        model = self.build_model((scn.classes_per_step[0],)).to(self.device)
        init_steps = (install_model_file(self.init_model, cfg.init_from, scn.classes_per_step, self.method,
                                         self.run, self.dist) if self.init_model is not None else 0)
        first, partial = resume_point(self.run, done, scn.num_steps, init_steps, trim=self.dist.main)
        if first > 0:
            self.load_into(model, load_checkpoint(self.run.step_ckpt(first - 1)))
            model.to(self.device)
        # wall time of the work kept from earlier invocations: the finished steps, and the part of
        # the next one saved in its partial checkpoint
        self._wall_kept = (float(partial["run_wall_time_s"]) if partial and "run_wall_time_s" in partial
                           else self.run.kept_wall_time(before_step=first))
        self._t0 = t0

        results = [StepMetrics.from_dict(r) for t, r in sorted(done.items()) if t < first and "iou" in r]
        for r in results:
            self.log.print(format_table([r]).splitlines()[-1] if r.step else format_table([r]))

        for step in range(first, scn.num_steps):
            if self.run.step_ckpt(step).is_file() and step not in done:
                # trained, then stopped before its evaluation was recorded: evaluate it, no retraining
                self.load_into(model, load_checkpoint(self.run.step_ckpt(step)))
                model.to(self.device)
                self.log.print(f"step {step}: trained in an earlier invocation; evaluating it")
            else:
                self.train_step(model, step, partial)
            partial = None
            if not self.evaluates:  # data.test_split "none": trained, checkpointed, not evaluated
                if self.dist.main:
                    self.run.append_jsonl("results.jsonl", {"step": step, "evaluated": False,
                                                            **self._clock(t0)})
                self.log.print(f"step {step}: trained (no evaluation set)")
                continue
            calibrators = self.evaluator.calibrate_step(model, step, self.calibration,
                                                        self.run.step_ckpt(step))
            res_t = self.evaluator.evaluate_full(model, step, calibrators, sweep="sweep" in self.calibration,
                                                 shared=self.base_cache_path() if cfg.reuse_base else None)
            results.append(res_t.raw)
            if self.dist.main:
                self.run.append_jsonl("results.jsonl", {**res_t.as_dict(), **self._clock(t0)})
                self.log.step_figures(res_t, step)
        res = RunResult(self.run.path, results, time.time() - t0, peak_rss_mb())
        if self.dist.main:
            self._write_summary(res)
        self.log.close()
        return res

    def _clock(self, t0: float) -> dict[str, Any]:
        """The fields every results row ends with: the method and the time spent so far."""
        return {"method": self.cfg.method, "wall_time_s": time.time() - t0,
                "run_wall_time_s": self.run_wall_time(), "uses_memory": self.method.uses_memory}

    def _write_summary(self, res: RunResult) -> None:
        cfg = self.cfg
        title = f"{cfg.method} on {cfg.data.dataset} {cfg.data.task} {cfg.data.setting}"
        (self.run.path / "table.txt").write_text(res.table(title) + "\n")
        history = [m.iou for m in res.steps]
        self.run.write_summary({
            "method": cfg.method, "uses_memory": self.method.uses_memory,
            "wall_time_s": res.wall_time_s, "run_wall_time_s": self.run_wall_time(),
            "peak_rss_mb": res.peak_rss_mb,
            # per class: IoU after the step that taught it minus IoU after the last step
            "forgetting": [None if f != f else f for f in forgetting(
                history, self.train_scenario.classes_per_step)] if len(res.steps) > 1 else [],
            "steps": [m.as_dict() for m in res.steps]})

    def train_step(self, model: nn.Module, step: int, partial: Optional[dict]) -> None:
        cfg = self.cfg
        scn = self.train_scenario
        core = unwrap(model)
        old_model = None
        seed_step(cfg.seed, step, "start")  # the new classifiers' initialisation
        if step > 0:
            old_model = frozen_copy(core)
            if scn.classes_per_step[step] > 0:  # domain-incremental steps add no class
                core.add_step(scn.classes_per_step[step])
            core.to(self.device)
        lr = cfg.optim.lr if step == 0 else cfg.optim.lr_next
        transform = train_transform(cfg)
        data = scn.train_dataset(step, transform)
        if len(data) == 0:
            raise ValueError(f"step {step} has no training image (task {cfg.data.task}, "
                             f"setting {cfg.data.setting}); choose another task or class order")
        data, batch_sampler = self.method.train_data(data, scn, step, transform,
                                                     cfg.optim.batch_size, cfg.seed, old_model)
        loader = self.loader(data, cfg.optim.batch_size, train=True, batch_sampler=batch_sampler)
        ctx = self.context(step, self.step_epochs(step), len(loader))
        if step > 0 and partial is None and ctx.num_new > 0:
            self.method.init_new_classifiers(core, old_model, ctx)
        if partial is not None:
            self.load_into(core, partial)

        base_path = self.base_cache_path() if step == 0 and cfg.reuse_base else None
        with base_step_lock(base_path if partial is None and not self.dist.enabled else None, self.log.print):
            dev_loader = DeviceLoader(loader, self.device)
            reused = base_path is not None and base_path.is_file() and partial is None
            if reused:
                self.load_into(core, load_checkpoint(base_path))
                self.log.print(f"step 0: reusing the base-step checkpoint {base_path}")
            else:
                seed_step(cfg.seed, step, "train")  # resumed or not, the same draws from here on
                self.method.on_step_start(core, old_model, dev_loader, ctx)
                train_model = wrap_ddp(core, self.device, cfg.sync_bn) if self.dist.enabled else core
                for i, phase in enumerate(self.method.phases(ctx)):
                    if partial is not None and partial["phase"] > i:
                        continue
                    self.train_phase(train_model, old_model, loader, ctx, phase, i, lr, partial)
                    partial = None
            if not reused or self.method.step_end_from_model():  # reused: what the shared file lacks
                seed_after_training(cfg.seed, step, loader)  # the same draws, trained or reused
                self.method.on_step_end(core, old_model, dev_loader, ctx)
            if base_path is not None and not reused and self.dist.main:
                save_checkpoint(base_path, shared_base_state(core, self.method))
        if self.dist.main:
            save_checkpoint(self.run.step_ckpt(step), checkpoint_state(core, step, self.method))
            self.run.last_ckpt.unlink(missing_ok=True)
        self.dist.barrier()


def train(cfg: RunConfig, run_dir: Optional[Path] = None) -> RunResult:
    return Experiment(cfg, run_dir).run_all()
