"""A self-describing model file: weights, architecture, class names, decision rule, preprocessing
and lineage in one plain-data file that loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch

from ciss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ciss.methods import Method, build_method
from ciss.models import build_segmenter
from ciss.models.segmenter import Segmenter
from ciss.results import RunDir, save_checkpoint
from ciss.types import SegOutput, StepContext

FORMAT = "ciss-model-v1"

_HOW_TO_MAKE = "model files are written by ciss.modelfile.ModelFile.from_run(<run dir>).save(<path>)"


@dataclass
class ModelFile:
    """Everything needed to segment images with a trained model, independent of its run directory."""

    classes: list[str]  # index = model label, classes[0] = background
    model_config: dict[str, Any]  # Segmenter.config()
    weights: dict[str, torch.Tensor]  # Segmenter.state_dict()
    method: str  # registry name whose eval_logits turns outputs into decision logits
    method_args: dict[str, Any]
    resize: Optional[int]  # shorter side the model was trained at; None = native size
    crop_size: int
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # of a [0, 1] RGB image
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    lineage: list[dict[str, Any]] = field(default_factory=list)  # one plain-data entry per step

    @property
    def classes_per_step(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.model_config["classes_per_step"])

    @property
    def step(self) -> int:
        return len(self.classes_per_step) - 1

    def build(self, device: str | torch.device = "cpu") -> Segmenter:
        """The segmenter with these weights, in eval mode."""
        model = build_segmenter(**self.model_config, pretrained=False)  # the weights are all here
        model.load_state_dict(self.weights, strict=True)
        return model.eval().to(device)

    def context(self, device: str | torch.device = "cpu") -> StepContext:
        """The last step's context, as the method saw it when evaluating."""
        per_step = self.classes_per_step
        return StepContext(step=len(per_step) - 1, classes_per_step=per_step,
                           num_steps=len(per_step), device=torch.device(device))

    @cached_property
    def _decider(self) -> Method:
        return build_method(self.method, **self.method_args)

    def decision_logits(self, out: SegOutput) -> torch.Tensor:
        """(B, num_classes, H, W) logits whose argmax is the prediction (e.g. SSUL folds its
        'unknown' output into the background)."""
        return self._decider.eval_logits(out, self.context(out.logits.device))

    def to_dict(self) -> dict[str, Any]:
        """The file's content: plain containers, strings, numbers and tensors only."""
        state = dataclasses.asdict(dataclasses.replace(self, weights={}))
        state["weights"] = {k: v.detach().cpu() for k, v in self.weights.items()}
        return {"format": FORMAT, **state}

    def save(self, path: str | Path) -> Path:
        """Write atomically (a crash never leaves a half-written file)."""
        path = Path(path)
        save_checkpoint(path, self.to_dict())
        return path

    def check(self, source: str | Path) -> None:
        """Class names agree with the classifier and the weights with the architecture, else a
        ValueError naming ``source``."""
        n = sum(self.classes_per_step)
        if len(self.classes) != n:
            raise ValueError(
                f"{source}: {len(self.classes)} class names for {n} classes (classes_per_step "
                f"{list(self.classes_per_step)}); the file is damaged or inconsistent; {_HOW_TO_MAKE}")
        try:
            with torch.device("meta"):  # shapes only, no memory, no initialisation cost
                want = build_segmenter(**self.model_config, pretrained=False).state_dict()
        except (KeyError, TypeError, ValueError) as exc:
            reason = exc.args[0] if exc.args else exc  # a KeyError's str() adds quotes
            raise ValueError(f"{source}: bad model_config ({reason}); the file is damaged or "
                             f"inconsistent; {_HOW_TO_MAKE}") from None
        missing = sorted(set(want) - set(self.weights))
        unexpected = sorted(set(self.weights) - set(want))
        wrong = sorted(k for k in set(want) & set(self.weights)
                       if tuple(want[k].shape) != tuple(self.weights[k].shape))
        if missing or unexpected or wrong:
            detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                               for what, keys in [("missing", missing), ("unexpected", unexpected),
                                                  ("wrong shape", wrong)] if keys)
            raise ValueError(f"{source}: the weights do not match its model_config ({detail}); the "
                             f"file is damaged or inconsistent; {_HOW_TO_MAKE}")

    @classmethod
    def from_run(cls, run_dir: str | Path, step: Optional[int] = None) -> "ModelFile":
        """The model of a run directory after its last trained step (or ``step``)."""
        run = RunDir(run_dir, create=False)
        ckpts = run.checkpointed_steps()
        if not ckpts:
            raise FileNotFoundError(f"{run_dir}: no step checkpoint yet; train first (ciss train)")
        if step is not None and step not in ckpts:
            raise FileNotFoundError(f"{run_dir}: no checkpoint for step {step}; have {ckpts}")
        step = ckpts[-1] if step is None else step
        state = run.step_state(step)
        cfg = run.read_config()
        data = cfg.get("data") or {}
        model_config = dict(state["model_config"])
        per_step = [int(n) for n in model_config["classes_per_step"]]
        n = sum(per_step)
        # Every evaluation record carries a prefix of the same scenario class list: take the longest.
        names = max((r.get("class_names") or [] for r in run.step_results().values()), key=len,
                    default=[])
        classes = [str(c) for c in names[:n]] if len(names) >= n else [str(i) for i in range(n)]
        meta_path = run.path / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        lineage, first = [], 0
        for t, k in enumerate(per_step):
            ckpt = run.step_ckpt(t)
            date = (time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ckpt.stat().st_mtime))
                    if ckpt.is_file() else meta.get("started", ""))
            lineage.append({"step": t, "classes": classes[first : first + k],
                            "dataset": data.get("dataset"), "data": data.get("root"),
                            "method": cfg["method"], "date": date, "git": meta.get("git_sha") or ""})
            first += k
        mf = cls(classes=classes, model_config=model_config, weights=dict(state["model"]),
                 method=cfg["method"], method_args=dict(cfg.get("method_args") or {}),
                 resize=data.get("resize"), crop_size=int(data["crop_size"]),
                 lineage=lineage)
        mf.check(run.step_ckpt(step))
        return mf


def load_model(path: str | Path) -> ModelFile:
    """A model file, or the model of a run directory (a folder holding config.yaml)."""
    path = Path(path)
    if path.is_dir() and (path / "config.yaml").is_file():
        return ModelFile.from_run(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory but not a ciss run directory (no config.yaml); "
                                f"pass a model file or a run directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file (not a ciss model file, not a ciss run "
                                f"directory); check the path")
    try:
        # weights_only: never unpickle arbitrary objects, which could run code
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise ValueError(f"{path}: not a ciss model file (or it holds arbitrary Python objects, which "
                         f"ciss refuses to load); {_HOW_TO_MAKE}") from None
    if not isinstance(raw, dict) or "format" not in raw:
        raise ValueError(f"{path}: not a ciss model file (no 'format' entry); {_HOW_TO_MAKE}")
    if raw["format"] != FORMAT:
        hint = ("it is a training checkpoint: pass its run directory instead"
                if str(raw["format"]).startswith("ciss-checkpoint") else
                f"this ciss reads '{FORMAT}': use the ciss version that wrote it, or re-export")
        raise ValueError(f"{path}: format '{raw['format']}' is not a ciss model file; {hint}")
    fields = [f.name for f in dataclasses.fields(ModelFile)]
    missing = [k for k in fields if k not in raw]
    if missing:
        raise ValueError(f"{path}: the model file lacks {', '.join(missing)}; it is damaged; "
                         f"{_HOW_TO_MAKE}")
    if not (isinstance(raw["model_config"], dict) and "classes_per_step" in raw["model_config"]
            and isinstance(raw["weights"], dict) and isinstance(raw["classes"], list)
            and all(isinstance(v, torch.Tensor) for v in raw["weights"].values())):
        raise ValueError(f"{path}: malformed model file (classes, model_config or weights of the "
                         f"wrong type); it is damaged; {_HOW_TO_MAKE}")
    mf = ModelFile(**{k: raw[k] for k in fields})
    mf.check(path)
    return mf
