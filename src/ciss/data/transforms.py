"""Joint image/label transforms: numpy uint8 in, normalised float image and long label out.

Labels arrive already relabelled (uint8, model label space, IGNORE = 255), so geometry only ever
uses nearest-neighbour on them and padding fills IGNORE. Randomness comes from Python's `random`,
which PyTorch reseeds in every DataLoader worker, so workers draw different crops.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ciss.types import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8 + (H, W) uint8 -> (3, H, W) float normalised + (H, W) long."""
    # astype makes the (writable, contiguous) copies the conversion needs anyway.
    img = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)  # (3, H, W)
    img = ((img - _MEAN) / _STD).contiguous()
    lbl = torch.from_numpy(label.astype(np.int64))  # (H, W)
    return img, lbl


# How every image is brought to another size, in training, evaluation, prediction and the ONNX
# metadata: PIL's bilinear filter on the uint8 RGB image (antialiased when shrinking).
RESIZE_RULE = ("PIL Image.resize((W, H), Image.BILINEAR) on the uint8 RGB image, "
               "(H, W) = (round(h * k), round(w * k)) with k = resize / min(h, w)")


def resize_image(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H0, W0, 3) uint8 -> (h, w, 3) uint8 by RESIZE_RULE's filter."""
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def _resize(image: np.ndarray, label: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    if (h, w) == image.shape[:2]:
        return image, label
    lbl = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return resize_image(image, h, w), lbl


def _check(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if label.shape != image.shape[:2] or label.dtype != np.uint8:
        raise ValueError(
            f"label must be (H, W) uint8 matching the image {image.shape[:2]}, got "
            f"{label.shape} {label.dtype}"
        )


class TrainTransform:
    """MiB's training augmentation: random scale, pad to the crop (image with the mean, i.e. 0
    after normalisation; label with IGNORE), random crop, random horizontal flip."""

    def __init__(
        self,
        crop_size: int,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        rng: Optional[random.Random] = None,
    ) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        self.crop_size = int(crop_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip = hflip
        self.rng = rng if rng is not None else random  # module `random`: reseeded per worker

    def __call__(
        self, image: np.ndarray, label: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(image, label)
        s = self.rng.uniform(*self.scale)
        h, w = image.shape[:2]
        image, label = _resize(image, label, max(1, round(h * s)), max(1, round(w * s)))
        if self.hflip and self.rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        c = self.crop_size
        # Crop and pad in one go: per axis, either a random window of the scaled image, or the
        # whole (shorter) axis centred in the padded canvas.
        (sy, dy, ly), (sx, dx, lx) = (self._window(n, c) for n in image.shape[:2])
        img, lbl = to_tensors(image[sy : sy + ly, sx : sx + lx], label[sy : sy + ly, sx : sx + lx])
        if (ly, lx) == (c, c):
            return img, lbl
        out_img = torch.zeros(3, c, c)  # 0 = the mean after normalisation
        out_lbl = torch.full((c, c), IGNORE, dtype=torch.long)
        out_img[:, dy : dy + ly, dx : dx + lx] = img
        out_lbl[dy : dy + ly, dx : dx + lx] = lbl
        return out_img, out_lbl

    def _window(self, n: int, c: int) -> tuple[int, int, int]:
        """(source start, destination start, length) along one axis of length n for crop c."""
        if n >= c:
            return self.rng.randint(0, n - c), 0, c
        return 0, (c - n) // 2, n

    def __repr__(self) -> str:
        return f"TrainTransform(crop_size={self.crop_size}, scale={self.scale}, hflip={self.hflip})"


class EvalTransform:
    """Evaluation: identity geometry (size=None), or the shorter side resized to `size` (label
    nearest) and a centre crop of size x size, as MiB's Resize + CenterCrop."""

    def __init__(self, size: Optional[int] = None) -> None:
        if size is not None and size < 1:
            raise ValueError(f"size must be positive or None, got {size}")
        self.size = size

    def __call__(
        self, image: np.ndarray, label: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(image, label)
        if self.size is not None:
            s = self.size
            h, w = image.shape[:2]
            if h <= w:
                nh, nw = s, max(s, round(w * s / h))
            else:
                nh, nw = max(s, round(h * s / w)), s
            image, label = _resize(image, label, nh, nw)
            top, left = (nh - s) // 2, (nw - s) // 2
            image = image[top : top + s, left : left + s]
            label = label[top : top + s, left : left + s]
        return to_tensors(image, label)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(H, W) of the items made from an (h, w) image."""
        return (h, w) if self.size is None else (self.size, self.size)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


def shorter_size(h: int, w: int, shorter: int) -> tuple[int, int]:
    """(H, W) of an (h, w) image whose shorter side is brought to ``shorter``."""
    k = shorter / min(h, w)
    return max(1, round(h * k)), max(1, round(w * k))


def resize_shorter(image: np.ndarray, label: np.ndarray, shorter: int) -> tuple[np.ndarray, np.ndarray]:
    """Shorter side brought to ``shorter`` (image bilinear, label nearest); a pair already at that
    size is returned as it is, so resizing twice equals resizing once."""
    _check(image, label)
    return _resize(image, label, *shorter_size(*image.shape[:2], shorter))


class Resized:
    """Resize so the shorter side is `shorter` (image bilinear, label nearest), then apply `inner`.

    Lets small CPU crops see whole objects on large images: the `cpu` recipe trains and evaluates
    on images brought to a shorter side of 256 instead of their native resolution.
    """

    def __init__(self, inner, shorter: Optional[int]) -> None:
        if shorter is not None and shorter < 1:
            raise ValueError(f"shorter side must be positive or None, got {shorter}")
        self.inner = inner
        self.shorter = shorter

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shorter is not None:
            image, label = resize_shorter(image, label, self.shorter)
        return self.inner(image, label)

    def output_size(self, h: int, w: int) -> Optional[tuple[int, int]]:
        """(H, W) of the items made from an (h, w) image, or None when ``inner`` does not say."""
        inner = getattr(self.inner, "output_size", None)
        if not callable(inner):
            return None
        return inner(*shorter_size(h, w, self.shorter)) if self.shorter is not None else inner(h, w)

    def __repr__(self) -> str:
        return f"Resized({self.inner!r}, shorter={self.shorter})"


def unaugmented(transform):
    """The deterministic view of a training transform: the same resize, then the shorter side to
    the crop size and a centre crop of it instead of random scale, crop and flip (what SSUL's
    memory selection sees: ExtResize(crop) + ExtCenterCrop(crop)). Other transforms are returned
    as they are."""
    if isinstance(transform, Resized):
        return Resized(unaugmented(transform.inner), transform.shorter)
    if isinstance(transform, TrainTransform):
        return EvalTransform(transform.crop_size)
    return transform
