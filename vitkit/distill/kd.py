"""Logit and feature knowledge distillation (Hinton et al. 2015; FitNets, Romero et al. 2015): the baseline.

*Distilling the Knowledge in a Neural Network* (arXiv:1503.02531) and *FitNets: Hints for Thin Deep Nets*
(arXiv:1412.6550). Spec: `shared/methods/distill.md` C0.

Claim: baseline, no paper number. The benchmark (`benchmarks/distill.py`) shows KD beating CE-only training of the
same student at the same budget.

Loss: `L = (1 − α)·CE(z_s, y) + α·T²·KL(p_t^T ‖ p_s^T) + β·D(P(F_s), F_t)`; `hard=True` replaces the KD term by
`α·CE(z_s, argmax z_t)` (DeiT's hard distillation). Feature hints (β > 0): a learned projector `P` = `Linear(C_s →
C_t)` at each position (a 1x1 convolution) on the student's patch map after block/stage `student_layer`, resampled
bilinearly to the teacher's grid when the grids differ, compared with the teacher's map after `teacher_layer`
by MSE or `1 − cos`. Works for any timm teacher and student with `forward_intermediates` (ViT → ViT, ViT → CNN).

Plugs in at: the loss only; the student trains whatever `vk.adapt` left trainable (all of it by default), the
projector is owned by this loss and trained with it.

Hand-written here, and why: torchdistill's `KDLoss` (`losses/mid_level.py`) computes the same logit term, but
(1) it weights the CE with `alpha` (the reverse of the spec's α), (2) with its `alpha = 0` (pure KD) it returns
the KL **without** the T² factor, so the gradient scale changes with T, and (3) it reads logits from hooked
input/output dictionaries. The term is three lines (`losses.kd_kl`); a test checks it against torchdistill's
`KDLoss` where the two agree. torchdistill has no FitNets-style hint with a learned projector on ViT patch
grids. Differs from the reference: logs KL, not soft-target CE (same gradients; see `losses.kd_kl`).
Docs: `docs/distill.md`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .base import DistillLoss, Step, Teacher, register, taps


@dataclass(frozen=True)
class Config:
    alpha: float = field(default=0.5, metadata={"help": "weight α of the KD term; (1 − α) weighs CE with the labels "
                                                        "(0: plain CE training; 1: teacher only)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature T of the KD term (scaled by T²)"})
    hard: bool = field(default=False, metadata={"help": "DeiT-style hard distillation: CE with argmax of the "
                                                        "teacher's logits instead of the T²·KL term"})
    feature_weight: float = field(default=0.0, metadata={"help": "β of the feature hint (FitNets); 0 = logit KD "
                                                                 "only (the spec's value when hints are used: 1)"})
    feature_loss: Literal["mse", "cosine"] = field(default="mse", metadata={"help": "hint distance: mse or "
                                                                                    "cosine (1 − cos per position)"})
    student_layer: int = field(default=-1, metadata={"help": "student block (ViT) or stage (CNN) the hint is "
                                                             "taken after; -1 = last"})
    teacher_layer: int = field(default=-1, metadata={"help": "teacher block or stage the hint targets; -1 = last"})

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"kd: `alpha` must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"kd: `temperature` must be > 0, got {self.temperature}")
        if self.feature_weight < 0:
            raise ValueError(f"kd: `feature_weight` must be >= 0, got {self.feature_weight}")


class KDLoss(DistillLoss):
    """`(1 − α)·CE + α·T²·KL` (+ `β·hint`); owns the hint projector."""

    def __init__(self, cfg: Config, teacher: Optional[Teacher], student: nn.Module, example: torch.Tensor):
        super().__init__(cfg, teacher, student, example)
        with torch.no_grad():
            was = student.training
            student.eval()
            z_s, f_s = taps(student, example, [cfg.student_layer])
            student.train(was)
            z_t, f_t = teacher.taps(example, [cfg.teacher_layer])
        if z_s.shape[-1] != z_t.shape[-1]:
            raise ValueError(f"kd: the teacher has {z_t.shape[-1]} classes and the student {z_s.shape[-1]}; logit "
                             "KD needs the same classes (load the student with num_classes="
                             f"{z_t.shape[-1]})")
        self.projector = None
        if cfg.feature_weight > 0:  # Linear(C_s -> C_t) at every position
            self.projector = nn.Conv2d(f_s[0].shape[1], f_t[0].shape[1], kernel_size=1)

    def hint(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """`D(P(F_s), F_t)` for `(B, C_s, H_s, W_s)` and `(B, C_t, H_t, W_t)` maps."""
        f_s = self.projector(f_s)
        if f_s.shape[-2:] != f_t.shape[-2:]:
            f_s = F.interpolate(f_s, size=f_t.shape[-2:], mode="bilinear", align_corners=False)
        return losses.feature_mse(f_s, f_t) if self.cfg.feature_loss == "mse" else losses.feature_cosine(f_s, f_t)

    def forward(self, student, teacher, images, targets) -> Step:
        cfg = self.cfg
        if self.projector is not None:
            z_s, (f_s,) = taps(student, images, [cfg.student_layer])
            z_t, (f_t,) = teacher.taps(images, [cfg.teacher_layer])
        else:
            z_s, z_t = student(images), teacher(images)
        loss = (1.0 - cfg.alpha) * F.cross_entropy(z_s.float(), targets)
        if cfg.hard:
            loss = loss + cfg.alpha * F.cross_entropy(z_s.float(), z_t.argmax(-1))
        else:
            loss = loss + cfg.alpha * losses.kd_kl(z_s, z_t, cfg.temperature)
        if self.projector is not None:
            loss = loss + cfg.feature_weight * self.hint(f_s, f_t)
        return Step(z_s, loss, targets)


register("kd", config=Config, loss=KDLoss)
