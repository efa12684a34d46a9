"""SiT: reconstruction of patch-aligned corrupted images plus contrast against a momentum teacher (GMML-style).

Paper: *SiT: Self-supervised vIsion Transformer* (Atito et al., 2021, arXiv 2104.03602). Claim: self-supervised
pre-training that works on small datasets and beats the paper's baselines on downstream classification. The
objective implemented is the one of the authors' current code (group masked model learning, GMML), not the first
arXiv version (which also predicted rotations): 50% of each image is corrupted in patch-aligned blocks, 30% of the
corrupted patches taken from another image of the batch and the rest replaced by noise; a light reconstruction
head on the patch tokens restores the pixels (L1 on corrupted pixels only); the pooled token of the corrupted
view goes through a projection head and is contrasted (SimCLR's NT-Xent, temperature 0.2) with a momentum
teacher's projection of the other, clean view (EMA 0.996, cosine to 1). Loss: `contrast + recon_weight·recon`.
**Re-implemented from the spec; the reference (Sara-Ahmed/SiT) is GPL and was not read.**

Plugs in at: the ViT's own `forward_features` (patch tokens: the last gh·gw tokens; registers and the class token
are prefix tokens, never corrupted since corruption is on pixels of whole patches) and `forward_head(
pre_logits=True)` (the pooled token, class token or average); two views from the model's training transform.
From lightly: `NTXentLoss`, `update_momentum`, `cosine_schedule` (the same teacher update as `dino`); pooled
features via `dino.features`. Hand-written here (lightly has no GMML corruption or SiT head): the block corruption
and L1 loss (`sit_algo.py`), the reconstruction head (one Linear per patch; the reference's is a small
transposed-conv decoder), the teacher (a deep copy of the ViT and the projection head, no gradient).
Differs from the reference: noise is N(0, 1) in the normalised pixel space; blocks are rectangles of at most
`max_block` patches a side, cut so that exactly round(corrupt_frac·N_p) patches are corrupted. Docs: docs/pretrain.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitkit.models.layout import token_layout
from vitkit.pretrain import register_objective

from . import base
from . import sit_algo as algo
from .dino import features


@dataclass(frozen=True)
class Config(base.Config):
    """SiT settings (the reference's current objective; values in the help)."""

    weight_decay: float = field(default=0.04, metadata={"help": "AdamW weight decay"})
    corrupt_frac: float = field(default=0.5, metadata={"help": "fraction of each image's patches corrupted "
                                                       "(reference 0.5)"})
    replace_frac: float = field(default=0.3, metadata={"help": "share of the corrupted patches taken from another "
                                                       "image (the rest: noise; reference 0.3)"})
    max_block: int = field(default=4, metadata={"help": "largest corruption block side, in patches"})
    recon_weight: float = field(default=1.0, metadata={"help": "λ in contrast + λ·recon (reference 1; 5 for small "
                                                       "data)"})
    temperature: float = field(default=0.2, metadata={"help": "NT-Xent temperature (reference 0.2)"})
    proj_dim: int = field(default=256, metadata={"help": "projection head output"})
    hidden_dim: int = field(default=512, metadata={"help": "projection head MLP width"})
    momentum: float = field(default=0.996, metadata={"help": "teacher EMA momentum at the start, cosine to 1 "
                                                     "(reference 0.996)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("corrupt_frac", "replace_frac", "momentum"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"sit: `{name}` must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("max_block", "proj_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"sit: `{name}` must be >= 1, got {getattr(self, name)!r}")
        if self.recon_weight < 0 or not self.temperature > 0:
            raise ValueError(f"sit: `recon_weight` must be >= 0 and `temperature` > 0, got {self.recon_weight!r}, "
                             f"{self.temperature!r}")


def projection_head(dim: int, hidden: int, out: int) -> nn.Module:
    """SimCLR-style MLP on the pooled token."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))


class Objective(base.Objective):
    """The ViT + reconstruction head + projection head, and a momentum teacher (ViT + projection head)."""

    name = "sit"

    def __init__(self, model: nn.Module, cfg: Config):
        from lightly.loss import NTXentLoss

        super().__init__(model, cfg)
        layout = token_layout(model)
        self.patch = tuple(layout.patch_size)
        chans = model.patch_embed.proj.in_channels
        self.recon_head = nn.Linear(model.embed_dim, self.patch[0] * self.patch[1] * chans)
        dim = model.num_features if hasattr(model, "num_features") else model.embed_dim
        self.head = projection_head(dim, cfg.hidden_dim, cfg.proj_dim)
        self.teacher = base.teacher_copy(model)
        self.teacher_head = base.teacher_copy(self.head)
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        from vitkit.models.runner import get_runner, has_runner

        super().check(model)
        owners = get_runner(model).owners() if has_runner(model) else []
        if owners:
            raise NotImplementedError(f"sit: the model has token-sequence methods ({', '.join(owners)}); the "
                                      "reconstruction head needs one token per patch: pre-train first, then apply them")

    def student(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens (B, G, D), projection (B, proj_dim)) of the student on `images`."""
        grid = token_layout(self.model).grid(tuple(images.shape[-2:]))
        tokens = self.model.forward_features(images)
        pooled = self.model.forward_head(tokens, pre_logits=True)
        return tokens[:, -grid[0] * grid[1]:], self.head(pooled)

    def loss(self, corrupted: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of two views. corrupted, clean: (2, B, C, H, W); mask: (2, B, gh, gw) corrupted patches."""
        recon, z = [], []
        for v in range(2):
            tokens, proj = self.student(corrupted[v])
            recon.append(algo.recon_loss(self.recon_head(tokens).float(), algo.patchify(clean[v], self.patch).float(),
                                         mask[v].to(tokens.device)))
            z.append(proj)
        with torch.no_grad():
            t = [self.teacher_head(features(self.teacher, clean[v])) for v in range(2)]
        contrast = (self.criterion(z[0], t[1]) + self.criterion(z[1], t[0])) / 2
        recon_loss = (recon[0] + recon[1]) / 2
        loss = contrast + self.cfg.recon_weight * recon_loss
        return loss, {"contrast": contrast.item(), "recon": recon_loss.item()}

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if views.ndim != 5 or views.shape[1] != 2:
            raise ValueError(f"sit: expects two views (B, 2, C, H, W) from its transform, got {tuple(views.shape)}")
        clean = views.transpose(0, 1)  # (2, B, C, H, W)
        B = views.shape[0]
        grid = token_layout(self.model).grid(tuple(views.shape[-2:]))
        mask = algo.block_mask(2 * B, grid, self.cfg.corrupt_frac, self.cfg.max_block).view(2, B, *grid)
        corrupted = torch.stack([algo.corrupt(clean[v], mask[v], self.patch, self.cfg.replace_frac)
                                 for v in range(2)])
        return self.loss(corrupted, clean, mask)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the teacher (ViT and projection head), m cosine from `momentum` to 1 (as `dino`)."""
        base.ema_update([(self.model, self.teacher), (self.head, self.teacher_head)],
                        base.ema_momentum(self.cfg.momentum, step, total_steps))

    def transform(self):
        """Two views from the model's training transform (random resized crop, flip, colour jitter)."""
        from vitkit.data import transform

        return base.Views([transform(self.model, train=True)] * 2)


register_objective("sit", config=Config, objective=Objective)
