"""ScaleKD's cross-attention projector (plain torch, no timm): student map -> teacher-shaped tokens.

Spec ../shared/methods/distill.md C1, step 1. Keys / values: the student map plus a learnable positional map
`(1, C_s, H_s, W_s)`, then 3x3 conv + BatchNorm + ReLU to `C_t` channels, flattened. Queries: a learnable table
`(H_t W_t, C_t)` (stage 3) or given tokens (stage 4: the stage-3 projections after the teacher's stage-4 blocks),
then 1x1 conv (a per-token Linear) + ReLU. Then 8-head cross-attention with q / k / v / output projections and
logits x `softmax_scale` (5), LayerNorm, and the FFN with residual and ReLU `u + W2 ReLU(W1 u)`, hidden `4 C_t`.
A student map of another size than the one the positional map was built for gets it resampled bilinearly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .scalekd_algo import cross_attention


class Projector(nn.Module):
    """Maps a student map (B, C_s, H_s, W_s) to teacher tokens (B, H_t W_t, C_t).

    Args:
        student_dim, teacher_dim: C_s, C_t.
        student_grid, teacher_grid: (H_s, W_s), (H_t, W_t).
        learned_query: True: a learnable query table (stage 3); False: queries are passed to `forward`.
        num_heads, softmax_scale: of the cross-attention.
    """

    def __init__(self, student_dim: int, teacher_dim: int, student_grid: tuple[int, int],
                 teacher_grid: tuple[int, int], learned_query: bool = True, num_heads: int = 8,
                 softmax_scale: float = 5.0):
        super().__init__()
        self.teacher_grid, self.num_heads, self.softmax_scale = tuple(teacher_grid), num_heads, softmax_scale
        self.pos = nn.Parameter(torch.zeros(1, student_dim, *student_grid))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.kv_proj = nn.Sequential(nn.Conv2d(student_dim, teacher_dim, 3, padding=1),
                                     nn.BatchNorm2d(teacher_dim), nn.ReLU())
        n_query = teacher_grid[0] * teacher_grid[1]
        self.query = nn.Parameter(torch.randn(n_query, teacher_dim) * 0.02) if learned_query else None
        self.q_in = nn.Linear(teacher_dim, teacher_dim)  # the 1x1 conv on the query map
        self.q, self.k, self.v = (nn.Linear(teacher_dim, teacher_dim) for _ in range(3))
        self.out = nn.Linear(teacher_dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim)
        self.fc1 = nn.Linear(teacher_dim, 4 * teacher_dim)
        self.fc2 = nn.Linear(4 * teacher_dim, teacher_dim)

    def forward(self, student_map: torch.Tensor, query: Optional[torch.Tensor] = None) -> torch.Tensor:
        B = student_map.shape[0]
        pos = self.pos
        if pos.shape[-2:] != student_map.shape[-2:]:
            pos = F.interpolate(pos, size=student_map.shape[-2:], mode="bilinear", align_corners=False)
        kv = self.kv_proj(student_map + pos).flatten(2).transpose(1, 2)  # (B, H_s W_s, C_t)
        if self.query is not None:
            query = self.query.unsqueeze(0).expand(B, -1, -1)
        elif query is None:
            raise ValueError("scalekd: this projector takes its queries from the caller (stage 4)")
        q = F.relu(self.q_in(query))  # (B, H_t W_t, C_t)
        u = self.out(cross_attention(self.q(q), self.k(kv), self.v(kv), self.num_heads, self.softmax_scale))
        u = self.norm(u)
        return u + self.fc2(F.relu(self.fc1(u)))

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, H_t W_t, C_t) -> (B, C_t, H_t, W_t)."""
        B, _, C = tokens.shape
        return tokens.transpose(1, 2).reshape(B, C, *self.teacher_grid)
