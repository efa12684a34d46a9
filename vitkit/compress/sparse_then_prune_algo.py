"""Sparse then Prune's attention regulariser in plain torch.

`attention_log_penalty(q, k, scale) = mean over (batch, heads, rows, cols) of log(1 + A²)`, `A = softmax(q kᵀ ·
scale)`. Named for what it does: `log(1 + a²)` is convex on [0, 1], so by Jensen its mean over a probability row
(which sums to 1) is smallest for the *uniform* row (`log(1 + 1/N²)`) and largest for a one-hot row: the term
pushes attention towards uniform, not towards sparse, although the paper calls it a sparse regulariser.
"""
from __future__ import annotations

import torch


def attention_log_penalty(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """`q, k (B, h, N, d)` (after q_norm / k_norm) -> scalar `mean log(1 + softmax(q kᵀ · scale)²)`."""
    attn = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)  # (B, h, N, N)
    return torch.log1p(attn.square()).mean()
