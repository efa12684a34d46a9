"""Images in, tensors out, heatmaps back onto the image: the small I/O shared by `explain` and `segment`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from vitkit.models.layout import token_layout

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # kept for imports; the statistics used come from `vk.data.data_config`
IMAGENET_STD = (0.229, 0.224, 0.225)


def _overrides(model: nn.Module, size=None, mean=None, std=None) -> dict:
    """`vk.data.data_config` overrides for an explicit input `size` (H, W or int) and `mean` / `std`."""
    from vitkit.data.transforms import data_config
    from vitkit.models.loading import norm_values

    out = {}
    chans = data_config(model)["input_size"][0]
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        token_layout(model).grid((h, w))  # clear error on sizes the model cannot take
        out["input_size"] = (chans, h, w)
    if mean is not None:
        out["mean"] = norm_values("mean", mean, chans)  # one per channel, else a clear error
    if std is not None:
        out["std"] = norm_values("std", std, chans)
    return out


def norm_stats(model: nn.Module, mean=None, std=None) -> tuple[tuple, tuple]:
    """Normalisation of `model`: the given values, else `vk.data.data_config(model)`'s (the model's recorded
    statistics: embedded models, `vk.load(..., mean=, std=)`, `pretrained_cfg`; ImageNet's only as timm's
    default)."""
    from vitkit.data.transforms import data_config

    cfg = data_config(model, **_overrides(model, mean=mean, std=std))
    return tuple(cfg["mean"]), tuple(cfg["std"])


def model_transform(model: nn.Module, size=None, mean=None, std=None):
    """The evaluation transform `vk.data.transform(model)`, with `size` / `mean` / `std` overriding its config:
    the same resize, crop and normalisation as training and evaluation."""
    from vitkit.data.transforms import transform

    return transform(model, **_overrides(model, size, mean, std))


def load_image(image: ImageLike) -> Image.Image:
    """A path, PIL image or HxW[x3] uint8/float array as a PIL image, its mode left as it is (the model's
    transform converts it, as it does for datasets). A file that cannot be decoded raises `CorruptImageError`
    naming it, a missing one `FileNotFoundError`."""
    if isinstance(image, (str, os.PathLike)):
        from vitkit.data.datasets import read_image

        return read_image(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        arr = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        return Image.fromarray(arr)
    raise TypeError(f"expected a path, PIL image or numpy array, got {type(image).__name__}")


def to_pil(image: ImageLike) -> Image.Image:
    """A path, PIL image or HxWx3 uint8/float array as an RGB PIL image."""
    return load_image(image).convert("RGB")


def shown_image(x: torch.Tensor, mean, std) -> Image.Image:
    """The RGB image a normalised (1, C, H, W) input shows: the normalisation undone (exact: the transform's
    values are k/255)."""
    t = x[0].detach().float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    arr = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")


def prepare(model: nn.Module, image: ImageLike, size: Union[None, int, Sequence[int]] = None, mean=None,
            std=None) -> tuple[torch.Tensor, Optional[Image.Image]]:
    """(1, C, H, W) normalised input and the RGB image it shows (None when a tensor was given).

    A tensor is taken as already normalised, (C, H, W) or (B, C, H, W). Other images go through
    `vk.data.transform(model)` (`model_transform`): the resize, centre crop and normalisation the model is
    trained and evaluated with, at `size` (default the model's input size) and with `mean` / `std` (default
    `vk.data.data_config(model)`'s).
    """
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image.unsqueeze(0)
        return x, None
    tf = model_transform(model, size, mean, std)
    x = tf(load_image(image)).unsqueeze(0)
    pil = shown_image(x, *norm_stats(model, mean, std))
    param = next(model.parameters())
    return x.to(param.device, param.dtype), pil


def save_pair(image: Image.Image, array: np.ndarray, path: Union[str, os.PathLike]) -> tuple[Path, Path]:
    """Write `image` at `path` (its format from the extension) and `array` beside it as `.npy`, each atomically
    (a crash leaves the previous files, never half-written ones). A ValueError for an extension PIL cannot write."""
    from vitkit.io import atomic_write

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE or path.suffix.lower() == ".npy":
        raise ValueError(f"cannot write an image to {path}: give a file name ending in .png (or .jpg, .webp, ...); "
                         "the raw map goes beside it as .npy")
    npy = path.with_suffix(".npy")

    def write_npy(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, array)

    atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
    atomic_write(npy, write_npy)
    return path, npy


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
