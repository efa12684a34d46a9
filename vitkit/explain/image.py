"""Images in, tensors out, heatmaps back onto the image: the small I/O shared by `explain` and `segment`."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from vitkit.models.layout import token_layout

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def norm_stats(model: nn.Module, mean=None, std=None) -> tuple[tuple, tuple]:
    """Normalisation of `model`: the given values, else its `pretrained_cfg`, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(mean) if mean is not None else tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(std) if std is not None else tuple(cfg.get("std", IMAGENET_STD))
    return mean, std


def to_pil(image: ImageLike) -> Image.Image:
    """A path, PIL image or HxWx3 uint8/float array as an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(f"expected a path, PIL image or numpy array, got {type(image).__name__}")


def prepare(model: nn.Module, image: ImageLike, size: Union[None, int, Sequence[int]] = None, mean=None,
            std=None) -> tuple[torch.Tensor, Optional[Image.Image]]:
    """(1, 3, H, W) normalised input and the resized RGB image it shows (None when a tensor was given).

    A tensor is taken as already normalised, (C, H, W) or (B, C, H, W). Other images are resized (bilinear) to
    `size` (default: the model's input size), scaled to [0, 1] and normalised with `norm_stats`.
    """
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image.unsqueeze(0)
        return x, None
    layout = token_layout(model)
    if size is None:
        h, w = layout.img_size
    else:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
    layout.grid((h, w))  # clear error on sizes the model cannot take
    pil = to_pil(image).resize((w, h), Image.BILINEAR)
    mean, std = norm_stats(model, mean, std)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    param = next(model.parameters())
    return x.unsqueeze(0).to(param.device, param.dtype), pil


def upsample(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) -> (B, H, W), bilinear (align_corners=False)."""
    return F.interpolate(grid_map.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def normalise_max(m: torch.Tensor) -> torch.Tensor:
    """Divide each sample's map by its maximum (maps of zeros stay zeros)."""
    peak = m.flatten(1).amax(1).clamp_min(torch.finfo(m.dtype).tiny).view(-1, *([1] * (m.ndim - 1)))
    return m / peak


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Colour-mapped `heat` (H, W, values in [0, 1]) blended over `image`."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    base = np.asarray(image.convert("RGB").resize(heat.shape[::-1], Image.BILINEAR), dtype=np.float32) / 255
    return Image.fromarray(((1 - alpha) * base + alpha * colours).clip(0, 1).__mul__(255).round().astype(np.uint8))


def mask_overlay(image: Image.Image, mask: np.ndarray, point=None, colour=(1.0, 0.1, 0.1)) -> Image.Image:
    """`image` with `mask` (H, W bool) tinted and the prompt `point` (x, y) marked."""
    base = np.asarray(image.convert("RGB").resize(mask.shape[::-1], Image.BILINEAR), dtype=np.float32) / 255
    out = base.copy()
    out[mask] = 0.45 * base[mask] + 0.55 * np.array(colour)
    if point is not None:
        x, y = int(point[0]), int(point[1])
        r = max(1, mask.shape[0] // 64)
        out[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = (0.0, 1.0, 0.0)
    return Image.fromarray((out * 255).round().astype(np.uint8))
