"""A procedural segmentation dataset: no files, deterministic from a seed, learnable by a tiny CNN.

Each foreground class is a family of objects: one shape (disc, square, triangle, ring, cross), one
texture (solid, stripes, checker, dots) and one hue range, with the size, position, rotation,
colour and texture parameters jittered per object. Every image holds 1-4 objects of uniformly drawn
classes (so classes co-occur and background shift really happens) on a cluttered background of
smooth noise and low-saturation blobs, all labelled 0. No pixel is IGNORE.

Item (seed, split, index) is generated from its own RNG, so it is the same pixels in every process
and every run, and train and val never share an item.
"""

from __future__ import annotations

import colorsys
import re
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ciss.data.base import SegDataset
from ciss.data.errors import DataError

SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("solid", "stripes", "checker", "dots")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)  # each class a distinct (shape, texture) pair
DEFAULT_LENGTHS = {"train": 200, "val": 60}
_GOLDEN = 0.6180339887498949  # hue step that keeps any number of hues far apart
_HUE_NAMES = ((0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.30, "lime"), (0.45, "green"),
              (0.53, "cyan"), (0.63, "azure"), (0.72, "blue"), (0.80, "violet"), (0.92, "magenta"),
              (1.01, "red"))


def _hue_name(h: float) -> str:
    return next(name for bound, name in _HUE_NAMES if h < bound)


@dataclass(frozen=True)
class ClassStyle:
    shape: str
    texture: str
    hue: float  # centre of the class's hue range, in [0, 1)

    @property
    def name(self) -> str:
        return f"{_hue_name(self.hue)}-{self.texture}-{self.shape}"


def class_styles(num_classes: int) -> list[ClassStyle]:
    """Style of foreground classes 1..num_classes (list index k = class k + 1)."""
    return [
        ClassStyle(SHAPES[k % len(SHAPES)], TEXTURES[k // len(SHAPES)], (k * _GOLDEN) % 1.0)
        for k in range(num_classes)
    ]


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """(H, W) bool for a shape of radius r in rotated, centred coordinates (u, v)."""
    if shape == "disc":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85 * r
    if shape == "triangle":
        return (v >= -0.5 * r) & (v <= r - np.sqrt(3.0) * np.abs(u))
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.3 * r) & (b <= r)) | ((b <= 0.3 * r) & (a <= r))
    raise AssertionError(shape)


def _texture_on(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """(H, W) bool: where the texture shows the class colour (elsewhere a darker shade)."""
    if texture == "solid":
        return np.ones(u.shape, dtype=bool)
    if texture == "stripes":
        return np.mod(u / period, 1.0) < 0.5
    if texture == "checker":
        return (np.floor(u / period) + np.floor(v / period)).astype(np.int64) % 2 == 0
    if texture == "dots":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        return du * du + dv * dv <= (0.3 * period) ** 2
    raise AssertionError(texture)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 6) -> np.ndarray:
    """(H, W) float in ~[-1, 1]: bilinear upsampling of a coarse random grid."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    ys = np.linspace(0, cells, h, dtype=np.float32)
    xs = np.linspace(0, cells, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(np.int64), cells - 1)
    x0 = np.minimum(xs.astype(np.int64), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx)


class SyntheticDataset(SegDataset):
    """Procedural shapes dataset; see module docstring. `classes[0]` is background."""

    name = "synthetic"
    label_hint = "synthetic masks are generated; this is a bug in ciss.data.synthetic"

    def __init__(
        self,
        split: str = "train",
        num_classes: int = 10,
        size: int | tuple[int, int] = 64,
        length: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if not 1 <= int(num_classes) <= MAX_CLASSES:
            raise DataError(
                f"synthetic num_classes={num_classes}: supported are 1..{MAX_CLASSES} foreground "
                f"classes (one per shape x texture pair)"
            )
        if isinstance(size, str):  # from a command line: "64", "48x64" or "48,64"
            parts = [p for p in re.split(r"[x,\s()\[\]]+", size) if p]
            size = int(parts[0]) if len(parts) == 1 else tuple(int(p) for p in parts)
        if isinstance(size, (int, np.integer)):
            size = (size, size)
        hw = tuple(int(x) for x in size)
        if len(hw) != 2 or min(hw) < 16:
            raise DataError(f"synthetic size={size}: use an int or (H, W), each at least 16")
        n = DEFAULT_LENGTHS.get(split, 60) if length is None else int(length)
        if n < 1:
            raise DataError(f"synthetic length={length}: need at least one image")
        self.split = split
        self.num_classes = int(num_classes)
        self.size: tuple[int, int] = (hw[0], hw[1])
        self.seed = int(seed)
        self.styles = class_styles(self.num_classes)
        self.classes = ["background"] + [s.name for s in self.styles]
        self.ids = [f"{split}-{i:05d}" for i in range(n)]
        self.has_images = True
        self.root = None
        self._split_code = zlib.crc32(split.encode("utf-8"))

    def key_params(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "size": list(self.size), "seed": self.seed,
                "generator": 1}

    # -- generation ---------------------------------------------------------------------------

    def _plan(self, i: int) -> dict[str, Any]:
        """Every random choice of item i, drawn in a fixed sequence from the item's own RNG."""
        if not 0 <= i < len(self.ids):
            raise IndexError(f"synthetic {self.split} index {i} out of range 0..{len(self) - 1}")
        rng = np.random.default_rng([self.seed, self._split_code, i])
        h, w = self.size
        m = min(h, w)
        objects = []
        for _ in range(int(rng.integers(1, 5))):
            c = int(rng.integers(1, self.num_classes + 1))
            style = self.styles[c - 1]
            objects.append({
                "cls": c,
                "cy": rng.uniform(0.15, 0.85) * h,
                "cx": rng.uniform(0.15, 0.85) * w,
                "r": rng.uniform(0.13, 0.28) * m,
                "angle": rng.uniform(0, 2 * np.pi),
                "tex_angle": rng.uniform(0, np.pi),
                "period": rng.uniform(4.0, 7.0) * max(1.0, m / 64),
                "colour": _rgb(style.hue + rng.uniform(-0.025, 0.025), rng.uniform(0.65, 1.0),
                               rng.uniform(0.7, 1.0)),
                "shade": rng.uniform(0.35, 0.55),
            })
        return {"objects": objects, "noise_seed": int(rng.integers(0, 2**31 - 1))}

    def _render(self, i: int, with_image: bool) -> tuple[Optional[np.ndarray], np.ndarray]:
        plan = self._plan(i)
        h, w = self.size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        mask = np.zeros((h, w), dtype=np.uint8)
        image = self._background(plan["noise_seed"]) if with_image else None
        for ob in plan["objects"]:
            dy, dx = yy - ob["cy"], xx - ob["cx"]
            ca, sa = np.cos(ob["angle"]), np.sin(ob["angle"])
            u, v = ca * dx + sa * dy, -sa * dx + ca * dy
            style = self.styles[ob["cls"] - 1]
            inside = _shape_mask(style.shape, u, v, ob["r"])
            mask[inside] = ob["cls"]  # later objects occlude earlier ones
            if image is not None:
                ct, st = np.cos(ob["tex_angle"]), np.sin(ob["tex_angle"])
                on = _texture_on(style.texture, ct * xx + st * yy, -st * xx + ct * yy,
                                 ob["period"])
                colour = np.where(on[..., None], ob["colour"], ob["colour"] * ob["shade"])
                image[inside] = colour[inside]
        if image is not None:
            noise = np.random.default_rng(plan["noise_seed"] + 1).normal(0, 6.0, image.shape)
            image = np.clip(image + noise, 0, 255).astype(np.uint8)
        return image, mask

    def _background(self, noise_seed: int) -> np.ndarray:
        """(H, W, 3) float32 clutter: low-saturation base, smooth noise and grey-ish blobs."""
        rng = np.random.default_rng(noise_seed)
        h, w = self.size
        base = _rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.7))
        img = np.broadcast_to(base, (h, w, 3)).copy()
        img += 40.0 * _smooth_noise(rng, h, w)[..., None]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        for _ in range(int(rng.integers(2, 6))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(0.05, 0.2) * h, rng.uniform(0.05, 0.2) * w
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            img[blob] = _rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.9))
        return img

    # -- contract -----------------------------------------------------------------------------

    def load_image(self, i: int) -> np.ndarray:
        image, _ = self._render(i, with_image=True)
        assert image is not None
        return image

    def load_mask(self, i: int) -> np.ndarray:
        return self._render(i, with_image=False)[1]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self._render(i, with_image=True)
        assert image is not None
        return image, mask

    def describe(self, i: int) -> str:
        return f"synthetic {self.split} item {i} (seed {self.seed})"


def open_synthetic(
    root: Any = None,
    split: str = "train",
    num_classes: int = 10,
    size: int | tuple[int, int] = 64,
    length: Optional[int] = None,
    seed: int = 0,
) -> SyntheticDataset:
    # root is accepted (and ignored) so every dataset builds through one signature.
    return SyntheticDataset(split, num_classes=num_classes, size=size, length=length, seed=seed)
