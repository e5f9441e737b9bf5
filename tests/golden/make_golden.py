#!/usr/bin/env python
"""Regenerate the golden files read by tests/test_golden_*.py from the official implementations.

    python tests/golden/make_golden.py --mib DIR --plop DIR --rcil DIR --ssul DIR --nest DIR \
        [--out tests/golden] [--only NAME ...]

Each DIR is a clone of the official repository (a work tree or a bare git directory):

    --mib   fcdl94/MiB                      --plop  arthurdouillard/CVPR2021_PLOP
    --rcil  zhangchbin/RCIL                 --ssul  clovaai/SSUL
    --nest  zhengyuan-xie/ECCV24_NeST

Nothing of those repositories is copied here. Their source files are read from the checked-out commit
(`git show HEAD:<path>`) and executed at run time as modules, with the heavy dependencies they import
but the functions used here never call (apex, inplace_abn, their model zoos, Grad-CAM) replaced by empty
stand-ins. The official functions then run on seeded inputs (small shapes, float64 where the official
code keeps the dtype it is given), and the inputs, the outputs and the commit are written as JSON.

Official training loops (MiB's and PLOP's Trainer.train) are run as they are, on a model that replays
fixed outputs; the loss terms they compute are read from the loop's local variables when it returns
(sys.settrace), so the composition of every term (factors, reductions) is the official one.

Needs torch, numpy, pillow and torchvision (SSUL's transforms and NeST's class selection import it;
only its Python transforms run, so the registrations of its compiled operators are skipped when they
cannot load). Run it from any directory; it writes only under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

F64 = torch.float64
HERE = Path(__file__).resolve().parent


# ---- reading and executing the official code --------------------------------------------------

class Official:
    """One official repository at its checked-out commit."""

    def __init__(self, path: str, slug: str) -> None:
        p = Path(path).expanduser().resolve()
        if (p / ".git").exists():
            git_dir = p / ".git"
        elif (p / "HEAD").is_file() and (p / "objects").is_dir():
            git_dir = p
        else:
            raise SystemExit(f"{path}: not a git work tree nor a bare git directory ({slug})")
        self.git_dir = str(git_dir)
        self.slug = slug
        self.commit = self._git("rev-parse", "HEAD").strip()

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", f"--git-dir={self.git_dir}", *args], check=True,
                              capture_output=True, text=True).stdout

    def source(self, rel: str) -> str:
        return self._git("show", f"{self.commit}:{rel}")

    def meta(self, *functions: str) -> dict:
        return {"repository": self.slug, "commit": self.commit, "functions": list(functions)}


_REGISTERED: list[str] = []  # module names installed by stub() and load(), dropped by sandbox()


def _register(name: str, mod: types.ModuleType) -> None:
    _REGISTERED.append(name)
    sys.modules[name] = mod


def stub(name: str, **attrs) -> types.ModuleType:
    """An empty stand-in module registered in sys.modules (a package if it has submodules)."""
    mod = types.ModuleType(name)
    mod.__path__ = []  # importable as a package
    mod.__dict__.update(attrs)
    _register(name, mod)
    if "." in name:
        parent, _, leaf = name.rpartition(".")
        setattr(sys.modules[parent], leaf, mod)
    return mod


def load(repo: Official, rel: str, name: str, patch: tuple[str, str] | None = None) -> types.ModuleType:
    """Execute `rel` of the official repository as module `name` (registered in sys.modules).

    patch: (old, new) replaced once in the source, for the one documented correction (PLOP's median).
    """
    src = repo.source(rel)
    if patch is not None:
        if src.count(patch[0]) != 1:
            raise SystemExit(f"{repo.slug}:{rel}: expected exactly one {patch[0]!r} to patch")
        src = src.replace(patch[0], patch[1])
    mod = types.ModuleType(name)
    mod.__file__ = f"{repo.slug}@{repo.commit[:12]}:{rel}"
    _register(name, mod)
    if "." in name:
        parent, _, leaf = name.rpartition(".")
        setattr(sys.modules[parent], leaf, mod)
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


@contextlib.contextmanager
def sandbox():
    """Modules registered inside are dropped afterwards (the repositories reuse names: utils, tasks)."""
    start = len(_REGISTERED)
    try:
        yield
    finally:
        for k in _REGISTERED[start:]:
            sys.modules.pop(k, None)
        del _REGISTERED[start:]


def stub_apex() -> None:
    @contextlib.contextmanager
    def scale_loss(loss, optimizer):
        yield loss

    stub("apex")
    stub("apex.amp", scale_loss=scale_loss)
    stub("apex.parallel", DistributedDataParallel=nn.Module)


def stub_model_zoo() -> None:
    """segmentation_module.py imports these at the top; the functions run here use none of them."""
    class _ABN(nn.Module):
        pass

    stub("inplace_abn", ABN=_ABN, InPlaceABN=_ABN, InPlaceABNSync=_ABN)
    stub("models")
    stub("models.swin")
    stub("modules", DeeplabV3=nn.Module, VisionTransformer=nn.Module, VisionTransformerUpHead=nn.Module)


def load_utils(repo: Official) -> None:
    """The repository's utils.loss and utils.regularizer under a bare `utils` package (its __init__
    also imports schedulers and loggers that are not needed)."""
    stub("utils")
    load(repo, "utils/loss.py", "utils.loss")
    reg = load(repo, "utils/regularizer.py", "utils.regularizer")
    sys.modules["utils"].get_regularizer = reg.get_regularizer


def official_opts(repo: Official, *args: str) -> argparse.Namespace:
    """Options exactly as the official argparser and its method presets make them."""
    load(repo, "tasks.py", "tasks")
    ap = load(repo, "argparser.py", "argparser")
    return ap.modify_command_options(ap.get_argparser().parse_args(list(args)))


def import_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # its compiled operators could not be registered; the transforms need none
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401


def init_single_process_group() -> None:
    """The official loops reduce their statistics with torch.distributed: one local process."""
    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(prefix="golden-dist-"), "init")
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


def locals_at_return(fn, code: types.CodeType, *args, **kwargs) -> tuple[object, dict]:
    """Call fn; return its result and the local variables of the frame running `code` when it returned."""
    captured: dict = {}

    def local_tracer(frame, event, arg):
        if event == "return":
            captured.update(frame.f_locals)
        return local_tracer

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is code:
            return local_tracer
        return None

    sys.settrace(tracer)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.settrace(None)
    if not captured:
        raise RuntimeError(f"{code.co_name} did not run")
    return result, captured


# ---- replayed model, loader, logger for the official training loops -------------------------------

class Replay(nn.Module):
    """A model that returns fixed (outputs, features); the images tensor carries the batch number.

    Its one parameter (zero) is added to every float output so the official loops can backward.
    `module` holds the attributes the official code reads from a DDP-wrapped model.
    """

    def __init__(self, replies: list, **module_attrs) -> None:
        super().__init__()
        self.tie = nn.Parameter(torch.zeros((), dtype=F64))
        self.replies = replies
        self.module = SimpleNamespace(**module_attrs)
        self.in_eval = False

    def forward(self, images, ret_intermediate=False, **kwargs):
        out, feats = self.replies[int(images.reshape(-1)[0].item())]

        def tie(x):
            return x + self.tie.to(x.dtype) if x.is_floating_point() else x

        feats = {k: [tie(v) for v in val] if isinstance(val, list) else tie(val) for k, val in feats.items()}
        return tie(out), feats


class Loader:
    def __init__(self, labels: list) -> None:
        self.labels = labels
        self.sampler = SimpleNamespace(set_epoch=lambda epoch: None)

    def __iter__(self):
        for k, lab in enumerate(self.labels):  # clones: the official loops relabel in place
            yield torch.full((lab.shape[0], 1, 2, 2), float(k)), lab.clone()

    def __len__(self) -> int:
        return len(self.labels)


LOGGER = SimpleNamespace(info=lambda *a, **k: None, debug=lambda *a, **k: None,
                         add_scalar=lambda *a, **k: None)


def run_official_train(trainer, loader: Loader, model: Replay) -> dict:
    optim = torch.optim.SGD([model.tie], lr=0.0)
    _, loc = locals_at_return(trainer.train, type(trainer).train.__code__, 0, optim, loader,
                              print_int=10 ** 9, logger=LOGGER)
    return loc


# ---- serialisation ----------------------------------------------------------------------------

def arr(x) -> dict:
    t = torch.as_tensor(x).detach().cpu()
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
            "data": t.reshape(-1).tolist()}


def num(x) -> float:
    return float(torch.as_tensor(x).detach().double().item())


def dumps(obj, pad: str = "") -> str:
    """JSON with one key per line and every list of numbers on one line (floats written exactly)."""
    inner = pad + " "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def write(out: Path, name: str, doc: dict) -> None:
    path = out / f"{name}.json"
    path.write_text(dumps(doc) + "\n")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def labels_from(g: torch.Generator, shape, values, probs) -> torch.Tensor:
    idx = torch.multinomial(torch.tensor(probs, dtype=F64), int(np.prod(shape)), replacement=True,
                            generator=g)
    return torch.tensor(values)[idx].reshape(shape)


# ---- MiB: loss functions -------------------------------------------------------------------------

def mib_losses(mib: Official) -> dict:
    seed = 2101
    g = gen(seed)
    b, c_old, c_new, h, w = 2, 4, 2, 5, 4
    logits = torch.randn(b, c_old + c_new, h, w, generator=g, dtype=F64) * 2
    old = torch.randn(b, c_old, h, w, generator=g, dtype=F64) * 2
    # 1..3: old labels (the unbiased CE folds them into background), 4, 5: new, 255: ignored.
    label = labels_from(g, (b, h, w), [0, 1, 2, 3, 4, 5, 255], [.35, .05, .05, .05, .2, .2, .1])
    with sandbox():
        L = load(mib, "utils/loss.py", "mib_loss")
        outputs = {
            "unce_mean": num(L.UnbiasedCrossEntropy(old_cl=c_old, reduction="mean")(logits, label)),
            "unce_none": arr(L.UnbiasedCrossEntropy(old_cl=c_old, reduction="none")(logits, label)),
            "bce_mean": num(L.BCEWithLogitsLossWithIgnoreIndex(reduction="mean")(logits, label)),
        }
        for alpha in (1.0, 2.0):
            outputs[f"kd_alpha{alpha:g}"] = num(L.KnowledgeDistillationLoss(alpha=alpha)(logits, old))
            outputs[f"unkd_alpha{alpha:g}"] = num(
                L.UnbiasedKnowledgeDistillationLoss(alpha=alpha)(logits, old))
    return {
        "official": mib.meta("utils/loss.py: UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss, "
                             "KnowledgeDistillationLoss, BCEWithLogitsLossWithIgnoreIndex"),
        "seed": seed, "num_old": c_old,
        "inputs": {"logits": arr(logits), "old_logits": arr(old), "label": arr(label)},
        "outputs": outputs,
    }


# ---- MiB: the training loop's loss terms for LwF, ILT, LwF-MC and MiB ---------------------------------

def mib_trainer(mib: Official) -> dict:
    seed = 2102
    g = gen(seed)
    b, c_old, c_new, h, w, d = 2, 4, 2, 6, 6, 5
    logits = torch.randn(b, c_old + c_new, h, w, generator=g, dtype=F64) * 2
    old_logits = torch.randn(b, c_old, h, w, generator=g, dtype=F64) * 2
    body_old = torch.randn(b, d, 3, 3, generator=g, dtype=F64)
    body = body_old + 0.3 * torch.randn(b, d, 3, 3, generator=g, dtype=F64)
    # A step of the disjoint/overlapped settings: background, the two new classes, ignored pixels.
    label = labels_from(g, (b, h, w), [0, 4, 5, 255], [.5, .2, .2, .1])
    methods = {}
    with sandbox():
        stub_apex()
        load_utils(mib)
        T = load(mib, "train.py", "mib_train")
        init_single_process_group()
        for method in ("LWF", "ILT", "LWF-MC", "MiB"):
            opts = official_opts(mib, "--method", method, "--dataset", "voc")
            model = Replay([(logits, {"body": body})])
            model_old = Replay([(old_logits, {"body": body_old})])
            trainer = T.Trainer(model, model_old, "cpu", opts, classes=[c_old, c_new])
            loc = run_official_train(trainer, Loader([label]), model)
            methods[method] = {
                "preset": {k: getattr(opts, k) for k in ("loss_kd", "loss_de", "unce", "unkd", "icarl",
                                                         "icarl_importance", "alpha", "init_balanced")},
                "ce": num(loc["loss"]), "lkd": num(loc["lkd"]), "lde": num(loc["lde"]),
                "l_icarl": num(loc["l_icarl"]),
            }
    return {
        "official": mib.meta("train.py: Trainer.train (one batch) with argparser.py's method presets"),
        "seed": seed, "classes": [c_old, c_new],
        "inputs": {"logits": arr(logits), "old_logits": arr(old_logits), "body": arr(body),
                   "body_old": arr(body_old), "label": arr(label)},
        "outputs": methods,
    }


# ---- MiB: init_balanced -----------------------------------------------------------------------------

def mib_init_balanced(mib: Official) -> dict:
    seed = 2103
    g = gen(seed)
    d, classes = 5, [3, 2, 2]
    with sandbox():
        stub_model_zoo()
        S = load(mib, "segmentation_module.py", "mib_segmentation_module")
        model = S.IncrementalSegmentationModule(nn.Identity(), nn.Identity(), d, classes=list(classes)).double()
        with torch.no_grad():
            for conv in model.cls:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=F64))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=F64))
        before = [(arr(c.weight[:, :, 0, 0]), arr(c.bias)) for c in model.cls]
        model.init_new_classifier("cpu")
        after = {"new_weight": arr(model.cls[-1].weight[:, :, 0, 0]), "new_bias": arr(model.cls[-1].bias),
                 "background_bias": num(model.cls[0].bias[0]),
                 "old_weights": [arr(c.weight[:, :, 0, 0]) for c in model.cls[:-1]],
                 "old_biases": [arr(c.bias) for c in model.cls[:-1]]}
    return {
        "official": mib.meta("segmentation_module.py: IncrementalSegmentationModule.init_new_classifier"),
        "seed": seed, "head_channels": d, "classes": classes,
        "inputs": {"weights": [w for w, _ in before], "biases": [bb for _, bb in before]},
        "outputs": after,
    }


# ---- MiB: the EWC penalty -----------------------------------------------------------------------------

class _Params(nn.Module):
    def __init__(self, shapes: dict, g: torch.Generator) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=g, dtype=F64)))


def mib_ewc(mib: Official) -> dict:
    seed = 2104
    g = gen(seed)
    old_shapes = {"conv": (3, 2, 2), "bias": (3,), "frozen": (4,)}
    model_old = _Params(old_shapes, g)
    # The current model: the old parameters moved, one frozen, one new classifier without old value.
    model = _Params({**old_shapes, "new_cls": (2, 3)}, g)
    with torch.no_grad():
        for n, p in model_old.named_parameters():
            getattr(model, n).copy_(p + 0.2 * torch.randn(p.shape, generator=g, dtype=F64))
    model.frozen.requires_grad_(False)
    fisher = {n: torch.rand(s, generator=g, dtype=F64) * 3 for n, s in old_shapes.items()}
    outputs = {}
    with sandbox():
        R = load(mib, "utils/regularizer.py", "mib_regularizer")
        for normalize in (True, False):
            ewc = R.EWC(model, model_old, "cpu", fisher=copy.deepcopy(fisher), alpha=0.9, normalize=normalize)
            outputs[f"penalty_normalize_{normalize}"] = num(ewc.penalty())
        opts = official_opts(mib, "--method", "EWC")
        preset = {k: getattr(opts, k) for k in ("regularizer", "reg_importance", "reg_alpha", "reg_no_normalize")}
    return {
        "official": mib.meta("utils/regularizer.py: EWC.penalty (normalize_fn on the stored Fisher)",
                             "argparser.py: method EWC preset"),
        "seed": seed, "preset": preset, "frozen": ["frozen"], "new": ["new_cls"],
        "inputs": {"old": {n: arr(p) for n, p in model_old.named_parameters()},
                   "current": {n: arr(p) for n, p in model.named_parameters()},
                   "fisher": {n: arr(f) for n, f in fisher.items()}},
        "outputs": outputs,
    }


# ---- PLOP ------------------------------------------------------------------------------------------

# The official find_median adds the bin index, not the bin's count, to its running sum. Regenerated
# both as the official code runs and with that one line corrected, which is what ciss computes.
PLOP_MEDIAN_FIX = ("running_sum += lower_border * nb_bins", "running_sum += histograms[c, bin_index]")


def _maps(g, b, shapes, scale=1.0):
    return [torch.randn(b, *s, generator=g, dtype=F64) * scale for s in shapes]


def plop(plop_repo: Official) -> dict:
    seed = 2105
    g = gen(seed)
    b, c_old, c_new, h = 2, 4, 2, 8
    c_seen = c_old + c_new
    # Backbone stages (strides 4, 8, 16, 16 of a 32x32 image), the decoder output, then the low-res logits.
    shapes = [(4, 8, 8), (6, 4, 4), (8, 4, 4), (8, 4, 4), (8, 4, 4)]
    att_old = _maps(g, b, shapes)
    att_new = [a + 0.3 * torch.randn(a.shape, generator=g, dtype=F64) for a in att_old]
    small_old = torch.randn(b, c_old, 4, 4, generator=g, dtype=F64) * 2
    small_new = torch.randn(b, c_seen, 4, 4, generator=g, dtype=F64) * 2
    # Old-model outputs of two batches (float32, as the models run), new-model outputs of the first.
    outs_old = [torch.randn(b, c_old, h, h, generator=g) * 2.5 for _ in range(2)]
    logits = torch.randn(b, c_seen, h, h, generator=g, dtype=F64) * 2
    labels = [labels_from(g, (b, h, h), [0, 4, 5, 255], [.6, .15, .15, .1]) for _ in range(2)]

    def replies_old():
        feats = {"attentions": list(att_old), "sem_logits_small": small_old}
        return [(o, feats) for o in outs_old]

    res = {}
    with sandbox():
        stub_apex()
        load_utils(plop_repo)
        init_single_process_group()
        opts = official_opts(plop_repo, "--method", "PLOP", "--dataset", "voc")
        for tag, patch in (("official", None), ("fixed", PLOP_MEDIAN_FIX)):
            T = load(plop_repo, "train.py", f"plop_train_{tag}", patch=patch)
            model = Replay([(logits, {"attentions": list(att_new), "sem_logits_small": small_new})],
                           in_eval=False)
            model_old = Replay(replies_old())
            trainer = T.Trainer(model, model_old, "cpu", opts, classes=[c_old, c_new], step=1)
            trainer.before(Loader(labels), LOGGER)
            res[f"thresholds_{tag}"] = arr(trainer.thresholds)
            res[f"max_entropy_{tag}"] = num(trainer.max_entropy)
            if tag == "fixed":  # the training step runs with the corrected thresholds
                loc = run_official_train(trainer, Loader(labels[:1]), model)
                res["train"] = {"pseudo_labels": arr(loc["labels"]),
                                "classif_adaptive_factor": arr(loc["classif_adaptive_factor"].reshape(-1)),
                                "ce": num(loc["loss"]), "pod": num(loc["pod_loss"])}
                probs = torch.softmax(outs_old[0].double(), dim=1)
                res["entropy"] = {"probs": arr(probs), "entropy": arr(T.entropy(probs))}
                # Each map alone: the plain local POD distance (factor 1, no schedule, no options).
                res["pod_per_map"] = [num(T.features_distillation(
                    [a], [n], collapse_channels="local", labels=labels[0], index_new_class=c_old,
                    pod_factor=1.0, prepro="pow", spp_scales=[1, 2, 4], pod_options=None,
                    use_pod_schedule=False)) for a, n in zip(att_old + [small_old], att_new + [small_new])]
                # The preset without pod_logits: the switch.after factor goes to the decoder output.
                res["pod_without_logits"] = num(T.features_distillation(
                    list(att_old), list(att_new), collapse_channels=opts.pod, labels=labels[0],
                    index_new_class=c_old, pod_factor=opts.pod_factor, prepro=opts.pod_prepro,
                    spp_scales=opts.spp_scales, pod_options=opts.pod_options,
                    use_pod_schedule=not opts.no_pod_schedule, nb_current_classes=c_seen,
                    nb_new_classes=c_new))
        preset = {k: getattr(opts, k) for k in ("pod", "pod_factor", "pod_logits", "pod_options", "pseudo",
                                                "threshold", "classif_adaptive_factor", "init_balanced",
                                                "spp_scales", "pod_prepro", "no_pod_schedule",
                                                "pod_apply", "pod_deeplab_mask", "pseudo_nb_bins")}
    return {
        "official": plop_repo.meta(
            "train.py: Trainer.find_median (via before), Trainer.train (one batch), entropy, "
            "features_distillation; argparser.py: method PLOP preset"),
        "median_fix": {"official_line": PLOP_MEDIAN_FIX[0], "corrected_line": PLOP_MEDIAN_FIX[1]},
        "seed": seed, "classes": [c_old, c_new], "preset": preset,
        "inputs": {"stages_old": [arr(a) for a in att_old[:4]], "stages_new": [arr(a) for a in att_new[:4]],
                   "head_old": arr(att_old[4]), "head_new": arr(att_new[4]),
                   "logits_lowres_old": arr(small_old), "logits_lowres_new": arr(small_new),
                   "old_logits": [arr(o) for o in outs_old], "logits": arr(logits),
                   "labels": [arr(lab) for lab in labels]},
        "outputs": res,
    }


# ---- RCIL: pooled cube distillation -------------------------------------------------------------------

def rcil(rcil_repo: Official) -> dict:
    seed = 2106
    g = gen(seed)
    b, c_old, c_new = 2, 4, 2
    c_seen = c_old + c_new
    shapes = [(4, 8, 8), (6, 4, 4), (8, 4, 4), (8, 4, 4), (8, 4, 4)]
    maps_old = _maps(g, b, shapes)
    maps_new = [a + 0.3 * torch.randn(a.shape, generator=g, dtype=F64) for a in maps_old]
    small_old = torch.randn(b, c_old, 4, 4, generator=g, dtype=F64) * 2
    small_new = torch.randn(b, c_seen, 4, 4, generator=g, dtype=F64) * 2
    with sandbox():
        stub_apex()
        load_utils(rcil_repo)
        T = load(rcil_repo, "train.py", "rcil_train")
        opts = official_opts(rcil_repo, "--method", "RCIL", "--dataset", "voc")
        old_list, new_list = maps_old + [small_old], maps_new + [small_new]
        kw = dict(index_new_class=c_old, nb_current_classes=c_seen, nb_new_classes=c_new, opts=opts)
        out = {
            "spatial": num(T.features_distillation_spatial(list(old_list), list(new_list), **kw)),
            "channel": num(T.features_distillation_channel(list(old_list), list(new_list), **kw)),
        }
        # One map alone is the last of its list: factor 0.0005 (VOC), schedule 1 with current == new.
        one = dict(index_new_class=c_old, nb_current_classes=1, nb_new_classes=1, opts=opts)
        out["spatial_per_map"] = [num(T.features_distillation_spatial([a], [n], **one)) / 0.0005
                                  for a, n in zip(old_list, new_list)]
        # The channel term drops the last map of its list: a placeholder follows the one measured.
        out["channel_per_map"] = [num(T.features_distillation_channel([a, a], [n, n], **one)) / 0.0005
                                  for a, n in zip(maps_old, maps_new)]
        preset = {k: getattr(opts, k) for k in ("loss_kd", "unce", "unkd", "init_balanced", "dataset")}
    return {
        "official": rcil_repo.meta("train.py: features_distillation_spatial, features_distillation_channel"),
        "seed": seed, "classes": [c_old, c_new], "preset": preset,
        "inputs": {"stages_old": [arr(a) for a in maps_old[:4]], "stages_new": [arr(a) for a in maps_new[:4]],
                   "head_old": arr(maps_old[4]), "head_new": arr(maps_new[4]),
                   "logits_lowres_old": arr(small_old), "logits_lowres_new": arr(small_new)},
        "outputs": out,
    }


# ---- SSUL: label transform and BCE ------------------------------------------------------------------

def ssul(ssul_repo: Official) -> dict:
    from PIL import Image

    import_torchvision()
    seed = 2107
    g = gen(seed)
    rng = np.random.default_rng(seed)
    h, w, n_img = 6, 7, 3
    masks, sals = [], []
    for i in range(n_img):
        # Background, base classes 1-15, the step-1 class 16, future classes 17-20, ignored 255.
        m = rng.choice([0, 2, 7, 15, 16, 18, 20, 255], size=(h, w), p=[.3, .1, .1, .1, .2, .05, .05, .1])
        m[0, 0] = 16  # every image holds the step-1 class, so it is listed at both steps
        masks.append(m.astype(np.uint8))
        sals.append((rng.random((h, w)) < 0.5).astype(np.uint8) * 255)
    targets = {}
    with sandbox(), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc"
        for sub in ("JPEGImages", "SegmentationClassAug", "saliency_map"):
            (root / sub).mkdir(parents=True)
        lines = []
        for i, (m, s) in enumerate(zip(masks, sals)):
            Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "JPEGImages" / f"im{i}.jpg")
            Image.fromarray(m).save(root / "SegmentationClassAug" / f"im{i}.png")
            Image.fromarray(s).save(root / "saliency_map" / f"im{i}.png")
            present = sorted(set(int(v) for v in np.unique(m)) - {0, 255})
            lines.append(" ".join([f"im{i}"] + [str(c - 1) for c in present]))  # the list stores class - 1
        (Path(tmp) / "datasets" / "data" / "voc").mkdir(parents=True)
        (Path(tmp) / "datasets" / "data" / "voc" / "train_cls.txt").write_text("\n".join(lines) + "\n")
        stub("utils")
        load(ssul_repo, "utils/tasks.py", "utils.tasks")
        L = load(ssul_repo, "utils/loss.py", "utils.loss")
        et = load(ssul_repo, "utils/ext_transforms.py", "utils.ext_transforms")
        V = load(ssul_repo, "datasets/voc.py", "ssul_voc")
        cwd = os.getcwd()
        os.chdir(tmp)  # get_dataset_list reads datasets/data/voc/train_cls.txt from the working directory
        try:
            for step in (0, 1):
                opts = SimpleNamespace(data_root=str(root), task="15-1", overlap=True, unknown=True)
                ds = V.VOCSegmentation(opts, image_set="train", transform=et.ExtCompose([et.ExtToTensor()]),
                                       cil_step=step)
                targets[f"step{step}"] = {ds.file_names[k]: arr(ds[k][1]) for k in range(len(ds))}
        finally:
            os.chdir(cwd)
        # BCE in SSUL's label space: channel 0 unknown, 1 background, then the classes (3 base, 2 new).
        b, c, hh, ww = 2, 7, 5, 4
        logits = torch.randn(b, c, hh, ww, generator=g, dtype=F64) * 2
        label = labels_from(g, (b, hh, ww), [0, 1, 2, 3, 4, 5, 6, 255], [.15, .3, .1, .1, .1, .1, .05, .1])
        weight = torch.rand(b, hh, ww, generator=g, dtype=F64)
        crit = L.BCEWithLogitsLossWithIgnoreIndex(ignore_index=255, reduction="mean")
        bce = {"bce": num(crit(logits, label)), "bce_weighted": num(crit(logits, label, weight))}
    return {
        "official": ssul_repo.meta("datasets/voc.py: VOCSegmentation.__getitem__ (train, unknown) with "
                                   "utils/ext_transforms.py ExtToTensor",
                                   "utils/loss.py: BCEWithLogitsLossWithIgnoreIndex(reduction='mean')"),
        "seed": seed, "task": "15-1",
        "label_space": "official: 0 unknown, 1 background, k >= 2 class k - 1; 255 ignored",
        "inputs": {"masks": {f"im{i}": arr(torch.from_numpy(m)) for i, m in enumerate(masks)},
                   "saliency": {f"im{i}": arr(torch.from_numpy(s)) for i, s in enumerate(sals)},
                   "bce_logits": arr(logits), "bce_label": arr(label), "bce_weight": arr(weight)},
        "outputs": {"targets": targets, **bce},
    }


# ---- NeST: similarity, projection, generation ----------------------------------------------------------

def nest(nest_repo: Official) -> dict:
    import_torchvision()
    seed = 2108
    g = gen(seed)
    d, classes, h = 6, [3, 2, 2], 8
    c_old, n_new = sum(classes[:-1]), classes[-1]
    b = 2
    feats = [torch.randn(b, d, 4, 4, generator=g, dtype=F64) for _ in range(2)]
    outs_old = [torch.randn(b, c_old, h, h, generator=g, dtype=F64) * 2 for _ in range(2)]
    labels = [labels_from(g, (b, h, h), [0, 5, 6, 255], [.5, .2, .2, .1]) for _ in range(2)]
    x = torch.randn(1, d, 3, 3, generator=g, dtype=F64)  # decoder features fed to the pre-tuned classifier
    res = {}
    with sandbox():
        stub_apex()
        stub_model_zoo()
        stub("pytorch_grad_cam", GradCAM=object)
        stub("pytorch_grad_cam.utils")
        stub("pytorch_grad_cam.utils.image", show_cam_on_image=None, preprocess_image=None)
        load_utils(nest_repo)
        init_single_process_group()
        opts = official_opts(nest_repo, "--method", "ours", "--dataset", "voc")
        S = load(nest_repo, "segmentation_module.py", "nest_segmentation_module")
        T = load(nest_repo, "train.py", "nest_train")
        model = S.IncrementalSegmentationModule(nn.Identity(), nn.Identity(), d, classes=list(classes),
                                                opts=opts).double()
        with torch.no_grad():
            for conv in model.cls:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=F64))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=F64))
        old_w = [arr(c.weight[:, :, 0, 0]) for c in model.cls[:-1]]
        old_b = [arr(c.bias) for c in model.cls[:-1]]
        model_old = Replay([(o, {"pre_logits": f}) for o, f in zip(outs_old, feats)],
                           head_channels=d, cls=list(model.cls[:-1]))
        trainer = T.Trainer(model, model_old, "cpu", opts, classes=list(classes), step=2)
        bucket = trainer.select(Loader(labels), logger=LOGGER)
        model.reset_weight_old(bucket)
        res["similarity"] = arr(bucket)
        res["importance_init"] = arr(model.weight_old)
        res["projection_init"] = arr(model.weight_new)
        # Generation from pre-tuned matrices: every pre-tuned parameter set to seeded values.
        with torch.no_grad():
            model.weight_old.data = torch.rand(n_new, c_old, d, generator=g, dtype=F64)
            model.weight_new.data = torch.rand(n_new, c_old, generator=g, dtype=F64)
            model.new_bias.data = torch.randn(n_new, generator=g, dtype=F64)
            model.weight_old_bg.data = 1 + 0.2 * torch.randn(1, d, generator=g, dtype=F64)
            model.weight_new_bg.data = 1 + 0.2 * torch.randn(1, 1, generator=g, dtype=F64)
        pretuned = {"importance": arr(model.weight_old), "projection": arr(model.weight_new),
                    "new_bias": arr(model.new_bias), "bg_channels": arr(model.weight_old_bg.reshape(-1)),
                    "bg_scale": arr(model.weight_new_bg.reshape(-1))}
        with torch.no_grad():
            res["pretune_logits"] = arr(model.avg_weight_output(x))
            model.init_via_weight()
        res["written"] = {"new_weight": arr(model.cls[-1].weight[:, :, 0, 0]),
                          "new_bias": arr(model.cls[-1].bias),
                          "background_weight": arr(model.cls[0].weight[0, :, 0, 0])}
        preset = {k: getattr(opts, k) for k in ("warm_up", "two_stage", "warm_epochs", "unce_in_warm",
                                                "unkd_in_warm", "fix_pre_cls")}
    return {
        "official": nest_repo.meta(
            "train.py: Trainer.select", "segmentation_module.py: IncrementalSegmentationModule."
            "reset_weight_old, avg_weight_output, init_via_weight (with align_weight('all'))"),
        "seed": seed, "head_channels": d, "classes": classes, "similarity_size": 128, "preset": preset,
        "inputs": {"old_weights": old_w, "old_biases": old_b, "features": [arr(f) for f in feats],
                   "old_logits": [arr(o) for o in outs_old], "labels": [arr(lab) for lab in labels],
                   "pretuned": pretuned, "x": arr(x)},
        "outputs": res,
    }


GOLDENS = {
    "mib_losses": ("mib", mib_losses),
    "mib_trainer": ("mib", mib_trainer),
    "mib_init_balanced": ("mib", mib_init_balanced),
    "ewc_penalty": ("mib", mib_ewc),
    "plop": ("plop", plop),
    "rcil_pckd": ("rcil", rcil),
    "ssul": ("ssul", ssul),
    "nest": ("nest", nest),
}
SLUGS = {"mib": "fcdl94/MiB", "plop": "arthurdouillard/CVPR2021_PLOP", "rcil": "zhangchbin/RCIL",
         "ssul": "clovaai/SSUL", "nest": "zhengyuan-xie/ECCV24_NeST"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, slug in SLUGS.items():
        ap.add_argument(f"--{key}", help=f"clone of {slug}")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--only", nargs="+", choices=sorted(GOLDENS), help="regenerate these files only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repos = {}
    for name in args.only or GOLDENS:
        key, fn = GOLDENS[name]
        if getattr(args, key) is None:
            raise SystemExit(f"{name} needs --{key} (a clone of {SLUGS[key]})")
        if key not in repos:
            repos[key] = Official(getattr(args, key), SLUGS[key])
        doc = fn(repos[key])
        doc["generated_by"] = "tests/golden/make_golden.py"
        doc["torch"] = torch.__version__
        write(out, name, doc)


if __name__ == "__main__":
    main()
