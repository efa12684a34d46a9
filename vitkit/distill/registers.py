"""PH-Reg, post-hoc self-distilled registers: add registers to a frozen pretrained ViT, train them to denoise.

Paper: *Vision Transformers with Self-Distilled Registers* (PH-Reg, NeurIPS 2025), arXiv:2505.21501.

Claim: registers added after pre-training, trained by self-distillation from the frozen model on shifted and
flipped views, remove the high-norm artefact tokens of a register-less ViT (fewer artefact tokens, better dense
zero-shot and probing results; the abstract gives no number). vitkit measures the artefact score, the fraction
of patch tokens whose norm exceeds mu + 3 sigma (`registers_algo.high_norm_fraction`).

Plugs in at: the model's own prefix tokens. `apply` extends timm's `reg_token` by `R` registers drawn from
`N(0, 1)/sqrt(C)` after any existing ones (layout stays timm's `[cls, reg..., patches]`), raises
`num_reg_tokens` / `num_prefix_tokens` (and the patch dropout's), and inserts zero `pos_embed` rows for them when
the position embedding covers the prefix (`no_embed_class=False`). The result is a plain timm
`VisionTransformer` with more registers, which every vitkit method handles as prefix tokens and `vk.save` /
`vk.load` rebuild (the method re-adds the rows, the saved tensors fill them). Trainable afterwards: the
registers, `pos_embed`, `patch_embed` and the last block, nothing else (spec). Training:
`vk.distill(model, copy.deepcopy(model), data, method="registers")` adds the registers to the student copy; the
frozen teacher (the model before `apply`) sees
the original image and 9 whole-patch shifts (farthest-point sampled, random horizontal flips, uncovered pixels
white after normalisation); its final-norm patch tokens are mapped back to their source cells and averaged
(`registers_algo`); the student learns them in one pass with `(1 - cos) + MSE`. AdamW, lr 1e-4, weight decay
0.01, batch 8 (paper); the paper decays the lr exponentially to 5e-6, `vk.distill` uses `vk.fit`'s warmup +
cosine down to `min_lr` 5e-6. Fused SDPA is kept.

Hand-written here, and why: no library adds registers to a trained timm ViT or builds PH-Reg's TTA targets.
Differs from the reference: the reference puts registers before the class token; vitkit keeps timm's layout.
Existing registers (`*_reg4_dinov2`) live in the same timm tensor as the new ones and train with them.
Apply before token reduction or prompts (it fixes the prefix count at apply time). Docs: docs/distill.md.
Spec: ../shared/methods/distill.md C3, explain.md E7.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from vitkit.registry import apply as vk_apply, register

from . import registers_algo as algo
from .base import DistillLoss, Step, Teacher, register as register_distill, require_plain_vit

METHOD = "registers"


@dataclass(frozen=True)
class Config:
    num_registers: int = field(default=16, metadata={"help": "registers R added after the existing prefix tokens "
                                                             "(0: no new token; the model's outputs are unchanged)"})

    def __post_init__(self):
        if self.num_registers < 0:
            raise ValueError(f"registers: `num_registers` must be >= 0, got {self.num_registers}")


@dataclass(frozen=True)
class DistillConfig(Config):
    num_views: int = field(default=10, metadata={"help": "teacher views: the original plus num_views-1 shifts"})
    max_shift: float = field(default=0.15, metadata={"help": "largest shift as a fraction of the grid side (whole "
                                                             "patches, rounded)"})
    mse_weight: float = field(default=1.0, metadata={"help": "weight of the MSE term beside (1 - cos)"})

    def __post_init__(self):
        super().__post_init__()
        if self.num_views < 1:
            raise ValueError(f"registers: `num_views` must be >= 1, got {self.num_views}")
        if not 0 <= self.max_shift < 1:
            raise ValueError(f"registers: `max_shift` must be in [0, 1), got {self.max_shift}")


def _check(model: nn.Module) -> None:
    require_plain_vit(model, METHOD)
    if getattr(model, "dist_token", None) is not None:
        raise NotImplementedError(f"{METHOD}: models with a distillation token are not supported")


def add_registers(model: VisionTransformer, count: int) -> VisionTransformer:
    """Append `count` registers `N(0, 1)/sqrt(C)` after the model's prefix tokens (in place)."""
    if count == 0:
        return model
    old = model.reg_token
    ref = model.patch_embed.proj.weight
    new = torch.randn(1, count, model.embed_dim, device=ref.device, dtype=ref.dtype) / math.sqrt(model.embed_dim)
    model.reg_token = nn.Parameter(new if old is None else torch.cat([old.data, new], dim=1))
    p_old = model.num_prefix_tokens
    model.num_reg_tokens += count
    model.num_prefix_tokens += count
    if hasattr(model.patch_drop, "num_prefix_tokens"):
        model.patch_drop.num_prefix_tokens = model.num_prefix_tokens
    if model.pos_embed is not None and not model.no_embed_class:
        pe = model.pos_embed.data
        zeros = pe.new_zeros(1, count, pe.shape[-1])
        model.pos_embed = nn.Parameter(torch.cat([pe[:, :p_old], zeros, pe[:, p_old:]], dim=1))
    return model


def trainable_names(model: nn.Module) -> set[str]:
    """The parameters PH-Reg trains: registers, position embedding, patch embedding, last block."""
    last = f"blocks.{len(model.blocks) - 1}."
    return {n for n, _ in model.named_parameters()
            if n in ("reg_token", "pos_embed") or n.startswith(("patch_embed.", last))}


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    _check(model)
    add_registers(model, cfg.num_registers)
    names = trainable_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model


def fill_colour(model: nn.Module) -> torch.Tensor:
    """White after the model's normalisation, per channel: `(1 - mean) / std`."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return (1 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])


def patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, G, C) final-norm patch tokens (prefix tokens dropped)."""
    return model.forward_features(x)[:, model.num_prefix_tokens:]


@torch.no_grad()
def tta_target(teacher: nn.Module, images: torch.Tensor, views: list[tuple[int, int, bool]]) -> torch.Tensor:
    """The teacher's final-norm patch tokens averaged over the shifted / flipped `views` (B, G, C)."""
    grid = tuple(s // p for s, p in zip(images.shape[-2:], teacher.patch_embed.patch_size))
    fill = fill_colour(teacher)
    feats = [patch_tokens(teacher, algo.make_view(images, v, teacher.patch_embed.patch_size, fill)) for v in views]
    return algo.average_views(feats, views, grid)


def shift_flip_target(student: nn.Module, teacher: Teacher, images: torch.Tensor, num_views: int, max_shift: float,
                      generator: torch.Generator) -> torch.Tensor:
    """The training target (B, G, C) of `registers` and `denoise`: `tta_target` over `num_views` views drawn on
    the student's patch grid of `images`, shifted by at most `max_shift` of its side."""
    grid = tuple(s // p for s, p in zip(images.shape[-2:], student.patch_embed.patch_size))
    views = algo.choose_views(grid, num_views, round(max_shift * min(grid)), generator=generator)
    return tta_target(teacher.model, teacher.input(images), views)


def last_block_patches(model: nn.Module, images: torch.Tensor, *, norm: bool = False,
                       output_fmt: str = "NLC") -> torch.Tensor:
    """The patch tokens after the model's last block, (B, G, C) or as maps (B, C, gh, gw) with `output_fmt="NCHW"`;
    after the final norm when `norm`. In eval mode under no_grad (`vitkit.info.frozen_eval`: the modes restored)."""
    from vitkit.info import frozen_eval

    with frozen_eval(model):
        return model.forward_intermediates(images, indices=[len(model.blocks) - 1], norm=norm, output_fmt=output_fmt,
                                           intermediates_only=True)[0]


def artefact_score(model: nn.Module, images: torch.Tensor, sigmas: float = 3.0) -> float:
    """Fraction of patch tokens of the last block (before the final norm) with norm > mu + sigmas * sigma."""
    return float(algo.high_norm_fraction(last_block_patches(model, images), sigmas))


class RegistersLoss(DistillLoss):
    """Adds the registers to the student (`vk.apply(student, "registers")`) and returns PH-Reg's loss against the
    teacher's shift/flip-averaged final-norm patch tokens. The teacher is the model before registers."""

    def __init__(self, cfg: DistillConfig, teacher: Optional[Teacher], student: nn.Module, example: torch.Tensor):
        super().__init__(cfg, teacher, student, example)
        _check(teacher.model)
        vk_apply(student, METHOD, num_registers=cfg.num_registers)
        with torch.no_grad():
            s, t = patch_tokens(student.eval(), example), patch_tokens(teacher.model, teacher.input(example))
        if s.shape != t.shape:
            raise ValueError(f"registers: the student's patch tokens {tuple(s.shape)} differ from the teacher's "
                             f"{tuple(t.shape)}; the student must be a copy of the teacher (copy.deepcopy)")
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, student, teacher, images, targets) -> Step:
        target = shift_flip_target(student, teacher, images, self.cfg.num_views, self.cfg.max_shift,
                                   self.generator)
        loss = algo.distill_loss(patch_tokens(student, images), target, self.cfg.mse_weight)
        return Step(None, loss, None)


register(METHOD, kind="repair", config=Config, apply=apply, identity={"num_registers": 0})
register_distill(METHOD, config=DistillConfig, loss=RegistersLoss,
                 fit_defaults={"lr": 1e-4, "min_lr": 5e-6, "weight_decay": 0.01, "batch_size": 8})
