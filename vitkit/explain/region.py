"""Region attention: attention from a region of patches to the scene, per head and block (ViTGaze's taps).

Paper: *ViTGaze: Gaze Following with Interaction Features in Vision Transformers* (Song et al., 2024),
arXiv:2403.12778. *Claim implemented:* the interaction feature `M = Σ_i w_i A[:, :, i]`, the attention rows of
the region's patches (patch rows and columns of each block's softmax attention, not renormalised) weighted by
region weights `w` that sum to 1 and are zero outside the region: uniform over the box's patches by default, or
a softmax over the box of a score map (ViTGaze learns that score; the gaze decoder on top of `M` is an
application, not part of vitkit).

*Plugs in at.* Reads `LayerAttention` from `vk.attention` / `capture` (E1's q/k taps: fused SDPA stays on).
*Hand-written here, and why:* a weighted sum of attention rows; the reference (hustvl/ViTGaze) needs detectron2
and xFormers and is a gaze model, not a reusable primitive.

Spec: ../shared/methods/explain.md (E9). Docs: docs/explain.md.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

Region = Union[Sequence[float], torch.Tensor]


def box_patches(box: Sequence[float], grid: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """(gh, gw) bool: the patches a box (x0, y0, x1, y1) in input pixels (x1, y1 exclusive) overlaps."""
    if len(box) != 4:
        raise ValueError(f"region_attention: a box is (x0, y0, x1, y1) in input pixels, got {tuple(box)!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    gh, gw = grid
    ph, pw = patch_size
    H, W = gh * ph, gw * pw
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise ValueError(f"region_attention: box {tuple(box)} must satisfy 0 <= x0 < x1 <= {W} and "
                         f"0 <= y0 < y1 <= {H} (the {W}x{H} input)")
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    mask[int(y0 // ph):math.ceil(y1 / ph), int(x0 // pw):math.ceil(x1 / pw)] = True
    return mask


def region_weights(region: Region, grid: tuple[int, int], patch_size: tuple[int, int], batch: int = 1,
                   score: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, gh*gw) weights over patches, summing to 1 per sample, zero outside the region.

    Args:
        region: a box (x0, y0, x1, y1) in input pixels, or non-negative patch weights / a bool mask (gh, gw) or
            (B, gh, gw) (normalised to sum 1).
        score: (B, gh, gw) or (gh, gw) logits; the weights are their softmax over the region's patches (ViTGaze's
            learned region weights). Default: uniform over the region.
    """
    gh, gw = grid
    for name, t in (("patch weights", region), ("score", score)):
        if isinstance(t, torch.Tensor) and t.ndim == 3 and t.shape[0] not in (1, batch):
            raise ValueError(f"region_attention: {name} hold {t.shape[0]} maps for a batch of {batch}")
    if isinstance(region, torch.Tensor):
        if region.shape[-2:] != (gh, gw) or region.ndim not in (2, 3):
            raise ValueError(f"region_attention: patch weights must be (gh, gw) = ({gh}, {gw}) or (B, {gh}, {gw}), "
                             f"got {tuple(region.shape)}")
        w = region.float().reshape(-1, gh * gw).expand(batch, -1)
        if (w < 0).any():
            raise ValueError("region_attention: patch weights must be non-negative")
    else:
        w = box_patches(region, grid, patch_size).float().reshape(1, -1).expand(batch, -1)
    inside = w > 0
    if not inside.any(1).all():
        raise ValueError("region_attention: the region holds no patch (all weights are zero)")
    if score is not None:
        s = score.float().reshape(-1, gh * gw).expand(batch, -1)
        w = s.masked_fill(~inside, float("-inf")).softmax(-1)
    return w / w.sum(1, keepdim=True)


def region_attention(la, region: Region, score: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, h, gh, gw) `Σ_i w_i A[:, :, i]` of one block's `LayerAttention` `la` over the patch rows `i`.

    Rows and columns are patches (prefix and prompt tokens dropped, not renormalised). After token reduction a
    patch's row is its token's row (a dropped patch has none: zeros) and columns are unmerged by `to_grid`.
    """
    a = la.attn
    if a is None:
        raise ValueError("region_attention: this capture kept no softmax attention (softmax=False)")
    B, P = a.shape[0], la.num_prefix_tokens
    w = region_weights(region, la.grid, la.layout.patch_size, B, score).to(a)  # (B, G)
    if la.source is None:
        if a.shape[-2] - P != w.shape[1]:
            raise ValueError(f"region_attention: block {la.index} holds {a.shape[-2] - P} tokens for "
                             f"{w.shape[1]} patches and no source map; keep the source map (tome: unmerge=True)")
        rows = torch.einsum("bg,bhgn->bhn", w, a[:, :, P:])
    else:  # each patch's row is its token's: sum the weights per token (dropped patches, -1, carry none)
        keep = (la.source >= 0).to(w.dtype)
        per_token = torch.zeros(B, a.shape[-2], dtype=w.dtype, device=w.device)
        per_token.scatter_add_(1, la.source.clamp_min(0), w * keep)
        rows = torch.einsum("bt,bhtn->bhn", per_token, a)
    return la.to_grid(rows)


__all__ = ["box_patches", "region_weights", "region_attention"]
