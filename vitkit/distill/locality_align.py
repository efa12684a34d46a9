"""Locality alignment (MaskEmbed): post-training that teaches an image-level backbone local, patch-level semantics.

Paper: *Locality Alignment Improves Vision-Language Models* (Covert et al., ICLR 2025), arXiv:2410.11087.

Claim: a student copy of the backbone plus a small decoder, trained to reconstruct from *masked student tokens*
what the frozen teacher outputs on the *masked image*, learns patch features that say what is under each patch
(better patch-level probing, especially for CLIP / SigLIP; VLM gains on RefCOCO, TallyQA, ...). vitkit's
locality metric is the accuracy of a linear probe from single patch features to the object under the patch on 2x2
image mosaics (`locality_align_algo.patch_probe_accuracy`, `benchmarks/distill_repair.py`).

Plugs in at: the final norm and the whole encoder. `apply` resets the final norm (LayerNorm weight 1, bias 0) and
follows it with a zero-initialised per-token `Linear(D, D)` (kept as `norm.base_layer` / `norm.proj`), and makes
every weight trainable (not PEFT: save a full checkpoint; `vk.save` stores what changed). Training:
`vk.distill(model, copy.deepcopy(model), data, method="locality-align")`: per image a mask `m` over the patches
(keep i where `u_i > u_0`), its complement and the all-ones mask; teacher = the frozen model without its last block
(`skip_blocks = 1`, then its final norm) on `x * upsample(m)` (zeros in the input tensor), all tokens, divided by
`sqrt(baseline MSE)` (the MSE of predicting the per-token mean, measured on the first batch); student = the model
after `apply` on the unmasked image; decoder (owned by the loss, discarded after training) = student tokens times
`m` (prefix tokens zeroed) + a learned position embedding, 2 timm Blocks, LayerNorm, Linear; loss MSE over all
tokens. AdamW lr 3e-4 (cosine), weight decay 0.01 (paper's CLIP ViT-B/16 recipe).

Hand-written here, and why: no library implements MaskEmbed; the reference is a research script.
Differs from the reference: no attention logit soft-capping (fused SDPA kept); masks only from the default
sampler. Docs: docs/distill.md. Spec: ../shared/methods/explain.md E8.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from vitkit.registry import apply as vk_apply, register

from . import locality_align_algo as algo
from .base import DistillLoss, Step, Teacher, register as register_distill, require_plain_vit

METHOD = "locality-align"


@dataclass(frozen=True)
class Config:
    reset_norm: bool = field(default=True, metadata={"help": "reset the final norm to weight 1, bias 0 (paper)"})


@dataclass(frozen=True)
class DistillConfig(Config):
    skip_blocks: int = field(default=1, metadata={"help": "teacher blocks dropped from the end (paper: 1)"})
    decoder_depth: int = field(default=2, metadata={"help": "timm Blocks in the decoder (paper: 2)"})

    def __post_init__(self):
        if self.skip_blocks < 0:
            raise ValueError(f"{METHOD}: `skip_blocks` must be >= 0, got {self.skip_blocks}")
        if self.decoder_depth < 1:
            raise ValueError(f"{METHOD}: `decoder_depth` must be >= 1, got {self.decoder_depth}")


class TokenHead(nn.Module):
    """The final norm followed by a zero-initialised per-token `Linear(D, D)`."""

    def __init__(self, norm: nn.Module, dim: int):
        super().__init__()
        self.base_layer = norm
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.base_layer(x))


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    require_plain_vit(model, METHOD)
    if isinstance(model.norm, TokenHead):
        raise ValueError(f"{METHOD}: already applied to this model")
    if cfg.reset_norm and hasattr(model.norm, "reset_parameters"):
        model.norm.reset_parameters()
    ref = model.patch_embed.proj.weight
    model.norm = TokenHead(model.norm, model.embed_dim).to(ref.device, ref.dtype)
    model.requires_grad_(True)
    return model


def teacher_tokens(model: nn.Module, images: torch.Tensor, skip_blocks: int = 1) -> torch.Tensor:
    """All tokens (B, N, C) of the model without its last `skip_blocks` blocks, after its final norm."""
    keep = len(model.blocks) - skip_blocks
    _, inter = model.forward_intermediates(images, indices=[keep - 1], output_fmt="NLC", norm=True,
                                           return_prefix_tokens=True, stop_early=True)
    patches, prefix = inter[0]
    return torch.cat([prefix, patches], dim=1)


class Decoder(nn.Module):
    """Masked student tokens (B, N, D) -> teacher tokens (B, N, D_t): + position embedding, Blocks, LN, Linear."""

    def __init__(self, num_tokens: int, dim: int, teacher_dim: int, depth: int, num_heads: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, teacher_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.blocks(tokens + self.pos)))


class LocalityLoss(DistillLoss):
    """MaskEmbed's reconstruction loss; owns the decoder and the target scale."""

    def __init__(self, cfg: DistillConfig, teacher: Optional[Teacher], student: nn.Module, example: torch.Tensor):
        super().__init__(cfg, teacher, student, example)
        if not isinstance(teacher.model, VisionTransformer) or cfg.skip_blocks >= len(teacher.model.blocks):
            raise NotImplementedError(f"{METHOD}: the teacher must be a timm VisionTransformer with more than "
                                      f"`skip_blocks` = {cfg.skip_blocks} blocks")
        vk_apply(student, METHOD, reset_norm=cfg.reset_norm)
        with torch.no_grad():
            t = teacher_tokens(teacher.model, teacher.input(example), cfg.skip_blocks)
            s = student.eval().forward_features(example)
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"{METHOD}: the student has {s.shape[1]} tokens and the teacher {t.shape[1]}; use the "
                             "same architecture (a copy of the teacher)")
        heads = student.blocks[0].attn.num_heads
        self.decoder = Decoder(s.shape[1], s.shape[2], t.shape[2], cfg.decoder_depth, heads)
        self.register_buffer("scale", torch.zeros(()))  # 1/sqrt(baseline MSE), set on the first batch
        self.generator = torch.Generator().manual_seed(0)

    def reconstruct(self, student: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Decoder output (3B, N, D_t) from the student's tokens of `images` (B) under `masks` (3B, G)."""
        tokens = student.forward_features(images).repeat(masks.shape[0] // images.shape[0], 1, 1)
        p = tokens.shape[1] - masks.shape[1]
        keep = torch.cat([masks.new_zeros(masks.shape[0], p), masks], dim=1).to(tokens.dtype)  # prefix zeroed
        return self.decoder(tokens * keep.unsqueeze(-1))

    def forward(self, student, teacher, images, targets) -> Step:
        B = images.shape[0]
        patch = student.patch_embed.patch_size
        masks = algo.sample_masks(B, (images.shape[-2] // patch[0]) * (images.shape[-1] // patch[1]),
                                  self.generator).to(images.device)
        with torch.no_grad():
            x_t = teacher.input(images).repeat(3, 1, 1, 1)
            target = teacher_tokens(teacher.model, algo.mask_images(x_t, masks, patch), self.cfg.skip_blocks)
            if self.scale == 0:  # once: the MSE of predicting the per-token mean becomes 1
                self.scale.fill_(float((target - target.mean(0)).pow(2).mean().rsqrt()))
        loss = F.mse_loss(self.reconstruct(student, images, masks), target * self.scale)
        return Step(None, loss, None)


register(METHOD, kind="repair", config=Config, apply=apply)
register_distill(METHOD, config=DistillConfig, loss=LocalityLoss,
                 fit_defaults={"lr": 3e-4, "weight_decay": 0.01})
