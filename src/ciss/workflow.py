"""Add classes to your own model: `fit` trains a first model from a folder, `extend` teaches a model
the classes of a new folder whose images label only them (the old classes are unlabelled background
there, and the old data may be gone). Both write a self-describing model file (ciss.modelfile) and
keep their run directory beside it (`MODEL.run/`), so an interrupted command resumes when rerun.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional, Sequence

from ciss.config import RunConfig, load_config
from ciss.data.errors import DataError
from ciss.data.folder import FolderDataset
from ciss.engine import Experiment
from ciss.methods import build_method
from ciss.modelfile import ModelFile, load_model
from ciss.results import git_sha

# The best method without memory on the ccp21 15-1 overlapped benchmark (cpu recipe):
# MiB, 17.11 mIoU over all classes after the last step (benchmarks/results/ccp21_15-1_methods*.md).
DEFAULT_METHOD = "mib"
# The smallest image side the backbones take: EfficientNet-Lite0 and ResNet downsample 32 times.
MIN_SIDE = 32


def run_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".run")


def check_folder(root: str | Path, split: str = "train") -> FolderDataset:
    """Open a folder dataset and check what training needs, before anything is written (label values
    are checked by the scenario's class-presence pass, which runs before the run directory exists)."""
    ds = FolderDataset(root, split)
    if len(ds) == 0:
        raise DataError(f"{ds.split_file} lists no image; add the ids of the training images")
    from ciss.data.base import header_size

    for i in range(len(ds)):
        w, h = header_size(ds.image_path(i), "image")
        if min(w, h) < MIN_SIDE:
            raise DataError(f"image {ds.image_path(i)} is {w}x{h}: the backbones need at least "
                            f"{MIN_SIDE} pixels a side; enlarge it or leave it out of {ds.split_file}")
    names = [n.strip().lower() for n in ds.own_classes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{root}/classes.txt names {dupes} on several lines (several label values): "
                        "give each class one line")
    return ds


def _val_split(val: Path) -> str:
    return "val" if (val / "splits" / "val.txt").is_file() else "train"


def _config(data: Path, out: Path, method: str, recipe: Optional[str], overrides: Sequence[str],
            val: Optional[Path]) -> RunConfig:
    cfg = load_config(None, list(overrides), recipe=recipe)
    cfg.method = method
    cfg.data.dataset = "folder"
    cfg.data.root = str(data.resolve())
    cfg.data.train_split = "train"
    if val is None:
        cfg.data.test_split = "none"
    else:
        cfg.data.test_root = str(val.resolve())
        cfg.data.test_split = _val_split(val)
    cfg.out_dir = str(out.parent.resolve())
    cfg.name = run_dir_for(out).name
    return cfg


def _model_file(exp: Experiment, lineage: list[dict]) -> ModelFile:
    mf = ModelFile.from_run(exp.run.path)
    mf.classes = list(exp.scenario.class_names)
    mf.lineage = lineage
    return mf


def _entry(step: int, classes: list[str], data: Path, method: str) -> dict:
    return {"step": step, "classes": classes, "data": str(data.resolve()), "method": method,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_sha() or ""}


def fit(data: str | Path, out: str | Path, method: str = DEFAULT_METHOD, recipe: Optional[str] = "cpu",
        overrides: Sequence[str] = (), val: Optional[str | Path] = None) -> tuple[ModelFile, Optional[dict]]:
    """Train a first model on every class of the folder `data`; write the model file `out`.

    `method` picks the step-0 training that later `extend` calls need (e.g. SSUL trains its own).
    Returns the model file and the validation figures (None without `val`).
    """
    data, out = Path(data), Path(out)
    ds = check_folder(data)
    if val is not None:
        v = Path(val)
        FolderDataset(v, _val_split(v), classes=list(ds.classes))  # names and headers
    build_method(method)  # an unknown method fails before anything is written
    cfg = _config(data, out, method, recipe, overrides, None if val is None else Path(val))
    cfg.data.options = {"classes": list(ds.classes)}  # the val folder's labels are matched by name
    cfg.data.task = [list(range(len(ds.classes)))]  # one step: background and every class
    cfg.data.setting = "overlapped"
    exp = Experiment(cfg)
    res = exp.run_all()
    mf = _model_file(exp, [_entry(0, list(ds.classes[1:]), data, method)])
    mf.save(out)
    return mf, (res.steps[-1].as_dict() if res.steps else None)


def extend(model: str | Path, data: str | Path, out: str | Path, method: str = DEFAULT_METHOD,
           recipe: Optional[str] = "cpu", overrides: Sequence[str] = (),
           val: Optional[str | Path] = None) -> tuple[ModelFile, Optional[dict]]:
    """Teach `model` the classes of the folder `data` (its classes.txt names them; classes it shares
    with the model by name keep the model's ids); write the model file `out` knowing the union.

    Returns the new model file and the validation figures (None without `val`).
    """
    data, out = Path(data), Path(out)
    parent = load_model(model)
    ds = check_folder(data)
    known = {n.strip().lower() for n in parent.classes}
    new = [n for n in ds.own_classes[1:] if n.strip().lower() not in known]
    if not new:
        raise DataError(f"{data}/classes.txt names no class the model does not know already "
                        f"({', '.join(parent.classes[1:])}); nothing to extend")
    union = list(parent.classes) + new
    if val is not None:
        v = Path(val)
        FolderDataset(v, _val_split(v), classes=union)  # names and headers
    m = build_method(method)
    if m.offline:
        raise ValueError(f"method '{method}' trains on every class at once and cannot extend a model")
    if m.uses_memory:
        raise ValueError(f"method '{method}' replays old images, which extend does not take; "
                         f"choose a method without memory (default: {DEFAULT_METHOD})")
    cfg = _config(data, out, method, recipe, overrides, None if val is None else Path(val))
    mc = parent.model_config
    cfg.model.backbone = mc["backbone"]
    cfg.model.output_stride = mc["output_stride"]
    cfg.model.head_channels = mc["head_channels"]
    cfg.model.head_reduce = int(mc.get("head_reduce", 0))
    cfg.model.dilated = bool(mc.get("dilated", True))
    cfg.model.skip_stride = int(mc.get("skip_stride", 0))
    cfg.model.pretrained = False  # every weight comes from the model file
    cfg.data.options = {"classes": union}
    if parent.resize is not None:
        cfg.data.resize = parent.resize
    # The model's own steps, then one step of the new classes; images need one of them to be used.
    steps, start = [], 0
    for n in mc["classes_per_step"]:
        steps.append(list(range(start, start + n)))
        start += n
    cfg.data.task = steps + [list(range(len(parent.classes), len(union)))]
    cfg.data.setting = "sequential"  # labelled old classes, if any, stay labelled
    cfg.init_from = str(Path(model).resolve())
    exp = Experiment(cfg)
    res = exp.run_all()
    step = len(steps)
    mf = _model_file(exp, list(parent.lineage) + [_entry(step, new, data, method)])
    mf.save(out)
    return mf, (res.steps[-1].as_dict() if res.steps else None)
