"""What a run measures after a step: the confusion matrix on the test split (unseen classes
relabelled background), the post-hoc calibrators fitted on the step's own images and stored in its
checkpoint (those that declare `needs_training` on a re-trained copy of the step's starting model),
the gamma sweep, and the nearest-prototype probe."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ciss.calibration import CALIBRATORS, Calibrator, GammaSweep, build_calibrator, tradeoff_curve
from ciss.config import RunConfig, stable_hash
from ciss.data.transforms import EvalTransform, Resized, TrainTransform
from ciss.engine.data import DeviceLoader, collate, progress_batches, size_batches, step_images
from ciss.engine.distributed import DistInfo, autocast_ctx, unwrap
from ciss.engine.seeding import derived_seed, seed_everything, seed_step
from ciss.methods import Method
from ciss.metrics import ConfusionMatrix, StepMetrics, format_table, predicted_labels, step_metrics
from ciss.models import inference_copy
from ciss.probe import class_means, ncm_logits
from ciss.results import atomic_write_text, dumps, load_checkpoint, loads, save_checkpoint
from ciss.scenario import Scenario, StepDataset
from ciss.types import Batch, StepContext


@dataclass
class EvalResult:
    """One evaluation after a step: the trained model's figures, then post-hoc variants of it."""

    raw: StepMetrics
    calibrated: dict[str, tuple[float, StepMetrics]] = field(default_factory=dict)  # name -> (gamma, figures)
    fit_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> what its fit measured
    sweep: Optional[dict[str, Any]] = None  # calibration.tradeoff_curve on the test images
    ncm: Optional[StepMetrics] = None  # nearest-prototype classifier on the same features

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.raw.as_dict())
        if self.calibrated:
            out["calibrated"] = {k: {"gamma": g, **m.as_dict(),
                                     **({"fit": self.fit_info[k]} if self.fit_info.get(k) else {})}
                                 for k, (g, m) in self.calibrated.items()}
        if self.sweep is not None:
            out["sweep"] = self.sweep
        if self.ncm is not None:
            out["ncm"] = self.ncm.as_dict()
        return out

    def lines(self) -> list[str]:
        """Table rows: raw, then one per variant, labelled."""
        def label(k: str, g: float) -> str:
            tune = self.fit_info.get(k, {}).get("tune_s")
            return f"+{k} (gamma {g:.3g}" + (f", fine-tune {tune:.1f} s)" if tune is not None else ")")

        rows = [("", self.raw)] + [(label(k, g), m) for k, (g, m) in self.calibrated.items()]
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


@dataclass
class StepEvaluator:
    """Evaluates and calibrates the models of one run's scenario."""

    cfg: RunConfig
    scenario: Scenario  # the one trained on
    num_base: int  # classes of step 0 of the task (background included), for mIoU old / new
    method: Method
    device: torch.device
    dist: DistInfo
    context: Callable[[int, int, int], StepContext]  # (step, epochs, iterations per epoch)
    step_model: Callable[[int], nn.Module]  # a fresh model holding a step's checkpoint

    def _batches(self, step: int, train: bool, desc: str) -> Iterable[Batch]:
        loader = step_images(self.scenario, step, train, self.cfg, self.dist)
        return progress_batches(loader, self.device, desc, bool(self.cfg.progress and self.dist.main))

    def decision_logits(self, model: nn.Module, ctx: StepContext) -> Any:
        def fn(image: torch.Tensor) -> torch.Tensor:
            with autocast_ctx(self.device, self.cfg.optim.amp):
                out = model(image)
            return self.method.eval_logits(out, ctx).float()
        return fn

    @torch.no_grad()
    def fit_calibrators(self, model: nn.Module, old_model: nn.Module, step: int,
                        names: list[str]) -> dict[str, Calibrator]:
        """Fit the named calibrators after `step` on the step's own training images (no old image):
        those that need no training in one pass of the model (and of the old model when one of them
        needs it); each that needs training on a re-trained copy of the step's starting model."""
        ctx = self.context(step, 0, 0)
        new_fn = self.decision_logits(inference_copy(model), ctx)
        old_fn = self.decision_logits(inference_copy(old_model), self.context(step - 1, 0, 0))
        cals = {name: build_calibrator(name) for name in names}
        active = [c for c in cals.values() if c.start(ctx)]
        plain = [c for c in active if not c.needs_training]
        if plain:
            need_old = any(c.needs_old for c in plain)
            for batch in self._batches(step, True, f"fit {', '.join(c.name for c in plain)} step {step}"):
                logits = new_fn(batch.image)
                old = old_fn(batch.image) if need_old else None
                for c in plain:
                    c.update(logits, batch.label, old)
            for c in plain:
                c.finish()
        for c in active:
            if c.needs_training:
                self._fit_retrained(c, old_model, old_fn, step)
        if self.dist.enabled:  # every rank applies rank 0's gammas (a re-training may differ across ranks)
            gammas = torch.tensor([c.gamma for c in cals.values()], dtype=torch.float64, device=self.device)
            dist.broadcast(gammas, src=0)
            for c, g in zip(cals.values(), gammas.tolist()):
                c.gamma = g
        return cals

    def step_start_model(self, old_model: nn.Module, step: int) -> nn.Module:
        """The model as `step` began: a copy of the old model grown by the step's classes, their
        rows initialised by the method; the step's seed redraws the random part as training drew it."""
        ctx = self.context(step, 0, 0)
        start = copy.deepcopy(old_model)
        seed_step(self.cfg.seed, step, "start")
        start.add_step(ctx.num_new)
        start.to(self.device)
        self.method.init_new_classifiers(start, old_model, ctx)
        return start

    def _step_half(self, step: int, transform: Any, rule: Callable[[int], bool], held_out: bool) -> StepDataset:
        data = self.scenario.train_dataset(step, transform)
        keep = np.array([rule(int(i)) == held_out for i in data.indices], dtype=bool)
        return StepDataset(data.data, data.indices[keep], data.lut, transform)

    def _fit_retrained(self, cal: Any, old_model: nn.Module, old_fn: Any, step: int) -> None:
        """Re-train a copy of the step's starting model on the images `cal.held_out` rejects, with
        the step's training augmentation and batch size, then stream the held-out images to `cal`
        with that copy's logits. Every rank does the same (the copy is not wrapped in DDP)."""
        cfg = self.cfg
        o = cfg.optim
        ctx = self.context(step, o.epochs if step == 0 or o.epochs_next is None else o.epochs_next, 0)
        train_tf = Resized(TrainTransform(cfg.data.crop_size, tuple(cfg.data.scale)), cfg.data.resize)
        part = self._step_half(step, train_tf, cal.held_out, held_out=False)
        held = self._step_half(step, Resized(EvalTransform(cfg.data.eval_size), cfg.data.resize),
                               cal.held_out, held_out=True)
        if len(part) == 0 or len(held) == 0:
            cal.info = {"skipped": f"{len(part)} images to fine-tune on, {len(held)} held out"}
            return
        g = torch.Generator()
        loader = DataLoader(part, batch_size=o.batch_size, shuffle=True, drop_last=len(part) > o.batch_size,
                            collate_fn=collate, generator=g, num_workers=cfg.data.num_workers,
                            pin_memory=self.device.type == "cuda")

        def epoch_batches(epoch: int) -> DeviceLoader:  # its own random stream, apart from training's
            s = derived_seed(cfg.seed, "calibration", cal.name, step, epoch)
            seed_everything(s)
            g.manual_seed(s)
            return DeviceLoader(loader, self.device)

        tuned = self.step_start_model(old_model, step)
        cal.tune(tuned, epoch_batches, ctx, o, lambda: autocast_ctx(self.device, o.amp))
        net = inference_copy(tuned)
        sizes = size_batches(held, o.eval_batch_size)
        held_loader = (DataLoader(held, batch_sampler=sizes, num_workers=cfg.data.num_workers, collate_fn=collate)
                       if sizes is not None else
                       DataLoader(held, batch_size=o.eval_batch_size, num_workers=cfg.data.num_workers,
                                  collate_fn=collate))
        show = bool(cfg.progress and self.dist.main)
        for batch in progress_batches(held_loader, self.device, f"fit {cal.name} step {step}", show):
            with autocast_ctx(self.device, o.amp):
                out = net(batch.image)
            cal.update(cal.tuned_logits(out, ctx), batch.label, old_fn(batch.image))
        cal.finish()
        cal.info["held_out_images"] = len(held)

    def step_calibrators(self, model: nn.Module, step: int, names: list[str],
                         state: dict[str, Any]) -> tuple[dict[str, Calibrator], bool]:
        """The named calibrators of `step` from its checkpoint `state`, fitting (and adding to
        `state`) those it lacks. Returns them and whether `state` changed."""
        names = [n for n in names if n in CALIBRATORS]
        if step == 0 or not names:
            return {}, False
        saved = dict(state.get("calibration", {}))
        # a stored fit of an older definition or other parameters is fitted again
        missing = [n for n in names if n not in saved or not build_calibrator(n).matches(saved[n])]
        if missing:
            fitted = self.fit_calibrators(unwrap(model), self.step_model(step - 1), step, missing)
            saved.update({n: c.state_dict() for n, c in fitted.items()})
            state["calibration"] = saved
        cals = {n: build_calibrator(n) for n in names}
        for n, c in cals.items():
            c.load_state_dict(saved[n])
        return cals, bool(missing)

    def calibrate_step(self, model: nn.Module, step: int, names: list[str],
                       ckpt: Path) -> dict[str, Calibrator]:
        """Fit the named calibrators after `step` (none at step 0) and store them in its checkpoint."""
        if step == 0 or not any(n in CALIBRATORS for n in names):
            return {}
        state = load_checkpoint(ckpt)
        cals, changed = self.step_calibrators(model, step, names, state)
        if changed and self.dist.main:
            save_checkpoint(ckpt, state)
        return cals

    @torch.no_grad()
    def step_prototypes(self, model: nn.Module, step: int) -> dict[int, torch.Tensor]:
        """Mean decoder feature of background and of each class the step teaches, on its own images."""
        model.eval()
        ctx = self.context(step, 0, 0)
        classes = [0] + list(range(ctx.num_old, ctx.num_seen)) if step > 0 else list(range(ctx.num_seen))
        return class_means(model, self._batches(step, True, f"prototypes step {step}"), classes)

    @torch.no_grad()
    def shared_result(self, base: Path) -> Path:
        """Where the evaluation of the shared step-0 checkpoint `base` is kept, under a key of all
        that decides its figures: the test images and labels, their sizes, the decision rule and
        the arithmetic (device, precision, layout, threads)."""
        rule = type(self.method).eval_logits
        key = {"test": self.scenario.test_data.cache_key() if self.scenario.test_data is not None else None,
               "eval_size": self.cfg.data.eval_size, "resize": self.cfg.data.resize,
               "rule": f"{rule.__module__}.{rule.__qualname__}", "extra": self.method.num_extra_outputs(),
               "device": self.device.type, "amp": self.cfg.optim.amp, "threads": torch.get_num_threads(),
               "channels_last": self.cfg.channels_last}
        return base.with_name(f"{base.stem}.eval-{stable_hash(key)}.json")

    def evaluate_full(self, model: nn.Module, step: int,
                      calibrators: Optional[dict[str, Calibrator]] = None, sweep: bool = False,
                      prototypes: Optional[dict[int, torch.Tensor]] = None,
                      shared: Optional[Path] = None) -> EvalResult:
        """The trained model's figures and, in the same pass, calibrated ones, the gamma sweep and
        the nearest-prototype probe (each only when asked). `shared`: the shared step-0 checkpoint
        the model holds; its plain evaluation is computed once and then read back."""
        kept = (self.shared_result(shared) if shared is not None and step == 0 and not calibrators
                and prototypes is None and not self.dist.enabled else None)
        if kept is not None and kept.is_file():
            row = loads(kept.read_text())
            return EvalResult(raw=StepMetrics(step=0, iou=[float("nan") if v is None else v for v in row["iou"]],
                                              num_base=row["num_base"], class_names=row.get("class_names")))
        result = self._evaluate(model, step, calibrators, sweep, prototypes)
        if kept is not None:
            atomic_write_text(kept, dumps(result.raw.as_dict()))
        return result

    def _evaluate(self, model: nn.Module, step: int, calibrators: Optional[dict[str, Calibrator]],
                  sweep: bool, prototypes: Optional[dict[int, torch.Tensor]]) -> EvalResult:
        core = inference_copy(unwrap(model))
        scn = self.scenario
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
            for batch in self._batches(step, False, f"eval step {step}"):
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
            fit_info={k: dict(c.info) for k, c in calibrators.items() if c.info},
            sweep=tradeoff_curve(sw) if sw is not None else None,
            ncm=step_metrics(ncm_cm, step, self.num_base, scn.class_names) if ncm_cm is not None else None)
