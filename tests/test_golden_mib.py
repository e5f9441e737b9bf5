"""Golden tests: MiB's losses, its training loop's terms for LwF / ILT / LwF-MC / MiB, init_balanced and the
EWC penalty, against numbers the official MiB code (fcdl94/MiB, commit in each file) computed on the same
inputs. Regenerate with tests/golden/make_golden.py; these tests read only the committed numbers."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ciss.losses import (binary_cross_entropy_one_hot, knowledge_distillation, unbiased_cross_entropy,
                         unbiased_knowledge_distillation)
from ciss.methods.ewc import EWC
from ciss.methods.ilt import ILT
from ciss.methods.lwf import LwF
from ciss.methods.lwf_mc import LwFMC
from ciss.methods.mib import MiB
from ciss.models.classifier import IncrementalClassifier
from ciss.types import IGNORE, Batch, SegOutput, StepContext, Targets

from golden_common import close, load, t


# ---- utils/loss.py, called directly: same reductions as ours (factor 1) ------------------------------

def test_mib_loss_functions():
    g = load("mib_losses")
    x, old, label = (t(g["inputs"][k]) for k in ("logits", "old_logits", "label"))
    out, c_old = g["outputs"], g["num_old"]
    # nll_loss(reduction="mean", ignore_index=255) averages over the labelled pixels, as ours does.
    close(unbiased_cross_entropy(x, label, c_old), out["unce_mean"])
    for alpha in (1, 2):
        close(knowledge_distillation(x, old, alpha), out[f"kd_alpha{alpha}"])
        close(unbiased_knowledge_distillation(x, old, alpha), out[f"unkd_alpha{alpha}"])
    # masked_select(loss, one-hot non-empty).mean(): the mean over labelled pixels, as ours.
    close(binary_cross_entropy_one_hot(x, label), out["bce_mean"])


def test_mib_unbiased_ce_per_pixel_weights():
    """Our weighted unbiased CE = sum(w * official per-pixel term) / labelled pixels."""
    g = load("mib_losses")
    x, label = t(g["inputs"]["logits"]), t(g["inputs"]["label"])
    per_pixel = t(g["outputs"]["unce_none"])  # (B, H, W), 0 on ignored pixels
    w = torch.linspace(0.1, 1.0, label.numel(), dtype=torch.float64).reshape(label.shape)
    expected = (per_pixel * w).sum() / (label != IGNORE).sum()
    close(unbiased_cross_entropy(x, label, g["num_old"], w), expected)


# ---- train.py Trainer.train: every term as the official loop composes it -----------------------------

def _step(g: dict):
    inp = g["inputs"]
    c_old, c_new = g["classes"]
    ctx = StepContext(step=1, classes_per_step=(c_old, c_new), num_steps=2)
    label = t(inp["label"])
    out = SegOutput(t(inp["logits"]), {"stages": [t(inp["body"])], "distilled": [t(inp["body"])]})
    old = SegOutput(t(inp["old_logits"]), {"stages": [t(inp["body_old"])], "distilled": [t(inp["body_old"])]})
    batch = Batch(image=torch.zeros(label.shape[0], 3, *label.shape[1:]), label=label)
    # MiB's classification loss is reduction="none" then .mean(): ignored pixels count as zeros, so
    # official = ours (mean over labelled pixels) x labelled / all pixels.
    factor = float((label != IGNORE).sum()) / label.numel()
    return ctx, out, old, batch, factor


def _terms(method, g):
    ctx, out, old, batch, factor = _step(g)
    return method.loss(out, method.make_targets(batch, out, old, ctx), old, batch, ctx), factor


def test_golden_lwf():
    g = load("mib_trainer")
    o = g["outputs"]["LWF"]
    assert LwF().loss_kd == o["preset"]["loss_kd"] and LwF().alpha == o["preset"]["alpha"]
    terms, factor = _terms(LwF(), g)
    close(terms["kd"], o["lkd"])
    close(terms["ce"] * factor, o["ce"])


def test_golden_ilt():
    g = load("mib_trainer")
    o = g["outputs"]["ILT"]
    m = ILT()
    assert (m.loss_kd, m.loss_de) == (o["preset"]["loss_kd"], o["preset"]["loss_de"])
    terms, factor = _terms(m, g)
    close(terms["kd"], o["lkd"])
    close(terms["de"], o["lde"])  # nn.MSELoss on features['body'] = our last backbone stage
    close(terms["ce"] * factor, o["ce"])


def test_golden_lwf_mc():
    g = load("mib_trainer")
    o = g["outputs"]["LWF-MC"]
    assert o["preset"]["icarl"] and LwFMC().icarl_importance == o["preset"]["icarl_importance"]
    terms, factor = _terms(LwFMC(), g)
    close(terms["distill"], o["l_icarl"])  # icarl x n_cl_old x BCEWithLogitsLoss(mean)
    close(terms["bce"] * factor, o["ce"])  # BCEWithLogitsLossWithIgnoreIndex(reduction='none').mean()


def test_golden_mib_method():
    g = load("mib_trainer")
    o = g["outputs"]["MiB"]
    m = MiB()
    p = o["preset"]
    assert p["unce"] and p["unkd"] and p["init_balanced"] == m.init_balanced
    assert (m.loss_kd, m.alpha) == (p["loss_kd"], p["alpha"])
    terms, factor = _terms(m, g)
    close(terms["unkd"], o["lkd"])
    close(terms["unce"] * factor, o["ce"])


# ---- segmentation_module.py init_new_classifier (init_balanced) ----------------------------------------

def test_golden_init_balanced():
    g = load("mib_init_balanced")
    d, classes = g["head_channels"], g["classes"]
    weights = [t(w) for w in g["inputs"]["weights"]]
    biases = [t(b) for b in g["inputs"]["biases"]]

    def classifier(counts):
        clf = IncrementalClassifier(d, counts).double()
        with torch.no_grad():
            for conv, w, b in zip(clf.convs, weights, biases):
                conv.weight.copy_(w[:, :, None, None])
                conv.bias.copy_(b)
        return clf

    model = SimpleNamespace(classifier=classifier(classes))
    old_model = SimpleNamespace(classifier=classifier(classes[:-1]))
    ctx = StepContext(step=len(classes) - 1, classes_per_step=tuple(classes), num_steps=len(classes))
    MiB().init_new_classifiers(model, old_model, ctx)
    o = g["outputs"]
    convs = model.classifier.convs
    close(convs[-1].weight[:, :, 0, 0], t(o["new_weight"]))
    # atol 1e-7 on biases: the official bias_diff is log(classes[-1] + 1) in float32 (FloatTensor),
    # ours in float64; they differ by ~3e-8.
    close(convs[-1].bias, t(o["new_bias"]), atol=1e-7)
    close(convs[0].bias[0], o["background_bias"], atol=1e-7)
    for conv, w, b in zip(convs[:-1], o["old_weights"], o["old_biases"]):
        close(conv.weight[:, :, 0, 0], t(w))
        close(conv.bias, t(b), atol=1e-7)


# ---- utils/regularizer.py EWC.penalty -----------------------------------------------------------------

class _Params(nn.Module):
    def __init__(self, tensors: dict) -> None:
        super().__init__()
        for name, value in tensors.items():
            self.register_parameter(name, nn.Parameter(value.clone()))


def _ewc(g: dict, normalize: bool, reg_importance: float = 100.0):
    inp = g["inputs"]
    model = _Params({n: t(a) for n, a in inp["current"].items()})
    for n in g["frozen"]:
        getattr(model, n).requires_grad_(False)
    ewc = EWC(reg_importance=reg_importance, normalize=normalize)
    ewc.fisher = {n: t(a) for n, a in inp["fisher"].items()}
    ewc.old_params = {n: t(a) for n, a in inp["old"].items()}
    ewc.fisher_step = 0
    return ewc, model


def test_golden_ewc_penalty():
    g = load("ewc_penalty")
    for normalize in (True, False):
        ewc, model = _ewc(g, normalize)
        # Same parameters skipped: frozen ones, and the new classifier that has no old value.
        close(ewc.penalty(model), g["outputs"][f"penalty_normalize_{normalize}"])


def test_golden_ewc_loss_term_with_mibs_preset():
    g = load("ewc_penalty")
    p = g["preset"]
    assert p["regularizer"] == "ewc" and EWC().reg_alpha == p["reg_alpha"]
    assert EWC().normalize == (not p["reg_no_normalize"])
    # Our default reg_importance is PLOP's 100, not MiB's 500 (ewc.py says why); with MiB's:
    ewc, model = _ewc(g, True, reg_importance=p["reg_importance"])
    ctx = StepContext(step=1, classes_per_step=(3, 2), num_steps=2)
    label = torch.zeros(1, 2, 2, dtype=torch.long)
    ewc.on_step_start(model, None, [], ctx)
    terms = ewc.loss(SegOutput(torch.zeros(1, 5, 2, 2)), Targets(label), None,
                     Batch(torch.zeros(1, 3, 2, 2), label), ctx)
    close(terms["ewc"], p["reg_importance"] * g["outputs"]["penalty_normalize_True"])
