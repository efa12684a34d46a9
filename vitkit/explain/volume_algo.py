"""Neural transfer functions' volume similarity, model-free (torch only): slice a volume along its axes, pool the
per-slice patch features to one 3-D feature grid, and turn clicked voxels into similarity volumes.

Shapes: a volume is (D0, D1, D2); a feature grid (C, G0, G1, G2); a click (z, y, x) indexes (D0, D1, D2).
Spec: ../shared/methods/explain.md (E6).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def normalise(volume: torch.Tensor) -> torch.Tensor:
    """Min-max over the whole volume to [0, 1] (a constant volume becomes zeros)."""
    lo, hi = volume.min(), volume.max()
    return (volume - lo) / (hi - lo) if hi > lo else torch.zeros_like(volume)


def feature_grid(shape: Sequence[int], patches: int) -> tuple[int, int, int]:
    """(G0, G1, G2): the middle-sized axis gets `patches` cells, the others the same cells per voxel (>= 1)."""
    mid = sorted(shape)[1]
    return tuple(max(1, round(n * patches / mid)) for n in shape)


def slices(volume: torch.Tensor, axis: int, size: tuple[int, int]) -> torch.Tensor:
    """(D_axis, 1, H, W): the volume's slices along `axis`, resized (nearest) to `size` = (H, W)."""
    s = volume.movedim(axis, 0).unsqueeze(1).float()
    return F.interpolate(s, size=size, mode="nearest")


def pool_slices(feats: torch.Tensor, axis: int, cells: int) -> torch.Tensor:
    """Per-slice features (D_axis, C, Ga, Gb) -> (C, G0, G1, G2): the slice axis average-pooled to `cells` and put
    back in place of `axis` (the in-plane axes keep their order)."""
    f = feats.permute(1, 2, 3, 0)  # (C, Ga, Gb, D_axis)
    C, ga, gb, n = f.shape
    f = F.adaptive_avg_pool1d(f.reshape(C * ga * gb, 1, n), cells).reshape(C, ga, gb, cells)
    return f.movedim(-1, axis + 1)


def click_similarity(feats: torch.Tensor, clicks: Sequence[Sequence[float]], shape: Sequence[int],
                     floor: float = 0.25, power: float = 2.5, reduce: str = "mean") -> torch.Tensor:
    """(G0, G1, G2) similarity of every cell to the clicked voxels of one class.

    Features are L2-normalised; each click's feature is sampled trilinearly at its voxel centre (voxel i of an
    axis of D voxels lies at (i + ½)/D of the axis, as `F.interpolate(align_corners=False)` places cells); the
    cosine to every cell is set to 0 below `floor`, raised to `power`, and reduced over clicks ('mean', 'max').
    """
    f = F.normalize(feats.float(), dim=0)  # (C, G0, G1, G2)
    pts = torch.tensor([[2 * (c[a] + 0.5) / shape[a] - 1 for a in (2, 1, 0)] for c in clicks],
                       dtype=f.dtype, device=f.device)  # grid_sample wants (x, y, z) = (axis 2, 1, 0)
    picked = F.grid_sample(f[None], pts.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border",
                           align_corners=False)[0, :, :, 0, 0]  # (C, K)
    cos = torch.einsum("cxyz,ck->kxyz", f, F.normalize(picked, dim=0))
    sim = torch.where(cos >= floor, cos.clamp_min(0), torch.zeros_like(cos)) ** power
    return sim.mean(0) if reduce == "mean" else sim.amax(0)


def upsample(grid: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(G0, G1, G2) -> (D0, D1, D2), trilinear with `align_corners=False` (cells centred on their voxels)."""
    return F.interpolate(grid[None, None], size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]


def to_uint8(sim: torch.Tensor) -> torch.Tensor:
    """The transfer function's uint8 volume: `255 / (0.99 · max) · sim`, clamped to 255 before the cast."""
    peak = float(sim.max())
    if peak <= 0:
        return torch.zeros_like(sim, dtype=torch.uint8)
    return (sim * (255 / (0.99 * peak))).clamp(0, 255).round().to(torch.uint8)
