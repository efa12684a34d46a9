"""Transforms resolved from the model: timm's `resolve_model_data_config` + `create_transform`.

Two things are made explicit, and logged the first time they happen, because they otherwise happen silently:
* the input size is the model's own (`patch_embed.img_size`), not the 224 px of a default `pretrained_cfg`;
* grey (or RGBA, palette) images are converted to the model's channels, and images smaller than the input are
  resized up to it before timm's transform (which would otherwise crop or pad them in ways that depend on
  `crop_pct`).

Models without a `pretrained_cfg` (random init, local files, vitkit's embedded model), or whose input size is not
the one their `pretrained_cfg` describes, get `crop_pct=1.0`: the whole image is kept, which is what
small-image checkpoints are trained with.

This is the one preprocessing source of vitkit: training, evaluation, bench and `vk.explain` / `vk.segment`
(`vitkit.explain.image.prepare`) all build their input through `transform(model)`; `map_point` follows a pixel
through the same resize and crop.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch.nn as nn
from PIL import Image

_log = logging.getLogger("vitkit")


def data_config(model: nn.Module, **overrides: Any) -> dict:
    """timm's data config for `model` (mean, std, interpolation, crop), with the model's own input size."""
    from timm.data import resolve_model_data_config

    cfg = dict(resolve_model_data_config(model))
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)  # the default size also of a `dynamic_img_size` model
    if img_size is not None:
        chans = next(m for m in patch_embed.modules()  # SSF may wrap proj, bcosify replace it (in_channels: 3)
                     if isinstance(m, nn.Conv2d) or hasattr(m, "in_channels")).in_channels
        size = (chans, *img_size)
        if tuple(cfg["input_size"]) != size:  # the pretrained_cfg describes another input size: ignore its crop
            _log.debug("data config: input size %s from the model (pretrained_cfg said %s)", size, cfg["input_size"])
            cfg["input_size"] = size
            cfg["crop_pct"] = 1.0
    if not getattr(model, "pretrained_cfg", None):
        cfg["crop_pct"] = 1.0
    cfg.update(overrides)
    return cfg


class Prepare:
    """Convert a PIL image to `channels` and, if smaller than `size` (H, W), resize it up; logged once."""

    def __init__(self, size: tuple[int, int], channels: int = 3, interpolation: str = "bicubic"):
        self.size = tuple(size)
        self.mode = {1: "L", 3: "RGB"}[channels]
        self.resample = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(interpolation, Image.BICUBIC)
        self._said: set[str] = set()

    def _say(self, key: str, message: str, *args, warn: bool = False) -> None:
        if key not in self._said:
            self._said.add(key)
            if warn:  # it changes what the model sees: visible from Python, not only in the log
                warnings.warn(message % args, stacklevel=2)
            else:
                _log.info(message, *args)

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode != self.mode:
            self._say(f"mode{image.mode}", "images are %s (%d channel(s)): converted to %s for the model",
                      image.mode, len(image.getbands()), self.mode, warn=True)
            image = image.convert(self.mode)
        return self.resize(image)

    def resize(self, image: Image.Image) -> Image.Image:
        """The size step alone: `image` resized up to `size` when it is smaller in either dimension."""
        w, h = image.size
        if h < self.size[0] or w < self.size[1]:
            self._say(f"size{w}x{h}", "images are %dx%d, smaller than the model input %dx%d: resized up",
                      w, h, self.size[1], self.size[0])
            image = image.resize((self.size[1], self.size[0]), self.resample)
        return image

    def __repr__(self) -> str:
        return f"Prepare(size={self.size}, mode={self.mode})"


def transform(model: nn.Module, train: bool = False, **overrides: Any) -> Callable:
    """The model's transform: `Prepare` (channels, small images) then timm's `create_transform`.

    Args:
        model: a timm ViT (its data config and input size are read).
        train: training augmentation (timm's RandomResizedCrop, flip, colour jitter) instead of resize + crop.
        **overrides: data-config keys (`mean`, `std`, `crop_pct`, `input_size`) or `create_transform` arguments
            (`scale`, `hflip`, `color_jitter`, `auto_augment`, ...).
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    cfg_keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    cfg = data_config(model, **{k: v for k, v in overrides.items() if k in cfg_keys})
    extra = {k: v for k, v in overrides.items() if k not in cfg_keys}
    channels, h, w = cfg["input_size"]
    timm_tf = create_transform(**cfg, is_training=train, **extra)
    return T.Compose([Prepare((h, w), channels, cfg["interpolation"]), timm_tf])


def _steps(tf: Callable) -> list:
    """The steps of a (nested) torchvision `Compose`, flattened."""
    inner = getattr(tf, "transforms", None)
    return [step for t in inner for step in _steps(t)] if isinstance(inner, (list, tuple)) else [tf]


def map_point(tf: Callable, point: tuple[float, float], image_size: tuple[int, int]) -> tuple[float, float]:
    """Pixel `point` (x, y) of an image of `image_size` (W, H) -> (x, y) in the tensor `tf` makes of it.

    `tf` is an evaluation `transform(model)`: `Prepare`, resizes (timm's `Resize` of the short side,
    `ResizeKeepRatio`) and a centre crop (with padding when the crop is larger), then tensor steps, which do not
    move pixels. Continuous coordinates: (0, 0) is the top-left corner, pixel centres lie at +0.5. The result
    may lie outside the tensor when the crop cut that part of the image away.
    """
    from torchvision import transforms as T

    from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio

    x, y = float(point[0]), float(point[1])
    image = Image.new("L", tuple(int(v) for v in image_size))
    for step in _steps(tf):
        if isinstance(step, (T.ToTensor, T.PILToTensor)) or type(step).__name__ in ("MaybeToTensor", "ToNumpy"):
            break  # the tensor steps (normalisation) leave the geometry alone
        w, h = image.size
        if isinstance(step, Prepare):
            image = step.resize(image)
        elif isinstance(step, (T.Resize, ResizeKeepRatio)):
            image = step(image)
        elif isinstance(step, (T.CenterCrop, CenterCropOrPad)):
            image = step(image)
            cw, ch = image.size
            x += (cw - w) // 2 if cw > w else -int(round((w - cw) / 2.0))
            y += (ch - h) // 2 if ch > h else -int(round((h - ch) / 2.0))
            continue
        else:
            before = image.size
            image = step(image)
            if image.size != before:
                raise NotImplementedError(f"map_point: transform step {step!r} changes the image size in a way "
                                          "map_point does not follow; use an evaluation `transform(model)`")
            continue
        x, y = x * image.size[0] / w, y * image.size[1] / h
    return x, y
