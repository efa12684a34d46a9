"""Magnitude pruning masks (plain torch): unstructured (global or per tensor) and N:M.

A mask is a bool tensor of the weight's shape, True where the weight is kept. Sparsity `s` = fraction of
zeros; a scope of `n` weights loses exactly `round(s·n)` of them (torch's count), the smallest |w| first, so
`max |pruned| <= min |kept|` within the scope. N:M keeps `n_keep` non-zeros in every group of `m` consecutive
weights along the input dimension (NVIDIA's "2:4" keeps 2 of 4).
"""
from __future__ import annotations

import torch
from torch.nn.utils import prune as torch_prune


def magnitude_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask zeroing the `round(sparsity·n)` smallest entries of `scores` (any shape), through torch's own
    `L1Unstructured.compute_mask` (top-k, exact count)."""
    ones = torch.ones_like(scores, dtype=torch.float32)
    return torch_prune.L1Unstructured(amount=float(sparsity)).compute_mask(scores.float(), ones).bool()


def global_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One ranking of |w| pooled over every tensor (`torch.nn.utils.prune.global_unstructured`'s rule)."""
    pooled = magnitude_mask(torch.cat([w.detach().abs().reshape(-1) for w in weights]), sparsity)
    return [m.view_as(w) for m, w in zip(pooled.split([w.numel() for w in weights]), weights)]


def layer_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Each tensor ranked alone (a fused qkv weight is one tensor)."""
    return [magnitude_mask(w.detach().abs(), sparsity) for w in weights]


def nm_mask(weight: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """Keep the `n_keep` largest |w| of every group of `m` consecutive weights along dim 1 (a conv weight
    `(out, C, kh, kw)` is grouped over its flattened `C·kh·kw`). The width must be a multiple of `m`."""
    rows = weight.detach().abs().reshape(weight.shape[0], -1)  # (out, in)
    groups = rows.reshape(rows.shape[0], rows.shape[1] // m, m)  # (out, in/m, m)
    keep = groups.topk(n_keep, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(weight.shape)
