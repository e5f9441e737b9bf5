"""Train / eval transforms: shapes, dtypes, normalisation, IGNORE padding, joint geometry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ciss.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform
from ciss.types import IGNORE


def _pair(h: int, w: int, seed: int = 0):
    """An image whose red channel encodes the label, so geometry can be checked pixel by pixel."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 5, (h, w)).astype(np.uint8)
    label[h // 2 :, : w // 3] = 3  # blocks survive bilinear resizing
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 0] = label * 50
    image[..., 1] = 100
    return image, label


def _unnormalise(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img * std + mean) * 255


def test_train_transform_shapes_and_types():
    t = TrainTransform(32)
    for h, w in [(20, 50), (64, 80), (10, 10)]:
        img, lbl = t(*_pair(h, w))
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert lbl.shape == (32, 32) and lbl.dtype == torch.long


def test_padding_is_mean_image_and_ignore_label():
    t = TrainTransform(40, scale=(1.0, 1.0), hflip=False)
    img, lbl = t(*_pair(20, 30))
    pad = lbl == IGNORE
    assert pad.sum() == 40 * 40 - 20 * 30  # all padding is IGNORE, no real pixel is
    assert torch.all(img[:, pad] == 0)  # the mean, after normalisation
    inside = ~pad
    assert torch.all(lbl[inside] < 5)


def test_crop_without_scale_keeps_pixels_aligned():
    rng = random.Random(0)
    t = TrainTransform(16, scale=(1.0, 1.0), hflip=True, rng=rng)
    image, label = _pair(30, 40)
    for _ in range(10):
        img, lbl = t(image, label)
        red = _unnormalise(img)[0].round()
        assert torch.equal(red, (lbl * 50).float())  # image and label moved together


def test_scaling_and_flip_keep_label_values():
    t = TrainTransform(24, scale=(0.5, 2.0), rng=random.Random(1))
    image, label = _pair(30, 30)
    for _ in range(10):
        _, lbl = t(image, label)
        assert set(lbl.unique().tolist()) <= set(range(5)) | {IGNORE}  # nearest: no new values


def test_eval_transform_identity_and_resize():
    image, label = _pair(30, 50)
    img, lbl = EvalTransform(None)(image, label)
    assert img.shape == (3, 30, 50) and torch.equal(lbl, torch.from_numpy(label).long())
    assert torch.allclose(_unnormalise(img)[0], torch.from_numpy(image[..., 0]).float(), atol=1e-3)
    img, lbl = EvalTransform(20)(image, label)
    assert img.shape == (3, 20, 20) and lbl.shape == (20, 20)
    assert set(lbl.unique().tolist()) <= set(np.unique(label).tolist())
    img, lbl = EvalTransform(20)(*_pair(50, 30))  # portrait
    assert img.shape == (3, 20, 20)


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        EvalTransform()(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="label"):
        EvalTransform()(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError):
        TrainTransform(0)


def test_fast_enough():
    import time

    image, label = _pair(375, 500)
    t = TrainTransform(512)
    start = time.perf_counter()
    for _ in range(10):
        t(image, label)
    assert (time.perf_counter() - start) / 10 < 0.5  # ~10 ms per VOC-sized image when idle


def test_resized_wrapper_keeps_aspect_and_labels_exact():
    from ciss.data.transforms import EvalTransform, Resized

    image = np.zeros((40, 60, 3), dtype=np.uint8)
    label = np.zeros((40, 60), dtype=np.uint8)
    label[:, 30:] = 3
    img, lbl = Resized(EvalTransform(None), 20)(image, label)
    assert img.shape == (3, 20, 30) and lbl.shape == (20, 30)
    assert set(lbl.unique().tolist()) == {0, 3}  # nearest: no invented label values
    img, lbl = Resized(EvalTransform(None), None)(image, label)
    assert img.shape == (3, 40, 60)


def test_data_scale_reaches_the_training_transform_and_keys_the_base_step(tiny_cfg, monkeypatch):
    import ciss.engine.data
    from ciss.engine import train
    from ciss.engine.base_cache import base_cache_key

    seen = []

    class Recording(TrainTransform):
        def __init__(self, crop_size, scale=(0.5, 2.0), **kw):
            seen.append(tuple(scale))
            super().__init__(crop_size, scale, **kw)

    monkeypatch.setattr(ciss.engine.data, "TrainTransform", Recording)
    train(tiny_cfg("data.scale=[0.75,1.25]", "data.task=4-2"))
    assert seen and set(seen) == {(0.75, 1.25)}

    class Fake:  # what base_cache_key reads of the dataset, scenario and method
        steps, order = [[1, 2]], [1, 2]

        def cache_key(self):
            return "d"

        def base_step_key(self):
            return None

        def num_extra_outputs(self):
            return 0

        def architecture(self):
            return {}

    f = Fake()
    default = base_cache_key(tiny_cfg(), f, f, f, 1)
    assert "scale" not in default  # bases cached before the key existed stay valid
    assert base_cache_key(tiny_cfg("data.scale=[0.5,2.0]"), f, f, f, 1) == default
    assert base_cache_key(tiny_cfg("data.scale=[1,1]"), f, f, f, 1)["scale"] == [1.0, 1.0]
