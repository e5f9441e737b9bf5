"""Prediction and visualisation: label PNGs, colour overlays with a legend of class names."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ciss.data.transforms import resize_image, shorter_size
from ciss.metrics import predicted_labels
from ciss.modelfile import ModelFile, load_model


def palette(n: int = 256) -> np.ndarray:
    """The VOC colour map (bit-interleaved), (n, 3) uint8; index 255 is white for 'ignore'."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    if n > 255:
        out[255] = (255, 255, 255)
    return out


def overlay(image: np.ndarray, label: np.ndarray, class_names: Sequence[str],
            alpha: float = 0.5) -> Image.Image:
    """Blend the colour-coded label over the image and add a legend of the classes present."""
    pal = palette()
    colour = pal[label]
    mixed = (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(label) if c != 255]
    row_h = 14
    legend_w = 140
    h = max(image.shape[0], row_h * (len(present) + 1))
    canvas = Image.new("RGB", (image.shape[1] + legend_w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(mixed), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, c in enumerate(present):
        y = 4 + k * row_h
        x = image.shape[1] + 4
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in pal[c]), outline=(0, 0, 0))
        name = class_names[c] if c < len(class_names) else str(c)
        draw.text((x + 14, y - 1), name, fill=(0, 0, 0))
    return canvas


def save_label_png(label: np.ndarray, path: Path) -> None:
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(palette().reshape(-1).tolist())
    img.save(path)


class Predictor:
    """Segments images with a model file or a run directory's model (its last step, or `step`)."""

    def __init__(self, source: str | Path, step: Optional[int] = None, device: str = "cpu") -> None:
        path = Path(source)
        self.model_file = ModelFile.from_run(path, step) if path.is_dir() else load_model(path)
        self.step = self.model_file.step
        if step is not None and step != self.step:
            raise ValueError(f"{path}: a model file holds step {self.step} only; choose a step "
                             f"only with a run directory")
        self.device = torch.device(device)
        self.model = self.model_file.build(self.device)
        self.class_names = list(self.model_file.classes)
        self.num_classes = len(self.class_names)
        self.resize = self.model_file.resize  # predict at the trained scale

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """image (H, W, 3) uint8 RGB -> (H, W) uint8 model labels."""
        h, w = image.shape[:2]
        if self.resize:  # as in training and evaluation (RESIZE_RULE), before normalising
            image = resize_image(np.ascontiguousarray(image, dtype=np.uint8),
                                 *shorter_size(h, w, self.resize))
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div(255)
        mean = torch.tensor(self.model_file.mean).view(3, 1, 1)
        std = torch.tensor(self.model_file.std).view(3, 1, 1)
        x = ((x - mean) / std)[None].to(self.device)
        # the method's own decision rule (e.g. SSUL folds 'unknown' into the background)
        logits = self.model_file.decision_logits(self.model(x))
        if logits.shape[-2:] != (h, w):
            logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear",
                                                     align_corners=False)
        return predicted_labels(logits)[0].cpu().numpy().astype(np.uint8)

    def predict_files(self, paths: Sequence[str | Path], out: str | Path) -> list[Path]:
        out = Path(out)
        stems: dict[str, Path] = {}
        for p in map(Path, paths):  # two inputs of one stem would write the same two files
            if p.stem in stems:
                raise ValueError(f"{stems[p.stem]} and {p} would both be written as {out / p.stem}.png; "
                                 "predict them into separate --out folders or rename one")
            stems[p.stem] = p
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for p in paths:
            p = Path(p)
            try:
                image = np.asarray(Image.open(p).convert("RGB"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{p}: cannot read this image ({exc})") from None
            label = self.predict(image)
            save_label_png(label, out / f"{p.stem}.png")
            overlay(image, label, self.class_names).save(out / f"{p.stem}_overlay.png")
            written += [out / f"{p.stem}.png", out / f"{p.stem}_overlay.png"]
        return written
