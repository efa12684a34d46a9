"""ScaleKD: cross-attention projectors, dual-view feature mimicking and teacher parameter perception.

Paper: *ScaleKD: Strong Vision Transformers Could Be Excellent Teachers* (Fan et al., NeurIPS 2024),
arXiv:2411.06786.

Claim: a ViT teacher distils into students of any architecture when the student's features are (1) projected
into the teacher's token space by cross-attention, (2) compared in a spatial view and a frequency view with the
DC component removed, and (3) passed through the teacher's own later blocks (teacher parameter perception);
e.g. Swin-L -> ViT-S/16 83.93% IN-1k (+4.03), -> ResNet-50 82.03% (+3.39). `benchmarks/distill_repair.py`
compares ScaleKD with KD at equal epochs on CIFAR-10 (shamail ViT teacher).

Plugs in at: the loss (`ScaleKDLoss`, trained by `vk.fit` through `vk.distill`). Taps "stage 3" and "stage 4" of
both models: for a ViT of L blocks, `a = ceil(3L/4)`, stage 3 = output of block `a-1`, stage 4 = last block
(vitkit's split); for a CNN student the last two stages. Per stage two projectors (spatial, frequency view;
`scalekd_layer.Projector`). Stage-3 projections are compared with the teacher's stage-3 map, then pass the frozen
teacher's stage-4 blocks (after the teacher's own stage-3 prefix tokens), are compared with its stage-4 map and
become the stage-4 queries. Stage-4 projections pass the teacher's remaining blocks and final norm and are
compared with its final-norm patch tokens. Logits: `(1-α) CE + α T² KL(p_t || p_s)`, α = 0.5, T = 1. The
teacher's weights never get a gradient (frozen, outside the optimizer); gradients flow through its blocks.

Hand-written here, and why: no maintained library implements ScaleKD (torchdistill has no cross-attention
projector, frequency view or parameter perception); the reference is an mmcls 1.x code base.
Differs from the reference: the logit term is the KL (`losses.kd_kl`; same gradients as the soft-target CE,
0 at equality); the positional map is resampled for other student grids; the DCT view is the equivalent mean
removal (`scalekd_algo.remove_dc`). Needs a ViT teacher (parameter perception runs its blocks). Docs:
docs/distill.md. Spec: ../shared/methods/distill.md C1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from . import losses
from . import scalekd_algo as algo
from .base import DistillLoss, Step, Teacher, register, taps
from .scalekd_layer import Projector


@dataclass(frozen=True)
class Config:
    alpha: float = field(default=0.5, metadata={"help": "weight α of the logit KD term; (1 − α) weighs CE"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature T of the logit term"})
    spatial_weight: float = field(default=0.08, metadata={"help": "α₀ of the spatial-view feature loss"})
    frequency_weight: float = field(default=0.06, metadata={"help": "α₁ of the frequency-view (DC removed) loss"})
    num_heads: int = field(default=8, metadata={"help": "heads of the projectors' cross-attention"})
    softmax_scale: float = field(default=5.0, metadata={"help": "factor on the projectors' attention logits"})
    perception: bool = field(default=True, metadata={"help": "teacher parameter perception: stage-3 projections "
                                                             "pass the teacher's stage-4 blocks and query stage 4"})

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"scalekd: `alpha` must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"scalekd: `temperature` must be > 0, got {self.temperature}")
        if self.num_heads < 1:
            raise ValueError(f"scalekd: `num_heads` must be >= 1, got {self.num_heads}")


def stages(model: nn.Module) -> tuple[int, int]:
    """(stage 3, stage 4) tap indices: blocks `ceil(3L/4) - 1` and `L - 1` of a ViT; a CNN's last two stages."""
    if isinstance(model, VisionTransformer):
        depth = len(model.blocks)
        if depth < 2:
            raise NotImplementedError(f"scalekd: a ViT with {depth} block has no stage 3 and stage 4")
        return math.ceil(3 * depth / 4) - 1, depth - 1
    return -2, -1


def _grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class ScaleKDLoss(DistillLoss):
    """ScaleKD's total loss; owns the four projectors (spatial / frequency view at stages 3 and 4)."""

    def __init__(self, cfg: Config, teacher: Optional[Teacher], student: nn.Module, example: torch.Tensor):
        super().__init__(cfg, teacher, student, example)
        if not isinstance(teacher.model, VisionTransformer):
            raise NotImplementedError(f"scalekd: the teacher must be a timm VisionTransformer (parameter perception "
                                      f"runs its blocks), got {type(teacher.model).__name__}")
        self.t3, self.t4 = stages(teacher.model)
        self.s_idx = stages(student)
        with torch.no_grad():
            was = student.training
            student.eval()
            z_s, (s3, s4) = taps(student, example, list(self.s_idx))
            student.train(was)
            z_t, (t3, t4) = teacher.taps(example, [self.t3, self.t4])
        if z_s.shape[-1] != z_t.shape[-1]:
            raise ValueError(f"scalekd: the teacher has {z_t.shape[-1]} classes and the student {z_s.shape[-1]}; "
                             f"load the student with num_classes={z_t.shape[-1]}")
        c_t = t3.shape[1]
        if c_t % cfg.num_heads:
            raise ValueError(f"scalekd: the teacher width {c_t} is not divisible by num_heads={cfg.num_heads}")
        self.grid = tuple(t3.shape[-2:])

        def projector(s_map: torch.Tensor, learned_query: bool) -> Projector:
            return Projector(s_map.shape[1], c_t, tuple(s_map.shape[-2:]), self.grid, learned_query, cfg.num_heads,
                             cfg.softmax_scale)

        self.p3_spatial, self.p3_frequency = projector(s3, True), projector(s3, True)
        self.p4_spatial, self.p4_frequency = projector(s4, not cfg.perception), projector(s4, not cfg.perception)

    def _teacher_blocks(self, model: VisionTransformer, tokens: torch.Tensor, prefix: torch.Tensor, start: int,
                        stop: int, norm: bool) -> torch.Tensor:
        """Patch tokens (B, N, C) after the teacher's blocks `start..stop-1` (+ final norm), with its prefix."""
        x = torch.cat([prefix, tokens], dim=1)
        for block in model.blocks[start:stop]:
            x = block(x)
        x = model.norm(x) if norm else x
        return x[:, prefix.shape[1]:]

    def _views(self, spatial: torch.Tensor, frequency: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return (algo.spatial_loss(_grid(spatial, self.grid), target, cfg.spatial_weight)
                + algo.frequency_loss(_grid(frequency, self.grid), target, cfg.frequency_weight))

    def forward(self, student, teacher, images, targets) -> Step:
        cfg, model = self.cfg, teacher.model
        z_s, (s3, s4) = taps(student, images, list(self.s_idx))
        x_t = teacher.input(images)
        with torch.no_grad():
            final, ((t3, prefix3), (t4, prefix4)) = model.forward_intermediates(
                x_t, indices=[self.t3, self.t4], output_fmt="NLC", return_prefix_tokens=True)
            z_t = model.forward_head(final)
        p = final.shape[1] - t4.shape[1]
        target3, target4, target_out = _grid(t3, self.grid), _grid(t4, self.grid), _grid(final[:, p:], self.grid)
        loss = (1 - cfg.alpha) * F.cross_entropy(z_s.float(), targets) + cfg.alpha * losses.kd_kl(
            z_s, z_t, cfg.temperature)
        q_spatial, q_frequency = self.p3_spatial(s3), self.p3_frequency(s3)
        loss = loss + self._views(q_spatial, q_frequency, target3)
        if cfg.perception:  # stage-3 projections through the teacher's stage-4 blocks: a loss, and stage-4 queries
            q_spatial, q_frequency = (self._teacher_blocks(model, q, prefix3, self.t3 + 1, self.t4 + 1, False)
                                      for q in (q_spatial, q_frequency))
            loss = loss + self._views(q_spatial, q_frequency, target4)
            o_spatial, o_frequency = self.p4_spatial(s4, q_spatial), self.p4_frequency(s4, q_frequency)
        else:
            o_spatial, o_frequency = self.p4_spatial(s4), self.p4_frequency(s4)
        o_spatial, o_frequency = (self._teacher_blocks(model, o, prefix4, self.t4 + 1, len(model.blocks), True)
                                  for o in (o_spatial, o_frequency))
        return Step(z_s, loss + self._views(o_spatial, o_frequency, target_out), targets)


register("scalekd", config=Config, loss=ScaleKDLoss)
