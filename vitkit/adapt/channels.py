"""Channels: an RGB-pretrained ViT on N-channel inputs (multispectral tiles), named bands on the R/G/B kernels.

Paper: *PhilEO Bench* / *MajorTOM* (ESA Φ-lab, 2024; arXiv:2401.04464 and arXiv:2402.12095): Earth-observation
foundation models judged by n-shot density regression and land cover on 10-band Sentinel-2 tiles.

Claim implemented: an N-channel patch embedding that starts as the pretrained one: the bands named in `rgb`
take the pretrained R, G, B kernels, every other band starts from the mean kernel or zero (`rest`). With
`rest="zero"` the adapted model's outputs equal the RGB model's on the named bands, whatever the other bands
hold; training then learns what they add. Per-band normalisation follows: a named band keeps the model's
R/G/B mean and std, the others take their average (`vitkit.models.loading.set_data_config` changes
them).

Plugs in at: `patch_embed.proj` (a new Conv2d, built by `vitkit.models.inflate`, on timm's
`adapt_input_conv`). Composes with every other method (nothing else is touched); apply it before `ssf`, which
wraps the projection. Trainable: the new patch embedding (`train_embed`) and the head; adapters applied before
keep theirs, applied after add theirs. Saves/loads through `vk.save` (the new kernels are saved).
Hand-written here, and why: timm adapts input convolutions only at load time and only by repeating R, G, B
(scaled 3/N); band-to-kernel mapping and zero starts are not offered by any library. Differs from the reference:
PhilEO's dense head is the `dense` method (`vitkit/adapt/dense.py`), its n-shot protocol the demo's
(`benchmarks/applications.py --tasks tiles`). Docs: docs/applications.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch.nn as nn

from vitkit.models.inflate import input_conv, replace_input_conv
from vitkit.registry import register

from ._common import earlier_trainable, freeze_except

SENTINEL2 = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12")  # PhilEO's 10 bands


@dataclass(frozen=True)
class Config:
    INPUT: ClassVar[str] = "multispectral tiles (B, len(bands), H, W)"  # bench: its procedural task only
    bands: tuple[str, ...] = field(default=SENTINEL2, metadata={
        "help": "input channel names, in input order (default: PhilEO's 10 Sentinel-2 bands)"})
    rgb: tuple[str, ...] = field(default=("B04", "B03", "B02"), metadata={
        "help": "the bands that take the pretrained R, G, B kernels, in that order (Sentinel-2: B04 B03 B02); "
                "fewer than 3 maps the first ones only"})
    rest: Literal["zero", "mean"] = field(default="zero", metadata={
        "help": "start of the other bands' kernels: zero (outputs start equal to the RGB model's) or the mean "
                "pretrained kernel"})
    train_embed: bool = field(default=True, metadata={"help": "train the new patch embedding (all bands)"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head"})
    lr: float = field(default=3e-3, metadata={
        "help": "vk.fit's learning rate unless one is given (AdamW; from benchmarks/applications.py's tiles "
                "task, not swept)"})
    weight_decay: float = field(default=0.05, metadata={"help": "vk.fit's AdamW weight decay unless one is given; "
                                                          "from vk.fit's default, not swept for this adapter"})

    def __post_init__(self):
        object.__setattr__(self, "bands", tuple(self.bands))
        object.__setattr__(self, "rgb", tuple(self.rgb))
        if not self.bands:
            raise ValueError("channels: `bands` must name at least one input channel")
        dup = sorted({b for b in self.bands if self.bands.count(b) > 1})
        if dup:
            raise ValueError(f"channels: `bands` names {dup} more than once")
        missing = [b for b in self.rgb if b not in self.bands]
        if missing or len(self.rgb) > 3 or len(set(self.rgb)) != len(self.rgb):
            raise ValueError(f"channels: `rgb` must be up to 3 distinct names from `bands` {list(self.bands)}, "
                             f"got {list(self.rgb)}")


def sources(cfg: Config) -> list:
    """Where each band's kernel comes from: a pretrained channel index, or `cfg.rest`."""
    return [cfg.rgb.index(b) if b in cfg.rgb else cfg.rest for b in cfg.bands]


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if input_conv(model, "channels").in_channels != 3:
        raise NotImplementedError(f"channels: needs an RGB (3-channel) patch embedding, got "
                                  f"{model.patch_embed.proj.in_channels} channels")
    keep = earlier_trainable(model)
    replace_input_conv(model, sources(cfg), "channels")
    train = {f"patch_embed.proj.{n}" for n, _ in model.patch_embed.proj.named_parameters()} if cfg.train_embed \
        else set()
    freeze_except(model, keep | train, cfg.train_head)
    return model


register("channels", kind="adapt", config=Config, apply=apply, identity={"rest": "zero"})
