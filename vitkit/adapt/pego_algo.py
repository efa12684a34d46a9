"""PEGO's algorithm on plain tensors: a group of K low-rank updates and its orthogonality regulariser.

Hu et al., *Learn to Preserve and Diversify: Parameter-Efficient Group with Orthogonal Regularization for Domain
Generalization*, ECCV 2024. Written from the spec (../shared/methods/adapt.md, P12), not from the reference code.

Shapes: `K` group size, `r` rank, `i` input width, `o` output rows of one slice (q or v). A group is `a (K, r, i)`
and `b (K, o, r)`; update `i` is `ΔW_i = b[i] @ a[i]` (no α/r scaling).
"""
from __future__ import annotations

import torch


def group_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`Σ_i B_i A_i`, shape (o, i)."""
    return torch.einsum("kor,kri->oi", b, a)


def group_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`Σ_i B_i A_i x` for `x (..., i)` -> (..., o), without forming the (o, i) matrices."""
    return torch.einsum("...kr,kor->...o", torch.einsum("...i,kri->...kr", x, a), b)


def orthogonality(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`Σ_i ‖W ΔW_iᵀ‖₁ + Σ_{i<j} ‖ΔW_i ΔW_jᵀ‖₁` (entrywise L1) for frozen rows `w (o, i)`.

    Computed as `(W A_iᵀ) B_iᵀ` and `B_i (A_i A_jᵀ) B_jᵀ`: never an (o, i) product. With every `B = 0` the value
    and its gradient are exactly 0 (the subgradient of |·| at 0 that autograd takes is 0).
    """
    to_pretrained = torch.einsum("kor,kpr->kop", torch.einsum("oi,kri->kor", w, a), b)  # (K, o, o)
    total = to_pretrained.abs().sum()
    for i in range(a.shape[0]):
        for j in range(i + 1, a.shape[0]):
            total = total + (b[i] @ (a[i] @ a[j].T) @ b[j].T).abs().sum()
    return total
