"""What a run measures after a step: the confusion matrix on the test split (unseen classes
relabelled background), the post-hoc calibrators fitted on the step's own images and stored in its
checkpoint (those that declare `needs_training` on a re-trained copy of the step's starting model),
the gamma sweep, and the nearest-prototype probe."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ciss.calibration import CALIBRATORS, Calibrator, GammaSweep, apply_gamma, build_calibrator, tradeoff_curve
from ciss.config import RunConfig, stable_hash
from ciss.engine.calibration_training import fit_retrained
from ciss.engine.data import progress_batches, step_images
from ciss.engine.distributed import DistInfo, autocast_ctx, unwrap
from ciss.engine.seeding import seed_step
from ciss.methods import Method
from ciss.metrics import ConfusionMatrix, StepMetrics, format_table, predicted_labels, step_metrics
from ciss.models import inference_copy
from ciss.probe import class_means, ncm_logits
from ciss.results import RunDir, atomic_write_text, dumps, load_checkpoint, loads, save_checkpoint
from ciss.scenario import Scenario
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
    # the method's state stored in a step's checkpoint (for a calibrator that trains the method)
    step_method_state: Optional[Callable[[int], dict[str, Any]]] = None

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
                        names: list[str] | dict[str, Calibrator],
                        old_gammas: Optional[dict[str, float]] = None) -> dict[str, Calibrator]:
        """Fit calibrators after `step` on the step's own training images (no old image): those
        that need no training in one pass of the model (and of the old model when one of them needs
        it); those that need training on a re-trained copy of the step's starting model, one copy
        per training setup. `names`: registry names, or label -> calibrator; `old_gammas`: per label
        of a calibrator reading the old model calibrated, its gamma after step - 1."""
        ctx = self.context(step, 0, 0)
        num_prev = self.context(step - 1, 0, 0).num_old  # the old model's absent classes
        new_fn = self.decision_logits(inference_copy(model), ctx)
        raw_old_fn = self.decision_logits(inference_copy(old_model), self.context(step - 1, 0, 0))
        cals = dict(names) if isinstance(names, dict) else {n: build_calibrator(n) for n in names}
        old_gamma = {k: (old_gammas or {}).get(k, 0.0) if c.reads_calibrated_old else 0.0
                     for k, c in cals.items()}

        def old_of(k: str, old: torch.Tensor) -> torch.Tensor:
            return apply_gamma(old, old_gamma[k], num_prev) if old_gamma[k] else old

        active = {k: c for k, c in cals.items() if c.start(ctx)}
        plain = {k: c for k, c in active.items() if not c.needs_training}
        if plain:
            need_old = any(c.needs_old for c in plain.values())
            for batch in self._batches(step, True, f"fit {', '.join(plain)} step {step}"):
                logits = new_fn(batch.image)
                old = raw_old_fn(batch.image) if need_old else None
                for k, c in plain.items():
                    c.update(logits, batch.label, old_of(k, old) if old is not None else None)
            for c in plain.values():
                c.finish()
        setups: dict[Any, dict[str, Calibrator]] = {}
        for k, c in active.items():
            if c.needs_training:
                setups.setdefault(c.training_key(), {})[k] = c  # type: ignore[attr-defined]
        o = self.cfg.optim
        tune_ctx = self.context(step, o.epochs if o.epochs_next is None else o.epochs_next, 0)
        for group in setups.values():
            own = next(iter(group.values())).trains_method
            if own and self.step_method_state is None:
                raise ValueError(f"{', '.join(group)}: this evaluator cannot read the method's stored state")
            fit_retrained(group, self.step_start_model(old_model, step), raw_old_fn, old_of, tune_ctx,
                          self.cfg, self.scenario, self.device, show=bool(self.cfg.progress and self.dist.main),
                          method=self.method if own else None, old_model=old_model if own else None,
                          method_state=self.step_method_state(step - 1) if own else None)  # type: ignore[misc]
        for k, c in active.items():
            if c.reads_calibrated_old:
                c.info["old_gamma"] = old_gamma[k]
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

    def step_calibrators(self, model: Optional[nn.Module], step: int, names: list[str],
                         state: dict[str, Any], ckpt: Optional[Path] = None
                         ) -> tuple[dict[str, Calibrator], bool]:
        """The named calibrators of `step` from its checkpoint `state` (stored at `ckpt`), fitting
        (and adding to `state`) those it lacks; `model` None: the step's checkpoint is loaded if a fit
        is needed. Returns them and whether `state` changed."""
        names = [n for n in names if n in CALIBRATORS]
        if step == 0 or not names:
            return {}, False
        saved = dict(state.get("calibration", {}))
        # a stored fit of an older definition or other parameters is fitted again
        missing = [n for n in names if n not in saved or not build_calibrator(n).matches(saved[n])]
        if missing:
            previous = self.previous_gammas(step, missing, ckpt)
            core = unwrap(model) if model is not None else self.step_model(step)
            fitted = self.fit_calibrators(core, self.step_model(step - 1), step, missing, previous)
            saved.update({n: c.state_dict() for n, c in fitted.items()})
            state["calibration"] = saved
        cals = {n: build_calibrator(n) for n in names}
        for n, c in cals.items():
            c.load_state_dict(saved[n])
        return cals, bool(missing)

    def previous_gammas(self, step: int, names: list[str], ckpt: Optional[Path]) -> dict[str, float]:
        """The gamma after step - 1 of each named calibrator that reads the old model calibrated,
        from that step's checkpoint beside `ckpt` (fitted there first, and stored, when it lacks it)."""
        chained = [n for n in names if build_calibrator(n).reads_calibrated_old]
        if step < 2 or not chained:
            return {}
        if ckpt is None:
            raise ValueError(f"{', '.join(chained)} after step {step} read the previous step's fit: "
                             "give the step's checkpoint path (ckpt=...)")
        previous = RunDir(ckpt.parent.parent, create=False).step_ckpt(step - 1)
        cals = self.calibrate_step(None, step - 1, chained, previous)
        return {n: c.gamma for n, c in cals.items()}

    def calibrate_step(self, model: Optional[nn.Module], step: int, names: list[str],
                       ckpt: Path) -> dict[str, Calibrator]:
        """Fit the named calibrators after `step` (none at step 0) and store them in its checkpoint;
        `model` None: loaded from it when a fit is needed."""
        if step == 0 or not any(n in CALIBRATORS for n in names):
            return {}
        state = load_checkpoint(ckpt)
        cals, changed = self.step_calibrators(model, step, names, state, ckpt)
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
            return EvalResult(raw=StepMetrics.from_dict(row))
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
