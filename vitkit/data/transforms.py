"""Transforms resolved from the model: timm's `resolve_model_data_config` + `create_transform`.

Two things are made explicit, and logged the first time they happen, because they otherwise happen silently:
* the input size is the model's own (`patch_embed.img_size`), not the 224 px of a default `pretrained_cfg`;
* grey (or RGBA, palette) images are converted to the model's channels, and images smaller than the input are
  resized up to it before timm's transform (which would otherwise crop or pad them in ways that depend on
  `crop_pct`).

Models without a `pretrained_cfg` (random init, local files, vitkit's embedded model), or whose input size is not
the one their `pretrained_cfg` describes, get `crop_pct=1.0`: the whole image is kept, which is what
small-image checkpoints are trained with.
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
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        chans = next(m for m in patch_embed.modules() if isinstance(m, nn.Conv2d)).in_channels  # SSF may wrap proj
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
