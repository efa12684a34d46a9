"""Paired: an RGB-pretrained ViT on image pairs (observation + goal, before + after), fused before the ViT.

Paper: *PIG-Nav: Key Insights for Pretrained Image Goal Navigation Models* (2025, arXiv:2507.17220): the
observation and the goal image are fused at the input of one pretrained ViT (early fusion) rather than encoded
apart and concatenated (late fusion).

Claim implemented: early fusion as a 6-channel patch embedding whose second image's kernels start at zero, so the
adapted model starts as the single-image model (exactly: a pair with a zero second image, or any second image
before training, gives the single-image outputs); training teaches the kernels what the goal adds. Alternative
`mode="tokens"`: both images go through the pretrained patch embedding, each stream gets the 2-D position
embedding plus a learned segment embedding (BERT-style, N(0, 0.02)), and the two token streams are concatenated
(2x the tokens; the token grid is the two grids stacked vertically).

Input: `(B, 6, H, W)`, the two normalised images stacked on the channel axis (`torch.cat([obs, goal], 1)`).
Plugs in at: `patch_embed.proj` (early; `vitkit.models.inflate.replace_input_conv`) or the whole patch embedding
(tokens; `inflate.install_embed`). Composes with every other method; apply it before `ssf`. Trainable: the patch
embedding (+ segment embedding) (`train_embed`) and the head. Hand-written here, and why: no maintained library
inflates a pretrained ViT to image pairs. Differs from the reference: PIG-Nav's auxiliary heads (relative pose)
are not part of this module. Docs: docs/applications.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from vitkit.models.inflate import check_ndim, grid_pos_at, input_conv, install_embed, replace_input_conv
from vitkit.registry import register

from ._common import earlier_trainable, freeze_except


@dataclass(frozen=True)
class Config:
    INPUT: ClassVar[str] = "image pairs (B, 6, H, W)"  # bench: its procedural task only
    mode: Literal["early", "tokens"] = field(default="early", metadata={
        "help": "early: 6-channel patch embedding, second image's kernels zero (starts as the single-image model); "
                "tokens: two token streams with a segment embedding"})
    train_embed: bool = field(default=True, metadata={
        "help": "train the patch embedding (and the segment embedding in tokens mode)"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given (AdamW; from the other input adapters' demos: no "
                "paired demo measured it)"})
    weight_decay: float = field(default=0.05, metadata={"help": "vk.fit's AdamW weight decay unless one is given; "
                                                          "from vk.fit's default, not swept for this adapter"})


class PairTokens(nn.Module):
    """Two images `(B, 2C, H, W)` -> two token streams through the pretrained `proj`/`norm`, + segment embedding."""

    def __init__(self, patch_embed: nn.Module):
        super().__init__()
        self.proj, self.norm = patch_embed.proj, patch_embed.norm  # same keys as timm's PatchEmbed: not re-saved
        self.patch_size = tuple(patch_embed.patch_size)
        gh, gw = patch_embed.grid_size
        self.grid_size, self.num_patches = (2 * gh, gw), 2 * gh * gw
        self.img_size = tuple(patch_embed.img_size)  # of each image
        self.in_chans = 2 * self.proj.in_channels
        self.segment = nn.Parameter(torch.randn(2, self.proj.out_channels) * 0.02)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        check_ndim(x, 4, f"image pairs (B, {self.in_chans}, H, W)", "paired")
        ph, pw = self.patch_size
        if x.shape[1] != self.in_chans or x.shape[2] % ph or x.shape[3] % pw:
            raise ValueError(f"paired: expected image pairs (B, {self.in_chans}, H, W) with H, W multiples of "
                             f"{ph}x{pw}, got {tuple(x.shape)}")
        return (2 * x.shape[2] // ph, x.shape[3] // pw)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A blank pair of the configured size (`vk.info` counts FLOPs on it)."""
        return self.proj.weight.new_zeros(batch, self.in_chans, *self.img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # -> (B, 2, gh, gw, D)
        self.token_grid(x)  # checks the input (timm's own forward, without the block runner, skips embed's check)
        a, b = x.chunk(2, dim=1)
        return torch.stack([self.norm(self.proj(a).permute(0, 2, 3, 1)),
                            self.norm(self.proj(b).permute(0, 2, 3, 1))], dim=1)

    def position(self, out: torch.Tensor, model: nn.Module) -> torch.Tensor:
        B, S, gh, gw, D = out.shape
        pos = grid_pos_at(model, (gh, gw)).reshape(1, 1, gh * gw, D)
        return (out.reshape(B, S, gh * gw, D) + pos + self.segment[None, :, None]).reshape(B, S * gh * gw, D)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    conv = input_conv(model, "paired")
    keep = earlier_trainable(model)
    if cfg.mode == "early":
        c = conv.in_channels
        replace_input_conv(model, list(range(c)) + ["zero"] * c, "paired", stats=list(range(c)) * 2)
        train = {f"patch_embed.proj.{n}" for n, _ in model.patch_embed.proj.named_parameters()}
    else:
        install_embed(model, PairTokens(model.patch_embed), "paired")
        train = {f"patch_embed.{n}" for n, _ in model.patch_embed.named_parameters()}
    freeze_except(model, keep | (train if cfg.train_embed else set()), cfg.train_head)
    return model


register("paired", kind="adapt", config=Config, apply=apply, identity={"mode": "early"})
