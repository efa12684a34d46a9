"""BiViT's binarisation in plain torch: weights, activations, softmax-aware binary attention (SAB).

Straight-through estimators written as `forward value + (x − x.detach())·mask`: the forward is exactly the
binary value, the backward the stated gradient. `sign` maps 0 to +1 (torch.sign gives 0, which is not binary).
"""
from __future__ import annotations

import torch


def sign(x: torch.Tensor) -> torch.Tensor:
    """±1 of the same dtype (0 -> +1)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def binary_weight(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """`Ŵ = α ⊙ sign(W − mean_row W)` for `w (out, in)`, `alpha (out, 1)`; gradient straight through the sign
    (to `W` through the row centring, to `α` as `sign(W − mean)`)."""
    u = w - w.mean(dim=1, keepdim=True)
    return alpha * (u + (sign(u) - u).detach())


def binary_activation(x: torch.Tensor) -> torch.Tensor:
    """`sign(x)`; the gradient passes where `|x| < 1` and is zero where `|x| >= 1`."""
    return sign(x).detach() + (x - x.detach()) * (x.abs() < 1).to(x.dtype)


def softmax_binary(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """SAB: `p = softmax(logits)`, forward value `1[p >= ratio · max_row p]` (the argmax is always 1), gradient
    that of `p` (plain softmax's)."""
    p = logits.softmax(dim=-1)
    b = (p >= ratio * p.amax(dim=-1, keepdim=True)).to(p.dtype)
    return p + (b - p).detach()


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """`sign(W − mean_row W)` of `w (out, in)` as bits, 8 per byte along `in` (1 = +1): uint8 (out, ceil(in/8))."""
    bits = (w - w.mean(dim=1, keepdim=True) >= 0).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, (-bits.shape[1]) % 8)).view(bits.shape[0], -1, 8)
    return (bits << torch.arange(7, -1, -1, dtype=torch.uint8, device=w.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_signs`: ±1.0 of shape (out, in_features)."""
    bits = (packed.unsqueeze(-1) >> torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)) & 1
    return bits.view(packed.shape[0], -1)[:, :in_features].float() * 2 - 1
