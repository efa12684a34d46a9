"""Point-cloud tokenisation and virtual projection, in plain torch (Any2Point's building blocks).

* `farthest_point_sample`: G centres, each the point farthest from those chosen so far; the first is the point
  farthest from the centroid, so the choice (and the token order) does not depend on the input order.
* `knn`: the k nearest points of each centre.
* `view_rotations` / `project`: V virtual cameras (yaw `π·v/V`, pitch 30°); a 3-D point normalised to the unit
  ball is rotated into each camera and dropped onto its image plane (orthographic): `(u, v) = (R p)_xy ∈ [-1, 1]`.
* `guidance` / `guided_aggregate`: Any2Point's guided local aggregation. Each token's neighbourhood is its k
  nearest tokens in 3-D (itself included); in each view v the neighbours weigh by the similarity of the position
  embeddings the tokens took in that view, `a_v[i, j] = softmax_j(cos(P_v[i], P_v[j]) / τ)` (tokens that project
  close together in the pretrained 2-D grid weigh more), and the views are ensembled with weights `w_v`:
  `out[i] = Σ_v w_v Σ_j a_v[i, j] h[j]`.
"""
from __future__ import annotations

import math

import torch


def normalise(xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points `(B, N, 3)` -> (points centred on their centroid and scaled into the unit ball, centroid, scale)."""
    centroid = xyz.mean(1, keepdim=True)
    scale = (xyz - centroid).norm(dim=-1).amax(1).clamp_min(1e-9)[:, None, None]
    return (xyz - centroid) / scale, centroid, scale


def farthest_point_sample(xyz: torch.Tensor, g: int) -> torch.Tensor:
    """Indices `(B, g)` of g farthest-point-sampled centres of `xyz` `(B, N, 3)`."""
    B, N, _ = xyz.shape
    first = (xyz - xyz.mean(1, keepdim=True)).norm(dim=-1).argmax(1)  # (B,)
    idx = torch.empty(B, g, dtype=torch.long, device=xyz.device)
    idx[:, 0] = first
    dist = (xyz - xyz[torch.arange(B), first][:, None]).square().sum(-1)  # (B, N) to the chosen set
    for i in range(1, g):
        idx[:, i] = dist.argmax(1)
        dist = torch.minimum(dist, (xyz - xyz[torch.arange(B), idx[:, i]][:, None]).square().sum(-1))
    return idx


def knn(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Indices `(B, G, k)` of the k points of `xyz` `(B, N, 3)` nearest to each centre `(B, G, 3)`."""
    return torch.cdist(centres, xyz).topk(k, dim=-1, largest=False).indices


def gather(xyz: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`xyz[b, idx[b, ...]]`: `(B, N, C)` gathered by `(B, ...)` indices -> `(B, ..., C)`."""
    B = xyz.shape[0]
    flat = idx.reshape(B, -1)
    out = xyz.gather(1, flat[..., None].expand(-1, -1, xyz.shape[-1]))
    return out.reshape(*idx.shape, xyz.shape[-1])


def view_rotations(v: int, pitch_deg: float = 30.0) -> torch.Tensor:
    """Rotation matrices `(V, 3, 3)`: yaw `π·i/V` about the vertical (z) axis, then `pitch_deg` about x."""
    p = math.radians(pitch_deg)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]],
                      dtype=torch.float32)
    out = []
    for i in range(v):
        a = math.pi * i / v
        rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]],
                          dtype=torch.float32)
        out.append(rx @ rz)
    return torch.stack(out)


def project(points: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Points `(B, G, 3)` in the unit ball -> plane coordinates `(B, V, G, 2)` in [-1, 1] (orthographic)."""
    return torch.einsum("vij,bgj->bvgi", rotations.to(points), points)[..., :2]


def guidance(centres: torch.Tensor, guide: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours and their per-view weights for `guided_aggregate`.

    Args:
        centres: token centres `(B, G, 3)`.
        guide: the position embedding each token took in each of V views `(B, V, G, C)`.
        k: neighbours per token (its k nearest tokens in 3-D, itself included).
        tau: softmax temperature on the cosine similarities.

    Returns:
        `idx` `(B, G, k)` neighbour indices and `a` `(B, V, G, k)` weights (each row sums to 1).
    """
    idx = knn(centres, centres, k)  # (B, G, k)
    g = torch.nn.functional.normalize(guide, dim=-1)
    cos = g @ g.transpose(-1, -2)  # (B, V, G, G)
    B, V, G, _ = cos.shape
    near = cos.gather(3, idx[:, None].expand(B, V, G, k))  # (B, V, G, k): cos(P_v[i], P_v[idx[i, j]])
    return idx, (near / tau).softmax(-1)


def guided_aggregate(h: torch.Tensor, idx: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`out[b, i] = Σ_v w[v] Σ_j a[b, v, i, j] h[b, idx[b, i, j]]`: features `h` `(B, G, r)`, neighbours `idx`
    `(B, G, k)`, per-view weights `a` `(B, V, G, k)`, view weights `w` `(V,)` -> `(B, G, r)`."""
    weights = torch.einsum("v,bvgk->bgk", w.to(a), a).to(h)  # the views ensembled first: (B, G, k)
    return torch.einsum("bgk,bgkr->bgr", weights, gather(h, idx))
