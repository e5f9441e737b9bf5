"""Golden tests: NeST's cross-task class similarity, the projection initialised from it, the generated
classifiers during pre-tuning and the rows written after it, against numbers the official NeST code
(zhengyuan-xie/ECCV24_NeST, commit in the file) computed on the same old model outputs and matrices:
train.py Trainer.select and segmentation_module.py reset_weight_old, avg_weight_output and
init_via_weight (which ends with align_weight("all")).

Tolerance: ours holds the matrices in float32 (ClassifierTransform) and the similarity's features and
probabilities in float32, the golden numbers are float64, so each comparison allows 1e-6 relative plus
1e-6 of the largest golden magnitude (float32 sums of a few terms near zero)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ciss.methods.nest import ClassifierTransform, NeST, class_similarity
from ciss.models.classifier import IncrementalClassifier
from ciss.types import Batch, SegOutput, StepContext

from golden_common import RTOL, load, t
from golden_common import close as _close


def close(ours, golden) -> None:
    """Float32 computations: also 1e-6 of the largest golden value, absolute."""
    _close(ours, golden, atol=RTOL * float(torch.as_tensor(golden, dtype=torch.float64).abs().max()))


G = load("nest")
CLASSES = tuple(G["classes"])
CTX = StepContext(step=len(CLASSES) - 1, classes_per_step=CLASSES, num_steps=len(CLASSES))


def classifier(counts) -> IncrementalClassifier:
    clf = IncrementalClassifier(G["head_channels"], counts)
    with torch.no_grad():
        for conv, w, b in zip(clf.convs, G["inputs"]["old_weights"], G["inputs"]["old_biases"]):
            conv.weight.copy_(t(w)[:, :, None, None])
            conv.bias.copy_(t(b))
    return clf


class OldModel(nn.Module):
    """The old model of the golden file: batch k (read from the image) gives the stored outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = classifier(CLASSES[:-1])
        self.logits = [t(o) for o in G["inputs"]["old_logits"]]
        self.features = [t(f) for f in G["inputs"]["features"]]

    def forward(self, image):
        k = int(image.reshape(-1)[0])
        return SegOutput(self.logits[k], {"head": self.features[k]})


def loader():
    labels = [t(a) for a in G["inputs"]["labels"]]
    return [Batch(image=torch.full((lab.shape[0], 3, 2, 2), float(k)), label=lab) for k, lab in enumerate(labels)]


def test_preset():
    p, m = G["preset"], NeST()
    assert p["warm_up"] and not p["two_stage"] and G["similarity_size"] == m.similarity_size
    assert m.pretune_epochs == p["warm_epochs"]  # VOC
    assert p["unce_in_warm"] and not p["unkd_in_warm"] and m.pretune_loss == "unce"
    assert m.freeze_old_classifiers == p["fix_pre_cls"]  # NeST on MiB (the PLOP scripts pass it)


def test_class_similarity():
    importance, counts = class_similarity(OldModel(), loader(), CTX, G["similarity_size"])
    assert torch.all(counts > 0)  # every new class is present (the official code divides by its count)
    close(importance, t(G["outputs"]["similarity"]))


def test_initial_importance_and_projection():
    model = SimpleNamespace(classifier=classifier(CLASSES))
    transform = NeST().initial_transform(model, OldModel(), loader(), CTX)
    close(transform.importance.detach(), t(G["outputs"]["importance_init"]))
    close(transform.projection.detach(), t(G["outputs"]["projection_init"]))  # softmax_c(sum_d M)


def _pretuned() -> ClassifierTransform:
    p = G["inputs"]["pretuned"]
    return ClassifierTransform(t(p["importance"]), t(p["projection"]), t(p["new_bias"]),
                               t(p["bg_channels"]), t(p["bg_scale"]))


def test_pretune_logits():
    """avg_weight_output: the background row and the new rows computed from the matrices."""
    nest = NeST()
    nest.transform = _pretuned()
    model = SimpleNamespace(classifier=classifier(CLASSES))
    nest.attach(model)
    try:
        with torch.no_grad():
            logits = model.classifier(t(G["inputs"]["x"]).float())
    finally:
        nest.detach()
    close(logits, t(G["outputs"]["pretune_logits"]))


def test_written_classifiers():
    """init_via_weight: new rows and biases, the background row at its old norm, then align_weight."""
    nest = NeST()
    nest.transform = _pretuned()
    model = SimpleNamespace(classifier=classifier(CLASSES))
    nest.write_classifiers(model, CTX)
    w = G["outputs"]["written"]
    convs = model.classifier.convs
    close(convs[-1].weight[:, :, 0, 0].detach(), t(w["new_weight"]))
    close(convs[-1].bias.detach(), t(w["new_bias"]))
    close(convs[0].weight[0, :, 0, 0].detach(), t(w["background_weight"]))
    # The other old rows are untouched.
    old = [t(a) for a in G["inputs"]["old_weights"]]
    close(convs[0].weight[1:, :, 0, 0].detach(), old[0][1:])
    close(convs[1].weight[:, :, 0, 0].detach(), old[1])
