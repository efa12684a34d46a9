"""MaskEmbed's masks and the locality metric on plain tensors (locality alignment, explain.md E8).

Covert et al., *Locality Alignment Improves Vision-Language Models*, ICLR 2025, arXiv:2410.11087. Torch only.
Written from the spec (../shared/methods/explain.md, E8), not from the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def sample_masks(batch: int, num_patches: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(3B, G) float masks over patches, 1 = kept: per image `m` (keep i where `u_i > u_0`, `u ~ U(0, 1)`), then
    its complement `1 - m`, then the all-ones mask; laid out `[m_1..m_B, 1-m_1..1-m_B, 1..1]`."""
    u0 = torch.rand(batch, 1, generator=generator)
    m = (torch.rand(batch, num_patches, generator=generator) > u0).float()
    return torch.cat([m, 1 - m, torch.ones_like(m)])


def mask_images(images: torch.Tensor, masks: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """`images` (B, C, H, W) times the patch masks (B, G) upsampled to pixels: dropped patches become 0."""
    B, _, H, W = images.shape
    grid = masks.reshape(B, 1, H // patch[0], W // patch[1])
    return images * F.interpolate(grid, scale_factor=patch, mode="nearest")


def mosaics(images: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 mosaics of consecutive image quadruples (B//4 of them) and the label of every patch (B//4, gh, gw), the
    patch grid `grid` being that of the mosaic (even sides)."""
    n = images.shape[0] // 4
    x = images[: 4 * n].reshape(n, 4, *images.shape[1:])
    top, bottom = torch.cat([x[:, 0], x[:, 1]], -1), torch.cat([x[:, 2], x[:, 3]], -1)
    y = labels[: 4 * n].reshape(n, 2, 2)
    gh, gw = grid
    per_patch = y.repeat_interleave(gh // 2, 1).repeat_interleave(gw // 2, 2)
    return torch.cat([top, bottom], -2), per_patch


def patch_probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                         test_labels: torch.Tensor, ridge: float = 1e-3) -> float:
    """The locality metric: top-1 of a linear probe from single patch features (N, D) to the label of the object
    under the patch (N,), fit on `train_*`, scored on `test_*`. The probe is ridge regression onto one-hot labels
    (closed form, features standardised on train, a bias column; ties go to the lowest class)."""
    a, b = train_feats.double(), test_feats.double()
    mean, std = a.mean(0), a.std(0, unbiased=False) + 1e-8
    a, b = ((a - mean) / std, (b - mean) / std)
    a, b = (torch.cat([t, torch.ones(len(t), 1, dtype=t.dtype)], 1) for t in (a, b))
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    y = F.one_hot(train_labels.long(), classes).double()
    w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    return float(((b @ w).argmax(1) == test_labels).double().mean())
