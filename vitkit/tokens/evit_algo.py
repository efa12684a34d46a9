"""EViT's algorithm on plain tensors: class-token attention row, top-k attentive tokens, fused inattentive token.

Liang et al., *Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations*,
ICLR 2022. Torch only; written from the spec (../shared/methods/accelerate.md, A2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Head-averaged attention of the class token, `mean_h softmax(q_cls k^T * scale + bias)`, O(N*C).

    Args:
        q_cls: (B, h, d) class-token query (after q_norm).
        k: (B, h, N, d) keys (after k_norm).
        scale: the attention scale (1/sqrt(d)).
        bias: optional additive mask broadcastable to (B, h, N) (e.g. log sizes, -inf padding).

    Returns:
        (B, N) attention of the class token to every token (softmax over all keys, not renormalised).
    """
    logits = torch.einsum("bhd,bhnd->bhn", q_cls * scale, k)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)


def num_keep(num_candidates: int, keep_rate: float) -> int:
    """Tokens kept among `num_candidates`: `ceil(keep_rate * n)`."""
    return min(num_candidates, math.ceil(keep_rate * num_candidates - 1e-9))


def keep_topk(x: torch.Tensor, scores: torch.Tensor, num_prefix: int, keep: int, fuse: bool):
    """Keep the `keep` non-prefix tokens with the highest scores (in position order), fuse the rest.

    Args:
        x: (B, N, C) tokens.
        scores: (B, N) class-token attention (prefix entries ignored).
        num_prefix: P, tokens kept in front untouched.
        keep: non-prefix tokens kept.
        fuse: append the fused token `sum_{j dropped} a_j x_j` (raw weighted sum).

    Returns:
        (x_new, kept, dropped): x_new (B, P + keep [+ 1], C); kept (B, keep) and dropped (B, N - P - keep)
        sequence positions of the old tokens.
    """
    B, N, C = x.shape
    a = scores[:, num_prefix:]
    order = a.argsort(dim=-1, descending=True, stable=True)
    kept = order[:, :keep].sort(dim=-1).values + num_prefix
    dropped = order[:, keep:].sort(dim=-1).values + num_prefix
    parts = [x[:, :num_prefix], x.gather(1, kept.unsqueeze(-1).expand(-1, -1, C))]
    if fuse:
        w = scores.gather(1, dropped).unsqueeze(-1).to(x.dtype)
        parts.append((x.gather(1, dropped.unsqueeze(-1).expand(-1, -1, C)) * w).sum(1, keepdim=True))
    return torch.cat(parts, dim=1), kept, dropped


def new_positions(kept: torch.Tensor, dropped: torch.Tensor, num_prefix: int, num_tokens: int,
                  fuse: bool) -> torch.Tensor:
    """(B, N) new position of every old token: kept -> P + rank, dropped -> the fused token (or -1)."""
    B, keep = kept.shape
    new = torch.empty(B, num_tokens, dtype=torch.long, device=kept.device)
    new[:, :num_prefix] = torch.arange(num_prefix, device=kept.device)
    new.scatter_(1, kept, (num_prefix + torch.arange(keep, device=kept.device)).expand(B, -1))
    new.scatter_(1, dropped, num_prefix + keep if fuse else -1)
    return new
