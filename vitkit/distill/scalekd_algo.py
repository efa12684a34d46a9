"""ScaleKD's losses on plain tensors: dual-view feature mimicking, the DCT view, cross-attention.

Fan et al., *ScaleKD: Strong Vision Transformers Could Be Excellent Teachers*, NeurIPS 2024, arXiv:2411.06786.
Knows nothing about timm: feature maps `(B, C, H, W)` and logits in, scalars out. Written from the spec
(../shared/methods/distill.md, C1), not from the reference code.

`n(F)` is the L2 normalisation over channels at each position. The frequency view removes the DC component of
each channel's 2-D DCT; the DCT basis is orthonormal with a constant DC vector, so that equals subtracting the
channel's spatial mean (`remove_dc`), for any H x W. `dct2` / `idct2` are kept to show (and test) the equality.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) orthonormal DCT-II matrix `D`: `D @ x` transforms a length-n signal, `D.T @ X` inverts it."""
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D DCT-II of the last two axes of `x` (..., H, W) (any H, W)."""
    dh, dw = dct_matrix(x.shape[-2]).to(x), dct_matrix(x.shape[-1]).to(x)
    return dh @ x @ dw.T


def idct2(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct2`."""
    dh, dw = dct_matrix(x.shape[-2]).to(x), dct_matrix(x.shape[-1]).to(x)
    return dh.T @ x @ dw


def remove_dc(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) maps minus each channel's spatial mean: the inverse DCT with coefficient (0, 0) zeroed."""
    return f - f.mean(dim=(-2, -1), keepdim=True)


def spatial_loss(student: torch.Tensor, teacher: torch.Tensor, weight: float = 0.08) -> torch.Tensor:
    """`weight * sum((n(student) - n(teacher))^2) / B` for maps (B, C, H, W) of the same shape."""
    if student.shape != teacher.shape:
        raise ValueError(f"scalekd: student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ")
    diff = F.normalize(student, dim=1) - F.normalize(teacher, dim=1)
    return weight * diff.pow(2).sum() / student.shape[0]


def frequency_loss(student: torch.Tensor, teacher: torch.Tensor, weight: float = 0.06) -> torch.Tensor:
    """`spatial_loss` of the maps with their DC component removed (each map its own channel means)."""
    return spatial_loss(remove_dc(student), remove_dc(teacher), weight)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    softmax_scale: float = 5.0) -> torch.Tensor:
    """Multi-head attention of queries (B, Nq, C) over keys / values (B, Nk, C), already projected.

    Logits are `softmax_scale * q·k / sqrt(C / num_heads)` per head; returns (B, Nq, C), heads concatenated.
    """
    B, Nq, C = q.shape
    if C % num_heads:
        raise ValueError(f"scalekd: width {C} is not divisible by {num_heads} heads")
    d = C // num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, h, N, d)
        return t.reshape(B, t.shape[1], num_heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=softmax_scale / math.sqrt(d))
    return out.transpose(1, 2).reshape(B, Nq, C)

