"""ONNX export: onnxruntime reproduces the PyTorch decision logits, at any batch and image size.

The torch.export-based exporter keeps batch, height and width dynamic, so one graph is checked at
the traced size and at another batch and size.
"""

import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime",
                          reason="ONNX export tests need onnxruntime (pip install ciss[export])")

from ciss.export import export_onnx  # noqa: E402
from ciss.modelfile import ModelFile  # noqa: E402
from ciss.models import build_segmenter  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny SSUL model (an extra 'unknown' output folded into bg by logaddexp), one class pushed
    far below -88 where a naive log(sigmoid(x)) underflows to -inf, saved and exported once."""
    torch.manual_seed(0)
    net = build_segmenter("tiny", classes_per_step=(3, 2), head_channels=16, num_extra=1)
    with torch.no_grad():
        net.classifier.convs[1].bias[0] = -150.0
    mf = ModelFile(classes=["background", "a", "b", "c", "d"], model_config=net.config(),
                   weights=net.state_dict(), method="ssul", method_args={}, resize=None, crop_size=32)
    tmp = tmp_path_factory.mktemp("export")
    path = export_onnx(mf.save(tmp / "model.ciss"), tmp / "model.onnx")  # from a model file's path
    return mf, path


def _compare(mf, path, x):
    with torch.no_grad():
        ref = mf.decision_logits(mf.build()(x)).numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": x.numpy()})[0]
    assert out.shape == ref.shape == (x.shape[0], 5, *x.shape[-2:])
    assert np.isfinite(out).all() and ref[:, 3].max() < -100  # the saturated class stays finite
    assert np.abs(out - ref).max() < 1e-4
    assert np.array_equal(out.argmax(1), ref.argmax(1))


def test_onnx_matches_pytorch_at_the_traced_size(exported):
    mf, path = exported
    _compare(mf, path, torch.randn(1, 3, 32, 32))


def test_onnx_batch_height_and_width_are_dynamic(exported):
    mf, path = exported
    _compare(mf, path, torch.randn(2, 3, 45, 61))


def test_onnx_names_and_metadata(exported):
    import onnx

    mf, path = exported
    model = onnx.load(str(path))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("image", "logits")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == mf.classes and json.loads(meta["mean"]) == mf.mean
    assert json.loads(meta["std"]) == mf.std and json.loads(meta["resize"]) is None
    assert meta["preprocessing"].startswith("decode to uint8 RGB") and "resize" not in meta["preprocessing"]


def test_refuses_an_opset_the_exporter_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="opset >= 18"):
        export_onnx(tmp_path / "unused.ciss", tmp_path / "m.onnx", opset=17)


def test_a_model_with_parallel_branches_exports_folded(tmp_path):
    """RCIL's two-branch convs leave the graph as single convs, with the same logits."""
    import onnx

    torch.manual_seed(0)
    net = build_segmenter("tiny", classes_per_step=(3, 2), head_channels=16, parallel_branches=True)
    net.train()
    net(torch.randn(4, 3, 32, 32))  # branch statistics differ from their twins'
    plain = build_segmenter("tiny", classes_per_step=(3, 2), head_channels=16)
    mf = ModelFile(classes=["background", "a", "b", "c", "d"], model_config=net.config(),
                   weights=net.state_dict(), method="rcil", method_args={}, resize=None, crop_size=32)
    path = export_onnx(mf, tmp_path / "model.onnx")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = mf.decision_logits(mf.build()(x)).numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": x.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-4
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in plain.modules())
    weights = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert weights < sum(p.numel() for p in net.parameters())
