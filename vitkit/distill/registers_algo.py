"""PH-Reg's test-time-augmented targets on plain tensors: shift/flip views, their cell maps, the averaged target.

*Vision Transformers with Self-Distilled Registers* (PH-Reg, NeurIPS 2025). Knows nothing about timm: images
`(B, 3, H, W)` and patch features `(B, G_h G_w, C)` in, tensors out. Written from the spec
(../shared/methods/distill.md, C3), not from the reference code. DVT's denoiser (C4) reuses the same targets.

A view is `(dy, dx, flip)`: the image is flipped horizontally (if `flip`), then shifted by whole patches, `dy`
rows down and `dx` columns right; pixels the shift uncovers take the `fill` colour. View cell `(r, c)` then
shows source cell `(r - dy, c')` with `c' = c - dx` (no flip) or `G_w - 1 - (c - dx)` (flip), when in range.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def choose_views(grid: tuple[int, int], num_views: int = 10, max_shift: Optional[int] = None,
                 candidates: int = 100, generator: Optional[torch.Generator] = None) -> list[tuple[int, int, bool]]:
    """The original view plus `num_views - 1` shifted views picked by farthest-point sampling.

    Candidates: `candidates` random whole-patch shifts in `[-m, m]^2`, `m = round(0.15 * min(grid))` (or
    `max_shift`), each with a random horizontal flip. Farthest-point sampling on the shift vectors starts from
    the original view (0, 0); each step takes the candidate farthest from every view already chosen.
    """
    m = round(0.15 * min(grid)) if max_shift is None else max_shift
    shifts = torch.randint(-m, m + 1, (candidates, 2), generator=generator)
    flips = torch.randint(0, 2, (candidates,), generator=generator).bool()
    chosen = [(0, 0, False)]
    dist = shifts.float().norm(dim=1)  # distance of each candidate to the nearest chosen view
    for _ in range(num_views - 1):
        i = int(dist.argmax())
        chosen.append((int(shifts[i, 0]), int(shifts[i, 1]), bool(flips[i])))
        dist = torch.minimum(dist, (shifts - shifts[i]).float().norm(dim=1))
    return chosen


def make_view(images: torch.Tensor, view: tuple[int, int, bool], patch: tuple[int, int],
              fill: torch.Tensor) -> torch.Tensor:
    """The view `(dy, dx, flip)` of `images` (B, C, H, W); `fill` (C,) colours the uncovered pixels."""
    dy, dx, flip = view
    x = images.flip(-1) if flip else images
    py, px = dy * patch[0], dx * patch[1]
    H, W = x.shape[-2:]
    out = fill.to(x).view(1, -1, 1, 1).expand_as(x).clone()
    ys, yd = slice(max(0, -py), min(H, H - py)), slice(max(0, py), min(H, H + py))
    xs, xd = slice(max(0, -px), min(W, W - px)), slice(max(0, px), min(W, W + px))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def source_cells(view: tuple[int, int, bool], grid: tuple[int, int]) -> torch.Tensor:
    """(G_h G_w,) flat source cell shown at each view cell, -1 where the view shows fill."""
    dy, dx, flip = view
    gh, gw = grid
    r = torch.arange(gh)[:, None] - dy
    c = torch.arange(gw)[None] - dx
    c = gw - 1 - c if flip else c
    valid = (r >= 0) & (r < gh) & (c >= 0) & (c < gw)
    return torch.where(valid, r * gw + c, torch.full_like(r * c, -1)).flatten()


def average_views(features: list[torch.Tensor], views: list[tuple[int, int, bool]],
                  grid: tuple[int, int]) -> torch.Tensor:
    """Map each view's patch features (B, G, C) back to their source cells and average over covering views.

    Returns (B, G, C); a cell no view covers (impossible while the original view is among `views`) is 0.
    """
    total = torch.zeros_like(features[0])
    count = torch.zeros(features[0].shape[1], device=features[0].device, dtype=features[0].dtype)
    for feats, view in zip(features, views):
        src = source_cells(view, grid).to(feats.device)
        keep = src >= 0
        total.index_add_(1, src[keep], feats[:, keep])
        count.index_add_(0, src[keep], torch.ones_like(src[keep], dtype=count.dtype))
    return total / count.clamp_min(1).view(1, -1, 1)


def distill_loss(student: torch.Tensor, target: torch.Tensor, mse_weight: float = 1.0) -> torch.Tensor:
    """`(1 - mean cos(s, t)) + mse_weight * MSE(s, t)` over patch tokens (B, G, C)."""
    cos = F.cosine_similarity(student, target, dim=-1).mean()
    return (1 - cos) + mse_weight * F.mse_loss(student, target)


def high_norm_fraction(tokens: torch.Tensor, sigmas: float = 3.0) -> torch.Tensor:
    """Artefact score: the fraction of patch tokens (B, G, C) whose norm exceeds `mu + sigmas * sigma` of all of
    the batch's patch-token norms."""
    norms = tokens.norm(dim=-1).flatten()
    return (norms > norms.mean() + sigmas * norms.std()).float().mean()
