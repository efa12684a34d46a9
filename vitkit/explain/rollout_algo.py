"""Attention rollout, tensors in and out (spec: ../shared/methods/explain.md, E2).

Paper: *Quantifying Attention Flow in Transformers* (Abnar & Zuidema, ACL 2020), arXiv:2005.00928.
Per layer l the head-fused attention Ā_l (B, N, N) is corrected for the residual connection,
Â_l = (Ā_l + I) / 2, its rows renormalised, and the layers multiplied: R = Â_L ⋯ Â_1. Row q of R is how much
token q at the output draws from each input token.

Differs from the popular reference (jacobgil/vit-explain): rows are normalised with `keepdim` (the reference
divides column j by row sum j, vit-explain#16; reproduced by `legacy=True` only for its pictures), the discard
is per sample (the reference discards on batch element 0 only), and vitkit's default discard ratio is 0.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def fuse_heads(attn: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """(B, h, N, N) -> (B, N, N) by 'mean', 'max' or 'min' over heads."""
    if fusion == "mean":
        return attn.mean(1)
    if fusion == "max":
        return attn.amax(1)
    if fusion == "min":
        return attn.amin(1)
    raise ValueError(f"rollout: `head_fusion` must be 'mean', 'max' or 'min', got {fusion!r}")


def discard(a: torch.Tensor, ratio: float, protect: Optional[int] = None) -> torch.Tensor:
    """Zero, per sample, the lowest `ratio` of the entries of a (B, N, N); never the (protect, protect) entry."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"rollout: `discard_ratio` must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return a
    B, N, _ = a.shape
    flat = a.reshape(B, N * N).clone()
    k = int(N * N * ratio)
    if k == 0:
        return a
    scores = flat.clone()
    if protect is not None:
        scores[:, protect * N + protect] = math.inf  # never among the lowest
    idx = scores.topk(k, dim=-1, largest=False).indices
    flat.scatter_(1, idx, 0.0)
    return flat.reshape(B, N, N)


def residual_step(a: torch.Tensor, legacy: bool = False) -> torch.Tensor:
    """Â = (Ā + I) / 2 with rows renormalised; `legacy` reproduces vit-explain's column-wise division."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = (a + eye) / 2
    if legacy:
        return a / a.sum(dim=-1).unsqueeze(-2)  # what `a / a.sum(dim=-1)` does at batch size 1
    return a / a.sum(dim=-1, keepdim=True)


def rollout(attns: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
            protect: Optional[int] = None, legacy: bool = False) -> torch.Tensor:
    """R = Â_L ⋯ Â_1 from per-layer attention, first layer first.

    Args:
        attns: per layer (B, h, N, N) attention (or (B, N, N) already fused), all of the same N.
        head_fusion: 'mean', 'max' or 'min'.
        discard_ratio: per sample, fraction of the lowest fused entries set to 0 before the residual step.
        protect: token whose diagonal entry is never discarded (the query token, e.g. the class token).
        legacy: reproduce vit-explain's row normalisation bug.

    Returns:
        (B, N, N) rollout matrix; rows sum to 1 (unless `legacy`).
    """
    if not attns:
        raise ValueError("rollout: no attention layers given")
    result = None
    for a in attns:
        a = fuse_heads(a, head_fusion) if a.ndim == 4 else a
        a = residual_step(discard(a, discard_ratio, protect), legacy=legacy)
        result = a if result is None else a @ result
    return result
