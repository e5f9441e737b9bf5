"""What a run measures after a step: the confusion matrix on the test split (unseen classes
relabelled background), the post-hoc calibrators fitted on the step's own images and stored in its
checkpoint, the gamma sweep, and the nearest-prototype probe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ciss.calibration import CALIBRATORS, Calibrator, GammaSweep, build_calibrator, tradeoff_curve
from ciss.config import RunConfig, stable_hash
from ciss.engine.data import progress_batches, step_images
from ciss.engine.distributed import DistInfo, autocast_ctx, unwrap
from ciss.methods import Method
from ciss.metrics import ConfusionMatrix, StepMetrics, format_table, predicted_labels, step_metrics
from ciss.models import inference_copy
from ciss.probe import class_means, ncm_logits
from ciss.results import atomic_write_text, dumps, load_checkpoint, loads, save_checkpoint
from ciss.scenario import Scenario
from ciss.types import Batch, StepContext


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
        """Fit the named calibrators after `step` on the step's own training images (no old image),
        in one pass of the model (and of the old model when one of them needs it)."""
        ctx = self.context(step, 0, 0)
        new_fn = self.decision_logits(inference_copy(model), ctx)
        old_fn = self.decision_logits(inference_copy(old_model), self.context(step - 1, 0, 0))
        cals = {name: build_calibrator(name) for name in names}
        active = [c for c in cals.values() if c.start(ctx)]
        if active:
            need_old = any(c.needs_old for c in active)
            for batch in self._batches(step, True, f"fit {', '.join(names)} step {step}"):
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
            sweep=tradeoff_curve(sw) if sw is not None else None,
            ncm=step_metrics(ncm_cm, step, self.num_base, scn.class_names) if ncm_cm is not None else None)
