"""TCPA's algorithm in plain torch: top-k prompt slots per token, the allowed-key mask, and attention whose
post-softmax weights are masked without renormalising (spec: ../shared/methods/adapt.md P7).

Shapes: B batch, N tokens of the sequence (the original tokens), h heads, d head width, M pool slots, ℓ prompt
tokens per slot, D width. Prompt tokens are ordered slot-major, the CLS pool first: column `N + m·ℓ + j` is token
j of CLS slot m, column `N + M·ℓ + m·ℓ + j` token j of image slot m.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def top_slots(x: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` slots whose keys are most cosine-similar to each token.

    Args:
        x: (B, n, D) tokens (the block input, before `norm1`).
        keys: (M, D) the pool's keys.

    Returns:
        (indices (B, n, k), cosines (B, n, k)): `cos(x, K_m)` of the chosen slots, differentiable w.r.t. both.
    """
    sim = F.normalize(x, dim=-1) @ F.normalize(keys, dim=-1).transpose(0, 1)  # (B, n, M)
    cos, idx = sim.topk(k, dim=-1)
    return idx, cos


def slot_columns(idx: torch.Tensor, slots: int, length: int) -> torch.Tensor:
    """(B, n, k) chosen slots -> (B, n, slots·length) bool: every prompt token of a chosen slot."""
    chosen = torch.zeros(*idx.shape[:-1], slots, dtype=torch.bool, device=idx.device).scatter(-1, idx, True)
    return chosen.repeat_interleave(length, dim=-1)


def allowed_keys(n: int, cls_row: Optional[int], patch_start: int, cls_cols: Optional[torch.Tensor],
                 patch_cols: torch.Tensor) -> torch.Tensor:
    """(B, n, n + p) bool: which keys each query row keeps after the softmax (p = CLS-pool + image-pool tokens).

    Every row keeps all `n` original tokens; the class-token row (`cls_row`) also its chosen CLS-pool tokens
    (`cls_cols` (B, p_cls); None: no CLS pool, a model without class token); the patch rows (`patch_start:`)
    their chosen image-pool tokens (`patch_cols` (B, n - patch_start, p_img)); every other row (registers,
    prompts of other methods) no prompt token.
    """
    B, p_cls = patch_cols.shape[0], 0 if cls_cols is None else cls_cols.shape[-1]
    mask = torch.zeros(B, n, n + p_cls + patch_cols.shape[-1], dtype=torch.bool, device=patch_cols.device)
    mask[:, :, :n] = True
    if cls_cols is not None:
        mask[:, cls_row, n:n + p_cls] = cls_cols
    mask[:, patch_start:, n + p_cls:] = patch_cols
    return mask


def masked_attention(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`A = softmax(q kᵀ·scale + bias) ⊙ allowed`, **not** renormalised.

    Args:
        q: (B, h, N, d) queries of the original tokens; k: (B, h, N + p, d) keys of the original tokens, then
            of the prompt tokens.
        allowed: (B, N, N + p) bool; None keeps every key (plain softmax attention).
        bias: additive mask broadcastable to (B, h, N, N + p), or None.

    Returns:
        A (B, h, N, N + p): the masked rows sum to less than 1 (the softmax mass of the masked keys is dropped,
        as the paper does; the denominator still counts every prompt of the pools).
    """
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    a = logits.softmax(dim=-1)
    return a if allowed is None else a * allowed.unsqueeze(1).to(a.dtype)


def pool_loss(cls_cos: Optional[torch.Tensor], patch_cos: Optional[torch.Tensor]) -> torch.Tensor:
    """One layer's matching loss: `mean(1 - cos(cls, chosen CLS keys)) + mean(1 - cos(patch, chosen image keys))`."""
    terms = [(1 - c).mean() for c in (cls_cos, patch_cos) if c is not None and c.numel()]
    return torch.stack(terms).sum()


def fourier(prompts: torch.Tensor) -> torch.Tensor:
    """VFPT's prompt transform: `Re(FFT_seq(FFT_D(prompts)))` over the (…, tokens, D) prompt tokens."""
    return torch.fft.fft(torch.fft.fft(prompts.float(), dim=-1), dim=-2).real.to(prompts.dtype)
