"""MMC-lite (not a reproduction of MMC): masked reconstruction + momentum self-distillation + global contrast.

Named after *Masked Momentum Contrastive Learning for Zero-shot Semantic Understanding* (Wu et al., 2023,
arXiv 2308.11448), whose objective combines masked image modelling, momentum self-distillation and a global
contrast; the paper gives neither code nor all of its loss details, so this is **not a reproduction of MMC**, and
numbers from it must never be reported as MMC's. It is a weighted sum of three parts, each weight in the config:

    loss = mim_weight · MAE(masked view 1)                          (the `mae` objective: 75% of patches masked)
         + distill_weight · DINO(views)                             (the `dino` objective: EMA teacher, centring)
         + contrast_weight · NT-Xent(student(masked view 1), teacher(clean view 2))   (global contrast, τ = 0.2)

With every weight but one at zero it is that objective (MAE, DINO, or the contrast alone); a zero-weight part is
not computed. The MMC evaluation protocol (prompt-patch similarity maps) is `vk.segment` / `vk.similarity_overlap`.

Plugs in at / reused: the `mae` objective (lightly's masked ViT wrapper with weights and position embedding kept,
its decoder, vitkit's prefix-safe mask) and the `dino` objective (lightly's DINO head and loss, its EMA teacher
and momentum schedule) are held as parts that share the one ViT; the global contrast reads the student's pooled
token from the masked encoding (`MaskedVisionTransformerTIMM.encode`, class token or average of visible tokens)
and the DINO teacher's pooled clean features, through a projection head with an EMA copy (lightly's `NTXentLoss`,
`update_momentum`). Hand-written: the weighting and the contrast branch (no library offers this combination).
Docs: docs/pretrain.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitkit.pretrain import register_objective

from . import base, dino, mae
from .sit import projection_head


@dataclass(frozen=True)
class Config(base.Config):
    """MMC-lite settings: the three weights, and the parts' main settings (not a reproduction of MMC)."""

    mim_weight: float = field(default=1.0, metadata={"help": "weight of the masked reconstruction (MAE) part"})
    distill_weight: float = field(default=1.0, metadata={"help": "weight of the momentum self-distillation (DINO) "
                                                         "part"})
    contrast_weight: float = field(default=1.0, metadata={"help": "weight of the global contrast (masked student vs "
                                                          "clean teacher view, NT-Xent)"})
    mask_ratio: float = field(default=0.75, metadata={"help": "fraction of patches masked (MAE part and the "
                                                      "student's contrast input)"})
    temperature: float = field(default=0.2, metadata={"help": "NT-Xent temperature of the global contrast"})
    output_dim: int = field(default=1024, metadata={"help": "DINO head output K"})
    proj_dim: int = field(default=256, metadata={"help": "contrast projection output"})
    momentum: float = field(default=0.996, metadata={"help": "teacher EMA momentum at the start, cosine to 1"})

    def __post_init__(self) -> None:
        super().__post_init__()
        weights = (self.mim_weight, self.distill_weight, self.contrast_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(f"mmc-lite: the weights must be >= 0 and one of them > 0, got mim {self.mim_weight}, "
                             f"distill {self.distill_weight}, contrast {self.contrast_weight}")
        if not self.temperature > 0:
            raise ValueError(f"mmc-lite: `temperature` must be > 0, got {self.temperature!r}")


class Objective(base.Objective):
    """MAE and DINO parts sharing the ViT, plus a global-contrast head and its EMA copy (not MMC)."""

    name = "mmc-lite"

    def __init__(self, model: nn.Module, cfg: Config):
        from lightly.loss import NTXentLoss

        super().__init__(model, cfg, hold_model=False)
        shared = dict(lr=cfg.lr, backbone_lr=cfg.backbone_lr, weight_decay=cfg.weight_decay)
        self.mae = mae.Objective(model, mae.Config(mask_ratio=cfg.mask_ratio, **shared))
        self.dino = dino.Objective(model, dino.Config(output_dim=cfg.output_dim, momentum=cfg.momentum,
                                                      global_views=2, local_views=0, **shared))
        dim = model.num_features if hasattr(model, "num_features") else model.embed_dim
        self.head = projection_head(dim, 2 * cfg.proj_dim, cfg.proj_dim)
        self.teacher_head = base.teacher_copy(self.head)
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        mae.Objective.check(model)
        dino.Objective.check(model)

    @property
    def backbone(self) -> nn.Module:
        return self.mae.backbone

    def pooled_masked(self, images: torch.Tensor, idx_keep: torch.Tensor) -> torch.Tensor:
        """The student's pooled token (B, D) from the masked encoding (the ViT's pooling over what it sees)."""
        x = self.mae.encoder.encode(images, idx_keep=idx_keep)  # (B, prefix + visible, D), final-normed
        return self.backbone.forward_head(x, pre_logits=True)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if views.ndim != 5 or views.shape[1] != 2:
            raise ValueError(f"mmc-lite: expects two views (B, 2, C, H, W) from its transform, got "
                             f"{tuple(views.shape)}")
        cfg, stats = self.cfg, {}
        loss = views.new_zeros(())
        v1, v2 = views[:, 0], views[:, 1]
        idx_keep, idx_mask = self.mae.sample_mask(views.shape[0], views.device)
        if cfg.mim_weight > 0:
            mim = self.mae.loss(v1, v1, idx_keep, idx_mask)
            loss, stats["mim"] = loss + cfg.mim_weight * mim, mim.item()
        if cfg.distill_weight > 0:
            distill, dstats = self.dino(views)
            loss, stats["distill"] = loss + cfg.distill_weight * distill, distill.item()
            stats.update(dstats)
        if cfg.contrast_weight > 0:
            z = self.head(self.pooled_masked(v1, idx_keep))
            with torch.no_grad():
                t = self.teacher_head(dino.features(self.dino.teacher, v2))
            contrast = self.criterion(z, t)
            loss, stats["contrast"] = loss + cfg.contrast_weight * contrast, contrast.item()
        return loss, stats

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """The DINO part's EMA teacher step (ViT and DINO head), and the same step for the contrast head."""
        self.dino.after_step(step, total_steps)
        base.ema_update([(self.head, self.teacher_head)], base.ema_momentum(self.cfg.momentum, step, total_steps))

    def transform(self):
        """Two views from the model's training transform (DINO's global crops)."""
        from vitkit.data import transform

        return base.Views([transform(self.backbone, train=True, scale=self.dino.cfg.global_scale)] * 2)


register_objective("mmc-lite", config=Config, objective=Objective)
