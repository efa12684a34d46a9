"""Spectrogram: an RGB-pretrained ViT on 1-channel log-mel spectrograms of any (non-square) size.

Paper: *ASiT: Local-Global Audio Spectrogram vIsion Transformer for Event Classification* (Atito et al., 2022,
arXiv:2211.13189), after AST (Gong et al., Interspeech 2021, arXiv:2104.01778), which showed that ImageNet
pretraining of the ViT helps audio classification from spectrograms.

Claim implemented (AST §2.2, "cross-modality transfer"): the 1-channel patch embedding is the sum of the
pretrained R, G, B kernels (timm's `adapt_input_conv(1, w)`), so a grey input gives exactly what the RGB model
gives on that input replicated to three channels (equal per-channel normalisation); the position embedding is
resampled (bicubic, timm's `resample_abs_pos_embed`) to the spectrogram's grid, e.g. 128 mel bins x 1024 frames.
`log_mel` turns waveforms into the input (`spectrogram_algo`: `torch.stft` + a triangular mel filterbank).

Plugs in at: `patch_embed.proj` (1-channel Conv2d) and `pos_embed` (resampled), through `vitkit.models.inflate`.
Composes with every other method; apply it before `ssf`. Trainable: the patch embedding and position embedding
(`train_embed`) and the head (AST fine-tunes everything: add `full` for that). Normalisation: mean and std of the
model's channels, averaged (AST normalises by the dataset's;
set them with `vitkit.models.loading.set_data_config`).
Hand-written here, and why: torchaudio is not a dependency (and would only give the filterbank); timm converts
kernels and position embeddings at load time only. Differs from the reference: AST cuts overlapping patches
(stride 10) and fits the position embedding to its grid by interpolating and cropping; here patches keep the
pretrained stride and the grid is resampled bicubically, prefix entries kept, as timm does. ASiT's group-masked
pretraining is not part of this module.
Docs: docs/applications.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch.nn as nn

from vitkit.models.inflate import input_conv, replace_input_conv, resize_grid
from vitkit.registry import register

from ._common import earlier_trainable, freeze_except
from .spectrogram_algo import log_mel  # noqa: F401  (vitkit.adapt.spectrogram.log_mel: waveforms -> input)


@dataclass(frozen=True)
class Config:
    INPUT: ClassVar[str] = "1-channel spectrograms (B, 1, mel bins, frames)"  # bench: its procedural task only
    img_size: Optional[tuple[int, int]] = field(default=None, metadata={
        "help": "spectrogram size (mel bins, frames), a multiple of the patch size; AST: (128, 1024). None keeps "
                "the model's input size"})
    train_embed: bool = field(default=True, metadata={
        "help": "train the patch embedding and the position embedding"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given (AdamW; from benchmarks/applications.py's audio "
                "task, with `full`; not swept)"})
    weight_decay: float = field(default=0.05, metadata={"help": "vk.fit's AdamW weight decay unless one is given; "
                                                          "from vk.fit's default, not swept for this adapter"})

    def __post_init__(self):
        if self.img_size is not None:
            object.__setattr__(self, "img_size", tuple(self.img_size))
            if len(self.img_size) != 2 or min(self.img_size) < 1:
                raise ValueError(f"spectrogram: `img_size` must be (mel bins, frames), got {self.img_size}")


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if input_conv(model, "spectrogram").in_channels != 3:
        raise NotImplementedError(f"spectrogram: needs an RGB (3-channel) patch embedding, got "
                                  f"{model.patch_embed.proj.in_channels} channels")
    keep = earlier_trainable(model)
    replace_input_conv(model, ["sum"], "spectrogram")
    if cfg.img_size is not None:
        resize_grid(model, cfg.img_size, "spectrogram")
    train = set()
    if cfg.train_embed:
        train = {f"patch_embed.proj.{n}" for n, _ in model.patch_embed.proj.named_parameters()}
        train |= {"pos_embed"} if getattr(model, "pos_embed", None) is not None else set()
    freeze_except(model, keep | train, cfg.train_head)
    return model


register("spectrogram", kind="adapt", config=Config, apply=apply)
