"""MAE: masked-patch reconstruction with a small decoder, discarded after training.

Paper: *Masked Autoencoders Are Scalable Vision Learners* (He et al., CVPR 2022, arXiv 2111.06377).
Claim: reconstructing 75% randomly masked patches from the visible ones pre-trains ViTs well (ViT-H 87.8% IN-1k
top-1 from IN-1k data alone); here used to *continue* pre-training a pretrained ViT on a new domain.

Plugs in at: lightly's `MaskedVisionTransformerTIMM(vit, weight_initialization="skip",
pos_embed_initialization="skip")` encodes the visible patches and every prefix token (the ViT's own weights and
position embedding, untouched: |Δ| = 0); lightly's `MaskedVisionTransformerDecoderTIMM` (fixed 2-D sin-cos
position embedding, `num_prefix_tokens` = the ViT's, so registers are placed right) decodes visible encodings +
mask tokens; `lightly.models.utils` gathers/scatters tokens, cuts patches and normalises their pixels.
Hand-written here, and why: the mask (`mae_algo.random_patch_mask`): lightly's `random_token_mask` keeps
int(N·(1-ratio)) tokens and protects only index 0, so registers could be masked; here round(ratio·N_p) patches
are masked and prefix tokens never are. The loss: MSE over masked patches only, targets normalised per patch.
Differs from the reference: the decoder defaults are small (depth 2, width 64; paper 8 x 512) for small
models; the backbone trains at a low lr (`backbone_lr`), since it starts pretrained. Docs: docs/pretrain.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.pretrain import register_objective

from . import base
from . import mae_algo as algo


@dataclass(frozen=True)
class Config(base.Config):
    """MAE settings (paper values in the help; decoder sized for small ViTs)."""

    lr: float = field(default=1e-3, metadata={"help": "peak lr of the decoder (paper: 1.5e-4·batch/256, AdamW "
                                              "betas (0.9, 0.95), from scratch)"})
    backbone_lr: float = field(default=1e-4, metadata={"help": "peak lr of the pretrained ViT (low: full lr erases "
                                                       "the pretrained features)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (paper 0.05)"})
    mask_ratio: float = field(default=0.75, metadata={"help": "fraction of patches masked per image (paper 0.75); "
                                                      "round(ratio·N) patches, prefix tokens never"})
    decoder_dim: int = field(default=64, metadata={"help": "decoder width (paper 512)"})
    decoder_depth: int = field(default=2, metadata={"help": "decoder blocks (paper 8)"})
    decoder_heads: int = field(default=4, metadata={"help": "decoder attention heads (paper 16)"})
    norm_pix_loss: bool = field(default=True, metadata={"help": "targets = each patch's pixels normalised by their "
                                                        "mean and variance (paper: better representations)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mae: `mask_ratio` must be in (0, 1), got {self.mask_ratio!r}")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"mae: `{name}` must be >= 1, got {getattr(self, name)!r}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"mae: `decoder_dim` {self.decoder_dim} must be divisible by `decoder_heads` "
                             f"{self.decoder_heads}")


class Objective(base.Objective):
    """The ViT (in lightly's masked wrapper) + a small decoder; `forward(images) -> (loss, stats)`."""

    name = "mae"

    def __init__(self, model: nn.Module, cfg: Config):
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM

        super().__init__(model, cfg, hold_model=False)
        self.encoder = MaskedVisionTransformerTIMM(vit=model, weight_initialization="skip",
                                                   pos_embed_initialization="skip")
        self.encoder.mask_token.requires_grad_(False)  # unused: masked patches are dropped (idx_keep), not replaced
        self.encoder.set_grad_checkpointing(bool(getattr(model, "grad_checkpointing", False)))
        self.patch = tuple(model.patch_embed.patch_size)
        self.num_patches = model.patch_embed.num_patches
        self.num_prefix = model.num_prefix_tokens
        in_chans = model.patch_embed.proj.in_channels
        self.decoder_embed = nn.Linear(model.embed_dim, cfg.decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.num_patches, embed_dim=cfg.decoder_dim, depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads, num_prefix_tokens=self.num_prefix)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, self.patch[0] * self.patch[1] * in_chans)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        from vitkit.models import get_runner
        from vitkit.models.runner import has_runner

        super().check(model)
        grid = tuple(model.patch_embed.grid_size)
        if grid[0] != grid[1] or model.patch_embed.patch_size[0] != model.patch_embed.patch_size[1]:
            raise NotImplementedError(f"mae: needs a square patch grid and square patches (lightly's decoder "
                                      f"position embedding), got grid {grid}, patch {model.patch_embed.patch_size}")
        if getattr(model, "pos_embed", None) is None:
            raise NotImplementedError("mae: needs a learned absolute position embedding (`pos_embed`); this model "
                                      "has none (rotary or no position embedding)")
        if has_runner(model) and get_runner(model).owners():
            raise NotImplementedError(f"mae: the model has token-sequence methods ({', '.join(get_runner(model).owners())}"
                                      "); they assume the full patch grid, which masking removes: pre-train first, "
                                      "then apply them")

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.vit

    def sample_mask(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(idx_keep, idx_mask)` for one batch (see `mae_algo.random_patch_mask`)."""
        return algo.random_patch_mask(batch, self.num_patches, self.num_prefix, self.cfg.mask_ratio, device=device)

    def loss(self, images: torch.Tensor, targets: torch.Tensor, idx_keep: torch.Tensor,
             idx_mask: torch.Tensor) -> torch.Tensor:
        """MSE between the decoder's prediction and the pixels of `targets` at the masked patches only."""
        from lightly.models import utils

        b = images.shape[0]
        x = self.encoder.encode(images, idx_keep=idx_keep)  # (B, prefix + visible, D)
        x = self.decoder_embed(x)  # (B, prefix + visible, d)
        full = utils.set_at_index(x.new_zeros(b, self.decoder.sequence_length, x.shape[-1]), idx_keep, x)
        x = self.decoder(full, idx_mask=idx_mask)  # mask tokens at idx_mask, + sin-cos positions, blocks, norm
        pred = self.decoder_pred(utils.get_at_index(x, idx_mask))  # (B, M, p·p·C)
        target = utils.get_at_index(utils.patchify(targets, self.patch[0]), idx_mask - self.num_prefix)
        if self.cfg.norm_pix_loss:
            target = utils.normalize_mean_var(target, dim=-1)
        return F.mse_loss(pred.float(), target.float())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        idx_keep, idx_mask = self.sample_mask(images.shape[0], images.device)
        return self.loss(images, images, idx_keep, idx_mask), {}

    def transform(self):
        """MAE's augmentation: random resized crop (scale 0.2-1) and horizontal flip, no colour jitter."""
        from vitkit.data import transform

        return transform(self.backbone, train=True, scale=(0.2, 1.0), color_jitter=None)


register_objective("mae", config=Config, objective=Objective)
