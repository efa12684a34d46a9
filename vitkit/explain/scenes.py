"""Evaluation scenes with exact object masks, built from real images offline (for `segment` / `similarity_overlap`).

* `composites`: a real object image (e.g. a CIFAR-10 test JPEG) pasted, patch-aligned, onto a crop of one of
  scikit-image's bundled textures (brick, grass, gravel); mask = the pasted square, prompt = its centre.
* `mosaics`: 2×2 mosaics of real images (MMC-style check of the spec): each quadrant is one object.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

TEXTURES = ("brick", "grass", "gravel")


def texture(name: str) -> np.ndarray:
    """A scikit-image texture (512×512 grey) as an RGB uint8 array."""
    import skimage.data

    if name not in TEXTURES:
        raise ValueError(f"scenes: unknown texture {name!r}; choose one of {TEXTURES}")
    t = getattr(skimage.data, name)()
    return np.stack([t] * 3, -1)


def load_images(files: Sequence[Path], size: int) -> list[np.ndarray]:
    """RGB uint8 arrays resized (bilinear) to size×size."""
    return [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files]


def composites(objects: Sequence[np.ndarray], canvas: int = 64, patch: int = 4, seed: int = 0,
               textures: Sequence[str] = TEXTURES, bg_scale: int = 4) -> tuple[np.ndarray, np.ndarray, list]:
    """Paste each object (s×s RGB uint8) onto a random texture crop at a random patch-aligned position.

    Returns:
        images (B, canvas, canvas, 3) uint8, masks (B, canvas, canvas) bool, prompts [(x, y)] at object centres.
    """
    rng = np.random.default_rng(seed)
    tex = {n: texture(n) for n in textures}
    images, masks, points = [], [], []
    for obj in objects:
        s = obj.shape[0]
        t = tex[textures[rng.integers(len(textures))]]
        crop = canvas * bg_scale  # downscaled larger crop: a texture at the objects' scale
        y, x = rng.integers(0, t.shape[0] - crop), rng.integers(0, t.shape[1] - crop)
        bg = np.asarray(Image.fromarray(t[y:y + crop, x:x + crop]).resize((canvas, canvas), Image.BILINEAR)).copy()
        oy, ox = (rng.integers(0, (canvas - s) // patch + 1, size=2) * patch).tolist()
        bg[oy:oy + s, ox:ox + s] = obj
        m = np.zeros((canvas, canvas), bool)
        m[oy:oy + s, ox:ox + s] = True
        images.append(bg)
        masks.append(m)
        points.append((ox + s // 2, oy + s // 2))
    return np.stack(images), np.stack(masks), points


def mosaics(objects: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list]:
    """2×2 mosaics of consecutive groups of four s×s images; labels 0..3 per quadrant; prompt = quadrant-0
    centre. Returns images (B, 2s, 2s, 3), label maps (B, 2s, 2s) int, prompts [(x, y)]."""
    s = objects[0].shape[0]
    images, labels = [], []
    for i in range(0, len(objects) - 3, 4):
        a, b, c, d = objects[i:i + 4]
        images.append(np.concatenate([np.concatenate([a, b], 1), np.concatenate([c, d], 1)], 0))
        lab = np.zeros((2 * s, 2 * s), np.int64)
        lab[:s, s:], lab[s:, :s], lab[s:, s:] = 1, 2, 3
        labels.append(lab)
    return np.stack(images), np.stack(labels), [(s // 2, s // 2)] * len(images)


def to_tensor(images: np.ndarray, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) float."""
    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
