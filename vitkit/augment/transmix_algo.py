"""TransMix's label, in plain torch: CutMix targets re-weighted by class attention inside the pasted box.

Conventions (spec ../shared/methods/augment-pretrain.md, D1): the partner of image i is `flip(batch)[i]`;
`lam` below is always the *partner's* share of the target (timm's Mixup λ is the original's: `1 - lam`).
"""
from __future__ import annotations

import torch


def paste(images: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """CutMix pixels: (B, C, H, W) with rows `yl:yh`, columns `xl:xh` taken from the flipped batch (a copy)."""
    yl, yh, xl, xh = box
    out = images.clone()
    out[:, :, yl:yh, xl:xh] = images.flip(0)[:, :, yl:yh, xl:xh]
    return out


def blend(images: torch.Tensor, lam: float) -> torch.Tensor:
    """Mixup pixels: `(1 - lam)·x + lam·flip(x)`."""
    return (1.0 - lam) * images + lam * images.flip(0)


def box_on_grid(box: tuple[int, int, int, int], size: tuple[int, int], grid: tuple[int, int],
                mode: str = "nearest") -> torch.Tensor:
    """(gh, gw) share of each patch inside the pixel box.

    `nearest` (the reference's, through nearest downsampling): 1 where the patch's sampled pixel
    `(floor(r·H/gh), floor(c·W/gw))` (its top-left pixel when the grid divides the image) lies in the box, else 0.
    `coverage`: the fraction of the patch's pixels inside the box.
    """
    yl, yh, xl, xh = box
    H, W = size
    gh, gw = grid
    if mode == "nearest":
        rows = torch.arange(gh) * H // gh
        cols = torch.arange(gw) * W // gw
        inside_r = ((rows >= yl) & (rows < yh)).float()
        inside_c = ((cols >= xl) & (cols < xh)).float()
        return inside_r[:, None] * inside_c[None, :]
    if mode == "coverage":
        def overlap(lo, hi, n, g):  # per cell: |[cell_lo, cell_hi) ∩ [lo, hi)| / cell length
            edges = torch.arange(g + 1, dtype=torch.float64) * n / g
            inter = (torch.minimum(edges[1:], torch.tensor(float(hi))) -
                     torch.maximum(edges[:-1], torch.tensor(float(lo)))).clamp_min(0)
            return (inter / (edges[1:] - edges[:-1])).float()
        return overlap(yl, yh, H, gh)[:, None] * overlap(xl, xh, W, gw)[None, :]
    raise ValueError(f"transmix: `box_mode` must be 'nearest' or 'coverage', got {mode!r}")


def attention_lambda(attn: torch.Tensor, box_grid: torch.Tensor, lam_area: float) -> torch.Tensor:
    """(B,) TransMix's partner share `(lam_area + Σ_box a / Σ a) / 2`.

    Args:
        attn: (B, gh, gw) class-token attention to each patch (mean over heads), non-negative.
        box_grid: (gh, gw) share of each patch inside the pasted box (`box_on_grid`).
        lam_area: box area / image area.
    """
    a = attn.flatten(1).float()
    inside = (a * box_grid.flatten().to(a)).sum(1)
    return (lam_area + inside / a.sum(1).clamp_min(torch.finfo(a.dtype).tiny)) / 2


def mix_targets(one_hot: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """(B, K) `(1 - lam)·y + lam·flip(y)`; `lam` a scalar or (B,) per sample."""
    lam = torch.as_tensor(lam, dtype=one_hot.dtype, device=one_hot.device).reshape(-1, 1)
    return (1 - lam) * one_hot + lam * one_hot.flip(0)
