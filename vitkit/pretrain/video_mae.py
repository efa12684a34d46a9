"""Video MAE: tube-masked tubelet reconstruction, to continue pre-training a ViT inflated to clips (`video`).

Paper: *VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video Pre-Training* (Tong et
al., NeurIPS 2022, arXiv:2203.12602) and *VideoMAE V2* (Wang et al., CVPR 2023, arXiv:2303.16727).
Claim: masking 90% of the tubelets with *tube* masks (the same spatial patches in every time slot, so a masked
patch cannot be copied from the next frame) and reconstructing their pixels pre-trains video ViTs data-efficiently.

Plugs in at: a model adapted with `vk.adapt(model, "video")`: its tubelet embedding and positions
(`model.patch_embed`, `model._pos_embed`) embed the clip; the visible tokens (and every prefix token) run through
the model's own blocks and final norm; a small decoder (timm `Block`s, learned positions, mask token) predicts the
pixels of the masked tubelets (`video_mae_algo.tubelets`), MSE over masked tubelets only, targets normalised per
tubelet. Samples are clips `(C, T, H, W)` (`vk.data.tensors`), used as they are (no augmentation). The blocks
run under gradient checkpointing when the model has it on (`set_grad_checkpointing()`).
Hand-written here, and why: lightly's masked ViT wrapper embeds images only (2-D patch grid, 2-D masks), and
VideoMAE's code builds its own model. Differs from the reference: decoder small (depth 2, width 64; paper 4 x 384)
and with learned positions (paper: fixed sin-cos); VideoMAE V2's decoder masking is not used. What trains is what
`vk.pretrain` trains: after `video` alone only the tubelet embedding; add `vk.adapt(model, "full")` (or LoRA) to
train the backbone too. Docs: docs/applications.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import Block

from vitkit.pretrain import register_objective

from . import base
from . import video_mae_algo as algo


@dataclass(frozen=True)
class Config(base.Config):
    """Video MAE settings (paper values in the help; decoder sized for small ViTs)."""

    lr: float = field(default=1e-3, metadata={"help": "peak lr of the decoder (paper: 1.5e-4·batch/256, AdamW)"})
    backbone_lr: float = field(default=3e-4, metadata={"help": "peak lr of the pretrained ViT, below the decoder's "
                                                       "(as `mae`)"})
    mask_ratio: float = field(default=0.9, metadata={"help": "fraction of spatial positions masked in every time "
                                                     "slot (tube masking; paper 0.9)"})
    decoder_dim: int = field(default=64, metadata={"help": "decoder width (paper 384)"})
    decoder_depth: int = field(default=2, metadata={"help": "decoder blocks (paper 4)"})
    decoder_heads: int = field(default=4, metadata={"help": "decoder attention heads (paper 6)"})
    norm_pix_loss: bool = field(default=True, metadata={"help": "targets = each tubelet's pixels normalised by "
                                                        "their mean and variance (paper: yes)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"video-mae: `mask_ratio` must be in (0, 1), got {self.mask_ratio!r}")
        if min(self.decoder_dim, self.decoder_depth, self.decoder_heads) < 1 or self.decoder_dim % self.decoder_heads:
            raise ValueError(f"video-mae: decoder sizes must be >= 1 and `decoder_dim` ({self.decoder_dim}) divisible"
                             f" by `decoder_heads` ({self.decoder_heads})")


class Objective(base.Objective):
    """The video-adapted ViT + a small decoder; `forward(clips) -> (loss, stats)`."""

    name = "video-mae"

    def __init__(self, model: nn.Module, cfg: Config):
        super().__init__(model, cfg)
        pe = model.patch_embed
        self.slots = pe.num_frames // pe.tubelet
        self.patches = pe.num_patches // self.slots
        n_mask = algo.num_masked(self.patches, cfg.mask_ratio)
        if not 0 < n_mask < self.patches:
            raise ValueError(f"video-mae: `mask_ratio` {cfg.mask_ratio} masks {n_mask} of the {self.patches} positions"
                             " of a time slot; choose a ratio that masks at least one and leaves one visible")
        d = cfg.decoder_dim
        self.decoder_embed = nn.Linear(model.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos = nn.Parameter(torch.randn(1, model.num_prefix_tokens + pe.num_patches, d) * 0.02)
        self.decoder = nn.Sequential(*[Block(d, cfg.decoder_heads, qkv_bias=True) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, pe.tubelet * pe.patch_size[0] * pe.patch_size[1] * pe.in_chans)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        from vitkit.models.runner import get_runner, has_runner

        super().check(model)
        if not hasattr(model.patch_embed, "tubelet"):
            raise NotImplementedError("video-mae: needs a model adapted to clips: vk.adapt(model, 'video') first")
        owners = get_runner(model).owners() if has_runner(model) else []
        if owners:
            raise NotImplementedError(f"video-mae: the model has token-sequence methods ({', '.join(owners)}); "
                                      "pre-train first, then apply them")

    def encode(self, clips: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Prefix tokens + the visible tubelet tokens `keep` through the ViT's blocks -> `(B, p + K, D)`."""
        m, p = self.model, self.model.num_prefix_tokens
        x = m._pos_embed(m.patch_embed(clips))  # (B, p + T'·N, D): positions added
        visible = x[:, p:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = m.norm_pre(torch.cat([x[:, :p], visible], 1))
        checkpointing = getattr(m, "grad_checkpointing", False) and torch.is_grad_enabled()
        for block in m.blocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        return m.norm(x)

    def loss(self, clips: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        p = self.model.num_prefix_tokens
        y = self.decoder_embed(self.encode(clips, keep))  # (B, p + K, d)
        B, d = y.shape[0], y.shape[-1]
        full = self.mask_token.expand(B, self.slots * self.patches, d).scatter(1, keep[..., None].expand(-1, -1, d),
                                                                                y[:, p:])
        z = self.decoder_norm(self.decoder(torch.cat([y[:, :p], full], 1) + self.decoder_pos))[:, p:]
        pred = self.decoder_pred(z.gather(1, masked[..., None].expand(-1, -1, d)))  # (B, M, t·ph·pw·C)
        pe = self.model.patch_embed
        target = algo.tubelets(clips, pe.tubelet, *pe.patch_size).gather(
            1, masked[..., None].expand(-1, -1, pred.shape[-1]))
        if self.cfg.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return F.mse_loss(pred.float(), target.float())

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        pe = self.model.patch_embed
        rows, cols = pe.token_grid(clips)
        if rows * cols != pe.num_patches:
            h, w = pe.grid_size[0] // self.slots * pe.patch_size[0], pe.grid_size[1] * pe.patch_size[1]
            raise ValueError(f"video-mae: clips must have the model's {pe.num_frames} frames of {h}x{w} pixels, got "
                             f"{tuple(clips.shape)}")
        keep, masked = algo.tube_mask(clips.shape[0], self.slots, self.patches, self.cfg.mask_ratio, clips.device)
        return self.loss(clips, keep, masked), {}

    def transform(self):
        """Clips are used as they are (tensors `(C, T, H, W)`)."""
        return None


register_objective("video-mae", config=Config, objective=Objective)
