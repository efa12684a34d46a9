"""Out-of-distribution variants of an evaluation split (bench.md §8), deterministic given the seed.

`rotate{15,30,90}`: bilinear rotation by ± the angle (sign drawn per image), black fill; `noise{0.1,0.2}`:
additive Gaussian noise of that sigma on [0, 1] pixels, clipped; `invert`: 1 - x; `jpeg{30,10}`: re-encoded
at that JPEG quality. Written with PIL and numpy; applied to the PIL image before the model's transform.
"""
from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from vitkit.data import VisionDataset


def apply_variant(image: Image.Image, variant: str, rng: np.random.Generator) -> Image.Image:
    """One OOD variant of one PIL image."""
    if m := re.fullmatch(r"rotate(\d+)", variant):
        angle = float(m.group(1)) * (1 if rng.random() < 0.5 else -1)
        return image.rotate(angle, resample=Image.BILINEAR, fillcolor=0 if image.mode == "L" else (0,) * len(image.getbands()))
    if m := re.fullmatch(r"noise([\d.]+)", variant):
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        noisy = np.clip(pixels + rng.normal(0.0, float(m.group(1)), pixels.shape), 0.0, 1.0)
        return Image.fromarray(np.round(noisy * 255).astype(np.uint8), mode=image.mode)
    if variant == "invert":
        return Image.fromarray(255 - np.asarray(image), mode=image.mode)
    if m := re.fullmatch(r"jpeg(\d+)", variant):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=int(m.group(1)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert(image.mode)
    raise ValueError(f"unknown OOD variant `{variant}`")


class OODDataset(VisionDataset):
    """`dataset` with `variant` applied to every image (image i always gets the same random draw)."""

    def __init__(self, dataset: VisionDataset, variant: str, seed: int = 0):
        self.dataset, self.variant, self.seed = dataset, variant, seed
        self.targets, self.classes, self.transform = dataset.targets, dataset.classes, dataset.transform

    def raw(self, index: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, index])
        return apply_variant(self.dataset.raw(index), self.variant, rng)
