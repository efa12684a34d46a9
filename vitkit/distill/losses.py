"""Distillation losses as pure tensor functions (torch only; no modules, hooks or vitkit state).

Shapes: logits `(B, C)`; feature maps `(B, C, H, W)`; top-K records `(B, K)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`T² · KL(p_t^T ‖ p_s^T)`, averaged over the batch (Hinton et al. 2015).

    The T² factor keeps the gradient's scale independent of T: `∂/∂z_s = T·(p_s^T − p_t^T) / B`.
    KL, not soft-target cross-entropy: the two differ by the teacher's entropy (a constant; same gradients), so the
    logged value is 0 when the student matches the teacher.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return t * t * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def soft_target_ce(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """`−Σ_c p_c · log softmax(z_s)_c`, averaged over the batch (TinyViT's loss on cached targets, T = 1)."""
    return -(target_probs * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def dense_from_topk(indices: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The dense target rebuilt from top-K: `values` at `indices`, `(1 − Σ values) / (C − K)` elsewhere.

    Args:
        indices: `(B, K)` class indices (distinct per row). values: `(B, K)` probabilities.
        num_classes: `C >= K`. With `K == C` the rest is empty and the row is `values` scattered.
    Returns:
        `(B, C)` float32 rows that sum to `Σ values + (C − K)·fill = 1`.
    """
    b, k = indices.shape
    values = values.float()
    rest = max(num_classes - k, 1)
    fill = ((1.0 - values.sum(-1, keepdim=True)) / rest).clamp_min(0.0)  # fp16 rounding may push Σ above 1
    dense = fill.expand(b, num_classes).clone()
    return dense.scatter_(1, indices.long(), values)


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between two maps of the same shape (FitNets' hint loss)."""
    return F.mse_loss(student.float(), teacher.float())


def feature_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`1 − cos` over channels at each position of `(B, C, H, W)` maps, averaged over positions and batch."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()
