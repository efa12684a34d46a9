"""Token layout of a timm Vision Transformer.

Every method reads this object instead of hard-coding 197 tokens, 196 patches or "the class token is at 0".
After `_pos_embed` a timm ViT's sequence is `[cls?, reg*, dist?, patches]`; vitkit's prompts (added by
adapters) go right after these prefix tokens and are counted separately by the per-forward token state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits in a ViT's sequence.

    Attributes:
        num_prefix_tokens: tokens before the patches (class + registers + distillation).
        cls_index: index of the class token, or None.
        reg_indices: indices of the register tokens.
        dist_index: index of the distillation token (DeiT), or None.
        pos_embed_covers_prefix: whether `pos_embed` has entries for the prefix tokens
            (False for `no_embed_class=True`, DINOv2 with registers, DeiT-3).
        patch_size: (ph, pw).
        grid_size: (gh, gw) at the model's configured input size.
        dynamic_img_size: whether the model accepts other input sizes.
        embed_dim: token width.
        in_chans: image channels the patch embedding takes.
    """

    num_prefix_tokens: int
    cls_index: int | None
    reg_indices: tuple[int, ...]
    dist_index: int | None
    pos_embed_covers_prefix: bool
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    dynamic_img_size: bool
    embed_dim: int
    in_chans: int

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def img_size(self) -> tuple[int, int]:
        return (self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1])

    def grid(self, input_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid for an input of `input_size` (H, W) pixels; the configured grid when None.

        Raises:
            ValueError: the size is not a multiple of the patch size, or differs from the configured size
                on a model built without `dynamic_img_size=True`.
        """
        if input_size is None:
            return self.grid_size
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        ph, pw = self.patch_size
        if (h, w) != self.img_size and not self.dynamic_img_size:
            raise ValueError(
                f"input size {h}x{w} differs from the model's {self.img_size[0]}x{self.img_size[1]}; "
                "build the model with dynamic_img_size=True (vk.load(..., dynamic_img_size=True)) "
                "or resize the images")
        if h % ph or w % pw:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        return (h // ph, w // pw)

    def num_tokens(self, input_size: int | tuple[int, int] | None = None) -> int:
        gh, gw = self.grid(input_size)
        return self.num_prefix_tokens + gh * gw

    def describe(self) -> str:
        parts = []
        if self.cls_index is not None:
            parts.append("cls")
        if self.reg_indices:
            parts.append(f"{len(self.reg_indices)} reg")
        if self.dist_index is not None:
            parts.append("dist")
        prefix = "+".join(parts) if parts else "no prefix"
        gh, gw = self.grid_size
        return f"{prefix} | {gh}x{gw} patches of {self.patch_size[0]}px" + (" | dynamic size" if self.dynamic_img_size else "")


def token_layout(model: nn.Module) -> TokenLayout:
    """Derive the token layout of a timm `VisionTransformer` (or a model with the same attributes)."""
    for name in ("patch_embed", "num_prefix_tokens"):
        if not hasattr(model, name):
            raise TypeError(f"token_layout: expected a timm VisionTransformer, got {type(model).__name__} "
                            f"without `{name}`")
    has_cls = getattr(model, "cls_token", None) is not None
    num_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    has_dist = getattr(model, "dist_token", None) is not None
    cls_index = 0 if has_cls else None
    start = int(has_cls)
    # timm's _pos_embed concatenates [cls, reg...]; DeiT's distilled model puts dist right after cls.
    dist_index = None
    if has_dist:
        dist_index = start
        start += 1
    reg_indices = tuple(range(start, start + num_reg))
    pe = model.patch_embed
    return TokenLayout(
        num_prefix_tokens=int(model.num_prefix_tokens),
        cls_index=cls_index,
        reg_indices=reg_indices,
        dist_index=dist_index,
        pos_embed_covers_prefix=not bool(getattr(model, "no_embed_class", False)) and model.num_prefix_tokens > 0,
        patch_size=tuple(pe.patch_size),
        grid_size=tuple(pe.grid_size),
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
        embed_dim=int(model.embed_dim),
        # the first convolution, so that a method wrapping `patch_embed.proj` (SSF) does not hide it; token
        # embeddings of input adapters (models/inflate.py) and bcosify's conv on the 6-channel encoding (which
        # takes 3) state the channels they take
        in_chans=getattr(pe, "in_chans", None)
        or next(m for m in pe.modules() if isinstance(m, nn.Conv2d) or hasattr(m, "in_channels")).in_channels,
    )
