"""GTP-ViT's algorithm on plain tensors: token graph, attention-based ranking, graph propagation.

Xu et al., *GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation*, WACV 2024. Torch only;
written from the spec (../shared/methods/accelerate.md, A4).
"""
from __future__ import annotations

import torch


def spatial_graph(gh: int, gw: int, device=None) -> torch.Tensor:
    """(gh*gw, gh*gw) 0/1 adjacency of the 8-neighbourhood on the patch grid, no self loops."""
    ii, jj = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    ii, jj = ii.flatten(), jj.flatten()
    di = (ii[:, None] - ii[None, :]).abs()
    dj = (jj[:, None] - jj[None, :]).abs()
    return ((di <= 1) & (dj <= 1) & ((di + dj) > 0)).float()


def semantic_graph(x: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """(B, n, n) 0/1 adjacency: each token links to its `num_neighbours` most cosine-similar other tokens."""
    B, n, _ = x.shape
    m = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = m @ m.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # exclude self
    k = min(num_neighbours, n - 1)
    idx = sim.topk(k, dim=-1).indices
    return torch.zeros_like(sim).scatter_(-1, idx, 1.0)


def normalise(graph: torch.Tensor) -> torch.Tensor:
    """`W = D^{-1/2} G D^{-1/2}` with D the row sums (degrees)."""
    d = graph.sum(-1).clamp_min(1e-12).rsqrt()
    return d.unsqueeze(-1) * graph * d.unsqueeze(-2)


def rank(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Importance `g_j = max_h A_h[j, j] * max_h sum_i A_h[i, j]` of the non-prefix tokens (B, N - P).

    Args:
        attn: (B, h, N, N) attention probabilities (rows sum to 1).
    """
    diag = attn.diagonal(dim1=-2, dim2=-1).amax(dim=1)  # (B, N)
    received = attn.sum(dim=-2).amax(dim=1)  # (B, N)
    return (diag * received)[:, num_prefix:]


def split(scores: torch.Tensor, num_prop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into the scored tokens) of the `num_prop` lowest-ranked (propagated) and the kept ones, each in
    position order."""
    order = scores.argsort(dim=-1, stable=True)
    return order[:, :num_prop].sort(-1).values, order[:, num_prop:].sort(-1).values


def propagate_into(x_keep: torch.Tensor, s_keep: torch.Tensor, x_prop: torch.Tensor, s_prop: torch.Tensor,
                   w: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`x_keep + alpha W x_prop`, `s_keep + alpha W s_prop`, with `w` (B, n_keep, n_prop) = W[keep, prop]."""
    wx = (alpha * w).to(x_keep.dtype)
    return x_keep + wx @ x_prop, s_keep + (alpha * w) @ s_prop
