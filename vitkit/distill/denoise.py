"""DVT stage 2: a one-block denoiser on the frozen model's final patch features, and the dense-feature view.

Paper: *Denoising Vision Transformers* (Yang et al., ECCV 2024), arXiv:2401.02957.

Claim: ViT features carry position-tied grid artefacts; a single Transformer block with a learned position
embedding, trained on artefact-free targets, removes them from every image in one forward (DVT: +3.84 mIoU on
average across seven ViT families). vitkit measures fewer high-norm patch tokens and lower total variation of the
dense features (`benchmarks/distill_repair.py`) and draws them before / after (`feature_view`).

Plugs in at: the final norm. `apply` wraps `model.norm` (kept as `norm.base_layer`, PEFT's naming, so saves stay
small and the base check holds) so that its output's patch tokens go through the `Denoiser`: one timm
`Block(dim=C, num_heads=max(1, C/64), mlp_ratio=4, qkv_bias=True)` on the patch grid plus a learned position
embedding `(1, 37², C)` resampled to the grid (`resample_abs_pos_embed`). Prefix tokens pass unchanged, so a
class-token head gives the same logits; everything that reads final-norm patch tokens (`forward_features`,
`forward_intermediates(norm=True)`, `vk.segment`, average pooling) sees denoised features. Only the denoiser
trains. Training: `vk.distill(model, copy.deepcopy(model), data, method="denoise")` adds the denoiser to the
student copy and fits it with `MSE + (1 - cos)` to the targets; cosine lr from 2e-4 (paper).

Hand-written here, and why: no library ships DVT (the reference needs tiny-cuda-nn for stage 1).
Differs from the reference: stage 1 (a per-image neural-field fit on 768 crops, 25k iterations per image) is
replaced by PH-Reg's shift/flip test-time average of the frozen model's features (`registers_algo`), which also
cancels position-tied artefacts (they move with the view, the content does not) at 10 forwards per image; the
targets are therefore averaged features, not DVT's decomposed field. Apply after `registers` and before token
reduction (the denoiser needs every patch of the grid). Docs: docs/distill.md. Spec: distill.md C4, explain.md E7.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block

from vitkit.registry import apply as vk_apply, register

from .base import DistillLoss, Step, Teacher, register as register_distill, require_plain_vit
from .registers import last_block_patches, shift_flip_target

METHOD = "denoise"


@dataclass(frozen=True)
class Config:
    pos_size: int = field(default=37, metadata={"help": "side of the learned position map (resampled to the grid)"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP width of the denoiser block, times C"})

    def __post_init__(self):
        if self.pos_size < 1:
            raise ValueError(f"denoise: `pos_size` must be >= 1, got {self.pos_size}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"denoise: `mlp_ratio` must be > 0, got {self.mlp_ratio}")


@dataclass(frozen=True)
class DistillConfig(Config):
    num_views: int = field(default=10, metadata={"help": "views of the shift/flip average that makes the targets"})
    max_shift: float = field(default=0.15, metadata={"help": "largest shift as a fraction of the grid side"})


class Denoiser(nn.Module):
    """Patch features (B, H, W, C) -> denoised features (B, H, W, C): `Block(x + resampled position map)`."""

    def __init__(self, dim: int, pos_size: int = 37, mlp_ratio: float = 4.0):
        super().__init__()
        self.pos_size = pos_size
        self.pos = nn.Parameter(torch.zeros(1, pos_size * pos_size, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.block = Block(dim, num_heads=max(1, dim // 64), mlp_ratio=mlp_ratio, qkv_bias=True)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        B, H, W, C = feats.shape
        pos = resample_abs_pos_embed(self.pos, (H, W), (self.pos_size, self.pos_size), num_prefix_tokens=0)
        return self.block(feats.reshape(B, H * W, C) + pos).reshape(B, H, W, C)


class DenoisedNorm(nn.Module):
    """The model's final norm followed by the denoiser on the patch tokens (prefix tokens unchanged)."""

    def __init__(self, norm: nn.Module, denoiser: Denoiser, num_prefix_tokens: int, grid: tuple[int, int]):
        super().__init__()
        self.base_layer, self.denoiser = norm, denoiser
        self.num_prefix_tokens, self.grid = num_prefix_tokens, tuple(grid)

    def _grid(self, n: int) -> tuple[int, int]:
        if n == self.grid[0] * self.grid[1]:
            return self.grid
        side = round(n ** 0.5)
        if side * side != n:
            raise ValueError(f"denoise: {n} patch tokens do not form the model's patch grid; the denoiser needs "
                             "every patch (apply token reduction after it, or not at all)")
        return side, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        p = self.num_prefix_tokens
        B, N, C = y.shape
        gh, gw = self._grid(N - p)
        patches = self.denoiser(y[:, p:].reshape(B, gh, gw, C)).reshape(B, gh * gw, C)
        return torch.cat([y[:, :p], patches], dim=1)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    require_plain_vit(model, METHOD)
    if isinstance(model.norm, DenoisedNorm):
        raise ValueError(f"{METHOD}: the model already has a denoiser")
    ref = model.patch_embed.proj.weight
    denoiser = Denoiser(model.embed_dim, cfg.pos_size, cfg.mlp_ratio).to(ref.device, ref.dtype)
    model.requires_grad_(False)
    model.norm = DenoisedNorm(model.norm, denoiser, model.num_prefix_tokens, model.patch_embed.grid_size)
    return model


def denoiser_of(model: nn.Module) -> Optional[Denoiser]:
    return model.norm.denoiser if isinstance(model.norm, DenoisedNorm) else None


class DenoiseLoss(DistillLoss):
    """Adds the denoiser to the student; `MSE + (1 - cos)` of its patch tokens against the teacher's shift/flip
    averaged final-norm patch tokens (the stage-1 substitute)."""

    def __init__(self, cfg: DistillConfig, teacher: Optional[Teacher], student: nn.Module, example: torch.Tensor):
        super().__init__(cfg, teacher, student, example)
        if denoiser_of(teacher.model) is not None:
            raise ValueError(f"{METHOD}: the teacher already has a denoiser; pass the model before `denoise`")
        with torch.no_grad():
            s = student.eval().forward_features(example)
            t = teacher.model.forward_features(teacher.input(example))
        if s.shape != t.shape:
            raise ValueError(f"{METHOD}: the student's tokens {tuple(s.shape)} differ from the teacher's "
                             f"{tuple(t.shape)}; the student must be a copy of the teacher (copy.deepcopy)")
        vk_apply(student, METHOD, pos_size=cfg.pos_size, mlp_ratio=cfg.mlp_ratio)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, student, teacher, images, targets) -> Step:
        target = shift_flip_target(student, teacher, images, self.cfg.num_views, self.cfg.max_shift,
                                   self.generator)
        out = student.forward_features(images)[:, student.num_prefix_tokens:]
        loss = F.mse_loss(out, target) + (1 - F.cosine_similarity(out, target, dim=-1).mean())
        return Step(None, loss, None)


def total_variation(feats: torch.Tensor) -> float:
    """Mean L2 distance between horizontally and vertically adjacent patch features of (B, C, H, W) maps."""
    dh = (feats[..., 1:, :] - feats[..., :-1, :]).norm(dim=1).mean()
    dw = (feats[..., :, 1:] - feats[..., :, :-1]).norm(dim=1).mean()
    return float((dh + dw) / 2)


def dense_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, C, gh, gw) final-norm patch features (denoised when the model has a denoiser)."""
    return last_block_patches(model, images, norm=True, output_fmt="NCHW")


def pca_rgb(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) features -> (B, H, W, 3) in [0, 1]: the first three principal components over all patches."""
    B, C, H, W = feats.shape
    x = feats.permute(0, 2, 3, 1).reshape(-1, C).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    rgb = x @ v[:3].T
    rgb = (rgb - rgb.min(0).values) / (rgb.max(0).values - rgb.min(0).values).clamp_min(1e-12)
    return rgb.reshape(B, H, W, 3).float()


def feature_view(models: dict[str, nn.Module], images: torch.Tensor, path: Union[str, Path],
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> Path:
    """A PNG of the dense features: per image, the input, then per model the PCA colours and the norm map.

    Args:
        models: label -> model (e.g. {"raw": model, "denoised": repaired}).
        images: normalised (B, 3, H, W) inputs (a few).
        path: the PNG written (atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitkit.io import atomic_write

    shown = (images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)).clamp(0, 1)
    columns = [("input", shown.permute(0, 2, 3, 1), None)]
    for label, model in models.items():
        feats = dense_features(model, images)
        columns += [(f"{label}: PCA", pca_rgb(feats), None), (f"{label}: norm", feats.norm(dim=1), "viridis")]
    B = images.shape[0]
    fig, axes = plt.subplots(B, len(columns), figsize=(2 * len(columns), 2 * B), squeeze=False)
    for col, (title, data, cmap) in enumerate(columns):
        for row in range(B):
            ax = axes[row][col]
            ax.imshow(data[row].numpy(), cmap=cmap, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


register(METHOD, kind="repair", config=Config, apply=apply)
register_distill(METHOD, config=DistillConfig, loss=DenoiseLoss,
                 fit_defaults={"lr": 2e-4, "weight_decay": 0.0, "batch_size": 8})
