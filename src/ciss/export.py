"""ONNX export of a model file's decision logits (needs the `export` extra)."""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ciss.data.transforms import RESIZE_RULE
from ciss.modelfile import ModelFile, load_model
from ciss.models import fold_parallel_branches
from ciss.results import atomic_write_bytes


class _Decision(nn.Module):
    """Segmenter + the method's decision rule: image -> decision logits."""

    def __init__(self, mf: ModelFile) -> None:
        super().__init__()
        self.mf = mf
        # Parallel branches (RCIL) fold into single convs: the graph has the plain network's size.
        self.model = fold_parallel_branches(mf.build().eval())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.mf.decision_logits(self.model(image))


def _stable_translations() -> dict[Callable, Callable]:
    """ONNX for log-sigmoid and logaddexp that does not underflow: the exporter's own,
    Log(Sigmoid(x)) and Log(Exp(a) + Exp(b)), give -inf below about -88 (SSUL's decision rule)."""
    from onnxscript import opset18 as op

    def log_sigmoid(x):
        one, zero = op.CastLike(1.0, x), op.CastLike(0.0, x)
        return op.Sub(op.Min(x, zero), op.Log(op.Add(one, op.Exp(op.Neg(op.Abs(x))))))

    def logaddexp(a, b):
        one = op.CastLike(1.0, a)
        return op.Add(op.Max(a, b), op.Log(op.Add(one, op.Exp(op.Neg(op.Abs(op.Sub(a, b)))))))

    return {torch.ops.aten.log_sigmoid.default: log_sigmoid, torch.ops.aten.logaddexp.default: logaddexp}


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter warns about every torchvision operator it cannot register (none is used here)
    # and torch.export about an internal deprecation; neither concerns the caller.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def preprocessing(mf: ModelFile) -> str:
    """The steps that make the graph's input from an image, as training, evaluation and `ciss
    predict` do; resizing another way (another library or filter) changes predictions."""
    steps = ["decode to uint8 RGB (H0, W0, 3)"]
    if mf.resize:
        steps.append(f"resize = {mf.resize}: " + RESIZE_RULE)
    steps += ["float32 / 255", f"(x - mean) / std per channel, mean {list(mf.mean)}, std {list(mf.std)}",
              "transpose to (1, 3, H, W)",
              "output logits (N, C, H, W): bilinear upsampling (align_corners=False) to (H0, W0), "
              "then argmax over C"]
    return "; ".join(steps)


def export_onnx(source: ModelFile | str | Path, path: str | Path, height: Optional[int] = None,
                width: Optional[int] = None, opset: int = 18) -> Path:
    """Write an ONNX graph of the model's decision logits to `path` and return it.

    Input "image": float32 (N, 3, H, W), an RGB image scaled to [0, 1] then normalised with the model
    file's `mean` and `std` ((x - mean) / std per channel). Resizing it to the trained scale
    (`resize`, the shorter side) is the caller's job. Output "logits": float32 (N, C, H, W), the
    method's decision logits (its `eval_logits`) at the input's size; argmax over C is the label.
    N, H and W are dynamic (H, W >= 2); `height` x `width` (default crop_size x crop_size) is only
    the example traced. Class names, mean, std, resize and the whole preprocessing (`preprocessing`)
    are stored in the graph's metadata.

    Uses the torch.export-based exporter (`dynamo=True`, needs onnxscript): the legacy TorchScript
    exporter lacks operators some decision rules use (SSUL's logaddexp). Its lowest opset is 18.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install ciss[export]") from None
    if opset < 18:
        raise ValueError(f"opset {opset} is too old: the torch.export-based exporter writes opset 18 "
                         f"or newer; pass opset >= 18")
    mf = source if isinstance(source, ModelFile) else load_model(source)
    module = _Decision(mf).eval()
    example = torch.zeros(1, 3, height or mf.crop_size, width or mf.crop_size)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=2),
            3: torch.export.Dim("width", min=2)}
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(module, (example,), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes={"image": dims}, opset_version=opset, dynamo=True,
                                    custom_translation_table=_stable_translations(), verbose=False)
    proto = program.model_proto
    meta = {"ciss_format": "ciss-onnx-v1", "classes": json.dumps(mf.classes),
            "mean": json.dumps(mf.mean), "std": json.dumps(mf.std), "resize": json.dumps(mf.resize),
            "method": mf.method, "preprocessing": preprocessing(mf)}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    return path
